"""What every command shares: exit codes, the console, config resolution with a clear error.

Kept free of heavy imports: ``kneepipe --help`` loads this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

# Exit codes, so scripts can tell outcomes apart.
EXIT_OK = 0
EXIT_FAILED = 1  # the command could not run at all (missing input, unreadable model, ...)
EXIT_CONFIG = 2  # bad configuration or usage (Typer also uses 2 for usage errors)
EXIT_SOME_REFUSED = 3  # the batch finished, but some input files were refused
EXIT_LEAKAGE = 4  # `kneepipe audit` found leakage

console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file overriding the stage's shipped defaults."),
]
OverridesArgument = Annotated[
    list[str] | None,
    typer.Argument(help="Config overrides as key=value (highest precedence).", show_default=False),
]


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print an error in red and exit with ``code``."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def resolve_config(
    config_cls: type, config_file: Path | None, overrides: list[str] | None, options: dict[str, Any] | None = None
) -> Any:
    """Load a stage config; explicit ``--option`` values join the key=value overrides.

    Options given as ``None`` (not passed) are left to the lower layers.
    """
    from kneepipe.config import ConfigError, load_config, parse_overrides

    try:
        merged = parse_overrides(overrides)
        merged.update({k: v for k, v in (options or {}).items() if v is not None})
        return load_config(config_cls, config_file, merged)
    except ConfigError as err:
        fail(str(err), EXIT_CONFIG)
