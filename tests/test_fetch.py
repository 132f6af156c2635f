"""URI fetching: local paths, file://, http on loopback with timeout, retries, size cap; never a hang."""
from __future__ import annotations

import http.server
import threading
import time

import pytest

from embedders.errors import RecordError
from pipelines.fetch import fetch_many, fetch_uri

PAYLOAD = b"\x89PNG-not-really" * 10


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict = {}

    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        if self.path == "/ok.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/flaky.png" and _Handler.hits[self.path] < 2:
            self.send_response(503)
            self.end_headers()
        elif self.path == "/flaky.png":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/slow.png":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
        elif self.path == "/big.png":
            self.send_response(200)
            self.send_header("Content-Length", "999999999")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_ok_and_retry_on_transient(server):
    assert fetch_uri(f"{server}/ok.png", timeout=2) == PAYLOAD
    assert fetch_uri(f"{server}/flaky.png", timeout=2, retries=2) == PAYLOAD
    assert _Handler.hits["/flaky.png"] == 2


def test_http_errors_are_record_errors(server):
    with pytest.raises(RecordError) as e:
        fetch_uri(f"{server}/missing.png", timeout=2, retries=2)
    assert e.value.error == "fetch_failed" and "404" in e.value.message
    assert _Handler.hits["/missing.png"] == 1  # a 404 is not retried
    with pytest.raises(RecordError) as e:
        fetch_uri(f"{server}/big.png", timeout=2, max_bytes=1000)
    assert e.value.error == "image_too_large"


def test_http_timeout_never_hangs(server):
    t0 = time.monotonic()
    with pytest.raises(RecordError) as e:
        fetch_uri(f"{server}/slow.png", timeout=0.5, retries=1)
    assert e.value.error in ("fetch_timeout", "fetch_failed")
    assert time.monotonic() - t0 < 4.0


def test_local_paths(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(PAYLOAD)
    assert fetch_uri(str(p)) == PAYLOAD
    assert fetch_uri(f"file://{p}") == PAYLOAD
    with pytest.raises(RecordError) as e:
        fetch_uri(str(tmp_path / "nope.jpg"))
    assert e.value.error == "image_not_found"
    with pytest.raises(RecordError) as e:
        fetch_uri(str(p), max_bytes=5)
    assert e.value.error == "image_too_large"


def test_fetch_many_keeps_order_and_errors(server, tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"local")
    res = list(fetch_many([f"{server}/ok.png", str(tmp_path / "missing"), str(p)], 2, 0, 10_000, 2))
    assert res[0] == PAYLOAD and isinstance(res[1], RecordError) and res[2] == b"local"
