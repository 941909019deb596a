"""The web page's HTTP layer (FastAPI): uploads in, runs queued, results, corrections and files out.

Everything here is bookkeeping around :mod:`kneepipe.serve.store` (what is kept) and
:mod:`kneepipe.serve.worker` (the models and the pipeline); no detection, grading or
report code lives here. The page (``static/``) and the API documentation (``/docs``,
``/redoc``) are served from the package, so nothing is fetched from another host.

>>> app = create_app(ServeConfig(...), RunStore("kneepipe-data"), worker)  # doctest: +SKIP
"""

from __future__ import annotations

import hmac
import logging
import shutil
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Body, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from kneepipe import __version__
from kneepipe.imaging import sniff_format
from kneepipe.serve.config import ServeConfig
from kneepipe.serve.store import RunStore, UnknownRunError
from kneepipe.serve.worker import GraderChoice, Worker

log = logging.getLogger("kneepipe.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
READABLE = ("PNG", "JPEG", "TIFF", "DICOM")
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
TOKEN_COOKIE = "kneepipe_token"
# The browser itself refuses anything the page might load from another host, or a script not served here.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Correction(BaseModel):
    """A reader's correction of one knee: kept beside the prediction, never over it."""

    image: str = Field(description="The radiograph's name, as the run lists it.")
    knee: int = Field(ge=0, description="The knee's position among the radiograph's rows (0 = first).")
    kl_grade: int | None = Field(default=None, ge=0, le=4, description="The corrected KL grade; null keeps it.")
    side: str | None = Field(default=None, pattern="^[RL]$", description="The corrected side, R or L; null keeps it.")
    note: str = Field(default="", max_length=2000, description="A free-text note.")


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server to this machine."""
    import ipaddress

    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(config: ServeConfig, store: RunStore, worker: Worker, token: str | None = None) -> FastAPI:
    """The FastAPI app of ``kneepipe serve`` over a run store and a started (or startable) worker.

    With a ``token``, every request must carry it (``Authorization: Bearer``, the
    ``kneepipe_token`` cookie the page sets, or ``?token=`` once in the page's address).
    Without one, only requests addressed to a loopback name are answered, so another
    site open in the same browser cannot reach the page through a rebound DNS name.
    """
    graders = GraderChoice(Path(config.graders) if config.graders else store.data_dir / "graders")
    app = FastAPIOffline(
        title="kneepipe",
        version=__version__,
        description=(
            "Kellgren-Lawrence grading of knee radiographs. Upload radiographs (`POST /api/runs`), poll the run "
            "(`GET /api/runs/{id}` until `status` is `done`), then fetch `results.csv` or `report.html`. "
            "Corrections (`PUT /api/runs/{id}/corrections`) are kept beside the predictions and exported in "
            "`results.csv`. Off loopback, send the token as `Authorization: Bearer <token>`."
        ),
        static_url="/docs-assets",
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(UploadLimit, max_bytes=config.max_upload_bytes)
    app.add_middleware(AccessGuard, token=token)

    @app.exception_handler(UnknownRunError)
    async def unknown_run(request: Request, err: UnknownRunError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'] if part != 'body')}: {problem['msg']}"
            for problem in err.errors()
        )
        return JSONResponse({"detail": f"the request was not understood: {problems}"}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        log.error("request %s %s failed", request.method, request.url.path, exc_info=err)
        return JSONResponse(
            {"detail": f"kneepipe could not answer this request ({type(err).__name__}); the server log says why"},
            status_code=500,
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store", **PAGE_HEADERS})

    @app.get("/api/status", summary="The server: version, model state, queue, limits and graders")
    async def status() -> dict[str, Any]:
        return {
            "version": __version__,
            "worker": worker.state,
            "message": worker.message,
            "queued": worker.queue.qsize(),
            "current": worker.current,
            "graders": graders.names(),
            "limits": {
                "max_file_mb": config.max_file_mb,
                "max_upload_mb": config.max_upload_mb,
                "max_files": config.max_files,
            },
        }

    @app.post("/api/runs", status_code=202, summary="Upload radiographs and queue them as one run")
    def upload(
        files: Annotated[list[UploadFile], File(description="Radiographs: PNG, JPEG, TIFF or DICOM.")],
        grader: Annotated[str, Form(description="`shipped`, or a grader file named by GET /api/status.")] = "shipped",
        prior: Annotated[str | None, Form(description="A known grade prior p0,p1,p2,p3,p4 (counts work too).")] = None,
    ) -> dict[str, Any]:
        """Each file is checked by its content, not its name; files that are not radiographs, or larger
        than the limit, are refused with the reason and the others graded. Returns the run (poll it)."""
        if worker.state == "failed":
            raise HTTPException(503, worker.message)
        try:
            grader_file = graders.path(grader)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        prior = (prior or "").strip() or None
        if prior:
            from kneepipe.grade.prior import parse_prior

            try:
                parse_prior(prior)
            except ValueError as err:
                raise HTTPException(400, str(err)) from None
        if len(files) > config.max_files:
            raise HTTPException(413, f"{len(files)} files in one upload; at most {config.max_files} are taken")
        run_id = store.create(grader or "shipped", prior, str(grader_file) if grader_file else None)
        try:
            accepted, refused = _store_uploads(store, run_id, files, config.max_file_bytes)
        except BaseException as err:  # a disk that fills up, a client that goes away: no half-made run is kept
            shutil.rmtree(store.folder(run_id), ignore_errors=True)
            if isinstance(err, OSError):
                raise HTTPException(507, f"the upload could not be stored: {err.strerror or err}") from None
            raise
        if not accepted:
            shutil.rmtree(store.folder(run_id))
            reasons = "; ".join(f"{r['original']}: {r['reason']}" for r in refused)
            raise HTTPException(400, f"no radiograph in this upload ({reasons})")
        store.update(run_id, files=accepted, refused=refused, progress={"done": 0, "total": len(accepted)})
        worker.submit(run_id)
        return run_view(run_id)

    @app.get("/api/runs", summary="Every kept run, newest first")
    def runs() -> list[dict[str, Any]]:
        return [
            {key: meta.get(key) for key in ("id", "created", "status", "message", "grader", "progress", "summary")}
            | {"files": len(meta["files"]), "refused": len(meta["refused"])}
            for meta in store.runs()
        ]

    def run_view(run_id: str) -> dict[str, Any]:
        meta = store.meta(run_id)
        folder = store.folder(run_id)
        meta["queue_position"] = worker.position(run_id)
        meta["films"] = _films(folder, meta)
        meta["corrections"] = store.corrections(run_id)
        meta["downloads"] = {
            "results": f"/api/runs/{run_id}/results.csv" if (folder / "out/results.csv").is_file() else None,
            "report": f"/api/runs/{run_id}/report.html" if (folder / "out/report.html").is_file() else None,
        }
        return meta

    @app.get("/api/runs/{run_id}", summary="One run: its state, each film's result and the corrections")
    def run(run_id: str) -> dict[str, Any]:
        return run_view(run_id)

    @app.put("/api/runs/{run_id}/corrections", summary="Correct a knee's grade or side, or add a note")
    def correct(run_id: str, correction: Annotated[Correction, Body()]) -> list[dict[str, Any]]:
        """Kept in the run folder beside the predictions (which never change) and exported in results.csv.
        A correction with no grade, side or note removes the earlier one."""
        meta = store.meta(run_id)
        if meta["status"] != "done":
            raise HTTPException(409, "a run can be corrected once it has finished")
        films = {film["image"]: film for film in _films(store.folder(run_id), meta)}
        film = films.get(correction.image)
        if film is None:
            raise HTTPException(404, f"no radiograph {correction.image!r} in run {run_id}")
        rows = max(1, len(film["knees"]))
        if correction.knee >= rows:
            raise HTTPException(404, f"{correction.image} has {rows} row(s); there is no knee {correction.knee}")
        knee = film["knees"][correction.knee] if film["knees"] else {}
        record = correction.model_dump() | {
            "note": correction.note.strip(),
            "predicted_kl_grade": knee.get("kl_grade"),
            "predicted_side": knee.get("side"),
        }
        return store.correct(run_id, record)

    @app.get("/api/runs/{run_id}/results.csv", summary="results.csv with the corrections in columns beside it")
    def results(run_id: str) -> Response:
        try:
            content = store.export_results(run_id)
        except FileNotFoundError as err:
            raise HTTPException(404, str(err)) from None
        return Response(
            content,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="kneepipe-{run_id}-results.csv"'},
        )

    @app.get("/api/runs/{run_id}/report.html", summary="The run's self-contained HTML report")
    def report(run_id: str) -> FileResponse:
        path = store.folder(run_id) / "out" / "report.html"
        if not path.is_file():
            raise HTTPException(404, "report.html is written when the run has finished (and report is on)")
        return FileResponse(
            path, media_type="text/html", filename=f"kneepipe-{run_id}-report.html", content_disposition_type="inline"
        )

    @app.get("/api/runs/{run_id}/files/{relative:path}", summary="A thumbnail, crop or heat map of a run")
    def run_file(run_id: str, relative: str) -> FileResponse:
        try:
            return FileResponse(store.file(run_id, relative))
        except FileNotFoundError:
            raise HTTPException(404, f"no file {relative!r} in run {run_id}") from None

    return app


def _store_uploads(
    store: RunStore, run_id: str, files: list[UploadFile], max_bytes: int
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Keep the uploads that are radiographs within the size limit; the others are refused with the reason."""
    accepted, refused = [], []
    for upload in files:
        original = upload.filename or "upload"
        reason = _refusal(upload, max_bytes)
        if reason is None:
            try:
                name, size = store.save_upload(run_id, original, upload.file, max_bytes)
                accepted.append({"name": name, "original": original, "bytes": size})
                continue
            except ValueError as err:
                reason = str(err)
        refused.append({"original": original, "reason": reason})
    return accepted, refused


def _refusal(upload: UploadFile, max_bytes: int) -> str | None:
    """Why an upload is not taken (size, or content that is no radiograph), or None."""
    if upload.size is not None and upload.size > max_bytes:
        return f"{upload.size / 1e6:.1f} MB, larger than the limit of {max_bytes / 1e6:g} MB"
    head = upload.file.read(1024)
    upload.file.seek(0)
    if not head:
        return "empty file"
    kind = sniff_format(head)
    if kind in READABLE:
        return None
    if kind:
        return f"a {kind} image, not a radiograph format kneepipe reads (PNG, JPEG, TIFF or DICOM)"
    return "not an image: its content is not PNG, JPEG, TIFF or DICOM (whatever its name says)"


def _films(folder: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Each accepted film's result: the finished run's views, or while it runs, each film's state so far."""
    import json

    views = folder / "views" / "views.json"
    if meta["status"] == "done" and views.is_file():
        return json.loads(views.read_text())
    from kneepipe.pipeline.state import JOURNAL, read_journal

    journal = folder / "out" / JOURNAL
    finished = read_journal(journal) if journal.is_file() else {}
    waiting = "failed" if meta["status"] == "failed" else ("grading" if meta["status"] == "running" else "queued")
    films = []
    for entry in meta["files"]:
        record = finished.get(entry["name"])
        state = ("graded, finishing the run" if record["status"] == "ok" else record["status"]) if record else waiting
        message = record["message"] if record else ""
        films.append({"image": entry["name"], "status": state, "message": message, "knees": []})
    return films


class AccessGuard:
    """Every request needs the token when one is set; without one, a loopback ``Host`` header."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.token is None:
            host = _host_name(headers.get("host", ""))
            if host not in LOOPBACK_NAMES:
                refused: Response = PlainTextResponse(
                    f"kneepipe answers only requests addressed to 127.0.0.1 or localhost, not {host or 'no host'}",
                    status_code=421,
                )
                return await refused(scope, receive, send)
            return await self.app(scope, receive, send)
        given = _bearer(headers.get("authorization", "")) or _cookie(headers.get("cookie", ""), TOKEN_COOKIE)
        from_query = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [None])[0]
        if from_query is not None and _same(from_query, self.token) and scope["method"] == "GET":
            # The address the server printed: set the cookie and drop the token from the address bar.
            redirect = RedirectResponse(scope["path"], status_code=303)
            redirect.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
            return await redirect(scope, receive, send)
        if given is None or not _same(given, self.token):
            reason = "a wrong token" if given is not None or from_query is not None else "no token"
            response = JSONResponse(
                {
                    "detail": f"this kneepipe server needs its access token, and the request carried {reason}: "
                    "open the address it printed at start-up (…/?token=…) or send 'Authorization: Bearer <token>'"
                },
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape"))


def _bearer(value: str) -> str | None:
    scheme, _, credentials = value.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def _cookie(value: str, name: str) -> str | None:
    from http.cookies import SimpleCookie

    cookies = SimpleCookie()
    try:
        cookies.load(value)
    except Exception:  # a malformed cookie header carries no token
        return None
    return cookies[name].value if name in cookies else None


class UploadLimit:
    """Stops a request body larger than ``max_bytes``: from its declared length, or while it arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        limit = f"larger than the upload limit of {self.max_bytes / 1e6:g} MB (max_upload_mb in the serve config)"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": f"the upload is {int(declared) / 1e6:.1f} MB, {limit}"}, 413)
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"the upload is {limit}")
            return message

        return await self.app(scope, counted, send)
