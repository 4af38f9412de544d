"""Attempts of one generation over the real flow and the stand-in: every POST /prompt carries a
prompt_id never posted before for that generation, a retry finds an earlier attempt's prompt
whatever ``settings.retries`` says, and a retry that follows a finished prompt keeps the files an
earlier attempt already wrote instead of writing them again under ``-2`` names."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from prefect import flow

from comfy_pipeline.blocks.pool import ConnectionPool
from comfy_pipeline.blocks.server import ComfyUIServer
from comfy_pipeline.blocks.workflow import ComfyUIWorkflow
from comfy_pipeline.flows.generate_content import generate_content
from comfy_pipeline.tasks.generate import generate
from comfy_pipeline.tasks.models import GenerationSettings, GenerationSpec
from tests.conftest import EXAMPLES

pytestmark = [pytest.mark.usefixtures("prefect_api", "no_leaked_threads"), pytest.mark.timeout(90)]

# The description goes verbatim into a STRING input here, so the stand-in's markers work.
WORKFLOW = str(EXAMPLES / "sd15_txt2img.json")
SERVER = dict(connect_timeout_s=2, generation_timeout_s=10, queue_timeout_s=30,
              idle_timeout_s=0.5, reconnect_timeout_s=10)


def _in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def _first_new_png(directory: Path, *, besides: tuple[Path, ...] = (), within_s: float = 30) -> Path:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = [p for p in directory.rglob("*.png") if p not in besides]
        if found:
            return found[0]
        time.sleep(0.002)
    raise AssertionError(f"no file appeared in {directory} within {within_s} s")


@pytest.mark.parametrize("server_still_knows_it", [True, False])
def test_a_generation_run_again_for_a_lost_file_never_posts_an_earlier_prompt_id(
        server_still_knows_it, comfy, tmp_path):
    """The flow runs a completed generation again when its file is gone by the end of the run.
    That rerun follows the earlier prompt when the server still has it, and otherwise posts a
    prompt_id of its own: never the first attempt's id again."""
    out = tmp_path / "out"
    deleted: list[Path] = []

    def delete_the_first_file():  # while the other generation still runs (1 s each, one after the other)
        path = _first_new_png(out)
        path.unlink()
        deleted.append(path)
        if not server_still_knows_it:  # e.g. its history was cleared, or it restarted meanwhile
            requests.post(f"{comfy.url}/history", json={"clear": True}, timeout=5).raise_for_status()

    watcher = _in_thread(delete_the_first_file)
    state = generate_content(
        server=ComfyUIServer(url=comfy.url, **SERVER), workflow=WORKFLOW,
        descriptions=["one [[sleep=1]]", "two [[sleep=1]]"], character="att", output_dir=str(out),
        retries=0, return_state=True)
    watcher.join(5)
    assert state.is_completed(), state.message
    assert deleted and deleted[0].is_file()  # written again, under its planned name
    assert set(comfy.posts_per_prompt_id.values()) == {1}, comfy.posts_per_prompt_id
    rerun = next(r for r in state.result() if Path(r.files[0].path) == deleted[0])
    if server_still_knows_it:
        assert comfy.requests[("POST", "/prompt")] == 2  # followed its finished prompt: no POST
    else:
        assert comfy.requests[("POST", "/prompt")] == 3
        assert rerun.prompt_id in comfy.posts_per_prompt_id
    assert sorted(p.name for p in out.rglob("*.png")) == ["att_d0_0.png", "att_d1_0.png"]


@flow(retries=1, retry_delay_seconds=0)
def _one_generation(url: str, output_dir: str, prompt_id: str, task_retries: int, settings_retries: int):
    """One generation with the task's retries set apart from ``settings.retries``."""
    spec = GenerationSpec(index=0, variant=0, description="a fox", prompt_id=prompt_id, position=1, total=1)
    settings = GenerationSettings(character="att", output_dir=output_dir, descriptions=1,
                                  retries=settings_retries)
    with ConnectionPool.open(ComfyUIServer(url=url, **SERVER)) as pool:
        task = generate.with_options(retries=task_retries, retry_delay_seconds=0)
        return task(pool, ComfyUIWorkflow.from_file(WORKFLOW), spec, settings)


def test_a_flow_retry_finds_the_prompt_of_a_task_retry_that_settings_retries_does_not_count(comfy, tmp_path):
    """Flow attempt 1: the task's first POST answers 500, its retry's prompt succeeds on the server
    but its file cannot be downloaded. Flow attempt 2 must follow that prompt, not run it again,
    although ``settings.retries`` (0) says there was no task retry."""
    comfy.execution_time_s = 0.05
    comfy.fail_prompt_posts(1, status=500)
    comfy.fail_views(4, status=503)  # the first download and urllib3's 3 retries: DownloadFailed
    state = _one_generation(comfy.url, str(tmp_path / "out"), str(uuid.uuid4()), task_retries=1,
                            settings_retries=0, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert comfy.requests[("POST", "/prompt")] == 2  # flow attempt 2 posted nothing
    assert set(comfy.posts_per_prompt_id.values()) == {1}
    assert list(comfy.executions_per_prompt_id) == [result.prompt_id]  # it ran once: the task retry's
    assert result.flow_attempt == 2
    assert Path(result.files[0].path).read_bytes() == comfy.files[("output", result.files[0].subfolder,
                                                                    result.files[0].server_filename)]


TWO_FILES = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "two/x"}},
    "comfy_pipeline": {"bindings": {"prompt": {"path": "2.inputs.filename_prefix", "format": "two/{prompt}"}}},
}


def test_a_retry_that_follows_its_finished_prompt_keeps_the_files_already_written(comfy, tmp_path):
    """Attempt 1 writes the first of two files, then the second download fails, and fails again
    when the task tries it again; the task's retry takes the same finished prompt (remembered by
    the pool: no second POST, no look at /history) and downloads both again. The first is already
    on disk with the same bytes: it is kept, not written again as ``-2``/``-3``. A different file
    at a planned name (someone else's) is never touched."""
    out = tmp_path / "out"
    folder = out / "two"
    folder.mkdir(parents=True)
    foreign = folder / "alice_d0_0_1.png"  # character "Alice" names files alice_... (a slug)
    foreign.write_bytes(b"someone else's picture")
    comfy.delay_views(0.3)  # time to arm the fault below between the two downloads

    def fail_the_second_download():
        _first_new_png(folder, besides=(foreign,))
        comfy.fail_views(8, status=503)  # twice: the download and urllib3's 3 retries of it

    watcher = _in_thread(fail_the_second_download)
    state = generate_content(
        server=ComfyUIServer(url=comfy.url, **SERVER), workflow=ComfyUIWorkflow.from_dict(TWO_FILES),
        descriptions=["pair"], character="Alice", output_dir=str(out), retries=1, retry_delay_s=0,
        return_state=True)
    watcher.join(5)
    assert state.is_completed(), state.message
    (result,) = state.result()
    assert comfy.requests[("POST", "/prompt")] == 1  # the retry followed the finished prompt
    # file 1; file 2 with urllib3's 3 retries, twice (in the task); the task retry: both files
    assert comfy.requests[("GET", "/view")] == 1 + 4 + 4 + 2
    assert sorted(Path(f.path).name for f in result.files) == ["alice_d0_0_1-2.png", "alice_d0_0_2.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["alice_d0_0_1-2.png", "alice_d0_0_1.png",
                                                       "alice_d0_0_2.png"]
    assert foreign.read_bytes() == b"someone else's picture"
    for file in result.files:
        assert Path(file.path).read_bytes() == comfy.files[("output", file.subfolder, file.server_filename)]


def test_attempt_ids_are_all_different_and_each_attempt_looks_for_every_earlier_one():
    from comfy_pipeline.tasks.generate import MAX_RERUNS, attempt_prompt_id, earlier_prompt_ids, flow_attempts_prompt_ids

    base, tries = "base-id", 3
    order = [(r, p, k) for r in (1, 2, 3) for p in range(MAX_RERUNS + 1) for k in range(1, tries + 1)]
    ids = [attempt_prompt_id(base, r, k, p) for r, p, k in order]
    assert ids[0] == base and len(set(ids)) == len(ids)
    assert flow_attempts_prompt_ids(base, 3, tries) == ids
    for n, (r, p, k) in enumerate(order):
        assert earlier_prompt_ids(base, r, k, tries, p) == ids[:n][::-1]  # newest first
    with pytest.raises(ValueError, match="MAX_RERUNS"):
        attempt_prompt_id(base, 1, 1, MAX_RERUNS + 1)
