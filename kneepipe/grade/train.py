"""Training the Xception KL grader on a CPU budget: in-memory crops, mixed bfloat16,
progressive resizing, warm-up + cosine schedule, selection on val QWK, resumable.

The run folder holds ``args.yaml``, ``train.log``, ``metrics.csv`` (one line per
epoch), ``last.keras`` (model + optimizer, for resuming) with ``state.json``, and
``best.npz`` (the grader file of the best val QWK so far) and ``last.npz`` (that of the
latest epoch, uncalibrated). A run killed at any point
resumes from its last completed epoch with the same command.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kneepipe.config import save_config
from kneepipe.files import write_atomic
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.data import (
    CropSet,
    class_weights,
    labelled_files,
    load_crops,
    network_input,
    radiograph_augmentation,
    resize_all,
    split_files,
    stratified_subset,
)
from kneepipe.grade.model import (
    Preprocessing,
    build_grader,
    corn_loss,
    load_grader,
    probabilities_from_logits,
    save_grader,
)
from kneepipe.metrics import grading_metrics
from kneepipe.runtime import import_keras

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


def default_data_root() -> Path:
    """``../shared/data/oai-kl224`` beside the project checkout."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "oai-kl224"


def load_training_data(config: GradeConfig) -> tuple[CropSet, CropSet]:
    """Decode the train and val crops named by the config (folders or a split CSV)."""
    if config.split_csv:
        train_files, val_files = split_files(config.split_csv, "train"), split_files(config.split_csv, "val")
    else:
        root = Path(config.data) if config.data else default_data_root()
        train_files, val_files = labelled_files(root / "train"), labelled_files(root / "val")
    if not train_files[0] or not val_files[0]:
        raise FileNotFoundError("no labelled crops found: expected train/<grade>/ and val/<grade>/ folders")
    keep_train = stratified_subset(train_files[1], config.max_train_images, config.seed)
    keep_val = stratified_subset(val_files[1], config.max_val_images, config.seed)
    train = load_crops([train_files[0][i] for i in keep_train], [train_files[1][i] for i in keep_train])
    val = load_crops([val_files[0][i] for i in keep_val], [val_files[1][i] for i in keep_val])
    return train, val


class RunLog:
    """Appends timestamped lines to the run's ``train.log`` and echoes them."""

    def __init__(self, folder: Path):
        self.path = folder / "train.log"

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")


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


def _batches(crops: np.ndarray, grades: np.ndarray, weights: np.ndarray, config: GradeConfig, epoch: int, head: str):
    """Endless augmented batches for one epoch (a fresh, seeded order per epoch)."""
    augment = radiograph_augmentation(config, crops.shape[1])
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(crops))
    steps = max(1, len(crops) // config.train_batch)
    augment.set_random_seed(config.seed * 1000 + epoch)
    while True:
        for step in range(steps):
            index = order[step * config.train_batch : (step + 1) * config.train_batch]
            if len(index) < config.train_batch:  # fewer crops than a batch: sample with replacement
                index = rng.choice(len(crops), size=config.train_batch)
            images = np.stack([augment(image=crops[i])["image"] for i in index])
            x = network_input(images)
            y = grades[index]
            target = np.eye(5, dtype=np.float32)[y] if head == "softmax" else y.astype(np.int32)
            yield x, target, weights[y].astype(np.float32)


def _throughput_callback(log: RunLog, batch_size: int, every: int = 25):
    """Logs images/s every ``every`` batches, so a background run shows its pace in train.log."""
    keras = import_keras()

    class ThroughputLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.time()

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % every == 0:
                rate = (batch + 1) * batch_size / (time.time() - self.start)
                log(f"  batch {batch + 1}: loss {logs.get('loss', float('nan')):.4f}, {rate:.1f} images/s")

    return ThroughputLog()


def _compile(model, config: GradeConfig, steps_per_epoch: int):
    keras = import_keras()
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.lr / 25,
        decay_steps=max(1, total - warmup),
        alpha=0.01,
        warmup_target=config.lr,
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    if config.head == "softmax":
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
    else:
        loss = corn_loss
    model.compile(optimizer=optimizer, loss=loss)
    return model


def predict_logits(model, crops: np.ndarray, size: int, batch: int = 64) -> np.ndarray:
    """Network outputs for uint8 crops resized to ``size``."""
    x = network_input(resize_all(crops, size))
    return np.asarray(model.predict(x, batch_size=batch, verbose=0), dtype=np.float32)


def train_grader(config: GradeConfig, run_dir: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train (or resume training) a grader into ``run_dir``; returns the best epoch's record.

    >>> from kneepipe.config import load_config
    >>> cfg = load_config(GradeConfig, overrides={"epochs": 1, "max_train_images": 20})  # doctest: +SKIP
    >>> train_grader(cfg, "runs/grader-smoke")["val_qwk"]  # doctest: +SKIP
    """
    keras = import_keras()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir)
    state_path, last_path = run_dir / "state.json", run_dir / "last.keras"
    state = json.loads(state_path.read_text()) if resume and state_path.exists() and last_path.exists() else None
    if state is None and (run_dir / "metrics.csv").exists():
        raise FileExistsError(f"{run_dir} already holds a run; resume it or choose another folder")
    save_config(config, run_dir, extra={"resumed_from_epoch": state["epochs_done"] if state else 0})

    keras.utils.set_random_seed(config.seed)
    keras.config.set_dtype_policy(config.train_precision)
    started = time.time()
    train, val = load_training_data(config)
    log(
        f"data: {len(train.crops)} train crops {np.bincount(train.kl_grades, minlength=5).tolist()}, "
        f"{len(val.crops)} val crops {np.bincount(val.kl_grades, minlength=5).tolist()} "
        f"(decoded in {time.time() - started:.0f} s)"
    )
    weights = class_weights(train.kl_grades, config.class_weighting)
    train_prior = np.bincount(train.kl_grades, minlength=5) / len(train.kl_grades)
    log(f"class weights ({config.class_weighting}): {np.round(weights, 3).tolist()}")
    steps = max(1, len(train.crops) // config.train_batch)

    if state:
        model = keras.saving.load_model(last_path, custom_objects={"corn_loss": corn_loss})
        log(f"resumed from {last_path} after epoch {state['epochs_done']} (best val QWK {state['best_qwk']})")
    else:
        weights_arg = None if config.weights in (None, "none") else config.weights
        model = build_grader(config.head, config.dropout, weights_arg)
        if config.init:
            initial, _ = load_grader(config.init)
            model.set_weights(initial.get_weights())
            log(f"initialised from {config.init}")
        model = _compile(model, config, steps)
        state = {"epochs_done": 0, "best_qwk": -1.0, "best_epoch": None, "wall_seconds": 0.0}
        with open(run_dir / "metrics.csv", "w", newline="") as handle:
            csv.writer(handle).writerow(METRIC_COLUMNS)

    resized: dict[int, np.ndarray] = {}
    verbose = 1 if sys.stdout.isatty() else 2
    best_record: dict[str, Any] = {}
    for epoch in range(state["epochs_done"], config.epochs):
        size = config.size_for_epoch(epoch)
        if size not in resized:
            resized = {size: resize_all(train.crops, size)}  # keep one phase's copy in memory
        epoch_start = time.time()
        history = model.fit(
            _batches(resized[size], train.kl_grades, weights, config, epoch, config.head),
            steps_per_epoch=steps,
            epochs=1,
            verbose=verbose,
            callbacks=[] if verbose == 1 else [_throughput_callback(log, config.train_batch)],
        )
        logits = predict_logits(model, val.crops, size)
        probabilities = probabilities_from_logits(logits, config.head)
        metrics = grading_metrics(val.kl_grades, probabilities)
        seconds = time.time() - epoch_start
        lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        record = epoch_record(epoch + 1, size, lr, float(history.history["loss"][-1]), metrics, seconds)
        append_epoch(run_dir, record)
        log(
            f"epoch {epoch + 1}/{config.epochs} size {size}: loss {record['train_loss']} "
            f"val acc {metrics['accuracy']} QWK {metrics['qwk']} MAE {metrics['mae']} "
            f"predicted {metrics['predicted_counts']} true {metrics['true_counts']} ({seconds:.0f} s)"
        )
        preprocessing = Preprocessing(
            input_size=size,
            head=config.head,
            train_prior=tuple(float(p) for p in train_prior),
            extra={"epoch": epoch + 1, "val_qwk": metrics["qwk"], "val_accuracy": metrics["accuracy"]},
        )
        # The latest epoch as a grader file too: an ingredient for `kneepipe train average`.
        save_grader(model, preprocessing, run_dir / "last.npz")
        if metrics["qwk"] is not None and metrics["qwk"] > state["best_qwk"]:
            write_atomic(run_dir / "best.npz", (run_dir / "last.npz").read_bytes())
            state.update(best_qwk=metrics["qwk"], best_epoch=epoch + 1)
            log(f"new best val QWK {metrics['qwk']} -> {run_dir / 'best.npz'}")
        tmp = run_dir / "last.tmp.keras"
        model.save(tmp)
        os.replace(tmp, last_path)
        state.update(epochs_done=epoch + 1, wall_seconds=round(state["wall_seconds"] + seconds, 1))
        state_tmp = state_path.with_suffix(".tmp")
        state_tmp.write_text(json.dumps(state, indent=2))
        os.replace(state_tmp, state_path)
        if state["best_epoch"] == epoch + 1:
            best_record = record
    log(
        f"done: best val QWK {state['best_qwk']} at epoch {state['best_epoch']}, "
        f"{state['wall_seconds'] / 60:.1f} min of training"
    )
    return best_record or {"val_qwk": state["best_qwk"], "epoch": state["best_epoch"]}
