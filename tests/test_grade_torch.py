"""The GPU trainer (Keras on torch): crop packs, on-device augmentation, and a short run on the CPU."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.config import load_config
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.model import read_preprocessing
from kneepipe.training.augment import AugmentationRecipe
from kneepipe.training.augment import augment_batch as augment_with_recipe
from kneepipe.training.grader_torch import pack_crops, read_pack
from kneepipe.training.recipe import learning_rate

REPO = Path(__file__).resolve().parents[1]
KNEEPIPE = [sys.executable, "-c", "from kneepipe.cli import app; app()"]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory, oai_dir):
    """Three real crops of each grade in train/ and two in val/, in the labelled-crop layout."""
    root = tmp_path_factory.mktemp("crops")
    for part, per_grade in (("train", 3), ("val", 2)):
        for grade in range(5):
            folder = root / part / str(grade)
            folder.mkdir(parents=True)
            for path in sorted((oai_dir / part / str(grade)).iterdir())[:per_grade]:
                shutil.copy(path, folder / path.name)
    return root


def test_a_lossless_pack_holds_the_crops_exactly(small_root, tmp_path):
    counts = pack_crops(small_root, tmp_path / "pack.npz")
    assert counts == {"train": 15, "val": 10}
    for part in ("train", "val"):
        paths, grades = labelled_files(small_root / part)
        crops, packed_grades = read_pack(tmp_path / "pack.npz", part)
        np.testing.assert_array_equal(crops, load_crops(paths, grades).crops)
        np.testing.assert_array_equal(packed_grades, grades)


def test_a_jpeg_pack_is_smaller_and_close(small_root, tmp_path):
    pack_crops(small_root, tmp_path / "png.npz")
    pack_crops(small_root, tmp_path / "jpeg.npz", quality=65)
    assert (tmp_path / "jpeg.npz").stat().st_size < 0.5 * (tmp_path / "png.npz").stat().st_size
    exact, _ = read_pack(tmp_path / "png.npz", "train")
    lossy, _ = read_pack(tmp_path / "jpeg.npz", "train")
    assert 0 < np.abs(exact.astype(int) - lossy).mean() < 3  # grey levels


def _config(**overrides):
    return load_config(GradeConfig, overrides=overrides)


def augment_batch(crops, config, generator):
    return augment_with_recipe(crops, AugmentationRecipe.from_config(config), generator)


def test_augmentation_off_is_the_identity_and_flip_mirrors(small_root, tmp_path):
    pack_crops(small_root, tmp_path / "pack.npz")
    crops = torch.from_numpy(read_pack(tmp_path / "pack.npz", "train")[0][:6]).float()
    off = dict(rotate=0.0, scale=0.0, shift=0.0, brightness_contrast=0.0, gamma=0.0, noise=0.0)
    generator = torch.Generator().manual_seed(0)
    same = augment_batch(crops, _config(hflip=0.0, **off), generator)
    torch.testing.assert_close(same, crops, atol=0.05, rtol=0)
    mirrored = augment_batch(crops, _config(hflip=1.0, **off), generator)
    torch.testing.assert_close(mirrored, crops.flip(-1), atol=0.05, rtol=0)


def test_augmentation_is_seeded_and_stays_in_range(small_root, tmp_path):
    pack_crops(small_root, tmp_path / "pack.npz")
    crops = torch.from_numpy(read_pack(tmp_path / "pack.npz", "train")[0]).float()
    config = _config(noise=1.0)
    first = augment_batch(crops, config, torch.Generator().manual_seed(3))
    again = augment_batch(crops, config, torch.Generator().manual_seed(3))
    other = augment_batch(crops, config, torch.Generator().manual_seed(4))
    torch.testing.assert_close(first, again)
    assert first.shape == crops.shape and float(first.min()) >= 0 and float(first.max()) <= 255
    assert (first - other).abs().mean() > 1 and (first - crops).abs().mean() > 1


def test_learning_rate_warms_up_holds_then_decays():
    rates = [learning_rate(step, 1e-3, 10, 30, 100) for step in range(101)]
    assert rates[0] == pytest.approx(4e-5) and rates[10] == rates[29] == 1e-3
    assert all(a >= b for a, b in zip(rates[30:], rates[31:], strict=False))
    assert rates[100] == pytest.approx(1e-5)
    assert learning_rate(500, 1e-3, 10, 30, None) == 1e-3  # epochs not fixed yet: the peak holds


@pytest.mark.slow
def test_a_short_run_on_the_cpu_writes_graders_and_keeps_the_better(small_root, tmp_path):
    pack_crops(small_root, tmp_path / "pack.npz", quality=90)
    run = tmp_path / "run"
    command = [*KNEEPIPE, "train", "grader", "--backend", "torch", "--pack", str(tmp_path / "pack.npz")]
    command += ["--out", str(run), "--minutes", "0.01", "--soup", "2", "train_batch=5", "lr=0.0001", "warmup_epochs=0"]
    environment = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # the budget is spent: the minimum of 3 epochs
    records = {name: read_preprocessing(run / f"{name}.npz") for name in ("last", "soup", "grader")}
    assert records["grader"].extra["trainer"] == "train_torch" and records["grader"].input_size == 224
    kept = "soup" if records["soup"].extra["val_qwk"] >= records["last"].extra["val_qwk"] else "last"
    assert (run / "grader.npz").read_bytes() == (run / f"{kept}.npz").read_bytes()
    assert "soup of the last 2 epochs" in (run / "train.log").read_text()


def test_the_training_command_refuses_a_backend_other_than_torch(small_root, tmp_path):
    pack_crops(small_root, tmp_path / "pack.npz")
    command = [*KNEEPIPE, "train", "grader", "--backend", "torch", "--pack", str(tmp_path / "pack.npz")]
    command += ["--out", str(tmp_path / "run"), "--minutes", "1"]
    environment = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "needs KERAS_BACKEND=torch" in result.stderr


@pytest.mark.slow
def test_train_calibrate_writes_a_calibrated_copy(small_root, tmp_path):
    source = REPO / "kneepipe" / "weights" / "grader.npz"
    out = tmp_path / "calibrated.npz"
    before = source.read_bytes()
    result = CliRunner().invoke(app, ["train", "calibrate", str(source), "--out", str(out), "--data", str(small_root)])
    assert result.exit_code == 0, result.output
    assert source.read_bytes() == before
    record = read_preprocessing(out)
    assert record.temperature != read_preprocessing(source).temperature  # refitted on the 10 val crops
    refused = CliRunner().invoke(app, ["train", "calibrate", str(source), "--out", str(source)])
    assert refused.exit_code != 0 and "not over it" in refused.output


@pytest.mark.slow
def test_the_shipped_grader_grades_the_same_on_the_torch_backend(small_root, tmp_path):
    """Weights and preprocessing live in the grader file, so the backend does not change a grade."""
    crops = small_root / "val"
    environment = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-c", "from kneepipe.cli import app; app()", "grade", str(crops)]
    command += ["--out", str(tmp_path / "torch")]
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    default = CliRunner().invoke(app, ["grade", str(crops), "--out", str(tmp_path / "tensorflow")])
    assert default.exit_code == 0, default.output

    def read(folder):
        with open(folder / "grades.csv") as handle:
            return {row["crop"]: row for row in csv.DictReader(handle)}

    on_torch, on_tensorflow = read(tmp_path / "torch"), read(tmp_path / "tensorflow")
    assert on_torch.keys() == on_tensorflow.keys() and len(on_torch) == 10
    for crop, row in on_torch.items():
        assert row["kl_grade"] == on_tensorflow[crop]["kl_grade"]
        for p in ("p0", "p1", "p2", "p3", "p4"):
            assert float(row[p]) == pytest.approx(float(on_tensorflow[crop][p]), abs=2e-3)


def test_the_training_command_names_a_bad_config_value(tmp_path):
    command = [*KNEEPIPE, "train", "grader", "--backend", "torch", "--pack", str(tmp_path / "pack.npz")]
    command += ["--out", str(tmp_path / "run"), "--minutes", "1", "lr=fast"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "lr: expected float" in result.stderr
    assert not (tmp_path / "run").exists()


def test_gpu_trainer_refuses_augmentations_it_does_not_apply(tmp_path):
    from kneepipe.training.grader_torch import train_on_gpu

    config = load_config(GradeConfig, overrides={"sharpen": 0.4, "tight_crop": 0.3})
    with pytest.raises(ValueError, match="sharpen, tight_crop: not applied"):
        train_on_gpu(config, tmp_path / "pack.npz", tmp_path / "run", minutes=1)
    assert not (tmp_path / "run").exists()
