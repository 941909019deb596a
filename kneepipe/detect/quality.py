"""Quality checks of a film and of each knee on it: exposure, view, a joint cut by the edge, metal.

The detector finds knee joints; these checks say when a film or a knee should not be
graded, each with its own status and a reason naming what was found:

* film-level, before or beside detection: an over-exposed film (:func:`saturated_fraction`),
  an under-exposed one (:func:`bright_level`), a lateral view and a film with no knee
  (:class:`ViewClassifier`, a linear model on the detector backbone's pooled features);
* knee-level, on each joint found (a bilateral film with one bad knee still grades the
  other): a joint cut by the film's edge (:func:`cut_fraction`) and a metal implant
  (:func:`metal_fraction`).

The view classifier's file (``kneepipe/weights/view.npz``, made by ``kneepipe train view``)
holds its preprocessing (input size, the backbone layers it pools) and the digest of the
backbone it reads (:func:`backbone_digest`): features from another backbone would be
meaningless, so with a detector whose backbone differs the view check is off and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kneepipe.files import file_version
from kneepipe.imaging import area_resize

log = logging.getLogger(__name__)

DEFAULT_VIEW_MODEL = Path(__file__).resolve().parents[1] / "weights" / "view.npz"
"""The shipped view classifier, used when the config's ``view_model`` is null."""

VIEW_AP, VIEW_LATERAL, VIEW_NO_KNEE = "ap", "lateral", "no_knee"
VIEW_CLASSES = (VIEW_AP, VIEW_LATERAL, VIEW_NO_KNEE)
"""What the view classifier tells apart: an AP/PA knee film, a lateral knee view, a film with no knee."""

LETTERBOX_GREY = 114  # the padding grey of the detector's own letterbox
_NEAR_WHITE = 250


def border_grey(pixels: np.ndarray) -> int:
    """The median grey of a film's outermost rows and columns: what fills a view beyond its edge.

    >>> border_grey(np.pad(np.full((4, 4), 200, np.uint8), 1, constant_values=10))
    10
    """
    return int(np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])))


def content_box(pixels: np.ndarray, step: int = 4) -> tuple[int, int, int, int]:
    """The ``x0, y0, x1, y1`` bounds of a film's content inside its uniform outer rows and columns.

    Outer rows and columns that are uniform on a grid of every ``step``-th pixel (scanner
    or export padding, a film pasted on a larger canvas) lie outside it. A film that is
    uniform throughout is all content.

    >>> film = np.full((100, 120), 255, np.uint8)
    >>> film[20:80, 32:88] = 100
    >>> content_box(film)
    (32, 20, 88, 80)
    """
    grid = pixels[::step, ::step]
    rows = np.flatnonzero(np.ptp(grid, axis=1) > 2)
    columns = np.flatnonzero(np.ptp(grid, axis=0) > 2)
    height, width = pixels.shape[:2]
    if not len(rows) or not len(columns):
        return 0, 0, width, height
    return (
        int(columns[0] * step),
        int(rows[0] * step),
        min(width, int((columns[-1] + 1) * step)),
        min(height, int((rows[-1] + 1) * step)),
    )


def content_region(pixels: np.ndarray, step: int = 4) -> np.ndarray:
    """A film's pixels inside its uniform outer rows and columns (:func:`content_box`).

    A uniform band along a border (white or black padding) does not count as film content.

    >>> film = np.full((100, 100), 255, np.uint8)
    >>> film[20:80, 20:80] = 100
    >>> content_region(film).shape
    (60, 60)
    """
    x0, y0, x1, y1 = content_box(pixels, step)
    return pixels[y0:y1, x0:x1]


def saturated_fraction(pixels: np.ndarray, step: int = 4) -> float:
    """Share of a film's pixels at near-white (>= 250), over its content, not its uniform padding.

    Scanners and exports pad films with uniform borders, white ones included; those are
    not over-exposure (:func:`content_region`). Saturation within the film is.

    >>> film = np.full((100, 100), 255, np.uint8)
    >>> film[20:80, 20:80] = 100
    >>> saturated_fraction(film)
    0.0
    """
    return _saturated(_grey_counts(content_region(pixels, step)))


def _grey_counts(region: np.ndarray) -> np.ndarray:
    """How many of every second pixel of ``region`` (a quarter of them) lie at each grey level 0-255.

    One histogram serves both exposure checks; on the 27 shared films the saturated share of
    every second pixel equals that of all pixels to 1e-4.
    """
    return cv2.calcHist([np.ascontiguousarray(region[::2, ::2])], [0], None, [256], [0, 256]).ravel()


def _saturated(counts: np.ndarray) -> float:
    return float(counts[_NEAR_WHITE:].sum() / max(counts.sum(), 1))


def bright_level(pixels: np.ndarray, step: int = 4) -> float:
    """The grey level of the brightest 1% of a film's content (its 99th percentile).

    On a usable film bone is the brightest tissue and reaches well into the upper half
    of the grey range (172-250 on the 25 shared films that are not over-exposed); on an
    under-exposed film nothing does.

    >>> bright_level(np.full((64, 64), 30, np.uint8))
    30.0
    """
    return _bright(_grey_counts(content_region(pixels, step)))


def _bright(counts: np.ndarray) -> float:
    return counts_percentile(counts, 99)


def counts_percentile(counts: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of the 8-bit pixels a 256-level histogram counts, as ``np.percentile`` gives it.

    Counting (OpenCV's histogram) and reading the rank off the cumulative counts spares a
    sort of the pixels.

    >>> values = np.random.default_rng(0).integers(0, 256, (300, 200)).astype(np.uint8)
    >>> counts_percentile(np.bincount(values.ravel(), minlength=256), 99) == float(np.percentile(values, 99))
    True
    >>> counts_percentile(_grey_counts(values), 50) == float(np.percentile(values[::2, ::2], 50))
    True
    """
    counts = np.cumsum(np.asarray(counts).astype(np.int64))
    rank = q / 100 * (counts[-1] - 1)
    below = int(np.floor(rank))
    low = int(np.searchsorted(counts, below, side="right"))
    high = int(np.searchsorted(counts, min(below + 1, counts[-1] - 1), side="right"))
    return float(low + (high - low) * (rank - below))


def exposure_problem(
    pixels: np.ndarray,
    overexposed_fraction: float,
    underexposed_level: float,
    bounds: tuple[int, int, int, int] | None = None,
) -> tuple[str, str] | None:
    """``("overexposed" | "underexposed", reason)`` for a film too bright or too dark to grade, else None.

    Measured over the film's content (``bounds``, its :func:`content_box` when already known).

    >>> exposure_problem(np.full((64, 64), 20, np.uint8), 0.3, 100)[0]
    'underexposed'
    """
    from kneepipe.joints import STATUS_OVEREXPOSED, STATUS_UNDEREXPOSED

    x0, y0, x1, y1 = bounds or content_box(pixels)
    counts = _grey_counts(pixels[y0:y1, x0:x1])
    if (white := _saturated(counts)) > overexposed_fraction:
        return STATUS_OVEREXPOSED, f"over-exposed film: {white:.0%} of its pixels are saturated white; not gradable"
    if (level := _bright(counts)) < underexposed_level:
        return (
            STATUS_UNDEREXPOSED,
            f"under-exposed film: its brightest 1% reaches only grey {level:.0f} of 255 "
            f"(underexposed_level {underexposed_level:g}), so no bone stands out; not gradable",
        )
    return None


def cut_fraction(box: Sequence[float], image_size: tuple[float, float]) -> float:
    """How much of a joint box lies beyond the film's edge: the larger share of its width or height.

    ``box`` is ``x1, y1, x2, y2`` in the film's pixels, ``image_size`` its ``(width, height)``.

    >>> cut_fraction((-50, 10, 150, 210), (400, 400))
    0.25
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = image_size
    outside_x = max(0.0, -x1) + max(0.0, x2 - width)
    outside_y = max(0.0, -y1) + max(0.0, y2 - height)
    return max(outside_x / max(x2 - x1, 1e-6), outside_y / max(y2 - y1, 1e-6))


def metal_fraction(
    crop: np.ndarray, metal_level: int, contrast: float, min_width: int = 7, edge_share: float = 0.3
) -> float:
    """Share of a joint crop covered by its largest metal-like region: smooth, near-white, far brighter than around it.

    Metal stops nearly all X-rays: an implant is a large uniform region at the top of the
    grey range with a sharp step down to the bone around it. Pixels at ``metal_level`` or
    above are kept, thin bright strokes (burnt-in letters, wires, bead rims) narrower than
    ``min_width`` pixels are opened away, and each remaining connected region counts when
    the median grey of a 9-pixel ring around it lies at least ``contrast`` below
    ``metal_level``: bone that merely saturates on a bright film fades into bright
    surroundings instead. A region covering half the crop or more is not counted: an
    implant never fills the joint crop, a knee washed out white does. Nor is a region
    that runs along the crop's edge for more than ``edge_share`` of one side: white film
    padding, a collimator band or a shaft washed out white entering from beyond the crop;
    an implant sits around the joint, and only a stem reaches the edge, narrowly.
    Returns the largest counting region's area over the crop's.

    >>> crop = np.full((224, 224), 120, np.uint8)
    >>> crop[100:140, 40:180] = 255
    >>> round(metal_fraction(crop, 245, 25), 3)
    0.111
    >>> metal_fraction(np.full((224, 224), 250, np.uint8), 245, 25)
    0.0
    >>> crop[:30, :] = 255  # a white band along the top edge is no implant
    >>> round(metal_fraction(crop, 245, 25), 3)
    0.111
    """
    bright = (crop >= metal_level).astype(np.uint8)
    if not bright.any():
        return 0.0
    solid = cv2.morphologyEx(bright, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (min_width,) * 2))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(solid, connectivity=8)
    near_bright = cv2.dilate(bright, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))).astype(bool)
    ring_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (19, 19))
    largest = 0
    for label in range(1, count):
        area = int(stats[label, cv2.CC_STAT_AREA])
        if area <= largest or area >= crop.size // 2:
            continue
        region = labels == label
        edges = (region[0], region[-1], region[:, 0], region[:, -1])
        if max(float(edge.mean()) for edge in edges) > edge_share:
            continue
        ring = cv2.dilate(region.astype(np.uint8), ring_kernel).astype(bool) & ~near_bright
        if ring.any() and np.median(crop[ring]) <= metal_level - contrast:
            largest = area
    return largest / crop.size


def letterbox(pixels: np.ndarray, size: int) -> np.ndarray:
    """A film shrunk to fit a ``size`` square (aspect kept), centred on the detector's padding grey.

    >>> letterbox(np.zeros((100, 50), np.uint8), 64)[:, 0].tolist()[:2]
    [114, 114]
    """
    height, width = pixels.shape
    scale = size / max(height, width)
    shape = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = area_resize(pixels, shape)
    square = np.full((size, size), LETTERBOX_GREY, np.uint8)
    top, left = (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    square[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return square


def load_backbone(weights: Path, depth: int) -> Any:
    """The first ``depth`` layers of a YOLO detector (its backbone), in eval mode, on the CPU.

    Raises:
        ValueError: a layer takes another input than the previous layer's output, so the
            layers are not a plain chain (not a YOLOv8-style backbone).
    """
    from kneepipe.runtime import prepare_frameworks

    prepare_frameworks()
    from ultralytics import YOLO

    network: Any = YOLO(str(weights), task="detect").model
    layers = network.model[:depth]
    if any(layer.f != -1 for layer in layers):
        raise ValueError(f"{weights}: the first {depth} layers are not a plain chain; not a YOLOv8 backbone")
    return layers.float().eval()


def backbone_digest(backbone: Any) -> str:
    """A short content hash of a backbone's parameters and buffers (batch-norm statistics too).

    Two detectors whose backbones hold the same numbers (a detector fine-tuned with its
    backbone frozen keeps them) give the same digest, so a view classifier fitted on one
    stays valid on the other.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensor.detach().cpu().float().numpy()).tobytes())
    return digest.hexdigest()[:12]


def view_features(backbone: Any, films: Sequence[np.ndarray], size: int, layers: Sequence[int]) -> np.ndarray:
    """Pooled backbone features of each film: the mean and the maximum of each channel of ``layers``.

    Each film is letterboxed to ``size`` (:func:`letterbox`) and scaled to 0-1 in three
    equal channels, as the detector sees its input.
    """
    return boxed_features(backbone, [letterbox(film, size) for film in films], layers)


def boxed_features(backbone: Any, boxed: Sequence[np.ndarray], layers: Sequence[int]) -> np.ndarray:
    """:func:`view_features` of films already letterboxed (``uint8`` squares of the classifier's size)."""
    import torch

    with torch.inference_mode():
        features = pooled_features(backbone, layers, torch.from_numpy(backbone_input(boxed)))
    return features.numpy().astype(np.float64)


def backbone_input(boxed: Sequence[np.ndarray]) -> np.ndarray:
    """Letterboxed films as the detector sees its input: ``(n, 3, size, size)`` float32 in 0-1, three equal channels."""
    batch = np.stack(boxed).astype(np.float32) / 255.0
    return np.ascontiguousarray(np.repeat(batch[:, None], 3, axis=1))


def pooled_features(backbone: Any, layers: Sequence[int], x: Any) -> Any:
    """The backbone run on the tensor ``x``: the mean and the maximum of each channel of ``layers``, side by side."""
    import torch

    pooled = []
    for index, layer in enumerate(backbone):
        x = layer(x)
        if index in layers:
            pooled += [x.mean(dim=(2, 3)), x.amax(dim=(2, 3))]
    return torch.cat(pooled, dim=1)


@dataclass
class ViewClassifier:
    """Tells an AP/PA knee film from a lateral knee view and from a film with no knee.

    A logistic regression on the detector backbone's pooled features of the whole film,
    letterboxed to a small square (``size``). The file stores the standardisation, the
    weights, the classes, the preprocessing and the detector weights' digest.

    Attributes:
        backbone: the detector's first layers (torch modules).
        classes: the class of each column of :meth:`probabilities`.
        size: the letterbox side the features are computed at.
        layers: the backbone layers whose channels are pooled.
        version: the file's name and content hash, recorded beside outputs.
        compiled: the same features from a compiled network
            (:func:`kneepipe.detect.compiled.compile_view_features`), or None: the backbone
            runs in PyTorch.
    """

    backbone: Any = field(repr=False)
    classes: tuple[str, ...]
    mean: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    coef: np.ndarray = field(repr=False)
    intercept: np.ndarray = field(repr=False)
    size: int
    layers: tuple[int, ...]
    version: str
    compiled: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path, detector_weights: Path) -> ViewClassifier:
        """Load a view classifier file and the backbone of the detector weights it was fitted on.

        Raises:
            FileNotFoundError: the file or the detector weights do not exist.
            ValueError: the file was fitted on another detector's backbone (its digest
                differs from ``detector_weights``'), or is not a view classifier file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: view classifier not found")
        with np.load(path, allow_pickle=False) as data:
            try:
                fields = {key: data[key] for key in ("classes", "mean", "scale", "coef", "intercept", "size", "layers")}
                fitted_on = str(data["backbone_digest"])
            except KeyError as err:
                raise ValueError(f"{path}: not a view classifier file (no {err})") from None
        layers = tuple(int(v) for v in fields["layers"])
        backbone = load_backbone(Path(detector_weights), max(layers) + 1)
        digest = backbone_digest(backbone)
        if digest != fitted_on:
            raise ValueError(
                f"{path.name} was fitted on a detector backbone with digest {fitted_on}; that of "
                f"{Path(detector_weights).name} is {digest}; refit it with `kneepipe train view`"
            )
        return cls(
            backbone=backbone,
            classes=tuple(str(v) for v in fields["classes"]),
            mean=fields["mean"],
            scale=fields["scale"],
            coef=fields["coef"],
            intercept=fields["intercept"],
            size=int(fields["size"]),
            layers=layers,
            version=file_version(path),
        )

    def film_input(self, film: np.ndarray) -> np.ndarray:
        """What the classifier reads of a film: the film letterboxed to :attr:`size` (pixel work only)."""
        return letterbox(film, self.size)

    def probabilities(self, films: Sequence[np.ndarray]) -> np.ndarray:
        """Each film's probability of each class (rows sum to 1, columns in :attr:`classes` order)."""
        return self.input_probabilities([self.film_input(film) for film in films])

    def input_probabilities(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """:meth:`probabilities` of films whose :meth:`film_input` is already made."""
        if not len(inputs):
            return np.empty((0, len(self.classes)))
        if self.compiled is None:
            features = boxed_features(self.backbone, inputs, self.layers)
        else:
            features = self.compiled(backbone_input(inputs)).astype(np.float64)
        logits = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        odds = np.exp(logits)
        return odds / odds.sum(axis=1, keepdims=True)
