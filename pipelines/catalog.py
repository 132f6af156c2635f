"""Catalog inputs: resolve files, check schemas up front (fail fast), plan and read row groups (streaming).

Fail-fast rules (``UserError`` -> one line, exit 2, naming the file and the column):
- a path/glob that matches nothing; a file that is not Parquet;
- products without the ``product_id`` column, or with none of title/description/image/image_uri;
- a column of the wrong type: product_id must be string or integer; title/description/image_uri string;
  image binary (or string holding a path/URI is NOT accepted: use image_uri); price numeric;
  reviews: product_id string/integer, text string, rating/helpful_votes numeric, created_at timestamp or string.
An absent optional column is a logged note. Files are read in sorted path order, then row order; that order
decides which duplicate ``product_id`` wins.
"""
from __future__ import annotations

import glob as _glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from embedders.errors import UserError

log = logging.getLogger(__name__)

PRODUCT_ROLES_REQUIRED = ("product_id",)
PRODUCT_CONTENT_ROLES = ("title", "description", "image", "image_uri")
# Columns never carried through as metadata (bytes, or what the vectors already encode separately).
NOT_METADATA_ROLES = ("image", "image_uri")


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve_paths(spec: str, what: str = "products") -> list[str]:
    """One file, a directory (its ``*.parquet`` files, recursively) or a glob -> sorted list of files."""
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    if _is_remote(spec):
        from apache_beam.io.filesystems import FileSystems

        pattern = spec.rstrip("/") + "/**.parquet" if not any(c in spec for c in "*?[") and not spec.endswith(".parquet") else spec
        try:
            matches = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:  # noqa: BLE001 - any filesystem error is a user-facing "cannot read"
            raise UserError(f"--{what} {spec}: cannot list ({type(e).__name__}: {str(e)[:200]})") from None
        paths = sorted(m.path for m in matches)
    elif os.path.isdir(spec):
        paths = sorted(p for p in _glob.glob(os.path.join(spec, "**", "*.parquet"), recursive=True) if os.path.isfile(p))
    elif any(c in spec for c in "*?["):
        paths = sorted(p for p in _glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        raise UserError(f"--{what} {spec}: file not found")
    if not paths:
        raise UserError(f"--{what} {spec}: no Parquet files found there")
    return paths


# Streaming reads: without these, Arrow pre-buffers a whole row group's column chunks (every image of the row group)
# before the first batch comes out -- a catalog written as one big row group would sit in memory in full.
STREAM_READ = {"pre_buffer": False, "buffer_size": 4 << 20}


def open_parquet(path: str, stream: bool = False) -> pq.ParquetFile:
    """Open one Parquet file (local or any Beam FileSystems URI); ``stream`` reads pages through a 4 MiB buffer."""
    kw = STREAM_READ if stream else {}
    try:
        if _is_remote(path):
            from apache_beam.io.filesystems import FileSystems

            return pq.ParquetFile(FileSystems.open(path), **kw)
        return pq.ParquetFile(path, **kw)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:160]})") from None


def _type_ok(t: pa.DataType, kinds: tuple[str, ...]) -> bool:
    checks = {
        "string": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
        or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)),
        "integer": pa.types.is_integer(t),
        "numeric": pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t),
        "binary": pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t),
        "timestamp": pa.types.is_timestamp(t) or pa.types.is_date(t),
        "boolean": pa.types.is_boolean(t),
        "null": pa.types.is_null(t),
    }
    return any(checks[k] for k in kinds) or checks["null"]


PRODUCT_TYPES = {
    "product_id": ("string", "integer"),
    "title": ("string",),
    "description": ("string",),
    "image": ("binary",),
    "image_uri": ("string",),
    "category": ("string", "integer"),
    "price": ("numeric",),
}
REVIEW_TYPES = {
    "product_id": ("string", "integer"),
    "text": ("string",),
    "rating": ("numeric",),
    "helpful_votes": ("numeric",),
    "created_at": ("timestamp", "string"),
}
_KIND_WORDS = {"string": "string", "integer": "integer", "numeric": "numeric", "binary": "binary (bytes)",
               "timestamp": "timestamp", "boolean": "boolean"}


@dataclass
class TableSpec:
    """What one catalog table (products or reviews) provides, after checking every file's schema."""
    paths: list[str]
    roles: dict[str, str]  # role -> column actually present
    extra_columns: list[str] = field(default_factory=list)  # carried-through metadata (products only)
    row_groups: list[tuple[int, str, int, int]] = field(default_factory=list)  # (file_idx, path, rg, first_row)
    num_rows: int = 0

    def read_columns(self) -> list[str]:
        return list(dict.fromkeys(list(self.roles.values()) + self.extra_columns))


def inspect_table(paths: list[str], columns: dict[str, str], types: dict[str, tuple[str, ...]], what: str,
                  required: tuple[str, ...], any_of: tuple[str, ...] = ()) -> TableSpec:
    roles: dict[str, str] | None = None
    first_schema: pa.Schema | None = None
    row_groups: list[tuple[int, str, int, int]] = []
    total = 0
    for fi, path in enumerate(paths):
        pf = open_parquet(path, stream=True)
        schema = pf.schema_arrow
        names = set(schema.names)
        for role in required:
            col = columns.get(role, role)
            if col not in names:
                raise UserError(f"{path}: missing required {what} column {col!r} (role {role}); "
                                f"columns present: {sorted(names)[:20]}")
        present = {role: col for role, col in columns.items() if col in names}
        if any_of and not any(r in present for r in any_of):
            raise UserError(f"{path}: {what} need at least one of the columns "
                            f"{[columns.get(r, r) for r in any_of]}; none present")
        for role, col in present.items():
            t = schema.field(col).type
            kinds = types.get(role)
            if kinds and not _type_ok(t, kinds):
                want = " or ".join(_KIND_WORDS[k] for k in kinds)
                raise UserError(f"{path}: column {col!r} (role {role}) has type {t}; expected {want}")
        if roles is None:
            roles, first_schema = present, schema
            for role, col in columns.items():
                if role not in present and role not in required:
                    log.info("note: %s column %r (role %s) is absent in %s; continuing without it", what, col, role,
                             path)
        elif present != roles:
            raise UserError(f"{path}: {what} columns differ from {paths[0]}: roles {sorted(present)} vs {sorted(roles)}")
        md = pf.metadata
        row = 0
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            if n:
                row_groups.append((fi, path, rg, row))
            row += n
        total += row
    assert roles is not None and first_schema is not None
    role_cols = set(roles.values())
    extra = []
    for f in first_schema:
        if f.name in role_cols:
            continue
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_nested(f.type):
            log.info("note: %s column %r (%s) is not carried as metadata (binary/nested)", what, f.name, f.type)
            continue
        extra.append(f.name)
    return TableSpec(paths=paths, roles=roles, extra_columns=extra, row_groups=row_groups, num_rows=total)


def inspect_products(spec: str, columns: dict[str, str]) -> TableSpec:
    paths = resolve_paths(spec, "products")
    return inspect_table(paths, columns, PRODUCT_TYPES, "products", PRODUCT_ROLES_REQUIRED, PRODUCT_CONTENT_ROLES)


def inspect_reviews(spec: str, columns: dict[str, str]) -> TableSpec:
    paths = resolve_paths(spec, "reviews")
    ts = inspect_table(paths, columns, REVIEW_TYPES, "reviews", ("product_id",), ("text",))
    ts.extra_columns = []
    return ts


def read_row_group(path: str, rg: int, columns: list[str], batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    """Stream one row group as Python dicts, ``batch_rows`` rows at a time (never the whole file, nor the whole row
    group: pages are read through a bounded buffer, so memory stays flat however large the row groups are)."""
    pf = open_parquet(path, stream=True)
    cols = [c for c in columns if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=cols, use_threads=False):
        yield from batch.to_pylist()
