"""The ``generate`` task: one description (one variant) becomes files on disk.

Submit the rendered workflow on the flow run's shared connection, follow its messages until
it completes, list its outputs from ``GET /history/{prompt_id}`` and download every file with
``GET /view``. Progress goes to the task run's logger.

Retries are safe: every attempt has its own client-chosen ``prompt_id``, derived from the
planned one and the attempt's numbers (of the flow run, of the pass: the plan's run or the run
again of a generation whose files were lost, and of the task run), so no id is ever posted twice
for a generation. Before submitting, an attempt asks the server about the ids of all earlier
attempts (as many task attempts per pass as the task's own ``retries`` allow); one that is still
queued, running or already succeeded is followed (re-attached) instead of posting again, and the
files an earlier attempt already saved with the same bytes are kept rather than written again.
Only transient failures are retried (:func:`is_transient`). A 400 that every generation would
meet (the workflow itself) stops the run's remaining generations, which end ``not run``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Mapping, Optional, Union

from prefect import get_run_logger, runtime, task
from prefect.cache_policies import DEFAULT
from prefect.context import TaskRunContext
from prefect.states import Cancelled, State

from ..blocks.connection import ComfyUIConnection, PromptOutcome
from ..blocks.pool import ConnectionPool, PromptFor, moved_prompt_id
from ..blocks.errors import (
    ComfyUIError,
    ConnectionLost,
    DownloadFailed,
    GenerationCancelled,
    GenerationSkipped,
    GenerationTimeout,
    OutputError,
    PromptLost,
    PromptValidationError,
    ServerError,
    ServerUnreachable,
)
from ..blocks.preflight import PER_GENERATION, is_workflow_wide
from ..blocks.protocol import OutputRef, PromptEvent, PromptTracker
from ..blocks.workflow import ComfyUIWorkflow

from .models import GenerationResult, GenerationSettings, GenerationSpec, OutputFile
from .outputs import candidate_paths, output_subdir, planned_name, safe_stem
from .report import trim


def workflow_params(spec: GenerationSpec, settings: GenerationSettings,
                    input_values: Optional[Mapping[str, str]] = None) -> dict:
    """The parameters offered to the workflow's bindings for one generation.

    ``prompt`` and ``description`` are the description text and ``slug`` a file-name-safe
    version of it (:func:`safe_stem`: lowercase ASCII letters, digits and dashes, at most 40
    characters, never ending in a dash or a space: use it in ``filename_prefix``);
    ``seed``, ``character`` (and ``character_slug``), ``index``, ``variant`` (0-based) and
    ``kind`` (the generation's stage in an ``image_to_video`` run) come from the plan; the flow's
    extra ``params`` (e.g. ``negative_prompt``) fill the rest. Each input image of
    ``spec.inputs`` is its value on the server that runs it (``input_values``: an uploaded name
    or an ``[output]`` annotation), else its local file name (what the preflight sees).
    """
    params = dict(settings.params)
    for name, image in spec.inputs.items():
        params[name] = (input_values or {}).get(name, Path(image.path).name)
    params.update(
        prompt=spec.description,
        description=spec.description,
        slug=safe_stem(spec.description, max_len=40),
        character=settings.character,
        character_slug=safe_stem(settings.character, max_len=40),
        index=spec.index,
        variant=spec.variant,
        kind=stage_kind(spec, settings),
    )
    if spec.seed is not None:
        params["seed"] = spec.seed
    return params


def stage_kind(spec: GenerationSpec, settings: GenerationSettings) -> str:
    """What one generation makes: the flow run's kind, or in an ``image_to_video`` run its stage."""
    return spec.stage if settings.kind == "image_to_video" else settings.kind


def variant_label(spec: GenerationSpec, settings: GenerationSettings) -> str:
    """``variant 1/2``, or in an ``image_to_video`` run ``image 1/1`` / ``video 2/4`` (of the description)."""
    if settings.kind != "image_to_video":
        return f"variant {spec.variant + 1}/{settings.variants}"
    if spec.stage == "image":
        return f"image {spec.variant + 1}/{settings.image_variants}"
    return f"video {spec.variant + 1}/{settings.image_variants * settings.variants}"


#: The attribute (``extra``) of the log records that mark a generation's milestones, read by a
#: display in the same process (the CLI's, flows/cli_display.py): a dict with ``event``
#: (``started``: ComfyUI began running it; ``retry``: it waits for its next attempt; ``done``;
#: ``failed``: for good, not retried; ``cancelled``: with its run; ``skipped``: a video whose image
#: failed, never sent, marked by the flow), ``position`` and ``total`` (the
#: plan's order, 1-based), ``index`` and ``variant`` (0-based), ``description``, ``label`` (``variant
#: 2/2``; ``image 1/1`` or ``video 2/4`` in an image-to-video run); for ``done`` also
#: ``files`` (local paths), ``cached`` and ``total_s`` (seconds), for ``failed`` ``error``
#: (``"Type: message"``).
MILESTONE = "generation_milestone"


def milestone(event: str, spec: GenerationSpec, settings: GenerationSettings, **facts) -> dict:
    """The ``extra`` of a log call that marks milestone ``event`` of ``spec``'s generation (:data:`MILESTONE`)."""
    return {MILESTONE: {"event": event, "position": spec.position, "total": spec.total, "index": spec.index,
                        "variant": spec.variant, "description": spec.description,
                        "label": variant_label(spec, settings), **facts}}


class _ProgressLog:
    """Turns prompt events into the log lines users watch: ``[3/8] description 2/4, variant 1/2: ...``."""

    def __init__(self, logger, spec: GenerationSpec, settings: GenerationSettings):
        self.logger = logger
        self.spec = spec
        self.settings = settings
        self.prefix = (
            f"[{spec.position}/{spec.total}] description {spec.index + 1}"
            + (f" (shard {settings.first_index + 1}-{settings.first_index + settings.descriptions})"
               if settings.first_index else f"/{settings.descriptions}")
            + f", {variant_label(spec, settings)}"
        )
        self.started = time.monotonic()
        self.last_pct: dict[str | None, int] = {}

    def __call__(self, event: PromptEvent, tracker: PromptTracker) -> None:
        node = event.node
        label = f"node {node} ({tracker.node_types.get(node, '?')})" if node else ""
        if event.kind == "started":
            self.logger.info("%s: started %.1f s after the task began (waiting for a free slot, then in ComfyUI's queue)", self.prefix, time.monotonic() - self.started,
                             extra=milestone("started", self.spec, self.settings))
        elif event.kind == "cached":
            self.logger.info("%s: %d node(s) served from ComfyUI's cache", self.prefix, len(event.nodes))
        elif event.kind == "executing":
            self.logger.info("%s: executing %s", self.prefix, label)
        elif event.kind == "progress" and event.max and event.value is not None:
            pct = int(100 * event.value / event.max)
            last = self.last_pct.get(node, -100)
            if pct >= last + 10 or pct == 100:
                self.last_pct[node] = pct
                self.logger.info("%s: %s %d%% (%s/%s)", self.prefix, label, pct,
                                 _num(event.value), _num(event.max))
        elif event.kind == "waiting":
            self.logger.info("%s: still %s after %.0f s", self.prefix, tracker.describe(),
                             time.monotonic() - self.started)


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: the server or socket went away, 5xx, a lost prompt,
    a stall past the deadline, a download that kept failing. Validation errors, node errors, interrupts, bad workflows,
    refused credentials and untrusted certificates (:class:`CertificateNotTrusted`, not a
    :class:`ServerUnreachable`) are permanent: retrying them would fail the same way."""
    if isinstance(exc, ServerError):
        return exc.status >= 500
    if isinstance(exc, ConnectionLost) and exc.closed_by_us:
        return False  # the run ended or was cancelled: retrying would only wait for nothing
    return isinstance(exc, (ConnectionLost, ServerUnreachable, PromptLost, GenerationTimeout, DownloadFailed))


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only when :func:`is_transient` says so."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def flow_attempt() -> int:
    """Which attempt of the current flow run this is (1, then 2 and more after a retry)."""
    return max(1, runtime.flow_run.run_count or 1)


def task_attempt() -> int:
    """Which attempt of the current task run this is (1, then 2 and more on its retries)."""
    return max(1, runtime.task_run.run_count or 1)


def task_retries() -> int:
    """The retries of the current task run as Prefect runs it (``generate.with_options(retries=...)``),
    which is what decides how many attempts it makes, whatever ``settings.retries`` says; 0 outside
    a task run."""
    context = TaskRunContext.get()
    return (context.task.retries or 0) if context is not None else 0


#: How many times one flow attempt may run a generation again (``rerun``) because its files were
#: lost after it completed: flows/generate_content.py does it once. Bounds the ids to look for.
MAX_RERUNS = 1


def attempt_prompt_id(base: str, flow_attempt: int, task_attempt: int, rerun: int = 0) -> str:
    """The ``prompt_id`` of one attempt: ``base`` itself for the very first (flow attempt 1, the
    plan's run, task attempt 1), after that a uuid5 of ``base`` and the three numbers, so that no
    two attempts of a generation share an id.

    Raises:
        ValueError: ``rerun`` is not between 0 and :data:`MAX_RERUNS` (its ids would never be
            looked for by a later attempt).
    """
    if not 0 <= rerun <= MAX_RERUNS:
        raise ValueError(f"rerun {rerun} is not between 0 and MAX_RERUNS ({MAX_RERUNS}): raise MAX_RERUNS "
                         "so that later attempts look for the prompts of every rerun")
    if (flow_attempt, rerun, task_attempt) == (1, 0, 1):
        return base
    step = f"{flow_attempt}/{task_attempt}" if rerun == 0 else f"{flow_attempt}/rerun{rerun}/{task_attempt}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfy-pipeline:{base}/{step}"))


def flow_attempts_prompt_ids(base: str, flow_attempts: int, attempts_per_task_run: int) -> list[str]:
    """Every ``prompt_id`` flow attempts 1 to ``flow_attempts`` may have posted for a generation,
    oldest first: in each, the plan's run and up to :data:`MAX_RERUNS` reruns, each with up to
    ``attempts_per_task_run`` task attempts (the task's retries + 1)."""
    return [attempt_prompt_id(base, r, k, p) for r in range(1, flow_attempts + 1)
            for p in range(MAX_RERUNS + 1) for k in range(1, attempts_per_task_run + 1)]


def earlier_prompt_ids(base: str, flow_attempt: int, task_attempt: int, attempts_per_task_run: int,
                       rerun: int = 0) -> list[str]:
    """Every ``prompt_id`` an attempt before this one (``flow_attempt``, ``rerun``,
    ``task_attempt``) may have posted for this generation, newest first.

    ``attempts_per_task_run``: the task's retries + 1 (:func:`task_retries`); the same in every
    attempt of a flow run, whose task options come from its parameters.
    """
    ids = flow_attempts_prompt_ids(base, flow_attempt - 1, attempts_per_task_run)
    for p in range(rerun + 1):
        last = attempts_per_task_run if p < rerun else task_attempt - 1
        ids += [attempt_prompt_id(base, flow_attempt, k, p) for k in range(1, last + 1)]
    return ids[::-1]


def with_moved_copies(prompt_ids: list[str], moves: int = 2) -> list[str]:
    """``prompt_ids`` with, before each, the ids its prompt had after moving to another server
    (up to ``moves`` moves; see :func:`moved_prompt_id`): the copies are newer than the original."""
    out = []
    for prompt_id in prompt_ids:
        chain = [prompt_id]
        for _ in range(moves):
            chain.append(moved_prompt_id(chain[-1]))
        out += chain[::-1]
    return out


def _run_or_reattach(
    connection: ConnectionPool, prompt: PromptFor, spec: GenerationSpec, settings: GenerationSettings,
    progress: "_ProgressLog", rerun: int,
) -> tuple[PromptOutcome, list[OutputRef], ComfyUIConnection]:
    flow_n, task_n = flow_attempt(), task_attempt()
    source = spec.inputs.get("image") if spec.source is not None else None
    later_stage = spec.stage == "video" and settings.kind == "image_to_video"
    options = dict(on_event=progress, heartbeat_s=settings.heartbeat_s,
                   output_types=tuple(settings.output_types),
                   # an image-to-video run's videos go before its remaining images (for a slot, and in
                   # ComfyUI's queue: "front"), to the server that made their image when it has a
                   # free slot there (no upload needed)
                   priority=1 if later_stage else 0,
                   front=later_stage,
                   prefer=source.origin.server if source is not None and source.origin is not None else None)
    earlier_ids = with_moved_copies(earlier_prompt_ids(spec.prompt_id, flow_n, task_n, task_retries() + 1, rerun))
    if earlier_ids:
        connection.wait_for_a_server()  # the server that has an earlier prompt may be coming back
    for earlier in earlier_ids:
        status, holder = connection.prompt_status(earlier)
        if holder is not None and status in ("pending", "running", "succeeded"):
            progress.logger.info("%s: prompt %s of an earlier attempt is %s on %s; following it "
                                 "instead of submitting again", progress.prefix, earlier, status, holder.url)
            return connection.run_prompt(prompt, prompt_id=earlier, on=holder, attach=True,
                                         **{k: v for k, v in options.items() if k not in ("priority", "prefer", "front")})
    # Not on any connected server; one that is away may still have it: it removes it when back.
    connection.give_up_where_away(earlier_ids)
    current = attempt_prompt_id(spec.prompt_id, flow_n, task_n, rerun)
    return connection.run_prompt(prompt, prompt_id=current, **options)


class OneLineFailures(logging.Filter):
    """Lowers Prefect's task-engine records of our own errors to DEBUG.

    Prefect logs a failed task run at ERROR with its traceback (~40 lines in the UI). A
    :class:`ComfyUIError` message already says what failed and what to do, and :func:`generate`
    logs it as one line naming the description, variant and ``prompt_id``; the engine's record,
    traceback included, is kept at DEBUG. A generation cancelled with its run ends at INFO, not
    ERROR. Install it on the ``prefect.task_runs`` logger for the
    duration of a flow run (:func:`one_line_failures`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and (self._ours(record)):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        elif record.levelno > logging.INFO and record.getMessage().startswith("Finished in state Cancelled("):
            # a generation cancelled with its run: generate() already logged why, as a warning
            record.levelno, record.levelname = logging.INFO, "INFO"
        else:
            return True
        # The logger's level was checked before this filter ran, at the old level: check the new
        # one, or the handlers (which pass everything) would still print it.
        return logging.getLogger(record.name).isEnabledFor(record.levelno)

    @staticmethod
    def _ours(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ComfyUIError):
            return True  # "Task run failed with exception: ...", with its traceback
        # "Finished in state Failed('Task run encountered an exception NodeExecutionError: ...')"
        message = record.getMessage()
        return message.startswith("Finished in state Failed") and any(
            f"exception {name}:" in message for name in _error_names())


def _error_names() -> set[str]:
    names, todo = set(), [ComfyUIError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


@contextlib.contextmanager
def one_line_failures():
    """Install :class:`OneLineFailures` on Prefect's task-run logger while the block runs."""
    engine_logger = logging.getLogger("prefect.task_runs")
    failures_filter = OneLineFailures()
    engine_logger.addFilter(failures_filter)
    try:
        yield
    finally:
        engine_logger.removeFilter(failures_filter)


@task(
    name="generate",
    task_run_name="generate-{spec.stage}-d{spec.index}-v{spec.variant}",
    # The live connection is not an input of the result: leave it out of the cache key,
    # so Prefect never tries to hash a socket. A rerun replaces the result of the plan's run.
    cache_policy=DEFAULT - "connection" - "rerun",
    # Results are persisted so that retrying a failed flow run redoes only the failed generations.
    persist_result=True,
    retry_condition_fn=retry_if_transient,
)
def generate(
    connection: ConnectionPool,
    workflow: ComfyUIWorkflow,
    spec: GenerationSpec,
    settings: GenerationSettings,
    rerun: int = 0,
) -> Union[GenerationResult, State]:
    """Run one generation on the shared connection and save its files.

    Args:
        connection: the flow run's open connections (a :class:`ConnectionPool`, one connection
            per server; pass it with ``unmapped(...)``).
        workflow: the workflow template and its bindings.
        spec: which description and variant, the seed and the client-chosen ``prompt_id``.
        settings: what all generations of the run share (kind, character, output_dir...).
        rerun: 0 for the plan's run of the generation; 1 (up to :data:`MAX_RERUNS`) when the
            flow runs it again because its files were lost: its prompt ids then differ from the
            earlier run's, which it still looks for and follows. Not part of the cache key.

    Returns:
        a :class:`GenerationResult` with every file written and the durations in seconds; or a
        ``Cancelled`` state (message ``interrupted: ...`` or ``cancelled: ...``) when the run was
        cancelled or stopped while this generation waited or ran (its prompt is removed from
        the server by the connection's ``close()``); or a ``Cancelled`` state with message
        ``not run: ...`` when ComfyUI refused the workflow itself for another generation of the
        run (nothing was sent for this one).

    Raises:
        WorkflowError: the bindings cannot be applied (nothing was sent).
        PromptValidationError: ``POST /prompt`` answered 400; when every generation would meet
            the same error (:func:`~blocks.preflight.is_workflow_wide`), the run sends no new
            prompt (``ConnectionPool.stop_new_prompts``) and the others end ``not run``.
        NodeExecutionError / ExecutionInterrupted: the prompt failed on the server.
        GenerationTimeout: it took longer than the server's ``generation_timeout_s``.
        ConnectionLost / ServerUnreachable: the server went away.
        OutputError: a file could not be downloaded or would escape ``output_dir``, or the
            output directory cannot be written (not retried: a retry would fail the same way).
    """
    logger = get_run_logger()
    progress = _ProgressLog(logger, spec, settings)
    try:
        _wait_before_retry(connection, settings, progress)
        return _generate(connection, workflow, spec, settings, progress, rerun)
    except GenerationCancelled as exc:
        # Not a failure of the generation: the run was cancelled or stopped around it (the flow says
        # so once, as a warning; one line per generation at INFO).
        logger.info("%s: %s", progress.prefix, exc.reason, extra=milestone("cancelled", spec, settings))
        return Cancelled(message=f"{'interrupted' if exc.interrupted else 'cancelled'}: {exc.reason}")
    except GenerationSkipped as exc:
        # Not sent: ComfyUI refused the workflow itself for another generation (the flow says so once).
        logger.info("%s: %s", progress.prefix, exc, extra=milestone("cancelled", spec, settings))
        return Cancelled(message=str(exc))  # "not run: ..."
    except ComfyUIError as exc:
        if isinstance(exc, PromptValidationError) and is_workflow_wide(exc, workflow,
                                                                      PER_GENERATION + tuple(spec.inputs)):
            connection.stop_new_prompts(
                f"ComfyUI refused the workflow itself for description {spec.index + 1} variant "
                f"{spec.variant + 1}, with an error every generation would meet (see that generation's "
                "error); fix the workflow or its parameters and run again")
        if not (is_transient(exc) and task_attempt() <= task_retries()):
            logger.error("%s (%r) failed, prompt_id %s: %s: %s", progress.prefix, trim(spec.description),
                         getattr(exc, "prompt_id", None) or spec.prompt_id, type(exc).__name__, exc,
                         extra=milestone("failed", spec, settings, error=f"{type(exc).__name__}: {exc}"))
        logger.debug("%s: traceback of %s", progress.prefix, type(exc).__name__, exc_info=True)
        raise
    except Exception as exc:  # not one of ours (saving files raises OutputError): a bug: keep its traceback
        logger.error("%s (%r) failed: %s: %s", progress.prefix, trim(spec.description), type(exc).__name__, exc,
                     exc_info=True, extra=milestone("failed", spec, settings, error=f"{type(exc).__name__}: {exc}"))
        raise


def _download(pool: ConnectionPool, server: ComfyUIConnection, ref: OutputRef, candidates,
              *, reuse_identical: bool, settings: GenerationSettings, progress: "_ProgressLog") -> tuple[Path, int]:
    """Download one output file (``candidates()``: the paths to try, see ``candidate_paths``).

    A :class:`DownloadFailed` (``/view`` kept failing: a busy or restarting server, transfers cut)
    is tried again here, with the same ``ref``, up to ``settings.retries`` times after
    ``retry_delay_s`` (doubling, at least 0.5 s): ComfyUI keeps its output files across a restart,
    but not the ``/history`` that a task retry would need to find them, so leaving it to a retry
    could run the prompt again.

    Raises:
        DownloadFailed: still failing after the retries (the task is retried as usual).
        OutputError: a permanent problem (see :meth:`ComfyUIConnection.download`).
    """
    attempt = 0
    while True:
        try:
            return server.download(ref, candidates(), reuse_identical=reuse_identical or attempt > 0)
        except DownloadFailed as exc:
            if attempt >= settings.retries:
                raise
            attempt += 1
            delay = max(retry_delay_s(settings, attempt + 1), 0.5)
            progress.logger.warning("%s: %s Trying the download again in %.1f s.", progress.prefix, exc, delay)
            pool.sleep(delay)


def retry_delay_s(settings: GenerationSettings, attempt: int) -> float:
    """Seconds to wait before task attempt ``attempt`` (2 = the first retry): ``retry_delay_s``
    doubling each time, times a jitter factor between 0.5 and 1.5; 0 for the first attempt."""
    if attempt < 2 or settings.retry_delay_s <= 0:
        return 0.0
    return settings.retry_delay_s * 2 ** (attempt - 2) * random.uniform(0.5, 1.5)


def _wait_before_retry(connection: ConnectionPool, settings: GenerationSettings, progress: _ProgressLog) -> None:
    attempt = task_attempt()
    delay = retry_delay_s(settings, attempt)
    if delay > 0:
        progress.logger.info("%s: retry %d of %d in %.1f s", progress.prefix, attempt - 1, task_retries(), delay,
                             extra=milestone("retry", progress.spec, progress.settings))
        connection.sleep(delay)


def _generate(connection: ConnectionPool, workflow: ComfyUIWorkflow, spec: GenerationSpec,
              settings: GenerationSettings, progress: _ProgressLog, rerun: int = 0) -> GenerationResult:
    logger = progress.logger
    # total_s runs from the moment the generation got a slot on a server (its prompt is made for
    # that server): the time it waited in the pool for a slot is not its own (a run keeps one more
    # generation in flight per server than the server's slots)
    task_began = time.monotonic()
    slot_taken_at: Optional[float] = None
    bound: dict[str, str] = {}  # each input image's value on the server that runs the prompt
    rendered = None if spec.inputs else workflow.render(workflow_params(spec, settings))

    def prompt_for(server: ComfyUIConnection) -> dict:
        nonlocal slot_taken_at
        if slot_taken_at is None:  # the first server's slot (a moved prompt keeps its first time)
            slot_taken_at = time.monotonic()
        if rendered is not None:
            return rendered
        values = {name: server.input_images.value(image, settings.upload_subfolder)
                  for name, image in spec.inputs.items()}
        bound.clear()
        bound.update(values)
        return workflow.render(workflow_params(spec, settings, values))

    finished_key = f"{spec.prompt_id}/{rerun}"
    known = connection.finished_outputs(finished_key)
    if known is not None:  # an earlier attempt's prompt finished; only its downloads failed
        outcome, refs, server, earlier_bound = known
        bound.update(earlier_bound)
        logger.info("%s: prompt %s already finished on %s; downloading its files again", progress.prefix,
                    outcome.prompt_id, server.url)
    else:
        outcome, refs, server = _run_or_reattach(connection, prompt_for, spec, settings, progress, rerun)
        # Kept until the files are saved: a task retry downloads them again instead of asking the
        # server's /history about the prompt (a restart wipes it; the files stay).
        connection.remember_finished(finished_key, (outcome, refs, server, dict(bound)))
    # A later attempt may find files an earlier one saved (then failed, or its result was lost):
    # one with the same bytes at a planned name is kept, not written again under the next name.
    # The first attempt never reuses: a file there is another run's, and each run keeps its own.
    later_attempt = (flow_attempt(), rerun, task_attempt()) != (1, 0, 1)

    if not refs:
        raise OutputError(
            f"prompt {outcome.prompt_id} finished but produced no file of type "
            f"{'/'.join(settings.output_types)}: the workflow needs an output node that saves "
            "(SaveImage, SaveAnimatedWEBP, SaveVideo, ...), or add the type to output_types "
            "(PreviewImage writes 'temp' files)."
        )
    download_began = time.monotonic()
    files: list[OutputFile] = []
    output_dir = Path(settings.output_dir)
    for number, ref in enumerate(refs, start=1):
        directory = output_subdir(output_dir, ref.subfolder)
        name = planned_name(settings.character, spec.index, spec.variant, ref,
                            number if len(refs) > 1 else None,
                            suffix="_video" if settings.kind == "image_to_video" and spec.stage == "video" else "")
        path, size = _download(connection, server, ref, lambda: candidate_paths(directory, name),
                               reuse_identical=later_attempt, settings=settings, progress=progress)
        if path.name != name:
            logger.warning("%s: %s already exists (another file); saved as %s", progress.prefix,
                           directory / name, path.name)
        files.append(OutputFile(path=str(path), bytes=size, node_id=ref.node_id, key=ref.key,
                                server_filename=ref.filename, subfolder=ref.subfolder, type=ref.type,
                                animated=ref.animated))
    download_s = time.monotonic() - download_began
    connection.forget_finished(finished_key)
    total_s = time.monotonic() - (slot_taken_at if slot_taken_at is not None else task_began)
    logger.info(
        "%s: done in %.1f s, %d file(s), %d bytes (queued %.1f s, executing %.1f s, download %.1f s)%s",
        progress.prefix, total_s, len(files), sum(f.bytes for f in files),
        outcome.queued_s, outcome.execution_s, download_s, ", cached" if outcome.cached else "",
        extra=milestone("done", spec, settings, files=[f.path for f in files], cached=outcome.cached, total_s=total_s),
    )
    return GenerationResult(
        kind=stage_kind(spec, settings),
        character=settings.character,
        index=spec.index,
        variant=spec.variant,
        description=spec.description,
        prompt_id=outcome.prompt_id,
        server=server.url,
        seed=spec.seed,
        status="cached" if outcome.cached else "completed",
        cached=outcome.cached,
        files=files,
        queued_s=round(outcome.queued_s, 3),
        execution_s=round(outcome.execution_s, 3),
        download_s=round(download_s, 3),
        total_s=round(total_s, 3),
        moved_from=outcome.moved_from,
        source=spec.source,
        inputs=dict(bound),
        flow_attempt=flow_attempt(),
    )
