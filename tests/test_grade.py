"""Stage 2: the grader's training path, its file format, and `kneepipe grade` in-process."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.cli_common import EXIT_FILE_ERRORS
from kneepipe.config import load_config
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.model import Preprocessing, read_preprocessing
from kneepipe.training import grader as train_module

pytestmark = pytest.mark.slow

TINY = {
    "epochs": 2,
    "sizes": [71, 80],
    "size_epochs": [1],
    "train_batch": 8,
    "max_train_images": 16,
    "max_val_images": 10,
    "lr": 0.001,
    "warmup_epochs": 0.0,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, oai_dir):
    """A 2-epoch grader run on 16 real crops, interrupted in its second epoch, then resumed."""
    run_dir = tmp_path_factory.mktemp("grader-run")
    config = load_config(GradeConfig, overrides={**TINY, "data": str(oai_dir)})
    real_batches = train_module._batches

    def killed_in_epoch_two(*args, **kwargs):
        if args[4] == 1:  # the 0-based epoch argument
            raise KeyboardInterrupt("simulated kill")
        return real_batches(*args, **kwargs)

    train_module._batches = killed_in_epoch_two
    try:
        with pytest.raises(KeyboardInterrupt):
            train_module.train_grader(config, run_dir)
    finally:
        train_module._batches = real_batches
    after_kill = json.loads((run_dir / "state.json").read_text())
    best = train_module.train_grader(config, run_dir)  # the same command again resumes
    return run_dir, config, after_kill, best


def test_training_resumes_after_a_kill(tiny_run):
    run_dir, _, after_kill, best = tiny_run
    assert after_kill["epochs_done"] == 1
    with open(run_dir / "metrics.csv") as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle)]
    assert epochs == [1, 2]  # epoch 1 not repeated, epoch 2 not lost
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "after epoch 1" in log
    checkpoint = json.loads((run_dir / "state.json").read_text())["checkpoint"]
    assert checkpoint == "epoch-002.keras" and not (run_dir / "epoch-001.keras").exists()
    for name in ("args.yaml", checkpoint, "best.npz", "last.npz", "state.json"):
        assert (run_dir / name).exists(), name
    assert best["epoch"] in (1, 2)
    # last.npz is the final epoch's grader file, whichever epoch was best.
    assert read_preprocessing(run_dir / "last.npz").extra["epoch"] == 2


def test_preprocessing_is_read_from_the_saved_model(tiny_run, tmp_path):
    from kneepipe.grade.predict import Grader

    run_dir, _, _, _ = tiny_run
    stored = read_preprocessing(run_dir / "best.npz")
    assert stored.input_size in (71, 80) and stored.head == "softmax"
    assert sum(stored.train_prior) == pytest.approx(1.0)
    grader = Grader.load(run_dir / "best.npz")
    # A 300x300 crop is brought to the framing size, then to the stored input size.
    x = grader.prepare([np.zeros((300, 300), np.uint8), np.zeros((224, 224), np.uint8)])
    assert x.shape == (2, stored.input_size, stored.input_size, 3)
    p = grader.predict_proba(np.zeros((3, 224, 224), np.uint8))
    assert p.shape == (3, 5) and np.allclose(p.sum(axis=1), 1.0)


def test_preprocessing_round_trips_through_json():
    record = Preprocessing(input_size=160, head="corn", temperature=1.3, train_prior=(0.4, 0.2, 0.2, 0.15, 0.05))
    assert Preprocessing.from_json(record.to_json()) == record


def test_grade_cli_writes_outputs_and_exact_metrics(tiny_run, oai_dir, tmp_path):
    run_dir, _, _, _ = tiny_run
    crops = tmp_path / "crops"
    for grade in (0, 2, 4):
        (crops / str(grade)).mkdir(parents=True)
        for source in sorted((oai_dir / "val" / str(grade)).glob("*.png"))[:3]:
            shutil.copy(source, crops / str(grade) / source.name)
    (crops / "2" / "broken.png").write_text("this is not an image")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["grade", str(crops), "--out", str(out), "--model", str(run_dir / "best.npz")])
    assert result.exit_code == EXIT_FILE_ERRORS, result.output
    with open(out / "grades.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["crop", "kl_grade", "p0", "p1", "p2", "p3", "p4", "status", "message"]
    assert len(rows) == 10
    broken = [r for r in rows if r["crop"].endswith("broken.png")]
    assert broken[0]["status"] == "error" and "broken.png" not in broken[0]["message"] and broken[0]["message"]
    graded = [r for r in rows if r["status"] == "ok"]
    # Recompute the confusion matrix by hand from grades.csv and the folder names.
    matrix = np.zeros((5, 5), int)
    for row in graded:
        matrix[int(Path(row["crop"]).parent.name), int(row["kl_grade"])] += 1
        assert sum(float(row[f"p{g}"]) for g in range(5)) == pytest.approx(1.0, abs=1e-3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["confusion_matrix"] == matrix.tolist()
    assert metrics["n"] == 9 and metrics["true_counts"] == [3, 0, 3, 0, 3]
    assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / 9, abs=1e-4)
    assert (out / "args.yaml").exists()
    assert "true vs predicted grade counts" in result.output


def test_grade_cli_rejects_a_bad_config_value(tmp_path):
    result = CliRunner().invoke(app, ["grade", str(tmp_path), "--out", str(tmp_path / "o"), "batch=0"])
    assert result.exit_code == 2
    assert "batch" in result.output


def test_train_average_writes_the_weight_mean_and_calibrates_it(tiny_run, oai_dir, tmp_path):
    run_dir, _, _, _ = tiny_run
    first = run_dir / "best.npz"
    # A second grader of the same architecture: the classification layer (the last two arrays) moved by +0.5.
    with np.load(first, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    head = sorted(k for k in arrays if k != "kneepipe")[-2:]
    moved = {k: (v.astype(np.float32) + 0.5).astype(np.float16) if k in head else v for k, v in arrays.items()}
    second = tmp_path / "moved.npz"
    np.savez_compressed(second, **moved)
    out = tmp_path / "soup.npz"
    config = tmp_path / "grade.yaml"
    config.write_text(f"max_val_images: {TINY['max_val_images']}\n")
    result = CliRunner().invoke(
        app,
        [
            "train",
            "average",
            str(first),
            str(second),
            "--out",
            str(out),
            "--data",
            str(oai_dir),
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as archive:
        for key, value in arrays.items():
            if key != "kneepipe":
                expected = (value.astype(np.float32) + moved[key].astype(np.float32)) / 2
                np.testing.assert_allclose(archive[key].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    record, source = read_preprocessing(out), read_preprocessing(first)
    assert record.input_size == source.input_size and record.train_prior == source.train_prior
    assert [name.split("@")[0] for name in record.extra["average_of"]] == ["best.npz", "moved.npz"]
    assert record.temperature != 1.0  # calibrated again on val after averaging


def test_train_average_refuses_a_file_that_is_not_a_grader(tiny_run, tmp_path):
    run_dir, _, _, _ = tiny_run
    other = tmp_path / "other.npz"
    np.savez(other, w0000=np.zeros(3))
    result = CliRunner().invoke(
        app, ["train", "average", str(run_dir / "best.npz"), str(other), "--out", str(tmp_path / "soup.npz")]
    )
    assert result.exit_code != 0
    assert "other.npz: not a kneepipe grader file" in " ".join(result.output.split())
    assert not (tmp_path / "soup.npz").exists()


def _augmented(crop: np.ndarray, **overrides) -> np.ndarray:
    from kneepipe.training.augment import AugmentationRecipe, albumentations_pipeline

    off = {"hflip": 0.0, "rotate": 0.0, "scale": 0.0, "shift": 0.0, "brightness_contrast": 0.0, "gamma": 0.0}
    off |= {"clahe": 0.0, "noise": 0.0, "sharpen": 0.0, "blur": 0.0, "tight_crop": 0.0}
    recipe = AugmentationRecipe.from_config(load_config(GradeConfig, overrides={**off, **overrides}))
    augment = albumentations_pipeline(recipe, crop.shape[0])
    augment.set_random_seed(0)
    return augment(image=crop)["image"]


def test_site_augmentations_change_framing_and_sharpness_of_real_crops(oai_dir):
    import cv2

    crop = cv2.imread(str(sorted((oai_dir / "val" / "2").glob("*.png"))[0]), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(_augmented(crop), crop)  # everything off: the crop as it is

    def detail(image):
        return cv2.Laplacian(image.astype(np.float32), cv2.CV_32F).var()

    assert detail(_augmented(crop, sharpen=1.0)) > 1.02 * detail(crop)
    assert detail(_augmented(crop, blur=1.0)) < 0.9 * detail(crop)
    # A tight, wide band stretched to the square: the same size, the joint space drawn taller.
    tight = _augmented(crop, tight_crop=1.0)
    assert tight.shape == crop.shape and not np.array_equal(tight, crop)
