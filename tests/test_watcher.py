"""The per-prompt decisions without sockets: deadlines, checks with the server, failover, PromptLost.

A :class:`PromptWatcher` is driven here by hand with a fake clock (plain numbers), the way the
connection drives it with ``time.monotonic()``.
"""

from __future__ import annotations

import pytest

from comfy_pipeline.blocks.errors import ConnectionLost, GenerationTimeout, NodeExecutionError, PromptLost
from comfy_pipeline.blocks.watcher import MIN_POLL_INTERVAL_S, Link, PromptWatcher

URL = "http://gpu-1:8188"


def watcher(**kw) -> PromptWatcher:
    options = dict(url=URL, submitted_at=0.0, queue_timeout_s=100.0, run_timeout_s=10.0, idle_timeout_s=30.0,
                   reconnect_timeout_s=60.0, failover_after_s=5.0, lost_after_polls=3, heartbeat_s=1000.0)
    options.update(kw)
    return PromptWatcher("p1", {"1": "EmptyImage", "2": "SaveImage"}, **options)


def msg(kind: str, **data) -> dict:
    return {"type": kind, "data": {"prompt_id": "p1", **data}}


def test_waits_until_the_earliest_of_idle_check_and_queue_deadline():
    w = watcher(idle_timeout_s=30.0, queue_timeout_s=20.0)
    step = w.next_step(1.0)
    assert (step.action, step.until) == ("wait", 20.0)
    assert w.next_step(20.0).action == "timeout"


def test_the_run_deadline_counts_from_the_start_not_from_the_submit():
    w = watcher(run_timeout_s=10.0)
    w.feed(msg("execution_start"), 50.0)  # 50 s in ComfyUI's queue: not counted
    assert w.next_step(59.0).action == "wait"
    step = w.next_step(60.0)
    assert step.action == "timeout" and isinstance(step.error, GenerationTimeout)
    assert not step.error.in_queue and "did not finish within 10 s" in str(step.error)


def test_silence_leads_to_a_check_then_history_completes_it():
    w = watcher(idle_timeout_s=30.0, run_timeout_s=100.0)
    w.feed(msg("execution_start"), 1.0)
    assert w.next_step(30.9).action == "wait"
    assert w.next_step(31.0).action == "poll"
    w.polling(31.0)
    entry = {"status": {"status_str": "success", "messages": [
        ["execution_cached", {"prompt_id": "p1", "nodes": ["1"]}]]}}
    events = w.polled("succeeded", entry, 31.1, link_up_since=0.0)
    assert [e.kind for e in events] == ["cached", "succeeded"]
    assert w.next_step(31.2).action == "done"
    outcome = w.outcome(31.2)
    # one node cached, one executed (history has no executing messages): not fully cached
    assert not outcome.cached and outcome.cached_nodes == ["1"]
    assert w.found_by_idle_poll  # the socket was up all along and said nothing


def test_a_check_asked_for_after_a_reconnect_is_deferred_not_dropped_and_is_no_sign_of_deafness():
    w = watcher()
    w.polling(10.0)
    w.polled("running", {}, 10.0)
    w.request_poll()  # a reconnect 0.3 s after the previous check
    step = w.next_step(10.3)
    assert step.action == "wait" and step.until == pytest.approx(10.0 + MIN_POLL_INTERVAL_S)
    assert w.next_step(11.0).action == "poll"
    w.polling(11.0)
    w.polled("succeeded", {"status": {"status_str": "success"}}, 11.0, link_up_since=10.2)
    assert not w.found_by_idle_poll  # messages were lost during the drop: that is expected


def test_a_prompt_found_nowhere_three_times_is_lost():
    w = watcher(idle_timeout_s=2.0)
    now = 2.0
    for _ in range(2):
        assert w.next_step(now).action == "poll"
        w.polling(now)
        w.polled("unknown", {}, now)
        now += MIN_POLL_INTERVAL_S  # checked again every second once it went missing
    assert w.next_step(now).action == "poll"
    w.polling(now)
    with pytest.raises(PromptLost, match="after 3 checks"):
        w.polled("unknown", {}, now)


def test_an_unreachable_server_at_the_deadline_is_a_lost_connection_not_a_timeout():
    w = watcher(queue_timeout_s=5.0)
    w.polling(1.0)
    w.poll_failed("connection refused")
    step = w.next_step(5.0)
    assert step.action == "fail" and isinstance(step.error, ConnectionLost)
    assert "stayed unreachable (connection refused)" in str(step.error)


def test_a_dropped_socket_fails_over_after_failover_after_s_only_when_another_server_is_up():
    w = watcher(failover_after_s=5.0, reconnect_timeout_s=60.0)
    alone = Link(down_since=10.0, reason="refused", can_fail_over=False)
    with_other = Link(down_since=10.0, reason="refused", can_fail_over=True)
    step = w.next_step(12.0, with_other)
    assert step.action == "wait" and step.until == 15.0
    assert w.next_step(15.0, with_other).action == "failover"
    assert w.next_step(15.0, alone).action == "wait"
    step = w.next_step(70.0, alone)
    assert step.action == "fail" and "unreachable for 60 s (refused)" in str(step.error)


def test_a_reconnect_timeout_shorter_than_failover_after_s_moves_it_then():
    w = watcher(failover_after_s=10.0, reconnect_timeout_s=2.0)
    assert w.next_step(2.0, Link(down_since=0.0, reason="x", can_fail_over=True)).action == "failover"


def test_a_node_error_fails_at_once():
    w = watcher()
    w.feed(msg("execution_error", node_id="2", node_type="SaveImage", exception_type="OSError",
               exception_message="disk full"), 1.0)
    step = w.next_step(1.0)
    assert step.action == "fail" and isinstance(step.error, NodeExecutionError)


def test_heartbeats_come_every_heartbeat_s_of_silence():
    w = watcher(heartbeat_s=5.0)
    assert w.next_step(4.0).until == 5.0
    assert w.next_step(5.0).action == "heartbeat"
    assert w.next_step(5.1).until == 10.0
