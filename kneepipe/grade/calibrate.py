"""Fitting the grader's temperature and grade biases on val and storing them in the grader file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from kneepipe.grade.config import GradeConfig
from kneepipe.grade.model import probabilities_from_logits, save_grader


def calibrate_grader(path: str | Path, config: GradeConfig) -> float:
    """Fit bias-corrected temperature scaling on the val crops of ``config``; rewrite ``path`` with it.

    Only val is used: the same split the epoch was selected on, never a test split.
    """
    from kneepipe.grade.calibration import fit_temperature_and_bias
    from kneepipe.grade.predict import Grader
    from kneepipe.grade.train import load_training_data

    _, val = load_training_data(config)
    grader = Grader.load(path)
    probabilities = probabilities_from_logits(grader.predict_logits(val.crops, config.batch), grader.preprocessing.head)
    temperature, bias = fit_temperature_and_bias(np.log(np.clip(probabilities, 1e-12, 1.0)), val.kl_grades)
    preprocessing = dataclasses.replace(
        grader.preprocessing, temperature=temperature, class_bias=tuple(float(b) for b in bias)
    )
    save_grader(grader.model, preprocessing, path)
    return temperature
