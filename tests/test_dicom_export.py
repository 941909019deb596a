"""kneepipe run --dicom: a Structured Report and a Secondary Capture per graded DICOM film, validated."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pacs_films import PATIENT_NAME, write_films
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.dicom import codes
from kneepipe.dicom.export import describe_dicom_results
from kneepipe.dicom.read import read_report


def dciodvfy_errors(path) -> list[str]:
    """The errors dicom3tools' validator finds in a file (warnings are not errors)."""
    found = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (found.stdout + found.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory, radiographs_dir):
    """One run over two gradable DICOM films, a lateral DICOM and a PNG, with --dicom and --report."""
    raw = tmp_path_factory.mktemp("raw")
    sources = write_films(raw, radiographs_dir)
    shutil.copy(radiographs_dir / "bilateral_0.png", raw / "plain.png")
    out = tmp_path_factory.mktemp("run") / "out"
    result = CliRunner().invoke(app, ["run", str(raw), "--out", str(out), "--dicom", "--report", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out, sources, result.output


def _results(out):
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_each_graded_dicom_film_gets_an_sr_and_a_secondary_capture(dicom_run):
    out, sources, output = dicom_run
    summary = json.loads((out / "summary.json").read_text())["dicom"]
    assert sorted(entry["image"] for entry in summary["written"]) == ["bilateral_m1.dcm", "single_m2.dcm"]
    assert summary["not_dicom"] == ["plain.png"] and "not DICOM" in summary["note"]
    assert summary["no_graded_knee"] == ["lateral.dcm"] and summary["failed"] == []
    assert sorted(path.name for path in (out / "dicom").iterdir()) == [
        "bilateral_m1_sc.dcm",
        "bilateral_m1_sr.dcm",
        "single_m2_sc.dcm",
        "single_m2_sr.dcm",
    ]
    assert "DICOM: 2 SR and 2 Secondary Capture" in output and "1 input(s) not DICOM" in output

    rows = _results(out)
    for entry in summary["written"]:
        source = sources[entry["image"].removesuffix(".dcm")]
        sr, sc = pydicom.dcmread(out / entry["sr"]), pydicom.dcmread(out / entry["sc"])
        for made in (sr, sc):
            assert made.StudyInstanceUID == source.StudyInstanceUID
            assert made.PatientID == source.PatientID and made.PatientName == source.PatientName
            assert made.AccessionNumber == source.AccessionNumber
            assert made.SeriesInstanceUID != source.SeriesInstanceUID
            equipment = made.ContributingEquipmentSequence[0]
            versions = list(equipment.SoftwareVersions)
            assert any(v.startswith("detector=") and "@" in v for v in versions)
            assert any(v.startswith("grader=") and "@" in v for v in versions)
        assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert codes.PRIVATE_SCHEME in [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence]
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        assert "not a diagnosis" in sc.ImageComments

        # The SR read back with highdicom gives results.csv's knees: side, grade, probabilities, box.
        expected = sorted(
            (row for row in rows if row["image"] == entry["image"] and row["status"] == "ok"),
            key=lambda row: row["side"],
        )
        knees = sorted(read_report(out / entry["sr"]), key=lambda knee: knee["side"])
        assert len(knees) == len(expected) == entry["knees"] >= 1
        for knee, row in zip(knees, expected, strict=True):
            assert knee["side"] == row["side"] and knee["kl_grade"] == int(row["kl_grade"])
            np.testing.assert_allclose(knee["probabilities"], [float(row[f"p{g}"]) for g in range(5)], atol=1e-4)
            np.testing.assert_allclose(knee["box"], [float(row[k]) for k in ("x1", "y1", "x2", "y2")], atol=0.05)
            assert knee["source_sop_instance_uid"] == source.SOPInstanceUID
            assert isinstance(knee["needs_review"], bool)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_dicom_outputs_pass_the_dicom3tools_validator(dicom_run):
    out, _, _ = dicom_run
    files = sorted((out / "dicom").glob("*.dcm"))
    assert len(files) == 4
    for path in files:
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.slow
def test_patient_identity_stays_in_the_dicom_files(dicom_run):
    out, sources, _ = dicom_run
    identity = [PATIENT_NAME.split("^")[0]]
    for source in sources.values():
        identity += [source.PatientID, source.StudyInstanceUID, source.AccessionNumber]
    for path in out.rglob("*"):
        if path.is_file() and "dicom" not in path.relative_to(out).parts:
            content = path.read_bytes()
            for value in identity:
                assert value.encode() not in content, f"{value} in {path.relative_to(out)}"


@pytest.mark.slow
def test_the_overlay_shows_the_film_with_boxes_drawn(dicom_run):
    out, sources, _ = dicom_run
    sc = pydicom.dcmread(out / "dicom/single_m2_sc.dcm")
    pixels = sc.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and sc.PhotometricInterpretation == "RGB"
    source = sources["single_m2"].pixel_array
    assert pixels.shape[:2] == source.shape  # a film under 2048 px keeps its size
    coloured = np.abs(pixels[..., 0].astype(int) - pixels[..., 2].astype(int)) > 60  # boxes and labels, not grey
    assert coloured.sum() > 200
    grey = ~coloured
    grey[-60:] = False  # the disclaimer band
    assert np.corrcoef(pixels[..., 1][grey], source[grey])[0, 1] > 0.95


def test_summary_lines_name_what_was_not_written():
    lines = describe_dicom_results(
        {
            "written": [],
            "not_dicom": ["a.png", "b.jpg"],
            "no_graded_knee": ["lat.dcm"],
            "failed": [{"image": "x.dcm", "reason": "AttributeError: no StudyInstanceUID"}],
        }
    )
    assert "2 input(s) not DICOM" in lines and "1 DICOM film(s) without a graded knee" in lines
    assert "DICOM not written for x.dcm: AttributeError: no StudyInstanceUID" in lines


@pytest.mark.slow
def test_every_code_in_a_report_is_listed_in_the_readme(dicom_run):
    from pathlib import Path

    from kneepipe.dicom.read import codes_used

    out, _, _ = dicom_run
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("### The SR's content and every code it uses") :]
    listed = set()
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            values = [v.strip("` ") for v in cells[0].split("...")]
            if len(values) == 2:  # a range such as `KL0` ... `KL4`
                prefix = values[0].rstrip("0123456789")
                first, last = int(values[0][len(prefix) :]), int(values[1][len(prefix) :])
                listed |= {(f"{prefix}{n}", cells[1]) for n in range(first, last + 1)}
            else:
                listed.add((values[0], cells[1]))
    used = set()
    for path in (out / "dicom").glob("*_sr.dcm"):
        used |= {(value, scheme) for value, scheme, _ in codes_used(pydicom.dcmread(path))}
    used |= {(code.value, code.scheme_designator) for code in codes.all_codes()}
    assert used - listed == set()


def test_a_film_that_does_not_state_its_orientation_gets_valid_outputs(tmp_path, radiographs_dir):
    """Patient Orientation is written empty (unknown) on the overlay rather than guessed."""
    from pacs_films import knee_film

    from kneepipe.dicom.export import Algorithm, write_film

    film = knee_film(radiographs_dir / "bilateral_0.png", "MONOCHROME2", "AP", patient_id="KP9999")
    del film.PatientOrientation
    film.save_as(tmp_path / "film.dcm", enforce_file_format=True)
    knee = {
        "side": "R",
        "box": [120.0, 151.0, 264.0, 295.0],
        "det_confidence": 0.9,
        "crop": "",
        "status": "ok",
        "message": "",
        "logits": [0.0] * 5,
        "probabilities": [0.1, 0.2, 0.5, 0.15, 0.05],
        "kl_grade": 2,
    }
    sr_path, sc_path = write_film(tmp_path / "film.dcm", [knee], Algorithm("d.pt@1", "g.npz@2"), tmp_path, "film")
    sc = pydicom.dcmread(sc_path)
    assert "PatientOrientation" in sc and not sc.PatientOrientation
    assert read_report(sr_path)[0]["kl_grade"] == 2
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(sc_path) == [] and dciodvfy_errors(sr_path) == []


def test_one_film_that_cannot_become_dicom_is_named_and_the_others_are_written(tmp_path, radiographs_dir):
    from pacs_films import knee_film

    from kneepipe.dicom.export import write_dicom_results
    from kneepipe.pipeline.outputs import PipelineRun

    knee = {
        "side": "L",
        "box": [334.0, 146.0, 478.0, 290.0],
        "det_confidence": 0.8,
        "crop": "",
        "status": "ok",
        "message": "",
        "logits": [0.0] * 5,
        "probabilities": [0.6, 0.2, 0.1, 0.05, 0.05],
        "kl_grade": 0,
    }
    good = knee_film(radiographs_dir / "bilateral_0.png", "MONOCHROME2", "AP", patient_id="KP0001")
    good.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    no_study = knee_film(radiographs_dir / "bilateral_0.png", "MONOCHROME2", "AP", patient_id="KP0002")
    del no_study.StudyInstanceUID
    no_study.save_as(tmp_path / "no_study.dcm", enforce_file_format=True)
    shutil.copy(radiographs_dir / "bilateral_0.png", tmp_path / "plain.png")
    images = {
        name: {"image": name, "path": str(tmp_path / name), "status": "ok", "message": "", "knees": [dict(knee)]}
        for name in ("good.dcm", "no_study.dcm", "plain.png")
    }
    out = tmp_path / "run"
    out.mkdir()
    run = PipelineRun(out, [], images, {"images": 3})
    dicom = write_dicom_results(run, "detector.pt@1", "grader.npz@2")
    assert [entry["image"] for entry in dicom["written"]] == ["good.dcm"]
    assert dicom["not_dicom"] == ["plain.png"]
    assert [entry["image"] for entry in dicom["failed"]] == ["no_study.dcm"]
    assert "StudyInstanceUID" in dicom["failed"][0]["reason"]
    assert json.loads((out / "summary.json").read_text())["dicom"] == dicom
