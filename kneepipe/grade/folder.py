"""``kneepipe grade``: grade every crop of a folder, and evaluate when the folder is labelled.

Writes ``grades.csv`` (``crop,kl_grade,p0..p4,status,message``), ``args.yaml`` and, when
the crops sit in folders named by their true grade, ``metrics.json``. An unreadable crop
gets ``status=error`` with the reason; the batch goes on.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kneepipe.config import save_config
from kneepipe.files import write_csv_atomic
from kneepipe.grade.config import GradeConfig
from kneepipe.grade.data import fit_crop, grade_from_path
from kneepipe.grade.features import content_key, content_order, statistics_of
from kneepipe.grade.model import decide_grades
from kneepipe.imaging import ImageReadError, list_inputs, read_radiograph
from kneepipe.metrics import grading_metrics

GRADES_COLUMNS = ["crop", "kl_grade", "p0", "p1", "p2", "p3", "p4", "status", "message"]


@dataclass
class GradeRun:
    """What a grading run produced: per-crop rows, optional metrics, and prior facts."""

    rows: list[dict[str, Any]]
    metrics: dict[str, Any] | None = None
    priors: dict[str, Any] = field(default_factory=dict)
    shift: dict[str, Any] = field(default_factory=dict)

    @property
    def refused(self) -> list[dict[str, Any]]:
        """Crops that could not be read or graded (``error`` rows)."""
        return [row for row in self.rows if row["status"] not in ("ok", "skipped")]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Entries that are not read (not images, hidden, special files), with the reason."""
        return [row for row in self.rows if row["status"] == "skipped"]


def adjust_for_prior(
    probabilities: np.ndarray,
    train_prior: np.ndarray,
    config: GradeConfig,
    decision: str = "argmax",
    shift: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Regrade with a known prior (``config.prior``) or one estimated by EM (``adapt_prior``).

    EM's estimate is held towards the training mix by ``config.adapt_prior_concentration``
    pseudo-knees (MAP-EM, :func:`~kneepipe.grade.prior.estimate_prior_em`). It is applied
    only when the likelihood-ratio test rejects the training prior at
    ``config.adapt_prior_alpha``; otherwise the batch keeps its probabilities, and the facts
    say so (``prior_test``). It is declined, with the reason, when the batch's shift score
    warns (``shift``, :func:`batch_shift`: images unlike the training data are not a pure
    label shift) or when :func:`label_shift_guard` refuses it. A known prior is always applied.
    """
    facts: dict[str, Any] = {"train_prior": np.round(train_prior, 4).tolist()}
    if not (config.prior or config.adapt_prior) or not len(probabilities):
        return probabilities, facts
    from kneepipe.grade.prior import estimate_prior_em, parse_prior, prior_shift_test, reweight

    if config.prior:
        prior = parse_prior(config.prior)
        facts["given_prior"] = np.round(prior, 4).tolist()
        return reweight(probabilities, train_prior, prior), facts
    prior, adjusted = estimate_prior_em(probabilities, train_prior, concentration=config.adapt_prior_concentration)
    statistic, p_value = prior_shift_test(probabilities, train_prior, prior)
    shifted = p_value < config.adapt_prior_alpha
    declined = shifted and (
        _shift_refusal(shift)
        or label_shift_guard(probabilities, adjusted, train_prior, prior, config.adapt_prior_max_ratio, decision)
    )
    facts["estimated_prior"] = np.round(prior, 4).tolist()
    facts["prior_pseudo_knees"] = config.adapt_prior_concentration
    facts["prior_test"] = {
        "statistic": round(statistic, 3),
        "p_value": float(f"{p_value:.4g}"),
        "alpha": config.adapt_prior_alpha,
        "n": len(probabilities),
        "applied": bool(shifted and not declined),
    }
    if declined:
        facts["prior_test"]["declined"] = declined
    return (adjusted if shifted and not declined else probabilities), facts


_INSTEAD = (
    "fit a site grader on a labelled sample of this site's knees with `kneepipe adapt`, "
    "or give its known grade mix with --prior"
)
"""What to do when an EM prior is declined (the end of every reason)."""


def _shift_refusal(shift: dict[str, Any] | None) -> str | None:
    """Why a batch whose shift score warns must not be regraded by an EM prior, else None."""
    if not shift or not shift.get("shift_warning"):
        return None
    return (
        f"the batch's shift score {shift['shift_score']:.2f} is above {shift['shift_warn_above']:g}: its images "
        "differ from the training data, so the grade mix cannot be estimated as a pure label shift; grades kept "
        f"unadapted. {_INSTEAD}"
    )


def label_shift_guard(
    probabilities: np.ndarray,
    adjusted: np.ndarray,
    train_prior: np.ndarray,
    prior: np.ndarray,
    max_ratio: float,
    decision: str = "argmax",
) -> str | None:
    """Why an EM prior must not be applied to this batch, or None when it may be.

    EM assumes a pure label shift: the grade mix changed, the images of each grade did
    not. When the images changed too (another site's X-ray system or framing), EM runs
    away and can grade a whole batch with one grade. Two signs of that are refused:
    a grade whose estimated share is more than ``max_ratio`` times its training share
    (a real clinic's grade mix rarely moves that far), and a grade that plain grading
    gives to at least 5% of the batch vanishing from the adapted grades (both decided by ``decision``,
    the grader's rule).
    """
    advice = f"the images differ from the training data, not only the grade mix; grades kept unadapted. {_INSTEAD}"
    ratio = np.asarray(prior) / np.asarray(train_prior)
    worst = int(np.argmax(ratio))
    if ratio[worst] > max_ratio:
        return (
            f"the estimated share of KL{worst} ({prior[worst]:.2f}) is {ratio[worst]:.1f}x its training share "
            f"({train_prior[worst]:.2f}), above {max_ratio:g}x: {advice}"
        )
    n = len(probabilities)
    plain = np.bincount(decide_grades(probabilities, decision), minlength=len(train_prior))
    after = np.bincount(decide_grades(adjusted, decision), minlength=len(train_prior))
    vanished = [g for g in range(len(train_prior)) if plain[g] >= 0.05 * n and after[g] == 0]
    if vanished:
        grade = vanished[0]
        return f"regrading would leave no knee at KL{grade} (plain grading gives it {plain[grade]}): {advice}"
    return None


def _pseudo_knees(priors: dict[str, Any]) -> str:
    """How the EM estimate was held back, for :func:`prior_summary` (nothing for maximum likelihood)."""
    pseudo = priors.get("prior_pseudo_knees") or 0
    return f" (MAP, {pseudo:g} pseudo-knees at the training mix)" if pseudo else ""


def prior_summary(priors: dict[str, Any]) -> str | None:
    """One line on how the batch's grade prior was handled, or None when it was not touched."""
    if "given_prior" in priors:
        return f"regraded with the given prior {priors['given_prior']} (training prior {priors['train_prior']})"
    if "estimated_prior" not in priors:
        return None
    test = priors["prior_test"]
    verdict = (
        "shift significant: regraded with the estimated prior"
        if test["applied"]
        else "no significant shift: graded with the training prior"
    )
    if test.get("declined"):
        verdict = f"shift significant but not a pure label shift: {test['declined']}"
    return (
        f"batch prior estimated by EM{_pseudo_knees(priors)} {priors['estimated_prior']} vs training prior "
        f"{priors['train_prior']}; "
        f"likelihood-ratio test on {test['n']} knees: chi2(4) = {test['statistic']}, p = {test['p_value']:.3g} "
        f"(alpha {test['alpha']}): {verdict}"
    )


def grade_folder(
    crops_root: str | Path, out_dir: str | Path, config: GradeConfig, grader=None, progress=None
) -> GradeRun:
    """Grade every crop under ``crops_root`` (or one file); write the outputs into ``out_dir``.

    Args:
        crops_root: a crop file or a folder searched recursively.
        out_dir: where ``grades.csv``, ``args.yaml`` and ``metrics.json`` go.
        config: the resolved grade config.
        grader: an already loaded :class:`~kneepipe.grade.predict.Grader` (loaded from
            ``config.model`` when None).
        progress: an optional ``callable(n_done, n_total)``.
    """
    from kneepipe.grade.predict import Grader

    crops_root, out_dir = Path(crops_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grader = grader or Grader.from_config(config)
    save_config(
        config, out_dir, extra={"input": str(crops_root), "grader": grader.version, "grader_runtime": grader.runtime}
    )
    listing = list_inputs(crops_root, exclude=(out_dir,))
    files = listing.files
    root = crops_root if crops_root.is_dir() else crops_root.parent

    rows, graded_index, logits, features, sample = _grade_files(files, root, grader, config, progress)
    shift = batch_shift(grader, features, config)
    if use_batch_statistics(shift, len(graded_index), config):
        # The images are unlike the training data: grade again with normalisation statistics
        # re-estimated on this batch (AdaBN); the grader keeps its own statistics afterwards.
        with _batch_statistics(grader, sample, config) as note:
            rows, graded_index, logits, _, _ = _grade_files(files, root, grader, config, progress)
        shift["batch_norm"] = note
    else:
        shift["batch_norm"] = "as trained"
    raw = grader.probabilities(logits, calibrated=False)
    probabilities = grader.probabilities(logits, calibrated=config.calibrated)
    train_prior = np.asarray(grader.preprocessing.train_prior, dtype=float)
    final, priors = adjust_for_prior(probabilities, train_prior, config, grader.preprocessing.decision, shift)
    decided = grader.decide(final)
    for i, p, kl_grade in zip(graded_index, final, decided, strict=True):
        rows[i]["kl_grade"] = int(kl_grade)
        rows[i].update({f"p{g}": f"{p[g]:.4f}" for g in range(5)})
    for entry in listing.skipped:  # every entry gets a row: these are not read, and say why
        rows.append({"crop": str(entry.path), "status": "skipped", "message": entry.reason, "hidden": entry.hidden})
    write_csv_atomic(out_dir / "grades.csv", GRADES_COLUMNS, rows)

    run = GradeRun(rows, priors=priors, shift=shift)
    true = np.array([rows[i]["true_grade"] for i in graded_index], dtype=int)
    if len(true) and (true >= 0).all():
        metrics = grading_metrics(true, final, decided)
        metrics["decision"] = grader.preprocessing.decision
        metrics["ece_uncalibrated"] = grading_metrics(true, raw)["ece"]
        metrics["ece_calibrated"] = grading_metrics(true, probabilities)["ece"]
        metrics["temperature"] = grader.preprocessing.temperature if config.calibrated else 1.0
        metrics["class_bias"] = [round(b, 4) for b in grader.preprocessing.class_bias] if config.calibrated else None
        metrics["grader"] = grader.version
        metrics["refused"] = len(run.refused)
        metrics.update(priors)
        metrics.update(shift)
        run.metrics = metrics
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    else:
        (out_dir / "metrics.json").write_text(json.dumps({"n": len(graded_index), **priors, **shift}, indent=2))
    return run


def grade_crops(grader, crops, config: GradeConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Logits of in-memory crops and the batch's shift facts, with batch-norm statistics as ``config`` says.

    The same rule as :func:`grade_folder`, for crops already decoded (benchmarks, the pipeline's tools).
    """
    logits, features = grader.predict_with_features(crops, config.batch)
    shift = batch_shift(grader, features, config)
    if use_batch_statistics(shift, len(crops), config):
        logits, shift["batch_norm"] = grade_with_batch_statistics(grader, crops, config)
    else:
        shift["batch_norm"] = "as trained"
    return logits, shift


def grade_with_batch_statistics(grader, crops, config: GradeConfig) -> tuple[np.ndarray, str]:
    """Logits of ``crops`` under batch-norm statistics re-estimated on them (of a larger batch, the
    :data:`BATCH_NORM_SAMPLE` crops first in :func:`content_order`: a random sample that does not
    depend on the crops' order), averaged with their mirror images' unless ``mirror_average: never``,
    and how, for the outputs; the grader keeps its own statistics afterwards."""
    pick = content_order(crops)[:BATCH_NORM_SAMPLE]
    with _batch_statistics(grader, [crops[i] for i in pick], config) as note:
        logits = grader.predict_logits(crops, config.batch)
    return logits, note


@contextlib.contextmanager
def _batch_statistics(grader, sample: list[np.ndarray], config: GradeConfig) -> Iterator[str]:
    """Within the block, ``grader`` grades with the batch-norm statistics of ``sample`` and, unless
    ``mirror_average: never``, averages each crop with its mirror image; yields the note that says so."""
    averaged = config.mirror_average != "never"
    with statistics_of(grader, sample, seed=config.seed), grader.mirror_averaged(averaged):
        yield f"re-estimated on {len(sample)} crops of this batch" + (
            ", each crop averaged with its mirror image" if averaged else ""
        )


# Crops kept in memory for re-estimating batch-norm statistics (a random sample of a larger batch).
BATCH_NORM_SAMPLE = 1024


def _grade_files(files, root: Path, grader, config: GradeConfig, progress):
    """Read and grade ``files`` in batches: rows, indices of graded rows, logits, pooled features, and a
    random sample of up to :data:`BATCH_NORM_SAMPLE` crops (for batch-norm statistics): those with the
    lowest :func:`content_key`, so the same files give the same sample in any order."""
    rows: list[dict[str, Any]] = []
    graded_index: list[int] = []
    logits: list[np.ndarray] = []
    features: list[np.ndarray] = []
    kept: list[tuple[int, int, np.ndarray]] = []  # (-key, arrival, crop): a heap whose top has the highest key
    arrivals = itertools.count()  # breaks ties between identical crops, which are interchangeable
    for start in range(0, len(files), config.batch):
        batch_crops = []
        for path in files[start : start + config.batch]:
            row = {
                "crop": str(path),
                "kl_grade": "",
                "status": "ok",
                "message": "",
                "true_grade": grade_from_path(path, root),
            }
            try:
                batch_crops.append(read_radiograph(path).pixels)
                graded_index.append(len(rows))
            except ImageReadError as err:
                row.update(status="error", message=err.reason)
            rows.append(row)
        if batch_crops:
            batch_logits, batch_features = grader.predict_with_features(batch_crops, batch_size=config.batch)
            logits.append(batch_logits)
            features.append(batch_features)
            for crop in batch_crops:  # the crops with the lowest keys: a random sample, whatever the order
                crop = fit_crop(crop, grader.preprocessing.crop_size)
                heapq.heappush(kept, (-content_key(crop), next(arrivals), crop))
                if len(kept) > BATCH_NORM_SAMPLE:
                    heapq.heappop(kept)
        if progress:
            progress(min(start + config.batch, len(files)), len(files))
    units = 5 if grader.preprocessing.head == "softmax" else 4
    return (
        rows,
        graded_index,
        np.concatenate(logits) if logits else np.empty((0, units), np.float32),
        np.concatenate(features) if features else np.empty((0, 0), np.float32),
        [crop for _, _, crop in kept],
    )


def batch_shift(grader, features: np.ndarray, config: GradeConfig) -> dict[str, Any]:
    """The batch's shift score against the grader's training statistics, as facts for the outputs."""
    from kneepipe.grade.shift import shift_facts, shift_score

    reference, reason = grader.shift_reference()
    score = shift_score(features, reference) if reference is not None else None
    facts = shift_facts(score, len(features), config.shift_warn, reason, site=grader.is_site_grader)
    facts["site_grader"] = grader.is_site_grader
    return facts


def use_batch_statistics(shift: dict[str, Any], n: int, config: GradeConfig) -> bool:
    """Whether a batch of ``n`` crops is graded with its own batch-norm statistics (``config.batch_norm``).

    ``auto`` never does it for a site grader: its head was fitted on features normalised
    with the statistics it carries, so a batch unlike its site sample needs a new site grader.
    """
    if config.batch_norm == "train" or n < config.batch_norm_min_crops:
        return False
    if config.batch_norm == "batch":
        return True
    return bool(shift.get("shift_warning")) and not shift.get("site_grader")
