"""The data a generation task takes and returns (pydantic, so Prefect can persist it)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from ..blocks.inputs import InputImage

#: What a flow run makes: images, videos, or both (an image per description, then videos from it).
Kind = Literal["image", "video", "image_to_video"]
#: What one generation makes (an ``image_to_video`` run has both).
Stage = Literal["image", "video"]


class GenerationSpec(BaseModel):
    """One planned generation: which description, which variant, with which seed.

    ``index`` and ``variant`` are 0-based; ``position`` is 1-based among ``total``
    generations of the flow run (for ``[3/8]`` in the logs). ``prompt_id`` is chosen by the
    client before submitting so the prompt can be found again on the server.

    In an ``image_to_video`` run, a video's ``variant`` counts the description's videos (0 to
    ``image_variants * variants - 1``), ``source`` is the ``position`` of the image generation it
    starts from, and its ``inputs["image"]`` is that image once it exists.
    """

    index: int
    variant: int
    description: str
    seed: Optional[int] = None
    prompt_id: str
    position: int
    total: int
    stage: Stage = "image"
    inputs: dict[str, InputImage] = Field(
        default_factory=dict,
        description="Input images bound to workflow parameters by name (uploaded to the server that runs it).")
    source: Optional[int] = Field(default=None, description="Position of the image generation a video starts from.")


class GenerationSettings(BaseModel):
    """What every generation of one flow run shares.

    ``output_dir`` is a local directory path; ``params`` are extra workflow parameters
    (e.g. ``negative_prompt``) offered to the workflow's bindings.
    """

    kind: Kind = "image"
    character: str
    output_dir: str
    descriptions: int = Field(description="How many descriptions the run has.")
    first_index: int = Field(default=0, description="Index of the run's first description (a shard of a bigger "
                                                    "run starts past 0).")
    variants: int = Field(default=1, description="Generations per description (image_to_video: videos per image).")
    image_variants: int = Field(default=1, description="Images per description in an image_to_video run.")
    params: dict[str, Any] = Field(default_factory=dict)
    output_types: list[str] = Field(default_factory=lambda: ["output"])
    heartbeat_s: float = 30.0
    retries: int = Field(default=0, ge=0, description="Task retries for transient failures.")
    retry_delay_s: float = Field(
        default=0.0, ge=0, description="Seconds before the first retry, doubling after each, with jitter.")
    upload_subfolder: str = Field(
        default="comfy-pipeline", description="Subfolder of the server's input folder that input images are "
                                              "uploaded to (one per flow run).")


class OutputFile(BaseModel):
    """One file written to disk: its local ``path`` and size in ``bytes``, and where it came from."""

    path: str
    bytes: int
    node_id: str
    key: str
    server_filename: str
    subfolder: str
    type: str = Field(default="output", description="The /view type it was listed under on the server "
                      "(output, temp or input); with server_filename and subfolder it names the server's copy.")
    animated: bool = False


class GenerationResult(BaseModel):
    """A finished generation.

    Durations are seconds: ``queued_s`` from submit to ``execution_start``, ``execution_s``
    from there to completion, ``download_s`` for all ``/view`` downloads, ``total_s`` from the
    slot taken on a server (uploads, queue, execution, downloads; not the wait for a free slot)
    to the last file saved. ``cached`` is True when ComfyUI served every node from its cache.
    """

    kind: Kind = Field(description="What this generation made: image or video (the flow run's kind, except "
                                   "in an image_to_video run: its stage).")
    character: str
    index: int
    variant: int
    description: str
    prompt_id: str
    server: str = Field(default="", description="URL of the ComfyUI server that ran it.")
    seed: Optional[int]
    status: Literal["completed", "cached"]
    cached: bool
    files: list[OutputFile]
    queued_s: float
    execution_s: float
    download_s: float
    total_s: float
    moved_from: Optional[str] = Field(
        default=None,
        description="URL of the server this generation left because it became unreachable (its "
                    "prompt was run again on `server`).")
    source: Optional[int] = Field(
        default=None, description="Position of the image generation this video started from (image_to_video).")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="The value each input image was bound as on the server "
                                          "(an uploaded name, or '<subfolder>/<file> [output]').")
    flow_attempt: int = Field(
        default=1, ge=1,
        description="The attempt of the flow run that ran it (a later attempt reuses this result).")

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)
