"""The nightly job end to end on a small demo catalog (40 rows, tiny seeded model).

The Beam embed pipeline runs as few times as possible: once for the shared baseline (module fixture), once for the
mixed-change scenario, once for the model change, and in the crash test. Gate tests use changes that need no
embedding (deletions, metadata), and a spy on ``run_embed`` asserts what would have been embedded.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import embed as embed_mod
from pipelines import incremental as inc
from pipelines.config import load_config
from pipelines.nightly import (EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_REFUSED, STAGES, Layout, NightlyResult,
                               RunLock, gate_drift, run_nightly)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 40
BASE_OVERRIDES = ["gates.max_dead_letter_pct=30", "gates.drift_canaries=2", "gates.recall_queries=40",
                  "index.keep_versions=10"]


# ------------------------------------------------------------------------------------------------------------------
# helpers
def overrides(root, *extra) -> list[str]:
    return [f'nightly.products="{root}/catalog/products.parquet"', f'nightly.reviews="{root}/catalog/reviews.parquet"',
            f'nightly.state_dir="{root}/state"', *BASE_OVERRIDES, *extra]


def config(root, *extra):
    return load_config(os.path.join(REPO, "configs", "nightly.toml"), overrides(root, *extra))


def read_state(root) -> dict:
    with open(os.path.join(root, "state", "state.json")) as f:
        return json.load(f)


def current(root) -> str | None:
    from index import store

    return store.read_current(os.path.join(root, "state", "index"))


def run_dir(root, run_id=None) -> str:
    return os.path.join(root, "state", "runs", run_id or read_state(root)["run_id"])


def vectors(rdir) -> dict[str, dict[str, bytes | None]]:
    t = pq.read_table(os.path.join(rdir, "embeddings"))
    out = {}
    cols = {c: t.column(c).to_pylist() for c in ("vector", "image_vector", "text_vector", "review_vector")}
    for i, pid in enumerate(t.column("product_id").to_pylist()):
        out[pid] = {c: None if cols[c][i] is None else np.asarray(cols[c][i], np.float32).tobytes() for c in cols}
    return out


def rows_of(rdir) -> dict[str, dict]:
    t = pq.read_table(os.path.join(rdir, "embeddings"))
    return {r["product_id"]: r for r in t.to_pylist()}


def tree_digest(path) -> dict[str, str]:
    out = {}
    for p in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def rewrite(path, fn) -> None:
    """Rewrite a Parquet file through ``fn(rows) -> rows`` keeping its schema and row-group size."""
    t = pq.read_table(path)
    rows = fn(t.to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), path, row_group_size=64)


def set_field(root, pid, **values) -> None:
    def fn(rows):
        for r in rows:
            if r["product_id"] == pid:
                r.update(values)
                return rows
        raise AssertionError(pid)
    rewrite(os.path.join(root, "catalog", "products.parquet"), fn)


class EmbedSpy:
    """Wraps run_embed: records which product ids each Beam run embedded (or refuses to be called)."""

    def __init__(self, monkeypatch, allow=True):
        self.calls: list[list[str]] = []
        self.allow = allow
        real = embed_mod.run_embed

        def spy(cfg, products, reviews, out, runner=None, beam_args=None):
            ids = pq.read_table(products, columns=["product_id"]).column("product_id").to_pylist()
            self.calls.append(ids)
            assert self.allow, f"run_embed was called for {ids} but nothing should be embedded"
            return real(cfg, products, reviews, out, runner=runner, beam_args=beam_args)

        monkeypatch.setattr(embed_mod, "run_embed", spy)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The demo catalog (40 rows with its bad records) after one full nightly run (published)."""
    from pipelines.demo_data import generate

    root = str(tmp_path_factory.mktemp("nightly_base"))
    gen = generate(os.path.join(root, "catalog"), n=N, seed=0)
    result = run_nightly(config(root))
    assert result.exit_code == EXIT_OK, result.report
    emb = rows_of(run_dir(root))
    bad = {b["product_id"] for b in gen["bad"]} | set(gen["special"].get("uri_file", [])) \
        | set(gen["special"].get("uri_path", [])) | {v for v in gen["special"].values() if isinstance(v, str)}
    regular = [p for p, r in emb.items() if r["modalities"] == "image+text+reviews" and p not in bad]
    return {"root": root, "gen": gen, "report": result.report, "regular": regular}


@pytest.fixture
def clone(base, tmp_path):
    """A private copy of the baseline catalog and state directory."""
    root = str(tmp_path)
    shutil.copytree(os.path.join(base["root"], "catalog"), os.path.join(root, "catalog"))
    shutil.copytree(os.path.join(base["root"], "state"), os.path.join(root, "state"))
    return root


# ------------------------------------------------------------------------------------------------------------------
def test_first_run_publishes_everything(base):
    rep, gen = base["report"], base["gen"]
    assert rep["status"] == "published" and rep["exit_code"] == 0
    c = rep["counts"]
    assert c["embedded"] == gen["expected"]["embedded"] == c["indexed"]
    assert c["reused"] == 0 and rep["plan"]["mode"] == "full"
    assert current(base["root"]) == rep["published_version"] == read_state(base["root"])["index_version"]
    assert [s["name"] for s in rep["stages"]] == list(STAGES)
    assert all(s["status"] == "ok" for s in rep["stages"])
    gates = {g["name"]: g for g in rep["gates"]}
    assert gates["row_count"]["skipped"] and gates["drift"]["skipped"] and gates["recall"]["passed"]
    # the merged output has the embed layout and the pipeline's dead letters
    rdir = run_dir(base["root"])
    assert os.path.isfile(os.path.join(rdir, "run_report.json")) and os.path.isfile(os.path.join(rdir, "keys.parquet"))
    dead = pq.read_table(os.path.join(rdir, "dead_letters")).to_pylist()
    assert sorted((d["product_id"], d["stage"]) for d in dead) == sorted((b["product_id"], b["stage"])
                                                                         for b in gen["bad"])
    assert os.path.isfile(os.path.join(base["root"], "state", "nightly_report.json"))


def test_scan_keys_equal_the_pipeline_hashes(demo_catalog, demo_embeddings, demo_config):
    """The incremental keys are the hashes the embed pipeline itself writes (same normalisation, same content)."""
    out, _ = demo_embeddings
    scan = inc.scan_catalog(demo_config, demo_catalog["products"], demo_catalog["reviews"])
    keys = {r["product_id"]: r for r in scan.keys.to_pylist()}
    emb = pq.read_table(os.path.join(out, "embeddings")).to_pylist()
    assert len(emb) > 40
    for r in emb:
        k = keys[r["product_id"]]
        if r["image_hash"] is not None:
            assert k["image_key"] == r["image_hash"], r["product_id"]
        assert k["text_key"] == r["text_hash"], r["product_id"]
        assert k["review_key"] == r["review_hash"], r["product_id"]
        assert k["review_count"] == r["review_count"]
        assert (k["rating_mean"] is None) == (r["rating_mean"] is None)
        if r["rating_mean"] is not None:
            assert k["rating_mean"] == pytest.approx(r["rating_mean"], rel=1e-12)
    dead = pq.read_table(os.path.join(out, "dead_letters")).to_pylist()
    assert sorted((d["product_id"], d["error"]) for d in dead if d["stage"] in ("validate", "dedup")) == \
        sorted((d["product_id"], d["error"]) for d in scan.dead_letters)
    # the scan's record normalisation is the pipeline's
    for v in (7, " P1 ", "", None, True, 3.0):
        assert inc._norm_id(v) == embed_mod._norm_id(v)
    for v in ("2024-05-01T10:00:00Z", "2024-05-01", "junk", None):
        assert inc._ts_seconds(v) == embed_mod._ts_seconds(v)
    for v in ("4.5", None, float("nan"), 3):
        assert inc._num(v) == embed_mod._num(v)
    fields = inc.meta_fields(scan.ptable)
    assert fields == embed_mod._arrow_meta_fields(scan.ptable)


def test_no_change_short_circuits(base):
    before = current(base["root"])
    res = run_nightly(config(base["root"]))
    assert res.exit_code == EXIT_OK and res.report["status"] == "no_change"
    assert "no change" in res.report["message"]
    assert [s["name"] for s in res.report["stages"]] == ["lock", "fingerprint"]
    assert current(base["root"]) == before
    assert res.report["duration_s"] < 0.2 * base["report"]["duration_s"]


def test_rewritten_files_with_same_content_are_no_change(clone):
    p = os.path.join(clone, "catalog", "products.parquet")
    rewrite(p, lambda rows: rows)
    os.utime(p, (1, 1))
    before = current(clone)
    res = run_nightly(config(clone))
    assert res.report["status"] == "no_change" and "rewritten" in res.report["message"]
    assert current(clone) == before
    res2 = run_nightly(config(clone))  # the new fingerprint was recorded: now it short-circuits at the first stage
    assert [s["name"] for s in res2.report["stages"]] == ["lock", "fingerprint"]


def test_force_republishes_without_embedding(clone, monkeypatch):
    spy = EmbedSpy(monkeypatch, allow=False)
    before = current(clone)
    res = run_nightly(config(clone), force=True)
    assert res.report["status"] == "published" and spy.calls == []
    assert current(clone) != before and res.report["counts"]["embedded"] == 0


def test_mixed_changes_reembed_exactly_the_changed_products(base, clone, monkeypatch):
    regular = base["regular"]
    t_title, t_image, t_review, t_price, t_cat, d1, d2 = regular[:7]
    prods = os.path.join(clone, "catalog", "products.parquet")
    revs = os.path.join(clone, "catalog", "reviews.parquet")
    old = rows_of(run_dir(clone))
    donor_image = pq.read_table(prods).to_pylist()[0]["image"]

    def edit(rows):
        out = []
        for r in rows:
            pid = r["product_id"]
            if pid == t_title:
                r["title"] = r["title"] + " (2025 edition)"
            elif pid == t_image:
                r["image"] = donor_image if r["image"] != donor_image else rows[1]["image"]
            elif pid == t_price:
                r["price"] = (r["price"] or 0) + 10.0
                r["in_stock"] = not r["in_stock"]
            elif pid == t_cat:
                r["category"] = "books" if r["category"] != "books" else "mugs"
            if pid not in (d1, d2):
                out.append(r)
        new = dict(out[0], product_id="P777777", title="A brand new product")
        return out + [new]

    rewrite(prods, edit)

    def edit_reviews(rows):
        for r in rows:
            if r["product_id"] == t_review and r["text"]:
                r["text"] = "Changed my mind: " + r["text"]
                return rows
        raise AssertionError("no review to change")

    rewrite(revs, edit_reviews)
    spy = EmbedSpy(monkeypatch)
    baseline_dir = run_dir(clone)
    baseline_files = tree_digest(baseline_dir)
    live_before = current(clone)
    res = run_nightly(config(clone))
    rep = res.report
    assert res.exit_code == EXIT_OK and rep["status"] == "published", rep["message"]

    # exactly the new and changed products went through the Beam pipeline (plus the unchanged canaries)
    assert len(spy.calls) == 1
    embedded = set(spy.calls[0])
    canaries = embedded - {t_title, t_image, t_review, "P777777"}
    assert {t_title, t_image, t_review, "P777777"} <= embedded and len(canaries) == 2
    c = rep["counts"]
    assert (c["new"], c["changed"], c["deleted"], c["embedded"]) == (1, 3, 2, 4)
    assert c["changed_by_modality"] == {"image": 1, "text": 1, "reviews": 1}
    assert c["metadata_only"] == 2 and c["canaries"] == 2
    assert c["reused"] == len(old) - 2 - 3
    dead_ids = {b["product_id"] for b in base["gen"]["bad"] if not b["embedded"]}
    assert not (embedded & dead_ids)  # dead, unchanged products are not retried

    # byte-identical reuse; changed ones differ in the changed modality; deletions gone; metadata refreshed
    new_dir = run_dir(clone)
    assert new_dir != baseline_dir
    a, b = vectors(baseline_dir), vectors(new_dir)
    for pid in set(a) - {t_title, t_image, t_review, d1, d2}:
        assert a[pid] == b[pid], pid
    assert a[t_title]["text_vector"] != b[t_title]["text_vector"]
    assert a[t_image]["image_vector"] != b[t_image]["image_vector"]
    assert a[t_review]["review_vector"] != b[t_review]["review_vector"]
    assert d1 not in b and d2 not in b and "P777777" in b
    new_rows = rows_of(new_dir)
    assert new_rows[t_price]["price"] == pytest.approx(old[t_price]["price"] + 10.0)
    assert new_rows[t_price]["in_stock"] != old[t_price]["in_stock"]
    assert new_rows[t_cat]["category"] != old[t_cat]["category"]
    assert new_rows[t_title]["title"].endswith("(2025 edition)")

    # published atomically; the previous run's embeddings untouched; drift gate measured the canaries
    assert current(clone) == rep["published_version"] != live_before
    assert tree_digest(baseline_dir) == baseline_files
    gates = {g["name"]: g for g in rep["gates"]}
    assert all(g["passed"] for g in gates.values())
    assert gates["drift"]["value"]["canaries"] == 2 and gates["drift"]["value"]["max_abs_diff"] <= 1e-4
    assert gates["row_count"]["value"] == pytest.approx(100 * (len(old) - (len(old) - 1)) / len(old), abs=0.01)
    from index.search import ProductIndex

    ix = ProductIndex.load(os.path.join(clone, "state", "index"))
    hits = ix.similar(t_price, k=5)
    assert len(hits) == 5 and t_price not in [h["product_id"] for h in hits]
    with pytest.raises(KeyError):
        ix.similar(d1, k=5)

    # report, delta vs the previous run, Prometheus textfile
    assert rep["delta_vs_previous_run"]["indexed"]["delta"] == -1
    prom = open(os.path.join(clone, "state", "metrics", "shopvec_nightly.prom")).read()
    assert 'shopvec_nightly_products{kind="embedded"} 4' in prom
    assert 'shopvec_nightly_last_run_status{status="published"} 1' in prom


def test_metadata_only_change_publishes_without_embedding(base, clone, monkeypatch):
    pid = base["regular"][0]
    old = rows_of(run_dir(clone))
    set_field(clone, pid, price=old[pid]["price"] + 1.5, in_stock=not old[pid]["in_stock"])
    spy = EmbedSpy(monkeypatch, allow=False)
    before = current(clone)
    res = run_nightly(config(clone))
    assert res.report["status"] == "published" and res.exit_code == EXIT_OK, res.report["message"]
    assert spy.calls == []
    stages = {s["name"]: s for s in res.report["stages"]}
    assert stages["embed"]["status"] == "skipped"
    assert res.report["counts"]["embedded"] == 0 and res.report["counts"]["metadata_only"] == 1
    assert current(clone) != before
    new = rows_of(run_dir(clone))
    assert new[pid]["price"] == pytest.approx(old[pid]["price"] + 1.5)
    from index.search import ProductIndex

    ix = ProductIndex.load(os.path.join(clone, "state", "index"))
    other = base["regular"][1]
    meta = {h["product_id"]: h for h in ix.similar(other, k=len(new) - 1)}
    assert meta[pid]["price"] == pytest.approx(old[pid]["price"] + 1.5)


def test_model_change_reembeds_everything(base, clone, monkeypatch):
    spy = EmbedSpy(monkeypatch)
    res = run_nightly(config(clone, "model.seed=1"))
    rep = res.report
    assert rep["status"] == "published", rep["message"]
    assert rep["plan"]["mode"] == "full" and "model" in rep["plan"]["reason"]
    assert len(spy.calls) == 1 and len(spy.calls[0]) == rep["counts"]["products"]
    assert rep["counts"]["reused"] == 0 and rep["counts"]["canaries"] == 0
    a, b = vectors(run_dir(base["root"])), vectors(run_dir(clone))
    assert set(a) == set(b) and all(a[p]["vector"] != b[p]["vector"] for p in a)
    assert {g["name"]: g for g in rep["gates"]}["drift"]["skipped"]


# ------------------------------------------------------------------------------------------------------------------
# gates: each refuses with a clear message, exit 3, CURRENT and state untouched
def _refused(root, res, gate):
    rep = res.report
    assert res.exit_code == EXIT_REFUSED and rep["status"] == "gate_refused", rep["message"]
    failed = [g for g in rep["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == [gate], failed
    assert gate in rep["message"]
    saved = json.load(open(os.path.join(root, "state", "nightly_report.json")))
    assert saved["status"] == "gate_refused"
    return failed[0]


def test_gate_row_count_drop(base, clone, capsys):
    from pipelines.cli import main

    before, state = current(clone), read_state(clone)
    rewrite(os.path.join(clone, "catalog", "products.parquet"), lambda rows: rows[: len(rows) // 2])
    rc = main(["nightly", "--config", os.path.join(REPO, "configs", "nightly.toml"),
               *sum((["--set", o] for o in overrides(clone)), [])])
    assert rc == EXIT_REFUSED
    out = capsys.readouterr().out
    assert "REFUSED" in out and "row_count" in out and "stages:" in out
    report = json.load(open(os.path.join(clone, "state", "nightly_report.json")))
    g = _refused(clone, NightlyResult(report, rc), "row_count")
    assert "row count falls from" in g["message"] and g["value"] > 10
    assert current(clone) == before and read_state(clone) == state
    prom = open(os.path.join(clone, "state", "metrics", "shopvec_nightly.prom")).read()
    assert 'shopvec_nightly_gate_failures_total{gate="row_count"} 1' in prom


def test_gate_dead_letter_fraction(base, clone, monkeypatch):
    pid = base["regular"][2]
    set_field(clone, pid, price=123.0)
    EmbedSpy(monkeypatch, allow=False)
    before = current(clone)
    res = run_nightly(config(clone, "gates.max_dead_letter_pct=5"))
    g = _refused(clone, res, "dead_letters")
    assert "dead-letter fraction" in g["message"] and g["value"] > 5
    assert current(clone) == before


def test_gate_recall_below_target(base, clone, monkeypatch):
    set_field(clone, base["regular"][3], price=5.0)
    EmbedSpy(monkeypatch, allow=False)
    before = current(clone)
    res = run_nightly(config(clone, 'index.key="PQ4x4"', "index.recall_target=0.1", "gates.min_recall=0.99"))
    g = _refused(clone, res, "recall")
    assert "min_recall 0.99" in g["message"] and g["value"] < 0.99
    assert current(clone) == before


def test_gate_drift_catches_reused_vectors_that_differ(base, clone, monkeypatch):
    """A merge that does not copy the previous vectors exactly is refused (the gate re-reads what was written)."""
    pid = base["regular"][4]
    set_field(clone, pid, price=9.0)
    EmbedSpy(monkeypatch, allow=False)
    real = inc.merge_embeddings

    def corrupting_merge(*a, **kw):
        report = real(*a, **kw)
        out = a[5] if len(a) > 5 else kw["out_dir"]
        files = sorted(glob.glob(os.path.join(out, "embeddings", "*.parquet")))
        t = pq.read_table(files[0])
        vec = t.column("vector").combine_chunks()
        flat = vec.values.to_numpy().copy()
        flat[0] += 1e-3  # first product's fused vector moves a little
        t = t.set_column(t.schema.get_field_index("vector"), t.schema.field("vector"),
                         pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), vec.type.list_size))
        pq.write_table(t, files[0])
        return report

    monkeypatch.setattr(inc, "merge_embeddings", corrupting_merge)
    res = run_nightly(config(clone))
    g = _refused(clone, res, "drift")
    assert "differ from the previous vectors" in g["message"]


def test_drift_gate_threshold_on_canaries():
    ident = {"checked": 10, "mismatched": [], "missing": []}
    ok = gate_drift(ident, {"n": 3, "max_abs_diff": 2e-6, "min_cosine": 1.0, "worst": "P1"}, 1e-4)
    bad = gate_drift(ident, {"n": 3, "max_abs_diff": 3e-2, "min_cosine": 0.98, "worst": "P2"}, 1e-4)
    assert ok.passed and not bad.passed
    assert "canary" in bad.message and "P2" in bad.message and "max_drift" in bad.message


def test_canary_drift_measures_fresh_vs_stored(base, tmp_path):
    """canary_drift on real embeddings: identical -> 0; a perturbed copy -> the perturbation."""
    src = run_dir(base["root"])
    dst = str(tmp_path / "delta")
    shutil.copytree(os.path.join(src, "embeddings"), os.path.join(dst, "embeddings"))
    ids = base["regular"][:3]
    assert inc.canary_drift(src, dst, ids)["max_abs_diff"] == 0.0
    f = sorted(glob.glob(os.path.join(dst, "embeddings", "*.parquet")))[0]
    t = pq.read_table(f)
    vec = t.column("vector").combine_chunks()
    flat = vec.values.to_numpy().copy()
    d = vec.type.list_size
    row = t.column("product_id").to_pylist().index(ids[1])
    flat[row * d] += 0.01
    t = t.set_column(t.schema.get_field_index("vector"), t.schema.field("vector"),
                     pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), d))
    pq.write_table(t, f)
    m = inc.canary_drift(src, dst, ids)
    assert m["n"] == 3 and m["worst"] == ids[1] and m["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)


def test_gate_golden_queries(base, clone, monkeypatch):
    from index.search import ProductIndex

    q = base["regular"][5]
    ix = ProductIndex.load(os.path.join(clone, "state", "index"))
    ranked = [h["product_id"] for h in ix.similar(q, k=30)]
    EmbedSpy(monkeypatch, allow=False)
    set_field(clone, base["regular"][6], price=1.0)
    good = f'gates.golden=[{{product_id="{q}", expected=["{ranked[0]}", "{ranked[1]}"], k=5}}]'
    res = run_nightly(config(clone, good))
    assert res.report["status"] == "published", res.report["message"]
    assert {g["name"]: g for g in res.report["gates"]}["golden"]["passed"]
    set_field(clone, base["regular"][6], price=2.0)
    bad = f'gates.golden=[{{product_id="{q}", expected=["{ranked[-1]}"], k=3}}]'
    res = run_nightly(config(clone, bad))
    g = _refused(clone, res, "golden")
    assert ranked[-1] in g["message"] and "top 3" in g["message"]


def test_failed_stage_is_reported_and_nothing_is_published(base, clone, monkeypatch):
    set_field(clone, base["regular"][7], price=3.0)
    EmbedSpy(monkeypatch, allow=False)
    before, state = current(clone), read_state(clone)
    res = run_nightly(config(clone, 'index.key="IVF4096,Flat"'))  # 40 vectors cannot train 4096 lists
    rep = res.report
    assert res.exit_code == EXIT_FAILED and rep["status"] == "failed"
    assert rep["error"]["stage"] == "index"
    assert {s["name"]: s["status"] for s in rep["stages"]}["index"] == "failed"
    assert current(clone) == before and read_state(clone) == state
    assert json.load(open(os.path.join(clone, "state", "nightly_report.json")))["status"] == "failed"


def test_busy_lock_exits_75_with_a_report(clone, capsys):
    from pipelines.cli import main

    holder = RunLock(Layout(os.path.join(clone, "state")).lock)
    holder.acquire("someone-else")
    try:
        rc = main(["nightly", "--config", os.path.join(REPO, "configs", "nightly.toml"),
                   *sum((["--set", o] for o in overrides(clone)), [])])
    finally:
        holder.release()
    assert rc == EXIT_LOCKED
    out = capsys.readouterr().out
    assert "another run holds the lock" in out
    reports = glob.glob(os.path.join(clone, "state", "reports", "*-locked.json"))
    assert len(reports) == 1 and json.load(open(reports[0]))["lock"]["holder"]["run_id"] == "someone-else"


def test_prometheus_textfile(base):
    path = os.path.join(base["root"], "state", "metrics", "shopvec_nightly.prom")
    text = open(path).read()
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? -?[0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    for name in ("shopvec_nightly_last_success_timestamp_seconds", "shopvec_nightly_last_run_duration_seconds",
                 "shopvec_nightly_products", "shopvec_nightly_gate_failures_total",
                 "shopvec_nightly_stage_duration_seconds"):
        assert f"\n{name}" in "\n" + text, name
    assert float(re.search(r"^shopvec_nightly_last_success_timestamp_seconds (\S+)$", text, re.M).group(1)) > 1e9
    assert not [p for p in os.listdir(os.path.dirname(path)) if p != "shopvec_nightly.prom"]  # no temp files left


# ------------------------------------------------------------------------------------------------------------------
# crash safety: kill -9 at several stages, then the next run succeeds without redoing trusted work
def _cli(root, env_extra=None, timeout=300):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pipelines.cli", "-q", "nightly", "--config",
           os.path.join(REPO, "configs", "nightly.toml"), *sum((["--set", o] for o in overrides(root)), [])]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_kill_9_at_every_stage_then_recover(base, clone):
    target = base["regular"][8]
    set_field(clone, target, title="Renamed product title")
    baseline = run_dir(clone)
    baseline_files = tree_digest(baseline)
    live, state = current(clone), read_state(clone)
    index_versions = tree_digest(os.path.join(clone, "state", "index", "versions"))

    def intact():
        assert current(clone) == live and read_state(clone) == state
        assert tree_digest(baseline) == baseline_files
        now = tree_digest(os.path.join(clone, "state", "index", "versions"))
        assert {k: v for k, v in now.items() if k in index_versions} == index_versions

    ck = os.path.join(clone, "state", "staging", "*", "checkpoints")
    for hook in (("SHOPVEC_NIGHTLY_CRASH_AFTER", "scan"), ("SHOPVEC_NIGHTLY_CRASH_DURING", "embed"),
                 ("SHOPVEC_NIGHTLY_CRASH_AFTER", "embed"), ("SHOPVEC_NIGHTLY_CRASH_AFTER", "merge"),
                 ("SHOPVEC_NIGHTLY_CRASH_AFTER", "index"), ("SHOPVEC_NIGHTLY_CRASH_AFTER", "gates")):
        before = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(ck, "*.json"))}
        p = _cli(clone, {hook[0]: hook[1]})
        assert p.returncode == -signal.SIGKILL, (hook, p.returncode, p.stderr[-2000:])
        intact()
        # work already checkpointed was trusted, not redone
        after = {p_: os.stat(p_).st_mtime_ns for p_ in glob.glob(os.path.join(ck, "*.json"))}
        assert all(after.get(k) == v for k, v in before.items()), (hook, before, after)
        if hook == ("SHOPVEC_NIGHTLY_CRASH_AFTER", "embed"):
            assert any(k.endswith("embed.json") for k in after)

    # killed inside the store's publish: the version is placed under versions/ but CURRENT was not switched
    p = _cli(clone, {"SHOPVEC_NIGHTLY_CRASH_AFTER": "publish:before-switch"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    intact()
    orphan = [v for v in os.listdir(os.path.join(clone, "state", "index", "versions"))
              if not any(k.startswith(v + os.sep) for k in index_versions)]
    assert len(orphan) == 1

    # killed right after CURRENT switched, before state.json: the next run adopts the published version
    p = _cli(clone, {"SHOPVEC_NIGHTLY_CRASH_AFTER": "publish:switched"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    switched = current(clone)
    assert switched not in (live, orphan[0]) and read_state(clone) == state
    assert tree_digest(baseline) == baseline_files

    p = _cli(clone)
    assert p.returncode == EXIT_OK, p.stdout + p.stderr[-2000:]
    rep = json.load(open(os.path.join(clone, "state", "nightly_report.json")))
    assert rep["status"] == "no_change" and any("recovered" in n for n in rep["notes"]), rep
    assert any("ended without releasing the lock" in n for n in rep["notes"])
    assert read_state(clone)["index_version"] == switched == current(clone)
    a, b = vectors(baseline), vectors(run_dir(clone))
    assert a[target]["text_vector"] != b[target]["text_vector"]
    assert all(a[p_] == b[p_] for p_ in a if p_ != target)
    assert tree_digest(baseline) == baseline_files  # the previous embeddings are still there, intact
    assert not glob.glob(os.path.join(clone, "state", "staging", "*"))
