"""Read (and, for tests and tools, write) the embeddings Parquet that ``shopvec embed`` produces.

Input accepted by :func:`read_embeddings` (the ``--embeddings`` argument of ``shopvec index``):

* the embed pipeline's output directory ``OUT`` (``OUT/embeddings/*.parquet`` and ``OUT/run_report.json`` when present);
* a directory of embeddings Parquet files (``run_report.json`` is looked up in it, and in its parent when the
  directory is called ``embeddings``);
* a glob such as ``'runs/*/embeddings/part-*.parquet'``, or a single Parquet file.

The schema is the one in ``docs/CONTRACTS.md``: ``product_id`` (string, unique), ``vector``
(``fixed_size_list<float32>[D]``, L2-normalised), optional per-modality vectors, carried catalog metadata, and the
Parquet schema metadata key ``b"shopvec"`` holding the provenance JSON (model id, random-init flag, dims, fusion ...).

Everything wrong with the input is a :class:`embedders.errors.UserError` whose one-line message names the file and
field: no files / no rows, a missing column, mismatched dimensions across shards, null / NaN / inf / zero vectors,
duplicate product ids. Nothing here unpickles anything.
"""
from __future__ import annotations

import glob as _glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedders.errors import UserError
from embedders.provenance import canonical_json, sha256_bytes, sha256_file

log = logging.getLogger(__name__)

PROVENANCE_KEY = b"shopvec"
ID_COLUMN = "product_id"
VECTOR_COLUMN = "vector"
#: Vector columns of the contract; none of them is carried into the index metadata.
VECTOR_COLUMNS = ("vector", "image_vector", "text_vector", "review_vector")
RUN_REPORT = "run_report.json"
#: Provenance keys copied from run_report.json when the Parquet schema metadata lacks them.
PROVENANCE_FIELDS = ("model_id", "random_init", "dim", "modality_dims", "fusion", "config_hash", "code_version",
                     "created_at")
#: Vectors whose L2 norm is further than this from 1 are re-normalised (with a warning).
NORM_TOLERANCE = 1e-3


@dataclass
class Embeddings:
    """Embeddings read from Parquet: row ``i`` of ``vectors`` is product ``ids[i]``."""

    ids: list[str]
    vectors: np.ndarray                      # float32, (n, dim), C-contiguous, L2-normalised
    metadata: pa.Table                       # product_id + carried columns, same row order as ids
    provenance: dict[str, Any]               # the b"shopvec" schema metadata, completed from run_report.json
    files: list[str] = field(default_factory=list)
    source: str = ""
    run_report: dict[str, Any] | None = None
    run_report_path: str | None = None
    renormalised: int = 0                    # rows whose norm was off by more than NORM_TOLERANCE
    _source_hash: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def source_hash(self) -> str:
        """sha256 over (file name, size, sha256) of every input file, in order; computed once."""
        if self._source_hash is None:
            self._source_hash = files_hash(self.files)
        return self._source_hash


def files_hash(files: Sequence[str]) -> str:
    entries = [[os.path.basename(f), os.path.getsize(f), sha256_file(f)] for f in files]
    return sha256_bytes(canonical_json(entries).encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------- input
def resolve_embedding_files(path: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """Return the Parquet files behind ``path`` (sorted) and the run_report.json that goes with them, if any."""
    text = os.fspath(path)
    report: Path | None = None
    if any(ch in text for ch in "*?["):
        files = [Path(f) for f in sorted(_glob.glob(text, recursive=True)) if os.path.isfile(f)]
        if files:
            parent = files[0].parent
            for cand in (parent / RUN_REPORT, parent.parent / RUN_REPORT):
                if cand.is_file():
                    report = cand
                    break
    else:
        p = Path(text)
        if p.is_dir():
            if (p / "embeddings").is_dir():
                files = sorted((p / "embeddings").glob("*.parquet"))
                report = p / RUN_REPORT
            else:
                files = sorted(p.glob("*.parquet"))
                report = p / RUN_REPORT
                if not report.is_file() and p.name == "embeddings":
                    report = p.parent / RUN_REPORT
        elif p.is_file():
            files = [p]
        else:
            raise UserError(f"--embeddings {text}: no such file, directory or matching glob; pass the embed "
                            f"output directory (OUT with OUT/embeddings/*.parquet), a directory or a glob of "
                            f"Parquet files")
    files = [f for f in files if not f.name.startswith((".", "_"))]
    if report is not None and not report.is_file():
        report = None
    if not files:
        raise UserError(f"--embeddings {text}: no embeddings Parquet files found (expected OUT/embeddings/*.parquet, "
                        f"a directory of *.parquet or a glob); run `shopvec embed` first")
    return files, report


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable JSON ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"re-run the embed step or remove the file") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def _schema_provenance(path: Path, schema: pa.Schema) -> dict[str, Any]:
    meta = schema.metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    if raw is None:
        return {}
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: Parquet schema metadata 'shopvec' is not valid JSON; "
                        f"re-run `shopvec embed`") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: Parquet schema metadata 'shopvec' must be a JSON object")
    return obj


def _vector_dim(path: Path, schema: pa.Schema, name: str) -> tuple[int | None, pa.DataType]:
    """(dim or None when variable-size, value type) of a list-typed vector column; UserError on other types."""
    idx = schema.get_field_index(name)
    if idx < 0:
        raise UserError(f"{path}: missing column '{name}' (expected the embeddings schema: product_id, vector, ...)")
    typ = schema.field(idx).type
    if pa.types.is_fixed_size_list(typ):
        dim, vtype = typ.list_size, typ.value_type
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        dim, vtype = None, typ.value_type
    else:
        raise UserError(f"{path}: field '{name}' has type {typ}, expected fixed_size_list<float32>[D]")
    if not pa.types.is_floating(vtype):
        raise UserError(f"{path}: field '{name}' has element type {vtype}, expected float32")
    return dim, vtype


def _vectors_to_numpy(path: Path, col: pa.ChunkedArray, ids: pa.Array, name: str) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        bad = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise UserError(f"{path}: field '{name}' is null for product_id {ids[bad].as_py()!r} (row {bad}); "
                        f"every product needs a fused vector (the embed pipeline dead-letters such rows)")
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
        values = arr.flatten()
        if len(values) != len(arr) * dim:  # defensive: flatten() skips null entries
            raise UserError(f"{path}: field '{name}' has inconsistent lengths")
    else:  # variable-size list: all rows must have the same length
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            bad = int(np.flatnonzero(lengths != lengths[0])[0])
            raise UserError(f"{path}: field '{name}' has length {lengths[bad]} for product_id "
                            f"{ids[bad].as_py()!r} but {lengths[0]} for the first row; vectors must share one dim")
        dim = int(lengths[0]) if len(lengths) else 0
        values = arr.flatten()
    if values.null_count:
        bad = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // max(dim, 1)
        raise UserError(f"{path}: field '{name}' has a null element for product_id {ids[bad].as_py()!r} (row {bad})")
    out = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32)
    return out.reshape(len(arr), dim)


def check_unit_rows(where: str, block: np.ndarray, ids: pa.Array, name: str = VECTOR_COLUMN,
                    tolerance: float = NORM_TOLERANCE, row_prefix: str = "") -> tuple[np.ndarray, int]:
    """Validate a ``(rows, dim)`` block of vectors and L2-normalise the rows that need it.

    NaN / inf / all-zero rows raise a UserError naming ``where`` (the file), the field, the product id and the row
    (``row_prefix`` adds e.g. ``"row group 3, "``); rows whose norm is off by more than ``tolerance`` are re-normalised.
    Returns ``(block, renormalised_rows)``. The single-process read (:func:`read_embeddings`) and the sharded index
    build both go through here, so they index the very same vectors."""
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        what = "NaN" if np.isnan(block[bad]).any() else "inf"
        raise UserError(f"{where}: field '{name}' contains {what} for product_id {ids[bad].as_py()!r} "
                        f"({row_prefix}row {bad}; {int((~finite).sum())} such rows); fix or drop them upstream")
    norms = np.linalg.norm(block, axis=1)
    zero = norms < 1e-12
    if zero.any():
        bad = int(np.flatnonzero(zero)[0])
        raise UserError(f"{where}: field '{name}' is an all-zero vector for product_id {ids[bad].as_py()!r} "
                        f"({row_prefix}row {bad}); it cannot be normalised")
    off = np.abs(norms - 1.0) > tolerance
    if off.any():
        block = block / norms[:, None]
    return block, int(off.sum())


def _leaf_null_count(pf: pq.ParquetFile, name: str) -> int:
    """Nulls recorded in the Parquet statistics of column ``name``'s leaf (0 when no statistics)."""
    md = pf.metadata
    total = 0
    for rg in range(md.num_row_groups):
        group = md.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            if col.path_in_schema.split(".")[0] == name and col.statistics is not None \
                    and col.statistics.has_null_count:
                total += int(col.statistics.null_count or 0)
    return total


def _columns_to_read(schema: pa.Schema) -> list[str]:
    cols = []
    for f in schema:
        if f.name in VECTOR_COLUMNS and f.name != VECTOR_COLUMN:
            continue
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_fixed_size_binary(f.type):
            continue
        cols.append(f.name)
    return cols


def _metadata_table(table: pa.Table) -> pa.Table:
    keep = []
    for f in table.schema:
        if f.name in VECTOR_COLUMNS:
            continue
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_fixed_size_binary(f.type):
            continue  # never carry bytes (images) into the index
        keep.append(f.name)
    return table.select(keep).replace_schema_metadata(None)


def merge_provenance(provenance: dict[str, Any], prov_file: Any, prov: dict[str, Any] | None,
                     f: Any) -> tuple[dict[str, Any], Any]:
    """Keep the first file's provenance; refuse a file whose model, dim or fusion differs (mixed runs)."""
    if not prov:
        return provenance, prov_file
    if not provenance:
        return prov, f
    for key in ("model_id", "dim", "fusion", "random_init"):
        if key in prov and key in provenance and prov[key] != provenance[key]:
            raise UserError(f"{f}: provenance '{key}' = {prov[key]!r} differs from {prov_file} "
                            f"({provenance[key]!r}); do not mix embeddings of different runs/models")
    return provenance, prov_file


def read_embeddings(path: str | os.PathLike, *, normalize_tolerance: float = NORM_TOLERANCE) -> Embeddings:
    """Read and validate embeddings; see the module docstring for what ``path`` may be.

    Returns an :class:`Embeddings` whose ``vectors`` are float32 and L2-normalised (rows further than
    ``normalize_tolerance`` from unit norm are re-normalised and counted in ``renormalised``).
    """
    files, report_path = resolve_embedding_files(path)
    # Pass 1: schemas, row counts, dims -- fail fast before reading any data.
    infos = []
    dim: int | None = None
    dim_file: Path | None = None
    total = 0
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{f}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        schema = pf.schema_arrow
        if schema.get_field_index(ID_COLUMN) < 0:
            raise UserError(f"{f}: missing column '{ID_COLUMN}' (expected the embeddings schema: product_id, "
                            f"vector, ...)")
        id_type = schema.field(ID_COLUMN).type
        if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise UserError(f"{f}: field '{ID_COLUMN}' has type {id_type}, expected string")
        fdim, _ = _vector_dim(f, schema, VECTOR_COLUMN)
        rows = pf.metadata.num_rows
        nulls = _leaf_null_count(pf, VECTOR_COLUMN)
        if nulls:
            raise UserError(f"{f}: field '{VECTOR_COLUMN}' has {nulls} null value(s); every product needs a fused "
                            f"vector (the embed pipeline dead-letters such rows)")
        if fdim is not None and rows:
            if dim is None:
                dim, dim_file = fdim, f
            elif fdim != dim:
                raise UserError(f"{f}: field '{VECTOR_COLUMN}' has dim {fdim} but {dim_file} has dim {dim}; "
                                f"all shards must come from the same model/fusion run")
        infos.append((f, pf, schema, rows))
        total += rows
    if total == 0:
        raise UserError(f"--embeddings {os.fspath(path)}: the embeddings are empty (0 rows in {len(files)} file(s)); "
                        f"nothing to index")

    vectors: np.ndarray | None = np.empty((total, dim), dtype=np.float32) if dim is not None else None
    ids_parts: list[pa.Array] = []
    meta_parts: list[pa.Table] = []
    provenance: dict[str, Any] = {}
    prov_file: Path | None = None
    renorm = 0
    row = 0
    for f, pf, schema, rows in infos:
        provenance, prov_file = merge_provenance(provenance, prov_file, _schema_provenance(f, schema), f)
        if rows == 0:
            continue
        try:
            # Only the columns the index needs: per-modality vectors and bytes are never read (cheaper, and
            # pyarrow 25 cannot read back a nullable fixed_size_list column that holds nulls).
            table = pf.read(columns=_columns_to_read(schema))
        except (OSError, pa.ArrowException) as e:
            hint = (f"; field '{VECTOR_COLUMN}' probably contains nulls" if "Expected all lists" in str(e) else "")
            raise UserError(f"{f}: cannot read Parquet data ({str(e).splitlines()[0]}){hint}") from None
        ids_arr = table.column(ID_COLUMN).combine_chunks()
        if ids_arr.null_count:
            bad = int(np.flatnonzero(ids_arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise UserError(f"{f}: field '{ID_COLUMN}' is null at row {bad}; every product needs an id")
        block = _vectors_to_numpy(f, table.column(VECTOR_COLUMN), ids_arr, VECTOR_COLUMN)
        if vectors is None or block.shape[1] != vectors.shape[1]:
            if vectors is None:
                dim, dim_file = block.shape[1], f
                vectors = np.empty((total, dim), dtype=np.float32)
            else:
                raise UserError(f"{f}: field '{VECTOR_COLUMN}' has dim {block.shape[1]} but {dim_file} has dim "
                                f"{vectors.shape[1]}; all shards must come from the same model/fusion run")
        if block.shape[1] == 0:
            raise UserError(f"{f}: field '{VECTOR_COLUMN}' has dim 0")
        block, off = check_unit_rows(f, block, ids_arr, VECTOR_COLUMN, normalize_tolerance)
        renorm += off
        vectors[row:row + len(block)] = block
        row += len(block)
        ids_parts.append(ids_arr.cast(pa.string()))
        meta_parts.append(_metadata_table(table))
        del table, block
    assert vectors is not None and row == total
    if renorm:
        log.warning("%d of %d vectors were not L2-normalised (|norm-1| > %g); re-normalised them", renorm, total,
                    normalize_tolerance)

    ids_all = pa.chunked_array(ids_parts, type=pa.string()).combine_chunks()
    empty = pc.equal(pc.utf8_length(ids_all), 0)
    if pc.any(empty).as_py():
        bad = int(np.flatnonzero(empty.to_numpy(zero_copy_only=False))[0])
        raise UserError(f"{_file_of_row(infos, bad)}: field '{ID_COLUMN}' is an empty string at row {bad}")
    ids = ids_all.to_pylist()
    if pc.count_distinct(ids_all).as_py() != len(ids):
        first: dict[str, int] = {}
        dups = 0
        example = None
        for i, pid in enumerate(ids):
            j = first.setdefault(pid, i)
            if j != i:
                dups += 1
                if example is None:
                    example = (pid, j, i)
        pid, j, i = example  # type: ignore[misc]
        fj, fi = _file_of_row(infos, j), _file_of_row(infos, i)
        where = f"{fi}" if fi == fj else f"{fj} and {fi}"
        raise UserError(f"{where}: duplicate product_id {pid!r} ({dups} duplicate row(s) in total); product ids must "
                        f"be unique across shards")

    try:
        metadata = pa.concat_tables(meta_parts, promote_options="permissive") if meta_parts else pa.table({})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise UserError(f"--embeddings {os.fspath(path)}: metadata columns have incompatible types across shards "
                        f"({str(e).splitlines()[0]})") from None
    metadata = metadata.combine_chunks()

    run_report = _read_json_file(report_path) if report_path is not None else None
    if run_report:
        for key in PROVENANCE_FIELDS:
            if key not in provenance and key in run_report:
                provenance[key] = run_report[key]
    if "dim" in provenance and provenance["dim"] is not None:
        try:
            pdim = int(provenance["dim"])
        except (TypeError, ValueError):
            pdim = -1
        if pdim != vectors.shape[1]:
            raise UserError(f"{prov_file or report_path}: provenance dim {provenance['dim']!r} does not match the "
                            f"vectors' dim {vectors.shape[1]}")
    if not provenance.get("model_id"):
        log.warning("embeddings under %s carry no model provenance (schema metadata 'shopvec' / run_report.json); "
                    "text/image queries will not be possible on this index", os.fspath(path))
    if provenance.get("random_init"):
        log.warning("embeddings under %s come from a RANDOM-INIT model (%s): similarity is meaningless beyond tests",
                    os.fspath(path), provenance.get("model_id"))
    log.info("read %d embeddings of dim %d from %d file(s) under %s", total, vectors.shape[1], len(files),
             os.fspath(path))
    return Embeddings(ids=ids, vectors=vectors, metadata=metadata, provenance=provenance,
                      files=[os.fspath(f) for f in files], source=os.fspath(path), run_report=run_report,
                      run_report_path=os.fspath(report_path) if report_path else None, renormalised=renorm)


def _file_of_row(infos: list, row: int) -> Path:
    start = 0
    for f, _pf, _schema, rows in infos:
        if row < start + rows:
            return f
        start += rows
    return infos[-1][0]


# ---------------------------------------------------------------------------------------------------------- output
def _vector_array(vectors: np.ndarray | Sequence, name: str, n: int) -> pa.Array:
    """fixed_size_list<float32, D> from an (n, D) array, or from a list of rows / None (nullable)."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.shape[0] != n:
            raise ValueError(f"{name}: {v.shape[0]} rows for {n} ids")
        return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), type=pa.float32()), v.shape[1])
    rows = list(vectors)
    if len(rows) != n:
        raise ValueError(f"{name}: {len(rows)} rows for {n} ids")
    dims = {len(r) for r in rows if r is not None}
    if len(dims) > 1:
        raise ValueError(f"{name}: rows of different lengths {sorted(dims)}")
    d = dims.pop() if dims else 1
    return pa.array([None if r is None else np.asarray(r, dtype=np.float32).tolist() for r in rows],
                    type=pa.list_(pa.float32(), d))


def write_embeddings(path: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray,
                     metadata: pa.Table | Mapping[str, Sequence] | Any | None = None,
                     provenance: Mapping[str, Any] | None = None, *,
                     extra_vectors: Mapping[str, np.ndarray | Sequence | None] | None = None,
                     row_group_size: int = 65536) -> Path:
    """Write one embeddings Parquet file in the contract's schema (``docs/CONTRACTS.md``).

    ``path`` is a ``.parquet`` file, or a directory (then ``path/part-00000.parquet`` is written). ``vectors`` is
    written as given (``fixed_size_list<float32, D>``; no validation, so tests can write bad data on purpose).
    ``metadata``: a pyarrow Table, a pandas DataFrame or a mapping column -> values (same row order as ``ids``).
    ``provenance`` goes, as JSON, to the Parquet schema metadata key ``shopvec`` (``dim`` is filled in when absent).
    ``extra_vectors``: e.g. ``{"image_vector": array_or_rows_with_None}``. The file is written atomically.
    """
    p = Path(path)
    if p.suffix != ".parquet":
        p = p / "part-00000.parquet"
    ids = [str(i) for i in ids]
    n = len(ids)
    vec = np.asarray(vectors, dtype=np.float32)
    if vec.ndim != 2 or vec.shape[0] != n:
        raise ValueError(f"vectors must be (n, D) with n == len(ids) == {n}, got {vec.shape}")
    columns: dict[str, pa.Array] = {ID_COLUMN: pa.array(ids, type=pa.string()),
                                    VECTOR_COLUMN: _vector_array(vec, VECTOR_COLUMN, n)}
    for name, value in (extra_vectors or {}).items():
        columns[name] = _vector_array(value if value is not None else [None] * n, name, n)
    if metadata is not None:
        if not isinstance(metadata, pa.Table):
            if hasattr(metadata, "to_dict") and hasattr(metadata, "columns"):  # pandas DataFrame
                metadata = pa.Table.from_pandas(metadata, preserve_index=False)
            else:
                metadata = pa.table({k: list(v) if not isinstance(v, (pa.Array, pa.ChunkedArray, np.ndarray)) else v
                                     for k, v in dict(metadata).items()})
        if metadata.num_rows != n:
            raise ValueError(f"metadata has {metadata.num_rows} rows for {n} ids")
        for name in metadata.column_names:
            if name in columns:
                continue  # product_id / vectors come from the arguments
            columns[name] = metadata.column(name)
    table = pa.table(columns)
    if provenance is not None:
        prov = dict(provenance)
        prov.setdefault("dim", int(vec.shape[1]))
        table = table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(prov, sort_keys=True).encode("utf-8")})
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=row_group_size)
    os.replace(tmp, p)
    return p

