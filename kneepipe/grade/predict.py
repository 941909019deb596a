"""Grading knee crops with a trained grader file.

>>> grader = Grader.load()  # the shipped model  # doctest: +SKIP
>>> grader.predict_proba([crop]).round(2)  # doctest: +SKIP
array([[0.61, 0.27, 0.1 , 0.02, 0.  ]])
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kneepipe.grade.compiled import CompiledFeatures
from kneepipe.grade.data import fit_crop, network_input, resize_all
from kneepipe.grade.features import backbone_of, pool_maps, pooled_feature_model, pooled_features
from kneepipe.grade.head import LinearHead
from kneepipe.grade.model import decide_grades, file_digest, load_grader, probabilities_from_logits
from kneepipe.runtime import import_keras

if TYPE_CHECKING:
    import keras

    from kneepipe.grade.config import GradeConfig

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_GRADER = WEIGHTS_DIR / "grader.npz"
log = logging.getLogger(__name__)


class Grader:
    """A loaded KL grader: its network, its preprocessing record and its version."""

    def __init__(
        self,
        model,
        preprocessing,
        path: Path,
        precision: str = "float32",
        head: LinearHead | None = None,
        compiled: CompiledFeatures | None = None,
        runtime_note: str = "",
    ):
        self.model = model
        self.preprocessing = preprocessing
        self.path = path
        self.precision = precision
        self.version = f"{path.name}@{file_digest(path)}"
        # What turns pooled features into logits: a site grader's head over every block, or the network's own.
        self.head = head or LinearHead.of_network(model)
        self._feature_model = None
        self._lock = threading.Lock()  # one network, shared by the pipeline's grading threads
        self._map_model: keras.Model | None = None
        self._reference: tuple | None = None
        # The compiled backbone (kneepipe.grade.compiled) that grades when present; the Keras network
        # stays loaded as the reference, for Grad-CAM and for batch-norm statistics re-estimated on a batch.
        self.compiled = compiled
        self.runtime_note = runtime_note
        self._keras_only = False
        self._mirror_average = False

    @classmethod
    def load(cls, path: str | Path | None = None, precision: str = "float32", runtime: str = "keras") -> Grader:
        """Load a grader file (the shipped one when ``path`` is None) in ``float32`` or ``bfloat16``.

        ``runtime="openvino"`` grades with the compiled network beside the grader file (INT8 for the
        shipped one); without a valid one (a site grader, a grader never exported, a changed file) the
        grader runs on Keras and :attr:`runtime_note` says why.
        """
        path = Path(path) if path else DEFAULT_GRADER
        if not path.exists():
            raise FileNotFoundError(f"grader file not found: {path}")
        model, preprocessing = load_grader(path, dtype=precision)
        head = LinearHead.read(path)
        compiled, note = None, ""
        if runtime != "keras":
            if head is not None:
                note = f"{path.name} is a site grader (a head over every block): graded on the Keras runtime"
            else:
                compiled, why = CompiledFeatures.find(path, LinearHead.of_network(model).layers, runtime)
                note = "" if compiled else f"{why}: graded on the Keras runtime"
            if note:
                log.warning("runtime %s: %s", runtime, note)
        return cls(model, preprocessing, path, precision, head=head, compiled=compiled, runtime_note=note)

    @classmethod
    def from_config(cls, config: GradeConfig, path: str | Path | None = None) -> Grader:
        """:meth:`load` as a grade config says: its model (or ``path``), precision, runtime and mirror averaging."""
        grader = cls.load(path or config.model, precision=config.precision, runtime=config.runtime)
        grader._mirror_average = config.mirror_average == "always"
        return grader

    @property
    def runtime(self) -> str:
        """What grades: ``openvino int8 (grader.int8.xml)``, or ``keras float32``/``keras bfloat16``."""
        if self.compiled is not None:
            return f"{self.compiled.record['format']} {self.compiled.record['precision']} ({self.compiled.name})"
        return f"keras {self.precision}"

    @contextlib.contextmanager
    def keras_runtime(self) -> Iterator[None]:
        """Within the block, grade with the Keras network (whose batch-norm statistics may be changed there)."""
        previous, self._keras_only = self._keras_only, True
        try:
            yield
        finally:
            self._keras_only = previous

    @contextlib.contextmanager
    def mirror_averaged(self, enabled: bool = True) -> Iterator[None]:
        """Within the block (when ``enabled``), a crop's logits are the mean of its own and its mirror image's.

        Left and right knees are mirror images and the grader was trained with flips, so both
        readings are valid. Their mean costs twice the network time; what it changes on another
        clinic's knees is measured in the README (``mirror_average``).
        """
        previous = self._mirror_average
        self._mirror_average = previous or enabled
        try:
            yield
        finally:
            self._mirror_average = previous

    @property
    def is_site_grader(self) -> bool:
        """True for a grader fitted to a site by ``kneepipe adapt``."""
        return "site" in self.preprocessing.extra

    def shift_reference(self):
        """The training statistics of this grader's features, or None and why (see :mod:`kneepipe.grade.shift`)."""
        if self._reference is None:
            from kneepipe.grade.shift import read_reference

            self._reference = read_reference(self.path, file_digest(self.path))
        return self._reference

    def prepare(self, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Crops (2-D uint8, any size) -> the network's input, as the stored preprocessing says."""
        pre = self.preprocessing
        stack = np.stack([fit_crop(c, pre.crop_size, pre.resize_interpolation) for c in crops])
        return network_input(resize_all(stack, pre.input_size, pre.resize_interpolation), pre.channels)

    def predict_logits(self, crops: Sequence[np.ndarray] | np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Raw network outputs for a batch of crops."""
        return self.predict_with_features(crops, batch_size)[0]

    def predict_with_features(
        self, crops: Sequence[np.ndarray] | np.ndarray, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw outputs ``(n, units)`` and the pooled last-layer features ``(n, 2048)`` of a batch of crops.

        The features feed the batch's shift score (:mod:`kneepipe.grade.shift`).
        """
        if len(crops) == 0:
            units = 5 if self.preprocessing.head == "softmax" else 4
            return np.empty((0, units), np.float32), np.empty((0, 0), np.float32)
        network: Callable[[np.ndarray], list[np.ndarray]]
        if self.compiled is not None and not self._keras_only:
            network = self.compiled
        else:
            if self._feature_model is None:
                self._feature_model = pooled_feature_model(self.model, self.head.layers, self.head.pooling)
            network = partial(pooled_features, self._feature_model)
        logits, pooled = [], []
        for start in range(0, len(crops), batch_size):
            x = self.prepare(crops[start : start + batch_size])
            features = network(x)
            mirror = self.head.mirror or self._mirror_average
            mirrored = network(np.ascontiguousarray(x[:, :, ::-1])) if mirror else None
            logits.append(self.head.site_logits(features, mirrored))
            pooled.append(features[-1])
        return np.concatenate(logits).astype(np.float32), np.concatenate(pooled)

    def grade_each(
        self, crops: Sequence[np.ndarray], batch_size: int = 32, features: list[np.ndarray] | None = None
    ) -> list[np.ndarray | str]:
        """Raw outputs per crop, or for a crop the grader fails on, the reason; safe to call from threads.

        The crops are graded together; if that fails, one at a time, so only a crop that
        fails by itself loses its grade. Calls are serialised on this grader, so threads
        sharing it never run its network at once. When ``features`` is given, the pooled
        features of the graded crops are appended to it (for the batch's shift score).
        """
        if len(crops) == 0:
            return []
        with self._lock:
            try:
                logits, pooled = self.predict_with_features(list(crops), batch_size=batch_size)
                if features is not None:
                    features.append(pooled)
                return list(logits)
            except Exception as err:  # isolate the crop that failed below
                reason = f"{type(err).__name__}: {err}"
                log.warning("grading %d crops failed (%s); grading them one by one", len(crops), reason)
            graded: list[np.ndarray | str] = []
            for crop in crops:
                try:
                    logits, pooled = self.predict_with_features([crop], batch_size=1)
                    graded.append(logits[0])
                    if features is not None:
                        features.append(pooled)
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

        Uses the last activation map of Xception (a site grader's head also reads earlier blocks;
        the gradient flows through them all). For the CORN head the score is
        the summed ordinal logits (expected-grade direction) unless ``grade`` is given.
        Runs on the Keras backend of the process: TensorFlow (a gradient tape) or torch (autograd).
        """
        keras = import_keras()
        x = self.prepare([crop])
        if keras.backend.backend() == "torch":
            cam = self._gradcam_torch(x, grade)
        else:
            cam = self._gradcam_tensorflow(x, grade)
        if cam.max() > 0:
            cam /= cam.max()
        import cv2

        return cv2.resize(cam, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_CUBIC).clip(0, 1)

    def _activation_maps(self, x) -> list:
        """The activation maps of the head's layers for network input ``x``, Grad-CAM's layer last."""
        keras = import_keras()
        if self._map_model is None:  # built once: the report asks for a map per knee
            backbone = backbone_of(self.model)
            maps = keras.Model(backbone.inputs, [backbone.get_layer(n).output for n in self.head.layers])
            crops = keras.Input(shape=self.model.inputs[0].shape[1:])
            outputs = maps(self.model.get_layer("scale")(crops))
            self._map_model = keras.Model(crops, outputs if isinstance(outputs, list | tuple) else [outputs])
        maps = self._map_model(x, training=False)
        return list(maps) if isinstance(maps, list | tuple) else [maps]

    def _gradcam_score(self, maps: list, grade: int | None):
        """The score whose gradient Grad-CAM follows: the head's logits on the pooled ``maps``."""
        keras = import_keras()
        logits = self.head.logits_tensor(pool_maps(maps, self.head.pooling))
        if self.preprocessing.head == "softmax":
            target = int(np.argmax(keras.ops.convert_to_numpy(logits[0]))) if grade is None else grade
            return logits[:, target]
        return keras.ops.sum(logits, axis=1)

    def _gradcam_tensorflow(self, x: np.ndarray, grade: int | None) -> np.ndarray:
        import tensorflow as tf

        # The network runs outside the tape: only the head's few operations on the last
        # activation map are recorded, so no gradient flows back through the convolutions.
        maps = self._activation_maps(tf.convert_to_tensor(x))
        features = tf.convert_to_tensor(maps[-1])  # the last activation map: Grad-CAM's layer
        with tf.GradientTape() as tape:
            tape.watch(features)
            score = self._gradcam_score([*maps[:-1], features], grade)
        gradients = tape.gradient(score, features)
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(channel_weights * features, axis=-1))[0].numpy().astype(np.float32)

    def _gradcam_torch(self, x: np.ndarray, grade: int | None) -> np.ndarray:
        import torch

        keras = import_keras()
        with torch.enable_grad():  # also when called under torch.no_grad()
            # An input that asks for gradients keeps the graph even where the weights are frozen.
            inputs = keras.ops.convert_to_tensor(x).requires_grad_(True)
            maps = self._activation_maps(inputs)
            features = maps[-1]  # the last activation map (an intermediate tensor): Grad-CAM's layer
            score = self._gradcam_score(maps, grade)
            (gradients,) = torch.autograd.grad(score.sum(), features)
        channel_weights = gradients.mean(dim=(1, 2), keepdim=True)
        cam = torch.relu((channel_weights * features.detach()).sum(dim=-1))[0]
        return keras.ops.convert_to_numpy(cam).astype(np.float32)
