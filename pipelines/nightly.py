"""The nightly job: incremental embed -> index -> quality gates -> atomic publish -> report.

``run_nightly(cfg)`` runs these stages, each timed and recorded in the report::

    lock         one run at a time (flock on STATE/nightly.lock + holder pid/host/heartbeat; stale holders detected)
    fingerprint  Parquet file fingerprints (+ model id, embedding config, index config) equal to the published
                 run's -> "no change", nothing else is read, exit 0
    scan         per-product content keys (image bytes, prepared text, review set, metadata) -> the plan:
                 unchanged / metadata-only / new / changed / deleted / dead-unchanged (pipelines.incremental)
    embed        the real Beam embed pipeline (pipelines.embed.run_embed) over the new + changed products only, plus a
                 few unchanged "canaries" whose fresh vectors are compared with the stored ones (drift gate)
    merge        previous vectors (copied byte-identical) + fresh ones + current metadata -> STATE/runs/<run>/
    index        a new index version built from the merged embeddings, tuned to the recall target (index.build)
    gates        row-count drop vs live, dead-letter fraction, recall (measured here, independently), drift of
                 unchanged products (copy check + canaries), optional golden queries
    publish      index.store publishes the version and switches CURRENT atomically; then STATE/state.json records
                 the run as the new baseline (a crash in between is reconciled by the next run)

State directory (``[nightly] state_dir``)::

    nightly.lock            the lock (holder JSON inside)
    state.json              the published baseline: run id, index version, fingerprint, index config hash
    counters.json           run / gate-failure counters and the last success time (for the Prometheus textfile)
    runs/<run>/             merged embeddings of a run (embed layout + keys.parquet + fingerprint.json); immutable
                            once written; the baseline is the one state.json names; the last ``keep_runs`` are kept
    index/                  the index root (index.store: versions/<v>/, CURRENT)
    staging/<work>/         in-progress work: subset Parquet, delta embeddings, staged index, checkpoints/
    reports/<run>.json      every run's report;  nightly_report.json  the latest one
    metrics/shopvec_nightly.prom   Prometheus textfile (or ``[nightly] prom_file``)

Crash safety: nothing live is written before the publish stage; every stage writes under ``staging/`` (the merge
writes a new ``runs/<run>`` directory that nothing references until publish). Each finished stage leaves a
checkpoint (``staging/<work>/checkpoints/<stage>.json``: the digest of its inputs and the sha256 of every output
file); a rerun with the same inputs verifies those hashes and skips the stage, so a kill -9 after the embed stage
does not re-embed. ``<work>`` is derived from the catalog fingerprint, the baseline and the configs, so changed
inputs never reuse stale work.

Test hooks (environment variables, for crash tests only):

- ``SHOPVEC_NIGHTLY_CRASH_AFTER=<stage>`` -- SIGKILL this process right after ``<stage>`` finished (its checkpoint
  written); ``publish:before-switch`` kills inside the store's publish, the version placed but CURRENT not yet
  switched; ``publish:switched`` kills after CURRENT was switched but before state.json was written.
- ``SHOPVEC_NIGHTLY_CRASH_DURING=embed`` -- SIGKILL while the Beam embed pipeline is running (as soon as its
  staging output folder exists).

Exit codes: 0 published or nothing to do; 1 a stage failed; 2 bad invocation/config; 3 a quality gate refused;
75 another run holds the lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import glob
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

from embedders.errors import UserError
from embedders.provenance import canonical_json, code_version, config_hash, sha256_bytes, sha256_file, utc_now

from .config import Config

log = logging.getLogger(__name__)

STAGES = ("lock", "fingerprint", "scan", "embed", "merge", "index", "gates", "publish")
EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_REFUSED, EXIT_LOCKED = 0, 1, 2, 3, 75
CRASH_AFTER_ENV = "SHOPVEC_NIGHTLY_CRASH_AFTER"
CRASH_DURING_ENV = "SHOPVEC_NIGHTLY_CRASH_DURING"
STATUSES = ("published", "no_change", "gate_refused", "failed", "locked")


# ================================================================================================================
# settings
@dataclass
class NightlySettings:
    products: str
    reviews: str | None
    state_dir: str
    keep_runs: int = 3
    keep_reports: int = 60
    prom_file: str | None = None
    runner: str | None = None
    beam_args: list[str] = field(default_factory=list)
    lock_stale_after_s: float = 6 * 3600.0

    @classmethod
    def from_config(cls, cfg: Config) -> "NightlySettings":
        n = cfg.section("nightly")
        known = {f.name for f in dataclasses.fields(cls)} | {"fingerprint", "image_uri_hash"}
        unknown = sorted(set(n) - known)
        if unknown:
            raise UserError(f"[nightly] unknown key(s) {unknown}; known: {sorted(known)}")
        for req in ("products", "state_dir"):
            if not n.get(req):
                raise UserError(f"[nightly] {req} is required (e.g. products = \"var/demo/catalog/products.parquet\", "
                                f"state_dir = \"var/nightly\")")
        s = cls(products=str(n["products"]), reviews=str(n["reviews"]) if n.get("reviews") else None,
                state_dir=str(n["state_dir"]), keep_runs=int(n.get("keep_runs", 3)),
                keep_reports=int(n.get("keep_reports", 60)), prom_file=n.get("prom_file") or None,
                runner=n.get("runner") or None, beam_args=[str(a) for a in n.get("beam_args", [])],
                lock_stale_after_s=float(n.get("lock_stale_after_s", 6 * 3600.0)))
        if s.keep_runs < 2:
            raise UserError(f"[nightly] keep_runs = {s.keep_runs}; expected >= 2 (the live run and the previous one)")
        return s


@dataclass
class GateSettings:
    max_row_drop_pct: float = 10.0
    max_dead_letter_pct: float = 5.0
    min_recall: float | None = None      # None -> the index recall target
    recall_queries: int = 200
    max_drift: float = 1e-4              # max |fresh - stored| over the canaries' fused vectors
    drift_canaries: int = 8
    golden: list[dict[str, Any]] = field(default_factory=list)
    golden_file: str | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> "GateSettings":
        g = cfg.section("gates")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(g) - known)
        if unknown:
            raise UserError(f"[gates] unknown key(s) {unknown}; known: {sorted(known)}")
        s = cls(**{k: v for k, v in g.items()})
        for k in ("max_row_drop_pct", "max_dead_letter_pct"):
            v = getattr(s, k)
            if not isinstance(v, (int, float)) or not 0 <= v <= 100:
                raise UserError(f"[gates] {k} = {v!r}; expected a percentage between 0 and 100")
        if s.min_recall is not None and not 0 <= float(s.min_recall) <= 1:
            raise UserError(f"[gates] min_recall = {s.min_recall!r}; expected a fraction between 0 and 1")
        if not isinstance(s.drift_canaries, int) or s.drift_canaries < 0:
            raise UserError(f"[gates] drift_canaries = {s.drift_canaries!r}; expected an integer >= 0")
        s.golden = list(s.golden or [])
        if s.golden_file:
            s.golden += _load_golden_file(s.golden_file)
        for q in s.golden:
            if not isinstance(q, dict) or "product_id" not in q or not isinstance(q.get("expected"), list):
                raise UserError(f"[gates] golden entry {q!r}: expected {{product_id = \"P1\", expected = [\"P2\", ...], "
                                f"k = 10}}")
        return s


def _load_golden_file(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise UserError(f"[gates] golden_file {path}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else data["queries"]
    except (json.JSONDecodeError, KeyError, TypeError):
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"[gates] golden_file {path}: expected a JSON list or JSON lines ({e})") from None


@dataclass
class IndexSettings:
    """``[index]``: the build (``index.build.BuildConfig``) and the store's retention."""
    key: str = "auto"                    # "auto" or any FAISS factory string
    recall_target: float = 0.95
    k: int = 10
    max_memory: str | int | None = None  # e.g. "8GB"; None: 80 % of available RAM
    keep_versions: int = 5
    mmap: bool = False
    build: dict[str, Any] = field(default_factory=dict)  # any other BuildConfig field (tuning_queries, seed, ...)

    @classmethod
    def from_config(cls, cfg: Config) -> "IndexSettings":
        from index.build import BuildConfig

        d = dict(cfg.section("index"))
        own = {f.name for f in dataclasses.fields(cls)} - {"build"}
        build_fields = {f.name for f in dataclasses.fields(BuildConfig)} - {"index_key", "recall_target", "k",
                                                                            "max_memory"}
        unknown = sorted(set(d) - own - build_fields)
        if unknown:
            raise UserError(f"[index] unknown key(s) {unknown}; known: {sorted(own | build_fields)}")
        s = cls(**{k: v for k, v in d.items() if k in own},
                build={k: v for k, v in d.items() if k in build_fields})
        s.build_config()  # validates
        if int(s.keep_versions) < 2:
            raise UserError(f"[index] keep_versions = {s.keep_versions}; expected >= 2 (live + previous)")
        return s

    def build_config(self):
        from index.build import BuildConfig, parse_memory

        return BuildConfig(index_key=str(self.key), recall_target=float(self.recall_target), k=int(self.k),
                           max_memory=parse_memory(self.max_memory), **self.build)

    def digest(self) -> str:
        return config_hash(dataclasses.asdict(self))


# ================================================================================================================
# small file helpers
def _write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _write_text_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError) as e:
        log.warning("ignoring unreadable %s (%s)", path, e)
        return None


def _tree_files(root: str) -> list[str]:
    out = []
    for d, _dirs, files in os.walk(root):
        for name in files:
            out.append(os.path.relpath(os.path.join(d, name), root))
    return sorted(out)


def _pid_alive(pid: int, create_time: float | None = None) -> bool:
    try:
        import psutil

        p = psutil.Process(int(pid))
        if create_time is not None and abs(p.create_time() - float(create_time)) > 1.0:
            return False  # the pid was reused by another process
        return p.status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied (alive), bad pid
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, TypeError):
            return True
        return False


def _proc_create_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001
        return None


# ================================================================================================================
# the lock
class LockBusy(Exception):
    def __init__(self, path: str, holder: dict[str, Any] | None):
        self.path = path
        self.holder = holder or {}
        h = self.holder
        super().__init__(f"{path}: another nightly run holds the lock (pid {h.get('pid', '?')} on "
                         f"{h.get('host', '?')}, since {h.get('started_at', '?')}, last heartbeat "
                         f"{h.get('heartbeat_at', '?')})")


class RunLock:
    """One nightly run at a time: ``fcntl.flock`` on a lock file whose content names the holder.

    - The kernel drops a flock when its holder dies (kill -9 included), so a crashed run never blocks the next one;
      the next run still sees the dead holder's record (``released: false``) and reports it as a stale holder.
    - A flock can outlive its holder when a child process inherited the descriptor (e.g. a leftover worker). When
      the lock is busy, the recorded holder is checked: same host and that pid is gone (or reused), or another host
      with no heartbeat for ``stale_after_s`` (the holder refreshes it every minute) -> the holder is stale and the
      lock is broken: the lock file is unlinked (under a guard lock, re-checking that it is still the same inode)
      and a fresh one is taken, so the leftover process keeps a lock on an orphaned inode only.
    - Anything else -> :class:`LockBusy` (exit code 75).
    """

    def __init__(self, path: str, stale_after_s: float = 6 * 3600.0):
        self.path = path
        self.stale_after_s = stale_after_s
        self._fd: int | None = None
        self.record: dict[str, Any] = {}
        self.notes: list[str] = []
        self._wlock = threading.Lock()
        self._stop = threading.Event()
        self._len = 0

    @staticmethod
    def read_holder(path: str) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            return json.loads(text) if text.strip() else None
        except (OSError, json.JSONDecodeError):
            return None

    def _stale(self, holder: dict[str, Any] | None) -> str | None:
        """Why ``holder`` is stale, or None when it may well be alive."""
        if not holder or "pid" not in holder:
            return None
        if holder.get("host") == socket.gethostname():
            if not _pid_alive(holder["pid"], holder.get("pid_create_time")):
                return f"holder pid {holder['pid']} on this host is gone"
            return None
        hb = holder.get("heartbeat_unix")
        if hb is not None and time.time() - float(hb) > self.stale_after_s:
            return (f"holder on host {holder.get('host')} sent no heartbeat for {time.time() - float(hb):.0f}s "
                    f"(> lock_stale_after_s {self.stale_after_s:.0f})")
        return None

    def _try_lock(self) -> int | None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the file was broken/replaced between open and flock: lock the current one instead
            os.close(fd)
            return -1
        return fd

    def _break(self, holder: dict[str, Any], why: str) -> bool:
        import fcntl

        guard = os.open(self.path + ".guard", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            again = self.read_holder(self.path)
            if not again or again.get("pid") != holder.get("pid") or again.get("started_at") != holder.get("started_at"):
                return False  # someone else broke it and took it in the meantime
            probe = self._try_lock()
            if probe is not None and probe >= 0:  # freed meanwhile: nothing to break
                fcntl.flock(probe, fcntl.LOCK_UN)
                os.close(probe)
                return True
            if self._stale(again) is None:
                return False
            os.unlink(self.path)
            self.notes.append(f"stale lock broken: {why} but its lock was still held (an inherited descriptor of a "
                              f"leftover child process)")
            log.warning("nightly lock %s: %s; lock broken", self.path, why)
            return True
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
            os.close(guard)

    def acquire(self, run_id: str) -> dict[str, Any]:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _attempt in range(5):
            fd = self._try_lock()
            if fd == -1:
                continue
            if fd is None:
                holder = self.read_holder(self.path)
                why = self._stale(holder)
                if why and self._break(holder, why):
                    continue
                raise LockBusy(self.path, holder)
            self._fd = fd
            self._len = os.fstat(fd).st_size
            break
        else:
            raise LockBusy(self.path, self.read_holder(self.path))
        previous = self.read_holder(self.path)
        stale_previous = None
        if previous and not previous.get("released", True):
            stale_previous = {k: previous.get(k) for k in ("pid", "host", "run_id", "started_at", "heartbeat_at",
                                                            "stage")}
            self.notes.append(f"previous run {previous.get('run_id')} (pid {previous.get('pid')} on "
                              f"{previous.get('host')}, stage {previous.get('stage')}) ended without releasing "
                              f"the lock (killed or crashed); its work is checked and resumed")
        now = time.time()
        self.record = {"pid": os.getpid(), "pid_create_time": _proc_create_time(os.getpid()),
                       "host": socket.gethostname(), "run_id": run_id, "started_at": utc_now(),
                       "heartbeat_at": utc_now(), "heartbeat_unix": now, "stage": "lock", "released": False}
        self._write()
        return {"path": self.path, "stale_previous_holder": stale_previous, "notes": list(self.notes)}

    def _write(self) -> None:
        with self._wlock:
            if self._fd is None:
                return
            # rewritten in place, padded with spaces to the longest record so far (valid JSON): a reader never
            # sees an empty or truncated file
            data = json.dumps(self.record, sort_keys=True).encode()
            self._len = max(self._len, len(data))
            os.pwrite(self._fd, data.ljust(self._len), 0)
            os.fsync(self._fd)

    def heartbeat(self, stage: str | None = None) -> None:
        if self._fd is None:
            return
        if stage is not None:
            self.record["stage"] = stage
        self.record.update(heartbeat_at=utc_now(), heartbeat_unix=time.time())
        self._write()

    def start_heartbeat(self, every_s: float = 60.0) -> None:
        """Refresh the heartbeat in the background, so a long stage (hours of embedding) never looks stale."""
        def beat():
            while not self._stop.wait(every_s):
                with contextlib.suppress(OSError):
                    self.heartbeat()

        threading.Thread(target=beat, name="nightly-lock-heartbeat", daemon=True).start()

    def release(self) -> None:
        import fcntl

        self._stop.set()
        if self._fd is None:
            return
        try:
            self.record.update(released=True, released_at=utc_now())
            self._write()
        finally:
            with self._wlock:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None


# ================================================================================================================
# state layout and checkpoints
class Layout:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.lock = os.path.join(self.root, "nightly.lock")
        self.state = os.path.join(self.root, "state.json")
        self.counters = os.path.join(self.root, "counters.json")
        self.runs = os.path.join(self.root, "runs")
        self.index = os.path.join(self.root, "index")
        self.staging = os.path.join(self.root, "staging")
        self.reports = os.path.join(self.root, "reports")
        self.latest_report = os.path.join(self.root, "nightly_report.json")
        self.prom = os.path.join(self.root, "metrics", "shopvec_nightly.prom")

    def run_dir(self, run_id: str) -> str:
        return os.path.join(self.runs, run_id)


class Checkpoints:
    """``<dir>/<stage>.json`` = inputs digest + sha256 of every output file; trusted only when all still match."""

    def __init__(self, directory: str):
        self.dir = directory

    def _path(self, stage: str) -> str:
        return os.path.join(self.dir, f"{stage}.json")

    def load(self, stage: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
        ck = _read_json(self._path(stage))
        if not ck:
            return None
        if ck.get("inputs_digest") != config_hash(inputs):
            log.info("checkpoint %s: inputs changed; stage runs again", stage)
            return None
        for out_dir, files in ck.get("outputs", {}).items():
            for rel, digest in files.items():
                p = os.path.join(out_dir, rel)
                if not os.path.isfile(p) or sha256_file(p) != digest:
                    log.warning("checkpoint %s: %s is missing or changed; stage runs again", stage, p)
                    return None
        return ck

    def save(self, stage: str, inputs: dict[str, Any], outputs: list[str], result: dict[str, Any]) -> dict[str, Any]:
        files = {d: {rel: sha256_file(os.path.join(d, rel)) for rel in _tree_files(d)} for d in outputs}
        ck = {"stage": stage, "inputs_digest": config_hash(inputs), "inputs": inputs, "outputs": files,
              "outputs_digest": config_hash(files), "result": result, "finished_at": utc_now()}
        _write_json_atomic(self._path(stage), ck)
        return ck



# ================================================================================================================
# crash hooks (tests)
def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_AFTER_ENV) == name:
        log.warning("%s=%s: killing this process now (test hook)", CRASH_AFTER_ENV, name)
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                h.flush()
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _crash_during_embed(delta_dir: str) -> Iterator[None]:
    if os.environ.get(CRASH_DURING_ENV) != "embed":
        yield
        return
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if glob.glob(os.path.abspath(delta_dir) + ".staging-*"):
                time.sleep(0.3)
                log.warning("%s=embed: killing this process while the embed pipeline runs (test hook)",
                            CRASH_DURING_ENV)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()


# ================================================================================================================
# the index library, through its public API
class IndexAdapter:
    """Everything the nightly job needs from ``index.build`` / ``index.store`` / ``index.search``."""

    def __init__(self, root: str, settings: IndexSettings):
        self.root = root
        self.s = settings

    def current(self) -> str | None:
        from index import store

        return store.read_current(self.root) if os.path.isdir(self.root) else None

    def manifest(self, version: str) -> dict[str, Any]:
        from index import store

        return store.read_manifest(os.path.join(self.root, store.VERSIONS_DIR, version))

    def build(self, embeddings_dir: str, staged_dir: str) -> dict[str, Any]:
        """Choose, train, tune (``index.build.build_index``) and write the version into ``staged_dir``."""
        import pyarrow as pa

        from index import build, store
        from index.embeddings_io import read_embeddings
        from index.search import apply_search_params

        config = self.s.build_config()
        emb = read_embeddings(embeddings_dir)
        ids = pa.array(emb.ids, type=pa.string())
        result = build.build_index(emb.vectors, ids, config)
        manifest = build.make_manifest(result, emb, config, bool(self.s.mmap))
        apply_search_params(result.index, result.search_params)
        store.write_version_dir(staged_dir, result.index, ids, emb.metadata, manifest)
        m = result.measured
        return {"key": result.index_key, "choice_reason": result.choice_reason, "n": int(emb.n), "dim": int(emb.dim),
                "k": m["k"], "recall": m["recall_at_k"], "search_params": result.search_params,
                "latency_p50_ms": round(m["latency_ms"]["p50"], 4), "latency_p99_ms": round(m["latency_ms"]["p99"], 4),
                "batched_qps": round(m["batched_qps"], 1), "below_target": bool(result.below_target),
                "build_s": result.build.get("total_s")}

    def load_staged(self, staged_dir: str):
        from index.search import ProductIndex

        return ProductIndex.from_directory(staged_dir)

    def publish(self, staged_dir: str, version: str, intent: dict[str, Any], intent_path: str) -> str:
        """Publish the staged version through ``index.store.publish`` (verified, atomic CURRENT switch).

        ``intent_path`` (the run's ``publish.json``) is written right before the switch, naming the version, so a
        crash between the switch and state.json is recognised by the next run.
        """
        from index import store

        lv = store.load_version_dir(staged_dir, verify=True)
        manifest = {k: v for k, v in lv.manifest.items() if k not in ("files", "version", "n", "dim")}

        def before_switch(v: str) -> None:
            _write_json_atomic(intent_path, dict(intent, index_version=v, published_at=utc_now()))
            _crash_point("publish:before-switch")

        return store.publish(self.root, lv.index, lv.ids, lv.metadata, manifest,
                             verify=lambda staged: self._verify(staged_dir, staged),
                             keep=int(self.s.keep_versions), version=version, before_switch=before_switch)

    def _verify(self, gated: str, staged: str, queries: int = 50) -> dict[str, Any]:
        """The copy the store is about to switch to must answer exactly as the version the gates checked."""
        import numpy as np

        from index.search import ProductIndex

        a = ProductIndex.from_directory(gated, mmap=bool(self.s.mmap))
        b = ProductIndex.from_directory(staged, mmap=bool(self.s.mmap))
        if not a.product_ids.equals(b.product_ids):
            raise RuntimeError(f"{staged}: ids differ from the gated version {gated}; not publishing")
        if a.n < 2:
            return {"queries": 0}
        pos = np.random.default_rng(1).choice(a.n, size=min(queries, a.n), replace=False)
        k = min(int(self.s.k), a.n - 1)
        _, ia = a.similar_positions(pos, k)
        _, ib = b.similar_positions(pos, k)
        if not np.array_equal(ia, ib):
            raise RuntimeError(f"{staged}: answers differ from the gated version on "
                               f"{int((ia != ib).any(axis=1).sum())} of {len(pos)} queries; not publishing")
        return {"queries": int(len(pos)), "identical_to_gated": True}


# ================================================================================================================
# gates
@dataclass
class GateResult:
    name: str
    passed: bool
    value: Any
    threshold: Any
    message: str
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gate_row_count(new_n: int, live_n: int | None, max_drop_pct: float) -> GateResult:
    if not live_n:
        return GateResult("row_count", True, new_n, max_drop_pct, "no live version to compare with", skipped=True)
    drop = 100.0 * (live_n - new_n) / live_n
    ok = drop <= max_drop_pct
    msg = (f"{new_n} products vs {live_n} live ({100.0 * (new_n - live_n) / live_n:+.1f}%)" if ok else
           f"row count falls from {live_n} (live) to {new_n}: -{drop:.1f}% > max_row_drop_pct {max_drop_pct}%")
    return GateResult("row_count", ok, round(drop, 3), max_drop_pct, msg)


def gate_dead_letters(dead_products: int, rows: int, max_pct: float) -> GateResult:
    pct = 100.0 * dead_products / rows if rows else 0.0
    ok = pct <= max_pct
    msg = (f"{dead_products} of {rows} product rows have dead letters ({pct:.1f}%)" if ok else
           f"dead-letter fraction {pct:.1f}% ({dead_products} of {rows} product rows) > max_dead_letter_pct {max_pct}%")
    return GateResult("dead_letters", ok, round(pct, 3), max_pct, msg)


def measure_recall(index_obj, embeddings_dir: str, k: int, n_queries: int, seed: int = 0) -> dict[str, Any]:
    """recall@k of ``index_obj.similar`` against exact search over the merged vectors (query excluded)."""
    import numpy as np

    from index.embeddings_io import read_embeddings

    emb = read_embeddings(embeddings_dir)
    ids, x = emb.ids, emb.vectors
    if len(ids) < 2:
        return {"recall": None, "queries": 0, "k": k}
    kk = min(k, len(ids) - 1)
    q = np.random.default_rng(seed).choice(len(ids), size=min(n_queries, len(ids)), replace=False)
    sims = x[q] @ x.T
    sims[np.arange(len(q)), q] = -np.inf
    exact = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    got = index_obj.similar_batch([ids[i] for i in q], k=kk)
    hits = sum(len({ids[j] for j in exact[r]} & {h["product_id"] for h in got[r][:kk]}) for r in range(len(q)))
    return {"recall": hits / (len(q) * kk), "queries": int(len(q)), "k": kk}


def gate_recall(measured: dict[str, Any], min_recall: float) -> GateResult:
    r = measured.get("recall")
    if r is None:
        return GateResult("recall", True, None, min_recall, "fewer than 2 products: recall not measurable",
                          skipped=True)
    ok = r >= min_recall
    msg = (f"recall@{measured['k']} {r:.3f} over {measured['queries']} queries (exact search as reference)" if ok else
           f"measured recall@{measured['k']} {r:.3f} over {measured['queries']} queries < min_recall {min_recall}")
    return GateResult("recall", ok, round(r, 4), min_recall, msg)


def gate_drift(identity: dict[str, Any], canary: dict[str, Any], max_drift: float) -> GateResult:
    problems = []
    if identity["missing"] or identity["mismatched"]:
        problems.append(f"{len(identity['mismatched'])} reused product(s) differ from the previous vectors "
                        f"(e.g. {identity['mismatched'][:3]}) and {len(identity['missing'])} are missing "
                        f"(e.g. {identity['missing'][:3]})")
    d = canary.get("max_abs_diff")
    if d is not None and d > max_drift:
        problems.append(f"re-embedding {canary['n']} unchanged canary product(s) moved their vectors by up to {d:.2e} "
                        f"(worst {canary['worst']}, min cosine {canary['min_cosine']:.6f}) > max_drift {max_drift:g}: "
                        f"the model or its runtime changed without a config change; run with a new config "
                        f"(full re-embed) instead of mixing vector spaces")
    value = {"reused_checked": identity["checked"], "canaries": canary.get("n", 0), "max_abs_diff": d}
    if problems:
        return GateResult("drift", False, value, max_drift, "; ".join(problems))
    msg = (f"{identity['checked']} reused vectors bit-identical to the previous run; "
           + (f"{canary['n']} canaries re-embedded, max |diff| {d:.1e}" if d is not None else "no canaries this run"))
    return GateResult("drift", True, value, max_drift, msg)


def gate_golden(index_obj, golden: list[dict[str, Any]], default_k: int) -> GateResult:
    if not golden:
        return GateResult("golden", True, None, None, "no golden queries configured", skipped=True)
    failures = []
    for q in golden:
        k = int(q.get("k", default_k))
        pid = str(q["product_id"])
        try:
            got = [r["product_id"] for r in index_obj.similar(pid, k=k)]
        except KeyError:
            failures.append(f"{pid}: not in the new index")
            continue
        missing = [str(e) for e in q["expected"] if str(e) not in got[:k]]
        if missing:
            failures.append(f"{pid}: expected {missing} in the top {k}, got {got[:k]}")
    ok = not failures
    msg = (f"{len(golden)} golden queries kept their expected neighbours" if ok else
           f"{len(failures)} of {len(golden)} golden queries failed: " + "; ".join(failures[:5]))
    return GateResult("golden", ok, len(golden) - len(failures), len(golden), msg)


# ================================================================================================================
# the run
class StageFailed(Exception):
    def __init__(self, stage: str, error: BaseException):
        self.stage = stage
        self.error = error
        super().__init__(f"stage {stage} failed: {type(error).__name__}: {error}")


class _Terminated(BaseException):
    pass


@dataclass
class NightlyResult:
    report: dict[str, Any]
    exit_code: int


class _Run:
    def __init__(self, cfg: Config, force: bool = False):
        self.cfg = cfg
        self.force = force
        self.settings = NightlySettings.from_config(cfg)
        self.gates = GateSettings.from_config(cfg)
        self.index_settings = IndexSettings.from_config(cfg)
        self.layout = Layout(self.settings.state_dir)
        self.t0 = time.time()
        self.report: dict[str, Any] = {
            "status": None, "exit_code": None, "message": None, "run_id": None, "work_id": None,
            "started_at": utc_now(), "host": socket.gethostname(), "pid": os.getpid(),
            "code_version": code_version(), "config_file": cfg.source, "model_id": cfg.model.model_id,
            "random_init": cfg.model.random_init, "embedding_hash": cfg.embedding_hash,
            "inputs": {"products": self.settings.products, "reviews": self.settings.reviews},
            "state_dir": self.layout.root, "stages": [], "counts": {}, "gates": [], "index": {},
            "published_version": None, "live_version_before": None, "previous_run": None, "notes": [],
        }
        self.lock = RunLock(self.layout.lock, self.settings.lock_stale_after_s)
        self.ix = IndexAdapter(self.layout.index, self.index_settings)

    # -- stage bookkeeping -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        rec: dict[str, Any] = {"name": name, "status": "running"}
        self.report["stages"].append(rec)
        self.lock.heartbeat(name)
        t = time.perf_counter()
        try:
            yield rec
        except (StageFailed, _Terminated):
            rec["status"] = "failed"
            raise
        except Exception as e:  # noqa: BLE001 - a stage failure is reported, never a bare traceback
            rec["status"] = "failed"
            rec["error"] = f"{type(e).__name__}: {e}"
            if isinstance(e, UserError):
                log.error("stage %s failed: %s", name, e)
            else:
                log.error("stage %s failed", name, exc_info=True)
            raise StageFailed(name, e) from e
        finally:
            rec["seconds"] = round(time.perf_counter() - t, 3)
        if rec["status"] == "running":
            rec["status"] = "ok"
        _crash_point(name)

    def note(self, msg: str) -> None:
        log.info("%s", msg)
        self.report["notes"].append(msg)

    # -- state ---------------------------------------------------------------------------------------------------
    def _reconcile(self, state: dict[str, Any] | None, live: str | None) -> dict[str, Any] | None:
        """Make state.json agree with the live index version (a crash between the switch and state.json)."""
        if live is None or (state and state.get("index_version") == live):
            return state
        for pub in sorted(glob.glob(os.path.join(self.layout.runs, "*", "publish.json"))):
            info = _read_json(pub)
            if info and info.get("index_version") == live:
                run_id = os.path.basename(os.path.dirname(pub))
                fp = _read_json(os.path.join(self.layout.run_dir(run_id), "fingerprint.json"))
                adopted = {"run_id": run_id, "index_version": live, "fingerprint": fp,
                           "index_config_digest": info.get("index_config_digest"),
                           "published_at": info.get("published_at"), "previous_run_id": (state or {}).get("run_id"),
                           "products": info.get("products")}
                _write_json_atomic(self.layout.state, adopted)
                self.note(f"recovered: live version {live} was published by run {run_id}, which stopped before "
                          f"recording it; state adopted (baseline = run {run_id})")
                return adopted
        self.note(f"warning: live index version {live} was not published by this nightly job (manual publish or "
                  f"rollback to a version whose run was pruned); the baseline stays run "
                  f"{(state or {}).get('run_id')}")
        return state

    def _baseline(self, state: dict[str, Any] | None) -> str | None:
        if not state or not state.get("run_id"):
            return None
        d = self.layout.run_dir(state["run_id"])
        if not os.path.isfile(os.path.join(d, "keys.parquet")):
            self.note(f"warning: baseline run {state['run_id']} is missing ({d}); everything is embedded again")
            return None
        return d

    # -- main --------------------------------------------------------------------------------------------------
    def execute(self) -> int:
        from . import incremental as inc

        L, S, cfg = self.layout, self.settings, self.cfg
        state = _read_json(L.state)
        live = self.ix.current()
        self.report["live_version_before"] = live
        state = self._reconcile(state, live)
        baseline = self._baseline(state)
        self.report["previous_run"] = (state or {}).get("run_id")
        idx_digest = self.index_settings.digest()

        with self.stage("fingerprint") as rec:
            fp = inc.catalog_fingerprint(cfg, S.products, S.reviews)
            rec["digest"] = fp["digest"][:16]
            same = (state is not None and baseline is not None and live is not None
                    and (state.get("fingerprint") or {}).get("digest") == fp["digest"]
                    and state.get("index_config_digest") == idx_digest and state.get("index_version") == live)
            rec["unchanged"] = same
        if same and not self.force:
            for old in glob.glob(os.path.join(L.staging, "*")):  # work of interrupted runs is moot now
                shutil.rmtree(old, ignore_errors=True)
            live_counts = (state or {}).get("products") or {}
            self.report["counts"] = {"products": live_counts.get("products"), "indexed": live_counts.get("indexed"),
                                     "reused": live_counts.get("indexed"), "embedded": 0, "new": 0, "changed": 0,
                                     "metadata_only": 0, "deleted": 0, "dead_letters": live_counts.get("dead_letters")}
            return self._finish("no_change", EXIT_OK,
                                f"no change: catalog files, model and configs are those of the published run "
                                f"{state['run_id']} (version {live}); nothing to do")

        work_id = config_hash({"fp": fp["digest"], "base": (state or {}).get("run_id"), "idx": idx_digest,
                               "emb": cfg.embedding_hash, "canaries": self.gates.drift_canaries,
                               "live": live})
        self.report["work_id"] = work_id
        staging = os.path.join(L.staging, work_id)
        for old in glob.glob(os.path.join(L.staging, "*")):
            if os.path.basename(old) != work_id:
                shutil.rmtree(old, ignore_errors=True)
                self.note(f"removed stale staging {os.path.basename(old)} (left by an interrupted run with other inputs)")
        os.makedirs(staging, exist_ok=True)
        run_id_file = os.path.join(staging, "run_id")
        if os.path.isfile(run_id_file):
            run_id = open(run_id_file, encoding="utf-8").read().strip()
            self.note(f"resuming interrupted run {run_id} (same inputs)")
        else:
            run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + work_id[:8]
            _write_text_atomic(run_id_file, run_id)
        self.report["run_id"] = run_id
        self.lock.record["run_id"] = run_id
        ck = Checkpoints(os.path.join(staging, "checkpoints"))

        # -- scan ------------------------------------------------------------------------------------------------
        with self.stage("scan") as rec:
            scan = inc.scan_catalog(cfg, S.products, S.reviews)
            prev = inc.read_keys(baseline) if baseline else None
            plan = inc.plan_delta(scan, prev, cfg, canaries=self.gates.drift_canaries, salt=work_id)
            if not plan.to_embed:
                plan.canaries = []  # nothing new is mixed with the stored vectors: no drift to measure
            keys_digest = sha256_bytes(canonical_json(scan.keys.to_pydict()).encode())
            scan_digest = config_hash({"keys": keys_digest, "plan": plan.to_json()})
            rec.update({"product_rows": scan.product_rows, "products": scan.keys.num_rows,
                        "image_uri_files_read": scan.image_reads, **plan.counts()})
            self.report["counts"].update({"catalog_rows": scan.product_rows, "products": scan.keys.num_rows,
                                          **{k: v for k, v in plan.counts().items() if k not in ("mode", "reason")}})
            self.report["plan"] = {"mode": plan.mode, "reason": plan.reason,
                                   "embedded_ids_sample": plan.to_embed[:20], "deleted_ids_sample": plan.deleted[:20]}
        if plan.nothing_changed and plan.mode == "incremental" and state and state.get("index_version") == live \
                and state.get("index_config_digest") == idx_digest and not self.force \
                and self._catalog_dead_letters_unchanged(scan, baseline):
            state = dict(state, fingerprint=fp)  # same content in rewritten files: short-circuit next time
            _write_json_atomic(L.state, state)
            shutil.rmtree(staging, ignore_errors=True)
            self.report["counts"].update(embedded=0, reused=plan.counts()["unchanged"],
                                         indexed=((state.get("products") or {}).get("indexed")))
            return self._finish("no_change", EXIT_OK,
                                f"no change: the catalog files were rewritten but every product's content and "
                                f"metadata equal the published run {state['run_id']} (version {live})")

        # -- embed -----------------------------------------------------------------------------------------------
        delta_dir = os.path.join(staging, "delta")
        embed_inputs = {"scan": scan_digest, "model": cfg.model.model_id, "embedding_hash": cfg.embedding_hash}
        with self.stage("embed") as rec:
            ids = plan.to_embed + plan.canaries
            if not ids:
                rec["status"] = "skipped"
                rec["detail"] = "nothing to embed" + (" (metadata-only changes)" if plan.metadata_only else "")
                embed_ck = {"outputs_digest": None, "result": {}}
                delta_dir_used = None
            elif (embed_ck := ck.load("embed", embed_inputs)) is not None:
                rec["status"] = "checkpoint"
                rec["detail"] = "delta embeddings of an interrupted run verified by checksum and reused"
                delta_dir_used = delta_dir
            else:
                from .embed import run_embed

                for leftover in glob.glob(delta_dir + "*"):
                    shutil.rmtree(leftover, ignore_errors=True)
                sub = inc.write_subset(scan, ids, os.path.join(staging, "subset"))
                with _crash_during_embed(delta_dir):
                    er = run_embed(cfg, sub[0], sub[1], delta_dir, runner=S.runner, beam_args=S.beam_args)
                result = {"embedded": er["counts"]["embedded"], "dead_letters": er["counts"]["dead_letters"],
                          "wall_time_s": er["wall_time_s"], "throughput_products_per_s":
                              er["throughput_products_per_s"], "runner": er["runner"], "subset_rows": sub[2]}
                embed_ck = ck.save("embed", embed_inputs, [delta_dir], result)
                delta_dir_used = delta_dir
            rec.update({"products": len(plan.to_embed), "canaries": len(plan.canaries),
                        **{k: v for k, v in embed_ck.get("result", {}).items() if k in ("wall_time_s", "runner")}})

        # -- merge -----------------------------------------------------------------------------------------------
        run_dir = L.run_dir(run_id)
        merge_inputs = {"embed": embed_ck.get("outputs_digest"), "scan": scan_digest,
                        "baseline": (state or {}).get("run_id"), "run_id": run_id}
        with self.stage("merge") as rec:
            merge_ck = ck.load("merge", merge_inputs)
            if merge_ck is not None:
                rec["status"] = "checkpoint"
                merged_report = merge_ck["result"]
            else:
                tmp = os.path.join(staging, "merged")
                mr = inc.merge_embeddings(cfg, scan, plan, baseline, delta_dir_used, tmp,
                                          runner=S.runner or cfg.raw["pipeline"].get("runner", "DirectRunner"),
                                          extra_report={"nightly_run_id": run_id})
                _write_json_atomic(os.path.join(tmp, "fingerprint.json"), fp)
                os.makedirs(L.runs, exist_ok=True)
                if os.path.exists(run_dir):  # a half-committed attempt of this same run
                    if run_id in ((state or {}).get("run_id"), (state or {}).get("previous_run_id")):
                        raise RuntimeError(f"refusing to overwrite {run_dir}: it is a published run")
                    shutil.rmtree(run_dir)
                os.replace(tmp, run_dir)
                _fsync_dir(L.runs)
                merged_report = {"counts": mr["counts"], "incremental": mr["incremental"]}
                merge_ck = ck.save("merge", merge_inputs, [run_dir], merged_report)
            c = merged_report["counts"]
            rec.update({"embedded_rows": c["embedded"], "dead_letters": c["dead_letters"]})
            self.report["counts"].update({"indexed": c["embedded"], "dead_letters": c["dead_letters"],
                                          "dead_letter_products": c["dead_letter_products"],
                                          "partial": c["partial"],
                                          "reused": merged_report["incremental"]["reused"],
                                          "embedded": merged_report["incremental"]["embedded_now"]})

        # -- index -----------------------------------------------------------------------------------------------
        staged_index = os.path.join(staging, "index")
        index_inputs = {"merge": merge_ck["outputs_digest"], "index": dataclasses.asdict(self.index_settings)}
        with self.stage("index") as rec:
            index_ck = ck.load("index", index_inputs)
            if index_ck is not None:
                rec["status"] = "checkpoint"
                info = index_ck["result"]
            else:
                shutil.rmtree(staged_index, ignore_errors=True)
                info = self.ix.build(run_dir, staged_index)
                index_ck = ck.save("index", index_inputs, [staged_index], info)
            rec.update({k: info.get(k) for k in ("key", "n", "recall")})
            self.report["index"] = info

        # -- gates -----------------------------------------------------------------------------------------------
        with self.stage("gates") as rec:
            results = self._gates(plan, baseline, delta_dir_used, run_dir, staged_index, live, merged_report, info)
            self.report["gates"] = [g.to_dict() for g in results]
            failed = [g for g in results if not g.passed]
            rec["failed"] = [g.name for g in failed]
        if failed:
            return self._finish("gate_refused", EXIT_REFUSED,
                                "refused by quality gate(s): " + "; ".join(f"{g.name}: {g.message}" for g in failed))

        # -- publish ---------------------------------------------------------------------------------------------
        with self.stage("publish") as rec:
            counts = {k: self.report["counts"].get(k) for k in ("products", "indexed", "reused", "embedded",
                                                                 "deleted", "dead_letters")}
            intent = {"run_id": run_id, "index_config_digest": idx_digest, "products": counts}
            version = self.ix.publish(staged_index, self._version_name(run_id), intent,
                                      os.path.join(run_dir, "publish.json"))
            rec["version"] = version
            _crash_point("publish:switched")
            new_state = {"run_id": run_id, "index_version": version, "fingerprint": fp,
                         "index_config_digest": idx_digest, "published_at": utc_now(),
                         "previous_run_id": (state or {}).get("run_id"), "products": counts}
            _write_json_atomic(L.state, new_state)
            self.report["published_version"] = version
            shutil.rmtree(staging, ignore_errors=True)
            try:
                self._retention(new_state)
            except OSError as e:  # published already: a cleanup problem is a note, not a failure
                self.note(f"warning: retention of old runs failed: {e}")
        c = self.report["counts"]
        return self._finish("published", EXIT_OK,
                            f"published version {version}: {c.get('indexed')} products "
                            f"({c.get('reused')} reused, {c.get('embedded')} embedded, {c.get('deleted')} deleted)")

    # -- gates -------------------------------------------------------------------------------------------------
    def _gates(self, plan, baseline, delta_dir, run_dir, staged_index, live, merged_report, info) -> list[GateResult]:
        from . import incremental as inc

        g = self.gates
        out: list[GateResult] = []
        live_n = None
        if live is not None:
            with contextlib.suppress(Exception):
                live_n = int(self.ix.manifest(live).get("n"))
        c = merged_report["counts"]
        out.append(gate_row_count(c["embedded"], live_n, float(g.max_row_drop_pct)))
        out.append(gate_dead_letters(c["dead_letter_rows"], self.report["counts"].get("catalog_rows") or 0,
                                     float(g.max_dead_letter_pct)))
        target = float(g.min_recall if g.min_recall is not None else self.index_settings.recall_target)
        index_obj = self.ix.load_staged(staged_index)
        measured = measure_recall(index_obj, run_dir, self.index_settings.k, int(g.recall_queries))
        self.report["index"]["recall_measured_by_gate"] = measured
        out.append(gate_recall(measured, target))
        if baseline and plan.mode == "incremental":
            identity = inc.check_reuse_identity(baseline, run_dir, plan.unchanged)
            canary = inc.canary_drift(baseline, delta_dir, plan.canaries) if delta_dir else {"n": 0}
            self.report["drift"] = {"identity": {k: (v if not isinstance(v, list) else v[:20])
                                                 for k, v in identity.items()}, "canaries": canary}
            out.append(gate_drift(identity, canary, float(g.max_drift)))
        else:
            out.append(GateResult("drift", True, None, g.max_drift,
                                  "no vectors reused (" + plan.reason + ")", skipped=True))
        out.append(gate_golden(index_obj, g.golden, self.index_settings.k))
        for r in out:
            (log.info if r.passed else log.error)("gate %s: %s%s", r.name, "ok" if r.passed else "REFUSED: ",
                                                  r.message)
        return out

    @staticmethod
    def _catalog_dead_letters_unchanged(scan, baseline: str) -> bool:
        """The catalog's own dead letters (missing / duplicate ids) are those of the baseline run."""
        from .incremental import _read_dead

        prev = _read_dead(baseline)
        before = sorted((r["stage"], r["error"], r["product_id"] or "") for r in (prev.to_pylist() if prev else [])
                        if r["stage"] in ("validate", "dedup"))
        return before == sorted((r["stage"], r["error"], r["product_id"] or "") for r in scan.dead_letters)

    def _version_name(self, run_id: str) -> str:
        """``v<run id>``; a retry after a crash inside the store's publish (version placed, CURRENT not switched)
        gets ``v<run id>-r<n>`` (the orphan is left to the store's retention)."""
        from index import store

        name, n = "v" + run_id, 0
        while os.path.exists(os.path.join(self.layout.index, store.VERSIONS_DIR, name)):
            n += 1
            name = f"v{run_id}-r{n}"
        return name

    # -- retention ---------------------------------------------------------------------------------------------
    def _retention(self, state: dict[str, Any]) -> None:
        keep = {state.get("run_id"), state.get("previous_run_id")}
        runs = sorted((d for d in os.listdir(self.layout.runs) if not d.endswith(".tmp")), reverse=True)
        for i, r in enumerate(runs):
            if i >= self.settings.keep_runs and r not in keep:
                shutil.rmtree(self.layout.run_dir(r), ignore_errors=True)
                log.info("retention: removed run %s", r)

    # -- finish ------------------------------------------------------------------------------------------------
    def _finish(self, status: str, code: int, message: str) -> int:
        self.report["status"] = status
        self.report["exit_code"] = code
        self.report["message"] = message
        return code


# ================================================================================================================
# reports
def _counters_update(layout: Layout, report: dict[str, Any]) -> dict[str, Any]:
    c = _read_json(layout.counters) or {}
    c.setdefault("runs_total", {})
    c.setdefault("gate_failures_total", {})
    c["runs_total"][report["status"]] = c["runs_total"].get(report["status"], 0) + 1
    for g in report.get("gates", []):
        if not g["passed"]:
            c["gate_failures_total"][g["name"]] = c["gate_failures_total"].get(g["name"], 0) + 1
    now = time.time()
    c["last_run_unix"] = now
    if report["status"] in ("published", "no_change"):
        c["last_success_unix"] = now
    if report["status"] == "published":
        c["last_publish_unix"] = now
    _write_json_atomic(layout.counters, c)
    return c


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def _escape_label(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(report: dict[str, Any], counters: dict[str, Any]) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {_fmt(value)}" if lab else f"{name} {_fmt(value)}")

    metric("shopvec_nightly_last_run_timestamp_seconds", "gauge", "Unix time the last nightly run ended.",
           [({}, round(counters.get("last_run_unix", 0), 3))])
    metric("shopvec_nightly_last_success_timestamp_seconds", "gauge",
           "Unix time of the last run that published or found nothing to do (alert when too old).",
           [({}, round(counters.get("last_success_unix", 0), 3))])
    metric("shopvec_nightly_last_publish_timestamp_seconds", "gauge", "Unix time of the last published version.",
           [({}, round(counters.get("last_publish_unix", 0), 3))])
    metric("shopvec_nightly_last_run_duration_seconds", "gauge", "Wall time of the last run.",
           [({}, report.get("duration_s") or 0)])
    metric("shopvec_nightly_last_run_exit_code", "gauge", "Exit code of the last run (0 ok, 1 stage failed, "
           "2 bad config, 3 gate refused, 75 locked).", [({}, report.get("exit_code") or 0)])
    metric("shopvec_nightly_last_run_status", "gauge", "1 for the status of the last run.",
           [({"status": s}, int(report.get("status") == s)) for s in STATUSES])
    metric("shopvec_nightly_stage_duration_seconds", "gauge", "Per-stage wall time of the last run.",
           [({"stage": s["name"]}, s.get("seconds") or 0) for s in report.get("stages", [])])
    counts = report.get("counts") or {}
    metric("shopvec_nightly_products", "gauge", "Product counts of the last run.",
           [({"kind": k}, counts[k]) for k in ("catalog_rows", "products", "indexed", "reused", "embedded", "new",
                                               "changed", "metadata_only", "deleted", "dead_unchanged",
                                               "dead_letters", "dead_letter_products", "canaries")
            if isinstance(counts.get(k), (int, float))])
    metric("shopvec_nightly_gate_passed", "gauge", "1 if the gate passed in the last run, 0 if it refused.",
           [({"gate": g["name"]}, int(bool(g["passed"]))) for g in report.get("gates", [])])
    metric("shopvec_nightly_gate_failures_total", "counter", "Gate refusals since the state directory was created.",
           [({"gate": k}, v) for k, v in sorted(counters.get("gate_failures_total", {}).items())]
           or [({"gate": "none"}, 0)])
    metric("shopvec_nightly_runs_total", "counter", "Runs by final status.",
           [({"status": k}, v) for k, v in sorted(counters.get("runs_total", {}).items())])
    recall = (report.get("index") or {}).get("recall")
    if recall is not None:
        metric("shopvec_nightly_index_recall", "gauge", "Recall measured when the last index was built.",
               [({}, recall)])
    if report.get("published_version"):
        metric("shopvec_nightly_published_version_info", "gauge", "The version the last run published.",
               [({"version": report["published_version"]}, 1)])
    return "\n".join(lines) + "\n"


def _delta_vs_previous(prev: dict[str, Any] | None, report: dict[str, Any]) -> dict[str, Any] | None:
    if not prev:
        return None
    pc, c = prev.get("counts") or {}, report.get("counts") or {}
    out: dict[str, Any] = {"previous_run": prev.get("run_id") or prev.get("previous_run"),
                           "previous_status": prev.get("status"),
                           "previous_finished_at": prev.get("finished_at")}
    for k in ("products", "indexed", "embedded", "dead_letters"):
        if isinstance(c.get(k), (int, float)) and isinstance(pc.get(k), (int, float)):
            out[k] = {"now": c[k], "before": pc[k], "delta": c[k] - pc[k]}
    if prev.get("duration_s") is not None:
        out["duration_s"] = {"now": report.get("duration_s"), "before": prev["duration_s"]}
    r0, r1 = (prev.get("index") or {}).get("recall"), (report.get("index") or {}).get("recall")
    if r0 is not None and r1 is not None:
        out["recall"] = {"now": r1, "before": r0}
    out["version"] = {"now": report.get("published_version") or report.get("live_version_before"),
                      "before": prev.get("published_version") or prev.get("live_version_before")}
    return out


def summary_text(report: dict[str, Any]) -> str:
    """The one-screen stdout summary."""
    c = report.get("counts") or {}
    st = report["status"]
    head = {"published": f"PUBLISHED version {report.get('published_version')}",
            "no_change": "NO CHANGE", "gate_refused": "REFUSED by quality gates (CURRENT untouched)",
            "failed": f"FAILED at stage {(report.get('error') or {}).get('stage')} (CURRENT untouched)",
            "locked": "NOT RUN: another run holds the lock"}.get(st, st)
    lines = [f"shopvec nightly: {head}  [exit {report.get('exit_code')}, {report.get('duration_s')}s, "
             f"run {report.get('run_id') or '-'}]", f"  {report.get('message')}"]
    if c:
        changed = c.get("changed_by_modality") or {}
        rows = f"{c['catalog_rows']} rows, " if c.get("catalog_rows") is not None else ""
        lines.append(f"  catalog:  {rows}{c.get('products', '-')} products | new "
                     f"{c.get('new', 0)}, changed {c.get('changed', 0)}"
                     + (f" ({', '.join(f'{k} {v}' for k, v in sorted(changed.items()))})" if changed else "")
                     + f", metadata-only {c.get('metadata_only', 0)}, deleted {c.get('deleted', 0)}")
        if "reused" in c or "embedded" in c:
            lines.append(f"  vectors:  {c.get('reused', 0)} reused (byte-identical), {c.get('embedded', 0)} embedded,"
                         f" {c.get('canaries', 0)} canaries | indexed {c.get('indexed', '-')}, dead letters "
                         f"{c.get('dead_letters', '-')}"
                         + (f" ({c['dead_letter_products']} products not embedded, {c.get('partial')} partial)"
                            if c.get("dead_letter_products") is not None else ""))
    if report.get("stages"):
        lines.append("  stages:   " + " | ".join(
            f"{s['name']} {s.get('seconds', 0):.2f}s" + ("" if s["status"] == "ok" else f" ({s['status']})")
            for s in report["stages"]))
    for g in report.get("gates", []):
        mark = "skip" if g.get("skipped") else ("ok  " if g["passed"] else "FAIL")
        lines.append(f"  gate {mark} {g['name']:<13} {g['message']}")
    ix = report.get("index") or {}
    if ix.get("key"):
        lines.append(f"  index:    {ix.get('key')} n={ix.get('n')} recall@{ix.get('k', '')}={ix.get('recall')} "
                     f"p99={ix.get('latency_p99_ms')}ms params={ix.get('search_params')}")
    d = report.get("delta_vs_previous_run")
    if d:
        parts = [f"{k} {v['before']}->{v['now']}" for k, v in d.items()
                 if isinstance(v, dict) and "before" in v and k != "duration_s"]
        if isinstance(d.get("duration_s"), dict):
            parts.append(f"duration {d['duration_s']['before']}s->{d['duration_s']['now']}s")
        lines.append(f"  vs previous run ({d.get('previous_run') or '-'}, {d.get('previous_status')}): "
                     + ", ".join(parts))
    for n in report.get("notes", [])[:5]:
        lines.append(f"  note: {n}")
    if report.get("error"):
        e = report["error"]
        lines.append(f"  error: [{e.get('stage')}] {e.get('type')}: {e.get('message')}")
    lines.append(f"  report: {report.get('report_path')}  metrics: {report.get('prom_path')}")
    return "\n".join(lines)


def _write_reports(run: _Run, report: dict[str, Any]) -> None:
    L = run.layout
    prev = _read_json(L.latest_report)
    report["delta_vs_previous_run"] = _delta_vs_previous(prev, report)
    name = report.get("run_id") or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(L.reports, f"{name}-{report['status']}.json")
    report["report_path"] = L.latest_report
    report["prom_path"] = run.settings.prom_file or L.prom
    _write_json_atomic(path, report)
    if report["status"] != "locked":  # the latest report belongs to the run that holds the lock
        _write_json_atomic(L.latest_report, report)
    else:
        report["report_path"] = path
    counters = _counters_update(L, report)
    _write_text_atomic(report["prom_path"], prometheus_text(report, counters))
    olds = sorted(glob.glob(os.path.join(L.reports, "*.json")))
    for old in olds[: max(0, len(olds) - run.settings.keep_reports)]:
        with contextlib.suppress(OSError):
            os.remove(old)


def run_nightly(cfg: Config, force: bool = False) -> NightlyResult:
    """Run the nightly job once; always returns a report (also written to STATE/nightly_report.json)."""
    run = _Run(cfg, force=force)
    report = run.report
    code = EXIT_FAILED
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum, frame):  # systemd stop / docker stop: end the stage as failed, report, release
            raise _Terminated(f"terminated by signal {signum}")
        old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        t = time.perf_counter()
        try:
            lock_info = run.lock.acquire(report["run_id"] or "pending")
        except LockBusy as e:
            report["stages"].append({"name": "lock", "status": "busy", "seconds": round(time.perf_counter() - t, 3)})
            report["lock"] = {"holder": e.holder}
            code = run._finish("locked", EXIT_LOCKED, str(e))
        else:
            report["stages"].append({"name": "lock", "status": "ok", "seconds": round(time.perf_counter() - t, 3)})
            report["lock"] = lock_info
            run.lock.start_heartbeat()
            for n in lock_info["notes"]:
                run.note(n)
            try:
                code = run.execute()
            except StageFailed as e:
                report["error"] = {"stage": e.stage, "type": type(e.error).__name__, "message": str(e.error)[:2000]}
                if not isinstance(e.error, UserError):
                    report["error"]["traceback"] = traceback.format_exception(e.error)[-3:]
                code = run._finish("failed", EXIT_FAILED, f"stage {e.stage} failed: {type(e.error).__name__}: "
                                                          f"{str(e.error)[:500]}")
            except _Terminated as e:
                stage = next((s["name"] for s in reversed(report["stages"]) if s["status"] == "failed"), None)
                report["error"] = {"stage": stage, "type": "Terminated", "message": str(e)}
                code = run._finish("failed", EXIT_FAILED, str(e))
            except Exception as e:  # noqa: BLE001 - outside any stage (state, recovery): still a report
                report["error"] = {"stage": "startup", "type": type(e).__name__, "message": str(e)[:2000],
                                   "traceback": traceback.format_exception(e)[-3:]}
                code = run._finish("failed", EXIT_FAILED, f"startup failed: {type(e).__name__}: {str(e)[:500]}")
            finally:
                run.lock.release()
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    report["finished_at"] = utc_now()
    report["duration_s"] = round(time.time() - run.t0, 3)
    _write_reports(run, report)
    return NightlyResult(report, code)
