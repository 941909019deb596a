"""The shipped compiled detectors (OpenVINO, ONNX) find the joints of the PyTorch weights they were made from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kneepipe.config import load_config
from kneepipe.detect.compiled import compiled_paths, find_compiled
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.evaluate import box_iou
from kneepipe.detect.predict import DEFAULT_WEIGHTS, JointDetector
from kneepipe.imaging import list_inputs, read_radiograph


@pytest.mark.slow
@pytest.mark.parametrize(
    "runtime, name", [("openvino", "openvino (detector_openvino_model)"), ("onnx", "onnx (detector.onnx)")]
)
def test_the_compiled_detector_boxes_match_pytorch_on_the_shared_radiographs(radiographs_dir, runtime, name):
    radiographs = [read_radiograph(path) for path in list_inputs(radiographs_dir).files]
    torch_detector = JointDetector.load(load_config(DetectConfig, overrides={"runtime": "torch"}))
    compiled_detector = JointDetector.load(load_config(DetectConfig, overrides={"runtime": runtime}))
    assert torch_detector.runtime == "torch" and compiled_detector.runtime == name
    found = 0
    detections = zip(torch_detector.detect(radiographs), compiled_detector.detect(radiographs), strict=True)
    for reference, compiled in detections:
        assert compiled.status == reference.status, reference.image
        assert [j.side for j in compiled.joints] == [j.side for j in reference.joints], reference.image
        for a, b in zip(reference.joints, compiled.joints, strict=True):
            assert box_iou(a.box, b.box) >= 0.95, (reference.image, a.box, b.box)
            assert abs(a.confidence - b.confidence) < 0.02
            found += 1
    assert found >= 20  # the bilateral and single AP films of the folder


@pytest.mark.parametrize("fmt", ["openvino", "onnx"])
def test_a_compiled_detector_is_used_only_for_the_weights_it_was_made_from(tmp_path, fmt):
    model_path, record_path = compiled_paths(DEFAULT_WEIGHTS, fmt)
    assert find_compiled(DEFAULT_WEIGHTS, fmt, 416) == (model_path, "")
    files = sorted(model_path.iterdir()) if model_path.is_dir() else [model_path]
    assert sum(path.stat().st_size for path in files) < 60e6
    weights = tmp_path / DEFAULT_WEIGHTS.name
    shutil.copy(DEFAULT_WEIGHTS, weights)
    shutil.copy(record_path, tmp_path / record_path.name)
    copy = tmp_path / model_path.name
    (shutil.copytree if model_path.is_dir() else shutil.copy)(model_path, copy)
    if fmt == "openvino":
        assert "traced at imgsz 416" in find_compiled(weights, fmt, 640)[1]
    damaged = max(sorted(copy.iterdir()) if copy.is_dir() else [copy], key=lambda path: path.stat().st_size)
    with open(damaged, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02")
    assert find_compiled(weights, fmt)[0] is None and "checksum" in find_compiled(weights, fmt)[1]
    (shutil.rmtree if copy.is_dir() else Path.unlink)(copy)
    why = find_compiled(weights, fmt)[1]
    assert find_compiled(weights, fmt)[0] is None and f"kneepipe export detector --format {fmt}" in why
