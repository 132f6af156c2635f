"""Configuration: a TOML file + command-line overrides -> a validated :class:`Config`.

Overrides are ``--set section.key=value`` (value parsed as TOML, falling back to a plain string), plus a few
dedicated flags (``--device``, ``--batch-size`` ...) that the CLI maps onto keys. Unknown sections/keys are errors.
``Config.embedding_hash`` covers exactly what changes vectors (model, preprocessing, text preparation, review
selection, fusion); the nightly job re-embeds everything when it changes.
"""
from __future__ import annotations

import copy
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from embedders.errors import UserError
from embedders.fusion import FusionConfig, ReviewConfig
from embedders.images import ImageLimits
from embedders.models import ModelSpec
from embedders.provenance import config_hash

DEFAULTS: dict[str, Any] = {
    "model": ModelSpec().to_dict(),
    "columns": {
        "products": {"product_id": "product_id", "title": "title", "description": "description", "image": "image",
                     "image_uri": "image_uri", "category": "category", "price": "price"},
        "reviews": {"product_id": "product_id", "text": "text", "rating": "rating",
                    "helpful_votes": "helpful_votes", "created_at": "created_at"},
    },
    "text": {"fields": ["title", "description"], "separator": ". ", "unicode_form": "NFKC"},
    "images": {"max_pixels": 40_000_000, "max_bytes": 20_000_000, "fetch_timeout_s": 10.0, "fetch_retries": 2,
               "fetch_max_concurrency": 8, "decode_threads": "auto"},
    "reviews": {"max_per_product": 20, "half_life_days": 365.0},
    "fusion": {"mode": "sum", "weights": {"image": 1.0, "text": 1.0, "reviews": 0.5}},
    "batch": {"image_batch_size": 32, "text_batch_size": 64},
    "pipeline": {"runner": "DirectRunner", "progress_every_s": 10.0},
}
# Sections whose keys are free-form (nested tables of their own), validated by their owners.
OPEN_SECTIONS = {"nightly", "index", "gates", "serve", "eval", "finetune"}


def _merge(base: dict, over: dict, path: tuple = ()) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        p = path + (k,)
        free = p[0] in OPEN_SECTIONS or path == ("fusion", "weights")
        if k not in out and not free:
            where = ".".join(path) or "top level"
            raise UserError(f"unknown config key {'.'.join(p)!r}; known keys in [{where}]: {sorted(out)}")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, p)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _set_path(d: dict, path: list[str], value: Any) -> dict:
    over: dict = {}
    cur = over
    for p in path[:-1]:
        cur = cur.setdefault(p, {})
    cur[path[-1]] = value
    return _merge(d, over)


@dataclass
class Config:
    raw: dict[str, Any]
    source: str | None = None

    # typed views -----------------------------------------------------------------------------------------------
    @property
    def model(self) -> ModelSpec:
        return ModelSpec.from_dict(self.raw["model"])

    @property
    def fusion(self) -> FusionConfig:
        return FusionConfig.from_dict(self.raw["fusion"])

    @property
    def reviews(self) -> ReviewConfig:
        return ReviewConfig.from_dict(self.raw["reviews"])

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits.from_dict(self.raw["images"])

    @property
    def product_columns(self) -> dict[str, str]:
        return dict(self.raw["columns"]["products"])

    @property
    def review_columns(self) -> dict[str, str]:
        return dict(self.raw["columns"]["reviews"])

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.raw.get(name, {}))

    # identity --------------------------------------------------------------------------------------------------
    def embedding_relevant(self) -> dict[str, Any]:
        """Everything that changes a vector. Batch sizes, runner, fetch settings and device do not (on CPU)."""
        return {
            "model": self.model.embedding_identity(),
            "text": self.raw["text"],
            "image_limits": {"max_pixels": self.raw["images"]["max_pixels"]},
            "reviews": self.raw["reviews"],
            "fusion": self.fusion.to_dict(),
        }

    @property
    def embedding_hash(self) -> str:
        return config_hash(self.embedding_relevant())

    @property
    def hash(self) -> str:
        return config_hash(self.raw)

    def with_overrides(self, items: list[str]) -> "Config":
        raw = self.raw
        for item in items:
            path, value = parse_override(item)
            raw = _set_path(raw, path, value)
        c = Config(raw, self.source)
        c.validate()
        return c

    def validate(self) -> None:
        self.model, self.fusion, self.reviews, self.image_limits  # noqa: B018 - each property validates
        t = self.raw["text"]
        if not isinstance(t.get("fields"), list) or not t["fields"]:
            raise UserError("[text] fields must be a non-empty list of product roles, e.g. ['title', 'description']")
        for f in t["fields"]:
            if f not in self.product_columns:
                raise UserError(f"[text] fields: {f!r} is not a role in [columns.products] {sorted(self.product_columns)}")
        for k in ("image_batch_size", "text_batch_size"):
            v = self.raw["batch"][k]
            if not isinstance(v, int) or v < 1:
                raise UserError(f"[batch] {k} = {v!r}; expected an integer >= 1")
        for k in ("max_pixels", "max_bytes"):
            v = self.raw["images"][k]
            if not isinstance(v, int) or v < 1:
                raise UserError(f"[images] {k} = {v!r}; expected an integer >= 1")
        decode_threads(self.raw["images"])


def decode_threads(images_cfg: dict[str, Any]) -> int:
    """``[images] decode_threads``: ``"auto"`` = one per two CPUs of the worker (1 on 2 cores), 0 = decode inline."""
    v = images_cfg.get("decode_threads", "auto")
    if v == "auto":
        return max(1, min(8, (os.cpu_count() or 2) // 2))
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise UserError(f"[images] decode_threads = {v!r}; expected \"auto\" or an integer >= 0")
    return v


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    raw = copy.deepcopy(DEFAULTS)
    if path:
        if not os.path.isfile(path):
            raise UserError(f"{path}: config file not found")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: invalid TOML: {e}") from None
        try:
            raw = _merge(raw, data)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        if "weights" in data.get("fusion", {}):  # weights given in the file replace the defaults entirely
            raw["fusion"]["weights"] = dict(data["fusion"]["weights"])
    cfg = Config(raw, path)
    cfg.validate()
    return cfg.with_overrides(overrides or [])
