"""Versioned index store: atomic publish, verification on load, rollback, retention.

Layout::

    INDEXROOT/
      CURRENT                    # the live version's name + newline; replaced atomically (temp, fsync, rename)
      history.jsonl              # one JSON line per switch of CURRENT: {"at", "action", "from", "to"}
      versions/<version>/
        index.faiss              # FAISS ids are row positions
        ids.parquet              # one column product_id (string): row i is FAISS id i
        metadata.parquet         # product_id + carried metadata columns, same row order
        manifest.json            # provenance, index key, search params, measured recall/latency, sha256 of files
      staging/                   # versions being written (<version>.<pid>.<token>), invisible to readers
      .lock                      # flock held while switching CURRENT / applying retention

A version is written into ``staging/``, fsynced, verified (the caller's ``verify`` loads it and re-checks recall),
renamed into ``versions/`` and only then does CURRENT switch. A build killed at any point before the switch leaves
CURRENT (and what it points at) untouched; leftovers of dead builds are removed by the next publish.

Loading verifies every file against the manifest's size and sha256 and refuses a corrupted or truncated file with
a one-line :class:`CorruptIndexError` naming it. Nothing is ever unpickled: JSON, Parquet and FAISS files only.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from embedders.errors import UserError
from embedders.provenance import sha256_file, utc_now

log = logging.getLogger(__name__)

FORMAT = "shopvec-index/1"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
METADATA_FILE = "metadata.parquet"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (INDEX_FILE, IDS_FILE, METADATA_FILE)
#: On-disk inverted lists (faiss OnDiskInvertedLists) of an index built with them (pipelines/index_build.py):
#: kept next to index.faiss under this name, checksummed like the other files, memory-mapped when loaded.
ONDISK_FILE = "index.ivfdata"
CURRENT_FILE = "CURRENT"
HISTORY_FILE = "history.jsonl"
VERSIONS_DIR = "versions"
STAGING_DIR = "staging"
LOCK_FILE = ".lock"
DEFAULT_KEEP = 5
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CorruptIndexError(UserError):
    """A version's file is missing, truncated, altered or unreadable (message names the file)."""


@dataclass
class LoadedVersion:
    version: str | None
    path: str
    index: Any                 # faiss.Index
    ids: pa.Array              # product_id strings, row i = FAISS id i
    metadata: pa.Table
    manifest: dict[str, Any]


# ------------------------------------------------------------------------------------------------------ primitives
def new_version_name() -> str:
    """Sortable, unique: ``v20250101T120000Z-3fa9c1``."""
    return time.strftime("v%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def check_version_name(name: str) -> str:
    if not isinstance(name, str) or not _VERSION_RE.match(name):
        raise UserError(f"invalid version name {name!r}: use letters, digits, '.', '_' or '-' "
                        f"(see `shopvec index list`)")
    return name


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, fsync it, rename it over ``path``, fsync the directory."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------------- reading
def read_current(root: str | os.PathLike) -> str | None:
    """The version CURRENT names, or None when nothing was published yet."""
    p = Path(root) / CURRENT_FILE
    try:
        text = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptIndexError(f"{p}: unreadable ({e}); fix it with `shopvec index rollback --to VERSION`") from None
    if not _VERSION_RE.match(text):
        raise CorruptIndexError(f"{p}: does not name a version ({text[:40]!r}); fix it with `shopvec index rollback`")
    return text


def read_manifest(vdir: str | os.PathLike) -> dict[str, Any]:
    p = Path(vdir) / MANIFEST_FILE
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptIndexError(f"{p}: missing; the version is incomplete or damaged") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptIndexError(f"{p}: corrupted or truncated ({type(e).__name__}); roll back or rebuild") from None
    if not isinstance(obj, dict):
        raise CorruptIndexError(f"{p}: not a JSON object; roll back or rebuild")
    return obj


def _history(root: Path) -> list[dict[str, Any]]:
    out = []
    try:
        lines = (root / HISTORY_FILE).read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return out
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out


def _version_dirs(root: Path) -> list[Path]:
    vroot = root / VERSIONS_DIR
    if not vroot.is_dir():
        return []
    return [p for p in vroot.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]


def _created_at(vdir: Path) -> str:
    with contextlib.suppress(UserError):
        return str(read_manifest(vdir).get("created_at") or "")
    return ""


def _by_age(dirs: Sequence[Path]) -> list[Path]:
    """Oldest first (manifest created_at, then name)."""
    return sorted(dirs, key=lambda p: (_created_at(p), p.name))


def previous_version(root: str | os.PathLike) -> str | None:
    """The version that was CURRENT before the latest switch (None if there is none or it is gone)."""
    root = Path(root)
    cur = read_current(root)
    if cur is None:
        return None
    existing = {p.name for p in _version_dirs(root)}
    for entry in reversed(_history(root)):
        if entry.get("to") == cur:
            prev = entry.get("from")
            return prev if prev in existing and prev != cur else None
    older = [p.name for p in _by_age(_version_dirs(root)) if p.name != cur]
    cur_created = _created_at(root / VERSIONS_DIR / cur)
    older = [v for v in older if _created_at(root / VERSIONS_DIR / v) <= cur_created]
    return older[-1] if older else None


def verify_files(vdir: str | os.PathLike, manifest: dict[str, Any], checksums: bool = True) -> None:
    """Check every data file against the manifest (size always, sha256 when ``checksums``)."""
    vdir = Path(vdir)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptIndexError(f"{vdir / MANIFEST_FILE}: has no 'files' checksums; roll back or rebuild")
    for name in DATA_FILES:
        if name not in files:
            raise CorruptIndexError(f"{vdir / MANIFEST_FILE}: lists no checksum for {name}; roll back or rebuild")
    for name, info in files.items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise CorruptIndexError(f"{vdir / MANIFEST_FILE}: invalid file name {name!r}")
        p = vdir / name
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise CorruptIndexError(f"{p}: missing; roll back (`shopvec index rollback`) or rebuild") from None
        want = int(info.get("bytes", -1)) if isinstance(info, dict) else -1
        if size != want:
            what = "truncated" if 0 <= size < want else "altered"
            raise CorruptIndexError(f"{p}: {what} ({size} bytes, manifest says {want}); roll back or rebuild")
        if checksums and sha256_file(p) != (info.get("sha256") if isinstance(info, dict) else None):
            raise CorruptIndexError(f"{p}: sha256 mismatch, the file is corrupted; roll back or rebuild")


def _ondisk_lists_file(index: Any) -> str | None:
    """The data file of ``index``'s on-disk inverted lists, or None when its lists live in RAM."""
    import faiss
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    il = faiss.downcast_InvertedLists(ivf.invlists)
    return il.filename if isinstance(il, faiss.OnDiskInvertedLists) else None


@contextlib.contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """FAISS printf()s while resolving on-disk lists; keep stdout clean for --json output."""
    import sys
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _read_faiss(path: Path, mmap: bool) -> Any:
    import faiss
    if (path.parent / ONDISK_FILE).is_file():
        # lists in index.ivfdata next to index.faiss (always memory-mapped, read-only); the path recorded at build
        # time is replaced by this directory's (IO_FLAG_ONDISK_SAME_DIR)
        try:
            with _c_stdout_to_stderr():
                return faiss.read_index(os.fspath(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:
            raise CorruptIndexError(f"{path}: not a readable FAISS index with on-disk lists "
                                    f"({str(e).splitlines()[-1][:120]})") from None
    if mmap:
        ifc = getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
        for flags in [f for f in (ifc, faiss.IO_FLAG_MMAP) if f]:
            try:
                return faiss.read_index(os.fspath(path), flags)
            except RuntimeError as e:
                log.debug("mmap read of %s with flags %#x failed: %s", path, flags, str(e).splitlines()[-1])
        log.warning("%s: this index type cannot be memory-mapped; loading it into RAM", path)
    try:
        return faiss.read_index(os.fspath(path))
    except RuntimeError as e:
        raise CorruptIndexError(f"{path}: not a readable FAISS index ({str(e).splitlines()[-1][:120]})") from None


def load_version_dir(path: str | os.PathLike, mmap: bool = False, verify: bool = True) -> LoadedVersion:
    """Load one version directory, verifying sizes always and sha256 checksums when ``verify``."""
    vdir = Path(path)
    if not vdir.is_dir():
        raise UserError(f"{vdir}: no such index version directory")
    manifest = read_manifest(vdir)
    verify_files(vdir, manifest, checksums=verify)
    index = _read_faiss(vdir / INDEX_FILE, mmap)
    try:
        ids = pq.read_table(vdir / IDS_FILE, columns=["product_id"]).column(0).combine_chunks()
    except (OSError, KeyError, pa.ArrowException) as e:
        raise CorruptIndexError(f"{vdir / IDS_FILE}: unreadable ({str(e).splitlines()[0][:120]})") from None
    try:
        metadata = pq.read_table(vdir / METADATA_FILE, memory_map=mmap)
    except (OSError, pa.ArrowException) as e:
        raise CorruptIndexError(f"{vdir / METADATA_FILE}: unreadable ({str(e).splitlines()[0][:120]})") from None
    n = int(index.ntotal)
    if len(ids) != n:
        raise CorruptIndexError(f"{vdir / IDS_FILE}: {len(ids)} ids for {n} vectors in {INDEX_FILE}")
    if metadata.num_rows != n:
        raise CorruptIndexError(f"{vdir / METADATA_FILE}: {metadata.num_rows} rows for {n} vectors in {INDEX_FILE}")
    if "n" in manifest and int(manifest["n"]) != n:
        raise CorruptIndexError(f"{vdir / MANIFEST_FILE}: says n={manifest['n']} but {INDEX_FILE} holds {n}")
    if "dim" in manifest and int(manifest["dim"]) != int(index.d):
        raise CorruptIndexError(f"{vdir / MANIFEST_FILE}: says dim={manifest['dim']} but {INDEX_FILE} has {index.d}")
    return LoadedVersion(version=manifest.get("version"), path=os.fspath(vdir), index=index, ids=ids,
                         metadata=metadata, manifest=manifest)


def load_version(root: str | os.PathLike, version: str | None = None, mmap: bool = False,
                 verify: bool = True) -> LoadedVersion:
    """Load ``version`` (default CURRENT) under ``root``. ``root`` may also be a version directory itself."""
    root = Path(root)
    if version is None:
        version = read_current(root)
        if version is None:
            if (root / MANIFEST_FILE).is_file():
                return load_version_dir(root, mmap=mmap, verify=verify)
            if not root.exists():
                raise UserError(f"--index {root}: no such directory; build one with "
                                f"`shopvec index --embeddings OUT --out {root}`")
            raise UserError(f"--index {root}: nothing published yet (no {CURRENT_FILE} file); build with "
                            f"`shopvec index --embeddings OUT --out {root}`")
    check_version_name(version)
    vdir = root / VERSIONS_DIR / version
    if not vdir.is_dir():
        known = ", ".join(p.name for p in _by_age(_version_dirs(root))[-5:]) or "none"
        raise UserError(f"--index {root}: version {version!r} not found (latest: {known}); see `shopvec index list`")
    lv = load_version_dir(vdir, mmap=mmap, verify=verify)
    if lv.manifest.get("version") not in (None, version):
        raise CorruptIndexError(f"{vdir / MANIFEST_FILE}: names version {lv.manifest.get('version')!r}, "
                                f"expected {version!r}")
    lv.version = version
    return lv


def list_versions(root: str | os.PathLike) -> list[dict[str, Any]]:
    """All versions, newest first, with CURRENT / previous flags and their key, size, recall and latency."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--index {root}: no such directory")
    cur = read_current(root)
    prev = previous_version(root) if cur else None
    out = []
    for vdir in reversed(_by_age(_version_dirs(root))):
        entry: dict[str, Any] = {"version": vdir.name, "current": vdir.name == cur, "previous": vdir.name == prev}
        try:
            m = read_manifest(vdir)
        except UserError as e:
            entry["status"] = f"damaged: {e}"
            out.append(entry)
            continue
        measured = m.get("measured") or {}
        lat = measured.get("latency_ms") or {}
        files = m.get("files") or {}
        entry.update({
            "status": "ok",
            "index_key": m.get("index_key"), "n": m.get("n"), "dim": m.get("dim"),
            "k": measured.get("k"), "recall": measured.get("recall_at_k"),
            "latency_p50_ms": lat.get("p50"), "latency_p99_ms": lat.get("p99"), "qps": measured.get("batched_qps"),
            "created_at": m.get("created_at"), "model_id": m.get("model_id"), "random_init": m.get("random_init"),
            "below_target": m.get("below_target", False),
            "size_bytes": sum(int(f.get("bytes", 0)) for f in files.values() if isinstance(f, dict)),
        })
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------------- writing
def _switch_current(root: Path, version: str, action: str, old: str | None) -> None:
    atomic_write_text(root / CURRENT_FILE, version + "\n")
    line = json.dumps({"at": utc_now(), "action": action, "from": old, "to": version}, sort_keys=True) + "\n"
    with open(root / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    log.info("CURRENT: %s -> %s (%s)", old, version, action)


def _clean_stale(root: Path) -> None:
    sroot = root / STAGING_DIR
    if not sroot.is_dir():
        return
    for p in sroot.iterdir():
        parts = p.name.rsplit(".", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if p.name.startswith(".trash-") or pid is None or not _pid_alive(pid):
            log.info("removing leftover staging entry %s", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, row_group_size=1 << 16)
    fsync_file(path)


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_version_dir(vdir: str | os.PathLike, index: Any, ids: Sequence[str] | pa.Array,
                      metadata: pa.Table | None, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the four files of a version into ``vdir`` (fsynced) and return the completed manifest."""
    import faiss
    vdir = Path(vdir)
    vdir.mkdir(parents=True, exist_ok=True)
    ids_arr = ids if isinstance(ids, pa.Array) else pa.array(list(ids), type=pa.string())
    ids_arr = ids_arr.cast(pa.string())
    n = int(index.ntotal)
    if len(ids_arr) != n:
        raise ValueError(f"{len(ids_arr)} ids for an index of {n} vectors")
    if metadata is None:
        metadata = pa.table({"product_id": ids_arr})
    if metadata.num_rows != n:
        raise ValueError(f"metadata has {metadata.num_rows} rows for an index of {n} vectors")
    if "product_id" in metadata.column_names:
        metadata = metadata.drop_columns(["product_id"])
    metadata = pa.table({"product_id": ids_arr, **{c: metadata.column(c) for c in metadata.column_names}})

    t0 = time.perf_counter()
    faiss.write_index(index, os.fspath(vdir / INDEX_FILE))
    fsync_file(vdir / INDEX_FILE)
    ondisk = _ondisk_lists_file(index)
    if ondisk is not None:
        if os.path.basename(ondisk) != ONDISK_FILE:
            raise ValueError(f"on-disk inverted lists must be named {ONDISK_FILE} (got {ondisk}): they are found "
                             f"next to {INDEX_FILE} by that name")
        try:
            os.link(ondisk, vdir / ONDISK_FILE)  # same filesystem: no copy
        except OSError:
            shutil.copyfile(ondisk, vdir / ONDISK_FILE)
        fsync_file(vdir / ONDISK_FILE)
    _write_parquet(pa.table({"product_id": ids_arr}), vdir / IDS_FILE)
    _write_parquet(metadata.replace_schema_metadata(None), vdir / METADATA_FILE)
    manifest = dict(manifest)
    manifest.setdefault("format", FORMAT)
    manifest["n"] = n
    manifest["dim"] = int(index.d)
    names = DATA_FILES + ((ONDISK_FILE,) if ondisk is not None else ())
    manifest["files"] = {name: _file_entry(vdir / name) for name in names}
    atomic_write_text(vdir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    log.info("wrote %s (%s bytes) in %.1f s", vdir, sum(f["bytes"] for f in manifest["files"].values()),
             time.perf_counter() - t0)
    return manifest


def publish(root: str | os.PathLike, index: Any, ids: Sequence[str] | pa.Array, metadata: pa.Table | None,
            manifest: dict[str, Any], *, verify: Callable[[str], dict[str, Any] | None] | None = None,
            keep: int = DEFAULT_KEEP, version: str | None = None,
            before_switch: Callable[[str], None] | None = None) -> str:
    """Stage, verify and atomically publish a new version; returns its name.

    ``verify(staged_dir)`` must load the staged version and check it (raise to abort; a returned dict is recorded
    in the manifest as ``publish_check``). ``before_switch(version)`` runs after the version is in ``versions/``
    and right before CURRENT switches (a test hook: raising there leaves CURRENT untouched and removes the version).
    ``keep``: retention after the switch (see :func:`apply_retention`).
    """
    if keep < 1:
        raise UserError(f"--keep must be at least 1, got {keep}")
    root = Path(root)
    version = check_version_name(version or new_version_name())
    (root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
    (root / STAGING_DIR).mkdir(parents=True, exist_ok=True)
    with _locked(root):
        _clean_stale(root)
    final = root / VERSIONS_DIR / version
    if final.exists():
        raise UserError(f"--out {root}: version {version!r} already exists")
    stage = root / STAGING_DIR / f"{version}.{os.getpid()}.{secrets.token_hex(3)}"
    manifest = dict(manifest)
    manifest["version"] = version
    manifest.setdefault("created_at", utc_now())
    placed = False
    try:
        manifest = write_version_dir(stage, index, ids, metadata, manifest)
        fsync_dir(stage)
        if verify is not None:
            check = verify(os.fspath(stage))
            if isinstance(check, dict):
                manifest["publish_check"] = check
                atomic_write_text(stage / MANIFEST_FILE,
                                  json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        with _locked(root):
            if final.exists():
                raise UserError(f"--out {root}: version {version!r} already exists")
            os.rename(stage, final)
            placed = True
            fsync_dir(root / VERSIONS_DIR)
            fsync_dir(root / STAGING_DIR)
            if before_switch is not None:
                before_switch(version)
            old = read_current(root)
            _switch_current(root, version, "publish", old)
            placed = False  # live now: never remove it on a later error
            apply_retention(root, keep, _locked_already=True)
    except BaseException:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        if placed and read_current(root) != version:
            shutil.rmtree(final, ignore_errors=True)
        raise
    log.info("published %s under %s", version, root)
    return version


def rollback(root: str | os.PathLike, to: str) -> tuple[str | None, str]:
    """Switch CURRENT to the existing version ``to`` (or ``"previous"``) after verifying its checksums."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--index {root}: no such directory")
    with _locked(root):
        cur = read_current(root)
        if to == "previous":
            prev = previous_version(root)
            if prev is None:
                raise UserError(f"--index {root}: there is no previous version to roll back to")
            to = prev
        check_version_name(to)
        vdir = root / VERSIONS_DIR / to
        if not vdir.is_dir():
            known = ", ".join(p.name for p in reversed(_by_age(_version_dirs(root)))) or "none"
            raise UserError(f"--to {to}: no such version under {root} (available: {known})")
        if to == cur:
            raise UserError(f"--to {to}: already CURRENT")
        verify_files(vdir, read_manifest(vdir), checksums=True)
        _switch_current(root, to, "rollback", cur)
    return cur, to


def apply_retention(root: str | os.PathLike, keep: int = DEFAULT_KEEP, *, _locked_already: bool = False) -> list[str]:
    """Delete all but the newest ``keep`` versions, never CURRENT nor the previous one; returns deleted names."""
    if keep < 1:
        raise UserError(f"--keep must be at least 1, got {keep}")
    root = Path(root)
    ctx = contextlib.nullcontext() if _locked_already else _locked(root)
    deleted = []
    with ctx:
        dirs = _by_age(_version_dirs(root))
        protect = {p.name for p in dirs[-keep:]}
        cur = read_current(root)
        protect.update(v for v in (cur, previous_version(root) if cur else None) if v)
        (root / STAGING_DIR).mkdir(exist_ok=True)
        for vdir in dirs:
            if vdir.name in protect:
                continue
            trash = root / STAGING_DIR / f".trash-{vdir.name}-{secrets.token_hex(3)}"
            os.rename(vdir, trash)  # atomic: the version disappears whole, then its files go
            shutil.rmtree(trash, ignore_errors=True)
            deleted.append(vdir.name)
        if deleted:
            fsync_dir(root / VERSIONS_DIR)
            log.info("retention (keep %d): deleted %s", keep, ", ".join(deleted))
    return deleted
