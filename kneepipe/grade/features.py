"""What the grader's network sees: pooled features of its blocks, and normalisation statistics.

Two tools serve site adaptation and the shift score:

* :func:`pooled_features` runs the backbone once and returns the global average (and,
  when asked, the global maximum) of chosen layers' activations (``(n, channels)`` each),
  in grader input order;
* :func:`reestimate_batch_norm` replaces every batch-normalisation layer's moving mean
  and variance by the statistics of a set of crops (AdaBN, Li et al. 2018): the cheapest
  adaptation to another X-ray system, and one that needs no labels.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence

import numpy as np

from kneepipe.runtime import import_keras

# The last activation of Xception's exit flow; its global average is the grader's feature vector.
LAST_LAYER = "block14_sepconv2_act"


def backbone_of(model):
    """The Xception backbone nested inside a grader network."""
    keras = import_keras()
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def block_layers(model) -> list[str]:
    """Names of the layers whose pooled activations describe a crop at every depth.

    The output of each residual block (Xception's ``Add`` layers: entry, middle and exit
    flow) and the two last activations, ending with :data:`LAST_LAYER`.
    """
    keras = import_keras()
    adds = [layer.name for layer in backbone_of(model).layers if isinstance(layer, keras.layers.Add)]
    return [*adds, "block14_sepconv1_act", LAST_LAYER]


# How a layer's activation map is pooled to one value per channel (see :func:`pool_maps`).
POOLINGS = ("max", "mean")
# The grader's own pooling (its global average), and a site file's before it recorded one.
AVERAGE = ("mean",)


def pool_maps(maps: Sequence, pooling: Sequence[str] = AVERAGE) -> list:
    """Activation maps ``(n, h, w, channels)`` -> their global ``pooling`` (``(n, channels)`` each):
    every map pooled the first way, then every map the next way (backend tensors or arrays)."""
    ops = import_keras().ops
    unknown = set(pooling) - set(POOLINGS)
    if unknown or not pooling:
        raise ValueError(f"pooling {list(pooling)}: one or more of {', '.join(POOLINGS)}")
    pool = {"mean": ops.mean, "max": ops.max}
    return [pool[kind](m, axis=(1, 2)) for kind in pooling for m in maps]


def pooled_feature_model(model, layers: Sequence[str], pooling: Sequence[str] = AVERAGE):
    """A Keras model: a crop batch (0-255) -> the global pooling of each layer in ``layers``
    (:func:`pool_maps`; keep ``mean`` last where the last output must be the grader's feature vector)."""
    keras = import_keras()
    backbone = backbone_of(model)
    inner = keras.Model(backbone.inputs, [backbone.get_layer(name).output for name in layers])
    crops = keras.Input(shape=model.inputs[0].shape[1:], name="crop")
    outputs = inner(model.get_layer("scale")(crops))
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    return keras.Model(crops, pool_maps(outputs, pooling))


def pooled_features(feature_model, x: np.ndarray, batch_size: int = 32) -> list[np.ndarray]:
    """Run ``feature_model`` (see :func:`pooled_feature_model`) on network input ``x`` in batches."""
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(x), batch_size):
        outputs = feature_model.predict_on_batch(x[start : start + batch_size])
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        parts.append([np.asarray(o, dtype=np.float32) for o in outputs])
    return [np.concatenate(layer) for layer in zip(*parts, strict=True)]


def batch_norm_layers(model) -> list:
    """Every batch-normalisation layer of the grader's backbone."""
    keras = import_keras()
    return [layer for layer in backbone_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)]


def content_key(pixels: np.ndarray) -> int:
    """A 64-bit digest of an array's values: the same pixels give the same key, wherever they come from."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=8).digest(), "big")


def content_order(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Indices that put ``images`` in the order of their :func:`content_key`: the same images come out
    in the same order whichever order they came in, and the first k are a fair random sample of them."""
    keys = [content_key(image) for image in images]
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=int)


def reestimate_batch_norm(model, x: np.ndarray, batch_size: int = 32, seed: int = 0) -> None:
    """Set each batch-norm layer's moving statistics to those of ``x`` (network input), in place.

    Each layer sees the activations of the layers before it with their statistics already
    re-estimated, as in a forward pass in training mode; the weights are not changed.
    The running mean over batches uses momentum ``1 - 1/k`` at the k-th batch, which makes
    the moving statistics the plain average of the batch statistics. The batches are drawn in
    an order set by ``seed`` and the crops' pixels (:func:`content_order`), not by the order the
    crops come in: the same crops give the same statistics, so a batch grades the same however
    its files are named or listed.
    """
    layers = batch_norm_layers(model)
    backbone = backbone_of(model)
    scale = model.get_layer("scale")
    order = content_order(x)[np.random.default_rng(seed).permutation(len(x))]
    momenta = [layer.momentum for layer in layers]
    try:
        for k, start in enumerate(range(0, len(x), batch_size), start=1):
            for layer in layers:
                layer.momentum = 1.0 - 1.0 / k
            backbone(scale(x[order[start : start + batch_size]]), training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum


def batch_norm_statistics(model) -> list[list[np.ndarray]]:
    """The weights (gamma, beta, moving mean, moving variance) of every batch-norm layer."""
    return [[np.asarray(w) for w in layer.get_weights()] for layer in batch_norm_layers(model)]


def set_batch_norm_statistics(model, statistics: list[list[np.ndarray]]) -> None:
    """Restore what :func:`batch_norm_statistics` returned."""
    for layer, weights in zip(batch_norm_layers(model), statistics, strict=True):
        layer.set_weights(weights)


@contextlib.contextmanager
def statistics_of(grader, crops, seed: int = 0):
    """Within the block, ``grader`` normalises with the statistics of ``crops`` (AdaBN); restored after.

    The statistics change in the Keras network, so the grader grades with it within the block
    (a compiled network keeps the statistics it was built with).
    """
    stored = batch_norm_statistics(grader.model)
    try:
        reestimate_batch_norm(grader.model, grader.prepare(crops), seed=seed)
        with grader.keras_runtime():
            yield grader
    finally:
        set_batch_norm_statistics(grader.model, stored)
