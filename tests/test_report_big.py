"""The report of a big run: the table artifact keeps the generations that did not succeed and the
last TABLE_ROWS that did; every row goes to a CSV file in the output directory, linked from the summary.

Pure functions on specs, results and Stopped outcomes built here; one test writes the report in a
real flow run (Prefect's test API) and reads the artifacts back.
"""

from __future__ import annotations

import csv
import json

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from comfy_pipeline.tasks import report
from comfy_pipeline.tasks.models import GenerationResult, GenerationSpec, OutputFile
from comfy_pipeline.tasks.report import (
    TABLE_ROWS,
    RunFacts,
    Stopped,
    error_texts,
    summary_markdown,
    table_rows,
    table_shown,
    write_table_csv,
)

SERVER = "http://gpu-1:8188"
#: A whole error: longer than the table's cut and on several lines.
LONG_ERROR = "the sampler ran out of memory\n" + "detail " * 60 + "\nlast line of the error"


def _plan(count: int, variants: int = 4) -> list[GenerationSpec]:
    return [GenerationSpec(index=p // variants, variant=p % variants,
                           description=f"scene {p // variants}, " + "a long description " * 5,
                           seed=p, prompt_id=f"p{p}", position=p + 1, total=count) for p in range(count)]


def _result(spec: GenerationSpec) -> GenerationResult:
    name = f"c_{spec.position}_00001_.png"
    file = OutputFile(path=f"/out/c/{name}", bytes=1, node_id="9", key="images", server_filename=name,
                      subfolder="c", type="output")
    return GenerationResult(kind="image", character="alice", index=spec.index, variant=spec.variant,
                            description=spec.description, prompt_id=spec.prompt_id, server=SERVER, seed=spec.seed,
                            status="completed", cached=False, files=[file], queued_s=0.1, execution_s=1.0,
                            download_s=0.1, total_s=1.2)


def _outcomes(specs: list[GenerationSpec], failed: set[int] = frozenset(), stopped: dict[int, Stopped] = None,
              missing: set[int] = frozenset()) -> dict:
    """Every generation completed, except the positions ``failed`` (RuntimeError(LONG_ERROR)),
    ``stopped`` (their Stopped) and ``missing`` (no outcome: ``not run``)."""
    stopped = stopped or {}
    outcomes: dict = {}
    for spec in specs:
        if spec.position in failed:
            outcomes[spec.position] = RuntimeError(LONG_ERROR)
        elif spec.position in stopped:
            outcomes[spec.position] = stopped[spec.position]
        elif spec.position not in missing:
            outcomes[spec.position] = _result(spec)
    return outcomes


def _facts(output_dir, **kw) -> RunFacts:
    return RunFacts(character="alice", kind="image", server_url=SERVER, output_dir=str(output_dir), wall_s=60.0, **kw)


def _capture(monkeypatch) -> dict[str, dict]:
    """The artifacts write_report creates, by key (no flow run needed)."""
    made: dict[str, dict] = {}
    monkeypatch.setattr(report, "create_table_artifact", lambda **kw: made.__setitem__(kw["key"], kw))
    monkeypatch.setattr(report, "create_markdown_artifact", lambda **kw: made.__setitem__(kw["key"], kw))
    return made


def _read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


SPECS = _plan(2000)
FAILED = {7, 1000, 1999}
OUTCOMES = _outcomes(SPECS, failed=FAILED)


# ------------------------------------------------------------------------------------------
# Which rows the table shows
# ------------------------------------------------------------------------------------------


def test_a_big_table_keeps_the_failures_and_the_last_rows_in_plan_order():
    rows = table_rows(SPECS, OUTCOMES)
    shown = table_shown(rows)
    assert len(shown) == 3 + TABLE_ROWS == 503
    positions = [int(r["prompt_id"][1:]) + 1 for r in shown]
    assert positions == sorted(positions)  # plan order
    assert [p for p, r in zip(positions, shown) if r["status"] == "failed"] == [7, 1000, 1999]
    # the last 500 that succeeded: positions 1500 to 2000 but 1999, which failed
    assert [p for p, r in zip(positions, shown) if r["status"] == "completed"] == [
        p for p in range(1500, 2001) if p != 1999]
    assert all(r["error"].startswith("RuntimeError: the sampler ran out of memory detail") for r in shown
               if r["status"] == "failed")


def test_every_status_that_is_not_a_success_is_kept():
    specs = _plan(TABLE_ROWS + 20)
    stopped = {3: Stopped("skipped", "its image failed"), 4: Stopped("interrupted", "the run was cancelled"),
               5: Stopped("cancelled", "the run was cancelled"), 6: Stopped("not run", "refused")}
    outcomes = _outcomes(specs, failed={2}, stopped=stopped, missing={8})
    rows = table_rows(specs, outcomes, reused=frozenset({len(specs)}))
    shown = table_shown(rows)
    assert [r["status"] for r in shown[:6]] == ["failed", "skipped", "interrupted", "cancelled", "not run",
                                               "not run"]
    # 513 succeeded (one reused, the last one): the last 500 of them follow
    assert len(shown) == 6 + TABLE_ROWS and shown[-1]["status"] == "reused"
    assert {r["status"] for r in shown[6:]} == {"completed", "reused"}


def test_a_stopped_run_keeps_at_most_table_rows_that_did_not_succeed_failures_first(monkeypatch, tmp_path):
    """A run of 3,000 stopped after 40: 2,955 cancelled rows, 5 failed ones among them. The table
    shows the 5 failures, 495 cancelled ones and the 40 that succeeded, in plan order; the CSV has
    every row; the summary and the table's description say what was left out."""
    specs = _plan(3000)
    failed = {41, 900, 1500, 2000, 2999}
    stopped = {p: Stopped("cancelled", "the run was terminated") for p in range(41, 3001) if p not in failed}
    outcomes = _outcomes(specs, failed=failed, stopped=stopped)
    rows = table_rows(specs, outcomes)
    shown = table_shown(rows)
    assert len(shown) == 40 + TABLE_ROWS
    positions = [int(r["prompt_id"][1:]) + 1 for r in shown]
    assert positions == sorted(positions)  # plan order
    assert [p for p, r in zip(positions, shown) if r["status"] == "failed"] == sorted(failed)
    cancelled = [p for p, r in zip(positions, shown) if r["status"] == "cancelled"]
    assert cancelled == [p for p in range(42, 3001) if p not in failed][:TABLE_ROWS - 5]
    assert [r["status"] for r in shown[:40]] == ["completed"] * 40

    made = _capture(monkeypatch)
    assert report.write_report(specs, outcomes, _facts(tmp_path)) == rows
    assert made["alice-image-generations"]["table"] == shown
    assert "540 of 3,000 image generations for alice: 500 of the 2,960 that did not succeed (failures first) " \
           "and the 40 that did" in made["alice-image-generations"]["description"]
    summary = made["alice-image-summary"]["markdown"]
    assert "| generations table | 540 of 3,000 rows: 500 of the 2,960 that did not succeed (failures first) " \
           "and the 40 that did |" in summary
    (path,) = (tmp_path / "reports").iterdir()
    assert len(_read_csv(path)) == 3000


def test_the_table_text_says_what_was_left_out_and_nothing_else():
    specs = _plan(1200)
    none_succeeded = table_rows(specs, _outcomes(specs, failed=set(range(1, 1201))))
    assert report.table_shown_text(none_succeeded, table_shown(none_succeeded)) == \
        "500 of the 1,200 that did not succeed (failures first); none succeeded"
    few_succeeded = table_rows(specs, _outcomes(specs, failed=set(range(21, 1201))))
    assert report.table_shown_text(few_succeeded, table_shown(few_succeeded)) == \
        "500 of the 1,180 that did not succeed (failures first) and the 20 that did"


def test_a_run_with_at_most_table_rows_successes_keeps_every_row():
    specs = _plan(TABLE_ROWS + 3)
    rows = table_rows(specs, _outcomes(specs, failed={1, 2, 3}))
    assert table_shown(rows) is rows
    assert table_shown(rows, last=TABLE_ROWS - 1) != rows


# ------------------------------------------------------------------------------------------
# The CSV file
# ------------------------------------------------------------------------------------------


def test_the_csv_has_every_row_and_column_with_the_whole_error_and_description(tmp_path):
    rows = table_rows(SPECS, OUTCOMES)
    path = write_table_csv(str(tmp_path / "reports" / "t.csv"), SPECS, rows, error_texts(SPECS, OUTCOMES))
    assert path == str(tmp_path / "reports" / "t.csv")
    written = _read_csv(path)
    assert len(written) == 2000 and list(written[0]) == list(rows[0])
    assert [r["prompt_id"] for r in written] == [s.prompt_id for s in SPECS]
    failures = [r for r in written if r["status"] == "failed"]
    assert [r["prompt_id"] for r in failures] == ["p6", "p999", "p1998"]
    assert all(r["error"] == f"RuntimeError: {LONG_ERROR}" for r in failures)  # not the table's cut line
    assert written[5]["description"] == f"2: {SPECS[5].description}"  # not trimmed either
    assert written[0]["files"] == rows[0]["files"] and written[0]["execution_s"] == "1.0"
    assert written[0]["error"] == "" and written[6]["total_s"] == ""  # None is an empty cell


def test_the_csv_never_replaces_a_file_already_there(tmp_path):
    specs = _plan(3)
    outcomes = _outcomes(specs)
    rows = table_rows(specs, outcomes)
    target = tmp_path / "t.csv"
    target.write_text("another run's table\n")
    second = write_table_csv(str(target), specs, rows, error_texts(specs, outcomes))
    third = write_table_csv(str(target), specs, rows, error_texts(specs, outcomes))
    assert (second, third) == (str(tmp_path / "t-2.csv"), str(tmp_path / "t-3.csv"))
    assert target.read_text() == "another run's table\n" and len(_read_csv(second)) == 3


# ------------------------------------------------------------------------------------------
# write_report
# ------------------------------------------------------------------------------------------


def test_a_small_run_keeps_todays_table_and_writes_no_csv(monkeypatch, tmp_path):
    made = _capture(monkeypatch)
    specs = _plan(TABLE_ROWS + 3)
    outcomes = _outcomes(specs, failed={1, 2, 3})
    rows = report.write_report(specs, outcomes, _facts(tmp_path))
    table = made["alice-image-generations"]
    assert table["table"] == rows and len(rows) == TABLE_ROWS + 3
    assert table["description"] == "Every image generation for alice: status, durations (s), files, errors."
    summary = made["alice-image-summary"]["markdown"]
    assert "CSV" not in summary and "generations table" not in summary
    assert not (tmp_path / "reports").exists()
    # the summary is the one summary_markdown gives without the big run's arguments
    assert summary == summary_markdown(rows, _facts(tmp_path), len(rows) - 3, errors=error_texts(specs, outcomes))


def test_a_csv_that_cannot_be_written_is_one_warning_in_the_summary(monkeypatch, tmp_path):
    made = _capture(monkeypatch)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # the output "directory" is a file: reports/ cannot be made in it
    rows = report.write_report(SPECS, OUTCOMES, _facts(blocked))
    assert len(rows) == 2000 and len(made["alice-image-generations"]["table"]) == 503
    summary = made["alice-image-summary"]["markdown"]
    (warning,) = [line for line in summary.splitlines() if "warning" in line.lower()]
    assert warning.startswith(f"| every row (CSV) | **warning: not written**: could not write `{blocked}/reports/"
                              "alice-image-generations-")
    assert "NotADirectoryError" in warning or "FileExistsError" in warning
    assert "file://" not in summary
    assert "the CSV file of every row could not be written" in made["alice-image-generations"]["description"]
    assert "**2997 of 2000" not in summary and "**1997 of 2000 generations succeeded**, 3 failed." in summary


@pytest.mark.usefixtures("prefect_api")
def test_a_big_run_in_a_flow_run_has_a_short_table_and_the_csv_linked_from_the_summary(tmp_path):
    @flow(name="report-big")
    def write(output_dir: str):
        report.write_report(SPECS, OUTCOMES, _facts(output_dir))

    state = write(str(tmp_path / "out"), return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        flow_run = client.read_flow_run(flow_run_id)
    artifacts = {a.key: a for a in found}

    table = artifacts["alice-image-generations"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert len(rows) == 503 and [r["prompt_id"] for r in rows if r["status"] == "failed"] == ["p6", "p999", "p1998"]

    # the CSV: named after the table's key and this flow run, in the output directory's reports/
    (path,) = (tmp_path / "out" / "reports").iterdir()
    assert path.name == f"alice-image-generations-{flow_run.name}-{flow_run_id}.csv"
    written = _read_csv(path)
    assert len(written) == 2000
    assert [r["error"] for r in written if r["status"] == "failed"] == [f"RuntimeError: {LONG_ERROR}"] * 3

    assert table.description.startswith("503 of 2,000 image generations for alice: the 3 that did not succeed and "
                                        f"the last {TABLE_ROWS} that did, in plan order (every row is in `{path}`)")
    summary = artifacts["alice-image-summary"].data
    assert f"| every row (CSV) | `{path}` ([open]({path.as_uri()})) |" in summary
    assert f"| generations table | 503 of 2,000 rows: the 3 that did not succeed and the last {TABLE_ROWS} that did |" \
        in summary
    assert "**1997 of 2000 generations succeeded**, 3 failed." in summary
    gallery = artifacts["alice-image-gallery"].data
    assert gallery.rstrip().endswith(f"1800 more are in the CSV file `{path}`.")
