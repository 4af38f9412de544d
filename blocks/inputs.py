"""Input images: local files a workflow's ``LoadImage`` reads, put on the server that runs it.

A workflow parameter can be an image (``"reference_image": "LoadRef.inputs.image"``): a local
file path, checked once before anything is sent (:func:`read_input_image`: it exists, can be
read, and is an image by its first bytes). Right before a prompt is posted to a server, each of
its images becomes the value ``LoadImage`` expects there (:class:`InputImages`, one per
connection):

* an image that server made itself (an earlier prompt's output, :attr:`InputImage.origin`) is
  named with ComfyUI's annotation ``"<subfolder>/<filename> [output]"``: nothing is uploaded;
* any other is uploaded once per server per run with ``POST /upload/image`` (multipart field
  ``image``, ``type=input``, a ``subfolder`` per run so that runs never collide), whatever the
  number of generations that use it (its sha256 is the key), and the name the server answers is
  bound: ComfyUI renames a second file of the same name (``ref (1).png``) unless its bytes are
  the same, so the requested name is never assumed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

from pydantic import BaseModel, Field

from .errors import InputImageError, ServerError, WorkflowError

if TYPE_CHECKING:
    from .http_api import ComfyUIHTTP
    from .workflow import ComfyUIWorkflow

__all__ = ["ServerFile", "InputImage", "read_input_image", "image_type", "InputImages", "upload_value",
           "check_input_images"]

#: The first bytes of each image format ComfyUI's LoadImage reads (with Pillow), and its MIME type.
_SIGNATURES: tuple[tuple[Callable[[bytes], bool], str], ...] = (
    (lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"), "image/png"),
    (lambda b: b.startswith(b"\xff\xd8\xff"), "image/jpeg"),
    (lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP", "image/webp"),
    (lambda b: b[:6] in (b"GIF87a", b"GIF89a"), "image/gif"),
    (lambda b: b.startswith(b"BM"), "image/bmp"),
    (lambda b: b[:4] in (b"II*\x00", b"MM\x00*"), "image/tiff"),
)


def image_type(head: bytes) -> Optional[str]:
    """The MIME type of an image from its first 12 bytes (PNG, JPEG, WebP, GIF, BMP, TIFF), else None."""
    return next((mime for matches, mime in _SIGNATURES if matches(head)), None)


class ServerFile(BaseModel):
    """A file on a ComfyUI server, as ``/view`` and ``LoadImage`` name it."""

    server: str = Field(description="Base URL of the server that has the file.")
    filename: str
    subfolder: str = ""
    type: str = Field(default="output", description="output, temp or input (ComfyUI's folders).")

    @property
    def annotated(self) -> str:
        """``"<subfolder>/<filename> [<type>]"``: how ``LoadImage`` on the same server names it."""
        name = f"{self.subfolder}/{self.filename}" if self.subfolder else self.filename
        return f"{name} [{self.type}]"


class InputImage(BaseModel):
    """A local image to bind to a workflow input (see the module docstring).

    ``path`` is absolute; ``sha256`` (hex) and ``bytes`` describe its content when it was read;
    ``origin``: the same image on the server that made it (an image-to-video run's image), which
    that server reads by annotation instead of an upload.
    """

    path: str
    sha256: str
    bytes: int
    content_type: str = "image/png"
    origin: Optional[ServerFile] = None


def read_input_image(name: str, path: str | Path, *, origin: Optional[ServerFile] = None) -> InputImage:
    """Check a local image file and describe it (its whole content is hashed).

    Args:
        name: the workflow parameter it is bound to, for the error message.
        path: the file; ``~`` is expanded, a relative path is taken from the working directory.
        origin: the server's copy, when a server of the run made it.

    Raises:
        InputImageError: the file is missing, is not a file, cannot be read, is empty, or its first
            bytes are not those of a PNG, JPEG, WebP, GIF, BMP or TIFF image.
    """
    file = Path(path).expanduser().absolute()
    try:
        exists, is_file = file.exists(), file.is_file()
    except OSError as exc:  # a name too long, a folder we may not look into
        raise InputImageError(name, str(file), f"cannot be read ({exc.strerror or exc})") from None
    if not exists:
        raise InputImageError(name, str(file), "does not exist")
    if not is_file:
        raise InputImageError(name, str(file), "is not a file")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(file, "rb") as handle:
            head = handle.read(12)
            digest.update(head)
            size = len(head)
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise InputImageError(name, str(file), f"cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise InputImageError(name, str(file), "is empty")
    mime = image_type(head)
    if mime is None:
        raise InputImageError(name, str(file), "is not an image (its first bytes are not those of an image file)")
    return InputImage(path=str(file), sha256=digest.hexdigest(), bytes=size, content_type=mime, origin=origin)


def check_input_images(inputs: Mapping[str, str], per_description: Sequence[Mapping[str, str]],
                 stages: Mapping[str, "ComfyUIWorkflow"]) -> dict[str, list[dict[str, InputImage]]]:
    """Check every input image once and give each stage, for each description, the images its
    workflow binds: ``{stage: [{parameter: InputImage}, ...]}``.

    ``inputs``: the run's ``{parameter: path}``; ``per_description``: each description's own
    (they win over the run's); ``stages``: ``{"image": workflow}`` or, in an image_to_video run,
    also ``"video"`` (whose ``image`` is the generated image, never an input).

    Raises:
        WorkflowError: an input that no workflow of the run binds.
        InputImageError: a file that is missing, unreadable or not an image.
    """
    names = set(inputs).union(*[set(row) for row in per_description]) if per_description else set(inputs)
    for name in sorted(names):
        if not any(workflow.binds(name) and not (stage == "video" and name == "image")
                   for stage, workflow in stages.items()):
            if name == "image" and "video" in stages:
                raise WorkflowError(
                    f"input image 'image' is not bound by the image workflow {workflow_label(stages['image'])}: in an "
                    "image_to_video run the video workflow's 'image' is the image made for its description, and "
                    "input images (--input, a descriptions file's columns) go to the image workflow; bind 'image' "
                    "there (examples/workflows/img2img_smoke.json does) or leave the input out")
            sources = " or ".join(workflow_label(w) for w in stages.values())
            raise WorkflowError(f"input image {name!r} is not bound by {sources}: bind it to a LoadImage input "
                                f"(\"{name}\": \"<node title>.inputs.image\" in its bindings) or leave it out")
    read: dict[str, InputImage] = {}
    out: dict[str, list[dict[str, InputImage]]] = {stage: [] for stage in stages}
    for row in per_description:
        merged = {**inputs, **row}
        for stage, workflow in stages.items():
            chosen = {}
            for name, path in merged.items():
                if workflow.binds(name) and not (stage == "video" and name == "image"):
                    if path not in read:
                        read[path] = read_input_image(name, path)
                    chosen[name] = read[path]
            out[stage].append(chosen)
    return out


def workflow_label(workflow: "ComfyUIWorkflow") -> str:
    """How messages name a workflow: ``saved workflow 'name'`` for a saved block, else its file."""
    name = getattr(workflow, "_block_document_name", None)
    return f"saved workflow {name!r}" if name else repr(workflow.source or "the workflow")


def upload_value(answer: dict) -> str:
    """The value to bind from a ``POST /upload/image`` answer ``{name, subfolder, type}``:
    ``<subfolder>/<name>`` (or ``<name>``), plus `` [temp]``/`` [output]`` for another folder
    than ``input``."""
    name = f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]
    kind = answer.get("type") or "input"
    return name if kind == "input" else f"{name} [{kind}]"


class InputImages:
    """What one server calls each input image of a run (one per connection, thread-safe).

    Args:
        url: the server's base URL (an image whose ``origin`` is this server is not uploaded).
        http: its HTTP client (the connection's: session, headers, API key, TLS, retries).

    Attributes:
        uploads: how many files were uploaded to this server.
    """

    def __init__(self, url: str, http: "ComfyUIHTTP"):
        self.url = url
        self._http = http
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], concurrent.futures.Future] = {}
        self.uploads = 0

    def value(self, image: InputImage, subfolder: str) -> str:
        """The value to put into ``LoadImage.inputs.image`` on this server for ``image``.

        Uploads it into ``subfolder`` (type input) the first time this connection is asked for
        that content and subfolder; later calls, from any thread, get the same answer (a call
        made while the upload runs waits for it). A failed upload is not remembered (the next
        call tries again), except a file too big for the server or unreadable.

        Raises:
            InputImageError: the local file cannot be read any more, or the server refuses its
                size (HTTP 413).
            ServerError / ServerUnreachable / AuthenticationFailed: the upload failed (after the
                HTTP client's retries of 5xx answers and dropped transfers).
        """
        if (image.origin is not None and image.origin.type == "output"
                and image.origin.server.rstrip("/") == self.url.rstrip("/")):
            return image.origin.annotated  # (a temp file would be gone after a restart: uploaded instead)
        key = (image.sha256, subfolder)
        with self._lock:
            future = self._values.get(key)
            mine = future is None
            if mine:
                future = self._values[key] = concurrent.futures.Future()
        if not mine:
            return future.result()
        try:
            data = _read(image)
            try:
                answer = self._http.upload_image(data, Path(image.path).name, subfolder=subfolder,
                                                 content_type=image.content_type)
            except ServerError as exc:
                if exc.status != 413:
                    raise
                raise InputImageError("image", image.path, f"is {image.bytes} bytes, more than {self.url} accepts "
                                      "(HTTP 413)", "use a smaller file, or start ComfyUI with a larger "
                                      "--max-upload-size (in MB)") from None
            value = upload_value(answer)
        except BaseException as exc:
            if not isinstance(exc, InputImageError):  # a file too big or unreadable stays so: remembered
                with self._lock:
                    self._values.pop(key, None)
            future.set_exception(exc)
            raise
        with self._lock:
            self.uploads += 1
        future.set_result(value)
        return value


def _read(image: InputImage) -> bytes:
    try:
        data = Path(image.path).read_bytes()
    except OSError as exc:
        raise InputImageError("image", image.path, f"cannot be read any more ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise InputImageError("image", image.path, "changed since the run started (its content is not the same)")
    return data
