"""Metal knee implants drawn into real joint crops, to test the prosthesis check without implant films.

The project has no radiograph of a knee prosthesis. Metal stops nearly all X-rays, so on
a radiograph an implant is a smooth region at the top of the grey range, brighter than
any bone. :func:`draw_knee_implant` draws the two parts of a total knee replacement onto
a joint crop (224 px, joint line slightly below the centre, as the OAI crops are framed):
a femoral component capping the condyles (a crescent) and a tibial tray with its stem,
or, for a unicompartmental knee, one half of each. It is a physical caricature: shapes
are simplified and no real implant was seen when drawing them.
"""

from __future__ import annotations

import cv2
import numpy as np


def draw_knee_implant(crop: np.ndarray, rng: np.random.Generator, grey: int = 252, partial: bool = False) -> np.ndarray:
    """A copy of ``crop`` with a metal implant drawn in at ``grey`` (blurred edges, a little noise).

    Args:
        crop: a joint crop, 2-D ``uint8``.
        rng: the random generator (size and position vary a little).
        grey: the implant's grey level; metal sits at the top of the range (245-255).
        partial: draw a unicompartmental implant (one condyle and half the tray).

    >>> crop = np.full((224, 224), 120, np.uint8)
    >>> (draw_knee_implant(crop, np.random.default_rng(0)) >= 245).mean() > 0.05
    np.True_
    """
    size = crop.shape[0]
    unit = size / 224
    metal = np.zeros(crop.shape, np.uint8)
    joint_y = size * rng.uniform(0.52, 0.6)
    centre_x = size * rng.uniform(0.46, 0.54)
    half_width = size * rng.uniform(0.3, 0.38)
    # Femoral component: a crescent capping the condyles just above the joint line.
    outer = (int(half_width), int(half_width * 0.45))
    inner = (int(half_width * 0.82), int(half_width * 0.3))
    centre = (int(centre_x), int(joint_y - 3 * unit - outer[1]))  # its lowest point 3 px above the joint line
    cv2.ellipse(metal, centre, outer, 0, 0, 180, 1, -1)
    cv2.ellipse(metal, (centre[0], centre[1] - int(6 * unit)), inner, 0, 0, 180, 0, -1)
    metal[: centre[1] - int(outer[1] * 0.6)] = 0
    cv2.rectangle(
        metal, (centre[0] - outer[0], centre[1] - int(outer[1] * 0.6)), (centre[0] - inner[0], centre[1]), 1, -1
    )
    cv2.rectangle(
        metal, (centre[0] + inner[0], centre[1] - int(outer[1] * 0.6)), (centre[0] + outer[0], centre[1]), 1, -1
    )
    # Tibial tray just below the joint line, and its stem into the tibia.
    tray_top = int(joint_y + 6 * unit)
    tray = (int(centre_x - half_width * 0.95), tray_top, int(centre_x + half_width * 0.95), tray_top + int(12 * unit))
    cv2.rectangle(metal, tray[:2], tray[2:], 1, -1)
    stem = int(half_width * 0.16)
    cv2.rectangle(metal, (int(centre_x) - stem, tray[3]), (int(centre_x) + stem, size - 1), 1, -1)
    if partial:
        keep_left = rng.random() < 0.5
        half = int(centre_x)
        if keep_left:
            metal[:, half:] = 0
        else:
            metal[:, :half] = 0
    soft = cv2.GaussianBlur(metal.astype(np.float32), (5, 5), 1.2)
    noise = rng.normal(0, 1.5, crop.shape)
    drawn = crop.astype(np.float32) * (1 - soft) + (grey + noise) * soft
    return np.clip(drawn, 0, 255).astype(np.uint8)
