"""Soak benchmark: the flow for minutes on end against two stand-in ComfyUI servers with random faults.

Not a test (it is not collected by pytest). Run from the repository root:

    python -m bench.soak                         # 10 minutes, seed 1
    python -m bench.soak --minutes 1 --seed 7    # a quick one
    python -m bench.soak --json soak.json        # also write every figure (and the fault log) as JSON

Exit code 0 only when double executions, prompts left on a server (including prompts that ran
after their flow run had ended), hung generations and partial files are all 0; 1 otherwise.

Set-up
------
Two stand-in ComfyUI servers (tests/standin.py: 1 s of "GPU" time per prompt in 4 interruptible
progress steps, 200 kB output files, 5 ms per HTTP answer), each behind a FaultProxy
(tests/faultproxy.py) so that silent sockets can be injected. The pipeline is given the proxies'
URLs as a ``ComfyUIServerPool.of([...])`` of two unsaved ComfyUI Server blocks (what the CLI does
with two ``--server``), with ``generation_timeout_s``, ``queue_timeout_s`` and
``reconnect_timeout_s`` at 60 s (the defaults, 900/3600/120 s, would make a hang take longer than the
whole soak to show) and every other setting at its default (2 retries 5 s apart, doubling, 2 prompts
in flight per server, ``idle_timeout_s`` 30 s). Prefect runs on ``prefect_test_harness`` (its
temporary API in a subprocess, a throw-away database); no Prefect server is needed.

The load: a sequence of flow runs
---------------------------------
Every ``4 * 60 / rate`` seconds (12 s at the default 20 generations per minute) a new flow run of
``comfy_pipeline.flows.generate_content.generate_content`` starts in its own thread with 4
descriptions x 1 variant. Runs may overlap (a run slowed by a fault does not hold up the feed), up
to ``--max-runs`` (4) at once; the feed waits when that many are running (the rate actually reached
is printed). Why flow runs and not one long run fed steadily: the flow is made to be run like that
(a deployment's schedule, one connection per run), so the soak goes through what a real fleet goes
through many times an hour: opening both connections (possibly while a server restarts, which then
leaves it out of the run), ``close()`` removing the run's prompts while others are still in
flight, artifacts, and overlapping runs sharing the servers' queues. 4 generations per run match
the run's free slots (2 servers x 2 in flight), so no generation waits for a slot of its own run.

Each generation is a unique description ``g00042`` (a global number) in a flow run named and with
character ``soak-r0011``, bound raw into the SaveImage ``filename_prefix``
(``soak/{character}_d{index}_v{variant}_{description}``), so every prompt the stand-ins see, every
file they write and every file we save names its generation. Some descriptions carry a stand-in
marker: ``[[sleep=S]]`` (6 %, S 2-6 s: a slow generation), ``[[silent=S]]`` (3 %, S 5-35 s: the
server sends nothing at all for S s, at the longest past ``idle_timeout_s``) and ``[[flaky]]`` (1 %: its
first execution raises a node error, a permanent failure by design: those failures are expected and
shown as such).

Faults
------
A fault thread plays a schedule drawn up front from ``--seed`` (exponential gaps, mean
``--fault-every`` s = 12 s, so about 50 faults in 10 minutes), each on one of the two servers
chosen at random:

    ws_drop         the stand-in aborts the next WebSocket that reaches 0-30 more frames (no close frame)
    proxy_reset     the proxy resets every open connection (WebSocket and HTTP keep-alive)
    ws_stall        the proxy silences the open WebSocket connections for good (a half-open flow):
                    no error, no close, nothing forwarded either way
    stall_all       the same for every open connection, HTTP keep-alive ones included
    post_5xx        the next 1-3 POST /prompt answer 500, 502 or 503 and queue nothing
    post_lost       the next POST /prompt is queued but its answer is lost (connection aborted)
    view_5xx        the next 1-4 GET /view answer 503
    view_truncated  the next 1-4 GET /view send the full Content-Length but half the body, then abort
    slow_views      every GET /view waits 1-4 s, for 10-30 s
    restart         a ComfyUI restart: down 0.5-15 s, queue, history and cache lost

The three proxy faults act on the connections open at that moment only, and a flow run keeps its
connections open for a few seconds of every 12: so each waits, once due, until a flow run has been
going for ``into_run_s`` (0.5-3 s, from the schedule: during the open, a submit, an execution or a
download), at most 15 s.

The schedule (time, kind, server, parameters) depends on the seed only, so a run can be replayed with
the same seed (the first minute of a 10-minute schedule is the 1-minute schedule); what the pipeline
does at those moments depends on timing too. Faults stop after ``--minutes``, as does the feed; the
runs still going then end without new faults (a restart then would also wipe the evidence of a prompt
left behind).

What is measured, and how
-------------------------
The stand-ins record every execution (``StandInComfyUI.executions``: prompt id, the prompt's strings,
start, end, outcome success / error / interrupted / lost in a restart); Prefect's API gives each
generation's task run (final state, its message, end time); the output folder is read at the end.

* generations done: task runs that ended Completed. failed and why: the others, grouped by error
  type and message (prompt ids, URLs and numbers replaced by placeholders); a run that could not
  open any server has no task runs: its generations count as failed with the run's message.
* double executions: for one generation, take every execution, on either stand-in, of every prompt
  id whose strings name that generation, in the order they started. An execution counts as a double
  execution when an execution of the same generation that started before it did not end badly: it
  succeeded, or it had not ended when we looked (ending badly = failed with a node error, was
  interrupted, or was lost in a restart). A generation may thus run again only after every earlier
  run of it failed or was interrupted; one that succeeded twice, or once after an earlier run that
  also succeeded (even if the later one was then interrupted), counts. Must be 0.
* prompts left on a server: ``queue_running`` + ``queue_pending`` of each stand-in once every run has
  ended. Must be 0. Also shown, and also failing the soak: orphan executions, executions that
  started after the flow run of their generation had returned (a prompt left behind that already ran
  when we looked, or was wiped by a later restart).
* hung generations: a generation whose task run had not ended within its limit after its flow run
  started; the limit is its timeout plus a margin: (retries + 1) x (reconnect_timeout_s +
  queue_timeout_s + generation_timeout_s) + the longest retry delays (5 + 10 s, x 1.5 jitter) + a
  120 s margin for downloads and bookkeeping = 682.5 s with these settings. A run still going at its limit is not
  waited for any longer. Must be 0. The slowest generations are printed as well.
* partial files: files in the output folder that are empty, ``.part`` or other hidden temporaries,
  not a complete stand-in PNG, differ byte for byte from the file the stand-in served under the name
  written in them (each stand-in file names its prompt id, subfolder and file name), or were saved
  under the name of another generation. Must be 0. Also shown: completed generations without a file
  on disk and extra files (a generation saved twice, ``-2`` names).
* faults injected per kind (for a stall: how many connections are silent on that proxy right after
  it, those of earlier stalls included: a silenced connection stays open), wall time, and the
  generation rate reached.

Prefect's and the pipeline's log lines go to a file (``--log``, by default in the temporary folder,
named at the end), not to the console.
"""

from __future__ import annotations

import argparse
import collections
import contextvars
import heapq
import importlib
import json
import logging
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faultproxy import FaultProxy  # noqa: E402
from tests.standin import StandInComfyUI  # noqa: E402

BATCH = 4  # generations per flow run: the free slots of one run (2 servers x max_in_flight 2)
SERVER_SETTINGS = dict(generation_timeout_s=60.0, queue_timeout_s=60.0, reconnect_timeout_s=60.0)
RETRIES = 2  # the flow's defaults, passed explicitly so that the hang limit below matches them
RETRY_DELAY_S = 5.0
HANG_MARGIN_S = 120.0
DEFER_MAX_S = 15.0  # a proxy fault waits at most this long for a flow run to be under way
LABELS = ("A", "B")

# The workflow: the smoke workflow, with the raw description (and so its marker) in the file prefix.
WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 3381657},
          "_meta": {"title": "Empty Image"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "soak/image"},
          "_meta": {"title": "Save"}},
    "comfy_pipeline": {"bindings": {"prompt": {
        "path": "Save.inputs.filename_prefix",
        "format": "soak/{character_slug}_d{index}_v{variant}_{description}",
    }}},
}
GEN_RE = re.compile(r"soak-r(\d{4})_d(\d+)_v(\d+)_g(\d{5})")
LOCAL_RE = re.compile(r"^soak-r(\d{4})_d(\d+)_(\d+)(?:-\d+)?\.png$")
BAD_OUTCOMES = {"error", "interrupted", "lost"}

# kind -> relative weight in the schedule
FAULT_WEIGHTS = {
    "ws_drop": 2.0, "proxy_reset": 1.0, "ws_stall": 1.5, "stall_all": 0.5, "post_5xx": 1.5,
    "post_lost": 1.0, "view_5xx": 1.5, "view_truncated": 1.5, "slow_views": 1.0, "restart": 1.0,
}


def hang_limit_s() -> float:
    per_attempt = sum(SERVER_SETTINGS[k] for k in ("reconnect_timeout_s", "queue_timeout_s", "generation_timeout_s"))
    delays = sum(RETRY_DELAY_S * 2 ** k * 1.5 for k in range(RETRIES))
    return (RETRIES + 1) * per_attempt + delays + HANG_MARGIN_S


# --------------------------------------------------------------------------------------------- model

@dataclass
class Generation:
    number: int
    run: "Run"
    index: int
    marker: str
    status: str = "not ended"  # done | failed | cancelled | not ended
    reason: str = ""
    ended_wall: Optional[float] = None
    hung: bool = False

    @property
    def description(self) -> str:
        return f"g{self.number:05d}{self.marker}"

    @property
    def label(self) -> str:
        return f"g{self.number:05d} ({self.run.name} d{self.index}{' ' + self.marker if self.marker else ''})"

    @property
    def duration_s(self) -> Optional[float]:
        if self.ended_wall is None or self.run.started_wall is None:
            return None
        return self.ended_wall - self.run.started_wall


@dataclass
class Run:
    number: int
    generations: list = field(default_factory=list)
    started_mono: Optional[float] = None
    started_wall: Optional[float] = None
    returned_mono: Optional[float] = None
    state: str = ""
    message: str = ""
    thread: Optional[threading.Thread] = None
    read: bool = False  # outcomes read from the API

    @property
    def name(self) -> str:
        return f"soak-r{self.number:04d}"

    @property
    def active(self) -> bool:
        return self.returned_mono is None


@dataclass
class Fault:
    at: float  # seconds after the soak started
    kind: str
    server: int
    params: dict
    applied_at: Optional[float] = None
    effect: str = ""

    def text(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        when = f"{self.applied_at:7.1f}" if self.applied_at is not None else f"{self.at:7.1f}"
        return f"t={when}s {self.kind} on {LABELS[self.server]}{' (' + params + ')' if params else ''}" \
               f"{' ' + self.effect.strip() if self.effect else ''}"


# --------------------------------------------------------------------------------------------- faults

def fault_schedule(rng: random.Random, duration_s: float, mean_gap_s: float) -> list[Fault]:
    kinds, weights = list(FAULT_WEIGHTS), list(FAULT_WEIGHTS.values())
    faults, t = [], rng.expovariate(1 / mean_gap_s)
    while t < duration_s:
        kind = rng.choices(kinds, weights)[0]
        params: dict = {}
        if kind == "ws_drop":
            params = {"after_frames": rng.randint(0, 30)}
        elif kind == "post_5xx":
            params = {"k": rng.randint(1, 3), "status": rng.choice([500, 502, 503])}
        elif kind in ("view_5xx", "view_truncated"):
            params = {"k": rng.randint(1, 4)}
        elif kind == "slow_views":
            params = {"delay_s": round(rng.uniform(1, 4), 1), "for_s": round(rng.uniform(10, 30), 1)}
        elif kind == "restart":
            params = {"down_s": round(rng.uniform(0.5, 15), 1)}
        if kind in ("proxy_reset", "ws_stall", "stall_all"):
            params["into_run_s"] = round(rng.uniform(0.5, 3.0), 1)
        faults.append(Fault(round(t, 2), kind, rng.randrange(len(LABELS)), params))
        t += rng.expovariate(1 / mean_gap_s)
    return faults


class FaultThread(threading.Thread):
    """Plays the schedule on the stand-ins and proxies; ``stop()`` ends it and every timed fault."""

    def __init__(self, faults: list[Fault], servers: list[StandInComfyUI], proxies: list[FaultProxy], t0: float,
                 busy: Callable[[float], bool]):
        super().__init__(name="soak-faults", daemon=True)
        self.faults, self.servers, self.proxies, self.t0 = faults, servers, proxies, t0
        self.busy = busy  # busy(s): a flow run has been going for at least s seconds and still is
        self._stop_event = threading.Event()
        self._slow_until = [0.0] * len(servers)
        self._timed: list = []  # heap of (monotonic time, seq, callable)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)
        for server in self.servers:  # end the timed faults now
            server.delay_views(0)

    def run(self) -> None:
        pending = list(self.faults)
        waiting: list[Fault] = []  # proxy faults that are due, waiting for a run to be under way
        seq = 0
        while not self._stop_event.is_set():
            now = time.monotonic()
            while self._timed and self._timed[0][0] <= now:
                heapq.heappop(self._timed)[2]()
            while pending and self.t0 + pending[0].at <= now:
                waiting.append(pending.pop(0))
            for fault in list(waiting):
                if "into_run_s" in fault.params and not self.busy(fault.params["into_run_s"]) \
                        and now < self.t0 + fault.at + DEFER_MAX_S:
                    continue
                waiting.remove(fault)
                try:
                    end = self.apply(fault)
                except Exception as exc:  # a fault that cannot be applied must not end the soak
                    fault.effect = f"(not applied: {type(exc).__name__}: {exc})"
                    end = None
                if end is not None:
                    seq += 1
                    heapq.heappush(self._timed, (end[0], seq, end[1]))
            nxt = [self.t0 + pending[0].at] if pending else []
            nxt += [self._timed[0][0]] if self._timed else []
            nxt += [now + 0.05] if waiting else []
            self._stop_event.wait(max(0.01, min(nxt) - time.monotonic()) if nxt else 0.5)

    def apply(self, fault: Fault) -> Optional[tuple[float, Callable[[], None]]]:
        server, proxy, p = self.servers[fault.server], self.proxies[fault.server], fault.params
        fault.applied_at = round(time.monotonic() - self.t0, 2)
        if fault.applied_at - fault.at > 0.5:
            fault.effect = f"(deferred {fault.applied_at - fault.at:.1f} s)"
        if fault.kind == "ws_drop":
            server.close_ws_after(p["after_frames"], times=1)
        elif fault.kind == "proxy_reset":
            proxy.drop_all()
        elif fault.kind == "ws_stall":
            fault.effect += f" -> {proxy.stall(websockets_only=True)} WebSocket(s) silent on it now"
        elif fault.kind == "stall_all":
            fault.effect += f" -> {proxy.stall()} connection(s) silent on it now"
        elif fault.kind == "post_5xx":
            server.fail_prompt_posts(p["k"], status=p["status"])
        elif fault.kind == "post_lost":
            server.drop_prompt_posts(1)
        elif fault.kind == "view_5xx":
            server.fail_views(p["k"], status=503)
        elif fault.kind == "view_truncated":
            server.truncate_views(p["k"])
        elif fault.kind == "slow_views":
            index = fault.server
            until = time.monotonic() + p["for_s"]
            self._slow_until[index] = max(self._slow_until[index], until)
            server.delay_views(p["delay_s"])

            def end() -> None:
                if time.monotonic() >= self._slow_until[index] - 0.01:
                    server.delay_views(0)

            return until, end
        elif fault.kind == "restart":
            server.restart(p["down_s"])
        return None


# --------------------------------------------------------------------------------------------- runs

def marker_for(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.06:
        return f"[[sleep={rng.uniform(2, 6):.1f}]]"
    if r < 0.09:
        return f"[[silent={rng.uniform(5, 35):.1f}]]"
    if r < 0.10:
        return "[[flaky]]"
    return ""


def start_run(run: Run, urls: list[str], workflow_path: Path, output_dir: Path) -> None:
    from comfy_pipeline.blocks.server import ComfyUIServer, ComfyUIServerPool
    from comfy_pipeline.flows.generate_content import generate_content

    def body() -> None:
        run.started_wall = time.time()
        try:
            pool = ComfyUIServerPool.of([ComfyUIServer(url=u, **SERVER_SETTINGS) for u in urls])
            state = generate_content.with_options(flow_run_name=run.name)(
                server=pool, workflow=str(workflow_path), descriptions=[g.description for g in run.generations],
                character=run.name, output_dir=str(output_dir), retries=RETRIES, retry_delay_s=RETRY_DELAY_S,
                return_state=True,
            )
            run.state, run.message = state.type.value, state.message or ""
        except BaseException as exc:  # noqa: BLE001 - recorded: the soak goes on
            run.state, run.message = "RAISED", f"{type(exc).__name__}: {exc}"
        finally:
            run.returned_mono = time.monotonic()

    run.started_mono = time.monotonic()
    ctx = contextvars.copy_context()
    run.thread = threading.Thread(target=ctx.run, args=(body,), name=f"soak-{run.name}", daemon=True)
    run.thread.start()


def normalize(message: str) -> str:
    """An error message with the parts that differ between occurrences replaced."""
    text = re.sub(r"^Task run encountered an exception ", "", message.strip())
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", text)
    text = re.sub(r"https?://127\.0\.0\.1:\d+", "<url>", text)
    text = re.sub(r"soak-r\d{4}[^\s)'\"]*|g\d{5}(\[\[[^\]]*\]\])?", "<name>", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text.splitlines()[0][:220] if text else "(no message)"


def read_outcomes(run: Run, *, wait_final_s: float) -> None:
    """Each generation's task run state from the Prefect API (waiting up to ``wait_final_s`` for the
    states of a finished run to arrive: they are recorded through Prefect's event stream)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    deadline = time.monotonic() + wait_final_s
    with get_client(sync_client=True) as client:
        while True:
            task_runs = []
            flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run.name])))
            if flow_runs:
                task_runs = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_runs[0].id])))
            by_index: dict[int, Any] = {}
            for tr in sorted(task_runs, key=lambda t: t.expected_start_time or t.created):
                match = re.search(r"-d(\d+)-v\d+$", tr.name or "")
                if match:
                    by_index[int(match.group(1))] = tr  # a later task run of the same generation wins
            final = all(i in by_index and by_index[i].state and by_index[i].state.is_final()
                        for i in range(len(run.generations)))
            if final or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    for gen in run.generations:
        tr = by_index.get(gen.index)
        if tr is None or tr.state is None:
            if not run.active and not by_index:  # the run ended before any generation started
                gen.status, gen.reason = "failed", f"(flow run) {run.message}"
            continue
        state = tr.state
        if state.is_completed():
            gen.status = "done"
        elif state.is_cancelled() or state.type.value == "CANCELLING":
            gen.status, gen.reason = "cancelled", state.message or ""
        elif state.is_failed() or state.is_crashed():
            gen.status, gen.reason = "failed", state.message or state.type.value
        else:
            gen.status = "not ended"
        if state.is_final():
            gen.ended_wall = (tr.end_time or state.timestamp).timestamp()
    run.read = True


# --------------------------------------------------------------------------------------------- checks

def png_tag(data: bytes) -> Optional[dict]:
    """The stand-in's ``standin`` tEXt chunk of a PNG, when the PNG is complete (ends with IEND)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos, tag, complete = 8, None, False
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length:
            return None
        if kind == b"tEXt" and body.startswith(b"standin\x00"):
            try:
                tag = json.loads(body[len(b"standin\x00"):].decode("ascii"))
            except ValueError:
                return None
        if kind == b"IEND":
            complete = True
            break
        pos += 12 + length
    return tag if complete else None


def check_files(output_dir: Path, servers: list[StandInComfyUI], generations: dict[int, Generation],
                runs: dict[int, Run]) -> dict:
    partial: list[dict] = []
    per_generation: collections.Counter = collections.Counter()
    files = [p for p in output_dir.rglob("*") if p.is_file()] if output_dir.exists() else []
    for path in files:
        rel = str(path.relative_to(output_dir))
        if path.name.startswith(".") or path.name.endswith(".part"):
            partial.append({"file": rel, "why": "temporary file left behind"})
            continue
        data = path.read_bytes()
        if not data:
            partial.append({"file": rel, "why": "empty"})
            continue
        tag = png_tag(data)
        if tag is None:
            partial.append({"file": rel, "why": f"not a complete stand-in PNG ({len(data)} bytes)"})
            continue
        key = (tag.get("type"), tag.get("subfolder"), tag.get("filename"))
        served = [s.files.get(key) for s in servers]
        if data not in served:
            partial.append({"file": rel, "why": f"bytes differ from {key[1]}/{key[2]} as served"
                            f" (prompt {tag.get('prompt_id')})"})
            continue
        local, origin = LOCAL_RE.match(path.name), GEN_RE.search(str(key[2]))
        local_gen = None
        if local:
            run = runs.get(int(local.group(1)))
            index = int(local.group(2))
            if run is not None and index < len(run.generations):
                local_gen = run.generations[index].number
        if origin is None or local_gen is None or int(origin.group(4)) != local_gen:
            partial.append({"file": rel, "why": f"holds {key[2]}, not this generation's file"})
            continue
        per_generation[local_gen] += 1
    missing = [g.label for g in generations.values() if g.status == "done" and per_generation[g.number] == 0]
    extra = {generations[n].label: c for n, c in per_generation.items() if c > 1 and n in generations}
    return {"files": len(files), "partial": partial, "missing_for_done": missing, "extra_files": extra}


def check_executions(servers: list[StandInComfyUI], generations: dict[int, Generation], t0: float) -> dict:
    """Double and orphan executions (see the module docstring); times in seconds after ``t0``."""
    by_gen: dict[int, list] = collections.defaultdict(list)
    unknown = 0
    for label, server in zip(LABELS, servers):
        for record in list(server.executions):
            match = next((m for m in map(GEN_RE.search, record["strings"]) if m), None)
            if match is None or int(match.group(4)) not in generations:
                unknown += 1
                continue
            ended = record["ended"]
            by_gen[int(match.group(4))].append({
                "server": label, "prompt_id": record["prompt_id"], "outcome": record["outcome"],
                "started": record["started"], "started_s": round(record["started"] - t0, 2),
                "ended_s": None if ended is None else round(ended - t0, 2)})
    doubles, orphans = [], []
    for number, records in sorted(by_gen.items()):
        records.sort(key=lambda r: r["started"])
        gen = generations[number]
        flagged = [k for k in range(1, len(records))
                   if any(r["outcome"] not in BAD_OUTCOMES for r in records[:k])]
        if flagged:
            doubles.append({"generation": gen.label, "double": len(flagged), "status": gen.status,
                            "run_s": run_window(gen.run, t0), "executions": records})
        returned = gen.run.returned_mono
        for r in records:
            if returned is not None and r["started"] > returned:
                orphans.append({"generation": gen.label, "server": r["server"], "prompt_id": r["prompt_id"],
                                "started_after_run_s": round(r["started"] - returned, 2), "outcome": r["outcome"],
                                "run_s": run_window(gen.run, t0)})
    for records in by_gen.values():
        for r in records:
            del r["started"]
    total = sum(len(r) for r in by_gen.values())
    return {"executions": total, "unattributed": unknown, "doubles": doubles,
            "double_count": sum(d["double"] for d in doubles), "orphans": orphans,
            "generations_run_more_than_once": sum(1 for r in by_gen.values() if len(r) > 1)}


def run_window(run: Run, t0: float) -> list:
    """When a flow run started and returned (None: still going), in seconds after ``t0``."""
    return [round(run.started_mono - t0, 1),
            None if run.returned_mono is None else round(run.returned_mono - t0, 1)]


def faults_between(faults: list[Fault], start: float, end: Optional[float]) -> list[str]:
    """The faults applied from 5 s before ``start`` to ``end`` (seconds after the soak started)."""
    return [f.text() for f in faults if f.applied_at is not None and start - 5 <= f.applied_at
            and (end is None or f.applied_at <= end)]


def prompts_left(servers: list[StandInComfyUI]) -> list[dict]:
    left = []
    for label, server in zip(LABELS, servers):
        queue = server.queue_snapshot()
        for where in ("queue_running", "queue_pending"):
            for item in queue[where]:
                strings = [v for node in item[2].values() for v in (node.get("inputs") or {}).values()
                           if isinstance(v, str)]
                match = next((m for m in map(GEN_RE.search, strings) if m), None)
                left.append({"server": label, "where": where, "prompt_id": item[1],
                             "generation": match.group(0) if match else None})
    return left


# --------------------------------------------------------------------------------------------- main

def quiet_prefect_console(log_path: Path) -> None:
    """Send what Prefect (and the pipeline) would print to the console to ``log_path`` instead."""
    root = logging.getLogger()
    handler = logging.FileHandler(log_path, encoding="utf-8")
    for old in list(root.handlers):
        if type(old).__name__ == "PrefectConsoleHandler":
            handler.setFormatter(old.formatter)
            root.removeHandler(old)
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    for name in ("uvicorn", "fastapi"):
        for old in list(logging.getLogger(name).handlers):
            logging.getLogger(name).removeHandler(old)
        logging.getLogger(name).addHandler(handler)


def say(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:7.1f}s] {text}", flush=True)


def run_under_way(runs: dict[int, Run], into_run_s: float) -> bool:
    """Whether a flow run has been going for at least ``into_run_s`` and still is."""
    now = time.monotonic()
    try:
        return any(r.active and r.started_mono is not None and now - r.started_mono >= into_run_s
                   for r in list(runs.values()))
    except RuntimeError:  # the feed added a run meanwhile: ask again at the next tick
        return False


def feed(args, runs: dict[int, Run], generations: dict[int, Generation], marker_rng: random.Random, t0: float,
         urls: list[str], workflow_path: Path, output_dir: Path, faults: list[Fault]) -> float:
    """Start a flow run every ``BATCH * 60 / rate`` s until ``--minutes`` are over (at most
    ``--max-runs`` going at once); returns the seconds the feed waited for a run to end."""
    interval, end = BATCH * 60.0 / args.rate, t0 + args.minutes * 60.0
    waited_s = 0.0
    while t0 + len(runs) * interval < end:
        time.sleep(max(0.0, t0 + len(runs) * interval - time.monotonic()))
        waited = time.monotonic()
        while sum(r.active for r in runs.values()) >= args.max_runs and time.monotonic() < end:
            time.sleep(0.2)
        waited_s += time.monotonic() - waited
        if time.monotonic() >= end:
            break
        run = Run(len(runs) + 1)
        for index in range(BATCH):
            gen = Generation(len(generations) + 1, run, index, marker_for(marker_rng))
            generations[gen.number] = gen
            run.generations.append(gen)
        runs[run.number] = run
        start_run(run, urls, workflow_path, output_dir)
        say(t0, f"started {run.name} ({sum(not r.active for r in runs.values())} runs ended, "
                f"{sum(r.active for r in runs.values())} going, {sum(f.applied_at is not None for f in faults)} "
                "faults so far)")
    return waited_s


def drain(runs: dict[int, Run], limit: float, t0: float) -> None:
    """Wait until every run has returned or is past its hang limit; mark the generations of the
    latter that had not ended then as hung."""
    while True:
        now = time.monotonic()
        for run in runs.values():
            if run.active and now >= run.started_mono + limit and not run.read:
                read_outcomes(run, wait_final_s=0)
                for gen in run.generations:
                    gen.hung = gen.status == "not ended"
                say(t0, f"{run.name} is still going after {limit:.0f} s: "
                        f"{sum(g.hung for g in run.generations)} generation(s) hung")
        if not any(r.active and now < r.started_mono + limit for r in runs.values()):
            return
        time.sleep(0.5)


def soak(args: argparse.Namespace, work: Path, finish: Callable[[dict], int]) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry writes racing the harness
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    output_dir = Path(args.output_dir).resolve() if args.output_dir else work / "output"
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log).resolve() if args.log else work / "soak-prefect.log"
    workflow_path = work / "soak_workflow.json"
    workflow_path.write_text(json.dumps(WORKFLOW, indent=1))
    duration = args.minutes * 60.0
    fault_rng, marker_rng = random.Random(f"{args.seed}/faults"), random.Random(f"{args.seed}/markers")
    faults = fault_schedule(fault_rng, duration, args.fault_every)
    interval = BATCH * 60.0 / args.rate
    limit = hang_limit_s()

    servers, proxies = [], []
    for _ in LABELS:
        server = StandInComfyUI(execution_time_s=args.execution_time, progress_steps=4, preview_frames=True)
        server.request_latency_s = 0.005
        server.output_size_bytes = args.size
        servers.append(server.start())
        proxies.append(FaultProxy(server.port).start())
    urls = [p.url for p in proxies]

    print(f"soak: {args.minutes:g} min, seed {args.seed}, {len(faults)} faults scheduled, a flow run of "
          f"{BATCH} generations every {interval:.1f} s ({args.rate:g}/min), hang limit {limit:.1f} s", flush=True)
    for label, server, proxy in zip(LABELS, servers, proxies):
        print(f"  server {label}: stand-in {server.url} behind proxy {proxy.url}", flush=True)
    print(f"  Prefect log: {log_path}", flush=True)

    runs: dict[int, Run] = {}
    generations: dict[int, Generation] = {}
    storage = work / "prefect-results"
    try:
        with prefect_test_harness(server_startup_timeout=120), \
                temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
            importlib.import_module("comfy_pipeline.flows.generate_content")  # it sets Prefect's logging up again
            quiet_prefect_console(log_path)
            t0 = time.monotonic()
            fault_thread = FaultThread(faults, servers, proxies, t0, lambda s: run_under_way(runs, s))
            fault_thread.start()
            feed_waits = feed(args, runs, generations, marker_rng, t0, urls, workflow_path, output_dir, faults)
            time.sleep(max(0.0, t0 + duration - time.monotonic()))  # faults go on until the end of the window
            fault_thread.stop()
            say(t0, f"feed over: {len(runs)} runs started; faults stopped; waiting for the runs still going")
            drain(runs, limit, t0)
            time.sleep(2.0)  # let a last prompt show up in a queue if one was left
            wall = time.monotonic() - t0
            say(t0, "reading the outcomes")

            left = prompts_left(servers)
            for run in runs.values():
                if not run.active:
                    read_outcomes(run, wait_final_s=30)
            for gen in generations.values():
                if gen.duration_s is not None and gen.duration_s > limit:
                    gen.hung = True
            executions = check_executions(servers, generations, t0)
            files = check_files(output_dir, servers, generations, runs)
            figures = summarize(args, runs, generations, faults, executions, files, left, wall,
                                feed_waits, limit, interval, log_path, output_dir, t0)
            code = finish(figures)
            if any(r.active for r in runs.values()):  # a run is still going: do not wait for it
                sys.stdout.flush()
                os._exit(code)
    finally:
        for proxy in proxies:
            proxy.stop()
        for server in servers:
            server.stop()
    return code


def summarize(args, runs, generations, faults, executions, files, left, wall, feed_waits, limit,
              interval, log_path, output_dir, t0) -> dict:
    gens = list(generations.values())
    done = [g for g in gens if g.status == "done"]
    not_done = [g for g in gens if g.status != "done"]
    reasons: collections.Counter = collections.Counter()
    for g in not_done:
        if g.status == "not ended":
            why = "not ended (the run was still going)" if g.run.active else "no final state recorded for its task run"
        else:
            why = f"{g.status}: {normalize(g.reason)}"
        if g.marker == "[[flaky]]":
            why += "   <- expected: [[flaky]] asks for a node error"
        reasons[why] += 1
    hung = [g for g in gens if g.hung]
    durations = sorted(((g.duration_s, g) for g in gens if g.duration_s is not None), key=lambda x: -x[0])
    per_kind = collections.Counter(f.kind for f in faults if f.applied_at is not None)
    applied = [f for f in faults if f.applied_at is not None]
    double = executions["double_count"]
    partial = files["partial"]
    figures = {
        "minutes": args.minutes, "seed": args.seed, "rate_per_min": args.rate, "batch": BATCH,
        "flow_runs": len(runs), "generations": len(gens), "generations_done": len(done),
        "generations_failed": len(not_done), "failures_by_reason": dict(reasons.most_common()),
        "expected_failures": sum(1 for g in not_done if g.marker == "[[flaky]]"),
        "double_executions": double, "prompts_left_on_servers": len(left),
        "orphan_executions": len(executions["orphans"]), "hung_generations": len(hung),
        "partial_files": len(partial), "faults_injected": len(applied), "faults_per_kind": dict(per_kind),
        "wall_s": round(wall, 1),
        "generations_per_min": round(len(gens) / args.minutes, 2),
        "hang_limit_s": round(limit, 1),
        "slowest_generations_s": [[g.label, round(d, 1)] for d, g in durations[:5]],
        "executions": executions["executions"],
        "generations_run_more_than_once": executions["generations_run_more_than_once"],
        "files": files["files"], "done_without_file": files["missing_for_done"], "extra_files": files["extra_files"],
        "feed_waited_s": round(feed_waits, 1),
        "details": {"double_executions": executions["doubles"], "prompts_left": left,
                    "orphan_executions": executions["orphans"],
                    "hung": [{"generation": g.label, "status": g.status, "run_s": run_window(g.run, t0),
                              "faults": faults_between(faults, g.run.started_mono - t0,
                                                       None if g.run.active else g.run.returned_mono - t0)}
                             for g in hung],
                    "partial_files": partial},
        "fault_log": [f.text() for f in faults],
        "runs": [{"name": r.name, "state": r.state or "still going", "message": r.message,
                  "run_s": run_window(r, t0)} for r in runs.values()],
        "prefect_log": str(log_path), "output_dir": str(output_dir),
    }

    p = print
    p("")
    p(f"=== soak: {args.minutes:g} min, seed {args.seed}, {len(runs)} flow runs x {BATCH} generations "
      f"(one every {interval:.1f} s) on 2 stand-ins ===")
    p(f"generations done:          {len(done)} of {len(gens)}")
    p(f"failed:                    {len(not_done)}"
      + (f" ({figures['expected_failures']} expected, from [[flaky]])" if figures["expected_failures"] else ""))
    for why, count in reasons.most_common():
        p(f"  {count:4d}  {why}")
    p(f"double executions:         {double}")
    for d in executions["doubles"]:
        runs_text = "; ".join(f"{r['server']} {r['prompt_id'][:8]} at {r['started_s']} s: {r['outcome']}"
                              for r in d["executions"])
        p(f"  {d['generation']}: {d['double']} extra, generation {d['status']}; run {d['run_s'][0]}-"
          f"{d['run_s'][1]} s; executions: {runs_text}")
        d["faults"] = faults_between(faults, d["run_s"][0], d["run_s"][1])
        for text in d["faults"]:
            p(f"      {text}")
    p(f"prompts left on a server:  {len(left)}")
    for item in left:
        p(f"  {item['server']} {item['where']}: {item['prompt_id']} ({item['generation']})")
    p(f"orphan executions:         {len(executions['orphans'])}  (started after their flow run had returned)")
    for o in executions["orphans"]:
        p(f"  {o['generation']} on {o['server']}: prompt {o['prompt_id']} started {o['started_after_run_s']} s "
          f"after its run ({o['run_s'][0]}-{o['run_s'][1]} s) returned, {o['outcome']}")
        o["faults"] = faults_between(faults, o["run_s"][0], o["run_s"][1])
        for text in o["faults"]:
            p(f"      {text}")
    p(f"hung generations:          {len(hung)}  (limit {limit:.1f} s from the start of its flow run)")
    for g, h in zip(hung, figures["details"]["hung"]):
        p(f"  {g.label}: {g.status}{f' after {g.duration_s:.1f} s' if g.duration_s else ''}; "
          f"run {h['run_s'][0]}-{h['run_s'][1]} s")
        for text in h["faults"]:
            p(f"      {text}")
    p("  slowest: " + ", ".join(f"{g.label} {d:.1f} s" for d, g in durations[:3]))
    p(f"partial files:             {len(partial)}  (of {files['files']} files)")
    for item in partial:
        p(f"  {item['file']}: {item['why']}")
    if files["missing_for_done"] or files["extra_files"]:
        p(f"  also: {len(files['missing_for_done'])} done without a file, {len(files['extra_files'])} saved twice "
          f"{files['extra_files'] or ''}")
    p(f"executions on the servers: {executions['executions']} "
      f"({executions['generations_run_more_than_once']} generations run more than once)")
    p(f"faults injected:           {len(applied)}  ("
      + ", ".join(f"{k} {per_kind[k]}" for k in FAULT_WEIGHTS if per_kind[k]) + ")")
    for f in applied:
        if f.kind in ("ws_stall", "stall_all") or f.effect.startswith("(not applied"):
            p(f"  {f.text()}")
    p(f"wall time:                 {wall:.1f} s  ({figures['generations_per_min']} generations/min started over "
      f"{args.minutes:g} min; the feed waited {feed_waits:.1f} s for a free run)")
    if any((double, left, executions["orphans"], hung, partial)):
        p("\nfault log:")
        for f in applied:
            p(f"  {f.text()}")
    p(f"Prefect log: {log_path}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="how long runs are started and faults injected (10)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule and the markers (1)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--rate", type=float, default=20.0, help="generations per minute (20)")
    parser.add_argument("--fault-every", type=float, default=12.0, help="mean seconds between faults (12)")
    parser.add_argument("--max-runs", type=int, default=4, help="flow runs going at once at most (4)")
    parser.add_argument("--execution-time", type=float, default=1.0, help="seconds of execution per prompt (1)")
    parser.add_argument("--size", type=int, default=200_000, help="bytes per output file (200000)")
    parser.add_argument("--output-dir", help="keep the files here (default: a temporary folder)")
    parser.add_argument("--log", help="Prefect's log file (default: in the temporary folder, kept)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="comfy-soak-"))

    def finish(figures: dict) -> int:
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
        bad = [k for k in ("double_executions", "prompts_left_on_servers", "orphan_executions",
                           "hung_generations", "partial_files") if figures[k]]
        print("\nresult: " + ("FAIL (" + ", ".join(bad) + ")" if bad else "OK"), flush=True)
        if not bad and not args.output_dir:  # nothing to look at: keep the log only
            shutil.rmtree(work / "output", ignore_errors=True)
        shutil.rmtree(work / "prefect-results", ignore_errors=True)
        print(f"kept in {work}: " + ", ".join(sorted(p.name for p in work.iterdir())), flush=True)
        return 1 if bad else 0

    sys.exit(soak(args, work, finish))

if __name__ == "__main__":
    main()
