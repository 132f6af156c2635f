"""`shopvec index` / `index list` / `index rollback` / `query` end to end through pipelines.cli.main."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from index import store
from index.embeddings_io import write_embeddings
from pipelines.cli import main
from tests.test_index_helpers import clustered, ids_for, write_output_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_CATALOG = Path(__file__).resolve().parents[1].parent / "shared/data/flipkart_1050/products.parquet"
DEMO_CONFIG = REPO / "configs" / "demo.toml"
N, D = 1200, 16


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    x = clustered(N, D, clusters=12, seed=8)
    out = write_output_dir(tmp_path_factory.mktemp("synth") / "OUT", x, shards=3)
    return out, x


def test_build_list_query_rollback(synth, tmp_path, capsys):
    out, x = synth
    root = tmp_path / "IX"
    rc, stdout, err = run(capsys, "index", "--embeddings", out, "--out", root, "--index-key", "IVF16,Flat",
                          "--recall-target", "0.9", "--tuning-queries", "150", "--keep", "3")
    assert rc == 0, err
    assert stdout.startswith("published v") and "IVF16,Flat n=1,200" in stdout and "recall@10" in stdout
    v1 = store.read_current(root)
    assert v1 and v1 in stdout

    rc, stdout, _ = run(capsys, "query", "--index", root, "--product-id", "P00007", "-k", "10", "--json")
    res = json.loads(stdout)
    assert rc == 0 and len(res) == 10 and "P00007" not in [r["product_id"] for r in res]
    assert {"product_id", "score", "title", "category", "price"} <= set(res[0])

    rc, stdout, _ = run(capsys, "query", "--index", root, "--product-id", "P00007", "--filter", "category=Shoes,Bags",
                        "--filter", "price<3000", "--json")
    res = json.loads(stdout)
    assert rc == 0 and len(res) == 10
    assert all(r["category"] in ("Shoes", "Bags") and r["price"] < 3000 for r in res)
    rc, stdout, _ = run(capsys, "query", "--index", root, "--product-id", "P00007",
                        "--filter", '{"price": {"ge": 1000}}', "--json")
    assert rc == 0 and all(r["price"] >= 1000 for r in json.loads(stdout))

    np.save(tmp_path / "v.npy", x[3])
    rc, stdout, _ = run(capsys, "query", "--index", root, "--vector-file", tmp_path / "v.npy", "-k", "3", "--json")
    assert rc == 0 and json.loads(stdout)[0]["product_id"] == "P00003"
    np.save(tmp_path / "vv.npy", x[[3, 4]])
    rc, stdout, _ = run(capsys, "query", "--index", root, "--vector-file", tmp_path / "vv.npy", "-k", "2", "--json")
    assert [r[0]["product_id"] for r in json.loads(stdout)] == ["P00003", "P00004"]

    rc, stdout, _ = run(capsys, "query", "--index", root, "--product-id", "P00007", "-k", "4")
    lines = stdout.strip().splitlines()
    assert rc == 0 and lines[0].startswith("# similar to P00007") and len(lines) == 5
    assert lines[1].split()[0] == "1" and "P00007" not in "".join(lines[1:])

    rc, stdout, err = run(capsys, "index", "--embeddings", out, "--out", root, "--recall-target", "0.9",
                          "--tuning-queries", "100")
    assert rc == 0, err
    v2 = store.read_current(root)
    assert v2 != v1 and "Flat n=1,200" in stdout       # auto: small catalog -> exact

    rc, stdout, _ = run(capsys, "index", "list", "--index", root)
    assert rc == 0
    rows = stdout.strip().splitlines()
    assert rows[0].startswith("VERSION") and rows[1].startswith(v2) and " CUR " in rows[1]
    assert rows[2].startswith(v1) and " prev " in rows[2] and "IVF16,Flat" in rows[2]
    rc, stdout, _ = run(capsys, "index", "list", "--index", root, "--json")
    listed = json.loads(stdout)
    assert [r["version"] for r in listed] == [v2, v1] and listed[1]["recall"] >= 0.9

    rc, stdout, _ = run(capsys, "index", "rollback", "--index", root, "--to", v1)
    assert rc == 0 and stdout.strip() == f"CURRENT: {v2} -> {v1}" and store.read_current(root) == v1
    rc, stdout, _ = run(capsys, "query", "--index", root, "--product-id", "P00007", "--version", v2, "--json")
    assert rc == 0 and len(json.loads(stdout)) == 10


def bad_embeddings(tmp_path: Path, case: str) -> Path:
    e = tmp_path / f"bad_{case}" / "embeddings"
    x = clustered(40, 8, seed=1)
    if case == "empty":
        write_embeddings(e / "part-0.parquet", [], np.zeros((0, 8), np.float32))
    elif case == "dims":
        write_embeddings(e / "part-0.parquet", ids_for(20), x[:20])
        write_embeddings(e / "part-1.parquet", ids_for(20, "Q"), clustered(20, 12))
    elif case == "nan":
        x[7, 0] = np.nan
        write_embeddings(e / "part-0.parquet", ids_for(40), x)
    elif case == "dup":
        write_embeddings(e / "part-0.parquet", ids_for(20), x[:20])
        write_embeddings(e / "part-1.parquet", ids_for(20), x[20:])
    return e.parent


@pytest.mark.parametrize("case,word", [("empty", "empty"), ("dims", "dim 12"), ("nan", "NaN"),
                                       ("dup", "duplicate product_id")])
def test_bad_inputs_exit_2_and_publish_nothing(tmp_path, capsys, case, word):
    root = tmp_path / "IX"
    rc, _, err = run(capsys, "index", "--embeddings", bad_embeddings(tmp_path, case), "--out", root)
    assert rc == 2
    assert err.startswith("shopvec index: error: ") and word in err and len(err.strip().splitlines()) == 1
    assert not root.exists()
    # with a live version already there: still exit 2, CURRENT and the versions untouched
    good = write_output_dir(tmp_path / "good", clustered(60, 8, seed=2), shards=1)
    assert run(capsys, "index", "--embeddings", good, "--out", root, "--tuning-queries", "20")[0] == 0
    live = store.read_current(root)
    rc, _, err = run(capsys, "index", "--embeddings", bad_embeddings(tmp_path, case), "--out", root)
    assert rc == 2 and store.read_current(root) == live
    assert [p.name for p in (root / "versions").iterdir()] == [live]


def test_cli_errors_are_one_line_exit_2(synth, tmp_path, capsys):
    out, _ = synth
    root = tmp_path / "IX"
    assert run(capsys, "index", "--embeddings", out, "--out", root, "--tuning-queries", "50")[0] == 0
    cases = [
        (["query", "--index", root, "--product-id", "NOPE"], "unknown product_id 'NOPE'"),
        (["query", "--index", root, "--product-id", "P00001", "--filter", "colour=red"], "unknown filter field"),
        (["query", "--index", root, "--product-id", "P00001", "--filter", "price<cheap"], "not a number"),
        (["query", "--index", tmp_path / "nowhere", "--product-id", "P00001"], "no such directory"),
        (["query", "--index", root, "--vector-file", tmp_path / "missing.npy"], "no such file"),
        (["query", "--index", root, "--image", tmp_path / "missing.jpg"], "no such file"),
        (["index", "--embeddings", out, "list", "--index", root], "does not take --embeddings"),
        (["index", "--embeddings", out], "needs --out"),
        (["index", "rollback", "--index", root, "--to", "v20000101T000000Z-aaaaaa"], "no such version"),
        (["index", "--embeddings", out, "--out", root, "--max-memory", "lots"], "--max-memory"),
        (["index", "--embeddings", out, "--out", root, "--index-key", "IVF??"], "not a valid FAISS factory"),
        (["index", "--embeddings", out, "--out", root, "--index-key", "IVF16,PQ2x4", "--recall-target", "0.99",
          "--tuning-queries", "50"], "unreachable"),
    ]
    for argv, word in cases:
        rc, _, err = run(capsys, *argv)
        assert rc == 2, (argv, err)
        errors = [line for line in err.splitlines() if line.startswith("shopvec ")]
        assert len(errors) == 1 and word in errors[0], (argv, err)
    assert len(store.list_versions(root)) == 1
    with pytest.raises(SystemExit) as ei:     # argparse: build options are not options of `index list`
        main(["index", "list", "--index", str(root), "--embeddings", str(out)])
    assert ei.value.code == 2
    np.save(tmp_path / "wrong.npy", np.ones(5, np.float32))
    rc, _, err = run(capsys, "query", "--index", root, "--vector-file", tmp_path / "wrong.npy")
    assert rc == 2 and "expected (16,)" in err
    # corrupted file -> refused by name
    v = store.read_current(root)
    idx = root / "versions" / v / "index.faiss"
    idx.write_bytes(idx.read_bytes()[:-10])
    rc, _, err = run(capsys, "query", "--index", root, "--product-id", "P00001")
    assert rc == 2 and str(idx) in err and "truncated" in err


def test_below_target_only_with_the_flag(synth, tmp_path, capsys):
    out, _ = synth
    root = tmp_path / "IX"
    argv = ["index", "--embeddings", out, "--out", root, "--index-key", "IVF16,PQ2x4", "--recall-target", "0.99",
            "--tuning-queries", "50", "--allow-below-target"]
    rc, _, err = run(capsys, *argv)
    assert rc == 0 and "below the target" in err
    m = store.read_manifest(root / "versions" / store.read_current(root))
    assert m["below_target"] is True and m["measured"]["recall_at_k"] < 0.99
    rc, stdout, _ = run(capsys, "index", "list", "--index", root)
    assert "!" in stdout.splitlines()[1]


def test_text_and_image_queries_use_the_manifest_model(synth, tmp_path, capsys, monkeypatch):
    out, x = synth
    root = tmp_path / "IX"
    assert run(capsys, "index", "--embeddings", out, "--out", root, "--tuning-queries", "50")[0] == 0
    calls = []

    class Enc:
        def encode_texts(self, texts):
            return x[[int(t.split()[-1]) for t in texts]]

        def encode_images(self, images):
            return x[[int(b) for b in images]]

    def load_query_encoder(model):
        calls.append(model["model_id"])
        return Enc()

    monkeypatch.setitem(sys.modules, "embedders.encoder", types.SimpleNamespace(load_query_encoder=load_query_encoder))
    monkeypatch.setitem(sys.modules, "embedders.fusion",
                        types.SimpleNamespace(query_vector=lambda modality, vec, cfg, dims, **kw: vec))
    rc, stdout, err = run(capsys, "query", "--index", root, "--text", "item 42", "-k", "3", "--json")
    assert rc == 0, err and json.loads(stdout)[0]["product_id"] == "P00042"
    assert json.loads(stdout)[0]["product_id"] == "P00042"
    (tmp_path / "q.jpg").write_bytes(b"17")
    rc, stdout, _ = run(capsys, "query", "--index", root, "--image", tmp_path / "q.jpg", "-k", "3", "--json")
    assert rc == 0 and json.loads(stdout)[0]["product_id"] == "P00017"
    assert calls == ["test/tiny-seeded", "test/tiny-seeded"]


@pytest.mark.slow
def test_shared_real_catalog_end_to_end(tmp_path, capsys):
    if not SHARED_CATALOG.exists():
        pytest.skip(f"shared catalog {SHARED_CATALOG} not present")
    embed = pytest.importorskip("pipelines.embed")
    config = pytest.importorskip("pipelines.config")
    if not DEMO_CONFIG.exists():
        pytest.skip(f"{DEMO_CONFIG} not present")
    out = tmp_path / "OUT"
    embed.run_embed(config.load_config(str(DEMO_CONFIG)), str(SHARED_CATALOG), None, str(out), runner="DirectRunner")
    root = tmp_path / "IX"
    rc, stdout, err = run(capsys, "index", "--embeddings", out, "--out", root)
    assert rc == 0, err
    v = store.read_current(root)
    m = store.read_manifest(root / "versions" / v)
    assert m["n"] == 1050 and m["measured"]["recall_at_k"] >= 0.95 and m["measured"]["k"] == 10
    assert m["model_id"] and m["embeddings"]["sha256"] and m["files"]["index.faiss"]["sha256"]
    ids = store.load_version(root).ids.to_pylist()
    rc, stdout, _ = run(capsys, "query", "--index", root, "--product-id", ids[0], "-k", "10", "--json")
    res = json.loads(stdout)
    assert rc == 0 and len(res) == 10 and ids[0] not in [r["product_id"] for r in res]
    assert {"title", "category_l1", "retail_price"} <= set(res[0])
    rc, stdout, _ = run(capsys, "query", "--index", root, "--product-id", ids[0], "-k", "10",
                        "--filter", "category_l1=Watches", "--filter", "retail_price>=500", "--json")
    res = json.loads(stdout)
    assert rc == 0 and len(res) == 10
    assert all(r["category_l1"] == "Watches" and r["retail_price"] >= 500 for r in res)


def test_auto_compressed_under_a_small_memory_budget_is_served_mmapped(synth, tmp_path, capsys, monkeypatch):
    out, _ = synth
    root = tmp_path / "IX"
    rc, stdout, err = run(capsys, "index", "--embeddings", out, "--out", root, "--max-memory", "50KB",
                          "--recall-target", "0.9", "--tuning-queries", "100")
    assert rc == 0, err
    m = store.read_manifest(root / "versions" / store.read_current(root))
    assert m["index_key"] == "IVF16,PQ16,RFlat" and "exceed the memory budget" in m["choice_reason"]
    assert m["serving"]["mmap"] is True and m["search_params"]["k_factor"] >= 1
    assert m["measured"]["recall_at_k"] >= 0.9
    import index.search as search_mod
    seen = []
    real_load = search_mod.ProductIndex.load.__func__
    monkeypatch.setattr(search_mod.ProductIndex, "load",
                        classmethod(lambda cls, *a, **kw: seen.append(kw["mmap"]) or real_load(cls, *a, **kw)))
    rc, stdout, _ = run(capsys, "query", "--index", root, "--product-id", "P00002", "--json")
    assert rc == 0 and len(json.loads(stdout)) == 10 and seen == [True]   # mmap by default, as recorded
