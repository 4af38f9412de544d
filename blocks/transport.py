"""The WebSocket to one ComfyUI server: handshake, reader thread, keepalive, reconnect, routing.

One reader thread reads every frame of ``/ws?clientId=<client_id>`` and hands each parsed
text message to ``on_message``; binary preview frames and malformed frames are counted and
skipped, never fatal. The socket is replaced (same ``client_id``, exponential backoff with
jitter, for as long as the connection is open: a server that comes back is used again) when:

* it drops or the server closes it;
* it goes **silent**: nothing at all for ``keepalive_s`` seconds, then no answer to a ping
  within ``keepalive_s`` more (a half-open TCP connection, a proxy that stopped forwarding);
* it is **deaf**: a ``POST /prompt`` of ours made ComfyUI broadcast a queue ``status`` to every
  socket, and ours received no text frame within ``keepalive_s`` (ComfyUI dropped our
  ``client_id`` from its socket map: transcript h, an old socket's cleanup running after the new
  socket registered), or the connection found a completion the socket never delivered
  (:meth:`WebSocketTransport.recycle`).

A socket that still answers is closed with a closing handshake before the new one is opened,
so ComfyUI's cleanup of the old socket cannot remove the new one's ``client_id``.
``on_link(up)`` is called from the reader thread each time the socket goes down or comes up.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Union
from urllib.parse import urlsplit, urlunsplit

import websocket

from .errors import AuthenticationFailed, CertificateNotTrusted, ComfyUIError, ServerUnreachable
from .protocol import binary_event_type, parse_text_frame
from .tls import not_trusted, websocket_sslopt

module_logger = logging.getLogger("comfy_pipeline.connection")
Logger = Union[logging.Logger, logging.LoggerAdapter]

_STABLE_AFTER_S = 10.0  # a socket up this long counts as healthy: its backoff starts over
_MAX_BACKOFF_S = 1.0  # a refused connect is cheap: a server that is back is found within about a second
_TICK_S = 0.25  # how often the reader looks at its keepalive clocks while the socket is quiet
_CLOSE_WAIT_S = 0.5  # the most a closing handshake may take before the socket is just shut down


def ws_url_for(http_url: str, client_id: str) -> str:
    """``http(s)://host:port/base`` -> ``ws(s)://host:port/base/ws?clientId=<client_id>``."""
    parts = urlsplit(http_url)
    scheme = {"http": "ws", "https": "wss"}[parts.scheme]
    path = parts.path.rstrip("/") + "/ws"
    return urlunsplit((scheme, parts.netloc, path, f"clientId={client_id}", ""))


@dataclass
class Outage:
    """One time the WebSocket was down: ``started``/``ended`` are UTC datetimes (``ended`` None
    while it is still down), ``reason`` why it went down."""

    started: datetime
    reason: str
    ended: Optional[datetime] = None


@dataclass
class ConnectionStats:
    """Facts about one connection for the report; updated from several threads with :meth:`add`.

    ``connections_opened`` counts handshakes that opened the connection (1 for a flow run);
    ``reconnects`` handshakes after a drop; ``disconnects`` drops (silent and deaf sockets
    included); ``binary_frames_skipped`` preview frames; ``malformed_frames`` frames that were
    not JSON messages; ``last_queue_remaining`` the queue length of the last ``status``
    broadcast; ``outages`` every time the socket was down.
    """

    connections_opened: int = 0
    reconnects: int = 0
    disconnects: int = 0
    binary_frames_skipped: int = 0
    malformed_frames: int = 0
    last_queue_remaining: Optional[int] = None
    outages: list[Outage] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name``, atomically."""
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


class WebSocketTransport:
    """The ``/ws`` socket of one connection and its reader thread.

    Args:
        http_url: the server's HTTP base URL.
        client_id: the ``clientId`` (kept across reconnects: ComfyUI addresses a prompt's
            messages to the client_id it was submitted with).
        headers: sent with the upgrade request (``Authorization`` included); never logged.
        verify_tls: verify the certificate for wss.
        ca_bundle: path of a PEM file with the CA certificate(s) to trust for wss instead of the
            default ones (already checked by the caller: :func:`.tls.usable_ca_bundle`).
        connect_timeout_s: seconds for the TCP connect and the handshake.
        keepalive_s: seconds of silence before a ping, then seconds allowed for any answer;
            also the seconds within which a ``status`` broadcast must follow one of our POSTs.
        on_message: ``(message, received_at)`` for every text message, in the reader thread.
        on_link: ``(up)`` after the socket went down (False) or came up again (True).
        stats: the connection's counters.
        logger: where warnings go (the flow run's logger).
    """

    def __init__(self, http_url: str, client_id: str, *, headers: dict[str, str], verify_tls: bool,
                 ca_bundle: Optional[str] = None, connect_timeout_s: float, keepalive_s: float,
                 on_message: Callable[[dict, float], None], on_link: Callable[[bool], None],
                 stats: ConnectionStats, logger: Optional[Logger] = None):
        self.url = http_url
        self.client_id = client_id
        self._ws_url = ws_url_for(http_url, client_id)
        self._headers = headers
        self._ca_bundle = ca_bundle if verify_tls else None
        self._sslopt = websocket_sslopt(verify_tls, ca_bundle)
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._on_message = on_message
        self._on_link = on_link
        self.stats = stats
        self._log = logger or module_logger
        self._ws: Optional[websocket.WebSocket] = None
        self._reader: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._closed = False
        self._backoff_s = 0.0
        #: ``time.monotonic()`` of the current socket's handshake; None while it is down
        self.up_since: Optional[float] = None
        #: ``time.monotonic()`` when the socket went down; None while it is up
        self.down_since: Optional[float] = None
        self.down_reason = ""
        self._text_frames = 0
        self._expect: Optional[tuple[int, float]] = None  # (text frames seen, deadline) after a POST
        self._recycle: Optional[str] = None
        self._connected_at_last = 0.0

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Handshake and start the reader.

        Raises:
            ServerUnreachable: no handshake within ``connect_timeout_s``.
            CertificateNotTrusted: the server's certificate failed verification.
            AuthenticationFailed: the upgrade was refused with 401/403.
        """
        self._ws = self._handshake()
        self.up_since = self._connected_at_last = time.monotonic()
        self.stats.add("connections_opened")
        self._reader = threading.Thread(target=self._read_loop, name=f"comfyui-reader-{self.client_id[:8]}",
                                        daemon=True)
        self._reader.start()

    @property
    def up(self) -> bool:
        return self.down_since is None and not self._closed

    @property
    def alive(self) -> bool:
        """The reader runs (connected or reconnecting)."""
        return self._reader is not None and self._reader.is_alive() and not self._closed

    def close(self) -> None:
        """Close the socket (with a close frame if possible) and end the reader. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # from here the reader cannot install a new socket
        self._closing.set()
        ws = self._ws
        if ws is not None:
            try:
                ws.send_close()
            except (OSError, websocket.WebSocketException) as exc:
                self._log.debug("close frame not sent: %s", exc)
            if self._reader is not None:
                self._reader.join(timeout=2.0)
            _shutdown(ws)
        if self._reader is not None:
            # A reconnect handshake in progress cannot be interrupted; it ends within connect_timeout_s.
            self._reader.join(timeout=self.connect_timeout_s + 2.0)
            if self._reader.is_alive():
                self._log.error("the WebSocket reader for %s did not stop", self.url)

    def text_frames(self) -> int:
        """Text frames received so far (read before a POST, give to :meth:`expect_broadcast`)."""
        return self._text_frames

    def expect_broadcast(self, frames_before: int) -> None:
        """A ``POST /prompt`` of ours was accepted: ComfyUI broadcast a queue ``status`` to every
        socket. Unless a text frame arrived since ``frames_before``, one must within
        ``keepalive_s``, or the socket is deaf and is replaced."""
        with self._lock:
            if self._text_frames > frames_before or self._expect is not None:
                return
            self._expect = (frames_before, time.monotonic() + self.keepalive_s)

    def recycle(self, reason: str) -> None:
        """Replace the socket now (it is deaf); a no-op while it is down or closing."""
        with self._lock:
            if self.down_since is None and not self._closed:
                self._recycle = reason

    # ------------------------------------------------------------------ reader thread
    def _handshake(self) -> websocket.WebSocket:
        try:
            ws = websocket.create_connection(
                self._ws_url,
                timeout=self.connect_timeout_s,
                header=[f"{k}: {v}" for k, v in self._headers.items()],
                sslopt=self._sslopt,
                enable_multithread=True,
                # json.loads refuses bad text anyway; the pure-Python UTF-8 check cost ~3% of a run
                skip_utf8_validation=True,
            )
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code in (401, 403):
                raise AuthenticationFailed(self.url, exc.status_code) from exc
            raise ServerUnreachable(self.url, f"WebSocket upgrade refused: {exc}") from exc
        except (OSError, websocket.WebSocketException) as exc:
            untrusted = not_trusted(self.url, exc, self._ca_bundle)
            if untrusted is not None:
                raise untrusted from exc
            raise ServerUnreachable(self.url, f"WebSocket {self._ws_url.split('?')[0]}: {exc}") from exc
        ws.settimeout(_TICK_S)  # the reader wakes up to look at its keepalive clocks
        return ws

    def _read_loop(self) -> None:
        try:
            while not self._closing.is_set():
                ws = self._ws
                assert ws is not None
                reason, answering = self._pump(ws)
                if self._closing.is_set():
                    break
                self._went_down(reason)
                if answering:
                    # ComfyUI must drop the old socket before the new one registers (transcript h);
                    # a responsive server answers a close at once, a silent socket never does.
                    _close_cleanly(ws, min(self.keepalive_s, _CLOSE_WAIT_S))
                else:
                    _shutdown(ws)
                if not self._reconnect():
                    break
                self._came_up()
        except Exception:  # a bug of ours must not leave the connection half alive without a word
            self._log.exception("the WebSocket reader for %s crashed", self.url)
            self.down_since = self.down_since or time.monotonic()
            self.down_reason = "the WebSocket reader crashed"
            self._on_link(False)

    def _went_down(self, reason: str) -> None:
        self.stats.add("disconnects")
        with self._lock:
            self.down_since, self.down_reason, self.up_since = time.monotonic(), reason, None
            self._expect = self._recycle = None
        self.stats.outages.append(Outage(datetime.now(timezone.utc), reason))
        self._log.warning("WebSocket to %s dropped (%s); reconnecting as client_id %s",
                          self.url, reason, self.client_id)
        self._on_link(False)

    def _came_up(self) -> None:
        self.stats.add("reconnects")
        down_for = time.monotonic() - (self.down_since or time.monotonic())
        with self._lock:
            self.down_since, self.down_reason = None, ""
        if self.stats.outages:
            self.stats.outages[-1].ended = datetime.now(timezone.utc)
        self._log.warning("WebSocket to %s reconnected after %.1f s", self.url, down_for)
        self._on_link(True)

    def _pump(self, ws: websocket.WebSocket) -> tuple[str, bool]:
        """Read frames until the socket ends, goes silent or deaf; return why, and whether it
        still answered (then it deserves a closing handshake)."""
        last_frame = time.monotonic()
        ping_sent: Optional[float] = None
        partial = _partial_frame(ws)
        while not self._closing.is_set():
            with self._lock:
                recycle, expect = self._recycle, self._expect
            if recycle:
                return recycle, True
            try:
                opcode, frame = ws.recv_data_frame(control_frame=True)
            except websocket.WebSocketTimeoutException:
                now = time.monotonic()
                progress = _partial_frame(ws)
                if progress != partial:  # part of a big frame arrived: the socket is alive
                    partial, last_frame, ping_sent = progress, now, None
                    continue
                if expect is not None and now >= expect[1]:
                    return (f"deaf: no queue status from ComfyUI within {self.keepalive_s:g} s of our "
                            "POST /prompt (the server forgot our client_id)", True)
                if ping_sent is not None and now - ping_sent >= self.keepalive_s:
                    return f"silent: no answer to a ping within {self.keepalive_s:g} s", False
                if ping_sent is None and now - last_frame >= self.keepalive_s:
                    ws.ping()
                    ping_sent = now
                continue
            except (OSError, websocket.WebSocketException) as exc:
                return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__), False
            last_frame, ping_sent, partial = time.monotonic(), None, _partial_frame(ws)
            if opcode == websocket.ABNF.OPCODE_TEXT:
                self._route(frame.data, last_frame)
            elif opcode == websocket.ABNF.OPCODE_BINARY:
                self.stats.add("binary_frames_skipped")
                self._log.debug("skipped binary frame, event type %s, %d bytes",
                                binary_event_type(frame.data), len(frame.data))
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                return "the server closed the WebSocket", False
        return "the connection was closed", False

    def _route(self, payload: Any, received_at: float) -> None:
        with self._lock:
            self._text_frames += 1
            self._expect = None
        msg = parse_text_frame(payload)
        if msg is None:
            self.stats.add("malformed_frames")
            self._log.debug("skipped malformed text frame: %r", payload[:200])
            return
        try:
            self._on_message(msg, received_at)
        except Exception:  # one odd message must never take the reader down
            self.stats.add("malformed_frames")
            self._log.exception("skipped a message that could not be handled: %r", payload[:200])

    def _reconnect(self) -> bool:
        """Handshake again with the same client_id until it works or the connection closes.

        Exponential backoff with jitter, up to ``_MAX_BACKOFF_S`` between tries; the backoff
        carries over between drops when a socket dropped within ``_STABLE_AFTER_S`` of opening
        (a flapping proxy must not be hammered). Returns False when closing.
        """
        if time.monotonic() - self._connected_at_last >= _STABLE_AFTER_S:
            self._backoff_s = 0.0  # it was up for a while: try again at once
        last = ""
        tries = 0
        while not self._closing.is_set():
            if self._backoff_s and self._closing.wait(self._backoff_s * (0.5 + random.random())):
                return False
            self._backoff_s = min(max(self._backoff_s * 2, 0.1), _MAX_BACKOFF_S)
            try:
                ws = self._handshake()
            except ComfyUIError as exc:
                tries += 1
                if str(exc) != last:
                    if isinstance(exc, (CertificateNotTrusted, AuthenticationFailed)):
                        # Not an outage that ends by itself: say it once, plainly, and keep trying
                        # (generations waiting on this server fail after reconnect_timeout_s).
                        self._log.error("WebSocket to %s cannot reconnect: %s", self.url, exc)
                        with self._lock:
                            self.down_reason = str(exc)
                    else:
                        self._log.debug("reconnect to %s failed (try %d): %s", self.url, tries, exc)
                last = str(exc)
                continue
            with self._lock:
                if self._closed:  # close() ran meanwhile: this socket must not outlive it
                    _shutdown(ws)
                    return False
                self._ws = ws
                self.up_since = self._connected_at_last = time.monotonic()
            return True
        return False


def _partial_frame(ws: websocket.WebSocket) -> tuple:
    """How far websocket-client got into the frame it is reading: ``(header, length, bytes
    buffered)``. It changes while a big frame trickles in over a slow link, which counts as a sign
    of life (its pong may be queued behind the rest of that frame)."""
    buffer = getattr(ws, "frame_buffer", None)
    if buffer is None:
        return ()
    return (getattr(buffer, "header", None), getattr(buffer, "length", None),
            sum(len(chunk) for chunk in getattr(buffer, "recv_buffer", ())))


def _shutdown(ws: websocket.WebSocket) -> None:
    try:
        ws.shutdown()
    except (OSError, websocket.WebSocketException) as exc:
        module_logger.debug("socket shutdown: %s", exc)


def _close_cleanly(ws: websocket.WebSocket, timeout_s: float) -> None:
    """Closing handshake (close frame, wait for the server's) within ``timeout_s``, then shut down."""
    try:
        ws.close(timeout=timeout_s)
    except (OSError, websocket.WebSocketException) as exc:
        module_logger.debug("closing handshake: %s", exc)
    _shutdown(ws)
