"""``kneepipe run``: both stages chained on real pixels, bad input, resume, evaluation and the report.

The slow tests run the shipped detector and grader; the fast ones check the parts that need
no model (labels, matching and metrics, the run folder's state, the decode stream).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import ANNOTATIONS
from dicom_files import make_dicom, save_dicom
from typer.testing import CliRunner

from kneepipe import decoding as stream
from kneepipe.cli import app
from kneepipe.cli_common import EXIT_CONFIG, EXIT_FILE_ERRORS, EXIT_OK
from kneepipe.config import load_config
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.evaluate import box_iou, read_annotations
from kneepipe.grade.config import GradeConfig
from kneepipe.pipeline.commands import split_overrides
from kneepipe.pipeline.config import PipelineConfig
from kneepipe.pipeline.evaluate import LabelledKnee, end_to_end_metrics, match_labels, read_labels
from kneepipe.pipeline.run import RESULTS_COLUMNS, run_pipeline
from kneepipe.pipeline.state import (
    OutputConflictError,
    append_journal,
    prepare_output,
    read_journal,
    repair_journal,
)

ROOT = Path(__file__).resolve().parents[1]


def read_results(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == RESULTS_COLUMNS
        return list(reader)


# --- no model needed -----------------------------------------------------------------------------


def test_overrides_are_routed_to_their_stage():
    assert split_overrides(["batch=4", "detect.conf=0.3", "grade.batch=8", "report=true"]) == {
        "pipeline": ["batch=4", "report=true"],
        "detect": ["conf=0.3"],
        "grade": ["batch=8"],
    }


def test_run_help_loads_no_framework():
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from kneepipe.cli import app\n"
        "result = CliRunner().invoke(app, ['run', '--help'])\n"
        "assert result.exit_code == 0 and '--labels' in result.output, result.output\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'ultralytics') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_pipeline_config_checks_its_keys():
    from kneepipe.config import ConfigError

    assert load_config(PipelineConfig).batch >= 1
    with pytest.raises(ConfigError, match="group_pattern"):
        load_config(PipelineConfig, overrides={"group_pattern": "stage_[0-9]"})  # no capturing group
    with pytest.raises(ConfigError, match="prefetch"):
        load_config(PipelineConfig, overrides={"prefetch": 0})


def test_labels_are_checked_with_line_numbers(tmp_path):
    good = tmp_path / "labels.csv"
    good.write_text("image,side,kl_grade\na.png,R,2\na.png,l,0\n")
    assert read_labels(good) == [LabelledKnee("a.png", "R", 2), LabelledKnee("a.png", "L", 0)]
    for content, message in [
        ("image,kl_grade\na.png,2\n", "missing: side"),
        ("image,side,kl_grade\na.png,X,2\n", ":2: side must be R or L"),
        ("image,side,kl_grade\na.png,R,5\n", ":2: kl_grade must be 0-4"),
        ("image,side,kl_grade\na.png,R,two\n", ":2: kl_grade must be 0-4"),
        ("image,side,kl_grade\na.png,R,1\na.png,R,2\n", ":3: a.png side R is labelled twice"),
    ]:
        bad = tmp_path / "bad.csv"
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            read_labels(bad)


def _knee(image, side, box, grade, confidence=0.9):
    probabilities = np.full(5, 0.05)
    probabilities[grade] = 0.8
    return {
        "image": image,
        "side": side,
        "box": box,
        "det_confidence": confidence,
        "probabilities": probabilities.tolist(),
        "kl_grade": grade,
    }


def test_missed_and_misassigned_knees_count_as_failures():
    images = {name: {"status": "ok", "message": ""} for name in ("a.png", "b.png", "c.png")}
    images["d.png"] = {"status": "error", "message": "truncated PNG (no IEND chunk)"}
    labels = [
        LabelledKnee("a.png", "R", 0, (0, 0, 100, 100)),  # matched, right grade
        LabelledKnee("a.png", "L", 1, (200, 0, 300, 100)),  # matched, wrong grade
        LabelledKnee("b.png", "R", 0, (0, 0, 100, 100)),  # the joint there is called L: misassigned
        LabelledKnee("b.png", "L", 0, (200, 0, 300, 100)),  # nothing detected there: missed
        LabelledKnee("d.png", "R", 0),  # the file was refused: missed
        LabelledKnee("elsewhere/zz.png", "R", 3),  # not among the inputs
    ]
    knees = [
        _knee("a.png", "R", (5, 5, 105, 105), 0),
        _knee("a.png", "L", (200, 0, 300, 100), 2),
        _knee("b.png", "L", (0, 0, 100, 100), 0),
        _knee("c.png", "R", (0, 0, 100, 100), 4),  # no label for c.png
    ]
    outcomes, unknown, unclaimed = match_labels(labels, knees, images, match_iou=0.5)
    by_knee = {(o["image"], o["side"]): o for o in outcomes}
    assert by_knee["a.png", "R"]["outcome"] == "matched"
    assert by_knee["b.png", "R"]["outcome"] == "misassigned"
    assert by_knee["b.png", "L"]["outcome"] == "missed"
    assert by_knee["d.png", "R"]["outcome"] == "missed"
    assert "truncated PNG" in by_knee["d.png", "R"]["message"]
    assert [label.image for label in unknown] == ["elsewhere/zz.png"]
    assert [knee["image"] for knee in unclaimed] == ["c.png"]

    metrics = end_to_end_metrics(outcomes, unknown, unclaimed)
    # Five labelled knees, one right: the three failures are all true KL0, and none may count as correct.
    assert metrics["labelled_knees"] == 5 and metrics["accuracy"] == 0.2
    assert (metrics["matched"], metrics["missed"], metrics["misassigned"]) == (2, 2, 1)
    assert metrics["failures_by_true_grade"] == [3, 0, 0, 0, 0]
    assert metrics["recall"][0] == 0.25  # 1 of 4 true KL0 knees
    assert metrics["confusion_matrix"][0][0] == 1 and sum(map(sum, metrics["confusion_matrix"])) == 2
    assert metrics["precision"][0] == 1.0  # precision from real predictions only
    assert metrics["mae"] == pytest.approx((0 + 1 + 4 + 4 + 4) / 5)  # failures: the farthest grade
    assert metrics["graded_only"]["n"] == 2 and metrics["graded_only"]["accuracy"] == 0.5
    assert (metrics["labels_without_image"], metrics["detections_without_label"]) == (1, 1)


def test_matching_by_side_without_boxes():
    images = {"a.png": {"status": "ok", "message": ""}}
    labels = [LabelledKnee("a.png", "R", 2), LabelledKnee("a.png", "L", 3)]
    # Two joints both called R: the better one takes R, the other is L's knee on the wrong side.
    knees = [_knee("a.png", "R", (0, 0, 1, 1), 2, 0.9), _knee("a.png", "R", (5, 0, 6, 1), 3, 0.6)]
    outcomes, _, _ = match_labels(labels, knees, images)
    assert [(o["side"], o["outcome"]) for o in outcomes] == [("R", "matched"), ("L", "misassigned")]


def test_run_folder_resumes_the_same_run_and_refuses_another(tmp_path):
    parts = {"inputs": "1", "detector": "d@1", "grader": "g@1", "labels": "none"}
    out = tmp_path / "run"
    assert prepare_output(out, parts, overwrite=False) is False  # empty: a new run
    from kneepipe.pipeline.state import fingerprint

    (out / "args.yaml").write_text(json.dumps({"fingerprint": fingerprint(parts), "fingerprint_parts": parts}))
    (out / "results.csv").write_text("image\n")
    assert prepare_output(out, parts, overwrite=False) is True
    with pytest.raises(OutputConflictError, match=r"differs in: grader.*--overwrite"):
        prepare_output(out, {**parts, "grader": "g@2"}, overwrite=False)
    (out / "notes.txt").write_text("the user's own file")
    assert prepare_output(out, {**parts, "grader": "g@2"}, overwrite=True) is False
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only the run's outputs went

    other = tmp_path / "grade-output"
    other.mkdir()
    (other / "args.yaml").write_text("model: null\n")  # another command's folder
    (other / "results.csv").write_text("x\n")
    with pytest.raises(OutputConflictError, match=r"not a kneepipe run \(args.yaml, results.csv\).*--overwrite"):
        prepare_output(other, parts, overwrite=False)


def test_journal_drops_a_line_cut_by_a_kill(tmp_path):
    journal = tmp_path / "journal.jsonl"
    append_journal(journal, [{"image": "a.png", "knees": []}, {"image": "b.png", "knees": []}])
    with journal.open("a") as handle:
        handle.write('{"image": "c.png", "kne')  # killed mid-write
    assert list(read_journal(journal)) == ["a.png", "b.png"]
    repair_journal(journal)
    append_journal(journal, [{"image": "c.png", "knees": []}])
    assert list(read_journal(journal)) == ["a.png", "b.png", "c.png"]


def test_decode_stream_keeps_order_and_holds_few_images(tmp_path, monkeypatch, oai_dir):
    crop = cv2.imread(str(next((oai_dir / "val" / "2").glob("*.png"))), cv2.IMREAD_GRAYSCALE)
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i:02d}.png")
        cv2.imwrite(str(paths[-1]), crop)
    (tmp_path / "07.png").write_bytes(b"")  # one unreadable file among them
    decoded, lock = [0], threading.Lock()
    real_read = stream.read_radiograph

    def counting_read(path, max_side, max_pixels):
        with lock:
            decoded[0] += 1
        return real_read(path, max_side=max_side, max_pixels=max_pixels)

    monkeypatch.setattr(stream, "read_radiograph", counting_read)
    seen, most_ahead = [], 0
    shapes = stream.decoded_radiographs(paths, 4096, prefetch=3, workers=2, prepare=lambda r: r.pixels.shape)
    for index, (path, item, shape) in enumerate(shapes):
        time.sleep(0.005)  # a slow consumer: the decoder must wait, not run ahead
        with lock:
            most_ahead = max(most_ahead, decoded[0] - index)
        seen.append((path, type(item).__name__, shape))
    assert [path for path, _, _ in seen] == paths
    assert seen[7][1:] == ("ImageReadError", None)
    assert seen[0][1:] == ("Radiograph", (224, 224))  # prepared in the decoding thread
    assert most_ahead <= 3 + 2 + 1  # queue + decoding threads + the item handed out


# --- the real models -------------------------------------------------------------------------------


def _configs(**pipeline):
    return (
        load_config(PipelineConfig, overrides=pipeline),
        load_config(DetectConfig),
        load_config(GradeConfig),
    )


@pytest.fixture(scope="module")
def models():
    """The shipped detector and grader, loaded once for the module."""
    from kneepipe.pipeline.run import load_models

    _, detect_cfg, grade_cfg = _configs()
    return load_models(detect_cfg, grade_cfg)


@pytest.fixture(scope="module")
def films(tmp_path_factory, oai_dir) -> tuple[Path, Path]:
    """Six pseudo-radiographs from real val crops (the project's compositor) and their labels CSV."""
    from kneepipe.training.compose import compose_dataset

    folder = tmp_path_factory.mktemp("films")
    labels = compose_dataset(oai_dir / "val", folder, count=6, seed=11, bilateral_fraction=0.7, long_side=(700, 900))
    return folder / "images", labels


@pytest.mark.slow
@pytest.mark.parametrize("grader_first", [True, False], ids=["grader-then-detector", "detector-then-grader"])
def test_both_models_in_one_process_in_either_order(tmp_path, radiographs_dir, grader_first):
    script = textwrap.dedent(
        f"""
        import sys
        from kneepipe.imaging import read_radiograph

        def grade():
            from kneepipe.grade.predict import Grader
            grader = Grader.load()
            crop = read_radiograph({str(radiographs_dir / "bilateral_0.png")!r}).pixels[150:300, 120:270]
            assert grader.predict_proba([crop]).shape == (1, 5)

        def detect():
            from kneepipe.detect.predict import JointDetector
            detection = JointDetector.load().detect([read_radiograph({str(radiographs_dir / "bilateral_0.png")!r})])
            assert detection[0].status == "ok"

        steps = [grade, detect] if {grader_first} else [detect, grade]
        for step in steps:
            step()
        print("both stages ran")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "both stages ran" in done.stdout


def _write_dicom(path: Path, pixels: np.ndarray, with_pixels: bool = True, **elements) -> Path:
    dataset = make_dicom(pixels, "MONOCHROME2", 16 if pixels.dtype == np.uint16 else 8, **elements)
    if not with_pixels:
        del dataset.PixelData
    return save_dicom(dataset, path)


def _png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def bad_batch(folder: Path, radiographs_dir: Path, oai_dir: Path) -> dict[str, tuple[str, str]]:
    """A batch of awkward files among good ones: name -> (expected status, words of the reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    knees = cv2.cvtColor(cv2.imread(str(radiographs_dir / "bilateral_0.png")), cv2.COLOR_BGR2GRAY)
    jpeg = (radiographs_dir / "stage_2_7.jpg").read_bytes()
    expected = {}

    shutil.copy(radiographs_dir / "bilateral_0.png", folder / "rgba_knees.png")  # RGBA on disk
    expected["rgba_knees.png"] = ("ok", "")
    cv2.imwrite(str(folder / "knees_16bit.png"), knees.astype(np.uint16) * 257 + 100)
    expected["knees_16bit.png"] = ("ok", "")
    huge = cv2.resize(knees, (knees.shape[1] * 16, knees.shape[0] * 16), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(folder / "huge_knees.png"), huge)  # 9136x7296: shrunk on reading, still graded
    expected["huge_knees.png"] = ("ok", "")
    shutil.copy(radiographs_dir / "stage_1_5.jpg", folder / "foot.jpg")
    expected["foot.jpg"] = ("no_knee", "no knee")
    _write_dicom(folder / "lateral.dcm", knees, ViewPosition="LL")
    expected["lateral.dcm"] = ("lateral_view", "lateral")
    _write_dicom(folder / "report_only.dcm", knees, with_pixels=False)
    expected["report_only.dcm"] = ("error", "no pixel data")
    (folder / "empty.png").write_bytes(b"")
    expected["empty.png"] = ("error", "empty file")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    expected["truncated.jpg"] = ("error", "truncated")
    (folder / "notes.png").write_text("patient 9001695, left knee, KL 2\n" * 20)
    expected["notes.png"] = ("error", "not a PNG, JPEG, TIFF or DICOM")
    cv2.imwrite(str(folder / "dot.png"), knees[:1, :1])
    expected["dot.png"] = ("error", "too small")
    (folder / "giant.png").write_bytes(_png_header_only(60000, 60000))
    expected["giant.png"] = ("error", "too large")

    # Three knee-like objects: three real crops side by side on one film.
    crops = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((oai_dir / "val" / "2").glob("*.png"))[:3]]
    film = np.full((420, 900), 20, np.uint8)
    for i, crop in enumerate(crops):
        film[100:324, 40 + i * 290 : 264 + i * 290] = crop
    cv2.imwrite(str(folder / "three_knees.png"), film)
    expected["three_knees.png"] = ("three", "")
    return expected


@pytest.mark.slow
def test_a_batch_of_bad_input_completes_with_a_reason_per_file(tmp_path, radiographs_dir, oai_dir):
    expected = bad_batch(tmp_path / "raw", radiographs_dir, oai_dir)
    out = tmp_path / "out"
    command = ["run", str(tmp_path / "raw"), "--out", str(out), "--no-progress", "--adapt-prior"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == EXIT_FILE_ERRORS, result.output
    rows = read_results(out / "results.csv")
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    assert sorted(by_image) == sorted(expected)
    for name, (status, words) in expected.items():
        image_rows = by_image[name]
        if status == "ok":
            assert [r["status"] for r in image_rows] == ["ok", "ok"], (name, image_rows)
            assert sorted(r["side"] for r in image_rows) == ["L", "R"]
            for r in image_rows:
                assert r["kl_grade"] in "01234" and abs(sum(float(r[f"p{g}"]) for g in range(5)) - 1) < 1e-3
                assert (out / r["crop"]).is_file()
        elif status == "three":
            assert all(r["status"] == "ok" for r in image_rows) and len(image_rows) >= 2, image_rows
            if len(image_rows) > 2:
                assert all("3 knee-like objects" in r["message"] for r in image_rows)
        else:
            assert len(image_rows) == 1 and image_rows[0]["status"] == status, (name, image_rows)
            assert words in image_rows[0]["message"], (name, image_rows[0]["message"])
    # Boxes of the shrunk image come back in its source pixels.
    huge_boxes = [[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in by_image["huge_knees.png"]]
    small_boxes = [[float(r[k]) * 16 for k in ("x1", "y1", "x2", "y2")] for r in by_image["rgba_knees.png"]]
    for big, small in zip(sorted(huge_boxes), sorted(small_boxes), strict=True):
        assert box_iou(big, small) > 0.7
    for name in ("empty.png", "giant.png", "report_only.dcm", "foot.jpg"):
        assert name in result.output  # the summary names each refused file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refused"] == {"error": 6, "no_knee": 1, "lateral_view": 1}
    estimated = summary["priors"]["estimated_prior"]  # --adapt-prior re-estimated the batch's grade prior
    assert len(estimated) == 5 and abs(sum(estimated) - 1) < 1e-3
    assert summary["priors"]["prior_pseudo_knees"] == load_config(GradeConfig).adapt_prior_concentration > 0


@pytest.mark.slow
def test_a_killed_run_resumes_without_grading_twice(tmp_path, films, models):
    images, _ = films
    configs = _configs(batch=2)
    pipeline_cfg, detect_cfg, grade_cfg = configs
    detector, grader = models
    with_models = {"detector": detector, "grader": grader}
    calls = {"logits": 0}
    real_grade = grader.grade_each

    def counting_grade(crops, batch_size=32, features=None):
        calls["logits"] += len(crops)
        return real_grade(crops, batch_size=batch_size, features=features)

    grader.grade_each = counting_grade

    class Killed(Exception):
        pass

    def kill_after_four(done, total):
        if done >= 4:
            raise Killed

    out = tmp_path / "out"
    try:
        with pytest.raises(Killed):
            run_pipeline(images, out, *configs, progress=kill_after_four, **with_models)
        assert not (out / "results.csv").exists()  # never a half-written table
        journal = read_journal(out / "journal.jsonl")
        assert len(journal) == 4
        knees_before = calls["logits"]
        with (out / "journal.jsonl").open("a") as handle:
            handle.write('{"image": "composite_00004.jpg", "sta')  # a line cut by the kill

        seen = []
        # Resumed with another step size (it changes no result, so the fingerprint still matches).
        other_steps = (load_config(PipelineConfig, overrides={"batch": 3}), detect_cfg, grade_cfg)
        resumed = run_pipeline(images, out, *other_steps, progress=lambda done, total: seen.append(done), **with_models)
        assert seen[0] == 4 and seen[-1] == 6
        assert (resumed.resumed, resumed.processed) == (4, 2)
        knees_after = calls["logits"] - knees_before
        assert knees_after == sum(len(r["knees"]) for r in list(resumed.images.values())[4:])

        fresh = run_pipeline(images, tmp_path / "fresh", *_configs(), **with_models)  # never interrupted, one step
    finally:
        del grader.grade_each
    # The shift score covers every knee, those graded before the kill too (their features are read back).
    assert (
        resumed.summary["shift"]["shift_knees"]
        == fresh.summary["shift"]["shift_knees"]
        == resumed.summary["knees_graded"]
    )
    assert resumed.summary["shift"]["shift_score"] == pytest.approx(fresh.summary["shift"]["shift_score"], abs=0.01)
    lines = (out / "journal.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["image"] for line in lines) == sorted(p.name for p in images.iterdir())
    resumed_rows, fresh_rows = read_results(out / "results.csv"), read_results(tmp_path / "fresh" / "results.csv")
    assert [(r["image"], r["side"], r["kl_grade"]) for r in resumed_rows] == [
        (r["image"], r["side"], r["kl_grade"]) for r in fresh_rows
    ]
    for a, b in zip(resumed_rows, fresh_rows, strict=True):
        assert all(abs(float(a[f"p{g}"] or 0) - float(b[f"p{g}"] or 0)) < 2e-3 for g in range(5))

    # A different run into the same folder is refused; --overwrite starts it afresh.
    changed = load_config(DetectConfig, overrides={"conf": 0.5})
    with pytest.raises(OutputConflictError, match="detect_config"):
        run_pipeline(images, out, pipeline_cfg, changed, grade_cfg, **with_models)
    result = CliRunner().invoke(app, ["run", str(images), "--out", str(out), "--no-progress", "detect.conf=0.5"])
    assert result.exit_code == EXIT_CONFIG and "--overwrite" in result.output
    afresh = load_config(PipelineConfig, overrides={"overwrite": True})
    again = run_pipeline(images, out, afresh, changed, grade_cfg, **with_models)
    assert again.resumed == 0 and again.processed == 6


@pytest.mark.slow
@pytest.mark.parametrize("grade_workers", [1, 2])
def test_steps_are_graded_beside_the_detector_in_input_order(tmp_path, films, models, grade_workers, monkeypatch):
    from kneepipe.pipeline import run as run_module

    images, _ = films
    detector, grader = models
    real_detect, real_grade = run_module.detect_radiographs, grader.grade_each
    detected_steps = []
    second_step_detected = threading.Event()
    overlapped = []

    def detect(model, radiographs, checks=None):
        # Each film's pixels were checked in the decoding thread: the detector only runs the models.
        assert checks is not None and all(check is not None for check in checks), checks
        detected_steps.append(len(radiographs))
        if len(detected_steps) == 2:
            second_step_detected.set()
        return real_detect(model, radiographs, checks)

    def grade_each(crops, batch_size=32, features=None):
        # The first step's grading waits for the second step's detection. In a pipeline
        # that graded before detecting on, that detection would never come and the wait
        # would time out.
        overlapped.append(second_step_detected.wait(timeout=30))
        return real_grade(crops, batch_size=batch_size, features=features)

    monkeypatch.setattr(run_module, "detect_radiographs", detect)
    monkeypatch.setattr(grader, "grade_each", grade_each)
    out = tmp_path / "out"
    run = run_pipeline(images, out, *_configs(batch=2, grade_workers=grade_workers), detector=detector, grader=grader)

    assert detected_steps == [2, 2, 2] and overlapped[0] is True
    journaled = [json.loads(line)["image"] for line in (out / "journal.jsonl").read_text().splitlines()]
    assert journaled == sorted(p.name for p in images.iterdir())  # input order, each once
    assert run.summary["knees_graded"] == sum(len(record["knees"]) for record in run.images.values()) >= 6


def test_a_film_check_failing_in_the_decoding_thread_keeps_the_thumbnail(radiographs_dir):
    from kneepipe.imaging import read_radiograph
    from kneepipe.pipeline.run import _prepare_film

    film = read_radiograph(radiographs_dir / "stage_2_7.jpg")

    def broken(radiograph):
        raise MemoryError("no room")

    thumbnail, checks = _prepare_film(film, 640, broken)
    assert checks is None and thumbnail is not None and thumbnail[0][:2] == b"\xff\xd8"  # a JPEG
    assert _prepare_film(film, 0, None) == (None, None)


@pytest.mark.slow
def test_labels_make_an_end_to_end_evaluation(tmp_path, films, models, oai_dir):
    images, labels = films
    raw = tmp_path / "raw"
    shutil.copytree(images, raw)
    broken = sorted(raw.iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:500])  # its labelled knees must count as missed
    detector, grader = models
    run = run_pipeline(raw, tmp_path / "out", *_configs(), labels=labels, detector=detector, grader=grader)
    with labels.open() as handle:
        label_rows = list(csv.DictReader(handle))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["labelled_knees"] == len(label_rows)
    assert metrics["matched"] + metrics["missed"] + metrics["misassigned"] == len(label_rows)
    lost = sum(row["image"] == broken.name for row in label_rows)
    assert metrics["missed"] >= lost >= 1
    assert sum(metrics["true_counts"]) == len(label_rows)
    assert metrics["true_counts"] == np.bincount([int(r["kl_grade"]) for r in label_rows], minlength=5).tolist()
    for key in ("accuracy", "qwk", "mae", "ece", "recall", "precision", "confusion_matrix", "predicted_counts"):
        assert key in metrics
    with (tmp_path / "out" / "evaluation.csv").open() as handle:
        outcomes = list(csv.DictReader(handle))
    assert {o["outcome"] for o in outcomes if o["image"] == broken.name} == {"missed"}
    assert run.metrics["accuracy"] == metrics["accuracy"]


def _screenshot(html: Path, png: Path, profile: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed to render the report (apt-get install chromium; .ci/run installs it)"
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1280,2000",
            html.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]


@pytest.mark.slow
def test_clinical_radiographs_with_a_report(tmp_path, radiographs_dir):
    # The README's first command, on a clean clone: it must exit 0 (laterals and feet are findings).
    readme = (ROOT / "README.md").read_text()
    assert "kneepipe run ../shared/data/radiographs --out runs/radiographs --report\n" in readme
    out = tmp_path / "clinical"
    result = CliRunner().invoke(app, ["run", str(radiographs_dir), "--out", str(out), "--report", "--no-progress"])
    assert result.exit_code == EXIT_OK, result.output
    rows = read_results(out / "results.csv")
    annotations = read_annotations(ANNOTATIONS)
    for name, truth in annotations.items():
        image_rows = [r for r in rows if r["image"] == name]
        if truth["kind"] in ("lateral", "foot"):
            assert len(image_rows) == 1 and image_rows[0]["status"] == (
                "lateral_view" if truth["kind"] == "lateral" else "no_knee"
            ), image_rows
            assert image_rows[0]["message"], name
        for side, box in truth["joints"]:  # every annotated AP knee graded, on its side
            graded = [r for r in image_rows if r["status"] == "ok" and r["side"] == side]
            assert graded, (name, side, image_rows)
            best = max(box_iou(box, [float(r[k]) for k in ("x1", "y1", "x2", "y2")]) for r in graded)
            assert best >= 0.5, (name, side, best)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["groups"]) == {"stage_1", "stage_2"}
    assert summary["groups"]["stage_1"]["images"] == 7 and summary["groups"]["stage_2"]["images"] == 10
    assert "stage_1:" in result.output and "stage_2:" in result.output

    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page and "@import" not in page
    assert page.count("data:image/") >= 2 * summary["knees_graded"] + 2
    assert page.count("Grad-CAM</figcaption>") == summary["knees_graded"]
    for refused in summary["refused_files"]:
        assert refused["image"] in page
    assert "stage_1" in page and "Refused files" in page and summary["grader"] in page
    # The CPU default: the compiled INT8 grader, named in the report and in args.yaml.
    assert "openvino int8 (grader.int8.xml)" in page
    assert yaml.safe_load((out / "args.yaml").read_text())["grader_runtime"] == "openvino int8 (grader.int8.xml)"
    png = tmp_path / "report.png"
    _screenshot(out / "report.html", png, tmp_path / "chromium-profile")
    shot = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    assert shot.shape == (2000, 1280)
    assert shot.std() > 20  # a rendered page with images, not a blank one
