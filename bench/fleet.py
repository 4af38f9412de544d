"""A fleet of stand-in ComfyUI servers driven through the CLI: does the fleet stay busy, and do
flow runs started together respect each server's ``max_in_flight``? (not a test)

Run from the repository root:

    python -m bench.fleet                          # 16 servers, T = 1 s, 320 generations, one run
    python -m bench.fleet --runs 3 --servers 4     # three runs at once (characters fleet-a/b/c)
    python -m bench.fleet --concurrency 32         # options passed through to `comfy-pipeline run`
    python -m bench.fleet --exact-peak             # also each server's own in-flight record

Set-up: ``--servers`` stand-in ComfyUI servers, each in a process of its own
(``python -m comfy_pipeline.testing.standin --port P --execution-time T``; T = ``--seconds``,
default 1 s, spread over the stand-in's default 4 progress steps). ``--runs`` CLI commands
(``comfy-pipeline run --server URL ... --workflow examples/workflows/smoke_image.json
--descriptions FILE --character fleet-a ...``, every option at its default unless
``--concurrency`` / ``--max-in-flight`` are given) start at the same moment, the generations
(``--generations``, default 20 s of work per server: 320 for 16 servers) split between them.
Prefect: one ``prefect server start`` this bench starts (fresh ``PREFECT_HOME``, so a fresh
database) that every run reports to (``PREFECT_API_URL``); ``--temporary-api`` instead leaves each
CLI run on its own temporary API (the CLI's real default, whose start-up then counts in its wall
time, and flow-run times are not read).

Printed:
* makespan: from the first prompt that started executing on any server to the last that ended
  (the servers' ``/history``: ``execution_start`` / ``execution_success`` timestamps), and the
  ideal ``generations * T / servers``, and their ratio (the issue's target: <= 1.05 for one run,
  <= 1.08 for three); also the flow runs' span (first Running to last end, from the Prefect API)
  and the CLI commands' wall time (start of the processes to the last exit), each over the ideal.
* per server: prompts run, busy time, how long after the fleet's first prompt its own first one
  started, its idle time between prompts, how long before the fleet's last prompt its own last
  one ended (where a makespan above the ideal comes from: ramp-up, gaps, or an uneven end), and
  the peak of prompts queued or running at once (all of them are ours), against ``max_in_flight``.
  The stand-in keeps that peak in memory only (``StandInComfyUI.max_in_flight``, not served over
  HTTP), so this bench polls each server's ``GET /queue`` every ``--poll`` seconds
  (queue_running + queue_pending) from a thread per server: a peak shorter than the poll
  interval can be missed. ``--exact-peak`` starts each
  stand-in through this module instead (``--serve-standin``: the same server class in its own
  process, which prints its own record when asked) and shows both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "workflows" / "smoke_image.json"


# ----------------------------------------------------------------------------------------- servers


class StandIn:
    """One stand-in ComfyUI in a process of its own, and the poller of its ``/queue``."""

    def __init__(self, port: int, t: float, progress_steps: int | None, exact: bool):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.exact = exact
        if exact:
            command = [sys.executable, "-m", "bench.fleet", "--serve-standin", "--port", str(port),
                       "--seconds", str(t)]
        else:
            command = [sys.executable, "-m", "comfy_pipeline.testing.standin", "--port", str(port),
                       "--execution-time", str(t)]
        if progress_steps is not None:
            command += ["--progress-steps", str(progress_steps)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.polled_peak = 0
        self.samples = 0
        self.poll_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wait_ready(self) -> None:
        line = self.process.stdout.readline()
        if "stand-in ComfyUI at" not in line:
            raise RuntimeError(f"the stand-in on port {self.port} did not start: {line!r}")

    def start_polling(self, interval: float) -> None:
        def poll():
            session = requests.Session()
            while not self._stop.is_set():
                try:
                    body = session.get(f"{self.url}/queue", timeout=5).json()
                    in_flight = len(body.get("queue_running", [])) + len(body.get("queue_pending", []))
                    self.polled_peak = max(self.polled_peak, in_flight)
                    self.samples += 1
                except (requests.RequestException, ValueError):
                    self.poll_errors += 1
                self._stop.wait(interval)
            session.close()

        self._thread = threading.Thread(target=poll, name=f"poll-{self.port}", daemon=True)
        self._thread.start()

    def stop_polling(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def own_record(self) -> dict | None:
        """The server's own records (``--exact-peak`` only): ``max_in_flight``, executions."""
        if not self.exact or self.process.poll() is not None:
            return None
        self.process.stdin.write("record\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        return json.loads(line) if line.startswith("{") else None

    def history(self) -> dict:
        return requests.get(f"{self.url}/history", timeout=30).json()

    def stop(self) -> None:
        self.stop_polling()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve_standin(port: int, t: float, progress_steps: int | None) -> None:
    """``--serve-standin``: a stand-in (as ``python -m comfy_pipeline.testing.standin``) that prints
    its own records as one JSON line for every ``record`` line on stdin, until stdin closes."""
    from comfy_pipeline.testing.standin import StandInComfyUI

    steps = 4 if progress_steps is None else progress_steps  # the stand-in command's default
    server = StandInComfyUI(port=port, execution_time_s=t, progress_steps=steps, preview_frames=steps > 0)
    server.start()
    print(f"stand-in ComfyUI at {server.url}", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "record":
                print(json.dumps({"max_in_flight": server.max_in_flight, "executions": len(server.executions),
                                  "posts": server.requests[("POST", "/prompt")]}), flush=True)
    finally:
        server.stop()


def free_ports(count: int) -> list[int]:
    from comfy_pipeline.testing.standin import free_port

    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


# ------------------------------------------------------------------------------------------ Prefect


class PrefectServer:
    """``prefect server start`` on a free port with a fresh ``PREFECT_HOME`` (its own session, so
    that stopping it stops the processes it started)."""

    def __init__(self, home: Path):
        self.port = free_ports(1)[0]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_ENABLED="false")
        env.pop("PREFECT_API_URL", None)
        self.log = home.parent / "prefect-server.log"
        home.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server start exited {self.process.returncode}; see {self.log}")
            try:
                if requests.get(f"{self.api_url}/health", timeout=2).ok:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prefect server did not answer within {timeout} s; see {self.log}")

    def flow_runs(self) -> list[dict]:
        answer = requests.post(f"{self.api_url}/flow_runs/filter", json={"limit": 200}, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self._log_file.close()


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -------------------------------------------------------------------------------------------- runs


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "comfy-pipeline"
    if script.exists():
        return [str(script)]
    found = shutil.which("comfy-pipeline")
    return [found] if found else [sys.executable, "-m", "comfy_pipeline.flows.cli"]


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def start_runs(args, urls: list[str], tmp: Path, api_url: str | None) -> list[dict]:
    runs = []
    for number, count in enumerate(split(args.generations, args.runs)):
        character = f"fleet-{chr(ord('a') + number)}"
        descriptions = tmp / f"{character}.txt"
        descriptions.write_text("".join(f"{character} description {i}\n" for i in range(count)))
        out = tmp / character
        command = cli_command() + ["run", *[x for url in urls for x in ("--server", url)], "--workflow", str(WORKFLOW),
                                   "--character", character, "--descriptions", str(descriptions),
                                   "--output-dir", str(out)]
        if args.concurrency is not None:
            command += ["--concurrency", str(args.concurrency)]
        if args.max_in_flight is not None:
            command += ["--max-in-flight", str(args.max_in_flight)]
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        if api_url:
            env["PREFECT_API_URL"] = api_url
        else:  # the CLI's temporary API, each run its own database
            env["PREFECT_HOME"] = str(tmp / f"prefect-home-{character}")
            env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # a busy machine starts it slowly
        log = (tmp / f"{character}.log").open("w")
        runs.append({"character": character, "generations": count, "out": out, "log": log,
                     "log_path": tmp / f"{character}.log", "started": time.monotonic(),
                     "process": subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL)})
    return runs


def wait_runs(runs: list[dict], budget: float) -> bool:
    started = min(r["started"] for r in runs)
    while any(r["process"].poll() is None for r in runs):
        for run in runs:
            if run["process"].poll() is not None and "ended" not in run:
                run["ended"] = time.monotonic()
        if time.monotonic() - started > budget:
            for run in runs:
                if run["process"].poll() is None:
                    run["process"].send_signal(signal.SIGTERM)  # the CLI removes its prompts and exits 143
            for run in runs:
                try:
                    run["process"].wait(timeout=30)
                except subprocess.TimeoutExpired:
                    run["process"].kill()
                    run["process"].wait()
            return False
        time.sleep(0.05)
    for run in runs:
        run.setdefault("ended", time.monotonic())
        run["log"].close()
    return True


def count_files(out: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(out)) if out.exists() else 0


def executions_of(history: dict) -> list[dict]:
    """From a ``/history`` answer: each prompt's start and end (epoch s) and its filename prefix."""
    rows = []
    for prompt_id, entry in history.items():
        stamps = {}
        for kind, data in (entry.get("status") or {}).get("messages", []):
            if kind in ("execution_start", "execution_success", "execution_error", "execution_interrupted"):
                stamps[kind] = data.get("timestamp", 0) / 1000.0
        prompt = entry.get("prompt", [None, None, {}])[2] or {}
        prefix = next((node.get("inputs", {}).get("filename_prefix") for node in prompt.values()
                       if isinstance(node.get("inputs", {}).get("filename_prefix"), str)), "")
        end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
        if "execution_start" in stamps and end:
            rows.append({"prompt_id": prompt_id, "start": stamps["execution_start"], "end": end, "prefix": prefix,
                         "ok": "execution_success" in stamps})
    return rows


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=16, help="stand-in servers (default 16)")
    parser.add_argument("--generations", type=int, default=None,
                        help="generations in all, split between the runs (default: 20 s of work per server, "
                             "20 * servers / seconds: 320 for 16 servers at 1 s)")
    parser.add_argument("--seconds", type=float, default=1.0, help="T: seconds of execution per prompt (default 1)")
    parser.add_argument("--runs", type=int, default=1, help="CLI runs started together (default 1)")
    parser.add_argument("--concurrency", type=int, default=None, help="passed to `comfy-pipeline run` when given")
    parser.add_argument("--max-in-flight", type=int, default=None, help="passed to `comfy-pipeline run` when given")
    parser.add_argument("--progress-steps", type=int, default=None,
                        help="the stand-ins' progress steps per prompt (default: the stand-in's own, 4)")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between GET /queue polls (default 0.05)")
    parser.add_argument("--exact-peak", action="store_true",
                        help="start the stand-ins through this module to also read their own in-flight records")
    parser.add_argument("--temporary-api", action="store_true",
                        help="each CLI run on its own temporary Prefect API (no prefect server started)")
    parser.add_argument("--budget", type=float, default=300, help="seconds before the runs are stopped (300)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, outputs)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--serve-standin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_standin:
        serve_standin(args.port, args.seconds, args.progress_steps)
        return
    if args.generations is None:
        args.generations = max(args.runs, round(20 * args.servers / args.seconds))
    max_in_flight = args.max_in_flight or 2  # the ComfyUI Server block's default
    ideal = args.generations * args.seconds / args.servers

    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    prefect = None if args.temporary_api else PrefectServer(tmp / "prefect-home")
    servers = [StandIn(port, args.seconds, args.progress_steps, args.exact_peak) for port in free_ports(args.servers)]
    completed = False
    try:
        for server in servers:
            server.wait_ready()
        if prefect is not None:
            took = prefect.wait_ready()
            print(f"prefect server at {prefect.api_url} (ready in {took:.1f} s)", flush=True)
        for server in servers:
            server.start_polling(args.poll)
        print(f"{args.runs} run(s), {args.generations} generations, {args.servers} servers, T = {args.seconds:g} s: "
              f"ideal {ideal:.1f} s; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
        runs = start_runs(args, [s.url for s in servers], tmp, prefect.api_url if prefect else None)
        completed = wait_runs(runs, args.budget)
        for server in servers:
            server.stop_polling()
        records = [server.own_record() for server in servers]
        histories = [executions_of(server.history()) for server in servers]
        flow_runs = prefect.flow_runs() if prefect is not None else []
    finally:
        for server in servers:
            server.stop()
        if prefect is not None:
            prefect.stop()

    launched = min(r["started"] for r in runs)
    wall = max(r["ended"] for r in runs) - launched
    every = [e for h in histories for e in h]
    span = (max(e["end"] for e in every) - min(e["start"] for e in every)) if every else float("nan")
    figures: dict = {"servers": args.servers, "runs": args.runs, "generations": args.generations,
                     "seconds": args.seconds, "ideal_s": round(ideal, 2), "completed": completed,
                     "prefect": "temporary API per run" if prefect is None else "prefect server start",
                     "concurrency": args.concurrency, "max_in_flight": max_in_flight,
                     "load_avg_end": round(os.getloadavg()[0], 2)}
    print()
    print("| run | generations | files | exit | CLI wall s | flow run s | first start -> last end on servers s |")
    print("|---|---|---|---|---|---|---|")
    ours = [fr for fr in flow_runs if (fr.get("parameters") or {}).get("character", "").startswith("fleet-")]
    run_rows = []
    for run in runs:
        mine = [e for e in every if f"_{run['character']}_" in e["prefix"] or f"/{run['character']}_" in e["prefix"]]
        run_span = (max(e["end"] for e in mine) - min(e["start"] for e in mine)) if mine else float("nan")
        fr = next((f for f in ours if f["parameters"].get("character") == run["character"]), None)
        fr_span = (_epoch(fr["end_time"]) - _epoch(fr["start_time"])) if fr and fr.get("end_time") else None
        row = {"character": run["character"], "generations": run["generations"], "files": count_files(run["out"]),
               "exit": run["process"].returncode, "cli_wall_s": round(run["ended"] - run["started"], 2),
               "flow_run_s": round(fr_span, 2) if fr_span else None, "server_span_s": round(run_span, 2)}
        run_rows.append(row)
        print(f"| {row['character']} | {row['generations']} | {row['files']} | {row['exit']} | {row['cli_wall_s']} | "
              f"{row['flow_run_s']} | {row['server_span_s']} |")
    figures["runs_detail"] = run_rows

    print()
    exact = args.exact_peak
    header = ("| server | prompts run | busy s | busy / span | first start after the fleet's s | idle between "
              "prompts s | last end before the fleet's s | peak in flight (GET /queue) |")
    header += " peak (server's own record) |" if exact else ""
    print(header + " max_in_flight | within? |")
    print("|---" * (11 if exact else 10) + "|")
    server_rows = []
    first_start = min((e["start"] for e in every), default=0.0)
    last_end = max((e["end"] for e in every), default=0.0)
    for server, history, record in zip(servers, histories, records):
        busy = sum(e["end"] - e["start"] for e in history)
        peak = max(server.polled_peak, (record or {}).get("max_in_flight", 0))
        own_start = min((e["start"] for e in history), default=first_start)
        own_end = max((e["end"] for e in history), default=last_end)
        row = {"url": server.url, "prompts": len(history), "busy_s": round(busy, 2),
               "busy_share": round(busy / span, 3) if span else None,
               "late_start_s": round(own_start - first_start, 2),
               "idle_between_s": round(own_end - own_start - busy, 2),
               "early_end_s": round(last_end - own_end, 2), "polled_peak": server.polled_peak,
               "polls": server.samples, "poll_errors": server.poll_errors,
               "own_record_peak": (record or {}).get("max_in_flight"), "within": peak <= max_in_flight}
        server_rows.append(row)
        line = (f"| :{server.port} | {row['prompts']} | {row['busy_s']} | {row['busy_share']} | "
                f"{row['late_start_s']} | "
                f"{row['idle_between_s']} | {row['early_end_s']} | {server.polled_peak} ({server.samples} polls) |")
        line += f" {row['own_record_peak']} |" if exact else ""
        print(line + f" {max_in_flight} | {'yes' if row['within'] else 'NO'} |")
    figures["servers_detail"] = server_rows

    starts = [_epoch(f["start_time"]) for f in ours if f.get("start_time")]
    ends = [_epoch(f["end_time"]) for f in ours if f.get("end_time")]
    flow_span = (max(ends) - min(starts)) if starts and ends else None
    figures.update({"makespan_s": round(span, 2), "makespan_over_ideal": round(span / ideal, 3),
                    "flow_runs_span_s": round(flow_span, 2) if flow_span else None,
                    "flow_runs_span_over_ideal": round(flow_span / ideal, 3) if flow_span else None,
                    "cli_wall_s": round(wall, 2), "cli_wall_over_ideal": round(wall / ideal, 3),
                    "peak_in_flight_max": max(r["polled_peak"] if r["own_record_peak"] is None
                                              else max(r["polled_peak"], r["own_record_peak"]) for r in server_rows),
                    "servers_over_max_in_flight": sum(not r["within"] for r in server_rows)})
    print()
    print(f"makespan (first prompt started -> last ended, on the servers): {span:.2f} s; ideal "
          f"{args.generations} x {args.seconds:g} s / {args.servers} = {ideal:.2f} s; makespan / ideal = "
          f"{span / ideal:.3f}")
    if flow_span:
        print(f"flow runs (first Running -> last end, Prefect API): {flow_span:.2f} s = "
              f"{flow_span / ideal:.3f} x ideal")
    print(f"CLI commands (processes started -> last exit): {wall:.2f} s = {wall / ideal:.3f} x ideal")
    print(f"peak of our prompts in flight on one server: {figures['peak_in_flight_max']} (max_in_flight "
          f"{max_in_flight}); servers over it: {figures['servers_over_max_in_flight']} of {args.servers}")
    print(f"load average at the end: {figures['load_avg_end']} on {os.cpu_count()} CPUs")
    failed = [r for r in run_rows if r["exit"] != 0 or r["files"] != r["generations"]]
    if failed or not completed:
        for run in runs:
            if run["process"].returncode != 0:
                print(f"\n--- {run['character']} (exit {run['process'].returncode}), end of {run['log_path']}:")
                print(run["log_path"].read_text(errors="replace")[-2000:])
        print(f"\nsome runs did not complete (logs kept in {tmp})")
        args.keep = True
    if args.json:
        print(json.dumps(figures))
    if args.keep:
        print(f"kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if failed or not completed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
