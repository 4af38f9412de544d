"""What the ``comfy-pipeline`` commands share: one-line failures with an exit code, and building
a server block or a workflow from command-line values, and the checks of the other values
that exit 2 before any flow run starts."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from ..blocks.errors import CABundleUnusable, WorkflowError
from ..blocks.server import ComfyUIServer
from ..blocks.tls import usable_ca_bundle
from ..blocks.workflow import (
    COMFY_SEED_MAX,
    RANDOM_SEED_MAX,
    ComfyUIWorkflow,
    SeedMode,
    require_description_binding,
)


CA_BUNDLE_HELP = ("PEM file of the CA that signed the server's certificate (https with a private CA), "
                  "for HTTP and WebSocket alike.")
INSECURE_HELP = "Do not verify the server's TLS certificate (https); prefer --ca-bundle."


def without_heartbeats_on_temporary_api():
    """A context in which a flow run sends no flow-run heartbeats when ``PREFECT_API_URL`` is not set.

    Without it the flow runs against Prefect's temporary API, which stops with this process: no one
    could ever read a heartbeat to find a crashed run, and the heartbeat thread costs every run up
    to 1 s at its end (Prefect joins it, and it sleeps in 1 s steps; ``bench/overhead.py`` fixed,
    latency). With a Prefect server (``PREFECT_API_URL``), flow runs keep
    ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` as set."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        return nullcontext()
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def fail(message: str, code: int) -> typer.Exit:
    """Print ``message`` in red on stderr; return the ``typer.Exit(code)`` to raise."""
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def server_block(url: str, api_key: Optional[str], timeout: Optional[float] = None,
                 max_in_flight: Optional[int] = None, *, url_option: str = "--server",
                 ca_bundle: Optional[Path] = None, insecure: bool = False,
                 check_ca_bundle: bool = True) -> ComfyUIServer:
    """A ComfyUI Server block from command-line values; exit 2 naming the option of any invalid
    one (``url_option``: the option that gave the URL).

    ``ca_bundle`` (``--ca-bundle``) becomes the block's ``ca_bundle``, checked to be a PEM file
    here unless ``check_ca_bundle`` is False (a block saved for another machine); ``insecure``
    (``--insecure``) its ``verify_tls=False``. Giving both exits 2.
    """
    if ca_bundle is not None and insecure:
        raise fail("--ca-bundle and --insecure: give one (--insecure skips the certificate check "
                   "that --ca-bundle is for)", 2)
    settings: dict = {"url": url}
    if ca_bundle is not None:
        settings["ca_bundle"] = str(ca_bundle)
    if insecure:
        settings["verify_tls"] = False
    if max_in_flight is not None:
        settings["max_in_flight"] = max_in_flight
    if api_key:
        settings["api_key"] = api_key
    if timeout is not None:
        settings["generation_timeout_s"] = timeout
    try:
        block = ComfyUIServer(**settings)
        if check_ca_bundle and block.ca_bundle:
            usable_ca_bundle(block.ca_bundle, block.url)
        return block
    except CABundleUnusable as exc:
        raise fail(f"--ca-bundle: {exc}", 2) from None
    except ValidationError as exc:
        options = {"url": url_option, "generation_timeout_s": "--timeout", "api_key": "--api-key",
                   "max_in_flight": "--max-in-flight", "ca_bundle": "--ca-bundle"}
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


class Kind(str, Enum):
    """``--kind``: what the workflow makes; decides file naming and the report's labels
    (``image-to-video``: ``--workflow`` makes images, ``--video-workflow`` a video from each)."""

    image = "image"
    video = "video"
    image_to_video = "image-to-video"

    @property
    def flow_kind(self) -> str:
        """The flow's ``kind`` (``image_to_video`` with an underscore, as Prefect parameters spell it)."""
        return self.value.replace("-", "_")


#: ``--seed`` that means "random".
RANDOM_SEED = -1

SEED_HELP = (f"Base seed of --seed-mode fixed or increment, 0 to {COMFY_SEED_MAX} (2^64-1). "
             "-1 means random, as in many Stable Diffusion tools (with fixed or increment: a random base seed).")


def check_seed(value: int) -> int:
    """``--seed``'s callback: -1 (random) or 0 to ``2**64 - 1``.

    Raises:
        typer.BadParameter: any other value.
    """
    if not RANDOM_SEED <= value <= COMFY_SEED_MAX:
        raise typer.BadParameter(f"{value} is not a seed: give 0 to {COMFY_SEED_MAX} (2^64-1), or -1 for random")
    return value


def seeds(mode: SeedMode, seed: int, generations: int) -> tuple[SeedMode, int]:
    """The seed mode and base seed to run with, from ``--seed-mode`` and ``--seed``.

    ``seed`` -1 (:data:`RANDOM_SEED`) means random, as in many Stable Diffusion tools: in
    ``random`` mode nothing changes (every generation gets its own random seed); with ``fixed`` or
    ``increment`` a random base seed in ``[0, 2**32 - 1]`` is drawn here, once, so the flow run's
    parameters (and its report) hold the seeds used.

    Args:
        mode: ``--seed-mode``.
        seed: ``--seed``, -1 to ``2**64 - 1`` (the option's range).
        generations: descriptions x variants (the last ``increment`` seed is base + generations - 1).

    Raises:
        typer.Exit: (2, after one line on stderr) ``increment`` would go past ComfyUI's largest
            seed ``2**64 - 1``.
    """
    if seed == RANDOM_SEED:
        seed = 0 if mode is SeedMode.random else random.SystemRandom().randint(0, RANDOM_SEED_MAX)
    if mode is SeedMode.increment and seed + generations - 1 > COMFY_SEED_MAX:
        raise fail(f"--seed {seed} with --seed-mode increment: the last of the {generations} generations would "
                   f"get seed {seed + generations - 1}, past ComfyUI's largest {COMFY_SEED_MAX}; give a smaller "
                   "--seed", 2)
    return mode, seed


def check_output_dir(path: Path) -> Path:
    """``path`` (``--output-dir``) made absolute, if files can be written there (it need not exist).

    Raises:
        typer.Exit: (2, after one line on stderr) a file stands where the folder (or one of its
            parents) would be, or the nearest existing folder is not writable.
    """
    target = path.expanduser().absolute()
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise fail(f"--output-dir {path}: {existing} is a file, not a folder; give another --output-dir", 2)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise fail(f"--output-dir {path}: {existing} is not writable by this user; give another --output-dir "
                   "or change its permissions", 2)
    return target


def _usage_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = []
    if hasattr(typer, "TyperException"):  # typer >= 0.2x carries its own copy of click
        errors.append(typer.TyperException)
    try:
        import click
    except ImportError:
        pass
    else:
        errors.append(click.ClickException)
    return tuple(errors)


#: What the command line raises for a bad, missing or unknown option (``exit_code``, ``format_message()``).
USAGE_ERRORS = _usage_errors()


def usage_line(exc: Exception) -> str:
    """A usage error (one of :data:`USAGE_ERRORS`) as one line: its message and, for a bad or
    missing option (exit code 2), where the options are listed, e.g. ``Invalid value for
    '--variants': 0 is not in the range 1<=x<=100. See 'comfy-pipeline run --help'.``"""
    message = " ".join(exc.format_message().split()).replace("Value error, ", "")
    if not message.endswith((".", "?", "!")):
        message += "."
    if getattr(exc, "exit_code", 1) != 2:
        return message
    context = getattr(exc, "ctx", None)
    command = getattr(context, "command_path", None) or "comfy-pipeline"
    return f"{message} See '{command} --help'."
