"""What every command shares: exit codes, the console, config resolution with a clear error.

Kept free of heavy imports: ``kneepipe --help`` loads this module.

Exit codes (the README's table is this one):

====  ==========================================================================================
0     every file got a result: graded, or not gradable with a reason (no knee, a lateral
      view, over-exposed), or skipped as no radiograph (a text file, a hidden file)
1     the command could not run: missing input, unreadable model, a bad labels file
2     bad configuration or usage, or an output folder holding something else
3     the batch finished, but some files could not be read or processed (``error`` rows)
4     ``kneepipe audit`` found leakage
5     ``--strict`` only: the batch finished, but some files were not graded (refused or skipped)
70    kneepipe crashed (a bug: please report it with the traceback)
====  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# Exit codes, so scripts can tell outcomes apart.
EXIT_OK = 0
EXIT_FAILED = 1  # the command could not run at all (missing input, unreadable model, ...)
EXIT_CONFIG = 2  # bad configuration or usage (Typer also uses 2 for usage errors)
EXIT_FILE_ERRORS = 3  # the batch finished, but some files could not be read or processed
EXIT_LEAKAGE = 4  # `kneepipe audit` found leakage
EXIT_STRICT_REFUSED = 5  # --strict: the batch finished, but some files were not graded
EXIT_CRASH = 70  # an unexpected error inside kneepipe (sysexits' EX_SOFTWARE)

# Statuses of a result row, by what they mean for the exit code.
ERROR_STATUSES = frozenset({"error"})
REFUSED_STATUSES = frozenset(
    {
        "no_knee",
        "not_gradable_view",
        "lateral_view",
        "overexposed",
        "underexposed",
        "knee_prosthesis",
        "partial",
        "rotated",
        "skipped",
    }
)

# emoji=False: a file name or a message holding ":x:" is printed as written, not as an emoji.
# soft_wrap=True: a message is one line, wrapped by the terminal if at all, so a path in it is never cut
# by a line break (logs stay greppable, paths stay copyable); progress bars still fit the terminal.
console = Console(stderr=True, emoji=False, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file overriding the stage's shipped defaults."),
]
OverridesArgument = Annotated[
    list[str] | None,
    typer.Argument(help="Config overrides as key=value (highest precedence).", show_default=False),
]
StrictOption = Annotated[
    bool,
    typer.Option(
        "--strict", help=f"Exit {EXIT_STRICT_REFUSED} when any file was not graded (no knee, lateral view, skipped)."
    ),
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show the frameworks' start-up logs and the decoders' warnings.")
]


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print an error in red and exit with ``code`` (the message is printed as written, never as markup)."""
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def batch_exit_code(statuses: Iterable[str], strict: bool = False, hidden_skipped: int = 0) -> int:
    """The exit code of a finished batch from its files' statuses (the same rule for detect, grade and run).

    ``error`` rows give :data:`EXIT_FILE_ERRORS`; otherwise, with ``strict``, a file not
    graded (refused or skipped; ``hidden_skipped`` of the skipped ones are hidden files,
    which never count) gives :data:`EXIT_STRICT_REFUSED`; otherwise :data:`EXIT_OK`.

    >>> batch_exit_code(["ok", "no_knee"]), batch_exit_code(["ok", "no_knee"], strict=True)
    (0, 5)
    >>> batch_exit_code(["ok", "error", "no_knee"], strict=True)
    3
    """
    statuses = list(statuses)
    if any(status in ERROR_STATUSES for status in statuses):
        return EXIT_FILE_ERRORS
    refused = sum(status in REFUSED_STATUSES for status in statuses) - hidden_skipped
    return EXIT_STRICT_REFUSED if strict and refused > 0 else EXIT_OK


def route_overrides(
    overrides: list[str] | None, own: str, stages: Iterable[str] = ("pipeline", "detect", "grade")
) -> dict[str, list[str]]:
    """Route ``key=value`` overrides: ``<stage>.key=value`` to that stage (prefix removed), bare ones to ``own``.

    >>> route_overrides(["port=9000", "detect.conf=0.3"], "serve")
    {'serve': ['port=9000'], 'pipeline': [], 'detect': ['conf=0.3'], 'grade': []}
    """
    others = [stage for stage in stages if stage != own]
    routed: dict[str, list[str]] = {own: [], **{stage: [] for stage in others}}
    for item in overrides or []:
        stage = next((stage for stage in others if item.startswith(f"{stage}.")), own)
        routed[stage].append(item if stage == own else item[len(stage) + 1 :])
    return routed


def resolve_config(
    config_cls: type,
    config_file: Path | None,
    overrides: list[str] | None,
    options: dict[str, Any] | None = None,
    prefix: str = "",
) -> Any:
    """Load a stage config; explicit ``--option`` values join the key=value overrides.

    Options given as ``None`` (not passed) are left to the lower layers. ``prefix`` (e.g.
    ``detect.``) is how the command line names the stage's keys; error messages use it.
    """
    from kneepipe.config import ConfigError, load_config, parse_overrides

    try:
        merged = parse_overrides(overrides, prefix=prefix)
        merged.update({k: v for k, v in (options or {}).items() if v is not None})
        return load_config(config_cls, config_file, merged, prefix=prefix)
    except ConfigError as err:
        fail(str(err), EXIT_CONFIG)
