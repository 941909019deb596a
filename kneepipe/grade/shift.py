"""The shift score: how unlike the grader's training images a batch of crops is.

A grader is trustworthy on images like those it learned from. The score compares the
batch's mean feature vector (the global average of Xception's last activation, 2048
values per crop) with the training set's, feature by feature in units of the training
standard deviation, and removes what the batch's own sampling noise adds::

    score = sqrt(max(0, mean_j [ (m_j - mu_j)^2 - s_j^2 / n ] / sigma_j^2))

``m, s`` are the batch's feature means and standard deviations over ``n`` crops and
``mu, sigma`` the training set's. It is a root-mean-square standardised mean difference:
0 for a batch drawn like the training data whatever its size, and about 1 when the
average feature has moved by one training standard deviation. Measured on the shipped
grader: OAI val 0.00, another clinic's knees 1.70 (see GRADER.md). Above
:data:`DEFAULT_WARN` the grades may not be reliable.

The training statistics of a grader file ``G.npz`` live beside it in ``G.reference.npz``
(the shipped grader's) or inside it (a site grader's, from its site sample); both name
the grader digest or sample they were computed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kneepipe.files import write_atomic

# A batch scoring above this is unlike the grader's training data (OAI val scores 0.0-0.15
# in batches of 32 knees, another clinic 1.5-1.75).
DEFAULT_WARN = 0.5
# Below this many crops the score is too noisy to report.
MIN_CROPS = 8


@dataclass(frozen=True)
class ShiftReference:
    """Per-feature mean and variance of the grader's features on its training crops."""

    mean: np.ndarray
    var: np.ndarray
    n: int
    source: str  # what the statistics were computed on

    @classmethod
    def from_features(cls, features: np.ndarray, source: str) -> ShiftReference:
        features = np.asarray(features, dtype=np.float64)
        return cls(features.mean(axis=0), features.var(axis=0, ddof=1), len(features), source)

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The statistics as named arrays (for an ``.npz`` file)."""
        return {
            f"{prefix}mean": self.mean.astype(np.float32),
            f"{prefix}var": self.var.astype(np.float32),
            f"{prefix}n": np.array(self.n),
            f"{prefix}source": np.array(self.source),
        }

    @classmethod
    def from_arrays(cls, archive, prefix: str = "") -> ShiftReference:
        return cls(
            np.asarray(archive[f"{prefix}mean"], dtype=np.float64),
            np.asarray(archive[f"{prefix}var"], dtype=np.float64),
            int(archive[f"{prefix}n"]),
            str(archive[f"{prefix}source"]),
        )


def shift_score(features: np.ndarray, reference: ShiftReference) -> float | None:
    """The batch's shift score (see the module doc); None below :data:`MIN_CROPS` crops."""
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if n < MIN_CROPS:
        return None
    keep = reference.var > 1e-8 * max(float(reference.var.max()), 1e-30)  # dead features carry no signal
    mean = features[:, keep].mean(axis=0)
    noise = features[:, keep].var(axis=0, ddof=1) / n
    excess = ((mean - reference.mean[keep]) ** 2 - noise) / reference.var[keep]
    return float(np.sqrt(max(0.0, excess.mean())))


def reference_path(grader_path: str | Path) -> Path:
    """Where the training statistics of the grader file ``G.npz`` live: ``G.reference.npz``."""
    grader_path = Path(grader_path)
    return grader_path.with_name(grader_path.stem + ".reference.npz")


def write_reference(reference: ShiftReference, path: str | Path, grader_digest: str) -> Path:
    """Write a grader's statistics to ``path`` (grading finds them at :func:`reference_path`), naming its digest."""
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, grader=np.array(grader_digest), **reference.arrays())
    return write_atomic(Path(path), buffer.getvalue())


def read_reference(grader_path: str | Path, grader_digest: str) -> tuple[ShiftReference | None, str]:
    """The training statistics stored for a grader file, or None and why there are none.

    A site grader carries them inside (``ref_*`` arrays); other graders beside them
    (:func:`reference_path`), accepted only when they name this grader's digest.
    """
    grader_path = Path(grader_path)
    with np.load(grader_path, allow_pickle=False) as archive:
        if "ref_mean" in archive.files:
            return ShiftReference.from_arrays(archive, "ref_"), ""
    sidecar = reference_path(grader_path)
    if not sidecar.exists():
        return None, f"no training statistics for {grader_path.name} ({sidecar.name} is missing)"
    with np.load(sidecar, allow_pickle=False) as archive:
        if str(archive["grader"]) != grader_digest:
            return None, f"{sidecar.name} belongs to another grader ({archive['grader']}, not {grader_digest})"
        return ShiftReference.from_arrays(archive), ""


def shift_facts(score: float | None, n: int, warn_above: float, reason: str = "", site: bool = False) -> dict:
    """The shift score as written to ``metrics.json``/``summary.json`` and read by reports.

    ``site``: the grader is a site grader, whose reference is its site sample.
    """
    facts: dict = {"shift_score": None if score is None else round(score, 3), "shift_warn_above": warn_above}
    if score is None:
        facts["shift_note"] = reason or f"not computed: fewer than {MIN_CROPS} crops graded ({n})"
        facts["shift_warning"] = False
    else:
        facts["shift_warning"] = bool(score > warn_above)
        if facts["shift_warning"]:
            facts["shift_note"] = (
                f"shift score {score:.2f} > {warn_above}: these images are unlike the site sample this grader "
                "was fitted on, so the grades may be unreliable; fit a site grader for them with `kneepipe adapt`"
                if site
                else f"shift score {score:.2f} > {warn_above}: these images are unlike the grader's training data, "
                "so the grades may be unreliable; calibrate the grader to this site with `kneepipe adapt`"
            )
    return facts


def fit_reference(grader, crops, source: str, batch_size: int = 32, progress=None) -> ShiftReference:
    """The statistics of ``grader``'s features on ``crops`` (its training crops), in batches."""
    parts = []
    for start in range(0, len(crops), batch_size):
        parts.append(grader.predict_with_features(crops[start : start + batch_size], batch_size)[1])
        if progress:
            progress(min(start + batch_size, len(crops)), len(crops))
    return ShiftReference.from_features(np.concatenate(parts), source)
