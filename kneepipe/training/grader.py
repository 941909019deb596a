"""Training the Xception KL grader on a CPU budget: in-memory crops, mixed bfloat16,
progressive resizing, warm-up + cosine schedule, selection on val QWK, resumable.

The recipe (data, schedule, augmentation, run folder, grader record) is the one
:mod:`kneepipe.training.recipe` shares with the GPU trainer; this module feeds it to
Keras' ``model.fit`` with albumentations in a Python generator.

The run folder holds ``args.yaml``, ``train.log``, ``metrics.csv`` (one line per
epoch), ``epoch-NNN.keras`` (model + optimizer of the last completed epoch, for
resuming) with ``state.json``, and
``best.npz`` (the grader file of the best val QWK so far) and ``last.npz`` (that of the
latest epoch, uncalibrated). A run killed at any point resumes from its last completed
epoch with the same command: ``state.json`` is written last, naming the checkpoint it
belongs to, so the weights and the state never come from two different epochs, and
``metrics.csv`` is cut back to that epoch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kneepipe.config import save_config
from kneepipe.files import write_atomic
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.data import class_weights, network_input, resize_all
from kneepipe.grade.model import build_grader, corn_loss, probabilities_from_logits, save_grader
from kneepipe.metrics import grading_metrics
from kneepipe.runtime import import_keras
from kneepipe.training.augment import AugmentationRecipe, albumentations_pipeline
from kneepipe.training.recipe import (
    METRIC_COLUMNS,
    RunLog,
    append_epoch,
    architecture_args,
    best_so_far,
    epoch_record,
    grader_record,
    initial_weights,
    keep_epochs,
    keras_schedule,
    load_crop_sets,
    precision_policy,
    schedule_class,
    start_run,
    training_prior,
)

CHECKPOINT = "epoch-{epoch:03d}.keras"  # model + optimizer of an epoch, for resuming


def _batches(crops: np.ndarray, grades: np.ndarray, weights: np.ndarray, config: GradeConfig, epoch: int, head: str):
    """Endless augmented batches for one epoch (a fresh, seeded order per epoch)."""
    augment = albumentations_pipeline(AugmentationRecipe.from_config(config), crops.shape[1])
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
    base: Any = keras.callbacks.Callback

    class ThroughputLog(base):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.time()

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % every == 0:
                rate = (batch + 1) * batch_size / (time.time() - self.start)
                log(f"  batch {batch + 1}: loss {logs.get('loss', float('nan')):.4f}, {rate:.1f} images/s")

    return ThroughputLog()


def _compile(model, config: GradeConfig, steps_per_epoch: int):
    keras = import_keras()
    warmup = int(config.warmup_epochs * steps_per_epoch)
    schedule = keras_schedule(config.lr, warmup, warmup, config.epochs * steps_per_epoch)
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
    if not (config.data or config.split_csv):
        raise FileNotFoundError("no training data: set data (a folder with train/ and val/) or split_csv")
    run_dir = Path(run_dir)
    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text()) if resume and state_path.exists() else None
    checkpoint = run_dir / state.get("checkpoint", "last.keras") if state else None  # last.keras: older runs
    if checkpoint is not None and not checkpoint.exists():
        state = checkpoint = None
    log = start_run(run_dir, resuming=state is not None)
    save_config(config, run_dir, extra={"resumed_from_epoch": state["epochs_done"] if state else 0})
    with precision_policy(config.train_precision):
        return _train(config, run_dir, state, checkpoint, log)


def _train(config: GradeConfig, run_dir: Path, state: dict | None, checkpoint: Path | None, log: RunLog) -> dict:
    keras = import_keras()
    state_path = run_dir / "state.json"
    keras.utils.set_random_seed(config.seed)
    started = time.time()
    train, val = load_crop_sets(config)
    log(
        f"data: {len(train.crops)} train crops {np.bincount(train.kl_grades, minlength=5).tolist()}, "
        f"{len(val.crops)} val crops {np.bincount(val.kl_grades, minlength=5).tolist()} "
        f"(decoded in {time.time() - started:.0f} s)"
    )
    weights = class_weights(train.kl_grades, config.class_weighting)
    train_prior = training_prior(train.kl_grades)
    log(f"class weights ({config.class_weighting}): {np.round(weights, 3).tolist()}")
    steps = max(1, len(train.crops) // config.train_batch)

    if state and checkpoint:
        schedule_class()  # registered before the optimizer's schedule is read back
        model = keras.saving.load_model(checkpoint, custom_objects={"corn_loss": corn_loss})
        keep_epochs(run_dir, state["epochs_done"])
        log(f"resumed from {checkpoint} after epoch {state['epochs_done']} (best val QWK {state['best_qwk']})")
    else:
        weights_arg = None if config.weights in (None, "none") else config.weights
        model = build_grader(config.head, config.dropout, weights_arg, architecture_args=architecture_args(config))
        initial = initial_weights(config)
        if initial is not None:
            model.set_weights(initial)
            log(f"initialised from {config.init}")
        model = _compile(model, config, steps)
        state = {"epochs_done": 0, "best_qwk": -1.0, "best_epoch": None, "wall_seconds": 0.0}
        write_atomic(run_dir / "metrics.csv", ",".join(METRIC_COLUMNS) + "\n")  # the folder holds a run now

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
        preprocessing = grader_record(
            size,
            config,
            train_prior,
            {"epoch": epoch + 1, "val_qwk": metrics["qwk"], "val_accuracy": metrics["accuracy"]},
        )
        # The latest epoch as a grader file too: an ingredient for `kneepipe train average`.
        save_grader(model, preprocessing, run_dir / "last.npz")
        if best_so_far(metrics["qwk"], state["best_qwk"]):
            write_atomic(run_dir / "best.npz", (run_dir / "last.npz").read_bytes())
            state.update(best_qwk=metrics["qwk"], best_epoch=epoch + 1)
            log(f"new best val QWK {metrics['qwk']} -> {run_dir / 'best.npz'}")
        # Each epoch's checkpoint gets its own name, and state.json, written last, names it:
        # a kill in between resumes from the earlier pair, never from mismatched halves.
        previous = state.get("checkpoint")
        name = CHECKPOINT.format(epoch=epoch + 1)
        model.save(run_dir / name)
        state.update(epochs_done=epoch + 1, wall_seconds=round(state["wall_seconds"] + seconds, 1), checkpoint=name)
        write_atomic(state_path, json.dumps(state, indent=2), fsync=True)
        if previous and previous != name:
            (run_dir / previous).unlink(missing_ok=True)
        if state["best_epoch"] == epoch + 1:
            best_record = record
    log(
        f"done: best val QWK {state['best_qwk']} at epoch {state['best_epoch']}, "
        f"{state['wall_seconds'] / 60:.1f} min of training"
    )
    return best_record or {"val_qwk": state["best_qwk"], "epoch": state["best_epoch"]}
