"""Deciding whether two images are copies: align them, then correlate their fine detail.

A copy keeps the film's fine detail (trabecular texture, noise, the exact course of
every edge) wherever it was shifted, cropped, resized, re-encoded or re-contrasted.
Two different knees share only the coarse anatomy. So the pair is aligned with an
affine transform (phase correlation for the shift, then OpenCV's ECC on
contrast-normalised 64 px images; both orientations, for mirrored copies), and the
decision is the correlation of the aligned band-pass images at 128 px, taken on the
pixels as they are and after histogram equalisation (the better of the two:
equalisation undoes global contrast changes, but on an over-exposed film it also
amplifies JPEG noise).

Measured on OAI-KL224 crops (42 crops under each transformation, the 900 val-to-train
candidate pairs of 300 val crops, all 2,889 left/right pairs of the train patients):

* copies under resizing (299, 160 px), JPEG quality 70, contrast stretch, histogram
  equalisation, CLAHE (clip 2), gamma 0.7/1.4, 5% crop + shift and mirroring
  correlate at 0.73 or more (most above 0.9);
* the most similar *different* knee of another patient correlates at 0.61 at most;
* a patient's other knee, mirrored, is the hard case (left and right knees are near
  mirror images): median 0.57, and 13% of the pairs reach the default threshold 0.67.
  Flagged, that is patient-level leakage all the same.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> knee = cv2.GaussianBlur((rng.random((224, 224)) * 255).astype(np.uint8), (0, 0), 2)
>>> evidence = copy_evidence(knee, knee[8:, :-8][:, ::-1])
>>> evidence.mirrored, evidence.correlation > 0.8
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from kneepipe.audit.fingerprint import equalised, local_contrast_normalised

ALIGN_SIZE = 64  # px; alignment runs at this size (coarse enough to converge, fine enough to be exact)
ALIGN_CONTRAST_SIGMA = 2.0  # px at ALIGN_SIZE; local contrast normalisation before ECC
COMPARE_SIZE = 128  # px; the band-pass correlation is measured at this size
BAND_SIGMAS = (0.8, 2.5)  # px at COMPARE_SIZE; difference of Gaussians keeping the fine detail
BORDER_FRACTION = 0.1  # of the side; ignored at each border (interpolation and crop edges)
MIN_OVERLAP = 0.4  # of the compared area; less overlap than this is no evidence
# ECC stops after 12 rounds or when the warp moves less than 1e-3: a copy converges in a
# few rounds from the phase-correlation start, and more rounds changed no decision.
_ECC_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 12, 1e-3)


@dataclass(frozen=True)
class CopyEvidence:
    """How well image b, aligned onto image a, reproduces a's fine detail.

    Attributes:
        correlation: band-pass correlation after alignment, -1 to 1 (-1 when the
            alignment failed or the aligned images barely overlap).
        mirrored: b matched best after a left-right flip.
        transform: the 2x3 affine map from a's pixel coordinates to b's (flipped when
            ``mirrored``), at :data:`COMPARE_SIZE`; None when the alignment failed.
    """

    correlation: float
    mirrored: bool
    transform: np.ndarray | None = None


@dataclass(frozen=True)
class PreparedImage:
    """One image made ready for :func:`compare`, in one or both orientations.

    Preparing once and comparing many times is what keeps the audit fast: a query image
    is compared with several candidates.
    """

    align: tuple[np.ndarray, ...]  # per orientation: contrast-normalised ALIGN_SIZE image
    band: tuple[tuple[np.ndarray, np.ndarray], ...]  # per orientation: (as is, equalised) band-pass


def _resized(pixels: np.ndarray, size: int) -> np.ndarray:
    shrinking = min(pixels.shape) >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(pixels, (size, size), interpolation=interpolation).astype(np.float32)


def _band_pass(image: np.ndarray) -> np.ndarray:
    low, high = BAND_SIGMAS
    fine = cv2.GaussianBlur(image, (0, 0), low) - cv2.GaussianBlur(image, (0, 0), high)
    energy = cv2.GaussianBlur(fine * fine, (0, 0), 4 * high)
    return fine / np.sqrt(energy + 1e-2)


def prepare(pixels: np.ndarray, mirrored_too: bool = True) -> PreparedImage:
    """Precompute what :func:`compare` needs of a 2-D uint8 image (and of its mirror image)."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected 2-D uint8 grayscale pixels, got {pixels.dtype} {pixels.shape}")
    orientations = (pixels, np.ascontiguousarray(pixels[:, ::-1])) if mirrored_too else (pixels,)
    align = tuple(
        local_contrast_normalised(equalised(image, ALIGN_SIZE), ALIGN_CONTRAST_SIGMA) for image in orientations
    )
    band = tuple(
        (_band_pass(_resized(image, COMPARE_SIZE)), _band_pass(equalised(image, COMPARE_SIZE)))
        for image in orientations
    )
    return PreparedImage(align=align, band=band)


def _align(template: np.ndarray, moving: np.ndarray) -> tuple[float, np.ndarray | None]:
    """ECC correlation and 2x3 warp (template -> moving coordinates) at ALIGN_SIZE."""
    coarse_template = cv2.GaussianBlur(template, (0, 0), 2)
    coarse_moving = cv2.GaussianBlur(moving, (0, 0), 2)
    (shift_x, shift_y), _ = cv2.phaseCorrelate(coarse_template, coarse_moving)
    warp = np.array([[1, 0, shift_x], [0, 1, shift_y]], dtype=np.float32)
    try:
        # OpenCV takes no mask (None) with a Gaussian filter size; its stubs require a mask there.
        correlation, warp = cv2.findTransformECC(  # type: ignore[call-overload]
            template, moving, warp, cv2.MOTION_AFFINE, _ECC_CRITERIA, None, 1
        )
    except cv2.error:  # ECC diverged (no common structure): no alignment, no evidence
        return -1.0, None
    return float(correlation), warp


def _to_compare_size(warp: np.ndarray) -> np.ndarray:
    """Rescale an ALIGN_SIZE warp to COMPARE_SIZE pixel coordinates (pixel centres kept)."""
    factor = COMPARE_SIZE / ALIGN_SIZE
    linear = warp[:, :2].astype(np.float64)
    offset = 0.5 * (factor - 1)
    translation = factor * warp[:, 2] + offset * (1 - linear.sum(axis=1))
    return np.hstack([linear, translation[:, None]]).astype(np.float32)


def _valid_region(warp: np.ndarray) -> np.ndarray | None:
    size = COMPARE_SIZE
    inside = cv2.warpAffine(
        np.ones((size, size), np.float32), warp, (size, size), flags=cv2.INTER_NEAREST + cv2.WARP_INVERSE_MAP
    )
    border = int(size * BORDER_FRACTION)
    valid = inside > 0
    valid[:border] = valid[-border:] = False
    valid[:, :border] = valid[:, -border:] = False
    if valid.sum() < MIN_OVERLAP * (size - 2 * border) ** 2:
        return None
    return valid


def _correlation(image_a: np.ndarray, image_b: np.ndarray, warp: np.ndarray, valid: np.ndarray) -> float:
    size = COMPARE_SIZE
    warped_b = cv2.warpAffine(image_b, warp, (size, size), flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP)
    x = image_a[valid] - image_a[valid].mean()
    y = warped_b[valid] - warped_b[valid].mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else -1.0


def compare(prepared_a: PreparedImage, prepared_b: PreparedImage) -> CopyEvidence:
    """Align b onto a in each of b's prepared orientations; correlate the fine detail of the best.

    The orientation is chosen by the alignment's own correlation; the returned
    correlation is the band-pass one, which is what tells a copy from a look-alike.
    """
    template = prepared_a.align[0]
    best_score, best_orientation, best_warp = -1.0, 0, None
    for orientation, moving in enumerate(prepared_b.align):
        score, warp = _align(template, moving)
        if warp is not None and score > best_score:
            best_score, best_orientation, best_warp = score, orientation, warp
    if best_warp is None:
        return CopyEvidence(correlation=-1.0, mirrored=False)
    warp = _to_compare_size(best_warp)
    mirrored = best_orientation == 1
    valid = _valid_region(warp)
    if valid is None:
        return CopyEvidence(correlation=-1.0, mirrored=mirrored, transform=warp)
    correlation = max(
        _correlation(band_a, band_b, warp, valid)
        for band_a, band_b in zip(prepared_a.band[0], prepared_b.band[best_orientation], strict=True)
    )
    return CopyEvidence(correlation=correlation, mirrored=mirrored, transform=warp)


def copy_evidence(pixels_a: np.ndarray, pixels_b: np.ndarray) -> CopyEvidence:
    """Align ``pixels_b`` onto ``pixels_a`` (as is and mirrored) and correlate their fine detail.

    Both are 2-D uint8 grayscale images of any size; see :func:`compare`.
    """
    return compare(prepare(pixels_a, mirrored_too=False), prepare(pixels_b))
