"""The grader's configuration keys and their rules; values live in ``configs/grade.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from kneepipe.config import ConfigError, rule


@dataclass(frozen=True)
class GradeConfig:
    """Keys of ``configs/grade.yaml``: grading (inference) first, then training."""

    STAGE: ClassVar[str] = "grade"

    # Grading.
    model: str | None
    batch: int = field(metadata=rule(range=(1, 1024)))
    precision: str = field(metadata=rule(choices=["float32", "bfloat16"]))
    runtime: str = field(metadata=rule(choices=["openvino", "keras"]))
    calibrated: bool
    adapt_prior: bool
    adapt_prior_alpha: float = field(metadata=rule(range=(0, 1)))
    adapt_prior_max_ratio: float = field(metadata=rule(range=(1, 1000)))
    adapt_prior_concentration: float = field(metadata=rule(range=(0, 100000)))
    prior: str | None
    shift_warn: float = field(metadata=rule(range=(0, 100)))
    batch_norm: str = field(metadata=rule(choices=["train", "batch", "auto"]))
    batch_norm_min_crops: int = field(metadata=rule(range=(8, 100000)))
    mirror_average: str = field(metadata=rule(choices=["never", "always", "auto"]))

    # Training.
    data: str | None
    split_csv: str | None
    head: str = field(metadata=rule(choices=["softmax", "corn"]))
    weights: str | None
    init: str | None
    epochs: int = field(metadata=rule(range=(1, 1000)))
    sizes: tuple = field(metadata=rule(range=(71, 512)))
    size_epochs: tuple = field(metadata=rule(range=(0, 1000)))
    train_batch: int = field(metadata=rule(range=(1, 512)))
    lr: float = field(metadata=rule(range=(1e-7, 1.0)))
    warmup_epochs: float = field(metadata=rule(range=(0, 100)))
    weight_decay: float = field(metadata=rule(range=(0, 1)))
    label_smoothing: float = field(metadata=rule(range=(0, 0.5)))
    dropout: float = field(metadata=rule(range=(0, 0.9)))
    backbone_width: float = field(metadata=rule(range=(0.01, 1.0)))
    backbone_middle_blocks: int = field(metadata=rule(range=(0, 8)))
    class_weighting: str = field(metadata=rule(choices=["none", "sqrt_inverse", "inverse"]))
    train_precision: str = field(metadata=rule(choices=["float32", "mixed_bfloat16"]))
    hflip: float = field(metadata=rule(range=(0, 1)))
    rotate: float = field(metadata=rule(range=(0, 45)))
    scale: float = field(metadata=rule(range=(0, 0.5)))
    shift: float = field(metadata=rule(range=(0, 0.3)))
    brightness_contrast: float = field(metadata=rule(range=(0, 0.8)))
    gamma: float = field(metadata=rule(range=(0, 0.8)))
    clahe: float = field(metadata=rule(range=(0, 1)))
    noise: float = field(metadata=rule(range=(0, 1)))
    sharpen: float = field(metadata=rule(range=(0, 1)))
    blur: float = field(metadata=rule(range=(0, 1)))
    tight_crop: float = field(metadata=rule(range=(0, 1)))
    max_train_images: int | None = field(metadata=rule(range=(1, None)))
    max_val_images: int | None = field(metadata=rule(range=(1, None)))
    seed: int = field(metadata=rule(range=(0, None)))

    def validate(self) -> None:
        if len(self.sizes) != len(self.size_epochs) + 1:
            raise ConfigError(
                f"size_epochs: needs one entry fewer than sizes ({len(self.sizes)} sizes, "
                f"{len(self.size_epochs)} switch epochs)"
            )
        if list(self.size_epochs) != sorted(self.size_epochs):
            raise ConfigError("size_epochs: switch epochs must be increasing")

    def size_for_epoch(self, epoch: int) -> int:
        """Training input size of a 0-based epoch under progressive resizing."""
        switches = sum(epoch >= e for e in self.size_epochs)
        return int(self.sizes[switches])
