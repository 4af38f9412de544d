"""The ``comfy-pipeline`` command: ``run`` and ``check`` against the stand-in server.

``run`` goes through a real subprocess (as a user types it) talking to the session's Prefect
test API; ``check`` and argument errors run in-process with typer's runner.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from prefect.settings import PREFECT_API_URL
from typer.testing import CliRunner

from comfy_pipeline.flows.cli import app, read_descriptions
from tests.conftest import EXAMPLES, ROOT
from tests.standin import free_port

runner = CliRunner()


def comfy_pipeline(*args: str) -> subprocess.CompletedProcess:
    """Run ``comfy-pipeline ARGS`` in a new process against the test Prefect API."""
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    completed = subprocess.run([sys.executable, "-m", "comfy_pipeline.flows.cli", *args], capture_output=True,
                               text=True, timeout=180, env=env, cwd=ROOT)
    completed.output = completed.stdout + completed.stderr
    return completed


def test_entry_point_is_installed():
    exe = shutil.which("comfy-pipeline")
    cmd = [exe] if exe else [sys.executable, "-m", "comfy_pipeline.flows.cli"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "run" in out.stdout and "check" in out.stdout


def test_flow_run_heartbeats_are_off_only_under_prefects_temporary_api():
    """Without PREFECT_API_URL no one can read a heartbeat (the temporary API stops with the
    command), and each costs up to 1 s at the run's end; with a Prefect server they are kept."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from comfy_pipeline.flows.cli_support import without_heartbeats_on_temporary_api

    with temporary_settings(updates={PREFECT_API_URL: None, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        with without_heartbeats_on_temporary_api():
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 60
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api",
                                     PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        with without_heartbeats_on_temporary_api():
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 60


def test_descriptions_file_skips_blanks_and_comments(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("# campaign\na fox\n\n  a bird  \n#x\n", encoding="utf-8")
    assert read_descriptions(f) == ["a fox", "a bird"]


@pytest.mark.usefixtures("prefect_api", "no_leaked_threads")
def test_run_generates_files_for_descriptions_from_flags_and_file(comfy, tmp_path):
    descriptions = tmp_path / "d.txt"
    descriptions.write_text("a gold fish\n", encoding="utf-8")
    result = comfy_pipeline(
        "run", "--server", comfy.url, "--workflow", str(EXAMPLES / "smoke_image.json"),
        "--kind", "image", "--character", "bob", "--description", "a red fox",
        "--descriptions", str(descriptions), "--variants", "2", "--output-dir", str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.output
    assert "4 generation(s) done, 4 file(s)" in result.output
    names = sorted(p.name for p in (tmp_path / "out").rglob("*.png"))
    assert names == ["bob_d0_0.png", "bob_d0_1.png", "bob_d1_0.png", "bob_d1_1.png"]
    assert comfy.ws_opened == 1


@pytest.mark.usefixtures("prefect_api")
def test_run_exits_non_zero_and_says_why_when_generations_fail(comfy, tmp_path):
    result = comfy_pipeline(
        "run", "--server", comfy.url, "--workflow", str(EXAMPLES / "sd15_txt2img.json"),
        "--description", "ok", "--description", "bad [[fail]]", "--output-dir", str(tmp_path / "out"),
    )
    assert result.returncode == 1
    assert "1 of 2 generations failed" in result.output
    # the failed generation is one line in the log, without Prefect's traceback ...
    failure_lines = [line for line in result.stderr.splitlines() if "NodeExecutionError" in line]
    assert len(failure_lines) == 1 and "'bad [[fail]]'" in failure_lines[0], result.output
    assert "Traceback" not in result.output
    # ... and one row of the table of failed generations at the end: description, variant, error
    rows = [line for line in result.stdout.splitlines() if "NodeExecutionError" in line]
    assert len(rows) == 1 and rows[0].split()[:4] == ["bad", "[[fail]]", "1/1", "NodeExecutionError:"], result.stdout


def test_run_refuses_a_ui_format_workflow_before_contacting_anything(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    result = runner.invoke(app, ["run", "--server", "http://127.0.0.1:9", "--workflow", str(ui),
                                 "--description", "x"])
    assert result.exit_code == 2 and "Export (API)" in result.output
    result = runner.invoke(app, ["check", "--server", "http://127.0.0.1:9", "--workflow", str(ui)])
    assert result.exit_code == 2 and "Export (API)" in result.output


def test_check_reports_a_reachable_server_and_known_nodes(comfy):
    result = runner.invoke(app, ["check", "--server", comfy.url,
                                 "--workflow", str(EXAMPLES / "sd15_txt2img.json")])
    assert result.exit_code == 0, result.output
    assert "reachable" in result.output and "node classes and their choices exist" in result.output


def test_check_names_missing_node_classes(comfy, tmp_path):
    wf = tmp_path / "custom.json"
    wf.write_text(json.dumps({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "FancyUpscaler", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }))
    result = runner.invoke(app, ["check", "--server", comfy.url, "--workflow", str(wf)])
    assert result.exit_code == 1 and "FancyUpscaler" in result.output


def test_check_names_an_unreachable_url():
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["check", "--server", url])
    assert result.exit_code == 1 and url in result.output and "unreachable" in result.output


def test_check_names_a_checkpoint_the_server_does_not_have(comfy, tmp_path):
    wf = json.loads((EXAMPLES / "sd15_txt2img.json").read_text())
    node = next(n for n in wf.values() if isinstance(n, dict) and n.get("class_type") == "CheckpointLoaderSimple")
    node["inputs"]["ckpt_name"] = "not-downloaded.safetensors"
    path = tmp_path / "sd15.json"
    path.write_text(json.dumps(wf))
    result = runner.invoke(app, ["check", "--server", comfy.url, "--workflow", str(path)])
    assert result.exit_code == 1
    assert "input 'ckpt_name': 'not-downloaded.safetensors' is not one of the server's choices" in result.output


def test_a_url_without_scheme_is_one_clear_line_not_a_traceback():
    result = runner.invoke(app, ["check", "--server", "127.0.0.1:8188"])
    assert result.exit_code == 2
    assert "http://host:8188" in result.output and "Traceback" not in result.output


def test_params_keep_json_types():
    from comfy_pipeline.flows.cli import parse_params

    assert parse_params(["negative_prompt=blurry, dark", "steps=30", "hires=true"]) == {
        "negative_prompt": "blurry, dark", "steps": 30, "hires": True}


@pytest.mark.usefixtures("prefect_api")
def test_run_passes_params_into_the_workflow(comfy, tmp_path):
    result = comfy_pipeline(
        "run", "--server", comfy.url, "--workflow", str(EXAMPLES / "sd15_txt2img.json"),
        "--description", "a castle", "--param", "negative_prompt=fog [[fail]]", "--retries", "0",
        "--output-dir", str(tmp_path / "out"),
    )
    # the negative prompt reached the server: its marker made the stand-in fail the node
    assert result.returncode == 1 and "1 of 1 generations failed" in result.output


@pytest.mark.usefixtures("prefect_api")
def test_run_spreads_over_several_servers(tmp_path):
    from tests.standin import StandInComfyUI

    a, b = StandInComfyUI(execution_time_s=0.2).start(), StandInComfyUI(execution_time_s=0.2).start()
    try:
        result = comfy_pipeline(
            "run", "--server", a.url, "--server", b.url, "--workflow", str(EXAMPLES / "smoke_image.json"),
            "--description", "one", "--description", "two", "--variants", "3",
            "--output-dir", str(tmp_path / "out"),
        )
        assert result.returncode == 0, result.output
        assert "6 generation(s) done" in result.output
        assert a.requests[("POST", "/prompt")] and b.requests[("POST", "/prompt")]
        assert a.ws_opened == 1 and b.ws_opened == 1
    finally:
        a.stop()
        b.stop()


def test_a_workflow_that_ignores_the_descriptions_is_refused_before_prefect_starts(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }))
    result = runner.invoke(app, ["run", "--server", "http://127.0.0.1:9", "--workflow", str(bare),
                                 "--description", "a fox"])
    assert result.exit_code == 2 and "no binding for 'prompt'" in result.output


@pytest.mark.usefixtures("prefect_api")
def test_server_and_pool_save_store_blocks_whose_secrets_stay_secret(monkeypatch):
    from prefect.client.orchestration import get_client

    from comfy_pipeline.blocks import ComfyUIServer, ComfyUIServerPool

    monkeypatch.setenv("COMFYUI_API_KEY", "sk-cli-saved")
    result = runner.invoke(app, ["server", "save", "cli-gpu-1", "--url", "http://gpu-1:8188",
                                 "--max-in-flight", "3", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "saved ComfyUI Server block 'cli-gpu-1' (http://gpu-1:8188, with an API key)" in result.output
    assert "sk-cli-saved" not in result.output
    loaded = ComfyUIServer.load("cli-gpu-1")
    assert loaded.api_key.get_secret_value() == "sk-cli-saved" and loaded.max_in_flight == 3

    # a name in use needs --overwrite; a url with credentials is refused, never echoed
    again = runner.invoke(app, ["server", "save", "cli-gpu-1", "--url", "http://gpu-1:8188"])
    assert again.exit_code == 2 and "add --overwrite" in again.output
    bad = runner.invoke(app, ["server", "save", "cli-bad", "--url", "http://u:pw-s3cret@gpu-1:8188"])
    assert bad.exit_code == 2 and "pw-s3cret" not in bad.output and "api_key" in bad.output
    assert bad.output.startswith("--url: ")

    pool = runner.invoke(app, ["pool", "save", "cli-fleet", "cli-gpu-1", "--overwrite"])
    assert pool.exit_code == 0, pool.output
    assert ComfyUIServerPool.load("cli-fleet").servers == ["cli-gpu-1"]
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name("cli-fleet", "comfyui-server-pool", include_secrets=False)
    assert "sk-cli-saved" not in document.model_dump_json()
    missing = runner.invoke(app, ["pool", "save", "cli-fleet-2", "cli-gpu-1", "no-such-gpu"])
    assert missing.exit_code == 2 and "'no-such-gpu'" in missing.output
