"""``comfy-pipeline workflow|server|pool save`` and ``link-blocks``: the saved blocks that
deployments refer to, so that a worker needs neither files nor secrets of its own."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer
from prefect.blocks.core import Block

from ..blocks.server import ComfyUIServerPool
from .cli_support import CA_BUNDLE_HELP, INSECURE_HELP, fail, server_block, workflow_from_file

workflow_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="Save workflows as ComfyUI Workflow blocks for deployments.")
server_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Save ComfyUI servers as ComfyUI Server blocks (URL, API key, settings).")
pool_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Save several saved servers as a ComfyUI Server Pool block.")


def _save(block: Block, name: str, overwrite: bool, what: str) -> str:
    """Save ``block`` as ``name``; return where (the Prefect API's URL or the local database).
    Exit 2 for an invalid name or a name in use without ``--overwrite``."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name):
        raise fail(f"block name {name!r}: use lowercase letters, digits and dashes, e.g. gpu-1", 2)
    try:
        block.save(name, overwrite=overwrite)
    except ValueError as exc:  # Prefect: the name is in use (without --overwrite)
        reason = str(exc)
        if "already" in reason.lower():
            reason = f"a {block.get_block_type_name()} block named {name!r} exists; add --overwrite to replace it"
        raise fail(f"could not save {what} as {name!r}: {reason}", 2) from None
    return PREFECT_API_URL.value() or (
        f"the local Prefect database in {PREFECT_HOME.value()} (set PREFECT_API_URL for a Prefect server)")


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
    template = workflow_from_file(file)
    where = _save(template, name, overwrite, str(file))
    bound = ", ".join(sorted(template.bindings)) or "none"
    typer.secho(f"saved {file} as ComfyUI Workflow block {name!r} on {where}: {len(template.prompt)} "
                f"nodes, bindings {bound}", fg=typer.colors.GREEN)
    typer.echo(f'use it in a deployment as {{"$ref": {{"block_document_slug": "comfyui-workflow/{name}"}}}}')


@server_app.command("save")
def server_save(
    name: str = typer.Argument(..., help="Block name, e.g. gpu-1 (lowercase letters, digits, dashes)."),
    url: str = typer.Option(..., "--url", help="ComfyUI base URL, e.g. http://gpu-1:8188."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="COMFYUI_API_KEY", show_envvar=True,
                                          help="Sent as 'Authorization: Bearer KEY'; prefer the env var."),
    max_in_flight: Optional[int] = typer.Option(None, "--max-in-flight", min=1, max=64,
                                                help="Prompts queued or running on it at once (default 2)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds one generation may run (default 900)."),
    ca_bundle: Optional[Path] = typer.Option(
        None, "--ca-bundle", metavar="PATH",
        help=CA_BUNDLE_HELP + " The path is read on the machine that runs the flow (a worker)."),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a saved block of the same name."),
) -> None:
    """Save a ComfyUI server (URL, API key, settings) as a ComfyUI Server block.

    The key is kept secret by Prefect (never shown by the API, the UI or the runs). Deployments
    and pools refer to the block by name. Saved to the Prefect API of PREFECT_API_URL.
    """
    # The CA bundle is checked where the block is used: a worker may keep it at a path this
    # machine does not have. A relative path would be read from the run's working directory.
    if ca_bundle is not None and not str(ca_bundle).startswith("~"):
        ca_bundle = ca_bundle.absolute()
    block = server_block(url, api_key, timeout, max_in_flight, url_option="--url", ca_bundle=ca_bundle,
                         insecure=insecure, check_ca_bundle=False)
    where = _save(block, name, overwrite, url)
    key = "with an API key" if api_key else "without an API key"
    tls = (f", CA bundle {block.ca_bundle}" if block.ca_bundle else
           ", TLS certificate not verified" if not block.verify_tls else "")
    typer.secho(f"saved ComfyUI Server block {name!r} ({block.url}, {key}{tls}) on {where}",
                fg=typer.colors.GREEN)


@pool_app.command("save")
def pool_save(
    name: str = typer.Argument(..., help="Block name, e.g. fleet."),
    servers: List[str] = typer.Argument(..., help="Names of saved ComfyUI Server blocks, e.g. gpu-1 gpu-2."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a saved block of the same name."),
) -> None:
    """Save a ComfyUI Server Pool block that names saved ComfyUI Server blocks.

    It copies none of their settings or secrets: editing a server changes every pool that names it.
    """
    from pydantic import ValidationError

    try:
        pool = ComfyUIServerPool(servers=servers)
        pool.load_servers()  # every name must be a saved server now, not at the first run
    except ValidationError as exc:
        raise fail("; ".join(err["msg"].removeprefix("Value error, ") for err in exc.errors()), 2) from None
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    where = _save(pool, name, overwrite, "the pool")
    typer.secho(f"saved ComfyUI Server Pool block {name!r} ({', '.join(pool.servers)}) on {where}",
                fg=typer.colors.GREEN)


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


def link_blocks(
    flow_name: str = typer.Option("generate-content", "--flow", help="Whose deployments to update."),
) -> None:
    """After `prefect deploy`: the UI's run form then shows each deployment's saved blocks.

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
        raise fail("\n".join(missing) + "\nsave those blocks (README, Deployments) and run this again", 1)
    if deployments and not any_linked:
        typer.echo(f"the {len(deployments)} deployment(s) of {flow_name} already refer to their blocks by id")
    if not deployments:
        raise fail(f"no deployment of flow {flow_name!r} on this Prefect API; run `prefect deploy` first", 1)
