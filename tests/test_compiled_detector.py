"""The shipped compiled detectors (OpenVINO INT8 and float32, ONNX) find the joints of the PyTorch weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kneepipe.config import load_config
from kneepipe.detect.compiled import compiled_paths, export_detector, find_compiled
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.evaluate import box_iou
from kneepipe.detect.predict import DEFAULT_WEIGHTS, JointDetector
from kneepipe.imaging import list_inputs, read_radiograph
from kneepipe.training.quantise import export_int8_detector


@pytest.fixture(scope="module")
def radiographs(radiographs_dir):
    return [read_radiograph(path) for path in list_inputs(radiographs_dir).files]


@pytest.fixture(scope="module")
def pytorch_detections(radiographs):
    detector = JointDetector.load(load_config(DetectConfig, overrides={"runtime": "torch"}))
    assert detector.runtime == "torch"
    return detector.detect(radiographs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "runtime, name, smallest_iou, mean_iou, confidence_gap",
    [
        ("openvino", "openvino (detector_openvino_model)", 0.99, 0.99, 0.02),
        ("onnx", "onnx (detector.onnx)", 0.99, 0.99, 0.02),
        # INT8 moves a box by a few of the network's input pixels: measured smallest 0.955, mean 0.984, 0.045.
        ("openvino-int8", "openvino-int8 (detector_int8_openvino_model)", 0.95, 0.97, 0.06),
    ],
)
def test_the_compiled_detector_boxes_match_pytorch_on_the_shared_radiographs(
    radiographs, pytorch_detections, runtime, name, smallest_iou, mean_iou, confidence_gap
):
    compiled_detector = JointDetector.load(load_config(DetectConfig, overrides={"runtime": runtime}))
    assert compiled_detector.runtime == name
    ious = []
    for reference, compiled in zip(pytorch_detections, compiled_detector.detect(radiographs), strict=True):
        assert compiled.status == reference.status, reference.image
        assert [j.side for j in compiled.joints] == [j.side for j in reference.joints], reference.image
        for a, b in zip(reference.joints, compiled.joints, strict=True):
            ious.append(box_iou(a.box, b.box))
            assert ious[-1] >= smallest_iou, (reference.image, a.box, b.box)
            assert abs(a.confidence - b.confidence) < confidence_gap, reference.image
    assert len(ious) >= 20  # the bilateral and single AP films of the folder
    assert np.mean(ious) >= mean_iou


def test_the_default_runtime_is_the_int8_network_and_falls_back_to_float32_without_it(tmp_path):
    assert load_config(DetectConfig).runtime == "openvino-int8"
    weights = tmp_path / DEFAULT_WEIGHTS.name
    shutil.copy(DEFAULT_WEIGHTS, weights)
    for int8 in (False, True):
        model_path, record_path = compiled_paths(DEFAULT_WEIGHTS, "openvino", int8)
        shutil.copytree(model_path, tmp_path / model_path.name)
        shutil.copy(record_path, tmp_path / record_path.name)
    config = load_config(DetectConfig, overrides={"model": str(weights)})
    assert JointDetector.load(config).runtime == "openvino-int8 (detector_int8_openvino_model)"
    shutil.rmtree(tmp_path / "detector_int8_openvino_model")
    assert JointDetector.load(config).runtime == "openvino (detector_openvino_model)"
    shutil.rmtree(tmp_path / "detector_openvino_model")
    assert JointDetector.load(config).runtime == "torch"


@pytest.mark.slow
def test_an_int8_export_is_calibrated_on_films_of_training_crops_and_finds_the_knees(
    tmp_path, oai_dir, radiographs_dir
):
    weights = tmp_path / DEFAULT_WEIGHTS.name
    shutil.copy(DEFAULT_WEIGHTS, weights)
    with pytest.raises(ValueError, match="never on val"):
        export_int8_detector(weights, oai_dir / "val", films=4)
    with pytest.raises(ValueError, match="no crops under <grade>/ folders"):
        export_int8_detector(weights, tmp_path, films=4)
    with pytest.raises(ValueError, match="INT8 is compiled for openvino only"):
        export_detector(weights, 416, "onnx", quantise=lambda exported: {})
    model_path = export_int8_detector(weights, oai_dir / "train", 416, films=6, seed=1)
    assert model_path == tmp_path / "detector_int8_openvino_model"
    record = json.loads((tmp_path / "detector.openvino-int8.json").read_text())
    assert record["precision"] == "int8" and record["imgsz"] == 416
    assert record["calibration"]["folder"] == "train" and record["calibration"]["films"] == 6
    assert "the first convolution, the activations, the head and the neck blocks" in record["calibration"]["method"]
    assert record["calibration"]["in_float32"] == [f"__module.model.{n}" for n in (15, 18, 21, 22)]
    assert "(INT8)" in (model_path / "metadata.yaml").read_text()
    # Quantised: the IR holds INT8 weights and is smaller than the float32 one beside the shipped weights.
    float_ir = compiled_paths(DEFAULT_WEIGHTS, "openvino")[0] / "detector.bin"
    assert (model_path / "detector.bin").stat().st_size < 0.75 * float_ir.stat().st_size
    detector = JointDetector.load(load_config(DetectConfig, overrides={"model": str(weights)}))
    assert detector.runtime == "openvino-int8 (detector_int8_openvino_model)"
    (found,) = detector.detect([read_radiograph(radiographs_dir / "bilateral_0.png")])
    assert found.status == "ok" and sorted(j.side for j in found.joints) == ["L", "R"]


@pytest.mark.parametrize("fmt, int8", [("openvino", False), ("onnx", False), ("openvino", True)])
def test_a_compiled_detector_is_used_only_for_the_weights_it_was_made_from(tmp_path, fmt, int8):
    model_path, record_path = compiled_paths(DEFAULT_WEIGHTS, fmt, int8)
    assert find_compiled(DEFAULT_WEIGHTS, fmt, 416, int8) == (model_path, "")
    files = sorted(model_path.iterdir()) if model_path.is_dir() else [model_path]
    assert sum(path.stat().st_size for path in files) < 60e6
    weights = tmp_path / DEFAULT_WEIGHTS.name
    shutil.copy(DEFAULT_WEIGHTS, weights)
    shutil.copy(record_path, tmp_path / record_path.name)
    copy = tmp_path / model_path.name
    (shutil.copytree if model_path.is_dir() else shutil.copy)(model_path, copy)
    if fmt == "openvino":
        assert "traced at imgsz 416" in find_compiled(weights, fmt, 640, int8)[1]
    damaged = max(sorted(copy.iterdir()) if copy.is_dir() else [copy], key=lambda path: path.stat().st_size)
    with open(damaged, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02")
    found, why = find_compiled(weights, fmt, None, int8)
    assert found is None and "checksum" in why
    (shutil.rmtree if copy.is_dir() else Path.unlink)(copy)
    why = find_compiled(weights, fmt, None, int8)[1]
    assert find_compiled(weights, fmt, None, int8)[0] is None and f"kneepipe export detector --format {fmt}" in why
    assert ("--calibration TRAIN_CROPS" in why) == int8
