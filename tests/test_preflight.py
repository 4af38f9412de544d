"""Preflight (issue 9 item 4): before the first ``POST /prompt`` the rendered workflow is checked
against each server's ``/object_info``; a server that cannot run it is left out, and with none left
the run stops, every problem listed. After the run started, a 400 that every generation would meet
stops the remaining generations. All against the stand-in ComfyUI over real sockets."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from comfy_pipeline.blocks.errors import PromptValidationError, WorkflowNotRunnable
from comfy_pipeline.blocks.http_api import ComfyUIHTTP
from comfy_pipeline.blocks.preflight import PlanCheck, is_workflow_wide
from comfy_pipeline.blocks.server import ComfyUIServer, ComfyUIServerPool
from comfy_pipeline.blocks.workflow import ComfyUIWorkflow, problems_on_server
from comfy_pipeline.flows.generate_content import generate_content
from tests.conftest import EXAMPLES
from tests.standin import StandInComfyUI

pytestmark = [pytest.mark.usefixtures("prefect_api", "no_leaked_threads"), pytest.mark.timeout(60)]

SD15 = EXAMPLES / "sd15_txt2img.json"
SMOKE = str(EXAMPLES / "smoke_image.json")
SEED_32_BITS = {("KSampler", "seed"): {"max": 2**32 - 1}}  # a sampler node with 32-bit seeds


def run(server, tmp_path: Path, workflow, descriptions, **kwargs):
    return generate_content(server=server, workflow=workflow, descriptions=descriptions, character="pre",
                            output_dir=str(tmp_path / "out"), retry_delay_s=0, return_state=True, **kwargs)


def artifacts(state) -> dict:
    """The run's artifacts by the last part of their key (``summary``, ``generations``, ...)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return {a.key.rsplit("-", 1)[-1]: a for a in found}


def statuses(state) -> Counter:
    data = artifacts(state)["generations"].data
    return Counter(row["status"] for row in (json.loads(data) if isinstance(data, str) else data))


def sd15(tmp_path: Path, *, ckpt: str = "v1-5-pruned-emaonly.safetensors", upscaler: bool = False) -> str:
    """``sd15_txt2img.json`` with another checkpoint, and optionally a FancyUpscaler node (a type no
    server has: a custom node not installed) between the VAE decode and the Save node."""
    workflow = json.loads(SD15.read_text())
    workflow["4"]["inputs"]["ckpt_name"] = ckpt
    if upscaler:
        workflow["10"] = {"class_type": "FancyUpscaler", "inputs": {"image": ["8", 0], "scale_by": 2}}
        workflow["9"]["inputs"]["images"] = ["10", 0]
    path = tmp_path / "sd15_variant.json"
    path.write_text(json.dumps(workflow))
    return str(path)


def test_a_workflow_the_server_cannot_run_stops_before_any_post_with_every_problem_listed(comfy, tmp_path):
    comfy.input_limits.update(SEED_32_BITS)
    # seeds 2**32 - 2, 2**32 - 1 (fine), 2**32, 2**32 + 1 (too large): the first generation's are fine
    state = run(ComfyUIServer(url=comfy.url), tmp_path,
                sd15(tmp_path, ckpt="not-downloaded.safetensors", upscaler=True), ["a fox", "an owl"],
                variants=2, seed_mode="increment", base_seed=2**32 - 2)
    assert state.is_failed()
    assert comfy.requests[("POST", "/prompt")] == 0 and not comfy.posts_per_prompt_id
    assert comfy.requests[("GET", "/object_info")] == 1  # fetched once for the run
    with pytest.raises(WorkflowNotRunnable) as caught:
        state.result()
    message = str(caught.value)
    assert state.message == message
    problems = [
        "node 10 (FancyUpscaler): the server has no node type FancyUpscaler: the custom node that provides "
        "it is not installed there",
        "node 4 (CheckpointLoaderSimple) input 'ckpt_name': 'not-downloaded.safetensors' is not one of the "
        "server's choices (it offers 'tiny-random-sd15.safetensors', 'v1-5-pruned-emaonly.safetensors')",
        "node 3 (KSampler) input 'seed': 4294967296 is above the server's maximum (it accepts 0 to 4294967295) "
        "(for description 2 variant 1, and 1 more generation(s))",
    ]
    assert message.startswith(f"The workflow {tmp_path / 'sd15_variant.json'} cannot run on {comfy.url}; "
                              "nothing was sent:")
    assert all(f"\n  - {problem}" in message for problem in problems), message
    assert "Install what is missing on the server" in message
    summary = artifacts(state)["summary"].data
    assert "could not proceed" in summary and all(problem in summary for problem in problems)
    assert statuses(state) == {"not run": 4}


def test_a_constant_parameter_out_of_range_stops_the_run_before_any_post(comfy, tmp_path):
    workflow = ComfyUIWorkflow.from_dict({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
              "_meta": {"title": "Empty"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "v/x"}},
        "comfy_pipeline": {"bindings": {"width": "Empty.inputs.width",
                                        "prompt": {"path": "2.inputs.filename_prefix", "format": "v/{slug}"}}},
    })
    state = run(ComfyUIServer(url=comfy.url), tmp_path, workflow, ["one", "two"], params={"width": 0})
    assert state.is_failed() and comfy.requests[("POST", "/prompt")] == 0
    assert "node 1 (EmptyImage) input 'width': 0 is below the server's minimum (it accepts 1 to 16384)" in state.message


def test_a_server_without_a_node_type_is_left_out_and_the_other_runs_everything(tmp_path):
    with StandInComfyUI() as a, StandInComfyUI() as b:
        b.hidden_node_classes.add("EmptyImage")  # the smoke workflow's first node
        pool = ComfyUIServerPool.of([ComfyUIServer(url=b.url), ComfyUIServer(url=a.url)])
        state = run(pool, tmp_path, SMOKE, ["a fox", "an owl", "a cat"], variants=2)
        assert state.is_completed(), state.message
        assert {r.server for r in state.result()} == {a.url} and len(state.result()) == 6
        assert b.requests[("POST", "/prompt")] == 0 and b.ws_open_now == 0  # closed when it was left out
        assert a.requests[("GET", "/object_info")] == b.requests[("GET", "/object_info")] == 1
        summary = artifacts(state)["summary"].data
        assert (f"Server {b.url} was left out: the workflow cannot run there: node 1 (EmptyImage): the server "
                "has no node type EmptyImage: the custom node that provides it is not installed there") in summary


def test_when_no_server_of_the_pool_can_run_it_each_ones_problems_are_listed(tmp_path):
    with StandInComfyUI() as a, StandInComfyUI() as b:
        a.hidden_node_classes.add("SaveImage")
        b.hidden_node_classes.add("EmptyImage")
        pool = ComfyUIServerPool.of([ComfyUIServer(url=a.url), ComfyUIServer(url=b.url)])
        state = run(pool, tmp_path, SMOKE, ["a fox"])
        assert state.is_failed()
        assert a.requests[("POST", "/prompt")] == b.requests[("POST", "/prompt")] == 0
        assert state.message.startswith(f"The workflow {SMOKE} cannot run on any server of the pool; nothing was sent:")
        assert f"\n  - {a.url}:\n    - node 2 (SaveImage): the server has no node type SaveImage" in state.message
        assert f"\n  - {b.url}:\n    - node 1 (EmptyImage): the server has no node type EmptyImage" in state.message


def test_a_400_every_generation_would_meet_stops_the_remaining_generations(comfy, tmp_path):
    comfy.execution_time_s = 0.3
    workflow = sd15(tmp_path)

    def remove_the_checkpoint_once_running():  # after the preflight: the server changed mid-run
        while not comfy.executions:
            time.sleep(0.01)
        comfy.checkpoints = ["another-model.safetensors"]

    threading.Thread(target=remove_the_checkpoint_once_running, daemon=True).start()
    state = run(ComfyUIServer(url=comfy.url), tmp_path, workflow, [f"scene {i}" for i in range(10)], retries=0)
    assert state.is_failed()
    counts = statuses(state)
    # the prompts already on the server (max_in_flight 2) ran; the next POST met the 400 (one more may
    # have been on its way); every other generation was never sent
    assert 1 <= counts["completed"] <= 2 and 1 <= counts["failed"] <= 2 and counts["not run"] >= 6, counts
    assert sum(counts.values()) == 10
    assert comfy.requests[("POST", "/prompt")] == counts["completed"] + counts["failed"]
    assert state.message.startswith(f"{counts['failed']} of 10 generations failed and {counts['not run']} were "
                                    "not run: ComfyUI refused the workflow itself for description ")
    assert state.message.endswith("with an error every generation would meet (see that generation's error); fix "
                                  "the workflow or its parameters and run again")
    summary = artifacts(state)["summary"].data
    assert f"{counts['not run']} generation(s) were not run: ComfyUI refused the workflow itself" in summary
    assert "input 'ckpt_name': Value not in list" in summary  # the failed generation's own error


def test_a_400_caused_by_one_generations_value_fails_that_generation_alone(comfy, tmp_path):
    workflow = ComfyUIWorkflow.from_dict({
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "v/x"}},
        "comfy_pipeline": {"bindings": {"prompt": "1.inputs.image"}},
    })
    # an annotated name is validated by LoadImage itself (the preflight lets it through): a 400 at POST
    state = run(ComfyUIServer(url=comfy.url), tmp_path, workflow, ["example.png", "missing.png [output]", "example.png"])
    assert state.is_failed() and state.message == "1 of 3 generations failed"
    counts = statuses(state)
    assert counts["failed"] == 1 and counts["completed"] + counts["cached"] == 2, counts  # the third: cached
    assert comfy.requests[("POST", "/prompt")] == 3


def test_is_workflow_wide_tells_the_workflow_from_one_generations_values(comfy):
    """Real 400 answers of the stand-in: a checkpoint (not bound) or a node type is the workflow's;
    a seed (bound: it changes with every generation) is one generation's."""
    workflow = ComfyUIWorkflow.from_file(SD15)
    http = ComfyUIHTTP(comfy.url)

    def refusal(inputs=None) -> PromptValidationError:
        prompt = workflow.render({"prompt": "a fox", "seed": 1, "character_slug": "c", "index": 0, "variant": 0,
                                  "slug": "a-fox"})
        for (node_id, name), value in (inputs or {}).items():
            prompt[node_id]["inputs"][name] = value
        with pytest.raises(PromptValidationError) as caught:
            http.post_prompt({"prompt": prompt})
        return caught.value

    try:
        assert is_workflow_wide(refusal({("4", "ckpt_name"): "gone.safetensors"}), workflow)
        assert not is_workflow_wide(refusal({("3", "seed"): -5}), workflow)
        assert is_workflow_wide(refusal({("3", "seed"): -5, ("4", "ckpt_name"): "gone.safetensors"}), workflow)
        comfy.hidden_node_classes.add("VAEDecode")
        assert is_workflow_wide(refusal(), workflow)  # "node VAEDecode does not exist"
    finally:
        http.close()


def test_the_preflight_checks_every_generations_seed_of_a_large_run_cheaply(comfy):
    comfy.input_limits.update(SEED_32_BITS)
    http = ComfyUIHTTP(comfy.url)
    try:
        object_info = http.object_info()
    finally:
        http.close()
    workflow = ComfyUIWorkflow.from_file(SD15)
    base = 2**32 - 5000  # the last 5000 of 10,000 seeds are too large
    params = [{"prompt": f"scene {i}", "slug": f"scene-{i}", "seed": base + i * 100 + v, "character_slug": "c",
               "index": i, "variant": v} for i in range(100) for v in range(100)]
    began = time.monotonic()
    problems = PlanCheck(workflow, params).problems(object_info)
    assert time.monotonic() - began < 3.0
    assert problems == ["node 3 (KSampler) input 'seed': 4294967296 is above the server's maximum (it accepts 0 "
                        "to 4294967295) (for description 51 variant 1, and 4999 more generation(s))"]


def test_check_finds_required_inputs_and_numbers_in_the_template_or_a_rendered_prompt(comfy):
    """``problems_on_server`` (what ``comfy-pipeline check`` uses): a template's bound inputs are
    placeholders and left out; a rendered prompt is checked whole."""
    http = ComfyUIHTTP(comfy.url)
    try:
        object_info = http.object_info()
    finally:
        http.close()
    workflow = ComfyUIWorkflow.from_file(SD15)
    del workflow.prompt["3"]["inputs"]["cfg"]
    workflow.prompt["3"]["inputs"]["seed"] = -1  # bound: the run writes each generation's seed here
    workflow.prompt["5"]["inputs"]["width"] = 0
    problems = [
        "node 5 (EmptyLatentImage) input 'width': 0 is below the server's minimum (it accepts 16 to 16384)",
        "node 3 (KSampler) input 'cfg': missing; the server's KSampler requires it (FLOAT)",
    ]
    assert problems_on_server(workflow, object_info) == problems
    rendered = problems_on_server(workflow, object_info, {"prompt": "a fox", "seed": -3, "character_slug": "c",
                                                          "index": 0, "variant": 0, "slug": "a-fox"})
    assert rendered == problems + [
        "node 3 (KSampler) input 'seed': -3 is below the server's minimum (it accepts 0 to 18446744073709551615)"]
