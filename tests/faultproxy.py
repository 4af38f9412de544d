"""A TCP proxy on 127.0.0.1 that can go silent: the network faults ComfyUI's own server cannot show.

:class:`FaultProxy` forwards every connection to a target port (a stand-in ComfyUI), byte for
byte, with two threads per connection. Its faults are the ones a reverse proxy, a load balancer
or a NAT box produces between a client and ComfyUI:

* :meth:`FaultProxy.stall`: the connections open now keep their TCP sockets open but stop
  forwarding in both directions; what either side sends is read and dropped, so neither side
  sees an error, a close or back-pressure (a half-open flow; a load balancer that forgot it).
  With ``websockets_only`` only connections that began with a WebSocket upgrade go silent
  (plain HTTP keeps working, as when only the long-lived flow was dropped). Connections made
  later are forwarded normally. :meth:`resume` ends the silence of those still open.
* :meth:`FaultProxy.drop_silent`: abort the silenced connections only (the server's side of a
  half-open connection finally times out: ComfyUI then runs its cleanup for that socket).
* :meth:`FaultProxy.drop_all`: abort every open connection (RST), like a proxy restart.

Records: ``connections`` (accepted in total), ``websocket_connections``.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Optional


class _Link:
    """One proxied connection: client socket, upstream socket, and whether it is silenced."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.silent = False
        self.websocket: Optional[bool] = None  # decided from the client's first bytes
        self.closed = threading.Event()

    def abort(self) -> None:
        for sock in (self.client, self.upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # close() alone would not wake the pump thread blocked in recv(), and the kernel
                # would keep the connection open while it waits: shut it down first.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: nothing to reset
            try:
                sock.close()
            except OSError:
                pass  # closing twice is harmless here
        self.closed.set()


class FaultProxy:
    """Forward 127.0.0.1:<port> to 127.0.0.1:<target_port>; ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.connections = 0
        self.websocket_connections = 0
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._listener: Optional[socket.socket] = None
        self._accepting: Optional[threading.Thread] = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> "FaultProxy":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._accepting.start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected: close() below is enough
            self._listener.close()
            self._listener = None
        self.drop_all()

    # ------------------------------------------------------------------ faults
    def stall(self, *, websockets_only: bool = False) -> int:
        """Silence the connections open now (see the module docstring); returns how many."""
        with self._lock:
            links = [l for l in self._links if not l.closed.is_set()]
            chosen = [l for l in links if l.websocket or not websockets_only]
            for link in chosen:
                link.silent = True
        return len(chosen)

    def resume(self) -> None:
        """Forward again on every silenced connection still open."""
        with self._lock:
            for link in self._links:
                link.silent = False

    def drop_silent(self) -> int:
        """Abort only the silenced connections (the server finally notices they are gone, as
        after a half-open TCP connection times out); returns how many."""
        with self._lock:
            silent = [l for l in self._links if l.silent]
            self._links = [l for l in self._links if not l.silent]
        for link in silent:
            link.abort()
        return len(silent)

    def drop_all(self) -> None:
        """Abort every open connection (the client sees a reset)."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.abort()

    # ------------------------------------------------------------------ plumbing
    def _accept_loop(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed: stop accepting
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the target is down: refuse like it would
                continue
            link = _Link(client, upstream)
            with self._lock:
                self.connections += 1
                self._links.append(link)
            threading.Thread(target=self._pump, args=(link, client, upstream, True), daemon=True,
                             name="faultproxy-up").start()
            threading.Thread(target=self._pump, args=(link, upstream, client, False), daemon=True,
                             name="faultproxy-down").start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and link.websocket is None:
                    link.websocket = b"upgrade: websocket" in data.lower()
                    if link.websocket:
                        with self._lock:
                            self.websocket_connections += 1
                if link.silent:
                    continue  # read and dropped: the sender sees nothing wrong
                dst.sendall(data)
        except OSError:
            pass  # either side went away: end this link below
        if link.silent:
            return  # a silenced link never passes a close on either
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side is already gone
        if not from_client:
            link.closed.set()
