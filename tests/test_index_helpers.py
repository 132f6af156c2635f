"""Shared helpers for the tests/test_index_*.py files (synthetic clustered embeddings + catalog metadata).

Contains no tests itself.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from index.embeddings_io import write_embeddings

CATEGORIES = ["Shoes", "Bags", "Watches", "Shirts", "Kitchen"]
BRANDS = ["Acme", "Globex", "Initech", None]


def clustered(n: int, d: int, clusters: int = 20, seed: int = 0, spread: float = 0.6) -> np.ndarray:
    """Gaussian-mixture unit vectors: ``clusters`` random unit centres plus isotropic noise of norm ~``spread``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(clusters, size=n)
    x = centres[labels] + rng.standard_normal((n, d)).astype(np.float32) * (spread / np.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def ids_for(n: int, prefix: str = "P") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def catalog_metadata(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + 100)
    cat = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
    price = np.round(rng.uniform(100, 5000, size=n), 2)
    return {
        "title": [f"{c} item {i}" for i, c in enumerate(cat)],
        "category": cat,
        "price": price.tolist(),
        "stock": rng.integers(0, 50, size=n).astype(np.int64).tolist(),
        "in_stock": [bool(i % 3) for i in range(n)],
        "brand": [BRANDS[i % len(BRANDS)] for i in range(n)],
        "rating_mean": [float("nan") if i % 7 == 0 else 4.0 for i in range(n)],
        "launched": [dt.date(2024, 1, 1) + dt.timedelta(days=i % 365) for i in range(n)],
    }


def provenance(dim: int) -> dict:
    return {"model_id": "test/tiny-seeded", "random_init": True, "dim": dim,
            "modality_dims": {"image": dim, "text": dim}, "fusion": {"mode": "weighted", "weights": {"image": 0.5,
                                                                                                      "text": 0.5}},
            "config_hash": "cafe0000", "code_version": "test", "created_at": "2025-01-01T00:00:00Z"}


def write_output_dir(out: Path, vectors: np.ndarray, ids: list[str] | None = None, shards: int = 2,
                     metadata: dict | None = None, report: bool = True, prov: dict | None = None) -> Path:
    """An embed-pipeline-like output dir: OUT/embeddings/part-0000k.parquet (+ OUT/run_report.json)."""
    n, d = vectors.shape
    ids = ids or ids_for(n)
    metadata = metadata if metadata is not None else catalog_metadata(n)
    prov = prov if prov is not None else provenance(d)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        a, b = bounds[s], bounds[s + 1]
        write_embeddings(out / "embeddings" / f"part-{s:05d}.parquet", ids[a:b], vectors[a:b],
                         {k: v[a:b] for k, v in metadata.items()}, prov)
    if report:
        (out / "run_report.json").write_text(json.dumps({**prov, "rows": n}), encoding="utf-8")
    return out


def exact_neighbors(x: np.ndarray, q_pos: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[int]]:
    """Brute-force top-k positions for each query position, itself excluded (optionally among ``allowed``)."""
    S = x[q_pos] @ x.T
    S[np.arange(len(q_pos)), q_pos] = -np.inf
    if allowed is not None:
        S[:, ~allowed] = -np.inf
    order = np.argsort(-S, axis=1)[:, :k]
    return [[int(j) for j in row if np.isfinite(S[r, j])] for r, row in enumerate(order)]


def recall(results: list[list[str]], truth: list[list[str]]) -> float:
    hits = sum(len(set(r) & set(t)) for r, t in zip(results, truth))
    return hits / max(1, sum(len(t) for t in truth))
