"""The stand-in ComfyUI server itself, over real sockets, checked against the recorded transcripts."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import uuid
import zlib

import pytest
import requests
import websocket

from tests.standin import TRANSCRIPTS, StandInComfyUI, free_port

pytestmark = pytest.mark.timeout(30)




def load(name: str) -> dict:
    return json.loads((TRANSCRIPTS / name).read_text())


def image_prompt(prefix: str = "t/img", *, batch: int = 1, color: int = 16766788, width: int = 64) -> dict:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": 64, "batch_size": batch, "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def chain_prompt(prefix: str = "t/chain", blurs: int = 2) -> dict:
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 5}}}
    previous = "1"
    for i in range(blurs):
        nid = str(10 + i)
        prompt[nid] = {"class_type": "ImageBlur", "inputs": {"image": [previous, 0], "blur_radius": 3, "sigma": 1.0}}
        previous = nid
    prompt["2"] = {"class_type": "SaveImage", "inputs": {"images": [previous, 0], "filename_prefix": prefix}}
    return prompt


class Sock:
    """A websocket-client connection that decodes text frames."""

    def __init__(self, comfy: StandInComfyUI, client_id: str | None = None, *, header=None, flags: bool = False):
        self.client_id = client_id
        url = f"ws://127.0.0.1:{comfy.port}/ws" + (f"?clientId={client_id}" if client_id else "")
        self.ws = websocket.create_connection(url, timeout=5, header=header)
        if flags:
            self.ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        self.hello = self.recv()
        assert self.hello["type"] == "status"
        self.sid = self.hello["data"]["sid"]

    def recv(self, timeout: float = 5.0):
        self.ws.settimeout(timeout)
        frame = self.ws.recv()
        return json.loads(frame) if isinstance(frame, str) else frame

    def until_done(self, prompt_id: str, timeout: float = 5.0) -> list:
        """Every frame up to and including ``executing {node: null, prompt_id}``."""
        frames, deadline = [], time.monotonic() + timeout
        while True:
            frame = self.recv(max(0.05, deadline - time.monotonic()))
            frames.append(frame)
            if (isinstance(frame, dict) and frame["type"] == "executing" and frame["data"]["node"] is None
                    and frame["data"].get("prompt_id") == prompt_id):
                return frames

    def silent_for(self, seconds: float) -> list:
        """Frames received within ``seconds`` (expected empty by "deaf" checks)."""
        got, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                got.append(self.recv(max(0.01, deadline - time.monotonic())))
            except websocket.WebSocketTimeoutException:
                break
        return got

    def close(self) -> None:
        self.ws.close()


def post(comfy: StandInComfyUI, prompt: dict, client_id: str | None = None, **extra) -> requests.Response:
    body = {"prompt": prompt, **extra}
    if client_id is not None:
        body["client_id"] = client_id
    return requests.post(f"{comfy.url}/prompt", json=body, timeout=5)


def submit(comfy: StandInComfyUI, prompt: dict, client_id: str | None = None, **extra) -> str:
    response = post(comfy, prompt, client_id, **extra)
    assert response.status_code == 200, response.text
    return response.json()["prompt_id"]


def texts(frames: list) -> list[dict]:
    return [f for f in frames if isinstance(f, dict)]


def types(frames: list) -> list[str]:
    return [f["type"] if isinstance(f, dict) else "binary" for f in frames]


def shape(frames: list) -> list:
    """(type, data keys) per text frame: what must match the transcripts exactly."""
    return [(f["type"], list(f["data"])) for f in texts(frames)]


def history(comfy: StandInComfyUI, prompt_id: str) -> dict:
    return requests.get(f"{comfy.url}/history/{prompt_id}", timeout=5).json()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    return chunks


@pytest.fixture
def comfy():
    server = StandInComfyUI().start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- a, a2


def test_single_image_run_matches_transcript_a(comfy):
    recorded = load("a_single_image.json")
    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, recorded["workflow"], sock.client_id)
    frames = [sock.hello] + sock.until_done(pid)
    expected = [w["msg"] for w in recorded["ws"] if w["kind"] == "text"]
    assert shape(frames) == shape(expected)
    assert frames[-1] == {"type": "executing", "data": {"node": None, "prompt_id": pid}}
    assert frames[0]["data"]["sid"] == sock.client_id
    assert all("sid" not in f["data"] for f in frames[1:] if f["type"] == "status")

    executed = next(f for f in frames if f["type"] == "executed")["data"]
    assert executed["output"] == {"images": [{"filename": "a_single_00001_.png", "subfolder": "transcripts",
                                              "type": "output"}]}
    entry = history(comfy, pid)[pid]
    recorded_entry = next(iter(next(h for h in recorded["http"] if h["path"].startswith("/history/"))
                               ["response_json"].values()))
    assert list(entry) == list(recorded_entry)
    assert entry["prompt"] == [0, pid, recorded["workflow"], {"client_id": sock.client_id}, ["2"]]
    assert entry["outputs"] == {"2": executed["output"]}
    assert entry["meta"] == recorded_entry["meta"]
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert isinstance(entry["status"]["messages"][0][1]["timestamp"], int)

    view = requests.get(f"{comfy.url}/view", params={"filename": "a_single_00001_.png", "subfolder": "transcripts",
                                                      "type": "output"}, timeout=5)
    assert view.status_code == 200 and view.headers["Content-Type"] == "image/png"
    assert int(view.headers["Content-Length"]) == len(view.content)
    assert view.headers["Content-Disposition"] == 'filename="a_single_00001_.png"'
    chunks = dict(png_chunks(view.content))
    assert struct.unpack(">II", chunks[b"IHDR"][:8]) == (64, 64)
    pixels = zlib.decompress(chunks[b"IDAT"])
    assert pixels[:4] == b"\x00" + bytes([0xFF, 0xD7, 0x44])  # filter byte + colour 16766788
    assert pid.encode() in view.content and view.content == comfy.files[("output", "transcripts",
                                                                          "a_single_00001_.png")]
    sock.close()


def test_linked_strings_and_preview_any_match_transcript_a2(comfy):
    recorded = load("a2_description_string.json")
    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, recorded["workflow"], sock.client_id, **recorded["post_extra"])
    frames = sock.until_done(pid)
    expected = [w["msg"] for w in recorded["ws"] if w["kind"] == "text"][1:]
    assert shape(frames) == shape(expected)
    assert [f["data"]["node"] for f in texts(frames) if f["type"] == "executing"] == ["5", "1", "2", "3", "4", None]
    outputs = history(comfy, pid)[pid]["outputs"]
    assert outputs["2"]["images"][0]["subfolder"] == "transcripts"
    assert outputs["2"]["images"][0]["filename"] == "a2_desc_00001_.png"
    assert outputs["4"] == {"text": [recorded["workflow"]["3"]["inputs"]["value"]]}
    extra = history(comfy, pid)[pid]["prompt"][3]
    assert list(extra) == ["extra_pnginfo", "client_id"]
    png = comfy.files[("output", "transcripts", "a2_desc_00001_.png")]
    texts_ = {k.split(b"\x00")[0]: k.split(b"\x00", 1)[1] for kind, k in png_chunks(png) if kind == b"tEXt"}
    assert json.loads(texts_[b"description"]) == recorded["workflow"]["3"]["inputs"]["value"]
    sock.close()


# --------------------------------------------------------------------------------------------- b: cache


def test_cached_resubmit_and_cache_of_the_latest_prompt_only(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    first = submit(comfy, image_prompt("b/a"), sock.client_id)
    sock.until_done(first)

    again = submit(comfy, image_prompt("b/a"), sock.client_id)
    frames = sock.until_done(again)
    assert types(frames) == ["status", "status", "execution_start", "execution_cached", "executed", "progress_state",
                             "execution_success", "status", "executing"]
    data = {f["type"]: f["data"] for f in texts(frames)}
    assert data["execution_cached"]["nodes"] == ["1", "2"]
    assert data["executed"]["output"]["images"][0]["filename"] == "a_00001_.png"  # the OLD file
    cached_state = data["progress_state"]["nodes"]["2"]
    assert (cached_state["value"], cached_state["max"], cached_state["state"]) == (1, 1, "finished")
    assert history(comfy, again)[again]["outputs"]["2"]["images"][0]["filename"] == "a_00001_.png"

    partial = submit(comfy, image_prompt("b/partial"), sock.client_id)
    frames = sock.until_done(partial)
    assert [f["data"]["nodes"] for f in texts(frames) if f["type"] == "execution_cached"] == [["1"]]
    assert [f["data"]["node"] for f in texts(frames) if f["type"] == "executing"] == ["2", None]

    other = submit(comfy, image_prompt("b/other", color=1), sock.client_id)
    sock.until_done(other)
    back = submit(comfy, image_prompt("b/a"), sock.client_id)
    frames = sock.until_done(back)
    assert [f["data"]["nodes"] for f in texts(frames) if f["type"] == "execution_cached"] == [[]]
    assert next(f for f in texts(frames) if f["type"] == "executed")["data"]["output"]["images"][0]["filename"] == \
        "a_00002_.png"
    sock.close()


# --------------------------------------------------------------------------------------------- c: formats


def test_animated_video_audio_and_preview_outputs(comfy):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 8, "color": 361929}},
        "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "c/webp", "fps": 6.0,
                                                           "lossless": True, "quality": 80, "method": "default"}},
        "3": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
        "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "c/mp4", "format": "auto",
                                                    "codec": "auto"}},
        "5": {"class_type": "SaveWEBM", "inputs": {"images": ["1", 0], "filename_prefix": "c/webm", "codec": "vp9",
                                                   "fps": 8.0, "crf": 32.0}},
        "6": {"class_type": "SaveAnimatedPNG", "inputs": {"images": ["1", 0], "filename_prefix": "c/apng", "fps": 6.0,
                                                          "compress_level": 4}},
        "7": {"class_type": "LoadAudio", "inputs": {"audio": "example.flac"}},
        "8": {"class_type": "SaveAudio", "inputs": {"audio": ["7", 0], "filename_prefix": "audio/tune"}},
        "9": {"class_type": "VHS_VideoCombine", "inputs": {
            "images": ["1", 0], "frame_rate": 8, "loop_count": 0, "filename_prefix": "vhs/clip",
            "format": "video/h264-mp4", "pingpong": False, "save_output": True, "pix_fmt": "yuv420p", "crf": 19}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, prompt, sock.client_id)
    frames = sock.until_done(pid)
    outputs = {f["data"]["node"]: f["data"]["output"] for f in texts(frames) if f["type"] == "executed"}
    assert outputs == history(comfy, pid)[pid]["outputs"]
    expected = {"2": ("webp", "image/webp", b"RIFF"), "4": ("mp4", "video/mp4", b"\x00\x00\x00\x20ftyp"),
                "5": ("webm", "video/webm", bytes.fromhex("1a45dfa3")), "6": ("png", "image/png", b"\x89PNG")}
    for nid, (ext, content_type, magic) in expected.items():
        assert outputs[nid]["animated"] == [True]
        (ref,) = outputs[nid]["images"]
        assert ref["filename"].endswith(f"_00001_.{ext}") and ref["subfolder"] == "c" and ref["type"] == "output"
        view = requests.get(f"{comfy.url}/view", params=ref, timeout=5)
        assert view.headers["Content-Type"] == content_type and view.content.startswith(magic)
        assert pid.encode() in view.content
    assert outputs["8"] == {"audio": [{"filename": "tune_00001_.flac", "subfolder": "audio", "type": "output"}]}
    assert comfy.files[("output", "audio", "tune_00001_.flac")].startswith(b"fLaC")
    (gif,) = outputs["9"]["gifs"]
    assert gif["filename"] == "clip_00001.mp4" and gif["subfolder"] == "vhs" and gif["format"] == "video/h264-mp4"
    assert gif["type"] == "output"
    previews = outputs["10"]["images"]
    assert len(previews) == 8 and all(p["type"] == "temp" and p["subfolder"] == "" for p in previews)
    assert previews[0]["filename"].startswith("ComfyUI_temp_") and previews[0]["filename"].endswith("_00001_.png")
    assert len(previews[0]["filename"]) == len("ComfyUI_temp_abcde_00001_.png")
    sock.close()


# --------------------------------------------------------------------------------------------- d: validation


def _d_cases() -> list:
    if TRANSCRIPTS is None:
        return []
    recorded = load("d_validation_errors.json")
    return [pytest.param(h, id=h["label"]) for h in recorded["http"] if h["method"] == "POST"]


def _without_tracebacks(body):
    body = json.loads(json.dumps(body))
    if isinstance(body, dict):
        for node in (body.get("node_errors") or {}).values():
            for error in node["errors"]:
                error.get("extra_info", {}).pop("traceback", None)
        body.pop("prompt_id", None)
        body.pop("number", None)
    return body


@pytest.mark.parametrize("exchange", _d_cases())
def test_validation_bodies_match_transcript_d(comfy, exchange):
    if "request_raw" in exchange:
        response = requests.post(f"{comfy.url}/prompt", data=exchange["request_raw"], timeout=5)
        assert response.status_code == 500 and response.text == exchange["response_text"]
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        return
    response = requests.post(f"{comfy.url}/prompt", json=exchange["request_json"], timeout=5)
    assert response.status_code == exchange["status"]
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert _without_tracebacks(response.json()) == _without_tracebacks(exchange["response_json"])
    if response.status_code == 400:
        assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}


def test_one_valid_and_one_invalid_output_runs_only_the_valid_one(comfy):
    prompt = image_prompt("d/ok")
    prompt["3"] = {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}}
    prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    sock = Sock(comfy, uuid.uuid4().hex)
    response = post(comfy, prompt, sock.client_id)
    assert response.status_code == 200
    assert response.json()["node_errors"]["3"]["dependent_outputs"] == ["4"]
    pid = response.json()["prompt_id"]
    frames = sock.until_done(pid)
    assert [f["data"]["node"] for f in texts(frames) if f["type"] == "executing"] == ["1", "2", None]
    assert history(comfy, pid)[pid]["prompt"][4] == ["2"]
    sock.close()


# --------------------------------------------------------------------------------------------- e: errors


def test_runtime_error_matches_transcript_e(comfy):
    recorded = load("e_runtime_error.json")
    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, recorded["workflow"], sock.client_id)
    frames = sock.until_done(pid)
    expected = [w["msg"] for w in recorded["ws"] if w["kind"] == "text"]
    first_end = next(i for i, m in enumerate(expected) if m["type"] == "executing" and m["data"]["node"] is None)
    assert shape(frames) == shape(expected[1:first_end + 1])
    error = next(f for f in texts(frames) if f["type"] == "execution_error")["data"]
    assert error["node_id"] == "3" and error["node_type"] == "ImageBlend" and error["exception_type"] == "RuntimeError"
    assert error["exception_message"].startswith("The size of tensor a (2) must match the size of tensor b (3)")
    assert sorted(error["executed"]) == ["1", "2", "5"]
    assert list(error["current_inputs"]) == ["image1", "image2", "blend_factor", "blend_mode"]
    assert error["current_inputs"]["blend_factor"] == [0.5]
    entry = history(comfy, pid)[pid]
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert list(entry["outputs"]) == ["5"] and len(entry["outputs"]["5"]["images"]) == 2

    again = submit(comfy, recorded["workflow"], sock.client_id)
    frames = sock.until_done(again)
    assert [f["data"]["nodes"] for f in texts(frames) if f["type"] == "execution_cached"] == [["1", "2", "5"]]
    assert next(f for f in texts(frames) if f["type"] == "execution_error")["data"]["executed"] == []
    sock.close()


def test_fail_marker_raises_on_the_first_executing_node(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, image_prompt("e/[[fail]]"), sock.client_id)
    frames = sock.until_done(pid)
    assert types(frames)[-3:] == ["execution_error", "status", "executing"]
    error = next(f for f in texts(frames) if f["type"] == "execution_error")["data"]
    assert list(error) == ["prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                           "traceback", "current_inputs", "current_outputs", "timestamp"]
    assert (error["node_id"], error["exception_type"], error["exception_message"]) == \
        ("1", "RuntimeError", "stand-in failure requested")
    assert history(comfy, pid)[pid]["status"]["status_str"] == "error"
    sock.close()


# --------------------------------------------------------------------------------------------- f: interrupts


def test_interrupting_a_hanging_prompt_and_deleting_pending_ones(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    hung = submit(comfy, image_prompt("f/[[hang]]"), sock.client_id)
    pending = submit(comfy, image_prompt("f/pending"), sock.client_id)
    later = submit(comfy, image_prompt("f/later", color=7), sock.client_id)
    deadline = time.monotonic() + 3
    while not comfy.queue_snapshot()["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    snapshot = comfy.queue_snapshot()
    assert [item[1] for item in snapshot["queue_running"]] == [hung]
    assert [item[1] for item in snapshot["queue_pending"]] == [pending, later]
    assert snapshot == requests.get(f"{comfy.url}/queue", timeout=5).json()
    assert requests.get(f"{comfy.url}/prompt", timeout=5).json() == {"exec_info": {"queue_remaining": 3}}

    requests.post(f"{comfy.url}/queue", json={"delete": [pending, hung]}, timeout=5)  # running one: no effect
    requests.post(f"{comfy.url}/interrupt", json={"prompt_id": later}, timeout=5)  # not running: ignored
    time.sleep(0.1)
    assert [item[1] for item in comfy.queue_snapshot()["queue_running"]] == [hung]
    requests.post(f"{comfy.url}/interrupt", json={"prompt_id": hung}, timeout=5)
    frames = sock.until_done(hung)
    interrupted = next(f for f in texts(frames) if f["type"] == "execution_interrupted")["data"]
    assert list(interrupted) == ["prompt_id", "node_id", "node_type", "executed", "timestamp"]
    assert (interrupted["node_id"], interrupted["node_type"], interrupted["executed"]) == ("1", "EmptyImage", [])
    assert types(frames)[-3:] == ["execution_interrupted", "status", "executing"]
    entry = history(comfy, hung)[hung]
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    sock.until_done(later)
    assert history(comfy, pending) == {}
    assert comfy.executed_prompt_ids == [hung, later]


def test_global_interrupt_lands_at_the_next_node_boundary(comfy):
    comfy.execution_time_s = 0.6  # three nodes of 0.2 s each
    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, chain_prompt(blurs=1), sock.client_id)
    while sock.recv()["type"] != "executing":
        pass
    requests.post(f"{comfy.url}/interrupt", timeout=5)
    frames = sock.until_done(pid)
    assert [f["data"]["node"] for f in texts(frames) if f["type"] == "executing"] == ["10", None]
    assert next(f for f in texts(frames) if f["type"] == "execution_interrupted")["data"]["executed"] == ["1"]
    requests.post(f"{comfy.url}/queue", json={"clear": True}, timeout=5)


# --------------------------------------------------------------------------------------------- g: queue


def test_two_prompts_run_serially_without_interleaving(comfy):
    comfy.execution_time_s = 0.1
    sock = Sock(comfy, uuid.uuid4().hex)
    first = submit(comfy, chain_prompt("g/one"), sock.client_id)
    second = submit(comfy, image_prompt("g/two"), sock.client_id)
    frames = sock.until_done(first) + sock.until_done(second)
    owners = [f["data"].get("prompt_id") for f in texts(frames) if f["type"] != "status"]
    switch = owners.index(second)
    assert set(owners[:switch]) == {first} and set(owners[switch:]) == {second}
    remaining = [f["data"]["status"]["exec_info"]["queue_remaining"] for f in texts(frames) if f["type"] == "status"]
    assert remaining[:3] == [1, 2, 1] or remaining[:3] == [1, 1, 2]
    assert remaining[-1] == 0
    assert comfy.max_in_flight == 2 and comfy.executed_prompt_ids == [first, second]
    items = requests.get(f"{comfy.url}/history", params={"max_items": 1}, timeout=5).json()
    assert list(items) == [second]
    sock.close()


def test_client_chosen_prompt_id_is_honoured_and_counted(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    chosen = "11111111-2222-3333-4444-555555555555"
    response = post(comfy, image_prompt("ids/x"), sock.client_id, prompt_id=chosen)
    assert response.json()["prompt_id"] == chosen
    sock.until_done(chosen)
    assert post(comfy, image_prompt("ids/x", width=0), sock.client_id, prompt_id="rejected").status_code == 400
    assert comfy.posts_per_prompt_id == {chosen: 1, "rejected": 1}
    assert comfy.requests[("POST", "/prompt")] == 2 and comfy.requests[("GET", "/history/{prompt_id}")] == 0
    assert list(history(comfy, chosen)) == [chosen]
    assert comfy.requests[("GET", "/history/{prompt_id}")] == 1
    comfy.reset_counters()
    assert not comfy.requests and not comfy.posts_per_prompt_id and comfy.ws_open_now == 1
    sock.close()


# --------------------------------------------------------------------------------------------- h: sockets


def test_observers_and_prompts_without_client_id(comfy):
    comfy.progress_steps = 2
    owner = Sock(comfy, uuid.uuid4().hex)
    watcher = Sock(comfy)  # no clientId: server-assigned sid
    assert len(watcher.sid) == 32
    pid = submit(comfy, image_prompt("h/mine"), owner.client_id)
    owner.until_done(pid)
    seen = watcher.silent_for(0.3)
    assert seen and {f["type"] for f in texts(seen)} == {"status"} and not [f for f in seen if isinstance(f, bytes)]

    anonymous = submit(comfy, image_prompt("h/anon", color=3))
    for sock in (owner, watcher):
        got = sock.silent_for(0.4)
        kinds = set(types(got))
        assert kinds == {"status", "progress_state", "progress", "binary"}, kinds
        assert all(f["data"].get("prompt_id") in (None, anonymous) for f in texts(got))
    assert history(comfy, anonymous)[anonymous]["prompt"][3] == {}
    owner.close()
    watcher.close()


def test_same_client_id_reconnect_quirks(comfy):
    cid = uuid.uuid4().hex
    comfy.execution_time_s = 0.6
    first = Sock(comfy, cid)
    pid = submit(comfy, chain_prompt("h/re"), cid)
    while first.recv()["type"] != "executing":
        pass
    first.close()
    time.sleep(0.25)
    second = Sock(comfy, cid)  # reconnects while its prompt runs
    assert second.sid == cid
    resumed = second.recv()
    assert resumed["type"] == "executing" and list(resumed["data"]) == ["node"]
    second.until_done(pid)

    comfy.execution_time_s = 0.0
    third = Sock(comfy, cid)  # replaces `second` in the socket map
    second.close()  # ... and the old one's cleanup removes the entry: `third` is deaf from now on
    deadline = time.monotonic() + 2
    while comfy.ws_open_now != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    other = submit(comfy, image_prompt("h/deaf"), cid)
    deadline = time.monotonic() + 2
    while not history(comfy, other) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert history(comfy, other)[other]["status"]["status_str"] == "success"
    assert third.silent_for(0.3) == []
    assert comfy.ws_opened == 3 and comfy.ws_open_now == 1 and comfy.max_ws_open == 2
    third.close()


def test_feature_flags_reply_and_metadata_frames(comfy):
    legacy = Sock(comfy, uuid.uuid4().hex)
    modern = Sock(comfy, uuid.uuid4().hex, flags=True)
    assert modern.recv() == {"type": "feature_flags", "data": {"supports_preview_metadata": True,
                                                               "max_upload_size": 104857600}}
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 3, "color": 1}},
              "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}
    for sock in (legacy, modern):
        pid = submit(comfy, prompt, sock.client_id)
        frames = [f for f in sock.until_done(pid) if not (isinstance(f, dict) and f["type"] == "status")]
        assert "executed" not in types(frames)
        progress = [f["data"]["value"] for f in texts(frames) if f["type"] == "progress"]
        assert progress == [0, 1, 2]
        binaries = [f for f in frames if isinstance(f, bytes)]
        assert len(binaries) == 3
        first = types(frames).index("binary")
        if sock is legacy:
            assert all(b[:8] == struct.pack(">II", 1, 2) and b[8:16] == b"\x89PNG\r\n\x1a\n" for b in binaries)
            assert types(frames)[first - 2:first + 1] == ["progress_state", "progress", "binary"]
        else:
            (length,) = struct.unpack(">I", binaries[0][4:8])
            meta = json.loads(binaries[0][8:8 + length])
            assert binaries[0][:4] == struct.pack(">I", 4) and binaries[0][8 + length:].startswith(b"\x89PNG")
            assert meta == {"node_id": "2", "prompt_id": pid, "display_node_id": "2", "parent_node_id": None,
                            "real_node_id": "2", "image_type": "image/png"}
            assert types(frames)[first - 1:first + 2] == ["progress_state", "binary", "progress"]
        assert history(comfy, pid)[pid]["outputs"] == {}
    legacy.close()
    modern.close()


def test_progress_steps_with_previews_on_ksampler(comfy):
    comfy.progress_steps = 3
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-random-sd15.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 8, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "j/txt2img", "images": ["8", 0]}},
    }
    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, prompt, sock.client_id)
    frames = sock.until_done(pid)
    assert [f["data"]["node"] for f in texts(frames) if f["type"] == "executing"] == \
        ["4", "5", "7", "6", "3", "8", "9", None]
    assert [(f["data"]["node"], f["data"]["value"], f["data"]["max"]) for f in texts(frames)
            if f["type"] == "progress"] == [("3", 1, 3), ("3", 2, 3), ("3", 3, 3)]
    binaries = [f for f in frames if isinstance(f, bytes)]
    assert len(binaries) == 3 and all(b.startswith(struct.pack(">II", 1, 2) + b"\x89PNG") for b in binaries)
    comfy.preview_frames = False
    prompt["6"]["inputs"]["text"] = "a wolf"
    pid = submit(comfy, prompt, sock.client_id)
    frames = sock.until_done(pid)
    assert not [f for f in frames if isinstance(f, bytes)]
    assert [f["data"]["nodes"] for f in texts(frames) if f["type"] == "execution_cached"] == [["4", "5", "7"]]
    sock.close()


# --------------------------------------------------------------------------------------------- auth, history, stop


def test_auth_token_is_required_everywhere():
    with StandInComfyUI(require_token="s3cret") as comfy:
        assert requests.get(f"{comfy.url}/queue", timeout=5).status_code == 401
        assert post(comfy, image_prompt()).status_code == 401
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(f"ws://127.0.0.1:{comfy.port}/ws?clientId=x", timeout=5)
        assert info.value.status_code == 401
        assert comfy.ws_opened == 0
        auth = {"Authorization": "Bearer s3cret"}
        assert requests.get(f"{comfy.url}/queue", headers=auth, timeout=5).status_code == 200
        sock = Sock(comfy, uuid.uuid4().hex, header=["Authorization: Bearer s3cret"])
        response = requests.post(f"{comfy.url}/prompt", json={"prompt": image_prompt(), "client_id": sock.client_id},
                                 headers=auth, timeout=5)
        sock.until_done(response.json()["prompt_id"])
        assert comfy.ws_opened == 1
        assert sum(h.get("Authorization") == "Bearer s3cret" for h in comfy.headers_seen) == 3
        sock.close()


def test_history_can_trail_the_websocket(comfy):
    comfy.history_delay_s = 0.3
    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, image_prompt("h/late"), sock.client_id)
    sock.until_done(pid)
    done = time.monotonic()
    assert history(comfy, pid) == {}
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}
    while not history(comfy, pid):
        assert time.monotonic() - done < 2
        time.sleep(0.02)
    assert time.monotonic() - done >= 0.25
    assert history(comfy, pid)[pid]["status"]["status_str"] == "success"
    sock.close()


def test_plain_endpoints_match_transcript_0(comfy):
    recorded = {h["path"]: h for h in load("0_endpoints.json")["http"] if h["method"] == "GET"}
    assert requests.get(f"{comfy.url}/object_info/EmptyImage", timeout=5).json() == \
        recorded["/object_info/EmptyImage"]["response_json"]
    assert requests.get(f"{comfy.url}/object_info/NoSuchNode", timeout=5).json() == {}
    assert requests.get(f"{comfy.url}/features", timeout=5).json() == recorded["/features"]["response_json"]
    assert requests.get(f"{comfy.url}/models", timeout=5).json() == recorded["/models"]["response_json"]
    assert list(requests.get(f"{comfy.url}/system_stats", timeout=5).json()["system"]) == \
        list(recorded["/system_stats"]["response_json"]["system"])
    info = requests.get(f"{comfy.url}/object_info", timeout=5).json()
    assert {"SaveAudio", "VHS_VideoCombine", "KSampler", "SaveImageWebsocket"} <= set(info)
    for params, status in [({"filename": "nope.png", "type": "output", "subfolder": ""}, 404),
                           ({"filename": "../x.png", "type": "output"}, 400),
                           ({"filename": "x.png", "subfolder": "../up"}, 400),
                           ({"filename": "/etc/passwd"}, 400)]:
        response = requests.get(f"{comfy.url}/view", params=params, timeout=5)
        assert response.status_code == status and response.content == b""
    assert requests.post(f"{comfy.url}/interrupt", timeout=5).status_code == 200
    assert requests.post(f"{comfy.url}/history", json={"delete": ["00000000-0000-0000-0000-000000000000"]},
                         timeout=5).status_code == 200


def test_stop_closes_client_sockets_and_ends_the_thread():
    comfy = StandInComfyUI().start()
    sock = Sock(comfy, uuid.uuid4().hex)
    submit(comfy, image_prompt("s/[[hang]]"), sock.client_id)
    while sock.recv()["type"] != "executing":
        pass
    started = time.monotonic()
    comfy.stop()
    assert time.monotonic() - started < 3
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
        for _ in range(5):  # a close frame makes recv() return "" / raise; nothing else may arrive
            if sock.ws.recv() in ("", b""):
                raise websocket.WebSocketConnectionClosedException("closed")
    comfy.stop()  # idempotent
    assert not [t for t in threading.enumerate() if t.name.startswith("standin-comfyui")]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{comfy.url}/queue", timeout=2)


def test_free_port_has_no_listener():
    port = free_port()
    with socket.socket() as probe:
        probe.settimeout(1)
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_client_vanishing_mid_stream_does_not_hurt_the_server(comfy):
    comfy.progress_steps = 20
    for _ in range(3):
        sock = Sock(comfy, uuid.uuid4().hex)
        pid = submit(comfy, image_prompt("v/x", width=512, batch=4), sock.client_id)
        sock.ws.sock.close()  # abrupt: no close frame
        deadline = time.monotonic() + 3
        while not history(comfy, pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert history(comfy, pid)[pid]["status"]["status_str"] == "success"
    deadline = time.monotonic() + 2
    while comfy.ws_open_now and time.monotonic() < deadline:
        time.sleep(0.02)
    assert comfy.ws_open_now == 0 and comfy.ws_closed == 3


def test_ws_counters_are_updated_before_the_close_handshake_completes(comfy):
    for i in range(20):
        sock = Sock(comfy, uuid.uuid4().hex)
        assert comfy.ws_open_now == 1
        sock.close()  # websocket-client waits for the server's close reply
        assert comfy.ws_open_now == 0 and comfy.ws_closed == i + 1
    assert comfy.ws_opened == 20 and comfy.max_ws_open == 1


# --------------------------------------------------------------------------------------------- faults


def raw_frames_until_done(sock: Sock, prompt_id: str, timeout: float = 5.0) -> list:
    """Every frame as received (text undecoded), up to ``executing {node: null, prompt_id}``."""
    frames, deadline = [], time.monotonic() + timeout
    while True:
        sock.ws.settimeout(max(0.05, deadline - time.monotonic()))
        frame = sock.ws.recv()
        frames.append(frame)
        try:
            msg = json.loads(frame) if isinstance(frame, str) else None
        except ValueError:
            continue
        if (isinstance(msg, dict) and msg.get("type") == "executing" and msg["data"].get("node") is None
                and msg["data"].get("prompt_id") == prompt_id):
            return frames


def recv_until_lost(sock: Sock, limit: int = 50) -> list:
    """Frames until the connection is lost without a close frame (fails on a close frame)."""
    got = []
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        for _ in range(limit):
            sock.ws.settimeout(5)
            frame = sock.ws.recv()
            assert frame not in ("", b""), "the server sent a close frame"
            got.append(json.loads(frame) if isinstance(frame, str) else frame)
    return got


def wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_close_ws_after_aborts_the_socket_and_a_reconnect_gets_the_rest(comfy):
    comfy.execution_time_s = 0.6
    cid = uuid.uuid4().hex
    first = Sock(comfy, cid)  # its hello is not counted: counting starts at close_ws_after()
    comfy.close_ws_after(3)
    pid = submit(comfy, chain_prompt("cw/x"), cid)
    got = recv_until_lost(first)
    assert types(got) == ["status", "status", "execution_start"]  # put, get, start: then cut, no close frame
    wait_for(lambda: comfy.ws_open_now == 0)
    second = Sock(comfy, cid)  # same clientId while the prompt still runs
    assert second.sid == cid
    resumed = second.recv()
    assert resumed["type"] == "executing" and list(resumed["data"]) == ["node"]
    frames = second.until_done(pid)  # times=1 is used up: this socket is not cut
    assert "execution_success" in types(frames) and len(frames) > 3
    assert history(comfy, pid)[pid]["status"]["status_str"] == "success"
    assert comfy.executions_per_prompt_id == {pid: 1} and comfy.ws_opened == 2
    second.close()

    comfy.close_ws_after(1, times=0)  # every socket, every time
    for _ in range(2):
        sock = Sock(comfy, cid)  # the hello is its one frame
        recv_until_lost(sock)
    comfy.clear_faults()
    sock = Sock(comfy, cid)
    assert sock.silent_for(0.1) == []
    pid = submit(comfy, image_prompt("cw/after"), cid)
    sock.until_done(pid)
    sock.close()


def test_restart_refuses_connections_then_serves_empty_state_on_the_same_port(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    done = submit(comfy, image_prompt("rs/done"), sock.client_id)
    sock.until_done(done)
    entry = history(comfy, done)[done]["outputs"]["2"]["images"][0]
    hung = submit(comfy, image_prompt("rs/[[hang]]"), sock.client_id)
    submit(comfy, image_prompt("rs/pending", color=9), sock.client_id)
    while sock.recv()["type"] != "executing":
        pass
    port, url = comfy.port, comfy.url
    session = requests.Session()
    assert session.get(f"{url}/queue", timeout=5).status_code == 200  # a keep-alive connection
    started = time.monotonic()
    comfy.restart(0.6)
    lost = recv_until_lost(sock)  # at most the second POST's status broadcast was still on its way
    assert [f["data"]["status"]["exec_info"]["queue_remaining"] for f in lost if f["type"] == "status"] in ([], [2])
    assert not [f for f in lost if f["type"] != "status"]  # the hanging prompt ended without a message
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}
    with pytest.raises(requests.ConnectionError):
        session.get(f"{url}/queue", timeout=2)
    with socket.socket() as probe:
        probe.settimeout(1)
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    with pytest.raises((ConnectionError, OSError, websocket.WebSocketException)):
        websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=2)
    assert comfy.wait_until_up(5)
    assert time.monotonic() - started >= 0.55
    assert comfy.port == port and comfy.url == url
    assert session.get(f"{url}/queue", timeout=5).json() == {"queue_running": [], "queue_pending": []}
    assert session.get(f"{url}/history", timeout=5).json() == {} and history(comfy, hung) == {}
    assert session.get(f"{url}/view", params=entry, timeout=5).status_code == 200  # files stay
    sock = Sock(comfy, sock.client_id)
    response = post(comfy, image_prompt("rs/done"), sock.client_id)
    assert response.json()["number"] == 0
    frames = sock.until_done(response.json()["prompt_id"])
    assert [f["data"]["nodes"] for f in texts(frames) if f["type"] == "execution_cached"] == [[]]  # cache gone
    assert comfy.executions_per_prompt_id[hung] == 1
    sock.close()
    session.close()


def test_restart_wait_and_clear_faults_ending_a_restart_early(comfy):
    comfy.restart(0.2, wait=True)
    assert requests.get(f"{comfy.url}/queue", timeout=2).status_code == 200
    comfy.restart(30)
    started = time.monotonic()
    comfy.clear_faults()  # back up now
    assert time.monotonic() - started < 2
    assert requests.get(f"{comfy.url}/queue", timeout=2).status_code == 200


def test_fail_prompt_posts_answers_the_status_and_queues_nothing(comfy):
    comfy.fail_prompt_posts(2, status=503)
    for i in range(2):
        response = post(comfy, image_prompt("fp/x"), prompt_id="chosen")
        assert response.status_code == 503 and response.text.startswith("503 ")
        assert response.headers["Content-Type"].startswith("text/plain")
    assert comfy.queue_snapshot() == {"queue_running": [], "queue_pending": []}
    comfy.fail_prompt_posts(1)
    response = post(comfy, image_prompt("fp/x"), prompt_id="chosen")
    assert response.status_code == 500
    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, image_prompt("fp/x"), sock.client_id, prompt_id="chosen")
    sock.until_done(pid)
    assert comfy.posts_per_prompt_id == {"chosen": 4} and comfy.executions_per_prompt_id == {"chosen": 1}
    assert comfy.executed_prompt_ids == ["chosen"]
    sock.close()


def test_drop_prompt_posts_is_an_ambiguous_submit(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    comfy.drop_prompt_posts(1)
    pid = str(uuid.uuid4())
    with pytest.raises(requests.ConnectionError):
        post(comfy, image_prompt("dp/x"), sock.client_id, prompt_id=pid)
    frames = sock.until_done(pid)  # it was accepted and runs normally
    assert "execution_success" in types(frames)
    assert history(comfy, pid)[pid]["status"]["status_str"] == "success"
    assert comfy.posts_per_prompt_id == {pid: 1} and comfy.executions_per_prompt_id == {pid: 1}
    other = submit(comfy, image_prompt("dp/y"), sock.client_id)  # k=1: the next one is answered
    sock.until_done(other)
    sock.close()


def test_truncate_views_and_delay_views(comfy):
    comfy.output_size_bytes = 20000
    sock = Sock(comfy, uuid.uuid4().hex)
    pid = submit(comfy, image_prompt("tv/x"), sock.client_id)
    sock.until_done(pid)
    entry = history(comfy, pid)[pid]["outputs"]["2"]["images"][0]
    full = requests.get(f"{comfy.url}/view", params=entry, timeout=5).content
    assert len(full) >= 20000
    comfy.truncate_views(2)
    with socket.create_connection(("127.0.0.1", comfy.port), timeout=5) as raw:
        raw.sendall(f"GET /view?filename={entry['filename']}&subfolder={entry['subfolder']}&type=output "
                    "HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        received = b""
        while True:
            chunk = raw.recv(65536)
            if not chunk:
                break
            received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    assert head.startswith(b"HTTP/1.1 200") and length == len(full)
    assert body == full[: len(full) // 2]
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.ConnectionError)):
        requests.get(f"{comfy.url}/view", params=entry, timeout=5).content
    assert requests.get(f"{comfy.url}/view", params=entry, timeout=5).content == full  # k=2 used up

    comfy.delay_views(0.3)
    started = time.monotonic()
    assert requests.get(f"{comfy.url}/view", params=entry, timeout=5).content == full
    assert time.monotonic() - started >= 0.28
    started = time.monotonic()
    requests.get(f"{comfy.url}/queue", timeout=5)
    assert time.monotonic() - started < 0.2
    comfy.delay_views(0)
    started = time.monotonic()
    requests.get(f"{comfy.url}/view", params=entry, timeout=5)
    assert time.monotonic() - started < 0.2
    sock.close()


def test_garbage_frames_and_a_huge_binary_frame(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    other = Sock(comfy)
    comfy.send_garbage(2)
    pid = submit(comfy, image_prompt("gb/x"), sock.client_id)
    frames = raw_frames_until_done(sock, pid)
    garbage = []
    normal, i = 0, 0
    while i < len(frames):
        frame = frames[i]
        normal += 1
        i += 1
        if normal % 2 == 0 and i < len(frames):
            chunk = frames[i:i + 4]
            assert chunk[0] == "{not json"
            assert isinstance(json.loads(chunk[1]), list)
            mystery = json.loads(chunk[2])
            assert mystery["type"] == "mystery_event" and "prompt_id" not in mystery["data"]
            assert isinstance(chunk[3], bytes) and struct.unpack(">I", chunk[3][:4]) == (99,)
            garbage.append(chunk)
            i += 4
    assert normal >= 6 and len(garbage) == normal // 2 - (normal % 2 == 0)
    if normal % 2 == 0:  # the last normal frame is followed by garbage too
        assert sock.ws.recv() == "{not json"
        for _ in range(3):
            sock.ws.recv()
    other.ws.settimeout(5)
    while other.ws.recv() != "{not json":  # the observer gets garbage after its status broadcasts, too
        pass
    comfy.send_garbage(0)
    pid = submit(comfy, image_prompt("gb/y"), sock.client_id)
    assert all(isinstance(json.loads(f), dict) for f in raw_frames_until_done(sock, pid))

    comfy.send_huge_binary(3_000_000)
    for target in (sock, other):
        while True:
            target.ws.settimeout(5)
            frame = target.ws.recv()
            if isinstance(frame, bytes) and len(frame) > 1000:
                break
        assert len(frame) == 3_000_000 and struct.unpack(">II", frame[:8]) == (1, 2)
    sock.close()
    other.close()


def test_silent_prompt_sends_nothing_then_finishes_normally(comfy):
    comfy.progress_steps = 3
    sock = Sock(comfy, uuid.uuid4().hex)
    watcher = Sock(comfy)
    started = time.monotonic()
    pid = submit(comfy, image_prompt("sl/[[silent=0.7]]"), sock.client_id)
    assert sock.recv()["type"] == "status" and watcher.recv()["type"] == "status"  # the POST's own broadcast
    wait_for(lambda: comfy.queue_snapshot()["queue_running"])
    assert sock.silent_for(0.5) == [] and watcher.silent_for(0.05) == []
    frames = sock.until_done(pid)
    assert time.monotonic() - started >= 0.65
    assert types(frames) == ["status", "execution_start", "execution_cached", "progress_state", "executing",
                             "progress_state", "progress_state", "executing", "executed", "progress_state",
                             "execution_success", "status", "executing"]
    assert history(comfy, pid)[pid]["status"]["status_str"] == "success"

    interrupted = submit(comfy, image_prompt("sl/[[silent=10]]", color=4), sock.client_id)
    sock.recv()
    wait_for(lambda: comfy.queue_snapshot()["queue_running"])
    requests.post(f"{comfy.url}/interrupt", json={"prompt_id": interrupted}, timeout=5)
    frames = sock.until_done(interrupted, timeout=3)
    assert types(frames)[-3:] == ["execution_interrupted", "status", "executing"]
    sock.close()
    watcher.close()


def test_flaky_prompt_fails_once_per_text_even_across_a_restart(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)

    def run(prefix: str) -> dict:
        pid = submit(comfy, image_prompt(prefix), sock.client_id)
        sock.until_done(pid)
        return history(comfy, pid)[pid]

    first = run("fl/[[flaky]]a")
    assert first["status"]["status_str"] == "error"
    error = dict(first["status"]["messages"])["execution_error"]
    assert (error["exception_type"], error["exception_message"]) == ("RuntimeError", "stand-in flaky failure")
    assert run("fl/[[flaky]]a")["status"]["status_str"] == "success"
    assert run("fl/[[flaky]]b")["status"]["status_str"] == "error"  # another text: fails once too
    comfy.restart(0.05, wait=True)
    sock = Sock(comfy, sock.client_id)
    assert run("fl/[[flaky]]a")["status"]["status_str"] == "success"
    assert run("fl/[[flaky]]b")["status"]["status_str"] == "success"
    sock.close()


def test_records_of_executions_interrupts_and_deletes(comfy):
    sock = Sock(comfy, uuid.uuid4().hex)
    for _ in range(2):
        submit(comfy, image_prompt("rc/x"), sock.client_id, prompt_id="same")
        sock.until_done("same")
    hung = submit(comfy, image_prompt("rc/[[hang]]"), sock.client_id)
    pending = submit(comfy, image_prompt("rc/p"), sock.client_id)
    wait_for(lambda: comfy.queue_snapshot()["queue_running"])
    requests.post(f"{comfy.url}/queue", json={"delete": [pending, "unknown"]}, timeout=5)
    requests.post(f"{comfy.url}/interrupt", json={"prompt_id": "not-running"}, timeout=5)
    requests.post(f"{comfy.url}/interrupt", timeout=5)
    sock.until_done(hung)
    assert comfy.executions_per_prompt_id == {"same": 2, hung: 1}
    assert comfy.interrupts == ["not-running", None]
    assert comfy.deletes == [pending, "unknown"]
    comfy.reset_counters()
    assert not comfy.executions_per_prompt_id and comfy.interrupts == [] and comfy.deletes == []
    sock.close()


def test_latency_knob_and_padded_outputs(comfy):
    comfy.request_latency_s = 0.2
    started = time.monotonic()
    assert requests.get(f"{comfy.url}/queue", timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.19
    comfy.request_latency_s = 0
    comfy.output_size_bytes = 10000
    sock = Sock(comfy, uuid.uuid4().hex)
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 1}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "pad/png"}},
        "3": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "pad/webp",
                                                           "fps": 6.0, "lossless": True, "quality": 80,
                                                           "method": "default"}},
        "4": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
        "5": {"class_type": "SaveVideo", "inputs": {"video": ["4", 0], "filename_prefix": "pad/mp4",
                                                    "format": "auto", "codec": "auto"}},
    }
    pid = submit(comfy, prompt, sock.client_id)
    sock.until_done(pid)
    outputs = history(comfy, pid)[pid]["outputs"]
    files = {nid: requests.get(f"{comfy.url}/view", params=out["images"][0], timeout=5).content
             for nid, out in outputs.items()}
    assert all(len(data) >= 10000 for data in files.values())
    assert b"stDn" in [kind for kind, _ in png_chunks(files["2"])]
    webp = files["3"]
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP" and struct.unpack("<I", webp[4:8])[0] == len(webp) - 8
    assert files["5"][4:8] == b"ftyp"
    comfy.clear_faults()
    assert comfy.output_size_bytes == 0 and comfy.request_latency_s == 0
    sock.close()
