"""The reliability matrix: the real flow (8 generations) against the stand-in with one fault each.

Whatever the fault, afterwards: every generation either completed with the right files or
failed with a named reason; no prompt_id was POSTed twice and none executed twice; the
stand-in's queue holds none of our prompts; the WebSocket is closed; no reader thread is
alive; no partial file exists. Nothing hangs (per-test timeout).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.flow_engine import run_flow
from prefect.states import Scheduled

from comfy_pipeline.blocks.server import ComfyUIServer
from comfy_pipeline.flows.generate_content import generate_content
from tests.conftest import EXAMPLES

pytestmark = [pytest.mark.usefixtures("prefect_api", "no_leaked_threads"), pytest.mark.timeout(90)]

# The description goes verbatim into a STRING input here, so the stand-in's markers work.
WORKFLOW = str(EXAMPLES / "sd15_txt2img.json")
DESCRIPTIONS = ["a red fox", "a blue bird", "a green frog", "a gold fish"]
SERVER = dict(connect_timeout_s=2, generation_timeout_s=5, queue_timeout_s=30,
              idle_timeout_s=0.5, reconnect_timeout_s=10)


def run(comfy, tmp_path, descriptions=DESCRIPTIONS, *, server=None, retries=2, flow=generate_content, **kw):
    return flow(
        server=ComfyUIServer(url=comfy.url, **{**SERVER, **(server or {})}),
        workflow=WORKFLOW,
        descriptions=descriptions,
        variants=kw.pop("variants", 2),
        character="rel",
        output_dir=str(tmp_path / "out"),
        retries=retries,
        retry_delay_s=0.05,
        return_state=True,
        **kw,
    )


def table_of(state) -> list[dict]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    tables = sorted((a for a in found if a.type == "table"), key=lambda a: a.created)
    data = tables[-1].data
    return json.loads(data) if isinstance(data, str) else data


def summary_of(state) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return sorted((a for a in found if a.key.endswith("-summary")), key=lambda a: a.created)[-1].data


def index_of(row: dict) -> int:
    """The 0-based index of a table row's description (the table numbers them from 1: ``"2: b"``)."""
    return int(row["description"].split(":", 1)[0]) - 1


def check_invariants(state, comfy, tmp_path, *, failed: dict[int, str] | None = None, queue_check=True):
    """``failed``: {index: error type prefix} of descriptions expected to fail (all variants)."""
    failed = failed or {}
    rows = table_of(state)
    assert len(rows) == 8
    for row in rows:
        if index_of(row) in failed:
            assert row["status"] == "failed", row
            assert row["error"].startswith(failed[index_of(row)]), row["error"]
            continue
        assert row["status"] in ("completed", "cached"), row
        for path in row["files"].split(", "):
            data = Path(path).read_bytes()
            assert row["prompt_id"].encode() in data  # the file came from this generation's prompt
            assert data in comfy.files.values()
    assert state.is_completed() == (not failed)
    # exactly-once: no prompt_id posted twice, none executed twice
    assert set(comfy.posts_per_prompt_id.values()) <= {1}
    assert set(comfy.executions_per_prompt_id.values()) <= {1}
    if queue_check:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and comfy.queue_snapshot() != {"queue_running": [], "queue_pending": []}:
            time.sleep(0.05)
        assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}
    deadline = time.monotonic() + 5
    while comfy.ws_open_now and time.monotonic() < deadline:
        time.sleep(0.05)
    assert comfy.ws_open_now == 0
    assert not list((tmp_path / "out").rglob("*.part"))
    return rows


def _later(seconds, fn, *args):
    timer = threading.Timer(seconds, fn, args)
    timer.daemon = True
    timer.start()
    return timer


def _posts(comfy) -> int:
    return comfy.requests[("POST", "/prompt")]


def _after_posts(comfy, n: int, fn, *args) -> threading.Thread:
    """Call ``fn(*args)`` in a thread as soon as the stand-in has received ``n`` prompts (the run
    is under way, whatever its start-up took)."""
    def wait_then_call():
        deadline = time.monotonic() + 30
        while _posts(comfy) < n and time.monotonic() < deadline:
            time.sleep(0.002)
        fn(*args)

    thread = threading.Thread(target=wait_then_call, daemon=True)
    thread.start()
    return thread


# name: (inject the fault, evidence that it really happened and was handled as designed)
FAULTS = {
    "websocket closed once": (
        lambda c: c.close_ws_after(12, times=1),
        lambda c, summary: "| reconnects | 0 |" not in summary and _posts(c) == 8),
    "websocket closed repeatedly": (
        lambda c: c.close_ws_after(15, times=0),
        lambda c, summary: "| reconnects | 0 |" not in summary and "| reconnects | 1 |" not in summary),
    "server restarts mid-run": (
        lambda c: _after_posts(c, 2, c.restart, 1.0),
        # prompts lost with the server's memory were submitted again under new prompt_ids
        lambda c, summary: "| reconnects | 0 |" not in summary and _posts(c) > 8),
    "POST /prompt answers 500 three times": (
        lambda c: c.fail_prompt_posts(3, status=500),
        lambda c, summary: _posts(c) == 8 + 3),
    "POST accepted but the answer is lost": (
        lambda c: c.drop_prompt_posts(2),
        lambda c, summary: _posts(c) == 8),  # found on the server, not posted again
    "truncated /view": (
        lambda c: c.truncate_views(3),
        lambda c, summary: c.requests[("GET", "/view")] == 8 + 3),
    "/view answers 503 twice": (  # retried by urllib3, with backoff
        lambda c: c.fail_views(2, status=503),
        lambda c, summary: c.requests[("GET", "/view")] == 8 + 2),
    "/view fails every attempt once: the generation is retried, not re-run": (
        lambda c: c.fail_views(4, status=502),  # the GET and urllib3's 3 retries
        # the task's retry follows its finished prompt (no second POST) and fetches the file
        lambda c, summary: c.requests[("GET", "/view")] == 8 + 4 and _posts(c) == 8),
    "slow /view": (
        lambda c: c.delay_views(0.2),
        lambda c, summary: c.requests[("GET", "/view")] == 8),
    "malformed and huge frames": (
        lambda c: (c.send_garbage(every_n=2), _later(0.5, c.send_huge_binary, 4 << 20)),
        lambda c, summary: _posts(c) == 8 and "| reconnects | 0 |" in summary),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_transient_fault_every_generation_completes_exactly_once(fault, comfy, tmp_path):
    inject, evidence = FAULTS[fault]
    comfy.execution_time_s = 0.25
    comfy.progress_steps = 2
    inject(comfy)
    state = run(comfy, tmp_path)
    check_invariants(state, comfy, tmp_path)
    assert evidence(comfy, summary_of(state))


def test_ctrl_c_during_a_retry_delay_ends_the_run_at_once(comfy, tmp_path):
    """A generation waiting to be retried must not hold a cancelled run for the retry delay."""
    import os
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from tests.conftest import ROOT

    comfy.fail_prompt_posts(1000, status=503)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    proc = subprocess.Popen(
        [sys.executable, "-m", "comfy_pipeline.flows.cli", "run", "--server", comfy.url, "--workflow", WORKFLOW,
         "--description", "a", "--description", "b", "--retries", "3", "--retry-delay", "120",
         "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and comfy.requests[("POST", "/prompt")] < 2:
            time.sleep(0.1)
        assert comfy.requests[("POST", "/prompt")] >= 2, "the run never submitted its prompts"
        time.sleep(1.0)  # both generations are now waiting out their first retry delay (60-180 s)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=45)  # far less than the delay it was waiting out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-3000:]
    assert comfy.requests[("POST", "/prompt")] == 2  # no retry was sent after the interrupt


def test_connection_warnings_and_failures_reach_the_flow_runs_logs_in_one_line_each(comfy, tmp_path):
    """What a person reads in the UI's flow run logs: the reconnect (logged by the WebSocket's
    reader thread), and each failed generation as one line without a traceback."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    comfy.execution_time_s = 0.2
    comfy.close_ws_after(6, times=1)
    state = run(comfy, tmp_path, ["ok", "broken [[fail]]", "fine", "also fine"])
    assert state.message == "2 of 8 generations failed"
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    shown = [log for log in logs if log.level >= 20]  # the UI's default level: INFO and above
    text = "\n".join(log.message for log in shown)
    assert f"WebSocket to {comfy.url} dropped" in text and f"WebSocket to {comfy.url} reconnected" in text
    failures = [log.message for log in shown if log.level >= 40]
    assert len(failures) == 2, failures  # one line per failed generation, no engine duplicate
    rows = {(r["description"], r["variant"]): r for r in table_of(state)}
    for variant in (1, 2):  # the logs and the table both number from 1
        line = next(m for m in failures if f"variant {variant}/2" in m)
        assert "description 2/4" in line and "'broken [[fail]]'" in line and "NodeExecutionError" in line
        assert rows[("2: broken [[fail]]", variant)]["prompt_id"] in line
    assert "Traceback" not in text


def test_a_restart_longer_than_the_retry_delays_fails_no_generation(comfy, tmp_path):
    """While the server is down (the WebSocket reconnecting), generations wait for it instead of
    POSTing into it and spending their retries within a fraction of a second."""
    comfy.execution_time_s = 0.05  # short prompts: slots come free while the server is down
    restarter = _after_posts(comfy, 4, comfy.restart, 2.0)  # down far longer than retries x retry_delay_s
    state = run(comfy, tmp_path, ["a", "b", "c", "d"], retries=1, variants=4)
    restarter.join(5)
    rows = table_of(state)
    assert [r for r in rows if r["status"] not in ("completed", "cached")] == []
    assert "| reconnects | 0 |" not in summary_of(state)


def test_a_server_down_three_times_longer_than_reconnect_timeout_is_used_again_when_back(comfy, tmp_path):
    """Issue 8 item 4: a restart longer than reconnect_timeout_s no longer marks the connection dead
    for good; it keeps reconnecting with backoff, and the generations (retried) run once it is back."""
    comfy.execution_time_s = 0.2
    restarter = _after_posts(comfy, 2, comfy.restart, 6.0)  # 3 x reconnect_timeout_s
    state = run(comfy, tmp_path, ["a", "b"], retries=3, variants=2, server={"reconnect_timeout_s": 2})
    restarter.join(5)
    rows = table_of(state)
    assert state.is_completed(), state.message
    assert [r for r in rows if r["status"] != "completed"] == []
    assert set(comfy.posts_per_prompt_id.values()) == {1}
    summary = summary_of(state)
    assert "## Servers lost during the run" in summary and f"- {comfy.url} down at " in summary
    assert re.search(r"back at \d\d:\d\d:\d\d UTC after [6-9]\.\d s", summary), summary
    assert comfy.ws_open_now == 0


def test_a_download_cut_off_by_a_restart_is_fetched_again_not_run_again(comfy, tmp_path):
    """Found by bench/soak.py: the prompt succeeded, its download kept failing, then the server
    restarted (history gone, files kept). Handing that to a task retry ran the prompt again (it
    found no earlier prompt in history); the download is now tried again with the same file."""
    comfy.execution_time_s = 0.05
    comfy.fail_views(4, status=503)  # the first download fails for good: DownloadFailed

    def restart_after_the_first_view():
        deadline = time.monotonic() + 30
        while not comfy.requests[("GET", "/view")] and time.monotonic() < deadline:
            time.sleep(0.005)
        comfy.restart(1.0)

    restarter = threading.Thread(target=restart_after_the_first_view, daemon=True)
    restarter.start()
    state = run(comfy, tmp_path, ["a fox"], variants=1, retries=2)
    restarter.join(10)
    assert state.is_completed(), state.message
    assert sum(comfy.executions_per_prompt_id.values()) == 1 and _posts(comfy) == 1
    (result,) = state.result()
    (file,) = result.files
    assert Path(file.path).read_bytes() == comfy.files[("output", file.subfolder, file.server_filename)]


def test_long_silent_node_is_waited_for_by_asking_the_server(comfy, tmp_path):
    comfy.execution_time_s = 0.05
    state = run(comfy, tmp_path, ["quiet [[silent=2]]", "b", "c", "d"])
    check_invariants(state, comfy, tmp_path)


def test_node_errors_fail_at_once_and_are_not_retried(comfy, tmp_path):
    comfy.execution_time_s = 0.05
    state = run(comfy, tmp_path, ["ok", "broken [[fail]]", "fine", "also fine"])
    check_invariants(state, comfy, tmp_path, failed={1: "NodeExecutionError"})
    assert state.message == "2 of 8 generations failed"
    assert comfy.requests[("POST", "/prompt")] == 8  # no retry of a permanent failure


def test_a_stall_past_the_deadline_is_retried_then_fails_and_leaves_the_queue_clean(comfy, tmp_path):
    comfy.execution_time_s = 0.05
    state = run(comfy, tmp_path, ["ok", "stuck [[hang]]", "fine", "also fine"],
                server={"generation_timeout_s": 1.0}, retries=1)
    check_invariants(state, comfy, tmp_path, failed={1: "GenerationTimeout"})
    assert comfy.requests[("POST", "/prompt")] == 8 + 2  # each stalled generation tried twice


def test_a_timeout_retry_never_follows_the_prompt_it_interrupted(comfy, tmp_path):
    """ComfyUI keeps an interrupted prompt running until its node reaches an interruptible point
    (here: nodes without progress steps). The retry must post anew, not re-attach to it and then
    fail with execution_interrupted."""
    comfy.execution_time_s, comfy.progress_steps = 3.0, 0
    state = run(comfy, tmp_path, ["slow"], variants=1, server={"generation_timeout_s": 0.5}, retries=1)
    [row] = table_of(state)
    assert row["status"] == "failed" and row["error"].startswith("GenerationTimeout"), row["error"]
    assert comfy.requests[("POST", "/prompt")] == 2  # the retry posted its own prompt
    assert set(comfy.posts_per_prompt_id.values()) == {1}
    deadline = time.monotonic() + 10
    while comfy.queue_snapshot() != {"queue_running": [], "queue_pending": []} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}


def test_server_gone_for_good_fails_the_rest_with_a_named_reason(comfy, tmp_path):
    comfy.execution_time_s = 0.3

    def stop_after_the_first_success():
        deadline = time.monotonic() + 30
        while not comfy.requests[("GET", "/view")] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # that download is done: one generation completed, the others are lost
        comfy.stop()

    threading.Thread(target=stop_after_the_first_success, daemon=True).start()
    state = run(comfy, tmp_path, server={"reconnect_timeout_s": 2}, retries=1)
    rows = table_of(state)
    assert state.is_failed()
    done = [r for r in rows if r["status"] == "completed"]
    lost = [r for r in rows if r["status"] == "failed"]
    assert done and lost
    assert all(r["error"].split(":")[0] in ("ConnectionLost", "ServerUnreachable") for r in lost)
    assert all(Path(p).is_file() for r in done for p in r["files"].split(", "))
    assert set(comfy.posts_per_prompt_id.values()) <= {1}


def test_flow_run_retry_redoes_only_the_failed_generations(comfy, tmp_path):
    """As the Prefect UI's Retry / ``prefect flow-run retry`` do: the same flow run runs again."""
    comfy.execution_time_s = 0.05
    descriptions = ["one", "two [[flaky]] a", "three", "four [[flaky]] b", "five", "six", "seven [[flaky]] c",
                    "eight"]
    params = dict(server=ComfyUIServer(url=comfy.url, **SERVER), workflow=WORKFLOW, descriptions=descriptions,
                  character="rel", output_dir=str(tmp_path / "out"), retries=0)
    first = generate_content(**params, return_state=True)
    assert first.is_failed() and first.message == "3 of 8 generations failed"
    assert comfy.requests[("POST", "/prompt")] == 8
    rows = {index_of(r): r for r in table_of(first)}
    deleted = Path(rows[0]["files"])
    deleted.unlink()  # a completed generation whose file is gone runs again

    flow_run_id = first.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(message="retry"), force=True)
        flow_run = client.read_flow_run(flow_run_id)
    second = run_flow(generate_content, flow_run=flow_run, parameters=params, return_type="state")

    assert second.is_completed(), second.message
    assert comfy.requests[("POST", "/prompt")] == 8 + 3  # only the three failed ones were sent again
    assert set(comfy.posts_per_prompt_id.values()) == {1}
    assert deleted.is_file()  # fetched again (from the earlier prompt's outputs, not re-generated)
    statuses = Counter(r["status"] for r in table_of(second))
    # the 3 failures and the generation whose file was deleted ran again; 4 came back as they were
    assert statuses["reused"] == 4 and statuses["completed"] + statuses["cached"] == 4, statuses
    assert len(list((tmp_path / "out").rglob("*.png"))) == 8


def test_prefect_flow_run_retry_reports_this_attempt_apart_from_reused_generations(comfy, tmp_path):
    """``prefect flow-run retry`` (the CLI, against the same Prefect API) of a run where 1 of 4
    generations failed: the summary says 1 completed + 3 reused, with this attempt's figures."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

    comfy.execution_time_s = 0.3
    params = dict(server=ComfyUIServer(url=comfy.url, **SERVER), workflow=WORKFLOW,
                  descriptions=["one", "two [[flaky]] a"], variants=2, seed_mode="increment",
                  character="retry", output_dir=str(tmp_path / "out"), retries=0)
    first = generate_content(**params, return_state=True)
    assert first.is_failed() and first.message == "1 of 4 generations failed", first.message
    assert comfy.requests[("POST", "/prompt")] == 4

    # the same Prefect API and the same result storage, as on the machine of the first attempt
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(),
               PREFECT_LOCAL_STORAGE_PATH=str(PREFECT_LOCAL_STORAGE_PATH.value()))
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "retry", str(first.state_details.flow_run_id),
         "--entrypoint", "comfy_pipeline.flows.generate_content.generate_content"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert comfy.requests[("POST", "/prompt")] == 5  # only the failed generation was sent again
    assert len(list((tmp_path / "out").rglob("*.png"))) == 4  # the reused files were not fetched again

    statuses = Counter(r["status"] for r in table_of(first))
    assert statuses == {"completed": 1, "reused": 3}, statuses
    summary = summary_of(first)
    assert "**4 of 4 generations succeeded** (1 in this attempt, 3 reused from an earlier attempt)" in summary
    assert "| completed (this attempt) | 1 |" in summary and "| reused from an earlier attempt | 3 |" in summary
    assert "| attempt of this flow run | 2 |" in summary
    # throughput and busy time from this attempt's one generation, not the reused three
    wall = float(re.search(r"\| wall time \(this attempt\) \| ([\d.]+) s", summary).group(1))
    per_minute = float(re.search(r"\| generations per minute \(this attempt\) \| ([\d.]+)", summary).group(1))
    assert 60.0 / (wall + 0.05) - 0.1 <= per_minute <= 60.0 / max(wall - 0.05, 0.01) + 0.1  # 1 generation, not 4
    busy = float(re.search(r"\| " + re.escape(comfy.url) + r" \| 1 \| ([\d.]+) \|", summary).group(1))
    assert busy < 3 * comfy.execution_time_s


def test_in_process_flow_retries_rerun_only_the_failures(comfy, tmp_path):
    comfy.execution_time_s = 0.05
    descriptions = ["one", "two [[flaky]] x", "three", "four"]
    flow = generate_content.with_options(retries=1, retry_delay_seconds=0)
    state = run(comfy, tmp_path, descriptions, retries=0, flow=flow)
    assert state.is_completed(), state.message
    # the flaky text fails only the first time it runs: one of its two variants, retried once
    assert comfy.requests[("POST", "/prompt")] == 8 + 1


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupting_the_process_removes_our_prompts_from_the_server(signal_name, comfy, tmp_path):
    """Ctrl-C on the CLI, or a worker killing the flow run's process on cancellation."""
    import os
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from tests.conftest import ROOT

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    proc = subprocess.Popen(
        [sys.executable, "-m", "comfy_pipeline.flows.cli", "run", "--server", comfy.url, "--workflow", WORKFLOW,
         "--description", "long [[hang]]", "--description", "queued behind [[hang]]", "--output-dir",
         str(tmp_path / "out")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(comfy.posts_per_prompt_id) < 2:
            time.sleep(0.1)
        assert len(comfy.posts_per_prompt_id) == 2, "the run never submitted its prompts"
        ours = set(comfy.posts_per_prompt_id)
        proc.send_signal(getattr(signal, signal_name))
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (130 if signal_name == "SIGINT" else proc.returncode) and proc.returncode != 0
    deadline = time.monotonic() + 5  # as in ComfyUI, an interrupt stops the running prompt a moment later
    while comfy.queue_snapshot()["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}, output[-2000:]
    assert None not in comfy.interrupts  # never a global /interrupt
    assert set(comfy.interrupts) | set(comfy.deletes) == ours, output[-3000:]  # running one interrupted, other deleted
    assert comfy.ws_open_now == 0
    # the report says the run was stopped, and which generation was interrupted or never ran
    from prefect.client.schemas.filters import ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["character-image-summary", "character-image-generations"])))
    latest = {a.key: a for a in sorted(found, key=lambda a: a.created)}
    summary = latest["character-image-summary"].data
    assert "**The run was stopped:" in summary and "1 interrupted while running, 1 cancelled" in summary, summary
    table = latest["character-image-generations"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert sorted(r["status"] for r in rows) == ["cancelled", "interrupted"], rows
