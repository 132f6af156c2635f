"""Retrieval quality: metrics as pure numpy functions, and the evaluation of an embeddings folder.

Like FAISS's ``contrib/evaluation.py``: short functions over arrays, no model, no Beam. Vectors are float32 rows,
L2-normalised (inner product = cosine); a **missing modality is an all-zero row** (what the embeddings Parquet stores
as null). Labels are integer codes, ``-1`` = no label. Ranking is by descending score with ties broken by the lower
corpus position, so every figure is deterministic.

Definitions (``k`` = list length; a neighbour is *relevant* when it shares the query's label):

- ``precision@k``: mean over queries of (relevant neighbours in the top k) / k;
- ``ndcg@k``: binary gains, ``DCG = sum_{r<=k} rel_r / log2(r + 1)``, divided by the ideal DCG of
  ``min(k, R)`` relevant items, ``R`` = relevant items in the corpus (the query itself excluded); 0 when ``R = 0``;
- ``map``: mean over queries of average precision over the *full* ranking of the corpus
  (``AP = 1/R * sum over relevant items of precision at their rank``; 0 when ``R = 0``);
- item-to-item lists exclude the query itself (a product is not its own recommendation);
- cross-modal ``recall@k``: the share of text queries whose own product's image is in the top k of the image vectors;
- ``coverage@k``: the share of the catalog that appears in at least one top-k list;
- ANN ``recall@k``: mean ``|ANN top-k ∩ exact top-k| / k`` (exact = brute-force inner product on the same vectors).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from embedders.errors import UserError

log = logging.getLogger(__name__)

ITEM_MODALITIES = ("image", "text", "reviews", "fused")
VECTOR_COLUMNS = {"fused": "vector", "image": "image_vector", "text": "text_vector", "reviews": "review_vector"}
_FULL_SORT_MAX = 8192  # corpora up to this size are fully (stably) sorted; larger ones use argpartition first


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
def encode_labels(values: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
    """Labels (any values, ``None``/NaN/"" = missing) -> (int codes with -1 for missing, sorted label names)."""
    clean: list[str | None] = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            clean.append(None)
        else:
            s = str(v)
            clean.append(s if s.strip() else None)
    names = sorted({c for c in clean if c is not None})
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[c] if c is not None else -1 for c in clean], dtype=np.int64), names


def present_rows(matrix: np.ndarray | None) -> np.ndarray:
    """Boolean mask of rows that hold a vector (non-zero, finite)."""
    if matrix is None:
        return np.zeros(0, dtype=bool)
    m = np.asarray(matrix)
    norms = np.linalg.norm(m, axis=1) if m.ndim == 2 and m.shape[1] else np.zeros(len(m))
    return np.isfinite(norms) & (norms > 0)


def _rank_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the positions of the ``k`` best scores, best first, ties by lower position."""
    n = scores.shape[1]
    k = min(k, n)
    if n <= _FULL_SORT_MAX or k >= n:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part.sort(axis=1)  # lower position first, so the stable sort below breaks ties by position
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def topk_neighbours(queries: np.ndarray, corpus: np.ndarray, k: int, exclude: np.ndarray | None = None,
                    block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search.

    Returns ``(indices [nq, k] int64, scores [nq, k] float32)``, best first. ``exclude[i]`` is a corpus position
    that query ``i`` must not return (itself), ``-1`` for none. Slots beyond the corpus size hold index ``-1`` and
    score ``-inf``.
    """
    q = np.asarray(queries, dtype=np.float32)
    c = np.asarray(corpus, dtype=np.float32)
    nq = q.shape[0]
    idx = np.full((nq, k), -1, dtype=np.int64)
    sc = np.full((nq, k), -np.inf, dtype=np.float32)
    if nq == 0 or c.shape[0] == 0 or k <= 0:
        return idx, sc
    for s in range(0, nq, block):
        e = min(nq, s + block)
        scores = q[s:e] @ c.T
        if exclude is not None:
            ex = np.asarray(exclude[s:e])
            rows = np.nonzero(ex >= 0)[0]
            scores[rows, ex[rows]] = -np.inf
        top = _rank_rows(scores, k)
        top_scores = np.take_along_axis(scores, top, axis=1)
        top = np.where(np.isfinite(top_scores), top, -1)
        idx[s:e, :top.shape[1]] = top
        sc[s:e, :top.shape[1]] = top_scores
    return idx, sc


def relevance(query_labels: np.ndarray, neighbour_idx: np.ndarray, corpus_labels: np.ndarray) -> np.ndarray:
    """``rel[i, r]`` = neighbour r of query i exists and shares the query's (non-missing) label."""
    ql = np.asarray(query_labels)[:, None]
    nb = np.asarray(neighbour_idx)
    cl = np.where(nb >= 0, np.asarray(corpus_labels)[np.maximum(nb, 0)], -2)
    return (nb >= 0) & (ql >= 0) & (cl == ql)


def precision_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """Per query: relevant among the first ``k`` / k (missing slots count as not relevant)."""
    rel = np.asarray(rel, dtype=bool)[:, :k]
    return rel.sum(axis=1) / float(k)


def ndcg_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query nDCG@k with binary gains; ``n_relevant`` = relevant items in the corpus for each query."""
    rel = np.asarray(rel, dtype=np.float64)[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = (rel * discounts[:rel.shape[1]]).sum(axis=1)
    ideal_cum = np.concatenate([[0.0], np.cumsum(discounts)])
    idcg = ideal_cum[np.minimum(np.asarray(n_relevant, dtype=np.int64), k)]
    out = np.zeros_like(dcg)
    ok = idcg > 0
    out[ok] = dcg[ok] / idcg[ok]
    return out


def average_precision(rel_full: np.ndarray) -> np.ndarray:
    """Per query AP over a full ranking (``rel_full[i]`` = relevance of the whole ranked corpus); 0 when none."""
    rel = np.asarray(rel_full, dtype=np.float64)
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    r = rel.sum(axis=1)
    ap = np.zeros(rel.shape[0])
    ok = r > 0
    ap[ok] = ((hits / ranks) * rel).sum(axis=1)[ok] / r[ok]
    return ap


def full_ranking_ap(queries: np.ndarray, corpus: np.ndarray, query_labels: np.ndarray, corpus_labels: np.ndarray,
                    exclude: np.ndarray | None = None, block: int = 256) -> np.ndarray:
    """Per query AP of the full ranking of ``corpus`` (the excluded position removed from the ranking)."""
    q = np.asarray(queries, dtype=np.float32)
    c = np.asarray(corpus, dtype=np.float32)
    cl = np.asarray(corpus_labels)
    out = np.zeros(q.shape[0])
    for s in range(0, q.shape[0], block):
        e = min(q.shape[0], s + block)
        scores = q[s:e] @ c.T
        if exclude is not None:  # the excluded item goes last, so it takes no rank before any other
            ex = np.asarray(exclude[s:e])
            rows = np.nonzero(ex >= 0)[0]
            scores[rows, ex[rows]] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        rel = (cl[order] == np.asarray(query_labels[s:e])[:, None]) & (np.asarray(query_labels[s:e])[:, None] >= 0)
        if exclude is not None:
            rel &= ~((order == ex[:, None]) & (ex[:, None] >= 0))
        out[s:e] = average_precision(rel)
    return out


def count_relevant(query_labels: np.ndarray, corpus_labels: np.ndarray, self_in_corpus: np.ndarray | None = None
                   ) -> np.ndarray:
    """Relevant items in the corpus per query (minus one where the query itself is in the corpus)."""
    cl = np.asarray(corpus_labels)
    counts = np.bincount(cl[cl >= 0], minlength=int(max(cl.max(initial=-1), np.max(query_labels, initial=-1)) + 1))
    ql = np.asarray(query_labels)
    n = np.where(ql >= 0, counts[np.maximum(ql, 0)] if len(counts) else 0, 0).astype(np.int64)
    if self_in_corpus is not None:
        n = n - (np.asarray(self_in_corpus, dtype=bool) & (ql >= 0)).astype(np.int64)
    return np.maximum(n, 0)


def recall_of_targets(neighbour_idx: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Per query: 1.0 when ``targets[i]`` (a corpus position) is among the first ``k`` neighbours."""
    nb = np.asarray(neighbour_idx)[:, :k]
    return (nb == np.asarray(targets)[:, None]).any(axis=1).astype(np.float64)


def coverage(neighbour_idx: np.ndarray, n_corpus: int, k: int) -> float:
    """Share of the corpus that appears in at least one top-k list."""
    if n_corpus <= 0:
        return 0.0
    nb = np.asarray(neighbour_idx)[:, :k]
    return float(len(np.unique(nb[nb >= 0]))) / float(n_corpus)


def overlap_recall(approx_idx: np.ndarray, exact_idx: np.ndarray, k: int) -> np.ndarray:
    """Per query ``|approx top-k ∩ exact top-k| / (valid exact ids)`` (ANN recall against exact search)."""
    out = np.zeros(len(exact_idx))
    for i, (a, e) in enumerate(zip(np.asarray(approx_idx)[:, :k], np.asarray(exact_idx)[:, :k])):
        ev = set(int(x) for x in e if x >= 0)
        if ev:
            out[i] = len(ev & set(int(x) for x in a if x >= 0)) / len(ev)
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


# ---------------------------------------------------------------------------------------------------------------
# Metric groups
@dataclass
class RankingResult:
    """Per-query figures of one retrieval task (kept for per-label breakdowns and the report)."""
    query_rows: np.ndarray  # positions (in the evaluated set) of the queries
    neighbours: np.ndarray  # [nq, k] positions in the evaluated set, -1 = none
    precision: np.ndarray
    ndcg: np.ndarray | None = None
    ap: np.ndarray | None = None
    recall: np.ndarray | None = None

    def summary(self, k: int) -> dict[str, float | None]:
        if len(self.query_rows) == 0:
            return {f"precision@{k}": None, f"ndcg@{k}": None, "map": None}
        out = {f"precision@{k}": _r(self.precision.mean())}
        if self.ndcg is not None:
            out[f"ndcg@{k}"] = _r(self.ndcg.mean())
        if self.recall is None:  # item-to-item: mAP is part of the shape even when it was not computed
            out["map"] = _r(self.ap.mean()) if self.ap is not None else None
        if self.recall is not None:
            out[f"recall@{k}"] = _r(self.recall.mean())
        return out


def item_to_item(vectors: np.ndarray, labels: np.ndarray, query_mask: np.ndarray, k: int,
                 with_map: bool = True) -> RankingResult:
    """Neighbours of each query among all rows that hold a vector (the query excluded), scored by label."""
    vectors = np.asarray(vectors, dtype=np.float32)
    have = present_rows(vectors)
    corpus_rows = np.nonzero(have)[0]
    qrows = np.nonzero(have & np.asarray(query_mask, dtype=bool) & (labels >= 0))[0]
    pos_in_corpus = np.full(len(vectors), -1, dtype=np.int64)
    pos_in_corpus[corpus_rows] = np.arange(len(corpus_rows))
    excl = pos_in_corpus[qrows]
    nb, _ = topk_neighbours(vectors[qrows], vectors[corpus_rows], k, exclude=excl)
    nb_rows = np.where(nb >= 0, corpus_rows[np.maximum(nb, 0)], -1)
    rel = relevance(labels[qrows], nb_rows, labels)
    n_rel = count_relevant(labels[qrows], labels[corpus_rows], self_in_corpus=np.ones(len(qrows), bool))
    ap = full_ranking_ap(vectors[qrows], vectors[corpus_rows], labels[qrows], labels[corpus_rows], excl) \
        if with_map else None
    return RankingResult(qrows, nb_rows, precision_at_k(rel, k), ndcg_at_k(rel, n_rel, k), ap)


def cross_modal(query_vectors: np.ndarray, corpus_vectors: np.ndarray, labels: np.ndarray, query_mask: np.ndarray,
                k: int) -> RankingResult:
    """Text -> image: each query's text vector against every image vector (nothing excluded).

    Queries are rows with both a text and an image vector (so that the exact product can be found) and a label.
    """
    qv = np.asarray(query_vectors, dtype=np.float32)
    cv = np.asarray(corpus_vectors, dtype=np.float32)
    have_c = present_rows(cv)
    corpus_rows = np.nonzero(have_c)[0]
    qrows = np.nonzero(present_rows(qv) & have_c & np.asarray(query_mask, bool) & (labels >= 0))[0]
    pos_in_corpus = np.full(len(cv), -1, dtype=np.int64)
    pos_in_corpus[corpus_rows] = np.arange(len(corpus_rows))
    nb, _ = topk_neighbours(qv[qrows], cv[corpus_rows], k)
    nb_rows = np.where(nb >= 0, corpus_rows[np.maximum(nb, 0)], -1)
    rel = relevance(labels[qrows], nb_rows, labels)
    recall = recall_of_targets(nb_rows, qrows, k)
    n_rel = count_relevant(labels[qrows], labels[corpus_rows])
    return RankingResult(qrows, nb_rows, precision_at_k(rel, k), ndcg_at_k(rel, n_rel, k), None, recall)


# ---------------------------------------------------------------------------------------------------------------
# Evaluating a set of product vectors
@dataclass
class VectorSet:
    """Product vectors in memory: ``vectors[modality]`` is [n, d] with all-zero rows where the modality is missing."""
    ids: list[str]
    labels: np.ndarray  # int codes, -1 missing
    label_names: list[str]
    vectors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)  # the embeddings' provenance (b"shopvec" metadata)
    columns: dict[str, list[Any]] = field(default_factory=dict)  # carried metadata for the report (title, ...)

    @property
    def n(self) -> int:
        return len(self.ids)

    def mask_for(self, query_ids: Sequence[str] | None) -> np.ndarray:
        if query_ids is None:
            return np.ones(self.n, dtype=bool)
        wanted = set(query_ids)
        return np.asarray([i in wanted for i in self.ids], dtype=bool)


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    item: dict[str, RankingResult]
    cross: RankingResult | None
    vectors: VectorSet


def cross_modal_comparable(vs: VectorSet) -> tuple[bool, str]:
    """Whether text vectors can be compared with image vectors (one shared space)."""
    img, txt = vs.vectors.get("image"), vs.vectors.get("text")
    if img is None or txt is None or not present_rows(img).any() or not present_rows(txt).any():
        return False, "no image or no text vectors"
    if img.shape[1] != txt.shape[1]:
        return False, (f"image ({img.shape[1]}-d) and text ({txt.shape[1]}-d) vectors live in different spaces "
                       f"(unaligned towers); fine-tune the model (shopvec finetune) to align them")
    aligned = vs.meta.get("aligned")
    if aligned is False:
        return False, "the model's towers are not aligned (aligned=false in the embeddings' provenance)"
    return True, ""


def evaluate_vectors(vs: VectorSet, k: int = 10, query_ids: Sequence[str] | None = None,
                     coverage_queries: int | None = 20000, worst: int = 3, with_map: bool = True,
                     ann: Callable[[np.ndarray, int], np.ndarray] | None = None) -> Evaluation:
    """All quality figures of ``vs`` (the JSON of ``shopvec eval``, plus per-query results for the report).

    ``query_ids``: restrict queries (e.g. the test split); neighbours are always searched in the whole set.
    ``coverage_queries``: coverage is measured with every product as a query (as in production), on a seeded sample
    of at most this many products for very large catalogs. ``ann(queries, k) -> positions`` is the approximate
    search to compare with exact search on the fused vectors (positions in ``vs``, -1 for none; self excluded).
    """
    if k < 1:
        raise UserError(f"--k {k}: expected an integer >= 1")
    qmask = vs.mask_for(query_ids)
    labels = vs.labels
    metrics: dict[str, Any] = {"item_to_item": {}, "text_to_image": None, f"coverage@{k}": None, "per_label": {},
                               "ann": None}
    item: dict[str, RankingResult] = {}
    for m in ITEM_MODALITIES:
        mat = vs.vectors.get(m)
        if mat is None or not present_rows(mat).any():
            metrics["item_to_item"][m] = None
            continue
        res = item_to_item(mat, labels, qmask, k, with_map=with_map)
        item[m] = res
        metrics["item_to_item"][m] = res.summary(k)
        log.info("item-to-item %-7s precision@%d=%s over %d queries", m, k,
                 metrics["item_to_item"][m][f"precision@{k}"], len(res.query_rows))
    ok, why = cross_modal_comparable(vs)
    cross = None
    if ok:
        cross = cross_modal(vs.vectors["text"], vs.vectors["image"], labels, qmask, k)
        s = cross.summary(k)
        metrics["text_to_image"] = {f"recall@{k}": s.get(f"recall@{k}"), f"precision@{k}": s[f"precision@{k}"],
                                    f"ndcg@{k}": s.get(f"ndcg@{k}"), "queries": int(len(cross.query_rows))}
        log.info("text->image recall@%d=%s precision@%d=%s", k, s.get(f"recall@{k}"), k, s[f"precision@{k}"])
    else:
        metrics["text_to_image"] = {f"recall@{k}": None, f"precision@{k}": None, "skipped": why}
        log.warning("text->image not evaluated: %s", why)
    fused = vs.vectors.get("fused")
    if fused is not None and present_rows(fused).any():
        have = present_rows(fused)
        rows = np.nonzero(have)[0]
        if coverage_queries and len(rows) > coverage_queries:
            rows = np.sort(np.random.default_rng(0).choice(rows, coverage_queries, replace=False))
        cmask = np.zeros(vs.n, bool)
        cmask[rows] = True
        corpus_rows = np.nonzero(have)[0]
        pos = np.full(vs.n, -1, dtype=np.int64)
        pos[corpus_rows] = np.arange(len(corpus_rows))
        nb, _ = topk_neighbours(fused[rows], fused[corpus_rows], k, exclude=pos[rows])
        metrics[f"coverage@{k}"] = _r(coverage(nb, len(corpus_rows), k))
        metrics["coverage_queries"] = int(len(rows))
    metrics["per_label"] = per_label_figures(vs, item, cross, k)
    ranked = sorted(((v[f"precision@{k}"]["fused"] if v[f"precision@{k}"].get("fused") is not None else
                      v[f"precision@{k}"].get("text") or 0.0, name) for name, v in metrics["per_label"].items()))
    metrics["worst_labels"] = [{"label": name, f"precision@{k}": _r(p)} for p, name in ranked[:worst]]
    if ann is not None and "fused" in item:
        metrics["ann"] = ann_figures(vs, item["fused"], ann, k)
    metrics["meta"] = {"k": k, "products": vs.n, "queries": int(qmask.sum()), "labels": len(vs.label_names),
                       "model_id": vs.meta.get("model_id"), "random_init": vs.meta.get("random_init"),
                       "fusion": vs.meta.get("fusion"), "chance_precision": _r(chance_precision(labels, qmask))}
    return Evaluation(metrics, item, cross, vs)


def chance_precision(labels: np.ndarray, query_mask: np.ndarray) -> float | None:
    """Expected same-label precision of random neighbours: mean over queries of (same-label share of the rest)."""
    lab = labels[labels >= 0]
    q = labels[np.asarray(query_mask, bool) & (labels >= 0)]
    if len(q) == 0 or len(lab) < 2:
        return None
    counts = np.bincount(lab)
    return float(np.mean((counts[q] - 1) / (len(lab) - 1)))


def per_label_figures(vs: VectorSet, item: Mapping[str, RankingResult], cross: RankingResult | None, k: int
                      ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code, name in enumerate(vs.label_names):
        entry: dict[str, Any] = {"queries": 0, f"precision@{k}": {}}
        for m, res in item.items():
            sel = vs.labels[res.query_rows] == code
            if sel.any():
                entry[f"precision@{k}"][m] = _r(res.precision[sel].mean())
                entry["queries"] = max(entry["queries"], int(sel.sum()))
        if cross is not None:
            sel = vs.labels[cross.query_rows] == code
            if sel.any():
                entry["text_to_image"] = {f"recall@{k}": _r(cross.recall[sel].mean()),
                                          f"precision@{k}": _r(cross.precision[sel].mean())}
        if entry["queries"]:
            out[name] = entry
    return out


def ann_figures(vs: VectorSet, exact: RankingResult, ann: Callable[[np.ndarray, int], np.ndarray], k: int
                ) -> dict[str, Any]:
    """ANN recall against exact search on the fused vectors, and the label precision it costs."""
    qrows = exact.query_rows
    approx = np.asarray(ann(qrows, k))
    rec = overlap_recall(approx, exact.neighbours, k)
    rel = relevance(vs.labels[qrows], approx, vs.labels)
    p_ann = float(precision_at_k(rel, k).mean()) if len(qrows) else None
    p_exact = float(exact.precision.mean()) if len(qrows) else None
    return {f"recall@{k}": _r(rec.mean()) if len(qrows) else None, f"precision@{k}": _r(p_ann),
            f"exact_precision@{k}": _r(p_exact),
            f"precision_lost@{k}": _r(p_exact - p_ann) if p_ann is not None else None, "queries": int(len(qrows))}


# ---------------------------------------------------------------------------------------------------------------
# Reading an embeddings folder (output of ``shopvec embed``)
def embeddings_path(path: str) -> str:
    """``OUT`` or ``OUT/embeddings`` -> the folder of Parquet parts."""
    if not os.path.exists(path):
        raise UserError(f"--embeddings {path}: not found; pass the --out folder of `shopvec embed`")
    sub = os.path.join(path, "embeddings")
    return sub if os.path.isdir(sub) else path


def _matrix(col, dim: int | None, n: int) -> np.ndarray:
    """A (nullable) fixed_size_list<float32> column -> [n, d] with zero rows for nulls."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    d = col.type.list_size if pa.types.is_fixed_size_list(col.type) else dim
    if d is None:
        lens = pc.list_value_length(col).drop_null()
        d = int(lens[0].as_py()) if len(lens) else 0
    out = np.zeros((n, d), dtype=np.float32)
    valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if valid.any():
        flat = pc.list_flatten(col.filter(pa.array(valid))).to_numpy(zero_copy_only=False)
        out[valid] = np.asarray(flat, dtype=np.float32).reshape(-1, d)
    return out


def load_vector_set(path: str, label: str, extra_columns: Sequence[str] = ("title",)) -> VectorSet:
    """Read ``OUT/embeddings`` (all parts) into a :class:`VectorSet` labelled by metadata column ``label``."""
    import pyarrow.parquet as pq

    folder = embeddings_path(path)
    try:
        ds = pq.ParquetDataset(folder)
        schema = ds.schema
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad folder
        raise UserError(f"--embeddings {path}: cannot read Parquet: {str(e).splitlines()[0][:200]}") from None
    names = schema.names
    if "product_id" not in names or "vector" not in names:
        raise UserError(f"--embeddings {path}: not an embeddings folder (columns {names[:12]}...); "
                        f"pass the --out folder of `shopvec embed`")
    if label not in names:
        vec_cols = set(VECTOR_COLUMNS.values()) | {"product_id", "modalities"}
        meta_cols = [c for c in names if c not in vec_cols and not c.endswith("_hash")]
        raise UserError(f"--label {label!r}: no such column in {folder}; metadata columns: {meta_cols}")
    cols = ["product_id", label] + [c for c in VECTOR_COLUMNS.values() if c in names] + \
        [c for c in extra_columns if c in names and c != label]
    table = ds.read(columns=list(dict.fromkeys(cols)))
    n = table.num_rows
    if n == 0:
        raise UserError(f"--embeddings {path}: no rows")
    ids = [str(x) for x in table.column("product_id").to_pylist()]
    codes, label_names = encode_labels(table.column(label).to_pylist())
    vectors = {m: _matrix(table.column(c), None, n) for m, c in VECTOR_COLUMNS.items() if c in names}
    meta: dict[str, Any] = {}
    raw = (schema.metadata or {}).get(b"shopvec")
    if raw:
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = {}
    columns = {c: table.column(c).to_pylist() for c in extra_columns if c in table.column_names}
    columns[label] = table.column(label).to_pylist()
    log.info("read %d products from %s (label %s: %d values, %d missing)", n, folder, label, len(label_names),
             int((codes < 0).sum()))
    return VectorSet(ids, codes, label_names, vectors, meta, columns)


def index_ann_search(index_root: str, vs: VectorSet) -> Callable[[np.ndarray, int], np.ndarray]:
    """An ``ann(query_rows, k)`` over a built index (``index.search.ProductIndex``), for :func:`evaluate_vectors`.

    Each query is its product id (``similar``: the index's own vector of the product, itself excluded), so the
    figure is exactly what recommendations served from this index would be.
    """
    try:
        from index.search import ProductIndex
    except ImportError as e:  # pragma: no cover - the index library ships with the package
        raise UserError(f"--index {index_root}: the index library is not available ({e})") from None
    try:
        pidx = ProductIndex.load(index_root)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--index {index_root}: cannot load the index: {str(e).splitlines()[0][:200]}") from None
    pos = {pid: i for i, pid in enumerate(vs.ids)}

    def ann(query_rows: np.ndarray, k: int) -> np.ndarray:
        out = np.full((len(query_rows), k), -1, dtype=np.int64)
        ids = [vs.ids[r] for r in query_rows]
        results = _similar_many(pidx, ids, k)
        for i, res in enumerate(results):
            got = [pos.get(pid, -1) for pid in res][:k]
            out[i, :len(got)] = got
        return out

    return ann


def _similar_many(pidx: Any, ids: list[str], k: int) -> list[list[str]]:
    def pid_of(r: Any) -> str:
        if isinstance(r, Mapping):
            return str(r["product_id"])
        return str(getattr(r, "product_id", r))

    if hasattr(pidx, "similar_batch"):
        lists = pidx.similar_batch(ids, k=k)
        return [[pid_of(r) for r in (lst.get("results", lst) if isinstance(lst, Mapping) else lst)] for lst in lists]
    return [[pid_of(r) for r in pidx.similar(pid, k=k)] for pid in ids]


def evaluate_embeddings(path: str, label: str, k: int = 10, query_ids: Sequence[str] | None = None,
                        index_root: str | None = None, with_map: bool = True) -> Evaluation:
    """``shopvec eval``: read an embeddings folder and compute every figure (see :func:`evaluate_vectors`)."""
    vs = load_vector_set(path, label)
    if query_ids is not None:
        unknown = len(set(query_ids) - set(vs.ids))
        if unknown:
            log.warning("%d query ids are not in the embeddings (products without a vector)", unknown)
    ann = index_ann_search(index_root, vs) if index_root else None
    return evaluate_vectors(vs, k=k, query_ids=query_ids, ann=ann, with_map=with_map)


# ---------------------------------------------------------------------------------------------------------------
# Fusion over whole matrices (the vectorised twin of embedders.fusion.fuse), evaluation of in-memory vectors
def fuse_rows(vectors: Mapping[str, np.ndarray | None], fusion: Any) -> np.ndarray:
    """Row-wise :func:`embedders.fusion.fuse` over matrices (all-zero rows = missing); all-zero output rows where a
    product has no usable modality. Equal to ``fuse`` row by row (float64 arithmetic, float32 result)."""
    from embedders.fusion import MODALITIES, FusionConfig

    cfg = fusion if isinstance(fusion, FusionConfig) else FusionConfig.from_dict(dict(fusion or {}))
    mats = {m: (None if vectors.get(m) is None else np.asarray(vectors[m], dtype=np.float64)) for m in MODALITIES}
    given = [m for m in MODALITIES if mats[m] is not None]
    if not given:
        raise UserError("no vectors to fuse")
    n = len(mats[given[0]])
    dims = {m: mats[m].shape[1] for m in given}
    dims.setdefault("text", dims.get("reviews", dims.get("image", 0)))
    dims.setdefault("reviews", dims["text"])
    dims.setdefault("image", dims["text"])
    units: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        w = float(cfg.weights.get(m, 0.0))
        if mats[m] is None or w <= 0:
            present[m] = np.zeros(n, dtype=bool)
            units[m] = np.zeros((n, dims[m]))
            continue
        norms = np.linalg.norm(mats[m], axis=1)
        ok = np.isfinite(norms) & (norms > 0)
        present[m] = ok
        units[m] = np.where(ok[:, None], mats[m] / np.where(ok, norms, 1.0)[:, None], 0.0)
    if cfg.mode == "sum":
        used = [m for m in MODALITIES if present[m].any()]
        if len({dims[m] for m in used}) > 1:
            raise UserError(f"fusion mode 'sum' needs equal modality dims, got { {m: dims[m] for m in used} }; "
                            f"use 'concat'")
        d = dims[used[0]] if used else dims["image"]
        total = sum(float(cfg.weights.get(m, 0.0)) * present[m] for m in MODALITIES)
        v = np.zeros((n, d))
        safe = np.where(total > 0, total, 1.0)
        for m in used:
            v += (float(cfg.weights[m]) * present[m] / safe)[:, None] * units[m]
    else:
        v = np.concatenate([math.sqrt(max(float(cfg.weights.get(m, 0.0)), 0.0)) * units[m] for m in MODALITIES],
                           axis=1)
    norms = np.linalg.norm(v, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    out = np.zeros_like(v)
    out[ok] = v[ok] / norms[ok, None]
    return out.astype(np.float32)


def vector_set_from_arrays(ids: Sequence[str], labels: Sequence[Any], vectors: Mapping[str, np.ndarray | None],
                           fusion: Any, meta: Mapping[str, Any] | None = None) -> VectorSet:
    codes, names = encode_labels(labels)
    vecs = {m: np.asarray(v, dtype=np.float32) for m, v in vectors.items() if v is not None and m != "fused"}
    vecs["fused"] = fuse_rows(vecs, fusion)
    return VectorSet(list(ids), codes, names, vecs, {"fusion": dict(fusion or {}), **dict(meta or {})})


def evaluate_modalities(ids: Sequence[str], labels: Sequence[Any], vectors: Mapping[str, np.ndarray | None],
                        fusion: Any, query_ids: Sequence[str] | None = None, k: int = 10, what: str = "full",
                        meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Metrics of per-modality vectors held in memory (fused here with ``fusion``), the ``shopvec eval`` JSON.

    This is the evaluator ``embedders.finetune`` is given. ``what="fused"`` computes only the fused item-to-item
    precision@k (cheap, for parameter searches).
    """
    vs = vector_set_from_arrays(ids, labels, vectors, fusion, meta)
    if what == "fused":
        res = item_to_item(vs.vectors["fused"], vs.labels, vs.mask_for(query_ids), k, with_map=False)
        return {"item_to_item": {"fused": {f"precision@{k}": _r(res.precision.mean()) if len(res.query_rows)
                                           else None}}}
    return evaluate_vectors(vs, k=k, query_ids=query_ids).metrics


# ---------------------------------------------------------------------------------------------------------------
# Fusion tuning
def weight_grid(n: int, step: float) -> list[tuple[float, ...]]:
    """All weight vectors of ``n`` modalities on the simplex with the given step (each sums to 1)."""
    units = int(round(1.0 / step))
    if units < 1 or abs(units * step - 1.0) > 1e-9:
        raise UserError(f"--step {step}: expected 1/N for an integer N (e.g. 0.05, 0.1, 0.25)")
    out: list[tuple[float, ...]] = []

    def rec(prefix: list[int], left: int, slots: int) -> None:
        if slots == 1:
            out.append(tuple(round((x) / units, 10) for x in prefix + [left]))
            return
        for i in range(left + 1):
            rec(prefix + [i], left - i, slots - 1)

    if n >= 1:
        rec([], units, n)
    return out


def tune_fusion(vs: VectorSet, val_ids: Sequence[str], test_ids: Sequence[str], k: int = 10, step: float = 0.05,
                modes: Sequence[str] | None = None) -> dict[str, Any]:
    """Pick the fusion mode and modality weights maximising same-label precision@k of item-to-item neighbours on
    the validation queries (neighbours searched in the whole catalog); report the test figure of the choice against
    equal weights (same mode) and against the fusion the embeddings were made with."""
    present = [m for m in ("image", "text", "reviews") if vs.vectors.get(m) is not None
               and present_rows(vs.vectors[m]).any()]
    if not present:
        raise UserError("tune-fusion: the embeddings hold no per-modality vectors (image_vector, text_vector, "
                        "review_vector)")
    dims = {m: vs.vectors[m].shape[1] for m in present}
    comparable, why = cross_modal_comparable(vs)
    allowed = ["concat"]
    if len(set(dims.values())) == 1 and vs.meta.get("aligned") is not False:
        allowed.append("sum")
    modes = list(modes or allowed)
    for m in modes:
        if m not in ("sum", "concat"):
            raise UserError(f"--modes: {m!r} is not a fusion mode (sum, concat)")
        if m not in allowed:
            raise UserError(f"--modes: 'sum' needs one shared space, but these vectors have dims {dims}"
                            f"{'' if vs.meta.get('aligned') is not False else ' and come from unaligned towers'}; "
                            f"use concat")
    current = dict(vs.meta.get("fusion") or {})
    keep_weights = {m: float(w) for m, w in (current.get("weights") or {}).items() if m not in present}
    val_mask = vs.mask_for(val_ids)
    test_mask = vs.mask_for(test_ids)
    if not (val_mask & (vs.labels >= 0)).any() or not (test_mask & (vs.labels >= 0)).any():
        raise UserError("tune-fusion: the validation or test split has no labelled products")
    base = {m: vs.vectors[m] for m in present}

    def precision(fusion: dict, mask: np.ndarray) -> float:
        fused = fuse_rows(base, fusion)
        res = item_to_item(fused, vs.labels, mask, k, with_map=False)
        return float(res.precision.mean()) if len(res.query_rows) else float("nan")

    def cfg_of(mode: str, w: Sequence[float]) -> dict:
        weights = {**{m: 0.0 for m in ("image", "text", "reviews")}, **keep_weights}
        weights.update({m: float(x) for m, x in zip(present, w)})
        return {"mode": mode, "weights": weights}

    grid = [w for w in weight_grid(len(present), step) if sum(w) > 0]
    equal = tuple(1.0 / len(present) for _ in present)
    tried = []
    best = None
    for mode in modes:
        for w in grid:
            p = precision(cfg_of(mode, w), val_mask)
            dist = float(np.abs(np.asarray(w) - np.asarray(equal)).sum())
            tried.append({"mode": mode, "weights": dict(zip(present, w)), f"precision@{k}": _r(p)})
            key = (round(p, 12), -dist, mode == "concat")
            if best is None or key > best[0]:
                best = (key, mode, w)
        log.info("tune-fusion: %s: %d weight settings tried", mode, len(grid))
    _, mode, w = best
    chosen = cfg_of(mode, w)
    eq = cfg_of(mode, equal)
    out = {
        "k": k, "modalities": present, "modes": modes, "step": step,
        "queries": {"validation": int((val_mask & (vs.labels >= 0)).sum()),
                    "test": int((test_mask & (vs.labels >= 0)).sum())},
        "chosen": chosen,
        "validation": {f"precision@{k}": _r(precision(chosen, val_mask)),
                       f"equal_weights_precision@{k}": _r(precision(eq, val_mask))},
        "test": {f"precision@{k}": _r(precision(chosen, test_mask)),
                 f"equal_weights_precision@{k}": _r(precision(eq, test_mask))},
        "equal_weights": eq,
        "top": sorted(tried, key=lambda t: -(t[f"precision@{k}"] or 0))[:10],
    }
    if current.get("mode") in allowed:
        try:
            out["current"] = current
            out["test"][f"current_precision@{k}"] = _r(precision(current, test_mask))
        except UserError:
            pass
    out["test"]["gain_over_equal"] = _r(out["test"][f"precision@{k}"] - out["test"][f"equal_weights_precision@{k}"])
    return out


def fusion_snippet(result: Mapping[str, Any], source: str = "") -> str:
    """The chosen fusion as a TOML snippet for a shopvec config."""
    k = result["k"]
    c = result["chosen"]
    w = ", ".join(f"{m} = {round(float(c['weights'].get(m, 0.0)), 4)}" for m in ("image", "text", "reviews"))
    lines = [
        f"# written by `shopvec tune-fusion`{(' on ' + source) if source else ''}",
        f"# label precision@{k} of item-to-item neighbours (queries: validation {result['queries']['validation']}, "
        f"test {result['queries']['test']}; neighbours searched in the whole catalog)",
        f"#   validation: tuned {result['validation'][f'precision@{k}']}, equal weights "
        f"{result['validation'][f'equal_weights_precision@{k}']}",
        f"#   test:       tuned {result['test'][f'precision@{k}']}, equal weights "
        f"{result['test'][f'equal_weights_precision@{k}']}"
        + (f", current {result['test'][f'current_precision@{k}']}" if f"current_precision@{k}" in result["test"]
           else ""),
    ]
    absent = [m for m in ("image", "text", "reviews") if m not in result["modalities"]]
    if absent:
        lines.append(f"# {', '.join(absent)}: no vectors in these embeddings; weight kept from the current config")
    lines += ["[fusion]", f'mode = "{c["mode"]}"', f"weights = {{ {w} }}", ""]
    return "\n".join(lines)
