"""The linear head that turns pooled features into a grader's logits.

The shipped grader's head is its network's last dense layer on the pooled last
activation. A site grader (``kneepipe adapt``) replaces it by a head over the pooled
output of every Xception block, standardised with the site sample's statistics, so that
a small labelled sample can re-weight texture and edge features of every depth that the
last layer alone no longer separates on another X-ray system. Its arrays live in the
grader file (``site_layers``, ``site_pooling``, ``site_mean``, ``site_scale``, ``site_coef``,
``site_intercept``); a site file written before ``site_pooling`` existed pools by the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kneepipe.grade.features import AVERAGE, LAST_LAYER


@dataclass(frozen=True)
class LinearHead:
    """``logits = ((concat(features) - mean) / scale) @ coef.T + intercept``.

    ``features`` are the :attr:`layers`' activation maps pooled each way in :attr:`pooling`, in
    that order (:func:`~kneepipe.grade.features.pool_maps`).
    """

    layers: tuple[str, ...]
    coef: np.ndarray  # (units, total features)
    intercept: np.ndarray  # (units,)
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    mirror: bool = False  # a knee's logits are the mean of its crop's and its mirrored crop's
    pooling: tuple[str, ...] = AVERAGE

    @classmethod
    def of_network(cls, model) -> LinearHead:
        """The grader network's own dense layer on the pooled last activation."""
        kernel, bias = (np.asarray(w, dtype=np.float32) for w in model.get_layer("logits").get_weights())
        return cls((LAST_LAYER,), kernel.T.copy(), bias)

    @classmethod
    def read(cls, path: str | Path) -> LinearHead | None:
        """The site head stored in a grader file, or None for a plain grader."""
        with np.load(path, allow_pickle=False) as archive:
            if "site_coef" not in archive.files:
                return None
            return cls(
                tuple(str(name) for name in archive["site_layers"]),
                archive["site_coef"].astype(np.float32),
                archive["site_intercept"].astype(np.float32),
                archive["site_mean"].astype(np.float32),
                archive["site_scale"].astype(np.float32),
                bool(archive["site_mirror"]) if "site_mirror" in archive.files else False,
                tuple(str(kind) for kind in archive["site_pooling"]) if "site_pooling" in archive.files else AVERAGE,
            )

    def arrays(self) -> dict[str, np.ndarray]:
        """The head as arrays for a grader file (a site head: the network's own head is in its weights)."""
        if self.mean is None or self.scale is None:
            raise ValueError("only a site head, over standardised features, is stored as arrays")
        return {
            "site_layers": np.array(self.layers),
            "site_coef": self.coef.astype(np.float32),
            "site_intercept": self.intercept.astype(np.float32),
            "site_mean": self.mean.astype(np.float32),
            "site_scale": self.scale.astype(np.float32),
            "site_mirror": np.array(self.mirror),
            "site_pooling": np.array(self.pooling),
        }

    def _standardised(self, features: np.ndarray) -> np.ndarray:
        if self.mean is None:
            return features
        return (features - self.mean) / self.scale

    def logits(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Logits from the pooled features of :attr:`layers` (each way in :attr:`pooling`), in that order."""
        x = np.concatenate([np.asarray(f, dtype=np.float32) for f in features], axis=1)
        return self._standardised(x) @ self.coef.T + self.intercept

    def site_logits(self, features: Sequence[np.ndarray], mirrored: Sequence[np.ndarray] | None) -> np.ndarray:
        """Logits of crops, averaged with their mirrored crops' when these are given.

        The caller passes mirrored features when the head says so (:attr:`mirror`) or when the
        grading asks for mirror averaging (``mirror_average`` in ``configs/grade.yaml``).
        """
        if mirrored is not None:
            return (self.logits(features) + self.logits(mirrored)) / 2
        return self.logits(features)

    def logits_tensor(self, features: Sequence):
        """:meth:`logits` on backend tensors (for gradients, e.g. Grad-CAM)."""
        from kneepipe.runtime import import_keras

        ops = import_keras().ops
        x = ops.concatenate([ops.cast(f, "float32") for f in features], axis=1)
        if self.mean is not None:  # through ops: a torch tensor does not take numpy operands
            x = ops.divide(ops.subtract(x, self.mean), self.scale)
        return ops.add(ops.matmul(x, self.coef.T), self.intercept)
