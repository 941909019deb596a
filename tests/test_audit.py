"""The leakage audit on real OAI crops: copies the tests make under every transformation, and distinct knees."""

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from kneepipe.audit.config import AuditConfig
from kneepipe.audit.fingerprint import pixel_digest, spectrum_descriptor
from kneepipe.audit.leakage import (
    DUPLICATE_IN_B,
    EXACT_COPY,
    LEAKAGE_KINDS,
    MIRRORED_COPY,
    NEAR_COPY,
    PATIENT_OVERLAP,
    audit_leakage,
    patient_id,
)
from kneepipe.audit.verify import copy_evidence
from kneepipe.cli import app
from kneepipe.cli_common import EXIT_FILE_ERRORS, EXIT_LEAKAGE, EXIT_OK
from kneepipe.config import load_config

SOURCES = 20  # real crops copied under every transformation
DISTINCT_A = 300  # distinct patients' crops in the reference folder
DISTINCT_B = 150  # other patients' crops in the audited folder


def _stretch(pixels):
    low, high = np.percentile(pixels, (2, 98))
    return np.clip((pixels.astype(np.float32) - low) * 255 / (high - low), 0, 255).astype(np.uint8)


def _gamma(pixels, gamma):
    return np.round(255 * (pixels / 255.0) ** gamma).astype(np.uint8)


def _crop_and_shift(pixels):
    """A 95% window, off centre (4% from the top, 1% from the left): a crop and a shift at once."""
    h, w = pixels.shape
    top, left = round(0.04 * h), round(0.01 * w)
    return pixels[top : top + round(0.95 * h), left : left + round(0.95 * w)]


def _shift(pixels):
    move = np.float32([[1, 0, 6], [0, 1, -5]])  # 6 px right, 5 px up; edges repeated
    return cv2.warpAffine(pixels, move, pixels.shape[::-1], borderMode=cv2.BORDER_REPLICATE)


# name -> (transformation, file suffix, expected kind)
TRANSFORMS = {
    "resize299": (lambda p: cv2.resize(p, (299, 299), interpolation=cv2.INTER_CUBIC), ".png", NEAR_COPY),
    "resize160": (lambda p: cv2.resize(p, (160, 160), interpolation=cv2.INTER_AREA), ".png", NEAR_COPY),
    "jpeg70": (lambda p: p, ".jpg", NEAR_COPY),
    "stretch": (_stretch, ".png", NEAR_COPY),
    "equalised": (cv2.equalizeHist, ".png", NEAR_COPY),
    "clahe": (lambda p: cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(p), ".png", NEAR_COPY),
    "gamma07": (lambda p: _gamma(p, 0.7), ".png", NEAR_COPY),
    "gamma14": (lambda p: _gamma(p, 1.4), ".png", NEAR_COPY),
    "crop5_shift": (_crop_and_shift, ".png", NEAR_COPY),
    "shift": (_shift, ".png", NEAR_COPY),
    "mirrored": (lambda p: np.ascontiguousarray(p[:, ::-1]), ".png", MIRRORED_COPY),
    "renamed": (lambda p: p, ".png", EXACT_COPY),
}


def _one_crop_per_patient(folder: Path) -> list[Path]:
    """Crops of distinct patients (the left knee where both are there), in a fixed order."""
    by_patient = {}
    for path in sorted(folder.glob("*/*.png")):
        by_patient.setdefault(path.stem[:7], path)
    return list(by_patient.values())


def _link(path: Path, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or path.name)
    target.symlink_to(path.resolve())
    return target


@pytest.fixture(scope="module")
def folders(oai_dir, tmp_path_factory):
    """A: 300 real crops of distinct patients. B_copies: 12 copies of 20 of them, renamed.

    B_distinct: 150 crops of 150 other patients (val is patient-disjoint from train).
    """
    root = tmp_path_factory.mktemp("audit")
    train = _one_crop_per_patient(oai_dir / "train")
    reference = train[:: len(train) // DISTINCT_A][:DISTINCT_A]
    for path in reference:
        _link(path, root / "A" / path.parent.name)
    sources = reference[:: DISTINCT_A // SOURCES][:SOURCES]
    copies = {}  # copy file -> (source file, transformation)
    for number, source in enumerate(sources):
        pixels = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
        for name, (transform, suffix, _) in TRANSFORMS.items():
            target = root / "B_copies" / f"scan_{number:03d}_{name}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            if name == "renamed":
                shutil.copyfile(source, target)
            else:
                params = [cv2.IMWRITE_JPEG_QUALITY, 70] if suffix == ".jpg" else []
                assert cv2.imwrite(str(target), transform(pixels), params)
            copies[target] = (root / "A" / source.parent.name / source.name, name)
    for path in _one_crop_per_patient(oai_dir / "val")[:DISTINCT_B]:
        _link(path, root / "B_distinct" / path.parent.name)
    return root, copies, sources


@pytest.fixture(scope="module")
def config():
    return load_config(AuditConfig, overrides={"workers": 1})


@pytest.mark.parametrize(
    ("search", "expected_search"),
    [
        ({"search": "exact"}, "exact"),
        ({"search": "auto", "exact_search_limit": 0.0}, "hnsw"),  # auto: above the limit, the graph index
    ],
    ids=["exact", "auto-hnsw"],
)
def test_every_transformed_copy_is_found_with_its_source(folders, search, expected_search):
    root, copies, _ = folders
    config = load_config(AuditConfig, overrides={"workers": 1, **search})
    report = audit_leakage(root / "A", root / "B_copies", config)
    assert report.search == expected_search
    found = {(pair.file_a, pair.file_b): pair for pair in report.pairs}
    missed = []
    for copy, (source, name) in copies.items():
        pair = found.get((source, copy))
        expected_kind = TRANSFORMS[name][2]
        if pair is None or pair.kind != expected_kind:
            missed.append(f"{name}: {copy.name} ({pair.kind if pair else 'not found'})")
    assert not missed, "copies missed or misclassified:\n" + "\n".join(missed)
    # Nothing beyond the copies: each copy pairs with its own source only.
    assert len(report.pairs) == len(copies)
    assert report.has_leakage and not report.unreadable


def test_distinct_real_crops_give_no_pair(folders, config):
    root, _, _ = folders
    report = audit_leakage(root / "A", root / "B_distinct", config)
    assert report.images_a == DISTINCT_A and report.images_b == DISTINCT_B
    assert report.pairs == [], [f"{p.kind} {p.file_a.name} {p.file_b.name} {p.distance}" for p in report.pairs]
    assert not report.has_leakage
    assert report.verified_pairs >= DISTINCT_B  # the nearest candidate of every image was verified


def test_exact_duplicates_within_a_folder_and_shared_patients_are_reported(folders, config, tmp_path):
    root, _, sources = folders
    folder_b = tmp_path / "B"
    distinct = sorted((root / "B_distinct").glob("*/*.png"))[:30]
    for path in distinct:
        _link(path.resolve(), folder_b / path.parent.name)
    # The same pixels under another name and another PNG compression: an exact duplicate.
    duplicate = folder_b / "again.png"
    pixels = cv2.imread(str(distinct[0]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(duplicate), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 0])
    # The other knee of a patient of folder A (OAI names: the patient id is in the name).
    source = sources[3]
    other_side = "R" if source.stem.endswith("L") else "L"
    other_knee = next(source.parent.parent.glob(f"*/{source.stem[:7]}{other_side}.png"))
    _link(other_knee, folder_b / "1")

    report = audit_leakage(root / "A", folder_b, config)
    kinds = {(pair.file_a.name, pair.file_b.name): pair.kind for pair in report.pairs}
    assert kinds[(distinct[0].name, "again.png")] == DUPLICATE_IN_B
    assert report.shared_patients == [source.stem[:7]]
    # The other knee is a mirror image of the first: flagged as a patient overlap, or as a
    # mirrored copy when the two knees are that alike; either way as leakage.
    assert kinds[(source.name, other_knee.name)] in (PATIENT_OVERLAP, MIRRORED_COPY)
    assert report.has_leakage


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["file_a", "file_b", "kind", "distance"]
        return list(reader)


def test_cli_exits_with_leakage_code_and_writes_leakage_csv(folders, tmp_path):
    root, copies, _ = folders
    folder_b = tmp_path / "B"
    chosen = [copy for copy, (_, name) in copies.items() if name in ("clahe", "mirrored", "renamed")][:6]
    for copy in chosen:
        _link(copy, folder_b)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["audit", str(root / "A"), str(folder_b), "--out", str(out), "--no-progress"])
    assert result.exit_code == EXIT_LEAKAGE, result.output
    rows = _read_csv(out / "leakage.csv")
    assert {Path(row["file_b"]).name for row in rows} == {copy.name for copy in chosen}
    assert all(row["kind"] in LEAKAGE_KINDS for row in rows)
    assert all(row["distance"] != "" and 0 <= float(row["distance"]) < 0.3 for row in rows)
    assert (out / "args.yaml").is_file()
    assert "LEAKAGE" in result.output


def test_cli_exits_zero_without_leakage_and_three_with_an_unreadable_file(folders, tmp_path):
    root, _, _ = folders
    folder_b = tmp_path / "B"
    for path in sorted((root / "B_distinct").glob("*/*.png"))[:80]:
        _link(path.resolve(), folder_b / path.parent.name)
    out = tmp_path / "clean"
    # Two workers: the spawned pool fingerprints folder A.
    args = ["audit", str(root / "A"), str(folder_b), "--out", str(out), "--no-progress", "--workers", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_OK, result.output
    assert _read_csv(out / "leakage.csv") == []

    (folder_b / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "broken"
    result = CliRunner().invoke(app, ["audit", str(root / "A"), str(folder_b), "--out", str(out), "--no-progress"])
    assert result.exit_code == EXIT_FILE_ERRORS, result.output
    assert "broken.png" in result.output


def test_cli_refuses_the_same_folder_twice(folders, tmp_path):
    root, _, _ = folders
    result = CliRunner().invoke(app, ["audit", str(root / "A"), str(root / "A"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "same folder" in result.output


def test_fingerprint_sees_through_mirroring_and_digest_through_file_format(oai_dir, tmp_path):
    crop_path = next((oai_dir / "val" / "2").glob("*.png"))
    pixels = cv2.imread(str(crop_path), cv2.IMREAD_GRAYSCALE)
    mirrored = spectrum_descriptor(np.ascontiguousarray(pixels[:, ::-1]))
    assert float(spectrum_descriptor(pixels) @ mirrored) == pytest.approx(1.0, abs=1e-5)
    cv2.imwrite(str(tmp_path / "same.tiff"), pixels)
    assert pixel_digest(cv2.imread(str(tmp_path / "same.tiff"), cv2.IMREAD_GRAYSCALE)) == pixel_digest(pixels)
    assert pixel_digest(_gamma(pixels, 1.01)) != pixel_digest(pixels)


def test_copy_evidence_separates_a_copy_from_the_other_knee_of_another_patient(oai_dir):
    first, second = _one_crop_per_patient(oai_dir / "val")[:2]
    a = cv2.imread(str(first), cv2.IMREAD_GRAYSCALE)
    b = cv2.imread(str(second), cv2.IMREAD_GRAYSCALE)
    copy = copy_evidence(a, _crop_and_shift(cv2.equalizeHist(a))[:, ::-1])
    assert copy.mirrored and copy.correlation > 0.8
    assert copy_evidence(a, b).correlation < 0.67


def test_patient_id_follows_the_oai_naming():
    pattern = load_config(AuditConfig).patient_pattern
    assert patient_id("val/3/9001695R.png", pattern) == "9001695"
    assert patient_id("scan_001_renamed.png", pattern) is None
    assert patient_id("9001695R.png", None) is None


def test_a_file_that_cannot_be_read_again_to_verify_is_listed_not_passed(folders, config, monkeypatch):
    from kneepipe.audit import leakage

    root, copies, _ = folders
    copy = next(path for path, (_, name) in copies.items() if name == "resize299")  # verified, not an exact copy
    seen: set = set()
    real_read = leakage._read_pixels

    def changed_after_fingerprinting(path, max_side):
        if path == copy and path in seen:
            raise OSError("the file changed on disk")
        seen.add(path)
        return real_read(path, max_side)

    monkeypatch.setattr(leakage, "_read_pixels", changed_after_fingerprinting)
    report = audit_leakage(root / "A", copy.parent, config)
    assert [(path, "could not be read again" in reason) for path, reason in report.unreadable] == [(copy, True)]
    assert copy not in {pair.file_b for pair in report.pairs}
