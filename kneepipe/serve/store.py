"""Where the web page keeps its runs: one folder per run under ``<data>/runs``, reopened after a restart.

A run folder holds what was uploaded, the pipeline's own run folder and the page's
additions, each written whole (through a renamed temporary file)::

    <data>/runs/<run id>/
        run.json            what was asked (grader, prior), the files taken and refused, the state
        inputs/             the uploaded radiographs, under safe names
        out/                the pipeline's run folder (results.csv, report.html, crops, journal ...)
        views/              what the page shows beside it: views.json, Grad-CAM overlays
        corrections.json    a reader's corrected grades and sides, and notes, beside the predictions

Names never come from the request as paths: a run id is made here and checked against its
pattern, an uploaded file's name is reduced to a plain base name, and every file the page
serves is resolved and checked to lie inside its run folder.

>>> safe_name("../../etc/passwd"), safe_name("C:\\\\films\\\\knee 1.png"), safe_name(".hidden.dcm")
('passwd', 'knee 1.png', 'hidden.dcm')
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
import threading
import unicodedata
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from kneepipe.files import neutralise_cell, write_atomic

RUN_ID = re.compile(r"^\d{8}-\d{6}-\d{6}-[0-9a-f]{4}$")  # its date and time first: ids sort by age
MAX_NAME_LENGTH = 120  # characters of a stored upload name (the pipeline derives longer output names from it)
_UNSAFE = re.compile(r"[^\w .()+,=@-]")
SHOWN_FOLDERS = {("out", "crops"), ("out", "thumbnails"), ("views", "gradcam")}
SHOWN_FILES = {"out/results.csv"}
CORRECTION_COLUMNS = ["corrected_kl_grade", "corrected_side", "correction_note", "corrected_at"]


class UnknownRunError(KeyError):
    """No run with this id is kept in the data folder."""

    def __str__(self) -> str:
        return f"no run {self.args[0]!r} in the data folder"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def safe_name(name: str) -> str:
    """A plain file name for an upload: its base name, without path parts, control or odd characters.

    The name a browser or a script sends is only a label: folders (``a/b``, ``a\\b``),
    ``..``, leading dots (which would hide the file from the pipeline), control and
    shell-special characters are removed, and the length is capped keeping the suffix.
    """
    base = re.split(r"[\\/]", unicodedata.normalize("NFC", name or ""))[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C")
    base = _UNSAFE.sub("_", base).strip(" .")
    if len(base) > MAX_NAME_LENGTH:
        stem, dot, suffix = base.rpartition(".")
        suffix = suffix[:10] if dot else ""
        base = base[: MAX_NAME_LENGTH - len(suffix) - 1].rstrip(" .") + ("." + suffix if suffix else "")
    return base or "upload"


class RunStore:
    """The runs kept under a data folder.

    >>> store = RunStore("kneepipe-data")  # doctest: +SKIP
    >>> run_id = store.create(grader="shipped", prior=None)  # doctest: +SKIP
    """

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir).resolve()
        self.runs_dir = self.data_dir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    # --- runs ---------------------------------------------------------------------------

    def create(self, grader: str, prior: str | None, grader_file: str | None = None) -> str:
        """A new, empty run folder; returns its id."""
        with self._lock:
            while True:
                run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S-%f}-{secrets.token_hex(2)}"
                folder = self.runs_dir / run_id
                if not folder.exists():
                    break
            (folder / "inputs").mkdir(parents=True)
            self._write_meta(
                folder,
                {
                    "id": run_id,
                    "created": now(),
                    "status": "queued",
                    "message": "",
                    "grader": grader,
                    "grader_file": grader_file,
                    "prior": prior,
                    "files": [],
                    "refused": [],
                    "progress": {"done": 0, "total": 0},
                    "summary": None,
                },
            )
        return run_id

    def folder(self, run_id: str) -> Path:
        """The folder of a run; :class:`UnknownRunError` for an id that is malformed or not kept."""
        if not isinstance(run_id, str) or not RUN_ID.match(run_id):
            raise UnknownRunError(run_id)
        folder = self.runs_dir / run_id
        if not (folder / "run.json").is_file():
            raise UnknownRunError(run_id)
        return folder

    def meta(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            return json.loads((self.folder(run_id) / "run.json").read_text())

    def update(self, run_id: str, **changes: Any) -> dict[str, Any]:
        """Change some of a run's facts, written whole."""
        with self._lock:
            folder = self.folder(run_id)
            meta = json.loads((folder / "run.json").read_text())
            meta.update(changes)
            self._write_meta(folder, meta)
            return meta

    def runs(self) -> list[dict[str, Any]]:
        """Every kept run's facts, newest first (a run folder that cannot be read is left out)."""
        found = []
        for folder in sorted(self.runs_dir.iterdir(), reverse=True):
            if not RUN_ID.match(folder.name):
                continue
            try:
                found.append(self.meta(folder.name))
            except (OSError, ValueError, UnknownRunError):
                continue
        return found

    def unfinished(self) -> list[str]:
        """Runs queued or running when the server stopped, oldest first: they are taken up again."""
        return [meta["id"] for meta in reversed(self.runs()) if meta["status"] in ("queued", "running")]

    @staticmethod
    def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
        write_atomic(folder / "run.json", json.dumps(meta, indent=2))

    # --- uploads ------------------------------------------------------------------------

    def save_upload(self, run_id: str, original: str, source: BinaryIO, max_bytes: int) -> tuple[str, int]:
        """Copy an upload into the run's ``inputs/`` under a safe, unique name; returns (name, bytes).

        Raises ``ValueError`` (the file removed again) when it is larger than ``max_bytes``.
        """
        inputs = self.folder(run_id) / "inputs"
        with self._lock:
            name = _unique(safe_name(original), {p.name.lower() for p in inputs.iterdir()})
            target = inputs / name
            if target.resolve().parent != inputs.resolve():  # cannot happen after safe_name; kept as the guard
                raise ValueError(f"{original!r}: not a usable file name")
            target.touch()
        size = 0
        try:
            with target.open("wb") as handle:
                while chunk := source.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise ValueError(f"larger than the limit of {max_bytes / 1e6:g} MB")
                    handle.write(chunk)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return name, size

    # --- files the page shows -------------------------------------------------------------

    def file(self, run_id: str, relative: str) -> Path:
        """A picture the page shows (a crop, a thumbnail, a heat map) or the pipeline's ``results.csv``.

        Anything else, the uploads and the files that name server paths (journal, args,
        summary) included, raises ``FileNotFoundError``.
        """
        folder = self.folder(run_id)
        parts = Path(relative).parts
        if ".." in parts or Path(relative).is_absolute() or not (relative in SHOWN_FILES or parts[:2] in SHOWN_FOLDERS):
            raise FileNotFoundError(relative)
        path = (folder / relative).resolve()
        if not path.is_relative_to(folder.resolve() / parts[0] / parts[1]) or not path.is_file():
            raise FileNotFoundError(relative)
        return path

    # --- corrections --------------------------------------------------------------------

    def corrections(self, run_id: str) -> list[dict[str, Any]]:
        path = self.folder(run_id) / "corrections.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def correct(self, run_id: str, correction: dict[str, Any]) -> list[dict[str, Any]]:
        """Keep a reader's correction of one knee (``image``, ``knee`` index), replacing an earlier one.

        A correction with neither a grade, a side nor a note removes the earlier one.
        """
        with self._lock:
            kept = [
                c
                for c in self.corrections(run_id)
                if (c["image"], c["knee"]) != (correction["image"], correction["knee"])
            ]
            if correction.get("kl_grade") is not None or correction.get("side") or correction.get("note"):
                kept.append({**correction, "saved": now()})
            write_atomic(self.folder(run_id) / "corrections.json", json.dumps(kept, indent=2))
        return kept

    def export_results(self, run_id: str) -> str:
        """The pipeline's ``results.csv`` with the corrections in columns of their own, beside the predictions."""
        path = self.folder(run_id) / "out" / "results.csv"
        if not path.is_file():
            raise FileNotFoundError("results.csv is written when the run has finished")
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or []) + CORRECTION_COLUMNS
            rows = list(reader)
        by_knee = {(neutralise_cell(c["image"]), c["knee"]): c for c in self.corrections(run_id)}
        return _csv(columns, _with_corrections(rows, by_knee))


def _with_corrections(rows: list[dict[str, str]], by_knee: dict[tuple[str, int], dict]) -> Iterable[dict[str, Any]]:
    seen: dict[str, int] = {}
    for row in rows:
        index = seen.get(row["image"], 0)
        seen[row["image"]] = index + 1
        correction = by_knee.get((row["image"], index))
        if correction:
            grade = correction.get("kl_grade")
            row = {
                **row,
                "corrected_kl_grade": "" if grade is None else grade,
                "corrected_side": correction.get("side") or "",
                "correction_note": neutralise_cell(correction.get("note") or ""),
                "corrected_at": correction["saved"],
            }
        yield row


def _csv(columns: list[str], rows: Iterable[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``stem-2.suffix``, ``stem-3.suffix`` ... when a file of that name (any case) is kept."""
    if name.lower() not in taken:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    number = 2
    while f"{stem}-{number}{dot}{suffix}".lower() in taken:
        number += 1
    return f"{stem}-{number}{dot}{suffix}"
