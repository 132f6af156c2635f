r"""Fusion of per-modality vectors into one product vector, and review aggregation. Pure numpy.

Modalities: ``image`` (image tower), ``text`` (title + description through the text tower), ``reviews``
(aggregated review vectors, text tower). Every input vector is L2-normalised first; weights ``w_m >= 0``.

``sum`` (needs one shared space, i.e. equal dims — CLIP towers):
    v = normalize( sum_{m present} w_m / (sum_{m' present} w_m') * u_m )
    A missing modality drops out and the remaining weights are renormalised.

``concat`` (any dims; the only sound choice for unaligned towers):
    v = normalize( [ sqrt(w_image) * u_image | sqrt(w_text) * u_text | sqrt(w_reviews) * u_reviews ] )
    with a zero block for a missing modality; dim = d_image + d_text + d_reviews. The inner product of two fused
    vectors is then sum_m w_m cos(u_m, u'_m) over shared modalities, divided by the two norms.

A product with no usable modality (or whose present modalities all have weight 0) has no vector (``None``): the
pipeline dead-letters it (``no_usable_modality``).

Review aggregation: reviews are capped per product (most helpful first, then most recent, then a stable text hash),
each review vector is weighted ``(1 + ln(1 + helpful_votes)) * 0.5 ** (age_days / half_life_days)`` (age measured
from the newest review of that product, so a fixed catalog gives fixed vectors), summed and renormalised.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import UserError

MODALITIES = ("image", "text", "reviews")


@dataclass(frozen=True)
class FusionConfig:
    mode: str = "sum"
    weights: Mapping[str, float] = field(default_factory=lambda: {"image": 1.0, "text": 1.0, "reviews": 0.5})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FusionConfig":
        mode = d.get("mode", "sum")
        if mode not in ("sum", "concat"):
            raise UserError(f"[fusion] mode = {mode!r}; expected 'sum' or 'concat'")
        w = {m: 0.0 for m in MODALITIES}
        for k, v in dict(d.get("weights", {"image": 1.0, "text": 1.0, "reviews": 0.5})).items():
            if k not in MODALITIES:
                raise UserError(f"[fusion.weights] unknown modality {k!r}; expected {MODALITIES}")
            if not isinstance(v, (int, float)) or v < 0 or math.isnan(v):
                raise UserError(f"[fusion.weights] {k} = {v!r}; expected a number >= 0")
            w[k] = float(v)
        if sum(w.values()) <= 0:
            raise UserError("[fusion.weights] all weights are 0; at least one modality must count")
        return cls(mode=mode, weights=w)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "weights": dict(self.weights)}


def modality_dims(image_dim: int, text_dim: int) -> dict[str, int]:
    return {"image": image_dim, "text": text_dim, "reviews": text_dim}


def fused_dim(cfg: FusionConfig, dims: Mapping[str, int]) -> int:
    if cfg.mode == "concat":
        return int(sum(dims[m] for m in MODALITIES))
    return int(dims["image"])


def check_compatible(cfg: FusionConfig, dims: Mapping[str, int], aligned: bool = True) -> None:
    if cfg.mode == "sum":
        if len({dims[m] for m in MODALITIES}) != 1:
            raise UserError(f"[fusion] mode = 'sum' needs equal modality dims, got {dict(dims)}; use mode = 'concat'")
        if not aligned:
            raise UserError("[fusion] mode = 'sum' adds image and text vectors, but this model's towers are not "
                            "aligned (different spaces); use mode = 'concat'")


def _unit(v: np.ndarray | None) -> np.ndarray | None:
    if v is None:
        return None
    v = np.asarray(v, dtype=np.float32)
    n = float(np.linalg.norm(v))
    if not math.isfinite(n) or n == 0.0:
        return None
    return v / n


def fuse(vectors: Mapping[str, np.ndarray | None], cfg: FusionConfig, dims: Mapping[str, int]) -> np.ndarray | None:
    """One product's fused, L2-normalised vector (float32), or ``None`` when no modality is usable."""
    units = {m: _unit(vectors.get(m)) for m in MODALITIES}
    present = [m for m in MODALITIES if units[m] is not None and cfg.weights.get(m, 0.0) > 0]
    if not present:
        return None
    if cfg.mode == "sum":
        total = sum(cfg.weights[m] for m in present)
        v = np.zeros(dims["image"], dtype=np.float64)
        for m in present:
            v += (cfg.weights[m] / total) * units[m].astype(np.float64)
    else:
        blocks = []
        for m in MODALITIES:
            if m in present:
                blocks.append(math.sqrt(cfg.weights[m]) * units[m].astype(np.float64))
            else:
                blocks.append(np.zeros(dims[m], dtype=np.float64))
        v = np.concatenate(blocks)
    n = float(np.linalg.norm(v))
    if n == 0.0 or not math.isfinite(n):
        return None
    return (v / n).astype(np.float32)


def query_vector(modality: str, vec: np.ndarray, cfg: "FusionConfig | Mapping[str, Any]", dims: Mapping[str, int],
                 aligned: bool = True) -> np.ndarray:
    """Map a single-modality query vector (``text`` or ``image``) into the fused space.

    ``sum``: the vector itself (one shared space). ``concat``: a text query fills the text and reviews blocks, an
    image query the image block; with an aligned model a query also fills the other modality's blocks (cross-modal).
    """
    if not isinstance(cfg, FusionConfig):
        cfg = FusionConfig.from_dict(cfg or {})
    dims = dict(dims)
    dims.setdefault("reviews", dims.get("text"))
    u = _unit(vec)
    if u is None:
        raise ValueError("query vector is zero or not finite")
    if cfg.mode == "sum":
        return u
    fill = {"text": ("text", "reviews"), "image": ("image",)}[modality]
    if aligned:
        fill = MODALITIES
    blocks = []
    for m in MODALITIES:
        w = cfg.weights.get(m, 0.0)
        if m in fill and w > 0 and dims[m] == u.shape[0]:
            blocks.append(math.sqrt(w) * u)
        else:
            blocks.append(np.zeros(dims[m], np.float32))
    v = np.concatenate(blocks)
    n = float(np.linalg.norm(v))
    if n == 0:
        raise ValueError(f"a {modality} query has no weight in this index's fusion {cfg.to_dict()}")
    return (v / n).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Reviews
@dataclass(frozen=True)
class ReviewConfig:
    max_per_product: int = 20
    half_life_days: float = 365.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReviewConfig":
        c = cls(**{k: d[k] for k in ("max_per_product", "half_life_days") if k in d})
        if c.max_per_product < 1 or c.half_life_days <= 0:
            raise UserError("[reviews] max_per_product must be >= 1 and half_life_days > 0")
        return c


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def select_reviews(reviews: Sequence[Mapping[str, Any]], cap: int) -> list[Mapping[str, Any]]:
    """Keep at most ``cap`` reviews: most helpful, then most recent, then a stable text hash (deterministic)."""
    def key(r):
        hv = r.get("helpful_votes")
        ts = r.get("created_ts")
        return (-(hv if hv is not None else 0), -(ts if ts is not None else float("-inf")), _text_key(r["text"]))
    return sorted(reviews, key=key)[:cap]


def review_weights(reviews: Sequence[Mapping[str, Any]], half_life_days: float) -> np.ndarray:
    ts = [r.get("created_ts") for r in reviews]
    known = [t for t in ts if t is not None]
    newest = max(known) if known else None
    w = []
    for r, t in zip(reviews, ts):
        hv = r.get("helpful_votes")
        hv = max(float(hv), 0.0) if hv is not None and math.isfinite(float(hv)) else 0.0
        helpful = 1.0 + math.log1p(hv)
        if t is None or newest is None:
            recency = 1.0
        else:
            age_days = max(newest - t, 0.0) / 86400.0
            recency = 0.5 ** (age_days / half_life_days)
        w.append(helpful * recency)
    return np.asarray(w, dtype=np.float64)


def aggregate_reviews(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """Weighted mean of unit review vectors, renormalised."""
    if len(vectors) == 0:
        return None
    v = (np.asarray(weights, np.float64)[:, None] * np.asarray(vectors, np.float64)).sum(axis=0)
    return _unit(v.astype(np.float32))
