"""The pure protocol layer, replayed message by message against the recorded transcripts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from comfy_pipeline.blocks.errors import ExecutionInterrupted, NodeExecutionError
from comfy_pipeline.blocks.protocol import (
    PromptTracker,
    binary_event_type,
    outputs_from_history,
    parse_text_frame,
    prompt_id_of,
)

# A copy of the transcripts recorded from a real ComfyUI (see transcripts/README.md).
TRANSCRIPTS = Path(__file__).resolve().parent / "transcripts"


def load(name: str) -> dict:
    return json.loads((TRANSCRIPTS / name).read_text())


def text_messages(transcript: dict, conn: str) -> list[dict]:
    return [w["msg"] for w in transcript["ws"] if w["conn"] == conn and w["kind"] == "text"]


def replay(messages: list[dict], prompt_id: str) -> PromptTracker:
    tracker = PromptTracker(prompt_id)
    for msg in messages:
        tracker.feed(msg)
    return tracker


ALL = sorted(p.name for p in TRANSCRIPTS.glob("*.json") if p.name[0] in "abcefghij")


@pytest.mark.parametrize("name", ALL)
def test_every_recorded_prompt_ends_as_the_server_said(name):
    """Each prompt a connection saw finishes with the outcome its last lifecycle message gives."""
    transcript = load(name)
    checked = 0
    for conn in {w["conn"] for w in transcript["ws"]}:
        messages = text_messages(transcript, conn)
        prompt_ids = {prompt_id_of(m) for m in messages} - {None}
        for pid in prompt_ids:
            mine = [m for m in messages if prompt_id_of(m) == pid]
            kinds = [m["type"] for m in mine]
            if "execution_start" not in kinds:
                continue  # only broadcast progress of someone else's prompt (transcript h)
            tracker = replay(messages, pid)
            if "execution_error" in kinds:
                assert isinstance(tracker.error, NodeExecutionError)
            elif "execution_interrupted" in kinds:
                assert isinstance(tracker.error, ExecutionInterrupted)
            elif "execution_success" in kinds or any(
                m["type"] == "executing" and m["data"].get("node") is None for m in mine
            ):
                assert tracker.done and tracker.error is None
            else:  # the socket closed mid-prompt (h, conn A)
                assert not tracker.done
            checked += 1
    assert checked


def test_single_image_runs_both_nodes_and_reports_the_output():
    t = load("a_single_image.json")
    tracker = replay(text_messages(t, "A"), t["prompt_id"])
    assert tracker.done and tracker.error is None
    assert tracker.executed_nodes == ["1", "2"]
    assert not tracker.fully_cached


def test_completion_from_executing_null_alone_as_older_servers_send():
    t = load("a_single_image.json")
    messages = [m for m in text_messages(t, "A") if m["type"] != "execution_success"]
    tracker = PromptTracker(t["prompt_id"])
    for msg in messages[:-1]:
        tracker.feed(msg)
    assert not tracker.done
    events = tracker.feed(messages[-1])
    assert tracker.done and [e.kind for e in events] == ["succeeded"]


def test_fully_cached_resubmit_is_done_and_marked_cached():
    t = load("b_cached_resubmit.json")
    first = t["prompt_ids"][0] if isinstance(t["prompt_ids"], list) else list(t["prompt_ids"].values())[0]
    tracker = replay(text_messages(t, "A"), first)
    assert tracker.done and tracker.error is None
    assert tracker.fully_cached
    assert tracker.cached_nodes == ["1", "2"]


def test_a_completion_from_history_with_one_node_executed_is_not_cached():
    """After a reconnect or a re-attach, the prompt completes from GET /history, whose status
    messages have execution_cached but no executing: node 2 ran, so it is not a cache hit."""
    from comfy_pipeline.blocks.watcher import history_messages as _history_messages

    entry = {"status": {"status_str": "success", "completed": True, "messages": [
        ["execution_start", {"prompt_id": "p1", "timestamp": 1}],
        ["execution_cached", {"nodes": ["1"], "prompt_id": "p1", "timestamp": 2}],
        ["execution_success", {"prompt_id": "p1", "timestamp": 3}]]}, "outputs": {}}
    partly = PromptTracker("p1", {"1": "EmptyImage", "2": "SaveImage"})
    for msg in _history_messages("p1", entry):
        partly.feed(msg)
    assert partly.done and not partly.fully_cached
    entry["status"]["messages"][1][1]["nodes"] = ["1", "2"]
    whole = PromptTracker("p1", {"1": "EmptyImage", "2": "SaveImage"})
    for msg in _history_messages("p1", entry):
        whole.feed(msg)
    assert whole.done and whole.fully_cached


def test_runtime_error_names_node_type_and_exception_but_not_tensors():
    t = load("e_runtime_error.json")
    pid = next(m["data"]["prompt_id"] for m in text_messages(t, "A") if m["type"] == "execution_error")
    tracker = replay(text_messages(t, "A"), pid)
    err = tracker.error
    assert isinstance(err, NodeExecutionError)
    assert (err.node_id, err.node_type, err.exception_type) == ("3", "ImageBlend", "RuntimeError")
    assert "size of tensor a (2)" in str(err)
    assert "current_inputs" not in str(err)


def test_interrupt_is_reported_as_interrupted():
    t = load("f_interrupt_and_delete.json")
    pid = t["prompt_ids"]["P1"]
    tracker = replay(text_messages(t, "A"), pid)
    assert isinstance(tracker.error, ExecutionInterrupted)
    assert pid in str(tracker.error)


def test_reconnect_executing_without_prompt_id_is_harmless():
    t = load("h_observer_and_reconnect.json")
    pid = t["prompt_ids"]["P1"]
    before = replay(text_messages(t, "A"), pid)
    assert before.started and not before.done  # A closed mid-prompt
    for msg in text_messages(t, "A2"):  # same clientId, reconnected
        before.feed(msg)
    assert before.done and before.error is None


def test_interleaved_prompts_each_tracker_sees_only_its_own():
    t = load("g_two_prompts_back_to_back.json")
    messages = text_messages(t, "A")
    p1, p2 = PromptTracker(t["prompt_ids"]["P1"]), PromptTracker(t["prompt_ids"]["P2"])
    for msg in messages:
        p1.feed(msg)
        p2.feed(msg)
    assert p1.done and p2.done
    # each saw its own nodes run, and only its own messages: P2 was not done when P1 finished
    assert p1.executed_nodes and p2.executed_nodes
    first = PromptTracker(t["prompt_ids"]["P2"])
    for msg in messages:
        first.feed(msg)
        if msg["type"] == "execution_success" and msg["data"].get("prompt_id") == t["prompt_ids"]["P1"]:
            break
    assert not first.done


def test_outputs_from_history_lists_every_animated_file():
    t = load("c_animated_video.json")
    history = next(h for h in t["http"] if h["path"].startswith("/history/"))
    entry = history["response_json"][t["prompt_id"]]
    refs = outputs_from_history(entry)
    viewed = {h["params"]["filename"] for h in t["http"] if h["path"] == "/view"}
    assert {r.filename for r in refs} == viewed
    assert all(r.animated and r.key == "images" and r.subfolder == "transcripts" for r in refs)


def test_outputs_from_history_every_list_and_type_filter():
    entry = {
        "outputs": {
            "9": {"images": [{"filename": "a.png", "subfolder": "x", "type": "output"},
                             {"filename": "p.png", "subfolder": "", "type": "temp"}]},
            "10": {"gifs": [{"filename": "v.mp4", "subfolder": "vids", "type": "output",
                             "format": "video/h264-mp4"}]},
            "11": {"audio": [{"filename": "s.flac", "subfolder": "", "type": "output"}]},
            "12": {"text": ["not a file"]},
        }
    }
    refs = outputs_from_history(entry)
    assert sorted((r.key, r.filename) for r in refs) == [("audio", "s.flac"), ("gifs", "v.mp4"), ("images", "a.png")]
    assert len(outputs_from_history(entry, None)) == 4


def test_frames_that_are_not_messages_are_rejected_not_raised():
    assert parse_text_frame("{not json") is None
    assert parse_text_frame("[1, 2]") is None
    assert parse_text_frame(b"\xff\xfe") is None
    assert parse_text_frame('{"type": "status"}') == {"type": "status", "data": {}}
    assert binary_event_type(struct.pack(">II", 1, 2) + b"\x89PNG") == 1
    assert binary_event_type(b"\x00") is None


def test_odd_shapes_inside_known_messages_are_tolerated():
    from comfy_pipeline.blocks.protocol import queue_remaining_of

    assert queue_remaining_of({"type": "status", "data": {"status": "busy"}}) is None
    assert queue_remaining_of({"type": "status", "data": {"status": {"exec_info": [1]}}}) is None
    assert queue_remaining_of({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 2}}}}) == 2
    assert parse_text_frame("[" * 100000) is None  # deep nesting: RecursionError inside json
    tracker = PromptTracker("p")
    tracker.feed({"type": "execution_cached", "data": {"prompt_id": "p", "nodes": 5}})
    (event,) = tracker.feed({"type": "progress", "data": {"prompt_id": "p", "value": "3", "max": "8", "node": "1"}})
    assert event.value is None and event.max is None
    (event,) = tracker.feed({"type": "executed", "data": {"prompt_id": "p", "node": "2", "output": ["x"]}})
    assert (event.kind, event.node) == ("executed", "2")


def test_validation_error_from_older_servers_string_error_and_list_node_errors():
    from comfy_pipeline.blocks.errors import PromptValidationError

    err = PromptValidationError("no prompt", [])
    assert "no prompt" in str(err) and err.node_errors == {}


def test_which_failures_are_retried():
    from comfy_pipeline.blocks.errors import (ConnectionLost, GenerationTimeout, NodeExecutionError, PromptLost,
                               PromptValidationError, ServerError, ServerUnreachable, WorkflowError)
    from comfy_pipeline.tasks.generate import is_transient

    assert is_transient(ConnectionLost("u", "dropped"))
    assert not is_transient(ConnectionLost("u", "closed", closed_by_us=True))  # the run ended
    assert is_transient(ServerUnreachable("u", "refused")) and is_transient(PromptLost("p", "u", 3))
    assert is_transient(GenerationTimeout("p", 1.0)) and is_transient(ServerError("POST", "u", 503, ""))
    assert not is_transient(ServerError("POST", "u", 404, ""))
    assert not is_transient(PromptValidationError({"message": "bad"}, {}))
    assert not is_transient(NodeExecutionError("p", "3", "KSampler", "RuntimeError", "boom"))
    assert not is_transient(WorkflowError("bad file"))
