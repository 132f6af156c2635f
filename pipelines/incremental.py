"""Incremental embedding by content hash: only new and changed products go through the Beam embed pipeline.

The steps (each a plain function; :mod:`pipelines.nightly` runs them as checkpointed stages):

1. :func:`catalog_fingerprint` -- per Parquet file: size, mtime, row count and the sha256 of the Parquet footer
   (row-group offsets, sizes and column statistics), plus ``stat`` of local files named by ``image_uri``, the model
   id and ``Config.embedding_hash``. Equal to the last published run's fingerprint -> "no change", nothing else is
   read. ``[nightly] fingerprint = "content"`` hashes whole files instead (exact, reads every byte).
2. :func:`scan_catalog` -- streams the catalog row group by row group and computes, per product, the content keys
   the embed pipeline itself records: ``image_key`` = sha256 of the image bytes (column bytes, or the bytes a local
   / ``file://`` URI points to; remote URIs per ``[nightly] image_uri_hash``), ``text_key`` = sha256 of the prepared
   text (``embedders.text.product_text`` over ``[text] fields``), ``review_key`` = sha256 of the product's review set
   (same canonical form as the pipeline's ``review_hash``), and ``meta_key`` over the carried metadata (price,
   category, stock, ... and review_count / rating_mean). Missing and duplicate ids become the same dead letters the
   pipeline writes (first occurrence by file order wins).
3. :func:`plan_delta` -- against the previous run's ``keys.parquet``: *unchanged* (content keys equal: vectors are
   reused byte-identical from the previous embeddings), *metadata-only* (unchanged vectors, new metadata), *new*,
   *changed* (which modality), *deleted*, *dead-unchanged* (was a dead letter, content unchanged: not retried).
   A different model id or embedding hash marks every product for embedding.
4. :func:`write_subset` -- the rows to embed (plus a few unchanged *canaries* for the drift gate) as a products
   Parquet subset with the catalog's own schema, and their reviews; the real pipeline (:func:`pipelines.embed.run_embed`)
   embeds that subset.
5. :func:`merge_embeddings` -- previous vectors for unchanged products (copied, never recomputed) + the delta's
   vectors for new/changed ones + current metadata for all -> a complete embeddings output with the same layout as
   ``shopvec embed`` (``embeddings/``, ``dead_letters/``, ``run_report.json``) plus ``keys.parquet``.

Byte identity: unchanged products' ``vector`` / ``image_vector`` / ``text_vector`` / ``review_vector`` values are
Arrow buffers copied from the previous Parquet, so they are bit-for-bit what was published before
(:func:`check_reuse_identity` re-reads the written output and proves it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedders.errors import UserError
from embedders.provenance import canonical_json, code_version, sha256_bytes, utc_now
from embedders.text import clean_text, product_text

from .catalog import TableSpec, inspect_products, inspect_reviews, open_parquet, read_row_group
from .config import Config
from .records import norm_id as _norm_id, num as _num, ts_seconds as _ts_seconds

log = logging.getLogger(__name__)

KEY_COLUMNS = ("image_key", "text_key", "review_key")
VECTOR_COLUMNS = ("vector", "image_vector", "text_vector", "review_vector", "modalities", "image_hash", "text_hash",
                  "review_hash")
KEYS_SCHEMA = pa.schema([("product_id", pa.string()), ("file_idx", pa.int32()), ("row", pa.int64()),
                         ("image_key", pa.string()), ("text_key", pa.string()), ("review_key", pa.string()),
                         ("meta_key", pa.string()), ("review_count", pa.int32()), ("rating_mean", pa.float64()),
                         ("status", pa.string())])
SHARD_ROWS = 50_000


# ----------------------------------------------------------------------------------------------------------------
def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _opt(cfg: Config, section: str, key: str, default: Any) -> Any:
    return cfg.section(section).get(key, default)


# ----------------------------------------------------------------------------------------------------------------
# 1. fingerprints
def _footer_sha256(f, size: int) -> str:
    if size < 12:
        raise UserError(f"{getattr(f, 'name', '?')}: {size} bytes is too small to be a Parquet file")
    f.seek(size - 8)
    tail = f.read(8)
    if tail[4:] != b"PAR1":
        raise UserError(f"{getattr(f, 'name', '?')}: not a Parquet file (no PAR1 magic at the end)")
    flen = struct.unpack("<I", tail[:4])[0]
    f.seek(size - 8 - flen)
    return sha256_bytes(f.read(flen) + tail)


def file_fingerprint(path: str, mode: str = "stat+footer") -> dict[str, Any]:
    """Cheap identity of one Parquet file: size, mtime, rows, footer hash (or the whole file's hash)."""
    if _is_remote(path):
        from apache_beam.io.filesystems import FileSystems

        meta = FileSystems.match([path])[0].metadata_list[0]
        size, mtime = int(meta.size_in_bytes), float(getattr(meta, "last_updated_in_seconds", 0.0) or 0.0)
        with FileSystems.open(path) as f:
            data = f.read() if mode == "content" else None
            digest = sha256_bytes(data) if data is not None else _footer_sha256(f, size)
        num_rows = open_parquet(path).metadata.num_rows
        return {"path": path, "size": size, "mtime": mtime, "num_rows": num_rows, mode: digest}
    st = os.stat(path)
    with open(path, "rb") as f:
        if mode == "content":
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            digest = h.hexdigest()
        else:
            digest = _footer_sha256(f, st.st_size)
    num_rows = open_parquet(path).metadata.num_rows
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "num_rows": num_rows,
            mode: digest}


def _local_uri_stats(ptable: TableSpec) -> dict[str, Any]:
    """(size, mtime) of every local file an ``image_uri`` names: a changed image behind the same path is seen."""
    col = ptable.roles.get("image_uri")
    if not col:
        return {"n": 0, "digest": None}
    h = hashlib.sha256()
    n = 0
    for _fi, path, rg, _first in ptable.row_groups:
        for row in read_row_group(path, rg, [col]):
            uri = clean_text(row.get(col))
            if not uri or _is_remote(uri):
                continue
            p = _local_path(uri)
            try:
                st = os.stat(p)
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
            n += 1
    return {"n": n, "digest": h.hexdigest() if n else None}


def catalog_fingerprint(cfg: Config, products: str, reviews: str | None, mode: str | None = None) -> dict[str, Any]:
    """Fingerprint of everything an incremental run reads; equal fingerprints mean nothing to do."""
    mode = mode or _opt(cfg, "nightly", "fingerprint", "stat+footer")
    if mode not in ("stat+footer", "content"):
        raise UserError(f"[nightly] fingerprint = {mode!r}; expected 'stat+footer' or 'content'")
    ptable = inspect_products(products, cfg.product_columns)
    rtable = inspect_reviews(reviews, cfg.review_columns) if reviews else None
    fp = {
        "mode": mode,
        "products": [file_fingerprint(p, mode) for p in ptable.paths],
        "reviews": [file_fingerprint(p, mode) for p in rtable.paths] if rtable else [],
        "image_uri_files": _local_uri_stats(ptable),
        "model_id": cfg.model.model_id,
        "embedding_hash": cfg.embedding_hash,
        "columns": {"products": cfg.product_columns, "reviews": cfg.review_columns},
        "image_uri_hash": _opt(cfg, "nightly", "image_uri_hash", "content"),
    }
    fp["digest"] = sha256_bytes(canonical_json({k: v for k, v in fp.items() if k != "digest"}).encode())
    return fp


# ----------------------------------------------------------------------------------------------------------------
# 2. per-row content keys
@dataclass
class CatalogScan:
    """Keys of every valid product, in catalog order, plus the validate/dedup dead letters of the catalog."""
    keys: pa.Table                                   # KEYS_SCHEMA without status (status is set by the merge)
    meta: dict[str, dict[str, Any]]                  # product_id -> carried metadata (current values)
    dead_letters: list[dict[str, Any]]               # validate / dedup rows (same as the pipeline's)
    product_rows: int
    review_rows: int
    orphan_reviews: int
    null_text_reviews: int
    ptable: TableSpec
    rtable: TableSpec | None
    image_reads: int = 0

    def index(self) -> dict[str, int]:
        return {pid: i for i, pid in enumerate(self.keys.column("product_id").to_pylist())}


def _image_key(row: dict, roles: dict[str, str], uri_mode: str, limits: dict[str, Any]) -> tuple[str | None, bool]:
    """sha256 of the image bytes (what the pipeline stores as ``image_hash``); (key, read_a_file)."""
    image = row.get(roles["image"]) if "image" in roles else None
    if image is not None:  # as the pipeline: bytes present (even empty) are the image, the URI is not fetched
        return sha256_bytes(bytes(image)), False
    uri = clean_text(row.get(roles["image_uri"])) if "image_uri" in roles else None
    if not uri:
        return None, False
    if _is_remote(uri) and uri_mode == "uri":
        return "uri:" + sha256_bytes(uri.encode("utf-8")), False
    if not _is_remote(uri):
        try:
            with open(_local_path(uri), "rb") as f:
                return sha256_bytes(f.read()), True
        except OSError:
            return "unreadable:" + sha256_bytes(uri.encode("utf-8")), True
    from embedders.errors import RecordError

    from .fetch import fetch_uri

    try:
        data = fetch_uri(uri, float(limits.get("fetch_timeout_s", 10.0)), int(limits.get("fetch_retries", 2)),
                         int(limits.get("max_bytes", 20_000_000)), int(limits.get("fetch_max_concurrency", 8)))
        return sha256_bytes(data), True
    except RecordError:
        return "unreadable:" + sha256_bytes(uri.encode("utf-8")), True


def review_content(text: str, rating, votes, ts) -> str:
    """One review in the canonical form the pipeline hashes (``SelectReviews``)."""
    return json.dumps([text, rating, votes, ts])


def scan_catalog(cfg: Config, products: str, reviews: str | None) -> CatalogScan:
    """Stream the catalog once and compute every product's content keys (see the module docstring)."""
    ptable = inspect_products(products, cfg.product_columns)
    rtable = inspect_reviews(reviews, cfg.review_columns) if reviews else None
    roles = ptable.roles
    text_cfg = cfg.raw["text"]
    form = text_cfg.get("unicode_form", "NFKC")
    uri_mode = _opt(cfg, "nightly", "image_uri_hash", "content")
    if uri_mode not in ("content", "uri"):
        raise UserError(f"[nightly] image_uri_hash = {uri_mode!r}; expected 'content' or 'uri'")
    cols = ptable.read_columns()
    ids: list[str] = []
    loc_f: list[int] = []
    loc_r: list[int] = []
    img: list[str | None] = []
    txt: list[str | None] = []
    meta: dict[str, dict[str, Any]] = {}
    dead: list[dict[str, Any]] = []
    first_seen: dict[str, tuple[int, int]] = {}
    image_reads = 0
    rows = 0
    for fi, path, rg, first_row in ptable.row_groups:
        for i, row in enumerate(read_row_group(path, rg, cols)):
            rows += 1
            ri = first_row + i
            pid = _norm_id(row.get(roles["product_id"]))
            if pid is None:
                dead.append({"product_id": None, "stage": "validate", "error": "missing_product_id",
                             "message": f"{os.path.basename(path)} row {ri}: product_id is null or empty"})
                continue
            if pid in first_seen:
                wf, wr = first_seen[pid]
                dead.append({"product_id": pid, "stage": "dedup", "error": "duplicate_id",
                             "message": f"{os.path.basename(path)} row {ri} repeats the product_id first seen in "
                                        f"{os.path.basename(ptable.paths[wf])} row {wr}"})
                continue
            first_seen[pid] = (fi, ri)
            text = product_text([row.get(roles[f]) for f in text_cfg["fields"] if f in roles],
                                text_cfg.get("separator", ". "), form)
            ik, read = _image_key(row, roles, uri_mode, cfg.raw["images"])
            image_reads += read
            m: dict[str, Any] = {}
            for role in ("title", "description", "category", "price"):
                if role in roles:
                    m[role] = row.get(roles[role])
            for col in ptable.extra_columns:
                m[col] = row.get(col)
            ids.append(pid)
            loc_f.append(fi)
            loc_r.append(ri)
            img.append(ik)
            txt.append(sha256_bytes(text.encode("utf-8")) if text else None)
            meta[pid] = m

    # reviews: the same selection the pipeline makes (catalog ids only; text-bearing reviews form the content)
    content: dict[str, list[str]] = {}
    ratings: dict[str, list[float]] = {}
    orphans = null_text = review_rows = 0
    if rtable is not None:
        r = rtable.roles
        for _fi, path, rg, _first in rtable.row_groups:
            for row in read_row_group(path, rg, rtable.read_columns()):
                review_rows += 1
                pid = _norm_id(row.get(r["product_id"]))
                if pid is None:
                    continue
                if pid not in meta:
                    orphans += 1
                    continue
                text = clean_text(row.get(r["text"]), form) if "text" in r else None
                rating = _num(row.get(r["rating"])) if "rating" in r else None
                votes = _num(row.get(r["helpful_votes"])) if "helpful_votes" in r else None
                ts = _ts_seconds(row.get(r["created_at"])) if "created_at" in r else None
                if rating is not None:
                    ratings.setdefault(pid, []).append(rating)
                if text:
                    content.setdefault(pid, []).append(review_content(text, rating, votes, ts))
                else:
                    null_text += 1
    rev_key, rev_count, rev_mean, meta_key = [], [], [], []
    for pid in ids:
        c = sorted(content.get(pid, []))
        rev_key.append(sha256_bytes("\n".join(c).encode("utf-8")) if c else None)
        rev_count.append(len(c))
        rs = ratings.get(pid)
        rev_mean.append(float(np.mean(rs)) if rs else None)
        meta_key.append(sha256_bytes(canonical_json([meta[pid], len(c), rev_mean[-1]]).encode("utf-8")))
    keys = pa.table({"product_id": ids, "file_idx": loc_f, "row": loc_r, "image_key": img, "text_key": txt,
                     "review_key": rev_key, "meta_key": meta_key, "review_count": rev_count, "rating_mean": rev_mean},
                    schema=pa.schema([f for f in KEYS_SCHEMA if f.name != "status"]))
    return CatalogScan(keys=keys, meta=meta, dead_letters=dead, product_rows=rows, review_rows=review_rows,
                       orphan_reviews=orphans, null_text_reviews=null_text, ptable=ptable, rtable=rtable,
                       image_reads=image_reads)


# ----------------------------------------------------------------------------------------------------------------
# 3. the plan
@dataclass
class Plan:
    mode: str                                   # "incremental" | "full"
    reason: str
    unchanged: list[str] = field(default_factory=list)       # reuse vectors (incl. metadata-only changes)
    metadata_only: list[str] = field(default_factory=list)   # subset of unchanged whose metadata changed
    new: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)  # pid -> changed modalities
    dead_unchanged: list[str] = field(default_factory=list)  # dead last time, same content: dead letters carried
    deleted: list[str] = field(default_factory=list)
    canaries: list[str] = field(default_factory=list)        # unchanged, re-embedded only to measure drift

    @property
    def to_embed(self) -> list[str]:
        return self.new + list(self.changed)

    @property
    def nothing_changed(self) -> bool:
        return not (self.new or self.changed or self.deleted or self.metadata_only)

    def counts(self) -> dict[str, Any]:
        by_mod: dict[str, int] = {}
        for mods in self.changed.values():
            for m in mods:
                by_mod[m] = by_mod.get(m, 0) + 1
        return {"mode": self.mode, "reason": self.reason, "unchanged": len(self.unchanged),
                "metadata_only": len(self.metadata_only), "new": len(self.new), "changed": len(self.changed),
                "changed_by_modality": by_mod, "dead_unchanged": len(self.dead_unchanged),
                "deleted": len(self.deleted), "to_embed": len(self.to_embed), "canaries": len(self.canaries)}

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "unchanged": self.unchanged,
                "metadata_only": self.metadata_only, "new": self.new, "changed": self.changed,
                "dead_unchanged": self.dead_unchanged, "deleted": self.deleted, "canaries": self.canaries}


def read_keys(run_dir: str) -> tuple[pa.Table, dict[str, Any]] | None:
    path = os.path.join(run_dir, "keys.parquet")
    if not os.path.isfile(path):
        return None
    t = pq.read_table(path)
    info = json.loads((t.schema.metadata or {}).get(b"shopvec_keys", b"{}"))
    return t, info


def plan_delta(scan: CatalogScan, previous: tuple[pa.Table, dict[str, Any]] | None, cfg: Config,
               canaries: int = 0, salt: str = "") -> Plan:
    """Classify every product against the previous run's keys (see the module docstring)."""
    cur_ids = scan.keys.column("product_id").to_pylist()
    if previous is None:
        return Plan(mode="full", reason="first run (no previous embeddings)", new=cur_ids)
    prev, info = previous
    if info.get("model_id") != cfg.model.model_id or info.get("embedding_hash") != cfg.embedding_hash:
        why = []
        if info.get("model_id") != cfg.model.model_id:
            why.append(f"model {info.get('model_id')} -> {cfg.model.model_id}")
        if info.get("embedding_hash") != cfg.embedding_hash:
            why.append(f"embedding config {info.get('embedding_hash')} -> {cfg.embedding_hash}")
        return Plan(mode="full", reason="; ".join(why) + ": everything is re-embedded",
                    changed={pid: ["model"] for pid in cur_ids})
    pk = {c: prev.column(c).to_pylist() for c in ("product_id", *KEY_COLUMNS, "meta_key", "status")}
    prev_by_id = {pid: i for i, pid in enumerate(pk["product_id"])}
    ck = {c: scan.keys.column(c).to_pylist() for c in (*KEY_COLUMNS, "meta_key")}
    plan = Plan(mode="incremental", reason="content keys compared with the previous run")
    for i, pid in enumerate(cur_ids):
        j = prev_by_id.get(pid)
        if j is None:
            plan.new.append(pid)
            continue
        diff = [c[:-4] for c in KEY_COLUMNS if ck[c][i] != pk[c][j]]
        if diff:
            plan.changed[pid] = [{"image": "image", "text": "text", "review": "reviews"}[d] for d in diff]
        elif pk["status"][j] != "embedded":
            plan.dead_unchanged.append(pid)
        else:
            plan.unchanged.append(pid)
            if ck["meta_key"][i] != pk["meta_key"][j]:
                plan.metadata_only.append(pid)
    cur = set(cur_ids)
    plan.deleted = [pid for pid in pk["product_id"] if pid not in cur]
    if canaries > 0 and plan.unchanged:
        ranked = sorted(plan.unchanged, key=lambda p: sha256_bytes(f"{salt}\0{p}".encode()))
        plan.canaries = sorted(ranked[:canaries], key=plan.unchanged.index)
    return plan


# ----------------------------------------------------------------------------------------------------------------
# 4. subset for the Beam pipeline
def write_subset(scan: CatalogScan, product_ids: Iterable[str], out_dir: str,
                 row_group_size: int = 64) -> tuple[str | None, str | None, int]:
    """Write the rows of ``product_ids`` (catalog schema, catalog order) + their reviews; returns paths and count."""
    want = set(product_ids)
    os.makedirs(out_dir, exist_ok=True)
    if not want:
        return None, None, 0
    pos = scan.index()
    fis = scan.keys.column("file_idx").to_pylist()
    rws = scan.keys.column("row").to_pylist()
    by_file: dict[int, list[int]] = {}
    for pid in want:
        i = pos[pid]
        by_file.setdefault(fis[i], []).append(rws[i])
    parts = []
    for fi in sorted(by_file):
        pf = open_parquet(scan.ptable.paths[fi])
        rows = np.array(sorted(by_file[fi]), dtype=np.int64)
        # read only the row groups holding wanted rows
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
        groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
        for g in groups:
            t = pf.read_row_group(g, use_threads=False)
            local = rows[(rows >= starts[g]) & (rows < starts[g + 1])] - starts[g]
            parts.append(t.take(pa.array(local)))
    table = pa.concat_tables(parts, promote_options="permissive")
    products = os.path.join(out_dir, "products.parquet")
    pq.write_table(table, products, row_group_size=row_group_size, compression="zstd")
    reviews = None
    if scan.rtable is not None:
        col = scan.rtable.roles["product_id"]
        rparts = []
        for path in scan.rtable.paths:
            pf = open_parquet(path)
            for g in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(g, use_threads=False)
                keep = [(_norm_id(v) in want) for v in t.column(col).to_pylist()]
                if any(keep):
                    rparts.append(t.filter(pa.array(keep)))
        if rparts:
            reviews = os.path.join(out_dir, "reviews.parquet")
            pq.write_table(pa.concat_tables(rparts, promote_options="permissive"), reviews,
                           row_group_size=max(row_group_size, 256), compression="zstd")
    return products, reviews, table.num_rows


# ----------------------------------------------------------------------------------------------------------------
# 5. merge
def _read_embeddings(run_dir: str, ids: set[str] | None = None) -> pa.Table | None:
    """Rows of ``run_dir/embeddings`` (all, or those whose product_id is in ``ids``), shard by shard."""
    d = os.path.join(run_dir, "embeddings")
    if not os.path.isdir(d):
        return None
    parts = []
    schema = None
    for name in sorted(os.listdir(d)):
        if not name.endswith(".parquet"):
            continue
        t = pq.read_table(os.path.join(d, name))
        schema = schema or t.schema
        if ids is not None:
            t = t.filter(pc.is_in(t.column("product_id"), value_set=pa.array(sorted(ids), pa.string())))
        parts.append(t)
    if not parts:
        return None
    return pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]


def _read_dead(run_dir: str) -> pa.Table | None:
    d = os.path.join(run_dir, "dead_letters")
    if not os.path.isdir(d):
        return None
    files = [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".parquet")]
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def embeddings_provenance(run_dir: str) -> dict[str, Any]:
    d = os.path.join(run_dir, "embeddings")
    for name in sorted(os.listdir(d)):
        if name.endswith(".parquet"):
            return json.loads(pq.read_schema(os.path.join(d, name)).metadata.get(b"shopvec", b"{}"))
    return {}


def _write_shards(table: pa.Table, out_dir: str, rows: int = SHARD_ROWS) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    n = max(1, -(-table.num_rows // rows))
    paths = []
    for i in range(n):
        p = os.path.join(out_dir, f"part-{i:05d}-of-{n:05d}.parquet")
        pq.write_table(table.slice(i * rows, rows), p, row_group_size=4096, compression="zstd")
        paths.append(p)
    return paths


def meta_fields(ptable: TableSpec) -> list[pa.Field]:
    """Arrow fields of the carried metadata, typed as the embed pipeline types them (``_arrow_meta_fields``)."""
    schema = open_parquet(ptable.paths[0]).schema_arrow
    fields = []
    for name, col in [(r, ptable.roles[r]) for r in ("title", "description", "category", "price") if r in ptable.roles] \
            + [(c, c) for c in ptable.extra_columns]:
        t = schema.field(col).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if name == "category" and pa.types.is_integer(t):
            t = pa.int64()
        fields.append(pa.field(name, t))
    return fields


def _target_schema(cfg: Config, scan: CatalogScan, src: pa.Table | None, provenance: dict) -> pa.Schema:
    """Vector fields as the embeddings being merged have them, metadata fields as the current catalog has them."""
    meta = {b"shopvec": json.dumps(provenance, sort_keys=True).encode()}
    if src is None:  # nothing embedded to copy the layout from: build it as the pipeline does (imports Beam)
        from embedders.fusion import fused_dim, modality_dims
        from embedders.models import output_dims

        from .embed import embeddings_schema

        dims = modality_dims(*output_dims(cfg.model))
        return embeddings_schema(dims, fused_dim(cfg.fusion, dims), meta_fields(scan.ptable), provenance)
    fields = [src.schema.field(c) for c in ("product_id", *VECTOR_COLUMNS, "review_count", "rating_mean")]
    taken = {f.name for f in fields}
    fields += [f for f in meta_fields(scan.ptable) if f.name not in taken]
    return pa.schema(fields, metadata=meta)


def _provenance(cfg: Config, src: pa.Table | None, runner: str, plan: Plan, base: str | None) -> dict[str, Any]:
    """The embed pipeline's provenance record (model, dims, fusion, ...), refreshed for this merge.

    Taken from the embeddings being merged (same ``embedding_hash``, hence same model and fusion); only when there
    is nothing to take it from is it built as the pipeline builds it (which imports Beam).
    """
    if src is not None:
        p = json.loads(src.schema.metadata[b"shopvec"])
    else:
        from embedders.fusion import modality_dims
        from embedders.models import output_dims

        from .embed import provenance_for

        p = provenance_for(cfg, modality_dims(*output_dims(cfg.model)), runner)
    p.update({"full_config_hash": cfg.hash, "code_version": code_version(), "created_at": utc_now(), "runner": runner,
              "incremental": {"base": base, **{k: v for k, v in plan.counts().items() if k != "reason"}}})
    return p


def _dead_summary(dead: pa.Table, merged: pa.Table) -> dict[str, Any]:
    """Counts in the shape of the pipeline's ``summarize_outputs``."""
    ids = set(merged.column("product_id").to_pylist())
    by_stage: dict[str, dict[str, int]] = {}
    image_failed, not_embedded = set(), set()
    for pid, stage, err in zip(dead.column("product_id").to_pylist(), dead.column("stage").to_pylist(),
                               dead.column("error").to_pylist()):
        by_stage.setdefault(stage, {}).setdefault(err, 0)
        by_stage[stage][err] += 1
        (image_failed if stage == "image" else not_embedded).add(pid)
    mods: dict[str, int] = {}
    for m in merged.column("modalities").to_pylist():
        mods[m] = mods.get(m, 0) + 1
    # catalog rows with at least one dead letter: each validate/dedup letter is its own row; the other stages'
    # letters belong to the product's (winning) row, which counts once however many letters it has
    row_level = sum(1 for st in dead.column("stage").to_pylist() if st in ("validate", "dedup"))
    product_level = {pid for pid, st in zip(dead.column("product_id").to_pylist(), dead.column("stage").to_pylist())
                     if st not in ("validate", "dedup")}
    return {"embedded": merged.num_rows, "partial": len(image_failed & ids), "by_modalities": mods,
            "dead_letters": dead.num_rows, "dead_letter_products": len(not_embedded), "dead_by_stage": by_stage,
            "dead_letter_rows": row_level + len(product_level)}


DEAD_LETTER_FIELDS = [("product_id", pa.string()), ("stage", pa.string()), ("error", pa.string()),
                      ("message", pa.string())]


def merge_embeddings(cfg: Config, scan: CatalogScan, plan: Plan, previous_dir: str | None, delta_dir: str | None,
                     out_dir: str, runner: str, extra_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Reused previous vectors + delta vectors + current metadata -> ``out_dir`` (embed layout + keys.parquet)."""
    reuse = set(plan.unchanged)
    embedded_now = set(plan.to_embed)
    canaries = set(plan.canaries)
    prev = _read_embeddings(previous_dir, reuse) if previous_dir and reuse else None
    delta = _read_embeddings(delta_dir) if delta_dir else None
    if delta is not None and canaries:
        delta = delta.filter(pc.invert(pc.is_in(delta.column("product_id"),
                                                value_set=pa.array(sorted(canaries), pa.string()))))
    if prev is not None and prev.num_rows != len(reuse):
        missing = sorted(reuse - set(prev.column("product_id").to_pylist()))[:5]
        raise RuntimeError(f"previous embeddings {previous_dir} lack {len(reuse) - prev.num_rows} product(s) marked "
                           f"embedded in its keys.parquet (e.g. {missing}); the previous run is inconsistent")
    src = delta if delta is not None else prev
    base = os.path.basename(previous_dir.rstrip("/")) if previous_dir else None
    provenance = _provenance(cfg, src, runner, plan, base)
    schema = _target_schema(cfg, scan, src, provenance)
    vec_fields = pa.schema([schema.field(c) for c in ("product_id", *VECTOR_COLUMNS)])
    vec_parts = [t.select(list(vec_fields.names)).cast(vec_fields) for t in (prev, delta)
                 if t is not None and t.num_rows]
    vecs = pa.concat_tables(vec_parts) if vec_parts else vec_fields.empty_table()
    # catalog order, current metadata, current review summary
    pos = scan.index()
    unordered = vecs.column("product_id").to_pylist()
    order = sorted(range(len(unordered)), key=lambda i: pos[unordered[i]])
    vecs = vecs.take(pa.array(order, pa.int64()))
    ids = [unordered[i] for i in order]
    rc = scan.keys.column("review_count").to_pylist()
    rm = scan.keys.column("rating_mean").to_pylist()
    cols: dict[str, Any] = {c: vecs.column(c) for c in vec_fields.names}
    cols["review_count"] = pa.array([rc[pos[p]] for p in ids], schema.field("review_count").type)
    cols["rating_mean"] = pa.array([rm[pos[p]] for p in ids], schema.field("rating_mean").type)
    for f in schema:
        if f.name not in cols:
            cols[f.name] = pa.array([scan.meta[p].get(f.name) for p in ids], type=f.type)
    merged = pa.table([cols[f.name] for f in schema], schema=schema)

    # dead letters: catalog validate/dedup (recomputed) + carried for unchanged products + the delta's
    dead_rows = list(scan.dead_letters)
    carried_ids = reuse | set(plan.dead_unchanged)
    prev_dead = _read_dead(previous_dir) if previous_dir else None
    if prev_dead is not None and prev_dead.num_rows:
        for r in prev_dead.to_pylist():
            if r["product_id"] in carried_ids and r["stage"] not in ("validate", "dedup"):
                dead_rows.append({k: r[k] for k, _ in DEAD_LETTER_FIELDS})
    delta_dead = _read_dead(delta_dir) if delta_dir else None
    if delta_dead is not None and delta_dead.num_rows:
        for r in delta_dead.to_pylist():
            if r["product_id"] in embedded_now:
                dead_rows.append({k: r[k] for k, _ in DEAD_LETTER_FIELDS})
    dl_schema = pa.schema(DEAD_LETTER_FIELDS, metadata={b"shopvec": json.dumps(provenance, sort_keys=True).encode()})
    dead = pa.Table.from_pylist(dead_rows, schema=dl_schema) if dead_rows else dl_schema.empty_table()

    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    _write_shards(merged, os.path.join(tmp, "embeddings"))
    _write_shards(dead, os.path.join(tmp, "dead_letters"))
    embedded_ids = set(ids)
    status = ["embedded" if p in embedded_ids else "dead" for p in scan.keys.column("product_id").to_pylist()]
    keys = scan.keys.append_column("status", pa.array(status, pa.string()))
    info = {"model_id": cfg.model.model_id, "embedding_hash": cfg.embedding_hash, "code_version": code_version(),
            "created_at": provenance["created_at"]}
    keys = keys.replace_schema_metadata({b"shopvec_keys": json.dumps(info).encode()})
    pq.write_table(keys, os.path.join(tmp, "keys.parquet"), compression="zstd")
    report = {
        "status": "succeeded", "kind": "incremental-merge",
        **{k: provenance.get(k) for k in ("model_id", "random_init", "config_hash", "code_version", "created_at",
                                          "runner")},
        "embedding_dim": provenance.get("dim"), "modality_dims": provenance.get("modality_dims"),
        "fusion": provenance["fusion"], "model": provenance["model"],
        "inputs": {"products": scan.ptable.paths, "reviews": scan.rtable.paths if scan.rtable else [],
                   "product_rows": scan.product_rows, "review_rows": scan.review_rows},
        "counts": {**_dead_summary(dead, merged),
                   "reviews": {"orphan": scan.orphan_reviews, "null_text": scan.null_text_reviews}},
        "incremental": {"base": previous_dir, "delta": delta_dir, **plan.counts(),
                        "reused": len(reuse), "embedded_now": len(embedded_now & embedded_ids)},
        "config": cfg.raw, "config_file": cfg.source, **(extra_report or {}),
    }
    with open(os.path.join(tmp, "run_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True, default=str)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return report


# ----------------------------------------------------------------------------------------------------------------
# checks used by the quality gates
def _list_bits(table: pa.Table, col: str) -> tuple[np.ndarray, np.ndarray]:
    """(per-row length, -1 for null; all float32 values as uint32 bit patterns) of a list<float32> column."""
    arr = table.column(col).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.float32, copy=False).view(np.uint32)
    return lengths, values


def check_reuse_identity(previous_dir: str, merged_dir: str, reused: Iterable[str]) -> dict[str, Any]:
    """Re-read the written merge: every reused product's vectors must be bit-identical to the previous run's."""
    reused = set(reused)
    if not reused:
        return {"checked": 0, "mismatched": [], "missing": []}
    a = _read_embeddings(previous_dir, reused)
    b = _read_embeddings(merged_dir, reused)
    b_ids = set(b.column("product_id").to_pylist()) if b is not None else set()
    missing = sorted(reused - b_ids)
    if a is None or b is None or missing:
        return {"checked": len(reused), "mismatched": [], "missing": missing}
    a, b = a.sort_by("product_id"), b.sort_by("product_id")
    ids = np.array(a.column("product_id").to_pylist(), dtype=object)
    bad = np.zeros(len(ids), dtype=bool)
    for col in ("vector", "image_vector", "text_vector", "review_vector"):
        la, va = _list_bits(a, col)
        lb, vb = _list_bits(b, col)
        same_len = la == lb
        bad |= ~same_len
        if same_len.all() and len(va) == len(vb):
            rows = np.repeat(np.arange(len(ids)), np.maximum(la, 0))
            bad[np.unique(rows[va != vb])] = True
    return {"checked": len(reused), "mismatched": sorted(ids[bad].tolist()), "missing": []}


def _fused(table: pa.Table) -> dict[str, np.ndarray]:
    ids = table.column("product_id").to_pylist()
    lengths, values = _list_bits(table, "vector")
    vals = values.view(np.float32)
    d = int(lengths.max()) if len(lengths) else 0
    return {p: vals[i * d:(i + 1) * d] for i, p in enumerate(ids)}


def canary_drift(previous_dir: str, delta_dir: str, canaries: Iterable[str]) -> dict[str, Any]:
    """Fresh vectors of unchanged products vs the stored ones: max |difference| and min cosine of the fused vector."""
    canaries = set(canaries)
    if not canaries or not delta_dir:
        return {"n": 0, "max_abs_diff": None, "min_cosine": None, "worst": None}
    a = _read_embeddings(previous_dir, canaries)
    b = _read_embeddings(delta_dir, canaries)
    va = _fused(a) if a is not None else {}
    vb = _fused(b) if b is not None else {}
    common = sorted(set(va) & set(vb))
    if not common:
        return {"n": 0, "max_abs_diff": None, "min_cosine": None, "worst": None,
                "note": "no canary was embedded in both runs"}
    diffs = {p: float(np.max(np.abs(va[p] - vb[p]))) for p in common}
    cos = {p: float(np.dot(va[p], vb[p]) / (np.linalg.norm(va[p]) * np.linalg.norm(vb[p]) or 1.0)) for p in common}
    worst = max(diffs, key=diffs.get)
    return {"n": len(common), "max_abs_diff": diffs[worst], "min_cosine": min(cos.values()), "worst": worst}
