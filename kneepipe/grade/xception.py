"""The Xception backbone (Chollet 2017), with its width and depth as arguments.

At the default arguments it is Keras' ``keras.applications.Xception`` without its top,
pooled by the global average: the same layers, shapes and order, so grader files trained
on that network load into it unchanged. Every layer has a fixed name (Keras numbers the
shortcut and ``Add`` layers it leaves unnamed by how many were built before in the
process), so a layer named in a grader file is found again in any process. With a small ``width`` and
``middle_blocks`` the same code builds a tiny Xception, which the fast test tier grades
and trains with in seconds.
"""

from __future__ import annotations

from typing import Any

from kneepipe.runtime import import_keras

FULL = {"width": 1.0, "middle_blocks": 8}
"""The arguments of the published Xception (and of every shipped grader)."""


def channels(base: int, width: float) -> int:
    """A layer's filters at ``width`` (at least 4).

    >>> channels(728, 1.0), channels(728, 0.0625)
    (728, 46)
    """
    return max(4, round(base * width))


def xception_backbone(input_channels: int = 3, width: float = 1.0, middle_blocks: int = 8, weights: Any = None):
    """The Xception feature extractor as a Keras model: images in, 2048 x ``width`` pooled features out.

    Args:
        input_channels: channels of the input images.
        width: multiplier of every layer's filters (1.0: the published network).
        middle_blocks: repeats of the middle flow's block (8: the published network).
        weights: None for random initialisation, ``"imagenet"`` (downloads; networked
            machines only) or a path to Keras' Xception weights; only for the published
            width and depth.
    """
    keras = import_keras()
    layers = keras.layers
    if weights is not None and (width, middle_blocks) != (FULL["width"], FULL["middle_blocks"]):
        raise ValueError("pretrained Xception weights fit only the published width and depth")

    def filters(base: int) -> int:
        return channels(base, width)

    def separable(x, base: int, name: str):
        x = layers.SeparableConv2D(filters(base), (3, 3), padding="same", use_bias=False, name=name)(x)
        return layers.BatchNormalization(axis=-1, name=f"{name}_bn")(x)

    def residual_of(x, base: int, block: int):
        name = f"block{block}_residual"
        residual = layers.Conv2D(filters(base), (1, 1), strides=(2, 2), padding="same", use_bias=False, name=name)(x)
        return layers.BatchNormalization(axis=-1, name=f"{name}_bn")(residual)

    inputs = layers.Input(shape=(None, None, input_channels), name="image")
    x = layers.Conv2D(filters(32), (3, 3), strides=(2, 2), use_bias=False, name="block1_conv1")(inputs)
    x = layers.BatchNormalization(axis=-1, name="block1_conv1_bn")(x)
    x = layers.Activation("relu", name="block1_conv1_act")(x)
    x = layers.Conv2D(filters(64), (3, 3), use_bias=False, name="block1_conv2")(x)
    x = layers.BatchNormalization(axis=-1, name="block1_conv2_bn")(x)
    x = layers.Activation("relu", name="block1_conv2_act")(x)

    # Entry flow: blocks 2-4, each halving the size, with a strided 1x1 shortcut.
    for block, base in ((2, 128), (3, 256), (4, 728)):
        residual = residual_of(x, base, block)
        if block > 2:
            x = layers.Activation("relu", name=f"block{block}_sepconv1_act")(x)
        x = separable(x, base, f"block{block}_sepconv1")
        x = layers.Activation("relu", name=f"block{block}_sepconv2_act")(x)
        x = separable(x, base, f"block{block}_sepconv2")
        x = layers.MaxPooling2D((3, 3), strides=(2, 2), padding="same", name=f"block{block}_pool")(x)
        x = layers.Add(name=f"block{block}_add")([x, residual])

    # Middle flow: blocks 5 onwards, three separable convolutions around an identity shortcut.
    for i in range(middle_blocks):
        residual, prefix = x, f"block{i + 5}"
        for conv in (1, 2, 3):
            x = layers.Activation("relu", name=f"{prefix}_sepconv{conv}_act")(x)
            x = separable(x, 728, f"{prefix}_sepconv{conv}")
        x = layers.Add(name=f"{prefix}_add")([x, residual])

    # Exit flow: block 13 (named after the published network's depth), then block 14.
    residual = residual_of(x, 1024, 13)
    x = layers.Activation("relu", name="block13_sepconv1_act")(x)
    x = separable(x, 728, "block13_sepconv1")
    x = layers.Activation("relu", name="block13_sepconv2_act")(x)
    x = separable(x, 1024, "block13_sepconv2")
    x = layers.MaxPooling2D((3, 3), strides=(2, 2), padding="same", name="block13_pool")(x)
    x = layers.Add(name="block13_add")([x, residual])
    x = separable(x, 1536, "block14_sepconv1")
    x = layers.Activation("relu", name="block14_sepconv1_act")(x)
    x = separable(x, 2048, "block14_sepconv2")
    x = layers.Activation("relu", name="block14_sepconv2_act")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    backbone = keras.Model(inputs, x, name="xception")
    if weights is not None:
        published = keras.applications.Xception(
            include_top=False, weights=weights, input_shape=(None, None, input_channels), pooling="avg"
        )
        backbone.set_weights(published.get_weights())
    return backbone
