"""The Xception KL grader: architecture, heads, and the grader file that carries its preprocessing.

A grader file (``.npz``) holds the network weights (float16) and, under the key
``kneepipe``, a JSON :class:`Preprocessing` record: the architecture and its arguments,
input size, channel handling, scaling, resizing, class names, head, crop framing, the
fitted temperature and the training grade prior. Inference reads all of it from the
file (every field is read somewhere, or the file is refused); nothing is defined twice.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kneepipe.files import file_digest, write_atomic
from kneepipe.joints import CROP_FRAMING
from kneepipe.runtime import import_keras

NUM_GRADES = 5
FORMAT_VERSION = 1
OAI_FRAMING = CROP_FRAMING  # the name older code and files know it by
CLASS_NAMES = ("KL0", "KL1", "KL2", "KL3", "KL4")
SCALINGS = {"x/127.5-1 inside the network": (1 / 127.5, -1.0)}
"""Pixel scalings a grader can apply as its first layer: (scale, offset) of ``Rescaling``."""
RESIZE_RULES = ("area", "linear", "cubic")
"""How crops are resized to the grader's sizes; "area" is OpenCV's advice: area to shrink, linear to enlarge."""
ARCHITECTURES = ("xception",)


@dataclass(frozen=True)
class Preprocessing:
    """Everything inference must do to a crop before the network sees it, and how to read the output.

    Each field is read at inference: ``architecture`` and ``architecture_args``
    (:func:`kneepipe.grade.xception.xception_backbone`), ``head``, ``channels`` and
    ``scaling`` build the network (:func:`build_grader`); ``crop_size``, ``input_size``
    and ``resize_interpolation`` fit a crop to it (``Grader.prepare``); ``framing`` must
    be the detector's (:data:`kneepipe.joints.CROP_FRAMING`, checked when ``kneepipe run``
    loads both); ``class_names`` must be the KL grades the outputs are named after;
    ``temperature``, ``class_bias`` and ``decision`` turn outputs into grades;
    ``train_prior`` is what prior adaptation starts from. A file with a value inference
    cannot honour is refused when it is read.
    """

    input_size: int
    head: str  # "softmax" or "corn"
    channels: int = 3  # grayscale replicated to this many channels
    scaling: str = "x/127.5-1 inside the network"
    resize_interpolation: str = "area"
    crop_size: int = 224
    framing: str = CROP_FRAMING
    class_names: tuple[str, ...] = CLASS_NAMES
    temperature: float = 1.0
    class_bias: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)  # bias-corrected temperature scaling
    decision: str = "argmax"  # how probabilities become a grade: "argmax" or "median" (chosen on val)
    train_prior: tuple[float, ...] = (0.2, 0.2, 0.2, 0.2, 0.2)
    architecture: str = "xception"
    architecture_args: dict[str, Any] = field(default_factory=dict)  # e.g. a tiny test network's width
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = {
            "head": (self.head, ("softmax", "corn")),
            "scaling": (self.scaling, tuple(SCALINGS)),
            "resize_interpolation": (self.resize_interpolation, RESIZE_RULES),
            "architecture": (self.architecture, ARCHITECTURES),
            "decision": (self.decision, ("argmax", "median")),
        }
        for name, (value, known) in problems.items():
            if value not in known:
                raise ValueError(f"grader {name} {value!r} is not supported (one of {', '.join(known)})")
        if tuple(self.class_names) != CLASS_NAMES:
            raise ValueError(f"grader classes {list(self.class_names)}: kneepipe grades {', '.join(CLASS_NAMES)}")

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        record = json.loads(text)
        version = record.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"grader format version {version} is not supported (expected {FORMAT_VERSION})")
        record["class_names"] = tuple(record["class_names"])
        record["train_prior"] = tuple(record["train_prior"])
        record["class_bias"] = tuple(record.get("class_bias", (0.0,) * 5))
        return cls(**record)


def head_units(head: str) -> int:
    """Output units of a head: 5 softmax logits, or 4 CORN conditional logits."""
    return NUM_GRADES if head == "softmax" else NUM_GRADES - 1


def build_grader(
    head: str = "softmax",
    dropout: float = 0.3,
    weights: str | None = None,
    channels: int = 3,
    scaling: str = "x/127.5-1 inside the network",
    architecture_args: dict[str, Any] | None = None,
):
    """An Xception KL grader taking uint8-range images of any size >= 71 px.

    Args:
        head: ``softmax`` (5 logits) or ``corn`` (4 conditional ordinal logits).
        dropout: dropout before the final dense layer.
        weights: ``None`` for random init, ``"imagenet"`` (downloads; networked machines
            only), or a path to an Xception weights file.
        channels: input channels (grayscale is replicated).
        scaling: the pixel scaling of the first layer (a key of :data:`SCALINGS`).
        architecture_args: ``width`` and ``middle_blocks`` of the backbone (default: the
            published Xception; a tiny one for tests).

    >>> build_grader("corn", architecture_args={"width": 0.0625, "middle_blocks": 1}).output_shape
    (None, 4)
    """
    from kneepipe.grade.xception import xception_backbone

    keras = import_keras()
    scale, offset = SCALINGS[scaling]
    inputs = keras.Input(shape=(None, None, channels), name="crop")
    scaled = keras.layers.Rescaling(scale, offset=offset, name="scale")(inputs)
    backbone = xception_backbone(channels, **(architecture_args or {}), weights=weights)
    features = backbone(scaled)
    features = keras.layers.Dropout(dropout, name="dropout")(features)
    # The logits stay float32 under mixed precision, for a stable loss and softmax.
    logits = keras.layers.Dense(head_units(head), dtype="float32", name="logits")(features)
    return keras.Model(inputs, logits, name=f"xception_kl_{head}")


def probabilities_from_logits(
    logits: np.ndarray, head: str, temperature: float = 1.0, class_bias: Sequence[float] | None = None
) -> np.ndarray:
    """Grade probabilities ``(n, 5)`` from network outputs, with (bias-corrected) temperature scaling.

    Calibrated probabilities are ``softmax(log p / T + class_bias)``, ``p`` the network's own
    (:func:`log_probabilities`).

    For CORN, the 4 outputs are logits of P(grade > k | grade > k-1); their cumulative
    products give P(grade > k), whose differences are the grade probabilities.
    """
    logits = np.asarray(logits, dtype=np.float64)
    log_p = log_probabilities(logits, head)
    bias = np.zeros(NUM_GRADES) if class_bias is None else np.asarray(class_bias, dtype=np.float64)
    z = log_p / temperature + bias
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def log_probabilities(logits: np.ndarray, head: str) -> np.ndarray:
    """The network's own log grade probabilities ``(n, 5)``, what temperature scaling divides.

    For the softmax head they are the log-softmax of the logits, exact however small a
    probability is (so dividing them by a temperature is dividing the logits). For CORN,
    the logs of the differences of the cumulative probabilities (a grade the network rules
    out gets log 1e-12, not minus infinity). No logit overflows, however large.

    >>> log_probabilities(np.array([[0.0, 0.0, 0.0, 0.0, 800.0]]), "softmax")[0, :2].tolist()
    [-800.0, -800.0]
    >>> np.exp(log_probabilities(np.array([[-800.0, 0.0, 0.0, 0.0]]), "corn")).round(3).tolist()
    [[1.0, 0.0, 0.0, 0.0, 0.0]]
    """
    logits = np.asarray(logits, dtype=np.float64)
    if head == "softmax":
        top = logits.max(axis=1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    conditional = np.exp(-np.logaddexp(0.0, -logits))  # the sigmoid, without overflow
    above = np.cumprod(conditional, axis=1)  # P(grade > k), k = 0..3
    upper = np.concatenate([np.ones((len(logits), 1)), above], axis=1)
    lower = np.concatenate([above, np.zeros((len(logits), 1))], axis=1)
    p = np.clip(upper - lower, 1e-12, 1.0)
    return np.log(p / p.sum(axis=1, keepdims=True))


def decide_grades(probabilities: np.ndarray, rule: str = "argmax") -> np.ndarray:
    """KL grades from ``(n, 5)`` probabilities by a decision rule.

    ``argmax`` picks the most probable grade (best for accuracy); ``median`` picks the
    median of the grade distribution, the grade minimising the expected absolute error,
    which respects the ordinal scale (a knee torn between KL0 and KL2 gets KL1).

    >>> decide_grades(np.array([[0.45, 0.1, 0.45, 0, 0]]), "median").tolist()
    [1]
    """
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, NUM_GRADES)
    if rule == "argmax":
        return probabilities.argmax(axis=1)
    if rule == "median":
        cumulative = np.cumsum(probabilities, axis=1) / probabilities.sum(axis=1, keepdims=True)
        return np.minimum((cumulative < 0.5).sum(axis=1), NUM_GRADES - 1)
    raise ValueError(f"unknown decision rule {rule!r} (argmax or median)")


def corn_loss(y_true, logits):
    """CORN loss (Shi et al. 2021): binary cross-entropy of task k on samples with grade >= k."""
    keras = import_keras()
    ops = keras.ops
    grades = ops.reshape(ops.cast(y_true, "int32"), (-1, 1))
    tasks = ops.reshape(ops.arange(NUM_GRADES - 1, dtype="int32"), (1, -1))
    targets = ops.cast(grades > tasks, "float32")
    in_task = ops.cast(grades >= tasks, "float32")
    logits = ops.cast(logits, "float32")
    # Numerically stable binary cross-entropy with logits, element-wise.
    bce = ops.maximum(logits, 0.0) - logits * targets + ops.log1p(ops.exp(-ops.abs(logits)))
    return ops.sum(bce * in_task, axis=1) / ops.maximum(ops.sum(in_task, axis=1), 1.0)


def save_grader(model, preprocessing: Preprocessing, path: str | Path) -> Path:
    """Write a grader file: float16 weights plus the preprocessing record, atomically."""
    return _write_grader_file([np.asarray(w) for w in model.get_weights()], preprocessing, path)


def _write_grader_file(weights: Sequence[np.ndarray], preprocessing: Preprocessing, path: str | Path) -> Path:
    """Weights in float16 plus the preprocessing record, written in one piece."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"w{i:04d}": w.astype(np.float16) for i, w in enumerate(weights)}
    arrays["kneepipe"] = np.array(preprocessing.to_json())
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, **arrays)  # read back with allow_pickle=False
    return write_atomic(path, buffer.getvalue(), fsync=True)


def average_graders(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write the weight average of grader files of one architecture (a "model soup").

    Averaging the weights of fine-tuned runs that share an initialisation (Wortsman et al.
    2022) costs nothing at inference, unlike averaging their predictions. The result
    takes the preprocessing of the first file, calibration reset to none (calibrate it
    again: ``kneepipe train average`` does), and records its ingredients (name and
    digest of each file) under ``extra["average_of"]``.

    Raises:
        ValueError: fewer than two files, a file that is not a grader, or graders whose
            heads or weight shapes differ.
    """
    if len(paths) < 2:
        raise ValueError("averaging needs at least two grader files")
    records, weights = zip(*(read_grader_file(path) for path in paths), strict=True)
    first = records[0]
    shapes = [w.shape for w in weights[0]]
    for path, record, arrays in zip(paths[1:], records[1:], weights[1:], strict=True):
        same = (record.head, record.channels, record.architecture_args) == (
            first.head,
            first.channels,
            first.architecture_args,
        ) and [w.shape for w in arrays] == shapes
        if not same:
            raise ValueError(f"{path}: a different architecture from {paths[0]} (head, channels or weight shapes)")
    averaged = [np.mean(layer, axis=0) for layer in zip(*weights, strict=True)]
    ingredients = [f"{Path(path).name}@{file_digest(path)}" for path in paths]
    uncalibrated = dataclasses.replace(
        first, temperature=1.0, class_bias=(0.0,) * len(first.class_bias), extra={"average_of": ingredients}
    )
    return _write_grader_file(averaged, uncalibrated, out)


def read_grader_file(path: str | Path) -> tuple[Preprocessing, list[np.ndarray]]:
    """The preprocessing record and the float32 weights (in layer order) of a grader file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            preprocessing = Preprocessing.from_json(str(archive["kneepipe"]))
            return preprocessing, [
                archive[k].astype(np.float32) for k in sorted(k for k in archive.files if k.startswith("w"))
            ]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a kneepipe grader file ({err})") from err


def read_preprocessing(path: str | Path) -> Preprocessing:
    """The preprocessing record of a grader file, without loading the network."""
    with np.load(path, allow_pickle=False) as archive:
        return Preprocessing.from_json(str(archive["kneepipe"]))


def load_grader(path: str | Path, dtype: str = "float32"):
    """Rebuild the network of a grader file and load its weights. Returns ``(model, preprocessing)``."""
    keras = import_keras()
    preprocessing, weights = read_grader_file(path)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        model = build_grader(
            preprocessing.head,
            channels=preprocessing.channels,
            scaling=preprocessing.scaling,
            architecture_args=preprocessing.architecture_args,
        )
    finally:
        keras.config.set_dtype_policy(previous)
    model.set_weights(weights)
    return model, preprocessing
