"""Fetch image bytes from a URI: local path, ``file://``, ``http(s)://``, or anything Beam's FileSystems reads.

Every fetch has a timeout, bounded retries with backoff (transient errors only), and a size cap. A failure raises
:class:`RecordError` (-> dead letter, stage ``image``), never hangs the job: non-HTTP reads run in a worker thread
whose result is awaited with the timeout.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
import urllib.error
import urllib.request

from embedders.errors import RecordError

_POOL: cf.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(max_workers: int) -> cf.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != max_workers:  # noqa: SLF001
            _POOL = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="shopvec-fetch")
        return _POOL


def _read_capped(f, max_bytes: int, uri: str) -> bytes:
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RecordError("image_too_large", f"{uri}: more than max_bytes {max_bytes}")
    return data


def _fetch_once(uri: str, timeout: float, max_bytes: int) -> bytes:
    if uri.startswith(("http://", "https://")):
        req = urllib.request.Request(uri, headers={"User-Agent": "shopvec/0.1"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - scheme checked above
            length = resp.headers.get("Content-Length")
            if length and int(length) > max_bytes:
                raise RecordError("image_too_large", f"{uri}: Content-Length {length} > max_bytes {max_bytes}")
            return _read_capped(resp, max_bytes, uri)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" not in path:
        if not os.path.isfile(path):
            raise RecordError("image_not_found", f"{uri}: no such file")
        if os.path.getsize(path) > max_bytes:
            raise RecordError("image_too_large", f"{uri}: {os.path.getsize(path)} bytes > max_bytes {max_bytes}")
        with open(path, "rb") as f:
            return f.read()
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        return _read_capped(f, max_bytes, uri)


def _transient(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code in (408, 425, 429, 500, 502, 503, 504)
    return isinstance(e, (TimeoutError, ConnectionError, urllib.error.URLError, cf.TimeoutError))


def fetch_uri(uri: str, timeout: float = 10.0, retries: int = 2, max_bytes: int = 20_000_000,
              max_concurrency: int = 8) -> bytes:
    last: BaseException | None = None
    for attempt in range(retries + 1):
        fut = _pool(max_concurrency).submit(_fetch_once, uri, timeout, max_bytes)
        try:
            return fut.result(timeout=timeout + 1.0)
        except RecordError:
            raise
        except BaseException as e:  # noqa: BLE001 - classified below
            last = e
            if not _transient(e) or attempt == retries:
                break
            time.sleep(min(0.2 * 2 ** attempt, 2.0))
    if isinstance(last, urllib.error.HTTPError):
        raise RecordError("fetch_failed", f"{uri}: HTTP {last.code}")
    if isinstance(last, (cf.TimeoutError, TimeoutError)):
        raise RecordError("fetch_timeout", f"{uri}: no answer within {timeout}s after {retries + 1} attempts")
    raise RecordError("fetch_failed", f"{uri}: {type(last).__name__}: {str(last)[:160]}")


def fetch_many(uris: list[str], timeout: float, retries: int, max_bytes: int, max_concurrency: int):
    """Fetch ``uris`` concurrently (at most ``max_concurrency`` at once); yields bytes or RecordError per uri."""
    with cf.ThreadPoolExecutor(max_workers=max(1, min(max_concurrency, len(uris)))) as ex:
        futs = [ex.submit(fetch_uri, u, timeout, retries, max_bytes, max_concurrency) for u in uris]
        for f in futs:
            try:
                yield f.result()
            except RecordError as e:
                yield e
