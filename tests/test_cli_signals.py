"""``comfy-pipeline run`` owns SIGINT and SIGTERM, even with the CPU busy (issue 8, item 8).

With both cores loaded, a Ctrl-C used to reach Prefect while the flow waited in ``as_completed``
and be lost: the generations kept waiting and our prompts kept running on ComfyUI. Here two CPU
hogs spin while the signal is sent to a real ``comfy-pipeline run`` subprocess; it must exit 130
(SIGINT) or 143 (SIGTERM) within 10 s of the signal, with our prompts removed from the server,
no WebSocket left open, and the report saying the run was stopped.

The signal is sent to the process (the kernel picks the thread), and also straight to a thread
other than the main one (Linux ``tgkill``): the main thread, blocked in Prefect's wait, then never
runs Python's handler, which is how the interrupt was lost before.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_API_URL

from tests.conftest import EXAMPLES, ROOT

pytestmark = [pytest.mark.usefixtures("prefect_api", "no_leaked_threads"), pytest.mark.timeout(90)]

# The description goes verbatim into a STRING input here, so the stand-in's markers work.
WORKFLOW = str(EXAMPLES / "sd15_txt2img.json")
#: The bound the issue states: the process is gone this long after the signal, in all cases.
EXIT_WITHIN_S = 10.0
#: The tgkill system call's number (Linux), by machine.
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
HAS_TGKILL = SYS_TGKILL is not None and Path("/proc/self/task").is_dir()


@contextmanager
def cpu_hogs(n: int = 2):
    """``n`` processes spinning ``while True: pass`` (one per core here), killed on exit."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def start_run(comfy, tmp_path) -> subprocess.Popen:
    """``comfy-pipeline run`` with one prompt that runs until interrupted and one queued behind it."""
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    return subprocess.Popen(
        [sys.executable, "-m", "comfy_pipeline.flows.cli", "run", "--server", comfy.url, "--workflow", WORKFLOW,
         "--description", "long [[hang]]", "--description", "queued behind [[hang]]",
         "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for_posts(comfy, proc: subprocess.Popen, n: int, within_s: float = 60) -> set[str]:
    """The prompt ids of the run, once it has POSTed ``n`` of them."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and len(comfy.posts_per_prompt_id) < n and proc.poll() is None:
        time.sleep(0.1)
    assert len(comfy.posts_per_prompt_id) == n, "the run never submitted its prompts"
    return set(comfy.posts_per_prompt_id)


def output_once_ended(proc: subprocess.Popen) -> str:
    """Everything the process printed, once it has exited (killed, and the test failed, if it
    is still running well after the bound)."""
    try:
        output, _ = proc.communicate(timeout=EXIT_WITHIN_S + 20)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"still running {EXIT_WITHIN_S + 20:.0f} s after the signal:\n{output[-3000:]}")
    return output


def tgkill(pid: int, sig: int) -> None:
    """Send ``sig`` to one thread of ``pid`` other than its main thread (one that does not block
    it), as the kernel may do with a signal sent to the whole process."""
    def blocks(tid: str) -> bool:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        return bool(mask & (1 << (sig - 1)))

    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid and not blocks(t)]
    assert tids, "the process has no other thread"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tids[0], sig) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


def deliver(proc: subprocess.Popen, sig: int, to: str) -> None:
    """``to``: ``process`` (the kernel picks the thread) or ``other-thread`` (not the main one)."""
    if to == "process":
        proc.send_signal(sig)
    else:
        tgkill(proc.pid, sig)


def assert_prompts_removed(comfy, ours: set[str], output: str) -> None:
    """Our prompts were deleted or interrupted by id (the requests were made before the exit)
    and are gone from the queue; no WebSocket of ours is open."""
    assert None not in comfy.interrupts  # never a global /interrupt
    assert set(comfy.interrupts) | set(comfy.deletes) == ours, output[-3000:]  # running one interrupted, other deleted
    # As in ComfyUI, an interrupt stops the running prompt a moment after it is answered, and the
    # server notices a closed socket a moment after it closed.
    deadline = time.monotonic() + 5
    while (comfy.queue_snapshot()["queue_running"] or comfy.ws_open_now) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}, output[-2000:]
    assert comfy.ws_open_now == 0


def assert_report_says_stopped(output: str) -> None:
    """The flow run's summary says it was stopped; its table marks each generation."""
    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", output).group(1)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    latest = {a.key: a for a in sorted(found, key=lambda a: a.created)}
    summary = latest["character-image-summary"].data
    assert "**The run was stopped:" in summary and "1 interrupted while running, 1 cancelled" in summary, summary
    table = latest["character-image-generations"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert sorted(r["status"] for r in rows) == ["cancelled", "interrupted"], rows


def run_and_signal(comfy, tmp_path, then: Callable[[subprocess.Popen, set[str]], None]):
    """Start a run, wait for its two prompts, start two CPU hogs and call ``then(proc, ours)``
    (which sends the signal).

    Returns:
        ``(returncode, output, seconds from then() to the exit, our prompt ids)``.
    """
    proc = start_run(comfy, tmp_path)
    try:
        ours = wait_for_posts(comfy, proc, 2)
        with cpu_hogs(2):
            sent = time.monotonic()
            then(proc, ours)
            output = output_once_ended(proc)
            took_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, output, took_s, ours


DELIVERIES = ["process", pytest.param("other-thread", marks=pytest.mark.skipif(not HAS_TGKILL,
                                                                                reason="needs Linux tgkill"))]


@pytest.mark.parametrize("to", DELIVERIES)
@pytest.mark.parametrize(("signal_name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_under_cpu_load_removes_our_prompts_and_exits(signal_name, code, to, comfy, tmp_path):
    sig = getattr(signal, signal_name)
    returncode, output, took_s, ours = run_and_signal(comfy, tmp_path, lambda proc, _: deliver(proc, sig, to))
    assert returncode == code, output[-3000:]
    assert took_s < EXIT_WITHIN_S, output[-3000:]
    assert_prompts_removed(comfy, ours, output)
    assert re.search(r"^(interrupted|terminated \(signal 15\)): 2 prompt\(s\) removed from the server$",
                     output, re.M), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert_report_says_stopped(output)


def test_a_second_ctrl_c_exits_at_once_with_130(comfy, tmp_path):
    def twice(proc, ours):
        proc.send_signal(signal.SIGINT)
        # once the first Ctrl-C removed our prompts, the second ends the process without
        # waiting for the flow to write its report
        deadline = time.monotonic() + EXIT_WITHIN_S
        while (set(comfy.interrupts) | set(comfy.deletes)) != ours and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    returncode, output, took_s, ours = run_and_signal(comfy, tmp_path, twice)
    assert returncode == 130, output[-3000:]
    assert took_s < EXIT_WITHIN_S, output[-3000:]
    assert_prompts_removed(comfy, ours, output)
    assert "Traceback" not in output, output[-3000:]


# A process whose main thread swallows every KeyboardInterrupt: only the watchdog (after its grace
# period) or a second Ctrl-C can end it.
STUBBORN = """
import time
from comfy_pipeline.flows.cli_signals import SignalOwner
with SignalOwner(grace_s=2.0):  # the CLI's is 8 s; shorter here to keep the test fast
    ready = False
    while True:
        try:
            if not ready:
                ready = True
                print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            print("swallowed", flush=True)
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_the_process_ends_even_when_the_interrupt_is_swallowed(presses):
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        sent = time.monotonic()
        for press in range(presses):
            proc.send_signal(signal.SIGINT)
            if press + 1 < presses:
                time.sleep(0.5)
        output = output_once_ended(proc)
        took_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert took_s < EXIT_WITHIN_S, output
    expected = "exiting at once" if presses == 2 else "did not end within"
    assert re.search(rf"^interrupted: 0 prompt\(s\) removed from the server; .*{expected}", output, re.M), output
    assert "Traceback" not in output, output
