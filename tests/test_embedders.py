"""Unit tests of the embedders library: images, text, fusion, models, encoder (no Beam)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from embedders.errors import RecordError, UserError
from embedders.fusion import (FusionConfig, ReviewConfig, aggregate_reviews, check_compatible, fuse, fused_dim,
                              modality_dims, query_vector, review_weights, select_reviews)
from embedders.images import ImageLimits, decode_image
from embedders.models import ModelSpec, load_model, output_dims
from embedders.text import clean_text, product_text
from tests import corpus


# ---------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("case", corpus.image_cases(), ids=lambda c: c.name)
def test_image_corpus(case):
    limits = ImageLimits(max_pixels=case.max_pixels or corpus.DEFAULT_CAP)
    if case.expect != "ok":
        with pytest.raises(RecordError) as e:
            decode_image(case.data, limits)
        assert e.value.error == case.expect
        return
    img = decode_image(case.data, limits)
    assert img.mode == "RGB"
    assert img.size == case.size
    for (x, y), rgb in case.probes:
        got = img.getpixel((x, y))
        assert all(abs(int(a) - int(b)) <= max(case.tol, 0) for a, b in zip(got, rgb)), (case.name, (x, y), got, rgb)


def test_bomb_is_never_decoded(monkeypatch):
    """The declared size is refused before any pixel is decoded."""
    from PIL import ImageFile

    called = []
    orig = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: called.append(1) or orig(self))
    with pytest.raises(RecordError) as e:
        decode_image(corpus.bomb_png().data, ImageLimits(max_pixels=corpus.DEFAULT_CAP))
    assert e.value.error == "decompression_bomb" and not called


def test_image_byte_cap():
    with pytest.raises(RecordError) as e:
        decode_image(corpus.tiny_png().data, ImageLimits(max_bytes=10))
    assert e.value.error == "image_too_large"


def test_large_jpeg_uses_draft_but_keeps_target_resolution():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000), (10, 20, 30)).save(buf, "JPEG")
    img = decode_image(buf.getvalue(), target_size=224)
    assert min(img.size) >= 224 and img.size[0] < 2000


# ---------------------------------------------------------------------------------------------------- text
def test_clean_text():
    assert clean_text(None) is None and clean_text(float("nan")) is None
    assert clean_text("   \t\n ") is None
    assert clean_text("Ｔｅａ  cup\u200b ") == "Tea cup"  # NFKC + zero-width removed + whitespace collapsed
    assert product_text(["Red mug", None, "  "]) == "Red mug"
    assert product_text([None, ""]) is None
    assert product_text(["Mug", "Great"], " | ") == "Mug | Great"


# ---------------------------------------------------------------------------------------------------- fusion
def _u(*v):
    a = np.asarray(v, np.float32)
    return a / np.linalg.norm(a)


def test_fuse_sum_formula_and_missing_modality():
    cfg = FusionConfig.from_dict({"mode": "sum", "weights": {"image": 2.0, "text": 1.0, "reviews": 1.0}})
    dims = modality_dims(3, 3)
    i, t, r = _u(1, 0, 0), _u(0, 1, 0), _u(0, 0, 1)
    v = fuse({"image": i, "text": t, "reviews": r}, cfg, dims)
    expect = (0.5 * i + 0.25 * t + 0.25 * r)
    np.testing.assert_allclose(v, expect / np.linalg.norm(expect), atol=1e-6)
    # reviews missing: weights renormalised over image+text
    v2 = fuse({"image": i, "text": t, "reviews": None}, cfg, dims)
    e2 = (2 / 3) * i + (1 / 3) * t
    np.testing.assert_allclose(v2, e2 / np.linalg.norm(e2), atol=1e-6)
    # single modality -> that modality's unit vector
    np.testing.assert_allclose(fuse({"text": t * 5}, cfg, dims), t, atol=1e-6)
    assert fuse({}, cfg, dims) is None
    assert fuse({"image": np.zeros(3)}, cfg, dims) is None


def test_fuse_concat_formula_and_zero_block():
    cfg = FusionConfig.from_dict({"mode": "concat", "weights": {"image": 0.3, "text": 1.0, "reviews": 0.5}})
    dims = modality_dims(2, 3)
    i, t = _u(1, 1), _u(1, 2, 2)
    v = fuse({"image": i, "text": t}, cfg, dims)
    raw = np.concatenate([math.sqrt(0.3) * i, t, np.zeros(3)])
    np.testing.assert_allclose(v, raw / np.linalg.norm(raw), atol=1e-6)
    assert v.shape == (fused_dim(cfg, dims),) == (8,)
    assert abs(np.linalg.norm(v) - 1) < 1e-6


def test_fusion_config_validation():
    with pytest.raises(UserError):
        FusionConfig.from_dict({"mode": "avg"})
    with pytest.raises(UserError):
        FusionConfig.from_dict({"weights": {"audio": 1.0}})
    with pytest.raises(UserError):
        FusionConfig.from_dict({"weights": {"image": 0, "text": 0, "reviews": 0}})
    with pytest.raises(UserError):
        check_compatible(FusionConfig.from_dict({"mode": "sum"}), modality_dims(1280, 384))
    with pytest.raises(UserError):
        check_compatible(FusionConfig.from_dict({"mode": "sum"}), modality_dims(8, 8), aligned=False)


def test_query_vector_concat_places_blocks():
    cfg = FusionConfig.from_dict({"mode": "concat", "weights": {"image": 1.0, "text": 1.0, "reviews": 1.0}})
    dims = modality_dims(2, 2)
    q = query_vector("text", _u(1, 0), cfg, dims, aligned=False)
    np.testing.assert_allclose(q, _u(0, 0, 1, 0, 1, 0), atol=1e-6)
    q = query_vector("image", _u(0, 1), cfg, dims, aligned=False)
    np.testing.assert_allclose(q, _u(0, 1, 0, 0, 0, 0), atol=1e-6)


def test_review_selection_and_weights():
    reviews = [{"text": "a", "helpful_votes": 1, "created_ts": 100.0},
               {"text": "b", "helpful_votes": 10, "created_ts": 50.0},
               {"text": "c", "helpful_votes": 1, "created_ts": 200.0},
               {"text": "d", "helpful_votes": None, "created_ts": None}]
    chosen = select_reviews(reviews, 3)
    assert [r["text"] for r in chosen] == ["b", "c", "a"]
    w = review_weights([{"helpful_votes": 0, "created_ts": 0.0}, {"helpful_votes": 0, "created_ts": 365 * 86400.0}],
                       365.0)
    np.testing.assert_allclose(w, [0.5, 1.0])
    agg = aggregate_reviews(np.stack([_u(1, 0), _u(0, 1)]), np.array([3.0, 1.0]))
    np.testing.assert_allclose(agg, _u(3, 1), atol=1e-6)
    with pytest.raises(UserError):
        ReviewConfig.from_dict({"max_per_product": 0})


# ---------------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelSpec())


def test_tiny_model_is_seeded_and_marked_random(tiny):
    assert tiny.random_init and "random-init" in tiny.model_id
    assert (tiny.image_dim, tiny.text_dim) == output_dims(ModelSpec()) == (64, 64)
    other = load_model(ModelSpec(seed=0))
    for a, b in zip(tiny.model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(a, b)
    diff = load_model(ModelSpec(seed=1))
    assert not torch.equal(next(iter(tiny.model.parameters())), next(iter(diff.model.parameters())))


def test_encoder_outputs_are_normalised_float32(tiny):
    from embedders.encoder import Encoder

    enc = Encoder(tiny)
    v = enc.encode_images([corpus.tiny_png().data, corpus.palette_png().data])
    t = enc.encode_texts(["red mug", "blue shoe " * 200])  # over-long text: truncated by the tokenizer
    for x in (v, t):
        assert x.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # batch composition does not change a vector beyond float noise
    t1 = enc.encode_texts(["red mug"])
    np.testing.assert_allclose(t1[0], t[0], atol=1e-5)


def test_local_checkpoint_loads_with_weights_only(tmp_path, tiny):
    ref = load_model(ModelSpec(seed=7))
    ckpt = tmp_path / "tiny-seed7.pt"
    torch.save(ref.model.state_dict(), ckpt)
    lm = load_model(ModelSpec(name="shopvec-tiny", pretrained=str(ckpt)))
    assert not lm.random_init and lm.model_id == f"shopvec-tiny@{ckpt}"
    for a, b in zip(ref.model.state_dict().values(), lm.model.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, ckpt)
    with pytest.raises(UserError):
        load_model(ModelSpec(name="shopvec-tiny", pretrained=str(ckpt)))


def test_local_dir_model(tmp_path):
    from safetensors.torch import save_file

    ref = load_model(ModelSpec(seed=3))
    d = tmp_path / "model"
    d.mkdir()
    with open("embedders/model_configs/shopvec-tiny.json") as f:
        model_cfg = json.load(f)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    lm = load_model(ModelSpec(name=f"local-dir:{d}"))
    assert not lm.random_init
    x = torch.zeros(1, 3, 64, 64)
    assert torch.allclose(lm.model.encode_image(x), ref.model.encode_image(x))


def test_bad_model_specs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not an open_clip architecture"):
        load_model(ModelSpec(name="ViT-Nope"))
    with pytest.raises(UserError, match="not a tag"):
        load_model(ModelSpec(name="shopvec-tiny", pretrained="laion9000"))
    with pytest.raises(UserError, match="not found"):
        load_model(ModelSpec(name="shopvec-tiny", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(UserError, match="allow_random_init"):
        load_model(ModelSpec(name="shopvec-tiny", allow_random_init=False))
    with pytest.raises(UserError, match="does not exist"):
        load_model(ModelSpec(name=f"local-dir:{tmp_path / 'nope'}"))


def test_real_pretrained_tag_path_resolves_to_open_clip_download(monkeypatch):
    """A tag goes through open_clip's own resolver (which downloads); offline that is a one-line UserError."""
    import open_clip.factory as f

    seen = {}

    def fake_download(cfg, cache_dir=None):
        seen["url"] = cfg.get("url") or cfg.get("hf_hub")
        raise RuntimeError("offline")

    monkeypatch.setattr(f, "download_pretrained", fake_download)
    with pytest.raises(UserError, match="could not load ViT-B-32@laion2b_s34b_b79k"):
        load_model(ModelSpec(name="ViT-B-32", pretrained="laion2b_s34b_b79k", allow_random_init=False))
    assert seen["url"]
