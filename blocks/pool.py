"""Several live ComfyUI connections behind one interface: the flow run's GPU pool.

One connection per server, opened once per flow run. Each prompt goes to the connected
server with the most free in-flight slots (ties: the shorter ComfyUI queue from the last
``status`` broadcast, then the one that has run fewest). A server that cannot be reached at
open is left out. One that becomes unreachable mid-run gets no new work while it is away; its
prompts move to another server after ``failover_after_s`` when one has a free slot (and are
removed from it when it answers again), and it is used again as soon as it is back. A server
that cannot run the workflow is left out before anything is sent (``leave_out``, by the
preflight), and once ComfyUI refused the workflow itself the pool sends no new prompt
(``stop_new_prompts``).

Who gets the next free slot: a prompt moving away from an unreachable server first, then
generations of a later stage before those of an earlier one (``priority``: an image-to-video
run's videos before its remaining images, so that each video follows its image instead of
waiting for every image). A generation may ``prefer`` a server (the one that made its input
image, which then needs no upload): it takes that server's slot when one is free there.

Slots shared with other flow runs (``blocks/limits.py``): each server also has a Prefect global
concurrency limit, and a prompt holds one of its slots from before its POST until its outputs are
listed. A server whose limit is full (other runs' prompts) is passed over for the next best one;
when every server is full the generation waits, woken by this run's own give-backs and looking
again every ``RECHECK_S`` for other runs'. Off for a server with ``share_slots=False``; without a
Prefect API that can share slots, per-run slots only (one warning).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from .connection import ComfyUIConnection, PromptOutcome, PromptStatus
from .limits import Lease, SharedSlots, limit_name
from .errors import (ComfyUIError, ConnectionLost, GenerationCancelled, GenerationSkipped, PromptMoved,
                     ServerError, ServerUnreachable)
from .protocol import OutputRef
from .server import ComfyUIServer, ComfyUIServerPool

module_logger = logging.getLogger("comfy_pipeline.pool")
Logger = Union[logging.Logger, logging.LoggerAdapter]
#: A prompt, or what makes it for the server that will run it (its input images named there).
PromptFor = Union[Mapping[str, Any], Callable[[ComfyUIConnection], Mapping[str, Any]]]
#: Seconds before a server whose global limit was full is asked again (other runs give back slots).
RECHECK_S = 0.3


def moved_prompt_id(prompt_id: str) -> str:
    """The ``prompt_id`` a prompt gets when it moves to another server (a uuid5 of the old one)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfy-pipeline:{prompt_id}/moved"))


class ConnectionPool:
    """The connections of one flow run; a context manager.

    Args:
        connections: open connections that share ``slot_condition`` (see :meth:`open`).
        slot_condition: the condition their in-flight slots are guarded by.
        unreachable: ``{url: reason}`` of servers that could not be opened.
        logger: where the pool's warnings go (the flow's Prefect run logger).
        shared: the servers' global concurrency limits (closed with the pool), or None.
        limit_names: ``{connection: its limit's name in shared}``; a connection not named takes
            no shared slot.
    """

    #: Every pool of this process not yet garbage collected, for :meth:`close_all`.
    _every_pool: "weakref.WeakSet[ConnectionPool]" = weakref.WeakSet()
    _every_pool_lock = threading.Lock()

    def __init__(self, connections: Sequence[ComfyUIConnection], slot_condition: threading.Condition,
                 unreachable: Optional[Mapping[str, str]] = None, *, logger: Optional[Logger] = None,
                 shared: Optional[SharedSlots] = None,
                 limit_names: Optional[Mapping[ComfyUIConnection, str]] = None):
        self.connections = list(connections)
        #: the global concurrency limits whose slots the prompts hold (None: per-run slots only)
        self.shared = shared
        self._limit_of = dict(limit_names or {}) if shared is not None else {}
        self._full_until: dict[str, float] = {}  # limit name -> monotonic time to ask again
        if shared is not None:
            shared.on_given_back = self._given_back
        self.unreachable = dict(unreachable or {})
        self._cond = slot_condition
        self._assigned: Counter = Counter()
        self._log = logger or module_logger
        self._closed = threading.Event()
        self._moving = 0  # prompts moving away from an unreachable server: served before new work
        self._waiting: Counter = Counter()  # priority -> checkouts waiting for a slot (see checkout)
        self._finished: dict[str, tuple] = {}  # see remember_finished
        for connection in self.connections:
            connection.can_fail_over = self._can_fail_over
        #: prompts of ours queued or running (in-flight slots taken) when the pool was first closed
        self.in_flight_at_close = 0
        #: why :meth:`close_all` closed the pool (e.g. ``"interrupted (Ctrl-C)"``), else None
        self.stopped_because: Optional[str] = None
        #: ``{url: reason}`` of servers taken out before any prompt was sent (:meth:`leave_out`)
        self.left_out: dict[str, str] = {}
        #: why the pool takes no new prompt any more (:meth:`stop_new_prompts`), else None
        self.no_new_prompts: Optional[str] = None
        with ConnectionPool._every_pool_lock:
            ConnectionPool._every_pool.add(self)

    @classmethod
    def open(cls, server: Union[ComfyUIServer, ComfyUIServerPool, Iterable[ComfyUIServer]], *,
             logger: Optional[Logger] = None, share_slots: bool = True) -> "ConnectionPool":
        """Connect to every server; servers that fail are logged and left out.

        ``logger`` receives every warning of the pool and its connections, from any thread
        (pass Prefect's run logger so they reach the flow run's logs). ``share_slots``: take a
        slot of each server's Prefect global concurrency limit for every prompt (servers with
        ``share_slots=False`` never do); see ``blocks/limits.py``.

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
        connections, unreachable, first_error, names = [], {}, None, {}
        for block in servers:
            try:
                connections.append(block.connect(slot_condition=cond, logger=log))
                if share_slots and getattr(block, "share_slots", True):
                    names[connections[-1]] = (limit_name(block), block.max_in_flight)
            except ComfyUIError as exc:
                first_error = first_error or exc
                unreachable[block.url] = str(exc)
                if len(servers) > 1:
                    log.warning("%s is left out of this run: %s", block.url, exc)
        if not connections:
            assert first_error is not None
            raise first_error
        try:
            sizes: dict[str, int] = {}
            for name, slots in names.values():
                sizes.setdefault(name, slots)  # one server named twice: one limit
            shared = SharedSlots.open(sizes, logger=log) if sizes else None
        except BaseException:
            for connection in connections:
                connection.close()
            raise
        return cls(connections, cond, unreachable, logger=log, shared=shared,
                   limit_names={c: name for c, (name, _) in names.items()})

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
            if not self._closed.is_set():  # the first close: what it is about to remove
                self.in_flight_at_close = sum(c.max_in_flight - c.free_slots for c in self.connections
                                              if c.usable)
            self._closed.set()
            self._cond.notify_all()
        for connection in self.connections:
            connection.close()
        if self.shared is not None:
            self.shared.close()  # gives back the slots of prompts that were still in flight
        with self._cond:
            self._cond.notify_all()

    @classmethod
    def close_all(cls, reason: str) -> int:
        """Close every pool of this process, from any thread (e.g. on SIGINT or SIGTERM).

        Each connection first removes the prompts of ours it has queued or running (deleted if
        pending, interrupted by ``prompt_id`` if running). A pool that fails to close is logged
        and the others are still closed. Idempotent: pools already closed stay closed.

        Args:
            reason: why, as the report words it (``"interrupted (Ctrl-C)"``); kept in
                ``stopped_because`` of each pool still open.

        Returns:
            how many prompts of ours were in flight when these pools were first closed (by
            this call or an earlier close).
        """
        with cls._every_pool_lock:
            pools = list(cls._every_pool)
        for pool in pools:
            if not pool._closed.is_set():
                pool.stopped_because = reason
            try:
                pool.close()
            except Exception:  # one pool's failure must not keep the others' prompts running
                module_logger.exception("could not close the connections to %s", ", ".join(pool.urls))
        return sum(pool.in_flight_at_close for pool in pools)

    def leave_out(self, connection: ComfyUIConnection, reason: str) -> None:
        """Take ``connection`` out of the pool and close it, before any prompt was sent to it (its
        server cannot run the workflow: see ``blocks/preflight.py``); ``reason`` goes to
        ``left_out``. The pool keeps at least one connection.

        Raises:
            ValueError: ``connection`` is the pool's last one, or not one of its connections.
        """
        with self._cond:
            if connection not in self.connections or len(self.connections) == 1:
                raise ValueError(f"{connection.url} cannot be left out: it is not in the pool or its last server")
            self.connections.remove(connection)
            self.left_out[connection.url] = reason
        connection.close()

    def stop_new_prompts(self, reason: str) -> None:
        """Send no new prompt from now on (ComfyUI refused the workflow itself): every generation
        waiting for a slot, and every one that asks later, raises :class:`GenerationSkipped` with
        ``reason``; prompts already on a server go on. The first reason is kept and logged."""
        with self._cond:
            first = self.no_new_prompts is None
            if first:
                self.no_new_prompts = reason
            self._cond.notify_all()
        if first:
            self._log.warning("no new prompts are sent in this run: %s", reason)

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

    def checkout(self, *, exclude: Optional[ComfyUIConnection] = None, priority: int = 0,
                 prefer: Optional[str] = None) -> tuple[ComfyUIConnection, Optional[Lease]]:
        """Take a slot for a new prompt (see :meth:`_checkout`): ``(connection, lease)``; the
        connection's slot is given back when its prompt finishes, the lease (a slot of the
        server's global limit, or None) with :meth:`give_back`.

        A prompt moving away from ``exclude`` (unreachable) gets the next free slot before any
        new prompt; among new prompts, a higher ``priority`` goes first. ``prefer``: the URL of
        the server to take when it has a free slot (else the best other one).
        """
        with self._cond:
            if exclude is not None:
                self._moving += 1
            else:
                self._waiting[priority] += 1
        try:
            return self._checkout(exclude, priority, prefer)
        finally:
            with self._cond:
                if exclude is not None:
                    self._moving -= 1
                else:
                    self._waiting[priority] -= 1
                self._cond.notify_all()

    def _first_in_line(self, exclude: Optional[ComfyUIConnection], priority: int) -> bool:
        if exclude is not None:
            return True
        return not self._moving and not any(n > 0 for p, n in self._waiting.items() if p > priority)

    def _checkout(self, exclude: Optional[ComfyUIConnection], priority: int = 0,
                  prefer: Optional[str] = None) -> tuple[ComfyUIConnection, Optional[Lease]]:
        """Wait for a free in-flight slot on a server whose WebSocket is up; take it on the best one,
        with a slot of its global limit (a server whose limit is full is passed over).

        While no server of the pool is connected (a restart, a proxy), it waits for one to come
        back, up to the longest ``reconnect_timeout_s`` of the pool. ``exclude``: a server not
        to use (the one a prompt is moving away from).

        Raises:
            GenerationCancelled: the pool was closed (the run ended or was cancelled).
            GenerationSkipped: the pool sends no new prompt any more (:meth:`stop_new_prompts`).
            ConnectionLost: no server of the pool answered for ``reconnect_timeout_s``.
        """
        gave_up_at: Optional[float] = None
        with self._cond:
            while True:
                if self._closed.is_set():
                    raise GenerationCancelled(", ".join(self.urls))
                if self.no_new_prompts is not None and exclude is None:  # a moving prompt was accepted
                    raise GenerationSkipped(self.no_new_prompts)
                # the server a prompt moves away from is used again if it came back meanwhile
                live = [c for c in self.connections if c.usable and not (c is exclude and not c.connected)]
                if not live:
                    raise ConnectionLost(", ".join(self.urls), "no server of the pool is usable any more")
                connected = [c for c in live if c.connected]
                now = time.monotonic()
                free = ([c for c in connected if c.free_slots > 0 and not self._limit_full(c, now)]
                        if self._first_in_line(exclude, priority) else [])
                if free:
                    best = max(free, key=lambda c: (c.url == prefer, c.free_slots,
                                                    -(c.stats.last_queue_remaining or 0),
                                                    -self._assigned[c.url]))
                    if best.reserve_slot(block=False):  # under the shared condition: it cannot be full
                        taken, lease = self._take_shared(best)
                        if not taken:
                            continue  # its limit is full: the next best server
                        self._assigned[best.url] += 1
                        return best, lease
                if connected:  # busy, not away: a slot given back wakes us (other runs': RECHECK_S)
                    gave_up_at = None
                    marks = [t for t in self._full_until.values() if t > now]
                    self._cond.wait(min(marks) - now if marks else None)
                    continue
                # Every server is away: wait for one to answer again rather than POST into it.
                gave_up_at = self._wait_while_away(live, gave_up_at)

    def _limit_full(self, connection: ComfyUIConnection, now: float) -> bool:
        """Is ``connection``'s global limit known to be full: found full less than ``RECHECK_S``
        ago, or all its slots (as last seen) held by this run, which wakes us when it gives one back?"""
        name = self._limit_of.get(connection)
        if name is None or self.shared is None:
            return False
        size = self.shared.size(name)
        return self._full_until.get(name, 0.0) > now or (size is not None and self.shared.held(name) >= size)

    def _take_shared(self, connection: ComfyUIConnection) -> tuple[bool, Optional[Lease]]:
        """With the condition held once (see :meth:`_checkout`) and ``connection``'s slot reserved:
        take a slot of its global limit, letting the condition go during the API call.
        ``(False, None)``: the limit is full, the reserved slot was given back and the limit is
        not asked again for ``RECHECK_S``; else ``(True, lease or None)``."""
        name = self._limit_of.get(connection)
        if name is None or self.shared is None:
            return True, None
        self._cond.release()  # held once: checkout() takes it apart from _checkout()
        try:
            lease = self.shared.try_take(name)
        except BaseException:  # never for the API's failures: an interrupt of this thread
            self._cond.acquire()
            connection.give_back_slot()
            raise
        self._cond.acquire()
        if lease is None:
            self._full_until[name] = time.monotonic() + RECHECK_S
            connection.give_back_slot()
            return False, None
        if not connection.connected and not self._closed.is_set():  # it went away during the call
            connection.give_back_slot()
            self._cond.release()
            try:
                self.shared.give_back(lease)
            finally:
                self._cond.acquire()
            return False, None
        return True, lease

    def give_back(self, lease: Optional[Lease]) -> None:
        """Give back a slot of a global limit taken by :meth:`checkout` (None: nothing to do),
        without waiting for the API: once it has the slot back, the generations waiting for
        one are woken (:meth:`_given_back`). Never raises."""
        if lease is not None and self.shared is not None:
            self.shared.give_back(lease)

    def _given_back(self, name: str) -> None:
        """A slot of limit ``name`` is back (called by the lease thread): look at it again now."""
        with self._cond:
            self._full_until.pop(name, None)
            self._cond.notify_all()

    def _wait_while_away(self, live: list[ComfyUIConnection], gave_up_at: Optional[float]) -> float:
        """Every server of ``live`` is away: wait on the condition (held) until something changes,
        at most until ``gave_up_at`` (set to the longest ``reconnect_timeout_s`` from now when None);
        returns it.

        Raises:
            ConnectionLost: ``gave_up_at`` has passed, naming each server and why it is away.
        """
        now = time.monotonic()
        if gave_up_at is None:
            gave_up_at = now + max(c.reconnect_timeout_s for c in live)
        if now >= gave_up_at:
            reasons = "; ".join(f"{c.url}: {c.transport.down_reason}" for c in live)
            raise ConnectionLost(", ".join(c.url for c in live),
                                 f"no server of the pool answered for "
                                 f"{max(c.reconnect_timeout_s for c in live):g} s ({reasons})")
        self._cond.wait(gave_up_at - now)
        return gave_up_at

    def wait_for_a_server(self) -> None:
        """Return once a server of the pool is connected, waiting up to the longest
        ``reconnect_timeout_s`` while all of them are away (so a retry asks the server that has
        its earlier prompt rather than taking it for lost).

        Raises:
            GenerationCancelled: the pool was closed.
            ConnectionLost: no server answered for ``reconnect_timeout_s``.
        """
        gave_up_at: Optional[float] = None
        with self._cond:
            while True:
                if self._closed.is_set():
                    raise GenerationCancelled(", ".join(self.urls))
                live = [c for c in self.connections if c.usable]
                if not live:
                    raise ConnectionLost(", ".join(self.urls), "no server of the pool is usable any more")
                if any(c.connected for c in live):
                    return
                gave_up_at = self._wait_while_away(live, gave_up_at)

    def give_up_where_away(self, prompt_ids: Iterable[str]) -> None:
        """Prompts not found on the connected servers may still be on one that is away: each such
        server removes them when it is back (a prompt that finished there is named in the log,
        never downloaded), and they are never followed again (see
        :meth:`ComfyUIConnection.remove_when_reachable`)."""
        ids = list(prompt_ids)
        for connection in self.connections:
            if connection.usable and not connection.connected:
                for prompt_id in ids:
                    connection.remove_when_reachable(prompt_id, now=False)

    def _can_fail_over(self, away: ComfyUIConnection) -> bool:
        """May a prompt of ``away`` (unreachable) move: is another server connected? (A moving
        prompt takes the next free slot there before any new generation.)"""
        return not self._closed.is_set() and any(c is not away and c.connected for c in self.connections)

    def outages(self) -> dict[str, list]:
        """``{url: [Outage, ...]}``: when each server's WebSocket was down, and why."""
        return {c.url: list(c.stats.outages) for c in self.connections if c.stats.outages}

    def prompt_status(self, prompt_id: str) -> tuple[PromptStatus, Optional[ComfyUIConnection]]:
        """Where a prompt is: its status on the first live server that knows it, or ``unknown``.

        A prompt this run gave up on itself (interrupted or deleted after a timeout) is
        ``abandoned``, whatever the server still says: it is never followed again.
        """
        if any(prompt_id in c.abandoned_prompts for c in self.connections):
            return "abandoned", None
        for connection in self.connections:
            if not connection.connected:
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
        prompt: PromptFor,
        *,
        prompt_id: str,
        on: Optional[ComfyUIConnection] = None,
        attach: bool = False,
        priority: int = 0,
        prefer: Optional[str] = None,
        **options: Any,
    ) -> tuple[PromptOutcome, list[OutputRef], ComfyUIConnection]:
        """Run (or, with ``attach`` and ``on``, follow) a prompt on the best server.

        ``prompt`` is the prompt, or a function that makes it for the server that got the slot
        (it names the prompt's input images there, uploading them if needed: see
        ``blocks/inputs.py``); it is called again for the server a prompt moves to.
        ``priority`` and ``prefer``: see :meth:`checkout`.

        A prompt whose server stays unreachable for ``failover_after_s`` while another server
        has a free slot is run again there under a new ``prompt_id`` (uuid5 of the old one); the
        outcome's ``moved_from`` names the server it left.

        The prompt holds a slot of its server's global limit (``blocks/limits.py``) from before
        its POST until this returns or raises; a moved prompt gives it back and takes one on its
        new server. Followed with ``on`` (already on that server): a slot is taken if one is free,
        and the prompt is followed either way.

        Returns:
            ``(outcome, refs, connection)``; download the refs from ``connection``.

        Raises:
            everything :meth:`ComfyUIConnection.run_prompt` raises, and what ``prompt`` raises
            (an upload that failed: the slot is given back, nothing was posted).
        """
        lease: Optional[Lease] = None
        if on is not None:
            on.reserve_slot()
            connection = on
            name = self._limit_of.get(on)
            if name is not None and self.shared is not None:
                try:
                    lease = self.shared.try_take(name)  # counted if it can be; followed anyway
                except BaseException:
                    on.give_back_slot()
                    raise
        else:
            connection, lease = self.checkout(priority=priority, prefer=prefer)
        moved_from: Optional[str] = None
        try:
            while True:
                try:
                    body = prompt(connection) if callable(prompt) else prompt
                except BaseException:
                    connection.give_back_slot()
                    raise
                try:
                    outcome, refs = connection.run_prompt(body, prompt_id=prompt_id, attach=attach, reserved=True,
                                                          **options)
                except PromptMoved as moved:
                    self.give_back(lease)  # before waiting for a slot elsewhere: it may be this server's again
                    lease = None
                    target, lease = self.checkout(exclude=connection)
                    new_id = moved_prompt_id(prompt_id)
                    self._log.warning("prompt %s moves from %s (%s) to %s as prompt %s", prompt_id, connection.url,
                                      moved.reason, target.url, new_id)
                    moved_from = moved_from or connection.url
                    connection, prompt_id, attach = target, new_id, False
                    continue
                outcome.moved_from = moved_from
                return outcome, refs, connection
        finally:
            self.give_back(lease)

    def remember_finished(self, key: str, finished: tuple) -> None:
        """Keep a finished prompt's ``(outcome, refs, connection)`` under ``key`` (one generation)
        until its files are saved, for the task's retries in this flow run (see
        :meth:`finished_outputs`)."""
        with self._cond:
            self._finished[key] = finished

    def finished_outputs(self, key: str) -> Optional[tuple]:
        """What :meth:`remember_finished` kept under ``key``, if its server is still in use."""
        with self._cond:
            finished = self._finished.get(key)
        return finished if finished is not None and finished[2].usable else None

    def forget_finished(self, key: str) -> None:
        """The generation's files are saved: nothing to remember for ``key`` any more."""
        with self._cond:
            self._finished.pop(key, None)

    def stats(self) -> dict[str, Any]:
        """Per-server connection facts: ``{url: ConnectionStats}``."""
        return {c.url: c.stats for c in self.connections}
