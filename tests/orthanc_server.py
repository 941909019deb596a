"""A real Orthanc PACS for the tests: started on free loopback ports with a config the test writes, stopped after.

Orthanc is the Debian package ``orthanc`` with ``orthanc-dicomweb`` (``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def orthanc_missing() -> str:
    """Why Orthanc cannot run here, or "" when it can."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (Debian package orthanc)"
    if not any(Path(folder, "libOrthancDicomWeb.so").is_file() for folder in PLUGIN_DIRS):
        return "Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    return ""


class Orthanc:
    """An Orthanc process with its own storage, REST on ``http_port`` and DICOM on ``dicom_port``."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, str, int]]) -> None:
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.ae_title = "ORTHANC"
        plugin = next(
            str(Path(d, "libOrthancDicomWeb.so")) for d in PLUGIN_DIRS if Path(d, "libOrthancDicomWeb.so").is_file()
        )
        config = {
            "Name": "kneepipe-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
            "DicomScuTimeout": 60,
            "StableAge": 1,
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            ["Orthanc", str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = (folder / "orthanc.log").read_text()[-2000:]
                    raise RuntimeError(f"Orthanc did not start: {log}") from None
                time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=120) as response:
            content = response.read()
        return json.loads(content) if response.headers.get_content_type() == "application/json" else content

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, path: Path) -> str:
        """Store a DICOM file; returns Orthanc's instance id."""
        return self.request("POST", "/instances", path.read_bytes(), "application/dicom")["ID"]

    def store_to(self, modality: str, instance_ids: list[str]) -> Any:
        """C-STORE instances to a configured modality (Orthanc forwards them)."""
        body = json.dumps({"Resources": instance_ids, "Synchronous": True}).encode()
        return self.request("POST", f"/modalities/{modality}/store", body)

    def study_series(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The series of a study, each with its tags and instances."""
        found = self.request("POST", "/tools/lookup", study_instance_uid.encode(), "text/plain")
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        assert len(studies) == 1, found
        return self.get(f"/studies/{studies[0]}/series")

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
