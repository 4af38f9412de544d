"""What ``comfy-pipeline run`` shows in the terminal while its flow runs in-process, and at its end.

Where the facts come from: the ``generate`` task marks its milestones (started, done, failed, a
retry, cancelled) on its own log records (``tasks.generate.MILESTONE``); :class:`RunDisplay`
attaches a logging handler to Prefect's task-run and flow-run loggers for the duration of the run
and counts them in a :class:`Tally`. Nothing is polled and nothing is patched: the display sees
what the run logs (at INFO, Prefect's default ``PREFECT_LOGGING_LEVEL``).

What a person sees, by verbosity (``-v`` counted):

* 0 (default): warnings and errors only (a failed generation is one ERROR line), the display, the
  end summary;
* 1 (``-v``): also one line per finished generation (``[12/20 done] description 3/10, variant
  2/2 ('a red fox'): 1 file(s) in 2.3 s``), and every file at the end;
* 2 (``-vv``): Prefect's INFO lines too: per node, per sampler step, as the run logs them.

Prefect prints its log lines with its console handler; 0 and 1 set that handler's level to
WARNING (:func:`quiet_prefect_console`); every line still reaches the Prefect API (the UI shows
them all).

On a terminal (stderr is a TTY) the display is a rich progress display: a bar, done / failed /
running / queued counts, generations per minute, time left and the servers. It draws on the rich
console of Prefect's console handler, so the log lines print above it instead of through it. Not
on a terminal (CI, cron, a worker): no display, one line per finished generation at verbosity 0
and 1, and no control characters.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO
from urllib.parse import urlsplit

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

from ..tasks.generate import MILESTONE
from ..tasks.report import trim

#: At most this many rows in the end's table of failed generations (the report has them all).
FAILED_ROWS = 20
#: Errors in the end's table are cut to one line of at most this many characters.
ERROR_CHARS = 120
#: Descriptions in the end's table are cut to this many characters.
DESCRIPTION_CHARS = 40
#: Redraws of the terminal display per second.
REFRESH_PER_S = 4
#: Prefect's loggers whose records carry the milestones (task runs) and the flow run's name.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


@dataclass(frozen=True)
class Failure:
    """A generation that failed for good: its ``description``, 0-based ``variant`` and ``error``
    (``"Type: message"``, possibly several lines); ``label``: how the task named its variant
    (``variant 2/2``, or ``image 1/1`` / ``video 2/4`` in an image-to-video run), if it did."""

    description: str
    variant: int
    error: str
    label: str = ""


@dataclass(frozen=True)
class Counts:
    """Generations of a run by state; ``queued`` is every one not finished and not running
    (waiting for a slot, in ComfyUI's queue, or waiting for a retry)."""

    done: int
    failed: int
    running: int
    queued: int
    total: int
    skipped: int = 0  #: videos of an image-to-video run whose image failed (never sent)

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.skipped


class Tally:
    """What became of each generation of one run, from its milestones (thread-safe).

    Keyed by each generation's description index, stage and variant (positions start again in each
    shard of a sharded run): a generation that failed and then succeeded (a
    retried flow run, ``--flow-retries``) counts once, as done.

    Args:
        total: generations planned (descriptions x variants).
    """

    def __init__(self, total: int):
        self.total = total
        self.first_started: Optional[float] = None  # time.monotonic() of the first "started"
        self._lock = threading.Lock()
        self._done: dict[int, dict] = {}
        self._failed: dict[int, Failure] = {}
        self._skipped: set[int] = set()
        self._running: set[int] = set()

    def apply(self, milestone: dict) -> bool:
        """Count one milestone (see ``tasks.generate.MILESTONE``); True if it finished a generation
        successfully (``done``)."""
        event = milestone.get("event")
        # which generation: positions start again at 1 in each shard of a sharded run, the
        # description's index and the variant (of its stage) do not
        position = (milestone.get("index", 0), str(milestone.get("label") or "variant").split(" ", 1)[0],
                    milestone.get("variant", 0))
        with self._lock:
            if event == "started":
                self._running.add(position)
                if self.first_started is None:
                    self.first_started = time.monotonic()
                return False
            self._running.discard(position)
            if event in ("done", "failed") and self.first_started is None:  # its start went unseen
                self.first_started = time.monotonic() - float(milestone.get("total_s", 0.0))
            if event == "done":
                self._failed.pop(position, None)
                self._done[position] = milestone
                return True
            if event == "skipped":
                self._skipped.add(position)
            if event == "failed":
                self._failed[position] = Failure(str(milestone.get("description", "")),
                                                 int(milestone.get("variant", 0)), str(milestone.get("error", "")),
                                                 str(milestone.get("label") or ""))
            return False

    def counts(self) -> Counts:
        with self._lock:
            done, failed, running = len(self._done), len(self._failed), len(self._running)
            skipped = len(self._skipped - set(self._done))
        return Counts(done, failed, running, max(0, self.total - done - failed - running - skipped), self.total,
                      skipped)

    def failures(self) -> list[Failure]:
        """The generations that failed, in plan order."""
        with self._lock:
            return [self._failed[p] for p in sorted(self._failed)]

    def files(self) -> list[str]:
        """Every file the finished generations wrote (local paths), in plan order."""
        with self._lock:
            return [path for p in sorted(self._done) for path in self._done[p].get("files", [])]

    def per_minute(self, now: Optional[float] = None) -> Optional[float]:
        """Generations finished per minute since the first one started in ComfyUI; None before."""
        finished = self.counts().finished
        if self.first_started is None or not finished:
            return None
        elapsed = max((now or time.monotonic()) - self.first_started, 1e-3)
        return 60.0 * finished / elapsed


def all_handlers() -> list[logging.Handler]:
    """The handlers of the root logger and of every other logger, each once."""
    loggers = [logging.getLogger()] + [
        logger for logger in list(logging.Logger.manager.loggerDict.values()) if isinstance(logger, logging.Logger)
    ]
    found: list[logging.Handler] = []
    for logger in loggers:
        found += [handler for handler in logger.handlers if handler not in found]
    return found


def prefect_console_handlers() -> list[logging.Handler]:
    """Prefect's console handlers (``PrefectConsoleHandler``: the root logger's, which uvicorn and
    fastapi share)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    return [handler for handler in all_handlers() if isinstance(handler, PrefectConsoleHandler)]


def quiet_prefect_console(verbosity: int) -> Callable[[], None]:
    """Below verbosity 2, make Prefect's console handlers print WARNING and above only; Prefect's
    API handler still gets every record (the UI shows them all).

    Returns:
        a function that puts the handlers' levels back. The CLI never calls it: the setting holds
        until the process ends, Prefect's exit hooks ("Stopping temporary server") included.
    """
    handlers = prefect_console_handlers() if verbosity < 2 else []
    levels = [handler.level for handler in handlers]
    for handler in handlers:
        handler.setLevel(max(handler.level, logging.WARNING))

    def restore() -> None:
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)

    return restore


_UUID = re.compile(r"\b([0-9a-f]{8})-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def one_line(text: str, limit: int = ERROR_CHARS) -> str:
    """``text`` on one line of at most ``limit`` characters: whitespace runs collapsed, ids
    (``prompt_id`` and other UUIDs) cut to their first 8 digits and ``…``, ``…`` at the end if cut."""
    return trim(_UUID.sub(r"\1…", text), limit)


def short_server(url: str) -> str:
    """``host:port`` of a server URL (the whole URL if it has none)."""
    return urlsplit(url).netloc or url


class _MilestoneHandler(logging.Handler):
    """Passes every record of the run's loggers to :meth:`RunDisplay._record` (never raises)."""

    def __init__(self, display: "RunDisplay"):
        super().__init__(logging.NOTSET)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.display._record(record)
        except Exception:
            self.handleError(record)


class _Board(Progress):
    """The terminal display: one row with the bar and the counts, one line with the rate, the time
    left and the servers."""

    def __init__(self, display: "RunDisplay", console: Console):
        self.display = display  # first: Progress renders once while it starts
        super().__init__(BarColumn(bar_width=32), TextColumn("{task.fields[counts]}"), console=console,
                         refresh_per_second=REFRESH_PER_S, transient=False)
        self.task_id = self.add_task("generations", total=display.tally.total, counts="")
        self.show(display.tally.counts())

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        yield Text(self.display.status_line(), style="dim")

    def show(self, counts: Counts) -> None:
        """Update the bar and the counts (any thread)."""
        self.update(self.task_id, completed=counts.finished,
                    counts=f"{counts.done}/{counts.total} done · {counts.failed} failed · "
                           + (f"{counts.skipped} skipped · " if counts.skipped else "")
                           + f"{counts.running} running · {counts.queued} queued")


class RunDisplay:
    """Context manager: the terminal output of one ``comfy-pipeline run`` while its flow runs.

    Args:
        total: generations planned (descriptions x variants).
        descriptions, variants: how many of each (for ``description 3/10, variant 2/2``).
        servers: the servers' URLs, shown as ``host:port``.
        verbosity: 0, 1 (``-v``) or 2 and more (``-vv``); see the module docstring.
        tty: draw the live display; default: whether stderr is a terminal.
        stream: where lines go when there is no live display (default ``sys.stderr``).

    After the block: :attr:`tally` (what became of each generation), :attr:`flow_run_name`,
    :attr:`elapsed_s` (seconds the block lasted).
    """

    def __init__(self, *, total: int, descriptions: int, variants: int, servers: list[str], verbosity: int = 0,
                 tty: Optional[bool] = None, stream: Optional[TextIO] = None):
        self.tally = Tally(total)
        self.descriptions, self.variants = descriptions, variants
        self.servers = [short_server(url) for url in servers]
        self.verbosity = verbosity
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.stream = stream
        self.flow_run_name: Optional[str] = None
        self.flow_run_id: Optional[str] = None
        self.began = time.monotonic()
        self.elapsed_s = 0.0
        self._handler = _MilestoneHandler(self)
        self._board: Optional[_Board] = None
        self._console: Optional[Console] = None
        self._rerouted: list[tuple[logging.StreamHandler, TextIO]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RunDisplay":
        self.began = time.monotonic()
        if self.tty:
            self._console = _console_of_prefect() or Console(stderr=True)
            self._console.push_theme(Theme())  # rich's default styles for the bar (Prefect's theme has none)
            self._board = _Board(self, self._console)
            self._board.start()
            self._console.show_cursor(True)  # a hard exit (cli_signals) must not leave it hidden
            self._reroute_stream_handlers()
        for name in RUN_LOGGERS:
            logging.getLogger(name).addHandler(self._handler)
        return self

    def __exit__(self, *exc_info) -> None:
        for name in RUN_LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)
        self.elapsed_s = time.monotonic() - self.began
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        if self._board is not None:
            self._board.stop()  # draws the last state
            assert self._console is not None
            self._console.pop_theme()

    def _reroute_stream_handlers(self) -> None:
        """Plain logging handlers that write to the terminal's stderr (Prefect's handler of its
        internal errors, a user's) write through the live display's stand-in for it (rich's
        ``FileProxy``) while it is drawn: their lines then print above it instead of through it."""
        from prefect.logging.handlers import PrefectConsoleHandler

        proxy = sys.stderr
        original = getattr(proxy, "rich_proxied_file", None)
        if original is None:  # not redirected: nothing to do
            return
        for handler in all_handlers():
            if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, PrefectConsoleHandler)
                    and handler.stream is original):
                self._rerouted.append((handler, original))
                handler.setStream(proxy)

    # ------------------------------------------------------------------ what the run logs
    def _record(self, record: logging.LogRecord) -> None:
        if self.flow_run_id is None and getattr(record, "flow_run_id", None):
            self._flow_run_began(str(record.flow_run_id), getattr(record, "flow_run_name", None))
        milestone = getattr(record, MILESTONE, None)
        if not isinstance(milestone, dict):
            return
        # (records come one at a time: a handler serialises its emit() calls)
        finished = self.tally.apply(milestone)
        if self._board is not None:
            self._board.show(self.tally.counts())
        if finished and self.says_each_finished:
            self._say(self.finished_line(milestone))

    @property
    def says_each_finished(self) -> bool:
        """One line per finished generation: with ``-v``, or without a terminal; not with ``-vv``,
        where Prefect's own ``done in`` line is printed."""
        return self.verbosity < 2 and (self.verbosity >= 1 or not self.tty)

    def _flow_run_began(self, run_id: str, name: Optional[str]) -> None:
        from prefect.utilities.urls import url_for

        with self._lock:
            if self.flow_run_id is not None:
                return
            self.flow_run_id, self.flow_run_name = run_id, name
        url = url_for("flow-run", obj_id=run_id)
        self._say(f"flow run {name!r}: {url}" if url else f"flow run {name!r} ({run_id})")

    def _say(self, line: str) -> None:
        """One line above the live display, or on the stream."""
        if self._board is not None:
            self._board.console.print(Text(line), soft_wrap=True)
            return
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()

    # ------------------------------------------------------------------ wording
    def finished_line(self, milestone: dict) -> str:
        """``[12/20 done] description 3/10, variant 2/2 ('a red fox'): 1 file(s) in 2.3 s``."""
        done = self.tally.counts().done
        files = len(milestone.get("files") or [])
        cached = ", cached" if milestone.get("cached") else ""
        label = milestone.get("label") or f"variant {milestone['variant'] + 1}/{self.variants}"
        return (f"[{done}/{self.tally.total} done] description {milestone['index'] + 1}/{self.descriptions}, "
                f"{label} ({trim(milestone['description'])!r}): "
                f"{files} file(s) in {milestone.get('total_s', 0.0):.1f} s{cached}")

    def status_line(self) -> str:
        """``41.2 generations/min · about 0:00:07 left · 0:00:14 elapsed · on 127.0.0.1:8188``: the
        rate since the first generation started in ComfyUI, the time left at that rate."""
        counts = self.tally.counts()
        rate = self.tally.per_minute()
        left = counts.total - counts.finished
        if rate is None:
            speed = "starting" if counts.running == 0 else "first generation running"
        elif left == 0:
            speed = f"{rate:.1f} generations/min"
        else:
            speed = f"{rate:.1f} generations/min · about {_clock(60.0 * left / rate)} left"
        return f"{speed} · {_clock(time.monotonic() - self.began)} elapsed · on {', '.join(self.servers)}"


def _console_of_prefect() -> Optional[Console]:
    """The rich console Prefect's console handler prints with, if it prints to a terminal."""
    for handler in prefect_console_handlers():
        console = getattr(handler, "console", None)
        if isinstance(console, Console) and console.is_terminal:
            return console
    return None


def _clock(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_end(display: RunDisplay, *, output_dir: str, files: Optional[list[str]] = None,
              done: Optional[int] = None, list_files: bool = False, out: Optional[TextIO] = None) -> None:
    """The end of a run on stdout: a short table of the failed generations (description, variant,
    error on one line; at most :data:`FAILED_ROWS`), then ``18 of 20 generation(s) done, 18
    file(s) in DIR (29.1 s)`` and, with ``list_files``, every file.

    Args:
        display: the run's display, after its block.
        output_dir: the output directory (shown as given: the caller passes it absolute).
        files, done: the files written and the generations done, when known from the flow's
            result; else the display's tally.
        list_files: list every file (``-v`` or ``--list-files``).
        out: where to print (default stdout).
    """
    console = Console(file=out or sys.stdout, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log, not a screen: keep each row on one line
    failures = display.tally.failures()
    if failures:
        console.print(Text(f"{len(failures)} failed generation(s):", style="bold red"))
        shown = failures[:FAILED_ROWS]
        rows = [(trim(f.description, DESCRIPTION_CHARS),
                 f.label.replace("variant ", "") if f.label else f"{f.variant + 1}/{display.variants}") for f in shown]
        widths = [max(len(header), *(len(row[i]) for row in rows)) for i, header in enumerate(("description", "variant"))]
        error_chars = max(30, min(ERROR_CHARS, console.width - sum(widths) - 10))  # and the space between columns
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("description", no_wrap=True, min_width=widths[0])
        table.add_column("variant", justify="right", no_wrap=True, min_width=widths[1])
        table.add_column("error", no_wrap=True, overflow="ellipsis")
        for (description, variant), failure in zip(rows, shown):  # Text: [brackets] are not markup
            table.add_row(Text(description), Text(variant), Text(one_line(failure.error, error_chars)))
        console.print(table)
        if len(failures) > FAILED_ROWS:
            console.print(Text(f"... and {len(failures) - FAILED_ROWS} more: see the report's table"))
    files = display.tally.files() if files is None else files
    done = display.tally.counts().done if done is None else done
    total = display.tally.total
    style = "green" if done == total else ""
    hint = "" if list_files or not files else " (list them with -v or --list-files)"
    console.print(Text(f"{done} of {total} generation(s) done, {len(files)} file(s) in {output_dir} "
                       f"({display.elapsed_s:.1f} s){hint}", style=style))
    if list_files:
        for path in files:
            console.print(Text(f"  {path}"))
