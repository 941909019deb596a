"""Training the knee-joint detector on composites, offline, from a model YAML.

A run folder holds everything needed to inspect or resume it::

    <out_dir>/args.yaml          the resolved kneepipe detect config of the run
    <out_dir>/dataset/           composites (train from train crops, val from val crops),
                                 background radiographs, data.yaml
    <out_dir>/yolo/              the Ultralytics run: args.yaml, results.csv,
                                 weights/last.pt and weights/best.pt

The detector has two classes, the patient's right knee (0) and left knee (1).
Ultralytics' left-right flip augmentation is switched off because it would swap the
anatomy without swapping the label; the compositor makes its own mirrored knees with
the side swapped instead.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from kneepipe.config import save_config
from kneepipe.detect.compose import SIDES, compose_dataset
from kneepipe.detect.config import DetectConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = PROJECT_ROOT / ".." / "shared" / "data"
BACKGROUND_KINDS = ("lateral", "foot")
"""Annotated radiograph kinds used as background (no-knee) training images."""


def _project_path(value: str | None, default: Path | None) -> Path | None:
    if value is None:
        return default
    path = Path(value)
    return path if path.is_absolute() else PROJECT_ROOT / path


def background_images(annotations: Path, radiographs: Path) -> list[Path]:
    """The radiographs an annotation CSV marks as lateral views or feet.

    Lines starting with ``#`` are comments; the CSV needs ``image`` and ``kind`` columns.
    """
    with annotations.open(newline="") as handle:
        rows = csv.DictReader(line for line in handle if not line.startswith("#"))
        names = sorted({row["image"] for row in rows if row["kind"] in BACKGROUND_KINDS})
    return [radiographs / name for name in names]


def _write_backgrounds(paths: list[Path], out_dir: Path, copies: int, rng: np.random.Generator) -> int:
    """Write background radiographs (and varied copies) with empty label files."""
    from kneepipe.imaging import read_radiograph

    images_dir, labels_dir = out_dir / "images" / "train", out_dir / "labels" / "train"
    written = 0
    for path in paths:
        pixels = read_radiograph(path).pixels
        scale = 768 / max(pixels.shape)
        pixels = cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        for copy in range(copies):
            variant = pixels
            if copy % 2 == 1:
                variant = variant[:, ::-1]
            if copy >= 2:
                gamma = rng.uniform(0.6, 1.6)
                variant = (255.0 * (variant / 255.0) ** gamma).astype(np.uint8)
            name = f"background_{path.stem}_{copy}"
            cv2.imwrite(str(images_dir / f"{name}.jpg"), np.ascontiguousarray(variant))
            (labels_dir / f"{name}.txt").write_text("")
            written += 1
    return written


def build_dataset(config: DetectConfig, dataset_dir: Path) -> Path:
    """Write the training and validation composites plus backgrounds; return data.yaml.

    An existing ``data.yaml`` means the dataset is complete and is reused as it is
    (so a resumed run trains on the same images).
    """
    data_yaml = dataset_dir / "data.yaml"
    if data_yaml.exists():
        return data_yaml
    crops = _project_path(config.train_crops, SHARED_DATA / "oai-kl224")
    for split, count, seed in (
        ("train", config.train_images, config.seed),
        ("val", config.val_images, config.seed + 1),
    ):
        compose_dataset(
            crops / split,
            dataset_dir,
            count=count,
            seed=seed,
            bilateral_fraction=config.bilateral_fraction,
            images_subdir=f"images/{split}",
            labels_subdir=f"labels/{split}",
        )
        (dataset_dir / "labels.csv").rename(dataset_dir / f"labels_{split}.csv")
    backgrounds = 0
    annotations = _project_path(config.train_annotations, None)
    if annotations is not None and config.background_copies > 0:
        radiographs = _project_path(config.train_radiographs, SHARED_DATA / "radiographs")
        paths = background_images(annotations, radiographs)
        rng = np.random.default_rng(config.seed + 2)
        backgrounds = _write_backgrounds(paths, dataset_dir, config.background_copies, rng)
    names = {index: f"{'right' if side == 'R' else 'left'}_knee" for index, side in enumerate(SIDES)}
    content = {
        "path": str(dataset_dir.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": names,
    }
    (dataset_dir / "summary.json").write_text(
        json.dumps(
            {
                "train_composites": config.train_images,
                "val_composites": config.val_images,
                "background_images": backgrounds,
            },
            indent=2,
        )
    )
    tmp = data_yaml.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(content, sort_keys=False))
    tmp.replace(data_yaml)
    return data_yaml


def ultralytics_train_args(config: DetectConfig, data_yaml: Path, out_dir: Path) -> dict[str, Any]:
    """The arguments handed to ``YOLO.train``: offline, CPU, no flips, no plots."""
    return {
        "data": str(data_yaml),
        "epochs": config.train_epochs,
        "imgsz": config.train_imgsz,
        "batch": config.train_batch,
        "workers": config.workers,
        "seed": config.seed,
        "device": "cpu",
        "project": str(out_dir.resolve()),
        "name": "yolo",
        "exist_ok": True,
        "pretrained": bool(config.init_weights),
        "amp": False,
        "plots": False,  # plotting would fetch a font
        "fliplr": 0.0,  # a flip swaps anatomy, not the label
        "flipud": 0.0,
        "warmup_epochs": config.warmup_epochs,
        "mosaic": config.mosaic,
        "close_mosaic": config.close_mosaic,
        "patience": config.patience,
        "hsv_h": 0.0,
        "hsv_s": 0.0,
        "hsv_v": 0.3,
        "scale": 0.3,
        "translate": 0.1,
        "degrees": 0.0,
        "cache": "ram",
        "deterministic": False,
        "verbose": False,
    }


def train_detector(config: DetectConfig, out_dir: Path, resume: bool = False) -> Path:
    """Train the two-class (right/left knee) detector; return the path of ``best.pt``.

    Args:
        config: the resolved detect config (its ``train_*`` and dataset keys).
        out_dir: the run folder (created); see the module docstring for its layout.
        resume: continue an interrupted run in ``out_dir`` from ``yolo/weights/last.pt``.

    Raises:
        FileNotFoundError: ``resume`` without a ``last.pt`` in ``out_dir``.

    >>> from kneepipe.config import load_config
    >>> cfg = load_config(DetectConfig, overrides=["train_epochs=1", "train_images=8"])
    >>> train_detector(cfg, Path("runs/detector"))  # doctest: +SKIP
    """
    from kneepipe.runtime import prepare_frameworks

    prepare_frameworks()
    from ultralytics import YOLO

    out_dir = Path(out_dir)
    weights_dir = out_dir / "yolo" / "weights"
    if resume:
        last = weights_dir / "last.pt"
        if not last.exists():
            raise FileNotFoundError(f"{last}: no interrupted run to resume in {out_dir}")
        YOLO(str(last)).train(resume=True)
        return weights_dir / "best.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    data_yaml = build_dataset(config, out_dir / "dataset")
    save_config(config, out_dir, extra={"data_yaml": data_yaml})
    if config.init_weights:
        init = _project_path(config.init_weights, None)
        if not init.is_file():
            raise FileNotFoundError(f"{init}: init_weights not found")
        model = YOLO(str(init))
    else:
        model = YOLO(config.model_yaml)
    model.train(**ultralytics_train_args(config, data_yaml, out_dir))
    return weights_dir / "best.pt"
