"""Silent and deaf WebSockets: a proxy that stops forwarding, and ComfyUI forgetting our client_id.

The stand-in sits behind :class:`tests.faultproxy.FaultProxy`, a real TCP proxy on 127.0.0.1.
Before keepalive, each prompt after such a fault waited ``idle_timeout_s`` (30 s by default)
for messages that never came, and the connection kept calling itself connected.
"""

from __future__ import annotations

import threading
import time

import pytest

from comfy_pipeline.blocks.server import ComfyUIServer
from tests.faultproxy import FaultProxy
from tests.test_connection import image_prompt

pytestmark = [pytest.mark.usefixtures("no_leaked_threads"), pytest.mark.timeout(60)]


@pytest.fixture
def proxy(comfy):
    with FaultProxy(comfy.port) as p:
        yield p


def _reasons(conn) -> list[str]:
    return [o.reason for o in conn.stats.outages]


def test_a_proxy_that_goes_silent_is_noticed_and_every_prompt_completes_soon(comfy, proxy):
    comfy.execution_time_s = 0.05
    with ComfyUIServer(url=proxy.url).connect() as conn:  # default settings: idle_timeout_s 30
        conn.run_prompt(image_prompt("s/before"))
        assert proxy.stall(websockets_only=True) == 1  # the WebSocket's flow is forgotten, HTTP still works
        took = []
        for i in range(3):
            started = time.monotonic()
            outcome, refs = conn.run_prompt(image_prompt(f"s/after{i}"))
            took.append(time.monotonic() - started)
            assert refs
        assert conn.stats.disconnects == 1 and conn.stats.reconnects == 1
        assert any(r.startswith(("deaf", "silent")) for r in _reasons(conn)), _reasons(conn)
        assert conn.connected
    # far below the 30 s each of them waited before (the exact figure is measured in bench/)
    assert max(took) < 10, took


def test_a_silent_socket_with_nothing_to_send_is_pinged_and_replaced(comfy, proxy):
    with ComfyUIServer(url=proxy.url, keepalive_s=0.5).connect() as conn:
        proxy.stall(websockets_only=True)
        deadline = time.monotonic() + 10
        while conn.stats.reconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conn.stats.reconnects == 1
        assert _reasons(conn) == ["silent: no answer to a ping within 0.5 s"]
        assert conn.stats.outages[0].ended is not None
        assert proxy.websocket_connections == 2


def _make_deaf(comfy, proxy, conn) -> None:
    """Transcript h: our socket goes silent, we reconnect with the same client_id (the server's map
    now points at the new socket), then the server finally drops the old one and its cleanup
    removes our client_id: the new socket hears nothing any more. (On a loaded machine a pong can
    come late and the new socket be replaced too, before the old one is dropped: that heals it,
    so the scene is set again.)"""
    for _ in range(3):
        reconnects = conn.stats.reconnects
        proxy.stall(websockets_only=True)
        deadline = time.monotonic() + 10
        while conn.stats.reconnects == reconnects and time.monotonic() < deadline:
            time.sleep(0.02)
        assert conn.stats.reconnects > reconnects
        assert proxy.drop_silent() >= 1
        deadline = time.monotonic() + 5
        while comfy.ws_open_now != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        if comfy.ws_open_now == 1 and conn.client_id not in comfy._sockets:
            return  # the stand-in forgot us
    raise AssertionError("could not make the socket deaf")


def test_deaf_after_a_reconnect_is_noticed_at_the_next_post(comfy, proxy):
    comfy.execution_time_s = 0.05
    with ComfyUIServer(url=proxy.url, keepalive_s=0.5).connect() as conn:
        _make_deaf(comfy, proxy, conn)
        before = conn.stats.reconnects
        outcome, refs = conn.run_prompt(image_prompt("deaf/post"))
        assert refs
        assert conn.stats.reconnects == before + 1
        assert _reasons(conn)[-1].startswith("deaf: no queue status"), _reasons(conn)
        assert conn.client_id in comfy._sockets  # heard again
        outcome, refs = conn.run_prompt(image_prompt("deaf/after"))  # and the next one is normal
        assert refs


def test_a_completion_the_socket_never_delivered_makes_it_reconnect(comfy, proxy):
    comfy.execution_time_s = 0.05
    with ComfyUIServer(url=proxy.url, keepalive_s=0.5, idle_timeout_s=1.0).connect() as conn:
        # a prompt in flight while the socket goes deaf: no POST follows to reveal it
        prompt_id = conn.submit(image_prompt("deaf/[[sleep=2.5]]"))
        threading.Thread(target=_make_deaf, args=(comfy, proxy, conn), daemon=True).start()
        outcome = conn.wait(prompt_id)
        assert outcome.prompt_id == prompt_id
        deadline = time.monotonic() + 5
        reason = f"deaf: ComfyUI finished prompt {prompt_id} but the WebSocket never said so"
        while reason not in _reasons(conn) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reason in _reasons(conn), _reasons(conn)
        while conn.client_id not in comfy._sockets and time.monotonic() < deadline:
            time.sleep(0.02)  # the replacement socket is on its way
        assert conn.client_id in comfy._sockets
        _, refs = conn.run_prompt(image_prompt("deaf/next"))
        assert refs
