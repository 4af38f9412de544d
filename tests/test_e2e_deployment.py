"""End to end: what a new user does to run the pipeline as Prefect deployments.

The README's "Deployments" section, command for command, against real processes: a
``prefect server start`` on a free port with its own temporary PREFECT_HOME, the commands that
create the work pool, register and save the blocks and deploy ``prefect.yaml``, a
``prefect worker start --pool comfyui`` in an EMPTY folder (the flow is imported from the
installed package), then ``prefect deployment run generate-content/manual`` and
``prefect flow-run cancel``. ComfyUI is the in-process stand-in (tests/standin.py), which
requires the saved API key, so a run that completes proves the worker loaded the block's secret.

Every subprocess gets the same environment (plus a marker variable): at the end their process
groups are killed, then any process still carrying the marker is killed and reported, so nothing
survives the test. Long outputs go to files under the test's temporary folder; a failure prints
their tails. Deselect with ``-m "not e2e"``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.standin import StandInComfyUI

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[1]
MARKER = "COMFY_PIPELINE_E2E_MARKER"
SERVER_START_TIMEOUT_S = 90  # migrations on a fresh SQLite database, 2 slow cores
RUN_TIMEOUT_S = 60
CANCEL_DEADLINE_S = 10
ARTIFACT_PREFIX = "character-image"  # the flow's default character, kind image


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session=True: the group id is the pid
    except (ProcessLookupError, PermissionError):
        pass


def _processes_with(marker_value: str) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose environment carries our marker (Linux /proc)."""
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    needle = f"{MARKER}={marker_value}".encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append((int(entry.name), cmdline.strip()))
    return found


class Stack:
    """The subprocesses of the test, their environment, logs and the API they talk to."""

    def __init__(self, home: Path, logs: Path):
        self.home = home
        self.logs = logs
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.marker = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            # Only a speed-up for the test (the default is 10 s between polls for new runs).
            PREFECT_WORKER_QUERY_SECONDS="1",
            PYTHONUNBUFFERED="1",
            COLUMNS="200",
            # The `prefect`, `python` and `comfy-pipeline` of the environment running the tests.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        )
        env.pop("COMFYUI_API_KEY", None)
        env[MARKER] = self.marker
        self.env = env
        self.background: dict[str, tuple[subprocess.Popen, Path]] = {}
        self._count = 0
        self.commands: list[str] = []

    # -- processes ------------------------------------------------------------------------

    def _log_file(self, name: str) -> Path:
        self._count += 1
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]
        return self.logs / f"{self._count:02d}-{slug}.log"

    def run(self, args: list[str], *, cwd: Path = ROOT, timeout: float = 60,
            extra_env: Optional[dict[str, str]] = None) -> str:
        """Run one command to its end (in its own process group); its output, or fail with it."""
        log = self._log_file(" ".join(args[:3]))
        self.commands.append(" ".join(args))
        env = dict(self.env, **(extra_env or {}))
        with log.open("w", encoding="utf-8") as out:
            proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
                pytest.fail(f"{args} did not end within {timeout} s:\n{_tail(log)}\n{self.diagnostics()}")
            finally:
                _signal_group(proc, signal.SIGKILL)  # anything it left behind in its group
        output = log.read_text(encoding="utf-8", errors="replace")
        if proc.returncode != 0:
            pytest.fail(f"{args} exited {proc.returncode}:\n{_tail(log)}\n{self.diagnostics()}")
        return output

    def start(self, name: str, args: list[str], *, cwd: Path = ROOT) -> subprocess.Popen:
        """Start a long-running command in its own process group, output to a log file."""
        log = self._log_file(name)
        self.commands.append(" ".join(args))
        with log.open("w", encoding="utf-8") as out:
            proc = subprocess.Popen(args, cwd=cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.background[name] = (proc, log)
        return proc

    def log_of(self, name: str) -> Path:
        return self.background[name][1]

    def diagnostics(self) -> str:
        parts = []
        for name, (proc, log) in self.background.items():
            parts.append(f"--- {name} (exit code {proc.poll()}), last lines of {log} ---\n{_tail(log)}")
        return "\n".join(parts)

    def stop_all(self) -> list[tuple[int, str]]:
        """Kill every process group we started, then anything else still carrying our marker.

        Returns the processes that escaped their group and had to be killed by the marker.
        """
        for proc, _ in reversed(list(self.background.values())):  # the worker before the server
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            _signal_group(proc, signal.SIGKILL)  # the leader and whatever stayed in its group
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        escaped = _processes_with(self.marker)
        for pid, _ in escaped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return escaped

    # -- the API --------------------------------------------------------------------------

    def client(self):
        return get_client(sync_client=True)

    def wait_for_health(self) -> None:
        proc, log = self.background["prefect-server"]
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"prefect server start exited {proc.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        pytest.fail(f"the Prefect server was not healthy within {SERVER_START_TIMEOUT_S} s:\n{_tail(log)}")

    def wait_for_state(self, flow_run_id: str, *, final: bool = True, timeout: float = RUN_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                flow_run = client.read_flow_run(uuid.UUID(flow_run_id))
                if flow_run.state is not None and flow_run.state.is_final():
                    return flow_run
                if time.monotonic() > deadline:
                    pytest.fail(f"flow run {flow_run_id} still {flow_run.state!r} after {timeout} s\n"
                                f"{self.diagnostics()}")
                time.sleep(0.5)

    def run_manual(self, parameters: dict[str, Any]) -> str:
        """``prefect deployment run generate-content/manual --params ...``; the flow run id."""
        output = self.run(["prefect", "deployment", "run", "generate-content/manual",
                           "--params", json.dumps(parameters)])
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
        assert match, f"no flow run id in the output of prefect deployment run:\n{output}"
        return match.group(1)

    def logs_of(self, flow_run_id: str) -> list:
        logs: list = []
        with self.client() as client:
            while True:
                page = client.read_logs(
                    LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])),
                    limit=200, offset=len(logs))
                logs += page
                if len(page) < 200:
                    return logs

    def wait_for_log(self, flow_run_id: str, text: str, timeout: float = 15) -> list:
        """The flow run's logs, once one of them contains ``text`` (logs are shipped in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs_of(flow_run_id)
            if any(text in log.message for log in logs) or time.monotonic() > deadline:
                return logs
            time.sleep(0.5)

    def artifacts_of(self, flow_run_id: str) -> list:
        with self.client() as client:
            return client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]))
            )


@pytest.fixture(scope="module")
def comfy_e2e():
    """The stand-in ComfyUI for the whole module; it answers only with the saved API key."""
    with StandInComfyUI() as server:
        yield server


@pytest.fixture(scope="module")
def api_key() -> str:
    return f"sk-e2e-{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, comfy_e2e, api_key):
    """README "Deployments", steps 1 to 3: server, blocks, deployments and a worker."""
    base = tmp_path_factory.mktemp("e2e")
    home, logs, workdir = base / "prefect-home", base / "logs", base / "worker-cwd"
    for folder in (home, logs, workdir):
        folder.mkdir()
    comfy_e2e.require_token = api_key
    stack = Stack(home, logs)
    began = time.monotonic()
    try:
        # 1. A Prefect server of our own.
        stack.start("prefect-server", ["prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(stack.port)])
        stack.wait_for_health()
        server_up = time.monotonic() - began

        # 2. Once per Prefect server, from the repository root (the README's commands).
        stack.run(["prefect", "work-pool", "create", "comfyui", "--type", "process"])
        registered = stack.run(["prefect", "block", "register", "-m", "comfy_pipeline.blocks"])
        for block_type in ("ComfyUI Server", "ComfyUI Server Pool", "ComfyUI Workflow"):
            assert block_type in registered, registered
        stack.run(["comfy-pipeline", "server", "save", "gpu-1", "--url", comfy_e2e.url],
                  extra_env={"COMFYUI_API_KEY": api_key})
        stack.run(["comfy-pipeline", "pool", "save", "fleet", "gpu-1"])
        for name, path in (("smoke-image", "examples/workflows/smoke_image.json"),
                           ("smoke-video", "examples/workflows/smoke_video.json"),
                           ("sd15-txt2img", "examples/workflows/sd15_txt2img.json")):
            stack.run(["comfy-pipeline", "workflow", "save", name, path])
        stack.run(["prefect", "deploy", "--all", "--no-prompt"], timeout=120)
        linked = stack.run(["comfy-pipeline", "link-blocks"])
        assert "generate-content/manual: server=comfyui-server/gpu-1, workflow=comfyui-workflow/smoke-image" in linked

        # 3. The worker, in an empty folder: the flow comes from the installed package.
        stack.start("prefect-worker", ["prefect", "worker", "start", "--pool", "comfyui"], cwd=workdir)
        print(f"\n[e2e] Prefect server healthy after {server_up:.1f} s; "
              f"set up and deployed after {time.monotonic() - began:.1f} s")
        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            yield stack
    finally:
        escaped = stack.stop_all()
        print(f"[e2e] module done after {time.monotonic() - began:.1f} s; logs in {logs}")
        assert not escaped, f"processes outlived their process group and were killed: {escaped}"
        assert not _processes_with(stack.marker), "processes of the test survived SIGKILL"


def _assert_secret_absent(stack: Stack, flow_run_id: str, api_key: str) -> None:
    """The key is nowhere the API shows: blocks (default include_secrets=false), the flow run's
    parameters, its logs and its artifacts; nor in the worker's output."""
    with httpx.Client(base_url=stack.api_url, timeout=10) as http:
        listing = http.post("/block_documents/filter", json={})
        listing.raise_for_status()
        documents = listing.json()
        names = {(d["block_type"]["slug"], d["name"]) for d in documents}
        assert {("comfyui-server", "gpu-1"), ("comfyui-server-pool", "fleet"),
                ("comfyui-workflow", "smoke-image")} <= names, names
        assert api_key not in listing.text
        for document in documents:
            one = http.get(f"/block_documents/{document['id']}")
            one.raise_for_status()
            assert api_key not in one.text, f"block {document['name']} shows the API key"
        pool = next(d for d in documents if d["name"] == "fleet")
        assert pool["data"]["servers"] == ["gpu-1"], pool["data"]  # a name, nothing copied
    with stack.client() as client:
        flow_run = client.read_flow_run(uuid.UUID(flow_run_id))
    assert api_key not in json.dumps(flow_run.parameters, default=str)
    logs = stack.logs_of(flow_run_id)
    assert logs, "the flow run has no logs in the API"
    assert not [log.message for log in logs if api_key in log.message]
    artifacts = stack.artifacts_of(flow_run_id)
    assert not [a.key for a in artifacts if api_key in json.dumps(a.data, default=str)]
    assert api_key not in stack.log_of("prefect-worker").read_text(errors="replace")


def test_manual_deployment_runs_on_a_worker_with_files_report_and_no_secret_shown(
        deployed: Stack, tmp_path, api_key):
    stack = deployed
    output_dir = tmp_path / "output"
    began = time.monotonic()
    flow_run_id = stack.run_manual({"descriptions": ["a red fox", "a blue bird"], "variants": 2,
                                    "output_dir": str(output_dir)})
    flow_run = stack.wait_for_state(flow_run_id)
    print(f"\n[e2e] manual run {flow_run.state.name} {time.monotonic() - began:.1f} s after "
          "`prefect deployment run`")
    assert flow_run.state.is_completed(), f"{flow_run.state!r}\n{stack.diagnostics()}"

    files = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file())
    assert files == [f"smoke/character_d{d}_{v}.png" for d in (0, 1) for v in (0, 1)], files

    artifacts = {a.key: a for a in stack.artifacts_of(flow_run_id)}
    assert artifacts[f"{ARTIFACT_PREFIX}-generations"].type == "table", artifacts.keys()
    assert artifacts[f"{ARTIFACT_PREFIX}-summary"].type == "markdown", artifacts.keys()
    assert "4 of 4" in artifacts[f"{ARTIFACT_PREFIX}-summary"].data

    # The run form's defaults: the saved blocks by id, which the UI shows selected.
    with stack.client() as client:
        deployment = client.read_deployment_by_name("generate-content/manual")
        server = client.read_block_document_by_name("gpu-1", "comfyui-server", include_secrets=False)
        workflow = client.read_block_document_by_name("smoke-image", "comfyui-workflow", include_secrets=False)
    assert deployment.parameters["server"] == {"$ref": {"block_document_id": str(server.id)}}
    assert deployment.parameters["workflow"] == {"$ref": {"block_document_id": str(workflow.id)}}

    logs = stack.wait_for_log(flow_run_id, "Finished in state Completed")
    assert any("Finished in state Completed" in log.message for log in logs), [l.message for l in logs]
    _assert_secret_absent(stack, flow_run_id, api_key)
    worker_output = stack.log_of("prefect-worker").read_text(errors="replace")
    assert "Traceback" not in worker_output, _tail(stack.log_of("prefect-worker"), 120)


def test_a_manual_run_reads_megabytes_of_descriptions_by_file_reference(deployed: Stack, tmp_path):
    """Descriptions Prefect could not take as a parameter (over 512 KB) reach the worker as a
    ``file://`` reference, which the flow reads there; the flow run's parameters stay small."""
    stack = deployed
    shots = tmp_path / "shots.jsonl"
    shots.write_text("".join(json.dumps(f"shot {n} " + "x" * 300_000) + "\n" for n in range(5)))
    assert shots.stat().st_size > 512 * 1024
    output_dir = tmp_path / "output"
    flow_run_id = stack.run_manual({"descriptions": f"file://{shots}", "output_dir": str(output_dir)})
    flow_run = stack.wait_for_state(flow_run_id)
    assert flow_run.state.is_completed(), f"{flow_run.state!r}\n{stack.diagnostics()}"
    assert len(json.dumps(flow_run.parameters)) < 100_000
    assert len(list(output_dir.rglob("*.png"))) == 5


def test_cancelling_a_manual_run_removes_its_prompts_and_says_so(
        deployed: Stack, comfy_e2e: StandInComfyUI, tmp_path, api_key):
    stack, comfy = deployed, comfy_e2e
    # Slow generations: 6 of them at 4 s each, at most 2 in flight (the server block's default).
    # long prompts (interruptible every 0.5 s): on a loaded machine `prefect flow-run cancel` may
    # take several seconds to start, and the first prompt must still be running when it lands
    comfy.execution_time_s, comfy.progress_steps = 12.0, 24
    comfy.reset_counters()
    try:
        flow_run_id = stack.run_manual({"descriptions": ["slow one", "slow two", "slow three"],
                                        "variants": 2, "output_dir": str(tmp_path / "output")})
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not comfy.queue_snapshot()["queue_running"]:
            assert time.monotonic() < deadline, f"no prompt ran on the stand-in\n{stack.diagnostics()}"
            time.sleep(0.1)
        ours = {item[1] for key in ("queue_running", "queue_pending")
                for item in comfy.queue_snapshot()[key]}

        asked = time.monotonic()
        stack.run(["prefect", "flow-run", "cancel", flow_run_id])
        while True:
            queue = comfy.queue_snapshot()
            left = [item[1] for key in ("queue_running", "queue_pending") for item in queue[key]]
            if not left:
                break
            assert time.monotonic() - asked < CANCEL_DEADLINE_S, (
                f"{len(left)} prompt(s) still queued or running on ComfyUI {CANCEL_DEADLINE_S} s after "
                f"`prefect flow-run cancel`: {left}\n{stack.diagnostics()}")
            time.sleep(0.1)
        emptied = time.monotonic() - asked
        print(f"\n[e2e] ComfyUI's queue empty {emptied:.1f} s after `prefect flow-run cancel` "
              f"(prompts seen in flight: {len(ours)})")

        flow_run = stack.wait_for_state(flow_run_id, timeout=45)
        assert flow_run.state.is_cancelled(), f"{flow_run.state!r}\n{stack.diagnostics()}"
        started = sum(comfy.executions_per_prompt_id.values())
        assert started < 6, f"all {started} generations ran although the run was cancelled"
        assert not comfy.queue_snapshot()["queue_pending"] and not comfy.queue_snapshot()["queue_running"]

        _assert_secret_absent(stack, flow_run_id, api_key)
        artifacts = {a.key: a for a in stack.artifacts_of(flow_run_id)}
        summary = artifacts.get(f"{ARTIFACT_PREFIX}-summary")
        assert summary is not None, f"no summary artifact for the cancelled run: {list(artifacts)}"
        print(f"[e2e] summary of the cancelled run:\n{summary.data}")
        assert "cancel" in summary.data.lower(), (
            f"the summary of a cancelled run does not say it was cancelled:\n{summary.data}")
        assert "**The run was stopped: cancelled" in summary.data, summary.data
        table = artifacts[f"{ARTIFACT_PREFIX}-generations"].data
        rows = json.loads(table) if isinstance(table, str) else table
        statuses = sorted(r["status"] for r in rows)
        assert "interrupted" in statuses and set(statuses) <= {"interrupted", "cancelled", "not run"}, statuses

        # the generations that were waiting end Cancelled: no failure, no retry of a cancelled one
        with stack.client() as client:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        assert not [t.name for t in task_runs if t.state and (t.state.is_failed() or t.state.is_crashed())], \
            [(t.name, t.state.name) for t in task_runs]
        messages = [log.message for log in stack.logs_of(flow_run_id)]
        assert not [m for m in messages if "Retry 1/" in m], messages
        worker_output = stack.log_of("prefect-worker").read_text(errors="replace")
        assert "Traceback" not in worker_output, _tail(stack.log_of("prefect-worker"), 120)
    finally:
        comfy.execution_time_s, comfy.progress_steps = 0.0, 0
