"""The stand-in ComfyUI server, as the tests and ``bench/`` import it.

It ships in the package as :mod:`comfy_pipeline.testing.standin` (``--server demo`` runs it, and
users test their own pipelines against it); this module re-exports it and adds what only the
repository has: :data:`TRANSCRIPTS`, the folder of the transcripts recorded from a real ComfyUI.
``python -m tests.standin --port 8188`` still serves one until Ctrl-C.
"""

from __future__ import annotations

from pathlib import Path

from comfy_pipeline.testing.standin import *  # noqa: F401,F403
from comfy_pipeline.testing.standin import StandInComfyUI, free_port, main

__all__ = ["StandInComfyUI", "free_port", "TRANSCRIPTS"]

#: The transcripts recorded against a real ComfyUI 0.3.64 (see the README there).
TRANSCRIPTS = Path(__file__).resolve().parent / "transcripts"


if __name__ == "__main__":
    main()
