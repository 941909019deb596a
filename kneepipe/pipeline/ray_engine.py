"""``kneepipe run --engine ray``: the same pipeline mapped over a Ray cluster with Ray Data.

The driver lists the inputs and opens the run folder as the local engine does
(:func:`kneepipe.pipeline.run.open_run`), then hands the films still to do to Ray Data, one
task of ``STEPS_PER_TASK`` pipeline steps (``pipeline_cfg.batch`` films each, in input
order) a row. A pool of :class:`FilmGrader` actors, each holding its own detector and
grader loaded once, decodes, detects, grades and saves each task with
:func:`kneepipe.pipeline.run.graded_steps`, the local engine's own per-film work, so a
step's films are graded together exactly as locally and get the same logits. The records
come back to the driver, which journals them as they arrive
(:class:`kneepipe.pipeline.run.RunJournal`) and writes the outputs at the end
(:func:`kneepipe.pipeline.run.close_run`): ``results.csv`` is the local engine's, row for row.

Crops and thumbnails are written by the actors into the run folder, and the actors read the
radiographs where the driver found them: on a cluster of several machines, the inputs and
the run folder live on storage every node mounts at the same path.

A task whose actor dies (a killed process, a lost node) is run again on a restarted actor,
at most ``RETRIES`` times (Ray's ``max_restarts`` and ``max_task_retries``); the journal
takes each film once, so a retried task never adds a row twice. An interrupted run resumes
with either engine, since the engine is not part of the run's fingerprint.

>>> from kneepipe.config import load_config
>>> run = run_pipeline_ray("raw/", "out/", load_config(PipelineConfig), load_config(DetectConfig),
...                        load_config(GradeConfig), address="auto")  # doctest: +SKIP
>>> run.summary["images"]  # doctest: +SKIP
27
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import warnings
from collections.abc import Generator, Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kneepipe.pipeline.config import PipelineConfig
from kneepipe.pipeline.outputs import PipelineRun
from kneepipe.pipeline.run import (
    Film,
    FilmWork,
    Progress,
    RunJournal,
    close_run,
    find_run_inputs,
    graded_steps,
    load_models,
    open_run,
)

if TYPE_CHECKING:
    from kneepipe.detect.config import DetectConfig
    from kneepipe.detect.predict import Detector
    from kneepipe.grade.config import GradeConfig
    from kneepipe.grade.predict import Grader
    from kneepipe.pipeline.records import ImageRecord

RETRIES = 3
"""Times a task is run again after its actor died, and times an actor is restarted."""
STEPS_PER_TASK = 4
"""Pipeline steps in one actor call (the unit Ray retries and returns): within a call, a step is
detected while the one before is graded, as the local engine does."""
MAX_TASKS = 5000
"""Most actor calls a run is split into; a larger run gets more steps per call."""


class FilmGrader:
    """A Ray Data actor: the detector and the grader loaded once, then tasks of pipeline steps graded and saved.

    Each input row is one task (``films``: a JSON list of ``[path, name, key, note]``, a
    whole number of steps); it is graded as the local engine grades, detecting a step while
    the step before is graded, and each step comes out as one row (Ray Data hands a task's
    rows back when the task ends): its journal records (``records``, JSON) and the pooled
    features of its graded knees (``features``, an ``.npy`` file's bytes) for the batch's
    shift score.
    """

    def __init__(self, work: FilmWork) -> None:
        from kneepipe.runtime import native_logs_hidden

        self.work = work
        with native_logs_hidden():
            self.detector, self.grader = load_models(work.detect_cfg, work.grade_cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for task in batch["films"]:
            films = [Film(Path(path), name, key, note) for path, name, key, note in json.loads(task)]
            with closing(graded_steps(films, self.detector, self.grader, self.work)) as steps:
                for records, pooled in steps:
                    features = np.concatenate(pooled) if pooled else np.empty((0, 0), np.float32)
                    yield {
                        "records": np.array([json.dumps(records, separators=(",", ":"))], dtype=object),
                        "features": np.array([_npy_bytes(features)], dtype=object),
                    }


def run_pipeline_ray(
    inputs: str | Path,
    out_dir: str | Path,
    pipeline_cfg: PipelineConfig,
    detect_cfg: DetectConfig,
    grade_cfg: GradeConfig,
    labels: str | Path | None = None,
    progress: Progress | None = None,
    detector: Detector | None = None,
    grader: Grader | None = None,
    address: str | None = None,
    actor_cpus: float = 2,
    actors: int | None = None,
    steps_per_task: int = STEPS_PER_TASK,
    extra: dict[str, Any] | None = None,
) -> PipelineRun:
    """:func:`kneepipe.pipeline.run.run_pipeline` on a Ray cluster: the same run folder, written the same way.

    Args:
        inputs, out_dir, pipeline_cfg, detect_cfg, grade_cfg, labels, progress: as for
            :func:`kneepipe.pipeline.run.run_pipeline`; ``progress`` is called as each step
            comes back (Ray Data's own progress is shown when it is None).
        detector, grader: models already loaded on the driver (loaded if None); the driver
            needs them for the versions in ``args.yaml``, the final grades and the report.
        address: the cluster to join (``auto``: the one ``ray start`` set up on this node,
            or ``HOST:PORT`` of its head); None starts a Ray instance on this machine unless
            this process already joined one (``ray.init``).
        actor_cpus: CPUs each model-holding actor reserves (and its frameworks' threads).
        actors: the number of actors; None scales from one to as many as the cluster's CPUs hold.
        steps_per_task: pipeline steps in one actor call (a run of many films gets more,
            so it is split into at most ``MAX_TASKS`` calls).
        extra: more facts for ``args.yaml``.

    Raises:
        FileNotFoundError, ValueError, OutputConflictError: as the local engine.
    """
    found = find_run_inputs(inputs, out_dir)
    if detector is None or grader is None:
        loaded_detector, loaded_grader = load_models(detect_cfg, grade_cfg, detector is None, grader is None)
        detector, grader = detector or loaded_detector, grader or loaded_grader
    assert detector is not None and grader is not None  # loaded above when not given
    facts = {"engine": "ray", "ray_address": address, "ray_actor_cpus": actor_cpus, "ray_actors": actors}
    plan = open_run(
        found, out_dir, pipeline_cfg, detect_cfg, grade_cfg, detector, grader, labels, {**facts, **(extra or {})}
    )
    journal = RunJournal(plan, progress)
    features: list[np.ndarray] = []
    started = time.perf_counter()
    if plan.todo:
        import ray

        joined = not ray.is_initialized()
        if joined:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports nothing from a clinic's run
            # Under the caller's own progress bar, Ray's warnings and notes would break it: errors only.
            level = logging.ERROR if progress else logging.WARNING
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=level)
        try:
            work = FilmWork(plan.out_dir, pipeline_cfg, detect_cfg, grade_cfg)
            graded = _graded_on_ray(plan.todo, work, actor_cpus, actors, steps_per_task, not progress)
            with closing(graded):  # stopped early (an interrupt), the dataset's actors are let go
                for records, pooled in graded:
                    if journal.write(records) and pooled.size:  # a retried step that came back before brings nothing
                        features.append(pooled)
        finally:
            if joined:
                ray.shutdown()
    seconds = time.perf_counter() - started
    return close_run(plan, pipeline_cfg, grade_cfg, grader, detector.version, features, journal, seconds)


def _graded_on_ray(
    films: list[Film],
    work: FilmWork,
    actor_cpus: float,
    actors: int | None,
    steps_per_task: int,
    show_progress: bool,
) -> Generator[tuple[list[ImageRecord], np.ndarray], None, None]:
    """Yield ``(records, pooled features)`` of each step as the actors finish it (in no set order)."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress
    context.print_on_execution_start = show_progress
    if not show_progress:  # the caller shows progress: Ray Data's notes and statistics would break it
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    batch = work.pipeline_cfg.batch
    steps = -(-len(films) // batch)
    # Tasks of whole steps, so every step holds the films a local run would grade together.
    per_task = batch * max(steps_per_task, -(-steps // MAX_TASKS))
    tasks = [films[start : start + per_task] for start in range(0, len(films), per_task)]
    rows = [{"films": json.dumps([[str(f.path), f.name, f.key, f.note] for f in task])} for task in tasks]
    if actors is None:
        most = max(1, int(ray.cluster_resources().get("CPU", 1) // actor_cpus))
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=min(most, len(tasks)))
    else:
        pool = ray.data.ActorPoolStrategy(size=actors)
    with warnings.catch_warnings():
        # Ray Data deprecates passing actor options this way, and has no other way yet to bound retries.
        warnings.simplefilter("ignore", DeprecationWarning)
        graded = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            FilmGrader,
            fn_constructor_args=(work,),
            batch_size=1,
            compute=pool,
            num_cpus=actor_cpus,
            max_restarts=RETRIES,
            max_task_retries=RETRIES,
        )
    for row in graded.iter_rows():
        records: list[ImageRecord] = json.loads(row["records"])
        yield records, np.load(io.BytesIO(row["features"]), allow_pickle=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
