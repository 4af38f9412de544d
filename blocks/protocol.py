"""The ComfyUI WebSocket protocol without any I/O.

ComfyUI's ``/ws`` sends JSON text frames ``{"type": T, "data": {...}}`` and binary frames
(``[u32 event_type][payload]``; type 1 is a preview image, type 4 a preview with metadata).
This module parses frames and follows one prompt's messages through :class:`PromptTracker`,
which is fed one message at a time and says what happened ("running node 6", "progress 3/8",
"done", "failed because ..."). It is replayed against the recorded transcripts in the tests.

It also reads a ``GET /history/{prompt_id}`` entry into the list of output files to download.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from .errors import ComfyUIError, ExecutionInterrupted, NodeExecutionError

def parse_text_frame(text: str | bytes) -> Optional[dict]:
    """Parse one WebSocket text frame.

    Returns the message ``{"type": str, "data": dict}``, or ``None`` when the frame is not a
    JSON object with a string ``type`` (callers log and skip such frames).
    """
    try:
        msg = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        return None
    if not isinstance(msg.get("data"), dict):
        msg["data"] = {}
    return msg


def binary_event_type(payload: bytes) -> Optional[int]:
    """The big-endian uint32 event type at the start of a binary frame, or ``None`` if shorter."""
    if len(payload) < 4:
        return None
    return struct.unpack(">I", payload[:4])[0]


def prompt_id_of(msg: Mapping[str, Any]) -> Optional[str]:
    """The ``data.prompt_id`` of a message, or ``None`` (``status``, reconnect ``executing``)."""
    data = msg.get("data") or {}
    pid = data.get("prompt_id") if isinstance(data, Mapping) else None
    return pid if isinstance(pid, str) else None


@dataclass
class PromptEvent:
    """Something worth telling the user about one prompt.

    ``kind`` is one of ``started``, ``cached``, ``executing``, ``progress``, ``executed``,
    ``succeeded``, ``failed``, ``interrupted``; ``node`` is a node id where one applies;
    ``value``/``max`` for ``progress``; ``nodes`` for ``cached``.
    """

    kind: str
    node: Optional[str] = None
    value: Optional[float] = None
    max: Optional[float] = None
    nodes: list[str] = field(default_factory=list)


class PromptTracker:
    """Follows one prompt's WebSocket messages, one at a time, with no I/O.

    Completion is ``execution_success`` or ``executing`` with ``node: null`` for this
    prompt, whichever comes first (older servers send only the latter); failure is
    ``execution_error`` or ``execution_interrupted``.

    Attributes:
        prompt_id: the prompt followed; messages for other prompts are ignored.
        started: ``execution_start`` was seen.
        done: a completion or failure was seen.
        error: a :class:`NodeExecutionError` or :class:`ExecutionInterrupted` when failed.
        cached_nodes: node ids from ``execution_cached``.
        executed_nodes: node ids that ran (``executing``), in order.
        current_node: the node executing now, or ``None``.
    """

    def __init__(self, prompt_id: str, node_types: Mapping[str, str] | None = None):
        self.prompt_id = prompt_id
        self.node_types = dict(node_types or {})
        self.started = False
        self.done = False
        self.error: Optional[ComfyUIError] = None
        self.cached_nodes: list[str] = []
        self.executed_nodes: list[str] = []
        self.current_node: Optional[str] = None

    @property
    def fully_cached(self) -> bool:
        """True when the server served every node from its cache (nothing executed).

        With the prompt's nodes known, every one of them must be in ``execution_cached``: a
        completion read from ``/history`` has no ``executing`` messages to tell executed nodes.
        """
        if not (self.done and self.error is None and self.cached_nodes):
            return False
        if self.node_types:
            return set(self.node_types) <= set(self.cached_nodes)
        return not self.executed_nodes

    def describe(self) -> str:
        """A short human text of where the prompt is (for timeouts and logs)."""
        if self.done:
            return "failed" if self.error else "finished"
        if self.current_node:
            kind = self.node_types.get(self.current_node)
            return f"executing node {self.current_node}" + (f" ({kind})" if kind else "")
        return "running" if self.started else "queued (no execution_start yet)"

    def feed(self, msg: Mapping[str, Any]) -> list[PromptEvent]:
        """Take one parsed message; return the events it means for this prompt (maybe none)."""
        if self.done:
            return []
        data = msg.get("data") or {}
        if data.get("prompt_id") != self.prompt_id:
            return []
        kind = msg.get("type")
        if kind == "execution_start":
            self.started = True
            return [PromptEvent("started")]
        if kind == "execution_cached":
            self.started = True
            nodes = data.get("nodes")
            self.cached_nodes = [str(n) for n in nodes] if isinstance(nodes, list) else []
            return [PromptEvent("cached", nodes=list(self.cached_nodes))] if self.cached_nodes else []
        if kind == "executing":
            node = data.get("node")
            if node is None:
                return self._finish()
            self.started = True
            self.current_node = str(node)
            self.executed_nodes.append(self.current_node)
            return [PromptEvent("executing", node=self.current_node)]
        if kind == "progress":
            node = data.get("node")
            return [PromptEvent("progress", node=str(node) if node is not None else None,
                                value=_number(data.get("value")), max=_number(data.get("max")))]
        if kind == "executed":
            return [PromptEvent("executed", node=str(data.get("node")))]
        if kind == "execution_success":
            return self._finish()
        if kind == "execution_error":
            self.done = True
            self.error = NodeExecutionError(
                self.prompt_id,
                _str_or_none(data.get("node_id")),
                data.get("node_type"),
                data.get("exception_type"),
                data.get("exception_message"),
            )
            return [PromptEvent("failed", node=_str_or_none(data.get("node_id")))]
        if kind == "execution_interrupted":
            self.done = True
            self.error = ExecutionInterrupted(
                self.prompt_id, _str_or_none(data.get("node_id")), data.get("node_type")
            )
            return [PromptEvent("interrupted", node=_str_or_none(data.get("node_id")))]
        return []  # progress_state and anything newer: nothing to tell

    def _finish(self) -> list[PromptEvent]:
        self.done = True
        self.current_node = None
        return [PromptEvent("succeeded")]


def _str_or_none(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def _number(value: Any) -> Optional[float]:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def queue_remaining_of(msg: Mapping[str, Any]) -> Optional[int]:
    """``data.status.exec_info.queue_remaining`` of a ``status`` message, or ``None`` if malformed."""
    status = (msg.get("data") or {}).get("status")
    info = status.get("exec_info") if isinstance(status, Mapping) else None
    value = info.get("queue_remaining") if isinstance(info, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class OutputRef:
    """One file a prompt produced, as listed in history ``outputs``.

    ``key`` is the list it came under (``images``, ``gifs``, ``videos``, ``audio``, ...);
    ``filename``/``subfolder``/``type`` are the ``GET /view`` query parameters.
    """

    node_id: str
    key: str
    filename: str
    subfolder: str
    type: str
    animated: bool = False


def outputs_from_history(
    entry: Mapping[str, Any], types: Iterable[str] | None = ("output",)
) -> list[OutputRef]:
    """Every downloadable file under every output node of one history entry.

    Args:
        entry: the value of ``GET /history/{prompt_id}`` for the prompt
            (``{"prompt": [...], "outputs": {node_id: {key: [item, ...]}}, "status": ...}``).
        types: keep only items whose ``type`` is in this set (``output``, ``temp``, ``input``);
            ``None`` keeps every type.

    Animated outputs (SaveAnimatedWEBP, SaveWEBM, SaveVideo) come under ``images`` with
    ``animated: [true]``; lists of strings such as ``text`` are not files and are skipped.
    """
    wanted = set(types) if types is not None else None
    refs: list[OutputRef] = []
    for node_id, output in (entry.get("outputs") or {}).items():
        if not isinstance(output, Mapping):
            continue
        animated_flags = output.get("animated") or []
        for key, items in output.items():
            if key == "animated" or not isinstance(items, list):
                continue
            for i, item in enumerate(items):
                if not isinstance(item, Mapping) or not isinstance(item.get("filename"), str):
                    continue
                item_type = str(item.get("type") or "output")
                if wanted is not None and item_type not in wanted:
                    continue
                animated = bool(animated_flags[i]) if i < len(animated_flags) else bool(
                    animated_flags and animated_flags[0]
                )
                refs.append(
                    OutputRef(
                        node_id=str(node_id),
                        key=key,
                        filename=item["filename"],
                        subfolder=str(item.get("subfolder") or ""),
                        type=item_type,
                        animated=animated,
                    )
                )
    return refs
