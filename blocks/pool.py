"""Several live ComfyUI connections behind one interface: the flow run's GPU pool.

One connection per server, opened once per flow run. Each prompt goes to the live server
with the most free in-flight slots (ties: the shorter ComfyUI queue from the last ``status``
broadcast, then the one that has run fewest). A server that cannot be reached at open is
left out; one whose connection dies mid-run stops getting work, and the generations that
were on it fail with a transient error and are retried on the others.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .connection import ComfyUIConnection, PromptOutcome, PromptStatus
from .errors import ComfyUIError, ConnectionLost, GenerationCancelled, ServerError, ServerUnreachable
from .protocol import OutputRef
from .server import ComfyUIServer, ComfyUIServerPool

module_logger = logging.getLogger("comfy_pipeline.pool")
Logger = Union[logging.Logger, logging.LoggerAdapter]


class ConnectionPool:
    """The connections of one flow run; a context manager.

    Args:
        connections: open connections that share ``slot_condition`` (see :meth:`open`).
        slot_condition: the condition their in-flight slots are guarded by.
        unreachable: ``{url: reason}`` of servers that could not be opened.
        logger: where the pool's warnings go (the flow's Prefect run logger).
    """

    def __init__(self, connections: Sequence[ComfyUIConnection], slot_condition: threading.Condition,
                 unreachable: Optional[Mapping[str, str]] = None, *, logger: Optional[Logger] = None):
        self.connections = list(connections)
        self.unreachable = dict(unreachable or {})
        self._cond = slot_condition
        self._assigned: Counter = Counter()
        self._log = logger or module_logger
        self._closed = threading.Event()

    @classmethod
    def open(cls, server: Union[ComfyUIServer, ComfyUIServerPool, Iterable[ComfyUIServer]], *,
             logger: Optional[Logger] = None) -> "ConnectionPool":
        """Connect to every server; servers that fail are logged and left out.

        ``logger`` receives every warning of the pool and its connections, from any thread
        (pass Prefect's run logger so they reach the flow run's logs).

        Raises:
            the first server's error (``ServerUnreachable``, ``AuthenticationFailed``) when no
            server at all could be opened.
        """
        if isinstance(server, ComfyUIServer):
            servers = [server]
        elif isinstance(server, ComfyUIServerPool):
            servers = server.load_servers()
        else:
            servers = list(server)
        log = logger or module_logger
        cond = threading.Condition()
        connections, unreachable, first_error = [], {}, None
        for block in servers:
            try:
                connections.append(block.connect(slot_condition=cond, logger=log))
            except ComfyUIError as exc:
                first_error = first_error or exc
                unreachable[block.url] = str(exc)
                if len(servers) > 1:
                    log.warning("%s is left out of this run: %s", block.url, exc)
        if not connections:
            assert first_error is not None
            raise first_error
        return cls(connections, cond, unreachable, logger=log)

    def __enter__(self) -> "ConnectionPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __deepcopy__(self, memo: dict) -> "ConnectionPool":
        return self

    def __reduce__(self):
        raise TypeError("ConnectionPool holds live connections and cannot be pickled")

    def close(self) -> None:
        """Close every connection (each removes its in-flight prompts from its server first).

        Generations waiting for a slot then raise :class:`GenerationCancelled`.
        """
        with self._cond:
            self._closed.set()
            self._cond.notify_all()
        for connection in self.connections:
            connection.close()
        with self._cond:
            self._cond.notify_all()

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (e.g. before a retry), ending at once if the pool is closed.

        Raises:
            GenerationCancelled: the pool was closed before or during the wait.
        """
        if self._closed.wait(max(0.0, seconds)):
            raise GenerationCancelled(", ".join(self.urls))

    @property
    def interrupted_prompts(self) -> set[str]:
        """Prompt ids that :meth:`close` interrupted while ComfyUI was running them."""
        return set().union(*(c.interrupted_prompts for c in self.connections))

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.connections]

    def checkout(self) -> ComfyUIConnection:
        """Wait for a free in-flight slot on any live server whose WebSocket is up; take it on the
        best one (a server that is reconnecting is waited for, up to its ``reconnect_timeout_s``).

        Raises:
            GenerationCancelled: the pool was closed (the run ended or was cancelled).
            ConnectionLost: no server of the pool is usable any more.
        """
        with self._cond:
            while True:
                if self._closed.is_set():
                    raise GenerationCancelled(", ".join(self.urls))
                live = [c for c in self.connections if c.usable]
                if not live:
                    raise ConnectionLost(", ".join(self.urls), "no server of the pool is usable any more")
                # A server whose WebSocket is down is reconnecting (a restart, a proxy): wait for it
                # rather than POST into it, which would spend the generation's retries in a moment.
                free = [c for c in live if c.free_slots > 0 and c.connected]
                if free:
                    best = max(free, key=lambda c: (c.free_slots,
                                                    -(c.stats.last_queue_remaining or 0),
                                                    -self._assigned[c.url]))
                    if best.reserve_slot(block=False):  # under the shared condition: it cannot be full
                        self._assigned[best.url] += 1
                        return best
                self._cond.wait(0.5)

    def prompt_status(self, prompt_id: str) -> tuple[PromptStatus, Optional[ComfyUIConnection]]:
        """Where a prompt is: its status on the first live server that knows it, or ``unknown``.

        A prompt this run gave up on itself (interrupted or deleted after a timeout) is
        ``abandoned``, whatever the server still says: it is never followed again.
        """
        if any(prompt_id in c.abandoned_prompts for c in self.connections):
            return "abandoned", None
        for connection in self.connections:
            if not connection.usable:
                continue
            try:
                status, _ = connection.prompt_status(prompt_id)
            except (ServerUnreachable, ServerError) as exc:
                self._log.debug("could not ask %s about %s: %s", connection.url, prompt_id, exc)
                continue
            if status != "unknown":
                return status, connection
        return "unknown", None

    def run_prompt(
        self,
        prompt: Mapping[str, Any],
        *,
        prompt_id: str,
        on: Optional[ComfyUIConnection] = None,
        attach: bool = False,
        **options: Any,
    ) -> tuple[PromptOutcome, list[OutputRef], ComfyUIConnection]:
        """Run (or, with ``attach`` and ``on``, follow) a prompt on the best server.

        Returns:
            ``(outcome, refs, connection)``; download the refs from ``connection``.

        Raises:
            everything :meth:`ComfyUIConnection.run_prompt` raises.
        """
        if on is not None:
            on.reserve_slot()
            connection = on
        else:
            connection = self.checkout()
        outcome, refs = connection.run_prompt(prompt, prompt_id=prompt_id, attach=attach, reserved=True,
                                              **options)
        return outcome, refs, connection

    def stats(self) -> dict[str, Any]:
        """Per-server connection facts: ``{url: ConnectionStats}``."""
        return {c.url: c.stats for c in self.connections}
