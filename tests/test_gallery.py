"""The gallery artifact: one thumbnail per generation, whose URL is ComfyUI's own /view of that file."""

from __future__ import annotations

import re
from html import unescape

import pytest
import requests
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from comfy_pipeline.blocks.server import ComfyUIServer, ComfyUIServerPool
from comfy_pipeline.blocks.workflow import ComfyUIWorkflow
from comfy_pipeline.flows.generate_content import generate_content
from comfy_pipeline.tasks.gallery import MAX_THUMBNAILS, ServerView, gallery_markdown, server_views
from comfy_pipeline.tasks.models import GenerationResult, GenerationSpec, OutputFile
from comfy_pipeline.tasks.report import table_rows
from tests.conftest import EXAMPLES
from tests.standin import StandInComfyUI

IMG = re.compile(r'<img src="([^"]+)"')
LINK = re.compile(r"\]\((http[^)]+)\)")

# The seed goes into the image's colour and the file name, so each variant differs.
SEEDED = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
          "_meta": {"title": "Empty"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "g/x"},
          "_meta": {"title": "Save"}},
    "comfy_pipeline": {"bindings": {
        "seed": "Empty.inputs.color",
        "prompt": {"path": "Save.inputs.filename_prefix", "format": "g/{slug}_{seed}"}}},
}


def gallery_of(state) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (gallery,) = [a for a in found if a.key.endswith("-gallery")]
    assert gallery.type == "markdown"
    return gallery.data


def run(server, tmp_path, descriptions, **kw):
    return generate_content(server=server, workflow=kw.pop("workflow", ComfyUIWorkflow.from_dict(SEEDED)),
                            descriptions=descriptions, character="Gal", output_dir=str(tmp_path / "out"),
                            seed_mode="increment", base_seed=1000, return_state=True, **kw)


@pytest.mark.usefixtures("prefect_api", "no_leaked_threads")
def test_the_gallery_shows_each_generation_from_the_servers_own_view_url(comfy, tmp_path):
    # readers reach the server under another name than the worker: its public_url
    public = comfy.url.replace("127.0.0.1", "localhost")
    state = run(ComfyUIServer(url=comfy.url, public_url=public), tmp_path, ["a red fox", "a blue bird"],
                variants=2)
    assert state.is_completed(), state.message
    results = state.result()
    gallery = gallery_of(state)

    urls = [unescape(u) for u in IMG.findall(gallery)]
    assert len(urls) == len(results) == 4  # one image per generation
    assert all(u.startswith(f"{public}/view?") for u in urls)
    # each URL downloads, from the stand-in's /view, exactly the bytes the run saved for that generation
    by_seed = {r.seed: r for r in results}
    for url, seed in zip(urls, (1000, 1001, 1002, 1003)):
        (file,) = by_seed[seed].files
        body = requests.get(url, timeout=5).content
        assert body == comfy.files[(file.type, file.subfolder, file.server_filename)]
        assert body == open(file.path, "rb").read()
    # grouped by description (numbered from 1), variants side by side, each with its seed and a link
    fox, bird = gallery.split("### 1. a red fox")[1].split("### 2. a blue bird")
    assert "| variant 1 | variant 2 |" in fox and "| variant 1 | variant 2 |" in bird
    assert "seed 1000" in fox and "seed 1001" in fox and "seed 1002" in bird and "seed 1003" in bird
    assert [unescape(u) for u in LINK.findall(gallery)] == urls  # "full file" links to the same files
    assert "needs an API key" not in gallery and f"`{tmp_path / 'out'}`" in gallery


@pytest.mark.usefixtures("prefect_api", "no_leaked_threads")
def test_a_server_that_needs_a_key_gets_links_and_a_note_instead_of_images(tmp_path):
    standin = StandInComfyUI(require_token="tok-gallery").start()
    try:
        pool = ComfyUIServerPool.of([ComfyUIServer(url=standin.url, api_key="tok-gallery")])
        state = run(pool, tmp_path, ["a red fox"], variants=2)
        assert state.is_completed(), state.message
        gallery = gallery_of(state)
        assert "<img" not in gallery
        assert f"`{standin.url}` needs an API key" in gallery and "tok-gallery" not in gallery
        links = [unescape(u) for u in LINK.findall(gallery)]
        assert len(links) == 2
        for url, result in zip(links, sorted(state.result(), key=lambda r: r.variant)):
            (file,) = result.files
            assert requests.get(url, timeout=5).status_code == 401  # a browser, without the key
            with_key = requests.get(url, headers={"Authorization": "Bearer tok-gallery"}, timeout=5)
            assert with_key.content == standin.files[(file.type, file.subfolder, file.server_filename)]
    finally:
        standin.stop()


@pytest.mark.usefixtures("prefect_api", "no_leaked_threads")
def test_an_animation_is_a_link_not_an_image(comfy, tmp_path):
    state = run(ComfyUIServer(url=comfy.url), tmp_path, ["a short clip"], kind="video",
                workflow=str(EXAMPLES / "smoke_video.json"))
    assert state.is_completed(), state.message
    gallery = gallery_of(state)
    assert "<img" not in gallery
    (url,) = [unescape(u) for u in LINK.findall(gallery)]
    assert "[▶ animation (webp)](" in gallery
    (file,) = state.result()[0].files
    assert requests.get(url, timeout=5).content == comfy.files[(file.type, file.subfolder, file.server_filename)]


# ------------------------------------------------------------------------------------------
# The markdown alone (no flow run)
# ------------------------------------------------------------------------------------------


def _plan(descriptions: int, variants: int) -> list[GenerationSpec]:
    total = descriptions * variants
    return [GenerationSpec(index=i, variant=v, description=f"scene {i}", seed=i * variants + v,
                           prompt_id=f"p{i}-{v}", position=i * variants + v + 1, total=total)
            for i in range(descriptions) for v in range(variants)]


def _result(spec: GenerationSpec, server: str = "http://gpu-1:8188") -> GenerationResult:
    file = OutputFile(path=f"/out/s/x_d{spec.index}_{spec.variant}.png", bytes=1, node_id="9", key="images",
                      server_filename=f"x {spec.index}&{spec.variant}_00001_.png", subfolder="s", type="output")
    return GenerationResult(kind="image", character="c", index=spec.index, variant=spec.variant,
                            description=spec.description, prompt_id=spec.prompt_id, server=server,
                            seed=spec.seed, status="completed", cached=False, files=[file], queued_s=0.0,
                            execution_s=0.0, download_s=0.0, total_s=0.0)


def _markdown(specs, outcomes, views=None):
    return gallery_markdown(specs, table_rows(specs, outcomes), outcomes, views or {}, character="c",
                            kind="image", output_dir="/out", table_key="c-image-generations")


def test_a_large_run_shows_the_first_200_then_says_how_many_more_are_in_the_table():
    specs = _plan(descriptions=125, variants=2)
    gallery = _markdown(specs, {s.position: _result(s) for s in specs})
    assert len(IMG.findall(gallery)) == MAX_THUMBNAILS == 200
    assert "### 100. scene 99" in gallery and "### 101." not in gallery
    assert gallery.rstrip().endswith("50 more are in the table `c-image-generations`.")


def test_more_variants_than_fit_side_by_side_continue_below_and_failures_say_why():
    specs = _plan(descriptions=1, variants=6)
    outcomes = {s.position: _result(s) for s in specs}
    outcomes[2] = RuntimeError("boom\n" + "x" * 300)
    gallery = _markdown(specs, outcomes)
    assert "| variant 1 | variant 2 | variant 3 | variant 4 |" in gallery and "| variant 5 | variant 6 |" in gallery
    assert len(IMG.findall(gallery)) == 5
    failed = next(line for line in gallery.splitlines() if "**failed**" in line).split(" | ")[1]
    assert failed == "seed 1<br>**failed** (RuntimeError)"  # narrow: the error is in the table and summary
    # the file name's space and & are encoded in the /view URL
    assert "/view?filename=x%200%260_00001_.png&amp;subfolder=s&amp;type=output" in gallery


def test_the_view_url_is_the_servers_url_unless_public_url_is_set():
    plain = ComfyUIServer(url="http://10.0.0.5:8188")
    behind = ComfyUIServer(url="http://10.0.0.6:8188", public_url="https://comfy.example.com/gpu2/")
    keyed = ComfyUIServer(url="http://10.0.0.7:8188", headers={"X-Token": "t"})
    views = server_views(ComfyUIServerPool.of([plain, behind, keyed]))
    assert views == {"http://10.0.0.5:8188": ServerView("http://10.0.0.5:8188", False),
                     "http://10.0.0.6:8188": ServerView("https://comfy.example.com/gpu2", False),
                     "http://10.0.0.7:8188": ServerView("http://10.0.0.7:8188", True)}
    specs = _plan(descriptions=1, variants=3)
    outcomes = {s.position: _result(s, server) for s, server in zip(specs, views)}
    gallery = _markdown(specs, outcomes, views)
    assert [u.split("/view?")[0] for u in IMG.findall(gallery)] == [
        "http://10.0.0.5:8188", "https://comfy.example.com/gpu2"]
    assert "(needs the API key)" in gallery and "`http://10.0.0.7:8188` needs an API key" in gallery
