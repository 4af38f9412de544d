"""``--server demo``: the built-in stand-in ComfyUI, started inside the command.

A first run needs nothing but the package (with its ``demo`` extra, which brings aiohttp):
``comfy-pipeline run --server demo --description "a red fox"`` starts
:class:`~comfy_pipeline.testing.standin.StandInComfyUI` on a free 127.0.0.1 port, says so in one
line, runs the packaged smoke workflow when no ``--workflow`` is given, and stops the stand-in when
the command ends (Ctrl-C and SIGTERM included: it is a resource of the command's click context,
closed after the signal handling of ``cli_signals`` removed our prompts from it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..testing import smoke_workflow
from .cli_support import fail

#: The ``--server`` value that means the built-in stand-in.
DEMO = "demo"
#: Seconds each prompt takes on the stand-in, spread over its progress steps: the run looks alive.
DEMO_PROMPT_S = 0.5
DEMO_PROGRESS_STEPS = 4


def wants_demo(servers: list[str]) -> bool:
    """True when ``--server demo`` was given (then alone, with aiohttp installed).

    Raises:
        typer.Exit: (2, after one line on stderr) ``demo`` mixed with other servers, or aiohttp
            is not installed.
    """
    if DEMO not in servers:
        return False
    if len(servers) > 1:
        raise fail("--server demo runs the built-in stand-in alone: give it without other --server values", 2)
    _stand_in_class()
    return True


def demo_workflow(workflow: Optional[Path], demo: bool, kind: str) -> Path:
    """The workflow to run: ``--workflow``, or with ``--server demo`` the packaged smoke workflow of
    ``kind``.

    Raises:
        typer.Exit: (2, after one line on stderr, as click words a missing option) no ``--workflow``
            and no ``--server demo``.
    """
    if workflow is not None:
        return workflow
    if not demo:
        raise fail("Missing option '--workflow' (only --server demo has a built-in workflow). "
                   "See 'comfy-pipeline run --help'.", 2)
    return smoke_workflow(kind)


def start_demo(ctx: typer.Context) -> str:
    """Start the stand-in for the rest of the command (stopped when ``ctx`` closes), print the line
    that says the server is the built-in stand-in, and return its URL."""
    comfy = ctx.with_resource(_stand_in_class()(execution_time_s=DEMO_PROMPT_S,
                                                progress_steps=DEMO_PROGRESS_STEPS))
    typer.secho(f"--server demo: the built-in stand-in ComfyUI at {comfy.url} (no model: its images are "
                "placeholders)", fg=typer.colors.YELLOW, err=True)
    return comfy.url


def _stand_in_class():
    """:class:`StandInComfyUI`, or exit 2 in one line naming the install command."""
    try:
        from ..testing.standin import StandInComfyUI
    except ImportError as exc:
        raise fail(f"--server demo: {exc}", 2) from None
    return StandInComfyUI
