"""Grad-CAM heat maps of the knees a run's report shows, computed by the pipeline, not the report.

The report only renders; what it draws over a crop is computed here, once the grades are
final, from the crops the run saved (so a resumed run's knees get maps too).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from kneepipe.joints import STATUS_OK
from kneepipe.pipeline.records import ImageRecord


class ExplainsGrades(Protocol):
    """A grader that can say which part of a crop drove its grade."""

    def gradcam(self, crop: np.ndarray, grade: int | None = None) -> np.ndarray: ...


def report_heat_maps(
    images: Mapping[str, ImageRecord],
    out_dir: Path,
    grader: ExplainsGrades,
    max_radiographs: int,
    max_maps: int,
) -> dict[str, np.ndarray | str]:
    """Grad-CAM maps (crop-sized, 0-1) of the graded knees the report shows, by crop name.

    The report shows the first ``max_radiographs`` radiographs that have knees; of their
    graded knees with a saved crop, the first ``max_maps`` get a map, in the grade given.
    A map that cannot be computed is replaced by the reason, which the report shows in
    its place: a heat map is an aid, and its failure must not cost the report.
    """
    maps: dict[str, np.ndarray | str] = {}
    shown = [record for record in images.values() if record["knees"]][:max_radiographs]
    knees = [knee for record in shown for knee in record["knees"] if knee["status"] == STATUS_OK and knee["crop"]]
    for knee in knees[:max_maps]:
        crop = cv2.imread(str(out_dir / knee["crop"]), cv2.IMREAD_GRAYSCALE)
        if crop is None:
            continue  # the report says the crop was not saved
        try:
            maps[knee["crop"]] = grader.gradcam(crop, grade=knee["kl_grade"])
        except Exception as err:  # the report shows the reason in the map's place
            maps[knee["crop"]] = f"no heat map ({type(err).__name__})"
    return maps
