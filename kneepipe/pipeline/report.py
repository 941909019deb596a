"""``report.html``: one self-contained page a clinician can read, from a USB stick, offline.

Every image (radiograph thumbnails with the joint boxes drawn, knee crops, Grad-CAM heat
maps, plots) is embedded as base64; the page has no script and loads no font, style or
image from anywhere. The figures come from :mod:`kneepipe.pipeline.plots`; the Grad-CAM
maps are computed by the pipeline (:mod:`kneepipe.pipeline.explain`) and handed over in
the run. This module only renders: it never runs a model.

Sections: the batch at a glance (counts, grade distribution, per file-name group, and with
labels the metrics and confusion matrix), the refused files with their reasons, each
radiograph with its knees (crop, Grad-CAM, grade and probabilities), and the models and
configuration that produced the page.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import yaml

from kneepipe import KL_GRADES, __version__
from kneepipe.files import write_atomic
from kneepipe.grade.folder import prior_summary
from kneepipe.joints import STATUS_OK
from kneepipe.pipeline.plots import (
    annotated_thumbnail,
    confusion_plot,
    gradcam_overlay,
    grade_distribution_plot,
    group_distribution_plot,
)

if TYPE_CHECKING:
    from kneepipe.grade.predict import Grader
    from kneepipe.pipeline.config import PipelineConfig
    from kneepipe.pipeline.outputs import PipelineRun
    from kneepipe.pipeline.records import ImageRecord

DETECT_SHOWN = ("imgsz", "conf", "iou", "max_det", "max_side", "overexposed_fraction", "review_conf")
STATUS_TEXT = {
    "no_knee": "no knee found",
    "not_gradable_view": "view not gradable for KL",
    "lateral_view": "lateral view (KL needs AP/PA)",
    "overexposed": "over-exposed film",
    "underexposed": "under-exposed film",
    "knee_prosthesis": "knee prosthesis (metal implant)",
    "partial": "joint cut by the film's edge",
    "rotated": "film lies sideways",
    "error": "could not be processed",
}

CSS = """
body{font-family:"DejaVu Sans",Verdana,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#1d2733;
background:#fafbfc;font-size:14px;line-height:1.45}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;border-bottom:2px solid #d0d7de;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#5b6672} .small{font-size:12px}
table{border-collapse:collapse;margin:8px 0 12px} th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right}
th{background:#eef1f4} td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.stat{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:110px}
.stat b{display:block;font-size:22px}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.radiograph{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px;margin:14px 0;break-inside:avoid}
.radiograph h3{margin-top:0}
.film{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.film figure{margin:0} .film figure>img{max-width:470px;max-height:460px;border:1px solid #ccc;display:block}
.knee{display:flex;gap:10px;align-items:flex-start;padding:6px 0;border-bottom:1px solid #e4e8ec}
.knee figure{margin:0;text-align:center;font-size:11px;color:#5b6672}
.knee img{width:140px;height:140px;border:1px solid #ccc;display:block}
.grade{font-size:20px;font-weight:bold}
.bar{display:flex;align-items:center;gap:6px;font-size:12px;margin:1px 0}
.bar span.t{width:34px} .bar span.v{width:44px;text-align:right}
.bar div{height:10px;background:#3a78c2;border-radius:2px}
.bar.top div{background:#c2553a}
.warn{color:#9a4b00} .refused{color:#8a1f11}
.knee.review{background:#fff4e0;border-left:4px solid #d98a00;padding-left:8px}
.review-badge{display:inline-block;background:#d98a00;color:#fff;border-radius:3px;padding:0 6px;font-weight:bold}
summary{cursor:pointer;color:#3a78c2}
pre{background:#f1f3f5;padding:10px;border-radius:4px;overflow-x:auto;font-size:12px}
img.plot{max-width:100%;border:1px solid #e4e8ec;background:#fff}
"""


def data_uri(pixels: np.ndarray, fmt: str = ".jpg", quality: int = 88) -> str:
    """An image as a ``data:`` URI (JPEG for photos of film, PNG for plots)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == ".jpg" else []
    ok, encoded = cv2.imencode(fmt, pixels, params)
    if not ok:
        raise ValueError("cannot encode an image for the report")
    mime = "image/jpeg" if fmt == ".jpg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(encoded.tobytes()).decode('ascii')}"


def _plot_img(alt: str, uri: str) -> str:
    return f'<img class="plot" alt="{alt}" src="{uri}">'


def _probability_bars(probabilities: Sequence[float], kl_grade: int) -> str:
    top = kl_grade
    rows = []
    for grade, p in zip(KL_GRADES, probabilities, strict=True):
        rows.append(
            f'<div class="bar{" top" if grade == top else ""}"><span class="t">KL{grade}</span>'
            f'<div style="width:{max(1, round(140 * p))}px"></div><span class="v">{100 * p:.1f}%</span></div>'
        )
    return "".join(rows)


def _read_gray(path: Path) -> np.ndarray | None:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if path.is_file() else None


def _thumbnail(record: ImageRecord, out_dir: Path, size: int) -> tuple[np.ndarray | None, float]:
    """The saved thumbnail, or (for runs without one) a fresh decode of the file."""
    scale = record.get("thumbnail_scale")
    if record.get("thumbnail") and scale is not None:
        pixels = _read_gray(out_dir / record["thumbnail"])
        if pixels is not None:
            return pixels, scale
    original_size = record.get("original_size")
    if original_size is None:
        return None, 1.0
    from kneepipe.imaging import ImageReadError, read_radiograph

    try:
        radiograph = read_radiograph(record["path"], max_side=max(size, 32))
    except ImageReadError:
        return None, 1.0
    return radiograph.pixels, radiograph.pixels.shape[1] / original_size[0]


def _metric_table(metrics: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    graded = metrics["graded_only"]
    head = (
        "<table><tr><th class=l>metric</th><th>end to end<br><span class=small>(failures count as wrong)</span></th>"
        "<th>detected knees only</th></tr>"
    )
    rows = [
        ("labelled knees", metrics["labelled_knees"], graded["n"]),
        ("accuracy", metrics["accuracy"], graded["accuracy"]),
        ("quadratic weighted kappa", metrics["qwk"], graded["qwk"]),
        ("mean absolute error (grades)", metrics["mae"], graded["mae"]),
        ("expected calibration error", metrics["ece"], graded["ece"]),
    ]
    body = "".join(f"<tr><td class=l>{name}</td><td>{fmt(a)}</td><td>{fmt(b)}</td></tr>" for name, a, b in rows)
    counts = (
        f"<p>matched {metrics['matched']}, missed {metrics['missed']}, on the wrong side {metrics['misassigned']}; "
        f"labels without an input file {metrics['labels_without_image']}; detected joints without a label "
        f"{metrics['detections_without_label']}.</p>"
    )
    per_grade = "<table><tr><th class=l>grade</th><th>true</th><th>predicted</th><th>recall</th><th>precision</th>"
    per_grade += "<th>missed / wrong side</th></tr>"
    for g in KL_GRADES:
        per_grade += (
            f"<tr><td class=l>KL{g}</td><td>{metrics['true_counts'][g]}</td><td>{metrics['predicted_counts'][g]}</td>"
            f"<td>{fmt(metrics['recall'][g])}</td><td>{fmt(metrics['precision'][g])}</td>"
            f"<td>{metrics['failures_by_true_grade'][g]}</td></tr>"
        )
    per_grade += "</table>"
    policy = f'<p class="muted small">{html.escape(metrics["failure_policy"])}.</p>'
    return head + body + "</table>" + counts + per_grade + policy


def _group_table(groups: dict[str, dict[str, Any]], pattern: str) -> str:
    head = "".join(f"<th>KL{g}</th>" for g in KL_GRADES)
    rows = []
    for group, tally in groups.items():
        counts = tally["grade_counts"]
        total = max(1, sum(counts))
        cells = "".join(f"<td>{c} <span class=muted>({100 * c / total:.0f}%)</span></td>" for c in counts)
        refused = ", ".join(f"{k} {v}" for k, v in tally["refused"].items()) or "–"
        rows.append(
            f"<tr><td class=l>{html.escape(group)}</td><td>{tally['images']}</td><td>{tally['knees_graded']}</td>"
            f"{cells}<td class=l>{html.escape(refused)}</td></tr>"
        )
    return (
        f'<p class="muted small">Groups from the file names (pattern <code>{html.escape(pattern)}</code>); a group '
        "label comes from the image source, not from a per-knee KL grade.</p>"
        f"<table><tr><th class=l>group</th><th>images</th><th>knees</th>{head}<th class=l>refused</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def write_report(run: PipelineRun, pipeline_cfg: PipelineConfig, grader: Grader, configs: dict[str, Any]) -> Path:
    """Write ``report.html`` for a finished :class:`~kneepipe.pipeline.run.PipelineRun`.

    Args:
        run: the finished run (rows, images, summary, metrics).
        pipeline_cfg: the pipeline config (report options).
        grader: the loaded grader, for its version and preprocessing record (it is not run here;
            the heat maps are ``run.heat_maps``).
        configs: the resolved ``pipeline``/``detect``/``grade`` configs, shown at the end.

    >>> write_report(run, pipeline_cfg, grader, configs)  # doctest: +SKIP
    PosixPath('out/report.html')
    """
    out_dir = run.out_dir
    summary, metrics = run.summary, run.metrics
    truth_by_knee = {(o["image"], o["side"]): o for o in run.evaluation}
    parts: list[str] = []
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    refused = summary["refused"]
    parts.append(
        "<h1>Knee osteoarthritis: Kellgren-Lawrence grades</h1>"
        f'<p class="muted">{html.escape(str(summary.get("input", "")))} · created {created} · kneepipe {__version__}. '
        "Automatic grades from radiographs, for research and as a second reader; they are not a diagnosis.</p>"
    )
    stats = [
        ("radiographs", summary["images"]),
        ("read", summary["images_read"]),
        ("knees graded", summary["knees_graded"]),
        ("refused", sum(refused.values())),
        ("knees to review", summary.get("knees_needing_review", 0)),
    ]
    if metrics:
        stats.append(("accuracy (end to end)", f"{100 * (metrics['accuracy'] or 0):.1f}%"))
        stats.append(("QWK", metrics["qwk"]))
    shift = summary.get("shift") or {}
    if shift.get("shift_score") is not None:
        stats.append(("shift score", f"{shift['shift_score']:.2f}"))
    parts.append(
        '<div class="cards">'
        + "".join(f'<div class="stat"><b>{html.escape(str(v))}</b>{html.escape(k)}</div>' for k, v in stats)
        + "</div>"
    )
    if shift.get("shift_warning"):
        parts.append(f'<p class="warn" id="shift-warning"><b>Warning:</b> {html.escape(shift["shift_note"])}.</p>')

    # The batch.
    parts.append("<h2>The batch</h2>")
    true_counts = metrics["true_counts"] if metrics else None
    groups = summary.get("groups") or {}
    plots = [_plot_img("grade distribution", grade_distribution_plot(summary["grade_counts"], true_counts))]
    if metrics:
        plots.append(_plot_img("confusion matrix", confusion_plot(metrics)))
    if groups:
        plots.append(_plot_img("grade distribution per group", group_distribution_plot(groups)))
    parts.append(f'<div class="plots">{"".join(plots)}</div>')
    if metrics:
        parts.append("<h3>Agreement with the labels</h3>" + _metric_table(metrics))
    if groups:
        parts.append("<h3>Predicted grades per group</h3>" + _group_table(groups, summary.get("group_pattern", "")))

    # Refused files.
    parts.append(f"<h2>Refused files ({len(summary['refused_files'])})</h2>")
    if summary["refused_files"]:
        rows = "".join(
            f"<tr><td class=l>{html.escape(r['image'])}</td>"
            f"<td class=l>{html.escape(STATUS_TEXT.get(r['status'], r['status']))}</td>"
            f"<td class=l>{html.escape(r['message'] or '')}</td></tr>"
            for r in summary["refused_files"]
        )
        header = "<tr><th class=l>file</th><th class=l>outcome</th><th class=l>reason</th></tr>"
        parts.append(f"<table>{header}{rows}</table>")
    else:
        parts.append("<p>Every file was graded.</p>")

    # Each radiograph.
    shown = [record for record in run.images.values() if record["knees"]]
    limit = pipeline_cfg.report_max_radiographs
    parts.append(
        f"<h2>Radiographs ({min(len(shown), limit)} of {len(shown)} with knees)</h2>"
        "<p class=\"muted small\">Boxes: right knee blue, left knee amber; the patient's right knee is on the image's "
        "left on an AP view. Heat map: Grad-CAM of the grade given (red = what drove it most). "
        f"Grade from the probabilities by the {html.escape(grader.preprocessing.decision)} "
        "rule (see Models and configuration); its bar is red. Knees marked "
        "<span class=review-badge>needs review</span> rest on something doubtful (the reason is given): "
        "check them before trusting their grade.</p>"
    )
    for record in shown[:limit]:
        thumbnail, scale = _thumbnail(record, out_dir, pipeline_cfg.thumbnail_size or 640)
        name = html.escape(record["image"])
        width, height = record["original_size"] or ("?", "?")
        section = [f'<div class="radiograph"><h3>{name}</h3><div class="film">']
        if thumbnail is not None:
            drawn = data_uri(annotated_thumbnail(thumbnail, scale, record["knees"]))
            section.append(
                f'<figure><img alt="{name}" src="{drawn}">'
                f'<figcaption class="muted small">{width}x{height} px</figcaption></figure>'
            )
        section.append("<div>")
        for knee in record["knees"]:
            heat = run.heat_maps.get(knee["crop"]) if knee.get("crop") else None
            section.append(_knee_html(record, knee, out_dir, heat, truth_by_knee))
        section.append("</div></div></div>")
        parts.append("".join(section))
    if len(shown) > limit:
        parts.append(f"<p class=muted>{len(shown) - limit} more radiographs are in results.csv only.</p>")

    # Models and configuration.
    parts.append("<h2>Models and configuration</h2>")
    preprocessing = grader.preprocessing
    train_prior = str([round(float(p), 3) for p in preprocessing.train_prior])
    adaptation = _prior_text(summary.get("priors", {}))
    detect_settings = _settings(configs, "detect", DETECT_SHOWN)
    parts.append(
        "<table>"
        f"<tr><td class=l>detector</td><td class=l>{html.escape(summary['detector'])}</td></tr>"
        f"<tr><td class=l>grader</td><td class=l>{html.escape(grader.version)} (input {preprocessing.input_size} px, "
        f"{html.escape(preprocessing.head)} head, temperature {preprocessing.temperature:.3f})"
        f"{html.escape(_site_text(preprocessing))}</td></tr>"
        f"<tr><td class=l>grader runtime</td><td class=l>{html.escape(grader.runtime)}"
        f"{html.escape(f'; {grader.runtime_note}' if grader.runtime_note else '')}</td></tr>"
        f"<tr><td class=l>shift score</td><td class=l>{html.escape(_shift_text(shift))}</td></tr>"
        f"<tr><td class=l>training grade prior</td><td class=l>{html.escape(train_prior)}</td></tr>"
        f"<tr><td class=l>prior adaptation</td><td class=l>{html.escape(adaptation)}</td></tr>"
        f"<tr><td class=l>decision rule</td><td class=l>{html.escape(_decision_text(preprocessing))}</td></tr>"
        f"<tr><td class=l>detection settings</td><td class=l>{html.escape(detect_settings)}</td></tr>"
        "</table>"
    )
    parts.append(
        "<details><summary>Full configuration (args.yaml)</summary>"
        f"<pre>{html.escape(yaml.safe_dump(configs, sort_keys=False))}</pre></details>"
    )

    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>kneepipe report</title><style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
    path = out_dir / "report.html"
    return write_atomic(path, page)


def _site_text(preprocessing) -> str:
    site = preprocessing.extra.get("site")
    if not site:
        return ""
    after = site["cross_validation"]["after"]
    return (
        f"; a site grader fitted by kneepipe adapt from {site['base_grader']} on {site['sample']['n']} knees of "
        f"the site (cross-validated accuracy {after['accuracy']}, QWK {after['qwk']})"
    )


def _shift_text(shift: dict[str, Any]) -> str:
    if not shift:
        return "not computed"
    if shift.get("shift_score") is None:
        return shift.get("shift_note", "not computed")
    verdict = "unlike the grader's training images" if shift["shift_warning"] else "like the grader's training images"
    return (
        f"{shift['shift_score']:.2f} over {shift.get('shift_knees', '?')} knees (warns above "
        f"{shift['shift_warn_above']}): {verdict}; batch-norm statistics {shift.get('batch_norm', 'as trained')}"
    )


def _decision_text(preprocessing) -> str:
    if preprocessing.decision == "median":
        return "median: the grade at which the cumulative probability passes 50% (respects the ordinal scale)"
    return "argmax: the most probable grade"


def _settings(configs: dict[str, Any], stage: str, keys: Sequence[str]) -> str:
    values = configs.get(stage, {})
    return ", ".join(f"{key} {values[key]}" for key in keys if key in values)


def _prior_text(priors: dict[str, Any]) -> str:
    return prior_summary(priors) or "none (the grader's training prior)"


def _knee_html(record, knee, out_dir: Path, heat: np.ndarray | str | None, truth_by_knee) -> str:
    """One knee: its crop, its heat map (or why there is none), grade, probabilities and label."""
    crop = _read_gray(out_dir / knee["crop"]) if knee.get("crop") else None
    images = []
    if crop is not None:
        images.append(f'<figure><img alt="crop" src="{data_uri(crop)}"><figcaption>crop</figcaption></figure>')
        if isinstance(heat, str):
            images.append(f'<div class="muted small">{html.escape(heat)}</div>')
        elif heat is not None and heat.shape == crop.shape:
            overlay = data_uri(gradcam_overlay(crop, heat))
            images.append(f'<figure><img alt="Grad-CAM" src="{overlay}"><figcaption>Grad-CAM</figcaption></figure>')
    else:
        images.append('<div class="muted small" style="width:150px">crop not saved</div>')
    side = "right" if knee["side"] == "R" else "left"
    lines = [f"<div>{side} knee · detector confidence {knee['det_confidence']:.2f}</div>"]
    if knee["status"] == STATUS_OK:
        lines.insert(0, f'<div class="grade">KL {knee["kl_grade"]}</div>')
        lines.append(_probability_bars(knee["probabilities"], int(knee["kl_grade"])))
    else:
        lines.insert(0, '<div class="grade refused">not graded</div>')
    truth = truth_by_knee.get((record["image"], knee["side"]))
    if truth is not None:
        lines.append(f"<div>labelled KL {truth['true_grade']} ({truth['outcome']})</div>")
    if knee.get("message"):
        lines.append(f'<div class="warn small">{html.escape(knee["message"])}</div>')
    review = ""
    if knee.get("needs_review"):
        review = " review"
        reason = html.escape(knee.get("review_reason", ""))
        lines.insert(1, f'<div><span class="review-badge">needs review</span> <span class="warn">{reason}</span></div>')
    return f'<div class="knee{review}">{"".join(images)}<div>{"".join(lines)}</div></div>'
