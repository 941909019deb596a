"""The grader file's record drives inference; a tiny Xception built by the same code tests it in seconds."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from tiny_graders import TINY, save_tiny_grader

from kneepipe.grade.model import Preprocessing, read_preprocessing
from kneepipe.grade.predict import DEFAULT_GRADER, Grader
from kneepipe.joints import CROP_FRAMING
from kneepipe.runtime import import_keras


@pytest.fixture(scope="module")
def tiny_grader_file(tmp_path_factory) -> Path:
    return save_tiny_grader(tmp_path_factory.mktemp("tiny") / "tiny.npz", decision="median")


@pytest.fixture(scope="module")
def real_crops(oai_dir) -> list[np.ndarray]:
    paths = [sorted((oai_dir / "val" / str(grade)).glob("*.png"))[0] for grade in range(5)]
    return [cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in paths]


def test_the_builder_at_its_defaults_is_the_published_xception():
    from kneepipe.grade.xception import xception_backbone

    keras = import_keras()
    ours = xception_backbone(3)
    published = keras.applications.Xception(include_top=False, weights=None, input_shape=(None, None, 3), pooling="avg")
    assert [w.shape for w in ours.get_weights()] == [w.shape for w in published.get_weights()]
    named = [layer.name for layer in published.layers if layer.name.startswith("block")]
    assert [layer.name for layer in ours.layers if layer.name in named] == named
    again = xception_backbone(3)  # built again in the same process: the same names
    assert [layer.name for layer in again.layers] == [layer.name for layer in ours.layers]


def test_a_tiny_grader_grades_real_crops_through_the_same_code(tiny_grader_file, real_crops):
    grader = Grader.load(tiny_grader_file)
    assert grader.preprocessing.architecture_args == TINY and grader.model.count_params() < 100_000
    graded = grader.grade_each(real_crops, batch_size=2)
    assert all(isinstance(logits, np.ndarray) and logits.shape == (5,) for logits in graded)
    probabilities = grader.probabilities(np.stack(graded))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert grader.decide(probabilities).shape == (5,)
    heat = grader.gradcam(real_crops[0], grade=2)
    assert heat.shape == real_crops[0].shape and heat.min() >= 0 and heat.max() <= 1


def test_gradcam_on_the_torch_backend_draws_the_tensorflow_map(tiny_grader_file, real_crops, tmp_path):
    """Keras picks its backend once per process, so the torch map is drawn by a child process."""
    crop = real_crops[3]
    np.save(tmp_path / "crop.npy", crop)
    draw = (
        "import sys, numpy as np; from kneepipe.grade.predict import Grader; "
        "from kneepipe.runtime import import_keras; "
        "np.save(sys.argv[3], Grader.load(sys.argv[1]).gradcam(np.load(sys.argv[2]), grade=2)); "
        "print(import_keras().backend.backend())"
    )
    command = [sys.executable, "-c", draw, str(tiny_grader_file), str(tmp_path / "crop.npy"), str(tmp_path / "cam.npy")]
    environment = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split()[-1] == "torch", result.stderr[-3000:]
    on_torch = np.load(tmp_path / "cam.npy")
    on_tensorflow = Grader.load(tiny_grader_file).gradcam(crop, grade=2)
    assert on_torch.shape == crop.shape and on_torch.min() >= 0 and on_torch.max() <= 1
    assert on_tensorflow.std() > 0 and np.corrcoef(on_torch.ravel(), on_tensorflow.ravel())[0, 1] > 0.99


def test_the_records_resize_rule_is_the_one_inference_applies(tiny_grader_file):
    grader = Grader.load(tiny_grader_file)
    small = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (160, 10))  # stripes to enlarge to 224, then 96
    area = grader.prepare([small])
    grader.preprocessing = dataclasses.replace(grader.preprocessing, resize_interpolation="cubic")
    cubic = grader.prepare([small])
    assert area.shape == cubic.shape == (1, 96, 96, 3) and not np.array_equal(area, cubic)


def test_a_record_inference_cannot_honour_is_refused(tiny_grader_file):
    record = json.loads(json.dumps(dataclasses.asdict(read_preprocessing(tiny_grader_file))))
    for key, value, words in (
        ("scaling", "x/255", "grader scaling 'x/255' is not supported"),
        ("class_names", ["none", "mild", "severe"], "kneepipe grades KL0"),
        ("resize_interpolation", "lanczos", "resize_interpolation 'lanczos'"),
        ("architecture", "resnet50", "architecture 'resnet50'"),
    ):
        with pytest.raises(ValueError, match=words):
            Preprocessing.from_json(json.dumps({"format_version": 1, **record, key: value}))


def test_the_shipped_grader_records_the_published_network_and_the_detectors_framing():
    record = read_preprocessing(DEFAULT_GRADER)
    assert record.architecture == "xception" and record.architecture_args == {}
    assert record.framing == CROP_FRAMING and record.scaling == "x/127.5-1 inside the network"


def test_a_grader_for_crops_framed_otherwise_is_refused_by_the_pipeline(tiny_grader_file):
    from kneepipe.pipeline.run import check_models

    class Detector:
        version, framing = "fake@0", CROP_FRAMING

    grader = Grader.load(tiny_grader_file)
    check_models(Detector(), grader)  # the same framing: accepted
    grader.preprocessing = dataclasses.replace(grader.preprocessing, framing="whole leg, 512 px")
    with pytest.raises(ValueError, match="expects crops framed as 'whole leg, 512 px'"):
        check_models(Detector(), grader)


@pytest.mark.slow
def test_adapt_with_batch_norm_fits_the_site_grader_on_the_whole_samples_statistics(
    tiny_grader_file, oai_dir, tmp_path
):
    """``kneepipe adapt --batch-norm``: every fold of every split re-estimates the statistics on its
    own training part; the site grader written at the end carries those of the whole sample."""
    from kneepipe.grade.adapt import AdaptSettings, Sample, adapt_grader
    from kneepipe.grade.data import fit_crop, labelled_files
    from kneepipe.grade.features import batch_norm_statistics, reestimate_batch_norm

    paths, grades = labelled_files(oai_dir / "val")
    picked = [i for g in range(5) for i in [j for j, grade in enumerate(grades) if grade == g][:20]]
    grader = Grader.load(tiny_grader_file)
    size = grader.preprocessing.crop_size
    crops = np.stack([fit_crop(cv2.imread(str(paths[i]), cv2.IMREAD_GRAYSCALE), size) for i in picked])
    sample = Sample([paths[i] for i in picked], np.array([grades[i] for i in picked]), crops)
    trained = batch_norm_statistics(grader.model)

    settings = AdaptSettings(folds=2, repeats=2, adapt_batch_norm=True, regularisation=(0.01,), bootstrap=20)
    facts = adapt_grader(grader, sample, tmp_path / "site.npz", settings)
    assert facts["method"]["batch_norm"].startswith("re-estimated")
    assert facts["cross_validation"]["splits"]["seeds"] == [0, 1]

    expected = Grader.load(tiny_grader_file)
    reestimate_batch_norm(expected.model, expected.prepare(crops), seed=0)
    site = Grader.load(tmp_path / "site.npz")
    assert site.is_site_grader
    moved = 0
    for got, want, before in zip(
        batch_norm_statistics(site.model), batch_norm_statistics(expected.model), trained, strict=True
    ):
        np.testing.assert_allclose(got[2:], want[2:], rtol=2e-3, atol=2e-3)  # moving mean and variance (float16 file)
        moved += not np.allclose(got[2:], before[2:], rtol=1e-2, atol=1e-2)
    assert moved > 0  # the sample's statistics are not the trained ones
