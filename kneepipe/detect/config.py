"""The detector's configuration keys and their rules; values live in ``configs/detect.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from kneepipe.config import ConfigError, rule


@dataclass(frozen=True)
class DetectConfig:
    """Keys of ``configs/detect.yaml``: detection (inference) first, then training."""

    STAGE: ClassVar[str] = "detect"

    # Detection.
    model: str | None
    runtime: str = field(metadata=rule(choices=["openvino-int8", "openvino", "onnx", "torch"]))
    imgsz: int = field(metadata=rule(range=(64, 2048)))
    conf: float = field(metadata=rule(range=(0.0, 1.0)))
    pair_conf: float = field(metadata=rule(range=(0.0, 1.0)))
    rescue_below: float = field(metadata=rule(range=(0.0, 1.0)))
    search_below: float = field(metadata=rule(range=(0.0, 1.0)))
    search_conf: float = field(metadata=rule(range=(0.0, 1.0)))
    search_empty: bool
    ap_sure: float = field(metadata=rule(range=(0.0, 1.0)))
    iou: float = field(metadata=rule(range=(0.0, 1.0)))
    max_det: int = field(metadata=rule(range=(1, 16)))
    batch: int = field(metadata=rule(range=(1, 256)))
    crop_size: int = field(metadata=rule(range=(32, 1024)))
    max_side: int = field(metadata=rule(range=(256, 16384)))
    max_pixels: int = field(metadata=rule(range=(1_000_000, 1_600_000_000)))
    overexposed_fraction: float = field(metadata=rule(range=(0.0, 1.0)))
    underexposed_level: float = field(metadata=rule(range=(0.0, 255.0)))
    view_check: bool
    view_model: str | None
    lateral_threshold: float = field(metadata=rule(range=(0.0, 1.0)))
    lateral_keep_conf: float = field(metadata=rule(range=(0.0, 1.0)))
    no_knee_threshold: float = field(metadata=rule(range=(0.0, 1.0)))
    no_knee_keep_conf: float = field(metadata=rule(range=(0.0, 1.0)))
    view_review: float = field(metadata=rule(range=(0.0, 1.0)))
    partial_fraction: float = field(metadata=rule(range=(0.0, 1.0)))
    metal_level: int = field(metadata=rule(range=(1, 255)))
    metal_contrast: float = field(metadata=rule(range=(0.0, 255.0)))
    prosthesis_fraction: float = field(metadata=rule(range=(0.0, 1.0)))
    review_conf: float = field(metadata=rule(range=(0.0, 1.0)))
    side_conf: float = field(metadata=rule(range=(0.5, 1.0)))

    # Training.
    train_crops: str | None
    train_radiographs: str | None
    train_annotations: str | None
    train_images: int = field(metadata=rule(range=(1, 100000)))
    val_images: int = field(metadata=rule(range=(1, 100000)))
    bilateral_fraction: float = field(metadata=rule(range=(0.0, 1.0)))
    scale_variety: float = field(metadata=rule(range=(0.0, 1.0)))
    exposure_variety: float = field(metadata=rule(range=(0.0, 1.0)))
    background_copies: int = field(metadata=rule(range=(0, 20)))
    real_copies: int = field(metadata=rule(range=(0, 1000)))
    real_background_copies: int | None = field(metadata=rule(range=(0, 1000)))
    real_exclude: tuple
    model_yaml: str
    init_weights: str | None
    freeze: int = field(metadata=rule(range=(0, 22)))
    train_epochs: int = field(metadata=rule(range=(1, 1000)))
    train_imgsz: int = field(metadata=rule(range=(64, 2048)))
    train_batch: int = field(metadata=rule(range=(1, 512)))
    warmup_epochs: float = field(metadata=rule(range=(0.0, 100.0)))
    mosaic: float = field(metadata=rule(range=(0.0, 1.0)))
    close_mosaic: int = field(metadata=rule(range=(0, 1000)))
    patience: int = field(metadata=rule(range=(1, 1000)))
    workers: int = field(metadata=rule(range=(0, 64)))
    seed: int = field(metadata=rule(range=(0, None)))

    def validate(self) -> None:
        if self.imgsz % 32 or self.train_imgsz % 32:
            raise ConfigError(
                f"imgsz/train_imgsz: must be multiples of 32 (the detector's stride), "
                f"got {self.imgsz} and {self.train_imgsz}"
            )
        if self.close_mosaic > self.train_epochs:
            raise ConfigError(f"close_mosaic: {self.close_mosaic} exceeds train_epochs ({self.train_epochs})")
