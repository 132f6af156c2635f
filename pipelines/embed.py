"""The embed pipeline (Apache Beam): catalog Parquet -> fused product vectors + dead letters + run report.

Graph (every step is a plain DoFn/PTransform; nothing depends on driver-side state, everything pickles)::

    row-group plan ─Reshuffle─┬─> ReadIds ─> first occurrence per id ─> duplicates (side input) ─┐
                              └─> ReadProducts: read + validate/dedup (one step, see its docstring) <┘
    ─> Prepare (fetch, decode, preprocess, tokenise) ─> RunInference (one shared model per worker) ─> product vectors
    reviews ─> ReadRowGroups ─> ValidateReviews ─> join catalog ids ─> select/cap ─> tokenise ─> RunInference
            ─> aggregate per product ─┐
    product vectors ──────────────────┴─> (join) ─> Fuse ─> WriteParquetShards(embeddings)
    dead letters from every stage ─> WriteParquetShards(dead_letters)

Memory: product rows stream from Parquet (4 MiB page buffer, 256 rows per batch) through one fused stage to the
writer, which buffers at most one row group as Arrow batches; only the tiny row-group tasks wait for the duplicates
side input. What is held per product is its id (the dedup pass) and, with reviews, its vectors in the review join --
both are shuffles on a distributed runner.

Output is written under a staging folder next to ``--out`` and switched into place only when the run succeeded.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import time
import uuid
from typing import Any, Iterable

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from embedders.errors import RecordError, UserError
from embedders.fusion import (FusionConfig, ReviewConfig, aggregate_reviews, check_compatible, fuse, fused_dim,
                              modality_dims, review_weights, select_reviews)
from embedders.models import ModelSpec, output_dims
from embedders.provenance import code_version, sha256_bytes, utc_now
from embedders.text import clean_text, product_text

from .catalog import TableSpec, inspect_products, inspect_reviews, read_row_group
from .config import Config, decode_threads
from .records import norm_id as _norm_id, num as _num, ts_seconds as _ts_seconds
from .handlers import PER_PROCESS_LOADS, EncodeRequest, ShopvecModelHandler, shared_encoder

log = logging.getLogger(__name__)

DEAD = "dead"
NS = "shopvec"
DEAD_LETTER_SCHEMA = pa.schema([("product_id", pa.string()), ("stage", pa.string()), ("error", pa.string()),
                                ("message", pa.string())])
LOCAL_RUNNERS = {"DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner"}


def dead_letter(product_id: Any, stage: str, error: str, message: str) -> beam.pvalue.TaggedOutput:
    Metrics_counter(f"dead.{stage}.{error}")
    return beam.pvalue.TaggedOutput(DEAD, {"product_id": None if product_id is None else str(product_id),
                                           "stage": stage, "error": error, "message": str(message)[:300]})


def Metrics_counter(name: str, n: int = 1) -> None:  # noqa: N802 - tiny helper
    beam.metrics.Metrics.counter(NS, name).inc(n)


# --------------------------------------------------------------------------------------------------------------
# Reading
class ReadRowGroups(beam.DoFn):
    """(file_idx, path, row_group, first_row) -> row dicts tagged with their global order ``_ord``."""

    def __init__(self, columns: list[str]):
        self._columns = columns

    def process(self, task):
        fi, path, rg, first_row = task
        for i, row in enumerate(read_row_group(path, rg, self._columns)):
            row["_ord"] = (fi, first_row + i)
            yield row


class ReadIds(beam.DoFn):
    def __init__(self, id_column: str):
        self._col = id_column

    def process(self, task):
        fi, path, rg, first_row = task
        for i, row in enumerate(read_row_group(path, rg, [self._col])):
            pid = _norm_id(row.get(self._col))
            if pid is not None:
                yield pid, (fi, first_row + i)


class _FirstAndCount(beam.CombineFn):
    def create_accumulator(self):
        return (None, 0)

    def add_input(self, acc, ordinal):
        first, n = acc
        return (ordinal if first is None or tuple(ordinal) < tuple(first) else first, n + 1)

    def merge_accumulators(self, accs):
        first, n = None, 0
        for f, c in accs:
            if f is not None and (first is None or tuple(f) < tuple(first)):
                first = f
            n += c
        return (first, n)

    def extract_output(self, acc):
        return acc


# --------------------------------------------------------------------------------------------------------------
# Products
class ValidateProducts(beam.DoFn):
    """Raw row -> product record; missing/duplicate ids become dead letters (first occurrence by file order wins)."""

    def __init__(self, table: dict[str, Any], text_cfg: dict[str, Any]):
        self._roles = table["roles"]
        self._extra = table["extra_columns"]
        self._paths = table["paths"]
        self._text = text_cfg

    def process(self, row, duplicates):
        yield from self._validate(row, duplicates)

    def _validate(self, row, duplicates):
        roles = self._roles
        fi, ri = row["_ord"]
        pid = _norm_id(row.get(roles["product_id"]))
        if pid is None:
            yield dead_letter(None, "validate", "missing_product_id",
                              f"{os.path.basename(self._paths[fi])} row {ri}: product_id is null or empty")
            return
        winner = duplicates.get(pid)
        if winner is not None and tuple(winner) != (fi, ri):
            yield dead_letter(pid, "dedup", "duplicate_id",
                              f"{os.path.basename(self._paths[fi])} row {ri} repeats the product_id first seen in "
                              f"{os.path.basename(self._paths[winner[0]])} row {winner[1]}")
            return
        text = product_text([row.get(roles[f]) for f in self._text["fields"] if f in roles],
                            self._text.get("separator", ". "), self._text.get("unicode_form", "NFKC"))
        image = row.get(roles["image"]) if "image" in roles else None
        uri = clean_text(row.get(roles["image_uri"])) if "image_uri" in roles else None
        meta = {}
        for role in ("title", "description", "category", "price"):
            if role in roles:
                meta[role] = row.get(roles[role])
        for col in self._extra:
            meta[col] = row.get(col)
        yield {"product_id": pid, "text": text, "image": image, "image_uri": uri, "meta": meta}


class ReadProducts(ValidateProducts):
    """Row-group task -> validated product records, reading and validating in one step.

    Reading happens in the DoFn that takes the duplicates side input on purpose: a runner must finish the side input
    (the id pass) before this step starts, so if reading were a separate step upstream, the rows it produced -- image
    bytes included -- would be materialised in full while the runner waited (the whole catalog in memory on a local
    runner, a shuffle of every image on a distributed one). Fused here, only the tiny row-group tasks wait, and rows
    stream from Parquet to the model one batch at a time, so peak memory does not grow with the catalog.
    """

    def __init__(self, table: dict[str, Any], text_cfg: dict[str, Any], columns: list[str]):
        super().__init__(table, text_cfg)
        self._columns = columns

    def process(self, task, duplicates):
        fi, path, rg, first_row = task
        for i, row in enumerate(read_row_group(path, rg, self._columns)):
            row["_ord"] = (fi, first_row + i)
            yield from self._validate(row, duplicates)


class PrepareProducts(beam.DoFn):
    """Fetch (URIs, concurrently), decode + preprocess images and tokenise text, outside the model call.

    Images are decoded on ``images.decode_threads`` background threads (Pillow and torch release the GIL), so the
    next batch decodes while the model runs the current one; at most ``window`` products are in flight, and outputs
    leave in input order, so batch composition -- and therefore every vector -- is the same as with inline decoding.
    Beam metrics and dead letters are only created on the bundle's own thread.

    A failed image is a dead letter (stage ``image``) while the product goes on with its other modalities.
    """

    def __init__(self, spec: ModelSpec, limits, images_cfg: dict[str, Any], window: int = 64):
        self._spec = spec
        self._limits = limits
        self._images = images_cfg
        self._window = max(1, int(window))
        self._pending: list = []

    def setup(self):
        from concurrent.futures import ThreadPoolExecutor

        from embedders.encoder import Encoder
        from embedders.models import LoadedModel, build_preprocess, build_tokenizer, preprocess_config

        pre = preprocess_config(self._spec)
        size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
        # A model-free Encoder: only the preparation methods are used here (the model lives in RunInference).
        self._prep = Encoder(LoadedModel(model=None, preprocess=build_preprocess(self._spec),
                                         tokenizer=build_tokenizer(self._spec), model_id=self._spec.model_id,
                                         random_init=self._spec.random_init, image_dim=0, text_dim=0,
                                         image_size=size), self._limits)
        self._max_conc = int(self._images.get("fetch_max_concurrency", 8))
        n = decode_threads(self._images)
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="shopvec-decode") if n else None

    def teardown(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def start_bundle(self):
        self._pending = []
        self._inflight: collections.deque = collections.deque()

    # -- runs on a decode thread: pure work, no Beam calls ------------------------------------------------------
    def _decode(self, data: bytes | None, fetch_error: RecordError | None):
        if fetch_error is not None:
            return None, None, fetch_error
        if data is None:
            return None, None, None
        data = bytes(data)
        try:
            return self._prep.prepare_image(data), sha256_bytes(data), None
        except RecordError as e:
            return None, sha256_bytes(data), e

    # -- bundle thread ------------------------------------------------------------------------------------------
    def _submit(self, p, data: bytes | None, fetch_error: RecordError | None):
        if self._pool is None:  # inline decoding: nothing to wait for
            yield from self._emit((p, None, self._decode(data, fetch_error)))
            return
        if data is None:  # nothing to decode, but it keeps its place in the output order
            fut, res = None, self._decode(data, fetch_error)
        else:
            fut = self._pool.submit(self._decode, data, fetch_error)
            res = None
        self._inflight.append((p, fut, res))
        while len(self._inflight) > self._window:
            yield from self._emit(self._inflight.popleft())

    def _emit(self, item):
        p, fut, res = item
        tensor, image_hash, image_error = fut.result() if fut is not None else res
        pid = p["product_id"]
        if image_error is not None:
            yield dead_letter(pid, "image", image_error.error, image_error.message)
        tokens = self._prep.prepare_texts([p["text"]])[0] if p["text"] else None
        payload = {"meta": p["meta"], "text_hash": sha256_bytes(p["text"].encode("utf-8")) if p["text"] else None,
                   "image_hash": image_hash, "image_error": image_error.error if image_error else None}
        yield (("p", pid), EncodeRequest(image=tensor, tokens=tokens, payload=payload))

    def process(self, p):
        if p["image"] is None and p["image_uri"]:
            self._pending.append(p)
            if len(self._pending) >= 2 * self._max_conc:
                yield from self._flush_fetches()
            return
        yield from self._submit(p, p["image"], None)

    def _flush_fetches(self):
        from .fetch import fetch_many

        pending, self._pending = self._pending, []
        if not pending:
            return
        results = fetch_many([p["image_uri"] for p in pending], float(self._images.get("fetch_timeout_s", 10.0)),
                             int(self._images.get("fetch_retries", 2)), int(self._images.get("max_bytes", 20_000_000)),
                             self._max_conc)
        for p, r in zip(pending, results):
            if isinstance(r, RecordError):
                yield from self._submit(p, None, r)
            else:
                yield from self._submit(p, r, None)

    def _drain(self):
        yield from self._flush_fetches()
        while self._inflight:
            yield from self._emit(self._inflight.popleft())

    def finish_bundle(self):
        for out in self._drain():
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, GlobalWindow().max_timestamp(),
                                                                      [GlobalWindow()]))
            else:
                yield WindowedValue(out, GlobalWindow().max_timestamp(), [GlobalWindow()])


# --------------------------------------------------------------------------------------------------------------
# Reviews
class ValidateReviews(beam.DoFn):
    def __init__(self, roles: dict[str, str], unicode_form: str):
        self._roles = roles
        self._form = unicode_form

    def process(self, row):
        r = self._roles
        pid = _norm_id(row.get(r["product_id"]))
        if pid is None:
            Metrics_counter("reviews.missing_product_id")
            return
        text = clean_text(row.get(r["text"]), self._form) if "text" in r else None
        rating = _num(row.get(r["rating"])) if "rating" in r else None
        votes = _num(row.get(r["helpful_votes"])) if "helpful_votes" in r else None
        ts = _ts_seconds(row.get(r["created_at"])) if "created_at" in r else None
        yield pid, {"text": text, "rating": rating, "helpful_votes": votes, "created_ts": ts}


class SelectReviews(beam.DoFn):
    """Join reviews to catalog ids; cap per product; emit encode requests + a per-product summary."""

    def __init__(self, cfg: ReviewConfig):
        self._cfg = cfg

    def process(self, item):
        pid, groups = item
        reviews = list(groups["reviews"])
        if not list(groups["products"]):
            Metrics_counter("reviews.orphan", len(reviews))
            return
        with_text = [r for r in reviews if r["text"]]
        if len(with_text) < len(reviews):
            Metrics_counter("reviews.null_text", len(reviews) - len(with_text))
        ratings = [r["rating"] for r in reviews if r["rating"] is not None]
        content = sorted(json.dumps([r["text"], r["rating"], r["helpful_votes"], r["created_ts"]]) for r in with_text)
        summary = {"review_count": len(with_text), "rating_mean": float(np.mean(ratings)) if ratings else None,
                   "review_hash": sha256_bytes("\n".join(content).encode("utf-8")) if content else None}
        yield beam.pvalue.TaggedOutput("summary", (pid, summary))
        chosen = select_reviews(with_text, self._cfg.max_per_product)
        if len(chosen) < len(with_text):
            Metrics_counter("reviews.capped", len(with_text) - len(chosen))
        weights = review_weights(chosen, self._cfg.half_life_days)
        for i, (r, w) in enumerate(zip(chosen, weights)):
            yield (pid, i), {"text": r["text"], "weight": float(w)}


class TokenizeReviews(beam.DoFn):
    def __init__(self, spec: ModelSpec):
        self._spec = spec

    def setup(self):
        from embedders.models import build_tokenizer

        self._tok = build_tokenizer(self._spec)

    def process(self, item):
        (pid, i), r = item
        toks = self._tok([r["text"]])
        tokens = {k: v[0] for k, v in toks.items()} if isinstance(toks, dict) else toks[0]
        yield ("r", pid, i), EncodeRequest(tokens=tokens, payload={"weight": r["weight"]})


def _aggregate_reviews(item):
    pid, pairs = item
    pairs = sorted(pairs, key=lambda p: p[0])  # by review index: deterministic summation order
    vecs = np.stack([p[2] for p in pairs])
    return pid, aggregate_reviews(vecs, np.array([p[1] for p in pairs]))


# --------------------------------------------------------------------------------------------------------------
# Fusion and output rows
class FuseProducts(beam.DoFn):
    def __init__(self, fusion: FusionConfig, dims: dict[str, int], with_reviews: bool):
        self._fusion = fusion
        self._dims = dims
        self._with_reviews = with_reviews

    def process(self, item):
        pid, prod, review_vec, summary = self._unpack(item)
        if prod is None:  # reviews of a product that was dead-lettered upstream
            pass
        elif (fused := fuse(vecs := {"image": prod["image"], "text": prod["text"], "reviews": review_vec},
                            self._fusion, self._dims)) is None:
            yield dead_letter(pid, "fuse", "no_usable_modality",
                              "no image, text or review content could be embedded for this product")
        else:
            yield self._row(pid, prod, vecs, fused, review_vec, summary)

    def _unpack(self, item):
        empty = {"review_count": 0, "rating_mean": None, "review_hash": None}
        if not self._with_reviews:
            pid, prod = item
            return pid, prod, None, empty
        pid, g = item
        prods, rv, sm = list(g["product"]), list(g["review_vec"]), list(g["summary"])
        return pid, (prods[0] if prods else None), (rv[0] if rv else None), (sm[0] if sm else empty)

    @staticmethod
    def _row(pid, prod, vecs, fused, review_vec, summary):
        present = [m for m in ("image", "text", "reviews") if vecs[m] is not None]
        if prod["payload"]["image_error"]:
            Metrics_counter("partial")
        Metrics_counter("embedded")
        payload = prod["payload"]
        return {"product_id": pid, "vector": fused, "image_vector": vecs["image"], "text_vector": vecs["text"],
               "review_vector": review_vec, "modalities": "+".join(present), "image_hash": payload["image_hash"],
               "text_hash": payload["text_hash"], "review_hash": summary["review_hash"],
               "review_count": int(summary["review_count"]), "rating_mean": summary["rating_mean"],
               **payload["meta"]}


def _product_vectors(item):
    (_, pid), pr = item
    return pid, {"image": pr.inference["image"], "text": pr.inference["text"], "payload": pr.example}


# --------------------------------------------------------------------------------------------------------------
# Parquet shard writer (FileBasedSink's pattern: write temp files per bundle, finalize the committed ones)
def embeddings_schema(dims: dict[str, int], fused: int, meta_fields: list[pa.Field], provenance: dict) -> pa.Schema:
    f32 = pa.float32()
    fields = [pa.field("product_id", pa.string(), nullable=False),
              pa.field("vector", pa.list_(f32, fused), nullable=False),
              # Nullable per-modality vectors are variable lists: Arrow's Parquet reader cannot read back a
              # fixed_size_list column that holds nulls ("Lists with non-zero length null components").
              pa.field("image_vector", pa.list_(f32)),
              pa.field("text_vector", pa.list_(f32)),
              pa.field("review_vector", pa.list_(f32)),
              pa.field("modalities", pa.string()),
              pa.field("image_hash", pa.string()), pa.field("text_hash", pa.string()),
              pa.field("review_hash", pa.string()),
              pa.field("review_count", pa.int32()), pa.field("rating_mean", pa.float64())]
    taken = {f.name for f in fields}
    fields += [f for f in meta_fields if f.name not in taken]
    return pa.schema(fields, metadata={b"shopvec": json.dumps(provenance, sort_keys=True).encode()})


class _WriteShard(beam.DoFn):
    """Rows -> one temp Parquet file per bundle.

    Rows are converted to Arrow every ``batch_rows`` rows (compact columns instead of Python dicts holding numpy
    vectors and description strings), and a row group is written once ``rows_per_group`` rows or ``max_buffer_bytes``
    of Arrow data are buffered, whichever comes first: the writer's memory is bounded by the row-group size, not by
    how many rows a bundle holds.
    """

    def __init__(self, tmp_dir: str, schema: pa.Schema, rows_per_group: int = 4096, batch_rows: int = 256,
                 max_buffer_bytes: int = 64 << 20):
        self._tmp = tmp_dir
        self._schema = schema
        self._rows_per_group = rows_per_group
        self._batch_rows = max(1, min(batch_rows, rows_per_group))
        self._max_bytes = max_buffer_bytes

    def start_bundle(self):
        self._rows = []
        self._batches = []
        self._buffered_rows = 0
        self._buffered_bytes = 0
        self._writer = None
        self._path = None

    def _to_batch(self):
        cols = []
        for f in self._schema:
            vals = [r.get(f.name) for r in self._rows]
            if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type):
                vals = [None if v is None else np.asarray(v, np.float32) for v in vals]
            cols.append(pa.array(vals, type=f.type))
        batch = pa.RecordBatch.from_arrays(cols, schema=self._schema)
        self._rows = []
        self._batches.append(batch)
        self._buffered_rows += batch.num_rows
        self._buffered_bytes += batch.nbytes

    def _flush(self):
        if self._rows:
            self._to_batch()
        if not self._batches:
            return
        table = pa.Table.from_batches(self._batches, schema=self._schema)
        if self._writer is None:
            from apache_beam.io.filesystems import FileSystems

            self._path = FileSystems.join(self._tmp, f"{uuid.uuid4().hex}.parquet")
            self._fh = FileSystems.create(self._path)
            self._writer = pq.ParquetWriter(self._fh, self._schema, compression="zstd")
        self._writer.write_table(table, row_group_size=self._rows_per_group)
        self._batches, self._buffered_rows, self._buffered_bytes = [], 0, 0

    def process(self, row):
        self._rows.append(row)
        # a batch never straddles a row-group boundary, so row groups hold exactly rows_per_group rows
        if len(self._rows) >= min(self._batch_rows, self._rows_per_group - self._buffered_rows):
            self._to_batch()
            if self._buffered_rows >= self._rows_per_group or self._buffered_bytes >= self._max_bytes:
                self._flush()

    def finish_bundle(self):
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._fh.close()
            yield WindowedValue(self._path, GlobalWindow().max_timestamp(), [GlobalWindow()])


class WriteParquetShards(beam.PTransform):
    """Rows -> ``<final_dir>/part-NNNNN-of-MMMMM.parquet``; only files of committed bundles are kept."""

    def __init__(self, final_dir: str, schema: pa.Schema):
        super().__init__()
        self._final = final_dir
        self._schema = schema

    def expand(self, rows):
        tmp = self._final.rstrip("/") + "-tmp"
        return (rows
                | "WriteTemp" >> beam.ParDo(_WriteShard(tmp, self._schema))
                | "Collect" >> beam.combiners.ToList()
                | "Finalize" >> beam.Map(_finalize_shards, self._final, tmp, self._schema))


def _finalize_shards(paths: list[str], final_dir: str, tmp_dir: str, schema: pa.Schema) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    FileSystems.mkdirs(final_dir) if not FileSystems.exists(final_dir) else None
    paths = sorted(paths)
    if not paths:  # keep the output readable: one empty shard with the schema
        empty = FileSystems.join(final_dir, "part-00000-of-00001.parquet")
        with FileSystems.create(empty) as fh:
            pq.write_table(schema.empty_table(), fh)
        out = [empty]
    else:
        out = [FileSystems.join(final_dir, f"part-{i:05d}-of-{len(paths):05d}.parquet") for i in range(len(paths))]
        FileSystems.rename(paths, out)
    # Temp files of bundle attempts that were retried (never committed) are removed; on an object store the "folder"
    # itself may not exist once empty.
    leftovers = [m.path for m in FileSystems.match([FileSystems.join(tmp_dir, "*")])[0].metadata_list]
    if leftovers:
        FileSystems.delete(leftovers)
    try:
        FileSystems.delete([tmp_dir])
    except Exception:  # noqa: BLE001 - nothing left to delete
        pass
    return out


# --------------------------------------------------------------------------------------------------------------
class ProgressLogger(beam.DoFn):
    """Logs products/s every ``every_s`` seconds in each worker (long runs show progress and throughput)."""

    def __init__(self, every_s: float, what: str = "products embedded"):
        self._every = every_s
        self._what = what

    def setup(self):
        self._t0 = time.monotonic()
        self._last = self._t0
        self._n = 0

    def process(self, x):
        self._n += 1
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            log.info("progress: %d %s in this worker, %.1f/s", self._n, self._what, self._n / (now - self._t0))
        yield x


def _arrow_meta_fields(table: TableSpec) -> list[pa.Field]:
    pf = pq.ParquetFile(table.paths[0]) if "://" not in table.paths[0] else None
    schema = pf.schema_arrow if pf is not None else None
    if schema is None:
        from .catalog import open_parquet

        schema = open_parquet(table.paths[0]).schema_arrow
    fields = []
    for role in ("title", "description", "category", "price"):
        if role in table.roles:
            t = schema.field(table.roles[role]).type
            if pa.types.is_dictionary(t):
                t = t.value_type
            if role == "category" and pa.types.is_integer(t):
                t = pa.int64()
            fields.append(pa.field(role, t))
    for col in table.extra_columns:
        t = schema.field(col).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        fields.append(pa.field(col, t))
    return fields


def build_pipeline(p: beam.Pipeline, cfg: Config, products: TableSpec, reviews: TableSpec | None, staging: str,
                   provenance: dict, dims: dict[str, int]) -> None:
    spec = cfg.model
    limits = cfg.image_limits
    fusion = cfg.fusion
    batch = int(cfg.raw["batch"]["image_batch_size"])
    handler = ShopvecModelHandler(spec, limits, batch_size=batch)
    table = {"roles": products.roles, "extra_columns": products.extra_columns, "paths": products.paths}

    plan = (p | "ProductRowGroups" >> beam.Create(products.row_groups) | "SpreadProducts" >> beam.Reshuffle())
    dups = (plan
            | "ReadIds" >> beam.ParDo(ReadIds(products.roles["product_id"]))
            | "FirstAndCount" >> beam.CombinePerKey(_FirstAndCount())
            | "OnlyDuplicates" >> beam.Filter(lambda kv: kv[1][1] > 1)
            | "Winner" >> beam.Map(lambda kv: (kv[0], tuple(kv[1][0]))))
    # Read + validate in one DoFn (see ReadProducts: keeps the rows out of the side-input wait).
    valid = plan | "Validate" >> beam.ParDo(ReadProducts(table, cfg.raw["text"], products.read_columns()),
                                            beam.pvalue.AsDict(dups)).with_outputs(DEAD, main="ok")
    prepared = valid.ok | "Prepare" >> beam.ParDo(PrepareProducts(spec, limits, cfg.raw["images"])).with_outputs(
        DEAD, main="ok")
    product_vecs = (prepared.ok
                    | "EmbedProducts" >> RunInference(handler)
                    | "ProductVectors" >> beam.Map(_product_vectors))
    dead = [valid[DEAD], prepared[DEAD]]

    if reviews is not None:
        rplan = p | "ReviewRowGroups" >> beam.Create(reviews.row_groups) | "SpreadReviews" >> beam.Reshuffle()
        rrows = rplan | "ReadReviews" >> beam.ParDo(ReadRowGroups(reviews.read_columns()))
        rvalid = rrows | "ValidateReviews" >> beam.ParDo(ValidateReviews(reviews.roles,
                                                                         cfg.raw["text"].get("unicode_form", "NFKC")))
        catalog_ids = valid.ok | "CatalogIds" >> beam.Map(lambda p_: (p_["product_id"], 1))
        selected = ({"products": catalog_ids, "reviews": rvalid}
                    | "JoinReviewsToCatalog" >> beam.CoGroupByKey()
                    | "SelectReviews" >> beam.ParDo(SelectReviews(cfg.reviews)).with_outputs("summary", main="ok"))
        review_vecs = (selected.ok
                       | "TokenizeReviews" >> beam.ParDo(TokenizeReviews(spec))
                       | "EmbedReviews" >> RunInference(
                           ShopvecModelHandler(spec, limits, batch_size=int(cfg.raw["batch"]["text_batch_size"])))
                       | "ReviewVectorKV" >> beam.Map(lambda kv: (kv[0][1], (kv[0][2], kv[1].example["weight"],
                                                                              kv[1].inference["text"])))
                       | "GroupReviewVectors" >> beam.GroupByKey()
                       | "AggregateReviews" >> beam.Map(_aggregate_reviews))
        joined = ({"product": product_vecs, "review_vec": review_vecs, "summary": selected.summary}
                  | "JoinReviews" >> beam.CoGroupByKey())
        fused = joined | "Fuse" >> beam.ParDo(FuseProducts(fusion, dims, True)).with_outputs(DEAD, main="ok")
    else:
        fused = product_vecs | "Fuse" >> beam.ParDo(FuseProducts(fusion, dims, False)).with_outputs(DEAD, main="ok")
    dead.append(fused[DEAD])

    schema = embeddings_schema(dims, fused_dim(fusion, dims), _arrow_meta_fields(products), provenance)
    dl_schema = DEAD_LETTER_SCHEMA.with_metadata({b"shopvec": json.dumps(provenance, sort_keys=True).encode()})
    every = float(cfg.raw["pipeline"].get("progress_every_s", 10.0))
    (fused.ok
     | "Progress" >> beam.ParDo(ProgressLogger(every))
     | "WriteEmbeddings" >> WriteParquetShards(os.path.join(staging, "embeddings"), schema))
    (dead
     | "FlattenDeadLetters" >> beam.Flatten()
     | "WriteDeadLetters" >> WriteParquetShards(os.path.join(staging, "dead_letters"), dl_schema))


# --------------------------------------------------------------------------------------------------------------
def pipeline_options(runner: str, beam_args: list[str]) -> PipelineOptions:
    args = list(beam_args)
    if runner == "FnApiRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: F401

    opts = PipelineOptions(args, runner=runner if runner != "FnApiRunner" else None, save_main_session=False,
                           pickle_library="cloudpickle")
    return opts


def _make_runner(runner: str):
    if runner == "FnApiRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return runner


def _metric_counters(result) -> dict[str, int]:
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, int] = {}
    try:
        res = result.metrics().query(MetricsFilter().with_namespace(NS))
    except Exception:  # noqa: BLE001 - a runner without metrics support still gets a report from the files
        return out
    for c in res.get("counters", []):
        val = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(val or 0)
    return out


def provenance_for(cfg: Config, dims: dict[str, int], runner: str, aligned: bool = True) -> dict[str, Any]:
    spec = cfg.model
    return {"model_id": spec.model_id, "random_init": spec.random_init, "aligned": aligned,
            "model": {"spec": spec.to_dict(), "aligned": aligned},
            "dim": fused_dim(cfg.fusion, dims), "modality_dims": {"image": dims["image"], "text": dims["text"]},
            "fusion": cfg.fusion.to_dict(), "config_hash": cfg.embedding_hash, "full_config_hash": cfg.hash,
            "code_version": code_version(), "created_at": utc_now(), "runner": runner}


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _parquet_files(folder: str) -> list[str]:
    """All ``*.parquet`` under ``folder`` (local, or any Beam FileSystems URI such as gs://), sorted."""
    if not _is_remote(folder):
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))
    from apache_beam.io.filesystems import FileSystems

    return sorted(m.path for m in FileSystems.match([folder.rstrip("/") + "/*.parquet"])[0].metadata_list)


def _iter_parquet_batches(folder: str, columns: list[str], batch_rows: int = 65536):
    """Record batches of ``columns`` from every shard under ``folder``, one batch in memory at a time."""
    for path in _parquet_files(folder):
        if _is_remote(path):
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(path) as fh:
                yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns)
        else:
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)


def summarize_outputs(staging: str) -> dict[str, Any]:
    """Counts for the run report, read back from the written shards (exact under retries, unlike metrics).

    Streams the shards batch by batch: memory is bounded by the dead letters' size, never by the catalog's.
    """
    join = (lambda a, b: a.rstrip("/") + "/" + b) if _is_remote(staging) else os.path.join
    dead: dict[str, dict[str, int]] = {}
    image_failed: set[str] = set()
    not_embedded: set[str] = set()
    n_dead = 0
    for b in _iter_parquet_batches(join(staging, "dead_letters"), ["product_id", "stage", "error"]):
        n_dead += b.num_rows
        for pid, stage, err in zip(*(b.column(i).to_pylist() for i in range(3))):
            dead.setdefault(stage, {}).setdefault(err, 0)
            dead[stage][err] += 1
            (image_failed if stage == "image" else not_embedded).add(pid)
    embedded, partial, mods = 0, 0, {}
    for b in _iter_parquet_batches(join(staging, "embeddings"), ["product_id", "modalities"]):
        embedded += b.num_rows
        if image_failed:
            partial += sum(1 for pid in b.column(0).to_pylist() if pid in image_failed)
        for m, c in zip(*pa.compute.value_counts(b.column(1)).flatten()):
            mods[m.as_py()] = mods.get(m.as_py(), 0) + c.as_py()
    return {"embedded": embedded, "partial": partial, "by_modalities": mods,
            "dead_letters": n_dead, "dead_letter_products": len(not_embedded), "dead_by_stage": dead}


def _switch_remote(staging: str, out: str, report: dict) -> None:
    """Object stores have no atomic folder rename: replace the previous parts, then write run_report.json LAST —
    readers key on it (its ``created_at`` names the run the parts belong to)."""
    from apache_beam.io.filesystems import FileSystems

    out = out.rstrip("/")
    old = [m.path for name in ("embeddings", "dead_letters")
           for m in FileSystems.match([f"{out}/{name}/*"])[0].metadata_list]
    if FileSystems.exists(f"{out}/run_report.json"):
        old.append(f"{out}/run_report.json")
    if old:
        FileSystems.delete(old)
    src, dst = [], []
    for name in ("embeddings", "dead_letters"):
        for m in FileSystems.match([f"{staging}/{name}/*"])[0].metadata_list:
            src.append(m.path)
            dst.append(f"{out}/{name}/{m.path.rsplit('/', 1)[1]}")
    FileSystems.rename(src, dst)
    with FileSystems.create(f"{out}/run_report.json") as fh:
        fh.write(json.dumps(report, indent=2, sort_keys=True, default=str).encode("utf-8"))
    try:
        FileSystems.delete([staging])
    except Exception:  # noqa: BLE001 - an empty staging prefix may not exist as an object
        pass


def _switch_into_place(staging: str, out: str) -> None:
    """Move staged outputs into ``out`` (local: rename of each finished part; previous outputs kept until then)."""
    os.makedirs(out, exist_ok=True)
    old = os.path.join(out, f".old-{uuid.uuid4().hex[:8]}")
    os.makedirs(old)
    for name in ("embeddings", "dead_letters", "run_report.json"):
        if os.path.exists(os.path.join(out, name)):
            os.replace(os.path.join(out, name), os.path.join(old, name))
    for name in ("embeddings", "dead_letters", "run_report.json"):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def run_embed(cfg: Config, products: str, reviews: str | None, out: str, runner: str | None = None,
              beam_args: list[str] | None = None) -> dict[str, Any]:
    """Run the embed pipeline end to end; returns the run report (also written to ``OUT/run_report.json``)."""
    runner = runner or cfg.raw["pipeline"].get("runner", "DirectRunner")
    out = out[len("file://"):] if out.startswith("file://") else out
    remote = _is_remote(out)
    t0 = time.time()
    ptable = inspect_products(products, cfg.product_columns)
    rtable = inspect_reviews(reviews, cfg.review_columns) if reviews else None
    spec = cfg.model
    image_dim, text_dim = output_dims(spec)
    dims = modality_dims(image_dim, text_dim)
    aligned = True
    from embedders.models import _builder_for

    if _builder_for(spec) is not None:  # offline towers or a fine-tuned checkpoint of them
        from embedders.offline import is_aligned

        aligned = bool(is_aligned(spec))  # from the spec/checkpoint metadata, no weights loaded
    check_compatible(cfg.fusion, dims, aligned)
    if spec.random_init:
        log.warning("RANDOM-INIT MODEL %s: the vectors of this run are random features (fine for tests and demos, "
                    "meaningless for recommendations); outputs are marked random_init=true", spec.model_id)
    provenance = provenance_for(cfg, dims, runner, aligned)
    if remote:  # workers write straight to the object store (e.g. gs://) through Beam FileSystems
        staging = out.rstrip("/") + ".staging-" + uuid.uuid4().hex[:8]
    else:
        staging = os.path.join(os.path.abspath(out) + ".staging-" + uuid.uuid4().hex[:8])
        os.makedirs(staging)
    log.info("embedding %d product rows from %d file(s)%s with %s on %s -> %s", ptable.num_rows, len(ptable.paths),
             f" and {rtable.num_rows} reviews" if rtable else "", spec.model_id, runner, out)
    try:
        opts = pipeline_options(runner, beam_args or [])
        p = beam.Pipeline(runner=_make_runner(runner), options=opts)
        build_pipeline(p, cfg, ptable, rtable, staging, provenance, dims)
        result = p.run()
        result.wait_until_finish()
        counters = _metric_counters(result)
        summary = summarize_outputs(staging)
        wall = time.time() - t0
        report = {
            "status": "succeeded", **{k: provenance[k] for k in ("model_id", "random_init", "config_hash",
                                                                 "code_version", "created_at", "runner")},
            "embedding_dim": provenance["dim"], "modality_dims": provenance["modality_dims"],
            "fusion": provenance["fusion"], "model": provenance["model"],
            "inputs": {"products": ptable.paths, "reviews": rtable.paths if rtable else [],
                       "product_rows": ptable.num_rows, "review_rows": rtable.num_rows if rtable else 0},
            "counts": {**summary,
                       "reviews": {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("reviews.")},
                       "model_loads": counters.get("model_loads"),
                       # {"<host>:<pid>": loads}: one model per worker process, checkable on every runner
                       "model_loads_by_process": {k[len(PER_PROCESS_LOADS):]: v for k, v in counters.items()
                                                  if k.startswith(PER_PROCESS_LOADS)}},
            "wall_time_s": round(wall, 3),
            "throughput_products_per_s": round(ptable.num_rows / wall, 3) if wall > 0 else None,
            "config": cfg.raw, "config_file": cfg.source,
        }
        if remote:
            _switch_remote(staging, out, report)
        else:
            with open(os.path.join(staging, "run_report.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2, sort_keys=True, default=str)
            _switch_into_place(staging, out)
    except BaseException:
        if remote:
            from apache_beam.io.filesystems import FileSystems

            try:
                FileSystems.delete([staging])
            except Exception:  # noqa: BLE001 - nothing staged yet
                pass
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("embedded %d products (%d partial), %d dead letters in %.1fs (%.1f products/s) -> %s",
             summary["embedded"], summary["partial"], summary["dead_letters"], wall,
             report["throughput_products_per_s"] or 0, out)
    return report
