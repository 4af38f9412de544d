"""Helpers to try and test pipelines without a GPU, as Prefect ships ``prefect.testing``.

- :mod:`comfy_pipeline.testing.standin`: :class:`~comfy_pipeline.testing.standin.StandInComfyUI`,
  a stand-in ComfyUI server on 127.0.0.1 (no model; placeholder images). It needs aiohttp, which
  the package does not depend on: ``pip install 'comfy-pipeline[demo]'``.
- :func:`smoke_workflow`: the smoke workflows (no model files needed) that ``--server demo`` uses
  when no ``--workflow`` is given; the same files as the repository's ``examples/workflows/``.

Importing this package imports nothing else (no aiohttp).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["smoke_workflow"]

#: The folder of the packaged smoke workflows: ``smoke_image.json`` (EmptyImage → SaveImage),
#: ``smoke_video.json`` (EmptyImage → SaveAnimatedWEBP) and ``img2video_smoke.json`` (LoadImage →
#: RepeatImageBatch → SaveAnimatedWEBP: the video workflow of an image-to-video run).
WORKFLOWS = Path(__file__).resolve().parent


def smoke_workflow(kind: str = "image") -> Path:
    """The path of the packaged smoke workflow for ``kind``: ``image``, ``video``, or
    ``image_to_video`` (the video workflow of such a run, which makes a video from ``image``).

    Raises:
        ValueError: another ``kind``.
    """
    if kind in ("image_to_video", "image-to-video"):
        return WORKFLOWS / "img2video_smoke.json"
    if kind not in ("image", "video"):
        raise ValueError(f"no smoke workflow for kind {kind!r}: give 'image', 'video' or 'image_to_video'")
    return WORKFLOWS / f"smoke_{kind}.json"
