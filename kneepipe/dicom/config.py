"""The DICOM node's configuration keys and their rules; values live in ``configs/pacs.yaml``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from kneepipe.config import ConfigError, rule

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM's AE: 16 characters, no backslash or control


@dataclass(frozen=True)
class Destination:
    """Where results go: a DIMSE peer (``AE@host:port``) or a DICOMweb base URL (STOW-RS)."""

    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@host:port`` or ``http(s)://...``.

        >>> Destination.parse("ORTHANC@127.0.0.1:4242")
        Destination(ae_title='ORTHANC', host='127.0.0.1', port=4242, url='')
        >>> Destination.parse("http://pacs:8042/dicom-web").url
        'http://pacs:8042/dicom-web'

        Raises:
            ConfigError: naming what is wrong.
        """
        if text.startswith(("http://", "https://")):
            return cls(url=text.rstrip("/"))
        match = re.fullmatch(r"(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})", text.strip())
        if not match or not AE_TITLE.match(match["ae"]) or not 0 < int(match["port"]) < 65536:
            raise ConfigError(
                f"{text!r} is not a destination: write AE@host:port (e.g. ORTHANC@127.0.0.1:4242) "
                "or a DICOMweb URL (http://host:8042/dicom-web)"
            )
        return cls(ae_title=match["ae"], host=match["host"], port=int(match["port"]))

    def __str__(self) -> str:
        return self.url or f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class PacsConfig:
    """Keys of ``configs/pacs.yaml``."""

    STAGE: ClassVar[str] = "pacs"

    ae_title: str
    host: str
    port: int = field(metadata=rule(range=(1, 65535)))
    allowed_callers: tuple
    destination: str | None
    send_retries: int = field(metadata=rule(range=(0, 100)))
    retry_wait_s: float = field(metadata=rule(range=(0.0, 3600.0)))
    data: str
    keep_films: bool
    batch_wait_s: float = field(metadata=rule(range=(0.0, 600.0)))
    max_batch: int = field(metadata=rule(range=(1, 1024)))
    network_timeout_s: float = field(metadata=rule(range=(1.0, 3600.0)))

    def validate(self) -> None:
        if not AE_TITLE.match(self.ae_title) or not self.ae_title.strip():
            raise ConfigError(f"ae_title: {self.ae_title!r} is not an AE title (1 to 16 characters, no backslash)")
        if not self.host.strip():
            raise ConfigError("host: must name an interface, e.g. 127.0.0.1")
        for caller in self.allowed_callers:
            if not isinstance(caller, str) or not AE_TITLE.match(caller) or not caller.strip():
                raise ConfigError(f"allowed_callers: {caller!r} is not an AE title (1 to 16 characters)")
        if self.destination is not None:
            Destination.parse(self.destination)
        if not self.data.strip():
            raise ConfigError("data: must name a folder")

    @property
    def target(self) -> Destination | None:
        return Destination.parse(self.destination) if self.destination else None
