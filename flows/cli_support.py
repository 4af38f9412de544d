"""What the ``comfy-pipeline`` commands share: one-line failures with an exit code, and building
a server block or a workflow from command-line values."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from ..blocks.errors import WorkflowError
from ..blocks.server import ComfyUIServer
from ..blocks.workflow import ComfyUIWorkflow, require_description_binding


def fail(message: str, code: int) -> typer.Exit:
    """Print ``message`` in red on stderr; return the ``typer.Exit(code)`` to raise."""
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def server_block(url: str, api_key: Optional[str], timeout: Optional[float] = None,
                 max_in_flight: Optional[int] = None, *, url_option: str = "--server") -> ComfyUIServer:
    """A ComfyUI Server block from command-line values; exit 2 naming the option of any invalid
    one (``url_option``: the option that gave the URL)."""
    settings: dict = {"url": url}
    if max_in_flight is not None:
        settings["max_in_flight"] = max_in_flight
    if api_key:
        settings["api_key"] = api_key
    if timeout is not None:
        settings["generation_timeout_s"] = timeout
    try:
        return ComfyUIServer(**settings)
    except ValidationError as exc:
        options = {"url": url_option, "generation_timeout_s": "--timeout", "api_key": "--api-key",
                   "max_in_flight": "--max-in-flight"}
        problems = "; ".join(
            f"{options.get(str(err['loc'][0]), err['loc'][0]) if err['loc'] else url_option}: "
            f"{err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise fail(problems, 2) from None


def workflow_from_file(path: Path, *, require_prompt: bool = True) -> ComfyUIWorkflow:
    """The workflow of a file, checked; exit 2 with the reason if it cannot be used."""
    try:
        workflow = ComfyUIWorkflow.from_file(path)
        if require_prompt:
            require_description_binding(workflow)
        return workflow
    except WorkflowError as exc:
        raise fail(str(exc), 2) from None
