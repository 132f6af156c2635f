"""shopvec finetune / eval / tune-fusion on a small synthetic aligned task with the tiny seeded model.

The task: 64 products, each a coloured picture with a grey circle or square, described as "a <colour> <shape>";
label = colour. Random-init tiny towers see colour in both modalities, so a few epochs of contrastive training on
(image, text) pairs must align them: the training loss falls and validation text->image recall rises.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

pytest.importorskip("safetensors")

from embedders.errors import UserError  # noqa: E402
from embedders.finetune import (CCA, CatalogItem, FinetuneConfig, Trainer, finetune, split_ids,  # noqa: E402
                                split_of)

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 220, 30),
          "purple": (140, 40, 180), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245)}
SHAPES = ("circle", "square")
FUSION = {"mode": "sum", "weights": {"image": 1.0, "text": 1.0, "reviews": 0.5}}


def synthetic_items(n: int = 64, seed: int = 0) -> list[CatalogItem]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    names = list(COLORS)
    out = []
    for i in range(n):
        c, s = names[i % len(names)], SHAPES[(i // len(names)) % 2]
        img = Image.new("RGB", (64, 64), COLORS[c])
        d = ImageDraw.Draw(img)
        x0, y0 = (int(v) for v in rng.integers(4, 24, 2))
        size = int(rng.integers(20, 36))
        (d.ellipse if s == "circle" else d.rectangle)([x0, y0, x0 + size, y0 + size], fill=(128, 128, 128))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(CatalogItem(f"p{i:03d}", f"a {c} {s}", buf.getvalue(), label=c))
    return out


def small_cfg(**kw) -> FinetuneConfig:
    base = dict(epochs=6, split=(0.5, 0.25, 0.25), batch_size=16, lr=1e-3, dim=32, k=5, feature_batch_size=64,
                min_epochs=1, patience=20, block_scale_grid=(0.0, 1.0))
    base.update(kw)
    return FinetuneConfig(**base)


def evaluator():
    from index.evaluate import evaluate_modalities

    return evaluate_modalities


# ---------------------------------------------------------------------------------------------------------------
def test_split_is_deterministic_and_stable():
    ids = [f"id-{i}" for i in range(5000)]
    a = split_ids(ids, seed=0)
    assert a == split_ids(list(ids), seed=0)
    fr = {k: len(v) / len(ids) for k, v in a.items()}
    assert abs(fr["train"] - 0.7) < 0.03 and abs(fr["val"] - 0.1) < 0.02 and abs(fr["test"] - 0.2) < 0.03
    # a product's split never depends on the other products
    sub = split_ids(ids[::7], seed=0)
    assert all(split_of(p) == s for s, ps in sub.items() for p in ps)
    assert all(pid in a[split_of(pid)] for pid in ids[:50])
    assert split_ids(ids, seed=1) != a
    # known values pin the hash scheme (changing it would silently move products between splits)
    assert [split_of(f"id-{i}") for i in range(8)] == [split_of(f"id-{i}", 0, (0.7, 0.1, 0.2)) for i in range(8)]
    with pytest.raises(UserError):
        split_of("x", fractions=(0.5, 0.5, 0.5))


def test_config_validation():
    with pytest.raises(UserError, match="mode"):
        FinetuneConfig.from_dict({"mode": "everything"})
    with pytest.raises(UserError, match="unknown"):
        FinetuneConfig.from_dict({"learning_rate": 1})
    c = FinetuneConfig.from_dict({"cca_reg_image": 5, "split": [0.6, 0.2, 0.2]})
    assert c.cca_reg_image == (5,) and c.split == (0.6, 0.2, 0.2)


def test_cca_recovers_a_shared_latent():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 3))
    x = z @ rng.normal(size=(3, 12)) + 0.1 * rng.normal(size=(400, 12))
    y = z @ rng.normal(size=(3, 7)) + 0.1 * rng.normal(size=(400, 7))
    x -= x.mean(0)
    y -= y.mean(0)
    wx, wy, corr = CCA(x, y).solve(1e-3, 1e-3, 3, 0.0)
    assert corr.shape == (3,) and (corr > 0.95).all()
    px, py = x @ wx, y @ wy
    for j in range(3):
        assert np.corrcoef(px[:, j], py[:, j])[0, 1] > 0.95


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run (random heads, InfoNCE only) shared by the checks below."""
    from embedders.models import ModelSpec

    out = tmp_path_factory.mktemp("ft") / "ckpt"
    items = synthetic_items()
    res = finetune(ModelSpec(name="shopvec-tiny"), items, small_cfg(init="random"), str(out), fusion=FUSION,
                   evaluator=evaluator(), label="category")
    return items, res


def test_short_finetune_lowers_loss_and_raises_validation_recall(trained):
    _, res = trained
    hist = res.manifest["training"]["history"]
    assert len(hist) == 6
    assert hist[-1]["loss"] < hist[0]["loss"]
    val = res.manifest["training"]["validation"]
    assert val["after"]["recall"] > val["before"]["recall"]
    assert all(h["samples_per_s"] > 0 for h in hist)
    m = res.manifest["metrics"]
    assert set(m) >= {"before", "after"}
    for key in ("item_to_item", "text_to_image", "coverage@5", "per_label"):
        assert key in m["after"]
    assert m["after"]["text_to_image"]["precision@5"] > m["before"]["text_to_image"]["precision@5"]


def test_manifest_records_provenance(trained):
    _, res = trained
    m = res.manifest
    assert m["base_model"]["spec"]["name"] == "shopvec-tiny" and m["base_model"]["random_init"] is True
    assert len(m["data"]["hash"]) == 64 and m["split"]["fractions"] == [0.5, 0.25, 0.25]
    assert sum(m["split"]["counts"].values()) == 64
    assert m["hyper_parameters"]["lr"] == 1e-3 and m["code_version"]
    with open(f"{res.out_dir}/manifest.json") as f:
        assert json.load(f)["metrics"]["after"] == json.loads(json.dumps(m["metrics"]["after"]))
    with open(f"{res.out_dir}/shopvec_model.json") as f:
        mj = json.load(f)
    assert mj["builder"] == "offline" and mj["aligned"] is True
    from embedders.models import ModelSpec
    from embedders.offline import is_aligned, output_dims

    assert is_aligned(ModelSpec(name=f"local-dir:{res.out_dir}")) is True
    assert output_dims(ModelSpec(name=f"local-dir:{res.out_dir}")) == (mj["image_dim"], mj["text_dim"])


def test_checkpoint_loads_and_reproduces_the_trained_vectors(trained):
    """encode_image/encode_text of the loaded checkpoint == what the trainer evaluated (same features path)."""
    from embedders.encoder import Encoder
    from embedders.models import ModelSpec, load_model

    items, res = trained
    lm = load_model(ModelSpec(name=f"local-dir:{res.out_dir}"))
    assert lm.aligned and lm.image_dim == lm.text_dim == res.vectors["image"].shape[1]
    enc = Encoder(lm)
    img = enc.encode_images([it.image for it in items[:10]])
    txt = enc.encode_texts([it.text for it in items[:10]])
    np.testing.assert_allclose(img, res.vectors["image"][:10], atol=2e-5)
    np.testing.assert_allclose(txt, res.vectors["text"][:10], atol=2e-5)


def test_damaged_checkpoint_is_refused(trained, tmp_path):
    import shutil

    from embedders.models import ModelSpec, load_model

    _, res = trained
    bad = tmp_path / "bad"
    shutil.copytree(res.out_dir, bad)
    with open(bad / "heads.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(UserError, match="sha256"):
        load_model(ModelSpec(name=f"local-dir:{bad}"))


def test_resume_continues_where_it_stopped(tmp_path, monkeypatch):
    from embedders.models import ModelSpec, load_model

    items = synthetic_items(32)
    cfg = small_cfg(init="random", epochs=3, split=(0.6, 0.2, 0.2), batch_size=8, flip_views=False)
    spec = ModelSpec(name="shopvec-tiny")
    loaded = load_model(spec)
    straight = finetune(spec, items, cfg, str(tmp_path / "a"), fusion=FUSION, loaded=loaded)

    real_epoch = Trainer._epoch

    def interrupted(self, epoch, *a, **kw):
        if epoch == 3:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, *a, **kw)

    monkeypatch.setattr(Trainer, "_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(spec, items, cfg, str(tmp_path / "b"), fusion=FUSION, loaded=load_model(spec))
    assert (tmp_path / "b" / ".train_state" / "state.json").is_file()
    monkeypatch.setattr(Trainer, "_epoch", real_epoch)
    resumed = finetune(spec, items, cfg, str(tmp_path / "b"), fusion=FUSION, resume=True, loaded=load_model(spec))
    assert [h["epoch"] for h in resumed.manifest["training"]["history"]] == [1, 2, 3]
    assert [h["loss"] for h in resumed.manifest["training"]["history"]] == pytest.approx(
        [h["loss"] for h in straight.manifest["training"]["history"]], rel=1e-5)
    np.testing.assert_allclose(resumed.vectors["text"], straight.vectors["text"], atol=1e-5)
    with pytest.raises(UserError, match="resume"):
        cfg2 = small_cfg(init="random", epochs=3, split=(0.6, 0.2, 0.2), batch_size=8, lr=0.5, flip_views=False)
        monkeypatch.setattr(Trainer, "_epoch", interrupted)
        try:
            finetune(spec, items, cfg, str(tmp_path / "c"), fusion=FUSION, loaded=load_model(spec))
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(Trainer, "_epoch", real_epoch)
        finetune(spec, items, cfg2, str(tmp_path / "c"), fusion=FUSION, resume=True, loaded=load_model(spec))


def test_too_few_pairs_is_a_user_error(tmp_path):
    from embedders.models import ModelSpec

    items = [CatalogItem("a", "a red circle", None), CatalogItem("b", None, synthetic_items(1)[0].image)]
    with pytest.raises(UserError, match="training products"):
        finetune(ModelSpec(name="shopvec-tiny"), items, small_cfg(), str(tmp_path / "x"), fusion=FUSION)


def test_infonce_is_log_n_for_uninformative_vectors():
    import torch

    from embedders.finetune import infonce

    z = torch.nn.functional.normalize(torch.ones(4, 3), dim=-1)
    assert float(infonce(z, z, torch.tensor(10.0))) == pytest.approx(math.log(4), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint through the real embed pipeline, then eval / report / tune-fusion from the command line
@pytest.fixture(scope="module")
def embedded(trained, tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.config import load_config
    from pipelines.embed import run_embed

    items, res = trained
    d = tmp_path_factory.mktemp("rt")
    products = d / "products.parquet"
    pq.write_table(pa.table({"product_id": [it.product_id for it in items], "title": [it.text for it in items],
                             "image": pa.array([it.image for it in items], pa.binary()),
                             "category": [it.label for it in items]}), products)
    cfg = load_config("configs/demo.toml", [f'model.name="local-dir:{res.out_dir}"', 'fusion.mode="sum"',
                                            "fusion.weights={image=1.0, text=1.0, reviews=0.5}"])
    out = d / "out"
    report = run_embed(cfg, str(products), None, str(out), runner="DirectRunner")
    return items, res, str(out), report, str(products)


def test_embed_with_the_checkpoint_reproduces_the_trainer_vectors(embedded):
    import pyarrow.parquet as pq

    from index.evaluate import fuse_rows

    items, res, out, report, _ = embedded
    assert report["counts"]["embedded"] == len(items)
    t = pq.read_table(f"{out}/embeddings").to_pydict()
    pos = {pid: i for i, pid in enumerate(res.ids)}
    rows = [pos[p] for p in t["product_id"]]
    np.testing.assert_allclose(np.asarray(t["image_vector"], np.float32), res.vectors["image"][rows], atol=2e-5)
    np.testing.assert_allclose(np.asarray(t["text_vector"], np.float32), res.vectors["text"][rows], atol=2e-5)
    fused = fuse_rows({"image": res.vectors["image"], "text": res.vectors["text"]}, FUSION)
    np.testing.assert_allclose(np.asarray(t["vector"], np.float32), fused[rows], atol=2e-5)
    meta = json.loads(pq.read_schema(f"{out}/embeddings/{__import__('os').listdir(f'{out}/embeddings')[0]}")
                      .metadata[b"shopvec"])
    assert meta["aligned"] is True


def test_eval_cli_json_report_with_thumbnails(embedded, tmp_path, capsys):
    from pipelines.cli import main

    _, res, out, _, _ = embedded
    html = tmp_path / "eval.html"
    assert main(["eval", "--embeddings", out, "--label", "category", "--k", "5", "--report", str(html),
                 "--json", "--samples", "4"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert set(m["item_to_item"]) == {"image", "text", "reviews", "fused"} and m["item_to_item"]["reviews"] is None
    assert set(m["item_to_item"]["fused"]) == {"precision@5", "ndcg@5", "map"}
    assert set(m["text_to_image"]) >= {"recall@5", "precision@5"} and m["text_to_image"]["recall@5"] is not None
    assert 0 < m["coverage@5"] <= 1 and set(m["per_label"]) == set(COLORS) and m["ann"] is None
    page = html.read_text()
    assert page.count("data:image/jpeg;base64,") >= 4 * (1 + 5)
    assert "✓" in page and "<svg" in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # test-split queries only: fewer queries, same catalog
    assert main(["eval", "--embeddings", out, "--label", "category", "--k", "5", "--queries", "test",
                 "--split", "0.5,0.25,0.25", "--json", "--no-map"]) == 0
    m2 = json.loads(capsys.readouterr().out)
    assert m2["meta"]["queries"] < m["meta"]["queries"] and m2["item_to_item"]["fused"]["map"] is None
    # the text->image figures on the test split are the ones the trainer reported (same vectors, same queries)
    t2i = res.manifest["metrics"]["after"]["text_to_image"]
    assert m2["text_to_image"]["recall@5"] == pytest.approx(t2i["recall@5"], abs=1e-6)


def test_eval_with_an_index_measures_ann_against_exact(embedded, tmp_path, capsys):
    from pipelines.cli import main

    _, _, out, _, _ = embedded
    root = tmp_path / "index"
    assert main(["index", "--embeddings", out, "--out", str(root), "--index-key", "HNSW8", "-k", "5",
                 "--allow-below-target"]) == 0
    capsys.readouterr()
    assert main(["eval", "--embeddings", out, "--label", "category", "--k", "5", "--index", str(root), "--json",
                 "--no-map"]) == 0
    ann = json.loads(capsys.readouterr().out)["ann"]
    assert ann["queries"] == 64 and 0.5 <= ann["recall@5"] <= 1.0
    assert ann["precision_lost@5"] == pytest.approx(ann["exact_precision@5"] - ann["precision@5"], abs=1e-6)


def test_eval_and_tune_fusion_errors_are_one_line(embedded, tmp_path, capsys):
    from pipelines.cli import main

    _, _, out, _, _ = embedded
    assert main(["eval", "--embeddings", out, "--label", "colour"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--label 'colour'" in err[0] and "category" in err[0]
    assert main(["eval", "--embeddings", str(tmp_path / "nope"), "--label", "category"]) == 2
    assert "not found" in capsys.readouterr().err


def test_tune_fusion_cli_writes_a_snippet(embedded, tmp_path, capsys):
    import tomllib

    from pipelines.cli import main

    _, _, out, _, _ = embedded
    snippet = tmp_path / "fusion.toml"
    assert main(["tune-fusion", "--embeddings", out, "--label", "category", "--k", "5", "--step", "0.25",
                 "--split", "0.5,0.25,0.25", "--out", str(snippet), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["modes"]) == {"sum", "concat"}  # aligned checkpoint: one shared space
    assert res["test"]["precision@5"] is not None and "equal_weights_precision@5" in res["test"]
    cfg = tomllib.loads(snippet.read_text())["fusion"]
    assert cfg == {"mode": res["chosen"]["mode"], "weights": res["chosen"]["weights"]}
    from pipelines.config import load_config

    merged = load_config("configs/demo.toml", [f'fusion.mode="{cfg["mode"]}"'])  # the snippet's keys are valid
    assert merged.fusion.mode == cfg["mode"]


def test_block_scale_search_layout_equals_the_heads_output():
    """The fast path of the block-scale search builds exactly what AlignmentHeads.embed outputs."""
    import torch

    from embedders.finetune import FeatureSet, block_parts, scaled_vectors
    from embedders.offline import make_heads

    rng = np.random.default_rng(0)
    img = rng.normal(size=(7, 12)).astype(np.float32)
    txt = rng.normal(size=(7, 5)).astype(np.float32)
    img[2] = 0
    heads = make_heads(image_in=12, text_in=5, dim=4)
    with torch.no_grad():
        heads.image_mean.copy_(torch.from_numpy(rng.normal(size=12).astype(np.float32) * 0.1))
    feats = FeatureSet([str(i) for i in range(7)], [None] * 7, img, txt)
    parts = block_parts(heads, feats)
    for bi, bt in ((0.0, 1.0), (1.5, 0.5), (3.0, 3.0)):
        heads.block_scales.copy_(torch.tensor([1.0, bi, bt]))
        fast = scaled_vectors(parts, bi, bt)
        with torch.no_grad():
            for which, mat in (("image", img), ("text", txt)):
                have = np.linalg.norm(mat, axis=1) > 0
                ref = torch.nn.functional.normalize(heads.embed(torch.from_numpy(mat[have]), which), dim=-1).numpy()
                np.testing.assert_allclose(fast[which][have], ref, atol=1e-6)
                assert not fast[which][~have].any()


@pytest.mark.parametrize("mode", ["lit", "full"])
def test_tower_modes_train_and_round_trip(mode, tmp_path):
    """lit (text tower trains) and full (both towers) save tower weights that load back to the same vectors."""
    from embedders.encoder import Encoder
    from embedders.models import ModelSpec, load_model

    items = synthetic_items(24)
    res = finetune(ModelSpec(name="shopvec-tiny"), items, small_cfg(mode=mode, epochs=1, split=(0.6, 0.2, 0.2),
                                                                   batch_size=8, tower_lr=1e-4),
                   str(tmp_path / mode), fusion=FUSION)
    assert (tmp_path / mode / "tower.safetensors").is_file()
    enc = Encoder(load_model(ModelSpec(name=f"local-dir:{tmp_path / mode}")))
    np.testing.assert_allclose(enc.encode_texts([it.text for it in items[:4]]), res.vectors["text"][:4], atol=2e-5)
    np.testing.assert_allclose(enc.encode_images([it.image for it in items[:4]]), res.vectors["image"][:4],
                               atol=2e-5)


def test_finetune_cli_reads_the_catalog_and_writes_a_checkpoint(embedded, tmp_path, capsys):
    from pipelines.cli import main

    _, _, _, _, products = embedded
    out = tmp_path / "ckpt"
    sets = ["finetune.epochs=2", "finetune.dim=16", "finetune.batch_size=16", "finetune.split=[0.5, 0.25, 0.25]",
            "finetune.block_scale_grid=[0.0, 1.0]", "finetune.k=5", 'fusion.mode="sum"']
    args = ["finetune", "--config", "configs/demo.toml", "--products", products, "--out", str(out),
            "--label", "category", "--json"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["out"] == str(out) and res["metrics"]["after"]["text_to_image"]["recall@5"] is not None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["label_column"] == "category" and manifest["data"]["products"] == 64
    assert manifest["hyper_parameters"]["epochs"] == 2
    assert main(["finetune", "--config", "configs/demo.toml", "--products", products, "--out", str(out),
                 "--label", "colour"]) == 2
    assert "--label 'colour'" in capsys.readouterr().err


def test_feature_cache_is_reused_only_for_the_same_data(tmp_path, caplog):
    import logging

    from embedders.models import ModelSpec, load_model

    items = synthetic_items(24)
    spec = ModelSpec(name="shopvec-tiny")
    cache = str(tmp_path / "feats.npz")
    cfg = small_cfg(epochs=1, split=(0.6, 0.2, 0.2), batch_size=8)
    a = finetune(spec, items, cfg, str(tmp_path / "a"), fusion=FUSION, loaded=load_model(spec), feature_cache=cache)
    with caplog.at_level(logging.INFO, logger="embedders.finetune"):
        b = finetune(spec, items, cfg, str(tmp_path / "b"), fusion=FUSION, loaded=load_model(spec),
                     feature_cache=cache)
    assert "reusing" in caplog.text
    np.testing.assert_array_equal(a.vectors["image"], b.vectors["image"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedders.finetune"):
        finetune(spec, items[:20], cfg, str(tmp_path / "c"), fusion=FUSION, loaded=load_model(spec),
                 feature_cache=cache)
    assert "recomputing" in caplog.text
