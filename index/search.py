"""Query library over a published index version (no Beam): similar products, vector / text / image search, filters.

    from index.search import ProductIndex
    ix = ProductIndex.load("INDEXROOT")                       # CURRENT version, checksums verified
    ix.similar("P123", k=10, filters={"category": "Shoes"})    # the product itself is never returned
    ix.search(text="red running shoes", k=10)                 # encoded with the model recorded in the manifest

Results are lists of JSON-safe dicts ``{"product_id", "score", **metadata}`` (score = inner product = cosine),
best first. FAISS ids are row positions; ``ids.parquet`` row ``i`` is FAISS id ``i``.

Filters (grammar in :mod:`index.filters`) never "filter the top-k and return fewer": they are pushed into FAISS as an
``IDSelectorBitmap`` through ``SearchParameters(sel=...)``; when few products match they are ranked exactly, and when
an approximate search still comes back short the search is widened (nprobe / efSearch x4) and finally ranked exactly
over the matching products -- so k results come back whenever at least k products match.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import decimal
import logging
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from embedders.errors import UserError
from index import store as _store
from index.filters import Filter, parse_filters, evaluate as _evaluate_filter

log = logging.getLogger(__name__)

#: Filtered searches matching at most this many products are ranked exactly (reconstructing their vectors).
EXACT_SUBSET_MAX = 4096
#: Widening steps for a short approximate result before falling back to exact ranking over the candidates.
MAX_ESCALATIONS = 4
_MASK_CACHE_SIZE = 32


class UnknownProductError(KeyError):
    """``similar()`` was asked about a product id that is not in the index."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown product id"


@contextlib.contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """Temporarily set FAISS' OpenMP thread count (1 is best for single-query latency on a busy host)."""
    import faiss
    if not n:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


# ------------------------------------------------------------------------------------------- FAISS parameter helpers
def index_components(index) -> list:
    """The index and its nested indexes, outermost first (refine -> pre-transform -> IVF/HNSW/flat)."""
    import faiss
    out = []
    ix = faiss.downcast_index(index)
    while ix is not None:
        out.append(ix)
        if isinstance(ix, faiss.IndexRefine):
            ix = faiss.downcast_index(ix.base_index)
        elif isinstance(ix, faiss.IndexPreTransform):
            ix = faiss.downcast_index(ix.index)
        elif isinstance(ix, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            ix = faiss.downcast_index(ix.index)
        else:
            ix = None
    return out


def tunable_knobs(index) -> dict[str, int]:
    """Search-time knobs of ``index`` and their upper bound: ``nprobe`` (nlist), ``efSearch``, ``k_factor``."""
    import faiss
    knobs: dict[str, int] = {}
    for ix in index_components(index):
        if isinstance(ix, faiss.IndexRefine):
            knobs["k_factor"] = 64
        elif isinstance(ix, faiss.IndexIVF):
            knobs["nprobe"] = int(ix.nlist)
        elif isinstance(ix, faiss.IndexHNSW):
            knobs["efSearch"] = max(16, int(ix.ntotal))
    return knobs


def current_search_params(index) -> dict[str, float | int]:
    import faiss
    out: dict[str, float | int] = {}
    for ix in index_components(index):
        if isinstance(ix, faiss.IndexRefine):
            out["k_factor"] = float(ix.k_factor)
        elif isinstance(ix, faiss.IndexIVF):
            out["nprobe"] = int(ix.nprobe)
        elif isinstance(ix, faiss.IndexHNSW):
            out["efSearch"] = int(ix.hnsw.efSearch)
    return out


def apply_search_params(index, params: dict[str, Any]) -> None:
    """Set ``params`` on the index objects themselves (so a bare ``index.search`` uses them too)."""
    import faiss
    for ix in index_components(index):
        if isinstance(ix, faiss.IndexRefine) and "k_factor" in params:
            ix.k_factor = float(params["k_factor"])
        elif isinstance(ix, faiss.IndexIVF) and "nprobe" in params:
            ix.nprobe = int(min(int(params["nprobe"]), ix.nlist))
        elif isinstance(ix, faiss.IndexHNSW) and "efSearch" in params:
            ix.hnsw.efSearch = int(params["efSearch"])


class SearchParameters:
    """A FAISS ``SearchParameters`` tree for ``index`` carrying ``params`` and an optional ID selector.

    SWIG does not keep nested parameter objects (or the selector and its bitmap) alive, so this object does: keep it
    referenced for the duration of the search.
    """

    def __init__(self, index, params: dict[str, Any] | None, sel=None, keep: Any = None):
        self._refs: list[Any] = [sel, keep]
        self.params = self._build(index, dict(params or {}), sel)

    def _build(self, ix, params: dict[str, Any], sel):
        import faiss
        ix = faiss.downcast_index(ix)
        if isinstance(ix, faiss.IndexRefine):
            p = faiss.IndexRefineSearchParameters()
            p.k_factor = float(params.get("k_factor", ix.k_factor))
            base = self._build(ix.base_index, params, sel)
            p.base_index_params = base
        elif isinstance(ix, faiss.IndexPreTransform):
            p = faiss.SearchParametersPreTransform()
            inner = self._build(ix.index, params, sel)
            p.index_params = inner
        elif isinstance(ix, faiss.IndexIVF):
            p = faiss.SearchParametersIVF()
            p.nprobe = int(min(int(params.get("nprobe", ix.nprobe)), ix.nlist))
            if sel is not None:
                p.sel = sel
        elif isinstance(ix, faiss.IndexHNSW):
            p = faiss.SearchParametersHNSW()
            p.efSearch = int(params.get("efSearch", ix.hnsw.efSearch))
            if sel is not None:
                p.sel = sel
        elif isinstance(ix, faiss.IndexFlatCodes) and not isinstance(ix, faiss.IndexPQ):
            p = faiss.SearchParameters()
            if sel is not None:
                p.sel = sel
        else:  # other structures: plain search, or a generic selector (may be refused -> exact fallback)
            if sel is None:
                return None
            p = faiss.SearchParameters()
            p.sel = sel
        self._refs.append(p)
        return p


def escalate_params(params: dict[str, Any], knobs: dict[str, int]) -> dict[str, Any] | None:
    """Widen an approximate search (nprobe / efSearch x4); None when nothing can be widened any more."""
    out = dict(params)
    changed = False
    if "nprobe" in knobs:
        cur = int(out.get("nprobe", 1))
        new = min(knobs["nprobe"], max(cur * 4, cur + 1))
        if new > cur:
            out["nprobe"], changed = new, True
    if "efSearch" in knobs:
        cur = int(out.get("efSearch", 16))
        new = min(knobs["efSearch"], max(cur * 4, cur + 1))
        if new > cur:
            out["efSearch"], changed = new, True
    return out if changed else None


# ------------------------------------------------------------------------------------------------------ JSON safety
def json_safe(v: Any) -> Any:
    """Convert Arrow/numpy/Python values into JSON-serialisable ones (NaN/inf -> None, dates -> ISO strings)."""
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, np.generic):
        return json_safe(v.item())
    if isinstance(v, decimal.Decimal):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return None  # never ship bytes in results
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.ndarray):
        return [json_safe(x) for x in v.tolist()]
    return str(v)


# ----------------------------------------------------------------------------------------------------- ProductIndex
class ProductIndex:
    """A loaded index version: FAISS index + product ids + metadata + manifest."""

    def __init__(self, index, ids: Sequence[str] | pa.Array, metadata: pa.Table | None = None,
                 manifest: dict[str, Any] | None = None, *, search_params: dict[str, Any] | None = None,
                 encoder: Any = None, fuse: Callable[[str, np.ndarray], np.ndarray] | None = None,
                 path: str | os.PathLike | None = None, mmap: bool = False):
        self.index = index
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        self._ids = ids.cast(pa.string()) if isinstance(ids, pa.Array) else pa.array(list(ids), type=pa.string())
        self._pos: dict[str, int] | None = None
        self._manifest = dict(manifest or {})
        self.path = os.fspath(path) if path is not None else None
        self.mmap = mmap
        n = int(index.ntotal)
        where = f" in {self.path}" if self.path else ""
        if len(self._ids) != n:
            raise UserError(f"ids.parquet{where} has {len(self._ids)} rows but index.faiss holds {n} vectors")
        if metadata is None:
            metadata = pa.table({"product_id": self._ids})
        if metadata.num_rows != n:
            raise UserError(f"metadata.parquet{where} has {metadata.num_rows} rows but index.faiss holds {n} vectors")
        # One chunk per column: row lookups in a many-chunk table cost ~8 ms per similar() on 1M products.
        metadata = metadata.combine_chunks()
        self.metadata = metadata
        rows = metadata.drop_columns([c for c in ("product_id",) if c in metadata.column_names])
        renames = {c: f"meta_{c}" for c in rows.column_names if c in ("score", "product_id")}
        self._meta_rows = rows.rename_columns([renames.get(c, c) for c in rows.column_names]) if renames else rows
        self._knobs = tunable_knobs(index)
        params = search_params if search_params is not None else self._manifest.get("search_params")
        self._params: dict[str, Any] = dict(params) if params else current_search_params(index)
        apply_search_params(index, self._params)
        self._encoder = encoder
        self._fuse = fuse
        self._mask_cache: OrderedDict[str, tuple[np.ndarray, np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()  # the mask cache and lazy lookups may be shared by service threads
        self._direct_map_ready = False

    # ---------------------------------------------------------------------------------------------- construction
    @classmethod
    def load(cls, root: str | os.PathLike, version: str | None = None, mmap: bool = False, verify: bool = True,
             **kwargs: Any) -> "ProductIndex":
        """Load ``version`` (default: CURRENT) of the index under ``root``; checksums verified unless verify=False.

        ``mmap=True`` memory-maps the index file (resident memory = pages touched). Extra keyword arguments
        (``encoder=``, ``fuse=``, ``search_params=``) go to the constructor.
        """
        lv = _store.load_version(root, version=version, mmap=mmap, verify=verify)
        return cls(lv.index, lv.ids, lv.metadata, lv.manifest, path=lv.path, mmap=mmap, **kwargs)

    @classmethod
    def from_directory(cls, path: str | os.PathLike, mmap: bool = False, verify: bool = True,
                       **kwargs: Any) -> "ProductIndex":
        """Load a version directory directly (e.g. a staged version before it is published)."""
        lv = _store.load_version_dir(path, mmap=mmap, verify=verify)
        return cls(lv.index, lv.ids, lv.metadata, lv.manifest, path=lv.path, mmap=mmap, **kwargs)

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def version(self) -> str | None:
        return self._manifest.get("version")

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    @property
    def index_key(self) -> str | None:
        return self._manifest.get("index_key")

    @property
    def search_params(self) -> dict[str, Any]:
        return dict(self._params)

    def set_search_params(self, params: dict[str, Any]) -> None:
        self._params = dict(params)
        apply_search_params(self.index, self._params)

    @property
    def product_ids(self) -> pa.Array:
        return self._ids

    def __len__(self) -> int:
        return self.n

    def __contains__(self, product_id: object) -> bool:
        return isinstance(product_id, str) and product_id in self._positions()

    def __repr__(self) -> str:
        return f"ProductIndex(version={self.version!r}, key={self.index_key!r}, n={self.n}, dim={self.dim})"

    # ------------------------------------------------------------------------------------------------- lookups
    def _positions(self) -> dict[str, int]:
        if self._pos is None:
            with self._lock:
                if self._pos is None:
                    self._pos = {pid: i for i, pid in enumerate(self._ids.to_pylist())}
        return self._pos

    def position(self, product_id: str) -> int:
        try:
            return self._positions()[product_id]
        except (KeyError, TypeError):
            raise UnknownProductError(
                f"unknown product_id {product_id!r}: not in index version {self.version or '?'} "
                f"({self.n} products); check the id or rebuild the index") from None

    def vectors_at(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of FAISS ids ``positions`` (what ``similar()`` queries with)."""
        pos = np.ascontiguousarray(np.asarray(positions, dtype=np.int64).reshape(-1))
        if len(pos) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            out = self.index.reconstruct_batch(pos)
        except RuntimeError:
            if self._direct_map_ready:
                raise
            self._ensure_direct_map()
            out = self.index.reconstruct_batch(pos)
        return np.ascontiguousarray(out, dtype=np.float32).reshape(len(pos), self.dim)

    def _ensure_direct_map(self) -> None:
        import faiss
        self._direct_map_ready = True
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError:
            raise UserError(f"index {self.index_key!r} cannot return stored vectors (needed by similar()); "
                            f"rebuild with a key that can (Flat, HNSW, IVF, or add ',RFlat')") from None
        log.info("building the IVF direct map (%d ids) to look up stored vectors", self.n)
        ivf.make_direct_map()

    def vector(self, product_id: str) -> np.ndarray:
        return self.vectors_at([self.position(product_id)])[0]

    # ------------------------------------------------------------------------------------------------- filters
    def _filter_mask(self, filters: Any) -> tuple[Filter, np.ndarray | None, np.ndarray | None, int]:
        flt = parse_filters(filters)
        if not flt:
            return flt, None, None, self.n
        key = flt.key
        with self._lock:
            hit = self._mask_cache.get(key)
            if hit is not None:
                self._mask_cache.move_to_end(key)
        if hit is None:
            mask = _evaluate_filter(flt, self.metadata)
            mask.setflags(write=False)
            bitmap = np.packbits(mask, bitorder="little")
            hit = (mask, bitmap, int(mask.sum()))
            with self._lock:
                self._mask_cache[key] = hit
                while len(self._mask_cache) > _MASK_CACHE_SIZE:
                    self._mask_cache.popitem(last=False)
        return flt, hit[0], hit[1], hit[2]

    def count(self, filters: Any = None) -> int:
        """How many products match ``filters``."""
        return self._filter_mask(filters)[3]

    # -------------------------------------------------------------------------------------------- core search
    def _exact(self, Q: np.ndarray, k: int, candidates: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over ``candidates`` (positions; None = all) by reconstructing their vectors."""
        m = Q.shape[0]
        best_D = np.full((m, k), -np.inf, dtype=np.float32)
        best_I = np.full((m, k), -1, dtype=np.int64)
        total = self.n if candidates is None else len(candidates)
        chunk = 65536
        for s in range(0, total, chunk):
            pos = np.arange(s, min(total, s + chunk), dtype=np.int64) if candidates is None else candidates[s:s + chunk]
            S = Q @ self.vectors_at(pos).T
            D = np.concatenate([best_D, S.astype(np.float32)], axis=1)
            I = np.concatenate([best_I, np.broadcast_to(pos, (m, len(pos)))], axis=1)
            if D.shape[1] > k:
                part = np.argpartition(-D, k - 1, axis=1)[:, :k]
                D, I = np.take_along_axis(D, part, 1), np.take_along_axis(I, part, 1)
            order = np.argsort(-D, axis=1, kind="stable")
            best_D, best_I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
        best_I[~np.isfinite(best_D)] = -1
        return best_D, best_I

    def _search_core(self, Q: np.ndarray, k: int, mask: np.ndarray | None, bitmap: np.ndarray | None,
                     n_match: int, params: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (D, I) for query rows ``Q`` among the products in ``mask`` (None = all).

        Rows come back with min(k, n_match) valid results: approximate search with the tuned parameters, widened
        when short, then exact ranking over the candidates for rows that are still short.
        """
        import faiss
        m = Q.shape[0]
        k_eff = min(k, n_match)
        D_out = np.full((m, k), -np.inf, dtype=np.float32)
        I_out = np.full((m, k), -1, dtype=np.int64)
        if m == 0 or k_eff <= 0:
            return D_out, I_out
        candidates = None if mask is None else np.flatnonzero(mask)
        if mask is not None and n_match <= EXACT_SUBSET_MAX:
            D, I = self._exact(Q, k_eff, candidates)
            D_out[:, :k_eff], I_out[:, :k_eff] = D, I
            return D_out, I_out
        sel = None
        if bitmap is not None:
            sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        cur = dict(self._params if params is None else params)
        todo = np.arange(m)
        for attempt in range(MAX_ESCALATIONS + 1):
            sp = SearchParameters(self.index, cur, sel, keep=bitmap)
            try:
                D, I = self.index.search(np.ascontiguousarray(Q[todo]), k_eff, params=sp.params)
            except RuntimeError as e:
                if sel is None:
                    raise
                log.debug("index refused an ID selector (%s); ranking the filtered candidates exactly", e)
                break
            del sp
            D_out[todo, :k_eff], I_out[todo, :k_eff] = D, I
            short = (I >= 0).sum(axis=1) < k_eff
            todo = todo[short]
            if len(todo) == 0:
                return D_out, I_out
            nxt = escalate_params(cur, self._knobs)
            if nxt is None:
                break
            cur = nxt
        if len(todo):
            D, I = self._exact(Q[todo], k_eff, candidates)
            D_out[todo, :k_eff], I_out[todo, :k_eff] = D, I
        return D_out, I_out

    def similar_positions(self, positions: Sequence[int] | np.ndarray, k: int, filters: Any = None,
                          params: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the k most similar products to each of ``positions``, the product itself
        excluded; -1 / -inf pad rows with fewer than k matches. ``similar()`` and the build's recall tuning both
        go through here."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        _, mask, bitmap, n_match = self._filter_mask(filters)
        Q = self.vectors_at(pos)
        D, I = self._search_core(Q, k + 1, mask, bitmap, n_match, params)
        keep = (I >= 0) & (I != pos[:, None])
        out_D = np.full((len(pos), k), -np.inf, dtype=np.float32)
        out_I = np.full((len(pos), k), -1, dtype=np.int64)
        for r in range(len(pos)):
            sel = np.flatnonzero(keep[r])[:k]
            out_D[r, :len(sel)], out_I[r, :len(sel)] = D[r, sel], I[r, sel]
        return out_D, out_I

    def _rows(self, D: np.ndarray, I: np.ndarray) -> list[list[dict[str, Any]]]:
        valid = I >= 0
        flat = I[valid]
        ids = self._ids.take(pa.array(flat, type=pa.int64())).to_pylist() if len(flat) else []
        metas = (self._meta_rows.take(pa.array(flat, type=pa.int64())).to_pylist()
                 if len(flat) and self._meta_rows.num_columns else [{} for _ in flat])
        out: list[list[dict[str, Any]]] = []
        j = 0
        for r in range(I.shape[0]):
            row: list[dict[str, Any]] = []
            for c in np.flatnonzero(valid[r]):
                rec = {"product_id": ids[j], "score": json_safe(float(D[r, c]))}
                for key, value in metas[j].items():
                    rec[key] = json_safe(value)
                row.append(rec)
                j += 1
            out.append(row)
        return out

    # ------------------------------------------------------------------------------------------------ public API
    def similar(self, product_id: str, k: int = 10, filters: Any = None) -> list[dict[str, Any]]:
        """The ``k`` products most similar to ``product_id`` (itself excluded), optionally filtered."""
        return self.similar_batch([product_id], k=k, filters=filters)[0]

    def similar_batch(self, product_ids: Iterable[str], k: int = 10, filters: Any = None) -> list[list[dict[str, Any]]]:
        _check_k(k)
        pos = [self.position(p) for p in product_ids]
        if not pos:
            return []
        D, I = self.similar_positions(pos, k, filters)
        return self._rows(D, I)

    def search(self, vector: Any = None, *, text: str | None = None, image: Any = None, k: int = 10,
               filters: Any = None) -> list[dict[str, Any]]:
        """Search by exactly one of ``vector`` (dim floats), ``text`` (str) or ``image`` (bytes or a file path)."""
        given = [name for name, v in (("vector", vector), ("text", text), ("image", image)) if v is not None]
        if len(given) != 1:
            raise UserError(f"search: pass exactly one of vector=, text=, image= (got {', '.join(given) or 'none'})")
        if vector is not None:
            q = self._check_query(vector, "vector")
        else:
            q = self.query_vector(text=text, image=image)
        return self.search_batch(q[None, :], k=k, filters=filters)[0]

    def search_batch(self, vectors: Any, k: int = 10, filters: Any = None) -> list[list[dict[str, Any]]]:
        """One result list per row of ``vectors`` (m, dim)."""
        _check_k(k)
        Q = self._check_query(vectors, "vector", batch=True)
        _, mask, bitmap, n_match = self._filter_mask(filters)
        D, I = self._search_core(Q, k, mask, bitmap, n_match)
        return self._rows(D, I)

    # ------------------------------------------------------------------------------------------- query vectors
    def _check_query(self, vector: Any, what: str, batch: bool = False) -> np.ndarray:
        try:
            q = np.array(vector, dtype=np.float32)
        except (TypeError, ValueError):
            raise UserError(f"query {what} is not a list of numbers") from None
        if batch and q.ndim == 1:
            q = q[None, :]
        if (not batch and q.ndim == 2 and q.shape[0] == 1):
            q = q[0]
        if (batch and q.ndim != 2) or (not batch and q.ndim != 1) or q.shape[-1] != self.dim:
            raise UserError(f"query {what} has shape {tuple(q.shape)}, expected ({'m, ' if batch else ''}{self.dim},) "
                            f"for this index (dim {self.dim})")
        if not np.isfinite(q).all():
            raise UserError(f"query {what} contains NaN or inf")
        norms = np.linalg.norm(q, axis=-1, keepdims=True)
        if (norms < 1e-12).any():
            raise UserError(f"query {what} is all zeros")
        return np.ascontiguousarray(q / norms, dtype=np.float32)

    @property
    def model(self) -> dict[str, Any]:
        """The embedding model provenance recorded in the manifest (model_id, random_init, fusion, dims ...)."""
        model = dict(self._manifest.get("model") or {})
        for key in ("model_id", "random_init"):
            if key not in model and key in self._manifest:
                model[key] = self._manifest[key]
        return model

    def _get_encoder(self) -> Any:
        if self._encoder is None:
            model = self.model
            if not model.get("model_id"):
                raise UserError(f"index version {self.version or '?'} records no embedding model, so text/image "
                                f"queries are impossible; rebuild from embeddings that carry provenance, or query "
                                f"by --product-id / --vector-file")
            try:
                from embedders.encoder import load_query_encoder
            except ImportError as e:
                raise UserError(f"text/image queries need embedders.encoder.load_query_encoder, which is not "
                                f"available here ({e}); query by product id or vector instead") from None
            if model.get("random_init"):
                log.warning("the index was built with a RANDOM-INIT model (%s): text/image results are meaningless",
                            model.get("model_id"))
            log.info("loading query encoder for %s", model.get("model_id"))
            self._encoder = load_query_encoder(_with_spec(model))
        return self._encoder

    def _fuse_query(self, modality: str, vec: np.ndarray) -> np.ndarray:
        if self._fuse is not None:
            return np.asarray(self._fuse(modality, vec), dtype=np.float32)
        model = self.model
        try:
            from embedders.fusion import query_vector
        except ImportError:
            if vec.shape[-1] == self.dim:
                return vec
            raise UserError(f"the {modality} embedding has dim {vec.shape[-1]} but the index has dim {self.dim} and "
                            f"embedders.fusion.query_vector is not available to map it into the fused space") from None
        kwargs = {"aligned": bool(_aligned(model))} if _aligned(model) is not None else {}
        try:
            out = query_vector(modality, vec, model.get("fusion"), model.get("modality_dims"), **kwargs)
        except ValueError as e:
            raise UserError(f"cannot map the {modality} query into this index's vector space: {e}") from None
        return np.asarray(out, dtype=np.float32)

    def query_vector(self, *, text: str | None = None, image: Any = None) -> np.ndarray:
        """The fused, normalised index-space vector for a text or image query (model from the manifest)."""
        if (text is None) == (image is None):
            raise UserError("query_vector: pass exactly one of text= or image=")
        enc = self._get_encoder()
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise UserError("text query is empty")
            vec = enc.encode_texts([text])
            modality = "text"
        else:
            data = _image_bytes(image)
            vec = enc.encode_images([data])
            modality = "image"
        vec = np.asarray(vec, dtype=np.float32)
        vec = vec[0] if vec.ndim == 2 else vec
        return self._check_query(self._fuse_query(modality, vec), f"{modality} embedding")


def _with_spec(model: dict[str, Any]) -> dict[str, Any]:
    """The embed provenance nests the model spec (``{"model": {"spec": ...}}``); lift it to ``model["spec"]``."""
    nested = model.get("model") if isinstance(model.get("model"), dict) else {}
    if "spec" not in model and isinstance(nested.get("spec"), dict):
        return {**model, "spec": nested["spec"]}
    return model


def _aligned(model: dict[str, Any]) -> bool | None:
    nested = model.get("model") if isinstance(model.get("model"), dict) else {}
    value = model.get("aligned", nested.get("aligned"))
    return None if value is None else bool(value)


def _check_k(k: Any) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise UserError(f"k must be a positive integer, got {k!r}")


def _image_bytes(image: Any) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        p = Path(image)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise UserError(f"--image {p}: cannot read ({e.strerror or e})") from None
    else:
        raise UserError(f"image query must be bytes or a file path, got {type(image).__name__}")
    if not data:
        raise UserError("image query is empty (0 bytes)")
    return data
