"""``kneepipe serve``: the pipeline behind a web page and a documented HTTP API.

:mod:`~kneepipe.serve.store` keeps the runs under a data folder, :mod:`~kneepipe.serve.worker`
holds the models and feeds queued runs to the pipeline, :mod:`~kneepipe.serve.app` is the
FastAPI layer, and :func:`~kneepipe.serve.server.build_server` puts them together.
"""
