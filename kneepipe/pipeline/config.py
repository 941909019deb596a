"""The pipeline's configuration keys and their rules; values live in ``configs/pipeline.yaml``.

The pipeline also resolves the detector's and the grader's own configs
(``configs/detect.yaml`` and ``configs/grade.yaml``); this file holds only what belongs
to chaining them: streaming batch sizes, what is written, and the report's options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from kneepipe.config import ConfigError, rule


@dataclass(frozen=True)
class PipelineConfig:
    """Keys of ``configs/pipeline.yaml``."""

    STAGE: ClassVar[str] = "pipeline"

    # Streaming.
    batch: int = field(metadata=rule(range=(1, 1024)))
    prefetch: int = field(metadata=rule(range=(1, 1024)))
    decode_workers: int = field(metadata=rule(range=(1, 16)))
    grade_workers: int = field(metadata=rule(range=(1, 16)))

    # Outputs.
    save_crops: bool
    thumbnail_size: int = field(metadata=rule(range=(0, 4096)))
    overwrite: bool
    group_pattern: str | None

    # Evaluation.
    match_iou: float = field(metadata=rule(range=(0.0, 1.0)))

    # Report.
    report: bool
    report_max_radiographs: int = field(metadata=rule(range=(0, 100000)))
    report_gradcam: bool
    report_max_gradcam: int = field(metadata=rule(range=(0, 100000)))

    def validate(self) -> None:
        if self.group_pattern:
            try:
                compiled = re.compile(self.group_pattern)
            except re.error as err:
                raise ConfigError(f"group_pattern: not a valid regular expression ({err})") from err
            if compiled.groups < 1:
                raise ConfigError("group_pattern: needs one capturing group, e.g. '^(stage_[0-9]+)_'")
