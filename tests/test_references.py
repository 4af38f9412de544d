"""Big inputs travel by reference: a descriptions file of megabytes starts its flow run (Prefect
refuses parameters over 512 KB) and the flow run's parameters stay small; the flow reads a path or
an fsspec URL itself. Prefect's local API, the stand-in over real sockets, files on disk."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_API_URL

from comfy_pipeline.blocks.server import ComfyUIServer
from comfy_pipeline.flows.cli import PREFECT_PARAMETERS_LIMIT_BYTES
from comfy_pipeline.flows.generate_content import generate_content
from comfy_pipeline.testing.standin import make_png
from tests.conftest import EXAMPLES, ROOT
from tests.test_cli import comfy_pipeline

pytestmark = pytest.mark.usefixtures("prefect_api", "no_leaked_threads")

SMOKE_IMAGE = str(EXAMPLES / "smoke_image.json")
IMG2IMG = str(EXAMPLES / "img2img_smoke.json")


def flow_run_id_in(output: str) -> str:
    """The flow run id in the CLI's ``flow run 'name': <url>`` (or ``(id)``) line."""
    return re.search(r"flow run '[^']*'\S*\s\S*?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",
                     output).group(1)


def parameters_of(flow_run_id: str) -> dict:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(flow_run_id)).parameters


def test_a_3_mb_descriptions_file_starts_its_run_by_reference(comfy, tmp_path):
    # 10 descriptions of 300 KB each: 3 MB, six times what Prefect accepts as parameters
    shots = tmp_path / "shots.txt"
    shots.write_text("".join(f"shot {n} " + "x" * 300_000 + "\n" for n in range(10)))
    out = comfy_pipeline("run", "--server", comfy.url, "--workflow", SMOKE_IMAGE, "--descriptions", str(shots),
                         "--output-dir", str(tmp_path / "out"), "--character", "big")
    assert out.returncode == 0, out.output[-3000:]
    assert len(out.output) < 20_000  # no payload printed
    flow_run_id = flow_run_id_in(out.output)
    parameters = parameters_of(flow_run_id)
    assert parameters["descriptions"] == str(shots)
    assert len(json.dumps(parameters)) < 100_000
    # the workflow travels as its path too, not inlined
    assert parameters["workflow"] == SMOKE_IMAGE
    assert len(list((tmp_path / "out").rglob("*.png"))) == 10


def test_the_flow_reads_a_file_url_and_a_csv_with_relative_images(comfy, tmp_path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "fox.png").write_bytes(make_png(8, 8, (200, 100, 0)))
    table = tmp_path / "shots.csv"
    table.write_text('description,image\n"a red fox, running",refs/fox.png\n')
    state = generate_content(server=ComfyUIServer(url=comfy.url), workflow=IMG2IMG,
                             descriptions=f"file://{table}", output_dir=str(tmp_path / "out"), return_state=True)
    assert state.is_completed(), state.message
    [result] = state.result()
    assert result.description == "a red fox, running"
    assert [u["filename"] for u in comfy.uploads] == ["fox.png"]
    # a reference that cannot be read: one line naming it, nothing sent
    state = generate_content(server=ComfyUIServer(url=comfy.url), workflow=IMG2IMG,
                             descriptions=f"file://{tmp_path}/missing.csv", return_state=True)
    assert state.is_failed() and "missing.csv" in state.message and "cannot be read" in state.message
    assert comfy.requests[("POST", "/prompt")] == 1


def test_descriptions_given_as_flags_beyond_100_kb_go_as_a_written_file(comfy, tmp_path):
    texts = [f"shot {n} " + "y" * 30_000 for n in range(4)]
    args = [a for t in texts for a in ("--description", t)]
    out = comfy_pipeline("run", "--server", comfy.url, "--workflow", SMOKE_IMAGE, *args,
                         "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 0, out.output[-3000:]
    flow_run_id = flow_run_id_in(out.output)
    reference = parameters_of(flow_run_id)["descriptions"]
    assert isinstance(reference, str) and reference.startswith(str(tmp_path / "out" / ".comfy-pipeline"))
    assert [json.loads(line) for line in open(reference)] == texts


def test_parameters_prefect_would_refuse_exit_2_in_one_line(comfy, tmp_path):
    # one argument can hold 128 KB at most (the OS): five of 110 KB are more than Prefect accepts
    params = [a for n in range(5) for a in ("--param", f"p{n}=" + "z" * 110_000)]
    assert 5 * 110_000 > PREFECT_PARAMETERS_LIMIT_BYTES
    out = comfy_pipeline("run", "--server", comfy.url, "--workflow", SMOKE_IMAGE, "--description", "a fox",
                         *params, "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 2 and "Prefect accepts at most 512 KB" in out.output
    assert len(out.output) < 2_000 and comfy.requests[("POST", "/prompt")] == 0


def test_a_run_of_100_000_descriptions_starts(comfy, tmp_path):
    """Issue 11: 100,000 descriptions (6 MB) through the CLI. The flow run starts with the file's
    path as its parameter, reads and plans them all, and its first generations complete; SIGTERM
    then ends it (143) with the files of the finished ones on disk and our prompts removed."""
    comfy.execution_time_s = 0.2
    shots = tmp_path / "shots.txt"
    shots.write_text("".join(f"shot {n}: a red fox running through a field of tall grass\n"
                             for n in range(100_000)))
    assert shots.stat().st_size > 5_000_000
    out_dir = tmp_path / "out"
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    proc = subprocess.Popen(
        [sys.executable, "-m", "comfy_pipeline.flows.cli", "run", "--server", comfy.url, "--workflow", SMOKE_IMAGE,
         "--descriptions", str(shots), "--output-dir", str(out_dir), "--character", "huge"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while len(list(out_dir.rglob("*.png"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list(out_dir.rglob("*.png"))) >= 3, "the run's first generations never completed"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, output[-3000:]
    assert len(output) < 20_000  # no payload printed
    flow_run_id = flow_run_id_in(output)
    parameters = parameters_of(flow_run_id)
    assert parameters["descriptions"] == str(shots) and len(json.dumps(parameters)) < 100_000
    files = len(list(out_dir.rglob("*.png")))
    assert files >= 3
    assert comfy.queue_snapshot()["queue_pending"] == []  # what was queued was removed
    # the report was written before the exit, and stays small: the CSV has every row
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
    artifacts = {a.key: a for a in found}
    summary = artifacts["huge-image-summary"].data
    assert "**The run was stopped: terminated" in summary, summary[:2000]
    # the generations still waiting in the flow were never sent: not run, not "cancelled" on the server
    assert re.search(r"; (9\d,\d{3}) generation\(s\) were never sent \(not run\)\.", summary), summary[:2000]
    table = artifacts["huge-image-generations"]
    assert "of 100,000 image generations for huge: 500 of the" in table.description
    assert len(json.dumps(table.data)) < 400_000
    (csv_file,) = (out_dir / "reports").iterdir()
    assert sum(1 for _ in csv_file.open()) == 100_001
