"""Sharded runs (flows/shards.py): one parent flow run, a child per shard of ``shard_size``
descriptions, one combined report.

Without a deployment the shards run as subflows in the test process (Prefect's local API, the
stand-in over real sockets, files on disk). Through a deployment they are flow runs a real
``prefect worker`` takes (the e2e test, with tests/test_e2e_deployment.py's stack: its own Prefect
server, work pool, blocks, deployments and worker). The waiting, retrying and cancelling of
deployment children is also checked on its own against the API.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from types import SimpleNamespace

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                            FlowRunFilterParentFlowRunId)
from prefect.states import Completed, Failed, Running, Scheduled

from comfy_pipeline.blocks.server import ComfyUIServer
from comfy_pipeline.flows import shards as sharding
from comfy_pipeline.flows.generate_content import generate_content
from comfy_pipeline.flows.shards import (ParentCancelled, Shard, ShardsCannotStart, cancel_flow_runs,
                                         child_parameters, failed_message, plan_shards, retry_flow_run,
                                         shard_summary_markdown, wait_for_flow_runs)
from tests.conftest import EXAMPLES
# The e2e stack of tests/test_e2e_deployment.py (module-scoped: started here only when the e2e test runs).
from tests.test_e2e_deployment import api_key, comfy_e2e, deployed  # noqa: F401

SMOKE_IMAGE = str(EXAMPLES / "smoke_image.json")
# The description goes verbatim into CLIPTextEncode text here, so the stand-in's markers work.
SD15 = str(EXAMPLES / "sd15_txt2img.json")
SEVEN = ["a red fox", "a blue bird", "a green frog", "a gold fish", "a white owl", "a grey wolf", "a black cat"]


# -- planning (no API) ------------------------------------------------------------------------


def test_seven_descriptions_in_shards_of_three_and_the_children_parameters():
    shards = plan_shards(7, 3)
    assert [(s.number, s.spec, s.label) for s in shards] == [
        (1, "0:3", "descriptions 1-3"), (2, "3:6", "descriptions 4-6"), (3, "6:7", "description 7")]
    parent = {"descriptions": SEVEN, "shard_size": 3, "shard": "", "variants": 2,
              "server": {"$ref": {"block_document_id": "x"}}}
    child = child_parameters(parent, shards[1], count=7)
    assert child == {"descriptions": SEVEN[3:6], "shard_size": 0, "shard": "3:6", "variants": 2,
                     "server": {"$ref": {"block_document_id": "x"}}}
    assert parent["shard_size"] == 3 and parent["descriptions"] == SEVEN  # not modified
    # a reference travels unchanged: the child reads the file and slices it
    by_reference = child_parameters(dict(parent, descriptions="file:///data/shots.jsonl"), shards[2], count=7)
    assert by_reference["descriptions"] == "file:///data/shots.jsonl" and by_reference["shard"] == "6:7"
    with pytest.raises(ValueError):
        child_parameters(parent, shards[0], count=8)
    with pytest.raises(ValueError):
        plan_shards(7, 0)


def test_the_combined_summary_counts_shards_without_a_report_and_big_tables():
    ok = {"status": "completed", "server": "http://gpu-1", "execution_s": 2.0, "files": "/o/a.png", "variant": 1}
    first = Shard(1, 0, 3, state=Completed(), reported=True, run_count=1,
                  rows=[dict(ok, description=f"{n}: d") for n in (1, 2, 3)])
    # a big shard's table keeps its failure and only the last success: it still counts 2 successes
    second = Shard(2, 3, 6, state=Failed(message="1 of 3 generations failed"), reported=True, run_count=2,
                   table_note="2 of 3 image generations for c: ...",
                   rows=[{"status": "failed", "description": "5: bad", "variant": 1, "prompt_id": "p5",
                          "error": "NodeExecutionError: boom", "server": "", "execution_s": None, "files": ""},
                         dict(ok, description="6: d", server="http://gpu-2")])
    third = Shard(3, 6, 7, state=Failed(message="WorkflowError: nope"))  # no table at all
    shards = [first, second, third]
    assert failed_message(shards, 1) == (
        "2 of 7 generations failed in 2 of 3 shards: shard 2 (descriptions 4-6), shard 3 (description 7)")
    text = shard_summary_markdown(shards, character="c", kind="image", per_description=1, shard_size=3,
                                  output_dir="/o", wall_s=6.0)
    assert "**5 of 7 generations succeeded**, 2 did not (1 failed, 1 in shards without a report)" in text
    assert "- description 5, variant 1 (shard 2, prompt_id `p5`): NodeExecutionError: boom" in text
    assert "- shard 3 (description 7) has no report: Failed: WorkflowError: nope" in text
    assert "| 2 | 4-6 | Failed | 2 of 3 | 2 |" in text
    assert "| http://gpu-1 | 3 | 6.0 |" in text and "| http://gpu-2 | 1 | 2.0 |" in text
    assert text.index("## Failures") < text.index("## Shards") < text.index("## Totals") < text.index("## Servers")


def test_a_concurrency_limit_of_one_is_refused_before_any_child_starts():
    deployment = SimpleNamespace(name="manual", global_concurrency_limit=SimpleNamespace(limit=1))
    with pytest.raises(ShardsCannotStart, match="concurrency limit 1"):
        sharding._check_room_for_shards(None, deployment, SimpleNamespace(work_pool_name=None))


# -- subflows: a run without a deployment ---------------------------------------------------------


def _children(parent_id) -> list:
    """The parent's child flow runs (linked through its task runs), in shard order."""
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
    return sorted(children, key=lambda c: int(c.parameters["shard"].split(":")[0]))


def _artifacts(flow_run_id) -> dict:
    """The flow run's newest artifact of each kind (generations, summary, progress...)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    newest = {}
    for artifact in sorted(found, key=lambda a: a.created):
        newest[artifact.key.rsplit("-", 1)[-1]] = artifact
    return newest


def _table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def _number(row: dict) -> int:
    return int(row["description"].split(":", 1)[0])


@pytest.mark.usefixtures("prefect_api", "no_leaked_threads")
def test_seven_descriptions_run_as_three_subflows_with_one_combined_report(comfy, tmp_path):
    out = tmp_path / "out"
    state = generate_content(server=ComfyUIServer(url=comfy.url), workflow=SMOKE_IMAGE, descriptions=SEVEN,
                             shard_size=3, output_dir=str(out), return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    assert [r.index for r in results] == list(range(7))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [f"smoke/character_d{d}_0.png" for d in range(7)], files
    assert comfy.requests[("POST", "/prompt")] == 7

    parent_id = state.state_details.flow_run_id
    children = _children(parent_id)
    assert [c.parameters["shard"] for c in children] == ["0:3", "3:6", "6:7"]
    assert all(c.state.is_completed() and c.parameters["shard_size"] == 0 for c in children)
    assert [c.parameters["descriptions"] for c in children] == [SEVEN[0:3], SEVEN[3:6], SEVEN[6:7]]
    # each child's own report keeps the parent's numbering
    assert [_number(r) for r in _table(_artifacts(children[1].id)["generations"])] == [4, 5, 6]

    report = _artifacts(parent_id)
    summary = report["summary"].data
    assert "**7 of 7 generations succeeded**" in summary and "3 of 3 shards completed" in summary
    for child in children:
        assert str(child.id) in summary or child.name in summary  # a link to each child run
    rows = _table(report["generations"])
    assert [(_number(r), r["shard"], r["status"]) for r in rows] == [
        (n, (n - 1) // 3 + 1, "completed") for n in range(1, 8)]
    assert f"| {comfy.url} | 7 |" in summary


@pytest.mark.usefixtures("prefect_api", "no_leaked_threads")
def test_a_failing_description_fails_the_parent_naming_its_shard_after_one_retry(comfy, tmp_path):
    descriptions = list(SEVEN)
    descriptions[4] = "a white owl [[fail]]"  # description 5: shard 2
    out = tmp_path / "out"
    state = generate_content(server=ComfyUIServer(url=comfy.url), workflow=SD15, descriptions=descriptions,
                             shard_size=3, retries=0, output_dir=str(out), return_state=True)
    assert state.is_failed()
    assert state.message == "1 of 7 generations failed in 1 of 3 shards: shard 2 (descriptions 4-6)"
    assert len(list(out.rglob("*.png"))) == 6
    # shard 2 ran twice in the same flow run; its retry sent only the failed generation again
    children = _children(state.state_details.flow_run_id)
    assert [c.run_count for c in children] == [1, 2, 1]
    assert [c.state.type.value for c in children] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert comfy.requests[("POST", "/prompt")] == 8
    summary = _artifacts(state.state_details.flow_run_id)["summary"].data
    assert "**6 of 7 generations succeeded**, 1 did not (1 failed)" in summary
    assert re.search(r"- description 5, variant 1 \(shard 2, prompt_id `[0-9a-f-]+`\): NodeExecutionError", summary)
    assert "| 2 | 4-6 | Failed | 2 of 3 | 2 |" in summary


@pytest.mark.usefixtures("prefect_api", "no_leaked_threads")
def test_a_descriptions_file_reaches_every_shard_as_the_same_reference(comfy, tmp_path):
    shots = tmp_path / "shots.txt"
    shots.write_text("".join(d + "\n" for d in SEVEN[:5]))
    out = tmp_path / "out"
    state = generate_content(server=ComfyUIServer(url=comfy.url), workflow=SMOKE_IMAGE, descriptions=str(shots),
                             shard_size=2, output_dir=str(out), return_state=True)
    assert state.is_completed(), state.message
    children = _children(state.state_details.flow_run_id)
    assert [(c.parameters["descriptions"], c.parameters["shard"]) for c in children] == [
        (str(shots), "0:2"), (str(shots), "2:4"), (str(shots), "4:5")]
    assert sorted(p.name for p in out.rglob("*.png")) == [f"character_d{d}_0.png" for d in range(5)]


# -- deployment children: waiting, retrying, cancelling (the API alone) ---------------------------


@flow(name="shards-test-child")
def _placeholder():  # never run: its flow runs are created and moved through states by the test
    pass


@pytest.mark.usefixtures("prefect_api")
def test_a_cancelled_parent_cancels_its_waiting_children_and_a_failed_child_is_retried_as_awaiting_retry():
    with get_client(sync_client=True) as client:
        parent, scheduled, running, failed = (client.create_flow_run(_placeholder, state=Scheduled())
                                               for _ in range(4))
        client.set_flow_run_state(parent.id, Running(), force=True)
        client.set_flow_run_state(running.id, Running(), force=True)
        client.set_flow_run_state(failed.id, Failed(message="boom"), force=True)

        # a failed child is retried in the same flow run, as the UI's Retry does
        state = retry_flow_run(client, failed.id)
        assert (state.type.value, state.name) == ("SCHEDULED", "AwaitingRetry")
        assert client.read_flow_run(failed.id).state.name == "AwaitingRetry"

        # the children end: the wait returns each once it is final, and calls back for each
        ended = []
        client.set_flow_run_state(failed.id, Completed(), force=True)
        seen = wait_for_flow_runs(client, [failed.id], parent_id=parent.id, poll_s=0.05, on_final=ended.append)
        assert seen[failed.id].state.is_completed() and [r.id for r in ended] == [failed.id]

        # the parent is cancelled while it waits: the children that have not ended are cancelled
        client.set_flow_run_state(parent.id, sharding.State(type=sharding.StateType.CANCELLING), force=True)
        began = time.monotonic()
        with pytest.raises(ParentCancelled):
            wait_for_flow_runs(client, [scheduled.id, running.id], parent_id=parent.id, poll_s=0.05)
        assert time.monotonic() - began < 5
        assert client.read_flow_run(scheduled.id).state.is_cancelled()  # no infrastructure: Cancelled at once
        assert client.read_flow_run(running.id).state.is_cancelling()  # its worker stops it
        # cancelling what has ended already changes nothing
        assert cancel_flow_runs(client, [failed.id]) == []
        assert client.read_flow_run(failed.id).state.is_completed()


# -- through a real worker (e2e) -----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_sharded_manual_run_on_a_worker_gives_three_child_runs_one_report_every_file(deployed, comfy_e2e, tmp_path):
    """``generate-content/manual`` with 7 descriptions and ``shard_size=3`` through the worker:
    3 child flow runs of the deployment, linked to the parent; the shard whose description is
    ``[[flaky]]`` (it fails the first time the stand-in runs it) fails, is retried once in the
    same flow run (its completed generations reused), then completes; one combined report; every file."""
    stack = deployed
    output_dir = tmp_path / "output"
    descriptions = list(SEVEN)
    descriptions[3] = f"a gold fish [[flaky]] {uuid.uuid4().hex[:8]}"  # description 4: shard 2
    comfy_e2e.reset_counters()
    with stack.client() as client:
        sd15 = client.read_block_document_by_name("sd15-txt2img", "comfyui-workflow", include_secrets=False)
    parent_id = stack.run_manual({"descriptions": descriptions, "shard_size": 3, "retries": 0,
                                  "workflow": {"$ref": {"block_document_id": str(sd15.id)}},
                                  "output_dir": str(output_dir)})
    parent = stack.wait_for_state(parent_id, timeout=180)
    assert parent.state.is_completed(), f"{parent.state!r}\n{stack.diagnostics()}"

    files = sorted(p.name for p in output_dir.rglob("*.png"))
    assert len(files) == 7 and [int(re.search(r"_d(\d+)_", f).group(1)) for f in files] == list(range(7)), files

    children = _children(uuid.UUID(parent_id))
    assert [c.parameters["shard"] for c in children] == ["0:3", "3:6", "6:7"], [c.name for c in children]
    assert all(c.deployment_id == parent.deployment_id and c.state.is_completed() for c in children)
    assert [c.run_count for c in children] == [1, 2, 1]  # shard 2 retried once, in the same flow run
    # the API's parameters: saved blocks stay references, the descriptions are the shard's slice
    assert all(c.parameters["server"] == parent.parameters["server"] for c in children)
    assert [c.parameters["descriptions"] for c in children] == [descriptions[0:3], descriptions[3:6],
                                                                descriptions[6:7]]
    # the retry sent only the flaky generation again: 7 generations, 8 prompts
    assert comfy_e2e.requests[("POST", "/prompt")] == 8

    artifacts = {a.key: a for a in sorted(stack.artifacts_of(parent_id), key=lambda a: a.created)}
    summary = artifacts["character-image-summary"].data
    print(f"\n[e2e] combined summary of the sharded run:\n{summary}")
    assert "**7 of 7 generations succeeded**" in summary and "3 of 3 shards completed" in summary, summary
    assert "| 2 | 4-6 | Completed | 3 of 3 | 2 |" in summary, summary
    assert all(str(c.id) in summary for c in children), summary  # links to each child run
    rows = _table(artifacts["character-image-generations"])
    assert sorted(_number(r) for r in rows) == list(range(1, 8))
    # the only traceback: Prefect's own, when shard 2's first attempt ended Failed on the worker
    worker_output = stack.log_of("prefect-worker").read_text(errors="replace")
    assert worker_output.count("Traceback") == worker_output.count("FailedRun: 1 of 3 generations failed") == 1, \
        worker_output[-5000:]
