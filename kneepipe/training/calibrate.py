"""Fitting the grader's temperature and grade biases on val and storing them in the grader file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kneepipe.grade.config import GradeConfig
from kneepipe.grade.model import decide_grades, log_probabilities, probabilities_from_logits, save_grader
from kneepipe.metrics import grading_metrics


def calibrate_grader(path: str | Path, config: GradeConfig) -> float:
    """Fit bias-corrected temperature scaling and pick the decision rule on val; rewrite ``path``.

    Only val is used: the same split the epoch was selected on, never a test split.
    """
    from kneepipe.grade.calibration import fit_temperature_and_bias
    from kneepipe.grade.predict import Grader
    from kneepipe.training.recipe import load_crop_sets

    _, val = load_crop_sets(config)
    grader = Grader.load(path)
    # Fitted on the log-probabilities that inference divides by the temperature.
    log_p = log_probabilities(grader.predict_logits(val.crops, config.batch), grader.preprocessing.head)
    temperature, bias = fit_temperature_and_bias(log_p, val.kl_grades)
    calibrated = probabilities_from_logits(log_p, "softmax", temperature, tuple(bias))
    # The decision rule with the better val QWK, the criterion the epoch was selected on.
    qwk = {
        rule: grading_metrics(val.kl_grades, calibrated, decide_grades(calibrated, rule))["qwk"]
        for rule in ("argmax", "median")
    }
    preprocessing = dataclasses.replace(
        grader.preprocessing,
        temperature=temperature,
        class_bias=tuple(float(b) for b in bias),
        decision=max(qwk, key=lambda rule: -1.0 if qwk[rule] is None else qwk[rule]),  # an undefined QWK never wins
    )
    save_grader(grader.model, preprocessing, path)
    return temperature
