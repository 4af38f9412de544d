"""Preflight: before the first ``POST /prompt``, can each server run the rendered workflow?

ComfyUI validates a prompt only when it is posted, and refuses it with HTTP 400. A workflow that
cannot run on a server would be refused once per generation, so before anything is sent the run
checks the workflow against each server's ``GET /object_info`` (fetched once per server per run):

* node types the server does not have (the custom node that provides one is not installed there);
* required inputs that are absent;
* choice inputs (``ckpt_name``, ``sampler_name``, ``scheduler``, ...) whose value the server does
  not offer (a model file that is not in its models folder);
* numbers (``INT``, ``FLOAT`` inputs) that are not numbers or lie outside the input's ``min`` /
  ``max`` (a seed too large for the node).

As ComfyUI does, inputs are checked only on nodes that feed an output node (a stray node never
runs), and a link ``[node_id, output_index]`` only for naming a node of the workflow. A choice
value annotated as ComfyUI's image loaders accept it (``"name.png [output]"``) is let through.

The values checked are the ones the generations will send: the prompt of the plan's first
generation is rendered and checked whole, then each bound input whose value changes from one
generation to the next (the seed, the description, ...) is checked for every generation, value
by value, without rendering each prompt (:meth:`ComfyUIWorkflow.bound_values`).

:func:`run_preflight` applies the result to the run's :class:`~blocks.pool.ConnectionPool`: when
no server can run the workflow it raises :class:`~blocks.errors.WorkflowNotRunnable` listing every
problem (node id, ``class_type``, input, what the server offers); in a pool, a server that cannot
is left out with that reason and the others carry on. A server whose ``/object_info`` cannot be
read is not checked (a warning says so): ComfyUI still validates each prompt when it is posted.

After the run started, :func:`is_workflow_wide` tells a 400 that every generation would meet
(the workflow itself) from one caused by one generation's values; the task then stops the
remaining generations (:meth:`ConnectionPool.stop_new_prompts`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from .errors import ComfyUIError, PromptValidationError, WorkflowNotRunnable

if TYPE_CHECKING:  # no import at run time: workflow.py imports this module
    from .pool import ConnectionPool
    from .workflow import ComfyUIWorkflow

__all__ = ["PER_GENERATION", "Problem", "prompt_problems", "value_problem", "PlanCheck", "run_preflight",
           "is_workflow_wide"]

module_logger = logging.getLogger("comfy_pipeline.preflight")
Logger = Union[logging.Logger, logging.LoggerAdapter]

#: Parameters whose value changes from one generation to the next (see ``tasks.generate.workflow_params``);
#: the flow's ``params``, ``character`` and ``kind`` are the same for every generation of a run.
PER_GENERATION = ("prompt", "description", "slug", "seed", "index", "variant")

#: How many of a choice input's options a problem shows.
SHOWN_OPTIONS = 8

# "name.png [output]": a file of another folder, which LoadImage and friends validate themselves.
_ANNOTATED = re.compile(r" \[(input|output|temp)\]$")


@dataclass(frozen=True)
class Problem:
    """One thing a server cannot run: ``node <id> (<class_type>) input '<name>': <text>``.

    ``node_id`` is None for a problem of the whole workflow (no output node).
    """

    node_id: Optional[str]
    class_type: Optional[str]
    input_name: Optional[str]
    text: str

    def __str__(self) -> str:
        if self.node_id is None:
            return self.text
        where = f"node {self.node_id} ({self.class_type})"
        if self.input_name is not None:
            where += f" input '{self.input_name}'"
        return f"{where}: {self.text}"


# --------------------------------------------------------------------------------------------
# One prompt, one value (no I/O)
# --------------------------------------------------------------------------------------------


def _is_link(value: Any) -> bool:
    return isinstance(value, list)  # ComfyUI treats any list in "inputs" as a link


def _combo_options(config: Any) -> Optional[list]:
    """The allowed values of a choice input's ``/object_info`` spec, or ``None`` if not a choice."""
    if not isinstance(config, list) or not config:
        return None
    if isinstance(config[0], list):
        return config[0]
    if config[0] == "COMBO" and len(config) > 1 and isinstance(config[1], Mapping):
        options = config[1].get("options")
        return options if isinstance(options, list) else None
    return None


def _type_of(config: Any) -> str:
    if _combo_options(config) is not None:
        return "COMBO"
    return str(config[0]) if isinstance(config, list) and config else "?"


def _options_of(config: Any) -> Mapping[str, Any]:
    if isinstance(config, list) and len(config) > 1 and isinstance(config[1], Mapping):
        return config[1]
    return {}


def _shown(options: list) -> str:
    shown = ", ".join(repr(o) for o in options[:SHOWN_OPTIONS])
    if len(options) > SHOWN_OPTIONS:
        shown += f" and {len(options) - SHOWN_OPTIONS} more"
    return shown or "none"


def value_problem(config: Any, value: Any) -> Optional[str]:
    """Why a server whose input is declared as ``config`` (an ``/object_info`` input spec such as
    ``["INT", {"min": 0, "max": 10}]`` or ``[["euler", "heun"], {}]``) refuses the literal
    ``value``, or None if it accepts it. Only choices and numbers are checked, as ComfyUI does."""
    options = _combo_options(config)
    if options is not None:
        if value in options or (isinstance(value, str) and _ANNOTATED.search(value)):
            return None
        return f"{value!r} is not one of the server's choices (it offers {_shown(options)})"
    kind = _type_of(config)
    if kind not in ("INT", "FLOAT"):
        return None
    try:
        number = int(value) if kind == "INT" else float(value)
    except (TypeError, ValueError, OverflowError):
        return f"{value!r} is not a number; the server's input is {kind}"
    opts = _options_of(config)
    low, high = opts.get("min"), opts.get("max")
    accepts = f"{low if low is not None else '-inf'} to {high if high is not None else 'inf'}"
    if isinstance(low, (int, float)) and number < low:
        return f"{value!r} is below the server's minimum (it accepts {accepts})"
    if isinstance(high, (int, float)) and number > high:
        return f"{value!r} is above the server's maximum (it accepts {accepts})"
    return None


def _outputs_and_feeders(prompt: Mapping[str, Any], object_info: Mapping[str, Any]) -> tuple[bool, set[str]]:
    """``(has an output node, the node ids that feed an output node, outputs included)``.

    A node of a type the server lacks counts as an output here (what it needs is checked too)."""
    outputs = [nid for nid, node in prompt.items()
               if (object_info.get(node.get("class_type")) or {}).get("output_node")]
    todo = outputs + [nid for nid, node in prompt.items() if node.get("class_type") not in object_info]
    seen: set[str] = set()
    while todo:
        node_id = todo.pop()
        if node_id in seen or node_id not in prompt:
            continue
        seen.add(node_id)
        for value in (prompt[node_id].get("inputs") or {}).values():
            if _is_link(value) and value:
                todo.append(str(value[0]))
    return bool(outputs), seen


def _declared(object_info: Mapping[str, Any], class_type: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    spec = (object_info.get(class_type) or {}).get("input") or {}
    return spec.get("required") or {}, spec.get("optional") or {}


def prompt_problems(prompt: Mapping[str, Any], object_info: Mapping[str, Any], *,
                    skip: frozenset[tuple[str, str]] = frozenset()) -> list[Problem]:
    """Everything in an API-format ``prompt`` that a server with this ``/object_info`` refuses.

    Args:
        prompt: ``{node_id: {"class_type", "inputs"}}``, e.g. a rendered workflow.
        object_info: the body of ``GET /object_info`` (``{class_type: {"input": {...}, ...}}``).
        skip: ``(node_id, input_name)`` whose value is not checked here (checked per generation).

    Returns:
        the problems in workflow order; empty when the server can run it.
    """
    problems = []
    for node_id, node in prompt.items():
        class_type = node.get("class_type")
        if class_type not in object_info:
            problems.append(Problem(node_id, class_type, None, f"the server has no node type {class_type}: the "
                                    "custom node that provides it is not installed there"))
    has_output, feeders = _outputs_and_feeders(prompt, object_info)
    if not has_output and not problems:
        problems.append(Problem(None, None, None, "the workflow has no output node (SaveImage, "
                                "SaveAnimatedWEBP, SaveVideo, ...): the server would run nothing"))
    for node_id, node in prompt.items():
        class_type = node.get("class_type")
        if node_id not in feeders or class_type not in object_info:
            continue
        required, optional = _declared(object_info, class_type)
        inputs = node.get("inputs") or {}
        for name, config in required.items():
            if name not in inputs:
                problems.append(Problem(node_id, class_type, name, f"missing; the server's {class_type} "
                                        f"requires it ({_type_of(config)})"))
        for name, value in inputs.items():
            config = required.get(name, optional.get(name))
            if config is None:
                continue  # ComfyUI ignores inputs the node does not declare
            if _is_link(value):
                if len(value) != 2 or str(value[0]) not in prompt:
                    problems.append(Problem(node_id, class_type, name, f"{value!r} is not a link "
                                            "[node_id, output_index] to a node of the workflow"))
            elif (node_id, name) not in skip:
                reason = value_problem(config, value)
                if reason is not None:
                    problems.append(Problem(node_id, class_type, name, reason))
    return problems


# --------------------------------------------------------------------------------------------
# A run's plan (no I/O)
# --------------------------------------------------------------------------------------------


def _label(params: Mapping[str, Any], number: int) -> str:
    index, variant = params.get("index"), params.get("variant")
    if isinstance(index, int) and isinstance(variant, int):
        return f"description {index + 1} variant {variant + 1}"
    return f"generation {number + 1}"


class PlanCheck:
    """The values a run's generations will send, ready to be checked against any server.

    Args:
        workflow: the template with its bindings.
        params_list: the parameters of every generation, in plan order (non-empty).
        unchecked: parameters whose inputs are not checked: input images, whose name on each
            server is known only once they are uploaded there (``LoadImage`` checks them itself).

    Raises:
        WorkflowError: a binding cannot be applied to the parameters (from ``render``).
    """

    def __init__(self, workflow: "ComfyUIWorkflow", params_list: Sequence[Mapping[str, Any]],
                 unchecked: Sequence[str] = ()):
        if not params_list:
            raise ValueError("PlanCheck needs the parameters of at least one generation")
        self.first = workflow.render(params_list[0])
        self.unchecked = frozenset(workflow.bound_inputs(unchecked)) if unchecked else frozenset()
        self.labels = [_label(params, n) for n, params in enumerate(params_list)]
        # Every value each bound input takes, with the generations that send it; inputs whose
        # value is the same for every generation stay in the first prompt's check.
        takes: dict[tuple[str, str], dict[Any, list[int]]] = defaultdict(dict)
        for number, values in enumerate(workflow.bound_values(params_list)):
            for key, value in values.items():
                try:
                    takes[key].setdefault(value, []).append(number)
                except TypeError:  # unhashable (a list or dict given in params): the first prompt has it
                    continue
        self.varying = {key: values for key, values in takes.items()
                        if len(values) > 1 and key not in self.unchecked}

    def problems(self, object_info: Mapping[str, Any]) -> list[str]:
        """Every problem a server with this ``/object_info`` has with the run, one sentence each."""
        found = [str(p) for p in prompt_problems(self.first, object_info,
                                                 skip=frozenset(self.varying) | self.unchecked)]
        _, feeders = _outputs_and_feeders(self.first, object_info)
        for (node_id, name), values in self.varying.items():
            class_type = self.first[node_id].get("class_type")
            if node_id not in feeders or class_type not in object_info:
                continue
            required, optional = _declared(object_info, class_type)
            config = required.get(name, optional.get(name))
            if config is None or _type_of(config) not in ("INT", "FLOAT", "COMBO"):
                continue  # STRING, BOOLEAN, ...: not checked by ComfyUI either
            bad = [(reason, numbers) for value, numbers in values.items()
                   for reason in [value_problem(config, value)] if reason is not None]
            if not bad:
                continue
            count = sum(len(numbers) for _, numbers in bad)
            reason, numbers = min(bad, key=lambda b: b[1][0])
            more = f", and {count - 1} more generation(s)" if count > 1 else ""
            found.append(str(Problem(node_id, class_type, name, f"{reason} (for {self.labels[numbers[0]]}{more})")))
        return found


# --------------------------------------------------------------------------------------------
# The run (I/O)
# --------------------------------------------------------------------------------------------


def _fetch_object_info(connections: list, logger: Logger) -> dict[int, Optional[Mapping[str, Any]]]:
    """``GET /object_info`` of every connection at once: ``{position: body, or None if unreadable}``."""

    def fetch(connection) -> Optional[Mapping[str, Any]]:
        try:
            body = connection.http.object_info()
        except ComfyUIError as exc:
            logger.warning("the workflow is not checked against %s before the run: its /object_info "
                           "cannot be read (%s); ComfyUI still checks each prompt when it is posted",
                           connection.url, exc)
            return None
        if not isinstance(body, Mapping):
            logger.warning("the workflow is not checked against %s before the run: its /object_info "
                           "is not a ComfyUI answer", connection.url)
            return None
        return body

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(connections)),
                                               thread_name_prefix="comfyui-preflight") as executor:
        return dict(enumerate(executor.map(fetch, connections)))


def run_preflight(pool: "ConnectionPool", workflow: "ComfyUIWorkflow",
                  params_list: Sequence[Mapping[str, Any]], *, logger: Optional[Logger] = None,
                  unchecked: Sequence[str] = ()) -> dict[str, str]:
    """Check the run's workflow against every server of ``pool`` before anything is sent.

    Each server's ``/object_info`` is fetched once. A server that cannot run the workflow is left
    out of the pool (:meth:`ConnectionPool.leave_out`) with the problems as its reason, as long as
    another server can; the caller names it in the report.

    Args:
        pool: the run's open connections.
        workflow: the template with its bindings.
        params_list: the parameters of every generation, in plan order.
        logger: where the warnings go (the flow run's logger).
        unchecked: parameters whose inputs are not checked (input images: see :class:`PlanCheck`).

    Returns:
        ``{url: reason}`` of the servers left out.

    Raises:
        WorkflowNotRunnable: no server of the pool can run the workflow (every problem listed;
            nothing was sent). The pool is left as it was: the caller closes it.
        WorkflowError: a binding cannot be applied to the generations' parameters.
    """
    log = logger or module_logger
    if not params_list:
        return {}
    plan = PlanCheck(workflow, params_list, unchecked)
    connections = list(pool.connections)
    bodies = _fetch_object_info(connections, log)
    problems = {n: plan.problems(body) for n, body in bodies.items() if body is not None}
    refused = [n for n, found in problems.items() if found]
    if not refused:
        return {}
    if len(refused) == len(connections):
        raise WorkflowNotRunnable(workflow.source, {connections[n].url: problems[n] for n in refused})
    left_out = {}
    for n in refused:
        reason = "the workflow cannot run there: " + "; ".join(problems[n])
        log.warning("%s is left out of this run: %s", connections[n].url, reason)
        pool.leave_out(connections[n], reason)
        left_out[connections[n].url] = reason
    return left_out


def is_workflow_wide(error: PromptValidationError, workflow: "ComfyUIWorkflow",
                     per_generation: Sequence[str] = PER_GENERATION) -> bool:
    """Whether every generation of the run would meet this ``POST /prompt`` 400 (the cause is the
    workflow itself, not one generation's values).

    True for a refused graph (a node type the server lacks, no output node) and when at least one
    ``node_errors`` entry is about an input no per-generation parameter (:data:`PER_GENERATION`:
    the description, seed, index, variant) writes; an entry that names no input counts as
    per-generation when its node has such an input. False for any other 400 (a proxy's, say).
    ``per_generation``: the parameters that vary (add the generation's input images: a 400 about
    one of them, e.g. a file the server lost, is that generation's).
    """
    kind = error.error.get("type")
    if kind in ("invalid_prompt", "prompt_no_outputs") or (
            kind == "prompt_outputs_failed_validation" and not error.node_errors):
        return True
    if kind != "prompt_outputs_failed_validation":
        return False
    varying = workflow.bound_inputs(per_generation)
    varying_nodes = {node_id for node_id, _ in varying}
    for node_id, entry in error.node_errors.items():
        errors = entry.get("errors") if isinstance(entry, Mapping) else None
        for err in (errors if isinstance(errors, list) else None) or [{}]:
            extra = err.get("extra_info") if isinstance(err, Mapping) else None
            name = extra.get("input_name") if isinstance(extra, Mapping) else None
            per_generation = (str(node_id), name) in varying if name else str(node_id) in varying_nodes
            if not per_generation:
                return True
    return False
