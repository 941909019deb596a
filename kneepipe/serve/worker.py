"""The page's background worker: the models, loaded once, and a queue of runs fed to the pipeline.

Requests never touch a model. An upload is stored and its run id queued; one worker
thread loads the detector and the shipped grader when the server starts, then takes the
runs one at a time and hands each to :func:`kneepipe.pipeline.run.run_pipeline` with the
loaded models, so the page stays responsive while a batch is graded. A site grader
(a ``.npz`` file in the graders folder) is loaded the first time a run asks for it and
kept. Runs left queued or half done by a stopped server are queued again at start-up;
the pipeline's journal lets a half-done run continue where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kneepipe.files import write_atomic
from kneepipe.joints import STATUS_OK
from kneepipe.serve.store import RunStore, now

log = logging.getLogger("kneepipe.serve")
SHIPPED = "shipped"
MAX_SITE_GRADERS = 3  # site graders kept loaded at once (each holds about 90 MB)


class GraderChoice:
    """The graders a run may pick: the shipped one, and the ``.npz`` files of the graders folder."""

    def __init__(self, folder: Path):
        self.folder = folder

    def names(self) -> list[str]:
        found = sorted(p.name for p in self.folder.glob("*.npz") if p.is_file()) if self.folder.is_dir() else []
        return [SHIPPED, *found]

    def path(self, name: str) -> Path | None:
        """The file of a grader by its listed name (None: the shipped one); ``ValueError`` if not listed."""
        if name in ("", SHIPPED):
            return None
        if name not in self.names()[1:]:
            raise ValueError(f"no grader {name!r}: pick the shipped grader or one of {self.names()[1:] or 'none'}")
        return self.folder / name


class Models:
    """The detector and the graders, loaded once in the worker thread."""

    def __init__(self, detect_cfg, grade_cfg):
        self.detect_cfg, self.grade_cfg = detect_cfg, grade_cfg
        self.detector = None
        self.shipped = None
        self._site: dict[tuple[str, int, int], Any] = {}

    def load(self) -> None:
        from kneepipe.pipeline.run import load_models
        from kneepipe.runtime import native_logs_hidden

        with native_logs_hidden():
            self.detector, self.shipped = load_models(self.detect_cfg, self.grade_cfg)

    def grader(self, path: Path | None):
        """The loaded grader of a file (None: the configured default); a changed file is loaded again."""
        if path is None:
            return self.shipped
        from kneepipe.grade.predict import Grader

        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._site:
            if len(self._site) >= MAX_SITE_GRADERS:
                self._site.pop(next(iter(self._site)))
            self._site[key] = Grader.from_config(self.grade_cfg, path)
        return self._site[key]


class Worker:
    """One thread that loads the models and processes queued runs in order.

    ``process(worker, run_id)`` does a run's work (:func:`pipeline_process` in the server);
    ``load`` loads the models first (None: nothing to load). ``state`` is ``starting``,
    ``loading models``, ``ready`` or ``failed``; ``message`` says why it failed;
    ``current`` is the id of the run being processed.
    """

    def __init__(self, store: RunStore, process: Callable[[Worker, str], None], load: Callable[[], None] | None):
        self.store = store
        self._process = process
        self._load = load
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.state, self.message = "starting", ""
        self.current: str | None = None
        self.processed = 0
        self._thread = threading.Thread(target=self._loop, name="kneepipe-serve-worker", daemon=True)

    def start(self) -> None:
        for run_id in self.store.unfinished():
            self.store.update(run_id, status="queued")
            self.queue.put(run_id)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        """Stop taking runs; queued runs, and one cut short, are taken up again at the next start."""
        self.queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, run_id: str) -> None:
        self.queue.put(run_id)

    def position(self, run_id: str) -> int | None:
        """How many queued runs come before this one (None when it is not waiting)."""
        waiting = [item for item in list(self.queue.queue) if item is not None]
        return waiting.index(run_id) if run_id in waiting else None

    def _loop(self) -> None:
        if self._load is not None:
            self.state = "loading models"
            try:
                self._load()
            except Exception as err:
                log.exception("cannot load the models")
                self.state, self.message = "failed", f"cannot load the models: {err}"
                self._fail_waiting()
                return
        self.state = "ready"
        while (run_id := self.queue.get()) is not None:
            self.current = run_id
            try:
                self._process(self, run_id)
            except Exception as err:  # the run says what went wrong; the next run still goes
                log.exception("run %s failed", run_id)
                self.store.update(run_id, status="failed", message=_in_words(err), finished=now())
            finally:
                self.current = None
                self.processed += 1

    def _fail_waiting(self) -> None:
        while True:
            try:
                run_id = self.queue.get_nowait()
            except queue.Empty:
                return
            if run_id is not None:
                self.store.update(run_id, status="failed", message=self.message)


def _in_words(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"the run could not be written: {err.strerror}"
    return f"the run could not be processed: {err or type(err).__name__}"


def pipeline_process(models: Models, pipeline_cfg, serve_cfg) -> Callable[[Worker, str], None]:
    """What the worker does with a run: the pipeline with the loaded models, then the page's views."""

    def process(worker: Worker, run_id: str) -> None:
        from kneepipe.pipeline.run import run_pipeline
        from kneepipe.pipeline.state import OutputConflictError

        store = worker.store
        meta = store.update(run_id, status="running", started=now(), message="")
        folder = store.folder(run_id)
        grader_path = Path(meta["grader_file"]) if meta.get("grader_file") else None
        grader = models.grader(grader_path)
        grade_cfg = dataclasses.replace(
            models.grade_cfg, model=str(grader_path) if grader_path else models.grade_cfg.model, prior=meta["prior"]
        )
        run_cfg = dataclasses.replace(pipeline_cfg, report=serve_cfg.report)

        def progress(done: int, total: int) -> None:
            store.update(run_id, progress={"done": done, "total": total})

        def run(cfg):
            return run_pipeline(
                folder / "inputs",
                folder / "out",
                cfg,
                models.detect_cfg,
                grade_cfg,
                progress=progress,
                detector=models.detector,
                grader=grader,
            )

        try:
            result = run(run_cfg)
        except OutputConflictError:  # the server's configuration changed since this run began: start afresh
            result = run(dataclasses.replace(run_cfg, overwrite=True))
        views = build_views(result.images, folder, grader if serve_cfg.gradcam else None)
        write_atomic(folder / "views" / "views.json", json.dumps(views))
        summary = {
            key: result.summary.get(key)
            for key in ("images", "images_read", "knees_graded", "grade_counts", "refused", "seconds", "grader")
        }
        store.update(run_id, status="done", finished=now(), summary=summary, grader_version=grader.version)

    return process


def build_views(images: dict[str, dict[str, Any]], folder: Path, grader=None) -> list[dict[str, Any]]:
    """What the page shows per radiograph, from the run's records; with a grader, a Grad-CAM overlay per knee.

    Boxes are in source pixels with the thumbnail's scale beside them; the heat maps are
    the grader's own Grad-CAM, blended as the report blends them.
    """
    (folder / "views").mkdir(exist_ok=True)
    out_dir = folder / "out"
    films = []
    for name, record in images.items():
        knees = []
        for knee in record["knees"]:
            view = {
                key: knee.get(key)
                for key in ("side", "box", "det_confidence", "crop", "status", "message", "review_reason")
            }
            # A knee needs a reader's look when the pipeline says so, failed to grade it or noted something.
            view["needs_review"] = (
                bool(knee.get("needs_review")) or knee["status"] != STATUS_OK or bool(knee["message"])
            )
            if knee["status"] == STATUS_OK:
                view.update(kl_grade=knee["kl_grade"], probabilities=[round(p, 4) for p in knee["probabilities"]])
                if grader is not None and knee.get("crop"):
                    view["gradcam"], view["gradcam_error"] = _gradcam(grader, out_dir, folder / "views", knee)
            knees.append(view)
        films.append(
            {
                "image": name,
                "status": record["status"],
                "message": record["message"],
                "original_size": record["original_size"],
                "thumbnail": f"out/{record['thumbnail']}" if record.get("thumbnail") else "",
                "thumbnail_scale": record.get("thumbnail_scale"),
                "knees": knees,
            }
        )
    return films


def _gradcam(grader, out_dir: Path, views_dir: Path, knee: dict[str, Any]) -> tuple[str, str]:
    """The overlay's path in the run folder, or the reason there is none (a heat map is an aid, never a failure)."""
    import cv2

    from kneepipe.pipeline.plots import gradcam_overlay

    crop = cv2.imread(str(out_dir / knee["crop"]), cv2.IMREAD_GRAYSCALE)
    if crop is None:
        return "", "no heat map: the crop was not saved"
    try:
        overlay = gradcam_overlay(crop, grader.gradcam(crop, grade=knee["kl_grade"]))
    except Exception as err:
        return "", f"no heat map ({type(err).__name__})"
    ok, encoded = cv2.imencode(".png", overlay)
    if not ok:
        return "", "no heat map: it could not be encoded"
    (views_dir / "gradcam").mkdir(exist_ok=True)
    relative = f"gradcam/{Path(knee['crop']).name}"
    write_atomic(views_dir / relative, encoded.tobytes())
    return f"views/{relative}", ""
