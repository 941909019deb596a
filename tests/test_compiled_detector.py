"""The shipped ONNX detector finds the joints of the PyTorch weights it was made from, on real radiographs."""

from __future__ import annotations

import shutil

import pytest

from kneepipe.config import load_config
from kneepipe.detect.compiled import compiled_paths, find_compiled
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.evaluate import box_iou
from kneepipe.detect.predict import DEFAULT_WEIGHTS, JointDetector
from kneepipe.imaging import list_inputs, read_radiograph


@pytest.mark.slow
def test_the_onnx_detector_boxes_match_pytorch_on_the_shared_radiographs(radiographs_dir):
    radiographs = [read_radiograph(path) for path in list_inputs(radiographs_dir).files]
    torch_detector = JointDetector.load(load_config(DetectConfig, overrides={"runtime": "torch"}))
    onnx_detector = JointDetector.load(load_config(DetectConfig, overrides={"runtime": "onnx"}))
    assert torch_detector.runtime == "torch" and onnx_detector.runtime == "onnx (detector.onnx)"
    found = 0
    for reference, compiled in zip(torch_detector.detect(radiographs), onnx_detector.detect(radiographs), strict=True):
        assert compiled.status == reference.status, reference.image
        assert [j.side for j in compiled.joints] == [j.side for j in reference.joints], reference.image
        for a, b in zip(reference.joints, compiled.joints, strict=True):
            assert box_iou(a.box, b.box) >= 0.95, (reference.image, a.box, b.box)
            assert abs(a.confidence - b.confidence) < 0.02
            found += 1
    assert found >= 20  # the bilateral and single AP films of the folder


def test_a_compiled_detector_is_used_only_for_the_weights_it_was_made_from(tmp_path):
    onnx_path, record_path = compiled_paths(DEFAULT_WEIGHTS)
    assert find_compiled(DEFAULT_WEIGHTS) == (onnx_path, "")
    assert onnx_path.stat().st_size < 60e6
    weights = tmp_path / DEFAULT_WEIGHTS.name
    for path in (DEFAULT_WEIGHTS, onnx_path, record_path):
        shutil.copy(path, tmp_path / path.name)
    with open(tmp_path / onnx_path.name, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02")
    assert find_compiled(weights)[0] is None and "checksum" in find_compiled(weights)[1]
    (tmp_path / onnx_path.name).unlink()
    assert find_compiled(weights)[0] is None and "kneepipe export detector" in find_compiled(weights)[1]
