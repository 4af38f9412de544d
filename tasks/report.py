"""The report a person reads in the Prefect UI: table, summary, gallery and progress artifacts.

- table ``{character}-{kind}-generations``: one row per generation, its columns in the order a
  reader scans them (status, description, variant, seed, total_s, files, error, then the timing
  details, server and prompt_id; an ``image_to_video`` run adds stage and from, see
  :func:`table_rows`); errors on one line of at most :data:`ERROR_CHARS` characters;
- markdown ``{character}-{kind}-summary``: the verdict and the failures (full error text; a failed
  image says how many of its videos were skipped), then the totals (wall time, generations per
  minute, connection facts), then the servers;
- markdown ``{character}-{kind}-gallery``: a thumbnail per generation (:mod:`.gallery`);
- progress ``{character}-{kind}-progress``: the share of generations finished, updated live.

Descriptions and variants are numbered from 1 wherever a person reads them (as in the logs);
keys are python-slugify slugs (``Ålice`` -> ``alice``, ``image_to_video`` -> ``image-to-video``);
titles and descriptions name the kind the same way (:func:`.gallery.kind_text`).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from slugify import slugify

from .gallery import ServerView, gallery_markdown, kind_text, two_stages
from .models import GenerationResult, GenerationSpec

#: The table's error column holds one line of at most this many characters (the summary has it all).
ERROR_CHARS = 120


@dataclass(frozen=True)
class Stopped:
    """A generation that did not finish because the run was cancelled or stopped, or that
    never ran because the generation it starts from failed.

    ``status`` is ``interrupted`` (ComfyUI was running its prompt, which was interrupted by
    ``prompt_id``), ``cancelled`` (queued on the server and deleted, or never submitted),
    ``not run`` (ComfyUI refused the workflow itself for another generation) or ``skipped``
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
    #: ``{url: ServerView}``: how the report's readers reach each server (the gallery's links)
    views: dict[str, ServerView] = field(default_factory=dict)


def summary_markdown(rows: list[dict], facts: RunFacts, files_written: int = 0,
                     errors: Optional[Sequence[str]] = None) -> str:
    """The markdown summary, in the order a reader needs it: the verdict (and why the run
    stopped, if it did), the failures with their whole error text, the totals (wall time in
    seconds, throughput, connections), then the servers and the servers lost during the run.

    ``errors``: the whole error of each row, in the rows' order (:func:`error_texts`); without
    it the failure list shows the table's one-line errors. Generations per minute and the
    servers' busy time count this attempt's work only: a row ``reused`` from an earlier attempt
    of the flow run has its own count.

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
    lines = [f"# {facts.character}: {kind_text(facts.kind)} generations", ""]
    if facts.stopped:
        lines += [f"**The run was stopped: {facts.stopped}.** Prompts still queued or running were "
                  f"removed from the server: {by_status.get('interrupted', 0)} interrupted while "
                  f"running, {by_status.get('cancelled', 0)} cancelled before they ran.", ""]
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
        f"| ComfyUI server | {facts.server_url} |",
        f"| connections opened | {facts.connections_opened} |",
        f"| reconnects | {facts.reconnects} |",
    ]
    if facts.client_id:
        lines.append(f"| client_id | `{facts.client_id}` |")
    this_attempt = [r for r in rows if r["status"] in ("completed", "cached")]
    if len(facts.servers) > 1 or any(r["server"] for r in rows):
        lines += ["", "## Servers (this attempt)", "", "| server | generations | busy (s) |", "|---|---|---|"]
        for url in facts.servers or sorted({r["server"] for r in this_attempt if r["server"]}):
            mine = [r for r in this_attempt if r["server"] == url]
            busy = sum(r["execution_s"] or 0.0 for r in mine)
            lines.append(f"| {url} | {len(mine)} | {busy:.1f} |")
    lines += lost_servers(facts.outages, facts.moved)
    for note in facts.notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


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
    """Create the table, summary and gallery artifacts for a flow run; return the table rows.

    ``reused``: positions whose results came from an earlier attempt (see :func:`table_rows`).
    The gallery reaches the servers as ``facts.views`` says (:func:`.gallery.server_views`).
    Must be called inside a flow run (the artifacts attach to it).
    """
    rows = table_rows(specs, outcomes, reused)
    facts.moved = [(o.index, o.variant, o.moved_from, o.server) for o in outcomes.values()
                   if isinstance(o, GenerationResult) and o.moved_from]
    table_key = artifact_key(facts.character, facts.kind, "generations")
    create_table_artifact(
        table=rows,
        key=table_key,
        description=f"Every {kind_text(facts.kind)} generation for {facts.character}: status, durations (s), "
                    "files, errors.",
    )
    create_markdown_artifact(
        markdown=summary_markdown(rows, facts, sum(
            len(o.files) for p, o in outcomes.items() if isinstance(o, GenerationResult) and p not in reused),
            errors=error_texts(specs, outcomes)),
        key=artifact_key(facts.character, facts.kind, "summary"),
        description=f"Summary of the {kind_text(facts.kind)} generations for {facts.character}.",
    )
    create_markdown_artifact(
        markdown=gallery_markdown(specs, rows, outcomes, facts.views, character=facts.character,
                                  kind=facts.kind, output_dir=os.path.abspath(facts.output_dir),
                                  table_key=table_key),
        key=artifact_key(facts.character, facts.kind, "gallery"),
        description=f"Thumbnails of the {kind_text(facts.kind)} generations for {facts.character}, "
                    "from the ComfyUI server.",
    )
    return rows


class ProgressReport:
    """A progress artifact (0-100 %) updated as generations finish."""

    def __init__(self, character: str, kind: str, total: int):
        self.total = max(total, 1)
        self.done = 0
        self.artifact_id: UUID = create_progress_artifact(
            progress=0.0,
            key=artifact_key(character, kind, "progress"),
            description=f"{kind_text(kind)} generations finished for {character} (of {total}).",
        )

    def advance(self) -> None:
        """One more generation finished (whatever its outcome)."""
        self.done += 1
        update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)
