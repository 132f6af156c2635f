"""Config loading, overrides and the embedding hash."""
from __future__ import annotations

import pytest

from embedders.errors import UserError
from pipelines.config import load_config
from tests.conftest import DEMO_CONFIG, REPO


def test_shipped_configs_load():
    for name in ("demo.toml", "default.toml"):
        cfg = load_config(str(REPO / "configs" / name))
        assert cfg.model.name
    assert load_config(str(REPO / "configs" / "default.toml")).model.allow_random_init is False
    assert load_config(str(DEMO_CONFIG)).model.random_init is True


def test_overrides_and_types():
    cfg = load_config(str(DEMO_CONFIG), ['fusion.mode="concat"', "batch.image_batch_size=8",
                                         "fusion.weights.image=0.3", "model.device=cpu"])
    assert cfg.fusion.mode == "concat" and cfg.fusion.weights["image"] == 0.3
    assert cfg.raw["batch"]["image_batch_size"] == 8 and cfg.model.device == "cpu"


def test_embedding_hash_tracks_only_what_changes_vectors():
    base = load_config(str(DEMO_CONFIG))
    assert base.embedding_hash == load_config(str(DEMO_CONFIG), ["batch.image_batch_size=4"]).embedding_hash
    assert base.embedding_hash == load_config(str(DEMO_CONFIG), ["images.fetch_retries=5"]).embedding_hash
    for o in ("model.seed=1", "fusion.weights.image=0.5", 'text.separator=" | "', "reviews.max_per_product=3"):
        assert base.embedding_hash != load_config(str(DEMO_CONFIG), [o]).embedding_hash, o


@pytest.mark.parametrize("override,needle", [("modle.name=1", "modle"), ("batch.image_batch_size=0", "image_batch_size"),
                                             ('text.fields=["colour"]', "colour"), ("fusion.weights.sound=1", "sound"),
                                             ("novalue", "section.key=value")])
def test_bad_overrides(override, needle):
    with pytest.raises(UserError, match=needle):
        load_config(str(DEMO_CONFIG), [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="invalid TOML"):
        load_config(str(bad))
