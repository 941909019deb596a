"""A grader's network compiled for the CPU: OpenVINO IR, INT8 by post-training quantisation.

The compiled network is the grader's backbone up to the pooled features its head reads
(:func:`kneepipe.grade.features.pooled_feature_model`); the head itself, the temperature,
the grade biases and the decision rule stay those of the grader file, applied in float32 as
on the Keras runtime. So the grader file's preprocessing and calibration apply unchanged,
and only the backbone's arithmetic changes.

Files, beside the grader file ``NAME.npz`` (the float32 reference, never replaced):

* ``NAME.int8.xml`` / ``NAME.int8.bin``: the OpenVINO IR (``NAME.float32.*`` without ``--int8``);
* ``NAME.int8.json``: what it was built from and how: the grader file's digest, the
  calibration crops (a seeded sample of a ``train`` folder, never ``val``), the layers kept
  in float, and the SHA-256 of the two IR files, checked at every load.

INT8 quantisation uses NNCF's post-training quantisation on the calibration crops; the
first convolution stays in float (it sees raw pixel values; quantising it cost agreement
with float32 on val).

>>> export_grader(None, "../shared/data/oai-kl224/train")  # doctest: +SKIP
PosixPath('.../kneepipe/weights/grader.int8.xml')
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kneepipe.files import file_digest, write_atomic

log = logging.getLogger(__name__)

FORMATS = ("openvino",)
# Crops per inference request. The network is compiled for throughput (one stream per core pair,
# as OpenVINO chooses) and requests run concurrently, one per stream; on a 2-core AVX-512 VNNI CPU,
# interleaved on a busy machine, INT8 ran 28-30 crops/s at 1 crop a request, 29-48 at 2 and
# 17-22 with one latency-mode request of 8.
COMPILED_BATCH = 2


def compiled_paths(grader_path: str | Path, int8: bool = True) -> tuple[Path, Path, Path]:
    """``(xml, bin, record)`` of the compiled network beside a grader file."""
    grader_path = Path(grader_path)
    stem = grader_path.with_suffix("").name + (".int8" if int8 else ".float32")
    folder = grader_path.parent
    return folder / f"{stem}.xml", folder / f"{stem}.bin", folder / f"{stem}.json"


def sha256(path: Path) -> str:
    """The full SHA-256 of a file (the compiled record's checksum)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def calibration_crops(folder: str | Path, count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """A seeded random sample of ``count`` crops under ``folder/<grade>/`` and their names.

    Raises:
        ValueError: ``folder`` is a ``val`` folder (calibrating on it flatters the figures
            measured there) or holds no graded crops.
    """
    from kneepipe.grade.data import labelled_files, load_crops

    folder = Path(folder)
    if folder.name == "val":
        raise ValueError(f"{folder}: calibrate on training crops, never on val (the figures are measured there)")
    paths, grades = labelled_files(folder)
    if not paths:
        raise ValueError(f"{folder}: no crops under <grade>/ folders 0-4")
    pick = np.sort(np.random.default_rng(seed).permutation(len(paths))[:count])
    crops = load_crops([paths[i] for i in pick], [grades[i] for i in pick])
    return crops.crops, [str(paths[i].relative_to(folder)) for i in pick]


def export_grader(
    grader_path: str | Path | None,
    calibration: str | Path | None,
    fmt: str = "openvino",
    int8: bool = True,
    crops: int = 300,
    seed: int = 0,
    out: str | Path | None = None,
) -> Path:
    """Compile a grader file's network for the CPU; write the IR and its record; return the ``.xml``.

    Args:
        grader_path: the grader file (``None``: the shipped one).
        calibration: a folder of training crops ``<grade>/<crop>.png`` (needed for ``int8``).
        fmt: ``openvino``.
        int8: quantise the weights and activations to INT8 (else float32).
        crops: calibration crops drawn from ``calibration``.
        seed: the draw's seed.
        out: the ``.xml`` to write; by default beside the grader file, where the grader finds it.
    """
    import nncf
    import openvino as ov

    from kneepipe.grade.features import pooled_feature_model
    from kneepipe.grade.predict import Grader

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: one of {', '.join(FORMATS)}")
    if int8 and calibration is None:
        raise ValueError("INT8 needs calibration crops (a train folder)")
    if calibration is not None and Path(calibration).name == "val":
        raise ValueError(f"{calibration}: calibrate on training crops, never on val (the figures are measured there)")
    grader = Grader.load(grader_path, runtime="keras")
    if grader.head.mean is not None:
        raise ValueError(f"{grader.path.name} is a site grader: it grades on the Keras runtime")
    xml_path, bin_path, record_path = compiled_paths(grader.path, int8)
    if out is not None:
        xml_path = Path(out).with_suffix(".xml")
        bin_path, record_path = xml_path.with_suffix(".bin"), xml_path.with_suffix(".json")
    size, channels = grader.preprocessing.input_size, grader.preprocessing.channels
    feature_model = pooled_feature_model(grader.model, grader.head.layers)
    with tempfile.TemporaryDirectory() as saved:
        feature_model.export(saved, format="tf_saved_model", verbose=False)
        network = ov.convert_model(saved, input=[-1, size, size, channels], share_weights=False)
    first_conv = next(op.get_friendly_name() for op in network.get_ordered_ops() if op.get_type_name() == "Convolution")
    record: dict[str, Any] = {
        "format": fmt,
        "precision": "int8" if int8 else "float32",
        "grader": grader.path.name,
        "grader_digest": file_digest(grader.path),
        "layers": list(grader.head.layers),
        "input": [size, size, channels],
    }
    if int8 and calibration is not None:
        pixels, names = calibration_crops(calibration, crops, seed)
        x = grader.prepare(pixels)
        network = nncf.quantize(
            network,
            nncf.Dataset([x[i : i + 1] for i in range(len(x))]),
            subset_size=len(x),
            ignored_scope=nncf.IgnoredScope(names=[first_conv]),
        )
        record["calibration"] = {
            "folder": Path(calibration).name,
            "crops": len(names),
            "seed": seed,
            "first": names[:3],
            "method": "NNCF post-training quantisation; first convolution in float",
        }
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml_path.parent) as scratch:
        ov.save_model(network, Path(scratch) / "network.xml", compress_to_fp16=False)
        write_atomic(xml_path, (Path(scratch) / "network.xml").read_bytes())
        write_atomic(bin_path, (Path(scratch) / "network.bin").read_bytes())
    record["sha256"] = {xml_path.name: sha256(xml_path), bin_path.name: sha256(bin_path)}
    write_atomic(record_path, json.dumps(record, indent=2) + "\n")
    return xml_path


@dataclass
class CompiledFeatures:
    """A compiled backbone: network input ``(n, h, w, c)`` -> pooled features, one array per head layer."""

    compiled: Any
    record: dict[str, Any]
    name: str

    @classmethod
    def find(cls, grader_path: Path, layers: tuple[str, ...], runtime: str) -> tuple[CompiledFeatures | None, str]:
        """The compiled network of a grader file, or None and why not (the grader then runs on Keras).

        Prefers INT8, then float32. A record that names another grader file's digest, other
        layers, or IR files whose checksum differs is refused.
        """
        if runtime not in FORMATS:
            return None, f"runtime {runtime!r}"
        reasons = []
        for int8 in (True, False):
            xml_path, bin_path, record_path = compiled_paths(grader_path, int8)
            if not record_path.exists():
                continue
            record = json.loads(record_path.read_text())
            checks = {
                "another grader file": record.get("grader_digest") == file_digest(grader_path),
                "other layers": tuple(record.get("layers", ())) == tuple(layers),
                "a damaged or changed IR (checksum)": all(
                    path.exists() and record.get("sha256", {}).get(path.name) == sha256(path)
                    for path in (xml_path, bin_path)
                ),
            }
            failed = [what for what, ok in checks.items() if not ok]
            if failed:
                reasons.append(f"{record_path.name} is for {', '.join(failed)}")
                continue
            import openvino as ov

            # f32 asked for explicitly: OpenVINO would otherwise run float layers in bf16 on such CPUs.
            compiled = ov.Core().compile_model(
                str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"}
            )
            return cls(compiled, record, xml_path.name), ""
        if not reasons:
            reasons.append(f"no compiled network beside {grader_path.name} (kneepipe export grader makes one)")
        return None, "; ".join(reasons)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: Any = None
        self._parts: dict[int, list[np.ndarray]] = {}

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """Run ``x`` in requests of :data:`COMPILED_BATCH` crops, as many at once as the network has streams.

        A request's outputs depend on its own crops only, so the result is the same for any
        split of ``x`` (and bit for bit the same as one request at a time). Calls from several
        threads take turns.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        with self._lock:
            if self._queue is None:
                self._queue = self._requests()
            self._parts.clear()
            starts = range(0, len(x), COMPILED_BATCH)
            for index, start in enumerate(starts):
                self._queue.start_async(x[start : start + COMPILED_BATCH], index)
            self._queue.wait_all()
            parts = [self._parts.pop(i) for i in range(len(starts))]
        return [np.concatenate(layer).astype(np.float32) for layer in zip(*parts, strict=True)]

    def _requests(self) -> Any:
        """The network's request queue, made once and kept as long as the network.

        Its callback holds the outputs' dict only: were a request queue or its callback the
        last holder of the compiled network, the network would be destroyed on one of
        OpenVINO's own threads when the queue went, which aborts the process.
        """
        import openvino as ov

        queue = ov.AsyncInferQueue(self.compiled, self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        parts, outputs = self._parts, len(self.compiled.outputs)

        def keep(request: Any, index: int) -> None:
            parts[index] = [request.get_output_tensor(i).data.copy() for i in range(outputs)]

        queue.set_callback(keep)
        return queue
