"""ComfyUI workflow templates, parameter bindings and seeds.

A ComfyUI API-format workflow (the ``prompt`` of ``POST /prompt``) is a mapping::

    {node_id: {"class_type": str, "inputs": {name: value_or_link}, "_meta"?: {"title": str}}}

where a link is ``["other_node_id", output_index]``. This module loads such a workflow from a
file or a dict, attaches *bindings* (which input of which node receives which run parameter) and
renders one concrete prompt per generation with :meth:`ComfyUIWorkflow.render`.

Accepted documents (``.json``)
    * API format, as saved by ComfyUI's "Export (API)";
    * API format wrapped like a ``POST /prompt`` body: ``{"prompt": {...}, "client_id"?: ...,
      "extra_data"?: ...}`` (the extra keys are ignored).

    A UI-format file (top-level ``nodes`` and ``links``, as saved by "Save") is rejected with a
    :class:`~blocks.errors.WorkflowError` telling to use Workflow menu -> Export (API).

Bindings
    Either a top-level ``"comfy_pipeline": {"bindings": {...}}`` key in the workflow JSON (it is
    removed from the prompt, the server never sees it) or a sidecar file ``<stem>.bindings.json``
    next to the workflow holding ``{"bindings": {...}}``. Not both. The bindings map a parameter
    name to one of:

    * a path ``"<node id or _meta.title>.inputs.<input name>"``, e.g. ``"6.inputs.text"`` or
      ``"KSampler.inputs.seed"``;
    * a list of such paths (the value is written into each of them);
    * ``{"path": <path or list of paths>, "format": "<str.format template>"}``: the template is
      formatted with *all* the parameters given to ``render`` (e.g.
      ``"smoke/{character}_d{index}_{prompt:.40}"``) and the resulting string is written.

    Node references resolve to a node id first, then to an exact, unique ``_meta.title``.
    Every path must name an existing literal (non-link) input; this is checked at load time.

Seeds
    :class:`SeedMode` and :func:`choose_seed` pick the seed of one generation.

Every problem raises :class:`blocks.errors.WorkflowError`, whose message names the file (or
``source``), the node / parameter / path concerned and what to do.
"""

from __future__ import annotations

import copy
import json
import os
import random
import string
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from prefect.blocks.core import Block
from pydantic import Field

from .catalog import DOCUMENTATION_URL, LOGO_URL
from .errors import WorkflowError
from .preflight import prompt_problems

__all__ = [
    "ComfyUIWorkflow",
    "SeedMode",
    "choose_seed",
    "PIPELINE_KEY",
    "SIDECAR_SUFFIX",
    "RANDOM_SEED_MAX",
    "COMFY_SEED_MAX",
]

#: Top-level key of a workflow JSON that holds this pipeline's settings (``{"bindings": {...}}``).
PIPELINE_KEY = "comfy_pipeline"
#: Suffix of the sidecar bindings file: ``foo.json`` -> ``foo.bindings.json``.
SIDECAR_SUFFIX = ".bindings.json"
#: Largest seed :func:`choose_seed` draws in ``random`` mode (32-bit).
RANDOM_SEED_MAX = 2**32 - 1
#: Largest seed ComfyUI's KSampler accepts (``0xffffffffffffffff``).
COMFY_SEED_MAX = 2**64 - 1

# Keys of a POST /prompt body that may sit next to "prompt" in a wrapped file; all ignored.
_WRAPPER_IGNORED_KEYS = frozenset(
    {"client_id", "extra_data", "number", "front", "prompt_id", "partial_execution_targets"}
)
_PIPELINE_SECTION_KEYS = frozenset({"bindings"})
_BINDING_OBJECT_KEYS = frozenset({"path", "format"})
_INPUTS_SEPARATOR = ".inputs."
_EXPORT_HINT = (
    "Open it in ComfyUI and use Workflow menu -> Export (API), then use that file instead."
)


# --------------------------------------------------------------------------------------------
# Parsed bindings (internal)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    path: str  # as written by the user
    node_id: str
    input_name: str


@dataclass(frozen=True)
class _Binding:
    name: str
    targets: tuple[_Target, ...]
    format: Optional[str]
    fields: tuple[str, ...]  # parameter names used by the format, in order of appearance


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _src(source: Optional[str]) -> str:
    return source or "<workflow>"


def _title_of(node: Any) -> Optional[str]:
    if not isinstance(node, Mapping):
        return None
    meta = node.get("_meta")
    if isinstance(meta, Mapping):
        title = meta.get("title")
        if isinstance(title, str):
            return title
    return None


def _known_nodes(prompt: Mapping[str, Any]) -> str:
    parts = []
    for node_id, node in prompt.items():
        class_type = node.get("class_type", "?") if isinstance(node, Mapping) else "?"
        title = _title_of(node)
        text = f"{node_id!r} ({class_type}"
        if title is not None:
            text += f", title {title!r}"
        parts.append(text + ")")
    return "known nodes (id (class, title)): " + (", ".join(parts) if parts else "none")


def _is_link(value: Any) -> bool:
    # ComfyUI treats any list in "inputs" as a link ["node_id", output_index].
    return isinstance(value, list)


def _resolve_node(prompt: Mapping[str, Any], ref: str) -> tuple[Optional[str], Optional[str]]:
    """Return ``(node_id, None)`` or ``(None, reason)`` for a node id or ``_meta.title``."""
    if ref in prompt:
        return ref, None
    matches = [node_id for node_id, node in prompt.items() if _title_of(node) == ref]
    if len(matches) == 1:
        return matches[0], None
    if not matches:
        return None, f"no node has the id or title {ref!r}"
    return None, (
        f"the title {ref!r} matches several nodes ({', '.join(repr(m) for m in matches)}); "
        "use a node id or give the nodes distinct titles"
    )


def _format_fields(fmt: str) -> list[str]:
    """Parameter names used by a ``str.format`` template (raises ValueError if malformed)."""
    names: list[str] = []
    for _literal, field_name, format_spec, _conversion in string.Formatter().parse(fmt):
        if field_name is None:
            continue
        root = field_name
        for sep in (".", "["):
            root = root.split(sep, 1)[0]
        if root == "" or root.isdigit():
            raise ValueError(
                f"placeholder {{{field_name}}} is positional; name a parameter, e.g. {{prompt}}"
            )
        if root not in names:
            names.append(root)
        if format_spec:
            for nested in _format_fields(format_spec):
                if nested not in names:
                    names.append(nested)
    return names


# --------------------------------------------------------------------------------------------
# Document parsing
# --------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()!r})"
        raise WorkflowError(
            f"{what} {str(path)!r} does not exist{where}. On a Prefect worker, save the workflow as "
            "a ComfyUI Workflow block ('comfy-pipeline workflow save NAME FILE') and give the "
            "deployment that block, or an absolute path that exists on the worker."
        ) from None
    except IsADirectoryError:
        raise WorkflowError(f"{what} {str(path)!r} is a directory, not a JSON file.") from None
    except UnicodeDecodeError as exc:
        raise WorkflowError(
            f"{what} {str(path)!r} is not UTF-8 text ({exc.reason}); it must be a JSON file."
        ) from None
    except OSError as exc:
        raise WorkflowError(f"{what} {str(path)!r} cannot be read: {exc}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(
            f"{what} {str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}."
        ) from None


def _is_ui_format(data: Mapping[str, Any]) -> bool:
    return "nodes" in data and "links" in data and not isinstance(data.get("nodes"), Mapping)


def _split_document(data: Any, source: str) -> tuple[dict[str, Any], Optional[Any]]:
    """Split a workflow document into ``(prompt, comfy_pipeline section or None)``."""
    if not isinstance(data, Mapping):
        raise WorkflowError(
            f"Workflow {source!r} must be a JSON object (API format: "
            f"{{node_id: {{\"class_type\": ..., \"inputs\": {{...}}}}}}), "
            f"got {type(data).__name__}."
        )
    if _is_ui_format(data):
        raise WorkflowError(
            f"Workflow {source!r} is in ComfyUI's UI format (it has top-level 'nodes' and "
            f"'links'), which the server cannot run. {_EXPORT_HINT}"
        )
    sections: list[Any] = []
    wrapped = data.get("prompt")
    if isinstance(wrapped, Mapping) and "class_type" not in wrapped:
        unknown = sorted(
            str(k) for k in data if k not in _WRAPPER_IGNORED_KEYS | {"prompt", PIPELINE_KEY}
        )
        if unknown:
            raise WorkflowError(
                f"Workflow {source!r} wraps its prompt as {{\"prompt\": {{...}}}} but also has "
                f"unknown top-level keys {unknown}; only 'prompt', 'client_id', 'extra_data' and "
                f"{PIPELINE_KEY!r} are allowed there."
            )
        if PIPELINE_KEY in data:
            sections.append(data[PIPELINE_KEY])
        if _is_ui_format(wrapped):
            raise WorkflowError(
                f"Workflow {source!r} holds a UI-format workflow under 'prompt'. {_EXPORT_HINT}"
            )
        inner = dict(wrapped)
    else:
        inner = dict(data)
    if PIPELINE_KEY in inner:
        sections.append(inner.pop(PIPELINE_KEY))
    if len(sections) > 1:
        raise WorkflowError(
            f"Workflow {source!r} has {PIPELINE_KEY!r} both next to 'prompt' and inside it; "
            "keep the bindings in one place."
        )
    return inner, (sections[0] if sections else None)


def _bindings_from_section(section: Any, where: str) -> dict[str, Any]:
    if not isinstance(section, Mapping):
        raise WorkflowError(
            f"{where} must be an object {{\"bindings\": {{...}}}}, got {type(section).__name__}."
        )
    unknown = sorted(str(k) for k in section if k not in _PIPELINE_SECTION_KEYS)
    if unknown:
        raise WorkflowError(
            f"{where} has unknown keys {unknown}; only 'bindings' is allowed "
            "({\"bindings\": {parameter: path}})."
        )
    bindings = section.get("bindings", {})
    if not isinstance(bindings, Mapping):
        raise WorkflowError(
            f"{where}: 'bindings' must be an object {{parameter: path}}, "
            f"got {type(bindings).__name__}."
        )
    return dict(bindings)


def _normalize_prompt(prompt: Any, source: str) -> dict[str, Any]:
    """Check the API-format structure and return a normalized deep copy.

    Node ids become strings and a node without ``inputs`` gets ``{}``.
    """
    if not isinstance(prompt, Mapping):
        raise WorkflowError(
            f"Workflow {source!r}: the prompt must be an object {{node_id: node}}, "
            f"got {type(prompt).__name__}."
        )
    if not prompt:
        raise WorkflowError(
            f"Workflow {source!r} has no nodes. Export a workflow with at least one output node "
            "(Workflow menu -> Export (API))."
        )
    out: dict[str, Any] = {}
    for raw_id, node in prompt.items():
        node_id = str(raw_id)
        if node_id in out:
            raise WorkflowError(f"Workflow {source!r}: node id {node_id!r} appears twice.")
        if not isinstance(node, Mapping):
            raise WorkflowError(
                f"Workflow {source!r}: node {node_id!r} must be an object "
                f"{{\"class_type\": ..., \"inputs\": {{...}}}}, got {type(node).__name__}."
            )
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise WorkflowError(
                f"Workflow {source!r}: node {node_id!r} has no 'class_type' (a non-empty "
                "string). Is this really an API-format export (Workflow menu -> Export (API))?"
            )
        inputs = node.get("inputs", {})
        if not isinstance(inputs, Mapping):
            raise WorkflowError(
                f"Workflow {source!r}: node {node_id!r} ({class_type}) has 'inputs' of type "
                f"{type(inputs).__name__}; it must be an object {{input_name: value}}."
            )
        new_node = copy.deepcopy(dict(node))
        new_node["inputs"] = copy.deepcopy(dict(inputs))
        out[node_id] = new_node
    return out


def _compile_bindings(
    prompt: Mapping[str, Any], bindings: Mapping[str, Any], source: str
) -> list[_Binding]:
    """Parse and check every binding against the prompt (see the module docstring)."""
    if not isinstance(bindings, Mapping):
        raise WorkflowError(
            f"Workflow {source!r}: bindings must be an object {{parameter: path}}, "
            f"got {type(bindings).__name__}."
        )
    compiled: list[_Binding] = []
    owner: dict[tuple[str, str], tuple[str, str]] = {}  # (node, input) -> (param, path)
    for name, spec in bindings.items():
        if not isinstance(name, str) or not name:
            raise WorkflowError(
                f"Workflow {source!r}: binding names must be non-empty strings, got {name!r}."
            )
        where = f"Workflow {source!r}, binding {name!r}"
        fmt: Optional[str] = None
        if isinstance(spec, Mapping):
            unknown = sorted(str(k) for k in spec if k not in _BINDING_OBJECT_KEYS)
            if unknown:
                raise WorkflowError(
                    f"{where}: unknown keys {unknown}; a binding object has 'path' and "
                    "optionally 'format'."
                )
            if "path" not in spec:
                raise WorkflowError(f"{where}: the binding object has no 'path'.")
            fmt = spec.get("format")
            if fmt is not None and not isinstance(fmt, str):
                raise WorkflowError(
                    f"{where}: 'format' must be a string, got {type(fmt).__name__}."
                )
            paths_spec = spec["path"]
        else:
            paths_spec = spec
        if isinstance(paths_spec, str):
            paths = [paths_spec]
        elif isinstance(paths_spec, list) and paths_spec:
            paths = list(paths_spec)
        else:
            raise WorkflowError(
                f"{where}: expected a path \"<node id or title>.inputs.<input>\", a non-empty "
                "list of paths, or {\"path\": ..., \"format\": ...}; got "
                f"{json.dumps(spec, default=str)}."
            )
        fields: tuple[str, ...] = ()
        if fmt is not None:
            try:
                fields = tuple(_format_fields(fmt))
            except ValueError as exc:
                raise WorkflowError(
                    f"{where}: format {fmt!r} is not a valid str.format template: {exc}."
                ) from None
        targets: list[_Target] = []
        for path in paths:
            if not isinstance(path, str):
                raise WorkflowError(
                    f"{where}: paths must be strings, got {json.dumps(path, default=str)}."
                )
            ref, sep, input_name = path.rpartition(_INPUTS_SEPARATOR)
            if not sep or not ref or not input_name:
                raise WorkflowError(
                    f"{where}: path {path!r} must look like '<node id or title>.inputs.<input "
                    f"name>' (e.g. '6.inputs.text'); {_known_nodes(prompt)}."
                )
            node_id, reason = _resolve_node(prompt, ref)
            if node_id is None:
                raise WorkflowError(f"{where}: path {path!r}: {reason}; {_known_nodes(prompt)}.")
            node = prompt[node_id]
            inputs = node.get("inputs", {})
            if input_name not in inputs:
                raise WorkflowError(
                    f"{where}: path {path!r}: node {node_id!r} ({node['class_type']}) has no "
                    f"input {input_name!r}; its inputs are {sorted(inputs)}."
                )
            if _is_link(inputs[input_name]):
                raise WorkflowError(
                    f"{where}: path {path!r}: input {input_name!r} of node {node_id!r} "
                    f"({node['class_type']}) is a link {inputs[input_name]!r} to another node, "
                    "not a value; bind the input of the node it comes from, or replace the "
                    "link with a widget value in ComfyUI."
                )
            key = (node_id, input_name)
            if key in owner:
                other_name, other_path = owner[key]
                if other_name == name:
                    continue  # the same input written twice by the same parameter
                raise WorkflowError(
                    f"{where}: path {path!r} targets input {input_name!r} of node {node_id!r}, "
                    f"which binding {other_name!r} already writes (via {other_path!r}); "
                    "an input can receive only one parameter."
                )
            owner[key] = (name, path)
            targets.append(_Target(path=path, node_id=node_id, input_name=input_name))
        compiled.append(_Binding(name=name, targets=tuple(targets), format=fmt, fields=fields))
    return compiled


# --------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------


class ComfyUIWorkflow(Block):
    """A ComfyUI API-format workflow template with parameter bindings.

    ``prompt`` is the API-format graph ``{node_id: {"class_type", "inputs", "_meta"?}}`` that is
    sent as the ``prompt`` of ``POST /prompt``. ``bindings`` map run parameters (``prompt``,
    ``seed``, ``negative_prompt``, ...) to node inputs, written as
    ``"<node id or _meta.title>.inputs.<input>"``, a list of such paths, or
    ``{"path": ..., "format": "<str.format template over all parameters>"}``.
    :meth:`render` returns one concrete prompt per generation. Build one with
    :meth:`from_file` or :meth:`from_dict`; the structure and the bindings are checked when the
    block is created and every problem raises ``blocks.errors.WorkflowError``.

    Attributes:
        prompt: The API-format workflow.
        bindings: Parameter name -> path(s) or ``{"path", "format"}``.
        source: Where the workflow was loaded from, used in error messages.

    Example:
        Load a saved workflow and render the prompt of one generation:
        ```python
        from comfy_pipeline.blocks import ComfyUIWorkflow

        workflow = ComfyUIWorkflow.load("BLOCK_NAME")
        prompt = workflow.render({"prompt": "a red fox in the snow", "seed": 42})
        ```
    """

    _block_type_name = "ComfyUI Workflow"
    _block_type_slug = "comfyui-workflow"
    _logo_url = LOGO_URL
    _description = (
        "A ComfyUI API-format workflow (Workflow menu -> Export (API)) with bindings that say "
        "which node inputs receive the prompt, seed and other run parameters. Save one with "
        "'comfy-pipeline workflow save NAME FILE'."
    )
    _documentation_url = DOCUMENTATION_URL

    prompt: dict[str, Any] = Field(
        description=(
            "The workflow in ComfyUI API format: {node_id: {class_type, inputs, _meta}}, "
            "as saved by Workflow menu -> Export (API)."
        ),
    )
    bindings: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Parameter name -> '<node id or title>.inputs.<input>', a list of such paths, or "
            "{\"path\": ..., \"format\": \"str.format template\"}."
        ),
    )
    source: Optional[str] = Field(
        default=None,
        description="Where the workflow was loaded from (file path), used in error messages.",
    )

    def block_initialization(self) -> None:
        """Normalize the prompt and check it and the bindings (raises ``WorkflowError``)."""
        self.prompt = _normalize_prompt(self.prompt, _src(self.source))
        self.validate_bindings()

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> "ComfyUIWorkflow":
        """Build a workflow from an already parsed JSON document.

        Args:
            data: API format ``{node_id: node}`` or a wrapped ``{"prompt": {...}, "client_id"?,
                "extra_data"?}`` body, optionally with a ``"comfy_pipeline": {"bindings": {...}}``
                key (top level or inside the prompt), which is removed from the prompt.
            source: Name used in error messages (a file path for :meth:`from_file`).

        Returns:
            The validated workflow; ``data`` is not modified.

        Raises:
            WorkflowError: UI-format document (asks for Export (API)), non-object, empty
                workflow, malformed node, malformed or unresolvable binding.
        """
        prompt, section = _split_document(data, source)
        bindings: dict[str, Any] = {}
        if section is not None:
            bindings = _bindings_from_section(section, f"Workflow {source!r}: {PIPELINE_KEY!r}")
        return cls(prompt=prompt, bindings=copy.deepcopy(bindings), source=source)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "ComfyUIWorkflow":
        """Load a workflow JSON file and its bindings.

        The bindings come from the file's ``"comfy_pipeline"`` key or from the sidecar
        ``<stem>.bindings.json`` next to it (``foo.json`` -> ``foo.bindings.json``) holding
        ``{"bindings": {...}}``; having both is an error.

        Raises:
            WorkflowError: missing/unreadable file, invalid JSON, UI-format file (asks for
                Workflow menu -> Export (API)), bindings in two places, and everything
                :meth:`from_dict` rejects. Messages name the file.
        """
        path = Path(path)
        source = str(path)
        data = _read_json(path, "Workflow file")
        prompt, section = _split_document(data, source)
        sidecar = path.with_name(path.stem + SIDECAR_SUFFIX)
        bindings: dict[str, Any] = {}
        if sidecar.exists() and sidecar != path:
            if section is not None:
                raise WorkflowError(
                    f"Workflow {source!r} has bindings both in its {PIPELINE_KEY!r} key and in "
                    f"the sidecar file {str(sidecar)!r}; keep the bindings in one place "
                    "(delete one of them)."
                )
            bindings = _bindings_from_section(
                _read_json(sidecar, "Bindings file"), f"Bindings file {str(sidecar)!r}"
            )
        elif section is not None:
            bindings = _bindings_from_section(section, f"Workflow {source!r}: {PIPELINE_KEY!r}")
        return cls(prompt=prompt, bindings=bindings, source=source)

    # -- inspection -------------------------------------------------------------------------

    def validate_bindings(self) -> None:
        """Check the prompt structure and that every binding resolves.

        Called when the block is created; call it again after editing ``prompt`` or
        ``bindings``.

        Raises:
            WorkflowError: naming the parameter, the path and the known node ids/titles when a
                node or input does not exist, a title is ambiguous, the input holds a link, two
                parameters write the same input, or a binding or format is malformed.
        """
        source = _src(self.source)
        prompt = _normalize_prompt(self.prompt, source)
        _compile_bindings(prompt, self.bindings, source)

    def class_types(self) -> set[str]:
        """The set of ``class_type`` values used by the workflow's nodes."""
        return {node["class_type"] for node in self.prompt.values()}

    def binds(self, name: str) -> bool:
        """Whether parameter ``name`` affects the rendered prompt.

        True when ``name`` is a binding key or a placeholder of a binding's format.
        """
        if name in self.bindings:
            return True
        return any(
            name in b.fields
            for b in _compile_bindings(self.prompt, self.bindings, _src(self.source))
        )

    # -- rendering --------------------------------------------------------------------------

    def render(
        self,
        params: Mapping[str, Any],
        updates: Optional[Mapping[str, Mapping[str, Any]]] = None,
    ) -> dict[str, Any]:
        """Return a deep copy of ``prompt`` with the bindings and ``updates`` applied.

        Args:
            params: Run parameters, e.g. ``{"prompt": str, "seed": int, "character": str,
                "index": int, "variant": int, "negative_prompt": str}``. Parameters that no
                binding uses are ignored. A plain binding whose parameter is absent (or
                ``None``) leaves the workflow's value unchanged. A format binding is always
                rendered with ``str.format`` over all ``params``; parameter values are data,
                so braces inside a description are kept as they are. Other values are written
                as given (an ``int`` seed stays an ``int``).
            updates: Raw overrides applied after the bindings:
                ``{node_id_or_title: {"inputs": {input_name: value}}}``.

        Returns:
            A new API-format prompt ``{node_id: node}``; the template is not modified.

        Raises:
            WorkflowError: a format placeholder missing from ``params`` or a format that
                cannot be applied to the given values; an ``updates`` entry naming an unknown
                or ambiguous node or an input the node does not have.
        """
        source = _src(self.source)
        if not isinstance(params, Mapping):
            raise WorkflowError(
                f"Workflow {source!r}: render() params must be a mapping, "
                f"got {type(params).__name__}."
            )
        prompt = _normalize_prompt(self.prompt, source)
        bindings = _compile_bindings(prompt, self.bindings, source)
        for (node_id, input_name), value in _bound_values(bindings, params, source).items():
            prompt[node_id]["inputs"][input_name] = copy.deepcopy(value)
        if updates:
            self._apply_updates(prompt, updates, source)
        return prompt

    def bound_values(
        self, params_list: Iterable[Mapping[str, Any]]
    ) -> list[dict[tuple[str, str], Any]]:
        """What :meth:`render` would write into the bound inputs, for many parameter sets at once.

        Cheaper than rendering each (the bindings are resolved once and the prompt is not
        copied): the preflight uses it to check every generation's seed and other varying values.

        Args:
            params_list: one parameter mapping per generation, as given to :meth:`render`.

        Returns:
            one ``{(node_id, input_name): value}`` per parameter set, in order; an input whose
            plain binding has no value (absent or ``None``) is left out, as render() leaves it.

        Raises:
            WorkflowError: as :meth:`render`, for the first parameter set a format binding
                cannot be applied to.
        """
        source = _src(self.source)
        bindings = _compile_bindings(self.prompt, self.bindings, source)
        return [_bound_values(bindings, params, source) for params in params_list]

    def bound_inputs(self, names: Iterable[str]) -> set[tuple[str, str]]:
        """The ``(node_id, input_name)`` pairs written from any parameter in ``names``: by a
        binding of that name or by a format binding that uses it."""
        wanted = set(names)
        return {
            (target.node_id, target.input_name)
            for binding in _compile_bindings(self.prompt, self.bindings, _src(self.source))
            if binding.name in wanted or wanted.intersection(binding.fields)
            for target in binding.targets
        }

    @staticmethod
    def _apply_updates(
        prompt: dict[str, Any], updates: Mapping[str, Any], source: str
    ) -> None:
        if not isinstance(updates, Mapping):
            raise WorkflowError(
                f"Workflow {source!r}: updates must be {{node_id_or_title: {{\"inputs\": "
                f"{{...}}}}}}, got {type(updates).__name__}."
            )
        for ref, change in updates.items():
            node_id, reason = _resolve_node(prompt, str(ref))
            if node_id is None:
                raise WorkflowError(
                    f"Workflow {source!r}: updates[{ref!r}]: {reason}; {_known_nodes(prompt)}."
                )
            if not isinstance(change, Mapping) or set(change) - {"inputs"}:
                raise WorkflowError(
                    f"Workflow {source!r}: updates[{ref!r}] must be {{\"inputs\": "
                    f"{{input_name: value}}}}, got {json.dumps(change, default=str)}."
                )
            new_inputs = change.get("inputs", {})
            if not isinstance(new_inputs, Mapping):
                raise WorkflowError(
                    f"Workflow {source!r}: updates[{ref!r}]['inputs'] must be an object, "
                    f"got {type(new_inputs).__name__}."
                )
            node = prompt[node_id]
            for input_name, value in new_inputs.items():
                if input_name not in node["inputs"]:
                    raise WorkflowError(
                        f"Workflow {source!r}: updates[{ref!r}]: node {node_id!r} "
                        f"({node['class_type']}) has no input {input_name!r}; its inputs are "
                        f"{sorted(node['inputs'])}."
                    )
                node["inputs"][input_name] = copy.deepcopy(value)


def _bound_values(
    bindings: list[_Binding], params: Mapping[str, Any], source: str
) -> dict[tuple[str, str], Any]:
    """``{(node_id, input_name): value}`` that compiled ``bindings`` write for ``params`` (see
    :meth:`ComfyUIWorkflow.render`; values are not copied). Raises ``WorkflowError``."""
    if not isinstance(params, Mapping):
        raise WorkflowError(
            f"Workflow {source!r}: render() params must be a mapping, got {type(params).__name__}."
        )
    values: dict[tuple[str, str], Any] = {}
    for binding in bindings:
        if binding.format is not None:
            missing = [f for f in binding.fields if f not in params]
            if missing:
                raise WorkflowError(
                    f"Workflow {source!r}, binding {binding.name!r}: format "
                    f"{binding.format!r} uses {', '.join(repr(m) for m in missing)}, which "
                    f"render() was not given (given: {sorted(map(str, params))})."
                )
            try:
                value: Any = binding.format.format_map(dict(params))
            except (KeyError, IndexError, AttributeError, ValueError, TypeError) as exc:
                raise WorkflowError(
                    f"Workflow {source!r}, binding {binding.name!r}: format "
                    f"{binding.format!r} cannot be applied to the given parameters: "
                    f"{type(exc).__name__}: {exc}."
                ) from None
        else:
            if params.get(binding.name) is None:
                continue
            value = params[binding.name]
        for target in binding.targets:
            values[(target.node_id, target.input_name)] = value
    return values


def require_description_binding(workflow: "ComfyUIWorkflow") -> None:
    """Refuse a workflow that would ignore the descriptions (binds none of ``prompt``,
    ``description`` or ``slug``).

    Raises:
        WorkflowError: naming the file and showing the binding to add.
    """
    if not any(workflow.binds(name) for name in ("prompt", "description", "slug")):
        raise WorkflowError(
            f"workflow {workflow.source or ''} has no binding for 'prompt', so every description would "
            "be ignored. Add one, e.g. \"comfy_pipeline\": {\"bindings\": {\"prompt\": "
            "\"<node id or title>.inputs.text\"}} (see README, Workflows and bindings)."
        )


def require_start_image_binding(workflow: ComfyUIWorkflow) -> None:
    """Refuse a video workflow of an image_to_video run that does not bind ``image`` (its start image).

    Raises:
        WorkflowError: naming the workflow and what to add.
    """
    if not workflow.binds("image"):
        raise WorkflowError(f"the video workflow {workflow.source or ''!r} does not bind 'image': bind its start "
                            "image input, e.g. \"image\": \"<LoadImage title>.inputs.image\" in its bindings, so "
                            "each video gets the image made for its description")


def problems_on_server(workflow: "ComfyUIWorkflow", object_info: Mapping[str, Any],
                       params: Optional[Mapping[str, Any]] = None) -> list[str]:
    """What in ``workflow`` the server cannot run, one sentence each (empty when all is well).

    Args:
        workflow: the template.
        object_info: the body of ``GET /object_info`` (``{class_type: {"input": {...}}}``).
        params: the parameters of one generation: the prompt rendered with them is checked.
            Without them the template's literal values are (what ``comfy-pipeline check`` does),
            except the bound inputs, whose values come from the run.

    Reports node types the server lacks (custom nodes not installed), required inputs that are
    absent, choice inputs (``ckpt_name``, ``sampler_name``, ...) whose value is not among the
    server's options (a checkpoint file that is not in its models folder) and numbers outside
    their ``min``/``max``; see ``blocks/preflight.py``, which checks a whole run this way.

    Raises:
        WorkflowError: ``params`` cannot be applied to the bindings (as :meth:`ComfyUIWorkflow.render`).
    """
    if params is None:
        found = prompt_problems(workflow.prompt, object_info, skip=frozenset(workflow.bound_inputs(workflow.bindings)))
    else:
        found = prompt_problems(workflow.render(params), object_info)
    return [str(problem) for problem in found]


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


class SeedMode(str, Enum):
    """How the seed of each generation is chosen (see :func:`choose_seed`).

    * ``random``: a fresh random seed in ``[0, 2**32 - 1]`` for every generation;
    * ``fixed``: ``base_seed`` (0 if unset) for every generation;
    * ``increment``: ``base_seed + index * variants + variant`` (``base_seed`` 0 if unset).
    """

    random = "random"
    fixed = "fixed"
    increment = "increment"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkflowError(f"choose_seed: {name} must be an integer, got {value!r}.")
    if value < minimum:
        raise WorkflowError(f"choose_seed: {name} must be >= {minimum}, got {value}.")
    return value


def choose_seed(
    mode: Union[SeedMode, str],
    *,
    base_seed: Optional[int],
    index: int,
    variant: int,
    variants: int,
    rng: Optional[random.Random] = None,
) -> int:
    """Choose the seed of one generation.

    ``index`` (the description's position) and ``variant`` are 0-based; ``variants`` is the
    number of variants per description (>= 1, ``variant < variants``).

    * ``random``: ``rng.randint(0, 2**32 - 1)`` (``rng`` defaults to ``random.SystemRandom``),
      ignoring ``base_seed``; ComfyUI accepts up to ``2**64 - 1`` but 32-bit seeds are kept.
    * ``fixed``: ``base_seed`` (0 if ``None``) for every generation.
    * ``increment``: ``base_seed + index * variants + variant`` (``base_seed`` 0 if ``None``),
      so every (description, variant) pair gets its own reproducible seed.

    Raises:
        WorkflowError: unknown mode, negative or non-integer arguments, ``variant >=
            variants``, or a resulting seed above ComfyUI's maximum ``2**64 - 1``.
    """
    try:
        mode = SeedMode(mode)
    except ValueError:
        raise WorkflowError(
            f"Unknown seed mode {mode!r}; use one of {[m.value for m in SeedMode]}."
        ) from None
    _check_int("index", index, 0)
    _check_int("variant", variant, 0)
    _check_int("variants", variants, 1)
    if variant >= variants:
        raise WorkflowError(
            f"choose_seed: variant {variant} is out of range for {variants} variants "
            "(variants are 0-based)."
        )
    if mode is SeedMode.random:
        return (rng or random.SystemRandom()).randint(0, RANDOM_SEED_MAX)
    base = 0 if base_seed is None else _check_int("base_seed", base_seed, 0)
    seed = base if mode is SeedMode.fixed else base + index * variants + variant
    if seed > COMFY_SEED_MAX:
        raise WorkflowError(
            f"choose_seed: seed {seed} exceeds ComfyUI's maximum {COMFY_SEED_MAX}; "
            "use a smaller base_seed."
        )
    return seed
