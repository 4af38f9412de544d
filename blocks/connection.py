"""One live ComfyUI connection: the HTTP client, the WebSocket transport, the in-flight slots,
and the prompts waited for on them.

Any number of threads can have prompts in flight on one connection: each registers a waiter
before its ``POST /prompt``, the transport's reader thread routes every message carrying a
``prompt_id`` to that prompt's waiter, and the waiter's :class:`~.watcher.PromptWatcher`
decides what happens next. This module does the I/O those decisions call for: ask the server
about a prompt (``GET /history/{prompt_id}``, ``GET /queue``), remove it (``POST /queue``
delete, ``POST /interrupt`` by ``prompt_id``), hand it to another server when its own has
been unreachable too long.

After a reconnect (same ``client_id``) every waiter asks the server about its prompt:
messages sent while we were away are lost, so finished prompts complete from history and
running or pending ones keep waiting. Nothing is submitted again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from .errors import (
    ComfyUIError,
    ConnectionLost,
    GenerationCancelled,
    OutputError,
    PromptMoved,
    PromptValidationError,
    ServerError,
    ServerUnreachable,
)
from .http_api import ComfyUIHTTP
from .inputs import InputImages
from .protocol import OutputRef, PromptEvent, PromptTracker, outputs_from_history, prompt_id_of, queue_remaining_of
from .slots import Slots
from .transport import ConnectionStats, WebSocketTransport
from .watcher import Link, PromptOutcome, PromptStatus, PromptWatcher

module_logger = logging.getLogger("comfy_pipeline.connection")

EventCallback = Callable[[PromptEvent, PromptTracker], None]
Logger = Union[logging.Logger, logging.LoggerAdapter]

__all__ = ["ComfyUIConnection", "ConnectionStats", "EventCallback", "PromptOutcome", "PromptStatus"]


class _Waiter:
    def __init__(self, watcher: PromptWatcher, frames: int):
        self.watcher = watcher
        self.inbox: "queue.Queue[Any]" = queue.Queue()
        #: the transport's text-frame count when this prompt last heard something
        self.frames_when_heard = frames


class _Closed:
    """Put into every waiter's inbox when the connection is closed."""

    def __init__(self, reason: str, by_us: bool = False, interrupted: bool = False):
        self.reason = reason
        self.by_us = by_us
        #: closed by us while ComfyUI was running this waiter's prompt (and we interrupted it)
        self.interrupted = interrupted

    def error(self, url: str, prompt_id: Optional[str]) -> ConnectionLost:
        """The exception a waiter raises for this: :class:`GenerationCancelled` when we closed."""
        if self.by_us:
            return GenerationCancelled(url, prompt_id, interrupted=self.interrupted)
        return ConnectionLost(url, self.reason, prompt_id)


class _Reconcile:
    """Put into every waiter's inbox after a reconnect: ask the server what happened."""


class _LinkChanged:
    """Put into every waiter's inbox when the WebSocket went down: look at the deadlines again."""


def _notify(on_event: EventCallback, event: PromptEvent, tracker: PromptTracker) -> None:
    """Call a progress callback; a failing callback must not fail the generation."""
    try:
        on_event(event, tracker)
    except Exception:
        module_logger.exception("progress callback failed on %s event for prompt %s", event.kind, tracker.prompt_id)


class ComfyUIConnection:
    """A live connection to one ComfyUI server; a context manager.

    Opened by :meth:`blocks.server.ComfyUIServer.connect`. Thread-safe: many threads may call
    :meth:`run_prompt` (or :meth:`submit` + :meth:`wait`) at once. :meth:`close` is
    idempotent: prompts of ours still in flight are removed from the server, the WebSocket
    is closed and the reader thread ends, exactly once.

    Args:
        url: the server's HTTP base URL, e.g. ``http://127.0.0.1:8188``.
        headers: extra HTTP/WebSocket headers (``Authorization`` included when set); never logged.
        verify_tls: verify the server's certificate for https/wss.
        ca_bundle: path of a PEM file with the CA certificate(s) to trust for https and wss
            instead of the default ones (a private CA); ignored when ``verify_tls`` is False.
            Checked here: :class:`CABundleUnusable` when it is not a PEM file with a certificate.
        connect_timeout_s: seconds allowed for TCP connect and the WebSocket handshake.
        generation_timeout_s: default seconds one prompt may run, from ``execution_start``
            (or its first ``executing``/``execution_cached``) to completion.
        queue_timeout_s: seconds one prompt may wait in the server's queue before it starts.
        idle_timeout_s: seconds without a message for a prompt before asking the server about it
            (``/history`` + ``/queue``) instead of waiting blindly.
        reconnect_timeout_s: seconds a prompt waits for its unreachable server before it fails
            with :class:`ConnectionLost` (transient: retried). The connection itself keeps
            reconnecting, with backoff, for as long as it is open.
        failover_after_s: seconds a prompt waits for its unreachable server before it moves to
            another server of the pool that is connected and has a free slot.
        keepalive_s: seconds of WebSocket silence before a ping, and seconds allowed for any
            answer; a socket that stays silent, or hears no queue ``status`` within this long
            after one of our POSTs (deaf), is replaced.
        lost_after_polls: consecutive checks that find a prompt nowhere before :class:`PromptLost`.
        http_timeout_s: seconds allowed for one HTTP response (read timeout).
        max_in_flight: prompts of ours submitted and not finished at once (2: one running, one
            waiting in ComfyUI's queue, so the GPU never idles between prompts and a cancel stays
            cheap); more callers wait for a slot before they submit.
        slot_condition: a condition shared by the connections of a pool, so one waiter can wait
            for a free slot on any of them.
        logger: where warnings (reconnects, lost prompts, removals) go; the flow passes its
            Prefect run logger so they reach the flow run's logs in the UI from any thread.
            Default: the ``comfy_pipeline.connection`` logger.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        verify_tls: bool = True,
        ca_bundle: Optional[str] = None,
        connect_timeout_s: float = 10.0,
        generation_timeout_s: float = 900.0,
        queue_timeout_s: float = 3600.0,
        idle_timeout_s: float = 30.0,
        reconnect_timeout_s: float = 120.0,
        failover_after_s: float = 10.0,
        keepalive_s: float = 1.5,
        lost_after_polls: int = 3,
        http_timeout_s: float = 60.0,
        max_in_flight: int = 2,
        slot_condition: Optional[threading.Condition] = None,
        logger: Optional[Logger] = None,
    ):
        self.url = url.rstrip("/")
        self._log = logger or module_logger
        #: prompt ids that close() interrupted while ComfyUI was running them
        self.interrupted_prompts: set[str] = set()
        #: prompt ids we gave up on ourselves (timed out, or moved to another server): never followed again
        self.abandoned_prompts: set[str] = set()
        #: prompt ids that moved to another server and finished here anyway (their files stay here)
        self.finished_after_move: set[str] = set()
        self.client_id = uuid.uuid4().hex
        self.generation_timeout_s = generation_timeout_s
        self.queue_timeout_s = queue_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.failover_after_s = failover_after_s
        self.lost_after_polls = lost_after_polls
        #: set by the pool: is another server connected with a free slot (may a prompt move)?
        self.can_fail_over: Callable[["ComfyUIConnection"], bool] = lambda connection: False
        self.stats = ConnectionStats()
        self.slots = Slots(max_in_flight, slot_condition)
        self.http = ComfyUIHTTP(self.url, headers=headers, verify_tls=verify_tls, ca_bundle=ca_bundle,
                                connect_timeout_s=connect_timeout_s, http_timeout_s=http_timeout_s,
                                logger=self._log)
        #: what this server calls each input image of the run (uploaded once per content and subfolder)
        self.input_images = InputImages(self.url, self.http)
        self.transport = WebSocketTransport(
            self.url, self.client_id, headers=dict(headers or {}), verify_tls=verify_tls,
            ca_bundle=self.http.ca_bundle, connect_timeout_s=connect_timeout_s, keepalive_s=keepalive_s,
            on_message=self._on_message, on_link=self._on_link, stats=self.stats, logger=self._log)
        self._waiters: dict[str, _Waiter] = {}
        self._moved: set[str] = set()  # moved away while this server was unreachable: remove when it is back
        self._lock = threading.Lock()
        self._opened = False
        self._closed = False

    # ----------------------------------------------------------------- lifecycle
    def open(self) -> "ComfyUIConnection":
        """Check the server (``GET /system_stats``), open the WebSocket, start the reader.

        Raises:
            ServerUnreachable: no answer within ``connect_timeout_s`` (names the URL).
            CertificateNotTrusted: the server's TLS certificate failed verification (not retried).
            AuthenticationFailed: HTTP 401/403 or a refused WebSocket upgrade.
        """
        if self._opened:
            return self
        try:
            self.http.system_stats()
            self.transport.open()
        except BaseException:
            self.http.close()  # nothing else was opened; a failed open leaves no pooled socket
            raise
        self._opened = True
        self._log.debug("connected to %s as client_id %s", self.url, self.client_id)
        return self

    def close(self, *, cancel_in_flight: bool = True) -> None:
        """Release the connection. Idempotent; safe from any thread.

        Prompts of ours still in flight are first removed from the server (deleted if
        pending, interrupted by ``prompt_id`` if running), unless ``cancel_in_flight`` is
        False; their waiters are woken with :class:`GenerationCancelled`. Then the WebSocket is
        closed, the reader thread ends and the HTTP session is closed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True  # from here no waiter can register, so no POST can leave
            in_flight = list(self._waiters)
            given_up = self._moved - set(in_flight)  # moved elsewhere, still to be removed here
        self.slots.notify()  # generations waiting for a slot give up now
        if cancel_in_flight and given_up and not in_flight and self.transport.up:
            self.cancel_prompts(given_up)
        if cancel_in_flight and in_flight:
            self._log.warning("closing with %d prompt(s) in flight on %s: removing them from the server",
                              len(in_flight), self.url)
            snapshot = self._queue_snapshot()
            running = snapshot[0] if snapshot else set()
            self.interrupted_prompts.update(set(in_flight) & running)
            # Wake the waiters before removing their prompts, so none of them reads ComfyUI's
            # execution_interrupted as a failure of its own.
            self._wake_all("the connection was closed (the flow run ended or was cancelled) and the "
                           "prompt was removed from the server", interrupted=running)
            self.cancel_prompts(set(in_flight) | given_up, snapshot=snapshot)
        self.transport.close()
        self._wake_all("the connection was closed")
        self.http.close()

    def __enter__(self) -> "ComfyUIConnection":
        return self.open()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # Prefect may try to copy task inputs; a live connection is shared, never copied.
    def __deepcopy__(self, memo: dict) -> "ComfyUIConnection":
        return self

    def __reduce__(self):
        raise TypeError("ComfyUIConnection is a live resource and cannot be pickled")

    # ----------------------------------------------------------------- state
    @property
    def usable(self) -> bool:
        """Open (it may be reconnecting)."""
        return self._opened and not self._closed

    @property
    def connected(self) -> bool:
        """The WebSocket is up right now."""
        return self.usable and self.transport.up

    @property
    def free_slots(self) -> int:
        """How many more prompts may be in flight now (``max_in_flight`` minus those in flight)."""
        return self.slots.free

    @property
    def max_in_flight(self) -> int:
        return self.slots.capacity

    def _link(self) -> Link:
        down_since = self.transport.down_since
        if down_since is None:
            return Link()
        return Link(down_since, self.transport.down_reason, self.can_fail_over(self))

    # ----------------------------------------------------------------- transport callbacks
    def _on_message(self, msg: dict, received_at: float) -> None:
        if msg["type"] == "status":
            remaining = queue_remaining_of(msg)
            if remaining is not None:
                self.stats.last_queue_remaining = remaining
            return
        prompt_id = prompt_id_of(msg)
        if prompt_id is None:
            self._log.debug("message without prompt_id: %s", msg["type"])
            return
        with self._lock:
            waiter = self._waiters.get(prompt_id)
        if waiter is not None:
            waiter.inbox.put((received_at, msg))

    def _on_link(self, up: bool) -> None:
        self.slots.notify()  # generations waiting for a connected server look again
        if not up and self.transport.down_reason.startswith("silent"):
            # what silenced the WebSocket (a proxy, a NAT) silenced our idle keep-alive HTTP
            # connections too: open new ones rather than wait a read timeout on each
            self.http.close()
        with self._lock:
            waiters = list(self._waiters.values())
            moved, self._moved = (set(self._moved), set()) if up else (set(), self._moved)
        for waiter in waiters:
            waiter.inbox.put(_Reconcile() if up else _LinkChanged())
        if up and waiters:
            self._log.warning("checking %d prompt(s) in flight on %s", len(waiters), self.url)
        if moved:
            self._remove_moved_in_background(moved)

    def remove_when_reachable(self, prompt_id: str, *, now: bool = True) -> None:
        """Give up a prompt of ours that may still be on this server (it moved to another server,
        or an attempt that could not reach this one runs elsewhere): it is never followed again,
        and it is removed from this server when it is back (``now``: also try at once, in case its
        HTTP API answers while its WebSocket does not)."""
        self.abandoned_prompts.add(prompt_id)
        with self._lock:
            self._moved.add(prompt_id)
        if now:
            self._remove_moved_in_background({prompt_id})

    def _remove_moved_in_background(self, prompt_ids: set[str]) -> None:
        """:meth:`_remove_moved` in its own thread (it makes HTTP requests: never in the reader's)."""
        threading.Thread(target=self._remove_moved, args=(prompt_ids,), daemon=True,
                         name=f"comfyui-cleanup-{self.client_id[:8]}").start()

    def _remove_moved(self, prompt_ids: set[str]) -> None:
        """Remove prompts we gave up here (see :meth:`remove_when_reachable`); one that finished
        here anyway is recorded in :attr:`finished_after_move`, never downloaded. A prompt this
        server cannot be asked about now stays listed for its next reconnect."""
        for prompt_id in sorted(prompt_ids):
            try:
                status, _ = self.prompt_status(prompt_id)
            except ComfyUIError as exc:
                self._log.debug("could not check moved prompt %s on %s yet: %s", prompt_id, self.url, exc)
                with self._lock:
                    if not self._closed:
                        self._moved.add(prompt_id)
                continue
            with self._lock:
                self._moved.discard(prompt_id)
            if status in ("pending", "running"):
                self.cancel_prompts([prompt_id])
                self._log.warning("%s is back: removed prompt %s, which had moved to another server",
                                  self.url, prompt_id)
            elif status == "succeeded":
                self.finished_after_move.add(prompt_id)
                self._log.warning("%s is back: prompt %s finished there after it had moved to another "
                                  "server; its files stay on %s and are not downloaded", self.url, prompt_id,
                                  self.url)

    def _wake_all(self, reason: str, interrupted: Iterable[str] = ()) -> None:
        interrupted = set(interrupted)
        with self._lock:
            waiters = list(self._waiters.items())
        for prompt_id, waiter in waiters:
            waiter.inbox.put(_Closed(reason, by_us=self._closed, interrupted=prompt_id in interrupted))

    # ----------------------------------------------------------------- in-flight slots
    def reserve_slot(self, *, block: bool = True) -> bool:
        """Take one of the ``max_in_flight`` slots, waiting for one if ``block``.

        Raises:
            GenerationCancelled: the connection was closed (before or while waiting).
        """
        if not block:
            self._check_usable()
            return self.slots.try_take()
        self.slots.take(self._check_usable)
        return True

    def give_back_slot(self) -> None:
        """Give back a slot taken with :meth:`reserve_slot` that no prompt used (preparing the
        prompt for this server failed before its POST)."""
        self.slots.give_back()

    def _check_usable(self) -> None:
        if self._closed:  # also when a slot is free: nothing may start after close()
            raise GenerationCancelled(self.url)
        if not self._opened:
            raise ConnectionLost(self.url, "the connection is not open")

    def _register(self, prompt_id: str, prompt: Optional[Mapping[str, Any]], *, reserved: bool,
                  messages_expected: bool = True) -> _Waiter:
        if not reserved:
            self.reserve_slot()
        node_types = {str(k): v.get("class_type") for k, v in (prompt or {}).items() if isinstance(v, Mapping)}
        watcher = PromptWatcher(
            prompt_id, node_types, url=self.url, submitted_at=time.monotonic(),
            queue_timeout_s=self.queue_timeout_s, run_timeout_s=self.generation_timeout_s,
            idle_timeout_s=self.idle_timeout_s, reconnect_timeout_s=self.reconnect_timeout_s,
            failover_after_s=self.failover_after_s, lost_after_polls=self.lost_after_polls,
            messages_expected=messages_expected)
        waiter = _Waiter(watcher, self.transport.text_frames())
        with self._lock:  # the lock close() takes to mark the connection closed and list our prompts
            closed = self._closed
            if not closed:
                self._waiters[prompt_id] = waiter
        if closed:
            self.slots.give_back()
            raise GenerationCancelled(self.url)
        return waiter

    def _forget(self, prompt_id: str) -> None:
        with self._lock:
            waiter = self._waiters.pop(prompt_id, None)
        if waiter is not None:
            self.slots.give_back()

    # ----------------------------------------------------------------- prompts
    def submit(
        self,
        prompt: Mapping[str, Any],
        *,
        prompt_id: Optional[str] = None,
        extra_data: Optional[Mapping[str, Any]] = None,
        reserved: bool = False,
        front: bool = False,
    ) -> str:
        """``POST /prompt`` with this connection's ``client_id`` and a client-chosen ``prompt_id``.

        The waiter is registered before the POST, so no message of the prompt can be missed.
        If the POST fails in transport (an ambiguous submit: it may have arrived), the server
        is asked whether it has the ``prompt_id``; if it has, the prompt is kept, not re-sent.
        ``reserved``: the caller already holds one of this connection's in-flight slots
        (:meth:`reserve_slot`); it is given back when the prompt finishes. ``front``: ComfyUI's
        ``"front": true``, the prompt goes before every pending one in the server's queue (the
        latest such prompt first), but only when, by the last ``status`` broadcast, every prompt
        in that queue is ours: never ahead of another client's.

        Returns:
            the ``prompt_id`` (a uuid4 string unless one was given).

        Raises:
            PromptValidationError: HTTP 400, with every ``node_errors`` entry in the message.
            ServerError: any other non-200 answer (e.g. 500).
            ServerUnreachable / ConnectionLost: the server or the connection is gone.
            GenerationCancelled: the connection was closed before or while submitting (a prompt
                that reached the server anyway is removed from it).
        """
        prompt_id = prompt_id or str(uuid.uuid4())
        self._register(prompt_id, prompt, reserved=reserved)
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        if front and self._only_ours_queued():
            body["front"] = True
        frames_before = self.transport.text_frames()
        try:
            answer = self.http.post_prompt(body)
        except ServerUnreachable:
            if self._server_has(prompt_id):
                if self._closed:  # close() looked at the queue before this prompt got there
                    self._remove_late(prompt_id)
                self._log.warning("POST /prompt for %s failed in transport but the server has it; "
                                  "following it instead of posting again", prompt_id)
                return prompt_id
            self._forget(prompt_id)
            raise
        except BaseException:
            self._forget(prompt_id)
            raise
        if self._closed:
            # close() ran while the POST was on its way: its look at the queue may have missed this
            # prompt, so remove it here; no prompt of ours may run after close().
            self._remove_late(prompt_id)
        self.transport.expect_broadcast(frames_before)
        if answer.get("node_errors"):
            # HTTP 200 with node_errors: the valid outputs run, the invalid ones are dropped.
            self._log.warning("%s", PromptValidationError({"message": "some outputs were dropped"},
                                                          answer["node_errors"]))
        returned = answer.get("prompt_id")
        if returned and returned != prompt_id:  # a server that ignores the client's prompt_id
            with self._lock:
                waiter = self._waiters.pop(prompt_id)
                waiter.watcher.tracker.prompt_id = returned
                self._waiters[returned] = waiter
            prompt_id = returned
        return prompt_id

    def _only_ours_queued(self) -> bool:
        """Whether the server's queue (running and pending, by its last ``status`` broadcast) holds
        no prompt but ours: at most our prompts in flight here besides the one being posted."""
        queued = self.stats.last_queue_remaining
        ours_before = self.max_in_flight - self.free_slots - 1  # this prompt's slot is taken already
        return queued is not None and queued <= ours_before

    def _remove_late(self, prompt_id: str) -> None:
        """Remove a prompt whose POST landed after :meth:`close` began; raise GenerationCancelled."""
        snapshot = self._queue_snapshot()
        running = prompt_id in snapshot[0] if snapshot else False
        self.cancel_prompts([prompt_id], snapshot=snapshot)
        if running:
            self.interrupted_prompts.add(prompt_id)
        self._forget(prompt_id)
        raise GenerationCancelled(self.url, prompt_id, interrupted=running)

    def _server_has(self, prompt_id: str) -> bool:
        try:
            return self.prompt_status(prompt_id)[0] != "unknown"
        except ComfyUIError as exc:
            self._log.debug("could not check %s after a failed POST: %s", prompt_id, exc)
            return False

    def prompt_status(self, prompt_id: str) -> tuple[PromptStatus, dict]:
        """Where the server has this prompt: ``(status, history_entry)``.

        ``status`` is ``pending`` / ``running`` (``GET /queue``), ``succeeded`` / ``failed``
        (``GET /history/{prompt_id}``, entry returned), or ``unknown``.

        Raises:
            ServerUnreachable / ServerError: the server could not be asked.
        """
        entry = self.http.history(prompt_id)
        if not entry:
            running, pending = self.http.queue_ids()
            if prompt_id in running:
                return "running", {}
            if prompt_id in pending:
                return "pending", {}
            entry = self.http.history(prompt_id)  # it may have finished between the two requests
            if not entry:
                return "unknown", {}
        ok = (entry.get("status") or {}).get("status_str", "success") == "success"
        return ("succeeded" if ok else "failed"), entry

    def attach(self, prompt_id: str, prompt: Optional[Mapping[str, Any]] = None, *, reserved: bool = False) -> str:
        """Follow a prompt that is already on the server (submitted earlier, maybe by a lost attempt
        from another process, whose messages go to another client_id: it is asked about every
        second). It is checked at once, so a prompt that already finished completes from history.
        Returns ``prompt_id``.
        """
        waiter = self._register(prompt_id, prompt, reserved=reserved, messages_expected=False)
        waiter.inbox.put(_Reconcile())
        return prompt_id

    def wait(
        self,
        prompt_id: str,
        *,
        timeout_s: Optional[float] = None,
        on_event: Optional[EventCallback] = None,
        heartbeat_s: float = 30.0,
    ) -> PromptOutcome:
        """Block until the prompt completes, fails, or times out.

        Args:
            prompt_id: a prompt submitted (or attached) on this connection.
            timeout_s: seconds the prompt may run once it started; defaults to
                ``generation_timeout_s``. Time spent waiting in the server's queue behind other
                prompts does not count; it is bounded by ``queue_timeout_s``.
            on_event: called in this thread with each :class:`PromptEvent` (for progress logs),
                and with a ``waiting`` event after ``heartbeat_s`` seconds without a message.
            heartbeat_s: seconds of silence between ``waiting`` events.

        After ``idle_timeout_s`` without a message, and after every reconnect, the server is
        asked about the prompt (``/history``, ``/queue``) instead of waiting blindly.

        Raises:
            NodeExecutionError: ``execution_error`` for this prompt.
            ExecutionInterrupted: ``execution_interrupted`` for this prompt.
            GenerationTimeout: not finished in time; the prompt is removed from the server
                (deleted if pending, interrupted if running).
            PromptLost: the server no longer knows the prompt (it restarted).
            PromptMoved: its server was unreachable for ``failover_after_s`` while another
                server of the pool was free (the pool runs it there).
            ConnectionLost: the server stayed unreachable for ``reconnect_timeout_s``.
            GenerationCancelled: the connection was closed (the run ended or was cancelled).
        """
        with self._lock:
            waiter = self._waiters.get(prompt_id)
        if waiter is None:
            raise KeyError(f"prompt {prompt_id} was not submitted on this connection")
        watcher = waiter.watcher
        if timeout_s is not None:
            watcher.run_timeout_s = timeout_s
        watcher.heartbeat_s = heartbeat_s
        try:
            while True:
                self._drain(waiter, on_event)
                now = time.monotonic()
                step = watcher.next_step(now, self._link())
                if step.action == "done":
                    return watcher.outcome(time.monotonic())
                if step.action == "fail":
                    raise step.error
                if step.action == "wait":
                    try:
                        item = waiter.inbox.get(timeout=max(0.0, step.until - now))
                    except queue.Empty:
                        continue
                    self._take(waiter, item, on_event)
                elif step.action == "poll":
                    self._poll(waiter, on_event)
                elif step.action == "heartbeat":
                    if on_event is not None:
                        _notify(on_event, PromptEvent("waiting"), watcher.tracker)
                elif step.action == "timeout":
                    # ComfyUI may keep an interrupted prompt "running" until its node reaches an
                    # interruptible point: a retry must not follow it (it would only meet
                    # execution_interrupted).
                    self.abandoned_prompts.add(prompt_id)
                    self.cancel_prompt(prompt_id)
                    raise step.error
                elif step.action == "failover":
                    link = self._link()
                    self.remove_when_reachable(prompt_id)
                    raise PromptMoved(self.url, prompt_id, now - (link.down_since or now), link.reason)
        finally:
            self._forget(prompt_id)

    def _drain(self, waiter: _Waiter, on_event: Optional[EventCallback]) -> None:
        """Take every item already in the waiter's inbox, without blocking."""
        while not waiter.watcher.tracker.done:
            try:
                item = waiter.inbox.get_nowait()
            except queue.Empty:
                return
            self._take(waiter, item, on_event)

    def _take(self, waiter: _Waiter, item: Any, on_event: Optional[EventCallback]) -> None:
        if isinstance(item, _Closed):
            raise item.error(self.url, waiter.watcher.prompt_id)
        if isinstance(item, _Reconcile):
            waiter.watcher.request_poll()
        elif not isinstance(item, _LinkChanged):
            received_at, msg = item
            waiter.frames_when_heard = self.transport.text_frames()
            for event in waiter.watcher.feed(msg, received_at):
                if on_event is not None:
                    _notify(on_event, event, waiter.watcher.tracker)

    def _poll(self, waiter: _Waiter, on_event: Optional[EventCallback]) -> None:
        """Ask the server about one prompt; complete it from history if it finished meanwhile."""
        watcher = waiter.watcher
        watcher.polling(time.monotonic())
        try:
            status, entry = self.prompt_status(watcher.prompt_id)
        except (ServerUnreachable, ServerError) as exc:
            watcher.poll_failed(str(exc))
            self._log.debug("could not ask %s about %s: %s", self.url, watcher.prompt_id, exc)
            return
        missing_before = watcher.missing_polls
        events = watcher.polled(status, entry, time.monotonic(), link_up_since=self.transport.up_since)
        if watcher.missing_polls > missing_before:
            self._log.warning("prompt %s not found on %s (%d of %d checks)", watcher.prompt_id, self.url,
                              watcher.missing_polls, watcher.lost_after_polls)
        # Deaf, not just a race with the completion's messages: ComfyUI broadcasts a queue status
        # to every socket when a prompt finishes, and ours received no frame at all meanwhile.
        frames = self.transport.text_frames()
        deaf = watcher.found_by_idle_poll and frames == waiter.frames_when_heard
        waiter.frames_when_heard = frames  # a check is news too: the next quiet time starts now
        if deaf:
            self.transport.recycle(f"deaf: ComfyUI finished prompt {watcher.prompt_id} but the WebSocket "
                                   "never said so")
        for event in events:
            if on_event is not None:
                _notify(on_event, event, watcher.tracker)

    def cancel_prompt(self, prompt_id: str) -> None:
        """Remove one prompt of ours from the server (see :meth:`cancel_prompts`)."""
        self.cancel_prompts([prompt_id])

    def _queue_snapshot(self) -> Optional[tuple[set[str], set[str]]]:
        """``(running, pending)`` prompt ids from ``GET /queue``, or None (logged) if it fails."""
        try:
            return self.http.queue_ids()
        except ComfyUIError as exc:
            self._log.warning("could not read the queue of %s: %s", self.url, exc)
            return None

    def cancel_prompts(self, prompt_ids: Iterable[str], *,
                       snapshot: Optional[tuple[set[str], set[str]]] = None) -> None:
        """Remove prompts of ours from the server, never touching anyone else's.

        Pending ones first (``POST /queue {"delete": [...]}``), so none of them starts while
        the running one is stopped; then ``POST /interrupt {"prompt_id": id}`` for one that is
        running (never a bare global interrupt). ``snapshot``: ``(running, pending)`` from a
        ``GET /queue`` just made. Failures are logged, not raised (this runs on error paths).
        """
        ours = set(prompt_ids)
        try:
            running, pending = snapshot or self.http.queue_ids()
            for prompt_id in sorted(ours & pending):
                self.http.delete_pending(prompt_id)
            for prompt_id in sorted(ours & running):
                self.http.interrupt(prompt_id)
        except ComfyUIError as exc:
            self._log.warning("could not remove prompt(s) %s from %s: %s", ", ".join(sorted(ours)), self.url, exc)

    def wait_for_history(self, prompt_id: str, *, within_s: float = 5.0) -> dict:
        """``GET /history/{prompt_id}``, retried for up to ``within_s`` seconds.

        History can trail ``execution_success`` by a moment.

        Raises:
            OutputError: still no history entry after ``within_s``.
        """
        deadline = time.monotonic() + within_s
        delay = 0.02
        while True:
            entry = self.http.history(prompt_id)
            if entry:
                return entry
            if time.monotonic() >= deadline:
                raise OutputError(
                    f"ComfyUI at {self.url} finished prompt {prompt_id} but has no history for it "
                    f"after {within_s:g} s; its outputs cannot be listed. Check the server's history "
                    "(was it cleared, or the server restarted?)."
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def download(self, ref: OutputRef, dest: Union[Path, Iterable[Path]], *,
                 reuse_identical: bool = False) -> tuple[Path, int]:
        """``GET /view`` to ``dest`` or the first free candidate path (see :meth:`ComfyUIHTTP.download`;
        ``reuse_identical``: a candidate already holding the same bytes is kept, not written again).

        Returns ``(path, bytes_written)``.
        """
        return self.http.download(ref, dest, reuse_identical=reuse_identical)

    def run_prompt(
        self,
        prompt: Mapping[str, Any],
        *,
        prompt_id: Optional[str] = None,
        attach: bool = False,
        timeout_s: Optional[float] = None,
        on_event: Optional[EventCallback] = None,
        heartbeat_s: float = 30.0,
        output_types: Optional[tuple[str, ...]] = ("output",),
        reserved: bool = False,
        front: bool = False,
    ) -> tuple[PromptOutcome, list[OutputRef]]:
        """Submit (or, with ``attach``, follow an existing ``prompt_id``), wait, list outputs.

        ``reserved``: the caller already holds one of this connection's in-flight slots
        (:meth:`reserve_slot`); it is given back when the prompt finishes.

        Returns:
            ``(outcome, refs)``: timings and the files to download with :meth:`download`.

        Raises:
            everything :meth:`submit`, :meth:`wait` and :meth:`wait_for_history` raise.
        """
        if attach:
            if prompt_id is None:
                raise ValueError("attach needs the prompt_id to follow")
            self.attach(prompt_id, prompt, reserved=reserved)
        else:
            prompt_id = self.submit(prompt, prompt_id=prompt_id, reserved=reserved, front=front)
        outcome = self.wait(prompt_id, timeout_s=timeout_s, on_event=on_event, heartbeat_s=heartbeat_s)
        entry = self.wait_for_history(prompt_id)
        return outcome, outputs_from_history(entry, output_types)
