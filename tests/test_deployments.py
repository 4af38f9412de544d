"""prefect.yaml's deployments and the flow's typed parameters (the Prefect UI's run form)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from comfy_pipeline.blocks import ComfyUIServer, ComfyUIWorkflow
from comfy_pipeline.flows.generate_content import generate_content

ROOT = Path(__file__).resolve().parents[1]


def _choices(schema: dict, prop: dict) -> dict[str, dict]:
    """The UI form's choices of a union parameter: {title: resolved subschema}, as the UI's
    schema form labels them (a ``$ref`` is replaced by its definition)."""
    definitions = schema.get("definitions", {})
    resolved = [definitions[c["$ref"].rsplit("/", 1)[1]] if "$ref" in c else c for c in prop["anyOf"]]
    return {c.get("title") or c.get("type"): c for c in resolved}


def test_parameter_schema_gives_a_form_with_types():
    schema = generate_content.parameters.model_dump()
    props = schema["properties"]
    assert schema["required"] == ["server", "workflow", "descriptions"]
    # texts (a text box each), rows with input images, or the path / URL of a file the worker reads
    choices = props["descriptions"]["anyOf"]
    assert [c["title"] for c in choices] == ["Texts", "Rows with input images", "Descriptions file (path or URL)"]
    assert choices[0]["items"] == {"type": "string"} and choices[2]["type"] == "string"
    assert props["variants"]["type"] == "integer" and props["variants"]["minimum"] == 1
    assert props["kind"]["enum"] == ["image", "video", "image_to_video"]
    # image-to-video: the video workflow is a second workflow choice; rows carry their own images
    assert list(_choices(schema, props["video_workflow"])) == ["Saved workflow", "Workflow file"]
    assert props["video_workflow"]["default"] == "" and props["image_variants"]["default"] == 1
    assert props["inputs"]["additionalProperties"] == {"type": "string"}
    assert props["concurrency"]["default"] == 0 and props["max_in_flight"]["default"] == 0
    assert props["shard_size"]["default"] == 0
    row = schema["definitions"]["DescriptionRow"]
    assert row["required"] == ["description"] and row["additionalProperties"] == {"type": "string"}
    definitions = schema.get("definitions", {})
    assert definitions["SeedMode"]["enum"] == ["random", "fixed", "increment"]
    assert all(p.get("description") for p in props.values())


@pytest.mark.usefixtures("prefect_api")
def test_the_run_form_read_from_the_api_has_readable_choices_and_shows_defaults():
    """What the Prefect UI's run form is built from: the deployment's parameter schema and its
    default parameters, read back from the API."""
    from prefect.client.orchestration import get_client

    server_id = ComfyUIServer(url="http://gpu-1:8188", api_key="sk-form").save("form-gpu-1", overwrite=True)
    workflow_id = ComfyUIWorkflow.from_file(ROOT / "examples/workflows/smoke_image.json").save(
        "form-smoke-image", overwrite=True)
    defaults = {"server": {"$ref": {"block_document_id": str(server_id)}},
                "workflow": {"$ref": {"block_document_id": str(workflow_id)}}}
    deployment_id = generate_content.to_deployment("form", parameters=defaults).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    schema = deployment.parameter_openapi_schema
    props = schema["properties"]

    servers = _choices(schema, props["server"])
    assert list(servers) == ["ComfyUI Server", "ComfyUI Server Pool"]
    assert [c["block_type_slug"] for c in servers.values()] == ["comfyui-server", "comfyui-server-pool"]
    workflows = _choices(schema, props["workflow"])
    assert list(workflows) == ["Saved workflow", "Workflow file"]
    assert workflows["Saved workflow"]["block_type_slug"] == "comfyui-workflow"
    assert workflows["Workflow file"]["type"] == "string"

    # the saved blocks are the form's defaults: the UI selects a block by its block_document_id
    assert deployment.parameters["server"] == {"$ref": {"block_document_id": str(server_id)}}
    assert deployment.parameters["workflow"] == {"$ref": {"block_document_id": str(workflow_id)}}
    # optional parameters show a real default, never a "None" choice ("Property is type None")
    for name, default in [("base_seed", 0), ("params", {}), ("output_types", ["output"]),
                          ("variants", 1), ("seed_mode", "random"), ("retries", 2)]:
        assert props[name].get("default") == default, name
    for name, prop in props.items():
        assert {"type": "null"} not in prop.get("anyOf", []), f"{name} offers a None choice in the form"
    assert "sk-form" not in deployment.model_dump_json()


def _save_blocks_of_prefect_yaml() -> None:
    """The blocks prefect.yaml's deployments refer to, saved as the README says."""
    ComfyUIServer(url="http://gpu-1:8188").save("gpu-1", overwrite=True)
    for name, file in (("smoke-image", "smoke_image.json"), ("smoke-video", "smoke_video.json"),
                       ("sd15-txt2img", "sd15_txt2img.json")):
        ComfyUIWorkflow.from_file(ROOT / "examples" / "workflows" / file).save(name, overwrite=True)


@pytest.mark.usefixtures("prefect_api")
def test_every_deployment_in_prefect_yaml_loads_and_validates(tmp_path):
    _save_blocks_of_prefect_yaml()
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        assert flow.name == "generate-content"
        assert deployment["work_pool"]["name"]
        for schedule in deployment.get("schedules", []):
            assert len(schedule["cron"].split()) == 5
        params = dict(deployment["parameters"])
        params.setdefault("descriptions", ["filled in the UI form"])
        validated = flow.validate_parameters(params)
        assert isinstance(validated["server"], ComfyUIServer)
        assert validated["server"].url == "http://gpu-1:8188"
        assert isinstance(validated["workflow"], ComfyUIWorkflow)  # a saved block: no file on the worker


@pytest.mark.usefixtures("prefect_api")
def test_the_api_accepts_flow_runs_of_every_deployment_as_the_ui_form_sends_them():
    """Prefect's API validates a run's parameters against the deployment's schema (a UI run, a
    ``prefect deployment run``, a schedule): the ``$ref`` to the server block must pass."""
    from prefect.deployments import run_deployment

    _save_blocks_of_prefect_yaml()
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        name = f"check-{deployment['name']}"
        generate_content.to_deployment(name, parameters=deployment["parameters"]).apply()
        extra = {} if "descriptions" in deployment["parameters"] else {"descriptions": ["from the form"]}
        flow_run = run_deployment(f"generate-content/{name}", parameters=extra, timeout=0)
        assert flow_run.parameters["server"] == {"$ref": {"block_document_slug": "comfyui-server/gpu-1"}}


@pytest.mark.usefixtures("prefect_api")
def test_link_blocks_rewrites_name_references_to_ids_and_nothing_else():
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from comfy_pipeline.flows.cli import app

    server_id = ComfyUIServer(url="http://gpu-1:8188", api_key="sk-link").save("link-gpu-1", overwrite=True)
    workflow_id = ComfyUIWorkflow.from_file(ROOT / "examples/workflows/smoke_image.json").save(
        "link-smoke", overwrite=True)
    nested = {"keep": {"$ref": {"block_document_slug": "comfyui-server/link-gpu-1"}}}
    deployment_id = generate_content.to_deployment("link-check", parameters={
        "server": {"$ref": {"block_document_slug": "comfyui-server/link-gpu-1"}},
        "workflow": {"$ref": {"block_document_slug": "comfyui-workflow/link-smoke"}},
        "params": nested, "descriptions": ["a"]}).apply()

    runner = CliRunner()
    result = runner.invoke(app, ["link-blocks"])
    assert result.exit_code == 0, result.output
    assert "generate-content/link-check: server=comfyui-server/link-gpu-1, workflow=comfyui-workflow/link-smoke" \
        in result.output
    with get_client(sync_client=True) as client:
        parameters = client.read_deployment(deployment_id).parameters
    assert parameters == {"server": {"$ref": {"block_document_id": str(server_id)}},
                          "workflow": {"$ref": {"block_document_id": str(workflow_id)}},
                          "params": nested, "descriptions": ["a"]}
    assert "sk-link" not in json.dumps(parameters)
    # once linked, running it again changes nothing and says so
    again = runner.invoke(app, ["link-blocks"])
    assert again.exit_code == 0 and "already refer to their blocks by id" in again.output, again.output

    # a reference to a block that is not saved (or without its type) is named, exit 1
    broken_id = generate_content.to_deployment("link-broken", parameters={
        "server": {"$ref": {"block_document_slug": "comfyui-server/no-such-gpu"}},
        "workflow": {"$ref": {"block_document_slug": "link-smoke"}}}).apply()
    swapped_id = generate_content.to_deployment("link-swapped", parameters={
        "server": {"$ref": {"block_document_slug": "comfyui-workflow/link-smoke"}}}).apply()
    try:
        failed = runner.invoke(app, ["link-blocks"])
        assert failed.exit_code == 1
        assert "link-broken: server refers to 'comfyui-server/no-such-gpu', which is not saved" in failed.output
        assert "link-broken: workflow refers to 'link-smoke', which lacks the block type" in failed.output
        assert ("link-swapped: server refers to 'comfyui-workflow/link-smoke', but server takes a block of "
                "type comfyui-server or comfyui-server-pool") in failed.output
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(broken_id)
            client.delete_deployment(swapped_id)
