"""The detector compiled for the CPU: OpenVINO IR or ONNX, run through Ultralytics.

Ultralytics exports the PyTorch weights ``NAME.pt`` (float32) to

* ``openvino``: the folder ``NAME_openvino_model/`` (IR ``NAME.xml``/``NAME.bin`` and
  Ultralytics' ``metadata.yaml``), traced at the inference size ``detect.imgsz``, run in
  float32 (:func:`in_float32`: left to itself OpenVINO runs bfloat16 on CPUs that have it,
  and a faint knee the PyTorch weights find was lost on one shared film);
* ``openvino`` quantised: the folder ``NAME_int8_openvino_model/``, the same IR quantised to
  INT8 by NNCF's post-training quantisation, calibrated on pseudo-radiographs composed from
  training crops (never val), its first convolution, activations, head and the neck blocks
  the head reads left in float32
  (:mod:`kneepipe.training.quantise`, which composes the films); run by
  ``detect.runtime=openvino-int8``;
* ``onnx``: ``NAME.onnx`` (dynamic batch and size), run by ONNX Runtime in float32.

A record beside the weights (``NAME.openvino.json``, ``NAME.openvino-int8.json``,
``NAME.onnx.json``) holds the ``.pt`` file's digest and every compiled file's SHA-256, so a
detector loads a compiled network only for the weights it was made from, unchanged. Boxes
and speed against PyTorch on the shared radiographs: ``benchmarks/detect_runtime.py``
(figures in DETECTOR.md).

>>> export_detector(None, fmt="openvino")  # doctest: +SKIP
PosixPath('.../kneepipe/weights/detector_openvino_model')
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from kneepipe.files import file_digest, write_atomic

FORMATS = ("openvino", "onnx")


def sha256(path: Path) -> str:
    """The full SHA-256 of a file (the compiled record's checksum)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def compiled_paths(weights: str | Path, fmt: str = "onnx", int8: bool = False) -> tuple[Path, Path]:
    """``(model, record)`` of the compiled detector beside a ``.pt`` file: a file (onnx) or a folder (openvino)."""
    weights = Path(weights)
    if int8 and fmt != "openvino":
        raise ValueError(f"format {fmt!r}: INT8 is compiled for openvino only")
    if fmt == "openvino":
        tag = "_int8" if int8 else ""
        record = ".openvino-int8.json" if int8 else ".openvino.json"
        return weights.with_name(f"{weights.stem}{tag}_openvino_model"), weights.with_suffix(record)
    if fmt == "onnx":
        return weights.with_suffix(".onnx"), weights.with_suffix(".onnx.json")
    raise ValueError(f"format {fmt!r}: one of {', '.join(FORMATS)}")


def runtime_choices(runtime: str) -> list[tuple[str, bool]]:
    """The compiled networks ``detect.runtime`` may run, ``(format, int8)``, best first.

    ``openvino-int8`` falls back to the float32 IR when no INT8 one is beside the weights;
    PyTorch is the last resort of every runtime.
    """
    return {"openvino-int8": [("openvino", True), ("openvino", False)], "openvino": [("openvino", False)]}.get(
        runtime, [(runtime, False)] if runtime in FORMATS else []
    )


def _files(model: Path) -> list[Path]:
    """The files a compiled model consists of (itself, or a folder's files by name)."""
    return sorted(path for path in model.iterdir() if path.is_file()) if model.is_dir() else [model]


def export_detector(
    weights: str | Path | None,
    imgsz: int = 416,
    fmt: str = "onnx",
    quantise: Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Export detector weights (``None``: the shipped ones) beside them; return the compiled model's path.

    ``openvino`` is traced at ``imgsz`` (the size ``detect.imgsz`` runs it at; the record says
    which); ``onnx`` takes any size. ``quantise`` (OpenVINO only) quantises the exported IR's
    folder in place and returns what it was calibrated on; the network is then written as
    the INT8 one (:func:`kneepipe.training.quantise.export_int8_detector`).
    """
    from ultralytics import YOLO

    from kneepipe.detect.predict import DEFAULT_WEIGHTS

    weights = Path(weights) if weights else DEFAULT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: detector weights not found")
    model_path, record_path = compiled_paths(weights, fmt, quantise is not None)
    record: dict[str, Any] = {
        "format": fmt,
        "weights": weights.name,
        "weights_digest": file_digest(weights),
        "imgsz": imgsz,
    }
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / weights.name  # Ultralytics writes its export beside the file it reads
        shutil.copy(weights, copy)
        options = {"dynamic": True, "simplify": False} if fmt == "onnx" else {"dynamic": False}
        exported = Path(
            YOLO(str(copy), task="detect").export(format=fmt, imgsz=imgsz, device="cpu", verbose=False, **options)
        )
        if quantise is not None:
            record["precision"] = "int8"
            record["calibration"] = quantise(exported)
        if fmt == "onnx":
            write_atomic(model_path, exported.read_bytes())
        else:
            staged = Path(tempfile.mkdtemp(dir=weights.parent, prefix=f".{model_path.name}."))
            for path in _files(exported):
                shutil.copy(path, staged / path.name)
            _describe(staged / "metadata.yaml", weights, "float32" if quantise is None else "INT8")
            if model_path.exists():
                shutil.rmtree(model_path)
            staged.rename(model_path)
    record["sha256"] = {path.name: sha256(path) for path in _files(model_path)}
    write_atomic(record_path, json.dumps(record, indent=2) + "\n")
    return model_path


def _describe(metadata: Path, weights: Path, precision: str) -> None:
    """Say in Ultralytics' metadata what the network was made from (it names the training run's folder)."""
    import yaml

    facts = yaml.safe_load(metadata.read_text())
    digest = file_digest(weights)
    facts["description"] = f"kneepipe knee-joint detector, compiled from {weights.name}@{digest} ({precision})"
    facts.pop("date", None)
    metadata.write_text(yaml.safe_dump(facts, sort_keys=False))


def in_float32(model: Any, imgsz: int) -> bool:
    """Make an Ultralytics ``YOLO`` on an OpenVINO IR run in float32, a batch in one call; whether it now does.

    Ultralytics compiles the IR for latency in the CPU's default precision, bfloat16 on CPUs
    with bf16 units. Its OpenVINO backend is set up by a first prediction, then compiled
    again with the same settings plus float32 inference.

    The IR is traced for one image, so Ultralytics runs a batch of films an image at a
    time. It is compiled again with any batch size at the traced image size: a batch
    of films is one call, the same boxes (the network's outputs are equal to the last
    bit), and the cores do more of the work in parallel.
    """
    import openvino as ov
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)  # its notes on the first compilation ("batch=1") no longer hold
    try:
        model.predict(source=np.zeros((imgsz, imgsz, 3), np.uint8), imgsz=imgsz, device="cpu", verbose=False)
    finally:
        LOGGER.setLevel(level)
    backend = getattr(getattr(model.predictor, "model", None), "backend", None)
    if backend is None or getattr(backend, "ov_compiled_model", None) is None:
        return False
    xml = next(Path(model.ckpt_path or model.model_name).glob("*.xml"))
    network = ov.Core().read_model(xml)
    channels = network.input().get_partial_shape()[1]
    network.reshape(ov.PartialShape([ov.Dimension(), channels, imgsz, imgsz]))
    backend.compile_model = partial(
        backend.compile_model, config={"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    )
    backend.ov_compiled_model = backend.compile_model(network)
    backend.metadata["dynamic"] = True  # Ultralytics then passes the whole batch, unpadded
    return backend.ov_compiled_model.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


_VIEW_NETWORKS: dict[tuple[str, int, tuple[int, ...]], Callable[[np.ndarray], np.ndarray]] = {}
_VIEW_NETWORKS_LOCK = threading.Lock()


def compile_view_features(backbone: Any, size: int, layers: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    """The view classifier's features (:func:`~kneepipe.detect.quality.boxed_features`) as one OpenVINO network.

    The detector backbone's first layers and the pooling of ``layers`` are traced (about
    1.5 s) and compiled in float32 for any batch size at ``size``: the features equal
    PyTorch's to about 1e-6 of their range, in about a third of the time on a 2-core CPU.
    A process compiles each backbone once (by its digest): detectors loaded again share it.
    The returned function takes :func:`~kneepipe.detect.quality.backbone_input`'s array and
    returns ``(n, features)``; each call has its own inference request, so threads may share it.
    """
    from kneepipe.detect.quality import backbone_digest

    key = (backbone_digest(backbone), int(size), tuple(int(layer) for layer in layers))
    with _VIEW_NETWORKS_LOCK:
        if key not in _VIEW_NETWORKS:
            _VIEW_NETWORKS[key] = _traced_view_features(backbone, size, key[2])
        return _VIEW_NETWORKS[key]


def _traced_view_features(backbone: Any, size: int, layers: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    import warnings

    import openvino as ov
    import torch

    from kneepipe.detect.quality import pooled_features

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return pooled_features(self.backbone, layers, x)

    with warnings.catch_warnings():  # the tracer's deprecation notes are not the user's concern
        warnings.simplefilter("ignore")
        network = ov.convert_model(
            Pooled().eval(), example_input=torch.zeros(1, 3, size, size), input=[(-1, 3, size, size)]
        )
    settings = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(network, "CPU", settings)

    def features(batch: np.ndarray) -> np.ndarray:
        request = compiled.create_infer_request()
        request.infer({0: batch})
        return request.get_output_tensor(0).data.copy()

    return features


def find_compiled(
    weights: Path, fmt: str = "onnx", imgsz: int | None = None, int8: bool = False
) -> tuple[Path | None, str]:
    """The network compiled from ``weights`` in ``fmt``, or None and why not (the detector then runs on PyTorch).

    An OpenVINO network traced at another size than ``imgsz`` is refused too.
    """
    model_path, record_path = compiled_paths(weights, fmt, int8)
    if not record_path.is_file() or not model_path.exists():
        how = f"kneepipe export detector --format {fmt}" + (" --calibration TRAIN_CROPS" if int8 else "")
        return None, f"no {model_path.name} beside {weights.name} ({how} makes one)"
    record = json.loads(record_path.read_text())
    if record.get("weights_digest") != file_digest(weights):
        return None, f"{record_path.name} is for other weights than {weights.name}"
    sums = record.get("sha256", {})
    if sorted(sums) != [path.name for path in _files(model_path)] or any(
        sums[path.name] != sha256(path) for path in _files(model_path)
    ):
        return None, f"{model_path.name} does not match its checksum in {record_path.name}"
    if fmt == "openvino" and imgsz is not None and record.get("imgsz") != imgsz:
        return None, f"{model_path.name} was traced at imgsz {record.get('imgsz')}, detect.imgsz is {imgsz}"
    return model_path, ""
