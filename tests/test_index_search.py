"""index.search.ProductIndex: similar (self excluded), filters that still return k, vector/text/image search."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pyarrow as pa
import pytest

import index.search as search_mod
from embedders.errors import UserError
from index.build import BuildConfig, create_index, train_and_add
from index.search import ProductIndex, UnknownProductError
from tests.test_index_helpers import catalog_metadata, clustered, exact_neighbors, ids_for, provenance, recall

N, D = 3000, 32
IDS = ids_for(N)
FAMILIES = {
    "Flat": {},
    "HNSW16": {"efSearch": 64},
    "IVF32,Flat": {"nprobe": 8},
    "IVF32,PQ8x4,RFlat": {"nprobe": 8, "k_factor": 16},
}


@pytest.fixture(scope="module")
def data():
    x = clustered(N, D, clusters=30, seed=3)
    meta = pa.table({"product_id": ids_for(N), **catalog_metadata(N)})
    return x, meta


def make_index(key, data, params, **kwargs):
    x, meta = data
    cfg = BuildConfig(index_key=key, threads=1)
    with search_mod.omp_threads(1):
        built = train_and_add(create_index(key, D, N, cfg), x, key, cfg)
    manifest = {"version": "vtest", "index_key": key, "search_params": params, "model": provenance(D),
                "model_id": "test/tiny-seeded", "random_init": True}
    return ProductIndex(built["index"], meta.column("product_id"), meta, manifest, **kwargs)


@pytest.fixture(scope="module")
def indexes(data):
    return {key: make_index(key, data, params) for key, params in FAMILIES.items()}


def test_similar_excludes_self_sorted_with_metadata(indexes, data):
    x, meta = data
    ix = indexes["Flat"]
    res = ix.similar("P00042", k=10)
    assert len(res) == 10
    assert all(r["product_id"] != "P00042" for r in res)
    scores = [r["score"] for r in res]
    assert scores == sorted(scores, reverse=True)
    truth = exact_neighbors(x, np.array([42]), 10)[0]
    assert [r["product_id"] for r in res] == [IDS[j] for j in truth]
    first = res[0]
    assert set(first) >= {"product_id", "score", "title", "category", "price", "brand", "launched", "rating_mean"}
    json.dumps(res, allow_nan=False)  # NaN -> None, dates -> ISO strings
    assert any(r["rating_mean"] is None for r in ix.similar("P00007", k=50))


@pytest.mark.parametrize("key", list(FAMILIES))
def test_similar_recall_against_exact_for_every_family(indexes, data, key):
    x, _ = data
    ix = indexes[key]
    q = np.random.default_rng(0).choice(N, 100, replace=False)
    got = [[r["product_id"] for r in rows] for rows in ix.similar_batch([IDS[i] for i in q], k=10)]
    want = [[IDS[j] for j in row] for row in exact_neighbors(x, q, 10)]
    assert all(IDS[i] not in g for i, g in zip(q, got))
    assert recall(got, want) >= 0.9


def test_unknown_product_is_a_clear_key_error(indexes):
    with pytest.raises(UnknownProductError) as ei:
        indexes["Flat"].similar("NOPE-1", k=5)
    assert isinstance(ei.value, KeyError)
    assert "unknown product_id 'NOPE-1'" in str(ei.value) and "vtest" in str(ei.value)
    with pytest.raises(KeyError):
        indexes["Flat"].similar_batch(["P00001", "NOPE-2"])
    assert "P00001" in indexes["Flat"] and "NOPE" not in indexes["Flat"]


@pytest.mark.parametrize("key", list(FAMILIES))
@pytest.mark.parametrize("exact_max", [4096, 0])  # 0: force the FAISS ID-selector path even for tiny subsets
def test_filters_return_k_when_at_least_k_match(indexes, data, key, exact_max, monkeypatch):
    monkeypatch.setattr(search_mod, "EXACT_SUBSET_MAX", exact_max)
    x, meta = data
    ix = indexes[key]
    ix._mask_cache.clear()
    cats = np.array(meta.column("category").to_pylist())
    prices = np.array(meta.column("price").to_pylist())
    # broad filter (~20%): every result matches, k results, good recall against exact over the subset
    q = np.arange(0, 60, 3)
    rows = ix.similar_batch([IDS[i] for i in q], k=10, filters={"category": "Shoes"})
    allowed = cats == "Shoes"
    assert all(len(r) == 10 and all(h["category"] == "Shoes" for h in r) for r in rows)
    want = [[IDS[j] for j in row] for row in exact_neighbors(x, q, 10, allowed)]
    assert recall([[h["product_id"] for h in r] for r in rows], want) >= 0.85
    # very selective filter: exactly 12 products match -> still k=10 results, all matching
    cheap = np.sort(prices)[11]
    sel = ix.similar("P00005", k=10, filters=[f"price<={cheap}"])
    assert len(sel) == 10 and all(h["price"] <= cheap for h in sel)
    # combined string filters, membership and ranges
    res = ix.search(vector=x[9], k=10, filters=["category=Bags,Watches", "price>=1000", "price<4000"])
    assert len(res) == 10
    assert all(h["category"] in ("Bags", "Watches") and 1000 <= h["price"] < 4000 for h in res)
    # fewer than k match -> all of them, never padding
    few = np.sort(prices)[3]
    got = ix.similar("P00005", k=10, filters={"price": {"le": few}})
    n_match = int((prices <= few).sum()) - int(prices[5] <= few)
    assert len(got) == n_match and all(h["price"] <= few for h in got)
    # nothing matches
    assert ix.similar("P00005", k=10, filters={"price": {"lt": 0}}) == []


def test_filter_errors_surface_as_user_errors(indexes):
    with pytest.raises(UserError, match="unknown filter field 'colour'"):
        indexes["Flat"].similar("P00001", filters="colour=red")
    assert indexes["Flat"].count("category=Shoes") == N // 5


def test_search_by_vector_and_batch(indexes, data):
    x, _ = data
    ix = indexes["IVF32,Flat"]
    res = ix.search(vector=x[17].tolist(), k=5)
    assert res[0]["product_id"] == "P00017" and res[0]["score"] == pytest.approx(1.0, abs=1e-4)
    batch = ix.search_batch(x[[17, 18]], k=5)
    assert [r[0]["product_id"] for r in batch] == ["P00017", "P00018"]
    with pytest.raises(UserError, match="exactly one of"):
        ix.search(k=5)
    with pytest.raises(UserError, match="exactly one of"):
        ix.search(vector=x[0], text="shoes")
    with pytest.raises(UserError, match=r"expected \(32,\)"):
        ix.search(vector=np.ones(7))
    with pytest.raises(UserError, match="NaN"):
        ix.search(vector=np.full(D, np.nan))
    with pytest.raises(UserError, match="k must be a positive integer"):
        ix.search(vector=x[0], k=0)


class FakeEncoder:
    """Deterministic stand-in for embedders.encoder: texts/images map to stored product vectors."""

    def __init__(self, x):
        self.x = x
        self.calls = []

    def encode_texts(self, texts):
        self.calls.append(("text", texts))
        return self.x[[int(t.split()[-1]) for t in texts]]

    def encode_images(self, images):
        self.calls.append(("image", images))
        return self.x[[int(b.decode()) for b in images]]


def test_text_and_image_search_with_injected_encoder(data, tmp_path):
    x, _ = data
    enc = FakeEncoder(x)
    fused = []
    ix = make_index("Flat", data, {}, encoder=enc, fuse=lambda m, v: fused.append(m) or v)
    assert ix.search(text="item 21", k=3)[0]["product_id"] == "P00021"
    img = tmp_path / "q.jpg"
    img.write_bytes(b"33")
    assert ix.search(image=str(img), k=3)[0]["product_id"] == "P00033"
    assert ix.search(image=b"34", k=3)[0]["product_id"] == "P00034"
    assert fused == ["text", "image", "image"]
    assert enc.calls[0] == ("text", ["item 21"]) and enc.calls[1] == ("image", [b"33"])
    with pytest.raises(UserError, match="cannot read"):
        ix.search(image=str(tmp_path / "missing.jpg"))
    with pytest.raises(UserError, match="empty"):
        ix.search(text="   ")


def test_text_search_uses_the_manifest_model_through_embedders(data, monkeypatch):
    """The real wiring: embedders.encoder.load_query_encoder(model) + embedders.fusion.query_vector(...)."""
    x, _ = data
    seen = {}

    def load_query_encoder(model):
        seen["model"] = model
        return FakeEncoder(x)

    def query_vector(modality, vec, fusion_cfg, modality_dims):
        seen["fusion"] = (modality, vec.shape, fusion_cfg, modality_dims)
        return vec

    monkeypatch.setitem(sys.modules, "embedders.encoder", types.SimpleNamespace(load_query_encoder=load_query_encoder))
    monkeypatch.setitem(sys.modules, "embedders.fusion", types.SimpleNamespace(query_vector=query_vector))
    ix = make_index("Flat", data, {})
    assert ix.search(text="item 5", k=2)[0]["product_id"] == "P00005"
    assert seen["model"]["model_id"] == "test/tiny-seeded" and seen["model"]["random_init"] is True
    assert seen["fusion"] == ("text", (D,), provenance(D)["fusion"], provenance(D)["modality_dims"])
    ix2 = make_index("Flat", data, {})
    ix2._manifest.pop("model")
    ix2._manifest.pop("model_id")
    with pytest.raises(UserError, match="records no embedding model"):
        ix2.search(text="item 5")


def test_short_ivf_results_are_widened_not_truncated(data, monkeypatch):
    """nprobe=1 over a filter whose matches sit in other lists: still k results (widening, then exact)."""
    monkeypatch.setattr(search_mod, "EXACT_SUBSET_MAX", 0)
    x, meta = data
    ix = make_index("IVF32,Flat", data, {"nprobe": 1})
    far = np.argsort(x @ x[0])[:15]  # the 15 products least similar to P00000
    flt = {"product_id": [IDS[i] for i in far]}
    res = ix.similar("P00000", k=10, filters=flt)
    assert len(res) == 10
    truth = exact_neighbors(x, np.array([0]), 10, np.isin(np.arange(N), far))[0]
    assert {r["product_id"] for r in res} == {IDS[j] for j in truth}
