"""One live ComfyUI connection: one WebSocket, one HTTP session, one reader thread.

The reader thread is the WebSocket demultiplexer: it reads every frame of ``/ws`` and hands
each message that carries a ``prompt_id`` to the waiter registered for that prompt, so any
number of threads can have prompts in flight on the same connection and each sees only its
own messages. Messages without a ``prompt_id`` (``status``, ``executing`` after a reconnect)
and binary preview frames are recorded or skipped, never fatal.

HTTP endpoints spoken to: ``GET /system_stats`` (reachability), ``POST /prompt`` (submit),
``GET /history/{prompt_id}`` (outputs), ``GET /view`` (download), ``GET /queue``,
``POST /queue`` (delete pending), ``POST /interrupt`` (targeted), ``GET /object_info``.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

import requests
import websocket

from .errors import (
    AuthenticationFailed,
    ComfyUIError,
    ConnectionLost,
    GenerationTimeout,
    OutputError,
    PromptValidationError,
    ServerError,
    ServerUnreachable,
)
from .protocol import (
    OutputRef,
    PromptEvent,
    PromptTracker,
    binary_event_type,
    outputs_from_history,
    parse_text_frame,
    prompt_id_of,
)

logger = logging.getLogger("comfy_pipeline.connection")

EventCallback = Callable[[PromptEvent, PromptTracker], None]


@dataclass
class ConnectionStats:
    """Facts about one connection for the report.

    ``connections_opened`` counts WebSocket handshakes (1 for a healthy run);
    ``binary_frames_skipped`` counts preview frames; ``unroutable_messages`` counts messages
    with a ``prompt_id`` that no waiter of ours owns.
    """

    connections_opened: int = 0
    reconnects: int = 0
    messages: int = 0
    binary_frames_skipped: int = 0
    malformed_frames: int = 0
    unroutable_messages: int = 0
    prompts_submitted: int = 0
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


class _Closed:
    """Put into every waiter's inbox when the reader stops."""

    def __init__(self, reason: str):
        self.reason = reason


def _short_reason(exc: BaseException) -> str:
    """The useful part of a requests/urllib3 error, e.g. ``[Errno 111] Connection refused``."""
    if isinstance(exc, requests.Timeout):
        return f"no answer in time ({type(exc).__name__})"
    match = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(exc))
    return match.group(0).strip() if match else str(exc)


def ws_url_for(http_url: str, client_id: str) -> str:
    """``http(s)://host:port/base`` -> ``ws(s)://host:port/base/ws?clientId=<client_id>``."""
    parts = urlsplit(http_url)
    scheme = {"http": "ws", "https": "wss"}[parts.scheme]
    path = parts.path.rstrip("/") + "/ws"
    return urlunsplit((scheme, parts.netloc, path, f"clientId={client_id}", ""))


class ComfyUIConnection:
    """A live connection to one ComfyUI server; a context manager.

    Opened by :meth:`blocks.server.ComfyUIServer.connect`. Thread-safe: many threads may call
    :meth:`run_prompt` (or :meth:`submit` + :meth:`wait`) at once. :meth:`close` is
    idempotent: the WebSocket is closed and the reader thread ends exactly once.

    Args:
        url: the server's HTTP base URL, e.g. ``http://127.0.0.1:8188``.
        headers: extra HTTP/WebSocket headers (``Authorization`` included when set); never logged.
        verify_tls: verify the server's certificate for https/wss.
        connect_timeout_s: seconds allowed for TCP connect and the WebSocket handshake.
        generation_timeout_s: default seconds one prompt may run, from ``execution_start``
            (or its first ``executing``/``execution_cached``) to completion.
        queue_timeout_s: seconds one prompt may wait in the server's queue before it starts.
        http_timeout_s: seconds allowed for one HTTP response (read timeout).
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
        http_timeout_s: float = 60.0,
    ):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.connect_timeout_s = connect_timeout_s
        self.generation_timeout_s = generation_timeout_s
        self.queue_timeout_s = queue_timeout_s
        self.http_timeout_s = http_timeout_s
        self.verify_tls = verify_tls
        self.stats = ConnectionStats()
        self._headers = dict(headers or {})
        self._session = requests.Session()
        self._session.headers.update(self._headers)
        self._session.verify = verify_tls
        self._ws: Optional[websocket.WebSocket] = None
        self._reader: Optional[threading.Thread] = None
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._closed = False
        self._close_reason: Optional[str] = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def ws_url(self) -> str:
        """The ``/ws?clientId=`` URL this connection uses."""
        return ws_url_for(self.url, self.client_id)

    @property
    def is_open(self) -> bool:
        """True while the WebSocket reader is running."""
        return self._reader is not None and self._reader.is_alive() and not self._closed

    def open(self) -> "ComfyUIConnection":
        """Check the server (``GET /system_stats``), open the WebSocket, start the reader.

        Raises:
            ServerUnreachable: no answer within ``connect_timeout_s`` (names the URL).
            AuthenticationFailed: HTTP 401/403 or a refused WebSocket upgrade.
        """
        if self._ws is not None:
            return self
        self.system_stats()
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
        self._ws = ws
        self.stats.connections_opened += 1
        self._reader = threading.Thread(
            target=self._read_loop, name=f"comfyui-reader-{self.client_id[:8]}", daemon=True
        )
        self._reader.start()
        logger.debug("connected to %s as client_id %s", self.url, self.client_id)
        return self

    def close(self) -> None:
        """Close the WebSocket and the HTTP session; end the reader thread. Idempotent.

        Waiters still in flight are woken with :class:`ConnectionLost`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._closing.set()
        ws = self._ws
        if ws is not None:
            try:
                ws.send_close()
            except (OSError, websocket.WebSocketException) as exc:
                logger.debug("close frame not sent: %s", exc)
            if self._reader is not None:
                self._reader.join(timeout=2.0)
            try:
                ws.shutdown()
            except (OSError, websocket.WebSocketException) as exc:
                logger.debug("socket shutdown: %s", exc)
            if self._reader is not None:
                self._reader.join(timeout=5.0)
        self._wake_all("the connection was closed")
        self._session.close()

    def __enter__(self) -> "ComfyUIConnection":
        return self.open()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # Prefect may try to copy or pickle task inputs; a live connection is neither.
    def __deepcopy__(self, memo: dict) -> "ComfyUIConnection":
        return self

    def __reduce__(self):  # pragma: no cover - guard
        raise TypeError("ComfyUIConnection is a live resource and cannot be pickled")

    # ----------------------------------------------------------------- reader thread
    def _read_loop(self) -> None:
        reason = "the server closed the WebSocket"
        ws = self._ws
        assert ws is not None
        try:
            while not self._closing.is_set():
                opcode, payload = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self._route_text(payload)
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    self.stats.binary_frames_skipped += 1
                    logger.debug("skipped binary frame, event type %s, %d bytes",
                                 binary_event_type(payload), len(payload))
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
        except (OSError, websocket.WebSocketException) as exc:
            if not self._closing.is_set():
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # a bug of ours must not leave waiters hanging
            logger.exception("WebSocket reader crashed")
            reason = f"reader thread crashed: {type(exc).__name__}: {exc}"
        finally:
            if self._closing.is_set():
                reason = "the connection was closed"
            self._close_reason = reason
            self._wake_all(reason)

    def _route_text(self, payload: bytes | str) -> None:
        self.stats.messages += 1
        msg = parse_text_frame(payload)
        if msg is None:
            self.stats.malformed_frames += 1
            logger.debug("skipped malformed text frame: %r", payload[:200])
            return
        if msg["type"] == "status":
            info = (msg["data"].get("status") or {}).get("exec_info") or {}
            if isinstance(info.get("queue_remaining"), int):
                self.stats.last_queue_remaining = info["queue_remaining"]
            return
        prompt_id = prompt_id_of(msg)
        if prompt_id is None:
            logger.debug("message without prompt_id: %s", msg["type"])
            return
        with self._lock:
            waiter = self._waiters.get(prompt_id)
        if waiter is None:
            self.stats.unroutable_messages += 1
            return
        waiter.inbox.put((time.monotonic(), msg))

    def _wake_all(self, reason: str) -> None:
        with self._lock:
            waiters = list(self._waiters.values())
        for waiter in waiters:
            waiter.inbox.put(_Closed(reason))

    # ----------------------------------------------------------------- HTTP helpers
    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.url}{path}"
        kwargs.setdefault("timeout", (self.connect_timeout_s, self.http_timeout_s))
        try:
            response = self._session.request(method, url, **kwargs)
        except requests.RequestException as exc:
            raise ServerUnreachable(self.url, f"{method} {path}: {_short_reason(exc)}") from exc
        if response.status_code in (401, 403):
            raise AuthenticationFailed(self.url, response.status_code)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code != 200:
            raise ServerError(method, f"{self.url}{path}", response.status_code, response.text)
        try:
            return response.json()
        except ValueError as exc:
            raise ServerError(method, f"{self.url}{path}", response.status_code,
                              f"not JSON: {response.text[:200]}") from exc

    def system_stats(self) -> dict:
        """``GET /system_stats``: server, Python and device facts.

        Raises:
            ServerUnreachable: no answer within ``connect_timeout_s``.
        """
        return self._json("GET", "/system_stats", timeout=(self.connect_timeout_s, self.connect_timeout_s))

    def object_info(self) -> dict:
        """``GET /object_info``: ``{class_type: definition}`` of every node the server has."""
        return self._json("GET", "/object_info")

    def get_queue(self) -> dict:
        """``GET /queue``: ``{"queue_running": [...], "queue_pending": [...]}``."""
        return self._json("GET", "/queue")

    def get_history(self, prompt_id: str) -> dict:
        """``GET /history/{prompt_id}``: the entry for the prompt, or ``{}`` if the server has none."""
        body = self._json("GET", f"/history/{prompt_id}")
        return body.get(prompt_id) or {}

    # ----------------------------------------------------------------- prompts
    def submit(
        self,
        prompt: Mapping[str, Any],
        *,
        prompt_id: Optional[str] = None,
        extra_data: Optional[Mapping[str, Any]] = None,
    ) -> str:
        """``POST /prompt`` with this connection's ``client_id`` and a client-chosen ``prompt_id``.

        The waiter is registered before the POST, so no message of the prompt can be missed.

        Returns:
            the ``prompt_id`` (a uuid4 string unless one was given).

        Raises:
            PromptValidationError: HTTP 400, with every ``node_errors`` entry in the message.
            ServerError: any other non-200 answer.
            ServerUnreachable / ConnectionLost: the server or the WebSocket is gone.
        """
        if self._closed or self._ws is None:
            raise ConnectionLost(self.url, self._close_reason or "the connection is not open")
        prompt_id = prompt_id or str(uuid.uuid4())
        node_types = {str(k): v.get("class_type") for k, v in prompt.items() if isinstance(v, Mapping)}
        waiter = _Waiter(PromptTracker(prompt_id, node_types), time.monotonic())
        with self._lock:
            self._waiters[prompt_id] = waiter
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        try:
            response = self._request("POST", "/prompt", json=body)
            if response.status_code == 400:
                try:
                    err = response.json()
                except ValueError:
                    err = {"error": {"message": response.text}}
                raise PromptValidationError(err.get("error"), err.get("node_errors"))
            if response.status_code != 200:
                raise ServerError("POST", f"{self.url}/prompt", response.status_code, response.text)
            answer = response.json()
        except BaseException:
            self._forget(prompt_id)
            raise
        self.stats.prompts_submitted += 1
        if answer.get("node_errors"):
            # HTTP 200 with node_errors: the valid outputs run, the invalid ones are dropped.
            logger.warning("%s", PromptValidationError({"message": "some outputs were dropped"},
                                                      answer["node_errors"]))
        returned = answer.get("prompt_id")
        if returned and returned != prompt_id:  # a server that ignores client prompt_id
            with self._lock:
                self._waiters[returned] = self._waiters.pop(prompt_id)
                waiter.tracker.prompt_id = returned
            prompt_id = returned
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
            prompt_id: a prompt submitted on this connection.
            timeout_s: seconds the prompt may run once it started; defaults to
                ``generation_timeout_s``. Time spent waiting in the server's queue behind other
                prompts does not count; it is bounded by ``queue_timeout_s``.
            on_event: called in this thread with each :class:`PromptEvent` (for progress logs),
                and with a ``waiting`` event after ``heartbeat_s`` seconds without a message.
            heartbeat_s: seconds of silence between ``waiting`` events.

        Raises:
            NodeExecutionError: ``execution_error`` for this prompt.
            ExecutionInterrupted: ``execution_interrupted`` for this prompt.
            GenerationTimeout: not finished in time; the prompt is removed from the server
                (deleted if pending, interrupted if running).
            ConnectionLost: the WebSocket closed first.
        """
        with self._lock:
            waiter = self._waiters.get(prompt_id)
        if waiter is None:
            raise KeyError(f"prompt {prompt_id} was not submitted on this connection")
        timeout_s = self.generation_timeout_s if timeout_s is None else timeout_s
        tracker = waiter.tracker
        try:
            while not tracker.done:
                queued = waiter.started_at is None
                if queued:
                    deadline = waiter.submitted_at + self.queue_timeout_s
                else:
                    deadline = waiter.started_at + timeout_s
                remaining = deadline - time.monotonic()
                try:
                    # Messages already received count even when we come late to the deadline.
                    item = waiter.inbox.get(timeout=max(0.0, min(remaining, heartbeat_s)))
                except queue.Empty:
                    if time.monotonic() < deadline:
                        if on_event is not None:
                            on_event(PromptEvent("waiting"), tracker)
                        continue
                    state = tracker.describe()
                    self.cancel_prompt(prompt_id)
                    if queued:
                        raise GenerationTimeout(prompt_id, self.queue_timeout_s, state, in_queue=True)
                    raise GenerationTimeout(prompt_id, timeout_s, state)
                if isinstance(item, _Closed):
                    raise ConnectionLost(self.url, item.reason, prompt_id)
                received_at, msg = item
                for event in tracker.feed(msg):
                    if event.kind in ("started", "cached", "executing") and waiter.started_at is None:
                        waiter.started_at = received_at
                    if on_event is not None:
                        on_event(event, tracker)
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

    def _forget(self, prompt_id: str) -> None:
        with self._lock:
            self._waiters.pop(prompt_id, None)

    def cancel_prompt(self, prompt_id: str) -> None:
        """Remove one prompt of ours from the server, never touching anyone else's.

        ``POST /queue {"delete": [id]}`` if it is pending, ``POST /interrupt {"prompt_id": id}``
        if it is running. Failures are logged, not raised (this runs on error paths).
        """
        try:
            snapshot = self.get_queue()
            running = {item[1] for item in snapshot.get("queue_running", []) if len(item) > 1}
            pending = {item[1] for item in snapshot.get("queue_pending", []) if len(item) > 1}
            if prompt_id in pending:
                self._request("POST", "/queue", json={"delete": [prompt_id]})
            if prompt_id in running:
                self._request("POST", "/interrupt", json={"prompt_id": prompt_id})
        except ComfyUIError as exc:
            logger.warning("could not remove prompt %s from %s: %s", prompt_id, self.url, exc)

    def wait_for_history(self, prompt_id: str, *, within_s: float = 5.0) -> dict:
        """``GET /history/{prompt_id}``, retried for up to ``within_s`` seconds.

        History can trail ``execution_success`` by a moment.

        Raises:
            OutputError: still no history entry after ``within_s``.
        """
        deadline = time.monotonic() + within_s
        delay = 0.02
        while True:
            entry = self.get_history(prompt_id)
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

    def download(self, ref: OutputRef, dest: Path, *, chunk_bytes: int = 1 << 16) -> int:
        """``GET /view`` one output file, streamed to disk and renamed into place when complete.

        The body goes to a hidden temporary file beside ``dest``; it becomes ``dest`` only once
        every byte (per ``Content-Length``) arrived. ``dest`` must not exist: nothing is
        overwritten.

        Returns:
            the number of bytes written.

        Raises:
            OutputError: HTTP error, truncated body, or ``dest`` already exists.
        """
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        response = self._request("GET", "/view", params=params, stream=True)
        try:
            if response.status_code != 200:
                raise OutputError(
                    f"GET /view of {ref.subfolder}/{ref.filename} ({ref.type}) from {self.url} "
                    f"answered HTTP {response.status_code}; the file is not on the server."
                )
            expected = response.headers.get("Content-Length")
            written = 0
            with open(tmp, "wb") as fh:
                for chunk in response.iter_content(chunk_bytes):
                    fh.write(chunk)
                    written += len(chunk)
            if expected is not None and written != int(expected):
                raise OutputError(
                    f"GET /view of {ref.filename} from {self.url} was cut short: "
                    f"{written} of {expected} bytes."
                )
            try:
                os.link(tmp, dest)  # fails if dest exists: never overwrite
            except FileExistsError as exc:
                raise OutputError(f"{dest} already exists; not overwriting it.") from exc
            return written
        except requests.RequestException as exc:
            raise OutputError(f"GET /view of {ref.filename} from {self.url} failed: {exc}") from exc
        finally:
            response.close()
            tmp.unlink(missing_ok=True)

    def run_prompt(
        self,
        prompt: Mapping[str, Any],
        *,
        prompt_id: Optional[str] = None,
        timeout_s: Optional[float] = None,
        on_event: Optional[EventCallback] = None,
        heartbeat_s: float = 30.0,
        output_types: Optional[tuple[str, ...]] = ("output",),
    ) -> tuple[PromptOutcome, list[OutputRef]]:
        """Submit, wait, and list the prompt's output files from history.

        Returns:
            ``(outcome, refs)``: timings and the files to download with :meth:`download`.

        Raises:
            everything :meth:`submit`, :meth:`wait` and :meth:`wait_for_history` raise.
        """
        prompt_id = self.submit(prompt, prompt_id=prompt_id)
        outcome = self.wait(prompt_id, timeout_s=timeout_s, on_event=on_event, heartbeat_s=heartbeat_s)
        entry = self.wait_for_history(prompt_id)
        return outcome, outputs_from_history(entry, output_types)
