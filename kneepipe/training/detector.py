"""Training the knee-joint detector on composites, offline, from a model YAML, and measuring it on val composites.

A run folder holds everything needed to inspect or resume it::

    <out_dir>/args.yaml          the resolved kneepipe detect config of the run
    <out_dir>/dataset/           composites (train from train crops, val from val crops),
                                 background radiographs, varied copies of the annotated
                                 real films (``real_copies``: AP films with their boxes,
                                 lateral and foot films as backgrounds), data.yaml
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
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from kneepipe.config import save_config
from kneepipe.detect.config import DetectConfig
from kneepipe.detect.evaluate import match_joints
from kneepipe.detect.predict import Detector
from kneepipe.files import write_atomic
from kneepipe.imaging import read_radiograph
from kneepipe.joints import SIDES
from kneepipe.training.compose import compose_dataset
from kneepipe.training.real_films import NEGATIVE_KINDS, AnnotatedFilm, annotated_films, write_film_copies


def background_images(annotations: Path, radiographs: Path) -> list[Path]:
    """The radiographs an annotation CSV marks as lateral views or feet (:data:`NEGATIVE_KINDS`)."""
    return [film.path for film in annotated_films(annotations, radiographs, kinds=NEGATIVE_KINDS)]


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
    """Write the training and validation composites, backgrounds and real-film copies; return data.yaml.

    An existing ``data.yaml`` means the dataset is complete and is reused as it is
    (so a resumed run trains on the same images).
    """
    data_yaml = dataset_dir / "data.yaml"
    if data_yaml.exists():
        return data_yaml
    if not config.train_crops:
        raise FileNotFoundError("train_crops: name the OAI crop folder (with train/ and val/) to compose from")
    background_copies = config.real_copies if config.real_background_copies is None else config.real_background_copies
    films: list[tuple[list[AnnotatedFilm], int]] = []
    if config.real_copies > 0 or background_copies > 0:
        if not (config.train_annotations and config.train_radiographs):
            raise FileNotFoundError("real_copies: name train_annotations and train_radiographs (the annotated films)")
        annotations, radiographs = Path(config.train_annotations), Path(config.train_radiographs)
        films = [
            (annotated_films(annotations, radiographs, tuple(config.real_exclude)), config.real_copies),
            (annotated_films(annotations, radiographs, kinds=NEGATIVE_KINDS), background_copies),
        ]
    crops = Path(config.train_crops)
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
            scale_variety=config.scale_variety,
            exposure_variety=config.exposure_variety,
            images_subdir=f"images/{split}",
            labels_subdir=f"labels/{split}",
        )
        (dataset_dir / "labels.csv").rename(dataset_dir / f"labels_{split}.csv")
    backgrounds = 0
    if config.train_annotations and config.background_copies > 0:
        if not config.train_radiographs:
            raise FileNotFoundError("train_radiographs: name the folder of the radiographs train_annotations lists")
        paths = background_images(Path(config.train_annotations), Path(config.train_radiographs))
        rng = np.random.default_rng(config.seed + 2)
        backgrounds = _write_backgrounds(paths, dataset_dir, config.background_copies, rng)
    real, real_rng = 0, np.random.default_rng(config.seed + 3)
    for group, copies in films:
        real += write_film_copies(group, dataset_dir, copies, real_rng)
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
                "real_film_copies": real,
            },
            indent=2,
        )
    )
    return write_atomic(data_yaml, yaml.safe_dump(content, sort_keys=False))


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
        "freeze": config.freeze or None,
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
    >>> cfg = load_config(DetectConfig, overrides=["train_crops=crops", "train_epochs=1", "close_mosaic=0"])
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
        init = Path(config.init_weights)
        if not init.is_file():
            raise FileNotFoundError(f"{init}: init_weights not found")
        model = YOLO(str(init))
    else:
        model = YOLO(config.model_yaml)
    model.train(**ultralytics_train_args(config, data_yaml, out_dir))
    return weights_dir / "best.pt"


def evaluate_composites(
    detector: Detector,
    crops_root: Path,
    count: int = 300,
    seed: int = 2024,
    iou_threshold: float = 0.75,
) -> dict[str, Any]:
    """Recall at ``iou_threshold`` and side accuracy on fresh composites of the val crops under ``crops_root``."""
    with tempfile.TemporaryDirectory() as tmp:
        labels_csv = compose_dataset(crops_root, Path(tmp), count=count, seed=seed)
        with labels_csv.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        truth: dict[str, list] = {}
        for row in rows:
            box = tuple(float(row[key]) for key in ("x1", "y1", "x2", "y2"))
            truth.setdefault(row["image"], []).append((row["side"], box))
        names = sorted(truth)
        ious, sides_right, extra = [], [], 0
        for start in range(0, len(names), 16):
            chunk = names[start : start + 16]
            radiographs = [read_radiograph(Path(tmp) / "images" / name) for name in chunk]
            for name, detection in zip(chunk, detector.detect(radiographs), strict=True):
                matches = match_joints(truth[name], detection)
                ious += [m["iou"] for m in matches]
                sides_right += [m["predicted_side"] == m["side"] for m in matches if m["iou"] >= 0.5]
                extra += max(0, len(detection.joints) - sum(m["iou"] > 0 for m in matches))
    found = sum(iou >= iou_threshold for iou in ious)
    return {
        "composites": count,
        "seed": seed,
        "joints": len(ious),
        "iou_threshold": iou_threshold,
        "recall": found / len(ious),
        "recall_iou50": sum(iou >= 0.5 for iou in ious) / len(ious),
        "mean_iou": sum(ious) / len(ious),
        "side_accuracy": sum(sides_right) / len(sides_right) if sides_right else 0.0,
        "extra_detections": extra,
    }
