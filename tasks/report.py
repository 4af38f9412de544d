"""The report a person reads in the Prefect UI: table, summary and progress artifacts.

- table ``{character}-{kind}-generations``: one row per generation (status, prompt_id, seed,
  durations in seconds, files, error);
- markdown ``{character}-{kind}-summary``: totals, failures with reasons, wall time,
  generations per minute, connection facts;
- progress ``{character}-{kind}-progress``: the share of generations finished, updated live.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from .models import GenerationResult, GenerationSpec



@dataclass(frozen=True)
class Stopped:
    """A generation that did not finish because the run was cancelled or stopped.

    ``status`` is ``interrupted`` (ComfyUI was running its prompt, which was interrupted by
    ``prompt_id``) or ``cancelled`` (queued on the server and deleted, or never submitted).
    """

    status: str
    reason: str


Outcome = Union[GenerationResult, BaseException, Stopped]


def artifact_key(character: str, kind: str, what: str) -> str:
    """A valid Prefect artifact key (lowercase letters, digits, dashes) for any character name."""
    raw = f"{character}-{kind}-{what}".lower()
    key = re.sub(r"[^a-z0-9]+", "-", raw).strip("-")
    key = re.sub(r"-{2,}", "-", key)
    return key or what


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` of a failure, as shown in the report."""
    return f"{type(exc).__name__}: {exc}"


def trim(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table_rows(specs: list[GenerationSpec], outcomes: dict[int, Outcome],
               reused: frozenset[int] = frozenset()) -> list[dict]:
    """One row per planned generation, in plan order; ``outcomes`` is keyed by ``spec.position``.

    ``reused``: positions whose result came back from an earlier attempt of the flow run
    (status ``reused``). A spec with no outcome (the run stopped first) is ``not run``.
    """
    rows = []
    for spec in specs:
        outcome = outcomes.get(spec.position)
        row = {
            "index": spec.index,
            "description": trim(spec.description),
            "variant": spec.variant,
            "status": "not run",
            "prompt_id": spec.prompt_id,
            "server": "",
            "seed": spec.seed,
            "queued_s": None,
            "execution_s": None,
            "download_s": None,
            "total_s": None,
            "files": "",
            "error": "",
        }
        if isinstance(outcome, Stopped):
            row.update(status=outcome.status, error=outcome.reason)
        elif isinstance(outcome, GenerationResult):
            row.update(
                status="reused" if spec.position in reused else outcome.status,
                prompt_id=outcome.prompt_id,
                server=outcome.server,
                queued_s=outcome.queued_s,
                execution_s=outcome.execution_s,
                download_s=outcome.download_s,
                total_s=outcome.total_s,
                files=", ".join(f.path for f in outcome.files),
            )
        elif outcome is not None:
            row.update(status="failed", error=describe_error(outcome),
                       prompt_id=getattr(outcome, "prompt_id", None) or spec.prompt_id)
        rows.append(row)
    return rows


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
    moved: list[tuple[int, int, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def summary_markdown(rows: list[dict], facts: RunFacts, files_written: int = 0) -> str:
    """The markdown summary: totals, failures with reasons, wall time, throughput, connection.

    Generations per minute and the servers' busy time count this attempt's work only: a row
    ``reused`` from an earlier attempt of the flow run has its own count.
    """
    total = len(rows)
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    ran = by_status.get("completed", 0) + by_status.get("cached", 0)
    reused = by_status.get("reused", 0)
    failed = by_status.get("failed", 0)
    stopped = by_status.get("interrupted", 0) + by_status.get("cancelled", 0)
    per_minute = (ran / facts.wall_s * 60.0) if facts.wall_s > 0 else 0.0
    headline = f"**{ran + reused} of {total} generations succeeded**"
    if reused:
        headline += f" ({ran} in this attempt, {reused} reused from an earlier attempt)"
    headline += f", {failed} failed"
    for status in ("interrupted", "cancelled", "not run"):
        if by_status.get(status):
            headline += f", {by_status[status]} {status}"
    lines = [f"# {facts.character}: {facts.kind} generations", ""]
    if facts.stopped:
        lines += [f"**The run was stopped: {facts.stopped}.** Prompts still queued or running were "
                  f"removed from the server: {by_status.get('interrupted', 0)} interrupted while "
                  f"running, {by_status.get('cancelled', 0)} cancelled before they ran.", ""]
    lines += [
        headline + ".",
        "",
        "| | |",
        "|---|---|",
        f"| completed (this attempt) | {by_status.get('completed', 0)} |",
        f"| cached (served from ComfyUI's cache) | {by_status.get('cached', 0)} |",
    ]
    if facts.attempt > 1 or reused:
        lines.append(f"| reused from an earlier attempt | {reused} |")
    lines.append(f"| failed | {failed} |")
    if stopped or facts.stopped:
        lines += [f"| interrupted (by the cancel) | {by_status.get('interrupted', 0)} |",
                  f"| cancelled (never ran) | {by_status.get('cancelled', 0)} |"]
    lines += [
        f"| attempt of this flow run | {facts.attempt} |",
        f"| wall time (this attempt) | {facts.wall_s:.1f} s |",
        f"| generations per minute (this attempt) | {per_minute:.1f} |",
        f"| files written (this attempt) | {files_written} |",
        f"| output directory | `{facts.output_dir}` |",
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
    if facts.fatal_error:
        lines += ["", "## The run could not proceed", "", facts.fatal_error]
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            lines.append(
                f"- description {r['index']} variant {r['variant']} "
                f"(prompt_id `{r['prompt_id']}`): {r['error']}"
            )
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
                f"description {index} variant {variant} to {to}" for index, variant, _, to in away))
    return lines


def write_report(specs: list[GenerationSpec], outcomes: dict[int, Outcome], facts: RunFacts,
                 reused: frozenset[int] = frozenset()) -> list[dict]:
    """Create the table and summary artifacts for a flow run; return the table rows.

    ``reused``: positions whose results came from an earlier attempt (see :func:`table_rows`).
    Must be called inside a flow run (the artifacts attach to it).
    """
    rows = table_rows(specs, outcomes, reused)
    facts.moved = [(o.index, o.variant, o.moved_from, o.server) for o in outcomes.values()
                   if isinstance(o, GenerationResult) and o.moved_from]
    create_table_artifact(
        table=rows,
        key=artifact_key(facts.character, facts.kind, "generations"),
        description=f"Every {facts.kind} generation for {facts.character}: status, durations (s), files, errors.",
    )
    create_markdown_artifact(
        markdown=summary_markdown(rows, facts, sum(
            len(o.files) for p, o in outcomes.items() if isinstance(o, GenerationResult) and p not in reused)),
        key=artifact_key(facts.character, facts.kind, "summary"),
        description=f"Summary of the {facts.kind} generations for {facts.character}.",
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
            description=f"{kind} generations finished for {character} (of {total}).",
        )

    def advance(self) -> None:
        """One more generation finished (whatever its outcome)."""
        self.done += 1
        update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)
