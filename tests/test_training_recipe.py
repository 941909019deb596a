"""The grader's training recipe without training: subsetting, schedule, resume bookkeeping, precision."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from kneepipe.grade.data import labelled_files
from kneepipe.training.recipe import (
    METRIC_COLUMNS,
    append_epoch,
    keep_epochs,
    keras_schedule,
    learning_rate,
    precision_policy,
    stratified_subset,
)


@pytest.mark.parametrize("limit", [5, 10, 20, 50])
def test_a_small_subset_of_real_val_keeps_every_grade_in_proportion(oai_dir, limit):
    _, grades = labelled_files(oai_dir / "val")
    chosen = stratified_subset(grades, limit, seed=0)
    counts = np.bincount(np.asarray(grades)[chosen], minlength=5)
    assert len(chosen) == limit and len(set(chosen)) == limit
    assert (counts >= 1).all()  # KL4 is 27 of 826 val crops: it was dropped at limits of 10 and 20
    shares = np.bincount(grades, minlength=5) / len(grades)
    assert np.abs(counts - limit * shares).max() < 1.5


def test_subsetting_is_seeded_and_none_keeps_everything():
    grades = [0] * 30 + [1] * 10 + [4] * 2
    assert stratified_subset(grades, 8, seed=1).tolist() == stratified_subset(grades, 8, seed=1).tolist()
    assert stratified_subset(grades, None, seed=1).tolist() == list(range(42))


def test_the_keras_schedule_is_the_same_function_as_the_gpu_trainers():
    from kneepipe.runtime import import_keras

    keras = import_keras()
    schedule = keras_schedule(2e-3, warmup_steps=10, hold_steps=10, total_steps=100)
    for step in (0, 5, 10, 11, 50, 99, 100, 150):
        ours = float(keras.ops.convert_to_numpy(schedule(step)))
        assert ours == pytest.approx(learning_rate(step, 2e-3, 10, 10, 100), rel=1e-5), step
    restored = type(schedule).from_config(schedule.get_config())
    assert float(keras.ops.convert_to_numpy(restored(42))) == pytest.approx(learning_rate(42, 2e-3, 10, 10, 100))


def test_the_cpu_schedule_warms_up_then_decays_like_keras_cosine_decay():
    from kneepipe.runtime import import_keras

    keras = import_keras()
    cosine = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=1e-3 / 25, decay_steps=90, alpha=0.01, warmup_target=1e-3, warmup_steps=10
    )
    for step in (0, 3, 10, 40, 100):
        expected = float(keras.ops.convert_to_numpy(cosine(step)))
        assert learning_rate(step, 1e-3, 10, 10, 100) == pytest.approx(expected, rel=1e-5), step


def test_a_resumed_run_drops_the_rows_of_epochs_its_checkpoint_does_not_hold(tmp_path):
    record = dict.fromkeys(METRIC_COLUMNS, 0)
    for epoch in (1, 2, 3):
        append_epoch(tmp_path, {**record, "epoch": epoch})
    keep_epochs(tmp_path, 2)  # killed after epoch 3's row, before its checkpoint
    append_epoch(tmp_path, {**record, "epoch": 3})  # the epoch trained again
    with open(tmp_path / "metrics.csv", newline="") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2, 3]


def test_training_precision_is_restored_after_the_run():
    from kneepipe.runtime import import_keras

    keras = import_keras()
    before = keras.config.dtype_policy().name
    with pytest.raises(RuntimeError), precision_policy("mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        raise RuntimeError("a run that fails")
    assert keras.config.dtype_policy().name == before


TINY_RUN = {
    "epochs": 2,
    "sizes": [71],
    "size_epochs": [],
    "train_precision": "float32",
    "train_batch": 8,
    "max_train_images": 8,
    "max_val_images": 5,
    "lr": 0.001,
    "warmup_epochs": 0.0,
    "backbone_width": 0.0625,  # a tiny Xception, built by the same code as the shipped one
    "backbone_middle_blocks": 1,
}


def test_a_tiny_grader_trains_resumes_after_a_kill_and_calibrates(tmp_path, oai_dir, monkeypatch):
    """The CPU trainer's logic in seconds: the slow tier trains the full network the same way."""
    from kneepipe.config import load_config
    from kneepipe.grade.config import GradeConfig
    from kneepipe.grade.model import read_preprocessing
    from kneepipe.grade.predict import Grader
    from kneepipe.training import grader as trainer
    from kneepipe.training.calibrate import calibrate_grader

    config = load_config(GradeConfig, overrides={**TINY_RUN, "data": str(oai_dir)})
    run = tmp_path / "run"
    real_batches = trainer._batches

    def killed_in_epoch_two(*args, **kwargs):
        if args[4] == 1:  # the 0-based epoch
            raise KeyboardInterrupt("simulated kill")
        return real_batches(*args, **kwargs)

    monkeypatch.setattr(trainer, "_batches", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_grader(config, run)
    monkeypatch.setattr(trainer, "_batches", real_batches)
    trainer.train_grader(config, run)  # the same call again resumes
    with open(run / "metrics.csv", newline="") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2]
    record = read_preprocessing(run / "last.npz")
    assert record.architecture_args == {"width": 0.0625, "middle_blocks": 1} and record.input_size == 71
    assert calibrate_grader(run / "best.npz", config) > 0
    grader = Grader.load(run / "best.npz")
    assert grader.model.count_params() < 100_000 and grader.preprocessing.temperature != 1.0
