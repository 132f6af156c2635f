"""Tests for the deterministic demo catalog generator (``pipelines/demo_data.py``, ``shopvec demo-data``)."""
from __future__ import annotations

import hashlib
import io
import os
import re
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedders.errors import UserError
from pipelines import demo_data
from pipelines.demo_data import CATEGORIES, generate


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo_a"))
    t0 = time.perf_counter()
    res = generate(out, n=200, seed=0)
    res["_seconds"] = time.perf_counter() - t0
    res["_sha"] = (_sha(res["products"]), _sha(res["reviews"]))
    res["_products"] = pq.read_table(res["products"])
    res["_reviews"] = pq.read_table(res["reviews"])
    return res


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


# ------------------------------------------------------------------------------------------------ determinism, speed

def test_fast(demo):
    # the brief: n=200 in < 3 s (about 1 s here); a generous bound so a busy CI box does not flake
    assert demo["_seconds"] < 6.0, demo["_seconds"]


def test_byte_identical_on_rerun(demo):
    again = generate(os.path.dirname(demo["products"]), n=200, seed=0)
    assert (_sha(again["products"]), _sha(again["reviews"])) == demo["_sha"]


def test_other_directory_differs_only_in_image_uri(demo, tmp_path):
    other = generate(str(tmp_path), n=200, seed=0)
    assert _sha(other["reviews"]) == demo["_sha"][1]
    a, b = demo["_products"], pq.read_table(other["products"])
    assert a.drop(["image_uri"]).equals(b.drop(["image_uri"]))
    da, db = os.path.dirname(demo["products"]), os.path.dirname(other["products"])
    ua = [u for u in a.column("image_uri").to_pylist()]
    ub = [None if u is None else u.replace(db, da) for u in b.column("image_uri").to_pylist()]
    assert ua == ub


def test_seed_changes_content(tmp_path):
    a = generate(str(tmp_path / "s0"), n=30, seed=0)
    b = generate(str(tmp_path / "s1"), n=30, seed=1)
    ta, tb = pq.read_table(a["products"]), pq.read_table(b["products"])
    assert ta.column("title").to_pylist() != tb.column("title").to_pylist()
    assert ta.column("image").to_pylist() != tb.column("image").to_pylist()


def test_no_wall_clock_in_files(demo):
    meta = pq.ParquetFile(demo["products"]).schema_arrow.metadata
    assert b"shopvec_demo" in meta
    created = demo["_reviews"].column("created_at").to_pylist()
    years = {c.year for c in created if c is not None}
    assert years <= {2023, 2024, 2025}


# ------------------------------------------------------------------------------------------------ schema and counts

def test_products_schema_and_row_groups(demo):
    t = demo["_products"]
    assert t.schema.names == ["product_id", "title", "description", "image", "image_uri", "category", "price",
                              "brand", "in_stock"]
    want = {"product_id": pa.string(), "title": pa.string(), "description": pa.string(), "image": pa.binary(),
            "image_uri": pa.string(), "category": pa.string(), "price": pa.float64(), "brand": pa.string(),
            "in_stock": pa.bool_()}
    for name, typ in want.items():
        assert t.schema.field(name).type == typ, name
    assert t.num_rows == 200 == demo["n_products"]
    md = pq.ParquetFile(demo["products"]).metadata
    assert md.num_row_groups == 4
    assert all(md.row_group(i).num_rows <= 64 for i in range(md.num_row_groups))


def test_reviews_schema_and_row_groups(demo):
    t = demo["_reviews"]
    assert t.schema.names == ["product_id", "text", "rating", "helpful_votes", "created_at"]
    assert t.schema.field("rating").type == pa.int32()
    assert t.schema.field("helpful_votes").type == pa.int32()
    assert t.schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert t.num_rows == demo["n_reviews"]
    md = pq.ParquetFile(demo["reviews"]).metadata
    assert md.num_row_groups >= 2 and all(md.row_group(i).num_rows <= 64 for i in range(md.num_row_groups))


def test_product_values(demo):
    rows = _rows(demo["_products"])
    ids = [r["product_id"] for r in rows]
    assert all(re.fullmatch(r"P\d{6}", i) for i in ids)
    assert len(set(ids)) == demo["n_unique_ids"] == 199
    assert set(r["category"] for r in rows) == set(CATEGORIES)
    assert min(Counter(r["category"] for r in rows).values()) >= 15
    assert all(r["price"] > 0 and round(r["price"], 2) == r["price"] for r in rows)
    assert all(isinstance(r["in_stock"], bool) and r["brand"] for r in rows)
    titles = [r["title"] for r in rows if r["title"] and r["title"].strip()]
    assert 30 <= np.mean([len(t) for t in titles]) <= 120
    descs = [r["description"] for r in rows if r["description"]]
    assert len(descs) >= 150 and max(len(d) for d in descs) > 600  # some exceed the text tower's context


def test_unicode_present(demo):
    text = " ".join((r["title"] or "") + " " + (r["description"] or "") for r in _rows(demo["_products"]))
    assert "Café" in text
    assert re.search(r"[\uff01-\uff5e]", text), "full-width characters"
    assert re.search(r"[\U0001F300-\U0001FAFF\u2b50]", text), "an emoji"
    assert "e\u0301" in text, "a decomposed accent (NFC normalisation test)"


def test_reviews_values(demo):
    rows = _rows(demo["_reviews"])
    catalog = set(demo["_products"].column("product_id").to_pylist())
    special = demo["special"]
    per = Counter(r["product_id"] for r in rows if r["product_id"] in catalog)
    extra = {special["null_fields_reviews"]: 3, special["null_text_reviews"]: 2}
    assert all(0 <= c - extra.get(p, 0) <= 6 for p, c in per.items())
    ratings = [r["rating"] for r in rows if r["rating"] is not None]
    assert set(ratings) <= {1, 2, 3, 4, 5} and len(set(ratings)) == 5
    assert all(v is None or v >= 0 for v in (r["helpful_votes"] for r in rows))
    assert demo["n_reviews_valid"] == sum(per.values()) - 2


def test_review_text_matches_category(demo):
    cat = dict(zip(demo["_products"].column("product_id").to_pylist(), demo["_products"].column("category").to_pylist()))
    words = {"shoes": ("sole", "size", "blister", "runs", "laces", "light"), "mugs": ("coffee", "mug", "handle",
             "glaze", "dishwasher", "wash", "rim", "photo"), "books": ("read", "plot", "written", "recipes", "print",
             "pages", "typos", "ending", "put it down")}
    hits = total = 0
    for r in _rows(demo["_reviews"]):
        c = cat.get(r["product_id"])
        if r["text"] and c in words:
            total += 1
            hits += any(w in r["text"].lower() for w in words[c])
    assert total > 50 and hits / total > 0.95


# ------------------------------------------------------------------------------------------------ images

def _shape_signature(img: Image.Image) -> np.ndarray | None:
    a = np.asarray(img.convert("RGB"), np.float32)
    fg = np.abs(a - a[:, :1, :]).max(-1) > 40  # background = the row's left-edge colour (vertical gradient)
    ys, xs = np.nonzero(fg)
    if len(ys) == 0:
        return None
    crop = fg[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255
    m = np.asarray(Image.fromarray(crop).resize((16, 16), Image.BILINEAR), np.float32) / 255
    return np.concatenate([m.ravel(), [2.0 * (np.ptp(xs) + 1) / (np.ptp(ys) + 1)]])


def test_images_are_real_small_and_category_specific(demo):
    bad_ids = {b["product_id"] for b in demo["bad"]}
    feats, labels, sizes = [], [], []
    for i, r in enumerate(_rows(demo["_products"])):
        if r["image"] is None or r["product_id"] in bad_ids:
            continue
        img = Image.open(io.BytesIO(r["image"]))
        assert img.format in ("JPEG", "PNG")
        img.load()
        assert 96 <= min(img.size) and max(img.size) <= 160
        if img.format == "JPEG":
            sizes.append(len(r["image"]))
        sig = _shape_signature(img)
        assert sig is not None, r["product_id"]
        feats.append(sig)
        labels.append(r["category"])
    assert len(feats) >= 180
    assert 2500 <= np.median(sizes) <= 8000 and max(sizes) < 12000
    # nearest centroid on the object's silhouette: one category's pictures look alike and unlike the others
    X, y = np.stack(feats), np.array(labels)
    train, test = np.arange(len(X)) % 2 == 0, np.arange(len(X)) % 2 == 1
    cents = np.stack([X[train & (y == c)].mean(0) for c in CATEGORIES])
    pred = np.array(CATEGORIES)[((X[test][:, None, :] - cents[None]) ** 2).sum(-1).argmin(1)]
    acc = (pred == y[test]).mean()
    assert acc >= 0.8, acc


def test_draw_product_deterministic():
    import random
    a = demo_data.draw_product("mugs", (30, 138, 140), random.Random(5), noise_seed=1)
    b = demo_data.draw_product("mugs", (30, 138, 140), random.Random(5), noise_seed=1)
    assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------------------------ bad / edge records

def test_expected_dead_letters_n200_seed0(demo):
    """Pins the table documented in the module docstring."""
    assert demo["expected"]["dead_letter_keys"] == sorted([
        ("P000010", "image", "not_an_image"), ("P000034", "image", "corrupt_image"),
        ("P000058", "image", "image_not_found"), ("P000082", "fuse", "no_usable_modality"),
        ("P000106", "image", "decompression_bomb"), ("P000004", "dedup", "duplicate_id")])
    assert demo["expected"]["embedded"] == 198 and demo["expected"]["partial"] == 4
    assert demo["bad_reviews"] == {"orphan": 3, "orphan_product_ids": ["P000217", "P000242"], "null_text": 2,
                                   "null_text_product_id": "P000166"}
    sp = demo["special"]
    assert (sp["uri_file"], sp["uri_path"]) == (["P000022", "P000130", "P000178"], ["P000070", "P000154"])
    assert (sp["text_only"], sp["image_only"], sp["review_only"]) == ("P000046", "P000094", "P000118")


def test_bad_records_have_their_defects(demo):
    rows = _rows(demo["_products"])
    reviews = _rows(demo["_reviews"])
    reviewed = Counter(r["product_id"] for r in reviews)
    for b in demo["bad"]:
        r = rows[b["row"]]
        assert r["product_id"] == b["product_id"]
        if b["kind"] == "not_an_image":
            assert r["title"] and r["image"]
            with pytest.raises(Exception):
                Image.open(io.BytesIO(r["image"]))
        elif b["kind"] == "truncated_jpeg":
            assert r["title"] and r["image"][:2] == b"\xff\xd8" and not r["image"].endswith(b"\xff\xd9")
            img = Image.open(io.BytesIO(r["image"]))
            with pytest.raises(OSError):
                img.load()
        elif b["kind"] == "missing_uri_file":
            assert r["title"] and r["image"] is None and r["image_uri"].startswith("file://")
            assert not os.path.exists(r["image_uri"][len("file://"):])
        elif b["kind"] == "no_usable_modality":
            assert (r["title"] or "").strip() == "" and r["description"] is None
            assert r["image"] is None and r["image_uri"] is None
            assert reviewed[r["product_id"]] == 0
        elif b["kind"] == "decompression_bomb":
            assert r["title"] and len(r["image"]) < 16_000
            img = Image.open(io.BytesIO(r["image"]))  # header only
            assert img.size[0] * img.size[1] > demo["expected"]["max_pixels"]
            assert img.size[0] * img.size[1] > 40_000_000  # also above embedders' ImageLimits default
        elif b["kind"] == "duplicate_id":
            assert b["kept_row"] < b["row"]
            first = rows[b["kept_row"]]
            assert first["product_id"] == r["product_id"] and first["title"] != r["title"]
        else:  # pragma: no cover
            raise AssertionError(b)
    assert sum(1 for r in rows if r["product_id"] == "P000004") == 2


def test_bad_reviews(demo):
    catalog = set(demo["_products"].column("product_id").to_pylist())
    rows = _rows(demo["_reviews"])
    orphans = [r for r in rows if r["product_id"] not in catalog]
    assert len(orphans) == 3 and {r["product_id"] for r in orphans} == set(demo["bad_reviews"]["orphan_product_ids"])
    assert rows[-1]["product_id"] in catalog  # orphans are not conveniently at the end
    nulls = [r for r in rows if r["text"] is None]
    assert len(nulls) == 2 and {r["product_id"] for r in nulls} == {demo["bad_reviews"]["null_text_product_id"]}


def test_edge_rows(demo):
    rows = {r["product_id"]: r for r in _rows(demo["_products"])}
    reviewed = Counter(r["product_id"] for r in _rows(demo["_reviews"]))
    sp = demo["special"]
    for pid in sp["uri_file"] + sp["uri_path"]:
        r = rows[pid]
        assert r["image"] is None
        path = r["image_uri"][len("file://"):] if r["image_uri"].startswith("file://") else r["image_uri"]
        assert os.path.isabs(path) and r["image_uri"].startswith("file://") == (pid in sp["uri_file"])
        with Image.open(path) as img:
            img.load()
    t = rows[sp["text_only"]]
    assert t["image"] is None and t["image_uri"] is None and t["title"]
    i = rows[sp["image_only"]]
    assert i["title"] is None and i["description"] is None and i["image"]
    r = rows[sp["review_only"]]
    assert r["title"] is None and r["description"] is None and r["image"] is None and r["image_uri"] is None
    assert reviewed[sp["review_only"]] >= 3
    nf = [x for x in _rows(demo["_reviews"]) if x["product_id"] == sp["null_fields_reviews"]]
    assert any(x["rating"] is None for x in nf) and any(x["helpful_votes"] is None for x in nf)
    assert any(x["created_at"] is None for x in nf)
    assert sum(1 for x in rows.values() if x["image_uri"] is not None) == 6  # 5 good + the missing one


def test_no_bad_records(tmp_path):
    res = generate(str(tmp_path), n=40, seed=2, bad_records=False)
    assert res["bad"] == [] and res["bad_reviews"]["orphan"] == 0 and res["bad_reviews"]["null_text"] == 0
    t = pq.read_table(res["products"])
    ids = t.column("product_id").to_pylist()
    assert len(ids) == len(set(ids)) == 40 == res["expected"]["embedded"]
    for b in t.column("image").to_pylist():
        if b is not None:
            Image.open(io.BytesIO(b)).load()
    rv = pq.read_table(res["reviews"])
    assert set(rv.column("product_id").to_pylist()) <= set(ids)
    assert None not in rv.column("text").to_pylist()


def test_exact_review_count_and_small_n(tmp_path):
    res = generate(str(tmp_path / "a"), n=40, seed=0, n_reviews=50)
    assert res["n_reviews_valid"] == 50 + 3  # + the 3 null-field edge reviews
    assert res["n_reviews"] == 50 + 3 + 5    # + 3 orphans + 2 null-text
    small = generate(str(tmp_path / "b"), n=5, bad_records=False, n_reviews=0)
    assert pq.read_table(small["products"]).num_rows == 5 and pq.read_table(small["reviews"]).num_rows == 0
    with pytest.raises(UserError, match="--n 5"):
        generate(str(tmp_path / "c"), n=5)
    with pytest.raises(UserError):
        generate(str(tmp_path / "d"), n=0)


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_writes_files(tmp_path, capsys):
    from pipelines.cli import main
    out = tmp_path / "cli"
    assert main(["demo-data", "--out", str(out), "--n", "30", "--seed", "3"]) == 0
    stdout = capsys.readouterr().out
    assert str(out / "products.parquet") in stdout and str(out / "reviews.parquet") in stdout
    assert pq.read_table(out / "products.parquet").num_rows == 30
    assert (out / "images").is_dir()
    assert main(["demo-data", "--out", str(tmp_path / "nb"), "--n", "8", "--no-bad-records"]) == 0
    assert pq.read_table(tmp_path / "nb" / "products.parquet").num_rows == 8


def test_cli_user_error_is_one_line(tmp_path, capsys):
    from pipelines.cli import main
    assert main(["demo-data", "--out", str(tmp_path / "x"), "--n", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shopvec demo-data: error: --n 5")
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["demo-data", "--out", str(f)]) == 2
