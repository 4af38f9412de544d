"""The report of an image_to_video run (images, then videos made from them): table, summary, gallery.

Pure functions on specs, results and Stopped outcomes built here; no server, no flow run.
"""

from __future__ import annotations

import re
from html import unescape

from comfy_pipeline.blocks.errors import NodeExecutionError
from comfy_pipeline.tasks import report
from comfy_pipeline.tasks.gallery import COLUMNS, gallery_markdown
from comfy_pipeline.tasks.models import GenerationResult, GenerationSpec, OutputFile
from comfy_pipeline.tasks.report import RunFacts, Stopped, error_texts, summary_markdown, table_rows

IMAGE_SERVER = "http://gpu-1:8188"
VIDEO_SERVER = "http://gpu-2:8188"


def _plan(descriptions: int, images: int, videos: int) -> list[GenerationSpec]:
    """Description-major, as the flow plans it: each description's images, then ``videos`` videos
    from each image (a video's ``variant`` counts the description's videos from 0)."""
    specs: list[GenerationSpec] = []
    total = descriptions * images * (1 + videos)
    for i in range(descriptions):
        first = len(specs) + 1
        for v in range(images):
            specs.append(GenerationSpec(index=i, variant=v, description=f"scene {i}", seed=100 * i + v,
                                        prompt_id=f"img-{i}-{v}", position=len(specs) + 1, total=total))
        for v in range(images * videos):
            specs.append(GenerationSpec(index=i, variant=v, description=f"scene {i}", seed=100 * i + 50 + v,
                                        prompt_id=f"vid-{i}-{v}", position=len(specs) + 1, total=total,
                                        stage="video", source=first + v // videos))
    return specs


def _result(spec: GenerationSpec, execution_s: float = 2.0) -> GenerationResult:
    video = spec.stage == "video"
    name = f"{spec.prompt_id}_00001_.{'mp4' if video else 'png'}"
    file = OutputFile(path=f"/out/{name}", bytes=10, node_id="9", key="videos" if video else "images",
                      server_filename=name, subfolder="s", type="output")
    return GenerationResult(kind=spec.stage, character="alice", index=spec.index, variant=spec.variant,
                            description=spec.description, prompt_id=spec.prompt_id,
                            server=VIDEO_SERVER if video else IMAGE_SERVER, seed=spec.seed, status="completed",
                            cached=False, files=[file], queued_s=0.5, execution_s=execution_s, download_s=0.1,
                            total_s=execution_s + 1, source=spec.source)


def _outcomes(specs: list[GenerationSpec], failed_images: set[tuple[int, int]]) -> dict:
    """Every generation completed, except the images ``(index, variant)`` named, which failed;
    their videos were skipped, as the flow records them."""
    outcomes: dict = {}
    by_position = {s.position: s for s in specs}
    for spec in specs:
        image = by_position[spec.source] if spec.source is not None else None
        if spec.stage == "image" and (spec.index, spec.variant) in failed_images:
            outcomes[spec.position] = NodeExecutionError(spec.prompt_id, "7", "KSampler", "RuntimeError", "CUDA OOM")
        elif image is not None and (image.index, image.variant) in failed_images:
            error = report.describe_error(outcomes[image.position])
            outcomes[spec.position] = Stopped(
                status="skipped", reason=f"its image (description {image.index + 1}, variant {image.variant + 1}) "
                                         f"failed: {error}")
        else:
            outcomes[spec.position] = _result(spec)
    return outcomes


def _facts(**kw) -> RunFacts:
    kw = {"kind": "image_to_video", "wall_s": 60.0, **kw}
    return RunFacts(character="alice", server_url=IMAGE_SERVER, output_dir="/out", **kw)


# Two descriptions, one image and two videos each; description 2's image failed.
SPECS = _plan(descriptions=2, images=1, videos=2)
OUTCOMES = _outcomes(SPECS, failed_images={(1, 0)})


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------


def test_each_row_says_its_stage_and_which_image_a_video_started_from():
    rows = table_rows(SPECS, OUTCOMES)
    assert list(rows[0]) == ["status", "stage", "description", "variant", "from", "seed", "total_s", "files",
                             "error", "queued_s", "execution_s", "download_s", "server", "prompt_id"]
    assert [(r["status"], r["stage"], r["description"], r["variant"], r["from"]) for r in rows] == [
        ("completed", "image", "1: scene 0", 1, ""),
        ("completed", "video", "1: scene 0", 1, "image 1"),
        ("completed", "video", "1: scene 0", 2, "image 1"),
        ("failed", "image", "2: scene 1", 1, ""),
        ("skipped", "video", "2: scene 1", 1, "image 1"),
        ("skipped", "video", "2: scene 1", 2, "image 1"),
    ]
    # a skipped video says why in its error cell; the failed image has its own error
    assert rows[4]["error"].startswith("its image (description 2, variant 1) failed: NodeExecutionError: ")
    assert rows[3]["error"].startswith("NodeExecutionError: ComfyUI node 7 (KSampler) failed in prompt img-1-0")
    assert rows[1]["files"] == "/out/vid-0-0_00001_.mp4" and rows[1]["server"] == VIDEO_SERVER


def test_a_video_names_the_image_it_started_from_among_several():
    specs = _plan(descriptions=1, images=2, videos=2)
    assert [(r["stage"], r["variant"], r["from"]) for r in table_rows(specs, {})] == [
        ("image", 1, ""), ("image", 2, ""),
        ("video", 1, "image 1"), ("video", 2, "image 1"), ("video", 3, "image 2"), ("video", 4, "image 2")]


def test_a_run_of_one_stage_keeps_todays_columns():
    specs = [GenerationSpec(index=0, variant=v, description="scene", seed=v, prompt_id=f"p{v}", position=v + 1,
                            total=2, stage="video") for v in range(2)]
    rows = table_rows(specs, {})
    assert list(rows[0]) == ["status", "description", "variant", "seed", "total_s", "files", "error",
                             "queued_s", "execution_s", "download_s", "server", "prompt_id"]


# ------------------------------------------------------------------------------------------
# The summary
# ------------------------------------------------------------------------------------------


def _summary(specs=SPECS, outcomes=OUTCOMES, files_written=3, **facts) -> str:
    return summary_markdown(table_rows(specs, outcomes), _facts(**facts), files_written,
                            errors=error_texts(specs, outcomes))


def test_the_summary_counts_skipped_videos_and_names_what_failed():
    summary = _summary()
    assert summary.startswith("# alice: image-to-video generations\n")
    assert ("\n**3 of 6 generations succeeded**, 1 failed, 2 skipped (images: 1 of 2, videos: 2 of 4).\n"
            in summary)
    assert "| failed | 1 |\n| skipped (their image failed) | 2 |\n" in summary
    (failure,) = [line for line in summary.splitlines() if line.startswith("- ")]
    assert failure == ("- description 2, image 1 (prompt_id `img-1-0`): NodeExecutionError: ComfyUI node 7 "
                       "(KSampler) failed in prompt img-1-0: RuntimeError: CUDA OOM. Check the node's inputs "
                       "and the ComfyUI server log. — its 2 video(s) were skipped")


def test_a_failed_video_is_named_by_its_number_and_skips_nothing():
    specs = _plan(descriptions=1, images=2, videos=2)
    outcomes = _outcomes(specs, failed_images={(0, 1)})
    outcomes[4] = RuntimeError("decoder crashed")  # video 2 (from image 1)
    failures = [line for line in _summary(specs, outcomes).splitlines() if line.startswith("- ")]
    assert failures == [
        "- description 1, image 2 (prompt_id `img-0-1`): NodeExecutionError: ComfyUI node 7 (KSampler) failed in "
        "prompt img-0-1: RuntimeError: CUDA OOM. Check the node's inputs and the ComfyUI server log. — its 2 "
        "video(s) were skipped",
        "- description 1, video 2 (prompt_id `vid-0-1`): RuntimeError: decoder crashed",
    ]


def test_throughput_and_busy_time_count_both_stages():
    summary = _summary(wall_s=30.0, servers=[IMAGE_SERVER, VIDEO_SERVER])
    # image 1 and its 2 videos ran (3 in 30 s); the failed image and the skipped videos did not
    assert "| completed (this attempt) | 3 |" in summary
    assert "| generations per minute (this attempt) | 6.0 |" in summary
    assert f"| {IMAGE_SERVER} | 1 | 2.0 |" in summary and f"| {VIDEO_SERVER} | 2 | 4.0 |" in summary


def test_a_run_without_skipped_videos_says_none_were_skipped_and_one_stage_runs_say_nothing():
    clean = _summary(outcomes=_outcomes(SPECS, failed_images=set()))
    assert "\n**6 of 6 generations succeeded**, 0 failed (images: 2 of 2, videos: 4 of 4).\n" in clean
    assert "| skipped (their image failed) | 0 |" in clean and "## Failures" not in clean
    specs = [s for s in SPECS if s.stage == "image"]
    one_stage = summary_markdown(table_rows(specs, OUTCOMES), _facts(kind="image"), 1)
    assert one_stage.startswith("# alice: image generations\n") and "skipped" not in one_stage
    assert "- description 2, variant 1 (prompt_id `img-1-0`): NodeExecutionError: " in one_stage


def test_write_report_counts_the_files_of_both_stages_under_readable_names(monkeypatch):
    made: dict[str, dict] = {}
    monkeypatch.setattr(report, "create_table_artifact", lambda **kw: made.__setitem__(kw["key"], kw))
    monkeypatch.setattr(report, "create_markdown_artifact", lambda **kw: made.__setitem__(kw["key"], kw))
    rows = report.write_report(SPECS, OUTCOMES, _facts())
    assert set(made) == {"alice-image-to-video-generations", "alice-image-to-video-summary",
                         "alice-image-to-video-gallery"}
    assert made["alice-image-to-video-generations"]["table"] == rows
    assert made["alice-image-to-video-summary"]["description"] == "Summary of the image-to-video generations for alice."
    # 1 image and 2 videos wrote a file each
    assert "| files written (this attempt) | 3 |" in made["alice-image-to-video-summary"]["markdown"]
    assert made["alice-image-to-video-gallery"]["markdown"].startswith("# alice: image-to-video gallery\n")


# ------------------------------------------------------------------------------------------
# The gallery
# ------------------------------------------------------------------------------------------

IMG = re.compile(r'<img src="([^"]+)"')


def _gallery(specs, outcomes) -> str:
    return gallery_markdown(specs, table_rows(specs, outcomes), outcomes, {}, character="alice",
                            kind="image_to_video", output_dir="/out", table_key="alice-image-to-video-generations")


def _tables(section: str) -> list[tuple[list[str], list[str]]]:
    """``(headers, cells)`` of each markdown table of a gallery section, in order."""
    tables = []
    for block in section.split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) == 3 and lines[1].startswith("|---"):
            tables.append((lines[0].strip("| ").split(" | "), lines[2].strip("| ").split(" | ")))
    return tables


def test_the_gallery_pairs_each_image_with_its_videos():
    gallery = _gallery(SPECS, OUTCOMES)
    assert gallery.startswith("# alice: image-to-video gallery\n")
    first, second = gallery.split("### 1. scene 0")[1].split("### 2. scene 1")
    ((headers, cells),) = _tables(first)
    assert headers == ["image 1", "video 1", "video 2"]
    # the image's thumbnail first, then its videos, linked (a browser does not embed them)
    assert unescape(IMG.findall(cells[0])[0]).endswith("/view?filename=img-0-0_00001_.png&subfolder=s&type=output")
    assert 'alt="description 1, image 1"' in cells[0]
    assert "filename=vid-0-0_00001_.mp4" in cells[1] and "[▶ video (mp4)](" in cells[1] and "<img" not in cells[1]
    assert "filename=vid-0-1_00001_.mp4" in cells[2]
    # description 2: its image failed, its videos never ran
    ((headers, cells),) = _tables(second)
    assert headers == ["image 1", "video 1", "video 2"]
    assert cells == ["seed 100<br>**failed** (NodeExecutionError)", "seed 150<br>**skipped**",
                     "seed 151<br>**skipped**"]


def test_each_image_gets_its_own_table_and_its_videos_continue_past_the_columns():
    videos = COLUMNS + 1  # the image and its videos fill one row and go on in another
    specs = _plan(descriptions=1, images=2, videos=videos)
    tables = _tables(_gallery(specs, _outcomes(specs, failed_images=set())))
    assert [headers for headers, _ in tables] == [
        ["image 1", "video 1", "video 2", "video 3"], ["video 4", "video 5"],
        # videos are numbered within the description, as in the table, the terminal and the file names
        ["image 2", "video 6", "video 7", "video 8"], ["video 9", "video 10"],
    ]
    # each cell is the generation its header names: image 2's videos are the description's videos 6 to 10
    files = [re.search(r"filename=([^&]+)", cell).group(1) for _, cells in tables for cell in cells]
    assert files == (["img-0-0_00001_.png"] + [f"vid-0-{v}_00001_.mp4" for v in range(5)]
                     + ["img-0-1_00001_.png"] + [f"vid-0-{v}_00001_.mp4" for v in range(5, 10)])


def test_a_gallery_cut_short_keeps_the_pairs_it_shows():
    gallery = gallery_markdown(SPECS, table_rows(SPECS, OUTCOMES), OUTCOMES, {}, character="alice",
                               kind="image_to_video", output_dir="/out", table_key="t", limit=4)
    assert [h for h, _ in _tables(gallery)] == [["image 1", "video 1", "video 2"], ["image 1"]]
    assert gallery.rstrip().endswith("2 more are in the table `t`.")
