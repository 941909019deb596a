"""Patient-level splits of real OAI crops: no patient in two parts, every crop in one, grades balanced."""

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kneepipe.audit.config import AuditConfig
from kneepipe.audit.leakage import PATIENT_OVERLAP, audit_leakage
from kneepipe.audit.split import assign_parts, find_labelled_crops, split_dataset
from kneepipe.cli import app
from kneepipe.cli_common import EXIT_CONFIG, EXIT_OK
from kneepipe.config import load_config

PATIENTS = 200  # both knees each: 400 crops


@pytest.fixture(scope="module")
def crops_root(oai_dir, tmp_path_factory):
    """400 real crops of 200 train patients (both knees), linked into ``<kl_grade>/`` folders."""
    root = tmp_path_factory.mktemp("split") / "crops"
    by_patient = defaultdict(list)
    for path in sorted((oai_dir / "train").glob("*/*.png")):
        by_patient[path.stem[:7]].append(path)
    patients = sorted(by_patient)[:: len(by_patient) // PATIENTS][:PATIENTS]
    for patient in patients:
        for path in by_patient[patient]:
            target = root / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    return root


def _rows(split_csv: Path) -> list[dict[str, str]]:
    with open(split_csv, newline="") as handle:
        return list(csv.DictReader(handle))


def test_no_patient_in_two_parts_and_every_crop_in_exactly_one(crops_root, tmp_path):
    summary = split_dataset(crops_root, tmp_path / "split", fractions=(0.6, 0.2, 0.2), seed=0)
    rows = _rows(summary.split_csv)
    sources = sorted(str(path.resolve()) for path in crops_root.glob("*/*.png"))
    assert sorted(row["file"] for row in rows) == sources  # each crop once
    parts_of_patient = defaultdict(set)
    for row in rows:
        parts_of_patient[row["patient_id"]].add(row["part"])
    assert len(parts_of_patient) == PATIENTS
    assert all(len(parts) == 1 for parts in parts_of_patient.values())
    # Patients dealt in the requested proportions (largest remainder within each grade stratum).
    patients = Counter(next(iter(parts)) for parts in parts_of_patient.values())
    assert abs(patients["train"] - 0.6 * PATIENTS) <= 5 and abs(patients["test"] - 0.2 * PATIENTS) <= 5
    assert {part: s.patients for part, s in summary.parts.items()} == dict(patients)


def test_grade_proportions_of_each_part_stay_close_to_the_whole(crops_root, tmp_path):
    summary = split_dataset(crops_root, tmp_path / "split", fractions=(0.6, 0.2, 0.2), seed=1)
    rows = _rows(summary.split_csv)
    overall = np.bincount([int(row["kl_grade"]) for row in rows], minlength=5) / len(rows)
    for part, part_summary in summary.parts.items():
        shares = np.array(part_summary.grade_shares)
        assert np.abs(shares - overall).max() < 0.08, (part, shares.round(3), overall.round(3))
        assert part_summary.knees == sum(part_summary.grade_counts)


def test_link_tree_has_the_oai_layout_and_passes_the_audit(crops_root, tmp_path):
    out = tmp_path / "split"
    summary = split_dataset(crops_root, out, fractions=(0.7, 0.15, 0.15), seed=0)
    for row in _rows(summary.split_csv):
        link = out / row["part"] / row["kl_grade"] / Path(row["file"]).name
        assert link.is_symlink() and link.resolve() == Path(row["file"])
    report = audit_leakage(out / "train", out / "test", load_config(AuditConfig, overrides={"workers": 1}))
    assert report.shared_patients == []
    assert not [pair for pair in report.pairs if pair.kind == PATIENT_OVERLAP]


def test_same_seed_same_split_and_unnamed_crops_are_their_own_patients(crops_root):
    crops, skipped = find_labelled_crops(crops_root)
    assert not skipped
    assert assign_parts(crops, (0.6, 0.2, 0.2), seed=3) == assign_parts(crops, (0.6, 0.2, 0.2), seed=3)
    assert assign_parts(crops, (0.6, 0.2, 0.2), seed=3) != assign_parts(crops, (0.6, 0.2, 0.2), seed=4)
    unnamed, _ = find_labelled_crops(crops_root, patient_pattern=None)
    assert len(assign_parts(unnamed, (0.6, 0.2, 0.2))) == len(unnamed)


def test_split_refuses_a_non_empty_folder_and_bad_fractions(crops_root, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.csv").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        split_dataset(crops_root, tmp_path / "full")
    with pytest.raises(ValueError, match="summing to 1"):
        split_dataset(crops_root, tmp_path / "new", fractions=(0.5, 0.2, 0.2))


def test_cli_split_writes_csv_links_and_prints_the_grade_distribution(crops_root, tmp_path):
    out = tmp_path / "split"
    result = CliRunner().invoke(app, ["split", str(crops_root), "--out", str(out), "--fractions", "0.8,0.2,0"])
    assert result.exit_code == EXIT_OK, result.output
    assert {row["part"] for row in _rows(out / "split.csv")} == {"train", "val"}
    assert not (out / "test").exists()
    assert "KL4" in result.output and "val" in result.output
    assert (out / "args.yaml").is_file()
    result = CliRunner().invoke(app, ["split", str(crops_root), "--out", str(tmp_path / "x"), "--fractions", "a,b"])
    assert result.exit_code == EXIT_CONFIG
