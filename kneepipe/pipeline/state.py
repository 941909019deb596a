"""What makes a pipeline run resumable and keeps two runs from mixing their outputs.

A run folder holds ``args.yaml`` with the run's *fingerprint*: a hash of the input files
(path, size, modification time), the two model versions and every config key that
changes a result. Starting ``kneepipe run`` on a folder that holds

* nothing (or only hidden files): a new run;
* the same fingerprint: the interrupted run is resumed from its journal;
* another run's fingerprint: refused with a message saying what differs;
* anything else (a user's own files): refused, so a run never mixes its outputs into
  a folder of other files by accident.

With ``overwrite`` set, an earlier run's outputs are removed first, and only what that
run wrote: its fixed-name outputs and the crops and thumbnails its journal lists. A
user's own files, also inside ``crops/``, are left alone. A folder without a run is
written into as it is (files of the run's output names are replaced).

The journal (``journal.jsonl``) gets one JSON line per processed radiograph, appended
whole and flushed to disk after every pipeline step, so a kill loses at most the step
in flight. A line cut short by a kill is ignored when the journal is read back, and
``results.csv`` is only ever written in one piece from the journal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kneepipe.pipeline.records import ImageRecord

JOURNAL = "journal.jsonl"
ARGS = "args.yaml"
# Everything a run writes into its folder; an overwrite removes these files, and of crops/ and
# thumbnails/ only the files the journal lists.
RUN_OUTPUTS = (
    ARGS,
    JOURNAL,
    "results.csv",
    "evaluation.csv",
    "metrics.json",
    "summary.json",
    "report.html",
    "crops",
    "thumbnails",
)

# Config keys that change no result (speed, memory, what is drawn): left out of the
# fingerprint, so a run can be resumed with other batch sizes or with a report added.
NEUTRAL_KEYS = {
    "pipeline": {
        "batch",
        "prefetch",
        "decode_workers",
        "grade_workers",
        "overwrite",
        "report",
        "report_max_radiographs",
        "report_gradcam",
        "report_max_gradcam",
        "group_pattern",
        "match_iou",
    },
    "detect": {"batch"},
    "grade": {"batch"},
}


class OutputConflictError(ValueError):
    """The output folder holds the results of a different run (or files of another tool)."""


def input_listing(files: Sequence[Path], root: Path) -> list[list[Any]]:
    """``[relative path, size, mtime_ns]`` of each input: what identifies the inputs cheaply."""
    listing = []
    for path in files:
        try:
            stat = path.stat()
            listing.append([relative_name(path, root), stat.st_size, stat.st_mtime_ns])
        except OSError:
            listing.append([relative_name(path, root), -1, -1])
    return listing


def relative_name(path: Path, root: Path) -> str:
    """The name of an input in outputs: its path below the input folder (its name for one file)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def fingerprint_parts(
    listing: Sequence[Sequence[Any]],
    detector_version: str,
    grader_version: str,
    configs: Mapping[str, Mapping[str, Any]],
    labels_digest: str | None,
) -> dict[str, str]:
    """Short hashes of each thing that defines a run's results, named for the message on a conflict."""

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    parts = {
        "inputs": digest(listing),
        "detector": detector_version,
        "grader": grader_version,
        "labels": labels_digest or "none",
    }
    for stage, values in configs.items():
        parts[f"{stage}_config"] = digest({k: v for k, v in values.items() if k not in NEUTRAL_KEYS.get(stage, ())})
    return parts


def fingerprint(parts: Mapping[str, str]) -> str:
    """One hash of all the parts."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()[:16]


def prepare_output(out_dir: Path, parts: Mapping[str, str], overwrite: bool) -> bool:
    """Check the output folder against this run; returns True when an earlier run is resumed.

    With ``overwrite``, an earlier run's outputs are removed (:func:`remove_run_outputs`)
    and False is returned.

    Raises:
        OutputConflictError: the folder holds another run, or files that are not a run,
            and ``overwrite`` is off.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    visible = sorted(entry.name for entry in out_dir.iterdir() if not entry.name.startswith("."))
    if not visible:
        return False
    previous = _read_args(out_dir / ARGS)
    previous_parts = previous.get("fingerprint_parts")
    is_run = isinstance(previous_parts, dict)
    if overwrite:
        if is_run:
            remove_run_outputs(out_dir)
        return False
    if is_run and previous.get("fingerprint") == fingerprint(parts):
        return True
    if isinstance(previous_parts, dict):
        changed = sorted(k for k in set(parts) | set(previous_parts) if parts.get(k) != previous_parts.get(k))
        reason = f"a different run (differs in: {', '.join(changed)})"
        advice = "pass --overwrite to replace that run's outputs"
    else:
        shown = ", ".join(visible[:5]) + (f" and {len(visible) - 5} more" if len(visible) > 5 else "")
        reason = f"files that are not a kneepipe run ({shown})"
        advice = "pass --overwrite to write the run among them"
    raise OutputConflictError(f"{out_dir} holds {reason}; choose another --out, or {advice}")


def remove_run_outputs(out_dir: Path) -> list[Path]:
    """Remove what a kneepipe run wrote into ``out_dir``, and nothing else; returns what was removed.

    The fixed-name outputs (:data:`RUN_OUTPUTS` files) go, and of ``crops/`` and
    ``thumbnails/`` only the files the run's journal lists; the folders go when left empty.
    """
    written = {out_dir / name for name in RUN_OUTPUTS if name not in ("crops", "thumbnails")}
    for record in read_journal(out_dir / JOURNAL).values():
        if record.get("thumbnail"):
            written.add(out_dir / record["thumbnail"])
        written.update(out_dir / knee["crop"] for knee in record.get("knees", []) if knee.get("crop"))
    removed = []
    for path in sorted(written):
        if _is_within(path, out_dir) and (path.is_file() or path.is_symlink()):
            path.unlink()
            removed.append(path)
    for folder in ("crops", "thumbnails"):
        with contextlib.suppress(OSError):  # not there, or holding a user's files
            (out_dir / folder).rmdir()
    return removed


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def _read_args(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return content if isinstance(content, dict) else {}


def read_journal(path: Path) -> dict[str, ImageRecord]:
    """The journal's records by image name; a line cut short by a kill is dropped.

    When an image appears twice (it cannot, unless a journal was edited), the last wins.
    """
    records: dict[str, ImageRecord] = {}
    if not path.exists():
        return records
    with path.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # the write in flight when the run was killed
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["image"]] = record
    return records


def repair_journal(path: Path) -> None:
    """Cut a trailing partial line (from a kill mid-write) so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with path.open("r+b") as handle:
            handle.truncate(end)


def append_journal(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append whole records in one write and push them to disk."""
    payload = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
    if not payload:
        return
    with path.open("a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
