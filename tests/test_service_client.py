"""index/client.py against a live service on 127.0.0.1: every method, typed results, errors, retries, async."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.test_service_helpers import DIM, TOKEN, expected_similar, live_server, make_png, publish

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("client_root") / "index"
    publish(r, "v1", seed=5)
    return r


@pytest.fixture(scope="module")
def base_url(root):
    from index.service import create_app

    app = create_app(str(root), token=TOKEN, reload_interval_s=0, max_body_bytes=200_000)
    with live_server(app) as url:
        yield url


def test_sync_client_every_method(base_url, root, tmp_path):
    from index.client import BatchResult, IndexInfo, QueryResult, Result, ShopvecClient

    with ShopvecClient(base_url, token=TOKEN) as c:
        assert c.healthz() is True and c.readyz() is True
        page = c.similar("P000010", k=4)
        assert isinstance(page, QueryResult) and page.version == "v1"
        assert page.product_ids == [x["product_id"] for x in expected_similar(root, "P000010", 4)]
        r0 = page.results[0]
        assert isinstance(r0, Result) and isinstance(r0.score, float)
        assert {"title", "category", "price"} <= set(r0.metadata) and "score" not in r0.metadata
        # filters: grammar strings go in the query string, the JSON form through POST /v1/search
        f1 = c.similar("P000010", k=5, filters=["category=Mugs", "price<300"])
        f2 = c.similar("P000010", k=5, filters={"category": "Mugs", "price": {"lt": 300}})
        assert f1 == f2 and all(r.metadata["category"] == "Mugs" for r in f1.results)
        assert c.similar("P000010", k=5, filters="category=Mugs").product_ids == \
            c.similar("P000010", k=5, filters={"category": "Mugs"}).product_ids
        # search: text, vector (list or numpy), image (bytes or path), product id
        assert len(c.search(text="red shoes", k=3).results) == 3
        from index.search import ProductIndex

        v = ProductIndex.load(str(root)).vector("P000020")
        assert c.search(vector=v, k=1).product_ids == ["P000020"]
        assert c.search(vector=v.tolist(), k=1).product_ids == ["P000020"]
        png = make_png()
        path = tmp_path / "q.png"
        path.write_bytes(png)
        assert c.search(image=png, k=3) == c.search(image=str(path), k=3)
        assert c.search(product_id="P000010", k=4) == page
        batch = c.similar_batch(["P000010", "NOPE"], k=4)
        assert isinstance(batch, BatchResult) and batch.version == "v1"
        assert [r.product_id for r in batch.results[0].results] == page.product_ids
        assert batch.results[1].results is None and batch.results[1].error["code"] == "unknown_product"
        info = c.index_info()
        assert isinstance(info, IndexInfo) and info.version == "v1" and info.dim == DIM and info.n == 300
        with pytest.raises(ValueError):
            c.search(text="a", product_id="b")
        with pytest.raises(ValueError):
            c.search()


def test_sync_client_errors(base_url):
    from index.client import (AuthError, InvalidRequestError, NotFoundError, PayloadTooLargeError,
                              ShopvecClientError, ShopvecClient, ShopvecHTTPError, UnknownProductError)

    with ShopvecClient(base_url, token=TOKEN) as c:
        with pytest.raises(UnknownProductError) as ei:
            c.similar("NOPE")
        e = ei.value
        assert isinstance(e, KeyError) and isinstance(e, NotFoundError) and isinstance(e, ShopvecClientError)
        assert e.status == 404 and e.code == "unknown_product" and "NOPE" in str(e)
        with pytest.raises(InvalidRequestError) as ei:
            c.similar("P000001", k=100_000)
        assert ei.value.code == "k_too_large" and ei.value.status == 422
        with pytest.raises(InvalidRequestError) as ei:
            c.search(vector=[0.5] * (DIM + 1))
        assert ei.value.code == "dimension_mismatch"
        with pytest.raises(InvalidRequestError) as ei:
            c.similar("P000001", filters=["colour=red"])
        assert ei.value.code == "invalid_filter" and "colour" in ei.value.message
        with pytest.raises(PayloadTooLargeError):
            c.search(image=b"\x89PNG" + b"\x00" * 300_000)
    with ShopvecClient(base_url, token="wrong") as bad, pytest.raises(AuthError) as ei:
        bad.index_info()
    assert isinstance(ei.value, ShopvecHTTPError) and ei.value.code == "unauthorized"


def test_retries_on_connection_errors_and_503_only():
    from index.client import ShopvecClient, ShopvecConnectionError, UnknownProductError

    calls = []
    ok = {"version": "v9", "results": [{"product_id": "B", "score": 0.5, "title": "b"}]}

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= 2:
            raise httpx.ConnectError("connection refused", request=request)
        if len(calls) == 3:
            return httpx.Response(503, json={"error": {"code": "not_ready", "message": "loading"}})
        return httpx.Response(200, json=ok)

    with ShopvecClient("http://svc", retries=3, backoff_s=0.001, transport=httpx.MockTransport(flaky)) as c:
        page = c.similar("A")
    assert len(calls) == 4 and page.product_ids == ["B"] and page.results[0].metadata == {"title": "b"}

    calls.clear()
    with ShopvecClient("http://svc", retries=1, backoff_s=0.001, transport=httpx.MockTransport(flaky)) as c:
        with pytest.raises(ShopvecConnectionError, match="after 2 attempt"):
            c.similar("A")
    assert len(calls) == 2

    calls.clear()

    def not_found(request):
        calls.append(1)
        return httpx.Response(404, json={"error": {"code": "unknown_product", "message": "no A"}})

    with ShopvecClient("http://svc", retries=3, transport=httpx.MockTransport(not_found)) as c:
        with pytest.raises(UnknownProductError):
            c.similar("A")
    assert calls == [1]  # a 4xx is never retried

    def proxy_html(request):
        return httpx.Response(502, text="<html>bad gateway</html>")

    from index.client import ShopvecServerError

    with ShopvecClient("http://svc", retries=0, transport=httpx.MockTransport(proxy_html)) as c:
        with pytest.raises(ShopvecServerError) as ei:
            c.index_info()
    assert ei.value.status == 502 and "bad gateway" in ei.value.message


def test_connection_refused_is_a_clear_error():
    import socket

    from index.client import ShopvecClient, ShopvecConnectionError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ShopvecClient(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01, timeout=2) as c:
        with pytest.raises(ShopvecConnectionError, match="ConnectError"):
            c.similar("P1")


def test_async_client(base_url, root):
    from index.client import AsyncShopvecClient, UnknownProductError

    async def go():
        async with AsyncShopvecClient(base_url, token=TOKEN) as c:
            pages = await asyncio.gather(*[c.similar(f"P{i:06d}", k=3) for i in range(5)])
            with pytest.raises(UnknownProductError):
                await c.similar("NOPE")
            info = await c.index_info()
            batch = await c.similar_batch(["P000001"], k=2)
            text = await c.search(text="lamp", k=2)
            return pages, info, batch, text, await c.readyz()

    pages, info, batch, text, ready = asyncio.run(go())
    assert [p.product_ids for p in pages] == [[x["product_id"] for x in expected_similar(root, f"P{i:06d}", 3)]
                                              for i in range(5)]
    assert info.version == "v1" and len(batch.results[0].results) == 2 and len(text.results) == 2 and ready
