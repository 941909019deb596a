"""Leakage audit: which images of folder B are copies of images of folder A, and which patients recur.

A grader once scored 99.8% on a test set that shared images with its training set.
The audit makes that visible before training:

1. **Fingerprint** every image once (:mod:`kneepipe.audit.fingerprint`): the SHA-1 of
   its decoded pixels and a mirror-invariant spectrum descriptor.
2. **Exact duplicates** fall out of the digests: across the folders (``exact_copy``) and
   within one (``duplicate_in_a``, ``duplicate_in_b``; reported, but no leakage).
3. **Candidates**: for each image of B, the ``candidates`` images of A whose descriptors
   are most similar (cosine). Two searches give them (``search`` in ``configs/audit.yaml``):
   ``exact``, a scan in blocks of matrix products, ``|A| x |B| x 920`` multiply-adds
   (826 x 5,778 descriptors: under a second); and ``hnsw``, a hierarchical navigable
   small-world graph (faiss; Malkov and Yashunin 2018) over A, whose queries compare a
   share of A that shrinks as A grows (measured at n x n images: 59% at n = 4,000, 24%
   at 16,000, 13% at 32,000), so its cost grows more slowly than the scan's ``n^2``.
   The descriptors are high-dimensional and nearly orthogonal between different knees,
   which keeps that share large; the graph overtakes the scan in time only near
   80,000 x 80,000 images, so ``auto`` scans up to ``exact_search_limit`` pairs and
   uses the graph beyond. Cruder indexes lost copies here (a ball tree on 32-64 PCA
   dimensions missed JPEG-recompressed copies; a k-means inverted file had to scan
   about 40% of A to find them all); the graph flags the same pairs as the scan on val
   against train and finds every transformed copy of the tests
   (``benchmarks/audit_search.py``).
4. **Verification** of each candidate pair (:mod:`kneepipe.audit.verify`): align,
   correlate fine detail; at ``copy_correlation`` or more the pair is a ``near_copy``
   (``mirrored_copy`` when B is flipped). The verified pairs grow linearly with |B|.
5. **Patients**: file names carrying a patient id (OAI: ``9001695L.png``) give
   ``patient_overlap`` pairs, one per pair of files of a patient found in both folders.

>>> report = audit_leakage("data/train", "data/test")  # doctest: +SKIP
>>> report.has_leakage, report.counts()  # doctest: +SKIP
(True, {'near_copy': 3, 'patient_overlap': 12})
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kneepipe.audit.config import AuditConfig
from kneepipe.files import write_csv_atomic

EXACT_COPY = "exact_copy"
NEAR_COPY = "near_copy"
MIRRORED_COPY = "mirrored_copy"
PATIENT_OVERLAP = "patient_overlap"
DUPLICATE_IN_A = "duplicate_in_a"
DUPLICATE_IN_B = "duplicate_in_b"
# Kinds that mean the two folders share data (the audit's exit code); in-folder duplicates do not.
LEAKAGE_KINDS = (EXACT_COPY, NEAR_COPY, MIRRORED_COPY, PATIENT_OVERLAP)
KIND_ORDER = (*LEAKAGE_KINDS, DUPLICATE_IN_A, DUPLICATE_IN_B)
CSV_COLUMNS = ("file_a", "file_b", "kind", "distance")
_SCAN_BLOCK = 1024  # query rows per matrix product in the candidate scan
# HNSW graph: links per node, and the candidate lists while building and searching. At these
# values the graph's nearest candidate equals the exact scan's for 99.9% of val's images
# against train, and its top 3 for 99.4%.
_HNSW_LINKS = 32
_HNSW_EF_CONSTRUCTION = 200
_HNSW_EF_SEARCH = 128
MIN_IMAGES_TO_CENTRE = 200  # fewer images than this: no centring, no similarity gate
_MIN_TASKS_FOR_POOL = 64  # less work than this runs in this process (a pool costs more to start)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LeakagePair:
    """One suspected pair.

    Attributes:
        file_a: the image of folder A (for ``duplicate_in_b``, the first copy in B).
        file_b: the image of folder B (for ``duplicate_in_a``, the second copy in A).
        kind: one of :data:`KIND_ORDER`.
        distance: 0 for exact copies, ``1 - correlation`` for near copies, None for
            patient overlaps.
    """

    file_a: Path
    file_b: Path
    kind: str
    distance: float | None = None


@dataclass
class AuditReport:
    """The outcome of :func:`audit_leakage`."""

    folder_a: Path
    folder_b: Path
    images_a: int
    images_b: int
    pairs: list[LeakagePair]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    shared_patients: list[str] = field(default_factory=list)
    verified_pairs: int = 0
    search: str = ""
    seconds: float = 0.0

    @property
    def has_leakage(self) -> bool:
        """True when the folders share an image or a patient."""
        return any(pair.kind in LEAKAGE_KINDS for pair in self.pairs)

    def counts(self) -> dict[str, int]:
        """Number of pairs of each kind found (kinds with none left out)."""
        found: dict[str, int] = defaultdict(int)
        for pair in self.pairs:
            found[pair.kind] += 1
        return {kind: found[kind] for kind in KIND_ORDER if found[kind]}


def patient_id(path: str | os.PathLike, pattern: str | re.Pattern | None) -> str | None:
    """The patient id a file name carries, or None.

    The pattern is matched at the start of the name without its suffix; its group
    ``patient_id`` (or else its first group, or else the whole match) is the id.

    >>> patient_id("train/2/9001695L.png", r"^(?P<patient_id>\\d{7})[LR]")
    '9001695'
    >>> patient_id("scan_17.png", r"^(?P<patient_id>\\d{7})[LR]") is None
    True
    """
    if pattern is None:
        return None
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    match = compiled.match(Path(path).stem)
    if match is None:
        return None
    if "patient_id" in compiled.groupindex:
        return match.group("patient_id")
    return match.group(1) if compiled.groups else match.group(0)


# --- work done per image, in worker processes ------------------------------------------


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would only contend


def _read_pixels(path: Path, max_side: int) -> np.ndarray:
    from kneepipe.imaging import read_radiograph

    return read_radiograph(path, max_side=max_side).pixels


def _fingerprint_file(task: tuple[Path, int]) -> tuple[str, np.ndarray] | str:
    """(digest, spectrum) of one image, or the reason it cannot be read."""
    import cv2

    from kneepipe.audit.fingerprint import fingerprint
    from kneepipe.imaging import ImageReadError

    path, max_side = task
    try:
        fp = fingerprint(_read_pixels(path, max_side))
    except ImageReadError as err:
        return err.reason
    except (OSError, ValueError, cv2.error) as err:  # whatever is wrong with one file must not stop the batch
        return f"cannot fingerprint: {err}"
    return fp.digest, fp.spectrum


def _verify_query(task: tuple[Path, tuple[Path, ...], int]) -> list[tuple[float, bool, Path | None, str]]:
    """Copy evidence of one B image against its candidate A images: (correlation, mirrored) each.

    A file that cannot be read again (it was read a moment ago, for its fingerprint, so it
    changed since) is no evidence: its pair scores -1 and the file and reason come with it,
    so the audit lists it as unreadable rather than passing the pair in silence.
    """
    import cv2

    from kneepipe.audit.verify import compare, prepare
    from kneepipe.imaging import ImageReadError

    failures = (ImageReadError, OSError, ValueError, cv2.error)
    path_b, paths_a, max_side = task
    try:
        prepared_b = prepare(_read_pixels(path_b, max_side))
    except failures as err:
        return [(-1.0, False, path_b, _reread_failure(err))] * len(paths_a)
    results: list[tuple[float, bool, Path | None, str]] = []
    for path_a in paths_a:
        try:
            evidence = compare(prepare(_read_pixels(path_a, max_side), mirrored_too=False), prepared_b)
            results.append((evidence.correlation, evidence.mirrored, None, ""))
        except failures as err:
            results.append((-1.0, False, path_a, _reread_failure(err)))
    return results


def _reread_failure(err: Exception) -> str:
    reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
    return f"could not be read again to verify a candidate copy ({reason})"


def _to_verify(candidates, similarity, gate: float, flagged: set[tuple[int, int]], index_b: int) -> tuple[int, ...]:
    """The candidate A images of one B image worth verifying, as indices into A.

    The nearest candidate always; the others only when similar enough. A search that
    finds fewer neighbours than asked pads with -1 (faiss does): those are no candidates.

    >>> _to_verify([3, -1, -1], [0.9, 0.0, 0.0], gate=0.5, flagged=set(), index_b=0)
    (3,)
    """
    return tuple(
        int(a)
        for rank, (a, s) in enumerate(zip(candidates, similarity, strict=True))
        if int(a) >= 0 and (rank == 0 or s >= gate) and (int(a), index_b) not in flagged
    )


@contextmanager
def _worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """One pool of ``workers`` processes for the whole audit; None to work in this process.

    Processes are spawned, not forked: the caller may hold threads (TensorFlow, torch)
    that a fork would break. As with any spawning pool, a script that calls the audit
    with ``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard.
    """
    if workers <= 1:
        yield None
        return
    import multiprocessing

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def _run(
    function, tasks: Sequence, pool: ProcessPoolExecutor | None, workers: int, stage: str, progress: Progress | None
) -> Iterator:
    """``map(function, tasks)`` in order, in the pool when there is one and enough work."""
    total = len(tasks)
    if progress:
        progress(stage, 0, total)
    if pool is None or total < _MIN_TASKS_FOR_POOL:
        results: Iterable = map(function, tasks)
    else:
        results = pool.map(function, tasks, chunksize=max(1, min(64, total // (8 * workers))))
    for done, result in enumerate(results, start=1):
        if progress and (done % 50 == 0 or done == total):
            progress(stage, done, total)
        yield result


# --- the audit --------------------------------------------------------------------------


def _nearest(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine neighbours in ``index`` of each query (unit vectors), best first."""
    neighbours = np.empty((len(queries), k), dtype=np.int64)
    similarities = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), _SCAN_BLOCK):
        block = queries[start : start + _SCAN_BLOCK] @ index.T
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        top_similarity = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-top_similarity, axis=1)
        neighbours[start : start + len(block)] = np.take_along_axis(top, order, axis=1)
        similarities[start : start + len(block)] = np.take_along_axis(top_similarity, order, axis=1)
    return neighbours, similarities


def _nearest_hnsw(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-``k`` inner-product neighbours from an HNSW graph over ``index``, best first."""
    import faiss

    graph = faiss.IndexHNSWFlat(index.shape[1], _HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
    graph.add(np.ascontiguousarray(index, dtype=np.float32))
    graph.hnsw.efSearch = max(_HNSW_EF_SEARCH, 4 * k)
    similarities, neighbours = graph.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return neighbours.astype(np.int64), similarities


def candidate_search(queries: np.ndarray, index: np.ndarray, k: int, search: str, exact_limit: float) -> tuple:
    """The ``k`` most similar rows of ``index`` for each query, by ``search`` (exact, hnsw or auto).

    Returns:
        ``(neighbours, similarities, method)``: index rows and similarities, best first,
        and the search that ran (``exact`` or ``hnsw``).
    """
    k = min(k, len(index))
    if search == "auto":
        search = "exact" if len(queries) * len(index) <= exact_limit else "hnsw"
    found = _nearest(queries, index, k) if search == "exact" else _nearest_hnsw(queries, index, k)
    return (*found, search)


def _search_space(spectra_a: np.ndarray, spectra_b: np.ndarray, gate: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Descriptors centred on the mean of both folders, and the similarity gate that applies.

    Every knee crop shares the spectrum of knee anatomy; removing the common mean leaves
    what is individual, so a distinct knee's similarity falls near 0 (the most similar
    train knee to a val knee: median 0.27, at most 0.42) while a copy keeps 0.38 or more
    under the tested transformations (JPEG and 5% crop + shift are the hardest). A copy can still
    fall below the gate: a val knee that is a train film cropped to another aspect ratio
    (15% taller) scored 0.25, yet ranked first. So the nearest candidate is always
    verified and the gate only spares the others. Below :data:`MIN_IMAGES_TO_CENTRE`
    images the mean is not worth trusting: the descriptors stay as they are and every
    candidate is verified (gate -1).
    """
    if len(spectra_a) + len(spectra_b) < MIN_IMAGES_TO_CENTRE:
        return spectra_a, spectra_b, -1.0
    mean = np.concatenate([spectra_a, spectra_b]).mean(axis=0)

    def centred(spectra: np.ndarray) -> np.ndarray:
        shifted = spectra - mean
        norms = np.linalg.norm(shifted, axis=1, keepdims=True)
        return (shifted / np.where(norms > 0, norms, 1.0)).astype(np.float32)

    return centred(spectra_a), centred(spectra_b), gate


def _duplicates(files: Sequence[Path], digests: Sequence[str], kind: str) -> list[LeakagePair]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for path, digest in zip(files, digests, strict=True):
        groups[digest].append(path)
    return [LeakagePair(group[0], other, kind, 0.0) for group in groups.values() for other in group[1:]]


def _check_folders(folder_a: Path, folder_b: Path) -> None:
    for folder in (folder_a, folder_b):
        if not folder.exists():
            raise FileNotFoundError(f"{folder}: no such file or folder")
    resolved_a, resolved_b = folder_a.resolve(), folder_b.resolve()
    if resolved_a == resolved_b:
        raise ValueError(f"{folder_a} and {folder_b} are the same folder; audit two different folders")
    if resolved_a in resolved_b.parents or resolved_b in resolved_a.parents:
        raise ValueError(f"{folder_a} and {folder_b} overlap (one is inside the other); audit disjoint folders")


def _fingerprint_folder(
    paths: Sequence[Path],
    max_side: int,
    pool: ProcessPoolExecutor | None,
    workers: int,
    stage: str,
    progress: Progress | None,
    unreadable: list[tuple[Path, str]],
) -> tuple[list[Path], list[str], np.ndarray]:
    """Readable files, their digests and stacked spectra; unreadable files go to ``unreadable``."""
    kept, digests, spectra = [], [], []
    tasks = [(path, max_side) for path in paths]
    for path, result in zip(paths, _run(_fingerprint_file, tasks, pool, workers, stage, progress), strict=True):
        if isinstance(result, str):
            unreadable.append((path, result))
            continue
        kept.append(path)
        digests.append(result[0])
        spectra.append(result[1])
    return kept, digests, np.stack(spectra) if spectra else np.empty((0, 0), np.float32)


def _patient_pairs(
    files_a: Sequence[Path], files_b: Sequence[Path], pattern: str, flagged: set[tuple[int, int]]
) -> tuple[list[LeakagePair], list[str]]:
    """One pair per (A file, B file) of a patient in both folders, unless already a copy."""
    compiled = re.compile(pattern)
    patients_a: dict[str, list[int]] = defaultdict(list)
    for index_a, path in enumerate(files_a):
        if (pid := patient_id(path, compiled)) is not None:
            patients_a[pid].append(index_a)
    pairs, shared = [], set()
    for index_b, path in enumerate(files_b):
        pid = patient_id(path, compiled)
        if pid is None:
            continue
        for index_a in patients_a.get(pid, []):
            shared.add(pid)
            if (index_a, index_b) not in flagged:
                pairs.append(LeakagePair(files_a[index_a], path, PATIENT_OVERLAP))
    return pairs, sorted(shared)


def audit_leakage(
    folder_a: str | os.PathLike,
    folder_b: str | os.PathLike,
    config: AuditConfig | None = None,
    progress: Progress | None = None,
) -> AuditReport:
    """Find the images of ``folder_b`` that copy images of ``folder_a``, and shared patients.

    Args:
        folder_a: the reference folder (typically the training data), searched recursively.
        folder_b: the folder audited against it (validation, test, a clinic's batch).
        config: thresholds and workers; the shipped ``configs/audit.yaml`` when None.
        progress: optional ``callable(stage, done, total)`` for a progress display.

    Returns:
        An :class:`AuditReport`; unreadable files are listed in it, not raised.

    Raises:
        FileNotFoundError: a folder does not exist or holds no readable image.
        ValueError: the folders are the same, or one is inside the other.
    """
    from kneepipe.config import load_config
    from kneepipe.imaging import find_images

    started = time.perf_counter()
    config = config or load_config(AuditConfig)
    folder_a, folder_b = Path(folder_a), Path(folder_b)
    _check_folders(folder_a, folder_b)
    listed = {"A": find_images(folder_a), "B": find_images(folder_b)}
    workers = max(config.workers, 1)
    unreadable: list[tuple[Path, str]] = []
    with _worker_pool(workers) as pool:
        files_a, digests_a, spectra_a = _fingerprint_folder(
            listed["A"], config.max_side, pool, workers, "fingerprinting A", progress, unreadable
        )
        files_b, digests_b, spectra_b = _fingerprint_folder(
            listed["B"], config.max_side, pool, workers, "fingerprinting B", progress, unreadable
        )
        for folder, found in ((folder_a, files_a), (folder_b, files_b)):
            if not found:
                raise FileNotFoundError(f"{folder}: no readable image found")

        pairs = _duplicates(files_a, digests_a, DUPLICATE_IN_A) + _duplicates(files_b, digests_b, DUPLICATE_IN_B)
        by_digest_a: dict[str, list[int]] = defaultdict(list)
        for index_a, digest in enumerate(digests_a):
            by_digest_a[digest].append(index_a)
        flagged: set[tuple[int, int]] = set()
        for index_b, digest in enumerate(digests_b):
            for index_a in by_digest_a.get(digest, []):
                pairs.append(LeakagePair(files_a[index_a], files_b[index_b], EXACT_COPY, 0.0))
                flagged.add((index_a, index_b))

        index, queries_b, gate = _search_space(spectra_a, spectra_b, config.candidate_similarity)
        neighbours, similarities, search = candidate_search(
            queries_b, index, config.candidates, config.search, config.exact_search_limit
        )
        queries = []
        for index_b, (candidates, similarity) in enumerate(zip(neighbours, similarities, strict=True)):
            to_verify = _to_verify(candidates, similarity, gate, flagged, index_b)
            if to_verify:
                queries.append((index_b, to_verify))
        tasks = [(files_b[b], tuple(files_a[a] for a in candidates), config.max_side) for b, candidates in queries]
        evidence = _run(_verify_query, tasks, pool, workers, "verifying candidates", progress)
        verified = 0
        reread = {path for path, _ in unreadable}
        for (index_b, candidates), results in zip(queries, evidence, strict=True):
            for index_a, (correlation, mirrored, failed, reason) in zip(candidates, results, strict=True):
                if failed is not None and failed not in reread:
                    unreadable.append((failed, reason))
                    reread.add(failed)
                verified += 1
                if correlation >= config.copy_correlation:
                    kind = MIRRORED_COPY if mirrored else NEAR_COPY
                    pairs.append(LeakagePair(files_a[index_a], files_b[index_b], kind, round(1 - correlation, 4)))
                    flagged.add((index_a, index_b))

    shared_patients: list[str] = []
    if config.patient_pattern:
        patient_pairs, shared_patients = _patient_pairs(files_a, files_b, config.patient_pattern, flagged)
        pairs += patient_pairs
    rank = {kind: position for position, kind in enumerate(KIND_ORDER)}
    pairs.sort(key=lambda pair: (rank[pair.kind], str(pair.file_a), str(pair.file_b)))
    return AuditReport(
        folder_a=folder_a,
        folder_b=folder_b,
        images_a=len(files_a),
        images_b=len(files_b),
        pairs=pairs,
        unreadable=unreadable,
        shared_patients=shared_patients,
        verified_pairs=verified,
        search=search,
        seconds=round(time.perf_counter() - started, 2),
    )


def write_leakage_csv(pairs: Sequence[LeakagePair], path: str | os.PathLike) -> Path:
    """Write ``file_a,file_b,kind,distance`` rows (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = (
        {
            "file_a": str(pair.file_a),
            "file_b": str(pair.file_b),
            "kind": pair.kind,
            "distance": "" if pair.distance is None else f"{pair.distance:.4f}",
        }
        for pair in pairs
    )
    return write_csv_atomic(path, CSV_COLUMNS, rows)
