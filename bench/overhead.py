"""Orchestration cost of the flow: generations per second at T = 0, peak RSS, the fixed cost of a
flow run, and where the per-generation time goes (not a test).

Run from the repository root:

    python -m bench.overhead                         # rate (2,000 at T=0), fixed cost, 40 ms latency
    python -m bench.overhead --only rate --generations 20000   # peak RSS of a big run
    python -m bench.overhead --only profile          # the 2,000 run under cProfile (every thread)
    python -m bench.overhead --only fixed,latency    # the fixed cost of a flow run only

Every measurement runs in a child process of its own (so its peak RSS is that of one flow run
and nothing else), calling ``generate_content`` directly as the CLI does (the flow's own defaults:
``max_in_flight`` 2 and 3 generations in flight, 2 retries; no flow-run heartbeats, which the CLI
turns off under the temporary API: ``--heartbeats`` keeps them) against Prefect's temporary API
(no ``PREFECT_API_URL``; a fresh ``PREFECT_HOME`` per child, so a fresh SQLite database; the API
is started by a 2-generation warm-up run that is not timed). A child that runs past ``--budget`` seconds is killed and the
parent reports how far it got (files written, the child's peak RSS so far).

rate     N generations (``--generations``, default 2,000) at T = 0 on one stand-in ComfyUI in
         another process (``python -m comfy_pipeline.testing.standin``, 5 ms per HTTP answer and
         200 kB output files, as bench/throughput.py's scenario e), that is the "31 per second"
         of issue 11). Printed: generations per second, peak RSS (VmHWM) of the flow's process
         and its RSS before the run, and the CPU seconds per generation spent by the flow's
         process, Prefect's temporary API server (a child process of the flow's) and the stand-in.
fixed    24 generations at T = 1 s on one in-process stand-in (its records give each POST's
         arrival and each execution's start and end): flow start to first POST and last file to
         flow end (from the call of the flow, and from the flow run's Running/end times in the API),
         and makespan / server busy time.
latency  the same with ``request_latency_s`` = 0.04 on the stand-in (every HTTP answer and the
         WebSocket upgrade wait 40 ms): the issue's target is makespan / busy <= 1.03.
memory   the rate run under tracemalloc (started after the warm-up): the memory the run added by
         the time the flow returned, by line and by file, and what stays once its result is dropped
         (for the "20,000 generations under 500 MB" target: what grows per generation).
profile  the rate run under cProfile in every thread (``threading.setprofile``), timed by each
         thread's CPU clock (``--clock wall`` for wall time: then threads waiting on a lock or a
         socket count too). Printed: CPU per generation by library (self time), by thread, the
         top functions by self time and, in our package, by cumulative time; the full profile is
         saved (``--profile-out``) for ``python -m pstats``. cProfile slows Python code down
         (more so code with many small calls), so its rate is lower than the rate run's.

--ablate  (rate and profile) switches one cost off in the measured process to see what it is
         (console, api-logs, info-logs, progress, trust-env, utf8; see --help), e.g.
         ``python -m bench.overhead --only rate --ablate api-logs,progress``; the package's files
         are not changed.

The numbers depend on the machine and on what else runs on it: the load average at the start and
the end of each child is printed with its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.fleet import count_files

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "workflows" / "smoke_image.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- /proc


def _status_kb(pid: int | str, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory in MB (VmHWM; ru_maxrss where /proc is missing)."""
    kb = _status_kb(pid, "VmHWM")
    if kb is None and pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return (kb or 0) / 1024.0


def rss_mb(pid: int | str = "self") -> float:
    return (_status_kb(pid, "VmRSS") or 0) / 1024.0


def cpu_s(pid: int | str) -> float:
    """User + system CPU seconds of a process (all its threads), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def prefect_server_pids() -> list[int]:
    """Prefect's temporary API server(s) started by this process (uvicorn running prefect.server)."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "prefect.server" in cmdline:
            pids.append(pid)
    return pids


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------- stand-ins


def standin_process(t: float, latency: float, size: int) -> tuple[subprocess.Popen, str]:
    """A stand-in ComfyUI in another process (``python -m comfy_pipeline.testing.standin``)."""
    from comfy_pipeline.testing.standin import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "comfy_pipeline.testing.standin", "--port", str(port), "--execution-time", str(t),
         "--progress-steps", "0", "--latency", str(latency), "--output-size", str(size)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    line = process.stdout.readline()  # "stand-in ComfyUI at ..." once it accepts
    if "stand-in ComfyUI at" not in line:
        process.kill()
        raise RuntimeError(f"the stand-in did not start: {line!r}")
    return process, f"http://127.0.0.1:{port}"


def recording_standin(t: float, latency: float):
    """An in-process stand-in that also records when each ``POST /prompt`` reached its handler."""
    from comfy_pipeline.testing.standin import StandInComfyUI

    class Recording(StandInComfyUI):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.post_times: list[float] = []  # time.monotonic() at the handler, after request_latency_s

        async def _h_post_prompt(self, request):
            self.post_times.append(time.monotonic())
            return await super()._h_post_prompt(request)

    server = Recording(execution_time_s=t, preview_frames=False)
    server.request_latency_s = latency
    return server.start()


# ------------------------------------------------------------------------------------------ flow


#: True when the measured runs keep Prefect's flow-run heartbeats (``--heartbeats``); by default
#: they run as the CLI runs them under the temporary API: without (flows/cli_support.py).
HEARTBEATS = False


def run_flow(url: str, n: int, out: Path, character: str = "bench"):
    """``generate_content`` over ``n`` descriptions on one server, with the flow's own defaults,
    as the CLI calls it (no flow-run heartbeats under the temporary API) unless :data:`HEARTBEATS`."""
    from contextlib import nullcontext

    from comfy_pipeline.blocks.server import ComfyUIServer
    from comfy_pipeline.flows.cli_support import without_heartbeats_on_temporary_api
    from comfy_pipeline.flows.generate_content import generate_content

    with nullcontext() if HEARTBEATS else without_heartbeats_on_temporary_api():
        state = generate_content(server=ComfyUIServer(url=url), workflow=str(WORKFLOW),
                                 descriptions=[f"d{i}" for i in range(n)], character=character,
                                 output_dir=str(out), return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"flow run {state.name}: {state.message}")
    return state


def warm_up(url: str) -> None:
    """Start Prefect's temporary API and import everything before anything is timed."""
    with tempfile.TemporaryDirectory() as tmp:
        run_flow(url, 2, Path(tmp), character="warm-up")


def flow_run_times(state) -> tuple[float | None, float | None]:
    """The flow run's start and end in the API (epoch seconds): when it entered Running, when it ended."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    start = run.start_time.timestamp() if run.start_time else None
    end = run.end_time.timestamp() if run.end_time else None
    return start, end


ABLATIONS = {
    "console": "Prefect's console handlers at WARNING (what the CLI does below -vv)",
    "api-logs": "no logs shipped to the API (PREFECT_LOGGING_TO_API_ENABLED=false)",
    "info-logs": "the prefect.task_runs and prefect.flow_runs loggers at WARNING: no INFO line per generation "
                 "anywhere (ours and the engine's 'Finished in state Completed()')",
    "progress": "the progress artifact not updated per generation (ProgressReport.advance only counts)",
    "trust-env": "requests sessions with trust_env=False (no proxy/netrc/CA lookup in os.environ per request)",
    "utf8": "websocket-client's pure-Python UTF-8 validation of text frames skipped",
}


def ablate(names: list[str]) -> None:
    """Experiments, in the child, to see what a cost is (the package's files are not touched; each
    one switches a thing off in this process only). ``api-logs`` is an environment variable the
    parent sets."""
    import logging

    for name in names:
        if name == "console":
            from comfy_pipeline.flows.cli_display import quiet_prefect_console

            quiet_prefect_console(0)
        elif name == "info-logs":
            for logger in ("prefect.task_runs", "prefect.flow_runs"):
                logging.getLogger(logger).setLevel(logging.WARNING)
        elif name == "progress":
            from comfy_pipeline.tasks import report

            def advance(self) -> None:
                self.done += 1

            report.ProgressReport.advance = advance
        elif name == "trust-env":
            import requests

            original = requests.Session.__init__

            def init(self, *args, **kwargs):
                original(self, *args, **kwargs)
                self.trust_env = False

            requests.Session.__init__ = init
        elif name == "utf8":
            import websocket._abnf as abnf

            abnf.validate_utf8 = lambda data: True


# ---------------------------------------------------------------------------------------- children


def child_rate(args) -> dict:
    out = Path(args.output_dir)
    server, url = standin_process(0.0, args.latency, args.size)
    try:
        warm_up(url)
        rss_before = rss_mb()
        api = prefect_server_pids()
        cpu_before = (cpu_s("self"), cpu_s(server.pid), sum(cpu_s(p) for p in api))
        started, started_wall = time.monotonic(), time.time()
        run_flow(url, args.generations, out)
        makespan = time.monotonic() - started
        cpu_after = (cpu_s("self"), cpu_s(server.pid), sum(cpu_s(p) for p in api))
    finally:
        server.terminate()
        server.wait(timeout=30)
    n = args.generations
    mtimes = sorted(p.stat().st_mtime for p in out.rglob("*") if p.is_file() and p.suffix != ".csv")
    ours, standin, prefect_api = (round((b - a) / n * 1000, 2) for a, b in zip(cpu_before, cpu_after))
    return {"mode": "rate", "generations": n, "files": count_files(out), "makespan_s": round(makespan, 2),
            "gen_per_s": round(n / makespan, 2), "ms_per_gen": round(makespan / n * 1000, 2),
            "call_to_first_file_s": round(mtimes[0] - started_wall, 2) if mtimes else None,
            "last_file_to_return_s": round(started_wall + makespan - mtimes[-1], 2) if mtimes else None,
            "gen_per_s_first_to_last_file": round((n - 1) / (mtimes[-1] - mtimes[0]), 2) if len(mtimes) > 1 else None,
            "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "cpu_ms_per_gen": {"flow process": ours, "prefect API server": prefect_api, "stand-in": standin},
            "prefect_api_servers": len(api)}


def child_fixed(args) -> dict:
    out = Path(args.output_dir)
    server = recording_standin(args.fixed_seconds, args.request_latency)
    try:
        warm_up(server.url)
        server.post_times.clear()
        server.reset_counters()
        wall0, mono0 = time.time(), time.monotonic()
        state = run_flow(server.url, args.fixed_generations, out)
        returned = time.monotonic()
        executions = [e for e in server.executions if e["ended"] is not None]
        posts = list(server.post_times)
    finally:
        server.stop()
    to_mono = mono0 - wall0  # epoch seconds -> this process's monotonic clock
    last_file = max(p.stat().st_mtime for p in out.rglob("*") if p.is_file()) + to_mono
    run_start, run_end = (x + to_mono if x is not None else None for x in flow_run_times(state))
    first_post = min(posts) - args.request_latency  # when it reached the server (the handler waited the latency)
    busy = sum(e["ended"] - e["started"] for e in executions)
    makespan = returned - mono0
    row = {
        "mode": "latency" if args.request_latency else "fixed", "generations": args.fixed_generations,
        "t": args.fixed_seconds, "request_latency_s": args.request_latency,
        "call_to_first_post_s": round(first_post - mono0, 3),
        "last_file_to_return_s": round(returned - last_file, 3),
        "fixed_cost_from_call_s": round(first_post - mono0 + returned - last_file, 3),
        "makespan_s": round(makespan, 3), "busy_s": round(busy, 3),
        "makespan_over_busy": round(makespan / busy, 4) if busy else None,
        "first_execution_start_to_last_end_s": round(max(e["ended"] for e in executions)
                                                     - min(e["started"] for e in executions), 3),
    }
    if run_start is not None and run_end is not None:
        row.update({
            "call_to_running_s": round(run_start - mono0, 3),
            "running_to_first_post_s": round(first_post - run_start, 3),
            "last_file_to_flow_run_end_s": round(run_end - last_file, 3),
            "flow_run_end_to_return_s": round(returned - run_end, 3),
            "fixed_cost_in_flow_run_s": round(first_post - run_start + run_end - last_file, 3),
            "flow_run_span_over_busy": round((run_end - run_start) / busy, 4) if busy else None,
        })
    return row


def child_memory(args) -> dict:
    """The rate run under tracemalloc (started after the warm-up): what the flow's process still
    holds at the end of the run that it did not hold before, by line and by file, and the peak of
    traced memory; a heap that grows with the number of generations shows here."""
    import gc
    import tracemalloc

    out = Path(args.output_dir)
    server, url = standin_process(0.0, args.latency, args.size)
    holder: dict = {}
    try:
        warm_up(url)
        gc.collect()
        tracemalloc.start(6)
        before = tracemalloc.take_snapshot()
        started = time.monotonic()
        from comfy_pipeline.blocks.server import ComfyUIServer
        from comfy_pipeline.flows.generate_content import generate_content

        # the flow's return value stays referenced, as a caller holding the results would
        holder["state"] = generate_content(server=ComfyUIServer(url=url), workflow=str(WORKFLOW),
                                           descriptions=[f"d{i}" for i in range(args.generations)],
                                           character="bench", output_dir=str(out), return_state=True)
        makespan = time.monotonic() - started
        after_return = tracemalloc.take_snapshot()
        _, traced_peak = tracemalloc.get_traced_memory()
        del holder["state"]
        gc.collect()
        after_release = tracemalloc.take_snapshot()
        tracemalloc.stop()
    finally:
        server.terminate()
        server.wait(timeout=30)
    n = args.generations
    mb = lambda b: round(b / 2**20, 2)  # noqa: E731

    def top(snapshot, key: str, count: int) -> list:
        stats = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)]).compare_to(before, key)
        return [(str(s.traceback[0]).replace(str(ROOT) + "/", "").split("site-packages/")[-1], s.count_diff,
                 mb(s.size_diff), round(s.size_diff / n)) for s in stats[:count]]

    def chains(snapshot, count: int) -> list:
        """The biggest growths by allocation traceback, each named by its innermost frames in
        Prefect or our package (the allocation site itself is mostly pydantic or the stdlib)."""
        traced = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        stats = traced.compare_to(before, "traceback")
        rows = []
        for stat in stats[:count]:
            frames = [f for f in reversed(stat.traceback) if "/prefect/" in f.filename or "comfy_pipeline" in f.filename
                      or f.filename.startswith(str(ROOT))]
            where = " < ".join(f"{short_path(f.filename)}:{f.lineno}" for f in frames[:3]) or str(stat.traceback[-1])
            rows.append((f"{short_path(stat.traceback[-1].filename)}:{stat.traceback[-1].lineno} from {where}",
                         stat.count_diff, mb(stat.size_diff), round(stat.size_diff / n)))
        return rows

    grown = sum(s.size_diff for s in after_return.compare_to(before, "filename"))
    kept = sum(s.size_diff for s in after_release.compare_to(before, "filename"))
    return {"mode": "memory", "generations": n, "makespan_s": round(makespan, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1), "traced_peak_mb": mb(traced_peak),
            "grown_by_return_mb": mb(grown), "bytes_per_gen_at_return": round(grown / n),
            "still_held_after_result_dropped_mb": mb(kept),
            "top_lines_at_return": top(after_return, "lineno", 25),
            "top_files_at_return": top(after_return, "filename", 15),
            "top_lines_after_result_dropped": top(after_release, "lineno", 12),
            "top_tracebacks_after_result_dropped": chains(after_release, 15)}


def child_profile(args) -> dict:
    import cProfile
    import pstats

    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    profilers: list[tuple[str, cProfile.Profile]] = []
    lock = threading.Lock()

    def start_in_thread(frame, event, arg):  # the first event of every new thread
        sys.setprofile(None)
        profiler = cProfile.Profile(clock)
        with lock:
            profilers.append((threading.current_thread().name, profiler))
        profiler.enable()

    threading.setprofile(start_in_thread)  # before Prefect starts any thread
    main = cProfile.Profile(clock)
    profilers.append(("MainThread", main))
    main.enable()

    out = Path(args.output_dir)
    server, url = standin_process(0.0, args.latency, args.size)
    try:
        warm_up(url)
        with lock:
            for _, profiler in profilers:
                profiler.clear()  # the warm-up's calls (threads idle now)
        cpu_before = cpu_s("self")
        started = time.monotonic()
        run_flow(url, args.generations, out)
        makespan = time.monotonic() - started
        cpu_used = cpu_s("self") - cpu_before
    finally:
        main.disable()
        threading.setprofile(None)
        server.terminate()
        server.wait(timeout=30)

    n = args.generations
    merged: pstats.Stats | None = None
    per_thread: dict[str, float] = {}
    thread_stats: dict[str, pstats.Stats] = {}
    with lock:
        taken = list(profilers)
    for name, profiler in taken:
        # Not create_stats(): it would close the calls still open in other threads (an event loop
        # waiting in epoll) with THIS thread's clock. Calls still open are left out.
        profiler.snapshot_stats()
        if not profiler.stats:  # a thread that ran no Python code after the warm-up
            continue
        stats = pstats.Stats()
        stats.stats = profiler.stats
        stats.get_top_level_stats()
        total = sum(v[2] for v in stats.stats.values())
        per_thread[thread_group(name)] = per_thread.get(thread_group(name), 0.0) + total
        group = thread_group(name)
        if group in thread_stats:
            thread_stats[group].add(stats)
        else:
            thread_stats[group] = pstats.Stats()
            thread_stats[group].add(stats)
        if merged is None:
            merged = stats
        else:
            merged.add(stats)
    merged.dump_stats(args.profile_out)
    entries = merged.stats
    total = sum(v[2] for v in entries.values())
    by_category: dict[str, float] = {}
    for key, (_, _, tt, _, _) in entries.items():
        category = categorize(key)
        by_category[category] = by_category.get(category, 0.0) + tt

    def label(key) -> str:
        filename, line, func = key
        return f"{short_path(filename)}:{line}:{func}" if filename != "~" else func

    top_self = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:30]
    ours = [kv for kv in entries.items() if categorize(kv[0]) == "ours (comfy_pipeline)"]
    top_ours = sorted(ours, key=lambda kv: kv[1][3], reverse=True)[:25]
    prefect = [kv for kv in entries.items() if kv[0][0].find("/prefect/") >= 0]
    top_prefect = sorted(prefect, key=lambda kv: kv[1][3], reverse=True)[:25]
    ms = lambda s: round(s / n * 1000, 3)  # noqa: E731
    by_thread_top = {}
    for group, stats in thread_stats.items():
        # the deepest functions that still hold most of the thread's time: top by cumulative,
        # leaving out the thread's bootstrap and the generic wrappers
        ranked = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)
        by_thread_top[group] = [(label(k), v[1], ms(v[3]), round(v[3] / total, 3)) for k, v in ranked
                                if not any(w in k[0] for w in ("threading.py", "concurrent/futures/thread.py",
                                                               "contextvars", "contextlib.py"))
                                and k[0] != "~"][:12]
    return {
        "mode": "profile", "clock": args.clock, "generations": n, "makespan_s": round(makespan, 2),
        "gen_per_s": round(n / makespan, 2), "process_cpu_ms_per_gen": ms(cpu_used),
        "profiled_ms_per_gen": ms(total), "profile_out": args.profile_out,
        "by_category_ms_per_gen": {k: ms(v) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "by_category_share": {k: round(v / total, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "by_thread_ms_per_gen": {k: ms(v) for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1])},
        "top_cumulative_by_thread": by_thread_top,
        "top_self": [(label(k), v[1], ms(v[2]), round(v[2] / total, 3)) for k, v in top_self],
        "top_cumulative_ours": [(label(k), v[1], ms(v[3]), round(v[3] / total, 3)) for k, v in top_ours],
        "top_cumulative_prefect": [(label(k), v[1], ms(v[3]), round(v[3] / total, 3)) for k, v in top_prefect],
    }


def short_path(filename: str) -> str:
    if "/comfy_pipeline/" in filename:
        return "comfy_pipeline/" + filename.split("/comfy_pipeline/", 1)[1]
    if filename.startswith(str(ROOT)):
        return filename[len(str(ROOT)) + 1:]
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in filename:
            rest = filename.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker == "/lib/python3." else rest
    if filename.startswith(str(ROOT)):
        return filename[len(str(ROOT)) + 1:]
    return filename


def thread_group(name: str) -> str:
    if name.startswith("ThreadPoolExecutor"):
        return "task runner threads (ThreadPoolExecutor)"
    if name == "MainThread":
        return "MainThread (flow body)"
    return name.split("-")[0].rstrip("_0123456789") or name


HTTP_FILES = ("requests/", "urllib3/", "websocket/", "http/client.py", "socket.py", "ssl.py", "email/",
              "http/cookiejar.py", "idna/", "charset_normalizer/", "certifi/")
PREFECT_ENGINE = ("prefect/task_engine.py", "prefect/task_runners.py", "prefect/futures.py", "prefect/tasks.py",
                  "prefect/utilities/engine.py", "prefect/flow_engine.py", "prefect/context.py", "prefect/states.py",
                  "prefect/utilities/callables.py", "prefect/flows.py", "prefect/task_runs.py",
                  "prefect/_internal/compatibility", "prefect/utilities/annotations.py",
                  "prefect/telemetry/", "prefect/utilities/collections.py", "prefect/runtime/")
PREFECT_RESULTS = ("prefect/results.py", "prefect/cache_policies.py", "prefect/utilities/hashing.py",
                   "prefect/serializers.py", "prefect/filesystems.py", "prefect/locking/", "prefect/transactions.py",
                   "prefect/records/")
PREFECT_API = ("prefect/client/", "prefect/events/", "prefect/_internal/concurrency/", "prefect/_internal/schemas",
               "prefect/server/")


def categorize(key) -> str:
    filename, _, func = key
    if filename == "~":  # a builtin: by what it is
        if "socket" in func or "ssl" in func.lower() or "select" in func or "poll" in func:
            return "HTTP/WS to ComfyUI + sockets (requests, urllib3, websocket-client)"
        if "_thread.lock" in func or "acquire" in func or "sleep" in func:
            return "waiting (locks, sleep)"
        if "json" in func or "_json" in func:
            return "json (builtins)"
        if "pydantic" in func:
            return "pydantic"
        return "builtins (other)"
    path = filename.replace("\\", "/")
    if str(ROOT) in path or "/comfy_pipeline/" in path:
        return "ours (comfy_pipeline)"
    if "/prefect/" in path:
        tail = path.split("site-packages/", 1)[-1]
        if tail.startswith("prefect/logging/"):
            return "prefect: logging (console + API log handler)"
        if tail.startswith(PREFECT_RESULTS):
            return "prefect: results, cache keys, transactions"
        if tail.startswith(PREFECT_API):
            return "prefect: API client, events"
        if tail.startswith(PREFECT_ENGINE):
            return "prefect: task engine, futures, states, context"
        return "prefect: other"
    if "/pydantic" in path:
        return "pydantic"
    if any(f"/{h}" in path for h in HTTP_FILES):
        return "HTTP/WS to ComfyUI + sockets (requests, urllib3, websocket-client)"
    if any(f"/{h}/" in path for h in ("httpx", "httpcore", "anyio", "h11", "h2", "websockets", "sniffio")):
        return "httpx/anyio/websockets (Prefect's API traffic)"
    if "/asyncio/" in path or "/selectors.py" in path:
        return "asyncio (Prefect's event loops)"
    if "/logging/" in path:
        return "stdlib logging"
    if "/rich/" in path:
        return "rich (console)"
    if "/json/" in path:
        return "json"
    if "/threading.py" in path or "/concurrent/" in path or "/queue.py" in path:
        return "threading, concurrent.futures"
    if any(f"/{m}" in path for m in ("uuid.py", "copy.py", "pathlib.py", "enum.py", "typing.py", "inspect.py",
                                     "contextlib.py", "contextvars", "functools.py", "abc.py", "datetime",
                                     "pendulum", "whenever", "dateutil", "os.py", "posixpath.py", "re/", "hashlib",
                                     "cloudpickle", "pickle", "base64", "weakref", "_weakrefset", "dataclasses",
                                     "string.py", "textwrap", "slugify", "genericpath", "tempfile", "shutil",
                                     "traceback", "linecache", "tokenize", "warnings")):
        return "stdlib/other libraries"
    return "other"


CHILDREN = {"rate": child_rate, "fixed": child_fixed, "latency": child_fixed, "profile": child_profile,
            "memory": child_memory}


# ----------------------------------------------------------------------------------------- parent


def run_child(mode: str, args, extra: list[str], expected_files: int) -> dict:
    """Run one mode in a child process (its own session, so that a child past the budget is
    killed with its stand-in and its Prefect API server); the child's last JSON line is its row."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-overhead-{mode}-"))
    out = tmp / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({
        "PREFECT_HOME": str(tmp / "prefect-home"),  # a fresh temporary API database
        # the temporary API's start-up on a busy machine takes longer than the default 20 s
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    })
    if "api-logs" in args.ablate:
        env["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
    log = tmp / "child.log"
    command = [sys.executable, "-m", "bench.overhead", "--child", mode, "--output-dir", str(out), *extra]
    load_start = load_average()
    started = time.monotonic()
    with log.open("w") as log_file:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        peak, last_report = 0.0, started
        while child.poll() is None:
            time.sleep(1.0)
            peak = max(peak, peak_rss_mb(child.pid))
            elapsed = time.monotonic() - started
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                print(f"  [{mode}] {elapsed:.0f} s: {count_files(out)} of "
                      f"{expected_files} files, peak RSS {peak:.0f} MB", flush=True)
            if elapsed > args.budget:
                files = count_files(out)
                os.killpg(child.pid, signal.SIGKILL)  # the child's session: it, its stand-in, its API server
                child.wait()
                shutil.rmtree(out, ignore_errors=True)  # 20,000 files of 200 kB: keep only the log
                return {"mode": mode, "stopped_after_s": round(elapsed, 1), "files_written": files,
                        "of": expected_files, "peak_rss_mb_so_far": round(peak, 1),
                        "note": "budget exceeded (--budget): stopped; the warm-up writes elsewhere, so every "
                                "file counted is one of this run's",
                        "load_avg_start_end": f"{load_start} / {load_average()}",
                        "log": str(log)}
    text = log.read_text(errors="replace")
    rows = [line for line in text.splitlines() if line.startswith("{\"mode\"")]
    if child.returncode != 0 or not rows:
        print(text[-4000:], file=sys.stderr)
        raise SystemExit(f"the {mode} child failed (exit {child.returncode}); its log: {log}")
    row = json.loads(rows[-1])
    if args.ablate:
        row["ablated"] = args.ablate
    if args.heartbeats:
        row["heartbeats"] = "kept (--heartbeats)"
    row["load_avg_start_end"] = f"{load_start} / {load_average()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return row


def print_row(row: dict) -> None:
    print(f"\n== {row['mode']}")
    for key, value in row.items():
        if key == "mode":
            continue
        if isinstance(value, dict):
            print(f"  {key}:")
            for k, v in value.items():
                if isinstance(v, list):
                    print(f"    {k}:")
                    for label, calls, ms, share in v:
                        print(f"      {ms:>9.3f} ms/gen {share * 100:5.1f}%  {calls:>9} calls  {label}")
                else:
                    print(f"    {v!s:>10}  {k}")
        elif isinstance(value, list) and row["mode"] == "memory":
            print(f"  {key}:")
            for label, count, size_mb, per_gen in value:
                print(f"    {size_mb:>9.2f} MB {per_gen:>8} B/gen {count:>9} blocks  {label}")
        elif isinstance(value, list):
            print(f"  {key}:")
            for item in value:
                label, calls, ms, share = item
                print(f"    {ms:>9.3f} ms/gen {share * 100:5.1f}%  {calls:>9} calls  {label}")
        else:
            print(f"  {key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="rate,fixed,latency",
                        help="comma-separated modes: rate, fixed, latency, profile, memory "
                             "(default rate,fixed,latency)")
    parser.add_argument("--generations", type=int, default=2000,
                        help="rate, profile and memory: generations (default 2000)")
    parser.add_argument("--latency", type=float, default=0.005,
                        help="rate and profile: seconds added to every HTTP answer of the stand-in (default 0.005)")
    parser.add_argument("--size", type=int, default=200_000,
                        help="rate and profile: bytes per output file (default 200000)")
    parser.add_argument("--fixed-generations", type=int, default=24, help="fixed and latency: generations (24)")
    parser.add_argument("--fixed-seconds", type=float, default=1.0, help="fixed and latency: T per prompt (1.0)")
    parser.add_argument("--request-latency", type=float, default=0.04,
                        help="latency mode: the stand-in's request_latency_s (default 0.04)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="profile: each thread's CPU clock "
                        "(default) or wall time")
    parser.add_argument("--profile-out", default=str(Path(tempfile.gettempdir()) / "bench-overhead.prof"),
                        help="profile: where the merged cProfile stats are saved")
    parser.add_argument("--ablate", default="",
                        help="comma-separated experiments that switch a cost off in the measured process: "
                             + "; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()))
    parser.add_argument("--budget", type=float, default=300, help="seconds a mode may run before it is stopped (300)")
    parser.add_argument("--heartbeats", action="store_true",
                        help="keep Prefect's flow-run heartbeats, as when generate_content is called from "
                             "Python without PREFECT_API_URL (the CLI turns them off then: up to 1 s at the "
                             "end of every run)")
    parser.add_argument("--json", action="store_true", help="also print every row as one JSON line")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        global HEARTBEATS
        HEARTBEATS = args.heartbeats
        if args.child == "fixed":
            args.request_latency = 0.0
        ablate(args.ablate.split(",") if args.ablate else [])
        print(json.dumps({"mode": args.child, **{k: v for k, v in CHILDREN[args.child](args).items()
                                                  if k != "mode"}}), flush=True)
        return

    modes = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in modes if m not in CHILDREN]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}: choose from {sorted(CHILDREN)}")
    ablations = [a.strip() for a in args.ablate.split(",") if a.strip()]
    wrong = [a for a in ablations if a not in ABLATIONS]
    if wrong:
        parser.error(f"unknown --ablate {wrong}: choose from {sorted(ABLATIONS)}")
    shared = ["--latency", str(args.latency), "--size", str(args.size), "--budget", str(args.budget),
              "--ablate", ",".join(ablations)] + (["--heartbeats"] if args.heartbeats else [])
    rows = []
    for mode in modes:
        if mode in ("rate", "profile", "memory"):
            extra = shared + ["--generations", str(args.generations), "--clock", args.clock,
                              "--profile-out", args.profile_out]
            expected = args.generations
        else:
            extra = shared + ["--fixed-generations", str(args.fixed_generations), "--fixed-seconds",
                              str(args.fixed_seconds), "--request-latency", str(args.request_latency)]
            expected = args.fixed_generations
        print(f"{mode} ...", flush=True)
        row = run_child(mode, args, extra, expected)
        rows.append(row)
        print_row(row)
        if args.json:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
