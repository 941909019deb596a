"""Site onboarding: fit a site grader from the shipped one on a small labelled sample.

A clinic grades a few hundred of its own knees; :func:`adapt_grader` turns the shipped
grader into a site grader for that clinic's X-ray systems and framing. The convolutional
weights stay as trained on OAI (a few hundred knees cannot re-train 21 million weights
without forgetting what they learned); what is fitted is what the sample supports:

* **a new head over every block**: the global maximum and the global average of each
  Xception block's output (entry, middle and exit flow: 2 x 11,544 features) are
  standardised on the sample and a multinomial logistic regression (L2) maps them to the
  five grades. Texture and edge features of every depth are re-weighted for the new
  system, where the last layer alone no longer separates the grades; the maximum keeps
  what is strong in one place only (an osteophyte, a narrowed compartment), which the
  average over the whole crop dilutes. Its strength ``C`` and the decision rule (argmax
  or median) are chosen together by the QWK of an inner 3-fold CV on the training part.
  Mirrored crops double the sample (left and right knees are mirror images), and a knee's
  logits are the mean of its crop's and its mirror's;
* optionally (``--batch-norm``), **normalisation statistics** of every batch-norm layer
  re-estimated on the site's images (AdaBN). Measured on another clinic's knees it did not
  help the head (QWK 0.78 with it, 0.82 without), so it is off by default.

Its figures are honest: stratified k-fold cross-validation on the sample, where every
fold fits the head (and the statistics) on its training part only and grades its held-back part, so no
knee is graded by a head or statistics that saw it. Before (the shipped grader) and
after (the out-of-fold grades) come with bootstrap 95% intervals. With a few hundred knees
the figure also depends on how the knees fall into folds (on another clinic's 332 knees, by
a point or more of accuracy), so the cross-validation is repeated over several fold splits
and each split's accuracy and QWK, and their mean, are reported beside the first split's
figures. With the statistics as trained, a crop's features are the same in every fold, so
they are extracted once.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kneepipe.grade.data import KL_GRADES, fit_crop, labelled_files
from kneepipe.grade.features import (
    batch_norm_statistics,
    block_layers,
    content_key,
    pooled_feature_model,
    pooled_features,
    reestimate_batch_norm,
    set_batch_norm_statistics,
)
from kneepipe.grade.head import LinearHead
from kneepipe.grade.model import decide_grades
from kneepipe.imaging import ImageReadError, read_radiograph

# The smallest sample adapt accepts: every grade present this often, and this many knees in all.
MIN_PER_GRADE = 8
MIN_TOTAL = 100
SAMPLE_ADVICE = "Grade at least 100 knees with at least 8 of every KL grade (300 or more recommended)"


class SampleError(ValueError):
    """A labelled sample adapt cannot use; the message says what is missing."""


@dataclass
class Sample:
    """A site's labelled knee crops."""

    paths: list[Path]
    grades: np.ndarray
    crops: np.ndarray  # (n, size, size) uint8
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        return np.bincount(self.grades, minlength=len(KL_GRADES)).tolist()


def read_labels(source: str | Path) -> tuple[list[Path], list[int]]:
    """Crop files and grades of a labelled sample: folders ``0/``..``4/``, or a CSV ``image,kl_grade``.

    CSV paths are relative to the CSV's folder. Raises :class:`SampleError` for a CSV
    without those columns or with a grade that is not 0-4 (naming the line).
    """
    source = Path(source)
    if source.is_dir():
        return labelled_files(source)
    if not source.is_file():
        raise SampleError(f"{source}: no such file or folder")
    paths, grades = [], []
    with open(source, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "kl_grade"} - set(reader.fieldnames or ())
        if missing:
            raise SampleError(f"{source}: needs the columns image,kl_grade (missing: {', '.join(sorted(missing))})")
        for line, row in enumerate(reader, start=2):
            grade = (row["kl_grade"] or "").strip()
            if grade not in {str(g) for g in KL_GRADES}:
                raise SampleError(f"{source}, line {line}: kl_grade {grade!r} is not 0-4")
            paths.append(source.parent / row["image"].strip())
            grades.append(int(grade))
    return paths, grades


def check_sample(grades: Sequence[int], folds: int) -> None:
    """Refuse a sample too small to fit and cross-validate a site grader, saying what is missing."""
    counts = np.bincount(np.asarray(grades, dtype=int), minlength=len(KL_GRADES))
    needed = max(MIN_PER_GRADE, folds)
    short = [f"KL{g} has {n}" for g, n in enumerate(counts) if n < needed]
    problems = []
    if short:
        problems.append(f"too few knees of some grades ({', '.join(short)}; each needs at least {needed})")
    if counts.sum() < MIN_TOTAL:
        problems.append(f"{counts.sum()} knees in all (at least {MIN_TOTAL} needed)")
    if problems:
        raise SampleError(f"sample refused: {'; '.join(problems)}. {SAMPLE_ADVICE}")


def load_sample(source: str | Path, crop_size: int, folds: int) -> Sample:
    """Read and check a labelled sample; unreadable files are listed and left out."""
    paths, grades = read_labels(source)
    kept, kept_grades, crops, unreadable = [], [], [], []
    for path, grade in zip(paths, grades, strict=True):
        try:
            crops.append(fit_crop(read_radiograph(path).pixels, crop_size))
        except ImageReadError as err:
            unreadable.append((Path(path), err.reason))
            continue
        kept.append(Path(path))
        kept_grades.append(grade)
    check_sample(kept_grades, folds)
    return Sample(kept, np.asarray(kept_grades, dtype=int), np.stack(crops), unreadable)


@dataclass(frozen=True)
class AdaptSettings:
    """How a site grader is fitted and measured."""

    folds: int = 5
    repeats: int = 3  # fold splits the cross-validation is run over (seeds seed, seed + 1, ...)
    adapt_batch_norm: bool = False
    regularisation: tuple[float, ...] = (0.0003, 0.001, 0.003)  # the logistic regression's C, chosen by inner CV
    mirror: bool = True
    bootstrap: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class FittedHead:
    """A site head with what the inner cross-validation chose for it."""

    head: LinearHead
    regularisation: float
    decision: str


def copy_groups(crops: np.ndarray) -> np.ndarray:
    """One group id per distinct crop: identical crops (a knee listed twice) share it."""
    ids: dict[int, int] = {}
    return np.array([ids.setdefault(content_key(crop), len(ids)) for crop in crops])


def stratified_folds(grades: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple]:
    """Stratified k-fold splits that keep copies of one crop in one fold (a copy in both would leak)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if len(np.unique(groups)) == len(groups):
        return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(grades, grades))
    return list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(grades, grades, groups))


@dataclass(frozen=True)
class SampleFeatures:
    """Pooled features of every block of some crops (concatenated), of their mirror images when asked,
    and how many of the columns, at the end, belong to the last block (the shift reference's)."""

    plain: np.ndarray
    mirrored: np.ndarray | None
    last_block: int

    def rows(self, index: np.ndarray) -> SampleFeatures:
        """The features of the crops at ``index``."""
        mirrored = None if self.mirrored is None else self.mirrored[index]
        return SampleFeatures(self.plain[index], mirrored, self.last_block)


# How the site head pools each block's activation map: the maximum, then the average (last:
# the last block's average is the grader's feature vector, which the shift reference reads).
SITE_POOLING = ("max", "mean")


def _features(grader, crops: np.ndarray, layers: Sequence[str], mirror: bool) -> SampleFeatures:
    """Pooled features of every block of ``crops`` (and of the mirrored crops when asked)."""
    model = pooled_feature_model(grader.model, layers, SITE_POOLING)
    x = grader.prepare(crops)
    blocks = pooled_features(model, x)
    mirrored = np.concatenate(pooled_features(model, x[:, :, ::-1]), axis=1) if mirror else None
    return SampleFeatures(np.concatenate(blocks, axis=1), mirrored, blocks[-1].shape[1])


def _fit_head(found: SampleFeatures, grades, groups, layers, settings: AdaptSettings, seed: int) -> FittedHead:
    """Standardise, choose C and the decision rule by the QWK of an inner stratified 3-fold CV
    (split by ``seed``), fit.

    On one BLAS thread: these small dense problems run many times faster than with threads that
    compete with each other (and with TensorFlow's) for two cores.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _fit_head_threads(found.plain, found.mirrored, grades, groups, layers, settings, seed)


def _fit_head_threads(features, mirrored, grades, groups, layers, settings: AdaptSettings, seed: int) -> FittedHead:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import cohen_kappa_score

    def fit(x, xm, y, c) -> LinearHead:
        xs = np.concatenate([x, xm]) if xm is not None else x
        ys = np.concatenate([y, y]) if xm is not None else y
        mean = xs.mean(axis=0)
        scale = xs.std(axis=0) + 1e-6
        standardised = (xs - mean) / scale
        # The L2-penalised solution lies in the span of the samples (n << features): fit in the
        # n-dimensional coordinates of that span (exactly the same minimiser, 100x faster), map back.
        _, singular, basis = np.linalg.svd(standardised, full_matrices=False)
        basis = basis[singular > singular[0] * 1e-6]
        model = LogisticRegression(C=c, solver="newton-cg", max_iter=1000).fit(standardised @ basis.T, ys)
        coef = model.coef_ @ basis
        return LinearHead(
            tuple(layers),
            coef.astype(np.float32),
            model.intercept_.astype(np.float32),
            mean.astype(np.float32),
            scale.astype(np.float32),
            mirror=xm is not None,
            pooling=SITE_POOLING,
        )

    inner = stratified_folds(grades, groups, 3, seed)
    held_probabilities = {c: np.zeros((len(grades), len(KL_GRADES))) for c in settings.regularisation}
    for train, held in inner:
        for c in settings.regularisation:
            head = fit(features[train], None if mirrored is None else mirrored[train], grades[train], c)
            both = None if mirrored is None else [mirrored[held]]
            held_probabilities[c][held] = _softmax(head.site_logits([features[held]], both))
    # C and the decision rule together, by the QWK of the inner held-back grades: the criterion
    # the shipped grader's epochs and decision rule were chosen by. (Log-loss chose a C 3-10x too
    # strong here: the inner training parts are half the sample.)
    qwk = {
        (c, rule): cohen_kappa_score(grades, decide_grades(p, rule), weights="quadratic")
        for c, p in held_probabilities.items()
        for rule in ("argmax", "median")
    }
    best_c, rule = max(qwk, key=lambda c_and_rule: qwk[c_and_rule])
    return FittedHead(fit(features, mirrored, grades, best_c), best_c, rule)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def _with_statistics(grader, original, crops: np.ndarray, settings: AdaptSettings) -> None:
    """Put back the grader's trained batch-norm statistics, then re-estimate them on ``crops`` if asked."""
    set_batch_norm_statistics(grader.model, original)
    if settings.adapt_batch_norm:
        reestimate_batch_norm(grader.model, grader.prepare(crops), seed=settings.seed)


def bootstrap_interval(true, predicted, metric: Callable, resamples: int, seed: int) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of ``metric(true, predicted)`` over knees."""
    rng = np.random.default_rng(seed)
    n = len(true)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        values.append(metric(true[pick], predicted[pick]))
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return round(float(low), 3), round(float(high), 3)


def _accuracy(true: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(true == predicted))


def _qwk(true: np.ndarray, predicted: np.ndarray) -> float:
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(true, predicted, weights="quadratic", labels=list(KL_GRADES)))


def figures(true: np.ndarray, predicted: np.ndarray, settings: AdaptSettings) -> dict[str, Any]:
    """Accuracy and QWK with bootstrap 95% intervals, MAE, and true vs predicted counts."""
    return {
        "accuracy": round(_accuracy(true, predicted), 3),
        "accuracy_ci95": bootstrap_interval(true, predicted, _accuracy, settings.bootstrap, settings.seed),
        "qwk": round(_qwk(true, predicted), 3),
        "qwk_ci95": bootstrap_interval(true, predicted, _qwk, settings.bootstrap, settings.seed),
        "mae": round(float(np.abs(true - predicted).mean()), 3),
        "true_counts": np.bincount(true, minlength=5).tolist(),
        "predicted_counts": np.bincount(predicted, minlength=5).tolist(),
    }


def split_spread(true: np.ndarray, out_of_fold: np.ndarray, seeds: Sequence[int]) -> dict[str, Any]:
    """Accuracy and QWK of the out-of-fold grades of each fold split (one row of ``out_of_fold``
    per seed): each split's, and their mean."""
    accuracy = [_accuracy(true, grades) for grades in out_of_fold]
    qwk = [_qwk(true, grades) for grades in out_of_fold]
    return {
        "seeds": list(seeds),
        "accuracy": [round(a, 3) for a in accuracy],
        "qwk": [round(q, 3) for q in qwk],
        "accuracy_mean": round(float(np.mean(accuracy)), 3),
        "qwk_mean": round(float(np.mean(qwk)), 3),
    }


def adapt_grader(
    grader,
    sample: Sample,
    out: str | Path,
    settings: AdaptSettings = AdaptSettings(),
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Cross-validate, then fit the site grader on the whole sample and write it to ``out``.

    ``grader`` is modified (its batch-norm statistics end adapted to the sample). Returns
    the facts written into the site grader file and its model card.
    """
    from kneepipe.grade.shift import ShiftReference

    started = time.monotonic()
    progress = progress or (lambda step, done, total: None)
    layers = block_layers(grader.model)
    original = batch_norm_statistics(grader.model)
    grades = sample.grades

    progress("grading with the shipped grader", 0, 1)
    before = grader.decide(grader.predict_proba(sample.crops))
    progress("grading with the shipped grader", 1, 1)

    groups = copy_groups(sample.crops)
    # With the statistics as trained a crop's features do not depend on the fold: extract them once.
    fixed = None
    if not settings.adapt_batch_norm:
        progress("features of every block", 0, 1)
        fixed = _features(grader, sample.crops, layers, settings.mirror)
        progress("features of every block", 1, 1)

    def features_of(index: np.ndarray) -> SampleFeatures:
        """The features of the crops at ``index``, with the batch-norm statistics the grader has now."""
        if fixed is not None:
            return fixed.rows(index)
        return _features(grader, sample.crops[index], layers, settings.mirror)

    seeds = [settings.seed + r for r in range(max(1, settings.repeats))]
    total = len(seeds) * settings.folds
    out_of_fold = np.zeros((len(seeds), len(grades)), dtype=int)
    chosen = []
    for r, seed in enumerate(seeds):
        for k, (train, held) in enumerate(stratified_folds(grades, groups, settings.folds, seed)):
            progress("cross-validation", r * settings.folds + k, total)
            _with_statistics(grader, original, sample.crops[train], settings)
            fitted = _fit_head(features_of(train), grades[train], groups[train], layers, settings, seed)
            if r == 0:
                chosen.append((fitted.regularisation, fitted.decision))
            found = features_of(held)
            logits = fitted.head.site_logits([found.plain], None if found.mirrored is None else [found.mirrored])
            out_of_fold[r, held] = decide_grades(_softmax(logits), fitted.decision)
    progress("cross-validation", total, total)

    progress("fitting the site grader on the whole sample", 0, 1)
    _with_statistics(grader, original, sample.crops, settings)
    found = fixed if fixed is not None else _features(grader, sample.crops, layers, settings.mirror)
    fitted = _fit_head(found, grades, groups, layers, settings, settings.seed)
    head = fitted.head
    reference = ShiftReference.from_features(found.plain[:, -found.last_block :], f"site sample: {len(grades)} crops")
    progress("fitting the site grader on the whole sample", 1, 1)

    facts = {
        "sample": {
            "n": len(grades),
            "copies": int(len(grades) - len(np.unique(groups))),
            "grade_counts": sample.counts,
            "unreadable": [f"{p.name}: {reason}" for p, reason in sample.unreadable],
        },
        "base_grader": grader.version,
        "method": {
            "batch_norm": "re-estimated on the sample (AdaBN)" if settings.adapt_batch_norm else "as trained",
            "head": f"logistic regression over the output of {len(layers)} Xception blocks, pooled by "
            f"{' and '.join(head.pooling)} ({head.coef.shape[1]} features), standardised on the sample",
            "regularisation_C": fitted.regularisation,
            "decision": fitted.decision,
            "mirrored_crops": settings.mirror,
            "frozen": "all convolutional weights (as trained on OAI)",
        },
        "cross_validation": {
            "folds": settings.folds,
            "seed": settings.seed,
            "C_and_decision_per_fold": chosen,
            "before": figures(grades, before, settings),
            "after": figures(grades, out_of_fold[0], settings),
            "splits": split_spread(grades, out_of_fold, seeds),
            "bootstrap_resamples": settings.bootstrap,
        },
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    write_site_grader(grader, head, reference, facts, out)
    return facts


def write_site_grader(grader, head: LinearHead, reference, facts: dict[str, Any], out: str | Path) -> Path:
    """The site grader file (weights with the site's statistics, head, reference) and its model card."""
    from kneepipe.files import write_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = np.asarray(facts["sample"]["grade_counts"], dtype=float)
    preprocessing = dataclasses.replace(
        grader.preprocessing,
        temperature=1.0,
        class_bias=(0.0,) * len(KL_GRADES),
        decision=facts["method"]["decision"],
        train_prior=tuple(float(p) for p in counts / counts.sum()),
        extra={"site": facts},
    )
    arrays = {f"w{i:04d}": np.asarray(w).astype(np.float16) for i, w in enumerate(grader.model.get_weights())}
    arrays["kneepipe"] = np.array(preprocessing.to_json())
    arrays.update(head.arrays())
    arrays.update(reference.arrays("ref_"))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, **arrays)  # read back with allow_pickle=False
    write_atomic(out, buffer.getvalue())
    write_atomic(out.with_suffix(".md"), site_card(out, facts))
    return out


def _figure_line(name: str, f: dict[str, Any]) -> str:
    return (
        f"| {name} | {f['accuracy']:.3f} ({f['accuracy_ci95'][0]:.3f}-{f['accuracy_ci95'][1]:.3f}) "
        f"| {f['qwk']:.3f} ({f['qwk_ci95'][0]:.3f}-{f['qwk_ci95'][1]:.3f}) | {f['mae']:.3f} "
        f"| {'/'.join(map(str, f['predicted_counts']))} |"
    )


def _splits_line(cv: dict[str, Any]) -> str:
    """How the site grader's cross-validated figures move with the fold split (a card's sentence)."""
    splits = cv.get("splits")
    if not splits or len(splits["seeds"]) < 2:
        return "The cross-validation was run over one fold split (seed above)."
    return (
        f"Over {len(splits['seeds'])} fold splits (seeds {', '.join(map(str, splits['seeds']))}), the site grader's "
        f"accuracy was {' / '.join(f'{a:.3f}' for a in splits['accuracy'])} (mean {splits['accuracy_mean']:.3f}) "
        f"and its QWK {' / '.join(f'{q:.3f}' for q in splits['qwk'])} (mean {splits['qwk_mean']:.3f}): "
        "the table gives the first split's."
    )


def site_card(path: Path, facts: dict[str, Any]) -> str:
    """The site grader's model card (Markdown)."""
    cv = facts["cross_validation"]
    method = facts["method"]
    sample = facts["sample"]
    unreadable = "".join(f"\n  - {line}" for line in sample["unreadable"]) or " none"
    return f"""# Site grader `{path.name}`

Made by `kneepipe adapt` from `{facts["base_grader"]}` in {facts["minutes"]} minutes.

## Data
- Site sample: {sample["n"]} labelled knee crops, KL0-4 counts {"/".join(map(str, sample["grade_counts"]))};
  {sample.get("copies", 0)} are copies of another crop (kept in one fold with it).
- Unreadable files left out:{unreadable}

## Method
- Batch normalisation: {method["batch_norm"]}.
- Head: {method["head"]}; L2 strength C = {method["regularisation_C"]}.
- Mirrored crops: added to the sample, and each knee graded as the mean of its crop's and its
  mirror's logits: {method["mirrored_crops"]}.
- Frozen: {method["frozen"]}.
- Decision: {method["decision"]} of the grade probabilities; C and the rule chosen together by the
  QWK of an inner 3-fold cross-validation;
  the grade prior is the sample's grade mix.

## Measured ({cv["folds"]}-fold stratified cross-validation on the sample, seed {cv["seed"]})
Every fold fits the head (and with `--batch-norm` re-estimates the statistics) on its training
part only, then grades its held-back knees. 95% intervals: {cv["bootstrap_resamples"]} bootstrap resamples of the knees.

| grader | accuracy (95% CI) | QWK (95% CI) | MAE | predicted KL0-4 |
|---|---|---|---|---|
{_figure_line("shipped grader (before)", cv["before"])}
{_figure_line("site grader (after, out-of-fold)", cv["after"])}

True KL0-4: {"/".join(map(str, cv["after"]["true_counts"]))}.

{_splits_line(cv)}

## Intended use and limits
- Grading knee crops from the same site, X-ray systems and framing as the sample; the shift score
  of a batch is measured against this sample (`kneepipe grade --model {path.name}` warns when a
  batch is unlike it).
- The figures above are cross-validated on the site's own sample; they estimate how the site
  grader does on more knees like those, not on other sites. With a few hundred knees the
  intervals are wide: grade more knees to narrow them.
- Automatic grades support, and do not replace, a reader's assessment.
"""
