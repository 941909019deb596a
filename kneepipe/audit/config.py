"""The audit's configuration keys and their rules; values live in ``configs/audit.yaml``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from kneepipe.config import ConfigError, rule


@dataclass(frozen=True)
class AuditConfig:
    """Keys of ``configs/audit.yaml``: leakage audit first, then the patient-level split."""

    STAGE: ClassVar[str] = "audit"

    # Leakage audit.
    copy_correlation: float = field(metadata=rule(range=(0.0, 1.0)))
    candidates: int = field(metadata=rule(range=(1, 50)))
    candidate_similarity: float = field(metadata=rule(range=(-1.0, 1.0)))
    search: str = field(metadata=rule(choices=["auto", "exact", "hnsw"]))
    exact_search_limit: float = field(metadata=rule(range=(0.0, None)))
    patient_pattern: str | None
    max_side: int = field(metadata=rule(range=(64, 16384)))
    workers: int = field(metadata=rule(range=(0, 64)))

    # Patient-level split.
    fractions: tuple = field(metadata=rule(range=(0.0, 1.0)))
    seed: int = field(metadata=rule(range=(0, None)))
    link: str = field(metadata=rule(choices=["symlink", "none"]))

    def validate(self) -> None:
        if self.patient_pattern is not None:
            try:
                re.compile(self.patient_pattern)
            except re.error as err:
                raise ConfigError(f"patient_pattern: not a valid regular expression: {err}") from err
        if len(self.fractions) != 3 or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ConfigError(
                f"fractions: expected three shares (train, val, test) summing to 1, got {list(self.fractions)}"
            )
        if self.fractions[0] <= 0:
            raise ConfigError("fractions: the train share must be positive")
