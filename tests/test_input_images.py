"""Input images: checked before anything is sent, uploaded once per server per run
(``POST /upload/image``), bound by the name the server answers. Prefect's local API, stand-ins over
real sockets, files on disk."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from comfy_pipeline.blocks.errors import InputImageError, ServerError
from comfy_pipeline.blocks.http_api import ComfyUIHTTP
from comfy_pipeline.blocks.inputs import InputImages, read_input_image
from comfy_pipeline.blocks.server import ComfyUIServer, ComfyUIServerPool
from comfy_pipeline.flows.descriptions import DescriptionRow, read_descriptions_file
from comfy_pipeline.flows.generate_content import generate_content
from comfy_pipeline.testing.standin import make_png
from tests.conftest import EXAMPLES
from tests.standin import StandInComfyUI
from tests.test_cli import comfy_pipeline

pytestmark = pytest.mark.usefixtures("prefect_api", "no_leaked_threads")

IMG2IMG = str(EXAMPLES / "img2img_smoke.json")


def png(path: Path, rgb=(10, 20, 30), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make_png(*size, rgb))
    return path


def load_image_values(comfy: StandInComfyUI) -> dict[str, str]:
    return {pid: node["inputs"]["image"] for pid, prompt in comfy.prompts.items()
            for node in prompt.values() if node.get("class_type") == "LoadImage"}


def run(server, tmp_path: Path, descriptions, **kwargs):
    return generate_content(server=server, workflow=IMG2IMG, descriptions=descriptions, character="Alice",
                            output_dir=str(tmp_path / "out"), return_state=True, **kwargs)


def test_one_reference_image_for_six_generations_is_uploaded_once_per_server(tmp_path):
    ref = png(tmp_path / "refs" / "alice.png")
    with StandInComfyUI(execution_time_s=0.1) as first, StandInComfyUI(execution_time_s=0.1) as second:
        pool = ComfyUIServerPool.of([ComfyUIServer(url=first.url, max_in_flight=2),
                                     ComfyUIServer(url=second.url, max_in_flight=2)])
        state = run(pool, tmp_path, ["a red fox", "a blue bird", "a green frog"], variants=2,
                    inputs={"image": str(ref)})
        assert state.is_completed(), state.message
        results = state.result()
        assert len(results) == 6
        for comfy in (first, second):
            used = [r for r in results if r.server == comfy.url]
            assert used, "both servers took generations"
            assert len(comfy.uploads) == 1  # once per server, whatever the number of generations
            upload = comfy.uploads[0]
            assert upload["filename"] == "alice.png" and upload["type"] == "input"
            assert upload["sha256"] == read_input_image("image", ref).sha256
            assert upload["subfolder"].startswith("comfy-pipeline/")
            bound = f"{upload['subfolder']}/{upload['name']}"
            assert {load_image_values(comfy)[r.prompt_id] for r in used} == {bound}
            assert all(r.inputs == {"image": bound} for r in used)


def test_a_name_taken_on_the_server_binds_the_renamed_file(comfy, tmp_path):
    # two different files with the same name, one per description: the server renames the second
    first = png(tmp_path / "a" / "ref.png", rgb=(200, 0, 0))
    second = png(tmp_path / "b" / "ref.png", rgb=(0, 0, 200))
    rows = [DescriptionRow(description="a red fox", image=str(first)),
            DescriptionRow(description="a blue bird", image=str(second))]
    state = run(ComfyUIServer(url=comfy.url, max_in_flight=1), tmp_path, rows)
    assert state.is_completed(), state.message
    answered = sorted(u["name"] for u in comfy.uploads)
    assert answered == ["ref (1).png", "ref.png"]
    by_index = {r.index: r for r in state.result()}
    names = {r.index: load_image_values(comfy)[r.prompt_id].rsplit("/", 1)[1] for r in by_index.values()}
    # each description got its own file, under whichever name the server gave it
    sha_of_name = {u["name"]: u["sha256"] for u in comfy.uploads}
    assert sha_of_name[names[0]] == read_input_image("image", first).sha256
    assert sha_of_name[names[1]] == read_input_image("image", second).sha256


def test_uploads_survive_5xx_answers_and_a_dropped_transfer(comfy, tmp_path):
    ref = png(tmp_path / "ref.png")
    comfy.fail_uploads(2, status=503)
    state = run(ComfyUIServer(url=comfy.url), tmp_path, ["a red fox"], inputs={"image": str(ref)})
    assert state.is_completed(), state.message
    assert comfy.requests[("POST", "/upload/image")] == 3 and len(comfy.uploads) == 1
    comfy.clear_faults()
    comfy.reset_counters()
    comfy.drop_uploads(1)  # stored, then the connection is cut before the answer
    state = run(ComfyUIServer(url=comfy.url), tmp_path, ["a blue bird"], inputs={"image": str(ref)})
    assert state.is_completed(), state.message
    # sent again after the cut: the server, which had stored it, kept one copy under one name
    assert comfy.requests[("POST", "/upload/image")] == 2
    assert len(comfy.uploads) == 1 and comfy.uploads[0]["duplicate"]


def test_a_missing_or_non_image_input_fails_the_flow_before_anything_is_sent(comfy, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path, says in ((tmp_path / "nope.png", "does not exist"), (text, "is not an image")):
        state = run(ComfyUIServer(url=comfy.url), tmp_path, ["a red fox"], inputs={"image": str(path)})
        assert state.is_failed() and says in state.message and str(path) in state.message
    assert comfy.requests[("POST", "/prompt")] == 0 and comfy.uploads == []


def test_the_cli_exits_2_for_a_missing_image_before_any_post(comfy, tmp_path):
    out = comfy_pipeline("run", "--server", comfy.url, "--workflow", IMG2IMG, "--description", "a red fox",
                         "--input", f"image={tmp_path / 'missing.png'}", "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 2, out.output
    assert "input image 'image'" in out.output and "does not exist" in out.output
    assert "Traceback" not in out.output
    assert comfy.requests[("POST", "/prompt")] == 0 and comfy.uploads == []


def test_an_input_the_workflow_does_not_bind_is_refused(comfy, tmp_path):
    ref = png(tmp_path / "ref.png")
    state = run(ComfyUIServer(url=comfy.url), tmp_path, ["a red fox"], inputs={"reference": str(ref)})
    assert state.is_failed() and "'reference' is not bound" in state.message
    assert comfy.requests[("POST", "/prompt")] == 0


def test_a_csv_gives_each_description_its_own_image(comfy, tmp_path):
    png(tmp_path / "refs" / "fox.png", rgb=(200, 100, 0))
    png(tmp_path / "refs" / "bird.png", rgb=(0, 100, 200))
    table = tmp_path / "shots.csv"
    table.write_text("description,image\na red fox,refs/fox.png\na blue bird,refs/bird.png\n")
    out = comfy_pipeline("run", "--server", comfy.url, "--workflow", IMG2IMG, "--descriptions", str(table),
                         "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 0, out.output
    assert sorted(u["filename"] for u in comfy.uploads) == ["bird.png", "fox.png"]
    for pid, prompt in comfy.prompts.items():
        prefix = next(n["inputs"]["filename_prefix"] for n in prompt.values() if n["class_type"] == "SaveImage")
        loaded = next(n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage")
        assert ("fox" in prefix) == loaded.endswith("/fox.png")


def test_descriptions_files_read_rows_and_name_the_bad_line(tmp_path):
    png(tmp_path / "a.png")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"description": "a fox", "image": "a.png"}\n# a comment\n"just text"\n')
    rows = read_descriptions_file(jsonl)
    assert rows[0].description == "a fox" and rows[0].inputs == {"image": str(tmp_path / "a.png")}
    assert rows[1] == "just text"
    bad = tmp_path / "bad.csv"
    bad.write_text("description,image\na fox,a.png\n,b.png\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 3: description"):
        read_descriptions_file(bad)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("text,image\na fox,a.png\n")
    with pytest.raises(ValueError, match="'description'"):
        read_descriptions_file(nocol)
    typed = tmp_path / "typed.jsonl"
    typed.write_text(json.dumps({"description": "x", "image": 3}) + "\n")
    with pytest.raises(ValueError, match=r"typed.jsonl, line 1: 'image' must be an image path"):
        read_descriptions_file(typed)


def test_concurrent_generations_wait_for_one_upload(comfy, tmp_path):
    image = read_input_image("image", png(tmp_path / "ref.png"))
    comfy.request_latency_s = 0.3  # the upload takes a while: every caller arrives while it runs
    http = ComfyUIHTTP(comfy.url)
    try:
        names = InputImages(comfy.url, http)
        values: list[str] = []
        threads = [threading.Thread(target=lambda: values.append(names.value(image, "run-1"))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert values == ["run-1/ref.png"] * 6 and names.uploads == 1 and len(comfy.uploads) == 1
        # an image the server made itself is named, not uploaded
        from comfy_pipeline.blocks.inputs import ServerFile
        made = image.model_copy(update={"origin": ServerFile(server=comfy.url, filename="x_00001_.png",
                                                             subfolder="smoke")})
        assert names.value(made, "run-1") == "smoke/x_00001_.png [output]" and len(comfy.uploads) == 1
        # a failed upload is not remembered: the next call tries again
        comfy.request_latency_s = 0
        comfy.fail_uploads(10, status=500)
        other = read_input_image("image", png(tmp_path / "other.png", rgb=(1, 2, 3)))
        with pytest.raises(ServerError):
            names.value(other, "run-1")
        comfy.clear_faults()
        assert names.value(other, "run-1") == "run-1/other.png"
    finally:
        http.close()


def test_read_input_image_refuses_what_loadimage_cannot_read(tmp_path):
    with pytest.raises(InputImageError, match="does not exist"):
        read_input_image("ref", tmp_path / "missing.png")
    with pytest.raises(InputImageError, match="is not a file"):
        read_input_image("ref", tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputImageError, match="is empty"):
        read_input_image("ref", empty)
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    assert read_input_image("ref", jpeg).content_type == "image/jpeg"


def test_a_file_larger_than_the_server_accepts_is_one_upload_and_one_clear_error(tmp_path):
    ref = png(tmp_path / "ref.png", size=(64, 64))
    with StandInComfyUI(max_upload_bytes=200) as comfy:  # every upload is too large for it
        state = run(ComfyUIServer(url=comfy.url, max_in_flight=2), tmp_path, ["a", "b", "c"],
                    inputs={"image": str(ref)}, retries=1)
        assert state.is_failed()
        assert comfy.requests[("POST", "/upload/image")] == 1  # a 413 is not retried, nor sent again
        assert comfy.requests[("POST", "/prompt")] == 0
    logs_say = state.message
    assert "3 of 3 generations failed" in logs_say


def test_a_path_the_system_cannot_look_up_is_one_clear_error(tmp_path):
    with pytest.raises(InputImageError, match="cannot be read"):
        read_input_image("ref", tmp_path / ("x" * 300 + ".png"))  # a name longer than the file system allows


def test_descriptions_keep_unusual_characters_and_refuse_broken_csv(tmp_path):
    text = tmp_path / "shots.txt"
    text.write_text("a fox\x85with a hat\u2028and a scarf\r\nsecond\n", encoding="utf-8")
    assert read_descriptions_file(text) == ["a fox\x85with a hat\u2028and a scarf", "second"]
    broken = tmp_path / "broken.csv"
    broken.write_text('description,image\n"a fox,x.png\nsecond,y.png\n')
    with pytest.raises(ValueError, match="not valid CSV"):
        read_descriptions_file(broken)
    long_cell = tmp_path / "long.csv"
    long_cell.write_text('description\n"' + "z" * 200_000 + '"\n')
    assert len(read_descriptions_file(long_cell)[0].description) == 200_000
