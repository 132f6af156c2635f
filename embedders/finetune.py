"""Catalog alignment: CLIP-style contrastive training on the catalog's own image-text pairs (no Beam).

What trains (``FinetuneConfig.mode``):

- ``heads`` (default): the towers stay frozen; their features are computed **once** (plus, optionally, the features
  of horizontally flipped images as a second view) and only :class:`embedders.offline.AlignmentHeads` train — a
  few seconds per epoch on a CPU;
- ``lit``: locked-image tuning — the image tower stays frozen (features cached), the text tower trains with the heads;
- ``full``: both towers train with the heads (GPU recommended; batch-norm statistics stay frozen).

Loss: symmetric InfoNCE (image->text and text->image cross-entropy over the batch) with a learnable temperature per
head pair. The split is deterministic by product id (:func:`split_of`): train / validation / test. The validation
split picks the epoch (early stopping on text->image recall of the exact product, then mean reciprocal rank) and the
block scales of the output layout; the test split is only ever reported.

Evaluation goes through an injected ``evaluator`` (``index.evaluate.evaluate_modalities`` from the CLI), so this
module does not import the index layer: ``evaluator(ids, labels, vectors, fusion, query_ids) -> metrics JSON``.

The result is a folder loadable as ``local-dir:DIR`` by ``embedders.models.load_model`` (``shopvec embed`` etc.):
``shopvec_model.json`` (builder ``offline``), ``heads.safetensors`` (+ ``tower.safetensors`` for lit/full) and
``manifest.json`` (base model, data hash, split, hyper-parameters, code version, history and
``"metrics": {"before": ..., "after": ...}`` on the test split).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import RecordError, UserError
from .provenance import code_version, config_hash, sha256_bytes, sha256_file, utc_now

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MODES = ("heads", "lit", "full")
STATE_DIR = ".train_state"

Evaluator = Callable[..., dict]


# ---------------------------------------------------------------------------------------------------------------
# Deterministic split
def _unit_hash(product_id: str, seed: int) -> float:
    h = hashlib.sha256(f"shopvec-split:{seed}:{product_id}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / float(1 << 64)


def split_of(product_id: str, seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> str:
    """``train`` / ``val`` / ``test`` for one product id: a pure function of (id, seed, fractions).

    Adding or removing other products never moves a product to another split.
    """
    f = _check_fractions(fractions)
    u = _unit_hash(str(product_id), int(seed))
    if u < f[0]:
        return "train"
    if u < f[0] + f[1]:
        return "val"
    return "test"


def split_ids(ids: Sequence[str], seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for pid in ids:
        out[split_of(pid, seed, fractions)].append(pid)
    return out


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    f = tuple(float(x) for x in fractions)
    if len(f) != 3 or any(x < 0 or not math.isfinite(x) for x in f) or abs(sum(f) - 1.0) > 1e-6 or f[0] <= 0:
        raise UserError(f"[finetune] split = {list(fractions)}; expected three fractions (train, validation, test) "
                        f"summing to 1, train > 0")
    return f  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Inputs and settings
@dataclass
class CatalogItem:
    """One product as the trainer sees it (the CLI reads the catalog; this module never touches Parquet)."""
    product_id: str
    text: str | None
    image: bytes | None
    label: str | None = None
    reviews: list[dict[str, Any]] = field(default_factory=list)  # {"text", "helpful_votes", "created_ts"}


@dataclass
class FinetuneConfig:
    mode: str = "heads"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 3e-4
    tower_lr: float = 1e-5
    weight_decay: float = 0.0
    head: str = "linear"          # linear | mlp
    dim: int = 256                # aligned dim per head pair
    hidden: int = 1024            # mlp hidden width
    dropout: float = 0.0
    ensemble: int = 1             # head pairs trained side by side; their unit outputs concatenate
    init: str = "cca"             # cca: linear heads start from regularised CCA of the training pairs | random
    cca_reg_image: tuple[float, ...] = (3.0, 10.0, 30.0)  # ridge on the image covariance, x its mean eigenvalue
    cca_reg_text: tuple[float, ...] = (1.0, 3.0, 10.0)
    cca_power: tuple[float, ...] = (0.5,)  # canonical directions weighted by correlation ** power (Gong et al. 2014)
    temperature: float = 0.05     # initial; learned unless learn_temperature = false
    learn_temperature: bool = True
    center: bool = True           # subtract the training mean of each tower's features before the heads
    private: bool = True          # keep each tower's own (centred) view beside the aligned block
    block_scales: str = "auto"    # "auto" (chosen on validation) or "alpha,beta_image,beta_text"
    block_scale_grid: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # betas tried when "auto"
    flip_views: bool = False      # heads/lit: also cache features of the mirrored training images (a second view)
    patience: int = 8             # epochs without a better validation score before stopping
    min_epochs: int = 3
    seed: int = 0
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    split_seed: int = 0
    k: int = 10
    max_minutes: float = 0.0      # wall-time budget for the epochs (0 = none)
    feature_batch_size: int = 32
    device: str = "auto"
    precision: str = "auto"       # GPU: bf16/fp16 autocast; CPU: fp32

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"[finetune] unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}")
        tuples = ("split", "cca_reg_image", "cca_reg_text", "cca_power", "block_scale_grid")
        c = cls(**{k: (tuple(v) if k in tuples and isinstance(v, (list, tuple)) else
                       (v,) if k in tuples[1:] else v) for k, v in d.items()})
        c.validate()
        return c

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"[finetune] mode = {self.mode!r}; expected one of {MODES}")
        if self.init not in ("cca", "random"):
            raise UserError(f"[finetune] init = {self.init!r}; expected 'cca' or 'random'")
        for name in ("cca_reg_image", "cca_reg_text", "cca_power", "block_scale_grid"):
            v = getattr(self, name)
            if not v or any(not isinstance(x, (int, float)) or x < 0 for x in v):
                raise UserError(f"[finetune] {name} = {v!r}; expected a non-empty list of numbers >= 0")
        if self.head not in ("linear", "mlp"):
            raise UserError(f"[finetune] head = {self.head!r}; expected 'linear' or 'mlp'")
        for name in ("epochs", "batch_size", "dim", "hidden", "ensemble", "k", "feature_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"[finetune] {name} = {v!r}; expected an integer >= 1")
        for name in ("lr", "tower_lr", "temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise UserError(f"[finetune] {name} = {v!r}; expected a number > 0")
        if not 0 <= self.dropout < 1 or self.weight_decay < 0 or self.max_minutes < 0 or self.patience < 1:
            raise UserError("[finetune] dropout must be in [0, 1), weight_decay and max_minutes >= 0, patience >= 1")
        _check_fractions(self.split)
        if self.block_scales != "auto":
            parse_block_scales(self.block_scales)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("split", "cca_reg_image", "cca_reg_text", "cca_power", "block_scale_grid"):
            d[k] = list(getattr(self, k))
        return d

    def training_identity(self) -> dict[str, Any]:
        """What must match for a resume (the budget, device and epochs may change)."""
        d = self.to_dict()
        for k in ("epochs", "max_minutes", "device", "precision", "patience", "feature_batch_size"):
            d.pop(k)
        return d


def parse_block_scales(s: str) -> tuple[float, float, float]:
    try:
        a, bi, bt = (float(x) for x in str(s).split(","))
    except ValueError:
        raise UserError(f"[finetune] block_scales = {s!r}; expected 'auto' or 'alpha,beta_image,beta_text'") from None
    if not a > 0 or bi < 0 or bt < 0:
        raise UserError(f"[finetune] block_scales = {s!r}: alpha must be > 0, betas >= 0")
    return a, bi, bt


def data_hash(items: Sequence[CatalogItem]) -> str:
    """sha256 over (product id, text hash, image hash, label) in id order: identifies the training data."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda x: x.product_id):
        h.update(it.product_id.encode("utf-8") + b"\0")
        h.update((sha256_bytes(it.text.encode("utf-8")) if it.text else "-").encode() + b"\0")
        h.update((sha256_bytes(bytes(it.image)) if it.image is not None else "-").encode() + b"\0")
        h.update((it.label or "-").encode("utf-8") + b"\0")
        for r in it.reviews:
            h.update(sha256_bytes(str(r.get("text", "")).encode("utf-8")).encode())
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Frozen-tower features
@dataclass
class FeatureSet:
    """Per-product tower features, L2-normalised; all-zero rows where a modality is missing."""
    ids: list[str]
    labels: list[str | None]
    image: np.ndarray
    text: np.ndarray
    image_flip: np.ndarray | None = None
    reviews: list[tuple[np.ndarray, np.ndarray] | None] = field(default_factory=list)  # (unit vectors, weights)

    @property
    def n(self) -> int:
        return len(self.ids)

    def has(self, which: str) -> np.ndarray:
        m = self.image if which == "image" else self.text
        return np.linalg.norm(m, axis=1) > 0


def _autocast(device: str, precision: str):
    import contextlib

    import torch

    if device.startswith("cuda") and precision in ("fp16", "bf16"):
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def prepare_images(encoder, items: Sequence[CatalogItem], workers: int | None = None) -> list[Any]:
    """Decode + preprocess every image once, in threads (``None`` where missing or undecodable, reason logged)."""
    import concurrent.futures as cf

    bad: dict[str, int] = {}

    def one(it: CatalogItem):
        if it.image is None:
            return None
        try:
            return encoder.prepare_image(bytes(it.image))
        except RecordError as e:
            return e

    with cf.ThreadPoolExecutor(max_workers=workers or max(1, min(8, os.cpu_count() or 1))) as ex:
        results = list(ex.map(one, items))
    out: list[Any] = []
    for r in results:
        if isinstance(r, RecordError):
            bad[r.error] = bad.get(r.error, 0) + 1
            out.append(None)
        else:
            out.append(r)
    if bad:
        log.warning("images not usable (product kept with its other modalities): %s", bad)
    return out


def _encode_rows(encode, items: Sequence[Any], rows: list[int], dim: int, batch_size: int, device: str,
                 precision: str, what: str) -> np.ndarray:
    """``encode(stacked batch)`` over ``items[rows]`` in batches -> ``(len(items), dim)`` L2-normalised float32, zero
    rows for the items not in ``rows``; logs progress every 10 s."""
    import torch

    out = np.zeros((len(items), dim), np.float32)
    t0 = last = time.time()
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        x = torch.stack([items[i] for i in chunk]).to(device)
        with torch.inference_mode(), _autocast(device, precision):
            f = encode(x)
        out[chunk] = torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()
        if time.time() - last > 10:
            last = time.time()
            log.info("%s: %d/%d encoded, %.1f/s", what, s + len(chunk), len(rows), (s + len(chunk)) / (last - t0))
    return out


def encode_tensors(model, tensors: Sequence[Any], dim: int, batch_size: int, device: str, precision: str,
                   flip: bool = False, what: str = "images") -> np.ndarray:
    """Tower image features for prepared tensors (zero rows for ``None``), L2-normalised float32."""
    rows = [i for i, t in enumerate(tensors) if t is not None]
    encode = (lambda x: model.encode_image(x.flip(-1))) if flip else model.encode_image
    return _encode_rows(encode, tensors, rows, dim, batch_size, device, precision, what)


def encode_token_rows(model, tokens: Sequence[Any], dim: int, batch_size: int, device: str, precision: str,
                      what: str = "texts") -> np.ndarray:
    """Text tower features for token rows (zero rows for ``None``), L2-normalised float32."""
    import torch

    rows = [i for i, t in enumerate(tokens) if t is not None]
    # similar lengths batched together: the model drops the all-padding tail of a batch (offline towers)
    rows.sort(key=lambda i: -int((tokens[i] != 0).sum()) if isinstance(tokens[i], torch.Tensor) else 0)
    return _encode_rows(model.encode_text, tokens, rows, dim, batch_size, device, precision, what)


def tokenize(encoder, texts: Sequence[str | None], batch_size: int = 256) -> list[Any]:
    out: list[Any] = [None] * len(texts)
    rows = [i for i, t in enumerate(texts) if t]
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        for i, tok in zip(chunk, encoder.prepare_texts([texts[i] for i in chunk])):
            out[i] = tok
    return out


def review_features(model, encoder, items: Sequence[CatalogItem], dim: int, review_cfg, batch_size: int,
                    device: str, precision: str) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per product: (unit review vectors of the tower, aggregation weights), selected as the embed pipeline does."""
    from .fusion import review_weights, select_reviews

    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for it in items:
        revs = [r for r in it.reviews if r.get("text")]
        if not revs:
            out.append(None)
            continue
        sel = select_reviews(revs, review_cfg.max_per_product)
        w = review_weights(sel, review_cfg.half_life_days)
        toks = tokenize(encoder, [r["text"] for r in sel])
        vecs = encode_token_rows(model, toks, dim, batch_size, device, precision, "reviews")
        out.append((vecs, w))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training
@dataclass
class TrainResult:
    out_dir: str
    manifest: dict[str, Any]
    vectors: dict[str, np.ndarray]  # the final per-modality vectors the trainer evaluated (for round-trip checks)
    ids: list[str]


def _set_seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def infonce(img, txt, logit_scale):
    """Symmetric InfoNCE over a batch of matching (image, text) unit vectors."""
    import torch
    import torch.nn.functional as F

    logits = logit_scale * img @ txt.T
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def cross_modal_scores(text_vecs: np.ndarray, image_vecs: np.ndarray, query_rows: np.ndarray, k: int
                       ) -> dict[str, float]:
    """Label-free validation figures: text->image recall@k of the exact product and mean reciprocal rank."""
    have_img = np.linalg.norm(image_vecs, axis=1) > 0
    corpus = np.nonzero(have_img)[0]
    q = [r for r in query_rows if have_img[r] and np.linalg.norm(text_vecs[r]) > 0]
    if not q:
        return {"recall": 0.0, "mrr": 0.0, "queries": 0}
    q = np.asarray(q)
    s = text_vecs[q] @ image_vecs[corpus].T
    own = np.searchsorted(corpus, q)
    own_score = s[np.arange(len(q)), own]
    rank = (s > own_score[:, None]).sum(axis=1) + 1  # ties count in the query's favour
    return {"recall": float((rank <= k).mean()), "mrr": float((1.0 / rank).mean()), "queries": int(len(q))}


class CCA:
    """Regularised canonical correlation analysis of paired features (closed form), for initialising linear heads.

    ``X`` [n, dx] and ``Y`` [n, dy] are centred. With ``Cxx = X'X/n + rx * mean_eig(X'X/n) * I`` (likewise ``Cyy``),
    the canonical directions are ``Wx = Cxx^-1/2 U``, ``Wy = Cyy^-1/2 V`` from the SVD ``Cxx^-1/2 Cxy Cyy^-1/2 =
    U S V'``; columns are scaled by ``S ** power``. Eigen-decompositions are computed once, so a grid of ridge
    values costs one small SVD each.
    """

    def __init__(self, X: np.ndarray, Y: np.ndarray):
        X = np.asarray(X, np.float64)
        Y = np.asarray(Y, np.float64)
        n = len(X)
        self.cxy = X.T @ Y / n
        self.wx, self.vx = np.linalg.eigh(X.T @ X / n)
        self.wy, self.vy = np.linalg.eigh(Y.T @ Y / n)
        self._isqrts: dict[tuple[str, float], np.ndarray] = {}
        self._svds: dict[tuple[float, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _isqrt(w: np.ndarray, v: np.ndarray, reg: float) -> np.ndarray:
        w = np.maximum(w, 0.0)
        shift = reg * max(float(w.mean()), 1e-12)
        return (v * (w + shift) ** -0.5) @ v.T

    def _cached_isqrt(self, side: str, reg: float) -> np.ndarray:
        key = (side, float(reg))
        if key not in self._isqrts:
            w, v = (self.wx, self.vx) if side == "x" else (self.wy, self.vy)
            self._isqrts[key] = self._isqrt(w, v, reg)
        return self._isqrts[key]

    def solve(self, reg_x: float, reg_y: float, dim: int, power: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ix = self._cached_isqrt("x", reg_x)
        iy = self._cached_isqrt("y", reg_y)
        key = (float(reg_x), float(reg_y))
        if key not in self._svds:
            self._svds[key] = np.linalg.svd(ix @ self.cxy @ iy, full_matrices=False)
        u, s, vt = self._svds[key]
        d = min(dim, len(s))
        scale = np.maximum(s[:d], 0.0) ** power
        return (ix @ u[:, :d]) * scale, (iy @ vt.T[:, :d]) * scale, s[:d]


class Trainer:
    """Fine-tunes alignment heads (and, in lit/full mode, towers) of a base model on catalog pairs."""

    def __init__(self, base_spec, items: Sequence[CatalogItem], cfg: FinetuneConfig, out_dir: str, *,
                 fusion: Mapping[str, Any], review_cfg=None, evaluator: Evaluator | None = None,
                 label: str | None = None, resume: bool = False, data_info: Mapping[str, Any] | None = None,
                 loaded=None, feature_cache: str | None = None):
        if not items:
            raise UserError("finetune: the catalog has no products")
        ids = [it.product_id for it in items]
        if len(set(ids)) != len(ids):
            raise UserError("finetune: product ids are not unique (deduplicate the catalog first)")
        self.base_spec = base_spec
        self.items = list(items)
        self.cfg = cfg
        self.out_dir = out_dir
        self.fusion = dict(fusion)
        self.review_cfg = review_cfg
        self.evaluator = evaluator
        self.label = label
        self.resume = resume
        self.data_info = dict(data_info or {})
        self._loaded = loaded
        self.feature_cache = feature_cache
        self.ids = ids
        self.labels = [it.label for it in items]
        self.split = {pid: split_of(pid, cfg.split_seed, cfg.split) for pid in ids}
        self.rows = {s: np.asarray([i for i, pid in enumerate(ids) if self.split[pid] == s], dtype=np.int64)
                     for s in SPLITS}
        self.data_hash = data_hash(self.items)

    # ---- setup -------------------------------------------------------------------------------------------------
    def _load_base(self):
        from .encoder import Encoder
        from .models import load_model, resolve_device, resolve_precision

        import torch

        self.device = resolve_device(self.cfg.device)
        self.precision = resolve_precision(self.cfg.precision, self.device) if self.device != "cpu" else "fp32"
        loaded = self._loaded if self._loaded is not None else load_model(
            dataclasses.replace(self.base_spec, device="cpu", precision="fp32"))
        if getattr(loaded, "aligned", True) and getattr(loaded.model, "aligned", None) is True \
                and hasattr(loaded.model, "heads"):
            raise UserError(f"finetune: {loaded.model_id} is already a fine-tuned checkpoint; fine-tune its base "
                            f"model ({loaded.info.get('base')}) instead")
        self.loaded = loaded
        self.encoder = Encoder(loaded)
        self.model = loaded.model.to(self.device).float()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.image_in, self.text_in = int(loaded.image_dim), int(loaded.text_dim)
        torch.set_grad_enabled(True)

    def _features(self) -> FeatureSet:
        cfg = self.cfg
        t0 = time.time()
        prepared = prepare_images(self.encoder, self.items)
        self._prepared = prepared
        texts = [it.text for it in self.items]
        self._tokens = tokenize(self.encoder, texts)
        log.info("features: %d images, %d texts through the frozen towers on %s", sum(p is not None for p in prepared),
                 sum(t is not None for t in self._tokens), self.device)
        img = encode_tensors(self.model, prepared, self.image_in, cfg.feature_batch_size, self.device,
                             self.precision, what="images")
        flip = None
        if cfg.flip_views and cfg.mode in ("heads", "lit"):
            train_only = [p if self.split[pid] == "train" else None for p, pid in zip(prepared, self.ids)]
            flip = encode_tensors(self.model, train_only, self.image_in, cfg.feature_batch_size, self.device,
                                  self.precision, flip=True, what="mirrored training images")
        txt = encode_token_rows(self.model, self._tokens, self.text_in, cfg.feature_batch_size * 2, self.device,
                                self.precision)
        reviews: list = [None] * len(self.items)
        if self.review_cfg is not None and any(it.reviews for it in self.items):
            reviews = review_features(self.model, self.encoder, self.items, self.text_in, self.review_cfg,
                                      cfg.feature_batch_size * 2, self.device, self.precision)
        self.feature_seconds = time.time() - t0
        log.info("features done in %.1fs", self.feature_seconds)
        return FeatureSet(self.ids, self.labels, img, txt, flip, reviews)

    def _feature_key(self) -> str:
        return config_hash({"base": self.base_spec.to_dict() if hasattr(self.base_spec, "to_dict") else
                            str(self.base_spec), "model_id": getattr(self.loaded, "model_id", None),
                            "data": self.data_hash, "flip": bool(self.cfg.flip_views and self.cfg.mode != "full"),
                            "split": [self.cfg.split_seed, list(self.cfg.split)], "code": code_version()})

    def _cached_features(self) -> FeatureSet:
        """Frozen-tower features from ``feature_cache`` when it holds this base model + data, else computed (and
        saved there). Tower modes still decode images / tokenise texts for training."""
        path = self.feature_cache
        usable = path and self.cfg.mode == "heads" and not any(it.reviews for it in self.items)
        if usable and os.path.isfile(path):
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == self._feature_key() and list(z["ids"]) == self.ids:
                    log.info("features: reusing %s", path)
                    self.feature_seconds = 0.0
                    return FeatureSet(self.ids, self.labels, z["image"], z["text"],
                                      z["image_flip"] if z["image_flip"].size else None,
                                      [None] * len(self.ids))
                log.info("features: %s was made for other data or another model; recomputing", path)
        feats = self._features()
        if usable:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = path + ".tmp.npz"
            np.savez(tmp, key=np.asarray(self._feature_key()), ids=np.asarray(self.ids), image=feats.image,
                     text=feats.text, image_flip=feats.image_flip if feats.image_flip is not None else np.zeros(0))
            os.replace(tmp, path)
            log.info("features saved to %s", path)
        return feats

    def _make_heads(self):
        from .offline import make_heads

        cfg = self.cfg
        heads = make_heads(image_in=self.image_in, text_in=self.text_in, dim=cfg.dim, kind=cfg.head,
                           hidden=cfg.hidden, dropout=cfg.dropout, ensemble=cfg.ensemble, private=cfg.private,
                           init_logit_scale=math.log(1.0 / cfg.temperature))
        return heads

    # ---- vectors -------------------------------------------------------------------------------------------------
    def _current_features(self, feats: FeatureSet) -> FeatureSet:
        """Features of the current towers (cached ones for frozen towers, re-encoded for trained ones)."""
        if self.cfg.mode == "heads":
            return feats
        self.model.eval()
        txt = encode_token_rows(self.model, self._tokens, self.text_in, self.cfg.feature_batch_size * 2,
                                self.device, self.precision)
        img = feats.image
        if self.cfg.mode == "full":
            img = encode_tensors(self.model, self._prepared, self.image_in, self.cfg.feature_batch_size,
                                 self.device, self.precision)
        reviews = feats.reviews
        if any(r is not None for r in feats.reviews):
            reviews = review_features(self.model, self.encoder, self.items, self.text_in, self.review_cfg,
                                      self.cfg.feature_batch_size * 2, self.device, self.precision)
        return FeatureSet(feats.ids, feats.labels, img, txt, None, reviews)

    def vectors(self, heads, feats: FeatureSet) -> dict[str, np.ndarray]:
        """Per-modality output vectors of (towers + heads) for every product, as the embed pipeline computes them."""
        import torch

        from .fusion import aggregate_reviews

        heads.eval()
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for which, mat in (("image", feats.image), ("text", feats.text)):
                have = np.linalg.norm(mat, axis=1) > 0
                v = np.zeros((len(mat), heads.out_dim), np.float32)
                if have.any():
                    x = torch.from_numpy(mat[have]).to(self.device)
                    e = heads.embed(x, which)
                    v[have] = torch.nn.functional.normalize(e.float(), dim=-1).cpu().numpy()
                out[which] = v
            if any(r is not None for r in feats.reviews):
                rv = np.zeros((len(feats.reviews), heads.out_dim), np.float32)
                for i, r in enumerate(feats.reviews):
                    if r is None:
                        continue
                    vecs, w = r
                    e = heads.embed(torch.from_numpy(vecs).to(self.device), "text")
                    e = torch.nn.functional.normalize(e.float(), dim=-1).cpu().numpy()
                    agg = aggregate_reviews(e, w)
                    if agg is not None:
                        rv[i] = agg
                out["reviews"] = rv
        return out

    def base_vectors(self, feats: FeatureSet) -> dict[str, np.ndarray]:
        out = {"image": feats.image, "text": feats.text}
        if any(r is not None for r in feats.reviews):
            from .fusion import aggregate_reviews

            rv = np.zeros_like(feats.text)
            for i, r in enumerate(feats.reviews):
                if r is not None:
                    agg = aggregate_reviews(*r)
                    if agg is not None:
                        rv[i] = agg
            out["reviews"] = rv
        return out

    def evaluate(self, vectors: Mapping[str, np.ndarray], split: str, fusion: Mapping[str, Any] | None = None,
                 what: str = "full") -> dict[str, Any] | None:
        """The injected evaluator on ``split``'s queries (neighbours searched among all products)."""
        if self.evaluator is None:
            return None
        q = [self.ids[i] for i in self.rows[split]]
        return self.evaluator(ids=self.ids, labels=self.labels, vectors=dict(vectors),
                              fusion=dict(fusion or self.fusion), query_ids=q, k=self.cfg.k, what=what)

    def _val_score(self, vectors: Mapping[str, np.ndarray]) -> dict[str, float]:
        return cross_modal_scores(vectors["text"], vectors["image"], self.rows["val"], self.cfg.k)

    def _val_score_heads(self, heads, feats: FeatureSet) -> dict[str, float]:
        """Validation text->image figures from the aligned block alone (the private blocks never change the
        cross-modal ranking), computed for the validation texts and every image only."""
        import torch

        heads.eval()
        img = np.zeros((feats.n, heads.aligned_dim), np.float32)
        txt = np.zeros((feats.n, heads.aligned_dim), np.float32)
        have = np.linalg.norm(feats.image, axis=1) > 0
        q = self.rows["val"]
        q = q[np.linalg.norm(feats.text[q], axis=1) > 0]
        with torch.inference_mode():
            if have.any():
                img[have] = heads.project(torch.from_numpy(feats.image[have]).to(self.device), "image").float().cpu().numpy()
            if len(q):
                txt[q] = heads.project(torch.from_numpy(feats.text[q]).to(self.device), "text").float().cpu().numpy()
        return cross_modal_scores(txt, img, self.rows["val"], self.cfg.k)

    # ---- state -----------------------------------------------------------------------------------------------------
    def _state_dir(self) -> str:
        return os.path.join(self.out_dir, STATE_DIR)

    def _identity(self) -> dict[str, Any]:
        return {"config": self.cfg.training_identity(), "data_hash": self.data_hash,
                "base": self.base_spec.to_dict() if hasattr(self.base_spec, "to_dict") else str(self.base_spec),
                "fusion": self.fusion}

    def _save_state(self, heads, opt, epoch: int, best: dict, history: list, patience_left: int,
                    init_info: dict | None = None) -> None:
        import torch
        from safetensors.torch import save_file

        d = self._state_dir()
        tmp = d + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(_contiguous(heads.state_dict()), os.path.join(tmp, "heads.safetensors"))
        if best.get("heads") is not None:
            save_file(best["heads"], os.path.join(tmp, "best_heads.safetensors"))
        if self.cfg.mode != "heads":
            save_file(_contiguous(self._tower_state()), os.path.join(tmp, "tower.safetensors"))
            if best.get("tower") is not None:
                save_file(best["tower"], os.path.join(tmp, "best_tower.safetensors"))
        torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"identity_hash": config_hash(self._identity()), "epoch": epoch,
                       "best": {k: v for k, v in best.items() if k not in ("heads", "tower")},
                       "history": history, "patience_left": patience_left, "init": init_info}, f, indent=1,
                      default=str)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)

    def _load_state(self, heads, opt) -> tuple[int, dict, list, int] | None:
        import torch
        from safetensors.torch import load_file

        d = self._state_dir()
        path = os.path.join(d, "state.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            st = json.load(f)
        if st.get("identity_hash") != config_hash(self._identity()):
            raise UserError(f"--resume: {d} was written for other data, base model or settings; remove it or run "
                            f"without --resume")
        heads.load_state_dict(load_file(os.path.join(d, "heads.safetensors")))
        best = dict(st["best"])
        if os.path.isfile(os.path.join(d, "best_heads.safetensors")):
            best["heads"] = load_file(os.path.join(d, "best_heads.safetensors"))
        if self.cfg.mode != "heads":
            self.model.load_state_dict(load_file(os.path.join(d, "tower.safetensors")), strict=False)
            if os.path.isfile(os.path.join(d, "best_tower.safetensors")):
                best["tower"] = load_file(os.path.join(d, "best_tower.safetensors"))
        opt.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), map_location=self.device, weights_only=True))
        self._resumed_init = st.get("init")
        return int(st["epoch"]), best, list(st["history"]), int(st["patience_left"])

    def _tower_params(self) -> list:
        """Parameters that train besides the heads: the text tower (lit) or both towers (full)."""
        if self.cfg.mode == "heads":
            return []
        out = []
        for name, p in self.model.named_parameters():
            if name.startswith("logit_") or name == "logit_scale":
                continue
            if self.cfg.mode == "lit" and name.startswith("visual."):
                continue
            out.append(p)
        return out

    def _trainable_tower(self):
        return self.model if self.cfg.mode in ("lit", "full") else None

    def _tower_state(self) -> dict[str, Any]:
        """Tower tensors that training changed (text tower for lit, both towers for full), keyed as in the model."""
        sd = self.model.state_dict()
        if self.cfg.mode == "lit":
            return {k: v.detach().cpu() for k, v in sd.items() if not k.startswith("visual.")}
        return {k: v.detach().cpu() for k, v in sd.items()}

    # ---- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        import torch

        t_start = time.time()
        cfg = self.cfg
        self._load_base()
        feats = self._cached_features()
        pairs = np.asarray([i for i in self.rows["train"]
                            if np.linalg.norm(feats.image[i]) > 0 and np.linalg.norm(feats.text[i]) > 0])
        if len(pairs) < 2:
            raise UserError(f"finetune: only {len(pairs)} training products have both an image and a text; need at "
                            f"least 2 (the catalog has {len(self.items)} products, split {cfg.split})")
        counts = {s: int(len(r)) for s, r in self.rows.items()}
        log.info("split (seed %d, %s): %s; %d training pairs", cfg.split_seed, list(cfg.split), counts, len(pairs))

        _set_seed(cfg.seed)
        heads = self._make_heads().to(self.device)
        if cfg.center:
            with torch.no_grad():
                heads.image_mean.copy_(torch.from_numpy(feats.image[pairs].mean(0)))
                heads.text_mean.copy_(torch.from_numpy(feats.text[pairs].mean(0)))
        if not cfg.learn_temperature:
            heads.logit_scale.requires_grad_(False)
        if cfg.block_scales != "auto":
            heads.block_scales.copy_(torch.tensor(parse_block_scales(cfg.block_scales)))

        base_vecs = self.base_vectors(feats)
        base_fusion = self._base_fusion()
        metrics_base = self.evaluate(base_vecs, "test", base_fusion)
        init_vecs = self.vectors(heads, feats)
        metrics_before = self.evaluate(init_vecs, "test")
        before_val = self._val_score(init_vecs)
        log.info("before training: validation text->image recall@%d=%.3f", cfg.k, before_val["recall"])

        init_info = self._init_heads(heads, feats, pairs) if not self.resume or not os.path.isfile(
            os.path.join(self._state_dir(), "state.json")) else {"method": "resumed"}
        start_vecs = self.vectors(heads, feats)
        start_val = self._val_score(start_vecs)

        groups = [{"params": [p for p in heads.parameters() if p.requires_grad], "lr": cfg.lr}]
        tower = self._trainable_tower()
        if tower is not None:
            params = self._tower_params()
            for p in params:
                p.requires_grad_(True)
            if cfg.mode == "full":  # batch-norm layers stay as pretrained (small batches)
                for m in self.model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        for p in m.parameters():
                            p.requires_grad_(False)
            groups.append({"params": [p for p in params if p.requires_grad], "lr": cfg.tower_lr})
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda") if (self.device.startswith("cuda") and self.precision == "fp16") \
            else None

        start_epoch, best, history, patience_left = 0, {"score": None, "epoch": 0, "heads": None, "tower": None}, \
            [], cfg.patience
        if self.resume:
            st = self._load_state(heads, opt)
            if st is None:
                log.warning("--resume: no saved state in %s; starting from scratch", self._state_dir())
            else:
                start_epoch, best, history, patience_left = st
                init_info = {**(getattr(self, "_resumed_init", None) or {}), "resumed_after_epoch": start_epoch}
                log.info("resumed after epoch %d (best epoch %s)", start_epoch, best.get("epoch"))
        if best.get("heads") is None:
            best.update(score=[start_val["recall"], start_val["mrr"]], epoch=0,
                        heads=_contiguous(heads.state_dict()),
                        tower=_contiguous(self._tower_state()) if tower is not None else None)

        stopped = "epochs"
        t_train = time.time()
        feats_now = feats
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if patience_left <= 0 and epoch > cfg.min_epochs:
                stopped = "early_stopping"
                break
            if cfg.max_minutes and (time.time() - t_train) / 60.0 > cfg.max_minutes:
                stopped = "time_budget"
                log.warning("stopping: the %.1f-minute training budget is spent", cfg.max_minutes)
                break
            loss, rate = self._epoch(epoch, heads, opt, scaler, feats, pairs)
            feats_now = self._current_features(feats)
            vecs = self.vectors(heads, feats_now)
            val = self._val_score(vecs)
            test_m = self.evaluate(vecs, "test")
            entry = {"epoch": epoch, "loss": round(loss, 5), "samples_per_s": round(rate, 1),
                     "val": {f"recall@{cfg.k}": round(val["recall"], 5), "mrr": round(val["mrr"], 5)},
                     "temperature": [round(1.0 / float(s), 5) for s in heads.logit_scale.detach().exp().cpu()]}
            if test_m is not None:
                t2i = test_m.get("text_to_image") or {}
                entry["test"] = {f"recall@{cfg.k}": t2i.get(f"recall@{cfg.k}"),
                                 f"precision@{cfg.k}": t2i.get(f"precision@{cfg.k}"),
                                 f"fused_precision@{cfg.k}": ((test_m.get("item_to_item") or {}).get("fused") or {}
                                                              ).get(f"precision@{cfg.k}")}
            history.append(entry)
            score = [val["recall"], val["mrr"]]
            improved = best["score"] is None or score > best["score"]
            if improved:
                best.update(score=score, epoch=epoch, heads=_contiguous(heads.state_dict()),
                            tower=_contiguous(self._tower_state()) if tower is not None else None)
                patience_left = cfg.patience
            else:
                patience_left -= 1
            log.info("epoch %d/%d loss %.4f %.0f samples/s | val recall@%d %.3f mrr %.3f%s%s", epoch, cfg.epochs,
                     loss, rate, cfg.k, val["recall"], val["mrr"],
                     f" | test recall@{cfg.k} {entry['test'][f'recall@{cfg.k}']}" if "test" in entry else "",
                     " *" if improved else "")
            self._save_state(heads, opt, epoch, best, history, patience_left, init_info)
        else:
            stopped = "epochs" if patience_left > 0 else "early_stopping"
        train_seconds = time.time() - t_train

        # best epoch -> block scales on validation -> final test figures
        heads.load_state_dict(best["heads"])
        if tower is not None and best.get("tower") is not None:
            self.model.load_state_dict(best["tower"], strict=False)
        feats_now = self._current_features(feats)
        scale_search = self._choose_block_scales(heads, feats_now)
        final_vecs = self.vectors(heads, feats_now)
        metrics_after = self.evaluate(final_vecs, "test")
        val_after = self._val_score(final_vecs)
        log.info("best epoch %d (validation recall@%d %.3f); stopped by %s after %.1fs of training",
                 best["epoch"], cfg.k, val_after["recall"], stopped, train_seconds)

        manifest = self._write_checkpoint(heads, {
            "before": metrics_before, "after": metrics_after, "base": metrics_base,
        }, {
            "history": history, "best_epoch": best["epoch"], "stopped_by": stopped,
            "validation": {"before": before_val, "init": start_val, "after": val_after}, "init": init_info,
            "block_scales": scale_search,
            "timing_s": {"features": round(self.feature_seconds, 2), "training": round(train_seconds, 2),
                         "total": round(time.time() - t_start, 2)},
            "pairs": int(len(pairs)), "split_counts": counts, "base_fusion": base_fusion,
        })
        shutil.rmtree(self._state_dir(), ignore_errors=True)
        return TrainResult(self.out_dir, manifest, final_vecs, self.ids)

    def _init_heads(self, heads, feats: FeatureSet, pairs: np.ndarray) -> dict[str, Any]:
        """Closed-form start for linear heads: regularised CCA of the training pairs, its ridge/power picked by
        validation text->image recall (then MRR). Epoch 0 of the training is this solution."""
        cfg = self.cfg
        if cfg.init != "cca":
            return {"method": "random"}
        if cfg.head != "linear":
            log.info("init = 'cca' applies to linear heads; %s heads start at random", cfg.head)
            return {"method": "random", "reason": f"{cfg.head} heads"}
        mu_i = heads.image_mean.detach().cpu().numpy().astype(np.float64)
        mu_t = heads.text_mean.detach().cpu().numpy().astype(np.float64)
        t0 = time.time()
        cca = CCA(feats.image[pairs] - mu_i, feats.text[pairs] - mu_t)
        tried = []
        best = None
        for rx in cfg.cca_reg_image:
            for ry in cfg.cca_reg_text:
                for pw in cfg.cca_power:
                    wx, wy, corr = cca.solve(rx, ry, cfg.dim, pw)
                    self._set_linear_heads(heads, wx, wy)
                    sc = self._val_score_heads(heads, feats)
                    tried.append({"reg_image": rx, "reg_text": ry, "power": pw,
                                  f"val_recall@{cfg.k}": round(sc["recall"], 5), "val_mrr": round(sc["mrr"], 5)})
                    key = (sc["recall"], sc["mrr"])
                    if best is None or key > best[0]:
                        best = (key, rx, ry, pw, wx, wy, corr)
        (rec, mrr), rx, ry, pw, wx, wy, corr = best
        self._set_linear_heads(heads, wx, wy)
        log.info("CCA init (reg_image %s, reg_text %s, power %s): validation recall@%d %.3f, mrr %.3f "
                 "(%d settings, %.1fs)", rx, ry, pw, cfg.k, rec, mrr, len(tried), time.time() - t0)
        return {"method": "cca", "chosen": {"reg_image": rx, "reg_text": ry, "power": pw},
                "top_correlations": [round(float(c), 4) for c in corr[:8]], "tried": tried}

    @staticmethod
    def _set_linear_heads(heads, wx: np.ndarray, wy: np.ndarray) -> None:
        import torch

        with torch.no_grad():
            for hs, w in ((heads.image_heads, wx), (heads.text_heads, wy)):
                for h in hs:
                    lin = h[-1]
                    weight = torch.zeros_like(lin.weight)
                    d = min(w.shape[1], weight.shape[0])
                    weight[:d] = torch.from_numpy(np.ascontiguousarray(w[:, :d].T)).to(weight)
                    lin.weight.copy_(weight)
                    if lin.bias is not None:
                        lin.bias.zero_()

    def _base_fusion(self) -> dict[str, Any]:
        """Fusion for the base model's own vectors: the configured one, as concat when the towers differ in dim."""
        f = dict(self.fusion)
        if f.get("mode", "sum") == "sum" and (self.image_in != self.text_in or not getattr(self.loaded, "aligned", True)):
            f["mode"] = "concat"
        return f

    def _epoch(self, epoch: int, heads, opt, scaler, feats: FeatureSet, pairs: np.ndarray) -> tuple[float, float]:
        import torch

        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100003 + epoch)
        order = pairs[rng.permutation(len(pairs))]
        heads.train()
        tower = self._trainable_tower()
        if tower is not None:
            tower.train()
            if cfg.mode == "lit" and hasattr(self.model, "visual"):
                self.model.visual.eval()  # frozen image tower (its features are cached anyway)
            if cfg.mode in ("lit", "full"):
                for m in self.model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.eval()
        total, n_seen = 0.0, 0
        t0 = last = time.time()
        bs = min(cfg.batch_size, len(order))
        n_batches = max(1, len(order) // bs)  # drop the ragged tail: InfoNCE wants full batches of negatives
        for b in range(n_batches):
            idx = order[b * bs:(b + 1) * bs]
            with _autocast(self.device, self.precision):
                fi, ft = self._batch_features(idx, feats, rng)
                loss = 0.0
                for e in range(heads.cfg["ensemble"]):
                    zi = heads.project(fi, "image", member=e)
                    zt = heads.project(ft, "text", member=e)
                    loss = loss + infonce(zi.float(), zt.float(), heads.logit_scale[e].exp())
                loss = loss / heads.cfg["ensemble"]
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            with torch.no_grad():
                heads.logit_scale.clamp_(0.0, math.log(100.0))
            total += float(loss.detach()) * len(idx)
            n_seen += len(idx)
            if time.time() - last > 10:
                last = time.time()
                log.info("epoch %d: batch %d/%d loss %.4f %.1f samples/s", epoch, b + 1, n_batches,
                         total / n_seen, n_seen / (last - t0))
        dt = max(time.time() - t0, 1e-9)
        return total / max(n_seen, 1), n_seen / dt

    def _batch_features(self, idx: np.ndarray, feats: FeatureSet, rng):
        import torch

        cfg = self.cfg
        if cfg.mode == "full":
            x = torch.stack([self._prepared[i] for i in idx]).to(self.device)
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            fi = self.model.encode_image(x)
        else:
            img = feats.image[idx]
            if feats.image_flip is not None:
                use = rng.random(len(idx)) < 0.5
                img = np.where(use[:, None], feats.image_flip[idx], img)
            fi = torch.from_numpy(np.ascontiguousarray(img)).to(self.device)
        if cfg.mode == "heads":
            ft = torch.from_numpy(feats.text[idx]).to(self.device)
        else:
            ft = self.model.encode_text(torch.stack([self._tokens[i] for i in idx]).to(self.device))
        return fi, ft

    def _choose_block_scales(self, heads, feats: FeatureSet) -> dict[str, Any]:
        """Pick (alpha, beta_image, beta_text) maximising validation fused label precision (needs labels)."""
        import torch

        cfg = self.cfg
        if not heads.private:
            return {"chosen": None, "reason": "private blocks disabled"}
        if cfg.block_scales != "auto":
            return {"chosen": [float(x) for x in heads.block_scales], "reason": "set in config"}
        if self.evaluator is None or not any(self.labels[i] for i in self.rows["val"]):
            heads.block_scales.copy_(torch.tensor([1.0, 1.0, 1.0]))
            return {"chosen": [1.0, 1.0, 1.0], "reason": "no labels or evaluator: default scales"}
        key = f"precision@{cfg.k}"
        tried = []
        best = None
        fast = self._block_parts(heads, feats) if not any(r is not None for r in feats.reviews) else None
        for bi in cfg.block_scale_grid:
            for bt in cfg.block_scale_grid:
                heads.block_scales.copy_(torch.tensor([1.0, bi, bt]))
                vecs = self._scaled_vectors(fast, bi, bt) if fast is not None else self.vectors(heads, feats)
                m = self.evaluate(vecs, "val", what="fused")
                fused = ((m or {}).get("item_to_item") or {}).get("fused") or {}
                p = fused.get(key)
                tried.append({"beta_image": bi, "beta_text": bt, key: p})
                if p is not None and (best is None or p > best[0] + 1e-12):
                    best = (p, bi, bt)
        if best is None:
            heads.block_scales.copy_(torch.tensor([1.0, 1.0, 1.0]))
            return {"chosen": [1.0, 1.0, 1.0], "reason": "no validation figure", "tried": tried}
        heads.block_scales.copy_(torch.tensor([1.0, best[1], best[2]]))
        log.info("block scales (alpha, beta_image, beta_text) = (1, %s, %s): validation fused %s %.4f", best[1],
                 best[2], key, best[0])
        return {"chosen": [1.0, best[1], best[2]], "validation_" + key: best[0], "tried": tried}

    def _block_parts(self, heads, feats: FeatureSet) -> dict[str, Any]:
        return block_parts(heads, feats, self.device)

    @staticmethod
    def _scaled_vectors(parts: Mapping[str, Any], beta_image: float, beta_text: float) -> dict[str, np.ndarray]:
        return scaled_vectors(parts, beta_image, beta_text)


    # ---- output ------------------------------------------------------------------------------------------------
    def _write_checkpoint(self, heads, metrics: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
        from safetensors.torch import save_file

        from .offline import CHECKPOINT_FORMAT, MODEL_JSON, provenance

        os.makedirs(self.out_dir, exist_ok=True)
        files = {}
        save_file(_contiguous(heads.state_dict()), os.path.join(self.out_dir, "heads.safetensors"),
                  metadata={"format": "shopvec-offline-heads"})
        files["heads.safetensors"] = sha256_file(os.path.join(self.out_dir, "heads.safetensors"))
        tower_file = None
        if self.cfg.mode != "heads":
            tower_file = "tower.safetensors"
            save_file(_contiguous(self._tower_state()), os.path.join(self.out_dir, tower_file))
            files[tower_file] = sha256_file(os.path.join(self.out_dir, tower_file))
        base = self.base_spec.to_dict()
        model_json = {
            "builder": "offline", "format": CHECKPOINT_FORMAT, "base": base, "mode": self.cfg.mode,
            "aligned": True, "image_dim": heads.out_dim, "text_dim": heads.out_dim,
            "heads": {**heads.cfg, "alpha": float(heads.block_scales[0]), "beta_image": float(heads.block_scales[1]),
                      "beta_text": float(heads.block_scales[2])},
            "heads_file": "heads.safetensors", "tower_file": tower_file, "files": files,
            "recommended_fusion": self.fusion, "created_at": utc_now(), "code_version": code_version(),
        }
        with open(os.path.join(self.out_dir, MODEL_JSON), "w", encoding="utf-8") as f:
            json.dump(model_json, f, indent=2, sort_keys=True)
        manifest = {
            "kind": "shopvec-finetune",
            "model_spec": {"name": f"local-dir:{os.path.abspath(self.out_dir)}", "pretrained": None},
            "base_model": {"spec": base, "model_id": getattr(self.loaded, "model_id", None),
                           "random_init": bool(getattr(self.loaded, "random_init", False)),
                           "towers": provenance() if base.get("name", "").startswith("shopvec-offline") else None},
            "mode": self.cfg.mode,
            "data": {**self.data_info, "products": len(self.items), "hash": self.data_hash, "label": self.label},
            "split": {"method": "sha256(shopvec-split:<seed>:<product_id>) -> [0,1) thresholds",
                      "seed": self.cfg.split_seed, "fractions": list(self.cfg.split),
                      "counts": training["split_counts"], "training_pairs": training["pairs"]},
            "hyper_parameters": self.cfg.to_dict(),
            "fusion": self.fusion,
            "code_version": code_version(), "created_at": utc_now(),
            "device": self.device, "precision": self.precision,
            "metrics": metrics,
            "training": {k: v for k, v in training.items() if k not in ("pairs", "split_counts")},
            "files": {**files, MODEL_JSON: sha256_file(os.path.join(self.out_dir, MODEL_JSON))},
        }
        with open(os.path.join(self.out_dir, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=_json_default)
        log.info("wrote %s (load it as [model] name = \"local-dir:%s\")", self.out_dir, os.path.abspath(self.out_dir))
        return manifest


def block_parts(heads, feats: FeatureSet, device: str = "cpu") -> dict[str, Any]:
    """The unit aligned and private blocks of every product, computed once for the block-scale search."""
    import torch

    heads.eval()
    parts = {}
    with torch.inference_mode():
        for which, mat in (("image", feats.image), ("text", feats.text)):
            have = np.linalg.norm(mat, axis=1) > 0
            a = np.zeros((len(mat), heads.aligned_dim), np.float32)
            p = np.zeros((len(mat), mat.shape[1]), np.float32)
            if have.any():
                x = torch.from_numpy(mat[have]).to(device)
                a[have] = heads.project(x, which).float().cpu().numpy()
                mean = heads.image_mean if which == "image" else heads.text_mean
                p[have] = l2n_np((torch.nn.functional.normalize(x.float(), dim=-1) - mean).cpu().numpy())
            parts[which] = (a, p, have)
    return parts


def scaled_vectors(parts: Mapping[str, Any], beta_image: float, beta_text: float) -> dict[str, np.ndarray]:
    """``[a | beta p | 0]`` layouts (alpha = 1) as ``AlignmentHeads.embed`` builds them, L2-normalised."""
    ai, pi, hi = parts["image"]
    at, pt, ht = parts["text"]
    img = np.concatenate([ai, beta_image * pi, np.zeros((len(ai), pt.shape[1]), np.float32)], axis=1)
    txt = np.concatenate([at, np.zeros((len(at), pi.shape[1]), np.float32), beta_text * pt], axis=1)
    img[~hi] = 0
    txt[~ht] = 0
    return {"image": l2n_np(img), "text": l2n_np(txt)}


def l2n_np(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(n > 0, x / np.where(n > 0, n, 1.0), 0.0).astype(np.float32)


def _contiguous(sd: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def finetune(base_spec, items: Sequence[CatalogItem], cfg: FinetuneConfig, out_dir: str, **kw) -> TrainResult:
    """Train and write a checkpoint folder; see :class:`Trainer` for the keyword arguments."""
    return Trainer(base_spec, items, cfg, out_dir, **kw).run()
