"""index.build: auto choice, every index family on small clustered data, tuning to a recall target."""
from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from embedders.errors import UserError
from index.build import (BuildConfig, build_index, choose_index_key, create_index, estimate_memory, nlist_for,
                         parse_memory)
from index.search import index_components
from tests.test_index_helpers import clustered, exact_neighbors, ids_for, recall

N, D = 3000, 32
IDS = ids_for(N)
GiB = 1 << 30


@pytest.fixture(scope="module")
def x():
    return clustered(N, D, clusters=30, seed=11)


def cfg(**kw):
    base = dict(recall_target=0.9, tuning_queries=200, fresh_queries=200, latency_queries=20, opq_iters=8)
    base.update(kw)
    return BuildConfig(**base)


def independent_recall(result, x, seed=123, m=150, k=10):
    q = np.random.default_rng(seed).choice(N, m, replace=False)
    got = [[r["product_id"] for r in rows] for rows in result.pix.similar_batch([IDS[i] for i in q], k=k)]
    assert all(IDS[i] not in g for i, g in zip(q, got))
    want = [[IDS[j] for j in row] for row in exact_neighbors(x, q, k)]
    return recall(got, want)


FAMILIES = [
    ("Flat", [faiss.IndexFlat]),
    ("HNSW16", [faiss.IndexHNSWFlat]),
    ("IVF32,Flat", [faiss.IndexIVFFlat]),
    ("IVF32,PQ8x4,RFlat", [faiss.IndexRefineFlat, faiss.IndexIVFPQ]),
    ("OPQ8,IVF32,PQ8x4,RFlat", [faiss.IndexRefineFlat, faiss.IndexPreTransform, faiss.IndexIVFPQ]),
]


@pytest.mark.parametrize("key,types", FAMILIES, ids=[k for k, _ in FAMILIES])
def test_every_family_reaches_target_and_matches_exact(x, key, types):
    res = build_index(x, IDS, cfg(index_key=key))
    comps = index_components(res.index)
    assert [type(c) for c in comps] == types
    assert not res.below_target and res.tuning["reached"]
    assert res.measured["recall_at_k"] >= 0.9
    assert independent_recall(res, x) >= 0.87          # vs brute force on products the tuner never chose
    assert res.measured["latency_ms"]["p50"] > 0 and res.measured["batched_qps"] > 0
    assert res.build["device"] == "cpu" and res.build["add_s"] >= 0
    if key == "Flat":
        assert res.search_params == {} and res.measured["recall_at_k"] == 1.0
    if "IVF" in key:
        assert 1 <= res.search_params["nprobe"] <= 32
    if "RFlat" in key:
        assert res.search_params["k_factor"] >= 1
    if key.startswith("HNSW"):
        assert res.search_params["efSearch"] >= 11


def test_tuning_picks_the_cheapest_setting_and_holds_on_a_fresh_sample():
    hard = clustered(N, D, clusters=300, seed=5, spread=1.5)
    target = 0.95
    res = build_index(hard, IDS, cfg(index_key="IVF64,Flat", recall_target=target, margin=0.01))
    nprobe = res.search_params["nprobe"]
    assert nprobe > 1, "data too easy to exercise tuning"
    tune = [e for e in res.tuning["evaluated"] if e["sample"] == "tune"]
    by_nprobe = {e["params"]["nprobe"]: e["recall"] for e in tune}
    assert by_nprobe[nprobe] >= target + 0.01
    cheaper = [v for v in by_nprobe if v < nprobe]
    assert cheaper and all(by_nprobe[v] < target + 0.01 for v in cheaper)   # nothing cheaper reaches the goal
    fresh = [e for e in res.tuning["evaluated"] if e["sample"] == "fresh"]
    assert fresh[-1]["params"] == {"nprobe": nprobe} and fresh[-1]["recall"] >= target
    assert res.measured["recall_at_k"] == fresh[-1]["recall"]
    # and it holds on yet another sample, measured independently of the tuner
    assert independent_recall(res, hard, seed=99, m=200) >= target - 0.02


def test_unreachable_target_fails_unless_allowed(x):
    with pytest.raises(UserError, match=r"recall target 0\.990 unreachable with index key IVF16,PQ4x4.*"
                                        r"--allow-below-target"):
        build_index(x, IDS, cfg(index_key="IVF16,PQ4x4", recall_target=0.99))
    res = build_index(x, IDS, cfg(index_key="IVF16,PQ4x4", recall_target=0.99, allow_below_target=True))
    assert res.below_target and res.measured["recall_at_k"] < 0.99
    assert res.search_params["nprobe"] == 16   # the best the index can do


def test_auto_choice_by_size_dimension_and_memory():
    key, reason = choose_index_key(5_000, 512, 8 * GiB)
    assert key == "Flat" and "exact" in reason
    key, reason = choose_index_key(1_000_000, 512, 64 * GiB)
    assert key == f"IVF{nlist_for(1_000_000)},Flat" and "nlist=2048" in reason
    assert nlist_for(1_000_000) == 2048 and nlist_for(100_000) == 512
    key, reason = choose_index_key(1_000_000, 512, 1 * GiB)
    assert key == "IVF2048,PQ128,RFlat" and "exceed the memory budget" in reason and "mmap" in reason
    assert estimate_memory("IVF2048,PQ128", 1_000_000, 512) <= 0.8 * GiB
    key, _ = choose_index_key(1_000_000, 512, 100 * (1 << 20))
    assert key.startswith("IVF2048,PQ") and key.endswith(",RFlat") and int(key.split(",")[1][2:]) < 128
    with pytest.raises(UserError, match="too small"):
        choose_index_key(10_000_000, 512, 1 << 20)
    assert choose_index_key(3000, 32)[0] == "Flat"  # default budget: available RAM


def test_auto_build_records_the_reason(x, caplog):
    caplog.set_level(logging.INFO, logger="index.build")
    res = build_index(x, IDS, cfg())
    assert res.index_key == "Flat" and "exact search" in res.choice_reason
    text = caplog.text
    assert "index key Flat for n=3000 dim=32" in text and "added 3,000/3,000 vectors (100%)" in text
    assert "exact ground truth" in text and "latency: p50" in text


def test_adding_in_batches_logs_progress(x, caplog):
    caplog.set_level(logging.INFO, logger="index.build")
    res = build_index(x, IDS, cfg(index_key="IVF16,Flat", add_batch=1000))
    adds = [r.getMessage() for r in caplog.records if r.getMessage().startswith("added ")]
    assert len(adds) == 3 and "added 1,000/3,000 vectors (33%)" in adds[0] and "vec/s" in adds[0]
    assert any(r.getMessage().startswith("assigned 3,000/3,000 vectors to lists") for r in caplog.records)
    assert res.build["train_size"] == min(N, 40 * 16)
    assert res.index.ntotal == N
    # the reserved, pre-assigned add is the same index as FAISS' own add
    plain = faiss.clone_index(res.index)
    plain.reset()
    plain.add(x)
    ivf = faiss.extract_index_ivf(res.index)
    assert [ivf.invlists.list_size(i) for i in range(16)] == \
        [faiss.extract_index_ivf(plain).invlists.list_size(i) for i in range(16)]
    plain.nprobe = res.index.nprobe = 4
    np.testing.assert_array_equal(plain.search(x[:100], 10)[1], res.index.search(x[:100], 10)[1])


@pytest.mark.parametrize("text,value", [("8GB", 8 * GiB), ("512MiB", 512 << 20), ("1.5g", int(1.5 * GiB)),
                                        ("100", 100), (" 2 TB ", 2 << 40)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["lots", "8 parsecs", "-1GB", "0"])
def test_parse_memory_rejects(text):
    with pytest.raises(UserError, match="--max-memory"):
        parse_memory(text)


def test_bad_index_keys(x):
    with pytest.raises(UserError, match="not a valid FAISS factory string"):
        create_index("IVF??,Flat", D, N)
    with pytest.raises(UserError, match="IVF4096 needs at least 4096 vectors"):
        create_index("IVF4096,Flat", D, N)
    with pytest.raises(UserError, match="IDMap"):
        create_index("IDMap,Flat", D, N)
    with pytest.raises(UserError, match="recall-target"):
        BuildConfig(recall_target=1.5)
    with pytest.raises(UserError, match="no vectors"):
        build_index(np.zeros((0, D), np.float32), [], cfg())
