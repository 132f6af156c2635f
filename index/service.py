"""HTTP query service over the published index: FastAPI app factory, hot reload, auth, limits, Prometheus metrics.

``create_app(index_root)`` returns a FastAPI app serving the version named by ``INDEXROOT/CURRENT``:

- ``GET  /v1/products/{product_id}/similar?k=10&filter=category=Shoes&filter=price<2000`` (self excluded)
- ``POST /v1/search``        ``{"text" | "vector" | "image" (base64) | "product_id": ..., "k": 10, "filters": {...}}``
- ``POST /v1/similar:batch`` ``{"product_ids": [...], "k": 10, "filters": {...}}``
- ``GET  /v1/index``         live version, index key, n, dim, model, measured recall, created_at
- ``GET  /healthz`` (alive), ``GET /readyz`` (an index is loaded), ``GET /metrics`` (Prometheus)

Every query route answers ``{"version": <live version>, "results": [...]}``; every error is
``{"error": {"code": ..., "message": ...}}`` (never a traceback; bad input is a 4xx, never a 500).

Hot reload: a watcher thread polls ``CURRENT``; a new version is loaded (checksums verified) and checked in that
thread — dimension consistent with the live one unless the model changed too, the query encoder warmed up and its
output dimension matching the index — then swapped in with one reference assignment of an immutable
:class:`Snapshot`. A request takes the snapshot once when it starts, so requests in flight finish on the old version
(and report its ``version``). A version that fails any check is logged and counted
(``shopvec_index_reload_failures_total``) and the old one keeps serving; it is retried with back-off, or at once when
``CURRENT`` changes again.

Security: binds 127.0.0.1 by default (the CLI); with a token every ``/v1/*`` route and ``/metrics`` need
``Authorization: Bearer <token>`` (``hmac.compare_digest``), 401 otherwise; ``k`` over ``max_k`` and batches over
``max_batch`` are 422; bodies over ``max_body_bytes`` are 413 (``Content-Length`` and the streamed size); images go
through a header-only pixel check and then :func:`embedders.images.decode_image` with the same cap (decompression
bombs are 422, never decoded).
"""
# No ``from __future__ import annotations`` here: FastAPI must resolve the route signatures, which use per-app
# limits (closures) in their annotations.

import base64
import binascii
import datetime as _dt
import hmac
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Optional, Union

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)

DEFAULT_MAX_K = 1000
DEFAULT_MAX_BATCH = 1000
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # a 6 MB image in base64
DEFAULT_MAX_TEXT_CHARS = 2000
DEFAULT_MAX_IMAGE_PIXELS = 16_000_000
DEFAULT_RELOAD_INTERVAL_S = 2.0
MAX_VECTOR_LEN = 65536
MAX_BATCH_RESULTS = 100_000  # product_ids x k in one /v1/similar:batch answer
KNOWN_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0)


# ---------------------------------------------------------------------------------------------------------------
# Errors
class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _clean(v: Any) -> Any:
    """A JSON-safe copy: NaN/inf -> null, numpy scalars/arrays -> Python, dates -> ISO 8601, bytes dropped."""
    t = type(v)
    if t is str or t is int or t is bool or v is None:
        return v
    if t is float:
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items() if not isinstance(x, (bytes, bytearray, memoryview))}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalar or array
        return _clean(v.tolist())
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return None
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, int):
        return int(v)
    return str(v)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Strict JSON (no NaN). The index library already returns JSON-safe values, so cleaning is the slow path."""
    try:
        body = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        body = json.dumps(_clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        data = body.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate echoed from the request: \u-escape everything instead
        data = json.dumps(_clean(obj), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
    return Response(data, status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   details: list | None = None) -> Response:
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        err["details"] = details
    return json_response({"error": err}, status, headers)


# ---------------------------------------------------------------------------------------------------------------
# Index library adapter: what the service uses from index.search / index.store / index.filters.
def load_product_index(root: str, version: str | None = None, mmap: bool = False, verify: bool = True,
                       encoder: Any = None):
    """``ProductIndex.load`` with the metadata table in one chunk per column: a Parquet file read in many row
    groups gives many chunks, and ``Table.take`` over them (every result row lookup) costs ~6 ms per query on a 1M
    catalog instead of ~0.05 ms."""
    from index.search import ProductIndex
    from index.store import load_version

    lv = load_version(root, version=version, mmap=mmap, verify=verify)
    kw = {"encoder": encoder} if encoder is not None else {}
    return ProductIndex(lv.index, lv.ids, lv.metadata.combine_chunks(), lv.manifest, path=lv.path, mmap=mmap, **kw)


def _default_loader(root: str, version: str, mmap: bool, verify: bool, encoder: Any = None):
    return load_product_index(root, version=version, mmap=mmap, verify=verify, encoder=encoder)


def read_current(root: str) -> str | None:
    """The version CURRENT names, or None when nothing is published yet (``index.store.read_current``)."""
    from index.store import read_current as _read_current

    return _read_current(root)


def _model_dict(manifest: dict[str, Any]) -> dict[str, Any]:
    """The embedding model a version records, as ``ProductIndex.model`` builds it (model dict + model_id,
    random_init)."""
    m = manifest.get("model")
    model = dict(m) if isinstance(m, dict) else {}
    for key in ("model_id", "random_init"):
        if key not in model and key in manifest:
            model[key] = manifest[key]
    return model


def _model_spec(model: dict[str, Any]) -> dict[str, Any] | None:
    """The ModelSpec dict: ``model["spec"]`` or, as the embed provenance records it, ``model["model"]["spec"]``."""
    nested = model.get("model") if isinstance(model.get("model"), dict) else {}
    spec = model.get("spec") or nested.get("spec")
    return dict(spec) if isinstance(spec, dict) else None


def _model_identity(model: dict[str, Any]) -> str | None:
    """What must be equal for two versions to share a query encoder: model id, spec, fusion and dims."""
    if not model.get("model_id"):
        return None
    ident = {k: model.get(k) for k in ("model_id", "fusion", "modality_dims")}
    ident["spec"] = _model_spec(model)
    return json.dumps(ident, sort_keys=True, default=str)


def _model_summary(model: dict[str, Any]) -> dict[str, Any] | None:
    if not model:
        return None
    out = {k: model.get(k) for k in ("model_id", "random_init", "fusion", "modality_dims") if k in model}
    spec = _model_spec(model)
    if spec is not None:
        out["spec"] = spec
    return out


def _index_info(version: str, manifest: dict[str, Any], n: int, dim: int, loaded_at: float) -> dict[str, Any]:
    measured = manifest.get("measured") if isinstance(manifest.get("measured"), dict) else {}
    model = _model_dict(manifest)
    info = {
        "version": version,
        "index_key": manifest.get("index_key"),
        "n": int(n),
        "dim": int(dim),
        "model": _model_summary(model),
        "recall": measured.get("recall_at_k", manifest.get("recall")),
        "recall_k": measured.get("k"),
        "created_at": manifest.get("created_at"),
        "metric": manifest.get("metric"),
        "search_params": manifest.get("search_params"),
        "latency_ms": measured.get("latency_ms"),
        "loaded_at": _dt.datetime.fromtimestamp(loaded_at, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    return _clean(info)


# ---------------------------------------------------------------------------------------------------------------
# Snapshot + watcher
@dataclass(frozen=True)
class Snapshot:
    """One loaded version with its query encoder. Immutable: a reload builds a new one and swaps the reference."""

    index: Any  # index.search.ProductIndex
    version: str
    manifest: dict[str, Any]
    n: int
    dim: int
    model: str | None  # _model_identity(); None = no model recorded (text/image queries impossible)
    encoder: Any  # embedders.encoder.Encoder handed to the index, or None (lazy / none)
    encoder_ok: bool | None  # True: warmed up; False: failed (text/image -> 503); None: not tried
    info: dict[str, Any]
    loaded_at: float


class LoadRefused(Exception):
    """A version that loaded but must not be served (dimension mismatch, query encoder failure)."""


@dataclass
class ServiceConfig:
    index_root: str
    token: str | None = None
    max_k: int = DEFAULT_MAX_K
    max_batch: int = DEFAULT_MAX_BATCH
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S  # 0 = no watcher
    mmap: bool = False
    verify: bool = True
    warm_encoder: bool = True  # load + check the query encoder before a version goes live
    max_retry_backoff_s: float = 300.0
    omp_threads: int | None = None  # FAISS OpenMP threads per request thread (1 = no nested parallelism)
    loader: Callable[..., Any] | None = None  # (root, version, mmap, verify, encoder=None) -> ProductIndex


class IndexHolder:
    """Holds the live :class:`Snapshot` and reloads it when ``CURRENT`` changes."""

    def __init__(self, cfg: ServiceConfig, metrics: "Metrics"):
        self.cfg = cfg
        self.metrics = metrics
        self._snap: Snapshot | None = None
        self._loader = cfg.loader or _default_loader
        self._check_lock = threading.Lock()  # one load at a time (watcher thread vs an explicit check_now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._failed: dict[str, tuple[float, int]] = {}  # version -> (next retry, monotonic s; attempts)

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snap

    # -- loading
    def _encoder_for(self, model: dict[str, Any], ident: str | None, old: Snapshot | None):
        """The query encoder for ``model``: the live one when the model is the same, else a freshly loaded one."""
        if old is not None and old.encoder is not None and ident == old.model:
            return old.encoder
        from embedders.encoder import load_query_encoder

        spec = _model_spec(model)  # the embed provenance nests it: {"model": {"spec": {...}}}
        return load_query_encoder({"spec": spec} if spec is not None else model,
                                  limits={"max_pixels": self.cfg.max_image_pixels,
                                          "max_bytes": self.cfg.max_body_bytes})

    def _load(self, version: str) -> Snapshot:
        from index.store import VERSIONS_DIR, read_manifest

        t0 = time.monotonic()
        old = self._snap
        model = _model_dict(read_manifest(os.path.join(self.cfg.index_root, VERSIONS_DIR, version)))
        ident = _model_identity(model)
        encoder, encoder_ok, encoder_error = None, None, None
        if self.cfg.warm_encoder and ident is not None:
            try:
                encoder = self._encoder_for(model, ident, old)
            except Exception as e:  # noqa: BLE001 - judged below
                encoder_error = f"{type(e).__name__}: {str(e)[:300]}"
        ix = self._loader(self.cfg.index_root, version, self.cfg.mmap, self.cfg.verify, encoder=encoder)
        manifest = dict(ix.manifest or {})
        dim, n = int(ix.dim), int(ix.n)
        if n > 0:  # warm-up: builds the id -> position map (and an IVF direct map) before requests arrive
            ix.similar(ix.product_ids[0].as_py(), k=1)
        if encoder is not None:
            try:  # loads nothing new; checks the encoder + fusion produce vectors of this index's dim
                ix.query_vector(text="warm-up query")
                encoder_ok = True
            except Exception as e:  # noqa: BLE001
                encoder_error = f"{type(e).__name__}: {str(e)[:300]}"
        if encoder_error is not None:
            if old is not None and old.encoder_ok:  # serving it would break text/image search
                raise LoadRefused(f"query encoder for model {model.get('model_id')} failed: {encoder_error}")
            log.warning("version %s: query encoder unavailable (%s); text/image search will answer 503", version,
                        encoder_error)
            encoder_ok, encoder = False, None
        if old is not None and dim != old.dim and not (ident != old.model and encoder_ok):
            raise LoadRefused(f"dimension {dim} != {old.dim} of the live version {old.version} "
                              + ("with the same model" if ident == old.model else
                                 "and its new model's query encoder was not checked")
                              + "; refusing (clients' vectors would no longer fit)")
        now = time.time()
        snap = Snapshot(index=ix, version=version, manifest=manifest, n=n, dim=dim, model=ident, encoder=encoder,
                        encoder_ok=encoder_ok, info=_index_info(version, manifest, n, dim, now), loaded_at=now)
        log.info("loaded index version %s (n=%d, dim=%d, key=%s%s) in %.2f s", version, n, dim,
                 manifest.get("index_key"), ", new query model " + str(model.get("model_id"))
                 if old is not None and ident != old.model else "", time.monotonic() - t0)
        return snap

    def check_now(self) -> bool:
        """One poll of CURRENT; loads and swaps when it names another version. True when a swap happened."""
        with self._check_lock:
            try:
                target = read_current(self.cfg.index_root)
            except Exception as e:  # noqa: BLE001 - unreadable CURRENT: keep serving
                self._note_failure(None, f"cannot read CURRENT: {type(e).__name__}: {e}")
                return False
            old = self._snap
            if target is None or (old is not None and target == old.version):
                return False
            retry = self._failed.get(target)
            if retry is not None and time.monotonic() < retry[0]:
                return False
            try:
                snap = self._load(target)
            except Exception as e:  # noqa: BLE001 - a bad version never takes the service down
                self._note_failure(target, f"{type(e).__name__}: {str(e)[:500]}")
                return False
            self._snap = snap  # the swap: one reference assignment; requests hold the snapshot they started with
            self._failed.clear()
            self.last_error = None
            self.metrics.on_swap(snap, old)
            if old is not None:
                log.info("swapped index version %s -> %s", old.version, snap.version)
            return True

    def _note_failure(self, version: str | None, msg: str) -> None:
        self.metrics.reload_failures.inc()
        self.last_error = f"version {version}: {msg}" if version else msg
        if version is not None:
            _, attempts = self._failed.get(version, (0.0, 0))
            delay = min(self.cfg.max_retry_backoff_s, max(self.cfg.reload_interval_s, 1.0) * (2 ** attempts))
            # only the latest failing version is remembered: another name in CURRENT is tried at once
            self._failed = {version: (time.monotonic() + delay, attempts + 1)}
        live = self._snap.version if self._snap else None
        log.error("index reload failed (%s); still serving %s", self.last_error, live or "nothing")

    # -- watcher thread
    def start(self) -> None:
        if self.cfg.reload_interval_s <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="shopvec-index-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.reload_interval_s):
            try:
                self.check_now()
            except Exception:  # noqa: BLE001 - the watcher must never die
                log.exception("index watcher error")

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def require(self) -> Snapshot:
        snap = self._snap
        if snap is None:
            raise ApiError(503, "not_ready", "no index loaded yet" + (f": {self.last_error}" if self.last_error else
                                                                      f"; waiting for {self.cfg.index_root}/CURRENT"))
        return snap


def _valid_unicode(obj: Any) -> bool:
    """False when a string inside ``obj`` holds a lone surrogate (JSON allows "\\ud800"; UTF-8 does not)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(obj, dict):
        return all(_valid_unicode(k) and _valid_unicode(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_valid_unicode(v) for v in obj)
    if isinstance(obj, BaseModel):
        return _valid_unicode(obj.model_dump())
    return True


def _check_image_header(data: bytes, max_pixels: int) -> None:
    """Refuse a decompression bomb from its header alone (no pixel decoded), whatever encoder decodes it later."""
    from embedders.images import declared_size

    try:
        w, h = declared_size(data)
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images
        raise ApiError(422, "not_an_image", "image bytes are not a recognised image format") from None
    if w * h > max_pixels:
        raise ApiError(422, "decompression_bomb", f"declared size {w}x{h} = {w * h} pixels > the {max_pixels} cap")


# ---------------------------------------------------------------------------------------------------------------
# Metrics (one CollectorRegistry per app, so tests can build many apps)
class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("shopvec_http_requests_total", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("shopvec_http_request_duration_seconds", "HTTP request latency (server side)",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.index_info = Gauge("shopvec_index_info", "The live index version (value 1)",
                                ["version", "index_key", "model"], registry=r)
        self.index_size = Gauge("shopvec_index_vectors", "Vectors in the live index", registry=r)
        self.index_dim = Gauge("shopvec_index_dim", "Dimension of the live index", registry=r)
        self.index_loaded = Gauge("shopvec_index_loaded_timestamp_seconds", "When the live version was loaded",
                                  registry=r)
        self.ready = Gauge("shopvec_ready", "1 when an index is loaded", registry=r)
        self.reloads = Counter("shopvec_index_reloads_total", "Index versions loaded and swapped in (the first load "
                               "included)", registry=r)
        self.reload_failures = Counter("shopvec_index_reload_failures_total", "Index versions that failed to load or "
                                       "were refused (the old one kept serving)", registry=r)
        self._lock = threading.Lock()

    def on_swap(self, new: Snapshot, old: Snapshot | None) -> None:
        with self._lock:
            if old is not None:
                try:
                    self.index_info.remove(old.version, str(old.manifest.get("index_key")), _model_label(old))
                except KeyError:
                    pass
            self.index_info.labels(new.version, str(new.manifest.get("index_key")), _model_label(new)).set(1)
            self.index_size.set(new.n)
            self.index_dim.set(new.dim)
            self.index_loaded.set(new.loaded_at)
            self.ready.set(1)
            self.reloads.inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _model_label(s: Snapshot) -> str:
    return str(_model_dict(s.manifest).get("model_id") or "")


# ---------------------------------------------------------------------------------------------------------------
# ASGI middlewares (pure ASGI: cheaper than BaseHTTPMiddleware on the hot path)
class BodyLimitMiddleware:
    """413 when ``Content-Length`` or the streamed body exceeds ``max_bytes``; the body is buffered then replayed."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_error(send, 400, "invalid_request", "Content-Length is not an integer")
                if declared > self.max_bytes:
                    return await _send_error(send, 413, "body_too_large",
                                             f"request body is {declared} bytes > the {self.max_bytes}-byte cap")
                break
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            # bodies are not used by these routes; still capped while the app would read them
            return await self.app(scope, _capped_receive(receive, self.max_bytes), send)
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await _send_error(send, 413, "body_too_large",
                                         f"request body is over the {self.max_bytes}-byte cap")
            if body:
                chunks.append(body)
            if not msg.get("more_body", False):
                break
        replay = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        sent = False

        async def replay_receive():
            nonlocal sent
            if not sent:
                sent = True
                return replay
            return await receive()

        return await self.app(scope, replay_receive, send)


def _capped_receive(receive, max_bytes: int):
    seen = 0

    async def wrapped():
        nonlocal seen
        msg = await receive()
        if msg["type"] == "http.request":
            seen += len(msg.get("body", b""))
            if seen > max_bytes:
                raise ApiError(413, "body_too_large", f"request body is over the {max_bytes}-byte cap")
        return msg

    return wrapped


async def _send_error(send, status: int, code: str, message: str) -> None:
    resp = error_response(status, code, message)
    await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


class MetricsMiddleware:
    """Counts requests by route template + status and observes latency (unmatched paths share one label)."""

    def __init__(self, app, metrics: Metrics, routes_of: Callable[[], list]):
        self.app = app
        self.metrics = metrics
        self.routes_of = routes_of
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # bounded: routes x methods x statuses

    def _route_label(self, scope) -> str:
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return getattr(route, "path_format", None) or route.path
        for r in self.routes_of():
            try:
                match, _ = r.matches(scope)
            except Exception:  # noqa: BLE001
                continue
            if match != Match.NONE:  # FULL, or PARTIAL = the path matches but not the method (405)
                return getattr(r, "path_format", None) or getattr(r, "path", "<other>")
        return "<unmatched>"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = self._route_label(scope)
            method = scope.get("method", "")
            if method not in KNOWN_METHODS:  # label values must stay bounded whatever clients send
                method = "OTHER"
            key = (route, method, status)
            children = self._children.get(key)
            if children is None:  # labels() costs a lock + a dict lookup each: keep the children
                children = (self.metrics.requests.labels(route, method, str(status)),
                            self.metrics.latency.labels(route, method))
                self._children[key] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - t0)


_SIMILAR_PREFIX, _SIMILAR_SUFFIX = "/v1/products/", "/similar"
_DIGITS = frozenset("0123456789")


class SimilarFastPath:
    """The hot route, ``GET /v1/products/{id}/similar``, without FastAPI's routing and dependency machinery
    (~30% of the service's CPU per request). Only the plain, valid shape is taken: no root_path, authorised (the
    same Bearer parsing as ``HTTPBearer``), ``k`` a plain integer in range given at most once, only ``k`` and
    ``filter`` parameters. Anything else goes to the FastAPI route, which answers it (and every validation error)
    itself; both call the same handler, so answers are identical (tests compare them)."""

    def __init__(self, app, handler: Callable[[str, int, list[str]], Response], route: Any, max_k: int,
                 token: bytes | None):
        self.app = app
        self.handler = handler
        self.route = route
        self.max_k = max_k
        self.token = token
        self.handled = 0  # requests answered here (tests check the fast path is really taken)

    def _parse(self, scope) -> tuple[str, int, list[str]] | None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            return None
        path = scope["path"]
        if not (path.startswith(_SIMILAR_PREFIX) and path.endswith(_SIMILAR_SUFFIX)):
            return None
        pid = path[len(_SIMILAR_PREFIX):-len(_SIMILAR_SUFFIX)]
        if not 1 <= len(pid) <= 1024:
            return None
        if self.token is not None:
            header = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    if header is not None:
                        return None
                    header = value.decode("latin-1")
            if header is None:
                return None
            scheme, _, cred = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(cred.encode("utf-8", "surrogateescape"),
                                                                     self.token):
                return None
        k, filters = 10, []
        qs = scope.get("query_string", b"")
        if qs:
            from urllib.parse import parse_qsl

            seen_k = False
            for key, value in parse_qsl(qs.decode("latin-1"), keep_blank_values=True):
                if key == "k":
                    if seen_k or not value or len(value) > 7 or not set(value) <= _DIGITS or value[0] == "0":
                        return None
                    k, seen_k = int(value), True
                elif key == "filter":
                    filters.append(value)
                else:
                    return None
            if k > self.max_k:
                return None
        return pid, k, filters

    async def __call__(self, scope, receive, send):
        parsed = self._parse(scope)
        if parsed is None:
            return await self.app(scope, receive, send)
        from starlette.concurrency import run_in_threadpool

        scope["route"] = self.route  # the metrics label, as if routed
        self.handled += 1
        try:
            response = await run_in_threadpool(self.handler, *parsed)
        except ApiError as e:
            response = error_response(e.status, e.code, e.message, e.headers)
        await response(scope, receive, send)


# ---------------------------------------------------------------------------------------------------------------
# Schemas
class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable error class, e.g. unknown_product, k_too_large")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ResultItem(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"description": "product_id, score and the index's "
                                                                               "metadata columns (title, category, ...)"})
    product_id: str
    score: float


class QueryResponse(BaseModel):
    version: str = Field(description="the index version that answered")
    results: list[ResultItem]


class BatchItem(BaseModel):
    product_id: str
    results: Optional[list[ResultItem]] = None
    error: Optional[ErrorBody] = None


class BatchResponse(BaseModel):
    version: str
    results: list[BatchItem]


class IndexInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    version: str
    index_key: Optional[str] = None
    n: int
    dim: int
    model: Any = None
    recall: Any = None
    created_at: Optional[str] = None


class Status(BaseModel):
    status: str
    version: Optional[str] = None


class RangeFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lt: Optional[Union[float, str]] = None
    le: Optional[Union[float, str]] = None
    gt: Optional[Union[float, str]] = None
    ge: Optional[Union[float, str]] = None


FilterScalar = Union[Annotated[float, Field(allow_inf_nan=False)], int, bool, str]
FilterValue = Union[FilterScalar, list[FilterScalar], RangeFilter]
FILTER_DOC = ("metadata filters, JSON form: {\"field\": value | [values] | {\"lt\"|\"le\"|\"gt\"|\"ge\": x}}; "
              "all must hold")
FINITE = Annotated[float, Field(allow_inf_nan=False)]
ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 503)}


def _models(cfg: ServiceConfig):
    """Request models carrying this app's limits (so /openapi.json states them)."""
    KInt = Annotated[int, Field(ge=1, le=cfg.max_k, description=f"results wanted (1..{cfg.max_k})")]

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: Optional[Annotated[str, Field(min_length=1, max_length=cfg.max_text_chars)]] = None
        vector: Optional[Annotated[list[FINITE], Field(min_length=1, max_length=MAX_VECTOR_LEN)]] = Field(
            None, description="a query vector of the index's dimension (see GET /v1/index)")
        image: Optional[Annotated[str, Field(min_length=1)]] = Field(None, description="image file bytes, base64")
        product_id: Optional[Annotated[str, Field(min_length=1, max_length=1024)]] = None
        k: KInt = 10
        filters: Optional[dict[str, FilterValue]] = Field(None, description=FILTER_DOC)

        @model_validator(mode="after")
        def _exactly_one(self):
            given = [n for n in ("text", "vector", "image", "product_id") if getattr(self, n) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of text, vector, image, product_id (got {given or 'none'})")
            return self

    class BatchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        product_ids: Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]],
                               Field(min_length=1, max_length=cfg.max_batch)]
        k: KInt = 10
        filters: Optional[dict[str, FilterValue]] = Field(None, description=FILTER_DOC)

    return KInt, SearchRequest, BatchRequest


# ---------------------------------------------------------------------------------------------------------------
def create_app(index_root: str, token: str | None = None, max_k: int = DEFAULT_MAX_K,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, *, max_batch: int = DEFAULT_MAX_BATCH,
               max_text_chars: int = DEFAULT_MAX_TEXT_CHARS, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S, mmap: bool = False, verify: bool = True,
               warm_encoder: bool = True, load_on_start: bool = True, omp_threads: int | None = None,
               fast_path: bool = True, loader: Callable[..., Any] | None = None) -> FastAPI:
    """The query service app for ``index_root``. ``token`` None/empty = no auth. ``reload_interval_s`` 0 = no
    watcher (``app.state.holder.check_now()`` reloads by hand). The watcher thread runs while the app's lifespan
    does (uvicorn, or ``with TestClient(app)``)."""
    from contextlib import asynccontextmanager

    if max_k < 1 or max_batch < 1 or max_body_bytes < 1:
        raise ValueError("max_k, max_batch and max_body_bytes must be >= 1")
    if token is not None and token != token.strip():
        log.warning("the API token has leading/trailing whitespace, which HTTP clients cannot send; stripping it")
        token = token.strip()
    cfg = ServiceConfig(index_root=str(index_root), token=token or None, max_k=max_k, max_batch=max_batch,
                        max_body_bytes=max_body_bytes, max_text_chars=max_text_chars,
                        max_image_pixels=max_image_pixels, reload_interval_s=reload_interval_s, mmap=mmap,
                        verify=verify, warm_encoder=warm_encoder, omp_threads=omp_threads, loader=loader)
    metrics = Metrics()
    holder = IndexHolder(cfg, metrics)
    if load_on_start:
        holder.check_now()

    @asynccontextmanager
    async def lifespan(app):
        if holder.snapshot is None:
            holder.check_now()
        holder.start()
        try:
            yield
        finally:
            holder.stop()

    app = FastAPI(title="shopvec query service", version="1",
                  description="Similar products and text/image/vector search over the published FAISS index. "
                              "Errors: {\"error\": {\"code\", \"message\"}}.",
                  lifespan=lifespan)
    app.state.config = cfg
    app.state.holder = holder
    app.state.metrics = metrics

    KInt, SearchRequest, BatchRequest = _models(cfg)
    from embedders.errors import RecordError, UserError
    from index.filters import FilterError, parse_filters
    from index.search import UnknownProductError

    # -- auth
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <SHOPVEC_API_TOKEN>")
    expected = cfg.token.encode("utf-8") if cfg.token else None

    async def require_token(cred: Annotated[Optional[HTTPAuthorizationCredentials], Depends(bearer)]) -> None:
        given = cred.credentials.encode("utf-8", "surrogateescape") if cred is not None else b""
        # compare_digest on bytes: constant time for equal lengths, and no early exit on the first different byte
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)] if expected else []

    # -- error handlers
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        details, code, status = [], "invalid_request", 422
        for e in errs[:20]:
            loc = [x if isinstance(x, (str, int)) else str(x) for x in e.get("loc", ())]
            details.append({"loc": loc, "msg": str(e.get("msg", ""))[:300], "type": str(e.get("type", ""))})
            if e.get("type") == "json_invalid":
                code, status = "invalid_json", 400
            elif loc and loc[-1] == "k" and e.get("type") == "less_than_equal" and code == "invalid_request":
                code = "k_too_large"
            elif loc and loc[-1] == "product_ids" and e.get("type") == "too_long" and code == "invalid_request":
                code = "batch_too_large"
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(x) for x in first["loc"])
        message = f"{where}: {first['msg']}" if where else first["msg"]
        if len(details) > 1:
            message += f" (+{len(details) - 1} more)"
        return error_response(status, code, message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request"}.get(exc.status_code,
                                                                                         f"http_{exc.status_code}")
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in msg:  # e.g. a body that is not UTF-8
            code, msg = "invalid_json", "the request body is not valid JSON (UTF-8)"
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, code, msg, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal error; the service log has the details")

    # -- query helpers (run in the threadpool; every library error for bad input becomes a 4xx)
    def _filters(spec: Any):
        if spec is None or spec == [] or spec == {}:
            return None
        try:
            return parse_filters(spec)
        except FilterError as e:
            raise ApiError(422, "invalid_filter", str(e)[:500]) from None

    def _json_filters(filters: Optional[dict[str, Any]]):
        if filters is None:
            return None
        if not _valid_unicode(filters):
            raise ApiError(422, "invalid_filter", "filter names and values must be valid Unicode text")
        return _filters({k: (v.model_dump(exclude_none=True) if isinstance(v, RangeFilter) else v)
                         for k, v in filters.items()})

    def _lib_call(fn: Callable, *a, **kw):
        try:
            return fn(*a, **kw)
        except UnknownProductError as e:
            raise ApiError(404, "unknown_product", str(e)[:500]) from None
        except FilterError as e:
            raise ApiError(422, "invalid_filter", str(e)[:500]) from None
        except UserError as e:  # the library's own checks on queries (shape, NaN, zero, k, ...)
            raise ApiError(422, "invalid_request", str(e)[:500]) from None

    def _query_vector(snap: Snapshot, **kw):
        """Text/image -> index-space vector with the snapshot's query encoder."""
        if snap.model is None:
            raise ApiError(422, "unsupported_query", f"index version {snap.version} records no embedding model; "
                                                     f"only vector and product_id queries work on it")
        if snap.encoder_ok is False:
            raise ApiError(503, "encoder_unavailable", f"the query encoder of version {snap.version} failed to "
                                                       f"load; vector and product_id queries still work")
        try:
            return snap.index.query_vector(**kw)
        except RecordError as e:  # bad image (corrupt, not an image, bomb)
            raise ApiError(422, e.error, e.message) from None
        except UserError as e:
            raise ApiError(422, "invalid_request", str(e)[:500]) from None
        except Exception:  # noqa: BLE001 - the model failed, not the request
            log.exception("query encoder failed on version %s", snap.version)
            raise ApiError(503, "encoder_unavailable", f"the query encoder of version {snap.version} failed; "
                                                       f"vector and product_id queries still work") from None

    omp_local = threading.local()

    def _omp_once() -> None:
        """FAISS' OpenMP thread count is per calling thread: set it once in each threadpool thread."""
        if cfg.omp_threads and not getattr(omp_local, "done", False):
            import faiss

            faiss.omp_set_num_threads(int(cfg.omp_threads))
            omp_local.done = True

    def _page(snap: Snapshot, results: list) -> Response:
        return json_response({"version": snap.version, "results": results})

    def _similar_response(product_id: str, k: int, filter_exprs: list[str]) -> Response:
        """GET /v1/products/{product_id}/similar, shared by the FastAPI route and the fast path."""
        snap = holder.require()
        _omp_once()
        flt = _filters(filter_exprs)
        return _page(snap, _lib_call(snap.index.similar, product_id, k=k, filters=flt))

    # -- routes
    @app.get("/v1/products/{product_id:path}/similar", response_model=QueryResponse, responses=ERRORS,
             dependencies=auth, tags=["query"], summary="Products similar to one product (itself excluded)")
    def similar(product_id: Annotated[str, Path(min_length=1, max_length=1024)], k: Annotated[int, Query(
                    ge=1, le=cfg.max_k, description=f"results wanted (1..{cfg.max_k})")] = 10,
                filter: Annotated[list[str], Query(description="repeatable: field=value, field=v1,v2, field<x, "
                                                               "field<=x, field>x, field>=x")] = []):  # noqa: B006
        return _similar_response(product_id, k, filter)

    @app.post("/v1/search", response_model=QueryResponse, responses=ERRORS, dependencies=auth, tags=["query"],
              summary="Search by exactly one of text, vector, image (base64) or product_id")
    def search(req: SearchRequest):
        snap = holder.require()
        _omp_once()
        flt = _json_filters(req.filters)
        if req.product_id is not None:
            return _page(snap, _lib_call(snap.index.similar, req.product_id, k=req.k, filters=flt))
        if req.vector is not None:
            if len(req.vector) != snap.dim:
                raise ApiError(422, "dimension_mismatch", f"vector has {len(req.vector)} values; index version "
                                                          f"{snap.version} has dim {snap.dim}")
            import numpy as np

            with np.errstate(over="ignore"):
                vec = np.asarray(req.vector, dtype=np.float32)
            norm = float(np.linalg.norm(vec))
            if not math.isfinite(norm) or norm == 0.0:
                raise ApiError(422, "invalid_vector", "vector is all zeros or overflows float32")
            return _page(snap, _lib_call(snap.index.search, vec, k=req.k, filters=flt))
        if req.text is not None:
            if not req.text.strip():
                raise ApiError(422, "invalid_request", "text is blank")
            q = _query_vector(snap, text=req.text)
            return _page(snap, _lib_call(snap.index.search, q, k=req.k, filters=flt))
        try:
            data = base64.b64decode(req.image, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_image", "image is not valid base64") from None
        if not data:
            raise ApiError(422, "invalid_image", "image is empty")
        _check_image_header(data, cfg.max_image_pixels)
        q = _query_vector(snap, image=data)
        return _page(snap, _lib_call(snap.index.search, q, k=req.k, filters=flt))

    @app.post("/v1/similar:batch", response_model=BatchResponse, responses=ERRORS, dependencies=auth,
              tags=["query"], summary="Similar products for many product ids (unknown ids get a per-item error)")
    def similar_batch(req: BatchRequest):
        snap = holder.require()
        _omp_once()
        flt = _json_filters(req.filters)
        ids = list(req.product_ids)
        if len(ids) * req.k > MAX_BATCH_RESULTS:
            raise ApiError(422, "batch_too_large", f"{len(ids)} ids x k={req.k} = {len(ids) * req.k} results > "
                                                   f"{MAX_BATCH_RESULTS} per call; split the batch")
        known = [pid for pid in ids if pid in snap.index]
        lists = _lib_call(snap.index.similar_batch, known, k=req.k, filters=flt) if known else []
        found = dict(zip(known, lists))
        items = []
        for pid in ids:
            if pid in found:
                items.append({"product_id": pid, "results": found[pid]})
            else:
                items.append({"product_id": pid, "results": None,
                              "error": {"code": "unknown_product",
                                        "message": f"unknown product_id {pid!r} in index version {snap.version}"}})
        return json_response({"version": snap.version, "results": items})

    @app.get("/v1/index", response_model=IndexInfo, responses=ERRORS, dependencies=auth, tags=["index"],
             summary="The live index version")
    def index_info():
        return json_response(holder.require().info)

    @app.get("/healthz", response_model=Status, tags=["ops"], summary="The process is alive")
    async def healthz():
        return json_response({"status": "ok"})

    @app.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}}, tags=["ops"],
             summary="An index is loaded")
    async def readyz():
        snap = holder.require()
        return json_response({"status": "ready", "version": snap.version})

    @app.get("/metrics", dependencies=auth, tags=["ops"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}})
    def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if fast_path:
        similar_route = next(r for r in app.router.routes if getattr(r, "endpoint", None) is similar)
        app.add_middleware(SimilarFastPath, handler=_similar_response, route=similar_route, max_k=cfg.max_k,
                           token=expected)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes_of=lambda: app.router.routes)
    return app


# ---------------------------------------------------------------------------------------------------------------
# uvicorn factory (the CLI passes its settings through the environment so --workers N works)
ENV_CONFIG = "SHOPVEC_SERVE_CONFIG"
ENV_TOKEN = "SHOPVEC_API_TOKEN"


def app_from_env() -> FastAPI:
    """``uvicorn index.service:app_from_env --factory``: settings from ``$SHOPVEC_SERVE_CONFIG`` (JSON of
    :func:`create_app` keyword arguments, ``index_root`` required), token from ``$SHOPVEC_API_TOKEN``."""
    raw = os.environ.get(ENV_CONFIG)
    if not raw:
        raise RuntimeError(f"${ENV_CONFIG} is not set (JSON with at least index_root)")
    kw = json.loads(raw)
    root = kw.pop("index_root")
    level = kw.pop("log_level", None)
    if level and not logging.getLogger().handlers:  # a uvicorn worker process: the CLI's logging setup is not here
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
                            datefmt="%H:%M:%S")
    return create_app(root, token=os.environ.get(ENV_TOKEN) or None, **kw)
