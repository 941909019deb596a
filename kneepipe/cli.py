"""The ``kneepipe`` command line: a thin layer over the library.

Each command parses its arguments, resolves its stage config, calls one library
function and prints a summary. The command functions live beside their stage
(``kneepipe/<stage>/commands.py``) and import their framework only when they run, so
``kneepipe --help`` loads neither torch nor TensorFlow.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from kneepipe import __version__
from kneepipe.audit import commands as audit_commands
from kneepipe.cli_common import EXIT_CONFIG, EXIT_CRASH, ConfigOption, OverridesArgument, console, fail, resolve_config
from kneepipe.detect import commands as detect_commands
from kneepipe.dicom import commands as dicom_commands
from kneepipe.grade import commands as grade_commands
from kneepipe.pipeline import commands as pipeline_commands
from kneepipe.serve import commands as serve_commands
from kneepipe.training import commands as training_commands


class _App(typer.Typer):
    """The Typer app; an unexpected exception ends with its traceback and exit code 70, never a bare 1."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception:
            import traceback

            traceback.print_exc()
            console.print(
                f"[bold red]kneepipe crashed[/] (exit {EXIT_CRASH}): a bug, not a problem with your files; "
                "please report it with the traceback above"
            )
            sys.exit(EXIT_CRASH)


app = _App(
    name="kneepipe",
    help="Kellgren-Lawrence grading of knee osteoarthritis on plain radiographs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train a stage: the joint detector or the KL grader.", no_args_is_help=True)
app.add_typer(train_app, name="train")
evaluate_app = typer.Typer(help="Measure a model for its card.", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")
export_app = typer.Typer(help="Compile a model for faster CPU inference.", no_args_is_help=True)
app.add_typer(export_app, name="export")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kneepipe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Kellgren-Lawrence grading of knee osteoarthritis on plain radiographs."""


STAGES = {
    "detect": "kneepipe.detect.config:DetectConfig",
    "grade": "kneepipe.grade.config:GradeConfig",
    "pipeline": "kneepipe.pipeline.config:PipelineConfig",
    "audit": "kneepipe.audit.config:AuditConfig",
    "serve": "kneepipe.serve.config:ServeConfig",
    "pacs": "kneepipe.dicom.config:PacsConfig",
}


@app.command("config")
def show_config(
    stage: Annotated[str, typer.Argument(help=f"The stage: {', '.join(STAGES)}.", show_default=False)],
    config: ConfigOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Print a stage's resolved config: its shipped defaults < --config FILE < key=value, every key commented.

    Keys that differ from the shipped default name it. The output is valid YAML, usable as a
    --config file.
    """
    import importlib

    from kneepipe.config import describe_config

    if stage not in STAGES:
        fail(f"unknown stage {stage!r}; one of {', '.join(STAGES)}", EXIT_CONFIG)
    module, name = STAGES[stage].split(":")
    config_cls = getattr(importlib.import_module(module), name)
    typer.echo(describe_config(resolve_config(config_cls, config, overrides)), nl=False)


app.command("detect")(detect_commands.detect)
app.command("grade")(grade_commands.grade)
app.command("adapt")(grade_commands.adapt)
app.command("run")(pipeline_commands.run)
app.command("audit")(audit_commands.audit)
app.command("split")(audit_commands.split)
app.command("serve")(serve_commands.serve)
app.command("listen")(dicom_commands.listen)
app.command("send")(dicom_commands.send)
train_app.command("detector")(training_commands.train_detector)
train_app.command("grader")(training_commands.train_grader)
export_app.command("grader")(grade_commands.export_grader)
export_app.command("detector")(training_commands.export_detector)
train_app.command("pack")(training_commands.pack_crops)
train_app.command("average")(training_commands.average_graders)
train_app.command("calibrate")(training_commands.calibrate_grader)
train_app.command("reference")(training_commands.reference_statistics)
train_app.command("side")(training_commands.train_side)
train_app.command("view")(training_commands.train_view)
evaluate_app.command("detector")(training_commands.evaluate_detector)
