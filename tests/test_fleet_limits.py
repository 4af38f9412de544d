"""Slots shared across flow runs: one Prefect global concurrency limit per ComfyUI server
(issue 11 item 2, ``blocks/limits.py``), over real sockets: Prefect's local test API (or a Prefect
server of the test's own, which runs the repossessor), the stand-in ComfyUI.

This module is also the lease storage of that server (``ConcurrencyLeaseStorage`` below): Prefect's
API accepts no lease shorter than 60 s, so the server keeps each lease for ``LEASE_SCALE`` of what
was asked (60 s -> 3 s) and a killed holder's slot comes back within seconds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.server.concurrency.lease_storage import memory
from prefect.settings import PREFECT_API_URL, temporary_settings

from comfy_pipeline.blocks.limits import SharedSlots, limit_name
from comfy_pipeline.blocks.pool import ConnectionPool
from comfy_pipeline.blocks.server import ComfyUIServer
from comfy_pipeline.flows.generate_content import generate_content
from tests.conftest import EXAMPLES, ROOT
from tests.standin import StandInComfyUI, free_port

pytestmark = [pytest.mark.usefixtures("no_leaked_threads"), pytest.mark.timeout(120)]

SMOKE_IMAGE = str(EXAMPLES / "smoke_image.json")
LEASE_SCALE = 0.05  # of the lease asked for, on the test's own Prefect server


class ConcurrencyLeaseStorage(memory.ConcurrencyLeaseStorage):
    """Prefect's in-memory lease storage, keeping each lease ``LEASE_SCALE`` of its asked time."""

    async def create_lease(self, resource_ids, ttl, metadata=None):
        return await super().create_lease(resource_ids, ttl * LEASE_SCALE, metadata)

    async def renew_lease(self, lease_id, ttl: timedelta):
        return await super().renew_lease(lease_id, ttl * LEASE_SCALE)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def read_limit(name: str):
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def active_slots(name: str, *, becomes: int, within_s: float = 5.0) -> int:
    """The limit's active slots once they are ``becomes`` or ``within_s`` seconds have passed (a
    slot is given back by the lease thread just after its prompt's ``run_prompt`` returned)."""
    deadline = time.monotonic() + within_s
    while (value := read_limit(name).active_slots) != becomes and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def image_prompt(prefix: str) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def saved_server(url: str, **settings) -> ComfyUIServer:
    """A ComfyUI Server block saved under a name of its own (so its limit is this test's alone)."""
    name = unique("fleet")
    ComfyUIServer(url=url, **settings).save(name)
    return ComfyUIServer.load(name)


def run_flows_together(server: ComfyUIServer, tmp_path: Path, characters: list[str], descriptions: list[str]):
    """Run ``generate_content`` once per character, all at once, each in its own thread; the states."""
    start = threading.Barrier(len(characters))
    states: dict[str, object] = {}

    def one(character: str) -> None:
        start.wait()
        try:
            states[character] = generate_content(
                server=server, workflow=SMOKE_IMAGE, descriptions=descriptions, character=character,
                output_dir=str(tmp_path / character), retry_delay_s=0.05, return_state=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            states[character] = exc

    threads = [threading.Thread(target=one, args=(c,)) for c in characters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return states


def test_two_concurrent_flow_runs_never_have_two_prompts_on_a_server_whose_limit_is_one(
        prefect_api, tmp_path):
    """Two flow runs at once on one server of max_in_flight=1 (each run alone would send one of its
    own): its queue never holds two of our prompts, both runs complete, every slot comes back.

    Prefect on SQLite may start one of two flow runs started together many seconds late (its client
    waits 2, 4, 8 s after each "database is locked"), so until both runs are connected to the
    server every POST /prompt waits 1 s there: the first run cannot be over before the second
    begins."""
    n = 12
    descriptions = [f"scene {i}" for i in range(n)]
    with StandInComfyUI(execution_time_s=0.25) as gpu:
        server = saved_server(gpu.url, max_in_flight=1)
        gpu.delay_prompt_posts(1.0)

        def full_speed_once_both_are_connected():
            deadline = time.monotonic() + 60
            while gpu.ws_open_now < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            gpu.delay_prompt_posts(0)

        threading.Thread(target=full_speed_once_both_are_connected, daemon=True).start()
        states = run_flows_together(server, tmp_path, ["alice", "bob"], descriptions)
        for character, state in states.items():
            assert not isinstance(state, BaseException), f"{character}: {state!r}"
            assert state.is_completed(), state.message
            assert len(state.result()) == n and all(r.files for r in state.result())
        assert gpu.max_in_flight == 1
        runs = [("alice" if any("alice" in s for s in e["strings"]) else "bob") for e in gpu.executions]
        assert sorted(runs) == ["alice"] * n + ["bob"] * n
        assert gpu.max_ws_open == 2, "the two runs were never connected at the same time"
    limit = read_limit(limit_name(server))
    assert (limit.limit, limit.active_slots) == (1, 0)


@pytest.mark.parametrize("share", [True, False], ids=["shared", "not shared (control)"])
def test_a_second_pool_waits_for_the_first_ones_prompt_when_the_limit_is_full(prefect_api, comfy, share):
    """Two pools (two flow runs) on one server of max_in_flight=1: B's prompt, asked for while A's
    runs, is posted only once A's has finished and given its slot back (ComfyUI never holds both).
    Without sharing it is posted at once and waits in ComfyUI's queue: two at once."""
    server = saved_server(comfy.url, max_in_flight=1, share_slots=share)
    with ConnectionPool.open(server) as a, ConnectionPool.open(server) as b:
        first = threading.Thread(target=a.run_prompt, args=(image_prompt("a/[[sleep=1.5]]"),),
                                 kwargs=dict(prompt_id=str(uuid.uuid4())))
        first.start()
        deadline = time.monotonic() + 10
        while not comfy.executions and time.monotonic() < deadline:
            time.sleep(0.02)
        outcome, refs, _ = b.run_prompt(image_prompt("b/[[sleep=0.2]]"), prompt_id=str(uuid.uuid4()))
        first.join(10)
        assert refs
    assert len(comfy.executions) == 2
    assert comfy.max_in_flight == (1 if share else 2)
    if share:
        assert read_limit(limit_name(server)).active_slots == 0


def test_the_limit_is_created_with_max_in_flight_and_an_existing_limit_is_used_as_it_is(
        prefect_api, comfy, tmp_path):
    """First use creates comfyui-<block name> with max_in_flight slots; a limit that exists (set to
    1 in the UI, say) is never changed and bounds the run: the peak on the server stays 1 although
    the block says 4 and the run has 5 threads."""
    fresh = saved_server(comfy.url, max_in_flight=3)
    assert limit_name(fresh) == f"comfyui-{fresh._block_document_name}"
    with ConnectionPool.open(fresh):
        limit = read_limit(limit_name(fresh))
        assert (limit.limit, limit.active) == (3, True)

    comfy.execution_time_s = 0.2
    server = saved_server(comfy.url, max_in_flight=4)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name(server), limit=1))
    state = generate_content(server=server, workflow=SMOKE_IMAGE, descriptions=[f"scene {i}" for i in range(6)],
                             character="limited", output_dir=str(tmp_path / "out"), return_state=True)
    assert state.is_completed(), state.message
    assert len(comfy.executions) == 6
    assert comfy.max_in_flight == 1
    limit = read_limit(limit_name(server))
    assert (limit.limit, limit.active_slots) == (1, 0)


def test_every_way_a_prompt_ends_gives_its_slot_back(prefect_api, comfy):
    """Success, a node error, a timeout, a prompt that could not be made (an upload that failed),
    and a close with prompts in flight: each slot is held while its prompt is on the server and
    given back when ``run_prompt`` ends, whichever way."""
    from comfy_pipeline.blocks.errors import GenerationCancelled, GenerationTimeout, NodeExecutionError

    comfy.execution_time_s = 0.1
    server = saved_server(comfy.url, max_in_flight=4)
    name = limit_name(server)
    pool = ConnectionPool.open(server)
    try:
        pool.run_prompt(image_prompt("ok"), prompt_id=str(uuid.uuid4()))
        with pytest.raises(NodeExecutionError):
            pool.run_prompt(image_prompt("bad/[[fail]]"), prompt_id=str(uuid.uuid4()))
        with pytest.raises(GenerationTimeout):
            pool.run_prompt(image_prompt("slow/[[hang]]"), prompt_id=str(uuid.uuid4()), timeout_s=0.5)

        def no_upload(connection):
            raise OSError("the input image could not be uploaded")
        with pytest.raises(OSError):
            pool.run_prompt(no_upload, prompt_id=str(uuid.uuid4()))
        assert active_slots(name, becomes=0) == 0

        errors = []
        threads = [threading.Thread(target=lambda: errors.append(pytest.raises(
            GenerationCancelled, pool.run_prompt, image_prompt("stuck/[[hang]]"), prompt_id=str(uuid.uuid4()))))
            for _ in range(3)]
        for thread in threads:
            thread.start()
        assert active_slots(name, becomes=3, within_s=10) == 3  # held while on the server
    finally:
        pool.close()
    for thread in threads:
        thread.join(10)
    assert len(errors) == 3
    assert read_limit(name).active_slots == 0
    # as in ComfyUI, an interrupt stops the running prompt a moment after it is answered
    deadline = time.monotonic() + 5
    while comfy.queue_snapshot()["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}


def test_a_moved_prompt_gives_back_its_slot_and_takes_one_on_its_new_server(prefect_api):
    """A prompt whose server becomes unreachable moves to the other server: its slot there is
    given back at the move, it holds one of the new server's, and nothing is held at the end."""
    from tests.test_connection_races import Gate

    settings = dict(connect_timeout_s=1, idle_timeout_s=1.0, generation_timeout_s=30, max_in_flight=1,
                    failover_after_s=0.5, reconnect_timeout_s=30)
    with StandInComfyUI() as a_srv, StandInComfyUI() as b_srv, Gate(a_srv.port) as ga, Gate(b_srv.port) as gb:
        a_block, b_block = saved_server(ga.url, **settings), saved_server(gb.url, **settings)
        with ConnectionPool.open([a_block, b_block]) as pool:
            a, b = pool.connections
            box: dict = {}
            mover = threading.Thread(target=lambda: box.update(result=pool.run_prompt(
                image_prompt("mv/[[sleep=3]]"), prompt_id=str(uuid.uuid4()), on=a)))
            mover.start()
            deadline = time.monotonic() + 5
            while not a_srv.executions and time.monotonic() < deadline:
                time.sleep(0.02)
            assert read_limit(limit_name(a_block)).active_slots == 1
            ga.cut()  # for good: after 0.5 s the prompt moves to B
            deadline = time.monotonic() + 10
            while not b_srv.executions and time.monotonic() < deadline:
                time.sleep(0.05)
            assert b_srv.executions, "the prompt did not move"
            assert active_slots(limit_name(a_block), becomes=0) == 0
            assert read_limit(limit_name(b_block)).active_slots == 1
            mover.join(15)
            assert box["result"][0].moved_from == ga.url and box["result"][2] is b
        assert read_limit(limit_name(b_block)).active_slots == 0


def test_limit_names_come_from_the_block_name_else_the_url():
    saved = ComfyUIServer(url="http://10.0.0.7:8188")
    saved._block_document_name = "GPU 1"
    assert limit_name(saved) == "comfyui-gpu-1"
    assert limit_name(ComfyUIServer(url="http://10.0.0.7:8188")) == "comfyui-10-0-0-7-8188"
    assert limit_name(ComfyUIServer(url="https://comfy.example.com/b")) == "comfyui-comfy-example-com-443-b"


# ------------------------------------------------------------------ a process killed holding a slot

HOLDER = """
import sys, time
from comfy_pipeline.blocks.limits import SharedSlots
shared = SharedSlots.open({sys.argv[1]: 1}, renew_every_s=0.5)
lease = shared.try_take(sys.argv[1])
print("taken" if lease is not None and lease.lease_id is not None else "not taken", flush=True)
time.sleep(600)
"""


def _answers(process: subprocess.Popen, url: str) -> bool:
    """Wait for the Prefect server ``process`` to answer at ``url`` (90 s at most); False when it
    exited first (e.g. its port was taken meanwhile)."""
    deadline = time.monotonic() + 90
    while process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail("the Prefect server did not answer within 90 s")
        time.sleep(0.2)
    return False


@pytest.fixture
def prefect_server(tmp_path):
    """A Prefect server of this test's own (not ephemeral: it runs the repossessor, every 0.5 s),
    keeping leases LEASE_SCALE of their time; yields its API URL."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_UI_ENABLED="0",
               PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
               PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="tests.test_fleet_limits",
               PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="0.5",
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
               PREFECT_SERVER_SERVICES_FOREMAN_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    for _ in range(3):  # a free port may be taken by another process before the server binds it
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory",
                                    "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                                    str(port), "--log-level", "error"], cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}/api"
        if _answers(process, url):
            break
    else:
        pytest.fail("the Prefect server did not start (3 ports tried)")
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_process_killed_holding_a_slot_gives_it_back_when_its_lease_ends(prefect_server):
    name = unique("comfyui-killed")
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        shared = SharedSlots.open({name: 1}, renew_every_s=0.5)
        assert shared is not None
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, name], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PREFECT_API_URL=prefect_server, PYTHONPATH=str(ROOT)))
        try:
            assert holder.stdout.readline().strip() == "taken"
            # Renewed every 0.5 s, the holder keeps its slot past the 3 s its lease lasts.
            alive_until = time.monotonic() + 4.5
            while time.monotonic() < alive_until:
                assert shared.try_take(name) is None, "the slot of a live holder was taken"
                time.sleep(0.5)
            assert read_limit(name).active_slots == 1
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            killed = time.monotonic()
            lease = None
            while lease is None and time.monotonic() - killed < 20:
                time.sleep(0.1)
                lease = shared.try_take(name)
            waited = time.monotonic() - killed
            assert lease is not None and lease.lease_id is not None, "the killed holder's slot never came back"
            # it came back when the lease ended (<= 3 s after the last renewal), not at once
            assert 1.0 < waited < 3.0 + 0.5 + 5.0, waited
            assert shared.held(name) == 1
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
            holder.stdout.close()
            shared.close()
        assert read_limit(name).active_slots == 0  # close() gave ours back


# ------------------------------------------------------------------ without a Prefect API that can share

class PoolLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


def run_prompts(comfy, n: int, **settings):
    """``n`` prompts at once through a pool of ``comfy`` (max_in_flight 2); (results, warnings, pool)."""
    log = logging.getLogger(unique("test-fleet"))
    handler = PoolLog()
    log.addHandler(handler)
    log.propagate = False
    results: list = []
    with ConnectionPool.open(ComfyUIServer(url=comfy.url, max_in_flight=2, **settings), logger=log) as pool:
        threads = [threading.Thread(target=lambda i=i: results.append(
            pool.run_prompt(image_prompt(f"fallback/p{i}"), prompt_id=str(uuid.uuid4()))))
            for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    return results, handler.warnings(), pool


def test_without_a_prefect_api_url_no_warning_and_per_run_slots(comfy):
    comfy.execution_time_s = 0.1
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        results, warnings, pool = run_prompts(comfy, 5)
    assert len(results) == 5 and pool.shared is None
    # no warning (an INFO line): with Prefect's temporary API no other flow run could share the slots
    # anyway, and the README's first runs all work this way
    assert warnings == [], warnings
    assert comfy.max_in_flight == 2


def test_a_prefect_api_that_cannot_be_reached_one_warning_and_per_run_slots(comfy):
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        results, warnings, pool = run_prompts(comfy, 3)
    assert len(results) == 3 and pool.shared is None
    assert len(warnings) == 1 and "could not read or create" in warnings[0], warnings


class OldPrefectServer(BaseHTTPRequestHandler):
    """A Prefect API with global concurrency limits but no leases (before Prefect 3.4)."""

    def do_GET(self):  # noqa: N802 - the limit, as it exists
        if "/v2/concurrency_limits/" not in self.path:  # e.g. /csrf-token: not on an old server
            return self.do_POST()
        name = self.path.rsplit("/", 1)[-1]
        body = (f'{{"id": "{uuid.uuid4()}", "name": "{name}", "limit": 2, "active": true, "active_slots": 0, '
                f'"slot_decay_per_second": 0.0, "created": "2025-01-01T00:00:00Z", '
                f'"updated": "2025-01-01T00:00:00Z"}}').encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - no /v2/concurrency_limits/increment-with-lease here
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"detail": "Not Found"}'
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_prefect_server_without_leases_one_warning_and_per_run_slots(comfy):
    comfy.execution_time_s = 0.1
    api = ThreadingHTTPServer(("127.0.0.1", 0), OldPrefectServer)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{api.server_address[1]}/api"}):
            results, warnings, pool = run_prompts(comfy, 5)
    finally:
        api.shutdown()
        api.server_close()
    assert len(results) == 5 and pool.shared is not None and pool.shared.off
    assert len(warnings) == 1 and "no longer shared" in warnings[0] and "404" in warnings[0], warnings
    assert comfy.max_in_flight == 2


class SlowLeasesServer(BaseHTTPRequestHandler):
    """A Prefect API that answers a take (increment-with-lease) after ``DELAY_S``; records the takes
    it got and the leases still held (given back with decrement-with-lease)."""

    DELAY_S = 2.0
    takes: list = []
    active: set = set()

    def do_GET(self):  # noqa: N802 - /csrf-token: not on this server
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/increment-with-lease"):
            SlowLeasesServer.takes.append(time.monotonic())
            time.sleep(self.DELAY_S)
            lease_id = str(uuid.uuid4())
            SlowLeasesServer.active.add(lease_id)
            answer = f'{{"lease_id": "{lease_id}", "limits": [{{"name": "slow", "limit": 8}}]}}'.encode()
        else:
            if self.path.endswith("/decrement-with-lease"):
                SlowLeasesServer.active.discard(json.loads(body)["lease_id"])
            answer = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_takes_waiting_their_turn_make_no_call_once_the_slots_are_closed():
    """Takes go one at a time (TAKES_AT_ONCE). With the API slow to answer and four generations
    taking at once, close() (the run stopped) waits only for the take under way: the three waiting
    their turn make no call, get no slot, and no lease is left on the server."""
    SlowLeasesServer.takes, SlowLeasesServer.active = [], set()
    api = ThreadingHTTPServer(("127.0.0.1", 0), SlowLeasesServer)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{api.server_address[1]}/api"}):
            client = get_client(sync_client=True, httpx_settings={"timeout": 10.0})
            client.__enter__()
            shared = SharedSlots(client, {"slow": 8})
            got: list = []
            takers = [threading.Thread(target=lambda: got.append(shared.try_take("slow"))) for _ in range(4)]
            for taker in takers:
                taker.start()
            time.sleep(0.5)
            closing = time.monotonic()
            shared.close()
            closed_in = time.monotonic() - closing
            for taker in takers:
                taker.join(10)
    finally:
        api.shutdown()
        api.server_close()
    assert len(SlowLeasesServer.takes) == 1  # the others never called
    assert closed_in < SlowLeasesServer.DELAY_S + 1.0, closed_in
    assert sorted(lease is None for lease in got) == [False, True, True, True]  # one slot, given back
    assert SlowLeasesServer.active == set()
