"""Sharded FAISS build as an Apache Beam job (the scale-out path of ``shopvec index``).

The autofaiss / FAISS ``demo_ondisk_ivf`` recipe, with Beam as the cluster::

    driver   plan contiguous shards from the Parquet row groups (FAISS id = global row position, as the
             single-process build numbers them) -> train the IVF coarse quantizer (+ PQ / OPQ / SQ when the key
             has them) on a seeded sample -> faiss.serialize_index -> ``WORK/trained.faiss``
    Beam     Create(shard plan) -> Reshuffle -> AddShard: every worker reads the trained *empty* index bytes once
             (setup), deserialises a fresh copy per shard, streams its row groups into it with
             ``add_with_ids(positions)`` and writes ``WORK/shards/shard-NNNNN.faiss`` (temp + rename, so a retried
             bundle rewrites the same file) -> ToList -> ``WORK/shards/_done.json``
    driver   merge the shards in shard order: in RAM (``merge_into``) or into on-disk inverted lists
             (``index.ivfdata``, the bytes ``faiss.contrib.ondisk.merge_ondisk`` writes, one shard at a time;
             memory-mapped at query time) -> tune and publish through ``index.store`` like the single-process build
             (:func:`build_and_publish_sharded`, what ``shopvec index --runner ...`` runs).

Merging the shards in shard order appends each inverted list's entries in global-position order, which is exactly
the order a single-process ``add`` produces, so for the same trained index the sharded result is the same index:
the same inverted lists (ids and codes), hence the same search results, distances included
(``tests/test_index_build_sharded.py`` checks it on every runner of the portability matrix).

Only IVF families shard (the coarse quantizer gives every worker the same partition); ``Flat`` and ``HNSW`` keys
are built by the single-process path. Nothing here pickles a FAISS object: the trained index travels as
``faiss.serialize_index`` bytes through the work directory (a ``gs://``/``s3://``/HDFS path on a cluster, read with
Beam ``FileSystems``), shard indexes the same way.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from embedders.errors import UserError

log = logging.getLogger(__name__)

NS = "shopvec_index"
VECTOR_COLUMN = "vector"
ID_COLUMN = "product_id"
TRAINED_NAME = "trained.faiss"
SHARDS_DIR = "shards"
DONE_NAME = "_done.json"
IVFDATA_NAME = "index.ivfdata"  # basename kept when published: read back with IO_FLAG_ONDISK_SAME_DIR
DEFAULT_ROWS_PER_SHARD = 250_000


# ------------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class Piece:
    """One Parquet row group: ``rows`` vectors whose FAISS ids start at ``start``."""
    path: str
    row_group: int
    start: int
    rows: int


@dataclass(frozen=True)
class ShardTask:
    """A contiguous range ``[start, stop)`` of FAISS ids, made of whole row groups."""
    shard: int
    start: int
    stop: int
    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class Plan:
    paths: list[str]
    dim: int
    num_rows: int
    pieces: list[Piece]
    shards: list[ShardTask]


def _open_parquet(path: str):
    import pyarrow.parquet as pq

    if "://" in path and not path.startswith("file://"):
        from apache_beam.io.filesystems import FileSystems

        return pq.ParquetFile(FileSystems.open(path))
    return pq.ParquetFile(path[len("file://"):] if path.startswith("file://") else path)


def embeddings_files(spec: str) -> list[str]:
    """The Parquet files behind ``--embeddings``, in the order the single-process build numbers them.

    Local paths go through ``index.embeddings_io.resolve_embedding_files`` (the embed output ``OUT``, a folder or a
    glob; the same files, the same order as ``read_embeddings``); remote URIs (``gs://``...) through Beam
    ``FileSystems`` (every ``*.parquet`` below the prefix, sorted).
    """
    if "://" in spec and not spec.startswith("file://"):
        from apache_beam.io.filesystems import FileSystems

        from .catalog import resolve_paths

        base = spec.rstrip("/")
        if not any(c in base for c in "*?[") and not base.endswith(".parquet"):
            # the embed output OUT: only OUT/embeddings/*.parquet (not dead_letters/)
            if FileSystems.match([base + "/embeddings/*.parquet"])[0].metadata_list:
                base = base + "/embeddings/*.parquet"
        return [p for p in resolve_paths(base, "embeddings") if not os.path.basename(p).startswith((".", "_"))]
    from index.embeddings_io import resolve_embedding_files

    files, _report = resolve_embedding_files(spec[len("file://"):] if spec.startswith("file://") else spec)
    return [os.fspath(f) for f in files]


def vector_dim(path: str, column: str = VECTOR_COLUMN) -> int:
    import pyarrow as pa

    schema = _open_parquet(path).schema_arrow
    if column not in schema.names:
        raise UserError(f"{path}: no {column!r} column; expected the embed pipeline's output "
                        f"(fixed_size_list<float32, D>)")
    t = schema.field(column).type
    if not pa.types.is_fixed_size_list(t) or not pa.types.is_floating(t.value_type):
        raise UserError(f"{path}: column {column!r} has type {t}; expected fixed_size_list<float32, D>")
    return int(t.list_size)


def plan_shards(paths: Sequence[str], rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                column: str = VECTOR_COLUMN) -> Plan:
    """Row groups of ``paths`` (in the given order) grouped into contiguous shards of about ``rows_per_shard``.

    FAISS id = position in the concatenation of the files in sorted order, row order inside: the numbering of
    ``ids.parquet``. Every file must hold vectors of the same dimension (checked from the schemas; nothing read).
    """
    if rows_per_shard < 1:
        raise UserError(f"rows per shard must be >= 1, got {rows_per_shard}")
    if not paths:
        raise UserError("no embeddings files to index")
    dim = None
    pieces: list[Piece] = []
    pos = 0
    for path in paths:
        d = vector_dim(path, column)
        if dim is None:
            dim = d
        elif d != dim:
            raise UserError(f"{path}: vectors have dimension {d} but {paths[0]} has {dim}; "
                            f"all shards must come from the same embed run/config")
        md = _open_parquet(path).metadata
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            if n:
                pieces.append(Piece(path, rg, pos, n))
                pos += n
    if pos == 0:
        raise UserError(f"{paths[0]}: the embeddings are empty (0 vectors); nothing to index")
    shards: list[ShardTask] = []
    cur: list[Piece] = []
    for pc in pieces:
        cur.append(pc)
        if sum(p.rows for p in cur) >= rows_per_shard:
            shards.append(ShardTask(len(shards), cur[0].start, cur[-1].start + cur[-1].rows, tuple(cur)))
            cur = []
    if cur:
        shards.append(ShardTask(len(shards), cur[0].start, cur[-1].start + cur[-1].rows, tuple(cur)))
    return Plan(list(paths), int(dim), pos, pieces, shards)


# ------------------------------------------------------------------------------------------------ reading vectors
def read_piece(piece: Piece, dim: int, column: str = VECTOR_COLUMN) -> np.ndarray:
    return _read_piece(piece, dim, column)[0]


def _read_piece(piece: Piece, dim: int, column: str = VECTOR_COLUMN) -> tuple[np.ndarray, int]:
    """One row group's vectors as a C-contiguous ``(rows, dim)`` float32 array and how many rows were re-normalised.

    Null rows raise here; NaN / inf / all-zero rows and normalisation go through ``check_unit_rows``, the check
    ``read_embeddings`` uses, so a sharded build indexes the very vectors the single-process build indexes."""
    from index.embeddings_io import check_unit_rows

    tbl = _open_parquet(piece.path).read_row_group(piece.row_group, columns=[column, ID_COLUMN], use_threads=False)
    col = tbl.column(column).combine_chunks()
    ids = tbl.column(ID_COLUMN)
    if col.null_count:
        bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise UserError(f"{piece.path}: field {column!r} is null for product_id {ids[bad].as_py()!r} "
                        f"(row group {piece.row_group}, row {bad}); every product needs a fused vector")
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    x, off = check_unit_rows(piece.path, x, ids, column, row_prefix=f"row group {piece.row_group}, ")
    x = np.array(x, dtype=np.float32, order="C", copy=True)  # own the data: the Arrow buffers can go now
    del tbl, col, ids
    _release_arrow_memory()
    return x, off


def _release_arrow_memory() -> None:
    """Hand memory Arrow's allocator keeps cached (decompression buffers of the last row group) back to the OS, so
    the resident set of a long add follows the data actually held, not the high-water mark of reading."""
    import pyarrow as pa

    try:
        pa.default_memory_pool().release_unused()
    except Exception:  # noqa: BLE001 - an allocator without the call: nothing to release
        pass


def sample_vectors(plan: Plan, n_sample: int, seed: int = 0, column: str = VECTOR_COLUMN) -> np.ndarray:
    """``n_sample`` vectors drawn uniformly (seeded) from all of them, reading row group by row group.

    Memory: the sample plus one row group at a time.
    """
    n_sample = min(int(n_sample), plan.num_rows)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(plan.num_rows, size=n_sample, replace=False)) if n_sample < plan.num_rows \
        else np.arange(plan.num_rows)
    out = np.empty((n_sample, plan.dim), np.float32)
    k = 0
    for pc in plan.pieces:
        lo, hi = np.searchsorted(chosen, [pc.start, pc.start + pc.rows])
        if hi <= lo:
            continue
        x = read_piece(pc, plan.dim, column)
        rows = chosen[lo:hi] - pc.start
        out[k:k + len(rows)] = x[rows]
        k += len(rows)
    assert k == n_sample
    return out


# ------------------------------------------------------------------------------------------------ FAISS helpers
def shardable(key: str) -> bool:
    """IVF families only (the trained coarse quantizer gives every worker the same partition), without a refine
    stage (``RFlat`` / ``Refine(...)`` keep a second, position-addressed store that shards do not merge)."""
    import re

    k = key.replace(" ", "")
    return (bool(re.search(r"(^|,)IVF\d+", k)) and "HNSW" not in k.split(",")[-1]
            and "RFlat" not in k and "Refine" not in k and "IDMap" not in k)


def train_empty_index(sample: np.ndarray, key: str, config=None) -> bytes:
    """Train ``key`` (inner product; ``index.build.create_index`` settings) on ``sample`` and return it, empty,
    serialised with ``faiss.serialize_index``."""
    from index.build import BuildConfig, create_index

    if not shardable(key):
        raise UserError(f"index key {key!r}: only IVF families can be built sharded (the trained coarse quantizer "
                        f"is what the workers share); use the single-process build for Flat/HNSW")
    index = create_index(key, int(sample.shape[1]), len(sample), config or BuildConfig())
    t0 = time.time()
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    log.info("trained %s on %d vectors in %.1fs", key, len(sample), time.time() - t0)
    assert index.ntotal == 0
    return serialize(index)


def deserialize(blob: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))


def serialize(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def add_pieces(index, pieces: Iterable[Piece], dim: int, column: str = VECTOR_COLUMN) -> int:
    """Stream row groups into ``index`` with their global positions as ids; returns the number added."""
    n = 0
    for pc in pieces:
        x = read_piece(pc, dim, column)
        index.add_with_ids(x, np.arange(pc.start, pc.start + len(x), dtype=np.int64))
        n += len(x)
    return n


def _write_bytes(path: str, data: bytes) -> None:
    """Write through Beam FileSystems (local, gs://, s3://, hdfs://) via a temp name + rename."""
    from apache_beam.io.filesystems import FileSystems

    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp) as fh:
        fh.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def write_index_to(index, path: str) -> None:
    """``faiss.write_index`` to a local path or, through a local temp file, to any Beam FileSystems URI; atomic
    (temp name + rename) so a retried bundle simply rewrites the same shard. No in-memory copy of the index."""
    import faiss

    if "://" not in path or path.startswith("file://"):
        local = path[len("file://"):] if path.startswith("file://") else path
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        faiss.write_index(index, tmp)
        os.replace(tmp, local)
        return
    from apache_beam.io.filesystems import FileSystems

    with tempfile.NamedTemporaryFile(prefix="shopvec-shard-", suffix=".faiss") as tmp:
        faiss.write_index(index, tmp.name)
        remote_tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp.name, "rb") as src, FileSystems.create(remote_tmp) as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([remote_tmp], [path])


def _read_bytes(path: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as fh:
        return fh.read()


def _join(base: str, *parts: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(base, *parts)


# ------------------------------------------------------------------------------------------------ the Beam job
class AddShard(beam.DoFn):
    """ShardTask -> ``{"shard", "path", "ntotal", "start", "stop", "seconds", "worker"}``.

    The trained empty index arrives as serialised bytes read once per DoFn instance (``setup``) from the work
    directory; each shard gets a fresh deserialised copy. Counters: ``shopvec_index/vectors_added``,
    ``shards_added`` and ``shards.process.<host>:<pid>`` (which worker process built which shards).
    """

    def __init__(self, trained_path: str, shard_dir: str, dim: int, column: str = VECTOR_COLUMN,
                 faiss_threads: int = 0):
        self._trained_path = trained_path
        self._shard_dir = shard_dir
        self._dim = dim
        self._column = column
        self._threads = faiss_threads

    def setup(self):
        import faiss

        if self._threads > 0:
            faiss.omp_set_num_threads(self._threads)
        self._trained = _read_bytes(self._trained_path)

    def process(self, task: ShardTask):
        import socket

        t0 = time.time()
        index = deserialize(self._trained)
        if index.ntotal != 0 or not index.is_trained:
            raise RuntimeError(f"{self._trained_path}: expected a trained, empty index")
        try:
            n = add_pieces(index, task.pieces, self._dim, self._column)
        except UserError as e:  # bad data: reported by the driver as one line, nothing is published
            Metrics.counter(NS, "bad_shards").inc()
            yield {"shard": task.shard, "error": str(e)}
            return
        if n != task.rows:
            raise RuntimeError(f"shard {task.shard}: added {n} vectors, planned {task.rows}")
        path = _join(self._shard_dir, f"shard-{task.shard:05d}.faiss")
        write_index_to(index, path)
        ntotal = int(index.ntotal)
        del index
        worker = f"{socket.gethostname()}:{os.getpid()}"
        Metrics.counter(NS, "vectors_added").inc(n)
        Metrics.counter(NS, "shards_added").inc()
        Metrics.counter(NS, f"shards.process.{worker}").inc()
        yield {"shard": task.shard, "path": path, "ntotal": ntotal, "start": task.start,
               "stop": task.stop, "seconds": round(time.time() - t0, 3), "worker": worker}


def _write_done(results: list[dict], done_path: str) -> int:
    _write_bytes(done_path, json.dumps(sorted(results, key=lambda r: r["shard"]), indent=1).encode())
    return len(results)


def build_add_pipeline(p, plan: Plan, trained_path: str, shard_dir: str, column: str = VECTOR_COLUMN,
                       faiss_threads: int = 0):
    """The Beam graph: shard plan -> parallel AddShard -> one ``_done.json`` listing every shard file."""
    return (p
            | "ShardPlan" >> beam.Create(plan.shards)
            | "Spread" >> beam.Reshuffle()
            | "AddShard" >> beam.ParDo(AddShard(trained_path, shard_dir, plan.dim, column, faiss_threads))
            | "CollectShards" >> beam.combiners.ToList()
            | "WriteDone" >> beam.Map(_write_done, _join(shard_dir, DONE_NAME)))


def _pipeline_for(runner: str, beam_args: Sequence[str]):
    """Same conventions as the embed pipeline (explicit runner, options passed through unchanged), without
    importing it (the embed module pulls in torch; an index build has no use for it)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    opts = PipelineOptions(list(beam_args), runner=None if runner == "FnApiRunner" else runner,
                           save_main_session=False, pickle_library="cloudpickle")
    if runner == "FnApiRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=opts)
    return beam.Pipeline(runner=runner, options=opts)


def run_add_shards(plan: Plan, trained: bytes, work_dir: str, runner: str = "FnApiRunner",
                   beam_args: Sequence[str] = (), column: str = VECTOR_COLUMN,
                   faiss_threads: int = 0) -> dict[str, Any]:
    """Run the add step on ``runner``; returns ``{"shards": [...], "metrics": {...}, "seconds": s}``."""
    from apache_beam.metrics.metric import MetricsFilter

    trained_path = _join(work_dir, TRAINED_NAME)
    shard_dir = _join(work_dir, SHARDS_DIR)
    _write_bytes(trained_path, trained)
    t0 = time.time()
    p = _pipeline_for(runner, beam_args)
    build_add_pipeline(p, plan, trained_path, shard_dir, column, faiss_threads)
    result = p.run()
    state = result.wait_until_finish()
    if str(state) not in ("DONE", "PipelineState.DONE"):
        raise RuntimeError(f"sharded add pipeline ended in state {state}")
    shards = json.loads(_read_bytes(_join(shard_dir, DONE_NAME)))
    errors = [s["error"] for s in shards if "error" in s]
    if errors:
        raise UserError(errors[0] + (f" (and {len(errors) - 1} more shard(s) with bad vectors)"
                                     if len(errors) > 1 else ""))
    metrics: dict[str, int] = {}
    try:
        for c in result.metrics().query(MetricsFilter().with_namespace(NS)).get("counters", []):
            v = c.committed if c.committed is not None else c.attempted
            metrics[c.key.metric.name] = metrics.get(c.key.metric.name, 0) + int(v or 0)
    except Exception:  # noqa: BLE001 - a runner without metrics still returns the shard list
        pass
    got = [s["shard"] for s in shards]
    if got != list(range(len(plan.shards))):
        raise RuntimeError(f"sharded add: expected shards 0..{len(plan.shards) - 1}, got {got}")
    if sum(s["ntotal"] for s in shards) != plan.num_rows:
        raise RuntimeError(f"sharded add: {sum(s['ntotal'] for s in shards)} vectors in shards, "
                           f"{plan.num_rows} planned")
    return {"shards": shards, "metrics": metrics, "seconds": round(time.time() - t0, 3)}


# ------------------------------------------------------------------------------------------------ merging
def _local_copy(path: str, tmp_dir: str) -> str:
    """A local file path for ``path`` (remote shards are downloaded; FAISS mmap needs a local file)."""
    if "://" not in path or path.startswith("file://"):
        return path[len("file://"):] if path.startswith("file://") else path
    local = os.path.join(tmp_dir, os.path.basename(path))
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    return local


def merge_in_ram(trained: bytes, shard_paths: Sequence[str]):
    """``merge_into`` every shard, in shard order, into a copy of the trained empty index (the index lives in RAM)."""
    import faiss

    index = deserialize(trained)
    ivf = faiss.extract_index_ivf(index)
    with tempfile.TemporaryDirectory(prefix="shopvec-merge-") as tmp:
        for path in shard_paths:
            shard = faiss.read_index(_local_copy(path, tmp))
            ivf.merge_from(faiss.extract_index_ivf(shard), 0)  # ids kept: they already are global positions
            del shard
    index.ntotal = ivf.ntotal
    return index


def _ondisk_layout(sizes: np.ndarray, code_size: int) -> np.ndarray:
    """Byte offset of every list in an ``OnDiskInvertedLists`` file laid out compactly, as
    ``OnDiskInvertedLists::merge_from_multiple`` / ``set_all_lists_sizes`` lay it out: list j = its codes
    (``size * code_size`` bytes) then its ids (``size * 8`` bytes), lists back to back in list order."""
    per = sizes.astype(np.int64) * (code_size + 8)
    return np.concatenate([[0], np.cumsum(per)[:-1]]).astype(np.int64)


def merge_on_disk(trained: bytes, shard_paths: Sequence[str], ivfdata_path: str, method: str = "stream"):
    """Merge shards, in shard order, into on-disk inverted lists at ``ivfdata_path``.

    ``method="faiss"``: ``faiss.contrib.ondisk.merge_ondisk`` (every shard memory-mapped at once, the output
    written through a shared writable mapping: the process's resident set grows with the data while it runs).
    ``method="stream"`` (default): the same file, byte for byte (``tests/test_index_build_sharded.py`` compares
    them), written one shard at a time with ``pwrite`` into the compact layout ``merge_ondisk`` produces, so the
    merge's memory is bounded by one shard, not by the index. Either way the returned index holds only the
    quantizer and the list directory in RAM; write it next to ``ivfdata_path`` and read it back with
    ``IO_FLAG_ONDISK_SAME_DIR`` (see :func:`read_index`).
    """
    import faiss

    index = deserialize(trained)
    ivf = faiss.extract_index_ivf(index)
    if ivf.ntotal:
        raise ValueError("merge_on_disk needs the trained *empty* index")
    with tempfile.TemporaryDirectory(prefix="shopvec-merge-") as tmp:
        local = [_local_copy(p, tmp) for p in shard_paths]
        if method == "faiss":
            from faiss.contrib.ondisk import merge_ondisk

            merge_ondisk(index, local, ivfdata_path)
            return index
        if method != "stream":
            raise ValueError(f"unknown merge method {method!r}")
        nlist, code_size = int(ivf.nlist), int(ivf.code_size)
        per_shard = []
        for path in local:  # pass 1: list sizes only (the list directory; no codes are touched)
            shard = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            il = faiss.extract_index_ivf(shard).invlists
            if il.nlist != nlist or il.code_size != code_size:
                raise ValueError(f"{path}: shard has nlist={il.nlist} code_size={il.code_size}, "
                                 f"the trained index {nlist}/{code_size}")
            per_shard.append(np.array([il.list_size(j) for j in range(nlist)], dtype=np.int64))
            del il, shard
        sizes = np.sum(per_shard, axis=0).astype(np.int64)
        offsets = _ondisk_layout(sizes, code_size)
        total_bytes = int(offsets[-1] + sizes[-1] * (code_size + 8))
        filled = np.zeros(nlist, dtype=np.int64)
        fd = os.open(ivfdata_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, total_bytes)
            for path, ns in zip(local, per_shard):  # pass 2: one shard mapped at a time
                shard = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
                il = faiss.extract_index_ivf(shard).invlists
                for j in np.flatnonzero(ns):
                    n = int(ns[j])
                    codes = faiss.rev_swig_ptr(il.get_codes(int(j)), n * code_size)
                    ids = faiss.rev_swig_ptr(il.get_ids(int(j)), n)
                    base = int(offsets[j])
                    os.pwrite(fd, memoryview(codes), base + int(filled[j]) * code_size)
                    os.pwrite(fd, memoryview(ids.view(np.uint8)),
                              base + int(sizes[j]) * code_size + int(filled[j]) * 8)
                    filled[j] += n
                del il, shard  # unmaps the shard
            os.fsync(fd)
        finally:
            os.close(fd)
        assert (filled == sizes).all()
    od = faiss.OnDiskInvertedLists(nlist, code_size, ivfdata_path)
    sizes_t = np.ascontiguousarray(sizes.astype(np.uint64))
    od.set_all_lists_sizes(faiss.swig_ptr(sizes_t))
    od.totsize = total_bytes
    od.read_only = True  # mapped PROT_READ: nothing can write through to a file a published version hard-links
    od.do_mmap()
    ivf.replace_invlists(od, True)
    od.this.disown()
    index.ntotal = ivf.ntotal = int(sizes.sum())
    return index


def write_index(index, path: str) -> None:
    import faiss

    faiss.write_index(index, path)


def read_index(path: str, mmap: bool = False):
    """Read an index written here; on-disk inverted lists are found next to it (``IO_FLAG_ONDISK_SAME_DIR``)."""
    import faiss

    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_MMAP if mmap else 0)
    return faiss.read_index(path, flags)


def has_ondisk_lists(index) -> bool:
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


# ------------------------------------------------------------------------------------------------ one call
@dataclass
class ShardedBuild:
    index: Any  # faiss.Index (merged; on-disk lists when ivfdata is set)
    key: str
    dim: int
    ntotal: int
    ivfdata: str | None
    report: dict[str, Any]


# Memory of a process before any data, measured on this project's lock file (CPython 3.11, numpy, pyarrow 25,
# faiss-gpu 1.15 -- its CUDA libraries alone map ~170 MiB --, Beam 2.77): ~230 MiB anonymous + shared libraries for
# an SDK worker; the driver also runs the FnApi runner / job service (~340 MiB anonymous).
WORKER_BASE_BYTES = 300 << 20
DRIVER_BASE_BYTES = 360 << 20


def code_size(key: str, dim: int) -> int:
    """Bytes per vector in the inverted lists of ``key`` (known before training)."""
    import faiss

    return int(faiss.extract_index_ivf(faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)).code_size)


def rows_per_shard_for_budget(budget_bytes: int, workers: int, dim: int, key: str, row_group_rows: int = 4096,
                              train_rows: int | None = None) -> int:
    """The largest shard that keeps driver + ``workers`` worker processes on one machine under ``budget_bytes``.

    Per worker: its base, one row group being read (Parquet decoding + Arrow + numpy: 3 x rows x dim x 4) and its
    shard's inverted lists (2 x rows x (code + id): ``std::vector`` growth). Driver: its base and the training
    sample (and, while merging on disk, one memory-mapped shard, which is smaller than a worker's peak).
    Conservative: the peaks are summed although training and adding never overlap.
    """
    per_vec = code_size(key, dim) + 8
    sample = (train_rows or 0) * dim * 4
    free = budget_bytes - DRIVER_BASE_BYTES - sample - workers * (WORKER_BASE_BYTES + 3 * row_group_rows * dim * 4)
    rows = int(free // (workers * 2 * per_vec)) if free > 0 else 0
    if rows < max(1000, row_group_rows):
        raise UserError(f"memory budget {budget_bytes / (1 << 20):.0f} MiB is too small for {workers} workers "
                        f"building {key} on {dim}-d vectors (each worker needs about "
                        f"{(WORKER_BASE_BYTES + 3 * row_group_rows * dim * 4) / (1 << 20):.0f} MiB before its "
                        f"shard); raise --max-memory or use fewer workers")
    return rows


def build_sharded(embeddings: str | Sequence[str], key: str, work_dir: str, runner: str = "FnApiRunner",
                  beam_args: Sequence[str] = (), rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                  on_disk_dir: str | None = None, trained: bytes | None = None, train_size: int | None = None,
                  seed: int = 0, faiss_threads: int = 0) -> ShardedBuild:
    """Plan -> train (driver) -> add shards (Beam, ``runner``) -> merge (in RAM, or on disk under ``on_disk_dir``).

    ``trained``: serialised trained empty index to use instead of training (what the tests use to compare with the
    single-process build for the same quantizer).
    """
    paths = embeddings_files(embeddings) if isinstance(embeddings, str) else list(embeddings)
    plan = plan_shards(paths, rows_per_shard)
    report: dict[str, Any] = {"runner": runner, "beam_args": list(beam_args), "shards": len(plan.shards),
                              "rows_per_shard": rows_per_shard, "n": plan.num_rows, "dim": plan.dim, "key": key}
    t0 = time.time()
    if trained is None:
        if not shardable(key):
            raise UserError(f"index key {key!r} cannot be built sharded: only IVF families shard; "
                            f"drop --runner to use the single-process build")
        from index.build import BuildConfig, _train_size

        config = BuildConfig(seed=seed)
        n_train = train_size or _train_size(key, plan.num_rows, config)
        sample = sample_vectors(plan, n_train, seed)
        trained = train_empty_index(sample, key, config)
        del sample
        report["train"] = {"n": n_train, "seed": seed, "seconds": round(time.time() - t0, 3)}
    else:
        empty = deserialize(trained)
        if empty.d != plan.dim or not empty.is_trained or empty.ntotal:
            raise UserError(f"the given trained index (d={empty.d}, trained={empty.is_trained}, "
                            f"ntotal={empty.ntotal}) does not fit {plan.dim}-d vectors / is not empty and trained")
        report["train"] = {"given": True}
    add = run_add_shards(plan, trained, work_dir, runner, beam_args, faiss_threads=faiss_threads)
    report["add"] = {"seconds": add["seconds"], "metrics": add["metrics"],
                     "workers": sorted({s["worker"] for s in add["shards"]})}
    t1 = time.time()
    shard_paths = [s["path"] for s in add["shards"]]
    if on_disk_dir:
        os.makedirs(on_disk_dir, exist_ok=True)
        ivfdata = os.path.join(on_disk_dir, IVFDATA_NAME)
        index = merge_on_disk(trained, shard_paths, ivfdata)
    else:
        ivfdata = None
        index = merge_in_ram(trained, shard_paths)
    report["merge"] = {"seconds": round(time.time() - t1, 3), "on_disk": bool(on_disk_dir)}
    if index.ntotal != plan.num_rows:
        raise RuntimeError(f"merged index holds {index.ntotal} vectors, expected {plan.num_rows}")
    report["seconds"] = round(time.time() - t0, 3)
    return ShardedBuild(index=index, key=key, dim=plan.dim, ntotal=int(index.ntotal), ivfdata=ivfdata,
                        report=report)


# ------------------------------------------------------------------------------------------------ shopvec index --runner
def _ids_and_metadata(files: Sequence[str], report_path: str | None, source: str, dim: int):
    """ids, metadata, provenance and run report of the embeddings *without reading any vector*, validated as
    ``index.embeddings_io.read_embeddings`` validates them (string, non-null, non-empty, unique ids; one model)."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.compute as pc

    from index import embeddings_io as eio

    ids_parts, meta_parts = [], []
    provenance: dict[str, Any] = {}
    prov_file = None
    for f in files:
        pf = _open_parquet(f)
        schema = pf.schema_arrow
        if schema.get_field_index(ID_COLUMN) < 0:
            raise UserError(f"{f}: missing column '{ID_COLUMN}' (expected the embeddings schema: product_id, vector, ...)")
        id_type = schema.field(ID_COLUMN).type
        if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise UserError(f"{f}: field '{ID_COLUMN}' has type {id_type}, expected string")
        provenance, prov_file = eio.merge_provenance(provenance, prov_file, eio._schema_provenance(Path(f), schema), f)
        cols = [c for c in schema.names if c not in eio.VECTOR_COLUMNS]
        if pf.metadata.num_rows == 0:
            continue
        table = pf.read(columns=cols, use_threads=False)
        ids_arr = table.column(ID_COLUMN).combine_chunks()
        if ids_arr.null_count:
            bad = int(np.flatnonzero(ids_arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise UserError(f"{f}: field '{ID_COLUMN}' is null at row {bad}; every product needs an id")
        ids_parts.append(ids_arr.cast(pa.string()))
        meta_parts.append(eio._metadata_table(table))
    ids_all = pa.chunked_array(ids_parts, type=pa.string()).combine_chunks()
    if pc.any(pc.equal(pc.utf8_length(ids_all), 0)).as_py():
        raise UserError(f"{source}: field '{ID_COLUMN}' holds an empty string; every product needs an id")
    if pc.count_distinct(ids_all).as_py() != len(ids_all):
        counts = pc.value_counts(ids_all)
        dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
        raise UserError(f"{source}: duplicate product_id {dup!r}; product ids must be unique across shards")
    try:
        metadata = pa.concat_tables(meta_parts, promote_options="permissive").combine_chunks() if meta_parts \
            else pa.table({})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise UserError(f"{source}: metadata columns have incompatible types across shards "
                        f"({str(e).splitlines()[0]})") from None
    run_report = eio._read_json_file(Path(report_path)) if report_path else None
    if run_report:
        for key in eio.PROVENANCE_FIELDS:
            if key not in provenance and key in run_report:
                provenance[key] = run_report[key]
    if provenance.get("dim") is not None and int(provenance["dim"]) != dim:
        raise UserError(f"{prov_file or report_path}: provenance dim {provenance['dim']!r} does not match the "
                        f"vectors' dim {dim}")
    return ids_all, metadata, provenance, run_report


def _remote_files_hash(files: Sequence[str]) -> str:
    """``index.embeddings_io.files_hash`` (name, size, sha256 of each file, in order) through Beam FileSystems."""
    import hashlib

    from apache_beam.io.filesystems import FileSystems

    from embedders.provenance import canonical_json, sha256_bytes

    entries = []
    for f in files:
        h, size = hashlib.sha256(), 0
        with FileSystems.open(f) as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
                size += len(chunk)
        entries.append([os.path.basename(f), size, h.hexdigest()])
    return sha256_bytes(canonical_json(entries).encode("utf-8"))


class _Count:
    """Stands in for the id list where only its length is used (the manifest), without materialising n strings."""

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n


def spill_vectors(plan: Plan, path: str) -> tuple[np.ndarray, int]:
    """All vectors, validated and normalised, streamed into a raw float32 file and returned memory-mapped.

    The tuner needs exact ground truth over every vector; reading them through a read-only mapping keeps them out
    of the process's anonymous memory (pages are page cache, dropped under pressure)."""
    renormalised = 0
    with open(path, "wb") as fh:
        for pc in plan.pieces:
            x, off = _read_piece(pc, plan.dim)
            renormalised += off
            fh.write(memoryview(x))
        fh.flush()
        os.fsync(fh.fileno())
    return np.memmap(path, dtype=np.float32, mode="r", shape=(plan.num_rows, plan.dim)), renormalised


def choose_sharded_key(requested: str, n: int, dim: int, max_memory: int | None,
                       on_disk: bool | None) -> tuple[str | None, str, bool]:
    """(key or None = not shardable, reason, on_disk) for a sharded build.

    ``auto`` follows ``index.build.choose_index_key``; where that picks exact ``Flat`` (small catalogs) there is
    nothing to shard (None: the caller builds single-process); where it picks compressed ``OPQ..,PQ..,RFlat``
    because full vectors exceed the budget, the sharded build keeps ``IVF<nlist>,Flat`` with its inverted lists on
    disk instead (full-precision distances, only the quantizer and the list directory in RAM).
    """
    from index.build import BUDGET_FRACTION, available_memory, choose_index_key, estimate_memory, nlist_for

    # --max-memory is the *served* index's budget (it drives the key choice, e.g. compressed IVF-PQ); the builder
    # shards on its own only when the raw vectors would not fit this machine's memory.
    budget = int(available_memory() * BUDGET_FRACTION)
    if requested.strip().lower() == "auto":
        key, reason = choose_index_key(n, dim, max_memory)
        if key == "Flat":
            return None, reason, False
        if not shardable(key):
            key = f"IVF{nlist_for(n)},Flat"
            reason = (f"{reason}; sharded build: {key} with its inverted lists on disk instead (full-precision "
                      f"vectors in memory-mapped lists, {_mib(estimate_memory(key, n, dim))} on disk)")
            return key, reason, True if on_disk is None else on_disk
    else:
        key, reason = requested.strip(), f"--index-key {requested.strip()} given explicitly"
        if not shardable(key):
            raise UserError(f"--index-key {key}: only IVF families can be built sharded (the trained coarse "
                            f"quantizer is what the workers share); drop --runner for Flat/HNSW")
    if on_disk is None:
        on_disk = estimate_memory(key, n, dim) > budget
        if on_disk:
            reason += (f"; inverted lists on disk: the index ({_mib(estimate_memory(key, n, dim))}) exceeds the "
                       f"memory budget ({_mib(budget)} usable)")
    return key, reason, bool(on_disk)


def _mib(b: float) -> str:
    return f"{b / (1 << 20):.0f} MiB"


def _finish_build(index, key: str, reason: str, vectors, ids, metadata, config, built: dict[str, Any],
                  threads, t_all: float):
    """Tune, measure and package a filled index exactly as ``index.build.build_index`` does after its
    ``train_and_add`` (same sampling seeds, same tuner, same latency measurement)."""
    from index.build import BuildResult, _ensure_reconstruct, estimate_memory, measure_latency, tune
    from index.search import ProductIndex, omp_threads

    n, dim = int(index.ntotal), int(index.d)
    _ensure_reconstruct(index, key)
    with omp_threads(threads):
        pix = ProductIndex(index, ids, metadata, {"index_key": key}, search_params={})
        tuning = tune(pix, vectors, config)
    tuner = tuning.pop("_tuner")
    params = tuning["params"]
    pix.set_search_params(params)
    fresh = tuner.last_fresh
    lat_positions = np.random.default_rng(config.seed + 2).choice(n, size=min(config.latency_queries, n),
                                                                   replace=False)
    lat = measure_latency(pix, lat_positions, config.k, params)
    from index.build import measured_figures

    measured = measured_figures(config.k, tuning, lat, tuning["queries_fresh"])
    build_info = {**built, "tune_s": tuning["seconds"], "total_s": round(time.time() - t_all, 3),
                  "estimated_memory_bytes": estimate_memory(key, n, dim)}
    return BuildResult(index=index, index_key=key, choice_reason=reason, search_params=params, measured=measured,
                       tuning={k2: v for k2, v in tuning.items() if k2 != "params"}, build=build_info,
                       below_target=not tuning["reached"], pix=pix, fresh_positions=fresh.positions,
                       fresh_kth=fresh.kth)


def build_and_publish_sharded(embeddings: str, out: str, config=None, *, runner: str = "FnApiRunner",
                              beam_args: Sequence[str] = (), rows_per_shard: int | None = None,
                              on_disk: bool | None = None, work_dir: str | None = None, keep: int = 5,
                              mmap: bool = False, version: str | None = None, faiss_threads: int = 0,
                              keep_work: bool = False) -> tuple[str, dict[str, Any]]:
    """``shopvec index --runner R``: the single-process build's steps with the add step sharded over Beam workers.

    Same choice, same seeded training sample (hence the same trained index), same tuner, same manifest and the same
    store (staged, verified, CURRENT switched atomically) as :func:`index.build.build_and_publish`; the manifest's
    ``build.sharded`` records the runner, shards, workers and timings. ``on_disk``: None = when the index exceeds
    the memory budget. ``work_dir`` (shards, trained index; default ``OUT/.sharded-work/<token>``) may be a
    ``gs://``/``s3://``/HDFS URI on a cluster; the merge and the on-disk lists are always local to this process.
    """
    import pyarrow as pa

    from index import store as _store
    from index.build import (BuildConfig, _publish_check, _train_size, build_and_publish, create_index,
                             make_manifest)
    from index.embeddings_io import Embeddings, resolve_embedding_files
    from index.search import apply_search_params, omp_threads

    config = config or BuildConfig()
    if keep < 1:
        raise UserError(f"--keep must be at least 1, got {keep}")
    t_all = time.time()
    files = embeddings_files(embeddings)
    report_path = None
    if "://" not in embeddings or embeddings.startswith("file://"):
        _, rp = resolve_embedding_files(embeddings[len("file://"):] if embeddings.startswith("file://") else embeddings)
        report_path = os.fspath(rp) if rp else None
    plan = plan_shards(files, rows_per_shard or DEFAULT_ROWS_PER_SHARD)
    n, dim = plan.num_rows, plan.dim
    key, reason, on_disk = choose_sharded_key(config.index_key or "auto", n, dim, config.max_memory, on_disk)
    if key is None:
        log.info("sharded build not needed: %s; building in this process", reason)
        return build_and_publish(embeddings, out, config, keep=keep, mmap=mmap, version=version)
    if not rows_per_shard:  # enough shards to keep every worker busy, each small enough to retry cheaply
        plan = plan_shards(files, max(4096, min(DEFAULT_ROWS_PER_SHARD, -(-n // 8))))
    log.info("sharded build of %d x %d vectors: %s (%s); %d shards on %s", n, dim, key, reason, len(plan.shards),
             runner)
    ids, metadata, provenance, run_report = _ids_and_metadata(files, report_path, embeddings, dim)
    if len(ids) != n:
        raise UserError(f"{embeddings}: {len(ids)} product ids for {n} vectors")
    own_work = work_dir is None
    work = work_dir or os.path.join(os.path.abspath(out), ".sharded-work", uuid.uuid4().hex[:12])
    local = os.path.join(os.path.abspath(out), ".sharded-work", uuid.uuid4().hex[:12]) if "://" in work else work
    os.makedirs(local, exist_ok=True)
    if "://" not in work:
        os.makedirs(work, exist_ok=True)
    try:
        threads = config.threads or (1 if n * dim < (1 << 22) else None)
        built: dict[str, Any] = {"device": "cpu"}
        with omp_threads(threads):
            index = create_index(key, dim, n, config)
            ts = _train_size(key, n, config)
            t0 = time.time()
            sample = sample_vectors(plan, ts, config.seed)
            index.train(sample)
            del sample
            built.update({"train_size": int(ts), "train_s": round(time.time() - t0, 3)})
        trained = serialize(index)
        del index
        add = run_add_shards(plan, trained, work, runner, beam_args, faiss_threads=faiss_threads)
        t1 = time.time()
        shard_paths = [s["path"] for s in add["shards"]]
        if on_disk:
            index = merge_on_disk(trained, shard_paths, os.path.join(local, IVFDATA_NAME))
        else:
            index = merge_in_ram(trained, shard_paths)
        built["add_s"] = round(add["seconds"], 3)
        built["sharded"] = {"runner": runner, "beam_args": list(beam_args), "shards": len(plan.shards),
                            "rows_per_shard": max(s.rows for s in plan.shards),
                            "workers": sorted({s["worker"] for s in add["shards"]}),
                            "add_s": add["seconds"], "merge_s": round(time.time() - t1, 3), "on_disk": on_disk,
                            "metrics": add["metrics"]}
        if "://" not in work:
            shutil.rmtree(os.path.join(work, SHARDS_DIR), ignore_errors=True)
        if index.ntotal != n:
            raise RuntimeError(f"merged index holds {index.ntotal} vectors, expected {n}")
        vectors, renormalised = spill_vectors(plan, os.path.join(local, "vectors.f32"))
        result = _finish_build(index, key, reason, vectors, ids, metadata, config, built, threads, t_all)
        emb = Embeddings(ids=_Count(n), vectors=vectors, metadata=metadata, provenance=provenance,  # type: ignore
                         files=list(files), source=embeddings, run_report=run_report, run_report_path=report_path,
                         renormalised=renormalised)
        if any("://" in f and not f.startswith("file://") for f in files):
            emb._source_hash = _remote_files_hash(files)  # files_hash() stats local paths
        manifest = make_manifest(result, emb, config, mmap or on_disk)
        if "://" in embeddings and not embeddings.startswith("file://"):
            manifest["embeddings"]["source"] = embeddings  # make_manifest abspath()s local sources
        apply_search_params(result.index, result.search_params)
        if on_disk and not getattr(_store, "ONDISK_FILE", None):
            raise UserError("publishing on-disk inverted lists needs index.store support for 'index.ivfdata' "
                            "(ONDISK_FILE); build in RAM (--no-on-disk) until it lands")
        ver = _store.publish(out, result.index, ids, metadata, manifest,
                             verify=_publish_check(result, vectors, config, mmap or on_disk, ids), keep=keep,
                             version=version)
        final = _store.read_manifest(os.path.join(os.fspath(out), _store.VERSIONS_DIR, ver))
        m = final["measured"]
        log.info("published %s (sharded on %s, %d shards): %s, n=%d, recall@%d %.4f", ver, runner, len(plan.shards),
                 key, n, config.k, m["recall_at_k"] or 0.0)
        return ver, final
    finally:
        if not keep_work:
            if own_work or "://" not in work:
                shutil.rmtree(local, ignore_errors=True)
            parent = os.path.join(os.path.abspath(out), ".sharded-work")
            if os.path.isdir(parent) and not os.listdir(parent):
                os.rmdir(parent)


#: ``shopvec index`` without --runner goes sharded above this many vectors (or when the raw vectors do not fit the
#: memory budget, which the single-process build needs: it holds them all).
AUTO_SHARD_ROWS = 5_000_000


def sharding_decision(embeddings: str, runner: str | None, beam_args: Sequence[str], max_memory: int | None,
                      shard_above: int | None = None) -> tuple[str | None, list[str], str]:
    """(runner or None for the single-process build, Beam args, why) for ``shopvec index``.

    ``--runner`` asks for the sharded build explicitly. Without it, a catalog larger than ``shard_above`` vectors,
    or whose raw vectors exceed the memory available to the builder, is built sharded on the local multi-process runner (one worker
    per core) -- the same code a cluster runs. Reads Parquet footers only.
    """
    from index.build import BUDGET_FRACTION, available_memory

    if runner:
        return runner, list(beam_args), f"--runner {runner}"
    if beam_args:
        raise UserError(f"unrecognized arguments: {' '.join(beam_args)} (Beam pipeline options only apply to a "
                        f"sharded build: add --runner)")
    files = embeddings_files(embeddings)
    n = sum(_open_parquet(f).metadata.num_rows for f in files)
    dim = vector_dim(files[0])
    # --max-memory is the *served* index's budget (it drives the key choice, e.g. compressed IVF-PQ); the builder
    # shards on its own only when the raw vectors would not fit this machine's memory.
    budget = int(available_memory() * BUDGET_FRACTION)
    threshold = AUTO_SHARD_ROWS if shard_above is None else shard_above
    if n > threshold or n * dim * 4 > budget:
        workers = max(1, os.cpu_count() or 1)
        why = (f"{n:,} vectors > --shard-above {threshold:,}" if n > threshold else
               f"raw vectors ({_mib(n * dim * 4)}) exceed the memory budget ({_mib(budget)} usable)")
        return "FnApiRunner", [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"], why
    return None, [], ""
