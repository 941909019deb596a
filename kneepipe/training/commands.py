"""``kneepipe train ...``, ``evaluate detector`` and ``export detector``: parse, call the library, print.

Only typer loads at import time; the trainers, their frameworks and the training-only
packages (the ``[train]`` extra) load when a command runs.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from kneepipe.cli_common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    ConfigOption,
    OverridesArgument,
    VerboseOption,
    console,
    fail,
    resolve_config,
)

OutOption = Annotated[Path, typer.Option("--out", "-o", help="Run folder (created; resumed where the trainer can).")]
DataOption = Annotated[
    str | None, typer.Option(help="Folder with train/ and val/ crops by grade (the grade config's `data`).")
]


class Backend(StrEnum):
    """Where ``kneepipe train grader`` trains: Keras on the CPU, or Keras on torch with the crops on a GPU."""

    cpu = "cpu"
    torch = "torch"


def train_detector(
    out: OutOption,
    overrides: OverridesArgument = None,
    config: ConfigOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in OUT.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
) -> None:
    """Train the knee-joint detector on composites of the OAI crops (offline, CPU).

    Name the crops with train_crops=DIR (and, for background films, train_radiographs=DIR
    train_annotations=CSV).
    """
    from kneepipe.detect.config import DetectConfig

    cfg = resolve_config(DetectConfig, config, overrides, {"train_epochs": epochs})
    from kneepipe.training.detector import train_detector as train

    try:
        best = train(cfg, out, resume=resume)
    except FileNotFoundError as err:
        fail(str(err), EXIT_FAILED)
    console.print(f"trained detector: {best}")


def train_grader(
    out: OutOption,
    data: DataOption = None,
    backend: Annotated[
        Backend, typer.Option(help="cpu: Keras with albumentations; torch: Keras on torch, crops on a GPU (--pack).")
    ] = Backend.cpu,
    pack: Annotated[
        Path | None, typer.Option(help="--backend torch: the crop pack to train from (`kneepipe train pack`).")
    ] = None,
    minutes: Annotated[
        float | None, typer.Option(help="--backend torch: wall-clock budget in minutes, loading included.", min=0)
    ] = None,
    soup: Annotated[int, typer.Option(help="--backend torch: average the weights of this many final epochs.")] = 4,
    max_epochs: Annotated[int, typer.Option(help="--backend torch: most epochs, whatever the budget.")] = 200,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Refuse to resume; fail if the run folder holds a run.")
    ] = False,
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Train the Xception KL grader; one recipe on either backend, selected or kept on val QWK.

    On the CPU (default) the run resumes when interrupted, and best.npz is calibrated on val.
    With --backend torch --pack P --minutes M it trains for a wall-clock budget and writes
    grader.npz (calibrate it with `kneepipe train calibrate`).
    """
    from kneepipe.grade.config import GradeConfig

    cfg = resolve_config(GradeConfig, config, overrides, {"data": data})
    if backend is Backend.torch:
        if pack is None or minutes is None:
            fail("--backend torch needs --pack (a crop pack) and --minutes (the budget)", EXIT_CONFIG)
        from kneepipe.training.grader_torch import train_on_gpu

        try:
            result = train_on_gpu(cfg, pack, out, minutes, soup, max_epochs)
        except ValueError as err:
            fail(str(err), EXIT_CONFIG)
        except (FileNotFoundError, FileExistsError, RuntimeError) as err:
            fail(str(err))
        console.print(f"kept {result['kept']} after {result['epochs']} epochs: val QWK {result['qwk']} -> {out}")
        return
    if pack is not None or minutes is not None:
        fail("--pack and --minutes are options of --backend torch", EXIT_CONFIG)
    from kneepipe.training.calibrate import calibrate_grader
    from kneepipe.training.grader import train_grader as run_training

    try:
        best = run_training(cfg, out, resume=not fresh)
        temperature = calibrate_grader(out / "best.npz", cfg)
    except (FileNotFoundError, FileExistsError) as err:
        fail(str(err))
    console.print(
        f"best: epoch {best.get('epoch')} val QWK {best.get('val_qwk')}; temperature {temperature:.3f} "
        f"fitted on val -> {out / 'best.npz'}"
    )


def pack_crops(
    root: Annotated[Path, typer.Argument(help="A folder with train/ and val/ crops by grade.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The crop pack to write (.npz).")],
    quality: Annotated[
        int | None, typer.Option(help="JPEG quality 1-100; default lossless PNG.", min=1, max=100)
    ] = None,
) -> None:
    """Encode labelled train/ and val/ crops into one crop pack, to train on a machine without the folders."""
    from kneepipe.training.grader_torch import pack_crops as write_pack

    try:
        counts = write_pack(root, out, quality)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    console.print(f"{out}: {counts}, {out.stat().st_size / 1e6:.1f} MB")


def average_graders(
    graders: Annotated[list[Path], typer.Argument(help="Two or more grader files (.npz) of one architecture.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The averaged grader file to write (.npz).")],
    data: DataOption = None,
    config: ConfigOption = None,
) -> None:
    """Average the weights of fine-tuned graders (a model soup), then calibrate the result on val."""
    from kneepipe.grade.config import GradeConfig
    from kneepipe.grade.model import average_graders as write_average
    from kneepipe.training.calibrate import calibrate_grader

    cfg = resolve_config(GradeConfig, config, None, {"data": data})
    try:
        write_average(graders, out)
        temperature = calibrate_grader(out, cfg)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    console.print(f"averaged {len(graders)} graders; temperature {temperature:.3f} fitted on val -> {out}")


def calibrate_grader(
    grader: Annotated[Path, typer.Argument(help="A grader file (.npz), e.g. one trained elsewhere.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The calibrated grader file to write (.npz).")],
    data: DataOption = None,
    config: ConfigOption = None,
) -> None:
    """Fit a grader's temperature, grade biases and decision rule on val; write a calibrated copy."""
    from kneepipe.files import write_atomic
    from kneepipe.grade.config import GradeConfig
    from kneepipe.grade.model import read_preprocessing
    from kneepipe.training.calibrate import calibrate_grader as calibrate

    cfg = resolve_config(GradeConfig, config, None, {"data": data})
    if grader.resolve() == out.resolve():
        fail(f"{out}: write the calibrated copy beside {grader}, not over it")
    try:
        read_preprocessing(grader)
    except (OSError, ValueError, KeyError) as err:
        fail(f"{grader}: not a kneepipe grader file ({err})")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, grader.read_bytes())
    try:
        temperature = calibrate(out, cfg)
    except (FileNotFoundError, ValueError) as err:
        out.unlink(missing_ok=True)
        fail(str(err))
    console.print(f"temperature {temperature:.3f} and grade biases fitted on val -> {out}")


def evaluate_detector(
    radiographs: Annotated[Path, typer.Option(help="Folder of the annotated real radiographs.")],
    annotations: Annotated[Path, typer.Option(help="Their annotation CSV (image,kind,side,x1,y1,x2,y2).")],
    crops: Annotated[
        Path | None, typer.Option(help="Val crops by grade to compose test films from; omit to skip composites.")
    ] = None,
    composites: Annotated[int, typer.Option(help="Composites built from --crops.", min=1)] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the composites.")] = 2024,
    model: Annotated[Path | None, typer.Option("--model", help="Detector weights; default: the shipped one.")] = None,
    per_image: Annotated[bool, typer.Option("--per-image", help="Include each radiograph's record.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Measure the detector (the model card's figures): recall and side accuracy on real films and composites.

    Prints JSON with the detector's version, the annotated-radiograph measure and, with
    --crops, the measure on fresh composites of those crops.
    """
    from kneepipe.config import load_config
    from kneepipe.detect.config import DetectConfig
    from kneepipe.detect.evaluate import evaluate_radiographs
    from kneepipe.detect.predict import JointDetector

    for path in (radiographs, annotations, crops):
        if path is not None and not path.exists():
            fail(f"{path}: no such file or folder")
    detector = JointDetector.load(load_config(DetectConfig, overrides={"model": str(model)} if model else None))
    real = evaluate_radiographs(detector, radiographs, annotations)
    if not per_image:
        real.pop("per_image")
    figures = {"detector": detector.version, "radiographs": real}
    if crops is not None:
        from kneepipe.training.detector import evaluate_composites

        figures["val_composites"] = evaluate_composites(detector, crops, count=composites, seed=seed)
    text = json.dumps(figures, indent=2)
    if out is not None:
        from kneepipe.files import write_atomic

        write_atomic(out, text + "\n")
    typer.echo(text)


def reference_statistics(
    train: Annotated[Path, typer.Option("--train", help="The grader's training crops, in folders 0/ .. 4/.")],
    grader: Annotated[
        Path | None, typer.Argument(help="A grader file (.npz); default: the shipped one.", show_default=False)
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Default (where grading looks): G.reference.npz")
    ] = None,
) -> None:
    """Store a grader's feature statistics on its training crops, against which the shift score measures a batch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from kneepipe.files import file_digest
    from kneepipe.grade.data import labelled_files, load_crops
    from kneepipe.grade.predict import Grader
    from kneepipe.grade.shift import fit_reference, reference_path, write_reference

    paths, grades = labelled_files(train)
    if not paths:
        fail(f"{train}: no crops in folders 0/ .. 4/")
    loaded = Grader.load(grader)
    crops = load_crops(paths, grades).crops
    with Progress("features", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("features", total=len(crops))
        source = f"{train.name}: {len(crops)} crops"
        reference = fit_reference(loaded, crops, source, progress=lambda done, _: bar.update(task, completed=done))
    written = write_reference(reference, out or reference_path(loaded.path), file_digest(loaded.path))
    console.print(f"statistics of {len(crops)} training crops for {loaded.version} -> {written}")


def train_side(
    data: Annotated[Path, typer.Option("--data", help="OAI crops: train/ and val/ of <kl_grade>/<patient><L|R>.png.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Default: the shipped kneepipe/weights/side.npz.")
    ] = None,
) -> None:
    """Fit the anatomy side classifier on the train crops and measure it on val (seconds, CPU)."""
    from kneepipe.detect.side import DEFAULT_SIDE_WEIGHTS, train_side_classifier

    target = out or DEFAULT_SIDE_WEIGHTS
    try:
        metrics = train_side_classifier(data, target)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err), EXIT_FAILED)
    console.print(
        f"side classifier -> {target}: train accuracy {metrics['train_accuracy']:.4f} "
        f"({metrics['train_crops']} crops), val accuracy {metrics['val_accuracy']:.4f} ({metrics['val_crops']} crops)"
    )


def train_view(
    radiographs: Annotated[Path, typer.Option(help="Folder of the annotated real radiographs.")],
    annotations: Annotated[Path, typer.Option(help="Their annotation CSV (image,kind,...): kinds name the views.")],
    crops: Annotated[
        Path | None, typer.Option(help="OAI crops by grade (a train split) for AP composites and knee crops.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Default: the shipped kneepipe/weights/view.npz.")
    ] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Detector weights; default: the shipped one.")] = None,
    copies: Annotated[
        int | None, typer.Option(help="Augmented copies per real film; default: the recipe's (ViewRecipe).", min=1)
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the augmentation and the composites.")] = 0,
    measure: Annotated[
        bool, typer.Option("--measure/--no-measure", help="Measure leave-one-film-out before fitting on all.")
    ] = True,
) -> None:
    """Fit the view classifier (AP, lateral, no knee) on the detector backbone; measure it leave-one-film-out.

    Writes the classifier (KB-sized) and a JSON report beside it with each real film's
    held-out probabilities (minutes, CPU).
    """
    from kneepipe.detect.predict import DEFAULT_WEIGHTS
    from kneepipe.detect.quality import DEFAULT_VIEW_MODEL
    from kneepipe.training.view import ViewRecipe
    from kneepipe.training.view import train_view as fit

    for path in (radiographs, annotations, crops, model):
        if path is not None and not path.exists():
            fail(f"{path}: no such file or folder")
    target = out or DEFAULT_VIEW_MODEL
    try:
        report = fit(
            radiographs,
            annotations,
            crops,
            target,
            model or DEFAULT_WEIGHTS,
            ViewRecipe(seed=seed) if copies is None else ViewRecipe(copies=copies, seed=seed),
            measure=measure,
        )
    except (FileNotFoundError, ValueError) as err:
        fail(str(err), EXIT_FAILED)
    console.print(f"view classifier -> {target} ({report['examples']}); report {target.with_suffix('.json')}")
    for view, figures in report.get("leave_one_film_out", {}).items():
        if isinstance(figures, dict):
            console.print(f"leave one film out, {view}: {figures['named_lateral']}/{figures['films']} named lateral")


def export_detector(
    model: Annotated[
        Path | None, typer.Option("--model", help="Detector weights (.pt); default: the shipped ones.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="Compiled format: openvino or onnx.")] = "openvino",
    imgsz: Annotated[
        int | None,
        typer.Option(help="Inference size to trace at (default: detect.imgsz); an onnx graph takes any size."),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Training crops <grade>/<crop>.png: quantise to INT8, calibrated on films made of them."),
    ] = None,
    films: Annotated[int, typer.Option(help="Calibration pseudo-radiographs composed from --calibration.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the calibration films.")] = 0,
    verbose: VerboseOption = False,
) -> None:
    """Compile the detector beside its weights; `detect.runtime=openvino` (or `onnx`) runs it.

    With --calibration the OpenVINO network is quantised to INT8 (`detect.runtime=openvino-int8`).
    A record of the weights' digest and the compiled files' checksums ties them; the .pt file
    stays the reference (`detect.runtime=torch`).
    """
    from kneepipe.runtime import native_logs_hidden, prepare_frameworks, set_verbosity

    set_verbosity(verbose)
    from kneepipe.detect.compiled import FORMATS

    if fmt not in FORMATS:
        fail(f"format {fmt!r}: the detector exports to {' or '.join(FORMATS)}")
    if calibration is not None and fmt != "openvino":
        fail(f"format {fmt!r}: INT8 (--calibration) is compiled for openvino only")
    if imgsz is None:
        from kneepipe.config import load_config
        from kneepipe.detect.config import DetectConfig

        imgsz = load_config(DetectConfig).imgsz
    prepare_frameworks()
    from kneepipe.detect.compiled import compiled_paths, export_detector
    from kneepipe.training.quantise import export_int8_detector

    try:
        with native_logs_hidden():
            if calibration is None:
                compiled = export_detector(model, imgsz, fmt)
            else:
                compiled = export_int8_detector(model, calibration, imgsz, films, seed)
    except (OSError, ValueError) as err:
        fail(f"cannot export the detector: {err}")
    files = [compiled] if compiled.is_file() else sorted(compiled.iterdir())
    size = sum(path.stat().st_size for path in files) / 1e6
    from kneepipe.detect.predict import DEFAULT_WEIGHTS

    record = compiled_paths(model or DEFAULT_WEIGHTS, fmt, calibration is not None)[1]
    console.print(f"wrote {escape(str(compiled))} ({size:.1f} MB) and its record {record.name}")
