"""The detector compiled to ONNX, run by ONNX Runtime through Ultralytics.

Ultralytics exports the PyTorch weights ``NAME.pt`` to ``NAME.onnx`` (float32, dynamic
batch and size, the graph as exported); ``NAME.onnx.json`` records the ``.pt`` file's
digest and the ONNX file's SHA-256, so a detector loads the compiled file only for the
weights it was made from. ONNX Runtime runs it in float32 with the boxes of the PyTorch
model (IoU 1.0 on the shared radiographs). On a 2-core CPU it was slower than PyTorch
(``benchmarks/detect_runtime.py``: 0.56x), so ``detect.runtime`` stays ``torch`` by default.

>>> export_detector(None)  # doctest: +SKIP
PosixPath('.../kneepipe/weights/detector.onnx')
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from kneepipe.files import file_digest, write_atomic

RUNTIMES = ("onnx", "torch")


def sha256(path: Path) -> str:
    """The full SHA-256 of a file (the compiled record's checksum)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def compiled_paths(weights: str | Path) -> tuple[Path, Path]:
    """``(model, record)`` of the compiled detector beside a ``.pt`` file."""
    weights = Path(weights)
    return weights.with_suffix(".onnx"), weights.with_suffix(".onnx.json")


def export_detector(weights: str | Path | None, imgsz: int = 416) -> Path:
    """Export detector weights (``None``: the shipped ones) to ONNX beside them; return the ``.onnx`` path."""
    from ultralytics import YOLO

    from kneepipe.detect.predict import DEFAULT_WEIGHTS

    weights = Path(weights) if weights else DEFAULT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: detector weights not found")
    onnx_path, record_path = compiled_paths(weights)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / weights.name  # Ultralytics writes its export beside the file it reads
        shutil.copy(weights, copy)
        exported = YOLO(str(copy), task="detect").export(
            format="onnx", imgsz=imgsz, dynamic=True, simplify=False, half=False, device="cpu", verbose=False
        )
        write_atomic(onnx_path, Path(exported).read_bytes())
    record = {
        "format": "onnx",
        "weights": weights.name,
        "weights_digest": file_digest(weights),
        "imgsz": imgsz,
        "sha256": {onnx_path.name: sha256(onnx_path)},
    }
    write_atomic(record_path, json.dumps(record, indent=2) + "\n")
    return onnx_path


def find_compiled(weights: Path) -> tuple[Path | None, str]:
    """The ONNX file made from ``weights``, or None and why not (the detector then runs on PyTorch)."""
    onnx_path, record_path = compiled_paths(weights)
    if not record_path.is_file() or not onnx_path.is_file():
        return None, f"no {onnx_path.name} beside {weights.name} (kneepipe export detector makes one)"
    record = json.loads(record_path.read_text())
    if record.get("weights_digest") != file_digest(weights):
        return None, f"{record_path.name} is for other weights than {weights.name}"
    if record.get("sha256", {}).get(onnx_path.name) != sha256(onnx_path):
        return None, f"{onnx_path.name} does not match its checksum in {record_path.name}"
    return onnx_path, ""
