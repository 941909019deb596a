"""Image fingerprints for finding copies: an exact pixel digest and a spectrum descriptor.

Knee crops are all framed alike (the joint space centred), so two *different* knees
look more alike to a perceptual hash of the image than one knee does to itself
shifted by 3%: on the OAI-KL224 crops a 256-bit DCT hash put a 5% crop of a knee
about 100 bits from its source while distinct knees came within 40. What survives
resizing, cropping, shifting, mirroring and any contrast change is the *texture* of
the film: the magnitude of its Fourier spectrum after the intensities are
normalised. So the descriptor is:

1. grayscale, resized to 128 x 128, histogram-equalised (undoes contrast stretch,
   gamma, global equalisation: every monotone intensity change),
2. local contrast normalisation (subtract a local mean, divide by a local standard
   deviation; undoes most of what CLAHE does),
3. a Hann window, then the log-magnitude of the 2-D FFT up to radius 24 cycles
   (magnitude ignores translation; low radii tolerate a few % of scaling),
4. averaged with its own left-right reflection, so a mirrored copy has the same
   descriptor, then centred and scaled to unit length (cosine similarity = dot product).

It ranks a copy's source first among 5,778 training crops under every transformation
the audit is tested with, but it cannot *decide*: distinct knees can score as high as
a heavily transformed copy. The decision is made by :mod:`kneepipe.audit.verify`,
which aligns the candidate pair and correlates their fine detail.

>>> import numpy as np
>>> pixels = (np.random.default_rng(0).random((224, 224)) * 255).astype(np.uint8)
>>> a, b = spectrum_descriptor(pixels), spectrum_descriptor(pixels[:, ::-1])
>>> round(float(a @ b), 4)
1.0
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import cv2
import numpy as np

SPECTRUM_SIZE = 128  # px; the side every image is resized to for its spectrum
SPECTRUM_RADIUS = 24  # cycles per image; the highest spatial frequency kept
LOCAL_CONTRAST_SIGMA = 4.0  # px at SPECTRUM_SIZE; the scale of local contrast normalisation


def equalised(pixels: np.ndarray, size: int) -> np.ndarray:
    """``pixels`` resized to ``size`` x ``size`` and histogram-equalised, as float32 0-255.

    Equalisation maps every monotone intensity change of an image (stretch, gamma,
    global equalisation) back to nearly the same picture.
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected 2-D uint8 grayscale pixels, got {pixels.dtype} {pixels.shape}")
    shrinking = min(pixels.shape) >= size
    resized = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return cv2.equalizeHist(resized).astype(np.float32)


def local_contrast_normalised(image: np.ndarray, sigma: float) -> np.ndarray:
    """``(x - local mean) / local standard deviation`` at Gaussian scale ``sigma``.

    Removes slowly varying brightness and contrast, which is what CLAHE and uneven
    exposure change; keeps edges and texture.
    """
    mean = cv2.GaussianBlur(image, (0, 0), sigma)
    centred = image - mean
    variance = cv2.GaussianBlur(centred * centred, (0, 0), sigma)
    return centred / np.sqrt(variance + 10.0)


def _spectrum_layout(size: int, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    window = np.outer(np.hanning(size), np.hanning(size)).astype(np.float32)
    row_frequency = np.fft.fftfreq(size) * size
    column_frequency = np.fft.rfftfreq(size) * size
    radii = np.hypot(row_frequency[:, None], column_frequency[None, :])
    keep = (radii >= 1) & (radii <= radius)
    mirrored_rows = (-np.arange(size)) % size  # a left-right flip maps frequency row u to -u
    return window, keep, mirrored_rows


_WINDOW, _KEEP, _MIRRORED_ROWS = _spectrum_layout(SPECTRUM_SIZE, SPECTRUM_RADIUS)
SPECTRUM_DIMS = int(_KEEP.sum())


def spectrum_descriptor(pixels: np.ndarray) -> np.ndarray:
    """Unit-length, mirror-invariant log-spectrum descriptor of a grayscale image.

    Returns a float32 vector of :data:`SPECTRUM_DIMS` entries; the dot product of two
    descriptors is their cosine similarity (1 for an image and its mirror image).
    """
    image = local_contrast_normalised(equalised(pixels, SPECTRUM_SIZE), LOCAL_CONTRAST_SIGMA)
    image = (image - image.mean()) * _WINDOW
    magnitude = np.abs(np.fft.rfft2(image))
    magnitude = 0.5 * (magnitude + magnitude[_MIRRORED_ROWS, :])
    descriptor = np.log1p(magnitude[_KEEP])
    descriptor -= descriptor.mean()
    norm = float(np.linalg.norm(descriptor))
    return (descriptor / norm if norm > 0 else descriptor).astype(np.float32)


def pixel_digest(pixels: np.ndarray) -> str:
    """SHA-1 of the decoded pixels and their shape: equal for exact duplicates only.

    Decoded pixels, not file bytes, so a PNG re-saved with other compression settings
    (or renamed) is still an exact duplicate.
    """
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha1(f"{pixels.dtype}{pixels.shape}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """What the audit keeps of one image: its exact digest and its spectrum descriptor."""

    digest: str
    spectrum: np.ndarray = field(repr=False)
    shape: tuple[int, int]


def fingerprint(pixels: np.ndarray) -> Fingerprint:
    """The :class:`Fingerprint` of a 2-D uint8 grayscale image.

    >>> import numpy as np
    >>> fp = fingerprint(np.zeros((64, 64), np.uint8))
    >>> len(fp.digest), fp.spectrum.shape == (SPECTRUM_DIMS,)
    (40, True)
    """
    return Fingerprint(digest=pixel_digest(pixels), spectrum=spectrum_descriptor(pixels), shape=tuple(pixels.shape))
