"""The leakage audit's candidate search: exact scan vs HNSW graph, on real crops and at scale.

1. Real data: ``kneepipe audit`` of OAI val against train, once per search. Reports the
   time of each, whether they flag the same pairs, and how often the graph's candidates
   equal the exact scan's (top 1 and the whole top ``candidates``).
2. Scale: folders of n x n descriptors (real train and val descriptors, each moved along
   the data's principal directions so no two are alike) for growing n, timing both searches. The exact scan
   compares all n^2 pairs; the report gives the share of them the graph's queries
   compare, which falls as n grows (its time falls behind the scan's only for large n,
   where the scan's n^2 dominates).

    python benchmarks/audit_search.py                          # ../shared/data/oai-kl224
    python benchmarks/audit_search.py --sizes 4000 8000 16000 32000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from kneepipe.audit.config import AuditConfig
from kneepipe.audit.leakage import _fingerprint_folder, _search_space, _worker_pool, audit_leakage, candidate_search
from kneepipe.config import load_config
from kneepipe.imaging import find_images

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oai-kl224"


def _pairs(report) -> set[tuple[str, str, str]]:
    return {(str(pair.file_a), str(pair.file_b), pair.kind) for pair in report.pairs}


def real_data(data: Path, config: AuditConfig) -> np.ndarray:
    """Audit val against train with each search; returns train's and val's descriptors."""
    reports = {}
    for search in ("exact", "hnsw"):
        cfg = load_config(AuditConfig, overrides={"workers": config.workers, "search": search})
        reports[search] = audit_leakage(data / "train", data / "val", cfg)
        counts = reports[search].counts()
        print(f"audit val vs train, {search:5s}: {reports[search].seconds:6.1f} s, pairs {counts}")
    same = _pairs(reports["exact"]) == _pairs(reports["hnsw"])
    print(f"same pairs flagged by both searches: {same}")

    skipped: list = []
    with _worker_pool(config.workers) as pool:
        spectra = [
            _fingerprint_folder(find_images(data / part), config.max_side, pool, config.workers, part, None, skipped)[2]
            for part in ("train", "val")
        ]
    index, queries, _ = _search_space(*spectra, config.candidate_similarity)
    exact, _, _ = candidate_search(queries, index, config.candidates, "exact", 0)
    graph, _, _ = candidate_search(queries, index, config.candidates, "hnsw", 0)
    top1 = np.mean(exact[:, 0] == graph[:, 0])
    top_k = np.mean([set(e) == set(g) for e, g in zip(exact, graph, strict=True)])
    k = exact.shape[1]
    print(f"graph vs exact candidates for {len(queries)} val images: top 1 {top1:.4f}, top {k} {top_k:.4f}")
    return np.concatenate([index, queries])


def scaling(descriptors: np.ndarray, sizes: list[int], k: int, noise: float, seed: int) -> None:
    """Time both searches on n x n descriptor folders drawn around the real descriptors.

    Each drawn descriptor is a real one moved along the data's own principal directions
    (its top 64, by ``noise`` times their spread), so the drawn folders keep the real
    data's shape instead of filling all 920 dimensions with isotropic noise.
    """
    rng = np.random.default_rng(seed)
    centred = descriptors - descriptors.mean(axis=0)
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    spread = singular[:64] / np.sqrt(len(descriptors))
    directions = directions[:64]

    def draw(n: int) -> np.ndarray:
        picked = descriptors[rng.integers(0, len(descriptors), n)]
        moves = (rng.normal(0, 1, (n, len(spread))) * spread * noise) @ directions
        drawn = picked + moves.astype(np.float32)
        return (drawn / np.linalg.norm(drawn, axis=1, keepdims=True)).astype(np.float32)

    print(f"\n{'n (A = B)':>10} {'pairs':>9} {'exact s':>8} {'hnsw s':>7} {'evaluated':>10} {'top-1 agree':>12}")
    for n in sizes:
        index, queries = draw(n), draw(n)
        started = time.perf_counter()
        exact, _, _ = candidate_search(queries, index, k, "exact", 0)
        exact_seconds = time.perf_counter() - started
        faiss.cvar.hnsw_stats.reset()
        started = time.perf_counter()
        graph, _, _ = candidate_search(queries, index, k, "hnsw", 0)
        graph_seconds = time.perf_counter() - started
        # Descriptor comparisons of the graph search per query, as a share of the exact scan's n.
        evaluated = faiss.cvar.hnsw_stats.ndis / (n * n)
        agree = np.mean(exact[:, 0] == graph[:, 0])
        print(f"{n:>10d} {n * n:>9.1e} {exact_seconds:>8.1f} {graph_seconds:>7.1f} {evaluated:>10.1%} {agree:>12.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/ and val/")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 8000, 16000, 32000])
    parser.add_argument("--noise", type=float, default=0.5, help="move of each drawn descriptor (spreads)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = load_config(AuditConfig)
    descriptors = real_data(args.data, config)
    scaling(descriptors, args.sizes, config.candidates, args.noise, args.seed)


if __name__ == "__main__":
    main()
