"""prefect.yaml's deployments and the flow's typed parameters (the Prefect UI's run form)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from comfy_pipeline.blocks.server import ComfyUIServer
from comfy_pipeline.flows.generate_content import generate_content

ROOT = Path(__file__).resolve().parents[1]


def test_parameter_schema_gives_a_form_with_types():
    schema = generate_content.parameters.model_dump()
    props = schema["properties"]
    assert schema["required"] == ["server", "workflow", "descriptions"]
    assert props["descriptions"]["type"] == "array"
    assert props["variants"]["type"] == "integer" and props["variants"]["minimum"] == 1
    assert props["kind"]["enum"] == ["image", "video"]
    definitions = schema.get("definitions", {})
    # the server is a block selector, the seed mode a choice
    assert "ComfyUIServer" in str(props["server"]) and "block_type_slug" in str(definitions["ComfyUIServer"])
    assert definitions["SeedMode"]["enum"] == ["random", "fixed", "increment"]
    assert all(p.get("description") for p in props.values())


@pytest.mark.usefixtures("prefect_api")
def test_every_deployment_in_prefect_yaml_loads_and_validates(tmp_path):
    ComfyUIServer(url="http://gpu-1:8188").save("gpu-1", overwrite=True)
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == "generate-content"
        assert deployment["work_pool"]["name"]
        for schedule in deployment.get("schedules", []):
            assert len(schedule["cron"].split()) == 5
        params = dict(deployment["parameters"])
        params.setdefault("descriptions", ["filled in the UI form"])
        validated = flow.validate_parameters(params)
        assert isinstance(validated["server"], ComfyUIServer)
        assert validated["server"].url == "http://gpu-1:8188"
        assert (ROOT / validated["workflow"]).is_file()


@pytest.mark.usefixtures("prefect_api")
def test_the_api_accepts_flow_runs_of_every_deployment_as_the_ui_form_sends_them():
    """Prefect's API validates a run's parameters against the deployment's schema (a UI run, a
    ``prefect deployment run``, a schedule): the ``$ref`` to the server block must pass."""
    from prefect.deployments import run_deployment

    ComfyUIServer(url="http://gpu-1:8188").save("gpu-1", overwrite=True)
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        name = f"check-{deployment['name']}"
        generate_content.to_deployment(name, parameters=deployment["parameters"]).apply()
        extra = {} if "descriptions" in deployment["parameters"] else {"descriptions": ["from the form"]}
        flow_run = run_deployment(f"generate-content/{name}", parameters=extra, timeout=0)
        assert flow_run.parameters["server"] == {"$ref": {"block_document_slug": "comfyui-server/gpu-1"}}
