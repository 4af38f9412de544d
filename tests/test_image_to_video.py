"""Image-to-video in one flow run: every description's image first, each video as soon as ITS
image is done, with that image as its start image (by ``[output]`` on the same server, by an
upload on another); a failed image skips its videos. Prefect's local API, stand-ins over real
sockets, files on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_pipeline.blocks.server import ComfyUIServer, ComfyUIServerPool
from comfy_pipeline.flows.generate_content import generate_content
from tests.conftest import EXAMPLES
from tests.standin import StandInComfyUI
from tests.test_flow import artifacts_of, table_of

pytestmark = pytest.mark.usefixtures("prefect_api", "no_leaked_threads")

SMOKE_IMAGE = str(EXAMPLES / "smoke_image.json")
IMG2VIDEO = str(EXAMPLES / "img2video_smoke.json")
# The description goes verbatim into CLIPTextEncode's text: the stand-in's [[fail]] marker works.
SD15 = str(EXAMPLES / "sd15_txt2img.json")


def image_to_video(server, tmp_path: Path, descriptions, **kwargs):
    kwargs.setdefault("workflow", SMOKE_IMAGE)
    return generate_content(server=server, descriptions=descriptions, kind="image_to_video",
                            video_workflow=IMG2VIDEO, character="Alice", output_dir=str(tmp_path / "out"),
                            return_state=True, **kwargs)


def load_image_values(comfy: StandInComfyUI) -> dict[str, str]:
    """``{prompt_id: LoadImage's image input}`` of every prompt the stand-in accepted that has one."""
    return {pid: node["inputs"]["image"] for pid, prompt in comfy.prompts.items()
            for node in prompt.values() if node.get("class_type") == "LoadImage"}


def test_each_video_starts_from_its_own_descriptions_image_by_output_annotation(comfy, tmp_path):
    comfy.execution_time_s = 0.8  # longer than finishing a task takes on a loaded machine
    state = image_to_video(ComfyUIServer(url=comfy.url, max_in_flight=8), tmp_path,
                           ["a red fox", "a blue bird", "a green frog"], variants=2)
    assert state.is_completed(), state.message
    results = state.result()
    images = [r for r in results if r.kind == "image"]
    videos = [r for r in results if r.kind == "video"]
    assert len(images) == 3 and len(videos) == 6
    # Each video's LoadImage read its own description's image, on the server that made it: no upload.
    image_of = {r.index: r.files[0] for r in images}
    loaded = load_image_values(comfy)
    for video in videos:
        made = image_of[video.index]
        expected = f"{made.subfolder}/{made.server_filename} [output]"
        assert loaded[video.prompt_id] == expected
        assert video.inputs == {"image": expected}
        assert video.source is not None
    assert comfy.uploads == []
    # Both stages' files are kept, named after the description and variant.
    names = sorted(Path(f.path).name for r in results for f in r.files)
    assert names == sorted([f"alice_d{d}_0.png" for d in range(3)]
                           + [f"alice_d{d}_{v}_video.webp" for d in range(3) for v in range(2)])
    # The first video ran before the last image was done: videos do not wait for every image.
    started = {e["prompt_id"]: e for e in comfy.executions}
    last_image_done = max(started[r.prompt_id]["ended"] for r in images)
    first_video_start = min(started[r.prompt_id]["started"] for r in videos)
    assert first_video_start < last_image_done


def test_a_video_on_another_server_gets_its_image_by_one_upload(tmp_path):
    with StandInComfyUI(execution_time_s=0.5) as first, StandInComfyUI(execution_time_s=0.5) as second:
        pool = ComfyUIServerPool.of([ComfyUIServer(url=first.url, max_in_flight=1),
                                     ComfyUIServer(url=second.url, max_in_flight=1)])
        state = image_to_video(pool, tmp_path, ["a red fox"], variants=2)
        assert state.is_completed(), state.message
        results = state.result()
        image = next(r for r in results if r.kind == "image")
        videos = [r for r in results if r.kind == "video"]
        made_on, other = (first, second) if image.server == first.url else (second, first)
        # one video ran where the image was made (read by annotation), the other one elsewhere
        assert sorted(v.server for v in videos) == sorted([first.url, second.url])
        assert made_on.uploads == []
        assert len(other.uploads) == 1
        upload = other.uploads[0]
        assert upload["type"] == "input" and upload["subfolder"].startswith("comfy-pipeline/")
        there = next(v for v in videos if v.server == other.url)
        assert load_image_values(other)[there.prompt_id] == f"{upload['subfolder']}/{upload['name']}"
        assert Path(image.files[0].path).read_bytes() == other.files[("input", upload["subfolder"], upload["name"])]


def test_a_failed_image_skips_its_videos_and_the_run_names_its_error(comfy, tmp_path):
    comfy.execution_time_s = 0.2
    state = image_to_video(ComfyUIServer(url=comfy.url, max_in_flight=4), tmp_path,
                           ["a red fox", "a blue bird [[fail]]", "a green frog"], variants=2, workflow=SD15,
                           retries=0)
    assert state.is_failed()
    assert "stand-in failure requested" in state.message and "skipped" in state.message
    rows = table_of(state)
    by_status: dict[str, list] = {}
    for row in rows:
        by_status.setdefault(row["status"], []).append(row)
    assert len(by_status["failed"]) == 1 and by_status["failed"][0]["stage"] == "image"
    assert len(by_status["skipped"]) == 2
    assert all(r["description"].startswith("2:") and r["stage"] == "video" for r in by_status["skipped"])
    assert all(r["error"].startswith("its image (description 2, image 1) failed: NodeExecutionError")
               for r in by_status["skipped"])
    assert len(by_status["completed"]) + len(by_status.get("cached", [])) == 6
    # the skipped videos were never sent: 3 images + 4 videos reached the server
    assert len(comfy.prompts) == 7
    summary = artifacts_of(state)["summary"].data
    assert "2 skipped" in summary and "its 2 video(s) were skipped" in summary


def readme_image_to_video_command(server_url: str, folder: Path) -> list[str]:
    """The README's image-to-video command (its third ``bash`` block of "Input images and
    image-to-video"), as argv, pointed at ``server_url`` and writing into ``folder``."""
    import re
    import shlex

    from tests.conftest import ROOT

    section = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("\n## Input images and image-to-video\n")[1]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    argv = shlex.split(next(b for b in blocks if "image-to-video" in b).replace("\\\n", " "))
    argv = [server_url if a == "http://127.0.0.1:8188" else a for a in argv]
    argv = [str(ROOT / a) if a.startswith("examples/") else a for a in argv]
    argv[argv.index("--output-dir") + 1] = str(folder / "output")
    argv[argv.index("--descriptions") + 1] = str(folder / "shots.txt")
    return argv[1:]  # without the program name


def test_the_readme_image_to_video_command_runs_both_stages(comfy, tmp_path):
    from tests.test_cli import comfy_pipeline

    (tmp_path / "shots.txt").write_text("alice waving\nalice running\n")
    out = comfy_pipeline(*readme_image_to_video_command(comfy.url, tmp_path))
    assert out.returncode == 0, out.output
    files = sorted(p.name for p in (tmp_path / "output").rglob("*") if p.is_file())
    assert files == ["alice_d0_0.png", "alice_d0_0_video.webp", "alice_d0_1_video.webp",
                     "alice_d1_0.png", "alice_d1_0_video.webp", "alice_d1_1_video.webp"]
    assert "alice-image-to-video-summary" in out.output
    # without --video-workflow the command stops before anything starts
    bare = [a for a in readme_image_to_video_command(comfy.url, tmp_path)]
    at = bare.index("--video-workflow")
    out = comfy_pipeline(*(bare[:at] + bare[at + 2:]))
    assert out.returncode == 2 and "needs --video-workflow" in out.output
    assert comfy.requests[("POST", "/prompt")] == 6


def test_with_two_images_per_description_each_image_gets_its_own_videos(comfy, tmp_path):
    state = image_to_video(ComfyUIServer(url=comfy.url, max_in_flight=4), tmp_path, ["a red fox"],
                           variants=2, image_variants=2)
    assert state.is_completed(), state.message
    results = state.result()
    images = {r.prompt_id: r for r in results if r.kind == "image"}
    videos = [r for r in results if r.kind == "video"]
    assert len(images) == 2 and len(videos) == 4
    by_position = {}
    for spec_position, image in zip(sorted({v.source for v in videos}), sorted(images.values(), key=lambda r: r.variant)):
        by_position[spec_position] = image
    loaded = load_image_values(comfy)
    for video in videos:
        image = by_position[video.source]
        assert loaded[video.prompt_id] == f"{image.files[0].subfolder}/{image.files[0].server_filename} [output]"
    # videos 0-1 come from image 0, videos 2-3 from image 1; every file name is distinct
    assert sorted((v.variant, by_position[v.source].variant) for v in videos) == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert len({f.path for r in results for f in r.files}) == 6


def test_videos_never_go_ahead_of_another_clients_queued_prompts(comfy, tmp_path):
    """``"front": true`` puts a video before this run's own queued images only: on a shared server
    another client's prompts, queued earlier, still run first."""
    import json
    import threading
    import time

    import requests

    comfy.execution_time_s = 0.3
    theirs = json.loads(Path(SMOKE_IMAGE).read_text())
    theirs.pop("comfy_pipeline")
    theirs["9"] = {"class_type": "PrimitiveString", "inputs": {"value": "someone else's prompt"}}

    def another_client():
        while not comfy.executions:  # our image runs: another client queues two prompts
            time.sleep(0.01)
        for _ in range(2):
            requests.post(f"{comfy.url}/prompt", json={"prompt": theirs, "client_id": "someone-else"},
                          timeout=10).raise_for_status()

    thread = threading.Thread(target=another_client)
    thread.start()
    state = image_to_video(ComfyUIServer(url=comfy.url, max_in_flight=2), tmp_path, ["a red fox"], variants=1)
    thread.join()
    assert state.is_completed(), state.message
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (len(comfy.executions) == 4
                                               and all(e["ended"] for e in comfy.executions)):
        time.sleep(0.05)
    order = ["theirs" if "someone else's prompt" in e["strings"] else "ours"
             for e in sorted(comfy.executions, key=lambda e: e["started"])]
    assert order == ["ours", "theirs", "theirs", "ours"]


def test_on_one_slot_each_video_runs_right_after_its_own_image(comfy, tmp_path):
    """One server with max_in_flight=1: the order is image 1, its video, image 2, its video, ...
    A run that kept a spare generation in flight would have the next image already waiting for
    the slot a finished image gives back, taking it before that image's video is submitted."""
    comfy.execution_time_s = 0.3
    state = generate_content(server=ComfyUIServer(url=comfy.url, max_in_flight=1), kind="image_to_video",
                             descriptions=["a", "b", "c", "d"], workflow=SMOKE_IMAGE, video_workflow=IMG2VIDEO,
                             character="Alice", output_dir=str(tmp_path / "out"), return_state=True)
    assert state.is_completed(), state.message
    stage_of = {r.prompt_id: f"{r.kind[0]}{r.index}" for r in state.result()}
    order = [stage_of[e["prompt_id"]] for e in sorted(comfy.executions, key=lambda e: e["started"])]
    assert order == ["i0", "v0", "i1", "v1", "i2", "v2", "i3", "v3"]
