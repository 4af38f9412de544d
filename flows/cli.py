"""``comfy-pipeline``: run the flow or check a server from the command line.

This module only parses arguments and calls the flow (or the connection for ``check``).
Without ``PREFECT_API_URL`` set, Prefect runs the flow against its temporary local API:
no Prefect server is needed.

Exit codes: 0 success; 1 the server or some generations failed; 2 bad arguments or a
workflow that cannot be used (nothing was sent).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from pydantic import ValidationError

from ..blocks.http_api import ComfyUIHTTP
from ..blocks.errors import ComfyUIError, WorkflowError
from ..blocks.server import ComfyUIServer, ComfyUIServerPool
from ..blocks.workflow import ComfyUIWorkflow, SeedMode, problems_on_server, require_description_binding

app = typer.Typer(add_completion=False, help="Run ComfyUI generations as Prefect flows.")


def _fail(message: str, code: int) -> typer.Exit:
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def read_descriptions(path: Path) -> list[str]:
    """One description per line; blank lines and lines starting with ``#`` are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


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


def _server(url: str, api_key: Optional[str], timeout: Optional[float] = None,
            max_in_flight: Optional[int] = None) -> ComfyUIServer:
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
        options = {"url": "--server", "generation_timeout_s": "--timeout", "api_key": "--api-key",
                   "max_in_flight": "--max-in-flight"}
        problems = "; ".join(
            f"{options.get(str(err['loc'][0]), err['loc'][0]) if err['loc'] else '--server'}: "
            f"{err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise _fail(problems, 2) from None


def _workflow(path: Path, *, require_prompt: bool = True) -> ComfyUIWorkflow:
    try:
        workflow = ComfyUIWorkflow.from_file(path)
        if require_prompt:
            require_description_binding(workflow)
        return workflow
    except WorkflowError as exc:
        raise _fail(str(exc), 2) from None


@app.command()
def run(
    server: List[str] = typer.Option(..., "--server",
                                     help="ComfyUI base URL, e.g. http://127.0.0.1:8188 (repeat for several GPUs)."),
    workflow: Path = typer.Option(..., "--workflow", exists=True, dir_okay=False,
                                  help="API-format workflow JSON (with its bindings)."),
    kind: str = typer.Option("image", "--kind", help="image or video."),
    character: str = typer.Option("character", "--character", help="Character or campaign name."),
    description: Optional[List[str]] = typer.Option(None, "--description", help="A description (repeatable)."),
    descriptions: Optional[Path] = typer.Option(None, "--descriptions", exists=True, dir_okay=False,
                                                help="A text file, one description per line."),
    variants: int = typer.Option(1, "--variants", min=1, max=100, help="Generations per description."),
    output_dir: Path = typer.Option(Path("output"), "--output-dir", help="Where files are written."),
    seed_mode: SeedMode = typer.Option(SeedMode.random, "--seed-mode", help="random, fixed or increment."),
    base_seed: int = typer.Option(0, "--seed", help="Base seed for fixed/increment."),
    param: Optional[List[str]] = typer.Option(None, "--param",
                                              help="Extra workflow parameter KEY=VALUE (repeatable)."),
    output_type: Optional[List[str]] = typer.Option(None, "--output-type",
                                                    help="/view type to download (default output; repeatable)."),
    concurrency: int = typer.Option(8, "--concurrency", min=1,
                                    help="Generation tasks running at once (threads)."),
    max_in_flight: int = typer.Option(2, "--max-in-flight", min=1,
                                      help="Prompts queued or running per server (default 2)."),
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
) -> None:
    """Generate images or videos for descriptions and write the report artifacts."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from .generate_content import generate_content

    if kind not in ("image", "video"):
        raise typer.BadParameter("must be image or video", param_hint="--kind")
    texts = list(description or [])
    if descriptions is not None:
        texts += read_descriptions(descriptions)
    if not texts:
        raise typer.BadParameter("give --description TEXT (repeatable) or --descriptions FILE")
    blocks = [_server(url, api_key, timeout, max_in_flight) for url in server]
    block = blocks[0] if len(blocks) == 1 else ComfyUIServerPool.of(blocks)
    template = _workflow(workflow)
    flow = generate_content.with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=concurrency),
        retries=flow_retries,
        retry_delay_seconds=0,
    )
    try:
        state = _call_flow(flow, block, template, texts, kind, character, variants, output_dir, seed_mode,
                           base_seed, param, output_type, retries, retry_delay)
    except KeyboardInterrupt:
        raise _fail("interrupted: prompts still queued or running were removed from the server", 130) from None
    if state.is_completed():
        results = state.result()
        files = [f.path for r in results for f in r.files]
        typer.secho(f"{len(results)} generation(s) done, {len(files)} file(s) in {output_dir}",
                    fg=typer.colors.GREEN)
        for path in files:
            typer.echo(f"  {path}")
        _point_at_report(character, kind)
        return
    if state.is_crashed() and "interrupt" in (state.message or "").lower():
        raise _fail(f"flow run {state.name}: {state.message}; our prompts were removed from the server", 130)
    typer.secho(f"flow run {state.name}: {state.message}", fg=typer.colors.RED, err=True)
    _point_at_report(character, kind)
    raise typer.Exit(1)


def _point_at_report(character: str, kind: str) -> None:
    from ..tasks.report import artifact_key

    typer.echo(f"report: prefect artifact inspect {artifact_key(character, kind, 'summary')}  "
               f"(and {artifact_key(character, kind, 'generations')} for every generation)")


def _call_flow(flow, block, template, texts, kind, character, variants, output_dir, seed_mode, base_seed,
               param, output_type, retries, retry_delay):
    return flow(
        server=block,
        workflow=template,
        descriptions=texts,
        kind=kind,
        character=character,
        variants=variants,
        output_dir=str(output_dir),
        seed_mode=seed_mode,
        base_seed=base_seed,
        params=parse_params(param or []),
        output_types=list(output_type or ["output"]),
        retries=retries,
        retry_delay_s=retry_delay,
        return_state=True,
    )


@app.command()
def check(
    server: str = typer.Option(..., "--server", help="ComfyUI base URL."),
    workflow: Optional[Path] = typer.Option(None, "--workflow", exists=True, dir_okay=False,
                                            help="Also check the workflow's nodes and choices."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="COMFYUI_API_KEY"),
) -> None:
    """Is the server reachable (GET /system_stats)? Does it have every node class of the
    workflow, and every model or choice it names (GET /object_info)?"""
    block = _server(server, api_key)
    template = _workflow(workflow, require_prompt=False) if workflow else None
    connection = ComfyUIHTTP(block.url, headers=block.request_headers(), verify_tls=block.verify_tls,
                             connect_timeout_s=block.connect_timeout_s)
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
                raise _fail(f"{workflow}:\n  " + "\n  ".join(problems), 1)
            typer.secho(f"{workflow}: all {len(template.class_types())} node classes and their "
                        "choices exist on the server", fg=typer.colors.GREEN)
    except ComfyUIError as exc:
        raise _fail(str(exc), 1) from None
    finally:
        connection.close()


workflow_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="Save workflows as ComfyUI Workflow blocks for deployments.")
app.add_typer(workflow_app, name="workflow")


@workflow_app.command("save")
def workflow_save(
    name: str = typer.Argument(..., help="Block name, e.g. sd15-portrait (lowercase letters, digits, dashes)."),
    file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                help="API-format workflow JSON (with its bindings, in the file or a sidecar)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a saved block of the same name."),
) -> None:
    """Check a workflow file and save it, with its bindings, as a ComfyUI Workflow block.

    A deployment then refers to it as {"$ref": {"block_document_slug": "comfyui-workflow/NAME"}},
    so a worker needs no copy of the file. Saved to the Prefect API of PREFECT_API_URL.
    """
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name):
        raise _fail(f"block name {name!r}: use lowercase letters, digits and dashes, e.g. sd15-portrait", 2)
    template = _workflow(file)
    try:
        template.save(name, overwrite=overwrite)
    except ValueError as exc:  # Prefect: name already used without --overwrite, or an invalid name
        reason = str(exc)
        if "already" in reason.lower():
            reason = f"a ComfyUI Workflow block named {name!r} exists; add --overwrite to replace it"
        raise _fail(f"could not save {file} as {name!r}: {reason}", 2) from None
    bound = ", ".join(sorted(template.bindings)) or "none"
    from prefect.settings import PREFECT_API_URL

    where = PREFECT_API_URL.value() or "the local Prefect database (~/.prefect; set PREFECT_API_URL for a server)"
    typer.secho(f"saved {file} as ComfyUI Workflow block {name!r} on {where}: {len(template.prompt)} "
                f"nodes, bindings {bound}", fg=typer.colors.GREEN)
    typer.echo(f'use it in a deployment as {{"$ref": {{"block_document_slug": "comfyui-workflow/{name}"}}}}')


def _block_types_of(schema: dict, key: str) -> set[str]:
    """The block type slugs a parameter of a deployment's parameter schema accepts (empty: any)."""
    prop = (schema.get("properties") or {}).get(key) or {}
    definitions = schema.get("definitions") or {}
    choices = prop.get("anyOf") or prop.get("allOf") or [prop]
    slugs = set()
    for choice in choices:
        if "$ref" in choice:
            choice = definitions.get(str(choice["$ref"]).rsplit("/", 1)[-1], {})
        if choice.get("block_type_slug"):
            slugs.add(choice["block_type_slug"])
    return slugs


@app.command("link-blocks")
def link_blocks(
    flow_name: str = typer.Option("generate-content", "--flow", help="Whose deployments to update."),
) -> None:
    """After `prefect deploy`: make the run form in the Prefect UI show each deployment's saved
    blocks (server, workflow) as selected defaults.

    prefect.yaml refers to saved blocks by name, {"$ref": {"block_document_slug": "comfyui-server/gpu-1"}},
    which the flow resolves when it runs, but which the UI's form cannot show. This rewrites each
    such reference in the deployments' parameters to {"$ref": {"block_document_id": "<id>"}}, the
    form the UI shows, without copying anything of the block (no secret). Run it again after each
    `prefect deploy`. Exit 1 if a referenced block is not saved.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.exceptions import ObjectNotFound

    missing, any_linked = [], False
    with get_client(sync_client=True) as client:
        flow_filter = FlowFilter(name=FlowFilterName(any_=[flow_name]))
        deployments: list = []
        while True:  # the API answers in pages
            page = client.read_deployments(flow_filter=flow_filter, offset=len(deployments), limit=100)
            deployments += page
            if len(page) < 100:
                break
        for deployment in deployments:
            parameters = dict(deployment.parameters or {})
            linked = []
            for key, value in parameters.items():
                ref = value.get("$ref") if isinstance(value, dict) else None
                slug = ref.get("block_document_slug") if isinstance(ref, dict) else None
                if not isinstance(slug, str):
                    continue
                block_type_slug, _, name = slug.partition("/")
                if not name:
                    missing.append(f"{deployment.name}: {key} refers to {slug!r}, which lacks the "
                                   "block type: write <block type slug>/<name>, e.g. comfyui-server/gpu-1")
                    continue
                allowed = _block_types_of(deployment.parameter_openapi_schema or {}, key)
                if allowed and block_type_slug not in allowed:
                    missing.append(f"{deployment.name}: {key} refers to {slug!r}, but {key} takes a block "
                                   f"of type {' or '.join(sorted(allowed))}")
                    continue
                try:
                    document = client.read_block_document_by_name(name, block_type_slug, include_secrets=False)
                except ObjectNotFound:
                    missing.append(f"{deployment.name}: {key} refers to {slug!r}, which is not saved")
                    continue
                parameters[key] = {"$ref": {"block_document_id": str(document.id)}}
                linked.append(f"{key}={slug}")
            if linked:
                any_linked = True
                client.update_deployment(deployment.id, DeploymentUpdate(parameters=parameters))
                typer.echo(f"{flow_name}/{deployment.name}: {', '.join(linked)}")
    if missing:
        raise _fail("\n".join(missing) + "\nsave those blocks (README, Deployments) and run this again", 1)
    if deployments and not any_linked:
        typer.echo(f"the {len(deployments)} deployment(s) of {flow_name} already refer to their blocks by id")
    if not deployments:
        raise _fail(f"no deployment of flow {flow_name!r} on this Prefect API; run `prefect deploy` first", 1)


def main() -> None:
    """Console entry point."""
    app(prog_name="comfy-pipeline")


if __name__ == "__main__":
    sys.exit(main())
