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
from collections import defaultdict, deque
from pathlib import Path
from typing import Annotated, Any, Container, Mapping, Optional, Sequence, Union

from prefect import flow, get_run_logger, runtime
from prefect.exceptions import TerminationSignal
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from ..blocks.errors import ComfyUIError, InputImageError, WorkflowError
from ..blocks.inputs import InputImage, ServerFile, check_input_images, read_input_image
from ..blocks.pool import ConnectionPool
from ..blocks.server import ComfyUIServerPool
from ..blocks.preflight import run_preflight
from ..blocks.workflow import (ComfyUIWorkflow, SeedMode, choose_seed, require_description_binding,
                               require_start_image_binding)
from ..tasks.gallery import server_views
from ..tasks.generate import (flow_attempt, flow_attempts_prompt_ids, generate, milestone, one_line_failures,
                              variant_label, with_moved_copies, workflow_params)
from ..tasks.models import GenerationResult, GenerationSettings, GenerationSpec, Kind, Stage
from ..tasks.report import Outcome, ProgressReport, RunFacts, Stopped, describe_error, write_report
from .descriptions import DescriptionRow, is_reference, read_descriptions, texts_and_inputs
from .form import ServerParameter, WorkflowParameter

#: The most generations a flow run has in flight at once (threads of its task runner), whatever
#: the servers' slots add up to.
MAX_CONCURRENCY = 256


def in_flight_window(concurrency: int, connection: ConnectionPool, *, spare: bool = True) -> int:
    """How many generations the run keeps in flight (each holds a thread while it waits): the
    ``concurrency`` asked for, else (0) ``max_in_flight + 1`` summed over the servers the run
    uses (``max_in_flight`` without ``spare``); at most :data:`MAX_CONCURRENCY`.

    The one more per server is ready to take a slot the moment a prompt gives it back: a prompt
    gives its slot back once its outputs are listed, and its generation then still downloads the
    files and ends its task run. Without it, a server's next prompt waits for that (measured with
    ``bench/overhead.py`` at T = 0 on one server: 45 generations per second with 2, 62 with 3); it
    never puts more than ``max_in_flight`` of our prompts on a server, the slots do not allow it.
    An image-to-video run has no spare (``spare=False``): the spare would be an image already
    waiting for the slot that a finished image gives back, taking it before that image's video
    is even submitted (the video must go first)."""
    slots = sum(c.max_in_flight + int(spare) for c in connection.connections)
    return max(1, min(concurrency or slots, MAX_CONCURRENCY))


def with_max_in_flight(server, max_in_flight: int):
    """``server`` (a block or a pool) with every server's ``max_in_flight`` set to ``max_in_flight``
    (0: as saved); a pool becomes the list of its servers."""
    if not max_in_flight:
        return server
    servers = server.load_servers() if isinstance(server, ComfyUIServerPool) else [server]
    return [s.model_copy(update={"max_in_flight": max_in_flight}) for s in servers]


class _Plan:
    """Specs in the making, with the seeds and prompt ids of one run key (see :func:`plan_generations`)."""

    def __init__(self, seed_mode: SeedMode, base_seed: Optional[int], run_key: Optional[str], total: int,
                 index_offset: int):
        self.namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"comfy-pipeline:{run_key}") if run_key else None
        self.rng = random.Random(run_key) if run_key else random.Random()
        self.seed_mode, self.base_seed, self.total, self.index_offset = seed_mode, base_seed, total, index_offset
        self.specs: list[GenerationSpec] = []

    def add(self, number: int, variant: int, description: str, *, uses_seed: bool, of: int, stage: Stage,
            inputs: Optional[Sequence[Mapping[str, InputImage]]], source: Optional[int] = None,
            name_suffix: str = "") -> GenerationSpec:
        """Append the spec of description ``number`` (of this plan), ``variant`` of ``of``."""
        index = self.index_offset + number
        seed = (choose_seed(self.seed_mode, base_seed=self.base_seed, index=index, variant=variant, variants=of,
                            rng=self.rng) if uses_seed else None)
        name = f"{index}/{variant}{name_suffix}"
        spec = GenerationSpec(index=index, variant=variant, description=description, seed=seed,
                              prompt_id=str(uuid.uuid5(self.namespace, name) if self.namespace else uuid.uuid4()),
                              position=len(self.specs) + 1, total=self.total, stage=stage,
                              inputs=dict(inputs[number]) if inputs else {}, source=source)
        self.specs.append(spec)
        return spec


def plan_generations(
    descriptions: list[str],
    variants: int,
    seed_mode: SeedMode,
    base_seed: Optional[int],
    *,
    uses_seed: bool = True,
    run_key: Optional[str] = None,
    inputs: Optional[Sequence[Mapping[str, InputImage]]] = None,
    stage: Stage = "image",
    index_offset: int = 0,
) -> list[GenerationSpec]:
    """Every (description, variant) pair with its seed and a client-chosen ``prompt_id``.

    Order is description-major: ``[d0v0, d0v1, d1v0, ...]``; ``position`` is 1-based.
    ``seed`` is ``None`` when the workflow binds no seed (``uses_seed=False``).
    With a ``run_key`` (the flow run id) the plan is the same every time it is made for that
    key, random seeds included, so a retried flow run finds its completed generations again.
    ``inputs``: each description's input images (``{parameter: InputImage}``), in order.
    ``index_offset``: the index of the first description (a shard of a bigger run: its file names,
    seeds and report keep the big run's numbering).
    """
    plan = _Plan(seed_mode, base_seed, run_key, len(descriptions) * variants, index_offset)
    for number, description in enumerate(descriptions):
        for variant in range(variants):
            plan.add(number, variant, description, uses_seed=uses_seed, of=variants, stage=stage, inputs=inputs)
    return plan.specs


def plan_image_to_video(
    descriptions: list[str],
    image_variants: int,
    variants: int,
    seed_mode: SeedMode,
    base_seed: Optional[int],
    *,
    image_uses_seed: bool = True,
    video_uses_seed: bool = True,
    run_key: Optional[str] = None,
    image_inputs: Optional[Sequence[Mapping[str, InputImage]]] = None,
    video_inputs: Optional[Sequence[Mapping[str, InputImage]]] = None,
    index_offset: int = 0,
) -> list[GenerationSpec]:
    """An ``image_to_video`` plan: for each description ``image_variants`` images, each followed
    by the ``variants`` videos made from it (``[d0 image0, d0 video0, d0 video1, d0 image1, ...]``).

    An image's ``variant`` counts the description's images, a video's its videos (0 to
    ``image_variants * variants - 1``); a video's ``source`` is its image's ``position``, and its
    ``inputs["image"]`` is set when the image exists. Seeds and prompt ids as
    :func:`plan_generations` makes them (a video's prompt id is named ``{index}/{variant}/video``).
    """
    plan = _Plan(seed_mode, base_seed, run_key, len(descriptions) * image_variants * (1 + variants), index_offset)
    videos = image_variants * variants
    for number, description in enumerate(descriptions):
        for image_variant in range(image_variants):
            image = plan.add(number, image_variant, description, uses_seed=image_uses_seed, of=image_variants,
                             stage="image", inputs=image_inputs)
            for video in range(variants):
                plan.add(number, image_variant * variants + video, description, uses_seed=video_uses_seed,
                         of=videos, stage="video", inputs=video_inputs, source=image.position, name_suffix="/video")
    return plan.specs


def start_image(result: GenerationResult) -> InputImage:
    """The start image of the videos made from image generation ``result``: its first file that
    is an image (read from disk), with the server's copy as its ``origin``.

    Raises:
        InputImageError: none of its files is an image that can be read.
    """
    problem: Optional[InputImageError] = None
    for file in result.files:
        origin = ServerFile(server=result.server, filename=file.server_filename, subfolder=file.subfolder,
                            type=file.type)
        try:
            return read_input_image("image", file.path, origin=origin)
        except InputImageError as exc:
            problem = problem or exc
    if problem is not None:
        raise problem
    raise InputImageError("image", "(no file)", "was not made: the image generation saved no file")


class _Generations:
    """The generate task runs of one flow run and what became of each (``outcomes``, keyed by
    ``spec.position``); ``reused``: positions whose result came back from an earlier attempt of
    the flow run (its persisted result: the generation was not sent to ComfyUI again).

    At most ``window`` generations are submitted to the task runner at once (each holds a thread
    while it waits for its server): the rest wait here, in plan order, and are submitted as
    earlier ones finish, so a run of 20,000 descriptions keeps ``window`` task runs alive, not
    20,000. In an image-to-video run, the videos of a finished image go before every waiting image.
    """

    def __init__(self, outcomes: dict, progress: Optional[ProgressReport], window: int,
                 settings: GenerationSettings):
        self.outcomes = outcomes
        self.settings = settings
        self.progress = progress
        self.window = max(1, window)
        self.reused: set[int] = set()
        self.futures: dict[int, Any] = {}
        self.submitted: dict[int, GenerationSpec] = {}  # position -> the spec as it was run
        self.attempt = flow_attempt()
        self.counting = True

    def run(self, task, connection, template, specs, settings, *, rerun: int = 0) -> None:
        """Run ``task`` for every spec on the shared connection; record each outcome as it finishes
        and advance the progress artifact. ``rerun`` (1) runs completed generations again, with
        prompt ids of their own (see ``generate``); their progress was counted already."""
        self.counting = not rerun
        self._drive(connection, deque((task, template, s, rerun) for s in specs), settings)

    def run_image_to_video(self, task, connection, image_workflow, video_workflow, specs, settings) -> None:
        """Run an ``image_to_video`` plan (:func:`plan_image_to_video`): the images in plan order,
        and the videos of each image as soon as that image is done (with it as their ``image``
        input), before the images still waiting; the videos of an image that failed end
        ``skipped`` and are never sent."""
        self.counting = True
        videos_of: dict[int, list[GenerationSpec]] = defaultdict(list)
        for spec in specs:
            if spec.stage == "video":
                videos_of[spec.source].append(spec)
        self._drive(connection, deque((task, image_workflow, s, 0) for s in specs if s.stage == "image"), settings,
                    videos_of=videos_of, video_workflow=video_workflow, video_task=task)

    def _drive(self, connection, waiting: deque, settings, *,
               videos_of: Optional[dict[int, list[GenerationSpec]]] = None, video_workflow=None,
               video_task=None) -> None:
        """Submit ``waiting`` items ``(task, workflow, spec, rerun)``, at most ``window`` at once, and
        record each outcome; a finished image's videos (``videos_of``) go to the front of the line."""
        pending: dict[concurrent.futures.Future, tuple] = {}  # -> (position, future, task, workflow, rerun)
        while waiting or pending:
            while waiting and len(pending) < self.window:
                task, workflow, spec, rerun = waiting.popleft()
                if connection.no_new_prompts is not None:  # ComfyUI refused the workflow itself
                    self._skip([spec], connection.no_new_prompts, status="not run")
                    continue
                future = task.submit(connection, workflow, spec, settings, rerun=rerun)
                self.futures[spec.position] = future
                self.submitted[spec.position] = spec
                self.reused.discard(spec.position)  # run again (files lost): not reused any more
                pending[future.wrapped_future] = (spec.position, future, task, workflow, rerun)
            if not pending:
                continue
            done, _ = concurrent.futures.wait(list(pending), return_when=concurrent.futures.FIRST_COMPLETED)
            for wrapped in done:
                position, future, task, workflow, rerun = pending.pop(wrapped)
                self._record(position, future)
                videos = (videos_of or {}).pop(position, [])
                if not videos:
                    continue
                outcome = self.outcomes[position]
                if isinstance(outcome, GenerationResult) and not rerun and not _files_exist(outcome):
                    # an earlier attempt's image whose file was deleted since: made again before its videos
                    get_run_logger().warning("the image of description %d (image %d) lost its file on disk; "
                                             "making it again before its videos", outcome.index + 1,
                                             outcome.variant + 1)
                    videos_of[position] = videos
                    waiting.appendleft((task.with_options(refresh_cache=True), workflow,
                                        self.submitted[position], 1))
                    continue
                ready = self._start_videos(position, videos)
                waiting.extendleft(reversed([(video_task, video_workflow, v, 0) for v in ready]))

    def _start_videos(self, position: int, videos: list[GenerationSpec]) -> list[GenerationSpec]:
        """The videos of image ``position`` with that image as their ``image`` input, ready to run;
        none when the image did not succeed (they are marked ``skipped``, or as the image was)."""
        image = self.submitted[position]
        outcome = self.outcomes[position]
        label = f"description {image.index + 1}, image {image.variant + 1}"
        if isinstance(outcome, GenerationResult):
            try:
                start = start_image(outcome)
            except InputImageError as exc:
                self._skip(videos, f"its image ({label}) cannot start a video: {exc}")
                return []
            return [v.model_copy(update={"inputs": {**v.inputs, "image": start}}) for v in videos]
        if isinstance(outcome, Stopped):
            self._skip(videos, f"its image ({label}) was {outcome.status}: {outcome.reason}",
                       status=outcome.status if outcome.status != "interrupted" else "cancelled")
        else:
            self._skip(videos, f"its image ({label}) failed: {describe_error(outcome)}")
        return []

    def _skip(self, specs: list[GenerationSpec], reason: str, status: str = "skipped") -> None:
        for spec in specs:
            self.outcomes[spec.position] = Stopped(status, reason)
            get_run_logger().info("[%d/%d] description %d, %s: %s, %s", spec.position, spec.total, spec.index + 1,
                                  variant_label(spec, self.settings), status, reason,
                                  extra=milestone("skipped" if status == "skipped" else "cancelled", spec,
                                                  self.settings))
            if self.counting and self.progress is not None:
                self.progress.advance()

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
        self.futures.pop(position, None)  # recorded: its state and result are not kept twice


def _files_exist(result: GenerationResult) -> bool:
    return all(Path(f.path).is_file() for f in result.files)


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


def _mark_stopped(specs, outcomes: dict, connection: ConnectionPool, retries: int, reason: str,
                  started: Container[int]) -> None:
    """Generations without an outcome when the run stopped: ``interrupted`` if ComfyUI was
    running one of their prompts (close() interrupted it), ``cancelled`` if their task had
    ``started`` (positions) in this attempt (queued on the server and deleted, or waiting for a
    slot), else ``not run`` (still waiting in the flow: never sent). Only the started ones can have
    had a prompt of this connection: the prompt ids of the others are not worked out (a stopped
    run of 100,000 has 99,000 of them)."""
    interrupted = connection.interrupted_prompts
    attempt = flow_attempt()
    for spec in specs:
        if spec.position in outcomes:
            continue
        if spec.position not in started:
            outcomes[spec.position] = Stopped("not run", f"the run was {reason} before it was sent")
            continue
        status = "cancelled"
        if interrupted:
            # every attempt of this flow run and of the earlier ones: this run may have followed those
            attempts = set(with_moved_copies(flow_attempts_prompt_ids(spec.prompt_id, attempt, retries + 1)))
            if attempts & interrupted:
                status = "interrupted"
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


def parse_shard(shard: str) -> tuple[int, int]:
    """``"start:stop"`` (0-based, stop excluded) as two ints.

    Raises:
        WorkflowError: not two ints with 0 <= start < stop.
    """
    start, sep, stop = shard.partition(":")
    try:
        first, last = int(start), int(stop)
    except ValueError:
        first, last = -1, -1
    if not sep or not 0 <= first < last:
        raise WorkflowError(f"shard {shard!r} is not 'start:stop' with 0 <= start < stop")
    return first, last


def _failed_message(specs, outcomes, stopped: Optional[str], not_run: int, no_new_prompts: Optional[str]) -> str:
    """The Failed state's message: how many generations failed (and were skipped, not run), and
    the first image error that skipped videos."""
    results = sum(isinstance(outcomes.get(s.position), GenerationResult) for s in specs)
    failed = len(specs) - results
    skipped = [outcomes[s.position] for s in specs
               if isinstance(outcomes.get(s.position), Stopped) and outcomes[s.position].status == "skipped"]
    if stopped:
        return f"the run was {stopped}: {failed} of {len(specs)} generations failed"
    if not_run:  # ComfyUI refused the workflow itself: say so, not N failures
        return (f"{failed - not_run} of {len(specs)} generations failed and {not_run} were not run: "
                f"{no_new_prompts}")
    if skipped:
        return (f"{failed - len(skipped)} of {len(specs)} generations failed and {len(skipped)} video(s) were "
                f"skipped because {skipped[0].reason}")
    return f"{failed} of {len(specs)} generations failed"


@flow(
    name="generate-content",
    # An upper bound: the run keeps in flight only as many generations as its servers have slots
    # (in_flight_window), so only that many threads are ever started.
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_CONCURRENCY),
    log_prints=True,
)
def generate_content(
    server: ServerParameter,
    workflow: WorkflowParameter,
    # Three choices in the UI's form: texts (a text box each), rows with input images, or a file.
    descriptions: Union[Annotated[list[str], Field(min_length=1, title="Texts")],
                        Annotated[list[DescriptionRow], Field(min_length=1, title="Rows with input images")],
                        Annotated[str, Field(min_length=1, title="Descriptions file (path or URL)")]],
    kind: Kind = "image",
    character: str = "character",
    variants: Annotated[int, Field(ge=1, le=100)] = 1,
    video_workflow: WorkflowParameter = "",
    image_variants: Annotated[int, Field(ge=1, le=100)] = 1,
    inputs: dict[str, str] = {},  # noqa: B006
    output_dir: str = "output",
    seed_mode: SeedMode = SeedMode.random,
    base_seed: int = 0,
    # Real defaults (not None) so that the UI's form shows them; never mutated below.
    params: dict[str, Any] = {},  # noqa: B006
    output_types: Annotated[list[str], Field(min_length=1)] = ["output"],  # noqa: B006
    retries: Annotated[int, Field(ge=0, le=10)] = 2,
    retry_delay_s: Annotated[float, Field(ge=0)] = 5.0,
    concurrency: Annotated[int, Field(ge=0, le=MAX_CONCURRENCY)] = 0,
    max_in_flight: Annotated[int, Field(ge=0, le=64)] = 0,
    shard_size: Annotated[int, Field(ge=0)] = 0,
    shard: str = "",
) -> list[GenerationResult]:
    """Generate ``variants`` images or videos for each description over ONE ComfyUI connection.

    Args:
        server: the ComfyUI Server block, or a ComfyUI Server Pool block to spread the work
            over several servers (saved blocks in the UI, or instances).
        workflow: a saved ComfyUI Workflow block (what deployments use: the worker needs no
            file), or an API-format workflow JSON path on the machine that runs the flow
            (bindings in the file or a ``.bindings.json`` sidecar).
        descriptions: the text descriptions; each becomes ``variants`` generations. Or rows
            ``{"description": "...", "reference": "/path/alice.png"}`` whose other fields are the
            description's own input images (see ``inputs``; in an ``image_to_video`` run they go
            to the image workflow). Or, for big runs, the path or fsspec URL
            (``file://``, ``s3://``...) of a text, ``.csv`` or ``.jsonl`` file of them, which the
            machine running the flow reads (``flows/descriptions.py``).
        kind: ``image`` or ``video`` (decides file naming and the report's labels), or
            ``image_to_video``: ``workflow`` makes images, ``video_workflow`` a video from each.
        character: the character or campaign name, used in file names and artifact keys.
        variants: generations per description (1-100); in an ``image_to_video`` run, videos per image.
        video_workflow: the video workflow of an ``image_to_video`` run (a saved block or a path),
            binding its start image as ``image``; each video starts as soon as its image is done
            (``""``: none).
        image_variants: images per description in an ``image_to_video`` run (default 1).
        inputs: input images ``{parameter: local path}`` bound like any parameter (e.g.
            ``{"reference_image": "/refs/alice.png"}``, with ``"reference_image":
            "LoadRef.inputs.image"`` in the workflow's bindings); each file is checked before
            anything is sent, then uploaded once per server (``POST /upload/image``, into the
            input subfolder ``comfy-pipeline/<flow run id>``). A path is read on the machine
            that runs the flow.
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
        concurrency: generations in flight at once (threads); 0 (default): ``max_in_flight + 1``
            summed over the servers, so every slot of every server is used and the next
            generation is ready when a slot comes back (at most 256; ``max_in_flight`` alone in
            an ``image_to_video`` run, whose videos go first).
        max_in_flight: prompts queued or running per server; 0 (default): each server block's own.
        shard_size: with more descriptions than this (e.g. 500), the run becomes a parent that runs
            one child flow run per shard of ``shard_size`` descriptions (through this run's
            deployment, so any worker of the pool takes a shard; without a deployment, as subflows
            in this process), retries a failed shard once, and writes one report over all shards
            (``flows/shards.py``). 0 (default): never.
        shard: set by a parent run: ``"start:stop"``, which descriptions of the parent's this run
            makes (0-based, stop excluded); a reference is read and sliced, a list is that slice
            already. File names, seeds and the report keep the parent's numbering.

    Returns:
        the :class:`GenerationResult` of every generation, in plan order.

    Raises:
        WorkflowError: the workflow file cannot be used, or an input image (``InputImageError``:
            missing, unreadable, not an image; before anything is sent);
            ``WorkflowNotRunnable`` when no server can run it (preflight), after writing the report.
        ServerUnreachable / AuthenticationFailed: at connect, after writing the report.
    """
    arguments = dict(locals())  # as called: a parent run gives them to its shards
    logger = get_run_logger()
    began = time.monotonic()
    video_template: Optional[ComfyUIWorkflow] = None
    index_offset = 0
    try:
        by_reference = is_reference(descriptions)
        if by_reference:
            try:
                descriptions = read_descriptions(descriptions)
            except ValueError as exc:
                raise WorkflowError(str(exc)) from None
            if not descriptions:
                raise WorkflowError("the descriptions file has no description")
        if shard:
            index_offset, stop = parse_shard(shard)
            if by_reference:
                descriptions = descriptions[index_offset:stop]
            if not descriptions or len(descriptions) != stop - index_offset:
                raise WorkflowError(f"shard {shard!r} does not match the {len(descriptions)} description(s) given")
        texts, own_inputs = texts_and_inputs(descriptions)
        template = _load_workflow(workflow)
        require_description_binding(template)
        stages = {"image": template}
        if kind == "image_to_video":
            if not video_workflow:
                raise WorkflowError("kind image_to_video needs a video_workflow (the workflow that makes a video "
                                    "from each image, binding its start image as 'image')")
            video_template = stages["video"] = _load_workflow(video_workflow)
            require_start_image_binding(video_template)
        elif video_workflow or image_variants != 1:
            logger.warning("video_workflow and image_variants are used only with kind image_to_video; this %s run "
                           "ignores them", kind)
        images = check_input_images(inputs or {}, own_inputs, stages)
    except WorkflowError as exc:  # nothing was sent; say why in one line, no traceback
        logger.error("%s", exc)
        return Failed(data=exc, message=str(exc))
    if shard_size and not shard and len(texts) > shard_size:
        from .shards import run_sharded

        return run_sharded(arguments, count=len(texts), logger=logger)
    if video_template is not None:
        specs = plan_image_to_video(texts, image_variants, variants, SeedMode(seed_mode), base_seed,
                                    image_uses_seed=template.binds("seed"), video_uses_seed=video_template.binds("seed"),
                                    run_key=runtime.flow_run.id, image_inputs=images["image"],
                                    video_inputs=images["video"], index_offset=index_offset)
    else:
        specs = plan_generations(texts, variants, SeedMode(seed_mode), base_seed, uses_seed=template.binds("seed"),
                                 run_key=runtime.flow_run.id, inputs=images["image"],
                                 stage="video" if kind == "video" else "image", index_offset=index_offset)
    if runtime.deployment.id and not Path(output_dir).expanduser().is_absolute():
        logger.warning("output_dir %r is relative to this run's working directory %s: a process "
                       "worker deletes that directory when the run ends. Give an absolute path "
                       "(or one starting with ~).", output_dir, Path.cwd())
    settings = GenerationSettings(
        kind=kind,
        character=character,
        output_dir=str(Path(output_dir).expanduser().absolute()),  # absolute in results and report
        descriptions=len(texts),
        first_index=index_offset,
        variants=variants,
        image_variants=image_variants if video_template is not None else 1,
        upload_subfolder=f"comfy-pipeline/{runtime.flow_run.id or uuid.uuid4()}",
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
                     attempt=flow_attempt(), views=server_views(server), shard=shard)
    outcomes: dict[int, Outcome] = {}
    progress = ProgressReport(character, kind, len(specs))
    if video_template is not None:
        logger.info("%d image and %d video generation(s) for %s: %d description(s) x %d image(s) x %d video(s) on %s",
                    sum(s.stage == "image" for s in specs), sum(s.stage == "video" for s in specs), character,
                    len(texts), image_variants, variants, server.url)
    else:
        logger.info("%d %s generation(s) for %s: %d description(s) x %d variant(s) on %s",
                    len(specs), kind, character, len(texts), variants, server.url)
    try:
        connection = ConnectionPool.open(with_max_in_flight(server, max_in_flight), logger=logger)
    except (ComfyUIError, ValueError) as exc:  # ValueError: a pool names a block that is not saved
        logger.error("%s", exc)
        facts.fatal_error = f"{type(exc).__name__}: {exc}"
        _write_report(logger, specs, outcomes, facts, began)
        return Failed(data=exc, message=str(exc))
    try:  # before the first POST: can each server run the rendered workflow? (blocks/preflight.py)
        for stage, stage_workflow in stages.items():
            stage_specs = [s for s in specs if s.stage == stage] or specs
            run_preflight(connection, stage_workflow, [workflow_params(s, settings) for s in stage_specs],
                          logger=logger, unchecked=sorted({n for s in stage_specs for n in s.inputs}
                                                          | ({"image"} if stage == "video" else set())))
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
    spare = video_template is None  # see in_flight_window
    window = in_flight_window(concurrency, connection, spare=spare)
    logger.info("up to %d generation(s) in flight at once (%s)", window,
                f"concurrency {concurrency}" if concurrency else
                f"max_in_flight{' + 1' if spare else ''} over {len(connection.connections)} server(s)")
    generations = _Generations(outcomes, progress, window, settings)
    # Until the report is written: the engine's late records of cancelled task runs too.
    with one_line_failures():
        try:
            if video_template is not None:
                generations.run_image_to_video(task, connection, template, video_template, specs, settings)
            else:
                generations.run(task, connection, template, specs, settings)
            # A completed generation whose files were deleted since (a result that came back from
            # an earlier attempt of this flow run, or files removed during this one): run it again,
            # as a rerun whose prompt ids were never posted (it follows the earlier prompt if the
            # server still has it).
            stale = [s for s in specs if isinstance(outcomes.get(s.position), GenerationResult)
                     and not _files_exist(outcomes[s.position])]
            if stale:
                logger.warning("%d completed generation(s) lost files on disk; running them again", len(stale))
                for stage, stage_workflow in stages.items():
                    again = [generations.submitted.get(s.position, s) for s in stale if s.stage == stage
                             or (stage == "image" and video_template is None)]
                    if again:
                        generations.run(task.with_options(refresh_cache=True), connection, stage_workflow, again,
                                        settings, rerun=1)
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
                _mark_stopped(specs, outcomes, connection, retries, facts.stopped, generations.submitted)
            facts.connections_opened = sum(st.connections_opened for st in connection.stats().values())
            facts.reconnects = sum(st.reconnects for st in connection.stats().values())
            facts.servers = connection.urls
            facts.outages = connection.outages()
            not_run = sum(isinstance(o, Stopped) and o.status == "not run" for o in outcomes.values())
            if connection.no_new_prompts and not_run:
                facts.notes.append(f"{not_run} generation(s) were not run: {connection.no_new_prompts}.")
            try:
                progress.flush()
            except Exception as exc:  # the report must still be written
                logger.debug("could not update the progress artifact: %s", exc)
            _write_report(logger, specs, outcomes, facts, began, generations.reused)

    results = [o for o in (outcomes.get(s.position) for s in specs) if isinstance(o, GenerationResult)]
    if len(results) < len(specs):
        return Failed(message=_failed_message(specs, outcomes, facts.stopped, not_run, connection.no_new_prompts))
    if generations.reused:
        logger.info("%d generation(s) reused from an earlier attempt of this flow run", len(generations.reused))
    logger.info("all %d generations finished in %.1f s", len(specs), facts.wall_s)
    return results
