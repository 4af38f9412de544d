"""The stand-in's POST /upload/image, LoadImage, image-to-video nodes and their records and faults, over
real sockets, checked against transcript k (uploads and an image-to-video shaped graph)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import uuid
from pathlib import Path

import pytest
import requests

from comfy_pipeline.testing.standin import make_png
from tests.standin import TRANSCRIPTS, StandInComfyUI
from tests.test_standin import Sock, history, png_chunks, post, shape, submit, texts, types

pytestmark = pytest.mark.timeout(30)

K = "k_upload_image_and_img2video.json"
#: Where the recordings were first shared, for as long as ``tests/transcripts`` lacks transcript k.
SHARED_TRANSCRIPTS = Path("/work/shared/comfyui-transcripts")


def load_k() -> dict:
    for folder in (TRANSCRIPTS, SHARED_TRANSCRIPTS):
        path = folder / K
        if path.is_file():
            return json.loads(path.read_text())
    pytest.skip(f"transcript {K} is not available")


def shared_object_info() -> dict:
    for folder in (SHARED_TRANSCRIPTS, TRANSCRIPTS):
        path = folder / "object_info_subset.json"
        if path.is_file():
            nodes = json.loads(path.read_text())["nodes"]
            if "RepeatImageBatch" in nodes:
                return nodes
    return {}


def upload(comfy: StandInComfyUI, name: str, data: bytes, **fields) -> requests.Response:
    return requests.post(f"{comfy.url}/upload/image", files={"image": (name, data, "image/png")}, data=fields,
                         timeout=5)


def view(comfy: StandInComfyUI, ref: dict) -> requests.Response:
    return requests.get(f"{comfy.url}/view", params=ref, timeout=5)


def png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", dict(png_chunks(data))[b"IHDR"][:8])


def blob_tag(data: bytes) -> dict:
    """The JSON detail a stand-in blob output (webp, mp4, ...) carries."""
    return json.loads(re.search(rb"stand-in ComfyUI output (\{.*?\})", data).group(1))


def segments(recorded: dict) -> list[list[dict]]:
    """The recorded text frames after the hello, split per prompt (each ends with executing null)."""
    out, current = [], []
    for w in recorded["ws"][2:]:
        if w["kind"] != "text":
            continue
        current.append(w["msg"])
        if w["msg"]["type"] == "executing" and w["msg"]["data"]["node"] is None:
            out.append(current)
            current = []
    return out


def load_image_graph(image: str, prefix: str = "t/i2v", amount: int = 6) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": amount}},
        "3": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["2", 0], "filename_prefix": prefix, "fps": 6.0,
                                                           "lossless": False, "quality": 80, "method": "default"}},
    }


def save_loaded(image: str, prefix: str = "t/load") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


# --------------------------------------------------------------------------------------------- k: replay


def test_upload_sequence_matches_transcript_k(comfy):
    recorded = load_k()
    uploads = [h for h in recorded["http"] if h["path"] == "/upload/image"]
    assert len(uploads) == 4
    sent = []
    for i, exchange in enumerate(uploads):
        multipart = dict(exchange["multipart"])
        image = multipart.pop("image")
        data = make_png(8 + i, 8, (i * 40, 10, 200))  # different bytes each time, as recorded (sha256s differ)
        response = upload(comfy, image["filename"], data, **multipart)
        assert response.status_code == exchange["status"] == 200, exchange["label"]
        assert response.headers["Content-Type"] == exchange["content_type"]
        assert response.json() == exchange["response_json"], exchange["label"]
        assert list(response.json()) == ["name", "subfolder", "type"]
        sent.append(data)

    assert comfy.files[("input", "", "k_ref_230945.png")] == sent[2]  # overwritten by the third
    assert comfy.files[("input", "", "k_ref_230945 (1).png")] == sent[1]
    assert comfy.files[("input", "characters/alice", "k_ref_230945.png")] == sent[3]
    choices = requests.get(f"{comfy.url}/object_info/LoadImage", timeout=5).json()["LoadImage"]
    assert {"k_ref_230945.png", "k_ref_230945 (1).png", "characters/alice/k_ref_230945.png"} <= set(
        choices["input"]["required"]["image"][0])
    got = view(comfy, {"filename": "k_ref_230945.png", "subfolder": "characters/alice", "type": "input"})
    assert got.status_code == 200 and got.content == sent[3]

    records = comfy.uploads
    assert [r["name"] for r in records] == [u["response_json"]["name"] for u in uploads]
    assert [r["overwrite"] for r in records] == [False, False, True, False]
    assert [r["duplicate"] for r in records] == [False] * 4
    assert [r["subfolder"] for r in records] == ["", "", "", "characters/alice"]
    assert all(r["filename"] == "k_ref_230945.png" and r["type"] == "input" for r in records)
    assert [r["sha256"] for r in records] == [hashlib.sha256(d).hexdigest() for d in sent]
    assert [r["bytes"] for r in records] == [len(d) for d in sent]
    assert all(a["at"] <= b["at"] for a, b in zip(records, records[1:]))
    assert set(records[0]) == {"filename", "subfolder", "type", "overwrite", "name", "sha256", "bytes", "duplicate",
                               "at"}


def test_image_to_video_graph_and_chain_from_output_match_transcript_k(comfy):
    recorded = load_k()
    recorded_segments = segments(recorded)
    assert len(recorded_segments) == 3
    posts = [h for h in recorded["http"] if h["method"] == "POST" and h["path"] == "/prompt"]
    histories = [h for h in recorded["http"] if h["path"].startswith("/history/")]
    views = [h for h in recorded["http"] if h["path"] == "/view"]
    sock = Sock(comfy, uuid.uuid4().hex)
    assert shape([sock.hello]) == shape([recorded["ws"][1]["msg"]])
    reference = make_png(48, 40, (200, 120, 40))
    answer = upload(comfy, "k_ref_230945.png", reference, subfolder="characters/alice", type="input").json()
    assert f"{answer['subfolder']}/{answer['name']}" == recorded["workflows"]["img2video"]["1"]["inputs"]["image"]

    # The image-to-video shaped graph on the uploaded file.
    workflow = recorded["workflows"]["img2video"]
    assert posts[0]["request_json"]["prompt"] == workflow
    i2v = submit(comfy, workflow, sock.client_id)
    frames = sock.until_done(i2v)
    assert shape(frames) == shape(recorded_segments[0])
    assert [f["data"]["node"] for f in texts(frames) if f["type"] == "executing"] == ["1", "2", "3", None]
    executed = next(f for f in frames if f["type"] == "executed")["data"]
    recorded_outputs = next(iter(histories[0]["response_json"].values()))["outputs"]
    assert {"3": executed["output"]} == recorded_outputs
    assert recorded_outputs["3"]["animated"] == [True]
    entry = history(comfy, i2v)[i2v]
    recorded_entry = next(iter(histories[0]["response_json"].values()))
    assert list(entry) == list(recorded_entry)
    assert entry["outputs"] == recorded_outputs and entry["meta"] == recorded_entry["meta"]
    assert entry["status"]["status_str"] == "success"
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in recorded_entry["status"]["messages"]]
    webp = view(comfy, views[0]["params"])
    assert webp.status_code == 200 and webp.headers["Content-Type"] == views[0]["content_type"]
    assert webp.headers["Content-Disposition"] == views[0]["headers"]["Content-Disposition"]
    assert webp.content[:4] == b"RIFF" and webp.content[8:12] == b"WEBP"
    assert blob_tag(webp.content) == {"prompt_id": i2v, "node": "3", "filename": "k_i2v_00001_.webp",
                                      "width": 48, "height": 40, "frames": 6}

    # A still image, then a chain from that OUTPUT via "<subfolder>/<file> [output]".
    still = submit(comfy, posts[1]["request_json"]["prompt"], sock.client_id)
    frames = sock.until_done(still)
    assert shape(frames) == shape(recorded_segments[1])
    assert history(comfy, still)[still]["outputs"] == next(iter(histories[1]["response_json"].values()))["outputs"]
    chain_workflow = recorded["workflows"]["chain_from_output"]
    assert chain_workflow["1"]["inputs"]["image"] == "transcripts/k_still_00001_.png [output]"
    chain = submit(comfy, chain_workflow, sock.client_id)
    frames = sock.until_done(chain)
    assert shape(frames) == shape(recorded_segments[2])
    assert history(comfy, chain)[chain]["outputs"] == next(iter(histories[2]["response_json"].values()))["outputs"]
    webp = view(comfy, views[1]["params"])
    assert webp.headers["Content-Type"] == "image/webp"
    detail = blob_tag(webp.content)
    assert (detail["width"], detail["height"], detail["frames"]) == (32, 32, 4)  # EmptyImage 32x32, amount 4

    # A LoadImage of a file that is not there: the recorded 400, byte for byte as JSON.
    missing = posts[3]
    response = post(comfy, missing["request_json"]["prompt"], sock.client_id)
    assert response.status_code == missing["status"] == 400
    assert response.json() == missing["response_json"]
    assert response.headers["Content-Type"] == missing["content_type"]

    assert list(comfy.prompts) == [i2v, still, chain]
    assert comfy.prompts[chain] == chain_workflow
    sock.close()


# --------------------------------------------------------------------------------------------- uploads


def test_duplicates_numbered_renames_and_overwrite_flags(comfy):
    a, b, c = (make_png(4, 4, (n, n, n)) for n in (1, 2, 3))
    assert upload(comfy, "x.png", a).json() == {"name": "x.png", "subfolder": "", "type": "input"}
    assert upload(comfy, "x.png", a).json()["name"] == "x.png"  # identical bytes: a duplicate
    assert upload(comfy, "x.png", b).json()["name"] == "x (1).png"
    assert upload(comfy, "x.png", c).json()["name"] == "x (2).png"
    assert upload(comfy, "x.png", b).json()["name"] == "x (1).png"  # identical to the first rename
    assert upload(comfy, "x.png", c, overwrite="True").json()["name"] == "x (2).png"  # only "true" / "1"
    assert upload(comfy, "x.png", c, overwrite="1").json()["name"] == "x.png"
    assert comfy.files[("input", "", "x.png")] == c
    assert [(r["name"], r["duplicate"], r["overwrite"]) for r in comfy.uploads] == [
        ("x.png", False, False), ("x.png", True, False), ("x (1).png", False, False), ("x (2).png", False, False),
        ("x (1).png", True, False), ("x (2).png", True, False), ("x.png", False, True)]
    assert sorted(k for k in comfy.files if k[0] == "input") == [
        ("input", "", "x (1).png"), ("input", "", "x (2).png"), ("input", "", "x.png")]

    # Names without an extension, other folders, subfolders (echoed as sent, stored normalised).
    assert upload(comfy, "noext", a).json()["name"] == "noext"
    assert upload(comfy, "noext", b).json()["name"] == "noext (1)"
    assert upload(comfy, "x.png", b, type="output").json() == {"name": "x.png", "subfolder": "", "type": "output"}
    assert upload(comfy, "x.png", b, type="temp", subfolder="a/./b/").json() == {
        "name": "x.png", "subfolder": "a/./b/", "type": "temp"}
    assert comfy.files[("temp", "a/b", "x.png")] == b
    assert upload(comfy, "x.png", c, type="temp", subfolder="a/b").json()["name"] == "x (1).png"
    assert ("output", "", "x.png") in comfy.files
    assert not [n for n in comfy.input_images if n.startswith("a/")]  # only input uploads are listed
    answer = upload(comfy, "deep/y.png", a, subfolder="s").json()  # a filename may go deeper
    assert answer == {"name": "deep/y.png", "subfolder": "s", "type": "input"}
    assert comfy.files[("input", "s/deep", "y.png")] == a and "s/deep/y.png" in comfy.input_images


def test_upload_refusals(comfy):
    png = make_png(4, 4, (9, 9, 9))
    for fields, name in [({"subfolder": "../escape"}, "x.png"), ({"subfolder": "/abs"}, "x.png"),
                         ({}, "../x.png"), ({"subfolder": "a"}, "../../x.png")]:
        response = upload(comfy, name, png, **fields)
        assert response.status_code == 400, (fields, name)
    # aiohttp's multipart parser (ComfyUI's too) strips leading slashes from a filename.
    assert upload(comfy, "/etc/x.png", png).json()["name"] == "etc/x.png"
    assert upload(comfy, "ok.png", png, subfolder="a/../b").json()["subfolder"] == "a/../b"  # stays inside
    assert ("input", "b", "ok.png") in comfy.files
    response = requests.post(f"{comfy.url}/upload/image", data={"subfolder": "x"}, timeout=5)  # no image
    assert response.status_code == 400
    response = upload(comfy, "x.png", png, type="models")  # get_dir_by_type leaves the folder unbound
    assert response.status_code == 500 and response.text.startswith("500 Internal Server Error")
    response = upload(comfy, "b", png)  # the folder b/ holds ok.png: opening it as a file fails
    assert response.status_code == 500
    assert [r["name"] for r in comfy.uploads] == ["etc/x.png", "ok.png"]
    assert [k for k in comfy.files if k[2] == "x.png"] == [("input", "etc", "x.png")]


def test_upload_faults_and_records_reset(comfy):
    png = make_png(6, 6, (1, 2, 3))
    comfy.fail_uploads(2, status=503)
    for _ in range(2):
        response = upload(comfy, "f.png", png)
        assert response.status_code == 503 and response.text.startswith("503 Service Unavailable")
        assert response.headers["Content-Type"].startswith("text/plain")
    assert not comfy.uploads and ("input", "", "f.png") not in comfy.files and "f.png" not in comfy.input_images
    assert upload(comfy, "f.png", png).json()["name"] == "f.png"

    comfy.drop_uploads(1)
    other = make_png(6, 6, (3, 2, 1))
    with pytest.raises(requests.ConnectionError):
        upload(comfy, "g.png", other)
    assert comfy.files[("input", "", "g.png")] == other and "g.png" in comfy.input_images  # stored anyway
    assert [r["name"] for r in comfy.uploads] == ["f.png"]  # no answer, no record
    retry = upload(comfy, "g.png", other)  # the retry of an ambiguous upload is a duplicate
    assert retry.json()["name"] == "g.png" and comfy.uploads[-1]["duplicate"] is True

    comfy.fail_uploads(5)
    comfy.drop_uploads(5)
    comfy.clear_faults()
    assert upload(comfy, "h.png", png).status_code == 200
    assert upload(comfy, "h.png", png).status_code == 200

    comfy.fail_uploads(1)  # status defaults to 500
    assert upload(comfy, "h.png", png).status_code == 500

    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, save_loaded("g.png"), sock.client_id)
    sock.until_done(pid)
    assert comfy.uploads and comfy.prompts == {pid: save_loaded("g.png")}
    comfy.reset_counters()
    assert comfy.uploads == [] and comfy.prompts == {}
    sock.close()


def test_prompts_record_and_execution_times(comfy):
    comfy.execution_time_s = 0.1
    sock = Sock(comfy, uuid.uuid4().hex)
    first = submit(comfy, save_loaded("example.png", "pr/a"), sock.client_id, prompt_id="first")
    second = submit(comfy, save_loaded("example.png", "pr/b"), sock.client_id)
    assert post(comfy, save_loaded("missing.png"), sock.client_id).status_code == 400  # not queued
    comfy.fail_prompt_posts(1)
    assert post(comfy, save_loaded("example.png", "pr/c"), sock.client_id, prompt_id="failed").status_code == 500
    comfy.drop_prompt_posts(1)
    with pytest.raises(requests.ConnectionError):
        post(comfy, save_loaded("example.png", "pr/d"), sock.client_id, prompt_id="dropped")
    sock.until_done("dropped")
    assert list(comfy.prompts) == [first, second, "dropped"]
    assert comfy.prompts[second] == save_loaded("example.png", "pr/b")
    runs = {r["prompt_id"]: r for r in comfy.executions}
    assert runs[first]["ended"] <= runs[second]["started"] <= runs[second]["ended"] <= runs["dropped"]["started"]
    assert all(r["outcome"] == "success" for r in runs.values())
    sock.close()


# --------------------------------------------------------------------------------------------- LoadImage


def test_load_image_validation_by_folder_annotation(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    preview = submit(comfy, {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 16, "batch_size": 1, "color": 7}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "la/out"}},
    }, sock.client_id)
    sock.until_done(preview)
    outputs = history(comfy, preview)[preview]["outputs"]
    temp_name = outputs["2"]["images"][0]["filename"]
    upload(comfy, "in.png", make_png(10, 12, (5, 5, 5)), subfolder="up")

    def errors(image: str):
        response = post(comfy, save_loaded(image), sock.client_id)
        if response.status_code == 200:
            sock.until_done(response.json()["prompt_id"])
            return None
        return response.json()

    for good in ["la/out_00001_.png [output]", f"{temp_name} [temp]", "up/in.png [input]", "up/in.png",
                 "example.png", "example.png [input]", "la/./x/../out_00001_.png [output]"]:
        assert errors(good) is None, good
    for bad in ["la/out_00001_.png", "la/out_00001_.png [input]", "la/out_00002_.png [output]",
                "la/out_00001_.png[output]",  # ComfyUI cuts the tag and the character before it
                f"{temp_name} [output]", "in.png", "up/in.png [temp]", "../up/in.png", "example.png [output]"]:
        body = errors(bad)
        assert body is not None, bad
        assert body["node_errors"]["1"]["errors"] == [{
            "type": "custom_validation_failed", "message": "Custom validation failed for node",
            "details": f"image - Invalid image file: {bad}", "extra_info": {"input_name": "image"}}], bad
        assert body["error"]["type"] == "prompt_outputs_failed_validation"
    comfy.input_images.remove("example.png")
    assert errors("example.png") is not None
    sock.close()


def test_load_image_size_repeat_batch_and_vae_encode(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    upload(comfy, "wide.png", make_png(44, 30, (10, 20, 30)))
    upload(comfy, "photo.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 60)  # not a PNG: the 64x64 placeholder

    def saved_sizes(prompt: dict, node: str = "9") -> list[tuple[int, int]]:
        pid = submit(comfy, prompt, sock.client_id)
        frames = sock.until_done(pid)
        assert "execution_success" in types(frames), frames
        refs = history(comfy, pid)[pid]["outputs"][node]["images"]
        return [png_size(view(comfy, ref).content) for ref in refs]

    def saving(image_node: list, **nodes) -> dict:
        return {**nodes, "9": {"class_type": "SaveImage", "inputs": {"images": image_node, "filename_prefix": "sz/x"}}}

    load = {"class_type": "LoadImage", "inputs": {"image": "wide.png"}}
    assert saved_sizes(saving(["1", 0], **{"1": load})) == [(44, 30)]
    assert saved_sizes(saving(["1", 0], **{"1": {"class_type": "LoadImage", "inputs": {"image": "photo.jpg"}}})) == \
        [(64, 64)]
    assert saved_sizes(saving(["1", 0], **{"1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}})) == \
        [(64, 64)]
    repeat = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 3}}
    assert saved_sizes(saving(["2", 0], **{"1": load, "2": repeat})) == [(44, 30)] * 3

    # VAEEncode -> KSampler (denoise < 1) -> VAEDecode: img2img keeps the size (cropped to multiples of 8).
    img2img = {
        "1": load,
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-random-sd15.safetensors"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["4", 2]}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.5}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 0.55}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["4", 2]}},
    }
    assert saved_sizes(saving(["10", 0], **img2img)) == [(40, 24)]

    # The limits of the new inputs are validated.
    for amount, kind in [(0, "value_smaller_than_min"), (4097, "value_bigger_than_max")]:
        body = post(comfy, saving(["2", 0], **{"1": load, "2": {**repeat, "inputs": {**repeat["inputs"],
                                                                                   "amount": amount}}}),
                    sock.client_id).json()
        assert body["node_errors"]["2"]["errors"][0]["type"] == kind
    img2img["8"]["inputs"]["denoise"] = 1.5
    body = post(comfy, saving(["10", 0], **img2img), sock.client_id).json()
    assert body["node_errors"]["8"]["errors"][0]["type"] == "value_bigger_than_max"
    sock.close()


def test_load_image_is_not_cached_once_its_file_changed(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    upload(comfy, "ref.png", make_png(8, 8, (1, 1, 1)))

    def run() -> tuple[list, tuple[int, int]]:
        pid = submit(comfy, save_loaded("ref.png", "cache/x"), sock.client_id)
        frames = sock.until_done(pid)
        cached = next(f for f in frames if f["type"] == "execution_cached")["data"]["nodes"]
        ref = history(comfy, pid)[pid]["outputs"]["2"]["images"][0]
        return cached, png_size(view(comfy, ref).content)

    assert run() == ([], (8, 8))
    assert run() == (["1", "2"], (8, 8))
    assert upload(comfy, "ref.png", make_png(8, 8, (1, 1, 1))).json()["name"] == "ref.png"  # a duplicate
    assert run() == (["1", "2"], (8, 8))
    upload(comfy, "ref.png", make_png(16, 12, (2, 2, 2)), overwrite="true")
    assert run() == ([], (16, 12))
    sock.close()


def test_object_info_of_the_image_to_video_nodes(comfy):
    info = requests.get(f"{comfy.url}/object_info", timeout=5).json()
    recorded = shared_object_info()
    if recorded:
        assert info["RepeatImageBatch"] == recorded["RepeatImageBatch"]
        for name in ("SaveAnimatedWEBP", "ImageBlur", "KSampler"):
            assert info[name] == recorded[name], name
    assert info["RepeatImageBatch"]["input"]["required"]["amount"] == ["INT", {"default": 1, "min": 1, "max": 4096}]
    vae_encode = info["VAEEncode"]
    assert vae_encode["input"]["required"] == {"pixels": ["IMAGE"], "vae": ["VAE"]}
    assert vae_encode["output"] == ["LATENT"] and vae_encode["output_node"] is False
    assert info["KSampler"]["input"]["required"]["denoise"][1]["min"] == 0.0
    assert info["KSampler"]["input"]["required"]["denoise"][1]["max"] == 1.0
    assert set(info["ImageBlur"]["input"]["required"]) == {"image", "blur_radius", "sigma"}
    assert info["LoadImage"]["input"]["required"]["image"][1] == {"image_upload": True}
