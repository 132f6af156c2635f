"""The sharded FAISS build (``pipelines/index_build.py``): same index as the single-process build, on every runner.

* for the same trained index, the shards added by Beam workers and merged in shard order give exactly the
  single-process index: the same inverted lists (ids and codes, in the same order) and the same search results,
  distances included -- on each runner of the portability matrix (tests/test_portability.py);
* end to end, ``build_and_publish_sharded`` (what ``shopvec index --runner ...`` runs) trains on the same seeded
  sample as ``index.build.build_and_publish``, so it publishes the same index, tuned to the same parameters;
* on-disk inverted lists (``index.ivfdata``): the streaming merge writes the very bytes of FAISS' own
  ``merge_ondisk``, and a published on-disk version loads through ``ProductIndex.load`` and answers queries.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from embedders.errors import UserError
from tests.test_portability import RUNNERS

N, DIM, FILES, ROW_GROUP = 6000, 32, 3, 500


def _mixture(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim))
    x = (centres[rng.integers(0, 200, n)] + 1.5 * rng.standard_normal((n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write(root, x: np.ndarray, files: int = FILES, ids=None, row_group: int = ROW_GROUP) -> str:
    from index.embeddings_io import write_embeddings

    per = -(-len(x) // files)
    for f in range(files):
        lo, hi = f * per, min(len(x), (f + 1) * per)
        write_embeddings(os.path.join(root, "embeddings", f"part-{f:05d}.parquet"),
                         ids[lo:hi] if ids is not None else [f"P{i:06d}" for i in range(lo, hi)], x[lo:hi],
                         metadata={"category": [f"c{i % 7}" for i in range(lo, hi)]},
                         provenance={"model_id": "synthetic", "random_init": True}, row_group_size=row_group)
    return str(root)


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("sharded-emb"), _mixture(N, DIM))


@pytest.fixture(scope="module")
def vectors(emb_dir):
    from index.embeddings_io import read_embeddings

    return read_embeddings(emb_dir).vectors


def _trained(emb_dir, key: str) -> bytes:
    """``key`` trained on a seeded sample, with the index library's (short) k-means / OPQ iteration settings."""
    from index.build import BuildConfig, create_index
    from pipelines import index_build as ib

    plan = ib.plan_shards(ib.embeddings_files(emb_dir), 10 ** 9)
    index = create_index(key, DIM, N, BuildConfig(kmeans_iters=10, opq_iters=5))
    index.train(ib.sample_vectors(plan, 3000, seed=1))
    return ib.serialize(index)


def _lists(index) -> list[tuple[np.ndarray, np.ndarray]]:
    import faiss

    ivf = faiss.extract_index_ivf(index)
    il = ivf.invlists
    out = []
    for j in range(ivf.nlist):
        n = il.list_size(j)
        ids = faiss.rev_swig_ptr(il.get_ids(j), n).copy() if n else np.zeros(0, np.int64)
        codes = faiss.rev_swig_ptr(il.get_codes(j), n * il.code_size).copy() if n else np.zeros(0, np.uint8)
        out.append((ids, codes))
    return out


def _assert_same_index(single, sharded, queries: np.ndarray) -> None:
    import faiss

    assert sharded.ntotal == single.ntotal
    a, b = _lists(single), _lists(sharded)
    assert sum(len(i) for i, _ in a) == single.ntotal
    for j, ((ia, ca), (ib_, cb)) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(ia, ib_, err_msg=f"ids of list {j}")
        np.testing.assert_array_equal(ca, cb, err_msg=f"codes of list {j}")
    for nprobe in (1, 4, 32):
        faiss.extract_index_ivf(single).nprobe = nprobe
        faiss.extract_index_ivf(sharded).nprobe = nprobe
        D1, I1 = single.search(queries, 10)
        D2, I2 = sharded.search(queries, 10)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_array_equal(D1, D2)


# ------------------------------------------------------------------------------------------------ planning
def test_plan_numbers_vectors_like_read_embeddings(emb_dir, vectors):
    from pipelines import index_build as ib

    plan = ib.plan_shards(ib.embeddings_files(emb_dir), rows_per_shard=1200)
    assert plan.num_rows == N and plan.dim == DIM
    assert [s.shard for s in plan.shards] == list(range(len(plan.shards)))
    assert plan.shards[0].start == 0 and plan.shards[-1].stop == N
    for a, b in zip(plan.shards, plan.shards[1:]):
        assert a.stop == b.start  # contiguous
    assert all(s.rows >= 1200 or s is plan.shards[-1] for s in plan.shards)
    got = np.concatenate([ib.read_piece(p, DIM) for s in plan.shards for p in s.pieces])
    np.testing.assert_array_equal(got, vectors)  # FAISS id i = row i of read_embeddings (ids.parquet)


# ------------------------------------------------------------------------------------------------ same trained index
@pytest.mark.parametrize("runner", list(RUNNERS))
def test_sharded_build_equals_single_process_on_every_runner(emb_dir, vectors, runner, tmp_path):
    from pipelines import index_build as ib

    key = "IVF32,Flat"
    trained = _trained(emb_dir, key)
    single = ib.deserialize(trained)
    single.add(vectors)
    name, args = RUNNERS[runner]
    b = ib.build_sharded(emb_dir, key, str(tmp_path / "work"), runner=name, beam_args=args, rows_per_shard=1000,
                         trained=trained)
    assert b.report["shards"] == 6 and b.report["add"]["metrics"]["vectors_added"] == N
    assert sum(v for k, v in b.report["add"]["metrics"].items() if k.startswith("shards.process.")) == 6
    if "--direct_running_mode=multi_processing" in args:
        assert str(os.getpid()) not in " ".join(b.report["add"]["workers"])  # added in worker processes
    _assert_same_index(single, b.index, vectors[::37])


def test_sharded_build_equals_single_process_opq_pq(emb_dir, vectors, tmp_path):
    """A pre-transform (OPQ rotation) and PQ codes go through serialisation and merging unchanged too."""
    from pipelines import index_build as ib

    key = "OPQ8,IVF32,PQ8x4"  # 4-bit codes: the same code paths, a training that takes seconds on 2 cores
    trained = _trained(emb_dir, key)
    single = ib.deserialize(trained)
    single.add(vectors)
    b = ib.build_sharded(emb_dir, key, str(tmp_path / "work"), runner="FnApiRunner", rows_per_shard=1000,
                         trained=trained)
    _assert_same_index(single, b.index, vectors[::37])


def test_on_disk_merge_writes_faiss_merge_ondisk_bytes(emb_dir, vectors, tmp_path):
    from pipelines import index_build as ib

    key = "IVF32,SQ8"
    trained = _trained(emb_dir, key)
    single = ib.deserialize(trained)
    single.add(vectors)
    name, args = RUNNERS["portable-loopback"]
    b = ib.build_sharded(emb_dir, key, str(tmp_path / "work"), runner=name, beam_args=args, rows_per_shard=1000,
                         trained=trained, on_disk_dir=str(tmp_path / "od"))
    assert ib.has_ondisk_lists(b.index) and b.ivfdata.endswith(ib.IVFDATA_NAME)
    _assert_same_index(single, b.index, vectors[::37])
    shards = [s["path"] for s in json.loads(open(tmp_path / "work" / "shards" / "_done.json").read())]
    ref = ib.merge_on_disk(trained, shards, str(tmp_path / "ref.ivfdata"), method="faiss")
    assert open(tmp_path / "od" / ib.IVFDATA_NAME, "rb").read() == open(tmp_path / "ref.ivfdata", "rb").read()
    _assert_same_index(ref, b.index, vectors[::53])
    # moved elsewhere with its index file, the lists are found next to it (IO_FLAG_ONDISK_SAME_DIR)
    pub = tmp_path / "published"
    pub.mkdir()
    ib.write_index(b.index, str(pub / "index.faiss"))
    os.replace(tmp_path / "od" / ib.IVFDATA_NAME, pub / ib.IVFDATA_NAME)
    back = ib.read_index(str(pub / "index.faiss"))
    assert ib.has_ondisk_lists(back)
    _assert_same_index(single, back, vectors[::41])


# ------------------------------------------------------------------------------------------------ end to end
def _config(key: str, **kw):
    from index.build import BuildConfig

    return BuildConfig(index_key=key, tuning_queries=200, fresh_queries=200, latency_queries=30, **kw)


def test_build_and_publish_sharded_publishes_the_single_process_index(emb_dir, tmp_path):
    """What ``shopvec index --runner FnApiRunner --direct_num_workers=2 --direct_running_mode=multi_processing``
    runs: the same published index, tuned to the same parameters, as ``shopvec index``."""
    from index.build import build_and_publish
    from index.search import ProductIndex
    from pipelines import index_build as ib

    cfg = _config("IVF32,Flat")
    v1, m1 = build_and_publish(emb_dir, str(tmp_path / "single"), cfg)
    name, args = RUNNERS["fnapi-multiprocess-x2"]
    if _cli_has_runner():  # the command line itself: `shopvec index ... --runner FnApiRunner <beam options>`
        from index import store
        from pipelines.cli import main

        rc = main(["-q", "index", "--embeddings", emb_dir, "--out", str(tmp_path / "sharded"), "--index-key",
                   "IVF32,Flat", "--tuning-queries", "200", "--runner", name, *args, "--shard-rows", "1000"])
        assert rc == 0
        m2 = store.read_manifest(os.path.join(tmp_path, "sharded", "versions",
                                              store.read_current(str(tmp_path / "sharded"))))
        m1 = store.read_manifest(os.path.join(tmp_path, "single", "versions", v1))
    else:
        v2, m2 = ib.build_and_publish_sharded(emb_dir, str(tmp_path / "sharded"), cfg, runner=name,
                                              beam_args=args, rows_per_shard=1000)
    assert m2["build"]["sharded"]["runner"] == "FnApiRunner" and m2["build"]["sharded"]["shards"] == 6
    assert m2["search_params"] == m1["search_params"] and m1["search_params"]["nprobe"] > 1
    assert m2["measured"]["recall_at_k"] == m1["measured"]["recall_at_k"]
    for k in ("index_key", "n", "dim", "model_id", "random_init", "metric", "embeddings"):
        assert m2[k] == m1[k], k
    assert set(m2["files"]) == set(m1["files"])
    a, b = ProductIndex.load(str(tmp_path / "single")), ProductIndex.load(str(tmp_path / "sharded"))
    ids = [f"P{i:06d}" for i in range(0, N, 11)]
    assert a.similar_batch(ids, k=10) == b.similar_batch(ids, k=10)
    assert b.similar("P000007", k=5, filters={"category": "c3"}) == a.similar("P000007", k=5,
                                                                               filters={"category": "c3"})
    assert not os.path.exists(tmp_path / "sharded" / ".sharded-work")  # work files cleaned up


def _cli_has_runner() -> bool:
    import inspect

    from pipelines import cli_index

    return "--runner" in inspect.getsource(cli_index)


def _store_supports_on_disk() -> bool:
    from index import store

    return bool(getattr(store, "ONDISK_FILE", None))


@pytest.mark.xfail(not _store_supports_on_disk(), strict=True, raises=UserError,
                   reason="index.store does not publish on-disk inverted lists yet (the ONDISK_FILE hook described "
                          "in docs/scale.md); this turns into a plain test once it does")
def test_on_disk_version_loads_through_product_index(emb_dir, tmp_path):
    from index.search import ProductIndex
    from pipelines import index_build as ib

    cfg = _config("IVF32,Flat")
    v1, _ = ib.build_and_publish_sharded(emb_dir, str(tmp_path / "ram"), cfg, rows_per_shard=1000, on_disk=False)
    v2, m2 = ib.build_and_publish_sharded(emb_dir, str(tmp_path / "disk"), cfg, rows_per_shard=1000, on_disk=True)
    assert m2["build"]["sharded"]["on_disk"] is True and ib.IVFDATA_NAME in m2["files"]
    a = ProductIndex.load(str(tmp_path / "ram"))
    b = ProductIndex.load(str(tmp_path / "disk"), mmap=True)
    assert ib.has_ondisk_lists(b.index)
    ids = [f"P{i:06d}" for i in range(0, N, 13)]
    assert a.similar_batch(ids, k=10) == b.similar_batch(ids, k=10)
    q = a.vector("P000042")
    assert a.search(q, k=10) == b.search(q, k=10)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_vectors_fail_with_one_line_naming_file_and_product(tmp_path):
    from pipelines import index_build as ib

    x = _mixture(2000, DIM, seed=3)
    x[1500, 4] = np.nan
    d = _write(tmp_path / "nan", x, files=2)
    nan = r"part-00001\.parquet: field 'vector' contains NaN for product_id 'P001500'"
    with pytest.raises(UserError, match=nan):
        ib.build_and_publish_sharded(d, str(tmp_path / "out"), _config("IVF16,Flat"), rows_per_shard=400)
    assert not os.path.exists(tmp_path / "out" / "CURRENT")  # nothing published
    # found by the worker that adds the shard (not by the driver's training sample): still one clear line
    from index.build import BuildConfig, create_index

    good = create_index("IVF16,Flat", DIM, 2000, BuildConfig())
    good.train(_mixture(2000, DIM, seed=4))
    with pytest.raises(UserError, match=nan):
        ib.build_sharded(d, "IVF16,Flat", str(tmp_path / "w"), rows_per_shard=400, trained=ib.serialize(good))

    d2 = _write(tmp_path / "dup", _mixture(1000, DIM), files=2, ids=[f"P{i % 999}" for i in range(1000)])
    with pytest.raises(UserError, match="duplicate product_id 'P0'"):
        ib.build_and_publish_sharded(d2, str(tmp_path / "out2"), _config("IVF16,Flat"), rows_per_shard=400)

    _write(tmp_path / "dims", _mixture(500, DIM), files=1)
    from index.embeddings_io import write_embeddings

    write_embeddings(tmp_path / "dims" / "embeddings" / "part-00009.parquet", ["Z1"], _mixture(1, 16))
    with pytest.raises(UserError, match="dimension 16 but .* has 32"):
        ib.plan_shards(ib.embeddings_files(str(tmp_path / "dims")))
    with pytest.raises(UserError, match="only IVF families"):
        ib.build_and_publish_sharded(str(tmp_path / "nan"), str(tmp_path / "o3"), _config("HNSW32"))


def test_memory_budget_sets_shard_size():
    from pipelines import index_build as ib

    small = ib.rows_per_shard_for_budget(2 << 30, workers=2, dim=512, key="IVF1024,Flat")
    large = ib.rows_per_shard_for_budget(8 << 30, workers=2, dim=512, key="IVF1024,Flat")
    pq = ib.rows_per_shard_for_budget(2 << 30, workers=2, dim=512, key="IVF1024,PQ64")
    assert 4096 <= small < large and pq > 10 * small  # 64-byte codes: far more rows per shard than 2 KiB vectors
    with pytest.raises(UserError, match="too small"):
        ib.rows_per_shard_for_budget(600 << 20, workers=2, dim=512, key="IVF1024,Flat")


def test_auto_key_for_sharded_builds():
    from pipelines import index_build as ib

    key, reason, on_disk = ib.choose_sharded_key("auto", 2_000, 64, None, None)
    assert key is None  # exact Flat: nothing to shard, built in one process
    key, reason, on_disk = ib.choose_sharded_key("auto", 2_000_000, 512, 1 << 30, None)
    assert key.startswith("IVF") and key.endswith(",Flat") and on_disk and "on disk" in reason
    key, reason, on_disk = ib.choose_sharded_key("IVF1024,Flat", 2_000_000, 512, 64 << 30, None)
    assert key == "IVF1024,Flat" and not on_disk
