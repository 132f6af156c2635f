"""End-to-end tests of the Beam embed pipeline (DirectRunner, tiny seeded model)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main as cli_main
from tests import corpus
from tests.conftest import DEMO_CONFIG, SHARED_CATALOG


def _read(out):
    emb = pq.read_table(os.path.join(out, "embeddings"))
    dl = pq.read_table(os.path.join(out, "dead_letters"))
    return emb, dl


def _vectors(emb, col="vector"):
    ids = emb.column("product_id").to_pylist()
    vals = emb.column(col).to_pylist()
    return {i: (None if v is None else np.asarray(v, np.float32)) for i, v in zip(ids, vals)}


# ------------------------------------------------------------------------------------------------ demo catalog
def test_demo_outputs_schema_counts_and_dead_letters(demo_catalog, demo_embeddings):
    out, report = demo_embeddings
    emb, dl = _read(out)
    # schema contract
    assert emb.schema.field("vector").type == pa.list_(pa.float32(), 64)
    assert pa.types.is_list(emb.schema.field("image_vector").type)
    prov = json.loads(emb.schema.metadata[b"shopvec"])
    assert prov["random_init"] is True and "random-init" in prov["model_id"]
    for key in ("config_hash", "code_version", "created_at", "dim", "model_id"):
        assert prov[key] not in (None, "")
    # every vector unit-norm, ids unique
    ids = emb.column("product_id").to_pylist()
    assert len(ids) == len(set(ids))
    V = np.stack(emb.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1.0, atol=1e-5)
    # dead letters are exactly the demo catalog's planted bad records
    expected = {(b["product_id"], b["stage"], b["error"]) for b in demo_catalog["bad"]}
    got = set(zip(dl.column("product_id").to_pylist(), dl.column("stage").to_pylist(), dl.column("error").to_pylist()))
    assert got == expected
    assert set(dl.column_names) == {"product_id", "stage", "error", "message"}
    # products whose image failed are still embedded (partial); no usable modality is not
    for b in demo_catalog["bad"]:
        assert (b["product_id"] in ids) == b["embedded"], b
    assert report["counts"]["embedded"] == demo_catalog["n_unique_ids"] - 1
    assert report["counts"]["partial"] == sum(1 for b in demo_catalog["bad"] if b["stage"] == "image")
    assert report["counts"]["reviews"]["orphan"] == demo_catalog["bad_reviews"]["orphan"]
    assert report["counts"]["reviews"]["null_text"] == demo_catalog["bad_reviews"]["null_text"]
    assert report["counts"]["model_loads"] == 1
    assert report["random_init"] is True and report["status"] == "succeeded"
    assert report["throughput_products_per_s"] > 0
    # the duplicate's first occurrence (by row order) won: its title is the first row's
    dup = next(b for b in demo_catalog["bad"] if b["error"] == "duplicate_id")
    src = pq.read_table(demo_catalog["products"], columns=["product_id", "title"]).to_pylist()
    first_title = next(r["title"] for r in src if r["product_id"] == dup["product_id"])
    row = next(r for r in emb.select(["product_id", "title"]).to_pylist() if r["product_id"] == dup["product_id"])
    assert row["title"] == first_title
    # review columns
    rc = dict(zip(ids, emb.column("review_count").to_pylist()))
    assert sum(rc.values()) > 0
    # no staging folders left behind
    assert not [d for d in os.listdir(os.path.dirname(out)) if ".staging-" in d]


def test_rerun_is_deterministic(demo_catalog, demo_config, demo_embeddings, tmp_path):
    """Same config + input -> same vectors. The rerun decodes images inline (``images.decode_threads=0``) while the
    first run decoded them on background threads: outputs leave the decode step in input order, so batch composition
    is the same and the vectors are byte-identical, dead letters included."""
    from pipelines.embed import decode_threads, run_embed

    out1, _ = demo_embeddings
    assert decode_threads(demo_config.raw["images"]) >= 1
    out2 = str(tmp_path / "again")
    run_embed(demo_config.with_overrides(["images.decode_threads=0"]), demo_catalog["products"],
              demo_catalog["reviews"], out2, runner="DirectRunner")
    (a, da), (b, db) = _read(out1), _read(out2)
    for col in ("vector", "image_vector", "text_vector", "review_vector"):
        va, vb = _vectors(a, col), _vectors(b, col)
        assert va.keys() == vb.keys()
        for k in va:
            if va[k] is None:
                assert vb[k] is None
            else:
                np.testing.assert_array_equal(va[k], vb[k])
    key = lambda r: (str(r["product_id"]), r["stage"], r["error"])  # noqa: E731
    assert sorted(da.to_pylist(), key=key) == sorted(db.to_pylist(), key=key)
    # same config + input -> same hashes
    assert sorted(a.column("text_hash").to_pylist(), key=str) == sorted(b.column("text_hash").to_pylist(), key=str)


def test_modalities_each_alone_give_the_right_fused_vector(tmp_path, demo_config):
    """image-only, text-only and review-only products: fused vector == fuse() of the encoder's own outputs."""
    from embedders.encoder import Encoder
    from embedders.fusion import aggregate_reviews, fuse, modality_dims, review_weights
    from embedders.models import load_model
    from pipelines.embed import run_embed

    img = corpus.palette_png().data
    products = pa.table({"product_id": ["IMG", "TXT", "REV", "ALL"],
                         "title": [None, "Blue ceramic mug", None, "Green lamp"],
                         "description": [None, "Holds 300 ml", None, None],
                         "image": pa.array([img, None, None, img], pa.binary())})
    reviews = pa.table({"product_id": ["REV", "REV", "ALL"],
                        "text": ["Sturdy and warm", "Too small", "Bright"],
                        "helpful_votes": [5, 0, 1],
                        "created_at": ["2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z", "2024-02-02"]})
    pq.write_table(products, tmp_path / "p.parquet")
    pq.write_table(reviews, tmp_path / "r.parquet")
    run_embed(demo_config, str(tmp_path / "p.parquet"), str(tmp_path / "r.parquet"), str(tmp_path / "out"))
    emb = pq.read_table(tmp_path / "out" / "embeddings")
    fused = _vectors(emb)
    mods = dict(zip(emb.column("product_id").to_pylist(), emb.column("modalities").to_pylist()))
    assert mods == {"IMG": "image", "TXT": "text", "REV": "reviews", "ALL": "image+text+reviews"}

    enc = Encoder(load_model(demo_config.model))
    cfg, dims = demo_config.fusion, modality_dims(64, 64)
    i_vec = enc.encode_images([img])[0]
    t_vec = enc.encode_texts(["Blue ceramic mug. Holds 300 ml"])[0]
    r_vecs = enc.encode_texts(["Sturdy and warm", "Too small"])
    import datetime as dt
    ts = [dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc).timestamp(),
          dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc).timestamp()]
    w = review_weights([{"helpful_votes": 5, "created_ts": ts[0]}, {"helpful_votes": 0, "created_ts": ts[1]}], 365.0)
    r_vec = aggregate_reviews(r_vecs, w)
    np.testing.assert_allclose(fused["IMG"], fuse({"image": i_vec}, cfg, dims), atol=1e-5)
    np.testing.assert_allclose(fused["TXT"], fuse({"text": t_vec}, cfg, dims), atol=1e-5)
    np.testing.assert_allclose(fused["REV"], fuse({"reviews": r_vec}, cfg, dims), atol=1e-5)
    a_vec = fuse({"image": i_vec, "text": enc.encode_texts(["Green lamp"])[0],
                  "reviews": enc.encode_texts(["Bright"])[0]}, cfg, dims)
    np.testing.assert_allclose(fused["ALL"], a_vec, atol=1e-5)


def test_image_corpus_through_the_pipeline(tmp_path, demo_config):
    from pipelines.embed import run_embed

    path, cases = corpus.write_image_corpus_catalog(str(tmp_path / "corpus"))
    report = run_embed(demo_config, path, None, str(tmp_path / "out"))
    emb, dl = _read(str(tmp_path / "out"))
    ids = set(emb.column("product_id").to_pylist())
    assert ids == set(cases)  # every row has a title, so every product is embedded
    got = {(p, s, e) for p, s, e in zip(dl.column("product_id").to_pylist(), dl.column("stage").to_pylist(),
                                        dl.column("error").to_pylist())}
    expected = {(pid, "image", c.expect) for pid, c in cases.items() if c.expect != "ok"}
    assert got == expected
    mods = dict(zip(emb.column("product_id").to_pylist(), emb.column("modalities").to_pylist()))
    for pid, c in cases.items():
        assert mods[pid] == ("image+text" if c.expect == "ok" else "text"), pid
    assert report["counts"]["partial"] == len(expected)
    # dead letters never carry image bytes
    assert all(len(m) <= 300 for m in dl.column("message").to_pylist())


def test_valid_catalog_variants(tmp_path, demo_config):
    """Integer ids (kept exact, as strings), text-only catalogs, a directory with a cross-file duplicate, flexible
    review types — in one pipeline run per case."""
    from pipelines.embed import run_embed

    d = str(tmp_path / "cases")
    ints = corpus.write_products_int_product_id(d)
    reviews = corpus.write_reviews_flexible_types(d)
    rep = run_embed(demo_config, ints.path, reviews.path, str(tmp_path / "o1"))
    emb, _ = _read(str(tmp_path / "o1"))
    assert set(emb.column("product_id").to_pylist()) == set(ints.ids)
    counts = dict(zip(emb.column("product_id").to_pylist(), emb.column("review_count").to_pylist()))
    assert counts["7"] == 1 and counts["42"] == 2
    assert rep["counts"]["reviews"]["null_text"] == reviews.extra["null_text"]
    assert rep["counts"]["reviews"]["missing_product_id"] == reviews.extra["null_product_id"]

    dup = corpus.write_products_dir_cross_file_duplicate(d)
    run_embed(demo_config, dup.path, None, str(tmp_path / "o2"))
    emb, dl = _read(str(tmp_path / "o2"))
    assert sorted(emb.column("product_id").to_pylist()) == sorted(dup.ids)
    assert dict(zip(emb.column("product_id").to_pylist(), emb.column("title").to_pylist()))["X1"] == \
        dup.extra["kept_title"]
    assert [tuple(r.values()) for r in dl.select(["product_id", "stage", "error"]).to_pylist()] == \
        [dup.extra["duplicate"]]

    txt = corpus.write_products_text_only_columns(d)
    run_embed(demo_config, txt.path, None, str(tmp_path / "o3"))
    emb, _ = _read(str(tmp_path / "o3"))
    assert sorted(emb.column("product_id").to_pylist()) == sorted(txt.ids)


# ------------------------------------------------------------------------------------------------ CLI errors
@pytest.mark.parametrize("maker", [corpus.write_products_missing_product_id, corpus.write_products_float_product_id,
                                   corpus.write_products_list_product_id, corpus.write_products_image_as_string,
                                   corpus.write_products_no_content_columns, corpus.missing_products_path])
def test_bad_products_fail_fast_with_one_line(maker, tmp_path, capsys):
    case = maker(str(tmp_path))
    rc = cli_main(["embed", "--config", str(DEMO_CONFIG), "--products", case.path, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "Traceback" not in err[0]
    assert os.path.basename(case.path) in err[0]
    if case.column:
        assert repr(case.column) in err[0] or case.column in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("maker", [corpus.write_reviews_text_wrong_type, corpus.write_reviews_missing_product_id])
def test_bad_reviews_fail_fast(maker, tmp_path, capsys, demo_catalog):
    case = maker(str(tmp_path))
    rc = cli_main(["embed", "--products", demo_catalog["products"], "--reviews", case.path,
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert os.path.basename(case.path) in err[0] and case.column in err[0]


def test_bad_config_is_a_user_error(tmp_path, capsys, demo_catalog):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname = "shopvec-tiny"\ncolour = "red"\n')
    rc = cli_main(["embed", "--config", str(bad), "--products", demo_catalog["products"], "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.toml" in err and "colour" in err
    rc = cli_main(["embed", "--products", demo_catalog["products"], "--out", str(tmp_path / "o"),
                   "--set", "fusion.mode=\"avg\""])
    assert rc == 2 and "fusion" in capsys.readouterr().err
    rc = cli_main(["embed", "--products", demo_catalog["products"], "--out", str(tmp_path / "o"),
                   "--set", "images.decode_threads=-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "[images] decode_threads" in err[0]
    assert not os.path.exists(tmp_path / "o")


def test_failed_run_publishes_nothing(tmp_path, demo_catalog, demo_config, monkeypatch):
    """A crash inside the pipeline leaves the previous output untouched and no staging folder behind."""
    import pipelines.embed as E

    out = tmp_path / "out"
    out.mkdir()
    (out / "run_report.json").write_text('{"previous": true}')
    monkeypatch.setattr(E, "summarize_outputs", lambda staging: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        E.run_embed(demo_config, demo_catalog["products"], None, str(out))
    assert json.loads((out / "run_report.json").read_text()) == {"previous": True}
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


# ------------------------------------------------------------------------------------------------ real catalog
@pytest.mark.skipif(not SHARED_CATALOG.exists(), reason="shared Flipkart catalog not present")
def test_shared_real_catalog(tmp_path, capsys):
    rc = cli_main(["embed", "--config", str(DEMO_CONFIG), "--products", str(SHARED_CATALOG),
                   "--out", str(tmp_path / "out"), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    emb, dl = _read(str(tmp_path / "out"))
    assert emb.num_rows == 1050 and dl.num_rows == 0
    mods = report["counts"]["by_modalities"]
    assert mods == {"image+text": 1047, "text": 3}
    assert "category_l1" in emb.column_names and "image" not in emb.column_names
    assert report["random_init"] is True


def test_read_row_group_streams_a_big_row_group(tmp_path):
    """A catalog written as ONE row group (pyarrow's default holds up to 1M rows) must not be loaded whole: pages are
    read through a bounded buffer. Measured as Arrow's own peak allocation in a fresh process (deterministic, not a
    timing): 96 MiB of incompressible image bytes in one row group (2 MiB pages), read 32 rows (8 MiB) at a time."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, 256 * 1024, dtype=np.uint8).tobytes() for _ in range(384)]
    path = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({"product_id": [f"p{i}" for i in range(384)], "image": blobs}), path,
                   row_group_size=384, compression="none", write_batch_size=8)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    code = ("import sys, pyarrow as pa\n"
            "from pipelines.catalog import read_row_group\n"
            "n = sum(len(r['image']) for r in read_row_group(sys.argv[1], 0, ['product_id', 'image'], batch_rows=32))\n"
            "print(n, pa.default_memory_pool().max_memory())\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    n, peak = map(int, out.stdout.split())
    assert n == 384 * 256 * 1024  # every byte came through
    assert peak < 40 * 2**20, f"Arrow peak {peak / 2**20:.1f} MiB while streaming a 96 MiB row group"


# ------------------------------------------------------------------------------------------------ shard writer
def _drive_writer(tmp_path, rows, **kw):
    """Runs the shard writer DoFn over ``rows`` in one bundle; returns (the file, the most Python rows it held)."""
    from pipelines.embed import _WriteShard

    schema = pa.schema([pa.field("product_id", pa.string(), nullable=False),
                        pa.field("vector", pa.list_(pa.float32(), 4), nullable=False),
                        pa.field("image_vector", pa.list_(pa.float32())),
                        pa.field("description", pa.string())])
    fn = _WriteShard(str(tmp_path / "tmp"), schema, **kw)
    fn.start_bundle()
    most = 0
    for r in rows:
        fn.process(r)
        most = max(most, len(fn._rows))
    paths = [wv.value for wv in fn.finish_bundle()]
    assert len(paths) == 1
    return pq.ParquetFile(paths[0]), most


def _writer_rows(n):
    rng = np.random.default_rng(0)
    return [{"product_id": f"p{i}", "vector": rng.random(4, dtype=np.float32),
             "image_vector": None if i % 7 == 0 else rng.random(4, dtype=np.float32),
             "description": "d" * (i % 50)} for i in range(n)]


def test_shard_writer_buffers_arrow_batches_and_writes_full_row_groups(tmp_path):
    rows = _writer_rows(250)
    pf, most = _drive_writer(tmp_path, rows, rows_per_group=100, batch_rows=16)
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)] == [100, 100, 50]
    assert most < 16  # Python row dicts are converted to Arrow every 16 rows, never accumulated per row group
    t = pf.read()
    assert t.column("product_id").to_pylist() == [r["product_id"] for r in rows]
    got = t.column("image_vector").to_pylist()
    for r, g in zip(rows, got):
        assert (g is None) == (r["image_vector"] is None)
        if g is not None:
            np.testing.assert_array_equal(np.asarray(g, np.float32), r["image_vector"])
    np.testing.assert_array_equal(np.asarray(t.column("vector").to_pylist(), np.float32),
                                  np.stack([r["vector"] for r in rows]))


def test_shard_writer_flushes_early_when_the_buffer_reaches_its_byte_cap(tmp_path):
    rows = _writer_rows(200)
    pf, _ = _drive_writer(tmp_path, rows, rows_per_group=1000, batch_rows=10, max_buffer_bytes=2000)
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    assert sum(sizes) == 200 and len(sizes) > 1 and max(sizes) < 1000
    assert pf.read().column("product_id").to_pylist() == [r["product_id"] for r in rows]
