"""Grading knee crops with a trained grader file.

>>> grader = Grader.load()  # the shipped model  # doctest: +SKIP
>>> grader.predict_proba([crop]).round(2)  # doctest: +SKIP
array([[0.61, 0.27, 0.1 , 0.02, 0.  ]])
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kneepipe.grade.data import fit_crop, network_input, resize_all
from kneepipe.grade.model import decide_grades, file_digest, load_grader, probabilities_from_logits
from kneepipe.runtime import import_keras

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_GRADER = WEIGHTS_DIR / "grader.npz"
log = logging.getLogger(__name__)


class Grader:
    """A loaded KL grader: its network, its preprocessing record and its version."""

    def __init__(self, model, preprocessing, path: Path, precision: str = "float32"):
        self.model = model
        self.preprocessing = preprocessing
        self.path = path
        self.precision = precision
        self.version = f"{path.name}@{file_digest(path)}"
        self._feature_model = None
        self._lock = threading.Lock()  # one network, shared by the pipeline's grading threads

    @classmethod
    def load(cls, path: str | Path | None = None, precision: str = "float32") -> Grader:
        """Load a grader file (the shipped one when ``path`` is None) in ``float32`` or ``bfloat16``."""
        path = Path(path) if path else DEFAULT_GRADER
        if not path.exists():
            raise FileNotFoundError(f"grader file not found: {path}")
        model, preprocessing = load_grader(path, dtype=precision)
        return cls(model, preprocessing, path, precision)

    def prepare(self, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Crops (2-D uint8, any size) -> the network's input, as the stored preprocessing says."""
        pre = self.preprocessing
        stack = np.stack([fit_crop(c, pre.crop_size, pre.resize_interpolation) for c in crops])
        return network_input(resize_all(stack, pre.input_size, pre.resize_interpolation), pre.channels)

    def predict_logits(self, crops: Sequence[np.ndarray] | np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Raw network outputs for a batch of crops."""
        if len(crops) == 0:
            return np.empty((0, 5 if self.preprocessing.head == "softmax" else 4), np.float32)
        outputs = []
        for start in range(0, len(crops), batch_size):
            x = self.prepare(crops[start : start + batch_size])
            outputs.append(np.asarray(self.model.predict_on_batch(x), dtype=np.float32))
        return np.concatenate(outputs)

    def grade_each(self, crops: Sequence[np.ndarray], batch_size: int = 32) -> list[np.ndarray | str]:
        """Raw outputs per crop, or for a crop the grader fails on, the reason; safe to call from threads.

        The crops are graded together; if that fails, one at a time, so only a crop that
        fails by itself loses its grade. Calls are serialised on this grader, so threads
        sharing it never run its network at once.
        """
        if len(crops) == 0:
            return []
        with self._lock:
            try:
                return list(self.predict_logits(list(crops), batch_size=batch_size))
            except Exception as err:  # isolate the crop that failed below
                reason = f"{type(err).__name__}: {err}"
                log.warning("grading %d crops failed (%s); grading them one by one", len(crops), reason)
            graded: list[np.ndarray | str] = []
            for crop in crops:
                try:
                    graded.append(self.predict_logits([crop], batch_size=1)[0])
                except Exception as err:
                    graded.append(f"grading failed ({type(err).__name__}: {err})")
            return graded

    def probabilities(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Grade probabilities from network outputs, with the stored calibration unless ``calibrated=False``."""
        pre = self.preprocessing
        if not calibrated:
            return probabilities_from_logits(logits, pre.head)
        return probabilities_from_logits(logits, pre.head, pre.temperature, pre.class_bias)

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """KL grades from probabilities by the decision rule stored with the model."""
        return decide_grades(probabilities, self.preprocessing.decision)

    def predict_proba(
        self, crops: Sequence[np.ndarray] | np.ndarray, batch_size: int = 32, calibrated: bool = True
    ) -> np.ndarray:
        """``(n, 5)`` KL grade probabilities, calibrated (temperature and grade biases fitted on val)."""
        return self.probabilities(self.predict_logits(crops, batch_size), calibrated)

    def gradcam(self, crop: np.ndarray, grade: int | None = None) -> np.ndarray:
        """Grad-CAM heat map (crop-sized, 0-1) of what drove the grade of one crop.

        Uses the last convolutional block of Xception. For the CORN head the score is
        the summed ordinal logits (expected-grade direction) unless ``grade`` is given.
        """
        import tensorflow as tf

        keras = import_keras()
        if self._feature_model is None:  # built once: the report asks for a map per knee
            backbone = next(layer for layer in self.model.layers if isinstance(layer, keras.Model))
            self._feature_model = keras.Model(backbone.inputs, backbone.get_layer("block14_sepconv2_act").output)
        feature_model = self._feature_model
        x = tf.convert_to_tensor(self.prepare([crop]))
        with tf.GradientTape() as tape:
            scaled = self.model.get_layer("scale")(x)
            features = feature_model(scaled, training=False)
            tape.watch(features)
            pooled = keras.ops.mean(features, axis=(1, 2))
            logits = self.model.get_layer("logits")(pooled)
            if self.preprocessing.head == "softmax":
                target = int(np.argmax(logits[0])) if grade is None else grade
                score = logits[:, target]
            else:
                score = keras.ops.sum(logits, axis=1)
        gradients = tape.gradient(score, features)
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(channel_weights * features, axis=-1))[0].numpy().astype(np.float32)
        if cam.max() > 0:
            cam /= cam.max()
        import cv2

        return cv2.resize(cam, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_CUBIC).clip(0, 1)
