"""Writing outputs so that a reader never sees half a file, a spreadsheet never runs a cell,
and no input name makes an output name the file system refuses.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_csv_atomic(folder / "grades.csv", ["crop", "kl_grade"], [{"crop": "a.png", "kl_grade": 2}]).read_text()
'crop,kl_grade\\na.png,2\\n'
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# OWASP "CSV Injection": a cell starting with one of these is a formula to a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
MAX_KEY_LENGTH = 100  # characters of an output name made from an input name (file systems allow 255 bytes)


DIGEST_LENGTH = 12  # hex characters of a content digest in outputs: 48 bits, unique among any model's files


def write_atomic(path: str | Path, data: bytes | str, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a hidden temporary file renamed over it: the one way files are written.

    A reader sees the old file or the new one, never half of one. The temporary file has
    a unique name (two threads or processes writing the same path never share one) and is
    removed when the write fails. With ``fsync`` the data reaches the disk before the
    rename, so the new file survives a power cut too. Text that holds undecodable
    file-name bytes (surrogate escapes) is written with them as ``\\udcXX`` escapes.

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> write_atomic(folder / "note.txt", "ok").read_text(), [p.name for p in folder.iterdir()]
    ('ok', ['note.txt'])
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8", errors="backslashreplace")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def file_digest(path: str | Path) -> str:
    """The content digest naming a file in outputs: the first 12 hex digits of its SHA-256.

    >>> import tempfile, pathlib
    >>> file_digest(write_atomic(pathlib.Path(tempfile.mkdtemp()) / "a.txt", "a"))
    'ca978112ca1b'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:DIGEST_LENGTH]


def file_version(path: str | Path) -> str:
    """A model file's name and content digest, as outputs record it: ``grader.npz@1a2b3c4d5e6f``."""
    return f"{Path(path).name}@{file_digest(path)}"


def neutralise_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text, never runs: OWASP's advice for CSV injection.

    Text starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading
    single quote; numbers (also negative ones written as text) and other values are kept.

    >>> neutralise_cell("=cmd()+A1.png"), neutralise_cell("-0.5"), neutralise_cell(-3)
    ("'=cmd()+A1.png", '-0.5', -3)
    """
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def write_csv_atomic(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write a CSV with a header in one piece (keys outside ``columns`` are left out).

    Every text cell passes :func:`neutralise_cell`, so a file named ``=cmd()+A1.png`` is
    shown by a spreadsheet as the text it is.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: neutralise_cell(value) for key, value in row.items()} for row in rows)
    return write_atomic(path, buffer.getvalue())


def output_keys(names: Sequence[str]) -> dict[str, str]:
    """A short, file-name-safe key per input name, unique among ``names``.

    The key is the name flattened to ``[A-Za-z0-9_.-]`` (folders joined by ``__``) without
    its suffix. When two names flatten alike (``set 1/x.png`` and ``set_1/x.png``; ``a b.png``
    and ``a_b.png``) or a name is too long for a file name, the key ends in a short hash of
    the full name, so two inputs never share a crop or a thumbnail.

    >>> output_keys(["a b.png", "a_b.png", "c.png"])
    {'a b.png': 'a_b-47c1591e', 'a_b.png': 'a_b-69682829', 'c.png': 'c'}
    """

    def flat(name: str) -> str:
        stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem.replace("/", "__")).strip(".") or "_"

    def hashed(name: str, key: str) -> str:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return f"{key[: MAX_KEY_LENGTH - 9]}-{digest}"

    flats = {name: flat(name) for name in names}
    counts: dict[str, int] = {}
    for key in flats.values():
        counts[key.lower()] = counts.get(key.lower(), 0) + 1  # case-insensitive file systems too
    return {
        name: key if counts[key.lower()] == 1 and len(key) <= MAX_KEY_LENGTH else hashed(name, key)
        for name, key in flats.items()
    }
