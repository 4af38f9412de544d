"""A stand-in ComfyUI server for tests and demos: real HTTP + WebSocket on 127.0.0.1, no GPU, no models.

:class:`StandInComfyUI` runs an :mod:`aiohttp.web` application in its own asyncio event loop on a
background daemon thread, so synchronous tests (``requests`` + ``websocket-client``) can talk to it
exactly as they would to ComfyUI; ``comfy-pipeline run --server demo`` runs one inside the command,
and your own tests can run your pipelines against it (``with StandInComfyUI() as comfy: ...
comfy.url``). It needs aiohttp: ``pip install 'comfy-pipeline[demo]'``. Its images are placeholders
(one colour per image, from the seed or the EmptyImage colour), its videos byte blobs with the right
magic. Its behaviour was written from the transcripts recorded against a real ComfyUI 0.3.64 in the
repository's ``tests/transcripts/`` (see the README there); where this module and a transcript
disagree, the transcript is right.

What it reproduces
------------------
* Routes: ``GET /system_stats``, ``/features``, ``/embeddings``, ``/models[/{folder}]``,
  ``/object_info[/{node_class}]``, ``GET|POST /prompt``, ``GET|POST /queue``, ``POST /interrupt``,
  ``POST /free``, ``GET|POST /history``, ``GET /history/{prompt_id}``, ``GET /view``,
  ``POST /upload/image`` and ``GET /ws?clientId=``.
* ``POST /prompt`` validation with the real error bodies (``no_prompt``, ``invalid_prompt``,
  ``prompt_no_outputs``, ``prompt_outputs_failed_validation`` with per-node ``node_errors`` and the
  real ``dependent_outputs`` accumulation, HTTP 200 with ``node_errors`` when only some outputs fail,
  HTTP 500 text body for a body that is not JSON).
* One worker executing prompts serially in queue order, sending the real message sequence:
  ``status`` broadcasts on put/get/done, then to the prompt's client ``execution_start``,
  ``execution_cached``, ``progress_state``, ``executing``, ``progress`` + binary previews,
  ``executed``, ``execution_success`` / ``execution_error`` / ``execution_interrupted``, the final
  ``status`` and ``executing {node: null, prompt_id}`` last.  Nodes run in the order ComfyUI picks
  (output nodes as soon as they are ready, then nodes that feed an output, ...).
* Caching of the previous prompt only (a node is cached when its class, inputs and upstream nodes equal
  a node of the latest prompt), with ``executed`` re-sent for cached output nodes.
* The socket-map quirks of transcript h: prompts without ``client_id`` send their lifecycle messages to
  nobody but broadcast ``progress_state``/``progress``/previews; a second socket with the same
  ``clientId`` replaces the first, and when the old one closes the entry is removed (the new socket
  goes deaf); a socket that reconnects while its prompt runs gets ``executing {node}``.
* Output files (real small PNGs, and byte blobs with the right magic for webp/webm/mp4/flac/gif), served
  by ``/view``; every file's bytes name the prompt id and file name so tests can tell files apart.
* ``POST /upload/image`` as ComfyUI 0.3.64's ``image_upload`` (transcript k): multipart field ``image``,
  form fields ``type`` (input|temp|output, default input; anything else is a 500 as on the real
  server), ``subfolder`` and ``overwrite`` (``"true"`` or ``"1"``).  The file is kept in ``files`` under
  ``(type, normalised subfolder, filename)``.  Without overwrite, while that name is taken: identical
  bytes (same sha256) are a duplicate, answered under that name with nothing written; other bytes move
  on to ``stem (1).ext``, ``stem (2).ext``, ... (the first free or identical one).  A subfolder or
  filename that leaves the folder is a 400, so is a request without the ``image`` file or its filename.
  The answer is ``{"name", "subfolder" (as sent), "type"}``; an ``input`` upload adds
  ``<subfolder>/<name>`` (or ``<name>``) to ``input_images``.
* LoadImage as ``LoadImage.VALIDATE_INPUTS`` checks it: ``"<subfolder>/<file> [output]"`` (or
  ``[input]`` / ``[temp]``) must be in ``files`` (outputs of earlier prompts are), a plain value in
  ``input_images``; otherwise the 400 ``custom_validation_failed`` "image - Invalid image file: <value>".
  Its IMAGE has the size of the PNG it names when ``files`` holds one (64x64 otherwise), one grey
  frame; as its ``IS_CHANGED`` hashes the file, it is not cached when the file's bytes changed (an
  upload with overwrite) since the previous prompt.  RepeatImageBatch multiplies the batch by
  ``amount``; VAEEncode gives a LATENT of the image's size (cropped to multiples of 8), as
  EmptyLatentImage's.  KSampler takes ``denoise`` (FLOAT 0..1) as recorded.

Test hooks
----------
Knobs (settable at any time): ``execution_time_s``, ``progress_steps``, ``history_delay_s``,
``preview_frames``, ``require_token``.  Markers in any STRING input value of a prompt:
``[[fail]]`` (the first node that executes raises ``execution_error``, RuntimeError
"stand-in failure requested"), ``[[hang]]`` (the prompt runs until interrupted or the server stops)
and ``[[sleep=S]]`` (the prompt takes S seconds instead of ``execution_time_s``).

Interrupts behave as in ComfyUI: a node without progress steps is not interruptible, so an interrupt
takes effect at the next node boundary (``executing`` for the next node is sent first), or at the next
progress step of a stepped node, or at once for a ``[[hang]]`` prompt.  An interrupt that arrives
while the last node of a prompt without progress steps runs is lost, as on the real server.
``POST /queue {"delete": [...]}`` removes pending prompts only.

More markers: ``[[silent=S]]`` (from the moment the worker takes the prompt it sends nothing to
anyone for S seconds, not even the queue ``status`` broadcast, no ``execution_start``, no
``executing`` nor ``progress``; it is interruptible meanwhile; then it runs as a prompt with zero
execution time and no progress steps, sending its whole normal sequence from the ``status`` broadcast
to ``executing {node: null}``) and ``[[flaky]]`` (the first execution of a prompt with a STRING value
containing the marker that this server has not seen before raises ``execution_error`` at its first
executing node, RuntimeError "stand-in flaky failure"; every later execution of a prompt with the same
text succeeds; the seen texts survive :meth:`StandInComfyUI.restart` and :meth:`clear_faults`).

Faults (methods, thread-safe, callable at any time; :meth:`StandInComfyUI.clear_faults` ends them all)
-----------------------------------------------------------------------------------------------------
* ``close_ws_after(n_messages, times=1)``: from now on every socket counts the frames (text and binary,
  garbage frames included) the server writes to it; once a socket has been sent ``n_messages`` frames
  its transport is aborted (no close frame, like a dying proxy).  ``times`` sockets are closed this way
  in total, then the fault switches itself off; ``times=0`` closes every socket every time (sockets
  opened later count from their first frame, the ``status`` hello).  ``n_messages=0`` aborts a socket
  when its next frame is due, without sending it.  The server keeps executing; frames for the gone
  socket are lost, and the clientId entry is removed at once, so a reconnect with the same clientId is
  served normally (``status`` with ``sid``, then ``executing {node}`` if one of its prompts is running).
* ``restart(down_s, wait=False)``: a ComfyUI restart.  Returns once the server is down: the listening
  socket is closed (connections are refused), every HTTP and WebSocket connection is aborted, the
  running prompt stops without another message, and the queue, history, cache and the ``number``
  counter are dropped (files, file counters and records stay).  ``down_s`` seconds later it listens
  again on the same port.  ``wait=True`` blocks until then; ``wait_until_up(timeout)`` does the same.
* ``fail_prompt_posts(k, status=500)``: the next ``k`` ``POST /prompt`` answer ``status`` with a text
  body and queue nothing (a ``prompt_id`` in the body is still counted in ``posts_per_prompt_id``).
* ``drop_prompt_posts(k)``: the next ``k`` ``POST /prompt`` are handled normally (a valid prompt is
  queued and runs) but the connection is aborted before the response is written (an ambiguous submit).
* ``truncate_views(k)``: the next ``k`` ``GET /view`` that find their file send the full
  ``Content-Length`` and headers but only the first half of the body, then abort the connection.
* ``delay_views(seconds)``: every ``GET /view`` waits this long before answering (0 = off).
* ``fail_views(k, status=503)``: the next ``k`` ``GET /view`` that find their file answer ``status``
  (a proxy or an overloaded server) instead of the file.
* ``fail_uploads(k, status=500)``: the next ``k`` ``POST /upload/image`` answer ``status`` with a text
  body and store nothing (no ``uploads`` record).
* ``drop_uploads(k)``: the next ``k`` ``POST /upload/image`` are handled normally (the file is stored,
  or found to be a duplicate, and listed in ``input_images``) but the connection is aborted before the
  response is written (an ambiguous upload; no ``uploads`` record, as no answer left the server).
* ``delay_prompt_posts(seconds)``: every ``POST /prompt`` waits this long before it is handled (the
  request still in transit: nothing is queued yet), then is handled and answered as usual (0 = off).
* ``send_garbage(every_n=3)``: from now on, after every ``every_n``-th normal frame to a socket, also send
  ``{not json``, a JSON list, ``{"type": "mystery_event", ...}`` without prompt_id and a binary frame
  of event type 99 (0 = off).  ``send_huge_binary(size_bytes)``: one binary frame of ``size_bytes``
  (type 1 / PNG header + random bytes) to every open socket now.
* Knobs ``request_latency_s`` (every HTTP request, WS upgrade included, waits this long before it is
  handled) and ``output_size_bytes`` (every output/temp file a prompt writes is padded to at least this
  many bytes, keeping its magic: a private ``stDn`` PNG chunk, a RIFF ``PADD`` chunk for webp, an mp4
  ``free`` box, trailing zero bytes for the rest).  Both default to 0 and are reset by ``clear_faults()``.

TLS: ``StandInComfyUI(ssl_context=ctx)`` (an :class:`ssl.SSLContext` for the server side, with its
certificate chain loaded) serves https and wss on the same port instead, and ``url`` starts with
``https://`` (after a :meth:`StandInComfyUI.restart` too).  A client that does not trust the
certificate fails in the TLS handshake: its request never reaches a route, nor the records below.

Records: ``executions_per_prompt_id`` (Counter: prompt id -> times the worker started it),
``interrupts`` (the ``prompt_id`` or None of every ``POST /interrupt`` received) and ``deletes`` (every id
received in ``POST /queue {"delete": [...]}``, whether or not it was pending), and ``executions``
(one dict per time the worker started a prompt: ``prompt_id``, ``strings`` (the prompt's STRING input
values), ``started`` and ``ended`` (``time.monotonic()``; ``ended`` None while it runs) and ``outcome``:
None while it runs, ``success``, ``error``, ``interrupted``, or ``lost`` when a :meth:`restart` stopped
it), ``uploads`` (one dict per ``POST /upload/image`` answered with a name: ``filename`` (as sent),
``subfolder`` (as sent), ``type`` (as answered), ``overwrite`` (bool: "true" or "1" was sent),
``name`` (as answered), ``sha256`` (hex digest of the bytes sent), ``bytes`` (int: their length),
``duplicate`` (bool: identical bytes were already there, nothing was written) and ``at``
(``time.monotonic()`` when the answer was written); uploads refused by a fault, dropped or answered
400/500 get none) and ``prompts`` (prompt id -> a copy of the ``prompt`` dict as received, for every
``POST /prompt`` that was queued, dropped ones included), all reset by ``reset_counters()``.
``executions`` records carry ``started``/``ended``, so tests can compare when prompts ran.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import hashlib
import json
import posixpath
import random
import re
import socket
import ssl
import string
import struct
import threading
import time
import uuid
import zlib
from functools import lru_cache
from http import HTTPStatus
from pathlib import Path
from typing import Any

import logging

try:
    from aiohttp import WSMsgType, web
except ImportError as exc:  # not a dependency of the package: the `demo` and `test` extras bring it
    raise ImportError(f"the stand-in ComfyUI needs aiohttp ({exc}): pip install 'comfy-pipeline[demo]'") from exc

log = logging.getLogger(__name__)

__all__ = ["StandInComfyUI", "free_port"]

MAX_UPLOAD_SIZE = 104857600
FEATURES = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE}
FAIL_MARKER = "[[fail]]"
HANG_MARKER = "[[hang]]"
SLEEP_RE = re.compile(r"\[\[sleep=([0-9]+(?:\.[0-9]*)?)\]\]")
SILENT_RE = re.compile(r"\[\[silent=([0-9]+(?:\.[0-9]*)?)\]\]")
FLAKY_MARKER = "[[flaky]]"
FAIL_MESSAGE = "stand-in failure requested"
FLAKY_MESSAGE = "stand-in flaky failure"
# What send_garbage() adds after every n-th normal frame.
GARBAGE_FRAMES: tuple = (
    "{not json",
    '["stand-in", "json", "list"]',
    '{"type": "mystery_event", "data": {"detail": "stand-in garbage", "value": 42}}',
    struct.pack(">I", 99) + b"stand-in garbage",
)
ERROR_500_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"

# Nodes whose progress bar is a sampler's; when a prompt has none of these, every node is "stepped".
SAMPLER_CLASSES = {"KSampler"}
# Output nodes that are never cached (their IS_CHANGED returns the time).
NEVER_CACHED = {"SaveImageWebsocket"}

CONTENT_TYPES = {
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webm": "video/webm",
    "mp4": "video/mp4",
    "mov": "video/quicktime",
    "mkv": "video/x-matroska",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "json": "application/json",
    "txt": "text/plain",
}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on (for "server down" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dumps(obj: Any) -> str:
    return json.dumps(obj)  # default separators, as the real server's frames


# ---------------------------------------------------------------------------------------------------
# Node definitions (/object_info)
# ---------------------------------------------------------------------------------------------------


#: The real /object_info entries of the node classes the stand-in runs, recorded with the
#: transcripts (package data, beside this module).
OBJECT_INFO_SUBSET = Path(__file__).resolve().parent / "object_info_subset.json"


@lru_cache(maxsize=1)
def _recorded_object_info() -> dict[str, Any]:
    """The real /object_info entries recorded in :data:`OBJECT_INFO_SUBSET`."""
    data = json.loads(OBJECT_INFO_SUBSET.read_text(encoding="utf-8"))
    return data["nodes"]


def _entry(
    name: str,
    *,
    required: dict[str, list],
    optional: dict[str, list] | None = None,
    hidden: dict[str, Any] | None = None,
    output: list[str] = (),
    output_name: list[str] | None = None,
    output_node: bool = False,
    category: str = "",
    display_name: str | None = None,
    python_module: str = "nodes",
    description: str = "",
) -> dict[str, Any]:
    inputs: dict[str, Any] = {"required": required}
    order: dict[str, Any] = {"required": list(required)}
    if optional:
        inputs["optional"] = optional
        order["optional"] = list(optional)
    if hidden:
        inputs["hidden"] = hidden
        order["hidden"] = list(hidden)
    return {
        "input": inputs,
        "input_order": order,
        "output": list(output),
        "output_is_list": [False] * len(output),
        "output_name": list(output_name if output_name is not None else output),
        "name": name,
        "display_name": display_name or name,
        "description": description,
        "python_module": python_module,
        "category": category,
        "output_node": output_node,
    }


_IMG_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def _fallback_object_info() -> dict[str, Any]:
    """Plausible /object_info entries for every class the stand-in knows.

    Used for classes that are not in the recorded subset (VAEEncode, SaveAudio,
    LoadAudio, VHS_VideoCombine) and for all classes when the recorded file cannot be found.
    """
    img = ["IMAGE"]
    prefix = ["STRING", {"default": "ComfyUI"}]
    e = {}
    e["EmptyImage"] = _entry(
        "EmptyImage",
        required={
            "width": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}],
            "height": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}],
            "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            "color": ["INT", {"default": 0, "min": 0, "max": 16777215, "step": 1, "display": "color"}],
        },
        output=["IMAGE"],
        category="image",
    )
    e["SaveImage"] = _entry(
        "SaveImage",
        required={"images": img, "filename_prefix": prefix},
        hidden=_IMG_HIDDEN,
        output_node=True,
        category="image",
        display_name="Save Image",
    )
    e["PreviewImage"] = _entry(
        "PreviewImage", required={"images": img}, hidden=_IMG_HIDDEN, output_node=True, category="image",
        display_name="Preview Image",
    )
    e["PrimitiveString"] = _entry(
        "PrimitiveString", required={"value": ["STRING", {"multiline": False}]}, output=["STRING"],
        category="utils/primitive", display_name="String",
    )
    e["PrimitiveStringMultiline"] = _entry(
        "PrimitiveStringMultiline", required={"value": ["STRING", {"multiline": True}]}, output=["STRING"],
        category="utils/primitive", display_name="String (Multiline)",
    )
    e["PreviewAny"] = _entry(
        "PreviewAny", required={"source": ["*", {}]}, output_node=True, category="utils",
        display_name="Preview Any",
    )
    e["SaveAnimatedWEBP"] = _entry(
        "SaveAnimatedWEBP",
        required={
            "images": img,
            "filename_prefix": prefix,
            "fps": ["FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}],
            "lossless": ["BOOLEAN", {"default": True}],
            "quality": ["INT", {"default": 80, "min": 0, "max": 100}],
            "method": [["default", "fastest", "slowest"]],
        },
        hidden=_IMG_HIDDEN,
        output_node=True,
        category="image/animation",
    )
    e["SaveAnimatedPNG"] = _entry(
        "SaveAnimatedPNG",
        required={
            "images": img,
            "filename_prefix": prefix,
            "fps": ["FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}],
            "compress_level": ["INT", {"default": 4, "min": 0, "max": 9}],
        },
        hidden=_IMG_HIDDEN,
        output_node=True,
        category="image/animation",
    )
    e["SaveWEBM"] = _entry(
        "SaveWEBM",
        required={
            "images": ["IMAGE", {}],
            "filename_prefix": ["STRING", {"default": "ComfyUI", "multiline": False}],
            "codec": ["COMBO", {"multiselect": False, "options": ["vp9", "av1"]}],
            "fps": ["FLOAT", {"default": 24.0, "min": 0.01, "max": 1000.0, "step": 0.01}],
            "crf": ["FLOAT", {"default": 32.0, "min": 0, "max": 63.0, "step": 1}],
        },
        hidden={"prompt": ["PROMPT"], "extra_pnginfo": ["EXTRA_PNGINFO"]},
        output_node=True,
        category="image/video",
    )
    e["CreateVideo"] = _entry(
        "CreateVideo",
        required={
            "images": ["IMAGE", {}],
            "fps": ["FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}],
        },
        optional={"audio": ["AUDIO", {}]},
        output=["VIDEO"],
        category="image/video",
    )
    e["SaveVideo"] = _entry(
        "SaveVideo",
        required={
            "video": ["VIDEO", {}],
            "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
            "format": ["COMBO", {"default": "auto", "multiselect": False, "options": ["auto", "mp4"]}],
            "codec": ["COMBO", {"default": "auto", "multiselect": False, "options": ["auto", "h264"]}],
        },
        hidden={"prompt": ["PROMPT"], "extra_pnginfo": ["EXTRA_PNGINFO"]},
        output_node=True,
        category="image/video",
    )
    e["ImageBlend"] = _entry(
        "ImageBlend",
        required={
            "image1": ["IMAGE", {}],
            "image2": ["IMAGE", {}],
            "blend_factor": ["FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}],
            "blend_mode": ["COMBO", {"multiselect": False, "options": [
                "normal", "multiply", "screen", "overlay", "soft_light", "difference"]}],
        },
        output=["IMAGE"],
        category="image/postprocessing",
    )
    e["ImageBlur"] = _entry(
        "ImageBlur",
        required={
            "image": ["IMAGE", {}],
            "blur_radius": ["INT", {"default": 1, "min": 1, "max": 31, "step": 1}],
            "sigma": ["FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}],
        },
        output=["IMAGE"],
        category="image/postprocessing",
    )
    e["ImageInvert"] = _entry("ImageInvert", required={"image": img}, output=["IMAGE"], category="image")
    e["ImageScaleBy"] = _entry(
        "ImageScaleBy",
        required={
            "image": img,
            "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]],
            "scale_by": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}],
        },
        output=["IMAGE"],
        category="image/upscaling",
    )
    e["LoadImage"] = _entry(
        "LoadImage", required={"image": [["example.png"], {"image_upload": True}]},
        output=["IMAGE", "MASK"], category="image", display_name="Load Image",
    )
    e["SaveImageWebsocket"] = _entry(
        "SaveImageWebsocket", required={"images": img}, output_node=True, category="api node/image/websocket",
        python_module="custom_nodes.websocket_image_save",
    )
    e["KSampler"] = _entry(
        "KSampler",
        required={
            "model": ["MODEL", {}],
            "seed": ["INT", {"default": 0, "min": 0, "max": 18446744073709551615, "control_after_generate": True}],
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
            "sampler_name": [["euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "uni_pc"], {}],
            "scheduler": [["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                           "linear_quadratic", "kl_optimal"], {}],
            "positive": ["CONDITIONING", {}],
            "negative": ["CONDITIONING", {}],
            "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
        },
        output=["LATENT"],
        category="sampling",
    )
    e["CheckpointLoaderSimple"] = _entry(
        "CheckpointLoaderSimple", required={"ckpt_name": [["tiny-random-sd15.safetensors"], {}]},
        output=["MODEL", "CLIP", "VAE"], category="loaders", display_name="Load Checkpoint",
    )
    e["CLIPTextEncode"] = _entry(
        "CLIPTextEncode",
        required={
            "text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
            "clip": ["CLIP", {}],
        },
        output=["CONDITIONING"],
        category="conditioning",
        display_name="CLIP Text Encode (Prompt)",
    )
    e["EmptyLatentImage"] = _entry(
        "EmptyLatentImage",
        required={
            "width": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
            "height": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
            "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
        },
        output=["LATENT"],
        category="latent",
        display_name="Empty Latent Image",
    )
    e["VAEDecode"] = _entry(
        "VAEDecode", required={"samples": ["LATENT", {}], "vae": ["VAE", {}]}, output=["IMAGE"],
        category="latent", display_name="VAE Decode",
    )
    # As recorded with transcript k (the shared object_info_subset.json of that recording).
    e["RepeatImageBatch"] = _entry(
        "RepeatImageBatch",
        required={"image": ["IMAGE"], "amount": ["INT", {"default": 1, "min": 1, "max": 4096}]},
        output=["IMAGE"],
        category="image/batch",
        python_module="comfy_extras.nodes_images",
    )
    # Classes that are not in the recorded subset (minimal plausible entries).
    e["VAEEncode"] = _entry(
        "VAEEncode", required={"pixels": ["IMAGE"], "vae": ["VAE"]}, output=["LATENT"], category="latent",
        display_name="VAE Encode",
    )
    e["SaveAudio"] = _entry(
        "SaveAudio",
        required={"audio": ["AUDIO", {}], "filename_prefix": ["STRING", {"default": "audio/ComfyUI"}]},
        hidden={"prompt": ["PROMPT"], "extra_pnginfo": ["EXTRA_PNGINFO"]},
        output_node=True,
        category="audio",
        display_name="Save Audio (FLAC)",
    )
    e["LoadAudio"] = _entry(
        "LoadAudio", required={"audio": [["example.flac"], {"audio_upload": True}]}, output=["AUDIO"],
        category="audio", display_name="Load Audio",
    )
    e["VHS_VideoCombine"] = _entry(
        "VHS_VideoCombine",
        required={
            "images": ["IMAGE", {}],
            "frame_rate": ["FLOAT", {"default": 8, "min": 1, "step": 1}],
            "filename_prefix": ["STRING", {"default": "AnimateDiff"}],
            "format": [["image/gif", "image/webp", "video/h264-mp4", "video/h265-mp4", "video/webm",
                        "video/av1-webm", "video/ProRes"], {}],
        },
        # The real node requires these widgets too; optional here so hand-written test workflows stay short.
        optional={
            "loop_count": ["INT", {"default": 0, "min": 0, "max": 100, "step": 1}],
            "pingpong": ["BOOLEAN", {"default": False}],
            "save_output": ["BOOLEAN", {"default": True}],
            "audio": ["AUDIO", {}],
            "meta_batch": ["VHS_BatchManager", {}],
            "vae": ["VAE", {}],
        },
        hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        output=["VHS_FILENAMES"],
        output_name=["Filenames"],
        output_node=True,
        category="Video Helper Suite 🎥🅥🅗🅢",
        display_name="Video Combine 🎥🅥🅗🅢",
        python_module="custom_nodes.ComfyUI-VideoHelperSuite",
    )
    return e


@lru_cache(maxsize=1)
def _base_object_info() -> dict[str, Any]:
    info = _fallback_object_info()
    for name, entry in _recorded_object_info().items():
        if name in info:  # only classes the stand-in knows how to run
            info[name] = entry
    return info


# ---------------------------------------------------------------------------------------------------
# Value types flowing between nodes
# ---------------------------------------------------------------------------------------------------


class _Img:
    """An IMAGE batch: ``batch`` images of ``w``x``h`` filled with one ``rgb`` colour."""

    __slots__ = ("w", "h", "batch", "rgb")

    def __init__(self, w: int, h: int, batch: int, rgb: tuple[int, int, int]):
        self.w, self.h, self.batch, self.rgb = max(1, int(w)), max(1, int(h)), max(1, int(batch)), rgb

    def tensor_repr(self) -> str:
        r, g, b = (c / 255 for c in self.rgb)
        row = f"[{r:.4f}, {g:.4f}, {b:.4f}]"
        return (f"tensor([[[{row},\n          {row},\n          ...,\n          {row}]]])"
                f"  # shape [{self.batch}, {self.h}, {self.w}, 3]")


class _Latent:
    """A LATENT batch: ``w``x``h`` are the size in pixels of the image it decodes to (the latent itself
    is ``w/8``x``h/8``), ``seed`` what VAEDecode derives its colour from."""

    __slots__ = ("w", "h", "batch", "seed")

    def __init__(self, w: int, h: int, batch: int, seed: int = 0):
        self.w, self.h, self.batch, self.seed = int(w), int(h), int(batch), seed


class _Video:
    __slots__ = ("images", "fps")

    def __init__(self, images: _Img, fps: float):
        self.images, self.fps = images, fps


class _Opaque:
    """MODEL / CLIP / VAE / CONDITIONING / AUDIO / MASK values."""

    __slots__ = ("kind", "detail")

    def __init__(self, kind: str, detail: Any = None):
        self.kind, self.detail = kind, detail

    def __repr__(self) -> str:
        return f"<{self.kind} {self.detail!r}>"


class _NodeFailure(Exception):
    def __init__(self, exception_type: str, message: str):
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message


def _color_rgb(color: int) -> tuple[int, int, int]:
    color = int(color) & 0xFFFFFF
    return (color >> 16) & 255, (color >> 8) & 255, color & 255


def _rgb_from_seed(seed: Any) -> tuple[int, int, int]:
    digest = hashlib.sha256(str(seed).encode()).digest()
    return digest[0], digest[1], digest[2]


# ---------------------------------------------------------------------------------------------------
# File bytes
# ---------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=64)
def _png_idat(w: int, h: int, rgb: tuple[int, int, int]) -> bytes:
    row = b"\x00" + bytes(rgb) * w
    return zlib.compress(row * h, 6)


def _text_keyword(key: str) -> bytes:
    kw = "".join(ch for ch in str(key) if 32 < ord(ch) < 127)[:79]
    return (kw or "comment").encode("latin-1")


def make_png(w: int, h: int, rgb: tuple[int, int, int], text: dict[str, str] | None = None) -> bytes:
    """A valid RGB PNG of ``w``x``h`` in one colour, with optional tEXt chunks (values made ASCII)."""
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        value = str(value).encode("ascii", "backslashreplace")
        out.append(_png_chunk(b"tEXt", _text_keyword(key) + b"\x00" + value))
    out.append(_png_chunk(b"IDAT", _png_idat(w, h, rgb)))
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def _png_size(data: bytes | None) -> tuple[int, int] | None:
    """``(width, height)`` in pixels from a PNG's IHDR chunk; None when ``data`` is not a PNG."""
    if not data or len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return (w, h) if w > 0 and h > 0 else None


#: The folder annotations of ``folder_paths.annotated_filepath``, in the order ComfyUI tries them.
ANNOTATIONS = ("output", "input", "temp")


def _annotated_file(value: str) -> tuple[str | None, str | None, str]:
    """Where a LoadImage value points: ``(folder type or None, subfolder, filename)``.

    As ComfyUI's ``folder_paths.annotated_filepath``: a value ending in ``[output]`` / ``[input]`` /
    ``[temp]`` names a path in that folder (the tag and the one character before it, normally a
    space, are cut off); any other value is a path in the input folder (type None).  The path is
    normalised (``a/./b/../c.png`` -> ``a/c.png``); ``subfolder`` is None when it leaves the folder
    or names the folder itself.
    """
    kind = None
    for tag in ANNOTATIONS:
        if value.endswith(f"[{tag}]"):
            kind, value = tag, value[: -len(tag) - 3]
            break
    path = posixpath.normpath(value) if value else "."
    if path == "." or path.startswith("/") or path == ".." or path.startswith("../"):
        return kind, None, path
    sub, name = posixpath.split(path)
    return kind, sub, name


def _blob(ext: str, tag: str) -> bytes:
    """Bytes starting with the right magic for ``ext``, carrying ``tag`` (not a playable file)."""
    payload = tag.encode("utf-8")
    if ext == "webp":
        body = b"WEBP" + b"STDN" + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) % 2 else b"")
        return b"RIFF" + struct.pack("<I", len(body)) + body
    if ext in ("mp4", "mov", "m4v"):
        brand = b"qt  " if ext == "mov" else b"isom"
        ftyp = struct.pack(">I", 32) + b"ftyp" + brand + struct.pack(">I", 0x200) + b"isomiso2avc1mp41"
        free = struct.pack(">I", 8 + len(payload)) + b"free" + payload
        return ftyp + free
    if ext in ("webm", "mkv"):
        return bytes.fromhex("1a45dfa39f4286810142f7810142f281") + payload
    if ext == "flac":
        return b"fLaC" + payload
    if ext == "gif":
        return b"GIF89a" + payload
    if ext == "wav":
        return b"RIFF" + struct.pack("<I", 4 + len(payload)) + b"WAVE" + payload
    return b"STANDIN\n" + payload


def _pad_output(data: bytes, size: int) -> bytes:
    """``data`` grown to at least ``size`` bytes, keeping the file's magic (``output_size_bytes``)."""
    if size <= 0 or len(data) >= size:
        return data
    need = size - len(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(_png_chunk(b"IEND", b"")):
        pad = _png_chunk(b"stDn", b"\x00" * max(0, need - 12))  # private, ancillary, safe to copy
        return data[:-12] + pad + data[-12:]
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        extra = max(0, need - 8)
        extra += extra % 2
        body = data[12:] + b"PADD" + struct.pack("<I", extra) + b"\x00" * extra
        return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body
    if data[4:8] == b"ftyp":
        extra = max(0, need - 8)
        return data + struct.pack(">I", 8 + extra) + b"free" + b"\x00" * extra
    return data + b"\x00" * need


# ---------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------


def _is_link(value: Any) -> bool:
    return isinstance(value, list)


def _inputs_of(node: Any) -> dict:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _input_type(config: Any) -> Any:
    return config[0] if isinstance(config, (list, tuple)) and config else config


def _input_opts(config: Any) -> dict:
    if isinstance(config, (list, tuple)) and len(config) > 1 and isinstance(config[1], dict):
        return config[1]
    return {}


def _combo_options(config: Any) -> list | None:
    kind = _input_type(config)
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(_input_opts(config).get("options", []))
    return None


class _ValidationCrash(Exception):
    """An exception while validating a node (reported as ``exception_during_validation``)."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


def _fake_traceback(where: str, what: str) -> list[str]:
    return [f'  File "tests/standin.py", line 1, in {where}\n    {what}\n']


# ---------------------------------------------------------------------------------------------------
# Queue item and client socket
# ---------------------------------------------------------------------------------------------------


class _Item:
    __slots__ = ("number", "seq", "prompt_id", "prompt", "extra", "outputs")

    def __init__(self, number, seq, prompt_id, prompt, extra, outputs):
        self.number, self.seq, self.prompt_id = number, seq, prompt_id
        self.prompt, self.extra, self.outputs = prompt, extra, outputs

    def as_list(self) -> list:
        return [self.number, self.prompt_id, self.prompt, self.extra, self.outputs]


class _Client:
    """One accepted WebSocket with its own ordered send queue (sending never blocks the worker)."""

    def __init__(self, ws: web.WebSocketResponse, sid: str, transport: asyncio.Transport | None = None):
        self.ws = ws
        self.sid = sid
        self.transport = transport
        self.preview_metadata = False
        self.dead = False
        self.aborted = False  # the server cut the connection itself (close_ws_after / restart)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        # Fault counters: (generation of the fault setting they count for, frames counted).
        self.close_gen, self.close_count = -1, 0
        self.garbage_gen, self.garbage_count = -1, 0

    def send_text(self, text: str) -> None:
        if not self.dead:
            self.queue.put_nowait(text)

    def send_bytes(self, data: bytes) -> None:
        if not self.dead:
            self.queue.put_nowait(bytes(data))

    def finish(self) -> None:
        """Stop sending: frames not yet written are dropped (the socket is going away)."""
        self.dead = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


# ---------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------


class StandInComfyUI:
    """A stand-in ComfyUI server on 127.0.0.1 (random port) for synchronous tests.

    Use as a context manager or call :meth:`start` / :meth:`stop`::

        with StandInComfyUI(execution_time_s=0.1) as comfy:
            requests.post(f"{comfy.url}/prompt", json={"prompt": ..., "client_id": cid})

    Knobs (read when they are used, so they can be changed between tests or even between prompts):

    * ``execution_time_s``: total time a prompt spends executing, spread over its nodes (or progress
      steps); ``[[sleep=S]]`` in a STRING input overrides it for that prompt.
    * ``progress_steps``: if > 0, KSampler nodes (or every node when the prompt has no KSampler) send
      ``progress`` 1..n of n, each followed by a binary preview frame when ``preview_frames``.
    * ``history_delay_s``: the history entry appears this long after the final lifecycle message.
    * ``require_token``: when set, every HTTP route and the WS upgrade need
      ``Authorization: Bearer <token>`` (401 otherwise).
    * ``max_upload_bytes`` (constructor only, default 100 MB): a larger request body, an upload
      included, is answered 413, as ComfyUI does past its ``--max-upload-size``.
    * ``checkpoints`` / ``input_images`` / ``input_audio``: the combo values CheckpointLoaderSimple,
      LoadImage and LoadAudio accept (``POST /upload/image`` adds to ``input_images``).
    * ``hidden_node_classes`` (set of class names, default empty): left out of ``/object_info`` and
      refused by ``POST /prompt`` ("node X does not exist"), as on a server without the custom node
      that provides them (change it while none of them is queued or running).
    * ``input_limits`` (``{(class_type, input_name): {"min": ..., "max": ...}}``, default empty): replaces
      those numeric limits of an input in ``/object_info`` and in ``POST /prompt``'s validation, as
      on a server whose node accepts another range (e.g. ``{("KSampler", "seed"): {"max": 2**32 - 1}}``).

    Records for assertions (safe to read from the test thread): ``ws_opened``, ``ws_closed``,
    ``ws_open_now``, ``max_ws_open``, ``requests`` (Counter of ``(METHOD, route)``),
    ``posts_per_prompt_id`` (POST /prompt bodies carrying each client-chosen ``prompt_id``),
    ``max_in_flight``, ``executed_prompt_ids``, ``executions_per_prompt_id``, ``interrupts``,
    ``deletes``, ``executions``, ``uploads``, ``prompts``, ``headers_seen`` and ``files``
    (``(type, subfolder, filename) -> bytes``: outputs, previews and uploads).

    Faults (see the module docstring): :meth:`close_ws_after`, :meth:`restart`,
    :meth:`fail_prompt_posts`, :meth:`drop_prompt_posts`, :meth:`fail_uploads`, :meth:`drop_uploads`,
    :meth:`truncate_views`, :meth:`delay_views`,
    :meth:`send_garbage`, :meth:`send_huge_binary`, the knobs ``request_latency_s`` and
    ``output_size_bytes``; :meth:`clear_faults` ends them all.
    """

    def __init__(
        self,
        *,
        execution_time_s: float = 0.0,
        progress_steps: int = 0,
        history_delay_s: float = 0.0,
        require_token: str | None = None,
        preview_frames: bool = True,
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        max_upload_bytes: int = MAX_UPLOAD_SIZE,
    ):
        self.execution_time_s = execution_time_s
        #: the largest request body (bytes) the server reads, an upload included: more is a 413
        self.max_upload_bytes = max_upload_bytes
        self.ssl_context = ssl_context  # https/wss when set (see the module docstring)
        self.progress_steps = progress_steps
        self.history_delay_s = history_delay_s
        self.require_token = require_token
        self.preview_frames = preview_frames
        self.checkpoints: list[str] = ["tiny-random-sd15.safetensors", "v1-5-pruned-emaonly.safetensors"]
        self.input_images: list[str] = ["example.png"]
        self.input_audio: list[str] = ["example.flac"]
        self.hidden_node_classes: set[str] = set()
        self.input_limits: dict[tuple[str, str], dict[str, Any]] = {}

        self.port: int = port
        self.url: str = ""

        self._lock = threading.RLock()
        self._state_lock = threading.Lock()  # start/stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._worker: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._interrupt_event: asyncio.Event | None = None
        self._timers: set[asyncio.TimerHandle] = set()

        # Server state (survives reset_counters()).
        self._number = 0
        self._seq = 0
        self._pending: list[_Item] = []
        self._running: list[_Item] = []
        self._history: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._sockets: dict[str, _Client] = {}  # the sid map (with ComfyUI's quirks)
        self._clients: set[_Client] = set()  # every open socket
        self._cache: dict[str, Any] = {}  # signature -> ui (None for non-output nodes)
        self._file_counters: dict[tuple[str, str, str], int] = {}
        self._preview_prefixes: dict[str, tuple[str, str]] = {}  # node id -> (class, temp prefix)
        self._interrupt_requested = False
        self._current_client_id: str | None = None
        self._last_node_id: str | None = None
        self.files: dict[tuple[str, str, str], bytes] = {}

        self.ws_opened = 0
        self.ws_closed = 0
        self.ws_open_now = 0
        self.max_ws_open = 0
        self.requests: collections.Counter = collections.Counter()
        self.posts_per_prompt_id: collections.Counter = collections.Counter()
        self.max_in_flight = 0
        self.executed_prompt_ids: list[str] = []
        self.executions_per_prompt_id: collections.Counter = collections.Counter()
        self.interrupts: list[str | None] = []
        self.deletes: list[str] = []
        self.executions: list[dict] = []  # one record per execution, see the module docstring
        self._open_executions: dict[int, dict] = {}  # id(item) -> its record while it runs
        self.headers_seen: list[dict] = []
        self.uploads: list[dict] = []  # one record per answered POST /upload/image, see the module docstring
        self.prompts: dict[str, dict] = {}  # prompt id -> the prompt as received, for every queued POST /prompt

        # Faults (guarded by self._lock; see clear_faults()).
        self.request_latency_s: float = 0.0
        self.output_size_bytes: int = 0
        self._site: web.BaseSite | None = None
        self._up = threading.Event()  # set while the port listens
        self._up_task: asyncio.Task | None = None
        self._down = False
        self._flaky_seen: set[str] = set()  # survives restart() and clear_faults()
        self._close_after: int | None = None
        self._close_times_left = 0  # 0 = unlimited
        self._close_gen = 0
        self._garbage_every = 0
        self._garbage_gen = 0
        self._fail_posts = 0
        self._fail_status = 500
        self._drop_posts = 0
        self._truncate_views = 0
        self._fail_views = 0
        self._fail_views_status = 503
        self._view_delay_s = 0.0
        self._post_delay_s = 0.0
        self._fail_uploads = 0
        self._fail_uploads_status = 500
        self._drop_uploads = 0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "StandInComfyUI":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"StandInComfyUI(url={self.url!r})"

    def start(self) -> "StandInComfyUI":
        """Bind 127.0.0.1 on a free port and serve; returns ``self`` once the socket accepts."""
        with self._state_lock:
            if self._thread is not None:
                return self
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(target=self._thread_main, args=(loop, ready), name="standin-comfyui",
                                      daemon=True)
            thread.start()
            ready.wait()
            future = asyncio.run_coroutine_threadsafe(self._setup(), loop)
            try:
                future.result(timeout=30)
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=5)
                loop.close()
                raise
            self._loop, self._thread = loop, thread
            thread.name = f"standin-comfyui-{self.port}"
            return self

    def stop(self) -> None:
        """Close every client socket, stop serving and end the loop thread.  Idempotent."""
        with self._state_lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            self._loop, self._thread = None, None
            if threading.current_thread() is thread:  # called from inside the loop: best effort
                loop.create_task(self._shutdown_and_stop(loop))
                return
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                future.result(timeout=15)
            except Exception as exc:
                log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)  # teardown/client race
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if not thread.is_alive():
                loop.close()

    def _thread_main(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            except Exception as exc:
                log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)  # teardown/client race

    async def _setup(self) -> None:
        self._wake = asyncio.Event()
        self._interrupt_event = asyncio.Event()
        app = web.Application(middlewares=[self._middleware], client_max_size=self.max_upload_bytes)
        r = app.router
        r.add_get("/ws", self._h_ws)
        r.add_get("/system_stats", self._h_system_stats)
        r.add_get("/features", self._h_features)
        r.add_get("/embeddings", self._h_embeddings)
        r.add_get("/models", self._h_models)
        r.add_get("/models/{folder}", self._h_models_folder)
        r.add_get("/object_info", self._h_object_info)
        r.add_get("/object_info/{node_class}", self._h_object_info_class)
        r.add_get("/prompt", self._h_get_prompt)
        r.add_post("/prompt", self._h_post_prompt)
        r.add_get("/queue", self._h_get_queue)
        r.add_post("/queue", self._h_post_queue)
        r.add_post("/interrupt", self._h_interrupt)
        r.add_post("/free", self._h_free)
        r.add_get("/history", self._h_get_history)
        r.add_get("/history/{prompt_id}", self._h_get_history_one)
        r.add_post("/history", self._h_post_history)
        r.add_get("/view", self._h_view)
        r.add_post("/upload/image", self._h_upload_image)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        site = web.SockSite(runner, sock, ssl_context=self.ssl_context)
        await site.start()
        self._runner = runner
        self._site = site
        self.port = sock.getsockname()[1]
        self.url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"
        self._worker = asyncio.get_running_loop().create_task(self._work())
        self._up.set()

    async def _shutdown(self) -> None:
        self._up.clear()
        if self._up_task is not None:
            self._up_task.cancel()
            await asyncio.gather(self._up_task, return_exceptions=True)
            self._up_task = None
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for timer in list(self._timers):
            timer.cancel()
        self._timers.clear()
        clients = list(self._clients)
        for client in clients:
            client.finish()
        if clients:
            await asyncio.wait(
                [asyncio.ensure_future(self._close_ws(c.ws)) for c in clients], timeout=3
            )
        if self._runner is not None:
            try:
                await asyncio.wait_for(self._runner.cleanup(), timeout=5)
            except Exception as exc:
                log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)  # teardown/client race
            self._runner = None

    async def _shutdown_and_stop(self, loop) -> None:
        try:
            await self._shutdown()
        finally:
            loop.stop()

    @staticmethod
    async def _close_ws(ws: web.WebSocketResponse) -> None:
        try:
            await ws.close(code=1001, message=b"server shutting down")
        except Exception as exc:
            log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)  # teardown/client race

    # ------------------------------------------------------------------ public helpers

    def reset_counters(self) -> None:
        """Reset the records (requests, headers, ws counts, in-flight peak, executed ids, executions,
        interrupts, deletes, uploads, prompts); keeps state."""
        with self._lock:
            self.uploads.clear()
            self.prompts.clear()
            self.requests.clear()
            self.posts_per_prompt_id.clear()
            self.headers_seen.clear()
            self.executed_prompt_ids.clear()
            self.executions_per_prompt_id.clear()
            self.interrupts.clear()
            self.deletes.clear()
            self.executions.clear()
            self.ws_opened = 0
            self.ws_closed = 0
            self.max_ws_open = self.ws_open_now
            self.max_in_flight = len(self._pending) + len(self._running)

    def queue_snapshot(self) -> dict:
        """The body ``GET /queue`` would return right now (a deep copy)."""
        with self._lock:
            body = self._queue_body()
        return json.loads(json.dumps(body))

    def history_snapshot(self) -> dict:
        """The body ``GET /history`` would return right now (a deep copy)."""
        with self._lock:
            return json.loads(json.dumps(dict(self._history)))

    # ------------------------------------------------------------------ faults

    def clear_faults(self) -> None:
        """End every fault: socket closing, garbage, POST /prompt, /upload/image and /view faults, the
        latency knobs.

        A server that is down after :meth:`restart` listens again at once.  The ``[[flaky]]`` seen
        texts are kept (they are the server's memory, not a fault).
        """
        with self._lock:
            self._close_after = None
            self._close_times_left = 0
            self._garbage_every = 0
            self._fail_posts = 0
            self._fail_status = 500
            self._drop_posts = 0
            self._truncate_views = 0
            self._fail_views = 0
            self._view_delay_s = 0.0
            self._post_delay_s = 0.0
            self._fail_uploads = 0
            self._fail_uploads_status = 500
            self._drop_uploads = 0
            self.request_latency_s = 0.0
            self.output_size_bytes = 0
            down = self._down
        if down and self._loop is not None:
            self._call_in_loop(self._come_up_now)
            if threading.current_thread() is not self._thread:
                self._up.wait(15)

    def close_ws_after(self, n_messages: int, times: int = 1) -> None:
        """Abort each socket once the server has sent it ``n_messages`` frames from now on.

        ``times`` sockets are closed in total (0 = every socket, every time).  No close frame is sent.
        """
        if n_messages < 0 or times < 0:
            raise ValueError("n_messages and times must be >= 0")
        with self._lock:
            self._close_gen += 1
            self._close_after = int(n_messages)
            self._close_times_left = int(times)
        self._call_in_loop(self._kick_idle_for_close)

    def fail_prompt_posts(self, k: int, status: int = 500) -> None:
        """The next ``k`` ``POST /prompt`` answer ``status`` with a text body and queue nothing."""
        with self._lock:
            self._fail_posts = max(0, int(k))
            self._fail_status = int(status)

    def drop_prompt_posts(self, k: int) -> None:
        """The next ``k`` ``POST /prompt`` are handled (and queued) but get no response: the connection
        is aborted before anything is written."""
        with self._lock:
            self._drop_posts = max(0, int(k))

    def fail_uploads(self, k: int, status: int = 500) -> None:
        """The next ``k`` ``POST /upload/image`` answer ``status`` with a text body and store nothing."""
        with self._lock:
            self._fail_uploads = max(0, int(k))
            self._fail_uploads_status = int(status)

    def drop_uploads(self, k: int) -> None:
        """The next ``k`` ``POST /upload/image`` are handled (the file is stored) but get no response:
        the connection is aborted before anything is written."""
        with self._lock:
            self._drop_uploads = max(0, int(k))

    def truncate_views(self, k: int) -> None:
        """The next ``k`` successful ``GET /view`` send the full Content-Length but half the body."""
        with self._lock:
            self._truncate_views = max(0, int(k))

    def delay_prompt_posts(self, seconds: float) -> None:
        """Every ``POST /prompt`` waits ``seconds`` before it is handled (0 = off)."""
        with self._lock:
            self._post_delay_s = max(0.0, float(seconds))

    def fail_views(self, k: int, status: int = 503) -> None:
        """The next ``k`` ``GET /view`` that find their file answer ``status`` instead."""
        with self._lock:
            self._fail_views = max(0, int(k))
            self._fail_views_status = int(status)

    def delay_views(self, seconds: float) -> None:
        """Every ``GET /view`` waits ``seconds`` before answering (0 = off)."""
        with self._lock:
            self._view_delay_s = max(0.0, float(seconds))

    def send_garbage(self, every_n: int = 3) -> None:
        """After every ``every_n``-th normal frame to each socket, also send four garbage frames
        (see ``GARBAGE_FRAMES``); 0 turns it off."""
        if every_n < 0:
            raise ValueError("every_n must be >= 0")
        with self._lock:
            self._garbage_gen += 1
            self._garbage_every = int(every_n)

    def send_huge_binary(self, size_bytes: int) -> None:
        """Queue one binary frame of ``size_bytes`` (event type 1, format 2 header + random bytes) to
        every open socket."""
        size = max(8, int(size_bytes))
        frame = struct.pack(">II", 1, 2) + random.randbytes(size - 8)

        def enqueue() -> None:
            with self._lock:
                clients = list(self._clients)
            for client in clients:
                client.send_bytes(frame)

        self._call_in_loop(enqueue)

    def restart(self, down_s: float, *, wait: bool = False) -> None:
        """Simulate a ComfyUI restart; returns once the port refuses connections.

        The running prompt stops silently, queue/history/cache are dropped, every connection is
        aborted, and after ``down_s`` seconds the same port listens again (``wait=True`` blocks until
        then).  Calling it again while down restarts the ``down_s`` countdown.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError("the stand-in server is not running")
        if threading.current_thread() is self._thread:
            loop.create_task(self._go_down(float(down_s)))
            return
        asyncio.run_coroutine_threadsafe(self._go_down(float(down_s)), loop).result(timeout=15)
        if wait:
            self.wait_until_up(float(down_s) + 15)

    def wait_until_up(self, timeout: float | None = None) -> bool:
        """Block until the server listens (True) or ``timeout`` passes (False)."""
        return self._up.wait(timeout)

    def _call_in_loop(self, fn, *args) -> Any:
        """Run ``fn(*args)`` on the server's loop (directly when not started or already on it)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or threading.current_thread() is thread:
            return fn(*args)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=15)

    def _kick_idle_for_close(self) -> None:
        """``close_ws_after(0)``: sockets with nothing to send are aborted now, too."""
        with self._lock:
            if self._close_after != 0:
                return
            clients = [c for c in self._clients if not c.dead and c.queue.empty()]
        for client in clients:
            if self._close_due(client, sent=False):
                self._abort_client(client)

    def _close_due(self, client: _Client, *, sent: bool, gen: int | None = None) -> bool:
        """Count a frame written to ``client`` (``sent``; ``gen`` = the fault generation when its write
        began) and say whether the socket must be aborted now."""
        with self._lock:
            n = self._close_after
            if n is None:
                return False
            if client.close_gen != self._close_gen:
                client.close_gen, client.close_count = self._close_gen, 0
            if sent and gen == self._close_gen:  # a frame written before close_ws_after() is not counted
                client.close_count += 1
            if client.close_count < n:
                return False
            if self._close_times_left:
                self._close_times_left -= 1
                if self._close_times_left == 0:
                    self._close_after = None
            return True

    def _garbage_due(self, client: _Client, gen: int) -> bool:
        """Count a normal frame (``gen`` = the garbage generation when its write began); True when the
        garbage frames must follow it."""
        with self._lock:
            every = self._garbage_every
            if every <= 0:
                return False
            if client.garbage_gen != self._garbage_gen:
                client.garbage_gen, client.garbage_count = self._garbage_gen, 0
            if gen != self._garbage_gen:  # written before send_garbage(): not counted
                return False
            client.garbage_count += 1
            return client.garbage_count % every == 0

    def _abort_client(self, client: _Client) -> None:
        """Cut the socket without a close frame; its clientId entry goes at once (reconnects work)."""
        with self._lock:
            client.aborted = True
            if self._sockets.get(client.sid) is client:
                del self._sockets[client.sid]
        client.finish()
        transport = client.transport
        if transport is not None:
            transport.abort()

    @staticmethod
    async def _flush(transport: asyncio.Transport | None, limit_s: float = 2.0) -> None:
        """Wait until ``transport`` handed its buffered bytes to the kernel (before an abort)."""
        deadline = time.monotonic() + limit_s
        while (transport is not None and not transport.is_closing() and transport.get_write_buffer_size()
               and time.monotonic() < deadline):
            await asyncio.sleep(0.002)

    async def _send_frame(self, client: _Client, frame: str | bytes) -> bool:
        """Write one frame, applying ``close_ws_after``; False when the socket is gone."""
        if self._close_due(client, sent=False):  # close_ws_after(0)
            self._abort_client(client)
            return False
        with self._lock:
            gen = self._close_gen
        try:
            if isinstance(frame, str):
                await client.ws.send_str(frame)
            else:
                await client.ws.send_bytes(frame)
        except Exception:  # the peer went away mid-message: drop the rest
            client.dead = True
            return False
        if self._close_due(client, sent=True, gen=gen):
            await self._flush(client.transport)
            self._abort_client(client)
            return False
        return True

    async def _pump(self, client: _Client) -> None:
        """The socket's writer task: its queued frames in order, plus the garbage fault."""
        while True:
            item = await client.queue.get()
            if item is None:
                return
            with self._lock:
                garbage_gen = self._garbage_gen
            if not await self._send_frame(client, item):
                return
            if self._garbage_due(client, garbage_gen):
                for frame in GARBAGE_FRAMES:
                    if not await self._send_frame(client, frame):
                        return

    async def _go_down(self, down_s: float) -> None:
        """First half of :meth:`restart` (on the loop): stop listening, kill everything, forget."""
        self._up.clear()
        with self._lock:
            self._down = True
        if self._up_task is not None:
            self._up_task.cancel()
            self._up_task = None
        site, self._site = self._site, None
        if site is not None:
            try:
                await site.stop()
            except Exception as exc:
                log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)
        with self._lock:
            clients = list(self._clients)
            self._sockets.clear()
            for client in clients:
                client.aborted = True
        for client in clients:
            client.finish()
        server = self._runner.server if self._runner is not None else None
        for handler in (server.connections if server is not None else []):
            if handler.transport is not None:
                handler.transport.abort()
        for client in clients:
            if client.transport is not None:
                client.transport.abort()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        for timer in list(self._timers):
            timer.cancel()
        self._timers.clear()
        with self._lock:
            for item in self._running:  # stopped without another message: lost
                record = self._open_executions.pop(id(item), None)
                if record is not None:
                    record["ended"], record["outcome"] = time.monotonic(), "lost"
            self._pending.clear()
            self._running.clear()
            self._history.clear()
            self._number = 0
        self._cache = {}
        self._preview_prefixes.clear()
        self._interrupt_requested = False
        self._interrupt_event.clear()
        self._wake.clear()
        self._current_client_id = None
        self._last_node_id = None
        self._worker = asyncio.get_running_loop().create_task(self._work())
        self._up_task = asyncio.get_running_loop().create_task(self._come_up(down_s))

    async def _come_up(self, down_s: float) -> None:
        await asyncio.sleep(max(0.0, down_s))
        deadline = time.monotonic() + 10
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:  # someone else took the port: stay down
                    log.warning("stand-in: cannot listen on port %s again after restart: %s", self.port, exc)
                    self._up_task = None
                    return
                await asyncio.sleep(0.05)
        site = web.SockSite(self._runner, sock, ssl_context=self.ssl_context)
        await site.start()
        self._site = site
        with self._lock:
            self._down = False
        self._up_task = None
        self._up.set()

    def _come_up_now(self) -> None:
        if self._up_task is not None:
            self._up_task.cancel()
        self._up_task = asyncio.get_running_loop().create_task(self._come_up(0.0))

    # ------------------------------------------------------------------ middleware & small routes

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        with self._lock:
            self.requests[(request.method, route)] += 1
            self.headers_seen.append(dict(request.headers))
        latency = float(self.request_latency_s or 0)
        if latency > 0:
            await asyncio.sleep(latency)
        token = self.require_token
        if token and request.headers.get("Authorization", "") != f"Bearer {token}":
            return web.Response(status=401, text="401: Unauthorized")
        return await handler(request)

    async def _h_system_stats(self, request):
        return web.json_response({
            "system": {
                "os": "posix",
                "ram_total": 25276502016,
                "ram_free": 23830876160,
                "comfyui_version": "0.3.64",
                "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.95",
                "required_templates_version": "0.1.95",
                "python_version": "3.11.7 (stand-in)",
                "pytorch_version": "2.14.1+cpu",
                "embedded_python": False,
                "argv": ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port)],
            },
            "devices": [{
                "name": "cpu", "type": "cpu", "index": None,
                "vram_total": 25276502016, "vram_free": 23830876160,
                "torch_vram_total": 25276502016, "torch_vram_free": 23830876160,
            }],
        })

    async def _h_features(self, request):
        return web.json_response(dict(FEATURES))

    async def _h_embeddings(self, request):
        return web.json_response([])

    async def _h_models(self, request):
        return web.json_response([
            "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
            "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
            "custom_nodes", "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders",
        ])

    async def _h_models_folder(self, request):
        folder = request.match_info["folder"]
        return web.json_response(list(self.checkpoints) if folder == "checkpoints" else [])

    def object_info(self) -> dict[str, Any]:
        """The ``/object_info`` body this server serves (combo lists reflect the current knobs)."""
        info = copy.deepcopy(_base_object_info())
        combos = {
            ("CheckpointLoaderSimple", "ckpt_name"): self.checkpoints,
            ("LoadImage", "image"): self.input_images,
            ("LoadAudio", "audio"): self.input_audio,
        }
        for (cls, name), values in combos.items():
            config = info[cls]["input"]["required"][name]
            config[0] = sorted(set(values))
        for (cls, name), limits in self.input_limits.items():
            sections = info.get(cls, {}).get("input", {})
            config = sections.get("required", {}).get(name) or sections.get("optional", {}).get(name)
            if config is not None:  # ["INT", {...}]
                config[1:] = [{**(config[1] if len(config) > 1 else {}), **limits}]
        for cls in self.hidden_node_classes:
            info.pop(cls, None)
        return info

    async def _h_object_info(self, request):
        return web.json_response(self.object_info())

    async def _h_object_info_class(self, request):
        name = request.match_info["node_class"]
        info = self.object_info()
        return web.json_response({name: info[name]} if name in info else {})

    async def _h_get_prompt(self, request):
        with self._lock:
            remaining = len(self._pending) + len(self._running)
        return web.json_response({"exec_info": {"queue_remaining": remaining}})

    def _queue_body(self) -> dict:
        pending = sorted(self._pending, key=lambda it: (it.number, it.seq))
        return {
            "queue_running": [it.as_list() for it in self._running],
            "queue_pending": [it.as_list() for it in pending],
        }

    async def _h_get_queue(self, request):
        with self._lock:
            body = self._queue_body()
        return web.json_response(body)

    async def _json_body(self, request) -> Any:
        try:
            raw = await request.read()
            return json.loads(raw) if raw.strip() else None
        except Exception:
            return None

    async def _h_post_queue(self, request):
        body = await self._json_body(request)
        if isinstance(body, dict):
            if body.get("clear"):
                with self._lock:
                    self._pending.clear()
                self._broadcast_status()
            delete = body.get("delete")
            if isinstance(delete, list):
                for pid in delete:
                    with self._lock:
                        self.deletes.append(str(pid))
                        found = [it for it in self._pending if it.prompt_id == pid]
                        for it in found:
                            self._pending.remove(it)
                    if found:
                        self._broadcast_status()
        return web.Response(status=200)

    async def _h_interrupt(self, request):
        body = await self._json_body(request)
        target = body.get("prompt_id") if isinstance(body, dict) else None
        with self._lock:
            self.interrupts.append(target)
            running = [it.prompt_id for it in self._running]
        if target is None:
            if running:
                self._request_interrupt()
        elif target in running:
            self._request_interrupt()
        return web.Response(status=200)

    def _request_interrupt(self) -> None:
        self._interrupt_requested = True
        if self._interrupt_event is not None:
            self._interrupt_event.set()

    async def _h_free(self, request):
        await request.read()
        return web.Response(status=200)

    async def _h_get_history(self, request):
        with self._lock:
            items = list(self._history.items())
        max_items = request.query.get("max_items")
        if max_items is not None:
            try:
                n = int(max_items)
                items = items[-n:] if n > 0 else []
            except ValueError as exc:
                log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)  # teardown/client race
        return web.json_response(dict(items))

    async def _h_get_history_one(self, request):
        pid = request.match_info["prompt_id"]
        with self._lock:
            entry = self._history.get(pid)
        return web.json_response({pid: entry} if entry is not None else {})

    async def _h_post_history(self, request):
        body = await self._json_body(request)
        if isinstance(body, dict):
            with self._lock:
                if body.get("clear"):
                    self._history.clear()
                for pid in body.get("delete") or []:
                    self._history.pop(pid, None)
        return web.Response(status=200)

    async def _h_view(self, request):
        with self._lock:
            delay = self._view_delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        filename = query.get("filename", "")
        subfolder = query.get("subfolder", "")
        kind = query.get("type", "output") or "output"
        if not filename or filename.startswith("/") or ".." in filename:
            return web.Response(status=400)
        if subfolder.startswith("/") or ".." in subfolder:
            return web.Response(status=400)
        if kind not in ("output", "input", "temp"):
            return web.Response(status=400)
        with self._lock:
            data = self.files.get((kind, subfolder, filename))
        if data is None:
            return web.Response(status=404)
        ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
        with self._lock:
            failing = self._fail_views > 0
            if failing:
                self._fail_views -= 1
            truncate = not failing and self._truncate_views > 0
            if truncate:
                self._truncate_views -= 1
            fail_status = self._fail_views_status
        if failing:
            return web.Response(status=fail_status, text=f"{fail_status} stand-in fault: GET /view refused")
        if truncate:
            return await self._truncated_view(request, data, filename, ext)
        return web.Response(
            body=data,
            content_type=CONTENT_TYPES.get(ext, "application/octet-stream"),
            headers={"Content-Disposition": f'filename="{filename}"'},
        )

    async def _truncated_view(self, request, data: bytes, filename: str, ext: str):
        """``truncate_views``: the real headers and Content-Length, half the body, then a cut connection."""
        response = web.StreamResponse(headers={"Content-Disposition": f'filename="{filename}"'})
        response.content_type = CONTENT_TYPES.get(ext, "application/octet-stream")
        response.content_length = len(data)
        transport = request.transport
        try:
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            await self._flush(transport)
        except Exception as exc:
            log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)  # client already gone
        if transport is not None:
            transport.abort()
        return response  # aiohttp's write_eof meets a closed transport and gives up quietly

    async def _h_upload_image(self, request):
        """``POST /upload/image``, with the ``fail_uploads`` / ``drop_uploads`` faults around it."""
        with self._lock:
            fail = self._fail_uploads > 0
            if fail:
                self._fail_uploads -= 1
            status = self._fail_uploads_status
            drop = not fail and self._drop_uploads > 0
            if drop:
                self._drop_uploads -= 1
        if fail:
            try:
                await request.read()
            except Exception as exc:
                log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)  # client already gone
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = "Error"
            return web.Response(status=status, text=f"{status} {phrase}\n\nstand-in fault: POST /upload/image refused")
        transport = request.transport
        response, record = await self._upload_image(request)
        if drop and transport is not None:
            transport.abort()  # stored (or rejected) but the client never hears about it
            return response  # writing it meets a closed transport; aiohttp gives up quietly
        if record is not None:
            record["at"] = time.monotonic()
            with self._lock:
                self.uploads.append(record)
        return response

    def _is_folder(self, kind: str, rel: str) -> bool:
        """Whether ``rel`` (a normalised path in the ``kind`` folder) is a folder holding stored files."""
        if rel == ".":
            return True
        with self._lock:
            return any(k == kind and (sub == rel or sub.startswith(rel + "/")) for k, sub, _ in self.files)

    async def _upload_image(self, request) -> tuple[web.Response, dict | None]:
        """ComfyUI 0.3.64's ``image_upload`` (server.py) on the stand-in's ``files``: the response and the
        ``uploads`` record (None when nothing was answered 200).

        Form fields: ``image`` (the file), ``type`` (``input`` when absent; any other value than
        input/temp/output is a 500, as the real ``get_dir_by_type`` leaves its folder unbound),
        ``subfolder`` and ``overwrite``.  The file lands at ``<type>/<normpath(subfolder)>/<filename>``
        (a filename with ``/`` goes deeper); a path that leaves the folder is a 400.  Without overwrite
        (``"true"`` or ``"1"``), while the path is taken: identical bytes (same sha256) are a duplicate
        (answered under that name, nothing written), otherwise the name becomes ``stem (i).ext`` for
        i = 1, 2, ...  The answer echoes the subfolder as sent.
        """
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise  # 413, as ComfyUI (aiohttp's client_max_size = its max upload size) answers
        except Exception:
            return web.Response(status=500, text=ERROR_500_TEXT), None
        image = form.get("image")
        overwrite = form.get("overwrite")
        kind = form.get("type")
        if kind is None:
            kind = "input"
        if kind not in ANNOTATIONS:  # UnboundLocalError in get_dir_by_type
            return web.Response(status=500, text=ERROR_500_TEXT), None
        if not image:
            return web.Response(status=400), None
        if not hasattr(image, "file"):  # a plain form field: 'str' object has no attribute 'file'
            return web.Response(status=500, text=ERROR_500_TEXT), None
        filename = image.filename
        if not filename:
            return web.Response(status=400), None
        subfolder = form.get("subfolder", "")
        if not isinstance(subfolder, str):
            return web.Response(status=500, text=ERROR_500_TEXT), None
        root = f"/comfyui/{kind}"
        folder = posixpath.join(root, posixpath.normpath(subfolder))
        filepath = posixpath.normpath(posixpath.join(folder, filename))
        if posixpath.commonpath((root, filepath)) != root:
            return web.Response(status=400), None

        def key_of(path: str) -> tuple[str, str, str]:
            rel = posixpath.relpath(posixpath.normpath(path), root)
            sub, base = posixpath.split(rel)
            return kind, sub, base

        data = image.file.read()
        digest = hashlib.sha256(data).hexdigest()
        replace = overwrite is not None and overwrite in ("true", "1")
        name, duplicate = filename, False
        stem, ext = posixpath.splitext(filename)
        i = 1
        while True:
            rel = posixpath.relpath(posixpath.normpath(filepath), root)
            if self._is_folder(kind, rel):  # open() of a folder: IsADirectoryError
                return web.Response(status=500, text=ERROR_500_TEXT), None
            with self._lock:
                existing = self.files.get(key_of(filepath))
            if replace or existing is None:
                break
            if hashlib.sha256(existing).hexdigest() == digest:
                duplicate = True
                break
            name = f"{stem} ({i}){ext}"
            filepath = posixpath.join(folder, name)
            i += 1
        key = key_of(filepath)
        listed = f"{key[1]}/{key[2]}" if key[1] else key[2]
        with self._lock:
            if not duplicate:
                self.files[key] = data
            if kind == "input" and listed not in self.input_images:
                self.input_images.append(listed)
        record = {"filename": filename, "subfolder": subfolder, "type": kind, "overwrite": replace, "name": name,
                  "sha256": digest, "bytes": len(data), "duplicate": duplicate, "at": None}
        return web.json_response({"name": name, "subfolder": subfolder, "type": kind}), record

    # ------------------------------------------------------------------ WebSocket

    async def _h_ws(self, request):
        # autoclose=False: the bookkeeping below happens before the close reply reaches the client, so a
        # client whose close() returned sees ws_open_now already decremented.
        ws = web.WebSocketResponse(timeout=1.0, max_msg_size=MAX_UPLOAD_SIZE, autoclose=False)
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="Expected a WebSocket upgrade")
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        client = _Client(ws, sid, request.transport)
        client.task = asyncio.get_running_loop().create_task(self._pump(client))
        with self._lock:
            self.ws_opened += 1
            self.ws_open_now += 1
            self.max_ws_open = max(self.max_ws_open, self.ws_open_now)
            self._clients.add(client)
            self._sockets[sid] = client  # a newer socket replaces an older one with the same id
            remaining = len(self._pending) + len(self._running)
        client.send_text(_dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}},
                                                             "sid": sid}}))
        if sid == self._current_client_id and self._last_node_id is not None:
            client.send_text(_dumps({"type": "executing", "data": {"node": self._last_node_id}}))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._on_client_text(client, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        except Exception as exc:
            log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)  # teardown/client race
        finally:
            # ComfyUI removes the entry for this id whoever holds it now: a newer socket with the same
            # clientId goes deaf when the older one closes.
            with self._lock:
                if not client.aborted:  # an aborted socket's entry was removed when it was cut
                    self._sockets.pop(sid, None)
                self._clients.discard(client)
                self.ws_closed += 1
                self.ws_open_now -= 1
            client.finish()
            try:
                await asyncio.wait_for(asyncio.shield(client.task), timeout=1.0)
            except Exception as exc:
                log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)  # teardown/client race
            if not ws.closed and not client.aborted:  # answers the client's close frame
                try:
                    await ws.close()
                except Exception as exc:
                    log.debug("stand-in: ignored %s: %s", type(exc).__name__, exc)  # teardown/client race
        return ws

    def _on_client_text(self, client: _Client, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if isinstance(msg, dict) and msg.get("type") == "feature_flags":
            data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
            client.preview_metadata = bool(data.get("supports_preview_metadata"))
            client.send_text(_dumps({"type": "feature_flags", "data": dict(FEATURES)}))

    def _all_sockets(self) -> list[_Client]:
        with self._lock:
            return list(self._sockets.values())

    def _broadcast_status(self) -> None:
        with self._lock:
            remaining = len(self._pending) + len(self._running)
            targets = list(self._sockets.values())
        text = _dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}}})
        for client in targets:
            client.send_text(text)

    def _to_client(self, client_id: str | None, kind: str, data: dict) -> None:
        """A lifecycle message: only to the prompt's own socket (nobody when there is no client_id)."""
        if client_id is None:
            return
        with self._lock:
            client = self._sockets.get(client_id)
        if client is not None:
            client.send_text(_dumps({"type": kind, "data": data}))

    def _progress_targets(self, client_id: str | None) -> list[_Client]:
        """Progress-type messages go to the client, or to every socket when there is no client_id."""
        if client_id is None:
            return self._all_sockets()
        with self._lock:
            client = self._sockets.get(client_id)
        return [client] if client is not None else []

    # ------------------------------------------------------------------ POST /prompt

    async def _h_post_prompt(self, request):
        with self._lock:
            post_delay = self._post_delay_s
        if post_delay > 0:
            await asyncio.sleep(post_delay)
        with self._lock:
            fail = self._fail_posts > 0
            if fail:
                self._fail_posts -= 1
            status = self._fail_status
            drop = not fail and self._drop_posts > 0
            if drop:
                self._drop_posts -= 1
        if fail:
            return await self._failed_post(request, status)
        transport = request.transport
        response = await self._post_prompt(request)
        if drop and transport is not None:
            transport.abort()  # accepted (or rejected) but the client never hears about it
        return response  # writing it meets a closed transport; aiohttp gives up quietly

    async def _failed_post(self, request, status: int):
        """``fail_prompt_posts``: the answer is ``status`` with a text body; nothing is queued."""
        try:
            body = json.loads(await request.read())
        except Exception:
            body = None
        if isinstance(body, dict) and "prompt_id" in body:
            with self._lock:
                self.posts_per_prompt_id[str(body["prompt_id"])] += 1
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        return web.Response(status=status, text=f"{status} {phrase}\n\nstand-in fault: POST /prompt refused")

    async def _post_prompt(self, request):
        try:
            body = json.loads(await request.read())
        except Exception:
            return web.Response(status=500, text=ERROR_500_TEXT)
        if not isinstance(body, dict):
            return web.Response(status=500, text=ERROR_500_TEXT)
        if "prompt_id" in body:
            with self._lock:
                self.posts_per_prompt_id[str(body["prompt_id"])] += 1
        try:
            if "number" in body:
                number = float(body["number"])
            else:
                number = self._number
                if body.get("front"):
                    number = -number
                self._number += 1
        except (TypeError, ValueError):
            return web.Response(status=500, text=ERROR_500_TEXT)
        if "prompt" not in body:
            return self._error_400({"type": "no_prompt", "message": "No prompt provided",
                                    "details": "No prompt provided", "extra_info": {}}, {})
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        if not isinstance(prompt, dict) or not all(isinstance(n, dict) for n in prompt.values()):
            return web.Response(status=500, text=ERROR_500_TEXT)
        ok, error, good_outputs, node_errors = self._validate_prompt(prompt)
        if not ok:
            return self._error_400(error, node_errors)
        extra = body.get("extra_data", {})
        extra = dict(extra) if isinstance(extra, dict) else {}
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        with self._lock:
            self._seq += 1
            item = _Item(number, self._seq, prompt_id, prompt, extra, good_outputs)
            self._pending.append(item)
            self.prompts[prompt_id] = copy.deepcopy(prompt)
            self.max_in_flight = max(self.max_in_flight, len(self._pending) + len(self._running))
        self._broadcast_status()
        if self._wake is not None:
            self._wake.set()
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    @staticmethod
    def _error_400(error: dict, node_errors: dict):
        return web.json_response({"error": error, "node_errors": node_errors}, status=400)

    def _validate_prompt(self, prompt: dict) -> tuple[bool, dict | None, list[str], dict]:
        info = self.object_info()
        for nid, node in prompt.items():
            if "class_type" not in node:
                return False, {
                    "type": "invalid_prompt",
                    "message": "Cannot execute because a node is missing the class_type property.",
                    "details": f"Node ID '#{nid}'",
                    "extra_info": {},
                }, [], {}
            class_type = node["class_type"]
            if not isinstance(class_type, str) or class_type not in info:
                return False, {
                    "type": "invalid_prompt",
                    "message": f"Cannot execute because node {class_type} does not exist.",
                    "details": f"Node ID '#{nid}'",
                    "extra_info": {},
                }, [], {}
        outputs = [nid for nid, node in prompt.items() if info[node["class_type"]].get("output_node")]
        if not outputs:
            return False, {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                           "extra_info": {}}, [], {}

        validated: dict[str, tuple[bool, list]] = {}
        good: list[str] = []
        failed: list[tuple[str, list]] = []
        node_errors: dict[str, dict] = {}
        for out in outputs:
            try:
                valid, reasons = self._validate_node(prompt, info, out, validated, set())
            except _ValidationCrash as crash:
                exc = crash.exc
                reasons = [{
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(exc),
                    "extra_info": {
                        "exception_type": type(exc).__name__,
                        "traceback": _fake_traceback("validate_inputs", f"raise {type(exc).__name__}({str(exc)})"),
                    },
                }]
                valid = False
                validated[out] = (False, reasons)
            if valid:
                good.append(out)
                continue
            failed.append((out, reasons))
            # As the real server does: every node that failed so far lists this output as dependent.
            for nid, (ok, why) in validated.items():
                if not ok and why:
                    if nid not in node_errors:
                        node_errors[nid] = {"errors": why, "dependent_outputs": [],
                                            "class_type": prompt[nid]["class_type"]}
                    node_errors[nid]["dependent_outputs"].append(out)
        if good:
            return True, None, good, node_errors
        details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
        return False, {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                       "details": details, "extra_info": {}}, [], node_errors

    def _validate_node(self, prompt, info, nid, validated, visiting) -> tuple[bool, list]:
        if nid in validated:
            return validated[nid]
        if nid in visiting:  # a cycle: leave it to the executor
            return True, []
        visiting.add(nid)
        node = prompt[nid]
        entry = info[node["class_type"]]
        inputs = _inputs_of(node)
        errors: list[dict] = []
        valid = True
        sections = [(name, cfg, True) for name, cfg in entry["input"].get("required", {}).items()]
        sections += [(name, cfg, False) for name, cfg in entry["input"].get("optional", {}).items()]
        for name, config, required in sections:
            if name not in inputs:
                if required:
                    errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                   "details": name, "extra_info": {"input_name": name}})
                    valid = False
                continue
            value = inputs[name]
            kind = _input_type(config)
            if _is_link(value):
                if len(value) != 2:
                    errors.append({"type": "bad_linked_input",
                                   "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                   "details": name,
                                   "extra_info": {"input_name": name, "input_config": config,
                                                  "received_value": value}})
                    valid = False
                    continue
                up_id, slot = value
                try:
                    up_class = prompt[up_id]["class_type"]
                    received = info[up_class]["output"][slot]
                except (KeyError, IndexError, TypeError) as exc:
                    raise _ValidationCrash(exc) from None
                expected = "COMBO" if _combo_options(config) is not None else kind
                if not self._types_match(received, expected):
                    details = f"{name}, received_type({received}) mismatch input_type({expected})"
                    errors.append({"type": "return_type_mismatch",
                                   "message": "Return type mismatch between linked nodes", "details": details,
                                   "extra_info": {"input_name": name, "input_config": config,
                                                  "received_type": received, "linked_node": value}})
                    valid = False
                    continue
                up_valid, _ = self._validate_node(prompt, info, up_id, validated, visiting)
                if not up_valid:
                    valid = False
                continue
            error = self._check_value(node["class_type"], name, config, value)
            if error is not None:
                errors.append(error)
                valid = False
        visiting.discard(nid)
        validated[nid] = (valid, errors)
        return valid, errors

    def _image_file(self, value: Any) -> tuple[str, str, str] | None:
        """The ``files`` key a LoadImage ``image`` value names, or None when LoadImage would refuse it.

        As ``LoadImage.VALIDATE_INPUTS`` -> ``folder_paths.exists_annotated_filepath``: a value ending
        in `` [output]`` / `` [input]`` / `` [temp]`` names ``<subfolder>/<file>`` in that folder and is
        valid when ``files`` holds ``(type, subfolder, file)`` (outputs and previews of earlier prompts,
        uploads); a plain value names a file in the input folder and is valid when it is in
        ``input_images`` (the key returned is then ``("input", subfolder, file)``, which ``files`` holds
        for uploads only).  An `` [input]`` value is also valid when its path is in ``input_images``.
        Non-string values and paths that leave their folder are invalid.
        """
        if not isinstance(value, str):
            return None
        kind, sub, name = _annotated_file(value)
        if sub is None:
            return None
        listed = f"{sub}/{name}" if sub else name
        with self._lock:
            if kind is None:
                known = value in self.input_images or listed in self.input_images
            else:
                known = (kind, sub, name) in self.files or (kind == "input" and listed in self.input_images)
        return (kind or "input", sub, name) if known else None

    @staticmethod
    def _types_match(received: str, expected: Any) -> bool:
        if expected == "*" or received == "*":
            return True
        if expected == "COMBO":
            return received in ("COMBO", "STRING")
        if not isinstance(expected, str) or not isinstance(received, str):
            return False
        return bool(set(received.split(",")) & set(expected.split(",")))

    def _check_value(self, class_type: str, name: str, config: Any, value: Any) -> dict | None:
        kind = _input_type(config)
        opts = _input_opts(config)
        options = _combo_options(config)
        if options is not None:
            if class_type == "LoadImage" and name == "image":  # VALIDATE_INPUTS replaces the list check
                if self._image_file(value) is None:
                    return {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                            "details": f"{name} - Invalid image file: {value}", "extra_info": {"input_name": name}}
                return None
            if value not in options:
                return {"type": "value_not_in_list", "message": "Value not in list",
                        "details": f"{name}: '{value}' not in {options}",
                        "extra_info": {"input_name": name, "input_config": config, "received_value": value}}
            return None
        converters = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
        if kind not in converters:
            return None
        try:
            if isinstance(value, (dict, list)) and kind in ("INT", "FLOAT"):
                raise TypeError(f"{kind.lower()}() argument must be a string or a real number, "
                                f"not '{type(value).__name__}'")
            converted = converters[kind](value)
        except Exception as exc:
            return {"type": "invalid_input_type",
                    "message": f"Failed to convert an input value to a {kind} value",
                    "details": f"{name}, {value}, {exc}",
                    "extra_info": {"input_name": name, "input_config": config, "received_value": value,
                                   "exception_message": str(exc)}}
        if kind in ("INT", "FLOAT"):
            if "min" in opts and converted < opts["min"]:
                return {"type": "value_smaller_than_min",
                        "message": f"Value {converted} smaller than min of {opts['min']}", "details": name,
                        "extra_info": {"input_name": name, "input_config": config, "received_value": converted}}
            if "max" in opts and converted > opts["max"]:
                return {"type": "value_bigger_than_max",
                        "message": f"Value {converted} bigger than max of {opts['max']}", "details": name,
                        "extra_info": {"input_name": name, "input_config": config, "received_value": converted}}
        return None

    # ------------------------------------------------------------------ execution

    async def _work(self) -> None:
        while True:
            with self._lock:
                pending = sorted(self._pending, key=lambda it: (it.number, it.seq))
                item = pending[0] if pending else None
                if item is not None:
                    self._pending.remove(item)
                    self._running.append(item)
                    self.executed_prompt_ids.append(item.prompt_id)
                    self.executions_per_prompt_id[item.prompt_id] += 1
                    record = {"prompt_id": item.prompt_id, "strings": self._strings(item.prompt),
                              "started": time.monotonic(), "ended": None, "outcome": None}
                    self.executions.append(record)
                    self._open_executions[id(item)] = record
                    self.max_in_flight = max(self.max_in_flight, len(self._pending) + len(self._running))
            if item is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            silent = self._silent_seconds(item)
            if silent is not None:  # [[silent=S]]: nothing at all for S seconds (an interrupt ends it)
                self._interrupt_requested = False
                self._interrupt_event.clear()
                try:
                    await asyncio.wait_for(self._interrupt_event.wait(), timeout=silent)
                except asyncio.TimeoutError:
                    pass
            self._broadcast_status()
            try:
                await self._execute(item, silent=silent is not None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a stand-in bug must not kill the worker
                client = item.extra.get("client_id") if isinstance(item.extra.get("client_id"), str) else None
                data = self._error_data(item, self._last_node_id, None, [], "Exception",
                                        f"stand-in internal error: {exc!r}", {})
                self._finish(item, client, [], {}, {}, "error", False, ("execution_error", data))

    def _signatures(self, prompt: dict) -> dict[str, str]:
        sigs: dict[str, str] = {}
        nonce = uuid.uuid4().hex

        def sig(nid: Any, stack: tuple) -> Any:
            if not isinstance(nid, str) or nid not in prompt or nid in stack:
                return ["missing-or-cycle", str(nid)]
            if nid in sigs:
                return sigs[nid]
            node = prompt[nid]
            parts = []
            inputs = _inputs_of(node)
            for name in sorted(inputs):
                value = inputs[name]
                if _is_link(value) and len(value) == 2:
                    parts.append([name, "link", sig(value[0], stack + (nid,)), value[1]])
                else:
                    parts.append([name, "value", value])
            extra = nonce + nid if node.get("class_type") in NEVER_CACHED else None
            if node.get("class_type") == "LoadImage":  # its IS_CHANGED is the sha256 of the file
                key = self._image_file(inputs.get("image"))
                with self._lock:
                    data = self.files.get(key) if key is not None else None
                extra = hashlib.sha256(data).hexdigest() if data is not None else None
            text = json.dumps([node.get("class_type"), parts, extra], sort_keys=True, default=str)
            sigs[nid] = hashlib.sha256(text.encode()).hexdigest()
            return sigs[nid]

        for nid in prompt:
            sig(nid, ())
        return sigs

    def _silent_seconds(self, item: _Item) -> float | None:
        for text in self._strings(item.prompt):
            match = SILENT_RE.search(text)
            if match:
                return float(match.group(1))
        return None

    @staticmethod
    def _strings(prompt: dict) -> list[str]:
        found = []
        for node in prompt.values():
            found.extend(v for v in _inputs_of(node).values() if isinstance(v, str))
        return found

    def _is_output(self, info: dict, prompt: dict, nid: str) -> bool:
        entry = info.get(prompt[nid].get("class_type"))
        return bool(entry and entry.get("output_node"))

    def _plan(self, prompt: dict, outputs: list[str], cached: set[str]):
        """Pending nodes in staging order plus their (uncached) dependencies."""
        order: list[str] = []
        deps: dict[str, set[str]] = {}
        for out in outputs:
            if out in cached:
                continue
            stack = [out]
            while stack:
                nid = stack.pop()
                if nid in deps:
                    continue
                deps[nid] = set()
                order.append(nid)
                for value in _inputs_of(prompt[nid]).values():
                    if (_is_link(value) and len(value) == 2 and isinstance(value[0], str) and value[0] in prompt
                            and value[0] not in cached):
                        deps[nid].add(value[0])
                        stack.append(value[0])
        return order, deps

    @staticmethod
    def _pick(ready: list[str], remaining: list[str], deps: dict[str, set[str]], is_output) -> str:
        blocking = {n: [m for m in remaining if n in deps[m]] for n in ready}

        def feeds(nid: str, depth: int) -> bool:
            targets = [m for m in remaining if nid in deps[m]]
            if depth == 1:
                return any(is_output(t) for t in targets)
            return any(feeds(t, depth - 1) for t in targets)

        for nid in ready:
            if is_output(nid):
                return nid
        for nid in ready:
            if any(is_output(b) for b in blocking[nid]):
                return nid
        for nid in ready:
            if feeds(nid, 2):
                return nid
        return ready[0]

    def _stepped_classes(self, prompt: dict) -> set[str] | None:
        """Classes that send ``progress`` steps (None = every class)."""
        classes = {n.get("class_type") for n in prompt.values()}
        sampler = classes & SAMPLER_CLASSES
        return sampler if sampler else None

    async def _execute(self, item: _Item, *, silent: bool = False) -> None:
        pid, prompt, outputs = item.prompt_id, item.prompt, item.outputs
        extra = item.extra
        client = extra.get("client_id") if isinstance(extra.get("client_id"), str) else None
        info = self.object_info()
        if not silent:  # a [[silent]] prompt keeps an interrupt that arrived during its silence
            self._interrupt_requested = False
            self._interrupt_event.clear()
        self._current_client_id = client
        hist: list[list] = []

        def lifecycle(kind: str, data: dict) -> None:
            self._to_client(client, kind, data)
            hist.append([kind, data])

        lifecycle("execution_start", {"prompt_id": pid, "timestamp": _now_ms()})
        sigs = self._signatures(prompt)
        previous = self._cache
        cached = [nid for nid in prompt if sigs[nid] in previous]
        cached_set = set(cached)
        lifecycle("execution_cached", {"nodes": cached, "prompt_id": pid, "timestamp": _now_ms()})

        ps: dict[str, dict] = {}
        values: dict[str, tuple] = {}
        ui_out: dict[str, dict] = {}
        new_cache: dict[str, Any] = {sigs[n]: previous[sigs[n]] for n in cached}
        executed: list[str] = []

        def send_ps() -> None:
            text = _dumps({"type": "progress_state", "data": {"prompt_id": pid, "nodes": ps}})
            for target in self._progress_targets(client):
                target.send_text(text)

        def ps_entry(nid: str, value, maximum, state: str) -> dict:
            return {"value": value, "max": maximum, "state": state, "node_id": nid, "prompt_id": pid,
                    "display_node_id": nid, "parent_node_id": None, "real_node_id": nid}

        for nid in outputs:
            if nid in cached_set and previous.get(sigs[nid]):
                ui = previous[sigs[nid]]
                self._to_client(client, "executed",
                                {"node": nid, "display_node": nid, "output": ui, "prompt_id": pid})
                ui_out[nid] = ui
                ps[nid] = ps_entry(nid, 1, 1, "finished")
                send_ps()

        strings = self._strings(prompt)
        fail = any(FAIL_MARKER in s for s in strings)
        fail_message = FAIL_MESSAGE
        flaky = [s for s in strings if FLAKY_MARKER in s]
        with self._lock:
            if any(s not in self._flaky_seen for s in flaky):
                fail, fail_message = True, FLAKY_MESSAGE
            self._flaky_seen.update(flaky)
        hang = any(HANG_MARKER in s for s in strings)
        total = self.execution_time_s
        for s in strings:
            match = SLEEP_RE.search(s)
            if match:
                total = float(match.group(1))
                break
        steps = max(0, int(self.progress_steps or 0))
        if silent:  # its S seconds are over: finish at once, without progress steps
            total, steps = 0.0, 0
        stepped_classes = self._stepped_classes(prompt)

        def is_stepped(nid: str) -> bool:
            cls = prompt[nid]["class_type"]
            if steps <= 0 or cls in NEVER_CACHED:
                return False
            return stepped_classes is None or cls in stepped_classes

        order, deps = self._plan(prompt, outputs, cached_set)
        units = sum(steps if is_stepped(n) else 1 for n in order)
        unit = (total / units) if units and total > 0 else 0.0
        remaining = list(order)
        done: set[str] = set()

        def is_output(nid: str) -> bool:
            return self._is_output(info, prompt, nid)

        def finish_interrupted(nid: str) -> None:
            data = {"prompt_id": pid, "node_id": nid, "node_type": prompt[nid]["class_type"],
                    "executed": list(executed), "timestamp": _now_ms()}
            self._finish(item, client, hist, ui_out, new_cache, "error", False, ("execution_interrupted", data))

        while remaining:
            ready = [n for n in remaining if deps[n] <= done]
            if not ready:
                nid = remaining[0]
                data = self._error_data(item, nid, prompt[nid]["class_type"], executed, "DependencyCycleError",
                                        "Dependency cycle detected", {})
                self._finish(item, client, hist, ui_out, new_cache, "error", False, ("execution_error", data))
                return
            nid = self._pick(ready, remaining, deps, is_output)
            cls = prompt[nid]["class_type"]
            ps[nid] = ps_entry(nid, 0.0, 1.0, "running")
            send_ps()
            self._to_client(client, "executing", {"node": nid, "display_node": nid, "prompt_id": pid})
            self._last_node_id = nid
            if self._interrupt_requested:
                return finish_interrupted(nid)
            inputs = self._resolve_inputs(prompt, nid, values, info)
            if fail:
                data = self._error_data(item, nid, cls, executed, "RuntimeError", fail_message, inputs)
                self._finish(item, client, hist, ui_out, new_cache, "error", False, ("execution_error", data))
                return
            if hang:
                await self._interrupt_event.wait()
                return finish_interrupted(nid)
            if is_stepped(nid):
                for step in range(1, steps + 1):
                    if unit:
                        await asyncio.sleep(unit)
                    if self._interrupt_requested:
                        return finish_interrupted(nid)
                    ps[nid] = ps_entry(nid, step, steps, "running")
                    self._send_step(client, pid, nid, ps, step, steps)
                final = ps_entry(nid, steps, steps, "finished")
            else:
                if unit:
                    await asyncio.sleep(unit)
                final = ps_entry(nid, 1.0, 1.0, "finished")
            try:
                outs, ui = self._run_node(item, nid, cls, inputs)
            except _NodeFailure as failure:
                data = self._error_data(item, nid, cls, executed, failure.exception_type, failure.message, inputs)
                self._finish(item, client, hist, ui_out, new_cache, "error", False, ("execution_error", data))
                return
            values[nid] = outs
            if cls != "PreviewImage":
                self._preview_prefixes.pop(nid, None)  # ComfyUI made a new node object for this id
            if cls == "SaveImageWebsocket":
                final = self._send_websocket_images(client, pid, nid, ps, inputs.get("images"), ps_entry)
            elif ui is not None:
                self._to_client(client, "executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": pid})
                ui_out[nid] = ui
            ps[nid] = final
            send_ps()
            executed.append(nid)
            done.add(nid)
            remaining.remove(nid)
            new_cache[sigs[nid]] = ui if is_output(nid) else None
        data = {"prompt_id": pid, "timestamp": _now_ms()}
        self._finish(item, client, hist, ui_out, new_cache, "success", True, ("execution_success", data))

    def _send_step(self, client: str | None, pid: str, nid: str, ps: dict, step: int, steps: int) -> None:
        ps_text = _dumps({"type": "progress_state", "data": {"prompt_id": pid, "nodes": ps}})
        progress_text = _dumps({"type": "progress", "data": {"value": step, "max": steps, "prompt_id": pid,
                                                             "node": nid}})
        png = None
        if self.preview_frames:
            shade = int(255 * step / max(steps, 1))
            png = make_png(16, 16, (shade, 64, 255 - shade),
                           {"standin": _dumps({"prompt_id": pid, "node": nid, "step": step})})
        for target in self._progress_targets(client):
            target.send_text(ps_text)
            if png is None:
                target.send_text(progress_text)
            elif target.preview_metadata:
                target.send_bytes(self._frame(png, pid, nid, metadata=True))
                target.send_text(progress_text)
            else:
                target.send_text(progress_text)
                target.send_bytes(self._frame(png, pid, nid, metadata=False))

    @staticmethod
    def _frame(png: bytes, pid: str, nid: str, *, metadata: bool) -> bytes:
        if not metadata:
            return struct.pack(">II", 1, 2) + png
        meta = _dumps({"node_id": nid, "prompt_id": pid, "display_node_id": nid, "parent_node_id": None,
                       "real_node_id": nid, "image_type": "image/png"}).encode()
        return struct.pack(">II", 4, len(meta)) + meta + png

    def _send_websocket_images(self, client, pid, nid, ps, images, ps_entry) -> dict:
        count = images.batch if isinstance(images, _Img) else 1
        for index in range(count):
            ps[nid] = ps_entry(nid, index, count, "running")
            ps_text = _dumps({"type": "progress_state", "data": {"prompt_id": pid, "nodes": ps}})
            progress_text = _dumps({"type": "progress", "data": {"value": index, "max": count, "prompt_id": pid,
                                                                 "node": nid}})
            if isinstance(images, _Img):
                png = make_png(images.w, images.h, images.rgb,
                               {"standin": _dumps({"prompt_id": pid, "node": nid, "index": index})})
            else:
                png = make_png(8, 8, (0, 0, 0), {"standin": _dumps({"prompt_id": pid, "node": nid, "index": index})})
            for target in self._progress_targets(client):
                target.send_text(ps_text)
                if target.preview_metadata:
                    target.send_bytes(self._frame(png, pid, nid, metadata=True))
                    target.send_text(progress_text)
                else:
                    target.send_text(progress_text)
                    target.send_bytes(self._frame(png, pid, nid, metadata=False))
        return ps_entry(nid, count, count, "finished")

    def _finish(self, item, client, hist, ui_out, new_cache, status_str, completed, final) -> None:
        kind, data = final
        hist.append([kind, data])
        entry = {
            "prompt": item.as_list(),
            "outputs": dict(ui_out),
            "status": {"status_str": status_str, "completed": completed, "messages": hist},
            "meta": {nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                     for nid in ui_out},
        }
        delay = float(self.history_delay_s or 0)
        with self._lock:
            if item in self._running:
                self._running.remove(item)
            record = self._open_executions.pop(id(item), None)
            if record is not None:
                record["ended"] = time.monotonic()
                record["outcome"] = {"execution_success": "success",
                                     "execution_interrupted": "interrupted"}.get(kind, "error")
            if delay <= 0:
                self._history[item.prompt_id] = entry
        self._cache = new_cache
        self._to_client(client, kind, data)
        self._broadcast_status()
        self._to_client(client, "executing", {"node": None, "prompt_id": item.prompt_id})
        self._last_node_id = None
        if delay > 0:
            loop = asyncio.get_running_loop()
            holder: list = []

            def publish() -> None:
                with self._lock:
                    self._history[item.prompt_id] = entry
                if holder:
                    self._timers.discard(holder[0])

            handle = loop.call_later(delay, publish)
            holder.append(handle)
            self._timers.add(handle)

    def _error_data(self, item, nid, cls, executed, exception_type, message, inputs) -> dict:
        current_inputs = {}
        for name, value in (inputs or {}).items():
            if isinstance(value, _Img):
                current_inputs[name] = [value.tensor_repr()]
            elif isinstance(value, (_Latent, _Video, _Opaque)):
                current_inputs[name] = [repr(value)]
            else:
                current_inputs[name] = [value]
        return {
            "prompt_id": item.prompt_id,
            "node_id": nid,
            "node_type": cls,
            "executed": list(executed),
            "exception_message": message,
            "exception_type": exception_type,
            "traceback": _fake_traceback("execute", f"raise {exception_type}({message!r})"),
            "current_inputs": current_inputs,
            "current_outputs": list(item.prompt),
            "timestamp": _now_ms(),
        }

    # ------------------------------------------------------------------ node behaviour

    def _resolve_inputs(self, prompt: dict, nid: str, values: dict, info: dict) -> dict:
        resolved = {}
        for name, value in _inputs_of(prompt[nid]).items():
            if _is_link(value) and len(value) == 2:
                resolved[name] = self._value_of(prompt, value[0], value[1], values, info)
            else:
                resolved[name] = value
        return resolved

    def _value_of(self, prompt: dict, nid: str, slot: int, values: dict, info: dict, depth: int = 0) -> Any:
        if nid not in values:
            if depth > 200 or not isinstance(nid, str) or nid not in prompt:
                return None
            # A cached upstream node: recompute its (pure) value silently.
            inputs = {}
            for name, value in _inputs_of(prompt[nid]).items():
                if _is_link(value) and len(value) == 2:
                    inputs[name] = self._value_of(prompt, value[0], value[1], values, info, depth + 1)
                else:
                    inputs[name] = value
            try:
                values[nid] = self._pure(prompt[nid]["class_type"], inputs)
            except _NodeFailure:
                values[nid] = ()
        outs = values[nid]
        return outs[slot] if isinstance(slot, int) and 0 <= slot < len(outs) else None

    def _pure(self, cls: str, inp: dict) -> tuple:
        """Outputs of a non-output node (no side effects)."""
        def image(name: str) -> _Img:
            value = inp.get(name)
            if not isinstance(value, _Img):
                raise _NodeFailure("AttributeError", f"'{type(value).__name__}' object has no attribute 'shape'")
            return value

        if cls == "EmptyImage":
            return (_Img(int(inp.get("width", 512)), int(inp.get("height", 512)), int(inp.get("batch_size", 1)),
                         _color_rgb(inp.get("color", 0))),)
        if cls in ("PrimitiveString", "PrimitiveStringMultiline"):
            return (str(inp.get("value", "")),)
        if cls == "ImageBlur":
            img = image("image")
            return (_Img(img.w, img.h, img.batch, img.rgb),)
        if cls == "ImageInvert":
            img = image("image")
            return (_Img(img.w, img.h, img.batch, tuple(255 - c for c in img.rgb)),)
        if cls == "ImageScaleBy":
            img = image("image")
            scale = float(inp.get("scale_by", 1.0))
            return (_Img(round(img.w * scale), round(img.h * scale), img.batch, img.rgb),)
        if cls == "ImageBlend":
            a, b = image("image1"), image("image2")
            if a.batch != b.batch and 1 not in (a.batch, b.batch):
                raise _NodeFailure(
                    "RuntimeError",
                    f"The size of tensor a ({a.batch}) must match the size of tensor b ({b.batch}) "
                    "at non-singleton dimension 0\n",
                )
            factor = float(inp.get("blend_factor", 0.5))
            rgb = tuple(int(round(x * (1 - factor) + y * factor)) for x, y in zip(a.rgb, b.rgb))
            return (_Img(a.w, a.h, max(a.batch, b.batch), rgb),)
        if cls == "LoadImage":
            # One grey image: the PNG's size when the value names a PNG in ``files``, else 64x64.
            key = self._image_file(inp.get("image"))
            with self._lock:
                size = _png_size(self.files.get(key)) if key is not None else None
            w, h = size or (64, 64)
            return (_Img(w, h, 1, (128, 128, 128)), _Opaque("MASK", inp.get("image")))
        if cls == "RepeatImageBatch":
            img = image("image")
            return (_Img(img.w, img.h, img.batch * int(inp.get("amount", 1)), img.rgb),)
        if cls == "VAEEncode":
            # Like VAE.encode, the pixels are cropped to multiples of 8; the seed carries the image.
            img = image("pixels")
            return (_Latent(img.w // 8 * 8, img.h // 8 * 8, img.batch, ("VAEEncode", img.rgb)),)
        if cls == "LoadAudio":
            return (_Opaque("AUDIO", inp.get("audio")),)
        if cls == "CheckpointLoaderSimple":
            name = inp.get("ckpt_name")
            return (_Opaque("MODEL", name), _Opaque("CLIP", name), _Opaque("VAE", name))
        if cls == "CLIPTextEncode":
            return (_Opaque("CONDITIONING", str(inp.get("text", ""))),)
        if cls == "EmptyLatentImage":
            return (_Latent(inp.get("width", 512), inp.get("height", 512), inp.get("batch_size", 1)),)
        if cls == "KSampler":
            latent = inp.get("latent_image")
            if not isinstance(latent, _Latent):
                raise _NodeFailure("AttributeError", "'NoneType' object has no attribute 'shape'")
            positive = inp.get("positive")
            seed = (inp.get("seed"), positive.detail if isinstance(positive, _Opaque) else None)
            return (_Latent(latent.w, latent.h, latent.batch, seed),)
        if cls == "VAEDecode":
            latent = inp.get("samples")
            if not isinstance(latent, _Latent):
                raise _NodeFailure("AttributeError", "'NoneType' object has no attribute 'shape'")
            return (_Img(latent.w, latent.h, latent.batch, _rgb_from_seed(latent.seed)),)
        if cls == "CreateVideo":
            return (_Video(image("images"), float(inp.get("fps", 30.0))),)
        return ()

    def _run_node(self, item: _Item, nid: str, cls: str, inp: dict) -> tuple[tuple, dict | None]:
        """Run one node: (outputs, ui) where ui is the ``executed`` output of an output node."""
        if cls == "SaveImage":
            images = self._need_image(inp.get("images"))
            sub, base = self._split_prefix(inp.get("filename_prefix", "ComfyUI"))
            entries = [self._save_png(item, nid, "output", sub, base, images, i) for i in range(images.batch)]
            return (), {"images": entries}
        if cls == "PreviewImage":
            images = self._need_image(inp.get("images"))
            known = self._preview_prefixes.get(nid)
            if known is None or known[0] != cls:
                known = (cls, "ComfyUI_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5)))
                self._preview_prefixes[nid] = known
            entries = [self._save_png(item, nid, "temp", "", known[1], images, i) for i in range(images.batch)]
            return (), {"images": entries}
        if cls in ("SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveWEBM"):
            images = self._need_image(inp.get("images"))
            ext = {"SaveAnimatedWEBP": "webp", "SaveAnimatedPNG": "png", "SaveWEBM": "webm"}[cls]
            sub, base = self._split_prefix(inp.get("filename_prefix", "ComfyUI"))
            entry = self._save_blob(item, nid, "output", sub, base, ext, images)
            return (), {"images": [entry], "animated": [True]}
        if cls == "SaveVideo":
            video = inp.get("video")
            if not isinstance(video, _Video):
                raise _NodeFailure("AttributeError", f"'{type(video).__name__}' object has no attribute 'save_to'")
            sub, base = self._split_prefix(inp.get("filename_prefix", "video/ComfyUI"))
            entry = self._save_blob(item, nid, "output", sub, base, "mp4", video.images)
            return (), {"images": [entry], "animated": [True]}
        if cls == "SaveAudio":
            audio = inp.get("audio")
            if not isinstance(audio, _Opaque) or audio.kind != "AUDIO":
                raise _NodeFailure("TypeError", f"'{type(audio).__name__}' object is not subscriptable")
            sub, base = self._split_prefix(inp.get("filename_prefix", "audio/ComfyUI"))
            entry = self._save_blob(item, nid, "output", sub, base, "flac", None)
            return (), {"audio": [entry]}
        if cls == "VHS_VideoCombine":
            images = self._need_image(inp.get("images"))
            fmt = str(inp.get("format", "image/gif"))
            kind = "output" if inp.get("save_output", True) else "temp"
            sub, base = self._split_prefix(inp.get("filename_prefix", "AnimateDiff"))
            if fmt.startswith("image/"):
                ext = fmt.split("/", 1)[1]
            elif fmt == "video/ProRes":
                ext = "mov"
            else:
                ext = fmt.rsplit("-", 1)[-1] if "-" in fmt else fmt.rsplit("/", 1)[-1]
            counter = self._next_counter(kind, sub, base)
            filename = f"{base}_{counter:05}.{ext}"
            self._store(kind, sub, filename, _blob(ext, self._tag(item, nid, filename, images)))
            frame_rate = float(inp.get("frame_rate", 8))
            entry = {"filename": filename, "subfolder": sub, "type": kind, "format": fmt, "frame_rate": frame_rate}
            return ((bool(inp.get("save_output", True)), [filename]),), {"gifs": [entry]}
        if cls == "PreviewAny":
            return (), {"text": [self._as_text(inp.get("source"))]}
        if cls == "SaveImageWebsocket":
            self._need_image(inp.get("images"))
            return (), None
        return self._pure(cls, inp), None

    @staticmethod
    def _need_image(value: Any) -> _Img:
        if not isinstance(value, _Img):
            raise _NodeFailure("AttributeError", f"'{type(value).__name__}' object has no attribute 'cpu'")
        return value

    @staticmethod
    def _as_text(value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float)) or value is None:
            return str(value)
        if isinstance(value, _Img):
            return value.tensor_repr()
        if isinstance(value, (dict, list)):
            try:
                return json.dumps(value, indent=4)
            except (TypeError, ValueError):
                return str(value)
        return repr(value)

    @staticmethod
    def _split_prefix(prefix: Any) -> tuple[str, str]:
        prefix = str(prefix)
        parts = prefix.replace("\\", "/").split("/")
        if prefix.startswith("/") or ".." in parts:
            raise _NodeFailure("Exception", "**** ERROR: Saving image outside the output folder is not allowed."
                                            f"\n full_output_folder: {prefix}")
        base = parts[-1]
        sub = "/".join(p for p in parts[:-1] if p and p != ".")
        return sub, base

    def _next_counter(self, kind: str, sub: str, base: str) -> int:
        key = (kind, sub, base)
        self._file_counters[key] = self._file_counters.get(key, 0) + 1
        return self._file_counters[key]

    def _store(self, kind: str, sub: str, filename: str, data: bytes) -> None:
        data = _pad_output(data, int(self.output_size_bytes or 0))
        with self._lock:
            self.files[(kind, sub, filename)] = data

    @staticmethod
    def _tag(item: _Item, nid: str, filename: str, images: _Img | None) -> str:
        detail = {"prompt_id": item.prompt_id, "node": nid, "filename": filename}
        if images is not None:
            detail.update(width=images.w, height=images.h, frames=images.batch)
        return "stand-in ComfyUI output " + _dumps(detail)

    def _save_png(self, item: _Item, nid: str, kind: str, sub: str, base: str, images: _Img, index: int) -> dict:
        counter = self._next_counter(kind, sub, base)
        filename = f"{base}_{counter:05}_.png"
        text = {"prompt": json.dumps(item.prompt, default=str)}
        extra_png = item.extra.get("extra_pnginfo")
        if isinstance(extra_png, dict):
            for key, value in extra_png.items():
                text[str(key)] = json.dumps(value, default=str)
        text["standin"] = _dumps({"prompt_id": item.prompt_id, "node": nid, "filename": filename,
                                  "subfolder": sub, "type": kind, "batch_index": index})
        self._store(kind, sub, filename, make_png(images.w, images.h, images.rgb, text))
        return {"filename": filename, "subfolder": sub, "type": kind}

    def _save_blob(self, item: _Item, nid: str, kind: str, sub: str, base: str, ext: str,
                   images: _Img | None) -> dict:
        counter = self._next_counter(kind, sub, base)
        filename = f"{base}_{counter:05}_.{ext}"
        if ext == "png" and images is not None:
            data = make_png(images.w, images.h, images.rgb, {"standin": self._tag(item, nid, filename, images)})
        else:
            data = _blob(ext, self._tag(item, nid, filename, images))
        self._store(kind, sub, filename, data)
        return {"filename": filename, "subfolder": sub, "type": kind}


def main() -> None:
    """``python -m comfy_pipeline.testing.standin --port 8188``: serve a stand-in ComfyUI until Ctrl-C
    (to try the CLI against a server in another process; ``--server demo`` runs one in the CLI's own)."""
    import argparse

    parser = argparse.ArgumentParser(description="Stand-in ComfyUI server on 127.0.0.1 (no GPU, no models).")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--execution-time", type=float, default=0.5, help="seconds per prompt")
    parser.add_argument("--progress-steps", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every HTTP answer")
    parser.add_argument("--output-size", type=int, default=0, help="bytes per output file (padded)")
    args = parser.parse_args()
    server = StandInComfyUI(port=args.port, execution_time_s=args.execution_time,
                            progress_steps=args.progress_steps, preview_frames=args.progress_steps > 0)
    server.request_latency_s = args.latency
    server.output_size_bytes = args.output_size
    server.start()
    print(f"stand-in ComfyUI at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
