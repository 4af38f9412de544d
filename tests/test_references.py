"""Big inputs travel by reference: a descriptions file of megabytes starts its flow run (Prefect
refuses parameters over 512 KB) and the flow run's parameters stay small; the flow reads a path or
an fsspec URL itself. Prefect's local API, the stand-in over real sockets, files on disk."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from prefect.client.orchestration import get_client

from comfy_pipeline.blocks.server import ComfyUIServer
from comfy_pipeline.flows.cli import PREFECT_PARAMETERS_LIMIT_BYTES
from comfy_pipeline.flows.generate_content import generate_content
from comfy_pipeline.testing.standin import make_png
from tests.conftest import EXAMPLES
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
