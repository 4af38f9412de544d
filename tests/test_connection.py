"""The live connection against the stand-in server over real sockets (no Prefect)."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from comfy_pipeline.blocks.errors import (
    AuthenticationFailed,
    ConnectionLost,
    GenerationCancelled,
    ExecutionInterrupted,
    GenerationTimeout,
    NodeExecutionError,
    PromptValidationError,
    ServerUnreachable,
)
from comfy_pipeline.blocks.server import ComfyUIServer
from tests.standin import StandInComfyUI, free_port

pytestmark = pytest.mark.usefixtures("no_leaked_threads")


def image_prompt(prefix: str, *, batch: int = 1, width: int = 64) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": 64, "batch_size": batch, "color": 255}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def test_one_websocket_serves_many_concurrent_prompts_each_getting_its_own_outputs(comfy):
    comfy.execution_time_s = 0.05
    server = ComfyUIServer(url=comfy.url)
    with server.connect() as conn:
        def one(i: int):
            return conn.run_prompt(image_prompt(f"conc/p{i}", batch=1 + i % 3))

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
    for i, (outcome, refs) in enumerate(results):
        assert len(refs) == 1 + i % 3
        assert all(r.filename.startswith(f"p{i}_") and r.subfolder == "conc" for r in refs)
        assert outcome.execution_s >= 0 and outcome.queued_s >= 0
    assert comfy.ws_opened == 1
    assert comfy.max_in_flight >= 2  # prompts really overlapped on the one socket
    assert comfy.ws_open_now == 0  # closed on exit


def test_client_chosen_prompt_id_is_sent_once_and_used(comfy):
    with ComfyUIServer(url=comfy.url).connect() as conn:
        outcome, refs = conn.run_prompt(image_prompt("ids/x"), prompt_id="11111111-2222-3333-4444-555555555555")
    assert outcome.prompt_id == "11111111-2222-3333-4444-555555555555"
    assert comfy.posts_per_prompt_id["11111111-2222-3333-4444-555555555555"] == 1
    assert refs


def test_download_streams_exact_bytes_and_never_overwrites(comfy, tmp_path):
    from comfy_pipeline.blocks.errors import OutputError
    from comfy_pipeline.tasks.outputs import candidate_paths

    with ComfyUIServer(url=comfy.url).connect() as conn:
        _, refs = conn.run_prompt(image_prompt("dl/img"))
        dest = tmp_path / "sub" / "out.png"
        path, size = conn.download(refs[0], dest)
        assert path == dest and dest.read_bytes() == comfy.files[("output", "dl", refs[0].filename)]
        assert size == dest.stat().st_size
        with pytest.raises(OutputError, match="not overwriting"):
            conn.download(refs[0], dest)
        # with candidate names, the next free one is taken
        path, _ = conn.download(refs[0], candidate_paths(dest.parent, "out.png"))
        assert path.name == "out-2.png"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out-2.png", "out.png"]  # no .part left


def test_two_writers_racing_for_one_name_both_keep_their_file(comfy, tmp_path):
    from comfy_pipeline.tasks.outputs import candidate_paths

    with ComfyUIServer(url=comfy.url).connect() as conn:
        _, refs = conn.run_prompt(image_prompt("race/img", batch=2))
        with ThreadPoolExecutor(2) as pool:
            paths = list(pool.map(lambda ref: conn.download(ref, candidate_paths(tmp_path, "same.png"))[0], refs))
    assert sorted(p.name for p in paths) == ["same-2.png", "same.png"]
    assert {p.read_bytes() for p in paths} == {comfy.files[("output", "race", r.filename)] for r in refs}


def test_a_retry_reuses_its_identical_file_and_never_touches_a_different_one(comfy, tmp_path):
    """``reuse_identical``: a file already at a candidate name with the same bytes (an earlier
    attempt's download of the same output) is the result; a different file is skipped as ever."""
    from comfy_pipeline.tasks.outputs import candidate_paths

    with ComfyUIServer(url=comfy.url).connect() as conn:
        _, refs = conn.run_prompt(image_prompt("re/img"))
        (tmp_path / "out.png").write_bytes(b"another picture")
        first, _ = conn.http.download(refs[0], candidate_paths(tmp_path, "out.png"))
        again, size = conn.http.download(refs[0], candidate_paths(tmp_path, "out.png"), reuse_identical=True)
    assert first.name == again.name == "out-2.png" and size == again.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-2.png", "out.png"]  # nothing written twice
    assert (tmp_path / "out.png").read_bytes() == b"another picture"


def _unwritable(kind: str, tmp_path):
    """A real destination this process cannot write to: ``(dest, the path the error must name)``."""
    if kind == "read-only directory":
        if os.geteuid() == 0:
            pytest.skip("running as root: directory permissions do not bind (the other case still runs)")
        directory = tmp_path / "ro"
        directory.mkdir()
        directory.chmod(0o500)
        return directory / "out.png", directory
    blocker = tmp_path / "a-file"  # works for root too: no directory can be made below a regular file
    blocker.write_text("not a directory")
    return blocker / "sub" / "out.png", blocker / "sub"


@pytest.mark.parametrize("kind", ["read-only directory", "parent is a regular file"])
def test_an_unwritable_destination_is_one_clear_output_error_not_retried(kind, comfy, tmp_path):
    from comfy_pipeline.blocks.errors import DownloadFailed, OutputError

    dest, named = _unwritable(kind, tmp_path)
    try:
        with ComfyUIServer(url=comfy.url).connect() as conn:
            _, refs = conn.run_prompt(image_prompt("ro/img"))
            with pytest.raises(OutputError) as info:
                conn.download(refs[0], dest)
    finally:
        if kind == "read-only directory":
            named.chmod(0o700)
    assert not isinstance(info.value, DownloadFailed)  # permanent: a retry would fail the same way
    assert not isinstance(info.value.__cause__, OutputError) and isinstance(info.value.__cause__, OSError)
    message = str(info.value)
    assert str(named) in message and "output" in message.lower()
    assert comfy.requests[("GET", "/view")] <= 1  # not retried
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".part")]


def test_validation_error_lists_every_node_error(comfy):
    bad = image_prompt("v/x", width=0)
    with ComfyUIServer(url=comfy.url).connect() as conn:
        with pytest.raises(PromptValidationError) as info:
            conn.submit(bad)
    text = str(info.value)
    assert "node 1 (EmptyImage) input 'width'" in text and "smaller than min" in text


def test_unknown_class_type_names_the_class(comfy):
    bad = image_prompt("v/x")
    bad["3"] = {"class_type": "NoSuchNodeType", "inputs": {}}
    with ComfyUIServer(url=comfy.url).connect() as conn:
        with pytest.raises(PromptValidationError, match="NoSuchNodeType"):
            conn.submit(bad)


def test_execution_error_names_node_and_exception(comfy):
    with ComfyUIServer(url=comfy.url).connect() as conn:
        with pytest.raises(NodeExecutionError) as info:
            conn.run_prompt(image_prompt("e/[[fail]]"))
    assert info.value.exception_type == "RuntimeError"
    assert "stand-in failure requested" in str(info.value)


def test_timeout_removes_the_prompt_from_the_server(comfy):
    with ComfyUIServer(url=comfy.url, generation_timeout_s=1.0).connect() as conn:
        started = time.monotonic()
        with pytest.raises(GenerationTimeout) as info:
            conn.run_prompt(image_prompt("t/[[hang]]"))
        assert time.monotonic() - started < 5
        assert info.value.prompt_id in str(info.value)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            snapshot = comfy.queue_snapshot()
            if not snapshot["queue_running"] and not snapshot["queue_pending"]:
                break
            time.sleep(0.05)
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}


def test_interrupt_from_elsewhere_is_reported(comfy):
    import requests

    with ComfyUIServer(url=comfy.url).connect() as conn:
        pid = conn.submit(image_prompt("i/[[hang]]"))
        threading.Timer(0.3, lambda: requests.post(f"{comfy.url}/interrupt", json={"prompt_id": pid})).start()
        with pytest.raises(ExecutionInterrupted):
            conn.wait(pid, timeout_s=10)


def test_server_down_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServerUnreachable) as info:
        ComfyUIServer(url=url, connect_timeout_s=2).connect()
    assert time.monotonic() - started < 5
    assert url in str(info.value)


def test_server_gone_mid_run_fails_the_prompt_with_connection_lost_at_its_deadline():
    standin = StandInComfyUI().start()
    conn = ComfyUIServer(url=standin.url, reconnect_timeout_s=30).connect()
    try:
        pid = conn.submit(image_prompt("d/[[hang]]"))
        threading.Timer(0.3, standin.stop).start()
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match=pid) as info:
            conn.wait(pid, timeout_s=2)
        assert "could not be reconnected" in str(info.value) or "stayed unreachable" in str(info.value)
        assert time.monotonic() - started < 6
        assert conn.stats.disconnects >= 1
    finally:
        conn.close()
        standin.stop()


def test_closing_wakes_waiters_with_generation_cancelled(comfy):
    conn = ComfyUIServer(url=comfy.url).connect()
    try:
        running = conn.submit(image_prompt("w/[[hang]]"))
        queued = conn.submit(image_prompt("w2/[[hang]]"))
        threading.Timer(0.3, conn.close).start()
        with pytest.raises(GenerationCancelled, match="was running this prompt and it was interrupted") as caught:
            conn.wait(running, timeout_s=10)
        assert caught.value.interrupted and caught.value.closed_by_us and caught.value.prompt_id == running
        # the queued prompt's waiter has been woken too: deleted before it ran
        with pytest.raises(GenerationCancelled, match="removed from ComfyUI's queue before it ran") as caught:
            conn.wait(queued, timeout_s=10)
        assert not caught.value.interrupted
        assert conn.interrupted_prompts == {running}
    finally:
        conn.close()
    # close() removed our running prompt from the server
    deadline = time.monotonic() + 3
    while comfy.queue_snapshot()["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}


def test_a_generation_waiting_for_a_slot_when_close_frees_one_never_posts(comfy):
    """Thread A holds the only slot, B waits for it; close() removes A's prompt, which frees the
    slot: B must not POST (a prompt nobody watches would run on the server)."""
    conn = ComfyUIServer(url=comfy.url, max_in_flight=1).connect()
    errors: dict[str, BaseException] = {}

    def run(name: str, prefix: str) -> None:
        try:
            conn.run_prompt(image_prompt(prefix))
        except BaseException as exc:  # collected for the assertions below
            errors[name] = exc

    a = threading.Thread(target=run, args=("a", "slot/a [[hang]]"))
    a.start()
    deadline = time.monotonic() + 5
    while comfy.requests[("POST", "/prompt")] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    b = threading.Thread(target=run, args=("b", "slot/b"))
    b.start()
    time.sleep(0.3)  # B is now waiting for A's slot
    conn.close()
    a.join(10)
    b.join(10)
    assert isinstance(errors.get("a"), GenerationCancelled) and errors["a"].interrupted
    assert isinstance(errors.get("b"), GenerationCancelled) and errors["b"].prompt_id is None
    assert comfy.requests[("POST", "/prompt")] == 1  # B never posted
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}


def test_a_prompt_whose_post_lands_after_close_is_removed_from_the_server(comfy):
    """close() while POST /prompt is on its way: no prompt of ours may run after close()."""
    comfy.delay_prompt_posts(1.0)
    conn = ComfyUIServer(url=comfy.url).connect()
    try:
        threading.Timer(0.3, conn.close).start()
        with pytest.raises(GenerationCancelled) as caught:
            conn.submit(image_prompt("late/[[hang]]"))
        assert caught.value.closed_by_us
    finally:
        conn.close()
    assert comfy.requests[("POST", "/prompt")] == 1
    assert set(comfy.interrupts) | set(comfy.deletes) == set(comfy.posts_per_prompt_id)
    # as in ComfyUI, an interrupted prompt leaves the queue a moment after /interrupt is answered
    deadline = time.monotonic() + 5
    while comfy.queue_snapshot() != {"queue_running": [], "queue_pending": []} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}


def test_api_key_is_sent_on_http_and_websocket_and_never_logged(caplog):
    standin = StandInComfyUI(require_token="s3cret-token").start()
    try:
        caplog.set_level(logging.DEBUG)
        with pytest.raises(AuthenticationFailed):
            ComfyUIServer(url=standin.url).connect()
        server = ComfyUIServer(url=standin.url, api_key="s3cret-token")
        with server.connect() as conn:
            conn.run_prompt(image_prompt("auth/x"))
        assert standin.ws_opened == 1
        assert "s3cret-token" not in caplog.text
        assert "s3cret-token" not in repr(server)
    finally:
        standin.stop()


def test_history_trailing_the_websocket_is_waited_for(comfy):
    comfy.history_delay_s = 0.4
    with ComfyUIServer(url=comfy.url).connect() as conn:
        _, refs = conn.run_prompt(image_prompt("h/late"))
    assert len(refs) == 1


def test_close_is_idempotent_and_ends_the_reader(comfy):
    conn = ComfyUIServer(url=comfy.url).connect()
    [reader] = [t for t in threading.enumerate() if t.name == f"comfyui-reader-{conn.client_id[:8]}"]
    conn.close()
    conn.close()
    assert not reader.is_alive()
    assert comfy.ws_opened == 1
    deadline = time.monotonic() + 2
    while comfy.ws_open_now and time.monotonic() < deadline:
        time.sleep(0.02)
    assert comfy.ws_open_now == 0
    with pytest.raises(ConnectionLost):
        conn.submit(image_prompt("c/x"))


def test_previews_and_progress_are_skipped_without_harm(comfy):
    comfy.progress_steps = 5
    events = []
    with ComfyUIServer(url=comfy.url).connect() as conn:
        outcome, refs = conn.run_prompt(image_prompt("p/x"), on_event=lambda e, t: events.append(e.kind))
        assert conn.stats.binary_frames_skipped >= 1
    assert "progress" in events and refs


def test_time_waiting_in_the_queue_does_not_count_against_the_generation_timeout(comfy):
    comfy.execution_time_s = 0.5
    with ComfyUIServer(url=comfy.url, generation_timeout_s=1.5, max_in_flight=4).connect() as conn:
        # four 0.5 s prompts run one after another: the last waits 1.5 s in ComfyUI's queue
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: conn.run_prompt(image_prompt(f"q/p{i}")), range(4)))
    assert max(outcome.queued_s for outcome, _ in results) >= 1.0
    assert all(refs for _, refs in results)


def test_queue_timeout_removes_the_pending_prompt_and_leaves_others_alone(comfy):
    with ComfyUIServer(url=comfy.url, queue_timeout_s=0.5).connect() as conn:
        blocker = conn.submit(image_prompt("qt/[[hang]]"))
        waiting = conn.submit(image_prompt("qt/next"))
        with pytest.raises(GenerationTimeout) as info:
            conn.wait(waiting)
        assert info.value.in_queue and "queue" in str(info.value)
        snapshot = comfy.queue_snapshot()
        assert [item[1] for item in snapshot["queue_pending"]] == []
        assert [item[1] for item in snapshot["queue_running"]] == [blocker]  # not ours to kill yet
        conn.cancel_prompt(blocker)
        with pytest.raises(ExecutionInterrupted):
            conn.wait(blocker, timeout_s=5)


def test_garbage_and_huge_frames_are_skipped_and_every_prompt_completes(comfy):
    comfy.send_garbage(every_n=2)
    with ComfyUIServer(url=comfy.url).connect() as conn:
        comfy.send_huge_binary(8 * 1024 * 1024)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: conn.run_prompt(image_prompt(f"g/p{i}")), range(4)))
        assert conn.stats.malformed_frames >= 2 and conn.connected and conn.stats.disconnects == 0
    assert all(refs for _, refs in results)


def test_a_flapping_websocket_backs_off_and_deadlines_still_hold(comfy):
    comfy.close_ws_after(0, times=0)  # every socket is cut as soon as it opens
    conn = ComfyUIServer(url=comfy.url, queue_timeout_s=2.0, idle_timeout_s=0.5).connect()
    try:
        pid = conn.submit(image_prompt("flap/[[hang]]"))
        started = time.monotonic()
        with pytest.raises((GenerationTimeout, ConnectionLost)):
            conn.wait(pid, timeout_s=2.0)
        assert time.monotonic() - started < 8
        assert conn.stats.reconnects < 30  # backed off, not hundreds per second
    finally:
        conn.close()


def test_close_while_reconnecting_leaves_no_socket_open(comfy):
    conn = ComfyUIServer(url=comfy.url).connect()
    comfy.request_latency_s = 1.5  # the reconnect handshake will be slow
    comfy.close_ws_after(0, times=1)
    time.sleep(0.5)  # the reader is now inside the slow handshake
    conn.close()
    deadline = time.monotonic() + 5
    while comfy.ws_open_now and time.monotonic() < deadline:
        time.sleep(0.05)
    assert comfy.ws_open_now == 0
    assert not conn.usable and not conn.transport.alive


def test_prompts_in_flight_never_exceed_max_in_flight(comfy):
    comfy.execution_time_s = 0.1
    with ComfyUIServer(url=comfy.url, max_in_flight=2).connect() as conn:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: conn.run_prompt(image_prompt(f"cap/p{i}")), range(8)))
    assert all(refs for _, refs in results)
    assert comfy.max_in_flight == 2  # one running, one queued: never more
