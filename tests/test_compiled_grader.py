"""The compiled grader: the shipped INT8 network agrees with the float32 reference; export and refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_graders import save_tiny_grader

from kneepipe.grade.compiled import CompiledFeatures, calibration_crops, compiled_paths, export_grader
from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.predict import DEFAULT_GRADER, Grader
from kneepipe.metrics import grading_metrics


@pytest.fixture(scope="module")
def val_sample(oai_dir):
    """Every 6th val crop (138 of 826, all grades): enough to see disagreement, quick on float32."""
    paths, grades = labelled_files(oai_dir / "val")
    return load_crops(paths[::6], grades[::6])


@pytest.mark.slow
def test_the_shipped_int8_grader_agrees_with_float32_on_real_val_crops(val_sample):
    reference = Grader.load(runtime="keras")
    compiled = Grader.load(runtime="openvino")
    assert compiled.compiled is not None and compiled.runtime == "openvino int8 (grader.int8.xml)"
    assert compiled.compiled.record["calibration"]["folder"] == "train"
    float32 = reference.probabilities(reference.predict_logits(val_sample.crops))
    int8 = compiled.probabilities(compiled.predict_logits(val_sample.crops))
    identical = (reference.decide(float32) == compiled.decide(int8)).mean()
    assert identical >= 0.95, f"{identical:.3f} of the grades identical"
    qwk_float32 = grading_metrics(val_sample.kl_grades, float32, reference.decide(float32))["qwk"]
    qwk_int8 = grading_metrics(val_sample.kl_grades, int8, compiled.decide(int8))["qwk"]
    assert abs(qwk_int8 - qwk_float32) <= 0.02, (qwk_float32, qwk_int8)
    # Batch-norm statistics re-estimated on a batch live in the Keras network: grading switches to it there.
    from kneepipe.grade.features import statistics_of

    with statistics_of(compiled, list(val_sample.crops[:16])):
        assert compiled._keras_only
    assert not compiled._keras_only


@pytest.fixture(scope="module")
def tiny_grader_file(tmp_path_factory) -> Path:
    return save_tiny_grader(tmp_path_factory.mktemp("tiny") / "tiny.npz", decision="argmax")


def test_export_writes_an_int8_network_the_grader_finds_and_checks(tiny_grader_file, oai_dir, val_sample):
    xml_path = export_grader(tiny_grader_file, oai_dir / "train", int8=True, crops=16)
    assert xml_path == compiled_paths(tiny_grader_file)[0]
    record = json.loads(xml_path.with_suffix(".json").read_text())
    assert record["precision"] == "int8" and record["calibration"]["crops"] == 16
    keras_grader = Grader.load(tiny_grader_file, runtime="keras")
    grader = Grader.load(tiny_grader_file, runtime="openvino")
    assert grader.compiled is not None and not grader.runtime_note
    crops = val_sample.crops[:12]
    np.testing.assert_allclose(
        grader.predict_with_features(crops)[1], keras_grader.predict_with_features(crops)[1], atol=0.05, rtol=0.1
    )
    # Concurrent requests come back in order: the batch's outputs equal each crop's run alone.
    x = grader.prepare(crops[:5])
    together = grader.compiled(x)
    alone = [grader.compiled(x[i : i + 1]) for i in range(5)]
    for layer, outputs in enumerate(together):
        assert outputs.shape[0] == 5
        np.testing.assert_array_equal(outputs, np.concatenate([one[layer] for one in alone]))

    # A changed IR is refused by its checksum; the grader then runs on Keras and says why.
    copy = xml_path.parent / "changed"
    copy.mkdir()
    for path in (tiny_grader_file, *compiled_paths(tiny_grader_file)):
        shutil.copy(path, copy / path.name)
    with open(compiled_paths(copy / tiny_grader_file.name)[1], "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    found, why = CompiledFeatures.find(copy / tiny_grader_file.name, ("block14_sepconv2_act",), "openvino")
    assert found is None and "checksum" in why
    fallback = Grader.load(copy / tiny_grader_file.name, runtime="openvino")
    assert fallback.compiled is None and fallback.runtime == "keras float32" and "checksum" in fallback.runtime_note


def test_the_export_command_refuses_val_crops_before_loading_anything(oai_dir, tmp_path):
    from typer.testing import CliRunner

    from kneepipe.cli import app

    result = CliRunner().invoke(
        app, ["export", "grader", "--calibration", str(oai_dir / "val"), "-o", str(tmp_path / "g")]
    )
    assert result.exit_code == 1 and "never on val" in result.output
    assert not list(tmp_path.iterdir())


def test_calibration_never_draws_from_val(oai_dir, tmp_path):
    with pytest.raises(ValueError, match="never on val"):
        calibration_crops(oai_dir / "val", 4, 0)
    crops, names = calibration_crops(oai_dir / "train", 4, 0)
    assert crops.shape == (4, 224, 224) and names == calibration_crops(oai_dir / "train", 4, 0)[1]
    with pytest.raises(ValueError, match="no crops"):
        calibration_crops(tmp_path, 4, 0)


def test_the_shipped_record_matches_the_shipped_grader():
    _, _, record_path = compiled_paths(DEFAULT_GRADER)
    found, why = CompiledFeatures.find(DEFAULT_GRADER, ("block14_sepconv2_act",), "openvino")
    assert found is not None, why
    assert json.loads(record_path.read_text())["grader"] == DEFAULT_GRADER.name
    size = sum(path.stat().st_size for path in compiled_paths(DEFAULT_GRADER)[:2])
    assert size < 60e6


def test_kneepipe_grade_records_the_runtime_that_graded(oai_dir, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from kneepipe.cli import app

    crops = tmp_path / "crops"
    crops.mkdir()
    for path in sorted((oai_dir / "val" / "3").glob("*.png"))[:4]:
        shutil.copy(path, crops / path.name)
    result = CliRunner().invoke(app, ["grade", str(crops), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    recorded = yaml.safe_load((tmp_path / "out" / "args.yaml").read_text())
    assert recorded["runtime"] == "openvino" and recorded["grader_runtime"] == "openvino int8 (grader.int8.xml)"


def test_a_compiled_grader_can_be_dropped_and_loaded_again(oai_dir):
    """A process that lets a compiled grader go (a server swapping graders) keeps running.

    Run in a child process: the failure this guards against aborted the whole process when
    the dropped network was destroyed on one of OpenVINO's own threads.
    """
    script = f"""
import gc
from pathlib import Path
import numpy as np
from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.predict import Grader
paths, grades = labelled_files(Path({str(oai_dir / "val")!r}))
crops = load_crops(paths[::70], grades[::70]).crops
grader = Grader.load(runtime="openvino")
first = grader.predict_logits(crops)
del grader
gc.collect()
again = Grader.load(runtime="openvino").predict_logits(crops)
print("same", np.array_equal(first, again))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "same True" in done.stdout
