"""The web page's configuration keys and their rules; values live in ``configs/serve.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from kneepipe.config import ConfigError, rule


@dataclass(frozen=True)
class ServeConfig:
    """Keys of ``configs/serve.yaml``."""

    STAGE: ClassVar[str] = "serve"

    host: str
    port: int = field(metadata=rule(range=(1, 65535)))
    data: str
    graders: str | None
    max_file_mb: float = field(metadata=rule(range=(0.001, 100_000)))
    max_upload_mb: float = field(metadata=rule(range=(0.001, 1_000_000)))
    max_files: int = field(metadata=rule(range=(1, 100_000)))
    gradcam: bool
    report: bool

    def validate(self) -> None:
        if not self.host.strip():
            raise ConfigError("host: must name an interface, e.g. 127.0.0.1")
        if not self.data.strip():
            raise ConfigError("data: must name a folder")
        if self.max_file_mb > self.max_upload_mb:
            raise ConfigError(f"max_file_mb: {self.max_file_mb} is larger than max_upload_mb ({self.max_upload_mb})")

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1_000_000)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)
