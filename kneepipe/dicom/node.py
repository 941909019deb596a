"""``kneepipe listen``: a DICOM node that grades the knee films a PACS sends it and sends the results back.

A pynetdicom C-STORE SCP accepts films from the configured callers only. Each film is
written to ``<data>/incoming/`` in one piece and entered in a journal (SQLite, one row per
SOP Instance UID, committed before the sender hears "stored"), so a film is graded at most
once: a film sent again, before or after a restart, is acknowledged and not graded again.
A worker grades the films in small batches with the models loaded once (the pipeline of
``kneepipe run``, with ``--dicom``), then sends each graded film's Structured Report and
Secondary Capture to the destination (C-STORE or STOW-RS), retrying on failure. After a
restart, films received but not graded are graded, and results not yet delivered are sent.

A sender that drops the association mid-transfer leaves nothing: pynetdicom hands a
dataset over only once it has arrived whole. The logs name every instance by its SOP
Instance UID and say what became of it; they never name the patient.

>>> node = DicomNode(load_config(PacsConfig), pipeline_cfg, detect_cfg, grade_cfg)  # doctest: +SKIP
>>> node.start(); node.wait_idle(); node.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kneepipe.dicom.config import PacsConfig

if TYPE_CHECKING:
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.pipeline.config import PipelineConfig

log = logging.getLogger("kneepipe.node")

UID = re.compile(r"^[0-9][0-9.]{0,63}$")
RECEIVED, GRADED, SENT, KEPT, NOT_GRADED, SEND_FAILED, ERROR, OWN_OUTPUT = (
    "received",
    "graded",
    "sent",
    "kept",
    "not_graded",
    "send_failed",
    "error",
    "own_output",
)
FINAL = (SENT, KEPT, NOT_GRADED, ERROR, OWN_OUTPUT)
STATUS_SUCCESS, STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES = 0x0000, 0xC000, 0xA700


class Journal:
    """The node's durable record: one row per SOP Instance UID, written before a film is acknowledged."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS instances (uid TEXT PRIMARY KEY, caller TEXT, status TEXT, message TEXT, "
            "sr TEXT, sc TEXT, knees INTEGER, received REAL, updated REAL)"
        )

    def claim(self, uid: str, caller: str) -> bool:
        """Enter a newly received instance; False when it was received before (it is not graded again)."""
        now = time.time()
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO instances VALUES (?, ?, ?, '', '', '', 0, ?, ?)",
                (uid, caller, RECEIVED, now, now),
            )
            return cursor.rowcount == 1

    def update(self, uid: str, status: str, message: str = "", **fields: Any) -> None:
        columns = {"status": status, "message": message, "updated": time.time(), **fields}
        assignments = ", ".join(f"{name} = ?" for name in columns)
        with self._lock:
            self._db.execute(f"UPDATE instances SET {assignments} WHERE uid = ?", (*columns.values(), uid))

    def get(self, uid: str) -> dict[str, Any] | None:
        with self._lock:
            cursor = self._db.execute("SELECT * FROM instances WHERE uid = ?", (uid,))
            row = cursor.fetchone()
            names = [d[0] for d in cursor.description]
        return dict(zip(names, row, strict=True)) if row else None

    def with_status(self, *statuses: str) -> list[dict[str, Any]]:
        marks = ", ".join("?" for _ in statuses)
        with self._lock:
            cursor = self._db.execute(f"SELECT * FROM instances WHERE status IN ({marks}) ORDER BY received", statuses)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def counts(self) -> Counter:
        with self._lock:
            return Counter(dict(self._db.execute("SELECT status, COUNT(*) FROM instances GROUP BY status").fetchall()))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class DicomNode:
    """The C-STORE SCP, its journal and its grading worker (see the module's description)."""

    def __init__(
        self,
        config: PacsConfig,
        pipeline_cfg: PipelineConfig,
        detect_cfg: DetectConfig,
        grade_cfg: GradeConfig,
        detector: Any = None,
        grader: Any = None,
    ) -> None:
        self.config = config
        self.pipeline_cfg = replace(pipeline_cfg, overwrite=True, report=False)
        self.detect_cfg, self.grade_cfg = detect_cfg, grade_cfg
        self.detector, self.grader = detector, grader
        self.data = Path(config.data)
        for folder in ("incoming", "batches", "runs"):
            (self.data / folder).mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.data / "journal.sqlite")
        self._queue: queue.Queue[str] = queue.Queue()
        self._resend: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._worker: threading.Thread | None = None
        self._server: Any = None
        self.port = config.port
        self.final_counts: Counter = Counter()

    # --- receiving ---------------------------------------------------------------------

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        caller = str(event.assoc.requestor.ae_title).strip()
        if not UID.match(uid):
            log.warning("refused an instance from %s: %r is not a SOP Instance UID", caller, uid[:70])
            return STATUS_CANNOT_UNDERSTAND
        known = self.journal.get(uid)
        if known is not None:
            log.info("%s from %s: received before (%s), not graded again", uid, caller, known["status"])
            return STATUS_SUCCESS
        from kneepipe.dicom.export import MANUFACTURER

        try:
            dataset = event.dataset
            own = str(dataset.get("Manufacturer", "")) == MANUFACTURER
        except Exception as err:  # a dataset pydicom cannot decode: the sender hears why
            log.warning("%s from %s: cannot be decoded (%s), refused", uid, caller, err)
            return STATUS_CANNOT_UNDERSTAND
        target = self.data / "incoming" / f"{uid}.dcm"
        partial = target.with_name(f"{uid}.{threading.get_ident()}.partial")
        try:
            with open(partial, "wb") as handle:
                handle.write(event.encoded_dataset(include_meta=True))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            partial.unlink(missing_ok=True)
            log.error("%s from %s: cannot be stored (%s), refused", uid, caller, err.strerror or err)
            return STATUS_OUT_OF_RESOURCES
        if not self.journal.claim(uid, caller):  # the same instance arrived twice at once
            partial.unlink(missing_ok=True)
            log.info("%s from %s: received twice at once, graded once", uid, caller)
            return STATUS_SUCCESS
        if own:
            partial.unlink(missing_ok=True)
            self.journal.update(uid, OWN_OUTPUT, "kneepipe's own result, not graded")
            log.info("%s from %s: kneepipe's own result, not graded", uid, caller)
            return STATUS_SUCCESS
        partial.replace(target)
        log.info("%s from %s: received", uid, caller)
        self._queue.put(uid)
        return STATUS_SUCCESS

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "refused an association from %s at %s: not an allowed caller",
            str(requestor.ae_title).strip(),
            requestor.address,
        )

    # --- grading and sending -----------------------------------------------------------

    def _load_models(self) -> None:
        if self.detector is None or self.grader is None:
            from kneepipe.pipeline.run import load_models

            self.detector, self.grader = load_models(self.detect_cfg, self.grade_cfg)

    def _work(self) -> None:
        while not self._stop.is_set():
            if self._resend:
                self._busy.set()
                rows, self._resend = self._resend, []
                for row in rows:
                    self._deliver(row["uid"], Path(row["sr"]), Path(row["sc"]))
                self._busy.clear()
                continue
            batch = self._next_batch()
            if not batch or self._stop.is_set():
                continue  # films taken but not graded stay "received": the next start grades them
            self._busy.set()
            try:
                self._grade(batch)
            except Exception as err:  # the batch's films are marked with the reason; the node goes on
                log.exception("batch of %d films failed", len(batch))
                for uid in batch:
                    self.journal.update(uid, ERROR, f"grading failed ({type(err).__name__}: {err})")
            finally:
                self._busy.clear()

    def _next_batch(self) -> list[str]:
        """The films that arrived within ``batch_wait_s`` of the first, up to ``max_batch``."""
        batch: list[str] = []
        deadline = None
        while len(batch) < self.config.max_batch and not self._stop.is_set():
            try:
                batch.append(self._queue.get(timeout=0.2))
            except queue.Empty:
                if not batch:
                    return batch
            if deadline is None:
                self._busy.set()
                deadline = time.monotonic() + self.config.batch_wait_s
            if time.monotonic() >= deadline:
                break
        return batch

    def _grade(self, uids: list[str]) -> None:
        from kneepipe.dicom.export import write_dicom_results
        from kneepipe.pipeline.run import run_pipeline

        self._load_models()
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uids[0]}"
        batch_dir, run_dir = self.data / "batches" / name, self.data / "runs" / name
        batch_dir.mkdir(parents=True)
        for uid in uids:
            source = self.data / "incoming" / f"{uid}.dcm"
            try:
                os.link(source, batch_dir / source.name)
            except OSError:
                shutil.copy2(source, batch_dir / source.name)
        try:
            run = run_pipeline(
                batch_dir,
                run_dir,
                self.pipeline_cfg,
                self.detect_cfg,
                self.grade_cfg,
                detector=self.detector,
                grader=self.grader,
            )
            dicom = write_dicom_results(run, self.detector.version, self.grader.version)
        finally:
            shutil.rmtree(batch_dir, ignore_errors=True)
        written = {entry["image"]: entry for entry in dicom["written"]}
        failed = {entry["image"]: entry["reason"] for entry in dicom["failed"]}
        for uid in uids:
            image = f"{uid}.dcm"
            record = run.images.get(image)
            if image in written and record is not None:
                entry = written[image]
                grades = ", ".join(
                    f"{knee['side']} KL{knee['kl_grade']}" for knee in record["knees"] if "kl_grade" in knee
                )
                sr, sc = run_dir / entry["sr"], run_dir / entry["sc"]
                self.journal.update(uid, GRADED, grades, sr=str(sr), sc=str(sc), knees=entry["knees"])
                log.info("%s: graded (%s)", uid, grades)
                self._deliver(uid, sr, sc)
            else:
                reason = failed.get(image) or (
                    f"{record['status']}: {record['message']}" if record else "not read by the pipeline"
                )
                status = ERROR if image in failed else NOT_GRADED
                self.journal.update(uid, status, reason)
                log.info("%s: not graded (%s)", uid, reason)
                self._discard_film(uid)

    def _deliver(self, uid: str, sr: Path, sc: Path) -> None:
        from kneepipe.dicom.network import SendError, read_instances, send_instances

        target = self.config.target
        if target is None:
            self.journal.update(uid, KEPT, "results kept in the data folder (no destination)")
            self._discard_film(uid)
            return
        last = ""
        for attempt in range(self.config.send_retries + 1):
            if attempt and self._stop.wait(self.config.retry_wait_s):
                break
            try:
                send_instances(read_instances([sr, sc]), target, self.config.ae_title, self.config.network_timeout_s)
            except SendError as err:
                last = str(err)
                log.warning("%s: results not sent, attempt %d (%s)", uid, attempt + 1, last)
                continue
            self.journal.update(uid, SENT, f"SR and Secondary Capture sent to {target}")
            log.info("%s: SR and Secondary Capture sent to %s", uid, target)
            self._discard_film(uid)
            return
        self.journal.update(uid, SEND_FAILED, last or "stopped before sending")
        log.error("%s: results not sent to %s; sent again at the next start (%s)", uid, target, last)

    def _discard_film(self, uid: str) -> None:
        if not self.config.keep_films:
            (self.data / "incoming" / f"{uid}.dcm").unlink(missing_ok=True)

    # --- running -----------------------------------------------------------------------

    def start(self) -> None:
        """Listen, and resume what an earlier run of the node left: films to grade, results to send."""
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        if not self.config.allowed_callers:
            raise ValueError("allowed_callers is empty: name the AE titles of the PACS or modalities that send films")
        from kneepipe import __version__
        from kneepipe.config import save_config, to_dict

        save_config(
            self.config,
            self.data,
            extra={
                "kneepipe": __version__,
                "pipeline": to_dict(self.pipeline_cfg),
                "detect": to_dict(self.detect_cfg),
                "grade": to_dict(self.grade_cfg),
            },
        )
        for row in self.journal.with_status(RECEIVED):
            if (self.data / "incoming" / f"{row['uid']}.dcm").is_file():
                self._queue.put(row["uid"])
            else:
                self.journal.update(row["uid"], ERROR, "the received film is missing from the data folder")
        self._resend = self.journal.with_status(GRADED, SEND_FAILED)
        for leftover in (self.data / "incoming").glob("*.partial"):
            leftover.unlink(missing_ok=True)
        ae = AE(ae_title=self.config.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.config.allowed_callers)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.config.network_timeout_s
        ae.maximum_associations = 16
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)]
        self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="kneepipe-node-grade", daemon=True)
        self._worker.start()
        pending = self._queue.qsize() + len(self._resend)
        log.info(
            "listening as %s on %s:%d; %d film(s) from an earlier run to finish",
            self.config.ae_title,
            self.config.host,
            self.port,
            pending,
        )

    def wait_idle(self, timeout_s: float = 600.0, settle_s: float = 0.5) -> bool:
        """Wait until no film is queued or being graded; False when ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        quiet_since = None
        while time.monotonic() < deadline:
            idle = self._queue.empty() and not self._busy.is_set() and not self._resend
            if idle:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle_s:
                    return True
            else:
                quiet_since = None
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop listening, finish the batch being graded, close the journal (queued films wait for the next start)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        self.final_counts = self.journal.counts()
        self.journal.close()
