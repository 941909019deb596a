"""``kneepipe serve``: resolve the four configs, build the server, print where it listens, run it.

Only typer loads at import time; FastAPI, uvicorn and the models load when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kneepipe.cli_common import (
    EXIT_CONFIG,
    ConfigOption,
    OverridesArgument,
    VerboseOption,
    console,
    fail,
    resolve_config,
    route_overrides,
)


def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (default 127.0.0.1); any other needs a token.")
    ] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Data folder: every run is kept here and reopened after a restart.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="KNEEPIPE_TOKEN", help="Access token, checked on every request (required off loopback)."),
    ] = None,
    graders: Annotated[
        Path | None, typer.Option(help="Folder of site grader files (.npz) offered beside the shipped one.")
    ] = None,
    config: ConfigOption = None,
    verbose: VerboseOption = False,
    overrides: OverridesArgument = None,
) -> None:
    """Serve the web page: upload radiographs, see and correct their grades, download results.csv and the report.

    Overrides: serve keys as key=value; the pipeline's and the stages' keys prefixed, e.g.
    pipeline.batch=4 detect.conf=0.3 grade.precision=bfloat16.
    """
    from kneepipe.runtime import set_verbosity

    set_verbosity(verbose)
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.pipeline.config import PipelineConfig
    from kneepipe.serve.config import ServeConfig

    routed = route_overrides(overrides, "serve")
    folders = {"data": str(data) if data else None, "graders": str(graders) if graders else None}
    options = {"host": host, "port": port, **folders}
    serve_cfg = resolve_config(ServeConfig, config, routed["serve"], options)
    pipeline_cfg = resolve_config(PipelineConfig, None, routed["pipeline"], prefix="pipeline.")
    detect_cfg = resolve_config(DetectConfig, None, routed["detect"], prefix="detect.")
    grade_cfg = resolve_config(GradeConfig, None, routed["grade"], prefix="grade.")

    from kneepipe.serve.server import TokenRequiredError, build_server, serve_forever

    try:
        server = build_server(serve_cfg, pipeline_cfg, detect_cfg, grade_cfg, token=token)
    except TokenRequiredError as err:
        fail(str(err), EXIT_CONFIG)
    except OSError as err:
        fail(f"cannot use the data folder {serve_cfg.data}: {err.strerror or err}")
    address = f"http://{serve_cfg.host}:{serve_cfg.port}/"
    console.print(f"[bold]kneepipe serve[/]: runs kept in {server.store.data_dir}", highlight=False)
    if server.token:
        console.print(
            f"an access token is required on every request: open {address}?token=<your token> once in the browser, "
            "or send 'Authorization: Bearer <your token>'",
            highlight=False,
        )
    else:
        console.print(f"listening on this machine only, no token needed: open {address}", highlight=False)
    console.print(f"API documentation: {address}docs", highlight=False)
    console.print("the models load in the background; Ctrl-C stops the server", highlight=False)
    serve_forever(server)
