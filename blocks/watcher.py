"""Waiting for one prompt, without I/O: every decision about it, none of the sockets.

A :class:`PromptWatcher` is fed what is known about one prompt (its WebSocket messages, the
server's ``/queue`` + ``/history`` answers, whether the connection's WebSocket is up) and the
current time, and :meth:`PromptWatcher.next_step` says what to do now: wait until a time, ask
the server (``poll``), tell the user it is still running (``heartbeat``), remove it from the
server because it took too long (``timeout``), move it to another server (``failover``), or
stop with a result (``done``) or an error (``fail``). The connection does the I/O; the
deadlines, the reconcile decisions and :class:`PromptLost` are tested here without sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from .errors import ComfyUIError, ConnectionLost, GenerationTimeout, PromptLost
from .protocol import PromptEvent, PromptTracker

#: the fastest a prompt is asked about again after a check (after a reconnect, a missing prompt)
MIN_POLL_INTERVAL_S = 1.0

PromptStatus = Literal["unknown", "pending", "running", "succeeded", "failed", "abandoned"]
Action = Literal["wait", "poll", "heartbeat", "timeout", "failover", "done", "fail"]


@dataclass
class PromptOutcome:
    """What the wait saw of one finished prompt.

    Times are ``time.monotonic()`` seconds; ``queued_s`` runs from submit to
    ``execution_start``, ``execution_s`` from there to completion. ``moved_from`` is the URL of
    the server the prompt left because it became unreachable (see ``failover_after_s``).
    """

    prompt_id: str
    submitted_at: float
    started_at: Optional[float]
    finished_at: float
    cached: bool
    cached_nodes: list[str] = field(default_factory=list)
    executed_nodes: list[str] = field(default_factory=list)
    moved_from: Optional[str] = None

    @property
    def queued_s(self) -> float:
        return max(0.0, (self.started_at or self.finished_at) - self.submitted_at)

    @property
    def execution_s(self) -> float:
        return max(0.0, self.finished_at - (self.started_at or self.finished_at))


@dataclass(frozen=True)
class Link:
    """The connection's WebSocket as a watcher sees it.

    ``down_since``: ``time.monotonic()`` when it dropped, None while it is up;
    ``reason``: why it dropped; ``can_fail_over``: another server of the pool is connected now.
    """

    down_since: Optional[float] = None
    reason: str = ""
    can_fail_over: bool = False


UP = Link()


@dataclass(frozen=True)
class Step:
    """What to do next: ``action``, until when to wait (``until``, monotonic seconds), the
    error to raise (``fail``, ``timeout``), and for ``timeout`` whether it was still queued."""

    action: Action
    until: float = 0.0
    error: Optional[ComfyUIError] = None


def history_messages(prompt_id: str, entry: Mapping[str, Any]) -> list[dict]:
    """A ``GET /history/{prompt_id}`` entry's ``status.messages`` as WebSocket-style messages,
    ending in a completion (``execution_success`` or an ``execution_error``)."""
    status = entry.get("status") or {}
    messages = []
    for item in status.get("messages") or []:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict):
            data = dict(item[1])
            data.setdefault("prompt_id", prompt_id)
            messages.append({"type": item[0], "data": data})
    if status.get("status_str", "success") == "success":
        messages.append({"type": "execution_success", "data": {"prompt_id": prompt_id}})
    elif not any(m["type"] in ("execution_error", "execution_interrupted") for m in messages):
        messages.append({"type": "execution_error", "data": {
            "prompt_id": prompt_id, "node_id": None, "node_type": None,
            "exception_type": "unknown", "exception_message": f"history status {status.get('status_str')!r}"}})
    return messages


class PromptWatcher:
    """Everything decided while waiting for one prompt; fed facts, asked :meth:`next_step`.

    Args:
        prompt_id: the prompt followed.
        node_types: ``{node_id: class_type}`` of the prompt (to tell cached from executed nodes).
        url: the server's URL, for error messages.
        submitted_at: ``time.monotonic()`` when it was submitted (or attached).
        queue_timeout_s: seconds it may wait in ComfyUI's queue before it starts.
        run_timeout_s: seconds it may run once started.
        idle_timeout_s: seconds without news before asking the server about it.
        reconnect_timeout_s: seconds its server may stay unreachable before it fails with
            :class:`ConnectionLost` (a transient error: the generation is retried).
        failover_after_s: seconds its server may stay unreachable before it moves to another
            server of the pool that is connected (sooner if ``reconnect_timeout_s`` is shorter).
        lost_after_polls: consecutive checks that find it nowhere before :class:`PromptLost`.
        heartbeat_s: seconds of silence between ``heartbeat`` steps.
        messages_expected: False for a prompt attached from another client_id (an earlier
            process): its messages go to that client, so it is asked about every second.
    """

    def __init__(
        self,
        prompt_id: str,
        node_types: Optional[Mapping[str, str]] = None,
        *,
        url: str,
        submitted_at: float,
        queue_timeout_s: float,
        run_timeout_s: float,
        idle_timeout_s: float,
        reconnect_timeout_s: float,
        failover_after_s: float,
        lost_after_polls: int = 3,
        heartbeat_s: float = 30.0,
        messages_expected: bool = True,
    ):
        self.tracker = PromptTracker(prompt_id, node_types)
        self.url = url
        self.submitted_at = submitted_at
        self.started_at: Optional[float] = None
        self.queue_timeout_s = queue_timeout_s
        self.run_timeout_s = run_timeout_s
        self.idle_timeout_s = idle_timeout_s if messages_expected else min(idle_timeout_s, MIN_POLL_INTERVAL_S)
        self.reconnect_timeout_s = reconnect_timeout_s
        self.failover_after_s = failover_after_s
        self.lost_after_polls = lost_after_polls
        self.heartbeat_s = heartbeat_s
        self.missing_polls = 0
        self.unreachable: Optional[str] = None
        #: the last poll found it finished although the WebSocket was up and said nothing
        self.found_by_idle_poll = False
        self._last_heard = submitted_at
        self._last_beat = submitted_at
        self._last_poll = float("-inf")
        self._poll_requested = False
        self._poll_was_requested = False
        self._quiet_since = submitted_at

    @property
    def prompt_id(self) -> str:
        return self.tracker.prompt_id

    # ------------------------------------------------------------------ facts in
    def feed(self, msg: Mapping[str, Any], now: float) -> list[PromptEvent]:
        """One WebSocket message (routed to this prompt), received at ``now``."""
        self._last_heard = self._last_beat = now
        self.missing_polls = 0
        return self._take(msg, now)

    def request_poll(self) -> None:
        """Ask the server soon (after a reconnect: messages were lost meanwhile); never sooner
        than :data:`MIN_POLL_INTERVAL_S` after the previous check, so a flapping socket cannot
        turn into a request storm, and never dropped: a request too early is deferred."""
        self._poll_requested = True

    def polling(self, now: float) -> None:
        """A check of the server starts now (call before :meth:`polled` / :meth:`poll_failed`)."""
        self._poll_was_requested = self._poll_requested
        self._poll_requested = False
        self._quiet_since = self._last_heard
        self._last_poll = now

    def polled(self, status: PromptStatus, entry: Mapping[str, Any], now: float, *,
               link_up_since: Optional[float] = None) -> list[PromptEvent]:
        """The server's answer: ``status`` from ``/queue`` + ``/history``, ``entry`` its history.

        ``link_up_since``: when the WebSocket (re)connected, if it is up. A completion found by
        a check made because nothing was heard, while that socket was up the whole quiet time,
        sets :attr:`found_by_idle_poll` (the socket is deaf: ComfyUI sent it nothing).

        Raises:
            PromptLost: the server has not known the prompt ``lost_after_polls`` checks in a row.
        """
        self.unreachable = None
        self._last_heard = now
        events: list[PromptEvent] = []
        if status in ("succeeded", "failed"):
            self.missing_polls = 0
            for msg in history_messages(self.prompt_id, entry):
                events += self._take(msg, now)
            self.found_by_idle_poll = (not self._poll_was_requested and link_up_since is not None
                                       and link_up_since <= self._quiet_since)
        elif status == "running":
            self.missing_polls = 0
            if self.started_at is None:
                self.started_at = now
        elif status == "pending":
            self.missing_polls = 0
        else:
            self.missing_polls += 1
            if self.missing_polls >= self.lost_after_polls:
                raise PromptLost(self.prompt_id, self.url, self.missing_polls)
        return events

    def poll_failed(self, reason: str) -> None:
        """The server could not be asked (``reason``: the error's text)."""
        self.unreachable = reason

    def _take(self, msg: Mapping[str, Any], now: float) -> list[PromptEvent]:
        events = self.tracker.feed(msg)
        if self.started_at is None and any(e.kind in ("started", "cached", "executing") for e in events):
            self.started_at = now
        return events

    # ------------------------------------------------------------------ decisions out
    def deadline(self) -> float:
        """When it times out: queue deadline until it started, run deadline after."""
        if self.started_at is None:
            return self.submitted_at + self.queue_timeout_s
        return self.started_at + self.run_timeout_s

    def next_step(self, now: float, link: Link = UP) -> Step:
        """What to do at ``now`` given the WebSocket's state ``link``.

        ``fail`` carries the error to raise: the prompt's own (node error, interrupt), or
        :class:`ConnectionLost` when its server was unreachable too long or at its deadline.
        ``timeout``: remove it from the server and raise the step's :class:`GenerationTimeout`.
        """
        tracker = self.tracker
        if tracker.done:
            return Step("fail", error=tracker.error) if tracker.error is not None else Step("done")
        deadline = self.deadline()
        if now >= deadline:
            if link.down_since is not None:
                return Step("fail", error=ConnectionLost(
                    self.url, f"the WebSocket dropped ({link.reason}) and could not be reconnected "
                    "in time", self.prompt_id))
            if self.unreachable is not None:
                return Step("fail", error=ConnectionLost(
                    self.url, f"the server stayed unreachable ({self.unreachable})", self.prompt_id))
            queued = self.started_at is None
            return Step("timeout", error=GenerationTimeout(
                self.prompt_id, self.queue_timeout_s if queued else self.run_timeout_s, tracker.describe(),
                in_queue=queued))
        wake = [deadline]
        if link.down_since is not None:
            down_for = now - link.down_since
            if link.can_fail_over and down_for >= min(self.failover_after_s, self.reconnect_timeout_s):
                return Step("failover")
            if down_for >= self.reconnect_timeout_s:
                return Step("fail", error=ConnectionLost(
                    self.url, f"the server was unreachable for {down_for:.0f} s ({link.reason})", self.prompt_id))
            wake += [link.down_since + self.reconnect_timeout_s]
            if down_for < self.failover_after_s:
                wake.append(link.down_since + self.failover_after_s)
        if self._poll_requested:
            poll_at = self._last_poll + MIN_POLL_INTERVAL_S
        elif self.missing_polls or self.unreachable is not None:
            poll_at = max(self._last_poll + MIN_POLL_INTERVAL_S, self._last_heard + min(self.idle_timeout_s, MIN_POLL_INTERVAL_S))
        else:
            poll_at = self._last_heard + self.idle_timeout_s
        if now >= poll_at:
            return Step("poll")
        beat_at = self._last_beat + self.heartbeat_s
        if now >= beat_at:
            self._last_beat = now
            return Step("heartbeat")
        return Step("wait", until=min(wake + [poll_at, beat_at]))

    def outcome(self, now: float) -> PromptOutcome:
        """The finished prompt's timings and cache facts (call after a ``done`` step)."""
        return PromptOutcome(
            prompt_id=self.prompt_id,
            submitted_at=self.submitted_at,
            started_at=self.started_at,
            finished_at=now,
            cached=self.tracker.fully_cached,
            cached_nodes=list(self.tracker.cached_nodes),
            executed_nodes=list(self.tracker.executed_nodes),
        )
