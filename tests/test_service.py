"""Query service (index/service.py): every route and error shape, auth on/off, limits, metrics, hot reload
(in-flight requests, failed / refused versions, model change), and the CLI. Client and fuzz tests live in
test_service_client.py / test_service_fuzz.py; shared helpers in test_service_helpers.py.

Indexes are real: small versions built and published with index.build / index.store (exact Flat, 300 x 64,
the tiny seeded model recorded as their query model).
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading

import pytest

from tests.test_service_helpers import (DIM, N, TOKEN, auth, expected_similar, live_server, make_png, provenance,
                                        publish, wait_for)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def root_v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc_root") / "index"
    publish(root, "v1", seed=1)
    return root


@pytest.fixture(scope="module")
def client(root_v1):
    from fastapi.testclient import TestClient

    from index.service import create_app

    app = create_app(str(root_v1), token=TOKEN, reload_interval_s=0)
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c


def assert_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    if code is not None:
        assert err["code"] == code, body
    return err


# ------------------------------------------------------------------------------------------------- query routes
def test_similar_get_matches_library_and_excludes_self(client, root_v1):
    r = client.get("/v1/products/P000007/similar", params={"k": 5}, headers=auth())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "v1"
    res = body["results"]
    assert [x["product_id"] for x in res] == [x["product_id"] for x in expected_similar(root_v1, "P000007", 5)]
    assert len(res) == 5 and "P000007" not in {x["product_id"] for x in res}
    scores = [x["score"] for x in res]
    assert scores == sorted(scores, reverse=True)
    assert {"product_id", "score", "title", "category", "price", "in_stock"} <= set(res[0])
    # default k
    assert len(client.get("/v1/products/P000007/similar", headers=auth()).json()["results"]) == 10


def test_similar_get_filters_grammar(client):
    r = client.get("/v1/products/P000003/similar",
                   params=[("k", 8), ("filter", "category=Shoes,Mugs"), ("filter", "price<200")], headers=auth())
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 8  # enough products match: k results, not "top-k then filter"
    assert all(x["category"] in ("Shoes", "Mugs") and x["price"] < 200 for x in res)
    r = client.get("/v1/products/P000003/similar", params=[("k", 5), ("filter", "in_stock=true"),
                                                           ("filter", "price>=100")], headers=auth())
    assert r.status_code == 200, r.text
    assert all(x["in_stock"] is True and x["price"] >= 100 for x in r.json()["results"])


def test_product_id_with_slash_and_unicode_roundtrip(client):
    # unknown ids with odd characters still get a clean 404 (the path converter accepts '/')
    for pid in ("a/b", "Ｋｏｍｏｒｅｂｉ", "P 1", "%2F"):
        from urllib.parse import quote
        assert_error(client.get(f"/v1/products/{quote(pid, safe='')}/similar", headers=auth()), 404,
                     "unknown_product")


def test_search_by_vector_product_id_text_image(client, root_v1):
    from index.search import ProductIndex

    ix = ProductIndex.load(str(root_v1))
    vec = ix.vector("P000011").tolist()
    r = client.post("/v1/search", json={"vector": vec, "k": 3}, headers=auth())
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["product_id"] == "P000011" and abs(res[0]["score"] - 1.0) < 1e-4
    # JSON-form filters, range object
    r = client.post("/v1/search", json={"vector": vec, "k": 4, "filters": {"category": "Lamps",
                                                                            "price": {"ge": 50, "lt": 250}}},
                    headers=auth())
    assert r.status_code == 200, r.text
    assert all(x["category"] == "Lamps" and 50 <= x["price"] < 250 for x in r.json()["results"])
    # product_id == GET similar
    r1 = client.post("/v1/search", json={"product_id": "P000011", "k": 6}, headers=auth()).json()
    r2 = client.get("/v1/products/P000011/similar?k=6", headers=auth()).json()
    assert r1 == r2
    # text: the same results as the library with the model the manifest records
    r = client.post("/v1/search", json={"text": "red running shoes", "k": 5}, headers=auth())
    assert r.status_code == 200, r.text
    assert [x["product_id"] for x in r.json()["results"]] == \
        [x["product_id"] for x in ix.search(text="red running shoes", k=5)]
    # image (base64 PNG)
    png = make_png((200, 30, 30))
    r = client.post("/v1/search", json={"image": base64.b64encode(png).decode(), "k": 5}, headers=auth())
    assert r.status_code == 200, r.text
    assert [x["product_id"] for x in r.json()["results"]] == \
        [x["product_id"] for x in ix.search(image=png, k=5)]


def test_similar_batch_with_unknown_id(client, root_v1):
    r = client.post("/v1/similar:batch", json={"product_ids": ["P000001", "NOPE", "P000002"], "k": 4},
                    headers=auth())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "v1"
    items = body["results"]
    assert [i["product_id"] for i in items] == ["P000001", "NOPE", "P000002"]
    assert [x["product_id"] for x in items[0]["results"]] == \
        [x["product_id"] for x in expected_similar(root_v1, "P000001", 4)]
    assert items[1]["results"] is None and items[1]["error"]["code"] == "unknown_product"
    assert len(items[2]["results"]) == 4
    r = client.post("/v1/similar:batch", json={"product_ids": ["P000001"], "k": 3,
                                               "filters": {"category": ["Shoes"]}}, headers=auth())
    assert all(x["category"] == "Shoes" for x in r.json()["results"][0]["results"])


def test_index_health_ready(client):
    info = client.get("/v1/index", headers=auth()).json()
    assert info["version"] == "v1" and info["n"] == N and info["dim"] == DIM
    assert info["index_key"] == "Flat"
    assert info["recall"] == 1.0 and info["created_at"]
    assert info["model"]["model_id"].startswith("shopvec-tiny@random-init")
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "version": "v1"}
    spec = client.get("/openapi.json").json()
    assert {"/v1/products/{product_id}/similar", "/v1/search", "/v1/similar:batch", "/v1/index", "/healthz",
            "/readyz", "/metrics"} <= set(spec["paths"])
    k_param = [p for p in spec["paths"]["/v1/products/{product_id}/similar"]["get"]["parameters"]
               if p["name"] == "k"][0]
    assert k_param["schema"]["maximum"] == 1000


def test_metrics(client):
    client.get("/v1/products/P000001/similar", headers=auth())
    client.get("/v1/products/NOPE/similar", headers=auth())
    text = client.get("/metrics", headers=auth()).text
    assert 'shopvec_http_requests_total{method="GET",route="/v1/products/{product_id}/similar",status="200"}' in text
    assert 'shopvec_http_requests_total{method="GET",route="/v1/products/{product_id}/similar",status="404"}' in text
    assert 'shopvec_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/products/{product_id}/' \
           'similar"}' in text
    assert 'shopvec_index_info{index_key="Flat",model="shopvec-tiny@random-init(seed=0)",version="v1"} 1.0' in text
    assert f"shopvec_index_vectors {float(N)}" in text
    assert "shopvec_index_reloads_total 1.0" in text
    assert "shopvec_index_reload_failures_total 0.0" in text
    assert "P000001" not in text  # raw paths never become labels


def _fast_path_of(app):
    from index.service import SimilarFastPath

    node = app.middleware_stack
    while node is not None and not isinstance(node, SimilarFastPath):
        node = getattr(node, "app", None)
    return node


def test_similar_fast_path_answers_exactly_like_the_fastapi_route(root_v1):
    """The hot route's fast path (no FastAPI routing/dependencies) must be indistinguishable from the route."""
    from fastapi.testclient import TestClient

    from index.service import create_app

    fast = TestClient(create_app(str(root_v1), token=TOKEN, reload_interval_s=0, max_k=50))
    slow = TestClient(create_app(str(root_v1), token=TOKEN, reload_interval_s=0, max_k=50, fast_path=False))
    good = auth()["Authorization"]
    cases = [
        ("/v1/products/P000007/similar", [], good), ("/v1/products/P000007/similar?k=5", [], good),
        ("/v1/products/P000007/similar?k=50", [], good), ("/v1/products/P000007/similar?k=51", [], good),
        ("/v1/products/P000007/similar?k=0", [], good), ("/v1/products/P000007/similar?k=05", [], good),
        ("/v1/products/P000007/similar?k=+5", [], good), ("/v1/products/P000007/similar?k=", [], good),
        ("/v1/products/P000007/similar?k=abc", [], good), ("/v1/products/P000007/similar?k=3&k=4", [], good),
        ("/v1/products/P000007/similar?k=4&filter=category%3DShoes&filter=price%3C300", [], good),
        ("/v1/products/P000007/similar?filter=category", [], good),
        ("/v1/products/P000007/similar?filter=nope%3D1", [], good),
        ("/v1/products/P000007/similar?filter=", [], good),
        ("/v1/products/P000007/similar?other=1", [], good),
        ("/v1/products/NOPE/similar", [], good), ("/v1/products/a%2Fb/similar", [], good),
        ("/v1/products/%E2%9C%93/similar", [], good), ("/v1/products//similar", [], good),
        ("/v1/products/" + "x" * 1025 + "/similar", [], good),
        ("/v1/products/P000007/similar", [], None), ("/v1/products/P000007/similar", [], "Bearer wrong"),
        ("/v1/products/P000007/similar", [], "bearer " + TOKEN), ("/v1/products/P000007/similar", [], good + " "),
        ("/v1/products/P000007/similar", [], "Basic " + TOKEN),
        ("/v1/products/P000007/similar", [("authorization", "Bearer wrong")], good),
    ]
    for path, extra, authz in cases:
        headers = [("authorization", authz)] if authz else []
        headers += extra
        rf, rs = fast.get(path, headers=headers), slow.get(path, headers=headers)
        assert (rf.status_code, rf.json()) == (rs.status_code, rs.json()), (path, authz, extra)
        assert rf.headers["content-type"] == rs.headers["content-type"]
    handled = _fast_path_of(fast.app).handled
    assert 5 <= handled < len(cases)  # the plain cases took the fast path, the odd ones went to FastAPI
    assert _fast_path_of(slow.app) is None
    text = fast.get("/metrics", headers=auth()).text
    assert 'route="/v1/products/{product_id}/similar",status="200"' in text


# --------------------------------------------------------------------------------------------------------- errors
BAD = [
    # (method, path, kwargs, status, code)
    ("get", "/v1/products/NOPE/similar", {}, 404, "unknown_product"),
    ("post", "/v1/search", {"json": {"product_id": "NOPE"}}, 404, "unknown_product"),
    ("get", "/v1/nothing-here", {}, 404, "not_found"),
    ("delete", "/v1/index", {}, 405, "method_not_allowed"),
    ("get", "/v1/products/P000001/similar?k=1001", {}, 422, "k_too_large"),
    ("get", "/v1/products/P000001/similar?k=0", {}, 422, "invalid_request"),
    ("get", "/v1/products/P000001/similar?k=ten", {}, 422, "invalid_request"),
    ("post", "/v1/search", {"json": {"product_id": "P000001", "k": 5000}}, 422, "k_too_large"),
    ("post", "/v1/similar:batch", {"json": {"product_ids": ["P000001"], "k": 1001}}, 422, "k_too_large"),
    ("post", "/v1/similar:batch", {"json": {"product_ids": []}}, 422, "invalid_request"),
    ("post", "/v1/similar:batch", {"json": {"product_ids": ["P000001"] * 101, "k": 1000}}, 422, "batch_too_large"),
    ("post", "/v1/search", {"json": {"vector": [0.1] * (DIM - 1)}}, 422, "dimension_mismatch"),
    ("post", "/v1/search", {"json": {"vector": [0.0] * DIM}}, 422, "invalid_vector"),
    ("post", "/v1/search", {"content": '{"vector": [NaN' + ", 0.1" * (DIM - 1) + "]}"}, 422, "invalid_request"),
    ("post", "/v1/search", {"content": '{"vector": [1e39' + ", 0.1" * (DIM - 1) + "]}"}, 422, "invalid_vector"),
    ("post", "/v1/search", {"json": {}}, 422, "invalid_request"),
    ("post", "/v1/search", {"json": {"text": "shoes", "product_id": "P000001"}}, 422, "invalid_request"),
    ("post", "/v1/search", {"json": {"text": "shoes", "colour": "red"}}, 422, "invalid_request"),
    ("post", "/v1/search", {"json": {"text": "   "}}, 422, "invalid_request"),
    ("post", "/v1/search", {"json": {"text": "x" * 2001}}, 422, "invalid_request"),
    ("post", "/v1/search", {"json": ["not", "an", "object"]}, 422, "invalid_request"),
    ("post", "/v1/search", {"content": "{not json"}, 400, "invalid_json"),
    ("post", "/v1/search", {"content": b'{"text": "\xff\xfe"}'}, 400, "invalid_json"),
    ("post", "/v1/search", {"content": '{"text": "\\ud800"}'}, 422, "invalid_request"),
    ("post", "/v1/search", {"content": '{"product_id": "P000001", "filters": {"title": "\\ud800"}}'}, 422,
     "invalid_filter"),
    ("post", "/v1/search", {"content": '{"product_id": "P000001", "filters": {"\\udfff": 1}}'}, 422,
     "invalid_filter"),
    ("get", "/v1/products/P000001/similar?filter=category", {}, 422, "invalid_filter"),
    ("get", "/v1/products/P000001/similar?filter=colour=red", {}, 422, "invalid_filter"),
    ("get", "/v1/products/P000001/similar?filter=category<3", {}, 422, "invalid_filter"),
    ("get", "/v1/products/P000001/similar?filter=price<cheap", {}, 422, "invalid_filter"),
    ("post", "/v1/search", {"json": {"product_id": "P000001", "filters": {"price": {"lt": "abc"}}}}, 422,
     "invalid_filter"),
    ("post", "/v1/search", {"json": {"product_id": "P000001", "filters": {"price": {"below": 3}}}}, 422,
     "invalid_request"),
    ("post", "/v1/search", {"json": {"product_id": "P000001", "filters": {"nope": "x"}}}, 422, "invalid_filter"),
    ("post", "/v1/search", {"json": {"image": "@@not-base64@@"}}, 422, "invalid_image"),
    ("post", "/v1/search", {"json": {"image": base64.b64encode(b"<html>404</html>").decode()}}, 422,
     "not_an_image"),
]


@pytest.mark.parametrize("method,path,kwargs,status,code", BAD, ids=[f"{b[0]} {b[1][:40]} {b[4]}" for b in BAD])
def test_error_shapes(client, method, path, kwargs, status, code):
    headers = auth()
    if "content" in kwargs:
        headers["content-type"] = "application/json"
    assert_error(getattr(client, method)(path, headers=headers, **kwargs), status, code)


def test_image_limits(client):
    from pipelines.demo_data import bomb_png

    # 5000 x 5000 = 25 M pixels: under PIL's and the library's default caps, over the service's 16 M cap
    for data in (bomb_png(5000, 5000), bomb_png(8000, 8000)):
        r = client.post("/v1/search", json={"image": base64.b64encode(data).decode()}, headers=auth())
        assert assert_error(r, 422, "decompression_bomb")["message"].startswith("declared size")
    png = make_png((10, 200, 10))
    r = client.post("/v1/search", json={"image": base64.b64encode(png[: len(png) // 2]).decode()}, headers=auth())
    assert_error(r, 422, "corrupt_image")


def test_auth_required_on_v1_and_metrics(client):
    for method, path, kw in [("get", "/v1/products/P000001/similar", {}), ("post", "/v1/search",
                                                                          {"json": {"text": "x"}}),
                             ("post", "/v1/similar:batch", {"json": {"product_ids": ["P000001"]}}),
                             ("get", "/v1/index", {}), ("get", "/metrics", {})]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}):
            r = getattr(client, method)(path, headers=headers, **kw)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
    # probes stay open
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    # and the token is accepted
    assert client.get("/v1/index", headers=auth()).status_code == 200


def test_auth_off(root_v1):
    from fastapi.testclient import TestClient

    from index.service import create_app

    for token in (None, ""):
        with TestClient(create_app(str(root_v1), token=token, reload_interval_s=0)) as c:
            assert c.get("/v1/products/P000001/similar").status_code == 200
            assert c.get("/metrics").status_code == 200
            assert "security" not in json.dumps(c.get("/openapi.json").json()["paths"])


def test_body_cap_content_length_and_streamed(root_v1):
    from fastapi.testclient import TestClient

    from index.service import create_app

    with TestClient(create_app(str(root_v1), token=TOKEN, reload_interval_s=0, max_body_bytes=2000,
                               max_k=20, max_batch=3)) as c:
        big = {"vector": [0.123456789] * 400}
        assert_error(c.post("/v1/search", json=big, headers=auth()), 413, "body_too_large")

        def chunks():  # no Content-Length: chunked transfer, the streamed size is counted
            for _ in range(10):
                yield b" " * 500

        r = c.post("/v1/search", content=chunks(), headers={**auth(), "content-type": "application/json"})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert_error(r, 413, "body_too_large")
        # under the cap: fine; the configured k and batch caps apply
        assert c.post("/v1/search", json={"product_id": "P000001", "k": 20}, headers=auth()).status_code == 200
        assert_error(c.post("/v1/search", json={"product_id": "P000001", "k": 21}, headers=auth()), 422,
                     "k_too_large")
        assert_error(c.post("/v1/similar:batch", json={"product_ids": ["P000001"] * 4}, headers=auth()), 422,
                     "batch_too_large")
        text = c.get("/metrics", headers=auth()).text
        assert 'route="/v1/search",status="413"' in text


def test_not_ready_until_published(tmp_path):
    from fastapi.testclient import TestClient

    from index.service import create_app

    root = tmp_path / "index"
    root.mkdir()
    with TestClient(create_app(str(root), token=TOKEN, reload_interval_s=0)) as c:
        assert c.get("/healthz").status_code == 200
        assert_error(c.get("/readyz"), 503, "not_ready")
        assert_error(c.get("/v1/index", headers=auth()), 503, "not_ready")
        assert_error(c.get("/v1/products/P000001/similar", headers=auth()), 503, "not_ready")
        publish(root, "v1", seed=1)
        assert c.app.state.holder.check_now() is True
        assert c.get("/readyz").json() == {"status": "ready", "version": "v1"}
        assert "shopvec_ready 1.0" in c.get("/metrics", headers=auth()).text


# ----------------------------------------------------------------------------------------------------- hot reload
def test_hot_reload_under_load_zero_failures(tmp_path):
    """A live server (uvicorn, loopback) under concurrent load while v2 is published and then rolled back:
    zero failed requests, every response consistent with the version it names, both swaps seen."""
    import httpx

    from index import store
    from index.service import create_app

    root = tmp_path / "index"
    publish(root, "v1", seed=1)
    app = create_app(str(root), token=TOKEN, reload_interval_s=0.1)
    pids = [f"P{i:06d}" for i in range(0, 40, 3)]
    truth = {"v1": {p: [x["product_id"] for x in expected_similar(root, p, 5, "v1")] for p in pids}}
    failures: list[str] = []
    seen: dict[str, int] = {}
    stop = threading.Event()

    def hammer(seed: int):
        i = seed
        with httpx.Client(base_url=base, headers=auth(), timeout=10) as h:
            while not stop.is_set():
                pid = pids[i % len(pids)]
                i += 1
                try:
                    r = h.get(f"/v1/products/{pid}/similar", params={"k": 5})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    body = r.json()
                    v = body["version"]
                    seen[v] = seen.get(v, 0) + 1
                    got = [x["product_id"] for x in body["results"]]
                    if v in truth and truth[v][pid] != got:
                        failures.append(f"{v} {pid}: {got} != {truth[v][pid]}")
                except Exception as e:  # noqa: BLE001
                    failures.append(f"{type(e).__name__}: {e}")

    with live_server(app) as base:
        threads = [threading.Thread(target=hammer, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: seen.get("v1", 0) > 20, 20)
            publish(root, "v2", seed=2)
            truth["v2"] = {p: [x["product_id"] for x in expected_similar(root, p, 5, "v2")] for p in pids}
            assert truth["v2"] != truth["v1"]
            wait_for(lambda: seen.get("v2", 0) > 20, 20)
            v2_count = seen["v2"]
            store.rollback(root, "v1")
            wait_for(lambda: httpx.get(f"{base}/readyz").json()["version"] == "v1", 20)
            before = seen["v1"]
            wait_for(lambda: seen["v1"] > before + 20, 20)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        metrics = httpx.get(f"{base}/metrics", headers=auth()).text
    assert failures == [], failures[:5]
    assert seen["v2"] >= v2_count > 20
    assert "shopvec_index_reloads_total 3.0" in metrics  # v1, v2, v1 again
    assert "shopvec_index_reload_failures_total 0.0" in metrics


class _SlowIndex:
    """Wraps a real ProductIndex; similar() for one product blocks until released (to hold a request in flight)."""

    def __init__(self, ix, entered: threading.Event, release: threading.Event, slow_id: str):
        self._ix, self._entered, self._release, self._slow_id = ix, entered, release, slow_id

    def __getattr__(self, name):
        return getattr(self._ix, name)

    def __contains__(self, pid):
        return pid in self._ix

    def similar(self, product_id, k=10, filters=None):
        if product_id == self._slow_id:
            self._entered.set()
            assert self._release.wait(30)
        return self._ix.similar(product_id, k=k, filters=filters)


def test_in_flight_request_finishes_on_old_version(tmp_path):
    from fastapi.testclient import TestClient

    from index.service import _default_loader, create_app

    root = tmp_path / "index"
    publish(root, "v1", seed=1)
    entered, release = threading.Event(), threading.Event()

    def loader(root_, version, mmap, verify, encoder=None):
        return _SlowIndex(_default_loader(root_, version, mmap, verify, encoder=encoder), entered, release,
                          "P000007")

    app = create_app(str(root), token=TOKEN, reload_interval_s=0, loader=loader)
    out = {}
    with TestClient(app) as c:
        t = threading.Thread(target=lambda: out.update(r=c.get("/v1/products/P000007/similar?k=5",
                                                               headers=auth())))
        t.start()
        assert entered.wait(20)
        publish(root, "v2", seed=2)
        assert app.state.holder.check_now() is True  # swapped while the request is still running on v1
        assert c.get("/v1/index", headers=auth()).json()["version"] == "v2"
        release.set()
        t.join(20)
        r = out["r"]
        assert r.status_code == 200
        assert r.json()["version"] == "v1"
        assert [x["product_id"] for x in r.json()["results"]] == \
            [x["product_id"] for x in expected_similar(root, "P000007", 5, "v1")]
        r2 = c.get("/v1/products/P000007/similar?k=5", headers=auth()).json()
        assert r2["version"] == "v2"
        assert [x["product_id"] for x in r2["results"]] == \
            [x["product_id"] for x in expected_similar(root, "P000007", 5, "v2")]


def test_failed_and_refused_versions_keep_the_old_one(tmp_path):
    from fastapi.testclient import TestClient

    from index import store
    from index.service import create_app

    root = tmp_path / "index"
    publish(root, "v1", seed=1)
    app = create_app(str(root), token=TOKEN, reload_interval_s=0)
    holder = app.state.holder
    with TestClient(app) as c:
        # 1. a corrupted version (a truncated file after publish)
        publish(root, "v2", seed=2)
        ids_file = root / store.VERSIONS_DIR / "v2" / store.IDS_FILE
        ids_file.write_bytes(ids_file.read_bytes()[:-7])
        assert holder.check_now() is False
        assert "ids.parquet" in holder.last_error
        assert c.get("/readyz").json()["version"] == "v1"
        assert c.get("/v1/products/P000001/similar", headers=auth()).json()["version"] == "v1"
        assert holder.check_now() is False  # not retried at once (back-off), not counted again
        # 2. a version whose query model does not produce vectors of its dimension is refused
        publish(root, "v3", seed=3, dim=32)
        assert holder.check_now() is False
        assert "query encoder" in holder.last_error and "(32,)" in holder.last_error
        assert c.get("/v1/index", headers=auth()).json()["version"] == "v1"
        text = c.get("/metrics", headers=auth()).text
        assert "shopvec_index_reload_failures_total 2.0" in text
        assert "shopvec_index_reloads_total 1.0" in text
        # 3. a good version goes live
        publish(root, "v4", seed=4)
        assert holder.check_now() is True
        assert c.get("/v1/index", headers=auth()).json()["version"] == "v4"
        assert holder.last_error is None


def test_dimension_change_without_model_change_refused(tmp_path):
    from fastapi.testclient import TestClient

    from index.service import create_app

    root = tmp_path / "index"
    publish(root, "v1", seed=1, with_model=False)
    app = create_app(str(root), token=TOKEN, reload_interval_s=0)
    with TestClient(app) as c:
        publish(root, "v2", seed=2, dim=32, with_model=False)
        assert app.state.holder.check_now() is False
        assert "dimension 32 != 64" in app.state.holder.last_error
        assert c.get("/v1/index", headers=auth()).json()["dim"] == DIM
        assert c.post("/v1/search", json={"vector": [0.1] * DIM}, headers=auth()).json()["version"] == "v1"
        assert "shopvec_index_reload_failures_total 1.0" in c.get("/metrics", headers=auth()).text


def test_model_change_swaps_query_encoder(tmp_path):
    from fastapi.testclient import TestClient

    from embedders.encoder import load_query_encoder
    from index.search import ProductIndex
    from index.service import create_app

    root = tmp_path / "index"
    publish(root, "v1", seed=1, model_seed=0)
    app = create_app(str(root), token=TOKEN, reload_interval_s=0)
    holder = app.state.holder
    query = {"text": "blue ceramic mug", "k": 8}
    with TestClient(app) as c:
        enc1 = holder.snapshot.encoder
        assert enc1 is not None and holder.snapshot.encoder_ok is True
        r1 = c.post("/v1/search", json=query, headers=auth()).json()
        # same model: the encoder is reused
        publish(root, "v2", seed=2, model_seed=0)
        assert holder.check_now() is True
        assert holder.snapshot.encoder is enc1
        # another model (a fine-tune / upgrade): a new encoder comes with the index
        publish(root, "v3", seed=2, model_seed=1)
        assert holder.check_now() is True
        enc3 = holder.snapshot.encoder
        assert enc3 is not enc1
        assert enc3.loaded.model_id.endswith("(seed=1)")
        r3 = c.post("/v1/search", json=query, headers=auth()).json()
        # ground truth: the v3 index queried through the encoder of the model v3 records (seed 1)
        enc_seed1 = load_query_encoder({"spec": provenance(model_seed=1)["model"]["spec"]})
        want = ProductIndex.load(str(root), "v3", encoder=enc_seed1).search(text=query["text"], k=8)
        assert r3["version"] == "v3"
        assert [x["product_id"] for x in r3["results"]] == [x["product_id"] for x in want]
        assert [round(x["score"], 4) for x in r3["results"]] == [round(x["score"], 4) for x in want]
        assert r3["results"] != r1["results"]
        # a new model with another dimension (concat fusion: 3 x 64) is accepted: its encoder was checked
        publish(root, "v4", seed=4, model_seed=2, dim=3 * DIM, fusion="concat")
        assert holder.check_now() is True, holder.last_error
        info = c.get("/v1/index", headers=auth()).json()
        assert info["version"] == "v4" and info["dim"] == 3 * DIM
        r4 = c.post("/v1/search", json=query, headers=auth())
        assert r4.status_code == 200 and len(r4.json()["results"]) == 8
        assert_error(c.post("/v1/search", json={"vector": [0.1] * DIM}, headers=auth()), 422, "dimension_mismatch")


def test_version_without_model_serves_vectors_not_text(tmp_path):
    from fastapi.testclient import TestClient

    from index.service import create_app

    root = tmp_path / "index"
    publish(root, "v1", seed=1, with_model=False)
    with TestClient(create_app(str(root), token=TOKEN, reload_interval_s=0)) as c:
        assert c.get("/v1/products/P000001/similar", headers=auth()).status_code == 200
        assert c.post("/v1/search", json={"vector": [0.1] * DIM}, headers=auth()).status_code == 200
        assert_error(c.post("/v1/search", json={"text": "shoes"}, headers=auth()), 422, "unsupported_query")
        png = base64.b64encode(make_png((1, 2, 3))).decode()
        assert_error(c.post("/v1/search", json={"image": png}, headers=auth()), 422, "unsupported_query")


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cli_serve_bad_invocations(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["serve", "--index", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--index", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shopvec serve: error:") and "--wait-for-index" in err
    assert main(["serve", "--index", str(tmp_path / "empty"), "--wait-for-index", "--port", "0"]) == 2
    assert main(["serve", "--index", str(tmp_path / "empty"), "--wait-for-index", "--max-k", "0"]) == 2
    assert main(["serve", "--index", str(tmp_path / "empty"), "--wait-for-index", "--workers", "0"]) == 2


def test_cli_serve_end_to_end(root_v1):
    """`shopvec serve` in its own process: binds 127.0.0.1 only, token from $SHOPVEC_API_TOKEN, SIGTERM exits."""
    import signal
    import socket

    import psutil

    from index.client import AuthError, ShopvecClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SHOPVEC_API_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "-q", "serve", "--index", str(root_v1),
                             "--port", str(port), "--reload-interval", "0.5", "--no-warm-encoder"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with ShopvecClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout=10) as c:
            c.wait_ready(60)
            page = c.similar("P000001", k=3, filters=["category=Shoes"])
            assert page.version == "v1" and len(page.results) == 3
            assert all(r.metadata["category"] == "Shoes" for r in page.results)
        with ShopvecClient(f"http://127.0.0.1:{port}", timeout=10) as anon, pytest.raises(AuthError):
            anon.similar("P000001")
        listening = [c for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the captured SIGTERM (exit status -15 / 143)
    assert proc.returncode in (0, -signal.SIGTERM), out.decode(errors="replace")[-2000:]
    assert b"Traceback" not in out
