"""The report a person reads in the Prefect UI: table, summary, gallery and progress artifacts.

- table ``{character}-{kind}-generations``: one row per generation, its columns in the order a
  reader scans them (status, description, variant, seed, total_s, files, error, then the timing
  details, server and prompt_id; an ``image_to_video`` run adds stage and from, see
  :func:`table_rows`); errors on one line of at most :data:`ERROR_CHARS` characters. A big run's
  table keeps at most :data:`TABLE_ROWS` generations that did not succeed (failures first) and the
  last :data:`TABLE_ROWS` that did (:func:`table_shown`); every row, with whole descriptions and
  errors, is then in a CSV file ``{output_dir}/reports/{table key}-{flow run}.csv`` (:func:`write_table_csv`);
- markdown ``{character}-{kind}-summary``: the verdict and the failures (full error text; a failed
  image says how many of its videos were skipped), then the totals (wall time, generations per
  minute, connection facts, the CSV file of a big run), then the servers;
- markdown ``{character}-{kind}-gallery``: a thumbnail per generation (:mod:`.gallery`);
- progress ``{character}-{kind}-progress``: the share of generations finished, updated live.

Descriptions and variants are numbered from 1 wherever a person reads them (as in the logs);
keys are python-slugify slugs (``Ålice`` -> ``alice``, ``image_to_video`` -> ``image-to-video``);
titles and descriptions name the kind the same way (:func:`.gallery.kind_text`).
"""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence, Union
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from slugify import slugify

from .gallery import ServerView, gallery_markdown, kind_text, two_stages
from .models import GenerationResult, GenerationSpec

#: The table's error column holds one line of at most this many characters (the summary has it all).
ERROR_CHARS = 120
#: The table artifact shows at most this many generations that did not succeed (failures first) and
#: the last this many that did (in plan order); a run with more has every row in a CSV file instead
#: (see :func:`write_report`).
TABLE_ROWS = 500
#: The statuses of a generation that succeeded.
SUCCEEDED = frozenset({"completed", "cached", "reused"})
#: The statuses the table shows first when more than :data:`TABLE_ROWS` did not succeed: the ones
#: with an error to read (not the ``skipped``, ``cancelled`` or ``not run`` rows of a stopped run).
FAILURES = frozenset({"failed", "interrupted"})


@dataclass(frozen=True)
class Stopped:
    """A generation that did not finish because the run was cancelled or stopped, or that
    never ran because the generation it starts from failed.

    ``status`` is ``interrupted`` (ComfyUI was running its prompt, which was interrupted by
    ``prompt_id``), ``cancelled`` (queued on the server and deleted, or waiting for a slot),
    ``not run`` (never sent: the run stopped before it started, or ComfyUI refused the workflow
    itself for another generation) or ``skipped``
    (a video of an ``image_to_video`` run whose image failed; never submitted).
    """

    status: str
    reason: str


Outcome = Union[GenerationResult, BaseException, Stopped]


def artifact_key(character: str, kind: str, what: str) -> str:
    """A valid Prefect artifact key (lowercase ASCII letters, digits, dashes) for any character
    name: the python-slugify slug of ``{character}-{kind}-{what}`` (``Ålice`` -> ``alice-image-summary``)."""
    return slugify(f"{character}-{kind}-{what}") or slugify(what) or "report"


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` of a failure, as shown in the report."""
    return f"{type(exc).__name__}: {exc}"


def trim(text: str, limit: int = 60) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters with ``…``."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table_rows(specs: list[GenerationSpec], outcomes: dict[int, Outcome],
               reused: frozenset[int] = frozenset()) -> list[dict]:
    """One row per planned generation, in plan order; ``outcomes`` is keyed by ``spec.position``.

    Columns, in the order a reader scans them: ``status``, ``description`` (``"2: a blue
    bird"``: its number from 1, then the text trimmed), ``variant`` (from 1), ``seed``,
    ``total_s``, ``files`` (absolute paths), ``error`` (one line, at most :data:`ERROR_CHARS`
    characters; :func:`error_texts` has it whole), then ``queued_s``, ``execution_s``,
    ``download_s`` (seconds), ``server`` and ``prompt_id``.

    A plan with both stages (an ``image_to_video`` run, :func:`.gallery.two_stages`) has two more
    columns: ``stage`` (``image`` or ``video``) right after ``status``, and ``from`` right after
    ``variant``: for a video, the image it started from (``"image 1"``: that image's variant
    from 1, of the same description), empty for an image. There ``variant`` counts the
    description's images and its videos apart (``image 1``, ``video 3``). Plans of one stage have
    neither column.

    ``reused``: positions whose result came back from an earlier attempt of the flow run
    (status ``reused``). A spec with no outcome (the run stopped first) is ``not run``; a video
    whose image failed is ``skipped`` (a :class:`Stopped`, its reason in ``error``).
    """
    staged = two_stages(specs)
    by_position = {spec.position: spec for spec in specs}
    rows = []
    for spec in specs:
        outcome = outcomes.get(spec.position)
        row = {"status": "not run"}
        if staged:
            row["stage"] = spec.stage
        row.update({
            # "2: ...", not "2. ...": the UI renders a cell as markdown, and "2. " as a list item "1."
            "description": f"{spec.index + 1}: {trim(spec.description)}",
            "variant": spec.variant + 1,
        })
        if staged:
            row["from"] = _started_from(spec, by_position)
        row.update({
            "seed": spec.seed,
            "total_s": None,
            "files": "",
            "error": "",
            "queued_s": None,
            "execution_s": None,
            "download_s": None,
            "server": "",
            "prompt_id": spec.prompt_id,
        })
        if isinstance(outcome, Stopped):
            row.update(status=outcome.status, error=trim(outcome.reason, ERROR_CHARS))
        elif isinstance(outcome, GenerationResult):
            row.update(
                status="reused" if spec.position in reused else outcome.status,
                prompt_id=outcome.prompt_id,
                server=outcome.server,
                queued_s=outcome.queued_s,
                execution_s=outcome.execution_s,
                download_s=outcome.download_s,
                total_s=outcome.total_s,
                files=", ".join(os.path.abspath(f.path) for f in outcome.files),
            )
        elif outcome is not None:
            row.update(status="failed", error=trim(describe_error(outcome), ERROR_CHARS),
                       prompt_id=getattr(outcome, "prompt_id", None) or spec.prompt_id)
        rows.append(row)
    return rows


def _started_from(spec: GenerationSpec, by_position: dict[int, GenerationSpec]) -> str:
    """The ``from`` column: ``"image 1"`` for a video (its image's variant from 1; the
    description too if the image is another description's), ``""`` for an image."""
    if spec.source is None:
        return ""
    image = by_position.get(spec.source)
    if image is None:  # not in this plan: its position, as the logs number generations
        return f"generation {spec.source}"
    label = f"{image.stage} {image.variant + 1}"
    return label if image.index == spec.index else f"description {image.index + 1}, {label}"


def error_texts(specs: list[GenerationSpec], outcomes: dict[int, Outcome]) -> list[str]:
    """The whole error of each planned generation (``""`` if none), in plan order: what the
    summary's failure list shows where the table has one cut line."""
    texts = []
    for spec in specs:
        outcome = outcomes.get(spec.position)
        if isinstance(outcome, Stopped):
            texts.append(outcome.reason)
        elif outcome is not None and not isinstance(outcome, GenerationResult):
            texts.append(describe_error(outcome))
        else:
            texts.append("")
    return texts


def table_shown(rows: list[dict], last: int = TABLE_ROWS) -> list[dict]:
    """The rows the table artifact shows, in plan order: the rows that did not succeed (any
    status but those of :data:`SUCCEEDED`), at most ``last`` of them (the :data:`FAILURES` first,
    then the others, each in plan order: a stopped run of 100,000 has 99,000 ``cancelled`` rows),
    and the last ``last`` rows that did. ``rows`` itself when that is every row (a run with at most
    ``last`` of each keeps today's table)."""
    succeeded = [i for i, row in enumerate(rows) if row["status"] in SUCCEEDED]
    others = [i for i, row in enumerate(rows) if row["status"] not in SUCCEEDED]
    if len(succeeded) <= last and len(others) <= last:
        return rows
    kept = set(succeeded[-last:] if last > 0 else [])
    kept.update(sorted(others, key=lambda i: rows[i]["status"] not in FAILURES)[:max(0, last)])
    return [rows[i] for i in sorted(kept)]


def table_shown_text(rows: list[dict], shown: list[dict]) -> str:
    """What a table of ``shown`` out of ``rows`` (:func:`table_shown`) holds, for its description and
    the summary: ``"the 3 that did not succeed and the last 500 that did"``, or ``"500 of the
    99,960 that did not succeed (failures first) and the 40 that did"``."""
    problems = sum(1 for r in rows if r["status"] not in SUCCEEDED)
    problems_shown = sum(1 for r in shown if r["status"] not in SUCCEEDED)
    successes, successes_shown = len(rows) - problems, len(shown) - problems_shown
    first = (f"the {problems_shown:,} that did not succeed" if problems_shown == problems else
             f"{problems_shown:,} of the {problems:,} that did not succeed (failures first)")
    if not successes:
        return f"{first}; none succeeded"
    return f"{first} and the {'last ' if successes_shown < successes else ''}{successes_shown:,} that did"


def table_csv_path(output_dir: str, table_key: str) -> str:
    """Where the CSV file of the whole table goes: ``{output_dir}/reports/{table_key}-{run}.csv``
    (absolute), ``run`` being the flow run's name and id (``crimson-fox-0b5e...``), or the UTC
    time outside a flow run. :func:`write_table_csv` adds ``-2``, ``-3``, ... rather than
    overwrite a file of that name (another attempt of the flow run)."""
    context = FlowRunContext.get()
    if context is not None:
        run = f"{slugify(context.flow_run.name or '')}-{context.flow_run.id}".lstrip("-")
    else:
        run = os.environ.get("PREFECT__FLOW_RUN_ID") or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return os.path.join(os.path.abspath(output_dir), "reports", f"{table_key}-{run}.csv")


def write_table_csv(path: str, specs: Sequence[GenerationSpec], rows: Sequence[dict],
                    errors: Sequence[str]) -> str:
    """Write every row of the table to a new CSV file (UTF-8, a header line, the table's columns
    in its order; empty cells for ``None``) and return its path.

    The cells are the table's, except ``description`` and ``error``, which are whole (``"2: "``
    and the description's text; ``errors`` from :func:`error_texts`) where the table cuts them.
    ``rows`` are :func:`table_rows` of ``specs``, in the same order. The parent directories are
    created; a file already at ``path`` is kept and the rows go to ``{stem}-2.csv`` (then
    ``-3``, ...), whose path is returned. A write that fails removes its partial file and raises.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else []
    number = 1
    while True:
        try:
            out = open(target, "x", newline="", encoding="utf-8")
            break
        except FileExistsError:
            number += 1
            target = Path(path).with_name(f"{Path(path).stem}-{number}{Path(path).suffix}")
    try:
        with out:
            writer = csv.DictWriter(out, fieldnames=columns)
            writer.writeheader()
            for spec, row, error in zip(specs, rows, errors):
                writer.writerow({**row, "description": f"{spec.index + 1}: {spec.description}", "error": error})
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return str(target)


@dataclass
class RunFacts:
    """What the summary says about the run besides the rows.

    ``wall_s`` is the flow's wall time in seconds; ``connections_opened`` must be 1 for a
    healthy run (one WebSocket per flow run).
    """

    character: str
    kind: str
    server_url: str
    output_dir: str
    wall_s: float
    connections_opened: int = 0
    reconnects: int = 0
    client_id: Optional[str] = None
    servers: list[str] = field(default_factory=list)
    fatal_error: Optional[str] = None
    #: why the run stopped before every generation finished (cancelled, SIGTERM, Ctrl-C)
    stopped: Optional[str] = None
    #: which attempt of the flow run this is (2 and more after a retry)
    attempt: int = 1
    #: ``{url: [Outage, ...]}``: when each server's WebSocket was down during the run, and why
    outages: dict = field(default_factory=dict)
    #: ``(index, variant, from_url, to_url)`` of each generation that moved to another server
    #: (``index`` and ``variant`` from 0, as in :class:`GenerationSpec`)
    moved: list[tuple[int, int, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: a shard of a bigger run (``"start:stop"``): its table keeps every row, for the parent's report
    shard: str = ""
    #: ``{url: ServerView}``: how the report's readers reach each server (the gallery's links)
    views: dict[str, ServerView] = field(default_factory=dict)


def summary_markdown(rows: list[dict], facts: RunFacts, files_written: int = 0,
                     errors: Optional[Sequence[str]] = None, *, shown: Optional[list[dict]] = None,
                     table_csv: Optional[str] = None, table_csv_error: Optional[str] = None) -> str:
    """The markdown summary, in the order a reader needs it: the verdict (and why the run
    stopped, if it did), the failures with their whole error text, the totals (wall time in
    seconds, throughput, connections), then the servers and the servers lost during the run.

    ``errors``: the whole error of each row, in the rows' order (:func:`error_texts`); without
    it the failure list shows the table's one-line errors. Generations per minute and the
    servers' busy time count this attempt's work only: a row ``reused`` from an earlier attempt
    of the flow run has its own count.

    A big run's table shows only the rows ``shown`` (:func:`table_shown`): the totals then say so,
    and link ``table_csv``, the CSV file with every row (its absolute path and a ``file://``
    link), or, if it could not be written, say why (``table_csv_error``, one warning line).

    Rows of an ``image_to_video`` run (they have a ``stage`` column, see :func:`table_rows`)
    count both stages everywhere; videos ``skipped`` because their image failed are counted in
    the verdict and the totals, each failure names ``image N`` or ``video N`` (not ``variant
    N``), and a failed image ends with how many of its videos were skipped.
    """
    total = len(rows)
    staged = any("stage" in r for r in rows)
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    ran = by_status.get("completed", 0) + by_status.get("cached", 0)
    reused = by_status.get("reused", 0)
    failed = by_status.get("failed", 0)
    skipped = by_status.get("skipped", 0)
    stopped = by_status.get("interrupted", 0) + by_status.get("cancelled", 0)
    per_minute = (ran / facts.wall_s * 60.0) if facts.wall_s > 0 else 0.0
    headline = f"**{ran + reused} of {total} generations succeeded**"
    if reused:
        headline += f" ({ran} in this attempt, {reused} reused from an earlier attempt)"
    headline += f", {failed} failed"
    for status in ("skipped", "interrupted", "cancelled", "not run"):
        if by_status.get(status):
            headline += f", {by_status[status]} {status}"
    if any("stage" in row for row in rows):  # image-to-video: what succeeded of each stage
        good = [r for r in rows if r["status"] in ("completed", "cached", "reused")]
        headline += (f" (images: {sum(r['stage'] == 'image' for r in good)} of "
                     f"{sum(r['stage'] == 'image' for r in rows)}, videos: "
                     f"{sum(r['stage'] == 'video' for r in good)} of {sum(r['stage'] == 'video' for r in rows)})")
    lines = [f"# {facts.character}: {kind_text(facts.kind)} generations", ""]
    if facts.stopped:
        never_sent = by_status.get("not run", 0)
        lines += [f"**The run was stopped: {facts.stopped}.** Prompts still queued or running were "
                  f"removed from the server: {by_status.get('interrupted', 0)} interrupted while "
                  f"running, {by_status.get('cancelled', 0)} cancelled before they ran"
                  + (f"; {never_sent:,} generation(s) were never sent (not run)." if never_sent else "."), ""]
    lines.append(headline + ".")
    if facts.fatal_error:
        lines += ["", "## The run could not proceed", "", facts.fatal_error]
    failures = [(r, errors[i] if errors is not None else r["error"])
                for i, r in enumerate(rows) if r["status"] == "failed"]
    # (description, "image N") -> its videos skipped because it failed
    skipped_from = Counter((r["description"], r["from"]) for r in rows
                           if r["status"] == "skipped" and r.get("from"))
    if failures:
        lines += ["", "## Failures", ""]
        for r, error in failures:
            number = r["description"].split(":", 1)[0]
            name = f"{r['stage']} {r['variant']}" if staged else f"variant {r['variant']}"
            # continuation lines indented, so that a multi-line error stays in its list item
            line = (f"- description {number}, {name} (prompt_id `{r['prompt_id']}`): "
                    + "\n  ".join(error.splitlines()))
            if staged and r["stage"] == "image" and skipped_from[r["description"], name]:
                line += f" — its {skipped_from[r['description'], name]} video(s) were skipped"
            lines.append(line)
    lines += [
        "",
        "## Totals",
        "",
        "| | |",
        "|---|---|",
        f"| completed (this attempt) | {by_status.get('completed', 0)} |",
        f"| cached (served from ComfyUI's cache) | {by_status.get('cached', 0)} |",
    ]
    if facts.attempt > 1 or reused:
        lines.append(f"| reused from an earlier attempt | {reused} |")
    lines.append(f"| failed | {failed} |")
    if staged or skipped:
        lines.append(f"| skipped (their image failed) | {skipped} |")
    if stopped or facts.stopped:
        lines += [f"| interrupted (by the cancel) | {by_status.get('interrupted', 0)} |",
                  f"| cancelled (never ran) | {by_status.get('cancelled', 0)} |"]
    lines += [
        f"| attempt of this flow run | {facts.attempt} |",
        f"| wall time (this attempt) | {facts.wall_s:.1f} s |",
        f"| generations per minute (this attempt) | {per_minute:.1f} |",
        f"| files written (this attempt) | {files_written} |",
        f"| output directory | `{os.path.abspath(facts.output_dir)}` |",
    ]
    if shown is not None and len(shown) < total:
        lines.append(f"| generations table | {len(shown):,} of {total:,} rows: {table_shown_text(rows, shown)} |")
    if table_csv:
        lines.append(f"| every row (CSV) | `{table_csv}` ([open]({Path(table_csv).as_uri()})) |")
    if table_csv_error:
        lines.append(f"| every row (CSV) | **warning: not written**: {_cell_text(table_csv_error)} |")
    lines += [
        f"| ComfyUI server | {facts.server_url} |",
        f"| connections opened | {facts.connections_opened} |",
        f"| reconnects | {facts.reconnects} |",
    ]
    if facts.client_id:
        lines.append(f"| client_id | `{facts.client_id}` |")
    if len(facts.servers) > 1 or any(r["server"] for r in rows):
        # one pass over the rows, whatever the number of servers: {url: [generations, busy seconds]}
        per_server: dict[str, list] = {}
        for r in rows:
            if r["status"] in ("completed", "cached"):
                figures = per_server.setdefault(r["server"], [0, 0.0])
                figures[0] += 1
                figures[1] += r["execution_s"] or 0.0
        lines += ["", "## Servers (this attempt)", "", "| server | generations | busy (s) |", "|---|---|---|"]
        for url in facts.servers or sorted(url for url in per_server if url):
            count, busy = per_server.get(url, (0, 0.0))
            lines.append(f"| {url} | {count} | {busy:.1f} |")
    lines += lost_servers(facts.outages, facts.moved)
    for note in facts.notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _cell_text(text: str) -> str:
    """``text`` on one line that stays in its markdown table cell (``|`` escaped)."""
    return trim(text, 500).replace("|", "\\|")


def lost_servers(outages: dict, moved: list[tuple[int, int, str, str]]) -> list[str]:
    """The summary's "Servers lost during the run" section: each outage of each server (when,
    why, for how long) and the generations that moved from it to another server."""
    if not outages:
        return []
    lines = ["", "## Servers lost during the run", ""]
    for url, spans in outages.items():
        for span in spans:
            when = f"down at {span.started:%H:%M:%S} UTC ({span.reason})"
            if span.ended is None:
                when += ", not back by the end of the run"
            else:
                when += f", back at {span.ended:%H:%M:%S} UTC after {(span.ended - span.started).total_seconds():.1f} s"
            lines.append(f"- {url} {when}")
        away = [m for m in moved if m[2] == url]
        if away:
            lines.append(f"  - {len(away)} generation(s) moved from it: " + ", ".join(
                f"description {index + 1}, variant {variant + 1} to {to}" for index, variant, _, to in away))
    return lines


def write_report(specs: list[GenerationSpec], outcomes: dict[int, Outcome], facts: RunFacts,
                 reused: frozenset[int] = frozenset()) -> list[dict]:
    """Create the table, summary and gallery artifacts for a flow run; return every table row
    (:func:`table_rows`, also those the table artifact leaves out).

    A run with more than :data:`TABLE_ROWS` generations that succeeded has a table of every
    generation that did not and the last :data:`TABLE_ROWS` that did (:func:`table_shown`; its
    description says how many rows of how many), and every row goes to a CSV file
    (:func:`table_csv_path`, :func:`write_table_csv`) that the summary links. A CSV file that
    cannot be written is a warning in the summary (and the table's description), not an
    exception. Smaller runs have every row in the table and no CSV file.

    ``reused``: positions whose results came from an earlier attempt (see :func:`table_rows`).
    The gallery reaches the servers as ``facts.views`` says (:func:`.gallery.server_views`).
    Must be called inside a flow run (the artifacts attach to it).
    """
    rows = table_rows(specs, outcomes, reused)
    facts.moved = [(o.index, o.variant, o.moved_from, o.server) for o in outcomes.values()
                   if isinstance(o, GenerationResult) and o.moved_from]
    table_key = artifact_key(facts.character, facts.kind, "generations")
    errors = error_texts(specs, outcomes)
    shown = rows if facts.shard else table_shown(rows)  # a parent sums a shard's rows: keep them all
    kind = kind_text(facts.kind)
    table_csv = table_csv_error = None
    if len(shown) < len(rows):
        path = table_csv_path(facts.output_dir, table_key)
        try:
            table_csv = write_table_csv(path, specs, rows, errors)
        except Exception as exc:  # the report (and the run's outcome) goes on without the file
            table_csv_error = f"could not write `{path}`: {describe_error(exc)}"
        where = f"every row is in `{table_csv}`" if table_csv else "the CSV file of every row could not be written"
        description = (f"{len(shown):,} of {len(rows):,} {kind} generations for {facts.character}: "
                       f"{table_shown_text(rows, shown)}, in plan order ({where}). "
                       "Status, durations (s), files, errors.")
    else:
        description = f"Every {kind} generation for {facts.character}: status, durations (s), files, errors."
    create_table_artifact(table=shown, key=table_key, description=description)
    create_markdown_artifact(
        markdown=summary_markdown(rows, facts, sum(
            len(o.files) for p, o in outcomes.items() if isinstance(o, GenerationResult) and p not in reused),
            errors=errors, shown=shown, table_csv=table_csv, table_csv_error=table_csv_error),
        key=artifact_key(facts.character, facts.kind, "summary"),
        description=f"Summary of the {kind} generations for {facts.character}.",
    )
    create_markdown_artifact(
        markdown=gallery_markdown(specs, rows, outcomes, facts.views, character=facts.character,
                                  kind=facts.kind, output_dir=os.path.abspath(facts.output_dir),
                                  table_key=table_key, full_table=table_csv),
        key=artifact_key(facts.character, facts.kind, "gallery"),
        description=f"Thumbnails of the {kind} generations for {facts.character}, from the ComfyUI server.",
    )
    return rows


class ProgressReport:
    """A progress artifact (0-100 %) updated as generations finish, at most once every
    ``every_s`` seconds (each update is a call to the Prefect API, made by the flow's own thread:
    one per generation cost a big run about a third of its pace), and always at 100 %."""

    def __init__(self, character: str, kind: str, total: int, *, every_s: float = 1.0):
        self.total = max(total, 1)
        self.done = 0
        self.every_s = every_s
        self._shown = 0  # generations the artifact shows
        self._last = time.monotonic()
        self.artifact_id: UUID = create_progress_artifact(
            progress=0.0,
            key=artifact_key(character, kind, "progress"),
            description=f"{kind_text(kind)} generations finished for {character} (of {total}).",
        )

    def advance(self) -> None:
        """One more generation finished (whatever its outcome)."""
        self.done += 1
        if self.done >= self.total or time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Show what is done now, if the artifact shows less."""
        if self._shown == self.done:
            return
        self._shown, self._last = self.done, time.monotonic()
        update_progress_artifact(self.artifact_id, progress=min(100.0, 100.0 * self.done / self.total))
