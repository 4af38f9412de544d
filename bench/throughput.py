"""Throughput benchmark: the usual scripts vs. our flow, on stand-in ComfyUI servers.

Every prompt takes a fixed T seconds of "GPU" time on a stand-in server (tests/standin.py) with
a per-request latency and a realistic output size, so submit and download cost something as
on a real network. Run from the repository root:

    python -m bench.throughput                 # N=200, T=0.25 s, then 2000 generations at T=0
    python -m bench.throughput --n 50 --t 0.1  # quicker

Scenarios, each on fresh servers:
  a) baseline: a new WebSocket per prompt, sequential (what home-made scripts do)
  b) baseline: one WebSocket, strictly sequential submit -> wait -> download
  c) our flow, one server;  d) our flow, two servers
  e) our flow, 2000 generations at T=0, in a child process (peak RSS measured there)

Printed per scenario: makespan, the ideal (N*T per server), makespan/ideal, generations per
second, orchestration overhead per generation in ms ((makespan - ideal) / N), and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
import websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import peak_rss_mb  # noqa: E402
from tests.standin import StandInComfyUI  # noqa: E402

WORKFLOW = ROOT / "examples" / "workflows" / "smoke_image.json"


def standins(count: int, t: float, latency: float, size: int) -> list[StandInComfyUI]:
    servers = []
    for _ in range(count):
        server = StandInComfyUI(execution_time_s=t, preview_frames=False)
        server.request_latency_s = latency
        server.output_size_bytes = size
        servers.append(server.start())
    return servers


def prompt_for(i: int) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": i}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"bench/b{i}"}},
    }


def _one_script_generation(url: str, ws: websocket.WebSocket, client_id: str, i: int, out: Path) -> None:
    """What the usual script does for one description: submit, wait for the end, download."""
    answer = requests.post(f"{url}/prompt", json={"prompt": prompt_for(i), "client_id": client_id}).json()
    prompt_id = answer["prompt_id"]
    while True:
        frame = ws.recv()
        if isinstance(frame, str):
            msg = json.loads(frame)
            data = msg.get("data") or {}
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
    history = requests.get(f"{url}/history/{prompt_id}").json()[prompt_id]
    for output in history["outputs"].values():
        for item in output.get("images", []):
            body = requests.get(f"{url}/view", params=item).content
            (out / f"{prompt_id}_{item['filename']}").write_bytes(body)


def baseline_new_socket_per_prompt(url: str, n: int, out: Path) -> None:
    for i in range(n):
        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"{url.replace('http', 'ws')}/ws?clientId={client_id}")
        try:
            _one_script_generation(url, ws, client_id, i, out)
        finally:
            ws.close()


def baseline_one_socket_sequential(url: str, n: int, out: Path) -> None:
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"{url.replace('http', 'ws')}/ws?clientId={client_id}")
    try:
        for i in range(n):
            _one_script_generation(url, ws, client_id, i, out)
    finally:
        ws.close()


def our_flow(urls: list[str], n: int, out: Path) -> None:
    from comfy_pipeline.blocks.server import ComfyUIServer, ComfyUIServerPool
    from comfy_pipeline.flows.generate_content import generate_content

    servers = [ComfyUIServer(url=u) for u in urls]
    server = servers[0] if len(servers) == 1 else ComfyUIServerPool.of(servers)
    state = generate_content(server=server, workflow=str(WORKFLOW), descriptions=[f"d{i}" for i in range(n)],
                             character="bench", output_dir=str(out), return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"flow run {state.name}: {state.message}")


def measure(name: str, n: int, t: float, n_servers: int, run, *, latency: float, size: int) -> dict:
    servers = standins(n_servers, t, latency, size)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            run([s.url for s in servers], n, Path(tmp))
            makespan = time.monotonic() - started
    finally:
        for server in servers:
            server.stop()
    ideal = n * t / n_servers
    return {
        "scenario": name, "n": n, "t": t, "servers": n_servers,
        "makespan_s": round(makespan, 2), "ideal_s": round(ideal, 2),
        "ratio": round(makespan / ideal, 3) if ideal else None,
        "gen_per_s": round(n / makespan, 2),
        "overhead_ms": round((makespan - ideal) / n * 1000, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def measure_external(n: int, t: float, *, latency: float, size: int) -> dict:
    """Our flow against a stand-in in its own process, so that this process's peak RSS is ours
    alone (the stand-in keeps every output file in memory)."""
    from tests.standin import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.standin", "--port", str(port), "--execution-time", str(t),
         "--progress-steps", "0", "--latency", str(latency), "--output-size", str(size)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        server.stdout.readline()  # "stand-in ComfyUI at ..." once it accepts
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            our_flow([f"http://127.0.0.1:{port}"], n, Path(tmp))
            makespan = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"scenario": f"e) our flow, {n} at T={t:g} (server in another process)", "n": n, "t": t,
            "servers": 1, "makespan_s": round(makespan, 2), "ideal_s": round(n * t, 2),
            "ratio": round(makespan / (n * t), 3) if t else None, "gen_per_s": round(n / makespan, 2),
            "overhead_ms": round((makespan - n * t) / n * 1000, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def warm_up() -> None:
    """Start Prefect's temporary API and import everything before anything is timed."""
    measure("warm-up", 2, 0.0, 1, our_flow, latency=0, size=0)


def print_table(rows: list[dict]) -> None:
    cols = ["scenario", "n", "t", "servers", "makespan_s", "ideal_s", "ratio", "gen_per_s", "overhead_ms",
            "peak_rss_mb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="generations per scenario (default 200)")
    parser.add_argument("--t", type=float, default=0.25, help="seconds of execution per prompt (default 0.25)")
    parser.add_argument("--latency", type=float, default=0.005, help="seconds added to every HTTP answer")
    parser.add_argument("--size", type=int, default=200_000, help="bytes per output file")
    parser.add_argument("--large-n", type=int, default=2000, help="generations of the T=0 run (0 skips it)")
    parser.add_argument("--only-ours", action="store_true", help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    knobs = dict(latency=args.latency, size=args.size)

    if args.only_ours:  # the large run: our flow alone in this process, the server in another
        warm_up()
        print(json.dumps(measure_external(args.n, args.t, **knobs)))
        return

    warm_up()
    rows = [
        measure("a) new WebSocket per prompt, sequential", args.n, args.t, 1,
                lambda urls, n, out: baseline_new_socket_per_prompt(urls[0], n, out), **knobs),
        measure("b) one WebSocket, sequential", args.n, args.t, 1,
                lambda urls, n, out: baseline_one_socket_sequential(urls[0], n, out), **knobs),
        measure("c) our flow, 1 server", args.n, args.t, 1, our_flow, **knobs),
        measure("d) our flow, 2 servers", args.n, args.t, 2, our_flow, **knobs),
    ]
    if args.large_n:
        child = subprocess.run(
            [sys.executable, "-m", "bench.throughput", "--only-ours", "--n", str(args.large_n), "--t", "0",
             "--latency", str(args.latency), "--size", str(args.size)],
            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ),
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode != 0 or not lines:
            print(child.stdout[-3000:], child.stderr[-3000:], file=sys.stderr)
            raise SystemExit("the large run failed")
        rows.append(json.loads(lines[-1]))
    print()
    print_table(rows)
    one, two = rows[2], rows[3]
    print(f"\ntwo servers vs one: {two['gen_per_s'] / one['gen_per_s']:.2f}x throughput")


if __name__ == "__main__":
    main()
