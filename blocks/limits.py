"""Slots shared by every flow run: one Prefect global concurrency limit per ComfyUI server.

A server's limit is named from its block (:func:`limit_name`, e.g. ``comfyui-gpu-1``). It is
created with ``max_in_flight`` slots on first use; an existing limit is used as it is (a person
may have changed it on the Concurrency page of Prefect's UI: its value applies to the next
prompts; an inactive limit counts nothing). A prompt holds one slot, under a lease, from before
its POST until its outputs are listed (see ``blocks/pool.py``). One thread of a
:class:`SharedSlots` gives slots back (so that no prompt waits for that call) and renews the
leases; a process that dies stops renewing, and the Prefect server's repossessor gives its slots
back once their leases end (``lease_s``, then up to the repossessor's loop, 15 s by default).

Without a Prefect API that can do this, :meth:`SharedSlots.open` returns None after one message
and the pool keeps to per-run slots: ``PREFECT_API_URL`` unset (an INFO line: Prefect's temporary
local API runs no repossessor and forgets its leases when it stops, so a killed run's slots would
stay taken for good, and no other run could share them anyway), or the limit could not be read or
created (a warning). An API that fails later (e.g. a
server without leases answers 404, or it stays busy for ``BUSY_GIVE_UP_S``) turns sharing off for
the rest of the pool, with one warning.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union
from urllib.parse import urlsplit
from uuid import UUID

import httpx

module_logger = logging.getLogger("comfy_pipeline.limits")
Logger = Union[logging.Logger, logging.LoggerAdapter]

#: Seconds a lease lasts unless renewed (Prefect's API accepts 60 s to one day).
LEASE_S = 60.0
#: Seconds a call to the Prefect API may take.
API_TIMEOUT_S = 10.0
#: Tries of a call to take or give back a slot, the first ``QUICK_DELAY_S`` apart (then twice as
#: long each time, jittered), when the API answers 429/502/503/504 or the connection fails (not a
#: read timeout: the call may be under way). A Prefect server on SQLite answers 503 ("database is locked")
#: whenever writes collide, e.g. with a flow run's own task-run states: the client's own retries
#: would wait 2 s, then 4 s, ... each time.
QUICK_TRIES, QUICK_DELAY_S = 5, 0.02
_AGAIN = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ReadError, httpx.WriteError,
          httpx.RemoteProtocolError)  # e.g. a kept-alive connection the server had closed
#: Calls taking a slot that one flow run has under way at once. One: a Prefect server on SQLite
#: answers 503 to writes that collide, so 32 takes at a run's start, made together, took about
#: 1.1 s with their quick retries (16 stand-ins, ``bench/fleet.py``: makespan / ideal 1.06-1.10),
#: and one after the other about 0.3 s (1.02-1.045; 2 or 4 at once: 1.04-1.054). It bounds the prompts
#: a run can start to one per round trip to the API (20 per second at 50 ms), far more than
#: GPUs running real models finish.
TAKES_AT_ONCE = 1
#: Seconds the API may answer nothing but "busy" (429/502/503/504) before sharing is turned off.
BUSY_GIVE_UP_S = 60.0


def limit_name(server: Any) -> str:
    """The name of ``server``'s global concurrency limit: ``comfyui-<block name>`` for a saved
    ComfyUIServer block, else ``comfyui-<host>-<port>[-<path>]`` from its url; slugified."""
    from slugify import slugify

    name = getattr(server, "_block_document_name", None)
    if not name or getattr(server, "_is_anonymous", False):
        parts = urlsplit(server.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        name = f"{parts.hostname}-{port}-{parts.path}"
    return "comfyui-" + slugify(name)


@dataclass(frozen=True)
class Lease:
    """One slot taken on the limit ``name``; ``lease_id`` None: not counted (sharing is off)."""

    name: str
    lease_id: Optional[UUID]


class SharedSlots:
    """Slots of several global concurrency limits, taken without waiting; use :meth:`open`.

    Thread-safe. ``sizes``: ``{limit name: its slots as last seen}`` (None: inactive, no limit).
    ``renew_every_s``: seconds between renewals of the leases held (default ``lease_s / 3``).
    ``on_given_back``: called with a limit's name, in the lease thread, each time one of its slots
    has been given back (the pool wakes its waiting generations).
    """

    def __init__(self, client: Any, sizes: Mapping[str, Optional[int]], *, lease_s: float = LEASE_S,
                 renew_every_s: Optional[float] = None, holder: Any = None, logger: Optional[Logger] = None):
        self._client = client
        self._sizes = dict(sizes)
        self.lease_s = lease_s
        self.renew_every_s = renew_every_s or lease_s / 3
        self._holder = holder
        self._log = logger or module_logger
        self._lock = threading.Condition()
        self._held: dict[UUID, str] = {}  # lease id -> limit name, until the server has it back
        self._giving_back: list[UUID] = []  # given back by their prompts, for the lease thread
        self._calls = 0  # takes under way (close() waits for them)
        self._taking = threading.BoundedSemaphore(TAKES_AT_ONCE)
        self._busy_since: Optional[float] = None  # monotonic time of the first "busy" since a success
        self._closed = False
        #: why sharing was turned off after open (the API failed), else None
        self.off: Optional[str] = None
        self.on_given_back: Optional[Any] = None
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="comfyui-leases", daemon=True)
        self._worker.start()

    @classmethod
    def open(cls, max_in_flight: Mapping[str, int], *, lease_s: float = LEASE_S,
             renew_every_s: Optional[float] = None, logger: Optional[Logger] = None) -> Optional["SharedSlots"]:
        """The limits ``{name: max_in_flight}`` of the Prefect API of ``PREFECT_API_URL``, each
        created with ``max_in_flight`` slots if absent (an existing one is never changed).

        Returns:
            the open :class:`SharedSlots` (call :meth:`close`), or None after one warning
            naming why when the API cannot share slots (see the module's docstring).

        Raises:
            ValueError: ``lease_s`` outside 60 s .. 1 day (what Prefect's API accepts).
        """
        from prefect.settings import PREFECT_API_URL

        log = logger or module_logger
        if not 60 <= lease_s <= 86400:
            raise ValueError(f"lease_s must be between 60 s and one day (Prefect's API), got {lease_s:g}")
        if not max_in_flight:
            return None
        why = "prompts count against this run's own max_in_flight only"
        if not PREFECT_API_URL.value():
            # INFO, not a warning: with Prefect's temporary API no other flow run could share them anyway
            # (another process starts its own), and every first run from the README works this way.
            log.info("slots on %s are not shared with other flow runs: PREFECT_API_URL is not set (Prefect's "
                     "temporary local API keeps no leases once it stops); %s", ", ".join(max_in_flight), why)
            return None
        from prefect.client.orchestration import get_client

        # Our own client (not the flow run's): its threads use it until close().
        client = get_client(sync_client=True, httpx_settings={"timeout": API_TIMEOUT_S})
        try:
            client.__enter__()
            sizes = {name: _ensure_limit(client, name, slots, log) for name, slots in max_in_flight.items()}
        except Exception as exc:
            client.__exit__(None, None, None)
            log.warning("slots on %s are not shared with other flow runs: the Prefect API at %s could not read or "
                        "create their global concurrency limits (%s); %s", ", ".join(max_in_flight),
                        PREFECT_API_URL.value(), _short(exc), why)
            return None
        return cls(client, sizes, lease_s=lease_s, renew_every_s=renew_every_s, holder=_flow_run_holder(),
                   logger=log)

    def size(self, name: str) -> Optional[int]:
        """The slots of limit ``name`` as last seen (None: inactive or unknown: no bound known)."""
        with self._lock:
            return None if self.off else self._sizes.get(name)

    def held(self, name: str) -> int:
        """How many slots of limit ``name`` this object holds now (given back ones included until
        the server has them back)."""
        with self._lock:
            return sum(n == name for n in self._held.values())

    def try_take(self, name: str) -> Optional[Lease]:
        """Take one slot of limit ``name`` under a lease of ``lease_s``, without waiting.

        Returns:
            the :class:`Lease` (give it back with :meth:`give_back`); None when the limit is full
            (HTTP 423; also a limit of 0 slots), this object is closed, or the takes before this
            one kept it waiting ``API_TIMEOUT_S`` (one at a time, ``TAKES_AT_ONCE``); a lease that counts
            nothing (``lease_id`` None) once sharing is off. Never raises for the API's failures:
            they turn sharing off, with one warning.
        """
        with self._lock:
            if self._closed:
                return None
            if self.off:
                return Lease(name, None)
        # One take at a time (TAKES_AT_ONCE). A take waiting for its turn is not one close() waits
        # for, and it looks again whether the pool was closed or sharing turned off meanwhile
        # (e.g. the take before it timed out): it never makes a call then.
        if not self._taking.acquire(timeout=API_TIMEOUT_S):
            return None  # the API is slow: as if full, asked again soon
        try:
            with self._lock:
                if self._closed:
                    return None
                if self.off:
                    return Lease(name, None)
                self._calls += 1
            return self._take(name)
        finally:
            self._taking.release()

    def _take(self, name: str) -> Optional[Lease]:
        """:meth:`try_take`'s call to the API, counted in ``_calls`` (which it gives back)."""
        lease_id, seen = None, {}
        try:
            body = {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": self.lease_s}
            if self._holder is not None:
                body["holder"] = self._holder.model_dump(mode="json")
            answer = self._post("/v2/concurrency_limits/increment-with-lease", body).json()
            lease_id = UUID(str(answer["lease_id"]))
            seen = {limit["name"]: limit["limit"] for limit in answer.get("limits", [])}
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            if status == 423 or (status == 422 and "greater than the limit" in exc.response.text):
                with self._lock:
                    self._busy_since = None  # an answer: the API works
                return None
            if status in (429, 502, 503, 504):  # busy, nothing was taken: as full, asked again soon
                with self._lock:
                    self._busy_since = self._busy_since or time.monotonic()
                    busy_s = time.monotonic() - self._busy_since
                if busy_s < BUSY_GIVE_UP_S:
                    self._log.debug("the Prefect API is busy (%d) taking a slot of %s", status, name)
                    return None
                self._turn_off(f"the Prefect API answered only {status} to taking slots for {busy_s:.0f} s")
                return Lease(name, None)
            hint = " (a Prefect server without concurrency leases?)" if status in (404, 405) else ""
            self._turn_off(f"the Prefect API answered {status} to taking a slot of {name}{hint}: {_short(exc)}")
            return Lease(name, None)
        except Exception as exc:
            self._turn_off(f"taking a slot of {name} failed: {_short(exc)}")
            return Lease(name, None)
        finally:
            with self._lock:
                self._calls -= 1
                if lease_id is not None:
                    self._busy_since = None
                    self._held[lease_id] = name  # also when closed meanwhile: close() gives it back
                    if name in seen and self._sizes.get(name) is not None:
                        self._sizes[name] = seen[name]
                self._lock.notify_all()
        return Lease(name, lease_id)

    def give_back(self, lease: Optional[Lease]) -> None:
        """Give the slot of ``lease`` back: the lease thread tells the server at once, without the
        caller waiting (None, a lease that counts nothing, or one given back already: nothing to
        do). Never raises: a failure is logged and the lease ends by itself."""
        if lease is None or lease.lease_id is None:
            return
        with self._lock:
            if lease.lease_id in self._held and lease.lease_id not in self._giving_back:
                self._giving_back.append(lease.lease_id)
                self._lock.notify_all()

    def close(self) -> None:
        """Give back every slot still held, stop the lease thread, close the client. Idempotent;
        waits up to ``API_TIMEOUT_S`` for takes under way (a slot they take is given back too)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.wait_for(lambda: self._calls == 0, timeout=API_TIMEOUT_S)
            self._stopping = True
            self._lock.notify_all()
        self._worker.join(timeout=API_TIMEOUT_S)
        with self._lock:
            held, self._held, self._giving_back = dict(self._held), {}, []
        for lease_id, name in held.items():
            self._release(lease_id, name)
        self._client.__exit__(None, None, None)

    def _post(self, path: str, body: dict) -> httpx.Response:
        """POST ``body`` to the API's ``path`` (what the client's ``increment_concurrency_slots_with_lease``,
        ``release_concurrency_slots_with_lease`` and ``renew_concurrency_lease`` send), tried up to
        ``QUICK_TRIES`` times on a 429/502/503/504 answer or a failed connection (see ``QUICK_TRIES``).

        Each try goes through the client's own HTTP session (its URL, auth and CSRF headers) but
        not its retry layer, which sleeps 2 s, 4 s, ... after a 503 (and after the last try too, even
        with ``PREFECT_CLIENT_MAX_RETRIES=0``, in Prefect 3.9).

        Raises:
            the last try's ``httpx.HTTPStatusError`` or transport error; another status, or a
            read timeout, at once.
        """
        http = getattr(self._client, "_client", None)
        for attempt in range(QUICK_TRIES):
            try:
                if not isinstance(http, httpx.Client):  # another client: its own (slower) retries
                    return self._client.request("POST", path, json=body)
                request = http.build_request("POST", path, json=body)
                if getattr(http, "enable_csrf_support", False):
                    http._add_csrf_headers(request)
                response = httpx.Client.send(http, request)
                response.raise_for_status()
                return response
            except (httpx.HTTPStatusError, *_AGAIN) as exc:
                again = (not isinstance(exc, httpx.HTTPStatusError)
                         or exc.response.status_code in (429, 502, 503, 504))
                if not again or attempt == QUICK_TRIES - 1:
                    raise
            time.sleep(QUICK_DELAY_S * 2 ** attempt * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _release(self, lease_id: UUID, name: str) -> None:
        try:
            self._post("/v2/concurrency_limits/decrement-with-lease", {"lease_id": str(lease_id)})
        except Exception as exc:
            self._log.warning("could not give back a slot of %s (the Prefect server takes it back when its "
                              "lease ends, %g s from its last renewal): %s", name, self.lease_s, _short(exc))

    def _turn_off(self, reason: str) -> None:
        with self._lock:
            first, self.off = self.off is None, self.off or reason
        if first:
            self._log.warning("slots are no longer shared with other flow runs: %s; prompts count against this "
                              "run's own max_in_flight only", reason)

    def _work(self) -> None:
        """The lease thread: give back the slots given back (then ``on_given_back``), and renew
        every lease held each ``renew_every_s``, until :meth:`close`."""
        lost: set[UUID] = set()
        renew_at = time.monotonic() + self.renew_every_s
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or self._giving_back or time.monotonic() >= renew_at,
                                    timeout=max(0.0, renew_at - time.monotonic()))
                if self._stopping:
                    return
                giving_back, self._giving_back = self._giving_back, []
                names = [self._held[lease_id] for lease_id in giving_back]
            for lease_id, name in zip(giving_back, names):
                self._release(lease_id, name)
                with self._lock:
                    self._held.pop(lease_id, None)
                try:
                    if self.on_given_back is not None:
                        self.on_given_back(name)
                except Exception:  # the lease thread must go on
                    self._log.exception("on_given_back failed for %s", name)
            if time.monotonic() >= renew_at:
                self._renew(lost)
                renew_at = time.monotonic() + self.renew_every_s

    def _renew(self, lost: set) -> None:
        """Renew every lease held; one the server no longer knows is named once (in ``lost``):
        its slot may be taken by another run meanwhile."""
        with self._lock:
            held = [(lease_id, name) for lease_id, name in self._held.items() if lease_id not in self._giving_back]
        for lease_id, name in held:
            try:
                self._post(f"/v2/concurrency_limits/leases/{lease_id}/renew", {"lease_duration": self.lease_s})
            except Exception as exc:
                with self._lock:
                    still_held = lease_id in self._held
                gone = isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (404, 410)
                if gone and still_held and lease_id not in lost:
                    lost.add(lease_id)
                    self._log.warning("the Prefect server ended the lease of a slot of %s before its prompt "
                                      "finished (not renewed for %g s): another run may use the slot", name,
                                      self.lease_s)
                elif not gone:
                    self._log.debug("could not renew a lease of %s (tried again in %g s): %s", name,
                                    self.renew_every_s, _short(exc))


def _ensure_limit(client: Any, name: str, slots: int, log: Logger) -> Optional[int]:
    """Read limit ``name``, creating it with ``slots`` if absent; its slots (None if inactive).

    Raises:
        whatever the client raises (the API is unreachable, refuses, or has no such endpoint).
    """
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        limit = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            log.info("created the global concurrency limit %s with %d slot(s) (the Concurrency page of the "
                     "Prefect UI can change it)", name, slots)
            return slots
        except ObjectAlreadyExists:  # another run created it meanwhile
            limit = client.read_global_concurrency_limit_by_name(name)
    if limit.active and limit.limit != slots:
        log.info("the global concurrency limit %s has %d slot(s) (max_in_flight is %d): at most %d prompt(s) of all "
                 "flow runs at once, at most %d of this run", name, limit.limit, slots, limit.limit,
                 min(slots, limit.limit))
    return limit.limit if limit.active else None


def _flow_run_holder() -> Any:
    """Who holds the leases, as the Concurrency page shows it: this flow run, if any."""
    try:
        from prefect.client.schemas.objects import ConcurrencyLeaseHolder
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        return ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id) if context and context.flow_run else None
    except Exception:  # an older Prefect without holders
        return None


def _short(exc: BaseException) -> str:
    """One line naming ``exc`` (never a whole response body)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
