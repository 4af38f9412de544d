"""Tests for blocks/workflow.py: loading, bindings, rendering, seeds, example workflows."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from comfy_pipeline.blocks.errors import WorkflowError
from comfy_pipeline.blocks.workflow import (
    RANDOM_SEED_MAX,
    ComfyUIWorkflow,
    SeedMode,
    choose_seed,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "workflows"
OBJECT_INFO = Path("/work/shared/comfyui-transcripts/object_info_subset.json")

PARAMS = {
    "prompt": "a red fox in the snow",
    "slug": "a red fox in the snow",
    "negative_prompt": "blurry",
    "seed": 1234,
    "character": "fox",
    "character_slug": "fox",
    "index": 3,
    "variant": 1,
}


def api_prompt() -> dict:
    """A small API-format graph (the transcripts' txt2img shape) with titles."""
    return {
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "model.safetensors"},
            "_meta": {"title": "Load Checkpoint"},
        },
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "positive text", "clip": ["4", 1]},
            "_meta": {"title": "Positive"},
        },
        "7": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "negative text", "clip": ["4", 1]},
            "_meta": {"title": "Negative"},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 5,
                "steps": 8,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
            "_meta": {"title": "KSampler"},
        },
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        },
        "9": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "out/img", "images": ["8", 0]},
            "_meta": {"title": "Save"},
        },
    }


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def with_bindings(prompt: dict, bindings: dict) -> dict:
    data = copy.deepcopy(prompt)
    data["comfy_pipeline"] = {"bindings": bindings}
    return data


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def test_api_format_file(tmp_path):
    path = write(tmp_path / "wf.json", api_prompt())
    wf = ComfyUIWorkflow.from_file(path)
    assert isinstance(wf, ComfyUIWorkflow)
    assert wf.prompt == api_prompt()
    assert wf.bindings == {}
    assert wf.source == str(path)
    assert wf.class_types() == {
        "CheckpointLoaderSimple",
        "CLIPTextEncode",
        "KSampler",
        "EmptyLatentImage",
        "SaveImage",
    }
    assert ComfyUIWorkflow.from_file(str(path)).prompt == wf.prompt


def test_wrapped_format_with_client_id_and_extra_data(tmp_path):
    body = {
        "prompt": with_bindings(api_prompt(), {"seed": "3.inputs.seed"}),
        "client_id": "abc",
        "extra_data": {"extra_pnginfo": {"description": "x"}},
    }
    wf = ComfyUIWorkflow.from_file(write(tmp_path / "wrapped.json", body))
    assert wf.prompt == api_prompt()
    assert "comfy_pipeline" not in wf.prompt
    assert wf.bindings == {"seed": "3.inputs.seed"}


def test_wrapped_format_with_top_level_pipeline_key():
    data = {"prompt": api_prompt(), "comfy_pipeline": {"bindings": {"seed": "3.inputs.seed"}}}
    wf = ComfyUIWorkflow.from_dict(data)
    assert wf.binds("seed")
    assert wf.prompt == api_prompt()


def test_wrapped_format_unknown_key_rejected():
    with pytest.raises(WorkflowError, match="unknown top-level keys"):
        ComfyUIWorkflow.from_dict({"prompt": api_prompt(), "clientid": "x"})


def test_pipeline_key_in_two_places_rejected():
    data = {
        "prompt": with_bindings(api_prompt(), {"seed": "3.inputs.seed"}),
        "comfy_pipeline": {"bindings": {"seed": "3.inputs.seed"}},
    }
    with pytest.raises(WorkflowError, match="one place"):
        ComfyUIWorkflow.from_dict(data)


def test_from_dict_does_not_modify_input():
    data = with_bindings(api_prompt(), {"seed": "3.inputs.seed"})
    before = copy.deepcopy(data)
    wf = ComfyUIWorkflow.from_dict(data, source="mine")
    assert data == before
    assert wf.source == "mine"
    wf.render({"seed": 9})
    assert data == before


def test_ui_format_rejected_with_export_api_message(tmp_path):
    ui = {
        "last_node_id": 9,
        "last_link_id": 9,
        "nodes": [{"id": 3, "type": "KSampler", "widgets_values": [5, "fixed", 20]}],
        "links": [[1, 4, 0, 3, 0, "MODEL"]],
        "groups": [],
        "version": 0.4,
    }
    path = write(tmp_path / "ui_workflow.json", ui)
    with pytest.raises(WorkflowError) as info:
        ComfyUIWorkflow.from_file(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "Export (API)" in msg
    assert "Workflow menu" in msg
    assert "UI format" in msg


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("42", "must be a JSON object"),
        ("{}", "has no nodes"),
        ('{"1": "EmptyImage"}', "node '1' must be an object"),
        ('{"1": {"inputs": {}}}', "node '1' has no 'class_type'"),
        ('{"1": {"class_type": "X", "inputs": [1]}}', "node '1' \\(X\\) has 'inputs'"),
    ],
)
def test_malformed_files_rejected_naming_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(WorkflowError, match=match) as info:
        ComfyUIWorkflow.from_file(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(WorkflowError, match="does not exist"):
        ComfyUIWorkflow.from_file(tmp_path / "nope.json")


def test_a_missing_relative_path_names_the_working_directory_and_the_block_to_use(tmp_path, monkeypatch):
    """On a worker, the flow runs in a temporary folder: say where the path was looked for."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkflowError) as info:
        ComfyUIWorkflow.from_file("examples/workflows/smoke_image.json")
    message = str(info.value)
    assert "'examples/workflows/smoke_image.json' does not exist" in message
    assert str(tmp_path) in message and "comfy-pipeline workflow save" in message


def test_node_without_inputs_gets_empty_inputs():
    wf = ComfyUIWorkflow.from_dict({"1": {"class_type": "X"}})
    assert wf.render({}) == {"1": {"class_type": "X", "inputs": {}}}


# ------------------------------------------------------------------------------------------
# Sidecar bindings
# ------------------------------------------------------------------------------------------


def test_sidecar_bindings(tmp_path):
    path = write(tmp_path / "foo.json", api_prompt())
    write(tmp_path / "foo.bindings.json", {"bindings": {"prompt": "6.inputs.text"}})
    wf = ComfyUIWorkflow.from_file(path)
    assert wf.bindings == {"prompt": "6.inputs.text"}
    assert wf.render({"prompt": "hello"})["6"]["inputs"]["text"] == "hello"


def test_sidecar_and_in_file_bindings_rejected(tmp_path):
    path = write(tmp_path / "foo.json", with_bindings(api_prompt(), {"seed": "3.inputs.seed"}))
    sidecar = write(tmp_path / "foo.bindings.json", {"bindings": {"prompt": "6.inputs.text"}})
    with pytest.raises(WorkflowError, match="one place") as info:
        ComfyUIWorkflow.from_file(path)
    assert str(sidecar) in str(info.value)
    assert str(path) in str(info.value)


def test_sidecar_bad_shape(tmp_path):
    path = write(tmp_path / "foo.json", api_prompt())
    sidecar = write(tmp_path / "foo.bindings.json", {"prompt": "6.inputs.text"})
    with pytest.raises(WorkflowError, match="unknown keys") as info:
        ComfyUIWorkflow.from_file(path)
    assert str(sidecar) in str(info.value)


def test_sidecar_invalid_json(tmp_path):
    path = write(tmp_path / "foo.json", api_prompt())
    (tmp_path / "foo.bindings.json").write_text("{", encoding="utf-8")
    with pytest.raises(WorkflowError, match="not valid JSON"):
        ComfyUIWorkflow.from_file(path)


def test_sidecar_binding_errors_are_checked(tmp_path):
    path = write(tmp_path / "foo.json", api_prompt())
    write(tmp_path / "foo.bindings.json", {"bindings": {"prompt": "66.inputs.text"}})
    with pytest.raises(WorkflowError, match="66"):
        ComfyUIWorkflow.from_file(path)


# ------------------------------------------------------------------------------------------
# Binding resolution
# ------------------------------------------------------------------------------------------


def test_id_and_title_references():
    wf = ComfyUIWorkflow.from_dict(
        with_bindings(
            api_prompt(),
            {
                "prompt": "6.inputs.text",
                "negative_prompt": "Negative.inputs.text",
                "seed": "KSampler.inputs.seed",
            },
        )
    )
    out = wf.render(PARAMS)
    assert out["6"]["inputs"]["text"] == "a red fox in the snow"
    assert out["7"]["inputs"]["text"] == "blurry"
    assert out["3"]["inputs"]["seed"] == 1234
    assert wf.binds("seed") and wf.binds("prompt") and not wf.binds("character")


def test_id_wins_over_title():
    prompt = api_prompt()
    prompt["7"]["_meta"]["title"] = "6"  # a title equal to another node's id
    wf = ComfyUIWorkflow.from_dict(with_bindings(prompt, {"prompt": "6.inputs.text"}))
    out = wf.render({"prompt": "p"})
    assert out["6"]["inputs"]["text"] == "p"
    assert out["7"]["inputs"]["text"] == "negative text"


def test_title_with_dots():
    prompt = api_prompt()
    prompt["4"]["_meta"]["title"] = "SD1.5 Checkpoint"
    wf = ComfyUIWorkflow.from_dict(
        with_bindings(prompt, {"ckpt": "SD1.5 Checkpoint.inputs.ckpt_name"})
    )
    assert wf.render({"ckpt": "b.safetensors"})["4"]["inputs"]["ckpt_name"] == "b.safetensors"


def test_ambiguous_title():
    prompt = api_prompt()
    prompt["7"]["_meta"]["title"] = "Positive"
    with pytest.raises(WorkflowError) as info:
        ComfyUIWorkflow.from_dict(with_bindings(prompt, {"prompt": "Positive.inputs.text"}))
    msg = str(info.value)
    assert "several nodes" in msg and "'6'" in msg and "'7'" in msg and "'prompt'" in msg


def test_missing_node_at_load(tmp_path):
    path = write(tmp_path / "wf.json", with_bindings(api_prompt(), {"seed": "Sampler.inputs.seed"}))
    with pytest.raises(WorkflowError) as info:
        ComfyUIWorkflow.from_file(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "'seed'" in msg and "Sampler.inputs.seed" in msg
    # known ids and titles are listed
    assert "'3'" in msg and "'KSampler'" in msg and "'Positive'" in msg


def test_missing_input_at_load():
    with pytest.raises(WorkflowError) as info:
        ComfyUIWorkflow.from_dict(with_bindings(api_prompt(), {"seed": "KSampler.inputs.sead"}))
    msg = str(info.value)
    assert "'seed'" in msg and "KSampler.inputs.sead" in msg and "'sead'" in msg
    assert "steps" in msg  # the node's inputs are listed


def test_malformed_path():
    with pytest.raises(WorkflowError, match="must look like"):
        ComfyUIWorkflow.from_dict(with_bindings(api_prompt(), {"seed": "3.seed"}))


def test_link_target_rejected():
    with pytest.raises(WorkflowError, match="is a link") as info:
        ComfyUIWorkflow.from_dict(with_bindings(api_prompt(), {"x": "Positive.inputs.clip"}))
    assert "'x'" in str(info.value)


def test_two_parameters_same_input_rejected():
    with pytest.raises(WorkflowError, match="already writes"):
        ComfyUIWorkflow.from_dict(
            with_bindings(api_prompt(), {"a": "6.inputs.text", "b": "Positive.inputs.text"})
        )


@pytest.mark.parametrize(
    "spec, match",
    [
        (5, "expected a path"),
        ([], "expected a path"),
        ([1], "paths must be strings"),
        ({"format": "{prompt}"}, "no 'path'"),
        ({"path": "6.inputs.text", "fmt": "{x}"}, "unknown keys"),
        ({"path": "6.inputs.text", "format": 3}, "'format' must be a string"),
        ({"path": "6.inputs.text", "format": "{prompt"}, "not a valid str.format"),
        ({"path": "6.inputs.text", "format": "{} x"}, "positional"),
    ],
)
def test_malformed_binding_specs(spec, match):
    with pytest.raises(WorkflowError, match=match):
        ComfyUIWorkflow.from_dict(with_bindings(api_prompt(), {"p": spec}))


def test_pipeline_section_shape():
    data = api_prompt()
    data["comfy_pipeline"] = {"bindings": {}, "extra": 1}
    with pytest.raises(WorkflowError, match="unknown keys"):
        ComfyUIWorkflow.from_dict(data)
    data["comfy_pipeline"] = ["bindings"]
    with pytest.raises(WorkflowError, match="must be an object"):
        ComfyUIWorkflow.from_dict(data)


def test_validate_bindings_after_editing():
    wf = ComfyUIWorkflow.from_dict(api_prompt())
    wf.validate_bindings()
    wf.bindings["seed"] = "KSampler.inputs.nope"
    with pytest.raises(WorkflowError, match="nope"):
        wf.validate_bindings()


def test_direct_construction_is_validated():
    with pytest.raises(WorkflowError, match="no node has the id or title"):
        ComfyUIWorkflow(prompt=api_prompt(), bindings={"seed": "99.inputs.seed"})


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------


def test_list_binding():
    wf = ComfyUIWorkflow.from_dict(
        with_bindings(api_prompt(), {"prompt": ["6.inputs.text", "Negative.inputs.text"]})
    )
    out = wf.render({"prompt": "same"})
    assert out["6"]["inputs"]["text"] == "same"
    assert out["7"]["inputs"]["text"] == "same"


def test_format_binding_with_braces_and_unicode():
    wf = ComfyUIWorkflow.from_dict(
        with_bindings(
            api_prompt(),
            {
                "prompt": "6.inputs.text",
                "file": {
                    "path": "Save.inputs.filename_prefix",
                    "format": "smoke/{character}_d{index}_v{variant}_{prompt:.40}",
                },
            },
        )
    )
    description = "café {not a field} ✓ {0} }{ a very long description that goes on and on"
    out = wf.render({**PARAMS, "prompt": description})
    assert out["9"]["inputs"]["filename_prefix"] == "smoke/fox_d3_v1_" + description[:40]
    assert out["6"]["inputs"]["text"] == description


def test_format_binding_list_of_paths():
    wf = ComfyUIWorkflow.from_dict(
        with_bindings(
            api_prompt(),
            {"t": {"path": ["6.inputs.text", "7.inputs.text"], "format": "<{prompt}>"}},
        )
    )
    out = wf.render({"prompt": "x"})
    assert out["6"]["inputs"]["text"] == out["7"]["inputs"]["text"] == "<x>"
    assert wf.binds("prompt") and wf.binds("t") and not wf.binds("seed")


def test_format_binding_missing_placeholder():
    wf = ComfyUIWorkflow.from_dict(
        with_bindings(
            api_prompt(), {"prompt": {"path": "9.inputs.filename_prefix", "format": "{character}/{prompt}"}}
        )
    )
    with pytest.raises(WorkflowError) as info:
        wf.render({"prompt": "p"})
    assert "'character'" in str(info.value) and "'prompt'" in str(info.value)


def test_format_binding_bad_spec_for_value():
    wf = ComfyUIWorkflow.from_dict(
        with_bindings(api_prompt(), {"f": {"path": "9.inputs.filename_prefix", "format": "{seed:.3}"}})
    )
    with pytest.raises(WorkflowError, match="cannot be applied"):
        wf.render({"seed": 12})


def test_unbound_and_missing_params():
    wf = ComfyUIWorkflow.from_dict(
        with_bindings(api_prompt(), {"prompt": "6.inputs.text", "seed": "3.inputs.seed"})
    )
    # unknown parameters are ignored; a missing (or None) plain parameter keeps the template value
    out = wf.render({"prompt": "p", "character": "c", "whatever": object(), "seed": None})
    assert out["6"]["inputs"]["text"] == "p"
    assert out["3"]["inputs"]["seed"] == 5
    assert wf.render({}) == api_prompt()


def test_type_preservation():
    wf = ComfyUIWorkflow.from_dict(
        with_bindings(
            api_prompt(),
            {"seed": "3.inputs.seed", "cfg": "3.inputs.cfg", "w": "5.inputs.width"},
        )
    )
    out = wf.render({"seed": 2**40 + 1, "cfg": 4.5, "w": 128})
    assert out["3"]["inputs"]["seed"] == 2**40 + 1 and type(out["3"]["inputs"]["seed"]) is int
    assert type(out["3"]["inputs"]["cfg"]) is float
    assert type(out["5"]["inputs"]["width"]) is int
    assert type(out["3"]["inputs"]["steps"]) is int
    assert out["3"]["inputs"]["model"] == ["4", 0]


def test_render_does_not_mutate_template():
    wf = ComfyUIWorkflow.from_dict(
        with_bindings(api_prompt(), {"prompt": "6.inputs.text", "seed": "3.inputs.seed"})
    )
    before = copy.deepcopy(wf.prompt)
    out = wf.render(PARAMS, updates={"KSampler": {"inputs": {"steps": 99}}})
    out["3"]["inputs"]["model"].append("mutated")
    out["6"]["_meta"]["title"] = "mutated"
    assert wf.prompt == before
    second = wf.render({"prompt": "other"})
    assert second["6"]["inputs"]["text"] == "other"
    assert second["3"]["inputs"]["steps"] == 8
    assert second["3"]["inputs"]["model"] == ["4", 0]


def test_raw_updates():
    wf = ComfyUIWorkflow.from_dict(with_bindings(api_prompt(), {"seed": "3.inputs.seed"}))
    out = wf.render(
        {"seed": 1},
        updates={
            "KSampler": {"inputs": {"steps": 30, "seed": 2}},  # applied after bindings
            "5": {"inputs": {"width": 256, "height": 128}},
        },
    )
    assert out["3"]["inputs"]["steps"] == 30
    assert out["3"]["inputs"]["seed"] == 2
    assert (out["5"]["inputs"]["width"], out["5"]["inputs"]["height"]) == (256, 128)


@pytest.mark.parametrize(
    "updates, match",
    [
        ({"Nope": {"inputs": {"steps": 1}}}, "no node has the id or title 'Nope'"),
        ({"3": {"inputs": {"stepz": 1}}}, "has no input 'stepz'"),
        ({"3": {"steps": 1}}, "must be"),
        ({"3": {"inputs": 5}}, "must be an object"),
    ],
)
def test_raw_updates_errors(updates, match):
    wf = ComfyUIWorkflow.from_dict(api_prompt())
    with pytest.raises(WorkflowError, match=match):
        wf.render({}, updates=updates)


def test_block_round_trip_through_model_dump():
    wf = ComfyUIWorkflow.from_dict(with_bindings(api_prompt(), {"seed": "KSampler.inputs.seed"}))
    again = ComfyUIWorkflow.model_validate(wf.model_dump(mode="json"))
    assert again.prompt == wf.prompt and again.bindings == wf.bindings
    assert again.render({"seed": 3}) == wf.render({"seed": 3})


def test_block_metadata():
    assert ComfyUIWorkflow._block_type_name == "ComfyUI Workflow"
    assert ComfyUIWorkflow.get_block_type_slug() == "comfyui-workflow"


# ------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------


def test_seed_random_in_range_and_varies():
    seeds = {
        choose_seed(SeedMode.random, base_seed=7, index=0, variant=0, variants=1)
        for _ in range(20)
    }
    assert len(seeds) > 1
    assert all(0 <= s <= RANDOM_SEED_MAX == 2**32 - 1 for s in seeds)
    rng = random.Random(1)
    a = choose_seed("random", base_seed=None, index=0, variant=0, variants=1, rng=rng)
    b = choose_seed("random", base_seed=None, index=0, variant=0, variants=1, rng=rng)
    assert a != b
    rng2 = random.Random(1)
    assert choose_seed("random", base_seed=None, index=0, variant=0, variants=1, rng=rng2) == a


def test_seed_fixed():
    for index in range(3):
        for variant in range(2):
            assert choose_seed(
                SeedMode.fixed, base_seed=42, index=index, variant=variant, variants=2
            ) == 42
    assert choose_seed("fixed", base_seed=None, index=5, variant=0, variants=1) == 0


def test_seed_increment():
    seeds = [
        choose_seed(SeedMode.increment, base_seed=100, index=i, variant=v, variants=3)
        for i in range(4)
        for v in range(3)
    ]
    assert seeds == list(range(100, 112))
    assert choose_seed("increment", base_seed=None, index=2, variant=1, variants=4) == 9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="sometimes"), "Unknown seed mode"),
        (dict(index=-1), "index must be >= 0"),
        (dict(variant=2, variants=2), "out of range"),
        (dict(variants=0), "variants must be >= 1"),
        (dict(base_seed=-5), "base_seed must be >= 0"),
        (dict(base_seed="5"), "base_seed must be an integer"),
        (dict(base_seed=2**64 - 1, index=1), "exceeds"),
    ],
)
def test_seed_errors(kwargs, match):
    args = dict(mode="increment", base_seed=0, index=0, variant=0, variants=1)
    args.update(kwargs)
    mode = args.pop("mode")
    with pytest.raises(WorkflowError, match=match):
        choose_seed(mode, **args)


def test_seed_mode_is_str_enum():
    assert SeedMode("increment") is SeedMode.increment
    assert SeedMode.fixed == "fixed"


# ------------------------------------------------------------------------------------------
# Example workflows
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smoke_image.json", "smoke_video.json", "sd15_txt2img.json"])
def test_examples_load_and_render(name):
    from comfy_pipeline.tasks.generate import workflow_params
    from comfy_pipeline.tasks.models import GenerationSettings, GenerationSpec

    wf = ComfyUIWorkflow.from_file(EXAMPLES / name)
    assert wf.binds("slug")
    spec = GenerationSpec(index=3, variant=1, description="a {braced} café... description/x", seed=7,
                          prompt_id="p", position=1, total=1)
    settings = GenerationSettings(character="Fox/Den", output_dir="o", descriptions=4, variants=2)
    out = wf.render(workflow_params(spec, settings))
    assert "comfy_pipeline" not in out
    save = next(n for n in out.values() if n["class_type"].startswith("Save"))
    prefix = save["inputs"]["filename_prefix"]
    # the description is visible in the server's file name as its slug (no '..', no '/', no space)
    folder, _, base = prefix.partition("/")
    assert base == "fox-den_d3_v1_a-braced-cafe-description-x"
    assert ".." not in prefix and "/" not in base
    assert json.loads(json.dumps(out)) == out


def test_example_smoke_shapes():
    image = ComfyUIWorkflow.from_file(EXAMPLES / "smoke_image.json")
    assert image.class_types() == {"EmptyImage", "SaveImage"}
    assert image.render(PARAMS)["2"]["inputs"]["filename_prefix"].startswith("smoke/")
    video = ComfyUIWorkflow.from_file(EXAMPLES / "smoke_video.json")
    assert video.class_types() == {"EmptyImage", "SaveAnimatedWEBP"}
    out = video.render(PARAMS)
    assert out["1"]["inputs"]["batch_size"] == 8
    assert out["2"]["inputs"]["filename_prefix"].startswith("smoke_video/")


def test_example_sd15_bindings():
    wf = ComfyUIWorkflow.from_file(EXAMPLES / "sd15_txt2img.json")
    out = wf.render(PARAMS)
    assert out["6"]["inputs"]["text"] == PARAMS["prompt"]
    assert out["7"]["inputs"]["text"] == PARAMS["negative_prompt"]
    assert out["3"]["inputs"]["seed"] == 1234
    assert out["4"]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    assert (out["5"]["inputs"]["width"], out["5"]["inputs"]["height"]) == (512, 512)
    ks = out["3"]["inputs"]
    assert (ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == (
        20,
        7.0,
        "euler",
        "normal",
        1.0,
    )
    # negative_prompt absent: the template's negative text stays
    params = {k: v for k, v in PARAMS.items() if k != "negative_prompt"}
    assert wf.render(params)["7"]["inputs"]["text"] == wf.prompt["7"]["inputs"]["text"]


@pytest.mark.skipif(not OBJECT_INFO.exists(), reason="transcripts' object_info not available")
@pytest.mark.parametrize("name", ["smoke_image.json", "smoke_video.json", "sd15_txt2img.json"])
def test_examples_have_required_inputs(name):
    """Every required input of every node is present, per the recorded /object_info."""
    info = json.loads(OBJECT_INFO.read_text(encoding="utf-8"))["nodes"]
    wf = ComfyUIWorkflow.from_file(EXAMPLES / name)
    for node_id, node in wf.prompt.items():
        spec = info[node["class_type"]]["input"]
        required = set(spec.get("required", {}))
        allowed = required | set(spec.get("optional", {}))
        assert required <= set(node["inputs"]), (node_id, required - set(node["inputs"]))
        assert set(node["inputs"]) <= allowed, (node_id, set(node["inputs"]) - allowed)
        for input_name, value in node["inputs"].items():
            kind = spec.get("required", {}).get(input_name) or spec["optional"][input_name]
            if isinstance(kind[0], list) and node["class_type"] != "CheckpointLoaderSimple":
                assert value in kind[0], (node_id, input_name, value)
