"""How long the two worst network faults cost, with the default settings (not a test).

Run from the repository root:

    python -m bench.faults              # both scenarios, about 1 minute
    python -m bench.faults --t 1.0      # slower prompts

a) **A silent WebSocket.** One stand-in behind tests/faultproxy.py, a real TCP proxy. After one
   prompt, the proxy stops forwarding the WebSocket's connection without closing it (a load
   balancer that forgot the flow; HTTP keeps working). Then prompts are run one after another
   on the same connection, default ``ComfyUIServer`` settings (``keepalive_s`` 1.5,
   ``idle_timeout_s`` 30). Printed: each prompt's time from submit to its outputs listed.
   Before keepalive each of them took ``idle_timeout_s`` (30 s); the target is under 3 s.

b) **A server killed for good mid-run.** Two stand-ins, T seconds per prompt, 16 generations
   through the flow (a ComfyUIServerPool of both, default settings: ``failover_after_s`` 10,
   ``reconnect_timeout_s`` 120). One server is stopped for good once it has run 3 prompts.
   Printed: the flow's wall time, when the healthy server finished the last prompt that was its
   own (not moved), and the run's end minus that. The target: at most ``failover_after_s`` + 2 x T
   (the prompts that were on the dead server wait ``failover_after_s``, then run on the healthy
   one). Before failover, they waited ``reconnect_timeout_s``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faultproxy import FaultProxy  # noqa: E402
from tests.standin import StandInComfyUI  # noqa: E402


def image_prompt(i: int) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": i}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"faults/p{i}"}},
    }


def silent_socket(prompts: int, t: float) -> list[float]:
    from comfy_pipeline.blocks.server import ComfyUIServer

    with StandInComfyUI(execution_time_s=t, preview_frames=False) as comfy, FaultProxy(comfy.port) as proxy:
        with ComfyUIServer(url=proxy.url).connect() as conn:
            conn.run_prompt(image_prompt(0))
            proxy.stall(websockets_only=True)
            took = []
            for i in range(1, prompts + 1):
                started = time.monotonic()
                conn.run_prompt(image_prompt(i))
                took.append(time.monotonic() - started)
            print(f"  outages: {[o.reason for o in conn.stats.outages]}")
    return took


def killed_server(t: float, generations: int) -> dict:
    from prefect.testing.utilities import prefect_test_harness

    from comfy_pipeline.blocks.server import ComfyUIServer, ComfyUIServerPool
    from comfy_pipeline.flows.generate_content import generate_content

    a = StandInComfyUI(execution_time_s=t, preview_frames=False).start()
    b = StandInComfyUI(execution_time_s=t, preview_frames=False).start()
    finished_on_b: dict[str, float] = {}  # prompt_id -> when it first showed in b's history
    watching = threading.Event()

    def watch_b():
        while not watching.is_set():
            now = time.monotonic()
            for prompt_id in b.history_snapshot():
                finished_on_b.setdefault(prompt_id, now)
            time.sleep(0.02)

    def kill_a():
        while len(a.executions_per_prompt_id) < 3:
            time.sleep(0.01)
        a.stop()

    try:
        with prefect_test_harness(server_startup_timeout=120), tempfile.TemporaryDirectory() as out:
            threading.Thread(target=kill_a, daemon=True).start()
            threading.Thread(target=watch_b, daemon=True).start()
            pool = ComfyUIServerPool.of([ComfyUIServer(url=a.url), ComfyUIServer(url=b.url)])
            started = time.monotonic()
            state = generate_content(server=pool, workflow=str(ROOT / "examples" / "workflows" / "smoke_image.json"),
                                     descriptions=[f"scene {i}" for i in range(generations)], character="faults",
                                     output_dir=out, retry_delay_s=1.0, return_state=True)
            ended = time.monotonic()
            watching.set()
            results = state.result() if state.is_completed() else []
            own = [r for r in results if r.server == b.url and not r.moved_from]
            moved = [r for r in results if r.moved_from]
            own_done = max(finished_on_b.get(r.prompt_id, ended) for r in own) if own else started
            return {"state": state.type.value, "results": len(results), "moved": len(moved),
                    "ran on the healthy server": sum(b.executions_per_prompt_id.values()),
                    "wall_s": ended - started, "healthy share done at_s": own_done - started,
                    "run end minus that_s": ended - own_done, "target_s": 10.0 + 2 * t}
    finally:
        for server in (a, b):
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t", type=float, default=0.5, help="seconds per prompt on the stand-ins")
    parser.add_argument("--prompts", type=int, default=5, help="prompts after the socket went silent (a)")
    parser.add_argument("--generations", type=int, default=16, help="generations of the flow run (b)")
    args = parser.parse_args()

    print(f"a) silent WebSocket, default settings, T={args.t} s")
    took = silent_socket(args.prompts, args.t)
    print("  per prompt (s): " + ", ".join(f"{x:.2f}" for x in took) + f"   max {max(took):.2f}")

    print(f"b) one of two servers killed for good, {args.generations} generations, T={args.t} s, default settings")
    facts = killed_server(args.t, args.generations)
    print("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in facts.items()))


if __name__ == "__main__":
    main()
