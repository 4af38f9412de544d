"""``comfy-pipeline run`` owns SIGINT and SIGTERM while it runs the flow in-process.

On the first signal every open ComfyUI connection of the process is closed
(:meth:`ConnectionPool.close_all`: our pending prompts are deleted, the running one is
interrupted by ``prompt_id``), the flow may still write its report, and the process exits
130 (SIGINT) or 143 (SIGTERM) at the latest :data:`GRACE_S` seconds after the signal. A second
SIGINT exits at once.

Why not only the usual ``KeyboardInterrupt``: a Python signal handler runs in the main thread,
the next time it executes bytecode. With the CPU busy the interrupt reached Prefect while the
main thread waited in ``as_completed`` and was lost there: the generations kept waiting, the
prompts kept running. So the signal is also read from :func:`signal.set_wakeup_fd` by a
watcher thread, which closes the connections and arms the hard exit whatever the main thread
does. The main thread still gets ``KeyboardInterrupt`` (SIGINT) or Prefect's
``TerminationSignal`` (SIGTERM) once, so the flow records why it stopped in its report.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from prefect.exceptions import TerminationSignal

from ..blocks.pool import ConnectionPool

log = logging.getLogger("comfy_pipeline.cli")

#: Seconds from the first signal until the process exits even if the flow has not returned.
GRACE_S = 8.0
#: Seconds between two passes of closing every pool (one opened after the signal is closed too).
SWEEP_EVERY_S = 0.2
#: Seconds the hard exit waits for stdout and stderr to be flushed (they may be locked).
FLUSH_WITHIN_S = 0.3

OWNED = (signal.SIGINT, signal.SIGTERM)


def stop_reason(signum: int) -> str:
    """Why the run stopped, worded as the flow's report words it."""
    if signum == signal.SIGINT:
        return "interrupted (Ctrl-C)"
    return f"terminated: its process got signal {signum}"


@dataclass(frozen=True)
class Stop:
    """What the command says and returns after a signal: ``code`` 130 (SIGINT) or 143 (SIGTERM)."""

    code: int
    message: str


class SignalOwner:
    """Context manager that owns SIGINT and SIGTERM (install it in the main thread).

    Outside the main thread (where signals cannot be handled) it does nothing. After the block,
    the previous handlers come back unless a signal arrived: then the process is ending, and a
    second Ctrl-C must still exit at once.

    Args:
        grace_s: seconds from the first signal to the hard exit (``os._exit``).
    """

    def __init__(self, grace_s: float = GRACE_S):
        self.grace_s = grace_s
        #: the first signal received, or None
        self.signum: Optional[int] = None
        #: prompts of ours queued or running when the connections were closed
        self.removed = 0
        self._lock = threading.Lock()
        self._deadline = 0.0
        self._raised = False  # the main thread got its one exception already
        self._said = False  # the closing line was printed (or is being printed)
        self._closed_once = threading.Event()
        self._finished = threading.Event()
        self._active = False
        self._reader: Optional[socket.socket] = None
        self._writer: Optional[socket.socket] = None
        self._previous_wakeup_fd = -1
        self._previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------ install / restore
    def __enter__(self) -> "SignalOwner":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)  # the C-level handler must never block on it
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in OWNED}
        self._active = True
        threading.Thread(target=self._watch, name="comfy-pipeline-signals", daemon=True).start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self._active or self.signum is not None or self._raised:  # a signal came: keep owning them
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        self._active = False
        assert self._writer is not None
        self._writer.close()  # the watcher reads EOF and ends
        # the reader is closed by the watcher

    # ------------------------------------------------------------ the main thread's side
    def _on_signal(self, signum: int, frame: Any) -> None:
        """Python-level handler (main thread): raise once so the flow records the stop."""
        self._feed_watcher_if_bypassed(signum)
        with self._lock:
            if self._raised:
                return
            self._raised = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise TerminationSignal(signum)

    def _feed_watcher_if_bypassed(self, signum: int) -> None:
        """If other code replaced the wakeup fd, the watcher never saw this signal: tell it."""
        assert self._writer is not None
        ours = self._writer.fileno()
        current = signal.set_wakeup_fd(ours, warn_on_full_buffer=False)
        if current == ours:
            return
        if current != -1:
            signal.set_wakeup_fd(current)  # leave the other owner's fd in place
        try:
            self._writer.send(bytes([signum]))
        except OSError as exc:
            log.debug("could not pass signal %d to the watcher: %s", signum, exc)

    def stop(self, assume: Optional[int] = None) -> Optional[Stop]:
        """After the flow returned or raised (main thread): what to print and exit with, or None
        when no signal arrived.

        ``assume``: the signal to act on when none was seen (a ``KeyboardInterrupt`` that came
        another way); the connections are then closed as for a real one. Inactive (not in the
        main thread), it always answers None.
        Waits for the connections to be closed, at most until the hard exit.
        """
        if not self._active:
            return None
        if self.signum is None and assume is not None:
            self._received(assume)
        if self.signum is None:
            return None
        self._closed_once.wait(max(0.0, self._deadline - time.monotonic() - 0.5))
        if not self._claim_line():  # the hard exit is under way: let it end the process
            threading.Event().wait()
        self._finished.set()
        return Stop(128 + self.signum, self._line())

    def _line(self) -> str:
        what = "interrupted" if self.signum == signal.SIGINT else f"terminated (signal {self.signum})"
        if not self._closed_once.is_set():
            return f"{what}: the prompts of this run could not be removed from the server in time"
        return f"{what}: {self.removed} prompt(s) removed from the server"

    def _claim_line(self) -> bool:
        with self._lock:
            if self._said:
                return False
            self._said = True
            return True

    # ------------------------------------------------------------ the watcher's side
    def _watch(self) -> None:
        assert self._reader is not None
        with self._reader:
            while True:
                try:
                    data = self._reader.recv(64)
                except OSError as exc:
                    log.debug("signal watcher stops: %s", exc)
                    return
                if not data:
                    return
                for signum in data:
                    if signum in OWNED:
                        self._received(signum)

    def _received(self, signum: int) -> None:
        """A signal (watcher thread): the first closes every connection and arms the hard exit;
        a later SIGINT exits at once; a later SIGTERM (Prefect passes its own on) changes nothing."""
        with self._lock:
            first = self.signum is None
            if first:
                self.signum = signum
                self._deadline = time.monotonic() + self.grace_s
        if first:
            threading.Thread(target=self._close_connections, name="comfy-pipeline-close", daemon=True).start()
            threading.Thread(target=self._watchdog, name="comfy-pipeline-watchdog", daemon=True).start()
        elif signum == signal.SIGINT:
            self._exit_now("a second Ctrl-C: exiting at once")

    def _close_connections(self) -> None:
        """Close every pool now, then again every :data:`SWEEP_EVERY_S` (a pool opened meanwhile)."""
        assert self.signum is not None
        reason = stop_reason(self.signum)
        while True:
            try:
                self.removed = max(self.removed, ConnectionPool.close_all(reason))
            except Exception:  # keep sweeping: the hard exit still comes
                log.exception("closing the ComfyUI connections failed")
            self._closed_once.set()
            if self._finished.wait(SWEEP_EVERY_S):
                return

    def _watchdog(self) -> None:
        time.sleep(max(0.0, self._deadline - time.monotonic()))
        self._exit_now(f"the flow did not end within {self.grace_s:g} s of the signal: exiting without "
                       "waiting for its report")

    def _exit_now(self, why: str) -> None:
        """End the process at once with the first signal's code, after printing one line (unless
        the main thread already printed it)."""
        assert self.signum is not None
        _flush_stdio(FLUSH_WITHIN_S)  # the log lines first, then ours
        if self._claim_line():
            _write_stderr(f"{self._line()}; {why}\n")
        _stop_prefect_temporary_server()
        os._exit(128 + self.signum)


def _write_stderr(text: str) -> None:
    """Straight to file descriptor 2: ``sys.stderr`` may be locked by the thread being abandoned."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError as exc:
        log.debug("could not write to stderr: %s", exc)


def _flush_stdio(within_s: float) -> None:
    """Flush ``sys.stdout`` and ``sys.stderr`` (log lines still buffered), giving up after
    ``within_s`` seconds: another thread may hold their lock forever."""
    def flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError) as exc:  # closed or broken pipe: nothing more to save
                log.debug("could not flush %s: %s", stream, exc)

    flusher = threading.Thread(target=flush, name="comfy-pipeline-flush", daemon=True)
    flusher.start()
    flusher.join(within_s)


def _stop_prefect_temporary_server() -> None:
    """Ask Prefect's temporary local API server (a child process started when ``PREFECT_API_URL``
    is not set) to end: ``os._exit`` skips the atexit hook that would stop it."""
    module = sys.modules.get("prefect.server.api.server")  # imported only if it was started
    if module is None:
        return
    try:
        process = module.SubprocessASGIServer().server_process
        if process is not None and process.poll() is None:
            process.terminate()
    except Exception as exc:  # best effort on the way out; never delay the exit
        log.debug("could not stop Prefect's temporary server: %s", exc)
