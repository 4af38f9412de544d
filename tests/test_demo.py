"""A first run with nothing but the package: ``--server demo`` (issue 9, item 6).

The README's first run command, read from README.md so the two never drift, runs as a user types
it in an empty folder outside the repository: the built-in stand-in ComfyUI starts inside the
command, the files land and the report is written (to the session's Prefect test API).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_API_URL
from typer.testing import CliRunner

from comfy_pipeline.flows.cli import app
from comfy_pipeline.testing import smoke_workflow
from tests.conftest import EXAMPLES, ROOT

STAND_IN_LINE = "the built-in stand-in ComfyUI at http://127.0.0.1:"
runner = CliRunner()


def readme_first_run_command() -> list[str]:
    """The first ``bash`` block of the README's "Run" section, as argv."""
    section = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("\n## Run\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.timeout(120)
def test_the_readmes_first_run_command_works_in_an_empty_folder(tmp_path):
    argv = readme_first_run_command()
    assert argv[:4] == ["comfy-pipeline", "run", "--server", "demo"], argv
    assert "--workflow" not in argv  # nothing from the repository
    script = shutil.which("comfy-pipeline", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "comfy_pipeline.flows.cli"]
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    env.pop("PYTHONPATH", None)
    done = subprocess.run(command + argv[1:], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]

    assert STAND_IN_LINE in done.stderr and "no model: its images are placeholders" in done.stderr, output
    expected = argv.count("--description") * int(argv[argv.index("--variants") + 1])
    files = sorted((tmp_path / argv[argv.index("--output-dir") + 1]).rglob("*.png"))
    assert len(files) == expected and all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files), output
    assert "report: prefect artifact inspect alice-image-summary" in done.stdout, output

    run_id = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", done.stderr).group(0)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    summary = {a.key: a for a in sorted(found, key=lambda a: a.created)}["alice-image-summary"].data
    assert f"**{expected} of {expected} generations succeeded**" in summary, summary


def test_the_readme_installs_the_demo_extra_first():
    install = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("\n## Install\n", 1)[1]
    first = re.search(r"```bash\n(.*?)\n", install).group(1)
    assert re.match(r"pip install \"\.\[demo\]\"", first), first


def test_check_with_the_demo_server_stops_it_at_the_end():
    result = runner.invoke(app, ["check", "--server", "demo", "--workflow", str(EXAMPLES / "sd15_txt2img.json")])
    assert result.exit_code == 0, result.output
    assert STAND_IN_LINE in result.output and "all 6 node classes" in result.output, result.output
    assert not [t for t in threading.enumerate() if t.name.startswith("standin-comfyui")]


def test_demo_runs_alone_needs_aiohttp_and_a_workflow_otherwise(monkeypatch):
    mixed = runner.invoke(app, ["run", "--server", "demo", "--server", "http://127.0.0.1:9", "--description", "x"])
    assert mixed.exit_code == 2 and mixed.output.count("\n") == 1 and "alone" in mixed.output, mixed.output
    no_workflow = runner.invoke(app, ["run", "--server", "http://127.0.0.1:9", "--description", "x"])
    assert no_workflow.exit_code == 2 and "Missing option '--workflow'" in no_workflow.output, no_workflow.output

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "comfy_pipeline.testing.standin")
    missing = runner.invoke(app, ["run", "--server", "demo", "--description", "x"])
    assert missing.exit_code == 2 and missing.output.count("\n") == 1, missing.output
    assert "pip install 'comfy-pipeline[demo]'" in missing.output, missing.output


@pytest.mark.parametrize("kind", ["image", "video"])
def test_the_packaged_smoke_workflows_are_the_examples(kind):
    assert smoke_workflow(kind).read_bytes() == (EXAMPLES / f"smoke_{kind}.json").read_bytes()
