"""Patient-level, grade-stratified train/val/test splits of a folder of labelled crops.

Both knees of a patient share a film, an exposure and a body; a split that puts one
knee in train and the other in test leaks (the audit flags such pairs). So the unit of
the split is the patient, never the knee. Patients are stratified by their highest KL
grade (the knee that decides most about a patient's disease), shuffled with a fixed
seed within each stratum, and dealt to the parts in the requested proportions, so each
part sees every grade in about the same share.

The output folder holds ``split.csv`` (``file,part,kl_grade,patient_id,side``; ``file``
is the source crop's absolute path) and, unless ``link="none"``, the same layout as the
OAI data, ``<part>/<kl_grade>/<file>`` as symbolic links, so ``kneepipe train grader``
can use the folder as its data.

>>> summary = split_dataset("crops/", "split/", fractions=(0.7, 0.15, 0.15))  # doctest: +SKIP
>>> summary.parts["test"].grade_counts  # doctest: +SKIP
[229, 105, 152, 76, 18]
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kneepipe import KL_GRADES
from kneepipe.files import write_csv_atomic

PART_NAMES = ("train", "val", "test")
SPLIT_COLUMNS = ("file", "part", "kl_grade", "patient_id", "side")
OAI_PATIENT_PATTERN = r"^(?P<patient_id>\d{7})(?P<side>[LR])"


@dataclass(frozen=True)
class LabelledCrop:
    """One crop found for the split: its file, true grade, patient and side (when named)."""

    path: Path
    kl_grade: int
    patient_id: str
    side: str


@dataclass
class PartSummary:
    """What one part of a split holds."""

    patients: int = 0
    knees: int = 0
    grade_counts: list[int] = field(default_factory=lambda: [0] * len(KL_GRADES))

    @property
    def grade_shares(self) -> list[float]:
        """Share of each KL grade among the part's knees."""
        return [round(count / self.knees, 4) if self.knees else 0.0 for count in self.grade_counts]


@dataclass
class SplitSummary:
    """The outcome of :func:`split_dataset`."""

    out_dir: Path
    split_csv: Path
    parts: dict[str, PartSummary]
    without_patient_id: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def find_labelled_crops(
    data_root: str | os.PathLike, patient_pattern: str | None = OAI_PATIENT_PATTERN
) -> tuple[list[LabelledCrop], list[tuple[Path, str]]]:
    """Every crop under ``data_root`` whose folder is named by its KL grade (``.../<0-4>/<file>``).

    Returns the crops and the images skipped with the reason (not in a grade folder).
    A crop whose name carries no patient id becomes its own patient (its file stem).
    """
    from kneepipe.imaging import find_images

    data_root = Path(data_root)
    grades = {str(grade): grade for grade in KL_GRADES}
    compiled = re.compile(patient_pattern) if patient_pattern else None
    crops: list[LabelledCrop] = []
    skipped: list[tuple[Path, str]] = []
    for path in find_images(data_root):
        if path.parent.name not in grades or path.parent == data_root:
            skipped.append((path, "not inside a folder named by its KL grade (0-4)"))
            continue
        match = compiled.match(path.stem) if compiled else None
        if match is not None:
            groups = match.groupdict()
            patient = groups.get("patient_id") or (match.group(1) if match.re.groups else match.group(0))
            side = groups.get("side") or ""
        else:
            patient, side = "", ""
        crops.append(LabelledCrop(path, grades[path.parent.name], patient, side))
    return crops, skipped


def _deal(count: int, fractions: Sequence[float]) -> list[int]:
    """Split ``count`` items into parts by ``fractions`` (largest remainder; sums to ``count``)."""
    exact = np.asarray(fractions, dtype=float) * count
    sizes = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - sizes), kind="stable")[: count - sizes.sum()]:
        sizes[index] += 1
    return sizes.tolist()


def assign_parts(crops: Sequence[LabelledCrop], fractions: Sequence[float], seed: int = 0) -> dict[str, str]:
    """Map each patient to a part: stratified by the patient's highest grade, seeded shuffle.

    Crops without a patient id count as their own patient (keyed by file path).
    """
    worst: dict[str, int] = defaultdict(int)
    for crop in crops:
        key = crop.patient_id or str(crop.path)
        worst[key] = max(worst[key], crop.kl_grade)
    rng = np.random.default_rng(seed)
    part_of: dict[str, str] = {}
    for grade in KL_GRADES:
        stratum = sorted(key for key, top in worst.items() if top == grade)
        stratum = [stratum[i] for i in rng.permutation(len(stratum))]
        start = 0
        for part, size in zip(PART_NAMES, _deal(len(stratum), fractions), strict=True):
            for key in stratum[start : start + size]:
                part_of[key] = part
            start += size
    return part_of


def _link_name(crop: LabelledCrop, used: set[Path], part_dir: Path) -> Path:
    target = part_dir / str(crop.kl_grade) / crop.path.name
    counter = 2
    while target in used:  # two sources with one file name (e.g. merged folders): keep both
        target = part_dir / str(crop.kl_grade) / f"{crop.path.stem}_{counter}{crop.path.suffix}"
        counter += 1
    used.add(target)
    return target


def split_dataset(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    link: str = "symlink",
    patient_pattern: str | None = OAI_PATIENT_PATTERN,
) -> SplitSummary:
    """Split the labelled crops under ``data_root`` by patient into train/val/test.

    Args:
        data_root: a folder with crops in ``<kl_grade>/`` folders at any depth (the OAI
            root, with its ``train/`` and ``val/``, is pooled and re-split).
        out_dir: a new or empty folder for ``split.csv`` and the link tree.
        fractions: shares of patients in train, val and test (summing to 1; a zero
            share leaves that part out).
        seed: the shuffle's seed; the same seed gives the same split.
        link: ``"symlink"`` to build ``<part>/<kl_grade>/<file>`` links, ``"none"`` for
            the CSV only.
        patient_pattern: regular expression on a file name (no suffix) with groups
            ``patient_id`` and optionally ``side``; None = every crop its own patient.

    Raises:
        FileNotFoundError: ``data_root`` does not exist.
        ValueError: bad fractions, no labelled crop found, or ``out_dir`` not empty.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    if len(fractions) != len(PART_NAMES) or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(
            f"fractions must be three non-negative shares (train, val, test) summing to 1, got {list(fractions)}"
        )
    if link not in ("symlink", "none"):
        raise ValueError(f"link must be 'symlink' or 'none', got {link!r}")
    crops, skipped = find_labelled_crops(data_root, patient_pattern)
    if not crops:
        raise ValueError(f"{data_root}: no crops found in folders named by KL grade (<0-4>/<file>)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir}: folder is not empty; give a new or empty folder for the split")
    out_dir.mkdir(parents=True, exist_ok=True)

    part_of = assign_parts(crops, fractions, seed)
    parts = {name: PartSummary() for name, share in zip(PART_NAMES, fractions, strict=True) if share > 0}
    patients_seen: dict[str, set[str]] = defaultdict(set)
    rows: list[dict[str, object]] = []
    used: set[Path] = set()
    for crop in sorted(crops, key=lambda c: (part_of[c.patient_id or str(c.path)], c.kl_grade, str(c.path))):
        key = crop.patient_id or str(crop.path)
        part = part_of[key]
        source = crop.path.resolve()
        rows.append(
            dict(zip(SPLIT_COLUMNS, (str(source), part, crop.kl_grade, crop.patient_id, crop.side), strict=True))
        )
        summary = parts[part]
        summary.knees += 1
        summary.grade_counts[crop.kl_grade] += 1
        patients_seen[part].add(key)
        if link == "symlink":
            target = _link_name(crop, used, out_dir / part)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    for part, keys in patients_seen.items():
        parts[part].patients = len(keys)
    split_csv = write_csv_atomic(out_dir / "split.csv", SPLIT_COLUMNS, rows)
    return SplitSummary(
        out_dir=out_dir,
        split_csv=split_csv,
        parts=parts,
        without_patient_id=sum(1 for crop in crops if not crop.patient_id),
        skipped=skipped,
    )


def read_split(split_csv: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a ``split.csv`` as dicts (``file``, ``part``, ``kl_grade``, ``patient_id``, ``side``)."""
    with open(split_csv, newline="") as handle:
        return list(csv.DictReader(handle))
