"""Which way a film lies, from the direction of its edges: upright, sideways, or tilted.

On a knee radiograph (AP, PA or lateral, and on the foot films seen too) the long bones
and the soft tissue run from the top of the film to the bottom, so the strongest edges
are vertical. :func:`bone_orientation` measures that from the image gradients (the
structure tensor of a 256-px thumbnail, each gradient clipped so that a few strong
straight edges such as a padded border do not decide: a few milliseconds): a film whose horizontal
edges outweigh its vertical ones lies sideways (stored turned by 90 degrees), and the
dominant edge direction gives the tilt of an upright one. On the 27 shared radiographs
every film upright reads upright and every film turned by 90 degrees reads sideways, and
so do the 204 cut, padded and tilted films of ``benchmarks/detect_scales.py``, whose
tilts of 10 and 20 degrees are read within 6.7 degrees (``tests/test_detect_scale.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class Orientation:
    """How a film lies.

    Attributes:
        sideways: the film's edges run mostly across it: it is stored turned by 90 degrees.
        tilt: the angle in degrees by which the film must be turned counter-clockwise (as
            ``cv2.getRotationMatrix2D`` turns) to stand its edges upright; meaningful
            when not sideways.
        vertical_share: log of vertical over horizontal edge energy (> 0 upright).
    """

    sideways: bool
    tilt: float
    vertical_share: float


def bone_orientation(pixels: np.ndarray) -> Orientation:
    """How a ``uint8`` film lies, from the energy and direction of its edges.

    >>> film = np.zeros((300, 200), np.uint8)
    >>> film[:, 80:120] = 200  # a bone running from top to bottom
    >>> bone_orientation(film).sideways, bone_orientation(np.rot90(film)).sideways
    (False, True)
    """
    step = max(1, max(pixels.shape) // (2 * THUMBNAIL_SIDE))  # every step-th pixel first: large films stay cheap
    pixels = pixels[::step, ::step]
    scale = THUMBNAIL_SIDE / max(pixels.shape)
    thumbnail = cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(thumbnail.astype(np.float32), (3, 3), 0)
    gx = cv2.Sobel(small, cv2.CV_32F, 1, 0)  # horizontal change: vertical edges
    gy = cv2.Sobel(small, cv2.CV_32F, 0, 1)
    # Strong straight edges (a film's border, padding, a collimator) would outweigh the
    # anatomy: every gradient is clipped at the 90th percentile of the magnitudes.
    magnitude = np.sqrt(gx * gx + gy * gy) + 1e-6
    weight = np.minimum(magnitude, np.percentile(magnitude, 90)) / magnitude
    gx, gy = (gx * weight).astype(np.float32), (gy * weight).astype(np.float32)
    jxx, jyy, jxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
    share = float(np.log((jxx + 1e-6) / (jyy + 1e-6)))
    tilt = float(np.degrees(0.5 * np.arctan2(2 * jxy, jxx - jyy)))
    return Orientation(sideways=share < 0, tilt=tilt, vertical_share=share)
