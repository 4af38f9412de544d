"""One live ComfyUI connection: one WebSocket, one HTTP session, one reader thread.

The reader thread is the WebSocket demultiplexer: it reads every frame of ``/ws`` and hands
each message that carries a ``prompt_id`` to the waiter registered for that prompt, so any
number of threads can have prompts in flight on the same connection and each sees only its
own messages. Messages without a ``prompt_id`` (``status``, ``executing`` after a reconnect),
malformed frames and binary preview frames are recorded or skipped, never fatal.

When the socket drops, the reader reconnects with backoff using the SAME ``client_id`` and
asks every waiter to reconcile with the server (``GET /history/{prompt_id}``, ``GET /queue``):
messages sent while we were away are lost, so finished prompts complete from history and
running or pending ones keep waiting. Nothing is submitted again. A waiter that hears nothing
for ``idle_timeout_s`` reconciles the same way; a prompt found nowhere several times in a row
fails with :class:`PromptLost`.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Union
from urllib.parse import urlsplit, urlunsplit

import websocket

from .errors import (
    AuthenticationFailed,
    ComfyUIError,
    ConnectionLost,
    GenerationCancelled,
    GenerationTimeout,
    OutputError,
    PromptLost,
    PromptValidationError,
    ServerError,
    ServerUnreachable,
)
from .http_api import ComfyUIHTTP
from .protocol import (
    OutputRef,
    PromptEvent,
    PromptTracker,
    binary_event_type,
    outputs_from_history,
    parse_text_frame,
    prompt_id_of,
    queue_remaining_of,
)

module_logger = logging.getLogger("comfy_pipeline.connection")

_STABLE_AFTER_S = 10.0  # a socket up this long counts as healthy: its backoff starts over
_MAX_BACKOFF_S = 5.0
_MIN_RECONCILE_INTERVAL_S = 1.0

EventCallback = Callable[[PromptEvent, PromptTracker], None]
PromptStatus = Literal["unknown", "pending", "running", "succeeded", "failed", "abandoned"]


@dataclass
class ConnectionStats:
    """Facts about one connection for the report.

    ``connections_opened`` counts WebSocket handshakes that opened the connection (1 for a
    flow run); ``reconnects`` counts handshakes after a drop; ``binary_frames_skipped`` counts
    preview frames; ``malformed_frames`` frames that were not JSON messages;
    ``unroutable_messages`` messages with a ``prompt_id`` that no waiter of ours owns;
    ``polls`` reconciliations with ``/history`` + ``/queue``.
    """

    connections_opened: int = 0
    reconnects: int = 0
    disconnects: int = 0
    messages: int = 0
    binary_frames_skipped: int = 0
    malformed_frames: int = 0
    unroutable_messages: int = 0
    prompts_submitted: int = 0
    prompts_attached: int = 0
    polls: int = 0
    last_queue_remaining: Optional[int] = None


@dataclass
class PromptOutcome:
    """What :meth:`ComfyUIConnection.wait` saw of one finished prompt.

    Times are ``time.monotonic()`` seconds; ``queued_s`` runs from submit to
    ``execution_start``, ``execution_s`` from there to completion.
    """

    prompt_id: str
    submitted_at: float
    started_at: Optional[float]
    finished_at: float
    cached: bool
    cached_nodes: list[str] = field(default_factory=list)
    executed_nodes: list[str] = field(default_factory=list)

    @property
    def queued_s(self) -> float:
        return max(0.0, (self.started_at or self.finished_at) - self.submitted_at)

    @property
    def execution_s(self) -> float:
        return max(0.0, self.finished_at - (self.started_at or self.finished_at))


class _Waiter:
    def __init__(self, tracker: PromptTracker, submitted_at: float):
        self.tracker = tracker
        self.inbox: "queue.Queue[Any]" = queue.Queue()
        self.submitted_at = submitted_at
        self.started_at: Optional[float] = None
        self.missing_polls = 0
        self.unreachable: Optional[str] = None


class _Closed:
    """Put into every waiter's inbox when the connection is finished for good."""

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


def _notify(on_event: EventCallback, event: PromptEvent, tracker: PromptTracker) -> None:
    """Call a progress callback; a failing callback must not fail the generation."""
    try:
        on_event(event, tracker)
    except Exception:
        module_logger.exception("progress callback failed on %s event for prompt %s", event.kind, tracker.prompt_id)


def ws_url_for(http_url: str, client_id: str) -> str:
    """``http(s)://host:port/base`` -> ``ws(s)://host:port/base/ws?clientId=<client_id>``."""
    parts = urlsplit(http_url)
    scheme = {"http": "ws", "https": "wss"}[parts.scheme]
    path = parts.path.rstrip("/") + "/ws"
    return urlunsplit((scheme, parts.netloc, path, f"clientId={client_id}", ""))


def _history_messages(prompt_id: str, entry: Mapping[str, Any]) -> list[dict]:
    """A history entry's ``status.messages`` as WebSocket-style messages, ending in a completion."""
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
        connect_timeout_s: seconds allowed for TCP connect and the WebSocket handshake.
        generation_timeout_s: default seconds one prompt may run, from ``execution_start``
            (or its first ``executing``/``execution_cached``) to completion.
        queue_timeout_s: seconds one prompt may wait in the server's queue before it starts.
        idle_timeout_s: seconds without a message for a prompt before asking the server about it
            (``/history`` + ``/queue``) instead of waiting blindly.
        reconnect_timeout_s: seconds to keep trying to reconnect a dropped WebSocket.
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
        connect_timeout_s: float = 10.0,
        generation_timeout_s: float = 900.0,
        queue_timeout_s: float = 3600.0,
        idle_timeout_s: float = 30.0,
        reconnect_timeout_s: float = 120.0,
        lost_after_polls: int = 3,
        http_timeout_s: float = 60.0,
        max_in_flight: int = 2,
        slot_condition: Optional[threading.Condition] = None,
        logger: Optional[Union[logging.Logger, logging.LoggerAdapter]] = None,
    ):
        self.url = url.rstrip("/")
        self._log = logger or module_logger
        #: prompt ids that close() interrupted while ComfyUI was running them
        self.interrupted_prompts: set[str] = set()
        #: prompt ids we gave up on ourselves (deleted or interrupted after a timeout): never followed again
        self.abandoned_prompts: set[str] = set()
        self.client_id = uuid.uuid4().hex
        self.connect_timeout_s = connect_timeout_s
        self.generation_timeout_s = generation_timeout_s
        self.queue_timeout_s = queue_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.lost_after_polls = lost_after_polls
        self.verify_tls = verify_tls
        self.stats = ConnectionStats()
        self.http = ComfyUIHTTP(self.url, headers=headers, verify_tls=verify_tls,
                                connect_timeout_s=connect_timeout_s, http_timeout_s=http_timeout_s,
                                logger=self._log)
        self._headers = dict(headers or {})
        self._ws: Optional[websocket.WebSocket] = None
        self._reader: Optional[threading.Thread] = None
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._closed = False
        self._dead_reason: Optional[str] = None
        self._dropped_reason: Optional[str] = None  # set while the WebSocket is down
        self._connected_at = 0.0
        self._backoff_s = 0.0
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._slots_taken = 0
        self._slot_cond = slot_condition or threading.Condition()

    # ----------------------------------------------------------------- lifecycle
    @property
    def ws_url(self) -> str:
        """The ``/ws?clientId=`` URL this connection uses (the same after every reconnect)."""
        return ws_url_for(self.url, self.client_id)

    @property
    def is_open(self) -> bool:
        """True while the reader runs (connected, or reconnecting)."""
        return self._reader is not None and self._reader.is_alive() and not self._closed

    def open(self) -> "ComfyUIConnection":
        """Check the server (``GET /system_stats``), open the WebSocket, start the reader.

        Raises:
            ServerUnreachable: no answer within ``connect_timeout_s`` (names the URL).
            AuthenticationFailed: HTTP 401/403 or a refused WebSocket upgrade.
        """
        if self._reader is not None:
            return self
        try:
            self.http.system_stats()
            self._ws = self._handshake()
        except BaseException:
            self.http.close()  # nothing else was opened; a failed open leaves no pooled socket
            raise
        self._connected_at = time.monotonic()
        self.stats.connections_opened += 1
        self._reader = threading.Thread(
            target=self._read_loop, name=f"comfyui-reader-{self.client_id[:8]}", daemon=True
        )
        self._reader.start()
        self._log.debug("connected to %s as client_id %s", self.url, self.client_id)
        return self

    def _handshake(self) -> websocket.WebSocket:
        try:
            ws = websocket.create_connection(
                self.ws_url,
                timeout=self.connect_timeout_s,
                header=[f"{k}: {v}" for k, v in self._headers.items()],
                sslopt=None if self.verify_tls else {"cert_reqs": 0, "check_hostname": False},
                enable_multithread=True,
            )
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code in (401, 403):
                raise AuthenticationFailed(self.url, exc.status_code) from exc
            raise ServerUnreachable(self.url, f"WebSocket upgrade refused: {exc}") from exc
        except (OSError, websocket.WebSocketException) as exc:
            raise ServerUnreachable(self.url, f"WebSocket {self.ws_url.split('?')[0]}: {exc}") from exc
        ws.settimeout(None)  # the reader blocks; close() unblocks it
        return ws

    def close(self, *, cancel_in_flight: bool = True) -> None:
        """Release the connection. Idempotent; safe from any thread.

        Prompts of ours still in flight are first removed from the server (deleted if
        pending, interrupted by ``prompt_id`` if running), unless ``cancel_in_flight`` is
        False; their waiters are woken with :class:`ConnectionLost`. Then the WebSocket is
        closed, the reader thread ends and the HTTP session is closed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            in_flight = list(self._waiters)
        # From here the reader cannot install a new socket (see _reconnect), so self._ws is final.
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
            self.cancel_prompts(in_flight, snapshot=snapshot)
        self._closing.set()
        ws = self._ws
        if ws is not None:
            try:
                ws.send_close()
            except (OSError, websocket.WebSocketException) as exc:
                self._log.debug("close frame not sent: %s", exc)
            if self._reader is not None:
                self._reader.join(timeout=2.0)
            self._shutdown_socket(ws)
        if self._reader is not None:
            # A reconnect handshake in progress cannot be interrupted; it ends within connect_timeout_s.
            self._reader.join(timeout=self.connect_timeout_s + 2.0)
            if self._reader.is_alive():
                self._log.error("the WebSocket reader for %s did not stop", self.url)
        self._wake_all("the connection was closed")
        self.http.close()

    @staticmethod
    def _shutdown_socket(ws: websocket.WebSocket) -> None:
        try:
            ws.shutdown()
        except (OSError, websocket.WebSocketException) as exc:
            module_logger.debug("socket shutdown: %s", exc)

    def __enter__(self) -> "ComfyUIConnection":
        return self.open()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # Prefect may try to copy task inputs; a live connection is shared, never copied.
    def __deepcopy__(self, memo: dict) -> "ComfyUIConnection":
        return self

    def __reduce__(self):
        raise TypeError("ComfyUIConnection is a live resource and cannot be pickled")

    # ----------------------------------------------------------------- reader thread
    def _read_loop(self) -> None:
        reason = "the connection was closed"
        try:
            while not self._closing.is_set():
                ws = self._ws
                assert ws is not None
                reason = self._pump(ws)
                if self._closing.is_set():
                    reason = "the connection was closed"
                    break
                self.stats.disconnects += 1
                self._dropped_reason = reason
                self._log.warning("WebSocket to %s dropped (%s); reconnecting as client_id %s",
                               self.url, reason, self.client_id)
                self._shutdown_socket(ws)
                if self._reconnect(reason) is None:
                    break
                self._dropped_reason = None
                self.stats.reconnects += 1
                with self._slot_cond:  # generations waiting for a connected server may go on
                    self._slot_cond.notify_all()
                self._log.warning("WebSocket to %s reconnected; checking %d prompt(s) in flight",
                               self.url, len(self._waiters))
                with self._lock:
                    waiters = list(self._waiters.values())
                for waiter in waiters:
                    waiter.inbox.put(_Reconcile())
        except Exception as exc:  # a bug of ours must not leave waiters hanging
            self._log.exception("WebSocket reader crashed")
            reason = f"the WebSocket reader crashed: {type(exc).__name__}: {exc}"
        finally:
            if not self._closing.is_set():
                self._dead_reason = reason
            self._wake_all(reason)

    def _pump(self, ws: websocket.WebSocket) -> str:
        """Read frames until the socket ends; return why it ended."""
        try:
            while not self._closing.is_set():
                opcode, payload = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    try:
                        self._route_text(payload)
                    except Exception:  # one odd frame must never take the reader down
                        self.stats.malformed_frames += 1
                        self._log.exception("skipped a text frame that could not be handled: %r", payload[:200])
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    self.stats.binary_frames_skipped += 1
                    self._log.debug("skipped binary frame, event type %s, %d bytes",
                                 binary_event_type(payload), len(payload))
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    return "the server closed the WebSocket"
        except (OSError, websocket.WebSocketException) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return "the connection was closed"

    def _reconnect(self, reason: str) -> Optional[websocket.WebSocket]:
        """Handshake again with the same client_id, with exponential backoff and jitter.

        The backoff carries over between drops: a socket that dropped within
        ``_STABLE_AFTER_S`` of opening (a flapping proxy or server) makes the next reconnect
        wait longer instead of hammering the server. Returns the new socket, now in use, or
        ``None`` when closing or after ``reconnect_timeout_s``.
        """
        deadline = time.monotonic() + self.reconnect_timeout_s
        if time.monotonic() - self._connected_at >= _STABLE_AFTER_S:
            self._backoff_s = 0.0  # it was up for a while: try again at once
        last = reason
        while not self._closing.is_set():
            if self._backoff_s:
                pause = self._backoff_s * (0.5 + random.random())
                if self._closing.wait(min(pause, max(0.0, deadline - time.monotonic()))):
                    return None
            self._backoff_s = min(max(self._backoff_s * 2, 0.1), _MAX_BACKOFF_S)
            if time.monotonic() >= deadline:
                break
            try:
                ws = self._handshake()
            except ComfyUIError as exc:
                last = str(exc)
                continue
            with self._lock:
                if self._closed:  # close() ran meanwhile: this socket must not outlive it
                    self._shutdown_socket(ws)
                    return None
                self._ws = ws
                self._connected_at = time.monotonic()
            return ws
        if not self._closing.is_set():
            self._log.error("gave up reconnecting to %s after %g s: %s", self.url, self.reconnect_timeout_s, last)
        return None

    def _route_text(self, payload: bytes | str) -> None:
        self.stats.messages += 1
        msg = parse_text_frame(payload)
        if msg is None:
            self.stats.malformed_frames += 1
            self._log.debug("skipped malformed text frame: %r", payload[:200])
            return
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
        if waiter is None:
            self.stats.unroutable_messages += 1
            return
        waiter.inbox.put((time.monotonic(), msg))

    def _wake_all(self, reason: str, interrupted: Iterable[str] = ()) -> None:
        interrupted = set(interrupted)
        with self._lock:
            waiters = list(self._waiters.items())
        for prompt_id, waiter in waiters:
            waiter.inbox.put(_Closed(reason, by_us=self._closed, interrupted=prompt_id in interrupted))

    # ----------------------------------------------------------------- HTTP conveniences
    def system_stats(self) -> dict:
        """``GET /system_stats``. Raises :class:`ServerUnreachable` within ``connect_timeout_s``."""
        return self.http.system_stats()

    def download(self, ref: OutputRef, dest: Union[Path, Iterable[Path]]) -> tuple[Path, int]:
        """``GET /view`` to ``dest`` or the first free candidate path (see :meth:`ComfyUIHTTP.download`).

        Returns ``(path, bytes_written)``.
        """
        return self.http.download(ref, dest)

    # ----------------------------------------------------------------- prompts
    # ----------------------------------------------------------------- in-flight slots
    @property
    def usable(self) -> bool:
        """Open and not given up on (it may be reconnecting)."""
        return not self._closed and self._dead_reason is None

    @property
    def connected(self) -> bool:
        """The WebSocket is up right now."""
        return self.usable and self._dropped_reason is None

    @property
    def free_slots(self) -> int:
        """How many more prompts may be in flight now (``max_in_flight`` minus those in flight)."""
        return self.max_in_flight - self._slots_taken

    def reserve_slot(self, *, block: bool = True) -> bool:
        """Take one of the ``max_in_flight`` slots, waiting for one if ``block``.

        Raises:
            ConnectionLost: the connection closed or died while waiting.
        """
        with self._slot_cond:
            while True:
                if not self.usable:  # also when a slot is free: nothing may start after close()
                    raise self._unusable()
                if self._slots_taken < self.max_in_flight:
                    break
                if not block:
                    return False
                self._slot_cond.wait(0.5)
            self._slots_taken += 1
            return True

    def _unusable(self) -> ConnectionLost:
        if self._closed:
            return GenerationCancelled(self.url)
        return ConnectionLost(self.url, self._dead_reason or "the connection is closed")

    def _release_slot(self) -> None:
        with self._slot_cond:
            self._slots_taken -= 1
            self._slot_cond.notify_all()

    def _register(self, prompt_id: str, prompt: Optional[Mapping[str, Any]], *, reserved: bool = False) -> _Waiter:
        if not self.usable:
            if reserved:
                self._release_slot()
            raise self._unusable()
        if not reserved:
            self.reserve_slot()
        node_types = {str(k): v.get("class_type") for k, v in (prompt or {}).items() if isinstance(v, Mapping)}
        waiter = _Waiter(PromptTracker(prompt_id, node_types), time.monotonic())
        with self._lock:  # the lock close() takes to mark the connection closed and list our prompts
            closed = self._closed
            if not closed:
                self._waiters[prompt_id] = waiter
        if closed:
            self._release_slot()
            raise GenerationCancelled(self.url)
        return waiter

    def submit(
        self,
        prompt: Mapping[str, Any],
        *,
        prompt_id: Optional[str] = None,
        extra_data: Optional[Mapping[str, Any]] = None,
        reserved: bool = False,
    ) -> str:
        """``POST /prompt`` with this connection's ``client_id`` and a client-chosen ``prompt_id``.

        The waiter is registered before the POST, so no message of the prompt can be missed.
        If the POST fails in transport (an ambiguous submit: it may have arrived), the server
        is asked whether it has the ``prompt_id``; if it has, the prompt is kept, not re-sent.

        Returns:
            the ``prompt_id`` (a uuid4 string unless one was given).

        Raises:
            PromptValidationError: HTTP 400, with every ``node_errors`` entry in the message.
            ServerError: any other non-200 answer (e.g. 500).
            ServerUnreachable / ConnectionLost: the server or the connection is gone.
        """
        prompt_id = prompt_id or str(uuid.uuid4())
        self._register(prompt_id, prompt, reserved=reserved)
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        try:
            answer = self.http.post_prompt(body)
        except ServerUnreachable:
            if self._server_has(prompt_id):
                self._log.warning("POST /prompt for %s failed in transport but the server has it; "
                               "following it instead of posting again", prompt_id)
                self.stats.prompts_submitted += 1
                return prompt_id
            self._forget(prompt_id)
            raise
        except BaseException:
            self._forget(prompt_id)
            raise
        self.stats.prompts_submitted += 1
        if self._closed:
            # close() ran while the POST was on its way: its look at the queue may have missed this
            # prompt, so remove it here; no prompt of ours may run after close().
            self._remove_late(prompt_id)
        if answer.get("node_errors"):
            # HTTP 200 with node_errors: the valid outputs run, the invalid ones are dropped.
            self._log.warning("%s", PromptValidationError({"message": "some outputs were dropped"},
                                                      answer["node_errors"]))
        returned = answer.get("prompt_id")
        if returned and returned != prompt_id:  # a server that ignores the client's prompt_id
            with self._lock:
                waiter = self._waiters.pop(prompt_id)
                waiter.tracker.prompt_id = returned
                self._waiters[returned] = waiter
            prompt_id = returned
        return prompt_id

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
        """Follow a prompt that is already on the server (submitted earlier, maybe by a lost attempt).

        Registers a waiter and has it reconcile with the server at once, so a prompt that
        already finished completes from history. Returns ``prompt_id``.
        """
        waiter = self._register(prompt_id, prompt, reserved=reserved)
        waiter.inbox.put(_Reconcile())
        self.stats.prompts_attached += 1
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
            ConnectionLost: the connection was closed, or the server stayed unreachable.
        """
        with self._lock:
            waiter = self._waiters.get(prompt_id)
        if waiter is None:
            raise KeyError(f"prompt {prompt_id} was not submitted on this connection")
        timeout_s = self.generation_timeout_s if timeout_s is None else timeout_s
        tracker = waiter.tracker
        last_heard = time.monotonic()
        last_beat = last_heard
        last_reconcile = float("-inf")
        try:
            while not tracker.done:
                queued = waiter.started_at is None
                deadline = (waiter.submitted_at + self.queue_timeout_s) if queued else (waiter.started_at + timeout_s)
                now = time.monotonic()
                if now >= deadline:
                    # Messages already received count even when we come late to the deadline.
                    self._drain(waiter, on_event)
                    if tracker.done:
                        break
                    if queued and waiter.started_at is not None:
                        continue  # it had started after all: the run deadline applies
                    self._timed_out(waiter, queued, timeout_s)
                poll_at = last_heard + (self.idle_timeout_s if waiter.missing_polls == 0
                                        else min(self.idle_timeout_s, 1.0))
                wake = min(deadline, poll_at, last_beat + heartbeat_s)
                try:
                    item = waiter.inbox.get(timeout=max(0.0, wake - now))
                except queue.Empty:
                    now = time.monotonic()
                    if now >= poll_at:
                        self._reconcile(waiter)
                        last_heard = last_reconcile = time.monotonic()
                    elif now >= last_beat + heartbeat_s:
                        last_beat = now
                        if on_event is not None:
                            _notify(on_event, PromptEvent("waiting"), tracker)
                    continue
                if isinstance(item, _Closed):
                    raise item.error(self.url, prompt_id)
                if isinstance(item, _Reconcile):
                    # after a reconnect; a flapping socket must not turn this into a request storm
                    if time.monotonic() - last_reconcile >= _MIN_RECONCILE_INTERVAL_S:
                        self._reconcile(waiter)
                        last_heard = last_reconcile = time.monotonic()
                    continue
                received_at, msg = item
                last_heard = last_beat = time.monotonic()
                waiter.missing_polls = 0
                self._feed(waiter, msg, received_at, on_event)
            if tracker.error is not None:
                raise tracker.error
            return PromptOutcome(
                prompt_id=prompt_id,
                submitted_at=waiter.submitted_at,
                started_at=waiter.started_at,
                finished_at=time.monotonic(),
                cached=tracker.fully_cached,
                cached_nodes=list(tracker.cached_nodes),
                executed_nodes=list(tracker.executed_nodes),
            )
        finally:
            self._forget(prompt_id)

    def _drain(self, waiter: _Waiter, on_event: Optional[EventCallback]) -> None:
        """Feed every message already in the waiter's inbox, without blocking."""
        while not waiter.tracker.done:
            try:
                item = waiter.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Closed):
                raise item.error(self.url, waiter.tracker.prompt_id)
            if not isinstance(item, _Reconcile):
                self._feed(waiter, item[1], item[0], on_event)

    @staticmethod
    def _feed(waiter: _Waiter, msg: Mapping[str, Any], received_at: float,
              on_event: Optional[EventCallback]) -> None:
        for event in waiter.tracker.feed(msg):
            if event.kind in ("started", "cached", "executing") and waiter.started_at is None:
                waiter.started_at = received_at
            if on_event is not None:
                _notify(on_event, event, waiter.tracker)

    def _timed_out(self, waiter: _Waiter, queued: bool, timeout_s: float) -> None:
        tracker = waiter.tracker
        if self._dropped_reason is not None:
            raise ConnectionLost(self.url, f"the WebSocket dropped ({self._dropped_reason}) and "
                                 "could not be reconnected in time", tracker.prompt_id)
        if waiter.unreachable is not None:
            raise ConnectionLost(self.url, f"the server stayed unreachable ({waiter.unreachable})",
                                 tracker.prompt_id)
        state = tracker.describe()
        # ComfyUI may keep an interrupted prompt "running" until its node reaches an interruptible
        # point: a retry must not follow it (it would only meet execution_interrupted).
        self.abandoned_prompts.add(tracker.prompt_id)
        self.cancel_prompt(tracker.prompt_id)
        if queued:
            raise GenerationTimeout(tracker.prompt_id, self.queue_timeout_s, state, in_queue=True)
        raise GenerationTimeout(tracker.prompt_id, timeout_s, state)

    def _reconcile(self, waiter: _Waiter) -> None:
        """Ask the server about one prompt; complete it from history if it finished meanwhile."""
        tracker = waiter.tracker
        self.stats.polls += 1
        try:
            status, entry = self.prompt_status(tracker.prompt_id)
        except (ServerUnreachable, ServerError) as exc:
            waiter.unreachable = str(exc)
            self._log.debug("could not reconcile %s: %s", tracker.prompt_id, exc)
            return
        waiter.unreachable = None
        now = time.monotonic()
        if status in ("succeeded", "failed"):
            waiter.missing_polls = 0
            for msg in _history_messages(tracker.prompt_id, entry):
                self._feed(waiter, msg, now, None)
        elif status == "running":
            waiter.missing_polls = 0
            if waiter.started_at is None:
                waiter.started_at = now
        elif status == "pending":
            waiter.missing_polls = 0
        else:
            waiter.missing_polls += 1
            self._log.warning("prompt %s not found on %s (%d of %d checks)", tracker.prompt_id,
                           self.url, waiter.missing_polls, self.lost_after_polls)
            if waiter.missing_polls >= self.lost_after_polls:
                raise PromptLost(tracker.prompt_id, self.url, waiter.missing_polls)

    def _forget(self, prompt_id: str) -> None:
        with self._lock:
            waiter = self._waiters.pop(prompt_id, None)
        if waiter is not None:
            self._release_slot()

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
            prompt_id = self.submit(prompt, prompt_id=prompt_id, reserved=reserved)
        outcome = self.wait(prompt_id, timeout_s=timeout_s, on_event=on_event, heartbeat_s=heartbeat_s)
        entry = self.wait_for_history(prompt_id)
        return outcome, outputs_from_history(entry, output_types)
