"""The grader's training recipe: what the CPU and the GPU trainer share, defined once.

Both trainers (:mod:`kneepipe.training.grader`, Keras with albumentations on a CPU, and
:mod:`kneepipe.training.grader_torch`, Keras on torch with the crops on a GPU) take from
here the data subsetting and the training grade prior, the run folder and its log, the
starting weights, the learning-rate schedule, the precision policy, the metrics written
per epoch and the grader record. The augmentation recipe is
:mod:`kneepipe.training.augment`. They differ only in how they feed the device.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kneepipe import KL_GRADES
from kneepipe.files import write_atomic
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.data import CropSet, labelled_files, load_crops, split_files
from kneepipe.grade.model import Preprocessing, read_grader_file

METRIC_COLUMNS = [
    "epoch",
    "size",
    "lr",
    "train_loss",
    "val_accuracy",
    "val_qwk",
    "val_mae",
    "val_ece",
    "predicted_counts",
    "seconds",
]
WARMUP_START = 1 / 25  # the warm-up starts at this share of the peak learning rate
FINAL_LR = 0.01  # the cosine decay ends at this share of the peak


def stratified_subset(grades: Sequence[int] | np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``limit`` items keeping each grade's share, and every grade present.

    Each grade gets its share of ``limit`` rounded down (at least one item), and the items
    still missing go to the grades with the largest remainders, so a rare grade (KL4 is 3%
    of the OAI crops) is never dropped by a small limit. All indices when ``limit`` is None.

    >>> grades = [0] * 40 + [1] * 20 + [2] * 25 + [3] * 12 + [4] * 3
    >>> np.bincount(np.asarray(grades)[stratified_subset(grades, 10, seed=0)]).tolist()
    [4, 2, 2, 1, 1]
    """
    values = np.asarray(grades)
    if limit is None or limit >= len(values):
        return np.arange(len(values))
    present, counts = np.unique(values, return_counts=True)
    ideal = limit * counts / counts.sum()
    quota = np.minimum(counts, np.maximum(1, np.floor(ideal).astype(int)))
    while quota.sum() < limit:
        room = np.where(quota < counts, ideal - quota, -np.inf)
        quota[int(np.argmax(room))] += 1
    while quota.sum() > max(limit, len(present)):
        excess = np.where(quota > 1, quota - ideal, -np.inf)
        quota[int(np.argmax(excess))] -= 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(values == grade), size=int(take), replace=False)
        for grade, take in zip(present, quota, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def load_crop_sets(config: GradeConfig) -> tuple[CropSet, CropSet]:
    """Decode the train and val crops the config names (its ``data`` folder or ``split_csv``), subset as asked.

    Raises:
        FileNotFoundError: neither is set, or no labelled crops are found there.
    """
    if config.split_csv:
        train_files, val_files = split_files(config.split_csv, "train"), split_files(config.split_csv, "val")
    elif config.data:
        root = Path(config.data)
        train_files, val_files = labelled_files(root / "train"), labelled_files(root / "val")
    else:
        raise FileNotFoundError("no training data: set data (a folder with train/ and val/) or split_csv")
    if not train_files[0] or not val_files[0]:
        raise FileNotFoundError("no labelled crops found: expected train/<grade>/ and val/<grade>/ folders")
    keep_train = stratified_subset(train_files[1], config.max_train_images, config.seed)
    keep_val = stratified_subset(val_files[1], config.max_val_images, config.seed)
    train = load_crops([train_files[0][i] for i in keep_train], [train_files[1][i] for i in keep_train])
    val = load_crops([val_files[0][i] for i in keep_val], [val_files[1][i] for i in keep_val])
    return train, val


def training_prior(grades: np.ndarray) -> tuple[float, ...]:
    """The grade distribution of the training crops, stored with the grader for prior adaptation.

    >>> training_prior(np.array([0, 0, 1, 4]))
    (0.5, 0.25, 0.0, 0.0, 0.25)
    """
    return tuple(float(p) for p in np.bincount(grades, minlength=len(KL_GRADES)) / len(grades))


def architecture_args(config: GradeConfig) -> dict[str, Any]:
    """The backbone's arguments a config asks for: none for the published Xception, else its width and depth.

    >>> from kneepipe.config import load_config
    >>> tiny = load_config(GradeConfig, overrides={"backbone_width": 0.0625, "backbone_middle_blocks": 1})
    >>> architecture_args(load_config(GradeConfig)), architecture_args(tiny)
    ({}, {'width': 0.0625, 'middle_blocks': 1})
    """
    if (config.backbone_width, config.backbone_middle_blocks) == (1.0, 8):
        return {}
    return {"width": float(config.backbone_width), "middle_blocks": int(config.backbone_middle_blocks)}


def grader_record(size: int, config: GradeConfig, prior: Sequence[float], extra: dict[str, Any]) -> Preprocessing:
    """The preprocessing record written with every grader file a trainer saves."""
    return Preprocessing(
        input_size=int(size),
        head=config.head,
        train_prior=tuple(prior),
        architecture_args=architecture_args(config),
        extra=extra,
    )


def initial_weights(config: GradeConfig) -> list[np.ndarray] | None:
    """The weights of the grader file ``config.init`` to start from, or None for a fresh network."""
    return read_grader_file(config.init)[1] if config.init else None


class RunLog:
    """Appends timestamped lines to the run's ``train.log`` and echoes them."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "train.log"

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")


def start_run(run_dir: Path, resuming: bool) -> RunLog:
    """Create the run folder, refusing one that holds another run unless it is resumed; return its log.

    Raises:
        FileExistsError: ``run_dir`` holds a run's ``metrics.csv`` and this is not a resume.
    """
    if not resuming and (run_dir / "metrics.csv").exists():
        raise FileExistsError(f"{run_dir} already holds a run; resume it or choose another folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunLog(run_dir)


def epoch_record(epoch: int, size: int, lr: float, loss: float, metrics: dict, seconds: float) -> dict[str, Any]:
    """One line of ``metrics.csv``: the epoch (1-based), its input size, learning rate, loss and val metrics."""
    return {
        "epoch": epoch,
        "size": size,
        "lr": round(lr, 7),
        "train_loss": round(loss, 4),
        "val_accuracy": metrics["accuracy"],
        "val_qwk": metrics["qwk"],
        "val_mae": metrics["mae"],
        "val_ece": metrics["ece"],
        "predicted_counts": " ".join(map(str, metrics["predicted_counts"])),
        "seconds": round(seconds, 1),
    }


def append_epoch(run_dir: Path, record: dict[str, Any]) -> None:
    """Append an :func:`epoch_record` to the run's ``metrics.csv`` (written with its header when new)."""
    path = Path(run_dir) / "metrics.csv"
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(METRIC_COLUMNS)
        writer.writerow([record[c] for c in METRIC_COLUMNS])


def keep_epochs(run_dir: Path, epochs: int) -> None:
    """Cut ``metrics.csv`` back to its first ``epochs`` rows: a resumed run repeats the epoch a kill cut short.

    A kill after an epoch's row was written but before its checkpoint was would otherwise
    leave that epoch in the file twice.
    """
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) > epochs + 1:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows[: epochs + 1])
        write_atomic(path, buffer.getvalue(), fsync=True)


def best_so_far(qwk: float | None, best_qwk: float) -> bool:
    """Whether an epoch's val QWK beats the best so far (an undefined QWK never does).

    >>> best_so_far(None, -1.0), best_so_far(0.5, 0.4)
    (False, True)
    """
    return qwk is not None and qwk > best_qwk


def learning_rate(step: int, peak: float, warmup_steps: int, hold_steps: int, total_steps: int | None) -> float:
    """The schedule: linear warm-up from peak/25, the peak held to ``hold_steps``, then cosine decay to 1% of it.

    The CPU trainer holds nothing (``hold_steps = warmup_steps``); the GPU trainer holds
    the peak until its epoch count is fixed, and passes ``total_steps=None`` until then.

    >>> learning_rate(0, 1.0, 10, 20, 100), learning_rate(15, 1.0, 10, 20, 100), learning_rate(100, 1.0, 10, 20, 100)
    (0.04, 1.0, 0.01)
    """
    if step < warmup_steps:
        start = peak * WARMUP_START
        return start + (peak - start) * step / warmup_steps
    if total_steps is None or step < hold_steps:
        return peak
    progress = min(1.0, (step - hold_steps) / max(1, total_steps - hold_steps))
    return peak * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress)))


_schedule_class: type | None = None


def keras_schedule(peak: float, warmup_steps: int, hold_steps: int, total_steps: int):
    """:func:`learning_rate` as a Keras schedule (saved with the optimizer, so a resumed run continues it)."""
    return schedule_class()(peak, warmup_steps, hold_steps, total_steps)


def schedule_class() -> type:
    """The Keras ``LearningRateSchedule`` class of :func:`learning_rate`, registered for loading a checkpoint."""
    global _schedule_class
    if _schedule_class is not None:
        return _schedule_class
    from kneepipe.runtime import import_keras

    keras = import_keras()
    base: Any = keras.optimizers.schedules.LearningRateSchedule

    @keras.saving.register_keras_serializable(package="kneepipe")
    class RecipeSchedule(base):
        def __init__(self, peak: float, warmup_steps: int, hold_steps: int, total_steps: int):
            self.peak, self.warmup_steps = float(peak), int(warmup_steps)
            self.hold_steps, self.total_steps = int(hold_steps), int(total_steps)

        def __call__(self, step):
            ops = keras.ops
            step = ops.cast(step, "float32")
            start = self.peak * WARMUP_START
            warm = start + (self.peak - start) * step / max(1, self.warmup_steps)
            progress = ops.clip((step - self.hold_steps) / max(1, self.total_steps - self.hold_steps), 0.0, 1.0)
            decay = self.peak * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + ops.cos(math.pi * progress)))
            return ops.where(step < self.warmup_steps, warm, ops.where(step < self.hold_steps, self.peak, decay))

        def get_config(self) -> dict[str, Any]:
            return {
                "peak": self.peak,
                "warmup_steps": self.warmup_steps,
                "hold_steps": self.hold_steps,
                "total_steps": self.total_steps,
            }

    _schedule_class = RecipeSchedule
    return RecipeSchedule


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``name`` for a training run, and restored after it.

    The policy is global state: a run that left ``mixed_bfloat16`` behind would change
    how a grader loaded later in the same process computes.
    """
    from kneepipe.runtime import import_keras

    keras = import_keras()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
