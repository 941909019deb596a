"""Put the page together: configs, run store, worker and app; and run it with uvicorn.

>>> from kneepipe.config import load_config
>>> server = build_server(load_config(ServeConfig), ...)  # doctest: +SKIP
>>> server.worker.start(); uvicorn.run(server.app)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from kneepipe.serve.app import create_app, is_loopback
from kneepipe.serve.config import ServeConfig
from kneepipe.serve.store import RunStore
from kneepipe.serve.worker import Models, Worker, pipeline_process

TOKEN_ENV = "KNEEPIPE_TOKEN"


class TokenRequiredError(ValueError):
    """The server would listen beyond this machine without an access token."""


@dataclass
class Server:
    """A built server: the ASGI app, its worker (not yet started) and where it keeps its runs."""

    app: FastAPI
    worker: Worker
    store: RunStore
    config: ServeConfig
    token: str | None


def build_server(serve_cfg: ServeConfig, pipeline_cfg, detect_cfg, grade_cfg, token: str | None = None) -> Server:
    """The app and its worker; the models load in the worker thread once it is started.

    Raises:
        TokenRequiredError: ``serve_cfg.host`` is not a loopback address and no token is given.
    """
    token = token or None
    if not is_loopback(serve_cfg.host) and token is None:
        raise TokenRequiredError(
            f"binding to {serve_cfg.host} lets other machines reach the page: give an access token "
            f"(--token or the {TOKEN_ENV} environment variable), or bind to 127.0.0.1"
        )
    store = RunStore(serve_cfg.data)
    models = Models(detect_cfg, grade_cfg)
    worker = Worker(store, pipeline_process(models, pipeline_cfg, serve_cfg), load=models.load)
    app = create_app(serve_cfg, store, worker, token)
    return Server(app, worker, store, serve_cfg, token)


def serve_forever(server: Server) -> None:
    """Start the worker and answer requests until interrupted.

    A run interrupted by the stop continues where it stopped at the next start (the pipeline's journal).
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    keep_temporary_files_in(server.store)
    server.worker.start()
    try:
        uvicorn.run(server.app, host=server.config.host, port=server.config.port, log_level="warning")
    finally:
        server.worker.stop()


def keep_temporary_files_in(store: RunStore) -> Path:
    """Make the process's temporary files (large uploads spooled while they arrive) go to ``<data>/tmp``.

    So an upload is written under the data folder only, from its first byte; what an earlier
    server left there is removed.
    """
    import shutil
    import tempfile

    folder = store.data_dir / "tmp"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tempfile.tempdir = str(folder)
    return folder
