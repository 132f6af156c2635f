"""Typed HTTP client for the shopvec query service (``index/service.py``).

::

    from index.client import ShopvecClient
    with ShopvecClient("http://127.0.0.1:8080", token="secret") as c:
        page = c.similar("P123", k=10, filters=["category=Shoes", "price<2000"])
        page.version, [(r.product_id, r.score, r.metadata.get("title")) for r in page.results]
        c.search(text="red running shoes", k=5)
        c.search(vector=[...], filters={"price": {"lt": 2000}})
        c.similar_batch(["P1", "P2"], k=10)
        c.index_info().version

``AsyncShopvecClient`` has the same methods as coroutines.

Every route of the service is a read, so a request is retried (``retries`` times, exponential back-off) on connection
errors, timeouts and 502/503/504 answers; any other 4xx/5xx raises at once. Errors:

- :class:`ShopvecConnectionError` — no answer after the retries (server down, wrong address, timeout);
- :class:`ShopvecHTTPError` with ``status``, ``code`` and ``message`` from the service's ``{"error": {...}}`` body;
  4xx are :class:`ShopvecClientError` (:class:`AuthError` 401, :class:`NotFoundError` 404 — its subclass
  :class:`UnknownProductError` for an unknown product id —, :class:`PayloadTooLargeError` 413,
  :class:`InvalidRequestError` 400/422), 5xx are :class:`ShopvecServerError` (:class:`NotReadyError` 503).
"""
from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union
from urllib.parse import quote

import httpx

__all__ = [
    "ShopvecClient", "AsyncShopvecClient", "Result", "QueryResult", "BatchItem", "BatchResult", "IndexInfo",
    "ShopvecError", "ShopvecConnectionError", "ShopvecHTTPError", "ShopvecClientError", "ShopvecServerError",
    "AuthError", "NotFoundError", "UnknownProductError", "InvalidRequestError", "PayloadTooLargeError",
    "NotReadyError",
]

# filters: grammar strings ("category=Shoes", "price<2000") or the JSON form ({"category": "Shoes", "price": {"lt": 2000}})
Filters = Union[Sequence[str], Mapping[str, Any], None]
RETRY_STATUSES = (502, 503, 504)


# ---------------------------------------------------------------------------------------------------------------
# Errors
class ShopvecError(Exception):
    """Base class of every error this client raises."""


class ShopvecConnectionError(ShopvecError):
    """The service could not be reached (after the retries)."""


class ShopvecHTTPError(ShopvecError):
    """The service answered with an error status; ``code``/``message`` come from its JSON error body."""

    def __init__(self, status: int, code: str, message: str, url: str = ""):
        super().__init__(f"HTTP {status} {code}: {message}" + (f" ({url})" if url else ""))
        self.status = status
        self.code = code
        self.message = message
        self.url = url


class ShopvecClientError(ShopvecHTTPError):
    """4xx: the request was wrong; retrying it unchanged will not help."""


class ShopvecServerError(ShopvecHTTPError):
    """5xx: the service failed or is not ready."""


class AuthError(ShopvecClientError):
    """401: missing or wrong bearer token."""


class NotFoundError(ShopvecClientError):
    """404: unknown route or resource."""


class UnknownProductError(NotFoundError, KeyError):
    """404 ``unknown_product``: the product id is not in the live index."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return ShopvecHTTPError.__str__(self)


class InvalidRequestError(ShopvecClientError):
    """400/422: bad parameters (k over the cap, wrong vector dimension, bad filter, bad image, ...)."""


class PayloadTooLargeError(ShopvecClientError):
    """413: the request body is over the service's cap."""


class NotReadyError(ShopvecServerError):
    """503: the service has no index loaded yet."""


def _error_class(status: int, code: str) -> type[ShopvecHTTPError]:
    if status == 401:
        return AuthError
    if status == 404:
        return UnknownProductError if code == "unknown_product" else NotFoundError
    if status == 413:
        return PayloadTooLargeError
    if status in (400, 422):
        return InvalidRequestError
    if status == 503:
        return NotReadyError
    if 400 <= status < 500:
        return ShopvecClientError
    return ShopvecServerError


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    code, message = f"http_{resp.status_code}", resp.reason_phrase or ""
    try:
        err = resp.json().get("error") or {}
        code = str(err.get("code") or code)
        message = str(err.get("message") or message)
    except Exception:  # not our JSON (a proxy's HTML page, ...)
        message = (resp.text or message)[:200]
    raise _error_class(resp.status_code, code)(resp.status_code, code, message, str(resp.request.url))


# ---------------------------------------------------------------------------------------------------------------
# Results
@dataclass(frozen=True)
class Result:
    product_id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)  # title, category, price, ... as the index carries them

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Result":
        meta = {k: v for k, v in d.items() if k not in ("product_id", "score")}
        return cls(product_id=str(d["product_id"]), score=float(d["score"]), metadata=meta)


@dataclass(frozen=True)
class QueryResult:
    version: str
    results: list[Result]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "QueryResult":
        return cls(version=str(d["version"]), results=[Result.from_json(r) for r in d["results"]])

    @property
    def product_ids(self) -> list[str]:
        return [r.product_id for r in self.results]


@dataclass(frozen=True)
class BatchItem:
    product_id: str
    results: list[Result] | None  # None when ``error`` is set
    error: dict[str, str] | None = None  # {"code": "unknown_product", "message": ...}


@dataclass(frozen=True)
class BatchResult:
    version: str
    results: list[BatchItem]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "BatchResult":
        items = []
        for it in d["results"]:
            res = it.get("results")
            items.append(BatchItem(product_id=str(it["product_id"]),
                                   results=None if res is None else [Result.from_json(r) for r in res],
                                   error=it.get("error")))
        return cls(version=str(d["version"]), results=items)


@dataclass(frozen=True)
class IndexInfo:
    version: str
    index_key: str | None
    n: int
    dim: int
    model: Any
    recall: Any
    created_at: str | None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "IndexInfo":
        return cls(version=str(d["version"]), index_key=d.get("index_key"), n=int(d["n"]), dim=int(d["dim"]),
                   model=d.get("model"), recall=d.get("recall"), created_at=d.get("created_at"), raw=dict(d))


# ---------------------------------------------------------------------------------------------------------------
# Request building (shared by the sync and async clients)
def _image_b64(image: bytes | str | os.PathLike) -> str:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(image)).decode("ascii")
    with open(image, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


def _search_body(text, vector, image, product_id, k, filters) -> dict[str, Any]:
    given = [name for name, v in (("text", text), ("vector", vector), ("image", image), ("product_id", product_id))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"search needs exactly one of text, vector, image, product_id; got {given or 'none'}")
    body: dict[str, Any] = {"k": int(k)}
    if text is not None:
        body["text"] = str(text)
    elif vector is not None:
        body["vector"] = [float(x) for x in (vector.tolist() if hasattr(vector, "tolist") else vector)]
    elif image is not None:
        body["image"] = _image_b64(image)
    else:
        body["product_id"] = str(product_id)
    if filters is not None:
        if not isinstance(filters, Mapping):
            raise TypeError("search() takes filters in the JSON form: {'field': value | [values] | {'lt': x}}")
        body["filters"] = dict(filters)
    return body


def _similar_request(product_id: str, k: int, filters: Filters) -> tuple[str, str, dict[str, Any]]:
    """(method, path, kwargs): grammar-string filters go in the query string (GET); a JSON-form dict goes through
    ``POST /v1/search`` with ``product_id`` so values holding commas or operators need no escaping."""
    if isinstance(filters, Mapping):
        return "POST", "/v1/search", {"json": _search_body(None, None, None, product_id, k, filters)}
    if isinstance(filters, str):
        filters = [filters]
    params: list[tuple[str, Any]] = [("k", int(k))] + [("filter", f) for f in (filters or [])]
    return "GET", f"/v1/products/{quote(str(product_id), safe='')}/similar", {"params": params}


def _headers(token: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    h = {"Accept": "application/json", "User-Agent": "shopvec-client/1"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    h.update(extra or {})
    return h


def _timeout(timeout: float | httpx.Timeout) -> httpx.Timeout:
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=min(timeout, 2.0))


# ---------------------------------------------------------------------------------------------------------------
class ShopvecClient:
    """Synchronous client; thread-safe (one pooled ``httpx.Client``); use as a context manager or call ``close()``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None, *,
                 timeout: float | httpx.Timeout = 5.0, retries: int = 2, backoff_s: float = 0.1,
                 headers: Mapping[str, str] | None = None, transport: httpx.BaseTransport | None = None):
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.retries = retries
        self.backoff_s = backoff_s
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=_headers(token, headers),
                                  timeout=_timeout(timeout), transport=transport)

    # -- plumbing
    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, path, **kw)
            except httpx.TransportError as e:  # connect/read errors and timeouts: every route is a read
                if attempt >= self.retries:
                    raise ShopvecConnectionError(f"{method} {self._http.base_url}{path}: {type(e).__name__}: {e} "
                                                 f"(after {attempt + 1} attempt(s))") from e
            else:
                if resp.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    _raise_for(resp)
                    return resp
            time.sleep(self.backoff_s * (2 ** attempt))
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ShopvecClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- API
    def similar(self, product_id: str, k: int = 10, filters: Filters = None) -> QueryResult:
        """Products like ``product_id`` (itself excluded)."""
        method, path, kw = _similar_request(product_id, k, filters)
        return QueryResult.from_json(self._request(method, path, **kw).json())

    def similar_batch(self, product_ids: Sequence[str], k: int = 10,
                      filters: Mapping[str, Any] | None = None) -> BatchResult:
        body: dict[str, Any] = {"product_ids": [str(p) for p in product_ids], "k": int(k)}
        if filters is not None:
            body["filters"] = dict(filters)
        return BatchResult.from_json(self._request("POST", "/v1/similar:batch", json=body).json())

    def search(self, *, text: str | None = None, vector: Sequence[float] | None = None,
               image: bytes | str | os.PathLike | None = None, product_id: str | None = None, k: int = 10,
               filters: Mapping[str, Any] | None = None) -> QueryResult:
        """Exactly one of ``text``, ``vector``, ``image`` (bytes or a file path) or ``product_id``."""
        body = _search_body(text, vector, image, product_id, k, filters)
        return QueryResult.from_json(self._request("POST", "/v1/search", json=body).json())

    def index_info(self) -> IndexInfo:
        return IndexInfo.from_json(self._request("GET", "/v1/index").json())

    def healthz(self) -> bool:
        return self._request("GET", "/healthz").status_code == 200

    def readyz(self) -> bool:
        """True when an index is loaded; False when the service answers 503 (no retry)."""
        try:
            resp = self._http.get("/readyz")
        except httpx.TransportError as e:
            raise ShopvecConnectionError(f"GET {self._http.base_url}/readyz: {type(e).__name__}: {e}") from e
        return resp.status_code == 200

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.readyz():
                    return
            except ShopvecConnectionError:
                pass
            if time.monotonic() > deadline:
                raise ShopvecConnectionError(f"{self._http.base_url} not ready after {timeout_s} s")
            time.sleep(poll_s)


class AsyncShopvecClient:
    """The same API as :class:`ShopvecClient`, as coroutines over ``httpx.AsyncClient``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None, *,
                 timeout: float | httpx.Timeout = 5.0, retries: int = 2, backoff_s: float = 0.1,
                 headers: Mapping[str, str] | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 limits: httpx.Limits | None = None):
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.retries = retries
        self.backoff_s = backoff_s
        kw: dict[str, Any] = {}
        if limits is not None:
            kw["limits"] = limits
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=_headers(token, headers),
                                       timeout=_timeout(timeout), transport=transport, **kw)

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self._http.request(method, path, **kw)
            except httpx.TransportError as e:
                if attempt >= self.retries:
                    raise ShopvecConnectionError(f"{method} {self._http.base_url}{path}: {type(e).__name__}: {e} "
                                                 f"(after {attempt + 1} attempt(s))") from e
            else:
                if resp.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    _raise_for(resp)
                    return resp
            await asyncio.sleep(self.backoff_s * (2 ** attempt))
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncShopvecClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def similar(self, product_id: str, k: int = 10, filters: Filters = None) -> QueryResult:
        method, path, kw = _similar_request(product_id, k, filters)
        return QueryResult.from_json((await self._request(method, path, **kw)).json())

    async def similar_batch(self, product_ids: Sequence[str], k: int = 10,
                            filters: Mapping[str, Any] | None = None) -> BatchResult:
        body: dict[str, Any] = {"product_ids": [str(p) for p in product_ids], "k": int(k)}
        if filters is not None:
            body["filters"] = dict(filters)
        return BatchResult.from_json((await self._request("POST", "/v1/similar:batch", json=body)).json())

    async def search(self, *, text: str | None = None, vector: Sequence[float] | None = None,
                     image: bytes | str | os.PathLike | None = None, product_id: str | None = None, k: int = 10,
                     filters: Mapping[str, Any] | None = None) -> QueryResult:
        body = _search_body(text, vector, image, product_id, k, filters)
        return QueryResult.from_json((await self._request("POST", "/v1/search", json=body)).json())

    async def index_info(self) -> IndexInfo:
        return IndexInfo.from_json((await self._request("GET", "/v1/index")).json())

    async def healthz(self) -> bool:
        return (await self._request("GET", "/healthz")).status_code == 200

    async def readyz(self) -> bool:
        try:
            resp = await self._http.get("/readyz")
        except httpx.TransportError as e:
            raise ShopvecConnectionError(f"GET {self._http.base_url}/readyz: {type(e).__name__}: {e}") from e
        return resp.status_code == 200
