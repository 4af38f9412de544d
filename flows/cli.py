"""``comfy-pipeline``: run the flow or check a server from the command line.

This module only parses arguments and calls the flow (or the connection for ``check``);
``cli_display`` shows the run in the terminal. Arguments that cannot work exit 2 in one line
before any flow run starts.
Without ``PREFECT_API_URL`` set, Prefect runs the flow against its temporary local API:
no Prefect server is needed. ``--server demo`` starts the built-in stand-in ComfyUI inside the
command (``cli_demo``): no ComfyUI is needed either.

Exit codes: 0 success; 1 the server or some generations failed; 2 bad arguments or a
workflow that cannot be used (nothing was sent); 130 / 143 interrupted by SIGINT (Ctrl-C) /
SIGTERM, within 10 s, after our prompts were removed from the server (see ``cli_signals``).
"""

from __future__ import annotations

import os

# Prefect's temporary API gives up after 20 s by default: too short on a small, busy machine for a
# first run. Before Prefect is imported (it reads its settings then); a value you set wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path
from typing import Any, List, Optional

import httpx
import typer

from ..blocks.http_api import ComfyUIHTTP
from ..blocks.errors import ComfyUIError, WorkflowError
from ..blocks.server import ComfyUIServerPool
from ..blocks.inputs import check_input_images as check_inputs
from ..blocks.workflow import SeedMode, problems_on_server, require_description_binding, require_start_image_binding
from .cli_blocks import link_blocks, pool_app, server_app, workflow_app
from .cli_demo import demo_workflow, smoke_workflow, start_demo, wants_demo
from .cli_display import RunDisplay, print_end, quiet_prefect_console
from .cli_signals import SignalOwner
from .cli_support import CA_BUNDLE_HELP, INSECURE_HELP, fail, server_block, workflow_from_file
from .cli_support import SEED_HELP, USAGE_ERRORS, Kind, check_output_dir, check_seed, seeds, usage_line
from .cli_support import without_heartbeats_on_temporary_api
from .descriptions import Description, DescriptionRow, as_one_kind, read_descriptions_file, texts_and_inputs

app = typer.Typer(add_completion=False, help="Run ComfyUI generations as Prefect flows.")


def read_descriptions(path: Path) -> list[Description]:
    """The descriptions of ``--descriptions``: one per line, or rows of a ``.csv`` / ``.jsonl`` file
    with a ``description`` and input images (:func:`read_descriptions_file`).

    Raises:
        typer.BadParameter: the file cannot be read, or a row is not valid (file and line named).
    """
    try:
        return read_descriptions_file(path)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--descriptions") from None


def parse_inputs(items: list[str]) -> dict[str, str]:
    """``--input KEY=PATH`` pairs: ``{parameter: absolute path}`` (``~`` expanded).

    Raises:
        typer.BadParameter: an item without ``=``, a key or a path.
    """
    inputs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise typer.BadParameter(f"expected KEY=PATH, got {item!r}", param_hint="--input")
        inputs[key.strip()] = str(Path(value.strip()).expanduser().absolute())
    return inputs


def parse_params(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that is valid JSON (``7``, ``true``, ``[1,2]``) keeps its type.

    Raises:
        typer.BadParameter: an item without ``=``.
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return params


@app.command()
def run(
    ctx: typer.Context,
    server: List[str] = typer.Option(..., "--server",
                                     help="ComfyUI base URL, e.g. http://127.0.0.1:8188 (repeat for several GPUs); "
                                          "'demo': a built-in stand-in ComfyUI (no model, placeholder images)."),
    workflow: Optional[Path] = typer.Option(None, "--workflow", exists=True, dir_okay=False,
                                            help="API-format workflow JSON (with its bindings); with --server demo "
                                                 "the built-in smoke workflow if left out."),
    kind: Kind = typer.Option(Kind.image, "--kind", help="What the workflow makes (file names, report labels)."),
    character: str = typer.Option("character", "--character", help="Character or campaign name."),
    description: Optional[List[str]] = typer.Option(None, "--description", help="A description (repeatable)."),
    descriptions: Optional[Path] = typer.Option(None, "--descriptions", exists=True, dir_okay=False,
                                                help="A text file, one description per line; or a .csv / .jsonl "
                                                     "file of rows with a 'description' and input images "
                                                     "(other columns, e.g. image)."),
    variants: int = typer.Option(1, "--variants", min=1, max=100,
                                 help="Generations per description (image-to-video: videos per image)."),
    video_workflow: Optional[Path] = typer.Option(None, "--video-workflow", exists=True, dir_okay=False,
                                                  help="image-to-video: the workflow that makes a video from each "
                                                       "image (binds 'image')."),
    image_variants: int = typer.Option(1, "--image-variants", min=1, max=100,
                                       help="image-to-video: images per description."),
    input_image: Optional[List[str]] = typer.Option(None, "--input", metavar="KEY=PATH",
                                                    help="An input image for workflow parameter KEY (repeatable), "
                                                         "uploaded once per server."),
    output_dir: Path = typer.Option(Path("output"), "--output-dir", help="Where files are written (created if missing)."),
    seed_mode: SeedMode = typer.Option(SeedMode.random, "--seed-mode",
                                       help="random (each generation its own), fixed (--seed for all) or "
                                            "increment (--seed, --seed + 1, ...)."),
    base_seed: int = typer.Option(0, "--seed", callback=check_seed, help=SEED_HELP),
    param: Optional[List[str]] = typer.Option(None, "--param",
                                              help="Extra workflow parameter KEY=VALUE (repeatable)."),
    output_type: Optional[List[str]] = typer.Option(None, "--output-type",
                                                    help="/view type to download (default output; repeatable)."),
    concurrency: int = typer.Option(0, "--concurrency", min=0, max=256,
                                    help="Generations in flight at once (threads); 0 (default): "
                                         "--max-in-flight + 1 summed over the servers, every slot used."),
    shard_size: int = typer.Option(0, "--shard-size", min=0,
                                   help="Split a run of more descriptions than this into shards of this many, "
                                        "each its own flow run (here: one after the other); 0: never."),
    max_in_flight: int = typer.Option(2, "--max-in-flight", min=1,
                                      help="Prompts queued or running per server."),
    retries: int = typer.Option(2, "--retries", min=0, max=10,
                                help="Retries per generation for transient failures (0-10)."),
    retry_delay: float = typer.Option(5.0, "--retry-delay", min=0,
                                      help="Seconds before the first retry, doubling each time."),
    flow_retries: int = typer.Option(0, "--flow-retries", min=0,
                                     help="Re-run the failed generations this many times."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="COMFYUI_API_KEY",
                                          help="Bearer token for the server (or COMFYUI_API_KEY)."),
    timeout: Optional[float] = typer.Option(None, "--timeout",
                                            help="Seconds one generation may run (default 900)."),
    ca_bundle: Optional[Path] = typer.Option(None, "--ca-bundle", metavar="PATH", help=CA_BUNDLE_HELP),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="-v: a line per finished generation and every file at the end; -vv: also "
                                     "every node and sampler step (Prefect's INFO logs)."),
    list_files: bool = typer.Option(False, "--list-files", help="List every file written at the end."),
) -> None:
    """Generate images or videos for descriptions and write the report artifacts.

    On a terminal a live display shows done, failed, running and queued generations, the rate
    and the time left; elsewhere each finished generation is one line. Warnings and errors
    always show; the end lists the failed generations, the output folder and the report.
    """
    from prefect.exceptions import TerminationSignal

    # Everything the command can know is wrong exits 2 here, in one line, before any flow run.
    demo = wants_demo(server)
    workflow = demo_workflow(workflow, demo, "image" if kind is Kind.image_to_video else kind.value)
    texts: list[Description] = list(description or [])
    if descriptions is not None:
        texts += read_descriptions(descriptions)
    if not texts:
        raise typer.BadParameter("give --description TEXT (repeatable) or --descriptions FILE")
    extra_params = parse_params(param or [])
    inputs = parse_inputs(input_image or [])
    per_description = (image_variants * (1 + variants)) if kind is Kind.image_to_video else variants
    seed_mode, base_seed = seeds(seed_mode, base_seed, len(texts) * per_description)
    output_dir = check_output_dir(output_dir)
    template = workflow_from_file(workflow)
    video_workflow, video_template = check_video_workflow(kind, video_workflow, demo, image_variants)
    check_input_images(inputs, texts, template, video_template)
    passed = descriptions_parameter(as_one_kind(texts), descriptions if not description else None, output_dir)
    check_parameters_size(passed, extra_params, inputs)
    if demo:  # running until the command ends, Ctrl-C included
        server = [start_demo(ctx)]
    blocks = [server_block(url, api_key, timeout, max_in_flight, ca_bundle=ca_bundle,
                           insecure=insecure) for url in server]
    block = blocks[0] if len(blocks) == 1 else ComfyUIServerPool.of(blocks)
    display = RunDisplay(total=len(texts) * per_description, descriptions=len(texts), variants=per_description,
                         servers=server, verbosity=verbose)
    quiet_prefect_console(verbose)  # for the rest of the process: its exit hooks log too

    # SIGINT and SIGTERM are ours from the start: one during Prefect's start-up ends the command too.
    with SignalOwner() as owner:
        try:
            from .generate_content import generate_content

            flow = generate_content.with_options(retries=flow_retries, retry_delay_seconds=0)
            with display, without_heartbeats_on_temporary_api():
                # The workflows travel as paths (read by the flow on this machine), never inlined.
                state = _call_flow(flow, block, str(Path(workflow).absolute()), passed, kind.flow_kind, character,
                                   variants, output_dir, seed_mode, base_seed, extra_params, output_type, retries,
                                   retry_delay, image_variants=image_variants, inputs=inputs, concurrency=concurrency,
                                   shard_size=shard_size,
                                   video_workflow=str(Path(video_workflow).absolute()) if video_workflow else "")
        except KeyboardInterrupt:
            _point_at_report(character, kind.flow_kind)  # the flow wrote it, saying the run was stopped
            raise _stopped(owner, signal.SIGINT) from None
        except TerminationSignal as exc:
            _point_at_report(character, kind.flow_kind)
            raise _stopped(owner, exc.signal) from None
        except RuntimeError as exc:
            if "ephemeral Prefect API server" not in str(exc):
                raise
            raise fail(f"{exc} Start one with 'prefect server start' in another terminal and export "
                       "PREFECT_API_URL=http://127.0.0.1:4200/api, or give it longer with "
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (default here 90)", 1) from None
        except httpx.HTTPStatusError as exc:  # Prefect's API refused the flow run (e.g. 422): one line
            answer = " ".join(exc.response.text.split())[:300]
            raise fail(f"Prefect's API at {exc.request.url.host} refused the flow run: HTTP {exc.response.status_code} "
                       f"{exc.response.reason_phrase} ({answer})", 1) from None
        stop = owner.stop()
        if stop is not None:  # the flow returned though its interrupt was lost: the sweep ended it
            raise fail(stop.message, stop.code)
    if state.is_completed():
        results = state.result()
        files = [f.path for r in results for f in r.files]
        print_end(display, output_dir=str(output_dir), files=files, done=len(results),
                  list_files=list_files or verbose >= 1)
        _point_at_report(character, kind.flow_kind)
        return
    run_name = repr(display.flow_run_name) if display.flow_run_name else state.name
    if state.is_crashed() and "interrupt" in (state.message or "").lower():
        raise fail(f"flow run {run_name}: {state.message}; our prompts were removed from the server", 130)
    print_end(display, output_dir=str(output_dir), list_files=list_files or verbose >= 1)
    _point_at_report(character, kind.flow_kind)
    raise fail(f"flow run {run_name} failed: {state.message}", 1)


def _stopped(owner: SignalOwner, signum: int) -> typer.Exit:
    """The exit for a run that ended with KeyboardInterrupt or TerminationSignal: ``128 + signum``
    (130, 143) and one line saying how many of our prompts were removed from the server."""
    stop = owner.stop(assume=signum)
    if stop is None:  # not the main thread: the flow's own finally removed our prompts
        return fail("interrupted: prompts still queued or running were removed from the server", 128 + signum)
    return fail(stop.message, stop.code)


def _point_at_report(character: str, kind: str) -> None:
    from ..tasks.report import artifact_key

    typer.echo(f"report: prefect artifact inspect {artifact_key(character, kind, 'summary')} --limit 1  "
               f"(and {artifact_key(character, kind, 'generations')} for every generation, "
               f"{artifact_key(character, kind, 'gallery')} for the pictures)")


def check_video_workflow(kind: Kind, video_workflow: Optional[Path], demo: bool, image_variants: int):
    """``(path, workflow)`` of the video workflow of an image-to-video run (``--video-workflow``, or
    with ``--server demo`` the packaged one), checked to bind ``image``; ``(None, None)`` for other
    kinds. Exit 2 in one line when it is missing or cannot be used, or when image-to-video options
    come with another kind."""
    if kind is not Kind.image_to_video:
        if video_workflow is not None or image_variants != 1:
            raise fail("--video-workflow and --image-variants are for --kind image-to-video", 2)
        return None, None
    if video_workflow is None:
        if not demo:
            raise fail("--kind image-to-video needs --video-workflow (the workflow that makes a video from each "
                       "image, binding its start image as 'image')", 2)
        video_workflow = smoke_workflow("image_to_video")
    template = workflow_from_file(video_workflow, require_prompt=False)
    try:
        require_start_image_binding(template)
    except WorkflowError as exc:
        raise fail(str(exc), 2) from None
    return video_workflow, template


#: Descriptions whose JSON would be larger than this (bytes) go to the flow run by reference.
REFERENCE_ABOVE_BYTES = 100_000
#: What Prefect's API accepts at most for a flow run's parameters, serialized (bytes).
PREFECT_PARAMETERS_LIMIT_BYTES = 512 * 1024


def descriptions_parameter(texts: list, from_file: Optional[Path], output_dir: Path):
    """What the flow run gets as ``descriptions``: the list itself when its JSON is at most
    :data:`REFERENCE_ABOVE_BYTES`, else a reference the flow reads: the descriptions file's own
    path (``from_file``, when it gave every description), or a JSON Lines file written under
    ``output_dir/.comfy-pipeline/`` (image paths there are absolute)."""
    rows = [t.model_dump() if isinstance(t, DescriptionRow) else t for t in texts]
    if len(json.dumps(rows)) <= REFERENCE_ABOVE_BYTES:
        return texts
    if from_file is not None:
        return str(from_file.expanduser().absolute())
    folder = output_dir / ".comfy-pipeline"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"descriptions-{uuid.uuid4().hex[:12]}.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(target.absolute())


def check_parameters_size(*values) -> None:
    """Exit 2 in one line when the flow run's parameters would exceed what Prefect's API accepts
    (:data:`PREFECT_PARAMETERS_LIMIT_BYTES`), naming what to pass by reference."""
    size = sum(len(json.dumps(v, default=str)) for v in values)
    if size > PREFECT_PARAMETERS_LIMIT_BYTES:
        raise fail(f"the flow run's parameters would be {size // 1024} KB and Prefect accepts at most "
                   f"{PREFECT_PARAMETERS_LIMIT_BYTES // 1024} KB: shorten the --param values (descriptions "
                   "already travel as a file reference)", 2)


def check_input_images(inputs: dict[str, str], texts: list, template, video_template) -> None:
    """Every input image (``--input``, the descriptions file's columns) is bound by a workflow of the
    run and is a readable image: else exit 2 in one line, before any flow run."""
    stages = {"image": template, **({"video": video_template} if video_template is not None else {})}
    try:
        check_inputs(inputs, texts_and_inputs(texts)[1], stages)
    except WorkflowError as exc:
        raise fail(str(exc), 2) from None


def _call_flow(flow, block, template, texts, kind, character, variants, output_dir, seed_mode, base_seed,
               params, output_type, retries, retry_delay, **stage_options):
    return flow(
        server=block,
        workflow=template,
        descriptions=texts,
        kind=kind,
        character=character,
        variants=variants,
        **stage_options,
        output_dir=str(output_dir),
        seed_mode=seed_mode,
        base_seed=base_seed,
        params=params,
        output_types=list(output_type or ["output"]),
        retries=retries,
        retry_delay_s=retry_delay,
        return_state=True,
    )


@app.command()
def check(
    ctx: typer.Context,
    server: str = typer.Option(..., "--server",
                               help="ComfyUI base URL; 'demo': the built-in stand-in ComfyUI (no model)."),
    workflow: Optional[Path] = typer.Option(None, "--workflow", exists=True, dir_okay=False,
                                            help="Also check the workflow's nodes and choices."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="COMFYUI_API_KEY"),
    ca_bundle: Optional[Path] = typer.Option(None, "--ca-bundle", metavar="PATH", help=CA_BUNDLE_HELP),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Check a server (GET /system_stats) and a workflow's nodes and choices (GET /object_info).

    Is the server reachable? Does it have every node class of the workflow, and every model or
    choice it names (a ckpt_name in its models folder, a sampler_name, ...)?
    """
    demo = wants_demo([server])
    template = workflow_from_file(workflow, require_prompt=False) if workflow else None
    if demo:
        server = start_demo(ctx)
    block = server_block(server, api_key, ca_bundle=ca_bundle, insecure=insecure)
    connection = ComfyUIHTTP(block.url, headers=block.request_headers(), verify_tls=block.verify_tls,
                             ca_bundle=block.ca_bundle, connect_timeout_s=block.connect_timeout_s)
    try:
        stats = connection.system_stats()
        version = (stats.get("system") or {}).get("comfyui_version", "unknown version")
        typer.secho(f"ComfyUI {version} reachable at {block.url}", fg=typer.colors.GREEN)
        if template is not None:
            problems = problems_on_server(template, connection.object_info())
            try:
                require_description_binding(template)
            except WorkflowError as exc:
                problems.append(str(exc))
            if problems:
                raise fail(f"{workflow}:\n  " + "\n  ".join(problems), 1)
            typer.secho(f"{workflow}: all {len(template.class_types())} node classes and their "
                        "choices exist on the server", fg=typer.colors.GREEN)
    except ComfyUIError as exc:
        raise fail(str(exc), 1) from None
    finally:
        connection.close()


app.add_typer(workflow_app, name="workflow")
app.add_typer(server_app, name="server")
app.add_typer(pool_app, name="pool")
app.command("link-blocks")(link_blocks)


def main(args: Optional[List[str]] = None) -> None:
    """Console entry point (``args``: the command line after the program name, default
    ``sys.argv[1:]``). Always raises ``SystemExit`` with the exit code. A usage error (an option
    missing, unknown or out of its range) is one line on stderr and exit 2, not click's usage box."""
    try:
        code = app(args=args, prog_name="comfy-pipeline", standalone_mode=False)
    except USAGE_ERRORS as exc:
        raise SystemExit(fail(usage_line(exc), exc.exit_code).exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
