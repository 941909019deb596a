"""Fitting the view classifier (AP/PA knee, lateral knee, no knee) and measuring it film by film.

Real lateral and no-knee films are few (the project has 12 laterals and 2 feet), so each
real film is used many times: augmented copies of the whole film (zoom, crop, shift,
mirror, rotation, contrast, gamma, noise, blur), and on annotated AP films also
knee-centred crops (a single AP knee at any zoom) and crops of the shafts above or below
a joint (bone but no joint: no knee). AP examples also come from the project's
composites (:mod:`kneepipe.training.compose`) and from augmented OAI crops (a knee
filling the frame). Features are the detector backbone's pooled channels
(:func:`kneepipe.detect.quality.view_features`); the classifier is a standardised
logistic regression (scikit-learn).

:func:`leave_one_film_out` measures it honestly: for each real film, a classifier is
fitted without that film and without any copy or crop made from it, then asked about the
film as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kneepipe.detect.quality import VIEW_AP, VIEW_CLASSES, VIEW_LATERAL, VIEW_NO_KNEE, border_grey

KIND_TO_VIEW = {"bilateral": VIEW_AP, "single": VIEW_AP, "lateral": VIEW_LATERAL, "foot": VIEW_NO_KNEE}
"""Annotation kinds and the view they teach; ``bad_exposure`` films are refused before the view check."""
WORKING_SIDE = 384  # films are shrunk to this longer side before augmenting (features use a smaller letterbox)


@dataclass(frozen=True)
class ViewRecipe:
    """How the view classifier is fitted (stored in its file and in the report)."""

    copies: int = 60  # augmented copies per real film, and as many knee crops per AP film
    composites: int = 120  # AP composites from the OAI crops
    oai_crops: int = 60  # augmented OAI crops (a knee filling the frame)
    size: int = 192  # letterbox side of the features
    layers: tuple[int, ...] = (4, 6, 9)  # backbone layers pooled (YOLOv8n: C2f, C2f, SPPF)
    regularisation: float = 0.01  # logistic regression's C (inverse strength)
    seed: int = 0


@dataclass(frozen=True)
class ViewExample:
    """One training image: the film it was made from, its view, and whether it is the film as read."""

    film: str
    view: str
    original: bool
    pixels: np.ndarray


def _augmenter(seed: int) -> Any:
    """The copies' augmentation, seeded: the same recipe fits the same classifier."""
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.6, 1.4),
                translate_percent=(-0.15, 0.15),
                rotate=(-20, 20),
                border_mode=cv2.BORDER_REPLICATE,
                p=0.9,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.3, p=0.8),
            A.RandomGamma(gamma_limit=(60, 160), p=0.6),
            A.GaussNoise(std_range=(0.01, 0.06), p=0.5),
            A.GaussianBlur(blur_limit=(3, 5), p=0.3),
        ],
        seed=seed,
    )


def _shrink(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    scale = min(1.0, WORKING_SIDE / max(pixels.shape))
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), scale


def _window(pixels: np.ndarray, x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    height, width = pixels.shape
    left, top = int(max(0, x1)), int(max(0, y1))
    right, bottom = int(min(width, x2)), int(min(height, y2))
    return np.ascontiguousarray(pixels[top:bottom, left:right])


def _padded_window(pixels: np.ndarray, cx: float, cy: float, w: float, h: float) -> np.ndarray:
    """The ``w`` x ``h`` window centred on ``(cx, cy)``; where it leaves the film, the film's border grey."""
    left, top = int(round(cx - w / 2)), int(round(cy - h / 2))
    width, height = max(8, int(round(w))), max(8, int(round(h)))
    canvas = np.full((height, width), border_grey(pixels), np.uint8)
    x1, y1 = max(0, left), max(0, top)
    x2, y2 = min(pixels.shape[1], left + width), min(pixels.shape[0], top + height)
    if x2 > x1 and y2 > y1:
        canvas[y1 - top : y2 - top, x1 - left : x2 - left] = pixels[y1:y2, x1:x2]
    return canvas


def _tilted(pixels: np.ndarray, angle: float) -> np.ndarray:
    """The whole film rotated by ``angle`` degrees on a canvas large enough to hold it, padded with its border grey."""
    height, width = pixels.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(height * sin + width * cos), int(height * cos + width * sin)
    matrix[0, 2] += new_w / 2 - width / 2
    matrix[1, 2] += new_h / 2 - height / 2
    return cv2.warpAffine(pixels, matrix, (new_w, new_h), borderValue=border_grey(pixels))


def film_examples(
    name: str,
    pixels: np.ndarray,
    view: str,
    boxes: list[tuple[float, ...]],
    recipe: ViewRecipe,
    rng: np.random.Generator,
    augment: Any,
) -> list[ViewExample]:
    """The film as read, its augmented copies and, with joint ``boxes`` (source pixels), knee and shaft crops."""
    small, scale = _shrink(pixels)
    examples = [ViewExample(name, view, True, small)]
    height, width = small.shape
    for _ in range(recipe.copies):
        part = small
        if rng.random() < 0.7:  # a crop of 55-100% of each side
            f = rng.uniform(0.55, 1.0)
            h, w = int(height * rng.uniform(f, 1.0)), int(width * rng.uniform(f, 1.0))
            y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            part = small[y : y + h, x : x + w]
        examples.append(ViewExample(name, view, False, augment(image=np.ascontiguousarray(part))["image"]))
    for _ in range(recipe.copies // 3):  # the whole film tilted on a padded canvas
        examples.append(ViewExample(name, view, False, augment(image=_tilted(small, rng.uniform(-20, 20)))["image"]))
    if not boxes:  # zoomed in and out about the middle of the film, padded where the window leaves it
        for _ in range(recipe.copies // 2):
            span = rng.uniform(0.5, 2.5)
            w = width * span
            h = w * rng.uniform(1.0, 1.6) if rng.random() < 0.5 else height * span
            cx, cy = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7)
            part = _padded_window(small, cx, cy, w, h)
            examples.append(ViewExample(name, view, False, augment(image=part)["image"]))
        return examples
    scaled = [np.array(box) * scale for box in boxes]
    for _ in range(recipe.copies // 2):  # one knee spanning 20-90% of a portrait window, padded beyond the film
        x1, y1, x2, y2 = scaled[int(rng.integers(len(scaled)))]
        side = x2 - x1
        w = side / rng.uniform(0.2, 0.9)
        h = w * rng.uniform(1.1, 1.5)
        cx = (x1 + x2) / 2 + rng.uniform(-0.5, 0.5) * (w - side)
        cy = (y1 + y2) / 2 + rng.uniform(-0.5, 0.5) * (h - side)
        part = _padded_window(small, cx, cy, w, h)
        examples.append(ViewExample(name, view, False, augment(image=part)["image"]))
    for _ in range(recipe.copies):  # one knee of the film, at any zoom: a single AP knee
        x1, y1, x2, y2 = scaled[int(rng.integers(len(scaled)))]
        side = x2 - x1
        w = side * rng.uniform(1.1, 2.2)
        h = w * rng.uniform(1.0, 2.5)
        cx = (x1 + x2) / 2 + rng.uniform(-0.2, 0.2) * side
        cy = (y1 + y2) / 2 + rng.uniform(-0.3, 0.3) * side
        part = _window(small, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        examples.append(ViewExample(name, view, False, augment(image=part)["image"]))
    for _ in range(recipe.copies // 3):  # a shaft above or below a joint: bone, no knee
        x1, y1, x2, y2 = scaled[int(rng.integers(len(scaled)))]
        side = x2 - x1
        if rng.random() < 0.5 and y1 > 0.6 * side:
            top, bottom = 0.0, y1 + 0.1 * side
        elif height - y2 > 0.6 * side:
            top, bottom = y2 - 0.1 * side, float(height)
        else:
            continue
        left, right = x1 - side * rng.uniform(0, 0.5), x2 + side * rng.uniform(0, 0.5)
        part = _window(small, left, top, right, bottom)
        examples.append(ViewExample(name, VIEW_NO_KNEE, False, augment(image=part)["image"]))
    return examples


def view_examples(radiographs: Path, annotations: Path, crops: Path | None, recipe: ViewRecipe) -> list[ViewExample]:
    """Every training image: the annotated real films and their copies, composites, OAI crops."""
    from kneepipe.detect.evaluate import read_annotations
    from kneepipe.imaging import read_radiograph

    rng = np.random.default_rng(recipe.seed)
    augment = _augmenter(recipe.seed)
    examples: list[ViewExample] = []
    for name, entry in sorted(read_annotations(annotations).items()):
        view = KIND_TO_VIEW.get(entry["kind"])
        if view is None:
            continue
        pixels = read_radiograph(radiographs / name).pixels
        boxes = [box for _, box in entry["joints"]]
        examples += film_examples(name, pixels, view, boxes, recipe, rng, augment)
    if crops is not None:
        from kneepipe.training.compose import _pairs, _read_crop, compose_radiograph, find_crops

        knee_crops = find_crops(crops)
        if not knee_crops:
            raise FileNotFoundError(f"{crops}: no OAI crops in <kl_grade>/<patient><side>.png")
        pairs, singles = _pairs(knee_crops)
        for index in range(recipe.composites):
            chosen = pairs[int(rng.integers(len(pairs)))] if pairs and rng.random() < 0.6 else None
            knees = chosen or (singles or knee_crops)[int(rng.integers(len(singles or knee_crops)))]
            group = knees if isinstance(knees, tuple) else (knees,)
            parts = [(_read_crop(c), c.side, c.kl_grade, c.path) for c in group]
            film, _ = compose_radiograph(rng, parts, int(rng.integers(384, 513)))
            examples.append(ViewExample(f"composite_{index}", VIEW_AP, False, film))
        for index in range(recipe.oai_crops):
            crop = _read_crop(knee_crops[int(rng.integers(len(knee_crops)))])
            examples.append(ViewExample(f"oai_{index}", VIEW_AP, False, augment(image=crop)["image"]))
    return examples


def _fit(features: np.ndarray, views: np.ndarray, regularisation: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=regularisation, max_iter=3000, class_weight="balanced")
    )
    return model.fit(features, views)


def leave_one_film_out(
    features: np.ndarray, examples: list[ViewExample], regularisation: float
) -> list[dict[str, Any]]:
    """For each real film: the probabilities of a classifier fitted without it and all that was made from it."""
    films = np.array([example.film for example in examples])
    views = np.array([example.view for example in examples])
    records = []
    for index, example in enumerate(examples):
        if not example.original:
            continue
        model = _fit(features[films != example.film], views[films != example.film], regularisation)
        probabilities = dict(zip(model.classes_, model.predict_proba(features[index : index + 1])[0], strict=True))
        records.append(
            {
                "film": example.film,
                "view": example.view,
                **{f"p_{view}": round(float(probabilities.get(view, 0.0)), 4) for view in VIEW_CLASSES},
            }
        )
    return records


def _most_likely(record: dict[str, Any]) -> str:
    return max(VIEW_CLASSES, key=lambda view: float(record[f"p_{view}"]))


def summarise(records: list[dict[str, Any]], lateral_threshold: float) -> dict[str, Any]:
    """Per true view: films, and how many the rule names lateral (P(lateral) >= threshold) or most likely each view."""
    summary: dict[str, Any] = {}
    for view in VIEW_CLASSES:
        rows = [r for r in records if r["view"] == view]
        if not rows:
            continue
        summary[view] = {
            "films": len(rows),
            "named_lateral": sum(r[f"p_{VIEW_LATERAL}"] >= lateral_threshold for r in rows),
            "most_likely": {other: sum(_most_likely(r) == other for r in rows) for other in VIEW_CLASSES},
            "p_lateral_range": [min(r[f"p_{VIEW_LATERAL}"] for r in rows), max(r[f"p_{VIEW_LATERAL}"] for r in rows)],
        }
    return summary


def train_view(
    radiographs: Path,
    annotations: Path,
    crops: Path | None,
    out: Path,
    detector_weights: Path,
    recipe: ViewRecipe,
    lateral_threshold: float = 0.5,
    measure: bool = True,
) -> dict[str, Any]:
    """Fit the view classifier on all the examples, write it to ``out``; measure it leave-one-film-out first.

    Writes ``out`` (the classifier, KB-sized) and ``out`` with ``.json`` (the recipe, the
    example counts and, with ``measure``, each real film's held-out probabilities).
    """
    from kneepipe.detect.quality import backbone_digest, load_backbone, view_features
    from kneepipe.files import file_digest, write_atomic

    examples = view_examples(radiographs, annotations, crops, recipe)
    backbone = load_backbone(detector_weights, max(recipe.layers) + 1)
    features = np.concatenate(
        [
            view_features(backbone, [e.pixels for e in examples[start : start + 32]], recipe.size, recipe.layers)
            for start in range(0, len(examples), 32)
        ]
    )
    views = np.array([example.view for example in examples])
    report: dict[str, Any] = {
        "recipe": {**recipe.__dict__, "layers": list(recipe.layers)},
        "examples": {view: int((views == view).sum()) for view in VIEW_CLASSES},
        "real_films": sum(example.original for example in examples),
        "detector": f"{detector_weights.name}@{file_digest(detector_weights)}",
    }
    if measure:
        records = leave_one_film_out(features, examples, recipe.regularisation)
        report["leave_one_film_out"] = {"lateral_threshold": lateral_threshold, **summarise(records, lateral_threshold)}
        report["films"] = records
    model = _fit(features, views, recipe.regularisation)
    scaler, logistic = model.steps[0][1], model.steps[1][1]
    coef, intercept = logistic.coef_, logistic.intercept_
    order = [list(logistic.classes_).index(view) for view in VIEW_CLASSES]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as handle:
        np.savez_compressed(
            handle,
            classes=np.array(VIEW_CLASSES),
            mean=scaler.mean_,
            scale=scaler.scale_,
            coef=coef[order],
            intercept=intercept[order],
            size=np.array(recipe.size),
            layers=np.array(recipe.layers),
            backbone_digest=np.array(backbone_digest(backbone)),
            recipe=np.array(json.dumps(report["recipe"])),
        )
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    return report
