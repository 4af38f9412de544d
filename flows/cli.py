"""``comfy-pipeline``: run the flow or check a server from the command line.

This module only parses arguments and calls the flow (or the connection for ``check``).
Without ``PREFECT_API_URL`` set, Prefect runs the flow against its temporary local API:
no Prefect server is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from blocks.connection import ComfyUIConnection
from blocks.errors import ComfyUIError
from blocks.server import ComfyUIServer
from blocks.workflow import ComfyUIWorkflow, SeedMode

app = typer.Typer(add_completion=False, help="Run ComfyUI generations as Prefect flows.")


def read_descriptions(path: Path) -> list[str]:
    """One description per line; blank lines and lines starting with ``#`` are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _server(url: str, api_key: Optional[str], timeout: Optional[float]) -> ComfyUIServer:
    settings: dict = {"url": url}
    if api_key:
        settings["api_key"] = api_key
    if timeout:
        settings["generation_timeout_s"] = timeout
    return ComfyUIServer(**settings)


@app.command()
def run(
    server: str = typer.Option(..., "--server", help="ComfyUI base URL, e.g. http://127.0.0.1:8188."),
    workflow: Path = typer.Option(..., "--workflow", exists=True, dir_okay=False,
                                  help="API-format workflow JSON (with its bindings)."),
    kind: str = typer.Option("image", "--kind", help="image or video."),
    character: str = typer.Option("character", "--character", help="Character or campaign name."),
    description: Optional[List[str]] = typer.Option(None, "--description", help="A description (repeatable)."),
    descriptions: Optional[Path] = typer.Option(None, "--descriptions", exists=True, dir_okay=False,
                                                help="A text file, one description per line."),
    variants: int = typer.Option(1, "--variants", min=1, help="Generations per description."),
    output_dir: Path = typer.Option(Path("output"), "--output-dir", help="Where files are written."),
    seed_mode: SeedMode = typer.Option(SeedMode.random, "--seed-mode", help="random, fixed or increment."),
    base_seed: Optional[int] = typer.Option(None, "--seed", help="Base seed for fixed/increment."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Generations in flight at once."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="COMFYUI_API_KEY",
                                          help="Bearer token for the server (or COMFYUI_API_KEY)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds per generation (default 900)."),
) -> None:
    """Generate images or videos for descriptions and write the report artifacts."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.generate_content import generate_content

    if kind not in ("image", "video"):
        raise typer.BadParameter("must be image or video", param_hint="--kind")
    texts = list(description or [])
    if descriptions is not None:
        texts += read_descriptions(descriptions)
    if not texts:
        raise typer.BadParameter("give --description TEXT (repeatable) or --descriptions FILE")
    try:
        template = ComfyUIWorkflow.from_file(workflow)
    except ComfyUIError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    flow = generate_content.with_options(task_runner=ThreadPoolTaskRunner(max_workers=concurrency))
    state = flow(
        server=_server(server, api_key, timeout),
        workflow=template,
        descriptions=texts,
        kind=kind,
        character=character,
        variants=variants,
        output_dir=str(output_dir),
        seed_mode=seed_mode,
        base_seed=base_seed,
        return_state=True,
    )
    if state.is_completed():
        results = state.result()
        files = [f.path for r in results for f in r.files]
        typer.secho(f"{len(results)} generation(s) done, {len(files)} file(s) in {output_dir}",
                    fg=typer.colors.GREEN)
        for path in files:
            typer.echo(f"  {path}")
        return
    typer.secho(f"flow run {state.name}: {state.message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command()
def check(
    server: str = typer.Option(..., "--server", help="ComfyUI base URL."),
    workflow: Optional[Path] = typer.Option(None, "--workflow", exists=True, dir_okay=False,
                                            help="Check that every class_type exists on the server."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="COMFYUI_API_KEY"),
) -> None:
    """Is the server reachable (``/system_stats``), and does it have every node of the workflow (``/object_info``)?"""
    block = _server(server, api_key, None)
    connection = ComfyUIConnection(block.url, headers=block.request_headers(),
                                   connect_timeout_s=block.connect_timeout_s)
    try:
        template = ComfyUIWorkflow.from_file(workflow) if workflow else None
        stats = connection.system_stats()
        version = (stats.get("system") or {}).get("comfyui_version", "unknown version")
        typer.secho(f"ComfyUI {version} reachable at {block.url}", fg=typer.colors.GREEN)
        if template is not None:
            known = set(connection.object_info())
            missing = sorted(template.class_types() - known)
            if missing:
                typer.secho(
                    f"{workflow}: the server has no node class {', '.join(missing)}; "
                    "install the custom nodes that provide them.",
                    fg=typer.colors.RED, err=True,
                )
                raise typer.Exit(1)
            typer.secho(f"{workflow}: all {len(template.class_types())} node classes exist on the server",
                        fg=typer.colors.GREEN)
    except ComfyUIError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    finally:
        connection.close()


def main() -> None:
    """Console entry point."""
    app(prog_name="comfy-pipeline")


if __name__ == "__main__":
    sys.exit(main())
