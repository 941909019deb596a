"""Which knee a joint crop shows, read from its anatomy, and how the side sources are reconciled.

A knee's side can come from three places: the file's DICOM laterality tag, the anatomy
inside the crop (the fibula is lateral: on a standard AP display a right knee's fibula is
on the image's left) and the knee's position on a bilateral film (the patient's right
knee on the image's left). :class:`SideClassifier` reads the anatomy: a linear model on a
small grey-level thumbnail, built antisymmetric under mirroring (it sees only the
difference between the crop and its mirror image, and has no bias), so a mirrored crop
gets exactly the opposite side with the same confidence. It is trained on the OAI
training crops (``kneepipe train side``), whose file names carry the side, and stored in
``kneepipe/weights/side.npz`` (a few hundred numbers).

:func:`decide_side` then picks the side: the tag when there is one, else the anatomy;
position only checks. When the sources disagree, the message says so and the knee is
flagged for review (a mirrored film, or a tag naming the wrong knee).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kneepipe.files import file_version
from kneepipe.joints import Side

DEFAULT_SIDE_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "side.npz"
"""The side classifier shipped in the package."""

_SIDE_IN_NAME = re.compile(r"([LR])\.png$", re.IGNORECASE)


def side_features(crops: Sequence[np.ndarray] | np.ndarray, size: int) -> np.ndarray:
    """The classifier's input: the left half of (thumbnail - its mirror image), per crop.

    Each crop is shrunk to ``size`` x ``size`` and standardised (zero mean, unit spread),
    so the film's exposure does not matter. Mirroring a crop negates its features.

    >>> crop = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    >>> bool(np.allclose(side_features([crop], 8), -side_features([crop[:, ::-1]], 8)))
    True
    """
    features = np.empty((len(crops), size * (size // 2)), np.float32)
    for index, crop in enumerate(crops):
        thumbnail = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
        thumbnail = (thumbnail - thumbnail.mean()) / (thumbnail.std() + 1e-6)
        features[index] = (thumbnail - thumbnail[:, ::-1])[:, : size // 2].ravel()
    return features


@dataclass(frozen=True)
class SideClassifier:
    """The anatomy side classifier: a crop in, the probability that it shows a right knee out.

    Attributes:
        coefficients: the linear weights over :func:`side_features`.
        size: the thumbnail side the weights were fitted at.
        version: the weights file's name and content hash.
    """

    coefficients: np.ndarray
    size: int
    version: str = ""

    @classmethod
    def load(cls, path: Path | None = None) -> SideClassifier:
        """Load ``side.npz`` (default: the shipped one).

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not a side classifier.

        >>> SideClassifier.load().size
        16
        """
        path = Path(path) if path else DEFAULT_SIDE_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path}: side classifier weights not found")
        with np.load(path, allow_pickle=False) as stored:
            if "coefficients" not in stored or "size" not in stored:
                raise ValueError(f"{path}: not a side classifier (no coefficients/size)")
            coefficients = stored["coefficients"].astype(np.float32)
            size = int(stored["size"])
        if coefficients.shape != (size * (size // 2),):
            raise ValueError(f"{path}: {coefficients.shape[0]} coefficients do not fit a {size}-px thumbnail")
        return cls(coefficients, size, file_version(path))

    def probability_right(self, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """P(the crop shows a right knee) per crop, from its anatomy alone."""
        if len(crops) == 0:
            return np.empty(0, np.float32)
        logits = side_features(crops, self.size) @ self.coefficients
        return 1.0 / (1.0 + np.exp(-logits))

    def read(self, crop: np.ndarray) -> tuple[Side, float]:
        """The side a crop's anatomy shows and the classifier's confidence in it (0.5-1)."""
        right = float(self.probability_right([crop])[0])
        return ("R", right) if right >= 0.5 else ("L", 1.0 - right)


def side_from_name(path: Path) -> Side | None:
    """The side an OAI crop's file name carries (``9001695R.png`` -> ``"R"``).

    >>> side_from_name(Path("train/2/9001695L.png"))
    'L'
    """
    match = _SIDE_IN_NAME.search(path.name)
    return match.group(1).upper() if match else None  # type: ignore[return-value]


def train_side_classifier(crops_dir: Path, out: Path, size: int = 16, c: float = 0.01) -> dict[str, float | int]:
    """Fit the side classifier on ``crops_dir/train`` and measure it on ``crops_dir/val``; write ``out``.

    ``crops_dir`` is laid out as the OAI crops are: ``{train,val}/<kl_grade>/<patient><side>.png``.
    A logistic regression (scikit-learn, L2 with inverse strength ``c``, no intercept so
    the model stays antisymmetric under mirroring) on :func:`side_features`.

    Returns:
        the counts and accuracies on train and val, also stored in the file.

    Raises:
        FileNotFoundError: a split has no crops named by side.

    >>> train_side_classifier(Path("oai-kl224"), Path("side.npz"))  # doctest: +SKIP
    {'train_crops': 5778, 'train_accuracy': 0.987, 'val_crops': 826, 'val_accuracy': 0.9818, ...}
    """
    from sklearn.linear_model import LogisticRegression

    splits = {}
    for split in ("train", "val"):
        paths = sorted(p for p in (crops_dir / split).glob("*/*.png") if side_from_name(p))
        if not paths:
            raise FileNotFoundError(f"{crops_dir / split}: no crops named <patient><L|R>.png under <kl_grade>/")
        crops = [_read_gray(p) for p in paths]
        labels = np.array([side_from_name(p) == "R" for p in paths])
        splits[split] = (side_features(crops, size), labels)
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=5000).fit(*splits["train"])
    coefficients = model.coef_[0].astype(np.float32)
    metrics: dict[str, float | int] = {"size": size, "c": c}
    for split, (features, labels) in splits.items():
        predicted = (features @ coefficients) > 0
        metrics[f"{split}_crops"] = len(labels)
        metrics[f"{split}_accuracy"] = round(float(np.mean(predicted == labels)), 4)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as handle:
        np.savez(
            handle,
            coefficients=coefficients,
            size=np.int64(size),
            metrics=np.array(sorted(f"{k}={v}" for k, v in metrics.items())),
        )
    return metrics


def _read_gray(path: Path) -> np.ndarray:
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise ValueError(f"{path}: cannot read the crop")
    return pixels


@dataclass(frozen=True)
class SideDecision:
    """The side given to one knee, which source gave it, and any doubt to report.

    ``doubt`` is empty when the sources agree; else it says what disagreed (or that the
    anatomy was unsure), for the detection's message and the knee's review reason.
    """

    side: Side
    source: str  # "tag", "position" or "anatomy"
    doubt: str = ""


def decide_side(
    anatomy: tuple[Side, float],
    tag: Side | None = None,
    position: Side | None = None,
    min_anatomy: float = 0.75,
) -> SideDecision:
    """One knee's side from its sources, and whether they disagree.

    The file's laterality tag decides when there is one. Otherwise a knee of a bilateral
    film takes its position (the patient's right knee on the image's left: the
    radiographers' side markers agreed with it on every shared bilateral film, the
    anatomy did not on one), and a single knee takes its anatomy. The anatomy
    (``(side, confidence)`` from :class:`SideClassifier`) checks the others from
    ``min_anatomy`` up; when it disagrees (a mirrored film, a tag naming the wrong knee)
    ``doubt`` says so. A single knee read with less than ``min_anatomy`` is doubtful too.

    >>> decide_side(("L", 0.97), position="R").doubt
    'side conflict: position on the film reads R, the anatomy (fibula side) reads L (0.97)'
    >>> decide_side(("R", 0.9), tag="R")
    SideDecision(side='R', source='tag', doubt='')
    """
    read, confidence = anatomy
    for source, side in (("tag", tag), ("position", position)):
        if side is None:
            continue
        what = "the laterality tag says" if source == "tag" else "position on the film reads"
        if confidence >= min_anatomy and read != side:
            return SideDecision(
                side, source, f"side conflict: {what} {side}, the anatomy (fibula side) reads {read} ({confidence:.2f})"
            )
        return SideDecision(side, source)
    if confidence < min_anatomy:
        return SideDecision(read, "anatomy", f"side uncertain: the anatomy reads {read} with only {confidence:.2f}")
    return SideDecision(read, "anatomy")
