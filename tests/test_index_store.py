"""index.store: atomic publish (also when killed before the switch), manifest, rollback, retention, verified loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import faiss
import pyarrow as pa
import pytest

from embedders.errors import UserError
from embedders.provenance import sha256_file
from index import store
from index.build import BuildConfig, build_and_publish
from index.search import ProductIndex
from tests.test_index_helpers import catalog_metadata, clustered, ids_for, write_output_dir

REPO = Path(__file__).resolve().parents[1]
N, D = 400, 16


def small_version(seed=0, n=N):
    x = clustered(n, D, clusters=8, seed=seed)
    ix = faiss.IndexFlatIP(D)
    ix.add(x)
    meta = pa.table({"product_id": ids_for(n), "category": catalog_metadata(n)["category"]})
    return ix, ids_for(n), meta


def publish_small(root, seed=0, **kw):
    ix, ids, meta = small_version(seed)
    time.sleep(0.002)  # distinct created_at
    return store.publish(root, ix, ids, meta, {"index_key": "Flat", "search_params": {}, "seed": seed}, **kw)


@pytest.fixture(scope="module")
def built_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("built")
    out = write_output_dir(tmp / "OUT", clustered(1500, D, clusters=12, seed=2), shards=2)
    root = tmp / "INDEX"
    cfg = BuildConfig(index_key="IVF16,Flat", recall_target=0.9, tuning_queries=150, fresh_queries=150,
                      latency_queries=20)
    version, manifest = build_and_publish(out, root, cfg, keep=3)
    return root, version, manifest, out


def test_published_layout_and_manifest(built_root):
    root, version, manifest, out = built_root
    vdir = root / "versions" / version
    assert sorted(p.name for p in vdir.iterdir()) == ["ids.parquet", "index.faiss", "manifest.json",
                                                      "metadata.parquet"]
    assert (root / "CURRENT").read_text() == version + "\n"
    m = json.loads((vdir / "manifest.json").read_text())
    assert m == manifest
    for key in ("version", "index_key", "search_params", "metric", "dim", "n", "model_id", "random_init",
                "embeddings", "config_hash", "code_version", "created_at", "measured", "files", "choice_reason",
                "publish_check", "tuning", "build"):
        assert key in m, key
    assert m["version"] == version and m["index_key"] == "IVF16,Flat" and m["metric"] == "inner_product"
    assert m["n"] == 1500 and m["dim"] == D and m["search_params"]["nprobe"] >= 1
    assert m["model_id"] == "test/tiny-seeded" and m["random_init"] is True
    assert m["embeddings"]["source"] == str(out) and len(m["embeddings"]["sha256"]) == 64
    assert m["embeddings"]["files"] == ["part-00000.parquet", "part-00001.parquet"]
    assert m["measured"]["recall_at_k"] >= 0.9 and m["measured"]["k"] == 10
    assert m["measured"]["latency_ms"]["p50"] > 0 and m["measured"]["latency_ms"]["p99"] >= \
        m["measured"]["latency_ms"]["p50"] and m["measured"]["batched_qps"] > 0
    assert m["publish_check"]["queries"] > 0 and m["publish_check"]["identical_to_built"] == 1.0
    for name in ("index.faiss", "ids.parquet", "metadata.parquet"):
        assert m["files"][name] == {"sha256": sha256_file(vdir / name), "bytes": (vdir / name).stat().st_size}
    lv = store.load_version(root)
    assert lv.ids.to_pylist() == ids_for(1500)
    assert lv.metadata.column_names[0] == "product_id" and "category" in lv.metadata.column_names


def test_load_current_and_query(built_root):
    root, version, _, _ = built_root
    ix = ProductIndex.load(root)
    assert ix.version == version and ix.n == 1500 and ix.dim == D
    res = ix.similar("P00010", k=10)
    assert len(res) == 10 and "P00010" not in [r["product_id"] for r in res]
    mm = ProductIndex.load(root, mmap=True)
    assert [r["product_id"] for r in mm.similar("P00010", k=10)] == [r["product_id"] for r in res]


def test_mmap_loading_flat_and_ivf(tmp_path):
    for key in ("Flat", "IVF8,Flat"):
        x = clustered(500, D, clusters=8, seed=4)
        ix = faiss.index_factory(D, key, faiss.METRIC_INNER_PRODUCT)
        ix.train(x)
        ix.add(x)
        if key != "Flat":
            ix.make_direct_map()
        root = tmp_path / key.replace(",", "_")
        store.publish(root, ix, ids_for(500), None, {"index_key": key, "search_params": {"nprobe": 8}})
        a = ProductIndex.load(root, mmap=False).similar("P00003", k=5)
        b = ProductIndex.load(root, mmap=True).similar("P00003", k=5)
        assert a == b and len(a) == 5


def test_crash_before_switch_leaves_current_untouched(tmp_path):
    root = tmp_path / "IX"
    v1 = publish_small(root, seed=1)

    def boom(version):
        assert (root / "versions" / version / "index.faiss").exists()  # fully written and verified by now
        raise RuntimeError("simulated crash before the CURRENT switch")

    with pytest.raises(RuntimeError, match="simulated crash"):
        publish_small(root, seed=2, before_switch=boom)
    assert store.read_current(root) == v1
    assert [p.name for p in (root / "versions").iterdir()] == [v1]
    assert not any((root / "staging").iterdir())
    assert ProductIndex.load(root).version == v1


def test_failed_verification_publishes_nothing(tmp_path):
    root = tmp_path / "IX"
    v1 = publish_small(root, seed=1)

    def bad_verify(staged):
        assert Path(staged, "manifest.json").exists()
        raise UserError("staged index answers differently")

    with pytest.raises(UserError, match="answers differently"):
        publish_small(root, seed=2, verify=bad_verify)
    assert store.read_current(root) == v1 and [p.name for p in (root / "versions").iterdir()] == [v1]
    assert not any((root / "staging").iterdir())


def test_build_killed_before_switch_leaves_current_untouched(tmp_path):
    """A real process killed with SIGKILL right before the switch: nothing cleans up, CURRENT must still hold."""
    root = tmp_path / "IX"
    v1 = publish_small(root, seed=1)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_index_store import publish_small
        publish_small({str(root)!r}, seed=2, before_switch=lambda v: os.kill(os.getpid(), signal.SIGKILL))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr
    assert store.read_current(root) == v1
    assert ProductIndex.load(root).version == v1
    leftovers = [p.name for p in (root / "versions").iterdir() if p.name != v1]
    assert len(leftovers) == 1                         # complete but never published
    listed = {r["version"]: r for r in store.list_versions(root)}
    assert listed[v1]["current"] and not listed[leftovers[0]]["current"]
    # a kill while still staging leaves a staging dir of a dead pid: the next publish removes it
    (root / "staging" / "vX.999999999.abcdef").mkdir()
    v3 = publish_small(root, seed=3)
    assert store.read_current(root) == v3 and not any((root / "staging").iterdir())


def test_current_is_replaced_atomically(tmp_path, monkeypatch):
    root = tmp_path / "IX"
    v1 = publish_small(root, seed=1)
    real_replace = os.replace
    seen = []

    def spy(src, dst):
        if Path(dst).name == "CURRENT":
            seen.append(Path(src).read_text())
            assert Path(dst).read_text() == v1 + "\n"  # the old CURRENT stays readable until the rename
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    v2 = publish_small(root, seed=2)
    assert seen == [v2 + "\n"] and store.read_current(root) == v2


def test_list_rollback_and_previous(tmp_path):
    root = tmp_path / "IX"
    v1, v2, v3 = (publish_small(root, seed=s) for s in (1, 2, 3))
    rows = store.list_versions(root)
    assert [r["version"] for r in rows] == [v3, v2, v1]
    assert rows[0]["current"] and rows[1]["previous"] and rows[0]["index_key"] == "Flat" and rows[0]["n"] == N
    assert store.rollback(root, v1) == (v3, v1)
    assert store.read_current(root) == v1 and store.previous_version(root) == v3
    assert ProductIndex.load(root).manifest["seed"] == 1
    assert store.rollback(root, "previous") == (v1, v3)
    with pytest.raises(UserError, match="already CURRENT"):
        store.rollback(root, v3)
    with pytest.raises(UserError, match="no such version"):
        store.rollback(root, "v19990101T000000Z-000000")
    with pytest.raises(UserError, match="invalid version name"):
        store.rollback(root, "../../etc")
    hist = [json.loads(line) for line in (root / "history.jsonl").read_text().splitlines()]
    assert [(h["action"], h["to"]) for h in hist] == [("publish", v1), ("publish", v2), ("publish", v3),
                                                      ("rollback", v1), ("rollback", v3)]


def test_retention_keeps_last_n_plus_current_and_previous(tmp_path):
    root = tmp_path / "IX"
    vs = [publish_small(root, seed=s, keep=10) for s in range(4)]
    assert store.apply_retention(root, keep=2) == vs[:2]
    assert sorted(p.name for p in (root / "versions").iterdir()) == sorted(vs[2:])
    # roll back to the oldest kept, then publish with keep=1: CURRENT's predecessor and the new one survive
    store.rollback(root, vs[2])
    v5 = publish_small(root, seed=5, keep=1)
    assert store.read_current(root) == v5 and store.previous_version(root) == vs[2]
    assert sorted(p.name for p in (root / "versions").iterdir()) == sorted([vs[2], v5])
    # CURRENT is never deleted even when it is the oldest
    store.rollback(root, vs[2])
    assert store.apply_retention(root, keep=1) == []
    with pytest.raises(UserError, match="--keep"):
        store.apply_retention(root, keep=0)


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize("name,how,word", [("index.faiss", "flip", "sha256 mismatch"),
                                           ("index.faiss", "truncate", "truncated"),
                                           ("ids.parquet", "truncate", "truncated"),
                                           ("metadata.parquet", "flip", "sha256 mismatch"),
                                           ("metadata.parquet", "delete", "missing"),
                                           ("manifest.json", "truncate", "corrupted or truncated")])
def test_corrupted_or_truncated_files_are_refused(tmp_path, name, how, word):
    root = tmp_path / "IX"
    v = publish_small(root)
    path = root / "versions" / v / name
    corrupt(path, how)
    with pytest.raises(store.CorruptIndexError) as ei:
        ProductIndex.load(root)
    msg = str(ei.value)
    assert str(path) in msg and word in msg and "\n" not in msg
    if how in ("truncate", "delete") or name == "manifest.json":
        with pytest.raises(store.CorruptIndexError):   # sizes are checked even without checksums
            ProductIndex.load(root, verify=False)


def test_rollback_refuses_a_corrupted_target(tmp_path):
    root = tmp_path / "IX"
    v1 = publish_small(root, seed=1)
    v2 = publish_small(root, seed=2)
    corrupt(root / "versions" / v1 / "index.faiss", "flip")
    with pytest.raises(store.CorruptIndexError, match="index.faiss: sha256 mismatch"):
        store.rollback(root, v1)
    assert store.read_current(root) == v2


def test_load_errors_for_missing_root_and_unpublished(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        ProductIndex.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="nothing published yet"):
        ProductIndex.load(tmp_path / "empty")
    root = tmp_path / "IX"
    v = publish_small(root)
    with pytest.raises(UserError, match="not found"):
        ProductIndex.load(root, version="v20000101T000000Z-aaaaaa")
    assert ProductIndex.load(root / "versions" / v).version == v   # a version dir loads directly too
    (root / "CURRENT").write_text("../../x\n")
    with pytest.raises(store.CorruptIndexError, match="does not name a version"):
        ProductIndex.load(root)
