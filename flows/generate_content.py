"""The ``generate-content`` flow: descriptions in, images or videos on disk, a report in the UI.

One ComfyUI connection is acquired per flow run, the workflow is checked against each server's
``/object_info`` before anything is sent (``blocks/preflight.py``: a server that cannot run it is
left out, and with none left the run stops, listing every problem), the ``generate`` task is
mapped over descriptions × variants on it, the connection is released in ``finally``, then the
artifacts are written. One failed generation never stops the others, except a 400 that every
generation would meet (the workflow itself): the remaining ones then end ``not run``. If any
failed, the flow run ends Failed with "N of M generations failed" after the report is written.

Retrying a failed flow run (Prefect UI "Retry", ``prefect flow-run retry``, or the flow's
own ``retries``) redoes only the failed generations: the plan (prompt ids, seeds) is derived
from the flow run id, so completed generations hit their persisted results and are not sent to
ComfyUI again, unless one of their files was deleted, in which case that generation runs again.
"""

from __future__ import annotations

import concurrent.futures
import random
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Optional, Union

from prefect import flow, get_run_logger, runtime, unmapped
from prefect.exceptions import TerminationSignal
from prefect.futures import as_completed
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from ..blocks.errors import ComfyUIError, WorkflowError
from ..blocks.pool import ConnectionPool
from ..blocks.preflight import run_preflight
from ..blocks.workflow import ComfyUIWorkflow, SeedMode, choose_seed, require_description_binding
from ..tasks.gallery import server_views
from ..tasks.generate import (flow_attempt, flow_attempts_prompt_ids, generate, one_line_failures,
                              with_moved_copies, workflow_params)
from ..tasks.models import GenerationResult, GenerationSettings, GenerationSpec, Kind
from ..tasks.report import Outcome, ProgressReport, RunFacts, Stopped, write_report
from .form import ServerParameter, WorkflowParameter

#: Generations in flight at once on one connection (threads of the task runner).
DEFAULT_CONCURRENCY = 8


def plan_generations(
    descriptions: list[str],
    variants: int,
    seed_mode: SeedMode,
    base_seed: Optional[int],
    *,
    uses_seed: bool = True,
    run_key: Optional[str] = None,
) -> list[GenerationSpec]:
    """Every (description, variant) pair with its seed and a client-chosen ``prompt_id``.

    Order is description-major: ``[d0v0, d0v1, d1v0, ...]``; ``position`` is 1-based.
    ``seed`` is ``None`` when the workflow binds no seed (``uses_seed=False``).
    With a ``run_key`` (the flow run id) the plan is the same every time it is made for that
    key, random seeds included, so a retried flow run finds its completed generations again.
    """
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"comfy-pipeline:{run_key}") if run_key else None
    rng = random.Random(run_key) if run_key else random.Random()
    total = len(descriptions) * variants
    specs = []
    for index, description in enumerate(descriptions):
        for variant in range(variants):
            seed = (
                choose_seed(seed_mode, base_seed=base_seed, index=index, variant=variant,
                            variants=variants, rng=rng)
                if uses_seed
                else None
            )
            specs.append(
                GenerationSpec(
                    index=index,
                    variant=variant,
                    description=description,
                    seed=seed,
                    prompt_id=str(uuid.uuid5(namespace, f"{index}/{variant}") if namespace else uuid.uuid4()),
                    position=len(specs) + 1,
                    total=total,
                )
            )
    return specs


class _Generations:
    """The generate task runs of one flow run and what became of each (``outcomes``, keyed by
    ``spec.position``); ``reused``: positions whose result came back from an earlier attempt of
    the flow run (its persisted result: the generation was not sent to ComfyUI again)."""

    def __init__(self, outcomes: dict, progress: Optional[ProgressReport]):
        self.outcomes = outcomes
        self.progress = progress
        self.reused: set[int] = set()
        self.futures: dict[int, Any] = {}
        self.attempt = flow_attempt()
        self.counting = True

    def run(self, task, connection, template, specs, settings, *, rerun: int = 0) -> None:
        """Map ``task`` over ``specs`` on the shared connection; record each outcome as it finishes
        and advance the progress artifact. ``rerun`` (1) runs completed generations again, with
        prompt ids of their own (see ``generate``); their progress was counted already."""
        self.counting = not rerun
        futures = task.map(unmapped(connection), unmapped(template), specs, unmapped(settings),
                           rerun=unmapped(rerun))
        position_of = {}
        for future, spec in zip(futures, specs):
            self.futures[spec.position] = future
            position_of[future.task_run_id] = spec.position
            self.reused.discard(spec.position)  # run again (files lost): not reused any more
        for future in as_completed(list(futures)):
            self._record(position_of[future.task_run_id], future)

    def harvest(self, within_s: float) -> None:
        """After the run was stopped: record every generation that finished, waiting up to
        ``within_s`` seconds for those still ending (the connection is closed by then)."""
        waiting = {p: f for p, f in self.futures.items() if p not in self.outcomes}
        concurrent.futures.wait([f.wrapped_future for f in waiting.values()], timeout=within_s)
        for position, future in waiting.items():
            if future.wrapped_future.done():
                self._record(position, future)

    def _record(self, position: int, future) -> None:
        future.wait()  # as_completed() may yield before the future's final state is known
        state = future.state
        if state.is_cancelled():  # the run was cancelled or stopped around this generation
            # generate() ends such a generation as Cancelled("interrupted: ...", "cancelled: ..." or,
            # when ComfyUI refused the workflow itself for another generation, "not run: ...")
            status, _, reason = (state.message or "cancelled: ").partition(": ")
            self.outcomes[position] = Stopped(status if status in ("interrupted", "not run") else "cancelled", reason)
        else:
            outcome = self.outcomes[position] = future.result(raise_on_failure=False)
            if isinstance(outcome, GenerationResult) and outcome.flow_attempt < self.attempt:
                self.reused.add(position)
        if self.counting and self.progress is not None:
            self.progress.advance()


def _stop_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, TerminationSignal):
        if _cancel_requested():
            return "cancelled (from the Prefect UI, API or CLI)"
        return f"terminated: its process got signal {exc.signal}"
    return f"{type(exc).__name__}: {exc}"


def _cancel_requested() -> bool:
    """Whether this flow run is Cancelling/Cancelled in the Prefect API (a cancel was asked for)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(runtime.flow_run.id).state
    except Exception as exc:  # the report must still be written; say why the reason is vaguer
        get_run_logger().debug("could not read this flow run's state: %s", exc)
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def _mark_stopped(specs, outcomes: dict, connection: ConnectionPool, retries: int, reason: str) -> None:
    """Generations without an outcome when the run stopped: ``interrupted`` if ComfyUI was
    running one of their prompts (close() interrupted it), else ``cancelled``."""
    interrupted = connection.interrupted_prompts
    attempt = flow_attempt()
    for spec in specs:
        if spec.position in outcomes:
            continue
        # every attempt of this flow run and of the earlier ones: this run may have followed those
        attempts = set(with_moved_copies(flow_attempts_prompt_ids(spec.prompt_id, attempt, retries + 1)))
        status = "interrupted" if attempts & interrupted else "cancelled"
        outcomes[spec.position] = Stopped(status, f"the run was {reason}")


def _write_report(logger, specs, outcomes, facts: RunFacts, began: float, reused=frozenset()) -> None:
    facts.wall_s = time.monotonic() - began
    try:
        write_report(specs, outcomes, facts, frozenset(reused))
    except Exception:  # the report must not hide the run's own outcome
        logger.exception("could not write the report artifacts")


def _load_workflow(workflow: Union[ComfyUIWorkflow, str]) -> ComfyUIWorkflow:
    if isinstance(workflow, ComfyUIWorkflow):
        return workflow
    return ComfyUIWorkflow.from_file(workflow)


@flow(
    name="generate-content",
    task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_CONCURRENCY),
    log_prints=True,
)
def generate_content(
    server: ServerParameter,
    workflow: WorkflowParameter,
    descriptions: Annotated[list[str], Field(min_length=1)],
    kind: Kind = "image",
    character: str = "character",
    variants: Annotated[int, Field(ge=1, le=100)] = 1,
    output_dir: str = "output",
    seed_mode: SeedMode = SeedMode.random,
    base_seed: int = 0,
    # Real defaults (not None) so that the UI's form shows them; never mutated below.
    params: dict[str, Any] = {},  # noqa: B006
    output_types: Annotated[list[str], Field(min_length=1)] = ["output"],  # noqa: B006
    retries: Annotated[int, Field(ge=0, le=10)] = 2,
    retry_delay_s: Annotated[float, Field(ge=0)] = 5.0,
) -> list[GenerationResult]:
    """Generate ``variants`` images or videos for each description over ONE ComfyUI connection.

    Args:
        server: the ComfyUI Server block, or a ComfyUI Server Pool block to spread the work
            over several servers (saved blocks in the UI, or instances).
        workflow: a saved ComfyUI Workflow block (what deployments use: the worker needs no
            file), or an API-format workflow JSON path on the machine that runs the flow
            (bindings in the file or a ``.bindings.json`` sidecar).
        descriptions: the text descriptions; each becomes ``variants`` generations.
        kind: ``image`` or ``video``; decides file naming and the report's labels.
        character: the character or campaign name, used in file names and artifact keys.
        variants: generations per description (1-100).
        output_dir: local directory for the files; the server's subfolders are kept below it.
        seed_mode: ``random`` (default), ``fixed`` (``base_seed`` for all) or ``increment``
            (``base_seed + index * variants + variant``).
        base_seed: the seed for ``fixed``/``increment`` (default 0).
        params: extra workflow parameters for the bindings, e.g. ``{"negative_prompt": "..."}``.
        output_types: ``/view`` types to download (default ``["output"]``; add ``"temp"`` for
            PreviewImage outputs).
        retries: retries per generation for transient failures (server or socket gone, 5xx,
            lost prompt, stall); validation and node errors are never retried.
        retry_delay_s: first retry delay in seconds, doubling each time, with jitter.

    Returns:
        the :class:`GenerationResult` of every generation, in plan order.

    Raises:
        WorkflowError: the workflow file cannot be used (before anything is sent);
            ``WorkflowNotRunnable`` when no server can run it (preflight), after writing the report.
        ServerUnreachable / AuthenticationFailed: at connect, after writing the report.
    """
    logger = get_run_logger()
    began = time.monotonic()
    try:
        template = _load_workflow(workflow)
        require_description_binding(template)
    except WorkflowError as exc:  # nothing was sent; say why in one line, no traceback
        logger.error("%s", exc)
        return Failed(data=exc, message=str(exc))
    specs = plan_generations(descriptions, variants, SeedMode(seed_mode), base_seed,
                             uses_seed=template.binds("seed"), run_key=runtime.flow_run.id)
    if runtime.deployment.id and not Path(output_dir).expanduser().is_absolute():
        logger.warning("output_dir %r is relative to this run's working directory %s: a process "
                       "worker deletes that directory when the run ends. Give an absolute path "
                       "(or one starting with ~).", output_dir, Path.cwd())
    settings = GenerationSettings(
        kind=kind,
        character=character,
        output_dir=str(Path(output_dir).expanduser().absolute()),  # absolute in results and report
        descriptions=len(descriptions),
        variants=variants,
        params=dict(params or {}),
        output_types=list(output_types or ["output"]),
        retries=retries,
        retry_delay_s=retry_delay_s,
    )
    task = generate.with_options(
        retries=retries,
        # The delay between attempts is waited inside the task (generate), where closing the
        # connection (a cancel, Ctrl-C) ends it at once; Prefect's own delay cannot be interrupted.
        retry_delay_seconds=0,
    )
    facts = RunFacts(character=character, kind=kind, server_url=server.url,
                     output_dir=settings.output_dir, wall_s=0.0,
                     attempt=flow_attempt(), views=server_views(server))
    outcomes: dict[int, Outcome] = {}
    progress = ProgressReport(character, kind, len(specs))
    logger.info("%d %s generation(s) for %s: %d description(s) x %d variant(s) on %s",
                len(specs), kind, character, len(descriptions), variants, server.url)
    try:
        connection = ConnectionPool.open(server, logger=logger)
    except (ComfyUIError, ValueError) as exc:  # ValueError: a pool names a block that is not saved
        logger.error("%s", exc)
        facts.fatal_error = f"{type(exc).__name__}: {exc}"
        _write_report(logger, specs, outcomes, facts, began)
        return Failed(data=exc, message=str(exc))
    try:  # before the first POST: can each server run the rendered workflow? (blocks/preflight.py)
        run_preflight(connection, template, [workflow_params(s, settings) for s in specs], logger=logger)
    except BaseException as exc:
        connection.close()
        if not isinstance(exc, ComfyUIError):
            raise
        logger.error("%s", exc)  # WorkflowNotRunnable: every problem of every server; nothing was sent
        facts.fatal_error = f"{type(exc).__name__}: {exc}"
        facts.notes += [f"Server {url} was left out: {why}" for url, why in connection.unreachable.items()]
        _write_report(logger, specs, outcomes, facts, began)
        return Failed(data=exc, message=str(exc))

    facts.client_id = ", ".join(c.client_id for c in connection.connections)
    facts.notes += [f"Server {url} was left out: {why}"
                    for url, why in {**connection.unreachable, **connection.left_out}.items()]
    generations = _Generations(outcomes, progress)
    # Until the report is written: the engine's late records of cancelled task runs too.
    with one_line_failures():
        try:
            generations.run(task, connection, template, specs, settings)
            # A completed generation whose files were deleted since (a result that came back from
            # an earlier attempt of this flow run, or files removed during this one): run it again,
            # as a rerun whose prompt ids were never posted (it follows the earlier prompt if the
            # server still has it).
            stale = [s for s in specs if isinstance(outcomes.get(s.position), GenerationResult)
                     and not all(Path(f.path).is_file() for f in outcomes[s.position].files)]
            if stale:
                logger.warning("%d completed generation(s) lost files on disk; running them again", len(stale))
                generations.run(task.with_options(refresh_cache=True), connection, template, stale, settings,
                                rerun=1)
        except BaseException as exc:  # cancelled from the UI or CLI (SIGTERM), Ctrl-C, a crash
            facts.stopped = _stop_reason(exc)
            logger.warning("the run was %s: removing our prompts from the server", facts.stopped)
            raise
        finally:
            # Also on failure or cancellation: prompts still in flight are removed from the server.
            connection.close()
            # Closed from outside (ConnectionPool.close_all: the CLI got SIGINT or SIGTERM) while the
            # interrupt itself never reached this thread: the generations ended Cancelled, the run stopped.
            facts.stopped = facts.stopped or connection.stopped_because
            if facts.stopped:
                generations.harvest(within_s=3.0)
                _mark_stopped(specs, outcomes, connection, retries, facts.stopped)
            facts.connections_opened = sum(st.connections_opened for st in connection.stats().values())
            facts.reconnects = sum(st.reconnects for st in connection.stats().values())
            facts.servers = connection.urls
            facts.outages = connection.outages()
            not_run = sum(isinstance(o, Stopped) and o.status == "not run" for o in outcomes.values())
            if connection.no_new_prompts and not_run:
                facts.notes.append(f"{not_run} generation(s) were not run: {connection.no_new_prompts}.")
            _write_report(logger, specs, outcomes, facts, began, generations.reused)

    results = [o for o in (outcomes.get(s.position) for s in specs) if isinstance(o, GenerationResult)]
    failed = len(specs) - len(results)
    if failed:
        stopped = f"the run was {facts.stopped}: " if facts.stopped else ""
        if not_run and not facts.stopped:  # ComfyUI refused the workflow itself: say so, not N failures
            return Failed(message=f"{failed - not_run} of {len(specs)} generations failed and {not_run} were "
                                  f"not run: {connection.no_new_prompts}")
        return Failed(message=f"{stopped}{failed} of {len(specs)} generations failed")
    if generations.reused:
        logger.info("%d generation(s) reused from an earlier attempt of this flow run", len(generations.reused))
    logger.info("all %d generations finished in %.1f s", len(specs), facts.wall_s)
    return results
