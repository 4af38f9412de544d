"""The real flow end to end: Prefect's local API, the stand-in ComfyUI over real sockets, files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

from comfy_pipeline.blocks.errors import ServerUnreachable, WorkflowError
from comfy_pipeline.blocks.server import ComfyUIServer
from comfy_pipeline.blocks.workflow import ComfyUIWorkflow
from comfy_pipeline.flows.generate_content import generate_content
from tests.conftest import EXAMPLES
from tests.standin import free_port

pytestmark = pytest.mark.usefixtures("prefect_api", "no_leaked_threads")

SMOKE_IMAGE = str(EXAMPLES / "smoke_image.json")
SMOKE_VIDEO = str(EXAMPLES / "smoke_video.json")
# The description goes verbatim into CLIPTextEncode text here, so the stand-in's markers work.
SD15 = str(EXAMPLES / "sd15_txt2img.json")


def run(comfy_url: str, tmp_path: Path, descriptions, **kwargs):
    kwargs.setdefault("workflow", SMOKE_IMAGE)
    kwargs.setdefault("character", "Alice")
    server = kwargs.pop("server", None) or ComfyUIServer(url=comfy_url, **kwargs.pop("server_settings", {}))
    return generate_content(
        server=server,
        descriptions=descriptions,
        output_dir=str(tmp_path / "out"),
        return_state=True,
        **kwargs,
    )


def artifacts_of(state) -> dict:
    """The run's artifacts by the last part of their key: generations, summary, gallery, progress."""
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key.rsplit("-", 1)[-1]: a for a in found}


def table_of(state) -> list[dict]:
    data = artifacts_of(state)["generations"].data
    return json.loads(data) if isinstance(data, str) else data


def number(row: dict) -> int:
    """The description number (from 1) of a table row: its description reads ``"2: a blue bird"``."""
    return int(row["description"].split(":", 1)[0])


def logs_of(state) -> str:
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs travel to the API in batches: send what is still queued
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_eight_generations_share_one_websocket_and_land_on_disk(comfy, tmp_path):
    # long enough that all 8 are posted (each takes a slot of the server's global limit first)
    # before the first one ends, also on a loaded machine
    comfy.execution_time_s = 1.0
    comfy.progress_steps = 3
    descriptions = ["a red fox", "a blue bird", "a green frog", "a gold fish"]
    state = run(comfy.url, tmp_path, descriptions, variants=2, server_settings={"max_in_flight": 8})
    assert state.is_completed(), state.message
    results = state.result()
    assert len(results) == 8
    # one WebSocket for the whole run, with all 8 prompts in flight on it at once
    assert comfy.ws_opened == 1 and comfy.ws_open_now == 0
    assert comfy.max_in_flight == 8
    assert comfy.requests[("POST", "/prompt")] == 8
    for result in results:
        (file,) = result.files
        path = Path(file.path)
        assert path.name == f"alice_d{result.index}_{result.variant}.png"
        assert path.parent == tmp_path / "out" / "smoke"
        assert path.read_bytes() == comfy.files[("output", "smoke", file.server_filename)]
        assert file.bytes == path.stat().st_size
        assert result.status == "completed" and result.seed is None  # the smoke workflow binds no seed
        # the description made it into the prompt (filename_prefix binding), as its slug
        assert descriptions[result.index].replace(" ", "-") in file.server_filename
    # no temporary download files remain
    assert not [p for p in (tmp_path / "out").rglob("*.part")]

    table = table_of(state)
    # the columns in the order a reader scans them; descriptions and variants numbered from 1
    assert list(table[0]) == ["status", "description", "variant", "seed", "total_s", "files", "error",
                              "queued_s", "execution_s", "download_s", "server", "prompt_id"]
    assert [(r["description"], r["variant"]) for r in table] == [
        (f"{i + 1}: {d}", v + 1) for i, d in enumerate(descriptions) for v in range(2)]
    assert {r["status"] for r in table} == {"completed"}
    assert all(r["prompt_id"] and r["queued_s"] is not None and r["execution_s"] is not None for r in table)
    assert all(Path(r["files"]).is_absolute() and Path(r["files"]).is_file() for r in table)
    summary = artifacts_of(state)["summary"].data
    assert "8 of 8 generations succeeded" in summary
    assert "| connections opened | 1 |" in summary
    progress = artifacts_of(state)["progress"]
    assert progress.key == "alice-image-progress" and float(progress.data) == 100.0
    logs = logs_of(state)
    assert "description 2/4, variant 1/2" in logs
    assert "%" in logs and "executing node" in logs
    assert "hash" not in logs.lower()  # the connection is left out of the cache key


def test_failures_are_recorded_per_generation_while_the_others_complete(comfy, tmp_path):
    comfy.execution_time_s = 0.05
    descriptions = ["fine one", "broken [[fail]]", "fine two", "stuck [[hang]]", "fine three"]
    state = run(comfy.url, tmp_path, descriptions, server_settings={"generation_timeout_s": 1.0},
                retries=1, retry_delay_s=0, workflow=SD15)
    assert state.is_failed()
    # the stall (transient) was retried once under a new prompt_id; the node error was not retried
    assert comfy.requests[("POST", "/prompt")] == 6
    assert set(comfy.posts_per_prompt_id.values()) == {1}
    assert state.message == "2 of 5 generations failed"
    table = table_of(state)
    by_number = {number(r): r for r in table}
    assert by_number[2]["status"] == "failed" and by_number[2]["error"].startswith("NodeExecutionError:")
    assert by_number[4]["status"] == "failed" and by_number[4]["error"].startswith("GenerationTimeout:")
    assert all(by_number[i]["status"] == "completed" for i in (1, 3, 5))
    assert len(list((tmp_path / "out").rglob("*.png"))) == 3
    summary = artifacts_of(state)["summary"].data
    # the verdict, then the failures (numbered from 1, as in the logs), then the totals and servers
    assert summary.index("3 of 5 generations succeeded") < summary.index("## Failures") < summary.index(
        "## Totals") < summary.index("## Servers")
    assert "- description 2, variant 1 (prompt_id" in summary and "- description 4, variant 1" in summary
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}  # the hung prompt was removed
    assert comfy.ws_opened == 1 and comfy.ws_open_now == 0


def test_validation_failure_of_one_generation_is_reported_with_node_errors(comfy, tmp_path):
    workflow = ComfyUIWorkflow.from_dict(
        {
            "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "v/x"}},
            "comfy_pipeline": {"bindings": {"prompt": "1.inputs.image"}},
        }
    )
    # the description names the image to load, one the server does not have: LoadImage validates an
    # annotated name ("... [output]") itself, so the preflight lets it through and POST /prompt says 400
    # (a value the preflight can see, such as a width of 0, stops the run before: see test_preflight.py)
    state = run(comfy.url, tmp_path, ["missing.png [output]"], workflow=workflow)
    assert state.is_failed() and state.message == "1 of 1 generations failed"
    (row,) = table_of(state)
    # the table has one line of at most 120 characters, the summary the whole message
    assert row["error"].startswith("PromptValidationError:") and "\n" not in row["error"]
    assert len(row["error"]) <= 120
    summary = artifacts_of(state)["summary"].data
    assert "node 1 (LoadImage) input 'image'" in summary


def test_server_down_fails_fast_with_the_url_and_writes_the_report(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    state = run(url, tmp_path, ["x"], server_settings={"connect_timeout_s": 2})
    assert state.is_failed()
    with pytest.raises(ServerUnreachable, match=url):
        state.result()
    summary = artifacts_of(state)["summary"].data
    assert "could not proceed" in summary and url in summary


def test_ui_format_workflow_is_rejected_before_anything_is_sent(comfy, tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [{"id": 1, "type": "EmptyImage"}], "links": [], "version": 0.4}))
    state = run(comfy.url, tmp_path, ["x"], workflow=str(ui))
    assert state.is_failed()
    with pytest.raises(WorkflowError, match=r"Export \(API\)"):
        state.result()
    assert comfy.requests[("POST", "/prompt")] == 0 and comfy.ws_opened == 0


def test_cached_rerun_still_returns_files_without_overwriting(comfy, tmp_path):
    first = run(comfy.url, tmp_path, ["same thing"])
    second = run(comfy.url, tmp_path, ["same thing"])
    assert first.is_completed() and second.is_completed()
    (r1,), (r2,) = first.result(), second.result()
    assert r1.status == "completed" and r2.status == "cached" and r2.cached
    assert r2.files[0].server_filename == r1.files[0].server_filename  # ComfyUI served the old file
    assert Path(r1.files[0].path).name == "alice_d0_0.png"
    assert Path(r2.files[0].path).name == "alice_d0_0-2.png"  # the first file was not overwritten
    assert Path(r1.files[0].path).read_bytes() == Path(r2.files[0].path).read_bytes()
    assert {r["status"] for r in table_of(second)} == {"cached"}


def test_every_output_kind_is_downloaded_with_its_subfolder(comfy, tmp_path):
    workflow = ComfyUIWorkflow.from_dict(
        {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "stills/img"}},
            "3": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim/clip",
                                                             "fps": 6.0, "lossless": False, "quality": 80,
                                                             "method": "default"}},
            "4": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "filename_prefix": "vhs/vid",
                                                             "frame_rate": 8, "format": "video/h264-mp4"}},
            "5": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
            "comfy_pipeline": {"bindings": {"prompt": {"path": "2.inputs.filename_prefix",
                                                       "format": "stills/{prompt}"}}},
        }
    )
    state = run(comfy.url, tmp_path, ["all kinds"], workflow=workflow, kind="video")
    assert state.is_completed(), state.message
    (result,) = state.result()
    got = sorted((Path(f.path).relative_to(tmp_path / "out").parent.as_posix(), f.key, Path(f.path).suffix)
                 for f in result.files)
    assert got == [("anim", "images", ".webp"), ("stills", "images", ".png"), ("stills", "images", ".png"),
                   ("vhs", "gifs", ".mp4")]
    assert all(Path(f.path).read_bytes() == comfy.files[("output", f.subfolder, f.server_filename)]
               for f in result.files)
    assert [f.animated for f in result.files if f.key == "images" and f.path.endswith(".webp")] == [True]
    # several files from one generation get a counter; temp previews are not downloaded by default
    assert len({Path(f.path).name for f in result.files}) == 4


def test_seeds_are_bound_and_recorded(comfy, tmp_path):
    workflow = ComfyUIWorkflow.from_dict(
        {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
                  "_meta": {"title": "Empty"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "s/x"},
                  "_meta": {"title": "Save"}},
            "comfy_pipeline": {"bindings": {
                "seed": "Empty.inputs.color",
                "prompt": {"path": "Save.inputs.filename_prefix", "format": "s/{prompt}_{seed}"}}},
        }
    )
    state = run(comfy.url, tmp_path, ["a", "b"], workflow=workflow, variants=2, seed_mode="increment", base_seed=100)
    assert state.is_completed(), state.message
    seeds = sorted((r.index, r.variant, r.seed) for r in state.result())
    assert seeds == [(0, 0, 100), (0, 1, 101), (1, 0, 102), (1, 1, 103)]
    assert all(f"_{r.seed}_" in r.files[0].server_filename for r in state.result())
    assert sorted(r["seed"] for r in table_of(state)) == [100, 101, 102, 103]


def test_artifact_keys_are_valid_for_any_character_name(comfy, tmp_path):
    state = run(comfy.url, tmp_path, ["x"], character="Zoë the 2nd / ÉLITE")
    assert state.is_completed(), state.message
    assert sorted(a.key for a in artifacts_of(state).values()) == [
        f"zoe-the-2nd-elite-image-{what}" for what in ("gallery", "generations", "progress", "summary")]
    (result,) = state.result()
    assert Path(result.files[0].path).name == "zoe-the-2nd-elite_d0_0.png"


def test_accented_names_become_python_slugify_slugs_in_keys_and_file_names(comfy, tmp_path):
    # its slug's 40th character would be a dash
    state = run(comfy.url, tmp_path, ["the fox in the snow, at dusk! and more an elk at night"], character="Ålice")
    assert state.is_completed(), state.message
    assert {a.key for a in artifacts_of(state).values()} >= {"alice-image-summary", "alice-image-gallery"}
    (result,) = state.result()
    assert Path(result.files[0].path).name == "alice_d0_0.png"
    # the slug bound into filename_prefix (smoke/{character_slug}_d{index}_v{variant}_{slug}):
    # 40 characters at most, never ending in a dash or a space
    slug = result.files[0].server_filename.split("_v0_", 1)[1].rsplit("_", 2)[0]  # ..._00001_.png
    assert slug == "the-fox-in-the-snow-at-dusk-and-more-an"
    assert result.files[0].server_filename.startswith("alice_d0_v0_")


def test_video_smoke_workflow_downloads_an_animated_file(comfy, tmp_path):
    state = run(comfy.url, tmp_path, ["a short clip"], workflow=SMOKE_VIDEO, kind="video")
    assert state.is_completed(), state.message
    (result,) = state.result()
    (file,) = result.files
    assert file.animated and file.path.endswith(".webp")


def test_api_key_reaches_the_server_but_not_the_flow_run_record_or_logs(tmp_path):
    from tests.standin import StandInComfyUI

    standin = StandInComfyUI(require_token="tok-very-secret").start()
    try:
        server = ComfyUIServer(url=standin.url, api_key="tok-very-secret")
        state = run(standin.url, tmp_path, ["x"], server=server)
        assert state.is_completed(), state.message
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(state.state_details.flow_run_id)
        assert flow_run.parameters["server"]["url"] == standin.url
        assert "tok-very-secret" not in json.dumps(flow_run.parameters, default=str)
        assert "tok-very-secret" not in logs_of(state)
        assert all(h.get("Authorization") == "Bearer tok-very-secret" for h in standin.headers_seen)
    finally:
        standin.stop()


def test_a_workflow_that_ignores_the_descriptions_is_refused_before_anything_is_sent(comfy, tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }))
    state = run(comfy.url, tmp_path, ["a fox"], workflow=str(bare))
    assert state.is_failed() and "no binding for 'prompt'" in state.message
    assert comfy.ws_opened == 0 and comfy.requests[("POST", "/prompt")] == 0


@pytest.mark.parametrize("kind", ["read-only directory", "parent is a regular file"])
def test_an_output_dir_that_cannot_be_written_fails_in_one_line_without_retries(kind, comfy, tmp_path):
    import os

    out = tmp_path / "out"
    if kind == "read-only directory":
        if os.geteuid() == 0:
            pytest.skip("running as root: directory permissions do not bind (the other case still runs)")
        out.mkdir()
        out.chmod(0o500)
    else:  # works for root too: no directory can be made below a regular file
        out.write_text("a file where the output directory should be")
    try:
        state = run(comfy.url, tmp_path, ["x"], retries=2, retry_delay_s=0)
    finally:
        if out.is_dir():
            out.chmod(0o700)
    assert state.is_failed() and state.message == "1 of 1 generations failed"
    (row,) = table_of(state)
    assert row["error"].startswith("OutputError:") and len(row["error"]) <= 120, row["error"]
    assert str(out / "smoke") in artifacts_of(state)["summary"].data
    assert comfy.requests[("POST", "/prompt")] == 1  # permanent: not retried
    logs = logs_of(state)
    assert "Traceback" not in logs and "PermissionError" not in logs and "NotADirectoryError" not in logs
