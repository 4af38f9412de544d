"""Sharded runs: one parent flow run, one child flow run per shard of ``shard_size`` descriptions.

A ``generate-content`` run with ``shard_size`` > 0 and more descriptions than that calls
:func:`run_sharded` instead of generating anything itself. The descriptions are split into
shards (``plan_shards``: ``0:500``, ``500:1000``, ...) and each shard becomes a child run of the
same flow with ``shard="start:stop"`` and ``shard_size=0`` (``child_parameters``). A child makes
exactly its descriptions and keeps the parent's numbering: file names, seeds and the report's
description numbers are those of the whole run.

- **Inside a deployment run** (the parent's own flow run has a deployment): each child is a flow
  run of that same deployment, started with ``prefect.deployments.run_deployment(...,
  timeout=0, as_subflow=True)``, so any worker of the work pool can take a shard, and linked to
  the parent (a task run of the parent stands for each one in the UI). Their parameters are the
  parent's as the API has them (saved blocks as ``{"$ref": ...}``, never the loaded blocks and
  their secrets), on the parent's work queue and with its job variables. The parent polls their
  states (:func:`wait_for_flow_runs`), retries each shard that ended Failed or Crashed ONCE by
  retrying that same child flow run (:func:`retry_flow_run`: Scheduled, named ``AwaitingRetry``,
  as the UI's Retry does, so its completed generations are reused, not sent again), and waits
  again. A cancel of the parent cancels the children that have not ended (whether it arrives as
  the worker's SIGTERM or is seen in the API while waiting). Each child has an idempotency key
  made of the parent's id and its shard, so a retry of the parent finds its shards again: the
  completed ones stay done, the others run again.
- **Without a deployment** (a CLI or script run): the shards run one after the other as subflows
  in this process, each with ``retries=1`` (a failed shard runs again in the same flow run, its
  completed generations reused).

Then the parent writes one report over all shards under the same artifact keys as any run
(``tasks/report.py``): the table ``{character}-{kind}-generations`` (every shard's rows read back
from its own table artifact, with a ``shard`` column; at most
:data:`~comfy_pipeline.tasks.report.TABLE_ROWS` of the rows that did not succeed, failures
first, and the last as many that did), the summary
``{character}-{kind}-summary`` (verdict, failures, one line per shard with a link to its flow
run, totals, per-server figures) and a progress artifact counting finished shards. The parent ends
Completed when every shard completed, else Failed with "N of M generations failed in K of S
shards: shard 2 (descriptions 4-6)".
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, \
    FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import ArtifactSort
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.states import AwaitingRetry, Cancelled, Failed, State
from prefect.utilities.urls import url_for

from ..tasks.gallery import kind_text
from ..tasks.models import GenerationResult
from ..tasks.report import SUCCEEDED, artifact_key, table_shown, table_shown_text
from .descriptions import is_reference

__all__ = ["Shard", "ShardsCannotStart", "ParentCancelled", "plan_shards", "child_parameters",
           "generations_per_description", "run_sharded", "run_as_subflows", "run_on_deployment",
           "wait_for_flow_runs", "retry_flow_run", "cancel_flow_runs", "read_shard_rows",
           "shard_summary_markdown", "write_shard_report", "failed_message", "POLL_S"]

#: Seconds between two polls of the children's states (and the parent's: was it cancelled?).
POLL_S = 1.0
#: Seconds between two "still waiting for N shard(s)" lines in the parent's log.
STATUS_EVERY_S = 60.0
#: How many shards the Failed message names (then "...").
NAMED_SHARDS = 5
#: Flow run ids per API request when reading many children.
IDS_PER_REQUEST = 200


class ShardsCannotStart(Exception):
    """The children could never start (e.g. a concurrency limit of 1 that the parent itself holds)."""


class ParentCancelled(Exception):
    """The parent flow run was cancelled (Cancelling or Cancelled in the API) while it waited."""


@dataclass
class Shard:
    """One shard of a sharded run: descriptions ``start`` to ``stop - 1`` (0-based) of the
    parent's, and what became of its child flow run.

    ``number`` counts shards from 1. ``state``: the child's last state seen; ``run_count``: how
    many times the child ran (2 after a retry); ``rows``: its table rows as read back from the API
    (``reported``: it had a table); ``results``: the child's :class:`GenerationResult` list when
    it ran as a subflow and completed (empty for deployment children); ``retried``: the parent
    retried it.
    """

    number: int
    start: int
    stop: int
    flow_run_id: Optional[UUID] = None
    name: str = ""
    state: Optional[State] = None
    run_count: int = 0
    rows: list[dict] = field(default_factory=list)
    reported: bool = False
    table_note: str = ""
    results: list[GenerationResult] = field(default_factory=list)
    retried: bool = False

    @property
    def spec(self) -> str:
        """The child's ``shard`` parameter: ``"start:stop"``."""
        return f"{self.start}:{self.stop}"

    @property
    def label(self) -> str:
        """Its descriptions as a person numbers them: ``descriptions 4-6`` (or ``description 7``)."""
        if self.stop - self.start == 1:
            return f"description {self.start + 1}"
        return f"descriptions {self.start + 1}-{self.stop}"

    @property
    def completed(self) -> bool:
        return self.state is not None and self.state.is_completed()


def plan_shards(count: int, shard_size: int) -> list[Shard]:
    """The shards of ``count`` descriptions, ``shard_size`` each (the last one the rest), in order.

    Raises:
        ValueError: ``count`` or ``shard_size`` is below 1.
    """
    if count < 1 or shard_size < 1:
        raise ValueError(f"cannot split {count} description(s) into shards of {shard_size}")
    return [Shard(number=n + 1, start=start, stop=min(start + shard_size, count))
            for n, start in enumerate(range(0, count, shard_size))]


def child_parameters(parameters: dict[str, Any], shard: Shard, *, count: int) -> dict[str, Any]:
    """The parameters of ``shard``'s child run: the parent's with ``shard="start:stop"``,
    ``shard_size=0`` and ``descriptions`` the parent's reference string unchanged (the child reads
    and slices it) or, when it is a list, the shard's slice of it.

    ``parameters``: the parent's, as the flow was called (``arguments``) or as the API has them;
    not modified.

    Raises:
        ValueError: ``descriptions`` is missing, or a list whose length is not ``count``.
    """
    if "descriptions" not in parameters:
        raise ValueError("the parent's parameters have no descriptions")
    descriptions = parameters["descriptions"]
    child = dict(parameters, shard=shard.spec, shard_size=0)
    if not is_reference(descriptions):
        if len(descriptions) != count:
            raise ValueError(f"the parent's parameters have {len(descriptions)} description(s), not {count}")
        child["descriptions"] = list(descriptions[shard.start:shard.stop])
    return child


def generations_per_description(arguments: dict[str, Any]) -> int:
    """How many generations one description makes: ``variants``, or in an ``image_to_video``
    run ``image_variants * (1 + variants)`` (each image and its videos)."""
    variants = int(arguments.get("variants") or 1)
    if arguments.get("kind") == "image_to_video":
        return int(arguments.get("image_variants") or 1) * (1 + variants)
    return variants


# -- the parent ------------------------------------------------------------------------------


def run_sharded(arguments: dict[str, Any], *, count: int,
                logger: Union[logging.Logger, logging.LoggerAdapter]) -> Union[list[GenerationResult], State]:
    """Run a ``generate-content`` flow run's ``count`` descriptions as shards of
    ``arguments["shard_size"]`` and return what the parent flow returns.

    ``arguments``: every parameter of the parent as it was called (blocks as objects, descriptions
    a list or a reference string). Must be called inside the parent's flow run.

    Returns:
        when every shard completed: the children's results in plan order (subflows), or ``[]``
        (deployment children: their results stay in their own flow runs; the combined report has
        every row); else ``Failed("N of M generations failed in K of S shards: shard ...")``, or
        ``Cancelled`` when the parent was cancelled in the API while it waited (its children are
        cancelled too), or ``Failed`` when the shards could never start.

    Raises:
        KeyboardInterrupt, TerminationSignal: the parent was stopped (Ctrl-C, the worker's SIGTERM
            of a cancel): the children that had not ended are cancelled and the combined report says
            the run was stopped, then it is raised again.
    """
    began = time.monotonic()
    context = FlowRunContext.get()
    if context is None:
        raise RuntimeError("run_sharded must be called inside the parent's flow run")
    shards = plan_shards(count, int(arguments["shard_size"]))
    per_description = generations_per_description(arguments)
    character, kind = arguments.get("character", "character"), arguments.get("kind", "image")
    deployment_id = context.flow_run.deployment_id  # this run's own (not an enclosing run's)
    logger.info("%d description(s) in %d shard(s) of up to %d, %s", count, len(shards), arguments["shard_size"],
                "each a flow run of this deployment (any worker of the pool can take one)" if deployment_id
                else "each a subflow in this process, one after the other")
    progress = _ShardProgress(character, kind, len(shards))
    stopped: Optional[str] = None
    try:
        if deployment_id is not None:
            run_on_deployment(shards, context.flow_run, flow_name=context.flow.name, count=count, logger=logger,
                              on_final=progress.advance)
        else:
            run_as_subflows(arguments, shards, count=count, logger=logger, on_final=progress.advance)
    except ShardsCannotStart as exc:
        logger.error("%s", exc)
        return Failed(message=str(exc))
    except ParentCancelled as exc:
        stopped = f"cancelled ({exc})"
    except BaseException as exc:  # Ctrl-C, SIGTERM (a cancel through the worker), a crash
        stopped = _stop_reason(exc)
        logger.warning("the run was %s", stopped)
        _report(shards, arguments, per_description, began, logger, stopped=stopped)
        raise
    _report(shards, arguments, per_description, began, logger, stopped=stopped)
    if stopped:
        return Cancelled(message=f"the run was {stopped}; its shards that had not ended were cancelled")
    if all(s.completed for s in shards):
        logger.info("all %d shard(s) completed (%d generations)", len(shards), count * per_description)
        return [r for s in shards for r in s.results]
    message = failed_message(shards, per_description)
    logger.error("%s", message)
    return Failed(message=message)


def _stop_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, TerminationSignal):
        return f"terminated: its process got signal {signal.Signals(exc.signal).name}"
    return f"stopped by {type(exc).__name__}: {exc}"


def _report(shards, arguments, per_description, began, logger, *, stopped) -> None:
    """Read every shard's rows back and write the combined report; never raises (the run's own
    outcome must not be hidden by its report)."""
    try:
        with get_client(sync_client=True) as client:
            read_shard_rows(client, shards, artifact_key(arguments.get("character", "character"),
                                                         arguments.get("kind", "image"), "generations"))
        write_shard_report(shards, arguments, per_description=per_description, wall_s=time.monotonic() - began,
                           stopped=stopped)
    except Exception:
        logger.exception("could not write the combined report of the shards")


class _ShardProgress:
    """The parent's progress artifact: the share of its shards that ended (whatever their state)."""

    def __init__(self, character: str, kind: str, total: int):
        self.total, self.done = max(total, 1), 0
        self.artifact_id: Optional[UUID] = None
        try:
            self.artifact_id = create_progress_artifact(
                progress=0.0, key=artifact_key(character, kind, "progress"),
                description=f"Shards of the {kind_text(kind)} generations for {character} that ended (of {total}).")
        except Exception:  # progress is a nicety: never the reason a run fails
            pass

    def advance(self, shard: Shard) -> None:
        self.done += 1
        if self.artifact_id is not None:
            try:
                update_progress_artifact(self.artifact_id, progress=100.0 * min(self.done, self.total) / self.total)
            except Exception:
                pass


# -- shards as subflows -----------------------------------------------------------------------


def run_as_subflows(arguments: dict[str, Any], shards: Sequence[Shard], *, count: int,
                    logger: Union[logging.Logger, logging.LoggerAdapter],
                    on_final: Optional[Callable[[Shard], None]] = None) -> None:
    """Run each shard as a subflow of the current flow run, one after the other, with
    ``retries=1`` (a failed shard runs again once in the same flow run: its completed
    generations are reused). Fills each shard's ``flow_run_id``, ``state`` and, when it completed,
    ``results``; calls ``on_final(shard)`` as each ends.

    Raises:
        KeyboardInterrupt, TerminationSignal: from the running subflow (the others never start).
    """
    from .generate_content import generate_content  # the module that calls us

    context = FlowRunContext.get()
    parent = (context.flow_run.name if context is not None else "") or "sharded"
    for shard in shards:
        child = generate_content.with_options(retries=1, retry_delay_seconds=0,
                                              flow_run_name=f"{parent}-shard-{shard.number}-of-{len(shards)}")
        logger.info("shard %d of %d (%s): starting", shard.number, len(shards), shard.label)
        state = child(**child_parameters(arguments, shard, count=count), return_state=True)
        shard.state = state
        shard.flow_run_id = state.state_details.flow_run_id
        if state.is_completed():
            shard.results = list(state.result() or [])
        _log_end(logger, shard, len(shards))
        if on_final is not None:
            on_final(shard)


def _log_end(logger, shard: Shard, total: int) -> None:
    state = shard.state
    name = state.name if state is not None else "unknown"
    message = f": {state.message}" if state is not None and state.message and not state.is_completed() else ""
    (logger.info if shard.completed else logger.warning)(
        "shard %d of %d (%s) ended %s%s", shard.number, total, shard.label, name, message)


# -- shards as flow runs of the deployment ------------------------------------------------------


def run_on_deployment(shards: Sequence[Shard], flow_run: FlowRun, *, flow_name: str, count: int,
                      logger: Union[logging.Logger, logging.LoggerAdapter], poll_s: float = POLL_S,
                      on_final: Optional[Callable[[Shard], None]] = None) -> None:
    """Start one child flow run per shard through ``flow_run``'s deployment, wait for all, retry
    the Failed or Crashed ones once (the same flow run, :func:`retry_flow_run`), wait again.

    ``flow_run``: the parent (its ``parameters`` as the API has them are the children's, see
    :func:`child_parameters`; its ``deployment_id``, work queue and job variables are theirs).
    Children an earlier attempt of the parent started (same idempotency key) are found again:
    completed ones are kept, ended ones that did not complete are retried at once. Fills each
    shard's ``flow_run_id``, ``name``, ``state`` and ``run_count``; calls ``on_final(shard)`` as
    each ends for good.

    Raises:
        ShardsCannotStart: a concurrency limit of 1 on the deployment or its work pool (the
            parent holds it: no child could ever start); nothing was started.
        ParentCancelled: the parent was cancelled in the API; the children were cancelled.
        KeyboardInterrupt, TerminationSignal: the parent was stopped; the children that had not
            ended were cancelled before it is raised again.
    """
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(flow_run.deployment_id)
        _check_room_for_shards(client, deployment, flow_run)
        name = f"{flow_name}/{deployment.name}"
        by_id: dict[UUID, Shard] = {}
        try:
            for shard in shards:
                child = run_deployment(
                    name=name,
                    parameters=child_parameters(flow_run.parameters, shard, count=count),
                    timeout=0,
                    as_subflow=True,
                    flow_run_name=f"{flow_run.name}-shard-{shard.number}-of-{len(shards)}",
                    # a retry of the parent finds the children of its earlier attempt again
                    idempotency_key=f"comfy-pipeline-shard/{flow_run.id}/{shard.spec}",
                    work_queue_name=flow_run.work_queue_name,
                    job_variables=flow_run.job_variables or None,
                )
                shard.flow_run_id, shard.name, shard.state = child.id, child.name, child.state
                by_id[child.id] = shard
                logger.info("shard %d of %d (%s): flow run %r, %s", shard.number, len(shards), shard.label,
                            child.name, _url(child.id) or child.id)
            earlier = [s for s in shards if s.state is not None and s.state.is_final() and not s.completed]
            for shard in earlier:  # this is a retry of the parent: run its unfinished shards again
                logger.warning("shard %d (%s) ended %s in an earlier attempt of this run: running it again",
                               shard.number, shard.label, shard.state.name)
                shard.state = retry_flow_run(client, shard.flow_run_id,
                                             message="Retried by its parent (a retry of the parent)")
                shard.retried = True

            def ended(run: FlowRun, *, last: bool) -> None:
                shard = by_id[run.id]
                shard.state, shard.run_count, shard.name = run.state, run.run_count, run.name
                if last or shard.completed or not _retryable(run.state):
                    _log_end(logger, shard, len(shards))
                    if on_final is not None:
                        on_final(shard)

            wait_for_flow_runs(client, list(by_id), parent_id=flow_run.id, poll_s=poll_s, logger=logger,
                               on_final=lambda run: ended(run, last=by_id[run.id].retried))
            again = [s for s in shards if not s.retried and s.state is not None and _retryable(s.state)]
            for shard in again:
                logger.warning("shard %d of %d (%s) ended %s (%s): retrying its flow run %r once", shard.number,
                               len(shards), shard.label, shard.state.name, shard.state.message, shard.name)
                shard.state = retry_flow_run(client, shard.flow_run_id)
                shard.retried = True
            if again:
                wait_for_flow_runs(client, [s.flow_run_id for s in again], parent_id=flow_run.id, poll_s=poll_s,
                                   logger=logger, on_final=lambda run: ended(run, last=True))
        except ParentCancelled:  # wait_for_flow_runs cancelled the children already
            raise
        except BaseException as exc:
            unfinished = [s.flow_run_id for s in shards
                          if s.flow_run_id is not None and not (s.state is not None and s.state.is_final())]
            cancelled = cancel_flow_runs(client, unfinished, logger=logger)
            if cancelled:
                logger.warning("cancelled %d shard flow run(s) that had not ended (%s)", len(cancelled),
                               type(exc).__name__)
            raise


def _retryable(state: Optional[State]) -> bool:
    return state is not None and (state.is_failed() or state.is_crashed())


def _check_room_for_shards(client, deployment, flow_run: FlowRun) -> None:
    """Raise :class:`ShardsCannotStart` when a concurrency limit of 1 (the deployment's, or its
    work pool's) is held by the parent itself, so that no child could ever start."""
    limit = getattr(getattr(deployment, "global_concurrency_limit", None), "limit", None)
    if limit == 1:
        raise ShardsCannotStart(
            f"deployment {deployment.name!r} runs one flow run at a time (concurrency limit 1), and this run "
            "holds it: its shards could never start. Raise the limit to 2 or more, or run without shard_size")
    if flow_run.work_pool_name:
        try:
            pool = client.read_work_pool(flow_run.work_pool_name)
        except Exception:  # not ours to check, then
            return
        if pool.concurrency_limit == 1:
            raise ShardsCannotStart(
                f"work pool {pool.name!r} runs one flow run at a time (concurrency limit 1), and this run holds "
                "it: its shards could never start. Raise the limit to 2 or more, or run without shard_size")


def wait_for_flow_runs(client, flow_run_ids: Iterable[UUID], *, parent_id: Optional[UUID] = None,
                       poll_s: float = POLL_S, logger: Optional[Union[logging.Logger, logging.LoggerAdapter]] = None,
                       on_final: Optional[Callable[[FlowRun], None]] = None) -> dict[UUID, FlowRun]:
    """Poll the flow runs with the sync ``client`` every ``poll_s`` seconds until each is in a
    final state (Completed, Failed, Crashed, Cancelled); ``on_final(run)`` is called once for
    each, as it is seen final. Returns ``{id: FlowRun}`` as last read.

    With ``parent_id``, the parent's own state is read on every poll too: once it is Cancelling
    or Cancelled, the runs that have not ended are cancelled (:func:`cancel_flow_runs`). The
    sleeps are plain ``time.sleep`` in the caller's thread, so a signal (Ctrl-C, SIGTERM) ends the
    wait at once, and a status line is logged every :data:`STATUS_EVERY_S` seconds.

    Raises:
        ParentCancelled: the parent was cancelled (after cancelling the runs).
        prefect.exceptions.ObjectNotFound: a flow run does not exist.
    """
    pending = list(dict.fromkeys(flow_run_ids))
    seen: dict[UUID, FlowRun] = {}
    last_status = time.monotonic()
    while True:
        for run in _read_flow_runs(client, pending):
            seen[run.id] = run
            if run.state is not None and run.state.is_final():
                pending.remove(run.id)
                if on_final is not None:
                    on_final(run)
        if not pending:
            return seen
        if parent_id is not None:
            parent = client.read_flow_run(parent_id)
            if parent.state is not None and (parent.state.is_cancelling() or parent.state.is_cancelled()):
                cancel_flow_runs(client, pending, logger=logger,
                                 message="The parent flow run was cancelled.")
                raise ParentCancelled(f"{len(pending)} shard flow run(s) that had not ended were cancelled")
        if logger is not None and time.monotonic() - last_status >= STATUS_EVERY_S:
            last_status = time.monotonic()
            by_state: dict[str, int] = {}
            for flow_run_id in pending:
                state = seen[flow_run_id].state if flow_run_id in seen else None
                label = state.name if state is not None else "unknown"
                by_state[label] = by_state.get(label, 0) + 1
            logger.info("waiting for %d shard flow run(s): %s%s", len(pending),
                        ", ".join(f"{n} {name}" for name, n in sorted(by_state.items())),
                        " (Scheduled or Late ones wait for a worker of the pool with room)"
                        if any(k in by_state for k in ("Scheduled", "Late")) else "")
        time.sleep(poll_s)


def _read_flow_runs(client, ids: Sequence[UUID]) -> list[FlowRun]:
    runs: list[FlowRun] = []
    for i in range(0, len(ids), IDS_PER_REQUEST):
        chunk = list(ids[i:i + IDS_PER_REQUEST])
        runs += client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)),
                                      limit=len(chunk))
    return runs


def retry_flow_run(client, flow_run_id: UUID, *, message: str = "Retried once by its parent") -> State:
    """Retry an ended flow run of a deployment as the UI's Retry does: its state becomes
    Scheduled, named ``AwaitingRetry``, for now (forced), and a worker of its pool runs it again
    in the same flow run (``run_count`` + 1), which reuses its completed generations.
    Returns the state the API set.

    Raises:
        RuntimeError: the API did not accept the state.
    """
    from prefect.client.schemas.responses import SetStateStatus

    result = client.set_flow_run_state(flow_run_id, AwaitingRetry(message=message), force=True)
    if result.status != SetStateStatus.ACCEPT:
        raise RuntimeError(f"flow run {flow_run_id} could not be retried: {result.details}")
    return result.state


def cancel_flow_runs(client, flow_run_ids: Iterable[UUID], *,
                     logger: Optional[Union[logging.Logger, logging.LoggerAdapter]] = None,
                     message: str = "The parent flow run was stopped.") -> list[UUID]:
    """Cancel each flow run that has not ended, as ``prefect flow-run cancel`` does: propose
    Cancelling (a Scheduled one without infrastructure becomes Cancelled at once; a running one
    is stopped by its worker, which removes its prompts and writes its report). A run that cannot
    be cancelled is logged, not raised. Returns the ids the API accepted a cancel for."""
    from prefect.client.schemas.responses import SetStateStatus

    done: list[UUID] = []
    for flow_run_id in flow_run_ids:
        try:
            result = client.set_flow_run_state(flow_run_id, State(type=StateType.CANCELLING, message=message))
        except Exception as exc:  # the others must still be cancelled
            if logger is not None:
                logger.warning("could not cancel shard flow run %s: %s", flow_run_id, exc)
            continue
        if result.status == SetStateStatus.ACCEPT or (result.state is not None and result.state.is_cancelled()):
            done.append(flow_run_id)
        elif logger is not None:
            logger.warning("shard flow run %s was not cancelled: %s", flow_run_id, result.details)
    return done


# -- the combined report ------------------------------------------------------------------------


def read_shard_rows(client, shards: Sequence[Shard], table_key: str) -> None:
    """Read back, for every shard with a flow run, its newest table artifact ``table_key`` (its
    last attempt's) and its flow run (name, state, run count), into the shard (``rows``,
    ``reported``, ``table_note``: the table's description when it does not hold every row, as a
    big child's keeps the failures and the last :data:`TABLE_ROWS`). A shard without a table
    keeps ``rows == []`` and ``reported == False``.

    Raises:
        httpx.HTTPError / prefect exceptions: the API could not be read.
    """
    ids = [s.flow_run_id for s in shards if s.flow_run_id is not None]
    if not ids:
        return
    by_id = {s.flow_run_id: s for s in shards if s.flow_run_id is not None}
    for run in _read_flow_runs(client, ids):
        shard = by_id[run.id]
        shard.name, shard.run_count = run.name, run.run_count
        if run.state is not None:
            shard.state = run.state
    newest: dict[UUID, Any] = {}
    for i in range(0, len(ids), IDS_PER_REQUEST):
        chunk = ids[i:i + IDS_PER_REQUEST]
        offset = 0
        while True:
            page = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=chunk),
                                               key=ArtifactFilterKey(any_=[table_key])),
                sort=ArtifactSort.CREATED_DESC, limit=200, offset=offset)
            for artifact in page:  # newest first: the first one of a run is its last attempt's
                newest.setdefault(artifact.flow_run_id, artifact)
            if len(page) < 200:
                break
            offset += 200
    for flow_run_id, artifact in newest.items():
        shard = by_id[flow_run_id]
        data = artifact.data
        rows = json.loads(data) if isinstance(data, str) else data
        shard.rows = [dict(r) for r in rows] if isinstance(rows, list) else []
        shard.reported = True
        # a big child's table says "500 of 20000 image generations ...": it does not hold every row
        description = artifact.description or ""
        shard.table_note = description if re.match(r"[\d,]+ of [\d,]+ ", description) else ""


def _shard_counts(shard: Shard, per_description: int) -> tuple[int, int]:
    """``(succeeded, planned)`` generations of a shard. Every row that did not succeed is always in
    a child's table (a big one leaves out only older successes), so succeeded = planned minus those;
    a shard without a table succeeded in none."""
    planned = (shard.stop - shard.start) * per_description
    if not shard.reported:
        return 0, planned
    not_succeeded = sum(1 for r in shard.rows if r.get("status") not in SUCCEEDED)
    return max(planned - not_succeeded, 0), planned


def failed_message(shards: Sequence[Shard], per_description: int) -> str:
    """``"N of M generations failed in K of S shards: shard 2 (descriptions 4-6), ..."``: N counts
    every generation that did not succeed (a shard without a report: all of its own); the shards
    named are those that did not complete (at most :data:`NAMED_SHARDS`), each with its state
    when it is not Failed."""
    total = sum((s.stop - s.start) * per_description for s in shards)
    failed = sum(planned - ok for ok, planned in (_shard_counts(s, per_description) for s in shards))
    bad = [s for s in shards if not s.completed]
    named = []
    for shard in bad[:NAMED_SHARDS]:
        state = shard.state.name if shard.state is not None else "not run"
        named.append(f"shard {shard.number} ({shard.label}" + ("" if state == "Failed" else f", {state}") + ")")
    if len(bad) > NAMED_SHARDS:
        named.append(f"and {len(bad) - NAMED_SHARDS} more")
    return (f"{failed} of {total} generations failed in {len(bad)} of {len(shards)} shards: "
            + ", ".join(named))


def _url(flow_run_id: UUID) -> Optional[str]:
    """The flow run's page in the UI (``None`` without a UI URL)."""
    try:
        return url_for("flow-run", obj_id=flow_run_id)
    except Exception:
        return None


def _link(flow_run_id: Optional[UUID], name: str) -> str:
    """A markdown link to a flow run in the UI, or its name and id when there is no UI URL."""
    if flow_run_id is None:
        return "(no flow run)"
    url = _url(flow_run_id)
    return f"[{name or flow_run_id}]({url})" if url else f"{name or 'flow run'} (`{flow_run_id}`)"


def shard_summary_markdown(shards: Sequence[Shard], *, character: str, kind: str, per_description: int,
                           shard_size: int, output_dir: str, wall_s: float, stopped: Optional[str] = None) -> str:
    """The combined summary, in the order a reader needs it: the verdict (and why the run stopped,
    if it did), the failures (each with its shard; a shard with no report says why), one line per
    shard (its descriptions, state, generations that succeeded, runs, a link to its flow run), the
    totals over all shards, then the servers (generations and busy seconds from every shard's
    rows, all attempts)."""
    counts = [_shard_counts(s, per_description) for s in shards]
    total = sum(planned for _, planned in counts)
    succeeded = sum(ok for ok, _ in counts)
    rows = [r for s in shards for r in s.rows]
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row.get("status", "")] = by_status.get(row.get("status", ""), 0) + 1
    unreported = sum(planned for s, (_, planned) in zip(shards, counts) if not s.reported)
    bad = [s for s in shards if not s.completed]
    headline = f"**{succeeded} of {total} generations succeeded**, {total - succeeded} did not"
    details = [f"{by_status[k]} {k}" for k in ("failed", "skipped", "interrupted", "cancelled", "not run")
               if by_status.get(k)]
    if unreported:
        details.append(f"{unreported} in shards without a report")
    if details:
        headline += f" ({', '.join(details)})"
    headline += f"; {len(shards) - len(bad)} of {len(shards)} shards completed."
    lines = [f"# {character}: {kind_text(kind)} generations in {len(shards)} shards", ""]
    if stopped:
        lines += [f"**The run was stopped: {stopped}.** Its shards that had not ended were cancelled.", ""]
    lines.append(headline)

    failures = []
    for shard in shards:
        if not shard.reported and not shard.completed:
            state = shard.state
            why = (f"{state.name}: {state.message}" if state is not None and state.message
                   else state.name if state is not None else "never started")
            failures.append(f"- shard {shard.number} ({shard.label}) has no report: " + "\n  ".join(why.splitlines()))
        for r in shard.rows:
            if r.get("status") == "failed":
                number = str(r.get("description", "")).split(":", 1)[0]
                name = f"{r['stage']} {r.get('variant')}" if "stage" in r else f"variant {r.get('variant')}"
                failures.append(f"- description {number}, {name} (shard {shard.number}, prompt_id "
                                f"`{r.get('prompt_id')}`): {r.get('error', '')}")
    if failures:
        lines += ["", "## Failures", "", *failures,
                  "", "Each failure's whole error is in its shard's own summary (linked below)."]

    lines += ["", "## Shards", "", "| shard | descriptions | state | succeeded | runs | flow run |",
              "|---|---|---|---|---|---|"]
    for shard, (ok, planned) in zip(shards, counts):
        state = shard.state.name if shard.state is not None else "not run"
        numbers = f"{shard.start + 1}-{shard.stop}" if shard.stop - shard.start > 1 else f"{shard.stop}"
        lines.append(f"| {shard.number} | {numbers} | {state} | {ok} of {planned} | "
                     f"{shard.run_count or ''} | {_link(shard.flow_run_id, shard.name)} |")
    noted = [s for s in shards if s.table_note]
    for shard in noted:
        lines += ["", f"Shard {shard.number}'s table: {shard.table_note}"]

    files = sum(len([f for f in str(r.get("files") or "").split(", ") if f]) for r in rows
                if r.get("status") in SUCCEEDED)
    per_minute = (succeeded / wall_s * 60.0) if wall_s > 0 else 0.0
    lines += ["", "## Totals", "", "| | |", "|---|---|",
              f"| shards | {len(shards)} of up to {shard_size} descriptions |",
              f"| generations planned | {total} |",
              f"| completed | {by_status.get('completed', 0)} |",
              f"| cached (served from ComfyUI's cache) | {by_status.get('cached', 0)} |"]
    if by_status.get("reused"):
        lines.append(f"| reused (a shard's retry kept them) | {by_status['reused']} |")
    lines.append(f"| failed | {by_status.get('failed', 0)} |")
    for status in ("skipped", "interrupted", "cancelled", "not run"):
        if by_status.get(status):
            lines.append(f"| {status} | {by_status[status]} |")
    if unreported:
        lines.append(f"| in shards without a report | {unreported} |")
    if noted:
        lines.append(f"| successes counted, not listed (big shards' tables) | "
                     f"{max(succeeded - sum(1 for r in rows if r.get('status') in SUCCEEDED), 0)} |")
    lines += [f"| shards retried | {sum(1 for s in shards if s.retried or (s.run_count or 0) > 1)} |",
              f"| wall time (whole run) | {wall_s:.1f} s |",
              f"| generations per minute | {per_minute:.1f} |",
              f"| files (listed rows) | {files} |",
              f"| output directory | `{os.path.abspath(os.path.expanduser(output_dir))}` |"]

    per_server: dict[str, list] = {}
    for r in rows:
        if r.get("status") in SUCCEEDED and r.get("server"):
            figures = per_server.setdefault(r["server"], [0, 0.0])
            figures[0] += 1
            figures[1] += float(r.get("execution_s") or 0.0)
    if per_server:
        lines += ["", "## Servers (all shards)", "", "| server | generations | busy (s) |", "|---|---|---|"]
        for url in sorted(per_server):
            count, busy = per_server[url]
            lines.append(f"| {url} | {count} | {busy:.1f} |")
    lines += ["", "Each shard's own report (its table, summary and gallery, under the same artifact keys) is "
                  "in its flow run."]
    return "\n".join(lines) + "\n"


def write_shard_report(shards: Sequence[Shard], arguments: dict[str, Any], *, per_description: int, wall_s: float,
                       stopped: Optional[str] = None) -> list[dict]:
    """Write the parent's table and summary artifacts over every shard's rows (read them first with
    :func:`read_shard_rows`); return every combined row (the table shows at most the rows that did
    not succeed, failures first, and the last :data:`TABLE_ROWS` that did, :func:`table_shown`).

    Each row is its shard's table row with a ``shard`` column (the shard's number) at its end.
    Must be called inside the parent's flow run (the artifacts attach to it).
    """
    character, kind = arguments.get("character", "character"), arguments.get("kind", "image")
    rows = [dict(r, shard=s.number) for s in shards for r in s.rows]
    shown = table_shown(rows)
    text = kind_text(kind)
    if len(shown) < len(rows):
        description = (f"{len(shown):,} of {len(rows):,} rows of the {text} generations for {character} over "
                       f"{len(shards)} shards: {table_shown_text(rows, shown)} "
                       "(each shard's flow run has its own table).")
    else:
        description = (f"The {text} generations for {character} over {len(shards)} shards: status, durations (s), "
                       "files, errors, shard.")
    create_table_artifact(table=shown, key=artifact_key(character, kind, "generations"), description=description)
    create_markdown_artifact(
        markdown=shard_summary_markdown(shards, character=character, kind=kind, per_description=per_description,
                                        shard_size=int(arguments.get("shard_size") or 0),
                                        output_dir=str(arguments.get("output_dir") or "output"),
                                        wall_s=wall_s, stopped=stopped),
        key=artifact_key(character, kind, "summary"),
        description=f"Summary of the {text} generations for {character} over {len(shards)} shards.")
    return rows
