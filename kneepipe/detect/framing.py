"""How a knee-joint box becomes a grader crop: the one definition of the framing.

The OAI-KL224 crops the grader learns from are squares centred on the joint space,
just wide enough to hold the femoral and tibial condyles. The detector is trained to
predict exactly that square (the compositor places each OAI crop as a square of the
pseudo-radiograph and labels that square), so the crop is simply the predicted box:
made square around its centre, padded with the image's edge values where it leaves
the image, and resized to 224x224 with area interpolation. Training composites and
inference crops both go through :func:`crop_joint`, so the framing cannot drift.
"""

from __future__ import annotations

import cv2
import numpy as np

CROP_SIZE = 224
"""Side of a joint crop in pixels, as in the OAI-KL224 crops."""

Box = tuple[float, float, float, float]


def square_box(box: Box, image_size: tuple[int, int] | None = None) -> Box:
    """Make a joint box square around its centre, undoing clipping at the image border.

    A detector clips boxes to the image, so a knee that runs off the image edge comes
    back narrower (or shorter) than the square it really is. When one side of the box
    touches an image border and the box is not square, the touching side is pushed
    outwards until the box is square again; otherwise the box keeps its centre and
    takes the mean of its width and height as its side.

    Args:
        box: ``(x1, y1, x2, y2)`` in pixels.
        image_size: ``(width, height)`` of the image the box lies on, to recognise
            clipping; ``None`` skips that step.

    >>> square_box((10, 20, 30, 40))
    (10.0, 20.0, 30.0, 40.0)
    >>> square_box((0, 0, 60, 100), image_size=(500, 500))
    (-40.0, 0.0, 60.0, 100.0)
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = x2 - x1, y2 - y1
    if image_size is not None:
        img_w, img_h = image_size
        tol = 2.0
        if width < height:
            if x1 <= tol and x2 < img_w - tol:
                return (x2 - height, y1, x2, y2)
            if x2 >= img_w - tol and x1 > tol:
                return (x1, y1, x1 + height, y2)
        elif height < width:
            if y1 <= tol and y2 < img_h - tol:
                return (x1, y2 - width, x2, y2)
            if y2 >= img_h - tol and y1 > tol:
                return (x1, y1, x2, y1 + width)
    side = (width + height) / 2.0
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    return (cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0)


def crop_joint(pixels: np.ndarray, box: Box, size: int = CROP_SIZE) -> np.ndarray:
    """Cut the joint crop the grader expects from a grayscale radiograph.

    Args:
        pixels: 2-D ``uint8`` radiograph.
        box: ``(x1, y1, x2, y2)`` joint box in ``pixels`` coordinates; made square
            around its centre (:func:`square_box` without border handling).
        size: side of the returned crop.

    Returns:
        A ``(size, size)`` ``uint8`` array; parts of the square outside the image are
        filled by repeating the image's edge pixels.

    >>> crop_joint(np.zeros((100, 80), np.uint8), (10, 10, 50, 50)).shape
    (224, 224)
    """
    if pixels.ndim != 2:
        raise ValueError(f"crop_joint expects a 2-D grayscale array, got shape {pixels.shape}")
    x1, y1, x2, y2 = square_box(box)
    side = max(1, round(x2 - x1))
    left, top = round(x1), round(y1)
    height, width = pixels.shape
    pad_left, pad_top = max(0, -left), max(0, -top)
    pad_right, pad_bottom = max(0, left + side - width), max(0, top + side - height)
    if pad_left >= side or pad_top >= side or pad_right >= side or pad_bottom >= side:
        raise ValueError(f"joint box {box} lies outside the {width}x{height} image")
    region = pixels[max(0, top) : min(height, top + side), max(0, left) : min(width, left + side)]
    if pad_left or pad_top or pad_right or pad_bottom:
        region = cv2.copyMakeBorder(region, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_REPLICATE)
    interpolation = cv2.INTER_AREA if side >= size else cv2.INTER_LINEAR
    return cv2.resize(region, (size, size), interpolation=interpolation)
