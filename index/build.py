"""Build a FAISS index: choose it, train and fill it, tune it to a recall target, publish it.

* **Choice** (:func:`choose_index_key`): ``auto`` picks by size, dimension and memory budget and says why: exact
  ``Flat`` for small catalogs, ``IVF<nlist>,Flat`` for medium/large ones that fit the budget, and
  ``IVF<nlist>,PQ<m>,RFlat`` (compressed codes + exact re-ranking against memory-mapped full vectors) when they
  do not. Any FAISS factory string is accepted as an override.
* **Train / add** (:func:`train_and_add`): training on a random sample, adding in batches with progress and
  throughput logs, on the GPU when FAISS sees one (CPU otherwise).
* **Tuning** (:func:`tune`): queries are products sampled from the index itself, the ground truth is exact, and
  recall is measured through :meth:`index.search.ProductIndex.similar_positions` -- exactly what ``similar()`` runs,
  the query product excluded from both lists (ties with the k-th exact score count as hits). The cheapest setting
  (nprobe / efSearch / k_factor) reaching ``target + margin`` is chosen and must still reach ``target`` on a fresh,
  disjoint sample; recall@k, single-query p50/p99 (1 OpenMP thread) and batched QPS are recorded. An unreachable
  target is an error unless ``allow_below_target``.
* **Publish** (:func:`build_and_publish`): manifest with provenance, staged, re-loaded and re-checked, then CURRENT
  switches atomically (:mod:`index.store`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from embedders.errors import UserError
from embedders.provenance import code_version, config_hash, utc_now
from index import store as _store
from index.embeddings_io import Embeddings, read_embeddings
from index.search import ProductIndex, apply_search_params, omp_threads, tunable_knobs

log = logging.getLogger(__name__)

DEFAULT_RECALL_TARGET = 0.95
#: Exact search is used up to n*dim of this (e.g. 16,384 x 512): a few ms per query on one core, recall 1.
EXACT_MAX_CELLS = 1 << 23
#: Below this many values (n*dim) training and tuning run on one OpenMP thread: many tiny parallel regions are
#: slower than one thread, dramatically so on a busy host.
SMALL_BUILD_CELLS = 1 << 22
#: Fraction of the memory budget the index may use (the rest: ids, metadata, Python, page cache headroom).
BUDGET_FRACTION = 0.8

NPROBE_GRID = [1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224,
               256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384,
               24576, 32768, 65536]
EF_GRID = [16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048,
           2560, 3072, 4096, 6144, 8192]
K_FACTOR_GRID = [1, 2, 4, 8, 16]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class BuildConfig:
    index_key: str = "auto"
    recall_target: float = DEFAULT_RECALL_TARGET
    k: int = 10
    max_memory: int | None = None          # bytes; None: 80% of available RAM
    margin: float = 0.01                   # tuning aims at recall_target + margin
    tuning_queries: int = 500
    fresh_queries: int = 500
    latency_queries: int = 200
    publish_check_queries: int = 50
    allow_below_target: bool = False
    train_sample: int | None = None        # None: 40 x nlist (at least 10,000 for PQ), capped at n
    add_batch: int = 100_000
    kmeans_iters: int = 10
    opq_iters: int = 25                    # FAISS default 50; the rotation converges well before on embeddings
    hnsw_ef_construction: int = 40
    use_gpu: bool | None = None            # None: when faiss.get_num_gpus() > 0
    threads: int | None = None             # OpenMP threads; None: 1 for small builds (n*dim < 2**22), else all
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0.0 < float(self.recall_target) <= 1.0):
            raise UserError(f"--recall-target must be in (0, 1], got {self.recall_target}")
        if not isinstance(self.k, int) or self.k < 1:
            raise UserError(f"-k must be a positive integer, got {self.k!r}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise UserError(f"--max-memory must be positive, got {self.max_memory}")
        for name in ("tuning_queries", "fresh_queries", "latency_queries", "add_batch", "kmeans_iters"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_memory(text: str | int | None) -> int | None:
    """``8GB`` / ``512MiB`` / ``1.5g`` / ``1000000`` -> bytes (K/M/G/T are binary: 1 GB = 2**30 bytes)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--max-memory {text!r}: expected a size like 8GB, 512MB or 1.5GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise UserError(f"--max-memory {text!r}: must be positive")
    return value


def available_memory() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b} B"


# ------------------------------------------------------------------------------------------------------ choice
def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 2*sqrt(n), at least 39 training points each."""
    target = 2.0 * math.sqrt(max(n, 1))
    nlist = 2 ** int(round(math.log2(max(target, 1.0))))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    return max(1, nlist)


def estimate_memory(key: str, n: int, dim: int) -> int:
    """Approximate resident bytes of a built index (vectors / codes + ids + graph + centroids)."""
    k = key.replace(" ", "")
    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", k)) else 0
    total = nlist * dim * 4
    base = k.split(",RFlat")[0].split(",Refine")[0]
    if (m := re.search(r"PQ(\d+)(?:x(\d+))?", base.split("OPQ")[-1] if "OPQ" in base else base)):
        code = math.ceil(int(m.group(1)) * int(m.group(2) or 8) / 8)
        total += n * code
        if "OPQ" in k:
            total += dim * dim * 4
    elif re.search(r"SQ8", base):
        total += n * dim
    elif re.search(r"SQfp16|SQ16", base):
        total += n * dim * 2
    else:
        total += n * dim * 4
    if nlist:
        total += n * 16  # inverted-list ids + direct map
    if (m := re.search(r"HNSW(\d+)", base)) and not re.search(r"IVF\d+_HNSW", base):
        total += int(n * int(m.group(1)) * 2 * 4 * 1.1)
    if "RFlat" in k or "Refine(Flat" in k:
        total += n * dim * 4
    return int(total)


def choose_index_key(n: int, dim: int, max_memory: int | None = None) -> tuple[str, str]:
    """(factory key, human-readable reason) for ``n`` vectors of ``dim`` under a memory budget (bytes)."""
    if n < 1:
        raise UserError("cannot choose an index for 0 vectors")
    budget = int((max_memory if max_memory is not None else available_memory()) * BUDGET_FRACTION)
    flat_bytes = n * dim * 4
    if n * dim <= EXACT_MAX_CELLS and flat_bytes <= budget:
        return "Flat", (f"n={n:,} x dim={dim} = {n * dim:,} values <= {EXACT_MAX_CELLS:,}: exact search costs about "
                        f"{2 * n * dim / 1e9:.2f} GFLOP per query (a few ms), recall is 1.0 and there is nothing to "
                        f"train or tune ({_fmt_bytes(flat_bytes)})")
    nlist = nlist_for(n)
    key = f"IVF{nlist},Flat"
    need = estimate_memory(key, n, dim)
    if need <= budget:
        return key, (f"n={n:,} x dim={dim} is too large for exact search per query; full-precision vectors "
                     f"({_fmt_bytes(need)}) fit the memory budget ({_fmt_bytes(budget)} usable), so an inverted file "
                     f"with nlist={nlist} (~2*sqrt(n)) and exact in-list distances: cheap k-means training, fast "
                     f"batched adds on few cores, and recall tunable by nprobe (HNSW would cost "
                     f"{_fmt_bytes(estimate_memory('HNSW32', n, dim))} and a much slower build)")
    for m in (128, 96, 64, 48, 32, 24, 16, 8, 4):
        if dim % m or m > dim:
            continue
        key = f"IVF{nlist},PQ{m},RFlat"
        resident = estimate_memory(f"IVF{nlist},PQ{m}", n, dim)
        if resident <= budget:
            return key, (f"full-precision vectors ({_fmt_bytes(flat_bytes)}) exceed the memory budget "
                         f"({_fmt_bytes(budget)} usable): {m}-byte PQ codes in nlist={nlist} inverted lists "
                         f"({_fmt_bytes(resident)} resident) with exact re-ranking (RFlat, k_factor tuned) against "
                         f"the full vectors, which stay on disk when the index is memory-mapped (`--mmap` / "
                         f"ProductIndex.load(mmap=True)); no OPQ rotation by default, its training is slow on few "
                         f"cores and re-ranking recovers most of its gain (pass OPQ{m},IVF{nlist},PQ{m},RFlat to "
                         f"use it)")
    raise UserError(f"--max-memory {_fmt_bytes(max_memory or 0)}: too small for {n:,} vectors of dim {dim} even as "
                    f"4-byte PQ codes; raise --max-memory")


def faiss_message(e: BaseException) -> str:
    """The human part of a FAISS C++ exception ("Error in f() at file.cpp:12: <this>")."""
    text = " ".join(str(e).split())
    m = re.search(r"\.(?:cpp|h):\d+: (.*)$", text)
    msg = m.group(1) if m else text
    return msg.removeprefix("Error: ")[:200]


def _nlist_of(key: str) -> int | None:
    m = re.search(r"IVF(\d+)", key)
    return int(m.group(1)) if m else None


def create_index(key: str, dim: int, n: int, config: BuildConfig | None = None):
    """Instantiate (untrained) the FAISS index for factory string ``key`` with inner-product metric."""
    import faiss
    config = config or BuildConfig()
    if not key or not isinstance(key, str):
        raise UserError(f"--index-key {key!r}: expected auto or a FAISS factory string such as IVF1024,Flat")
    if "IDMap" in key:
        raise UserError(f"--index-key {key}: IDMap is not supported: FAISS ids are row positions mapped through "
                        f"ids.parquet")
    nlist = _nlist_of(key)
    if nlist is not None and nlist > n:
        raise UserError(f"--index-key {key}: IVF{nlist} needs at least {nlist} vectors to train, there are {n:,}; "
                        f"use a smaller nlist (e.g. IVF{max(1, nlist_for(n))},Flat) or Flat")
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = faiss_message(e)
        raise UserError(f"--index-key {key!r} is not a valid FAISS factory string for dim {dim} with inner product "
                        f"({msg})") from None
    for ix in _components(index):
        if isinstance(ix, faiss.IndexIVF):
            ix.cp.niter = int(config.kmeans_iters)
        if isinstance(ix, faiss.IndexHNSW):
            ix.hnsw.efConstruction = int(config.hnsw_ef_construction)
        if isinstance(ix, (faiss.IndexIVFPQ, faiss.IndexPQ)):
            # The factory turns on polysemous training (code re-ordering for Hamming pre-filtering, which we never
            # use): minutes of simulated annealing per PQ for nothing.
            ix.do_polysemous_training = False
        if isinstance(ix, faiss.IndexPreTransform):
            for i in range(ix.chain.size()):
                vt = faiss.downcast_VectorTransform(ix.chain.at(i))
                if isinstance(vt, faiss.OPQMatrix):
                    vt.niter = int(config.opq_iters)
    return index


def _components(index) -> list:
    from index.search import index_components
    return index_components(index)


def _train_size(key: str, n: int, config: BuildConfig) -> int:
    if config.train_sample:
        return min(n, int(config.train_sample))
    nlist = _nlist_of(key) or 0
    size = 40 * nlist
    if "PQ" in key or "OPQ" in key:
        size = max(size, 256 * 40)
    if "SQ" in key or "LSH" in key:
        size = max(size, 10_000)
    return min(n, max(size, 1))


# ----------------------------------------------------------------------------------------------- train and add
def _gpu_wanted(config: BuildConfig) -> bool:
    import faiss
    if config.use_gpu is False:
        return False
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if config.use_gpu and ngpu == 0:
        log.warning("GPU requested but FAISS sees none; building on CPU")
    return ngpu > 0


def _preassigned_ivf(index):
    """The IndexIVF when ``index`` is a plain CPU IVF over array inverted lists (else None)."""
    import faiss
    ix = faiss.downcast_index(index)
    if isinstance(ix, faiss.IndexIVF) and isinstance(faiss.downcast_InvertedLists(ix.invlists),
                                                     faiss.ArrayInvertedLists):
        return ix
    return None


def _add_ivf_reserved(ivf, vectors: np.ndarray, batch: int, where: str) -> float:
    """Add to an IVF without std::vector growth: assign every vector to its list first (the same coarse search
    ``add`` would do), reserve each list's exact capacity, then append with the precomputed assignment. Peak and
    final memory are the index's real size instead of up to 2x (doubling growth) -- about 1 GB less at 1M x 512."""
    import faiss
    n = len(vectors)
    t0 = time.perf_counter()
    assign = np.empty(n, dtype=np.int64)
    for s in range(0, n, batch):
        e = min(n, s + batch)
        _, a = ivf.quantizer.search(np.ascontiguousarray(vectors[s:e]), 1)
        assign[s:e] = a.ravel()
        dt = time.perf_counter() - t0
        rate = e / dt if dt > 0 else float("inf")
        log.info("assigned %s/%s vectors to lists (%d%%) on %s, %.0f vec/s, ETA %.0f s", f"{e:,}", f"{n:,}",
                 100 * e // n, where, rate, (n - e) / rate if rate else 0.0)
    if (assign < 0).any():
        raise RuntimeError("coarse quantizer returned no list for some vectors")
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    counts = np.bincount(assign, minlength=ivf.nlist)
    for lst in np.flatnonzero(counts):
        size = int(invlists.list_size(int(lst)))
        invlists.resize(int(lst), size + int(counts[lst]))  # allocate exactly ...
        invlists.resize(int(lst), size)                     # ... and keep the capacity
    t1 = time.perf_counter()
    for s in range(0, n, batch):
        e = min(n, s + batch)
        xb = np.ascontiguousarray(vectors[s:e], dtype=np.float32)
        ab = np.ascontiguousarray(assign[s:e])
        ivf.add_core(e - s, faiss.swig_ptr(xb), None, faiss.swig_ptr(ab))
        dt = time.perf_counter() - t0
        rate = e / (time.perf_counter() - t1 + 1e-9)
        log.info("added %s/%s vectors (%d%%) on %s, %.0f vec/s, ETA %.0f s", f"{e:,}", f"{n:,}", 100 * e // n, where,
                 rate, (n - e) / rate if rate else 0.0)
    return time.perf_counter() - t0


def _add_batches(index, vectors: np.ndarray, batch: int, where: str) -> float:
    n = len(vectors)
    ivf = _preassigned_ivf(index) if where.startswith("cpu") else None
    if ivf is not None and n:
        return _add_ivf_reserved(ivf, vectors, batch, where)
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        e = min(n, s + batch)
        index.add(np.ascontiguousarray(vectors[s:e]))
        dt = time.perf_counter() - t0
        rate = e / dt if dt > 0 else float("inf")
        log.info("added %s/%s vectors (%d%%) on %s, %.0f vec/s, ETA %.0f s", f"{e:,}", f"{n:,}", 100 * e // n, where,
                 rate, (n - e) / rate if rate else 0.0)
    return time.perf_counter() - t0


def train_and_add(index, vectors: np.ndarray, key: str, config: BuildConfig) -> dict[str, Any]:
    """Train ``index`` on a sample of ``vectors`` and add them all in batches.

    Returns ``{"index": the CPU index, "device", "train_size", "train_s", "add_s"}``."""
    import faiss
    n = len(vectors)
    info: dict[str, Any] = {"device": "cpu", "train_size": 0, "train_s": 0.0, "add_s": 0.0}
    use_gpu = _gpu_wanted(config)
    rng = np.random.default_rng(config.seed)
    xt = None
    if not index.is_trained:
        ts = _train_size(key, n, config)
        sample = np.sort(rng.choice(n, size=ts, replace=False)) if ts < n else np.arange(n)
        xt = np.ascontiguousarray(vectors[sample])
        info["train_size"] = int(ts)
    gpu_index = None
    if use_gpu:
        try:
            gpu_index = faiss.index_cpu_to_all_gpus(index)
            info["device"] = f"gpu x{faiss.get_num_gpus()}"
        except (RuntimeError, AttributeError) as e:
            log.info("index %s cannot move to the GPU as a whole (%s); training its coarse quantizer there instead",
                     key, str(e).splitlines()[-1][:100])
            try:
                ivf = faiss.extract_index_ivf(index)
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
                info["device"] = "cpu (k-means on gpu)"
            except (RuntimeError, AttributeError):
                info["device"] = "cpu"
    target = gpu_index if gpu_index is not None else index
    if xt is not None:
        t0 = time.perf_counter()
        log.info("training %s on %s vectors (%s)", key, f"{len(xt):,}", info["device"])
        target.train(xt)
        info["train_s"] = time.perf_counter() - t0
        log.info("trained %s in %.1f s", key, info["train_s"])
        del xt
    info["add_s"] = _add_batches(target, vectors, max(1, int(config.add_batch)), info["device"])
    if gpu_index is not None:
        index = faiss.index_gpu_to_cpu(gpu_index)
        del gpu_index
    with_ivf = [ix for ix in _components(index) if isinstance(ix, faiss.IndexIVF)]
    for ix in with_ivf:
        ix.clustering_index = None
    _ensure_reconstruct(index, key)
    return {"index": index, **info}


def _ensure_reconstruct(index, key: str) -> None:
    """similar(product_id) looks up the product's stored vector: make sure the index can return it."""
    import faiss
    if index.ntotal == 0:
        return
    try:
        index.reconstruct(0)
        return
    except RuntimeError:
        pass
    try:
        faiss.extract_index_ivf(index).make_direct_map()
        index.reconstruct(0)
    except RuntimeError:
        raise UserError(f"--index-key {key}: this index cannot return stored vectors, which similar(product_id) "
                        f"needs; use Flat, HNSW, IVF or add ',RFlat'") from None


# ------------------------------------------------------------------------------------------------------ recall
def exact_kth_scores(vectors: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    """Exact score of the k-th most similar product to each of ``positions`` (the product itself excluded)."""
    import faiss
    n = len(vectors)
    k_eff = min(k, n - 1)
    q = np.ascontiguousarray(vectors[positions])
    D, I = faiss.knn(q, vectors, k_eff + 1, metric=faiss.METRIC_INNER_PRODUCT)
    out = np.empty(len(positions), dtype=np.float32)
    for r, p in enumerate(positions):
        row = D[r][I[r] != p][:k_eff]  # self removed (or the last one when self is tied out of the list)
        out[r] = row[k_eff - 1]
    return out


def recall_of(vectors: np.ndarray, positions: np.ndarray, I: np.ndarray, kth: np.ndarray, k: int) -> float:
    """recall@k of result ids ``I`` (rows = ``positions``): a hit is a valid id, not the query, whose exact score
    reaches the k-th exact score (so ties are not penalised)."""
    n = len(vectors)
    k_eff = min(k, n - 1)
    if k_eff <= 0 or len(positions) == 0:
        return 1.0
    I = I[:, :k_eff]
    valid = (I >= 0) & (I != positions[:, None])
    safe = np.where(valid, I, 0)
    q = vectors[positions]
    scores = np.einsum("rkd,rd->rk", vectors[safe], q)
    hits = valid & (scores >= kth[:, None] - 1e-5)
    return float(hits.sum()) / float(k_eff * len(positions))


@dataclass
class _Sample:
    positions: np.ndarray
    kth: np.ndarray


class _Tuner:
    def __init__(self, pix: ProductIndex, vectors: np.ndarray, config: BuildConfig):
        self.pix, self.vectors, self.config = pix, vectors, config
        self.k = config.k
        n = len(vectors)
        rng = np.random.default_rng(config.seed + 1)
        self._perm = rng.permutation(n)
        self._next = 0
        self.evaluated: list[dict[str, Any]] = []
        self.last_fresh: _Sample | None = None
        self.reused = False

    def sample(self, size: int) -> _Sample:
        n = len(self._perm)
        size = max(1, min(size, n))
        if self._next + size > n:  # exhausted: reuse from the start (logged, recorded)
            log.warning("not enough unused products for a fresh sample of %d queries; reusing earlier ones", size)
            self._next = 0
            self.reused = True
        pos = np.sort(self._perm[self._next:self._next + size])
        self._next += size
        t0 = time.perf_counter()
        kth = exact_kth_scores(self.vectors, pos, self.k)
        log.info("exact ground truth for %d queries in %.1f s", len(pos), time.perf_counter() - t0)
        return _Sample(pos, kth)

    def recall(self, sample: _Sample, params: dict[str, Any], record: str = "tune") -> tuple[float, float]:
        t0 = time.perf_counter()
        _, I = self.pix.similar_positions(sample.positions, self.k, params=params)
        dt = time.perf_counter() - t0
        r = recall_of(self.vectors, sample.positions, I, sample.kth, self.k)
        self.evaluated.append({"params": dict(params), "recall": round(r, 5), "queries": len(sample.positions),
                               "ms_per_query": round(1000 * dt / len(sample.positions), 4), "sample": record})
        log.info("%s %s: recall@%d %.4f on %d queries (%.3f ms/query batched)", record, _fmt_params(params), self.k,
                 r, len(sample.positions), 1000 * dt / len(sample.positions))
        return r, dt


def _fmt_params(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(params.items())) or "(no parameters)"


def _grid(name: str, knobs: dict[str, int], k: int) -> list[int]:
    if name == "nprobe":
        g = [v for v in NPROBE_GRID if v < knobs["nprobe"]] + [knobs["nprobe"]]
    elif name == "efSearch":
        limit = max(knobs["efSearch"], 16)
        g = [v for v in EF_GRID if v >= min(k + 1, limit) and v < limit] + [min(limit, EF_GRID[-1])]
        g = sorted(set(g))
    else:
        g = list(K_FACTOR_GRID)
    return g


def _min_reaching(grid: list[int], evaluate: Callable[[int], float],
                  goal: float) -> tuple[int | None, dict[int, float]]:
    """Smallest grid value whose recall reaches ``goal`` (recall assumed non-decreasing): doubling, then bisection."""
    seen: dict[int, float] = {}

    def ev(i: int) -> float:
        v = grid[i]
        if v not in seen:
            seen[v] = evaluate(v)
        return seen[v]

    lo, hi = -1, None  # grid[lo] fails (or none tried), grid[hi] reaches
    i = 0
    while i < len(grid):
        if ev(i) >= goal:
            hi = i
            break
        lo = i
        i = min(len(grid) - 1, i * 2 + 1) if i < len(grid) - 1 else len(grid)
    if hi is None:
        return None, seen
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ev(mid) >= goal:
            hi = mid
        else:
            lo = mid
    return grid[hi], seen


def tune(pix: ProductIndex, vectors: np.ndarray, config: BuildConfig) -> dict[str, Any]:
    """Choose the cheapest search parameters reaching the recall target (see module docstring)."""
    k, target = config.k, float(config.recall_target)
    goal = min(1.0, target + config.margin)
    knobs = tunable_knobs(pix.index)
    n = pix.n
    tuner = _Tuner(pix, vectors, config)
    t_start = time.perf_counter()
    if n < 2:
        tuner.last_fresh = _Sample(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        return {"params": {}, "recall_tuning": 1.0, "recall_fresh": 1.0, "reached": True, "margin_met": True,
                "evaluated": [], "queries_tuning": 0, "queries_fresh": 0, "seconds": 0.0, "k": k,
                "note": "fewer than 2 products: nothing to measure", "_tuner": tuner}
    tune_sample = tuner.sample(min(config.tuning_queries, max(1, n // 2)))
    fresh_size = min(config.fresh_queries, max(1, n - len(tune_sample.positions)))

    primary = "nprobe" if "nprobe" in knobs else ("efSearch" if "efSearch" in knobs else None)
    refine = "k_factor" in knobs

    def rec(params: dict[str, Any]) -> float:
        return tuner.recall(tune_sample, params)[0]

    # Candidate settings, cheapest first (each a full params dict), and the chosen one.
    ladder: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    if primary is None and not refine:
        ladder = [{}]
        r = rec({})
        chosen = {} if r >= target else None
    elif primary is not None and not refine:
        grid = _grid(primary, knobs, k)
        ladder = [{primary: v} for v in grid]
        best, _seen = _min_reaching(grid, lambda v: rec({primary: v}), goal)
        chosen = {primary: best} if best is not None else None
    else:
        kf_grid = _grid("k_factor", knobs, k)
        options = []
        for kf in kf_grid:
            if primary is None:
                r = rec({"k_factor": kf})
                if r >= goal:
                    options.append(({"k_factor": kf}, 0.0))
                    break
                continue
            grid = _grid(primary, knobs, k)
            best, seen = _min_reaching(grid, lambda v, kf=kf: rec({primary: v, "k_factor": kf}), goal)
            if best is not None:
                params = {primary: best, "k_factor": kf}
                _, dt = tuner.recall(tune_sample, params, record="time")
                options.append((params, dt))
                if best == grid[0]:
                    break  # a larger k_factor cannot make the base search cheaper
        if primary is None:
            ladder = [{"k_factor": kf} for kf in kf_grid]
        if options:
            chosen = min(options, key=lambda o: o[1])[0]
            if primary is not None:
                kf = chosen["k_factor"]
                ladder = [{primary: v, "k_factor": kf} for v in _grid(primary, knobs, k)] + \
                         [{primary: knobs[primary], "k_factor": f} for f in kf_grid if f > kf]
        elif primary is not None:
            ladder = [{primary: knobs[primary], "k_factor": f} for f in kf_grid]

    if chosen is None:  # the margin is unreachable: the cheapest evaluated setting reaching the bare target, if any
        ok = [e for e in tuner.evaluated if e["sample"] == "tune" and e["recall"] >= target]
        if ok:
            chosen = dict(min(ok, key=lambda e: e["ms_per_query"])["params"])
            log.warning("recall@%d %.3f + margin %.3f unreachable; using %s which reaches the bare target", k,
                        target, config.margin, _fmt_params(chosen))
            if chosen not in ladder:
                ladder.append(chosen)

    recall_tuning = None
    if chosen is not None:
        recall_tuning = next((e["recall"] for e in reversed(tuner.evaluated)
                              if e["params"] == chosen and e["sample"] == "tune"), None)
        if recall_tuning is None:
            recall_tuning = rec(chosen)
    margin_met = recall_tuning is not None and recall_tuning >= goal

    # Fresh-sample verification; step up the ladder while it fails.
    fresh_recall = None
    reached = False
    fresh_queries = 0
    if chosen is not None:
        start = ladder.index(chosen) if chosen in ladder else 0
        steps = 0
        for cand in ladder[start:]:
            if steps >= 8:
                break
            fresh = tuner.sample(fresh_size)
            tuner.last_fresh = fresh
            fresh_queries += len(fresh.positions)
            fresh_recall, _ = tuner.recall(fresh, cand, record="fresh")
            steps += 1
            if fresh_recall >= target:
                chosen, reached = cand, True
                break
            log.warning("fresh-sample recall@%d %.4f < target %.3f at %s; stepping up", k, fresh_recall, target,
                        _fmt_params(cand))
            chosen = cand
    if not reached:
        # Unreachable: report the best the index can do.
        tops = ladder[-1:] if ladder else [{}]
        best_params = tops[0]
        best_fresh = tuner.sample(fresh_size)
        tuner.last_fresh = best_fresh
        fresh_queries += len(best_fresh.positions)
        best_recall, _ = tuner.recall(best_fresh, best_params, record="fresh")
        msg = (f"recall target {target:.3f} unreachable with index key {pix.index_key or '?'}: best recall@{k} "
               f"{best_recall:.4f} at {_fmt_params(best_params)} on {len(best_fresh.positions)} fresh queries")
        if not config.allow_below_target:
            raise UserError(msg + "; use a less compressed key (Flat, IVF...,Flat, or add ',RFlat'), lower "
                                  "--recall-target, or pass --allow-below-target to publish anyway")
        log.warning("%s; publishing anyway (--allow-below-target)", msg)
        chosen, fresh_recall = best_params, best_recall
        recall_tuning = next((e["recall"] for e in reversed(tuner.evaluated)
                              if e["params"] == chosen and e["sample"] == "tune"), None)
        if recall_tuning is None:
            recall_tuning = rec(chosen)
    assert chosen is not None
    return {"params": dict(chosen), "recall_tuning": recall_tuning, "recall_fresh": fresh_recall, "reached": reached,
            "margin_met": bool(margin_met), "goal": goal, "evaluated": tuner.evaluated,
            "queries_tuning": len(tune_sample.positions), "queries_fresh": fresh_queries,
            "fresh_samples_reused_queries": tuner.reused, "k": k,
            "seconds": round(time.perf_counter() - t_start, 3), "_tuner": tuner}


def measured_figures(k: int, tuning: dict[str, Any], lat: dict[str, Any], recall_queries: int) -> dict[str, Any]:
    """The manifest's ``measured`` block (single-process and sharded builds alike)."""
    return {"k": k, "recall_at_k": tuning["recall_fresh"], "recall_at_k_tuning": tuning["recall_tuning"],
            "recall_queries": int(recall_queries),
            "latency_ms": {"p50": lat["p50"], "p99": lat["p99"], "mean": lat["mean"]},
            "latency_threads": lat["threads"], "latency_queries": lat["queries"],
            "batched_qps": lat["batched_qps"], "batched_threads": lat["batched_threads"],
            "recall_definition": "similar(): sampled indexed products as queries, the query product excluded "
                                 "from both exact and ANN lists; ANN results scoring >= the k-th exact score "
                                 "count as hits"}


def measure_latency(pix: ProductIndex, positions: np.ndarray, k: int, params: dict[str, Any] | None = None,
                    threads: int = 1) -> dict[str, Any]:
    """Single-query p50/p99 (``threads`` OpenMP threads) and batched QPS (all threads) of ``similar()``."""
    import faiss
    positions = np.asarray(positions, dtype=np.int64)
    lat = []
    with omp_threads(threads):
        for p in positions[: min(5, len(positions))]:  # warm-up
            pix.similar_positions([p], k, params=params)
        for p in positions:
            t0 = time.perf_counter()
            pix.similar_positions([p], k, params=params)
            lat.append(time.perf_counter() - t0)
    lat_ms = np.asarray(lat) * 1000.0
    reps, t0 = 0, time.perf_counter()
    while True:
        pix.similar_positions(positions, k, params=params)
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= 0.3 or reps >= 20:
            break
    return {"p50": round(float(np.percentile(lat_ms, 50)), 4), "p99": round(float(np.percentile(lat_ms, 99)), 4),
            "mean": round(float(lat_ms.mean()), 4), "queries": int(len(positions)), "threads": int(threads),
            "batched_qps": round(reps * len(positions) / dt, 1), "batched_threads": int(faiss.omp_get_max_threads())}


# ------------------------------------------------------------------------------------------------------- build
@dataclass
class BuildResult:
    index: Any
    index_key: str
    choice_reason: str
    search_params: dict[str, Any]
    measured: dict[str, Any]
    tuning: dict[str, Any]
    build: dict[str, Any]
    below_target: bool
    pix: ProductIndex = field(repr=False, default=None)  # type: ignore[assignment]
    fresh_positions: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]
    fresh_kth: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]


def build_index(vectors: np.ndarray, ids: Sequence[str] | pa.Array, config: BuildConfig | None = None,
                metadata: pa.Table | None = None) -> BuildResult:
    """Choose, train, add and tune an index over ``vectors`` (float32, L2-normalised, row i = ``ids[i]``)."""
    config = config or BuildConfig()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise UserError("no vectors to index")
    n, dim = vectors.shape
    t_all = time.perf_counter()
    requested = (config.index_key or "auto").strip()
    if requested.lower() == "auto":
        key, reason = choose_index_key(n, dim, config.max_memory)
    else:
        key, reason = requested, f"--index-key {requested} given explicitly"
        if config.max_memory is not None and estimate_memory(key, n, dim) > config.max_memory:
            log.warning("%s needs about %s, more than --max-memory %s", key,
                        _fmt_bytes(estimate_memory(key, n, dim)), _fmt_bytes(config.max_memory))
    log.info("index key %s for n=%d dim=%d: %s", key, n, dim, reason)
    threads = config.threads or (1 if n * dim < SMALL_BUILD_CELLS else None)
    index = create_index(key, dim, n, config)
    with omp_threads(threads):
        built = train_and_add(index, vectors, key, config)
        index = built.pop("index")
        pix = ProductIndex(index, ids, metadata, {"index_key": key}, search_params={})
        tuning = tune(pix, vectors, config)
    tuner: _Tuner = tuning.pop("_tuner")
    params = tuning["params"]
    pix.set_search_params(params)
    fresh = tuner.last_fresh
    assert fresh is not None
    lat_positions = np.random.default_rng(config.seed + 2).choice(n, size=min(config.latency_queries, n),
                                                                   replace=False)
    t0 = time.perf_counter()
    lat = measure_latency(pix, lat_positions, config.k, params)
    log.info("latency: p50 %.3f ms, p99 %.3f ms (1 thread), %.0f QPS batched (%.1f s)", lat["p50"], lat["p99"],
             lat["batched_qps"], time.perf_counter() - t0)
    measured = measured_figures(config.k, tuning, lat, int(len(fresh.positions)))
    build_info = {**built, "tune_s": tuning["seconds"], "total_s": round(time.perf_counter() - t_all, 3),
                  "train_s": round(built["train_s"], 3), "add_s": round(built["add_s"], 3),
                  "estimated_memory_bytes": estimate_memory(key, n, dim)}
    return BuildResult(index=index, index_key=key, choice_reason=reason, search_params=params, measured=measured,
                       tuning={k2: v for k2, v in tuning.items() if k2 != "params"}, build=build_info,
                       below_target=not tuning["reached"], pix=pix, fresh_positions=fresh.positions,
                       fresh_kth=fresh.kth)


def _publish_check(result: BuildResult, vectors: np.ndarray, config: BuildConfig, mmap: bool,
                   ids: pa.Array) -> Callable[[str], dict[str, Any]]:
    def check(staged: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        loaded = ProductIndex.from_directory(staged, mmap=mmap, verify=True)
        if not loaded.product_ids.equals(ids):
            raise UserError(f"{staged}: ids.parquet does not round-trip; not publishing")
        m = min(config.publish_check_queries, len(result.fresh_positions))
        pos, kth = result.fresh_positions[:m], result.fresh_kth[:m]
        _, I_mem = result.pix.similar_positions(pos, config.k)
        _, I_disk = loaded.similar_positions(pos, config.k)
        same = float((I_mem == I_disk).all(axis=1).mean()) if m else 1.0
        rec = recall_of(vectors, pos, I_disk, kth, config.k) if m else 1.0
        expected = min(float(config.recall_target), float(result.measured["recall_at_k"] or 0.0))
        if same < 0.98:
            raise UserError(f"{staged}: the reloaded index answers differently from the built one on "
                            f"{100 * (1 - same):.0f}% of {m} queries; not publishing")
        if rec < expected - 0.05:
            raise UserError(f"{staged}: reloaded index recall@{config.k} {rec:.3f} on {m} queries is far below the "
                            f"measured {expected:.3f}; not publishing")
        out = {"queries": m, "recall_at_k": round(rec, 5), "identical_to_built": same, "mmap": mmap,
               "seconds": round(time.perf_counter() - t0, 3)}
        log.info("staged version verified: recall@%d %.4f on %d queries, identical results %.0f%%", config.k, rec, m,
                 100 * same)
        return out
    return check


def make_manifest(result: BuildResult, emb: Embeddings, config: BuildConfig, mmap: bool) -> dict[str, Any]:
    prov = dict(emb.provenance or {})
    random_init = prov.get("random_init")
    compressed_auto = config.index_key.strip().lower() == "auto" and result.index_key.endswith(",RFlat")
    serving_mmap = bool(mmap or compressed_auto)
    return {
        "format": _store.FORMAT,
        "created_at": utc_now(),
        "index_key": result.index_key,
        "index_key_requested": config.index_key,
        "choice_reason": result.choice_reason,
        "metric": "inner_product",
        "dim": int(emb.dim),
        "n": int(emb.n),
        "search_params": result.search_params,
        "model_id": prov.get("model_id"),
        "random_init": bool(random_init) if random_init is not None else None,
        "model": prov,
        "embeddings": {"source": os.path.abspath(emb.source) if not any(c in emb.source for c in "*?[") else emb.source,
                       "files": [os.path.basename(f) for f in emb.files], "sha256": emb.source_hash(),
                       "rows": int(emb.n), "renormalised": int(emb.renormalised),
                       "run_report": emb.run_report_path, "config_hash": prov.get("config_hash"),
                       "code_version": prov.get("code_version"), "created_at": prov.get("created_at")},
        "config_hash": config_hash({"build": config.to_dict(), "index_key": result.index_key}),
        "build_config": config.to_dict(),
        "code_version": code_version(),
        "measured": result.measured,
        "tuning": {**result.tuning, "recall_target": float(config.recall_target), "margin": float(config.margin)},
        "build": result.build,
        "below_target": bool(result.below_target),
        "serving": {"mmap": serving_mmap},
    }


def build_and_publish(embeddings: str | os.PathLike | Embeddings, out: str | os.PathLike,
                      config: BuildConfig | None = None, *, keep: int = _store.DEFAULT_KEEP, mmap: bool = False,
                      version: str | None = None,
                      before_switch: Callable[[str], None] | None = None) -> tuple[str, dict[str, Any]]:
    """Read embeddings, build + tune, stage, verify and atomically publish a version. Returns (version, manifest).

    Nothing is written under ``out`` before the embeddings validated and the index met its recall target (or
    ``config.allow_below_target``).
    """
    config = config or BuildConfig()
    if keep < 1:
        raise UserError(f"--keep must be at least 1, got {keep}")
    emb = embeddings if isinstance(embeddings, Embeddings) else read_embeddings(embeddings)
    ids = pa.array(emb.ids, type=pa.string())
    result = build_index(emb.vectors, ids, config)
    manifest = make_manifest(result, emb, config, mmap)
    apply_search_params(result.index, result.search_params)
    ver = _store.publish(out, result.index, ids, emb.metadata, manifest,
                         verify=_publish_check(result, emb.vectors, config, mmap, ids), keep=keep, version=version,
                         before_switch=before_switch)
    final = _store.read_manifest(os.path.join(os.fspath(out), _store.VERSIONS_DIR, ver))
    m = final["measured"]
    log.info("published %s: %s, n=%d, recall@%d %.4f, p50 %.3f ms, p99 %.3f ms, %.0f QPS", ver, result.index_key,
             emb.n, config.k, m["recall_at_k"] or 0.0, m["latency_ms"]["p50"], m["latency_ms"]["p99"],
             m["batched_qps"])
    return ver, final
