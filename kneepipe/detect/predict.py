"""Finding knee joints on radiographs: the detector and the ``kneepipe detect`` batch.

:class:`JointDetector` wraps the trained two-class YOLO model (patient's right knee,
left knee) and turns its boxes into framework-free :class:`~kneepipe.joints.Joint`
objects whose crops are framed by :func:`kneepipe.detect.framing.crop_joint`, the
same framing the grader's training crops have. :func:`detect_folder` runs it over a
file or a folder and writes the crops and ``joints.csv``; a file that cannot be read
gets an ``error`` row and the batch goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import cv2
import numpy as np

from kneepipe.config import save_config
from kneepipe.decoding import decoded_radiographs
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.framing import crop_joint, square_box
from kneepipe.detect.orientation import Orientation, bone_orientation
from kneepipe.detect.quality import (
    DEFAULT_VIEW_MODEL,
    VIEW_AP,
    VIEW_CLASSES,
    VIEW_LATERAL,
    VIEW_NO_KNEE,
    ViewClassifier,
    border_grey,
    content_box,
    cut_fraction,
    exposure_problem,
    metal_fraction,
)
from kneepipe.detect.quality import saturated_fraction as saturated_fraction  # its home before quality.py
from kneepipe.detect.side import SideClassifier, decide_side
from kneepipe.files import FORMULA_STARTS, MAX_KEY_LENGTH, file_version, write_atomic, write_csv_atomic
from kneepipe.imaging import ImageReadError, Radiograph, list_inputs
from kneepipe.joints import (
    CROP_FRAMING,
    SIDES,
    STATUS_ERROR,
    STATUS_KNEE_PROSTHESIS,
    STATUS_LATERAL_VIEW,
    STATUS_NO_KNEE,
    STATUS_OK,
    STATUS_PARTIAL,
    STATUS_ROTATED,
    STATUS_SKIPPED,
    Detection,
    Joint,
    Side,
)

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "detector.pt"
"""The detector shipped in the package, used when the config's ``model`` is null."""

LATERAL_REASON = "lateral view: KL grading needs an AP/PA view"
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "ML", "LM", "XTABLE"})
"""DICOM ViewPosition values of lateral views, which KL grading cannot use."""

JOINTS_CSV_COLUMNS = (
    "image",
    "side",
    "x1",
    "y1",
    "x2",
    "y2",
    "confidence",
    "crop",
    "status",
    "message",
    "needs_review",
    "review_reason",
)


SEARCH_CANVAS_ZOOM = 0.6
"""The search's shrunk view: the film at this scale on a canvas of its own size."""
SEARCH_TILE = 0.6
"""The search's tiles: this share of the film's width and height, one at each corner."""
SURE_AS_STORED = 0.5
"""A film read sideways whose joint as stored is found from this confidence is detected as stored, not
turned (its bones read across it only weakly: a short, wide film). On the 27 shared radiographs turned by
90 degrees either way, every one reads sideways and no joint as stored reaches 0.28."""
STRAIGHTEN_TILT = 13.0
"""A film whose edges lean by at least this many degrees is detected straightened. The upright AP films
among the shared radiographs, and single knees cut from them, read within 12.1 degrees; films tilted by
20 degrees read within 6.7 degrees of it."""
SEARCH_TILT = 5.0
"""A searched film whose edges lean by at least this many degrees (less than ``STRAIGHTEN_TILT``) is also
looked at straightened."""
LEANING_FOUND = 0.25
"""A leaning film is also looked at straightened when its first pass found one joint from this confidence
(the default ``review_conf``): fainter boxes beside it (0.08-0.09 on ``arthritis_5.jpg`` tilted by -10
degrees, neither of them its other knee) do not count as a second joint."""
TALL_FILM = 2.0
"""A portrait film at least this many times as tall as wide (a full-leg film, hip to ankle) whose first
pass found no joint from ``WINDOW_BELOW`` is also looked at in square windows down its length. The
shared radiographs are at most 1.74 times as tall as wide."""
LONG_FILM = 1.4
"""... and so is one at least this many times as tall as wide that the view classifier does not read as a
lateral view (two shared laterals, 1.66 and 1.74 times as tall as wide, got boxes from windows)."""
WINDOW_BELOW = 0.5
"""The best joint confidence below which a tall film is looked at in windows (:meth:`JointDetector.window_boxes`)."""
CONTENT_TRIM = 0.8
"""A film whose content (inside uniform padding, :func:`~kneepipe.detect.quality.content_box`) spans less than
this share of its width or height is detected on its content alone. The shared radiographs' content spans at
least 97% of each."""


@dataclass(frozen=True)
class FilmView:
    """A film turned for the detector: what the model sees and the crops are cut from.

    Attributes:
        pixels: the turned film.
        matrix: the 2x3 affine map from the stored film's pixels to ``pixels``.
        reason: what was done, for the detection's message and each knee's review reason.
    """

    pixels: np.ndarray = field(repr=False)
    matrix: np.ndarray
    reason: str


def turned_view(pixels: np.ndarray, quarter_turns: int) -> FilmView:
    """The film turned by ``np.rot90(pixels, quarter_turns)`` (1: counter-clockwise, -1: clockwise).

    >>> view = turned_view(np.zeros((50, 100), np.uint8), 1)
    >>> view.pixels.shape, _map_back(np.array([[10, 20, 30, 60, 0.9, 0]]), view.matrix)[0, :4].tolist()
    ((100, 50), [40.0, 10.0, 80.0, 30.0])
    """
    height, width = pixels.shape
    matrix = np.array([[0.0, 1, 0], [-1, 0, width]]) if quarter_turns == 1 else np.array([[0.0, -1, height], [1, 0, 0]])
    way = "counter-clockwise" if quarter_turns == 1 else "clockwise"
    reason = f"film stored on its side: detected and cropped turned 90 degrees {way}"
    return FilmView(np.ascontiguousarray(np.rot90(pixels, quarter_turns)), matrix, reason)


def straightened_view(pixels: np.ndarray, tilt: float) -> FilmView:
    """The film turned by ``tilt`` degrees counter-clockwise about its centre, on a canvas of its size.

    The corners it turns out of are filled with the film's border grey.
    """
    height, width = pixels.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), tilt, 1.0)
    turned = cv2.warpAffine(pixels, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=border_grey(pixels))
    way = "counter-clockwise" if tilt > 0 else "clockwise"
    reason = f"film tilted: detected and cropped straightened by {abs(tilt):.0f} degrees {way}"
    return FilmView(turned, matrix, reason)


def trimmed_content(
    pixels: np.ndarray, bounds: tuple[int, int, int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """A film's content without its uniform padding, and the content's top-left corner on the film.

    A film pasted on a larger canvas (an export padded to a fixed size, a small film
    scanned on a large plate) shows its knees smaller than the model learnt them and
    beside a blank field; it is detected on its content alone when the content spans
    less than ``CONTENT_TRIM`` of the film's width or height. Other films come back whole.
    ``bounds``: the film's :func:`~kneepipe.detect.quality.content_box`, when already known.

    >>> film = np.full((400, 300), 90, np.uint8)
    >>> film[100:200, 40:160] = np.arange(120, dtype=np.uint8)
    >>> content, corner = trimmed_content(film)
    >>> content.shape, corner
    ((100, 120), (40, 100))
    """
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = bounds or content_box(pixels)
    if x1 - x0 >= CONTENT_TRIM * width and y1 - y0 >= CONTENT_TRIM * height:
        return pixels, (0, 0)
    return pixels[y0:y1, x0:x1], (x0, y0)


def on_film(rows: np.ndarray, content_shape: tuple[int, ...], corner: tuple[int, int]) -> np.ndarray:
    """Rows found on a film's trimmed content, squared there (:func:`square_box` undoes clipping at the
    content's edge) and moved onto the whole film.

    >>> on_film(np.array([[0.0, 10, 40, 70, 0.9, 1]]), (200, 100), (30, 5)).tolist()
    [[10.0, 15.0, 70.0, 75.0, 0.9, 1.0]]
    """
    height, width = content_shape[:2]
    squares = np.array([square_box(tuple(row[:4]), image_size=(width, height)) for row in rows]).reshape(-1, 4)
    return np.hstack([squares + np.array([*corner, *corner]), rows[:, 4:]])


def _shifted(view: FilmView, corner: tuple[int, int]) -> FilmView:
    """A view made from a film's trimmed content, its matrix taking the whole film's pixels to it."""
    shift = np.array([[1.0, 0, -corner[0]], [0, 1.0, -corner[1]], [0, 0, 1.0]])
    return dataclasses.replace(view, matrix=view.matrix @ shift)


def _map_back(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Rows found on a view made by the affine ``matrix`` (film -> view) mapped back onto the film.

    Each box keeps its centre (mapped exactly) and its width and height divided by the
    view's scale (swapped when the view is turned on its side), so a quarter turn maps
    exactly and a box on a straightened film keeps its size.

    >>> shrink = np.array([[0.5, 0, 10], [0, 0.5, 20]])
    >>> _map_back(np.array([[10, 20, 30, 40, 0.9, 0]]), shrink).tolist()
    [[0.0, 0.0, 40.0, 40.0, 0.9, 0.0]]
    """
    if not len(rows):
        return rows.reshape(-1, 6)
    inverse = cv2.invertAffineTransform(matrix)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    centres = np.stack([(rows[:, 0] + rows[:, 2]) / 2, (rows[:, 1] + rows[:, 3]) / 2, np.ones(len(rows))], axis=1)
    cx, cy = (centres @ inverse.T).T
    half_w, half_h = (rows[:, 2] - rows[:, 0]) / 2 / scale, (rows[:, 3] - rows[:, 1]) / 2 / scale
    if abs(matrix[0, 1]) > abs(matrix[0, 0]):  # turned by more than 45 degrees: width and height swap
        half_w, half_h = half_h, half_w
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h, rows[:, 4], rows[:, 5]], axis=1)


def model_input(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """A grey film as the detector's letterbox would resize it, in three channels, and the scale back.

    Ultralytics resizes a film larger than ``size`` (bilinear, longer side to ``size``)
    before padding it. Doing that resize here, on the one grey channel, and converting
    only the small film to three channels gives the model the same pixels for a fraction
    of the work on a film of several megapixels. Returns the image and the factors
    ``(x, y)`` that take its pixel coordinates back to the film's.
    """
    height, width = image.shape[:2]
    ratio = min(size / height, size / width)
    if ratio >= 1.0:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), (1.0, 1.0)
    shape = (max(round(width * ratio), 1), max(round(height * ratio), 1))
    small = cv2.resize(image, shape, interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(small, cv2.COLOR_GRAY2BGR), (width / shape[0], height / shape[1])


def _best_confidence(rows: np.ndarray) -> float:
    """The highest confidence among an image's selected rows (0 when there are none)."""
    return float(rows[:, 4].max()) if len(rows) else 0.0


def suppress_nested(rows: np.ndarray, overlap: float) -> np.ndarray:
    """Keep the most confident of boxes that mostly cover one another.

    Two knees never overlap on a film, but the detector may box one knee at two
    scales, which plain NMS keeps when their IoU is low. A box whose intersection with
    a more confident kept box exceeds ``overlap`` of the smaller box's area is dropped.

    >>> rows = np.array([[0, 0, 10, 10, 0.9, 0], [2, 2, 8, 8, 0.5, 1], [20, 0, 30, 10, 0.8, 1]])
    >>> suppress_nested(rows, 0.5)[:, 4].tolist()
    [0.9, 0.8]
    """
    kept: list[np.ndarray] = []
    for row in rows[np.argsort(-rows[:, 4], kind="stable")]:
        area = (row[2] - row[0]) * (row[3] - row[1])
        nested = False
        for other in kept:
            width = min(row[2], other[2]) - max(row[0], other[0])
            height = min(row[3], other[3]) - max(row[1], other[1])
            smaller = min(area, (other[2] - other[0]) * (other[3] - other[1]))
            if width > 0 and height > 0 and width * height > overlap * smaller:
                nested = True
                break
        if not nested:
            kept.append(row)
    return np.array(kept).reshape(-1, 6)


def pool_looks(first: np.ndarray, second: np.ndarray, overlap: float) -> np.ndarray:
    """The joints of two looks at one film, each look's rows already selected, most confident first.

    A joint of the second look that overlaps one of the first (:func:`suppress_nested`) is the same
    knee, and the more confident box stays; one that does not is added when it sits beside every
    joint of the first look (two knees on a film are side by side). Both looks' selections keep
    their partners: the first look's box of a knee may be too loose for the second look's partner
    to pass :func:`pair_partner` against it.

    >>> first = np.array([[0, 0, 100, 100, 0.6, 0]])
    >>> second = np.array([[10, 10, 90, 90, 0.2, 0], [200, 30, 270, 100, 0.02, 1], [10, 200, 90, 280, 0.1, 0]])
    >>> pool_looks(first, second, 0.4)[:, 4].tolist()
    [0.6, 0.02]
    """
    pooled = suppress_nested(np.vstack([first, second]), overlap)
    from_first = [any(np.array_equal(row, kept) for kept in first) for row in pooled]
    firsts = pooled[from_first]
    keep = [
        mine or all(_side_by_side(row, kept) for kept in firsts) for row, mine in zip(pooled, from_first, strict=True)
    ]
    return pooled[keep]


def equalise_contrast(pixels: np.ndarray) -> np.ndarray:
    """CLAHE-equalised copy of a ``uint8`` film (clip limit 2, 8x8 tiles), for the detector's second look.

    >>> equalise_contrast(np.full((64, 64), 128, np.uint8)).shape
    (64, 64)
    """
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(pixels)


def _centre_offset(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Horizontal and vertical distance between two boxes' centres."""
    return abs((a[0] + a[2]) - (b[0] + b[2])) / 2, abs((a[1] + a[3]) - (b[1] + b[3])) / 2


def _side_by_side(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two boxes sit next to each other (their centres further apart in x than y)."""
    dx, dy = _centre_offset(a, b)
    return dx > dy


def _room_beside(row: np.ndarray, width: int) -> bool:
    """Whether a film ``width`` pixels wide has room for another knee beside this joint: a box's width
    of film on one side of it at least (a single knee centred on its film has none)."""
    return max(float(row[0]), width - float(row[2])) >= float(row[2] - row[0])


def pair_partner(main: np.ndarray, candidates: np.ndarray) -> np.ndarray | None:
    """The most confident candidate that could be the other knee of ``main`` on a bilateral film.

    On a standing AP/PA film the two knees sit at about the same height, at about the
    same size, one to three knee widths apart. A candidate qualifies when its size is
    within a factor 1.5 of ``main``'s (square root of the area), its centre is within
    half a box height of ``main``'s vertically, and between one and four box widths away
    horizontally. Rows are ``x1, y1, x2, y2, confidence, class``.

    >>> main = np.array([100, 100, 200, 200, 0.6, 0])
    >>> rows = np.array([[300, 110, 395, 205, 0.01, 1], [300, 400, 400, 500, 0.2, 1], [120, 90, 220, 190, 0.3, 0]])
    >>> pair_partner(main, rows)[:4].tolist()
    [300.0, 110.0, 395.0, 205.0]
    """
    width, height = main[2] - main[0], main[3] - main[1]
    size = np.sqrt(width * height)
    best = None
    for row in candidates:
        row_size = np.sqrt(max(row[2] - row[0], 0) * max(row[3] - row[1], 0))
        dx, dy = _centre_offset(row, main)
        if (
            row_size > 0
            and max(row_size / size, size / row_size) <= 1.5
            and dy <= 0.5 * height
            and width <= dx <= 4 * width
            and (best is None or row[4] > best[4])
        ):
            best = row
    return best


def load_view_classifier(config: DetectConfig, detector_weights: Path, compiled: bool = False) -> ViewClassifier | None:
    """The view classifier ``config`` asks for, fitted on ``detector_weights``' backbone; None when off.

    A classifier fitted on another detector's backbone cannot read this one's features:
    the view check is then off, with a warning (``kneepipe train view`` refits it).
    ``compiled``: its backbone runs as an OpenVINO network
    (:func:`~kneepipe.detect.compiled.compile_view_features`), as the detector does on an
    OpenVINO runtime; otherwise in PyTorch, the reference it was fitted with.
    """
    if not config.view_check:
        return None
    path = Path(config.view_model) if config.view_model else DEFAULT_VIEW_MODEL
    try:
        classifier = ViewClassifier.load(path, detector_weights)
    except ValueError as err:
        log.warning("view check off: %s", err)
        return None
    if compiled:
        from kneepipe.detect.compiled import compile_view_features

        features = compile_view_features(classifier.backbone, classifier.size, classifier.layers)
        classifier = dataclasses.replace(classifier, compiled=features)
    return classifier


@dataclass(frozen=True)
class FilmChecks:
    """What :meth:`JointDetector.detect` reads from a film's pixels before any model runs.

    Pixel work only (:meth:`JointDetector.check_film`), so ``kneepipe run`` does it in its
    decoding threads while the models run on earlier films.

    Attributes:
        refused: ``(status, reason)`` of a film refused before detection (a lateral DICOM view,
            over- or under-exposure), else None.
        content: the film without its uniform padding (:func:`trimmed_content`): the whole film
            unless the padding is wide; for a refused film, the film.
        corner: the content's top-left corner on the film.
        orientation: how the content lies (None for a refused film).
        view_input: the view classifier's input of the content (None for a refused film, a film
            lying sideways, or a detector without a view classifier).
    """

    refused: tuple[str, str] | None
    content: np.ndarray = field(repr=False)
    corner: tuple[int, int] = (0, 0)
    orientation: Orientation | None = None
    view_input: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.refused is None and self.orientation is None:
            raise ValueError("a film that is not refused needs its orientation")


class Detector(Protocol):
    """What the pipeline needs of a detector: a version to record and radiographs in, detections out."""

    version: str

    def detect(self, radiographs: Sequence[Radiograph]) -> list[Detection]: ...


@dataclass
class JointDetector:
    """The knee-joint detector: radiographs in, joints (box, side, crop) out.

    Attributes:
        model: the loaded Ultralytics model.
        config: the detect config (inference size, thresholds, crop size).
        weights: the weights file it was loaded from.
        version: the weights' name and content hash, recorded beside every output.
    """

    model: Any = field(repr=False)
    config: DetectConfig
    weights: Path
    version: str
    runtime: str = "torch"  # what runs the network: "onnx (detector.onnx)" or "torch"
    side_classifier: SideClassifier | None = field(default=None, repr=False)  # reads a knee's side from its anatomy
    view_classifier: ViewClassifier | None = field(default=None, repr=False)  # AP, lateral or no knee (quality.py)
    framing: ClassVar[str] = CROP_FRAMING  # how its crops are cut (kneepipe.detect.framing)

    @classmethod
    def load(cls, config: DetectConfig | None = None) -> JointDetector:
        """Load the weights named by ``config.model`` (null: the shipped detector).

        Raises:
            FileNotFoundError: the weights file does not exist.

        >>> detector = JointDetector.load()  # doctest: +SKIP
        >>> detector.version  # doctest: +SKIP
        'detector.pt@...'
        """
        if config is None:
            from kneepipe.config import load_config

            config = load_config(DetectConfig)
        weights = Path(config.model) if config.model else DEFAULT_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: detector weights not found")
        from kneepipe.runtime import prepare_frameworks

        prepare_frameworks()
        from ultralytics import YOLO

        runtime, network, fmt = "torch", weights, "torch"
        if weights.suffix == ".pt":
            from kneepipe.detect.compiled import find_compiled, runtime_choices

            for fmt, int8 in runtime_choices(config.runtime):
                compiled, why = find_compiled(weights, fmt, config.imgsz, int8)
                if compiled is not None:
                    network, runtime = compiled, f"{fmt}{'-int8' if int8 else ''} ({compiled.name})"
                    break
                log.warning("detect.runtime %s: %s", config.runtime, why)
            if network == weights and config.runtime != "torch":
                log.warning("detect.runtime %s: no compiled network to run: detecting with PyTorch", config.runtime)
        model = YOLO(str(network), task="detect")
        if network != weights and fmt == "openvino":
            from kneepipe.detect.compiled import in_float32

            if not in_float32(model, config.imgsz):
                log.warning("detect.runtime %s: float32 could not be set; the CPU's default precision runs", fmt)
                runtime += " default precision"
        names = [str(model.names[i]) for i in sorted(model.names)]
        if names != ["right_knee", "left_knee"]:
            raise ValueError(f"{weights}: expected classes right_knee, left_knee, got {names}")
        return cls(
            model=model,
            config=config,
            weights=weights,
            version=file_version(weights),
            runtime=runtime,
            side_classifier=SideClassifier.load(),
            view_classifier=load_view_classifier(config, weights, compiled=runtime.startswith("openvino")),
        )

    def check_film(self, radiograph: Radiograph) -> FilmChecks:
        """The pixel work :meth:`detect` does on a film before any model runs (:class:`FilmChecks`).

        A lateral DICOM view (``ViewPosition``) and an over- or under-exposed film
        (:func:`~kneepipe.detect.quality.exposure_problem`, over the film's content) are
        refused; any other film is trimmed of wide uniform padding (:func:`trimmed_content`),
        and how its content lies and what the view classifier reads of it are worked out.
        Safe to call from several threads.
        """
        view = (radiograph.view or "").strip().upper()
        if view in LATERAL_VIEWS:
            reason = f"{LATERAL_REASON} (DICOM view position {radiograph.view})"
            return FilmChecks((STATUS_LATERAL_VIEW, reason), radiograph.pixels)
        bounds = content_box(radiograph.pixels)
        config = self.config
        if problem := exposure_problem(
            radiograph.pixels, config.overexposed_fraction, config.underexposed_level, bounds
        ):
            return FilmChecks(problem, radiograph.pixels)
        content, corner = trimmed_content(radiograph.pixels, bounds)
        orientation = bone_orientation(content)
        view_input = None
        if self.view_classifier is not None and not orientation.sideways:
            view_input = self.view_classifier.film_input(content)
        return FilmChecks(None, content, corner, orientation, view_input)

    def detect(
        self, radiographs: Sequence[Radiograph], checks: Sequence[FilmChecks | None] | None = None
    ) -> list[Detection]:
        """Find the knee joints of each radiograph (one model call per batch, and more for the few below).

        Lateral DICOM views and over- or under-exposed films
        (:func:`~kneepipe.detect.quality.exposure_problem`) are refused without running
        the model (``checks``: the films' :meth:`check_film` where already made; the others
        are made here). A film on wide uniform padding is detected on its content alone
        (:func:`trimmed_content`); one lying sideways is turned (:meth:`detect_sideways`), one
        tilted by ``STRAIGHTEN_TILT`` or more straightened, and one leaning less with a single
        knee found is also looked at straightened (:meth:`look_straightened`); a full-leg film is
        looked at in windows down its length (:meth:`window_boxes`). A film with no
        confident knee is searched further (:meth:`search_boxes`), and one the view classifier
        is sure shows an AP knee keeps its best box even then (:meth:`best_faint_box`). The view
        classifier names lateral views and films with no knee, and each knee found is checked
        for a cut by the film's edge and for metal (:meth:`check_quality`). Boxes come back in
        the source file's pixels; crops are cut from the pixels as read.

        >>> detection = detector.detect([read_radiograph("knees.png")])[0]  # doctest: +SKIP
        >>> [(joint.side, joint.crop.shape) for joint in detection.joints]  # doctest: +SKIP
        [('R', (224, 224)), ('L', (224, 224))]
        """
        detections: list[Detection | None] = [None] * len(radiographs)
        given = list(checks) if checks is not None else [None] * len(radiographs)
        if len(given) != len(radiographs):
            raise ValueError(f"{len(given)} film checks for {len(radiographs)} radiographs")
        checked = [self.check_film(r) if c is None else c for r, c in zip(radiographs, given, strict=True)]
        contents: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
        orientations: dict[int, Orientation] = {}
        for index, (radiograph, check) in enumerate(zip(radiographs, checked, strict=True)):
            if check.refused is not None:
                detections[index] = Detection(radiograph.path, (), *check.refused)
            elif check.orientation is not None:  # always, for a film not refused (FilmChecks)
                contents[index] = (check.content, check.corner)
                orientations[index] = check.orientation
        to_run = list(contents)
        for start in range(0, len(to_run), self.config.batch):
            batch = to_run[start : start + self.config.batch]
            upright = [i for i in batch if not orientations[i].sideways]
            views = {
                i: straightened_view(contents[i][0], orientations[i].tilt)
                for i in upright
                if abs(orientations[i].tilt) >= STRAIGHTEN_TILT
            }
            films = [views[i].pixels if i in views else contents[i][0] for i in upright]
            results = self.predict_boxes(films)
            leaning = {
                i: orientations[i].tilt
                for i, film, rows in zip(upright, films, results, strict=True)
                if i not in views
                and abs(orientations[i].tilt) >= SEARCH_TILT
                and int((rows[:, 4] >= LEANING_FOUND).sum()) == 1
                and self.config.max_det >= 2
                and _room_beside(rows[0], film.shape[1])
            }
            if leaning:
                looked = self.look_straightened([contents[i][0] for i in leaning], list(leaning.values()))
                for i, rows in zip(leaning, looked, strict=True):
                    at = upright.index(i)
                    results[at] = pool_looks(results[at], rows, self.config.iou)
            # The view is read from the film as stored: straightening a lateral knee's bent leg hides its view.
            kinds: list[np.ndarray | None] = [None] * len(films)
            if self.view_classifier is not None:
                read = self.view_classifier.film_input
                made = [checked[i].view_input for i in upright]
                inputs = [read(contents[i][0]) if x is None else x for i, x in zip(upright, made, strict=True)]
                kinds = list(self.view_classifier.input_probabilities(inputs))
            for at, (film, rows, kind) in enumerate(zip(films, results, kinds, strict=True)):
                if self.wants_windows(film, rows, kind):
                    results[at] = self.window_boxes(film, rows)
            for index, film, boxes, kind in zip(upright, films, results, kinds, strict=True):
                # A film with no joint is searched too when the view classifier reads an AP knee on it.
                reads_ap = kind is not None and VIEW_CLASSES[int(np.argmax(kind))] == VIEW_AP
                searched = len(boxes) or reads_ap or self.config.search_empty
                if _best_confidence(boxes) < self.config.search_below and searched:
                    tilt = 0.0 if index in views or index in leaning else orientations[index].tilt
                    boxes = self.search_boxes(film, boxes, tilt)
                if not len(boxes) and kind is not None and kind[VIEW_CLASSES.index(VIEW_AP)] >= self.config.ap_sure:
                    boxes = self.best_faint_box(film)
                content, corner = contents[index]
                film_view, trim = views.get(index), None
                if content is not radiographs[index].pixels:  # found on the trimmed content
                    trim = (*corner, corner[0] + content.shape[1], corner[1] + content.shape[0])
                    if film_view is not None:
                        film_view = _shifted(film_view, corner)
                    else:
                        boxes = on_film(boxes, content.shape, corner)
                detection = self.to_detection(radiographs[index], boxes, film_view)
                detections[index] = self.check_quality(radiographs[index], detection, kind, trim)
            for index in (i for i in batch if orientations[i].sideways):
                radiograph = radiographs[index]
                detection = self.detect_sideways(radiograph)
                detections[index] = self.check_quality(radiograph, detection, self.sideways_view(radiograph.pixels))
        return detections  # type: ignore[return-value]

    def sideways_view(self, pixels: np.ndarray) -> np.ndarray | None:
        """The view classifier's reading of a film lying sideways, or ``None`` without a classifier.

        The classifier learnt upright films: lying sideways, a foot reads as an AP knee (0.96 on a shared
        foot). So the film is read turned upright both ways (one of them upside down), and a view is
        named only as far as both turns agree: the lateral and no-knee probabilities are the lower of the
        two turns'. Both upright turns of the shared feet read no knee 0.99-1.00, of the laterals
        lateral 0.77-0.99, of the AP films lateral and no knee 0.05 at most.
        """
        if self.view_classifier is None:
            return None
        turns = self.view_classifier.probabilities([turned_view(pixels, k).pixels for k in (1, -1)])
        lateral, no_knee = VIEW_CLASSES.index(VIEW_LATERAL), VIEW_CLASSES.index(VIEW_NO_KNEE)
        agreed = np.zeros(len(VIEW_CLASSES))
        agreed[lateral], agreed[no_knee] = turns[:, lateral].min(), turns[:, no_knee].min()
        agreed[VIEW_CLASSES.index(VIEW_AP)] = 1.0 - agreed[lateral] - agreed[no_knee]
        return agreed

    def check_quality(
        self,
        radiograph: Radiograph,
        detection: Detection,
        view_probabilities: np.ndarray | None = None,
        content: tuple[int, int, int, int] | None = None,
    ) -> Detection:
        """The film's view and each knee's quality, applied to one film's detection.

        A film the view classifier calls lateral (probability at least
        ``config.lateral_threshold``) is refused as ``lateral_view`` unless the detector
        found a joint at ``config.lateral_keep_conf`` or above; its knees are then graded
        and, like those of any film read lateral from ``config.view_review``, marked for
        review as a borderline view. A film the view classifier reads as showing no knee (probability
        at least ``config.no_knee_threshold``) is refused as ``no_knee`` unless a joint reaches
        ``config.no_knee_keep_conf`` (a box the detector is unsure of on a foot or a hand does not
        make it a knee). A film with no joint is ``no_knee``. Each joint
        found is then checked on its own, so one bad knee of a bilateral film leaves the other graded: a joint
        box lying beyond the film's edge by more than ``config.partial_fraction`` of its
        side is ``partial`` (the film's ``content`` bounds ``x0, y0, x1, y1`` in the pixels as read, when
        it lies on uniform padding: :func:`trimmed_content`), and a crop with a smooth near-white region over
        ``config.prosthesis_fraction`` of it (:func:`~kneepipe.detect.quality.metal_fraction`)
        is ``knee_prosthesis``. A film whose knees are all refused takes the first one's status.
        """
        lateral = 0.0
        if view_probabilities is not None:
            lateral = float(view_probabilities[VIEW_CLASSES.index(VIEW_LATERAL)])
            no_knee = float(view_probabilities[VIEW_CLASSES.index(VIEW_NO_KNEE)])
            best = max((joint.confidence for joint in detection.joints), default=0.0)
            if lateral >= self.config.lateral_threshold and best < self.config.lateral_keep_conf:
                reason = f"{LATERAL_REASON} (view classifier: lateral {lateral:.2f})"
                return Detection(radiograph.path, (), STATUS_LATERAL_VIEW, reason)
            if no_knee >= self.config.no_knee_threshold and best < self.config.no_knee_keep_conf:
                reason = f"no knee in image (view classifier: no knee {no_knee:.2f}; best box {best:.2f})"
                return Detection(radiograph.path, (), STATUS_NO_KNEE, reason)
        if not detection.joints:
            if detection.status == STATUS_NO_KNEE:
                return dataclasses.replace(detection, message="no knee in image")
            return detection
        width, height = radiograph.original_size
        x0, y0, x1, y1 = (0.0, 0.0, float(width), float(height))
        if content is not None:
            x0, y0, x1, y1 = (v / radiograph.scale for v in content)
        joints = []
        for joint in detection.joints:
            box = joint.box
            cut = cut_fraction((box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0), (x1 - x0, y1 - y0))
            metal = metal_fraction(joint.crop, self.config.metal_level, self.config.metal_contrast)
            if cut > self.config.partial_fraction:
                reason = f"partial: the joint is cut by the film's edge ({cut:.0%} of its box lies outside the film)"
                joint = dataclasses.replace(joint, status=STATUS_PARTIAL, message=reason)
            elif metal > self.config.prosthesis_fraction:
                reason = (
                    f"knee prosthesis: a metal implant is found ({metal:.0%} of the joint crop is a smooth region "
                    f"at grey {self.config.metal_level} or above, far brighter than the bone around it); not graded"
                )
                joint = dataclasses.replace(joint, status=STATUS_KNEE_PROSTHESIS, message=reason)
            if lateral >= self.config.view_review:
                doubt = f"borderline view: the view classifier reads lateral {lateral:.2f}"
                joint = dataclasses.replace(joint, review=(*joint.review, doubt))
            joints.append(joint)
        refused = [joint for joint in joints if joint.status != STATUS_OK]
        if len(refused) == len(joints):
            reasons = "; ".join(f"{joint.side} knee: {joint.message}" for joint in refused)
            return dataclasses.replace(detection, joints=tuple(joints), status=refused[0].status, message=reasons)
        return dataclasses.replace(detection, joints=tuple(joints))

    def detect_sideways(self, radiograph: Radiograph) -> Detection:
        """Detect a film that lies sideways (:func:`~kneepipe.detect.orientation.bone_orientation`).

        It is detected as stored first. The edges can mislead: a collimator band across a
        short, wide bilateral film outweighs its legs. So a film with a joint as stored from
        ``SURE_AS_STORED`` up is detected as stored, at the cost of one model call. Otherwise it
        is also detected turned upright both ways (one more call), and a film whose joints as
        stored are at least as confident as those of either turn, its best from
        ``config.search_conf`` up, is detected as stored.
        Otherwise the turn whose joints have the higher summed confidence wins, its crops
        are cut upright and its boxes mapped back onto the film as stored. One of the two
        turns shows the film upside down, on which the model sees knee-like shapes more
        readily (0.06 and 0.13 on two foot films), so the winner counts only when its best
        joint reaches ``config.search_conf``. Otherwise the film is refused as ``rotated``.
        """
        stored = self.predict_boxes([radiograph.pixels])[0]
        if _best_confidence(stored) >= SURE_AS_STORED:
            return self.to_detection(radiograph, stored)
        views = [turned_view(radiograph.pixels, k) for k in (1, -1)]
        turned = self.predict_boxes([view.pixels for view in views])
        kept = self.config.max_det
        boxes, view = max(zip(turned, views, strict=True), key=lambda pair: float(pair[0][:kept, 4].sum()))
        as_stored = _best_confidence(stored) >= self.config.search_conf
        if as_stored and float(stored[:kept, 4].sum()) >= float(boxes[:kept, 4].sum()):
            return self.to_detection(radiograph, stored)
        if _best_confidence(boxes) < self.config.search_conf:  # one of the two turns stands the film on its head
            reason = (
                "the film lies sideways (its bones run across it) and no knee was found on it turned upright "
                "either way: store it upright"
            )
            return Detection(radiograph.path, (), STATUS_ROTATED, reason)
        return self.to_detection(radiograph, boxes, view)

    def predict_boxes(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """The selected joints' rows ``x1, y1, x2, y2, confidence, class`` per image, in image pixels.

        A film with a joint less confident than ``config.rescue_below`` is detected again
        after CLAHE contrast equalisation (:func:`equalise_contrast`), and the pass whose
        joints have the higher summed confidence is kept. A faint, low-contrast knee
        that the first pass boxed wrongly (a shaft, or the same leg too high) is found
        this way; films with no joint at all are not retried, so views the model rightly
        sees no knee on (laterals, feet) stay refused. Crops are always cut from the
        pixels as read, never from the equalised copy.
        """
        kept = self.config.max_det  # rows beyond it are dropped later, with a note
        selections = self._select_per_image(images)
        retry = [
            i for i, rows in enumerate(selections) if len(rows) and rows[:kept, 4].min() < self.config.rescue_below
        ]
        if retry:
            again = self._select_per_image([equalise_contrast(images[i]) for i in retry])
            for i, rows in zip(retry, again, strict=True):
                if rows[:kept, 4].sum() > selections[i][:kept, 4].sum():
                    selections[i] = rows
        return selections

    def _select_per_image(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One model call over ``images``; :meth:`select_boxes` of each image's raw boxes."""
        return [
            self.select_boxes(rows) for rows in self._raw_boxes(images, min(self.config.conf, self.config.pair_conf))
        ]

    def _raw_boxes(self, images: list[np.ndarray], conf: float) -> list[np.ndarray]:
        """One model call over ``images``: each image's boxes from ``conf`` up, after NMS, in its pixels."""
        if not images:
            return []
        inputs = [model_input(image, self.config.imgsz) for image in images]
        results = self.model.predict(
            source=[pixels for pixels, _ in inputs],
            imgsz=self.config.imgsz,
            conf=conf,
            iou=self.config.iou,
            max_det=16,
            agnostic_nms=True,  # one joint is one knee, whichever side the model favours
            rect=False,  # square letterbox always, so a film's boxes do not depend on its batch neighbours
            device="cpu",
            verbose=False,
        )
        rows = [result.boxes.data.cpu().numpy().reshape(-1, 6) for result in results]
        for boxes, (_, (scale_x, scale_y)) in zip(rows, inputs, strict=True):
            boxes[:, [0, 2]] *= scale_x
            boxes[:, [1, 3]] *= scale_y
        # A box clipped to the letterboxed film can come back with no width or height: no knee.
        return [boxes[(boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)] for boxes in rows]

    def look_straightened(self, films: list[np.ndarray], tilts: list[float]) -> list[np.ndarray]:
        """The joints found on each film straightened by its ``tilt``, mapped back onto the film.

        The model learnt knees standing upright. A film leaning by ``SEARCH_TILT`` degrees or
        more, too little to be straightened outright (``STRAIGHTEN_TILT``: upright films can
        read that much), on which one joint was found (from ``LEANING_FOUND``) with room for another beside it, is
        looked at straightened too (one model call for all of them), and :meth:`detect` pools
        the two looks: the second knee of a tilted bilateral film sits lower than the first
        and is missed upright more often than straightened.
        """
        views = [straightened_view(film, tilt) for film, tilt in zip(films, tilts, strict=True)]
        found = self.predict_boxes([view.pixels for view in views])
        return [_map_back(rows, view.matrix) for rows, view in zip(found, views, strict=True)]

    def wants_windows(self, film: np.ndarray, first: np.ndarray, view: np.ndarray | None) -> bool:
        """Whether a film is looked at in windows (:meth:`window_boxes`): a portrait film ``TALL_FILM``
        times as tall as wide, or ``LONG_FILM`` times and not read lateral by the view classifier
        (probabilities ``view``), whose first pass found no joint from ``WINDOW_BELOW``."""
        if _best_confidence(first) >= WINDOW_BELOW:
            return False
        tall = film.shape[0] / film.shape[1]
        lateral = view is not None and view[VIEW_CLASSES.index(VIEW_LATERAL)] >= self.config.lateral_threshold
        return tall >= TALL_FILM or (tall >= LONG_FILM and not lateral)

    def window_boxes(self, pixels: np.ndarray, first: np.ndarray) -> np.ndarray:
        """Look at a tall film in square windows down its length, and pool them with the first pass.

        On a full-leg film the whole film shrunk to the model's input shows each knee at a third of
        the size the model learnt or less. Square windows as wide as the film, each overlapping the
        next by half, show it at the scale of an ordinary knee film (one model call for all of them).
        Their joints are mapped back and pooled with the first pass's (:meth:`select_boxes`); the
        pooled joints win when their summed confidence is higher. A film up to 1.5 times as tall
        as wide gets two windows, one at its top and one at its bottom.
        """
        height, width = pixels.shape[:2]
        tops = list(range(0, height - width, max(1, width // 2))) + [height - width]
        found = self.predict_boxes([pixels[top : top + width] for top in tops])
        shifted = [rows + np.array([0, top, 0, top, 0, 0]) for rows, top in zip(found, tops, strict=True)]
        return self._pooled_if_surer(first, shifted)

    def best_faint_box(self, pixels: np.ndarray) -> np.ndarray:
        """The most confident box from ``config.pair_conf`` up on a film the view classifier is sure shows
        an AP knee (``config.ap_sure``) but on which neither the first pass nor the search found a joint.

        A knee filling the frame is read by the model at 0.01-0.05 while the view classifier reads an AP
        knee at 0.9 or more on the same film. Its box is kept, marked for review by its low confidence
        (``config.review_conf``), rather than the film refused as having no knee.
        """
        (rows,) = self._raw_boxes([pixels], self.config.pair_conf)
        return suppress_nested(rows, self.config.iou)[:1]

    def search_boxes(self, pixels: np.ndarray, first: np.ndarray, tilt: float = 0.0) -> np.ndarray:
        """Look further for the knees of a film the first pass found no confident knee on.

        The model learnt knees at the scale and orientation of bilateral AP films. It
        looks again, in one model call, at:

        * the film shrunk to 60% on a canvas of its own size (padded with the film's
          border grey): a knee that fills the frame then appears at the learnt scale;
        * four overlapping corner tiles of 60% of the width and height: a knee that is
          small on the film (a full-leg film) appears larger;
        * when its edges lean by ``SEARCH_TILT`` degrees or more (``tilt``, from
          :func:`~kneepipe.detect.orientation.bone_orientation`), the film straightened.

        Boxes from every view are mapped back onto the film (one found on the
        straightened film keeps its centre and size) and pooled; only boxes from
        ``config.search_conf`` up count. The pooled joints replace the first pass's when
        their summed confidence is higher.
        """
        height, width = pixels.shape
        grey = int(np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])))
        zoom = SEARCH_CANVAS_ZOOM
        shrink = np.array([[zoom, 0, width * (1 - zoom) / 2], [0, zoom, height * (1 - zoom) / 2]])
        tile_w, tile_h = round(width * SEARCH_TILE), round(height * SEARCH_TILE)
        offsets = [(x, y) for x in (0, width - tile_w) for y in (0, height - tile_h)]
        views = [(cv2.warpAffine(pixels, shrink, (width, height), flags=cv2.INTER_AREA, borderValue=grey), shrink)]
        for x, y in offsets:
            views.append((pixels[y : y + tile_h, x : x + tile_w], np.array([[1.0, 0, -x], [0, 1.0, -y]])))
        if abs(tilt) >= SEARCH_TILT:
            straight = straightened_view(pixels, tilt)
            views.append((straight.pixels, straight.matrix))
        found = self._raw_boxes([view for view, _ in views], self.config.search_conf)
        on_film = [_map_back(rows, matrix) for rows, (_, matrix) in zip(found, views, strict=True)]
        return self._pooled_if_surer(first, on_film)

    def _pooled_if_surer(self, first: np.ndarray, more: list[np.ndarray]) -> np.ndarray:
        """The joints selected from ``first`` and ``more`` rows together (:meth:`select_boxes`) when their
        ``max_det`` most confident sum to more than ``first``'s, else ``first``."""
        pooled = self.select_boxes(np.vstack([first, *more]))
        kept = self.config.max_det
        return pooled if pooled[:kept, 4].sum() > first[:kept, 4].sum() else first

    def select_boxes(self, rows: np.ndarray) -> np.ndarray:
        """The joints among one image's raw boxes (most confident first), all of them.

        :meth:`to_detection` keeps the ``max_det`` most confident and notes any it drops.
        Boxes at ``conf`` or above are joints, except one stacked above or below a more
        confident joint (two knees on one film are side by side). When one joint is
        left, the most confident box beside it that could be the other knee of a
        bilateral film (:func:`pair_partner`) is kept from ``pair_conf`` up: the model
        is much less sure of a knee on a dark or asymmetric film than of its partner.
        """
        rows = suppress_nested(rows, self.config.iou)
        kept_rows: list[np.ndarray] = []
        for row in rows[rows[:, 4] >= self.config.conf]:
            # Knees on one film sit side by side; a box above or below a kept knee is
            # a shaft or the same leg boxed again, not another knee.
            if all(_side_by_side(row, kept) for kept in kept_rows):
                kept_rows.append(row)
        confident = np.array(kept_rows).reshape(-1, 6)
        if len(confident) == 1 and self.config.max_det >= 2:
            faint = rows[(rows[:, 4] < self.config.conf) & (rows[:, 4] >= self.config.pair_conf)]
            partner = pair_partner(confident[0], faint)
            if partner is not None:
                confident = np.vstack([confident, partner])
        return confident

    def to_detection(self, radiograph: Radiograph, boxes: np.ndarray, view: FilmView | None = None) -> Detection:
        """Turn one image's raw boxes into joints: sides, square boxes, crops, source pixels.

        A single knee takes the file's laterality tag when it has one, else the side the
        side classifier reads from its anatomy (the fibula is lateral); two knees side by
        side on one film take their position (the patient's right knee on the image's
        left). The anatomy checks the tag and the position: when it disagrees (a mirrored
        film), or reads a single knee unsurely, the message says so and the knee is
        flagged for review (:func:`kneepipe.detect.side.decide_side`). A knee found below
        ``config.review_conf`` is flagged too.

        With a ``view`` (a film stored on its side, or tilted), ``boxes`` lie on
        ``view.pixels``: the crops are cut from it, upright, and each box is mapped back
        onto the film as stored (its centre exactly, its size kept); the message and each
        knee's review reasons say what was done.
        """
        pixels = view.pixels if view is not None else radiograph.pixels
        height, width = pixels.shape
        if len(boxes) == 0:
            return Detection(radiograph.path, (), STATUS_NO_KNEE, "no knee joint found")
        note = ""
        if len(boxes) > self.config.max_det:
            dropped = boxes[self.config.max_det :]
            where = ", ".join(
                f"confidence {row[4]:.2f} at x={(row[0] + row[2]) / 2 / radiograph.scale:.0f}" for row in dropped
            )
            note = (
                f"{len(boxes)} knee-like objects found; the {self.config.max_det} most confident were graded and "
                f"{len(dropped)} dropped ({where}): max_det is {self.config.max_det}"
            )
            boxes = boxes[: self.config.max_det]
        squares = [square_box(tuple(row[:4]), image_size=(width, height)) for row in boxes]
        crops = [crop_joint(pixels, box, size=self.config.crop_size) for box in squares]
        positions: list[Side | None] = [None] * len(boxes)
        if len(boxes) == 2 and _side_by_side(boxes[0], boxes[1]):
            # Two knees on one film: on AP/PA films the patient's right is the image's left.
            left_first = (boxes[0][0] + boxes[0][2]) < (boxes[1][0] + boxes[1][2])
            positions = ["R", "L"] if left_first else ["L", "R"]
        tag = radiograph.laterality if len(boxes) == 1 else None  # the file states which knee it shows
        anatomy = self.side_classifier.probability_right(crops) if self.side_classifier else None
        joints, doubts = [], []
        for index, (row, box, crop) in enumerate(zip(boxes, squares, crops, strict=True)):
            review = []
            if anatomy is None:  # no side classifier: the side the detector's class reads
                side: Side = positions[index] or tag or SIDES[int(row[5])]
            else:
                right = float(anatomy[index])
                read: tuple[Side, float] = ("R", right) if right >= 0.5 else ("L", 1 - right)
                decision = decide_side(read, tag=tag, position=positions[index], min_anatomy=self.config.side_conf)
                side = decision.side
                if decision.doubt:
                    review.append(decision.doubt)
                    doubts.append(f"{side} knee: {decision.doubt}")
            if row[4] < self.config.review_conf:
                review.append(f"low detector confidence {row[4]:.2f} (below review_conf {self.config.review_conf:g})")
            if view is not None:
                review.append(view.reason)
                box = tuple(_map_back(np.array([[*box, 0, 0]]), view.matrix)[0, :4])
            source_box = tuple(float(v) / radiograph.scale for v in box)
            joints.append(Joint(radiograph.path, side, source_box, float(row[4]), crop, tuple(review)))  # type: ignore[arg-type]
        if view is not None:
            note = "; ".join(filter(None, [view.reason, note]))
        if doubts:
            note = "; ".join(filter(None, [note, *doubts]))
        joints.sort(key=lambda joint: (joint.box[0] + joint.box[2]) / 2)
        return Detection(radiograph.path, tuple(joints), message=note)


@dataclass(frozen=True)
class DetectSummary:
    """What a ``detect_folder`` run did: files seen, rows per status, where it wrote."""

    images: int
    joints: int
    status_counts: dict[str, int]
    joints_csv: Path
    detector_version: str
    skipped: int = 0
    hidden_skipped: int = 0
    statuses: tuple[str, ...] = ()


def _crop_name(stem: str, side: str, taken: set[str]) -> str:
    if len(stem) > MAX_KEY_LENGTH:  # a crop name must stay within the file system's 255 bytes
        digest = hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        stem = f"{stem[: MAX_KEY_LENGTH - 9]}-{digest}"
    if stem.startswith(FORMULA_STARTS):  # a crop name a spreadsheet would take for a formula
        stem = "_" + stem
    name, number = f"{stem}_{side}.png", 2
    while name in taken:
        name, number = f"{stem}_{side}_{number}.png", number + 1
    taken.add(name)
    return name


def write_joint_rows(detection: Detection, out_dir: Path, taken: set[str]) -> list[dict[str, str]]:
    """Write a detection's crops into ``out_dir``; return its ``joints.csv`` rows.

    ``taken`` holds the crop names already used, so duplicates get ``_2``, ``_3``...
    """
    image = str(detection.image)
    if not detection.joints:
        return [
            {
                "image": image,
                "side": "",
                "x1": "",
                "y1": "",
                "x2": "",
                "y2": "",
                "confidence": "",
                "crop": "",
                "status": detection.status,
                "message": detection.message,
                "needs_review": "",
                "review_reason": "",
            }
        ]
    rows = []
    for joint in detection.joints:
        name = _crop_name(Path(joint.image).stem, joint.side, taken)
        ok, encoded = cv2.imencode(".png", joint.crop)
        if not ok:
            raise OSError(f"cannot encode the {joint.side} crop of {image}")
        write_atomic(out_dir / name, encoded.tobytes())
        x1, y1, x2, y2 = joint.box
        rows.append(
            {
                "image": image,
                "side": joint.side,
                "x1": f"{x1:.1f}",
                "y1": f"{y1:.1f}",
                "x2": f"{x2:.1f}",
                "y2": f"{y2:.1f}",
                "confidence": f"{joint.confidence:.4f}",
                "crop": name,
                "status": joint.status,
                "message": detection.message if joint.status == STATUS_OK else joint.message,
                "needs_review": str(joint.needs_review).lower(),
                "review_reason": joint.review_reason,
            }
        )
    return rows


def write_joints_csv(rows: Iterable[dict[str, str]], path: Path) -> None:
    """Write ``joints.csv`` (the columns of :data:`JOINTS_CSV_COLUMNS`) atomically."""
    write_csv_atomic(path, JOINTS_CSV_COLUMNS, rows)


def detect_folder(
    inputs: Path,
    out_dir: Path,
    config: DetectConfig,
    detector: JointDetector | None = None,
    progress: bool = True,
) -> DetectSummary:
    """Detect the knee joints of every radiograph under ``inputs``; write crops and CSV.

    Writes ``out_dir/<image stem>_<side>.png`` per joint, ``out_dir/joints.csv`` with a
    row per joint or one row saying why a file has none, and ``out_dir/args.yaml``.
    A file that cannot be read or processed gets an ``error`` row naming the reason, and
    every other entry under ``inputs`` (not an image, hidden, a FIFO...) a ``skipped`` row.

    Args:
        inputs: a radiograph file or a folder searched recursively.
        out_dir: the output folder (created).
        config: the resolved detect config.
        detector: an already loaded detector (else loaded from ``config``).
        progress: show a progress bar on stderr for batches of more than one file.

    Raises:
        FileNotFoundError: ``inputs`` does not exist, or the weights are missing.

    >>> cfg = load_config(DetectConfig)  # doctest: +SKIP
    >>> detect_folder(Path("raw"), Path("crops"), cfg).status_counts  # doctest: +SKIP
    {'ok': 12, 'no_knee': 1}
    """
    out_dir = Path(out_dir)
    listing = list_inputs(inputs, exclude=(out_dir,))
    paths = listing.files
    outside = set(listing.outside_links)
    detector = detector or JointDetector.load(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    taken: set[str] = set()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not progress or len(paths) <= 1,
    )
    # Films are decoded and their pixels checked (check_film) in a thread ahead of the model, as kneepipe run does.
    stream = decoded_radiographs(
        paths, config.max_side, 2 * config.batch, prepare=detector.check_film, max_pixels=config.max_pixels
    )
    with bar, closing(stream):
        task = bar.add_task("detecting knee joints", total=len(paths))
        while step := list(itertools.islice(stream, config.batch)):
            batch_paths = [path for path, _, _ in step]
            radiographs, checks, detections = [], [], {}
            for path, item, check in step:
                if isinstance(item, ImageReadError):
                    detections[path] = Detection(path, (), STATUS_ERROR, item.reason)
                else:
                    radiographs.append(item)
                    checks.append(check)
            found = detect_radiographs(detector, radiographs, checks)
            for radiograph, detection in zip(radiographs, found, strict=True):
                notes = [detection.message, *radiograph.notes]
                if radiograph.path in outside:
                    notes.append("read through a link to a file outside the input folder")
                detections[radiograph.path] = dataclasses.replace(detection, message="; ".join(filter(None, notes)))
            for path in batch_paths:
                try:
                    rows.extend(write_joint_rows(detections[path], out_dir, taken))
                except Exception as err:  # this file's problem only: an error row, and the batch goes on
                    reason = f"cannot write the crops ({type(err).__name__}: {err})"
                    rows.append(write_joint_rows(Detection(path, (), STATUS_ERROR, reason), out_dir, taken)[0])
            bar.advance(task, len(batch_paths))
    for entry in listing.skipped:
        rows.extend(write_joint_rows(Detection(entry.path, (), STATUS_SKIPPED, entry.reason), out_dir, taken))

    joints_csv = out_dir / "joints.csv"
    write_joints_csv(rows, joints_csv)
    save_config(
        config,
        out_dir,
        extra={"inputs": str(inputs), "detector": str(detector.weights), "detector_version": detector.version},
    )
    counts = Counter(row["status"] for row in rows if row["status"] != STATUS_OK)
    counts[STATUS_OK] = sum(1 for row in rows if row["status"] == STATUS_OK)
    return DetectSummary(
        images=len(paths),
        joints=counts[STATUS_OK],
        status_counts=dict(counts),
        joints_csv=joints_csv,
        detector_version=detector.version,
        skipped=len(listing.skipped),
        hidden_skipped=sum(entry.hidden for entry in listing.skipped),
        statuses=tuple(row["status"] for row in rows),
    )


def detect_radiographs(
    detector: Detector, radiographs: Sequence[Radiograph], checks: Sequence[FilmChecks | None] | None = None
) -> list[Detection]:
    """One detection per radiograph, in order; a failure costs only the film that fails.

    ``checks``: the films' :meth:`JointDetector.check_film` where already made (a
    :class:`JointDetector` only; other detectors are called without them).

    The radiographs are detected together (in the detector's batches). If that call
    fails, or returns the wrong number of detections, the failure is logged and each film
    is detected alone, so only a film that fails by itself gets an ``error`` detection
    naming the reason. This is how ``kneepipe detect`` and ``kneepipe run`` call a detector.

    >>> class Broken:
    ...     def detect(self, radiographs):
    ...         raise RuntimeError("out of memory")
    >>> film = Radiograph(np.zeros((8, 8), np.uint8), Path("a.png"), (8, 8))
    >>> [(d.status, d.message) for d in detect_radiographs(Broken(), [film])]
    [('error', 'detection failed (RuntimeError: out of memory)')]
    """
    if not radiographs:
        return []
    given = list(checks) if checks is not None else [None] * len(radiographs)

    def detect(films: Sequence[Radiograph], made: Sequence[FilmChecks | None]) -> list[Detection]:
        if isinstance(detector, JointDetector):
            return detector.detect(films, made)
        return list(detector.detect(films))

    try:
        detections = detect(radiographs, given)
        if len(detections) == len(radiographs):
            return detections
        log.warning("the detector returned %d detections for %d films", len(detections), len(radiographs))
    except Exception as err:  # isolate the film that failed below
        log.warning(
            "detection of %d films failed (%s: %s); detecting them one by one",
            len(radiographs),
            type(err).__name__,
            err,
        )
    detections = []
    for radiograph, check in zip(radiographs, given, strict=True):
        try:
            detections.extend(detect([radiograph], [check]))
        except Exception as err:  # any failure becomes that film's error detection
            reason = f"detection failed ({type(err).__name__}: {err})"
            detections.append(Detection(radiograph.path, (), STATUS_ERROR, reason))
    return detections
