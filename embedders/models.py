"""Model specs and loading: one entry point, ``load_model(spec)``, resolving every pretrained source in one place.

A :class:`ModelSpec` names an open_clip model the way open_clip does:

- ``name="ViT-B-32", pretrained="laion2b_s34b_b79k"`` — a built-in architecture + a pretrained tag (downloaded by
  open_clip into its cache; needs network the first time);
- ``name="ViT-B-32", pretrained="/path/to/checkpoint.pt|.safetensors"`` — a local checkpoint file, loaded with
  ``torch.load(weights_only=True)`` (never unpickles arbitrary objects);
- ``name="hf-hub:org/repo"`` — config + weights from the Hugging Face hub (open_clip's own resolver);
- ``name="local-dir:/path"`` — an ``open_clip_config.json`` + weights in a folder; a folder holding a
  ``shopvec_model.json`` is routed to the builder it names (e.g. a fine-tuned offline-tower model);
- ``name="shopvec-offline..."`` — the offline pretrained unimodal towers (``embedders.offline``);
- ``name="shopvec-tiny", pretrained=None`` — the tiny architecture this project registers (``model_configs/``),
  deterministic seeded random weights: for tests and the demo. **Random weights say so** (``random_init=True``,
  a loud warning, and ``model_id`` ends in ``@random-init(seed=N)``).

Any spec with ``pretrained`` empty gets seeded random weights, which is refused unless ``allow_random_init``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import pickle
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UserError

log = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
TINY_MODEL = "shopvec-tiny"

# name prefix -> "module:function" building a LoadedModel from a spec
BUILDERS: dict[str, str] = {
    "shopvec-offline": "embedders.offline:load_offline_model",
}
# shopvec_model.json {"builder": key} -> "module:function"
DIR_BUILDERS: dict[str, str] = {
    "offline": "embedders.offline:load_offline_model",
}

_registered = False
_lock = threading.Lock()


def register_project_configs() -> None:
    """Register this project's model configs (``shopvec-tiny``) with open_clip. Idempotent."""
    global _registered
    with _lock:
        if _registered:
            return
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class ModelSpec:
    name: str = TINY_MODEL
    pretrained: str | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    allow_random_init: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"[model] unknown key(s) {sorted(unknown)}; expected {sorted(known)}")
        d = dict(d)
        if d.get("pretrained") in ("", "none", "None"):
            d["pretrained"] = None
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def random_init(self) -> bool:
        if self.name.startswith(("hf-hub:", "local-dir:")):
            return False
        if self.name.startswith(tuple(BUILDERS)):
            return False  # builders decide; they report their own flag
        return not self.pretrained

    @property
    def model_id(self) -> str:
        """Stable identity of the weights: what every artifact records."""
        if self.name.startswith(("hf-hub:", "local-dir:")) or self.name.startswith(tuple(BUILDERS)):
            return self.name if not self.pretrained else f"{self.name}@{self.pretrained}"
        if not self.pretrained:
            return f"{self.name}@random-init(seed={self.seed})"
        return f"{self.name}@{self.pretrained}"

    def embedding_identity(self) -> dict[str, Any]:
        """What changes vectors (device/precision may change low bits on GPU, so they are recorded too)."""
        ident = {"model_id": self.model_id}
        if self.pretrained and os.path.isfile(self.pretrained):
            st = os.stat(self.pretrained)
            ident["checkpoint_size"] = st.st_size
        return ident


@dataclass
class LoadedModel:
    model: Any
    preprocess: Callable  # PIL.Image (RGB) -> CHW float tensor
    tokenizer: Callable  # list[str] -> LongTensor [n, ctx] (or a dict of tensors for HF towers)
    model_id: str
    random_init: bool
    image_dim: int
    text_dim: int
    device: str = "cpu"
    dtype: str = "fp32"
    aligned: bool = True  # image and text vectors share one space (CLIP); False for unaligned towers
    image_size: int = 224
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "random_init": self.random_init, "image_dim": self.image_dim,
                "text_dim": self.text_dim, "aligned": self.aligned, "device": self.device, "dtype": self.dtype,
                **self.info}


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"[model] device = {device!r} but CUDA is not available on this machine; use 'auto' or 'cpu'")
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"[model] precision = {precision!r}; expected auto, fp32, fp16 or bf16")
    if device == "cpu" and precision == "fp16":
        raise UserError("[model] precision = 'fp16' needs a GPU; use 'auto' or 'fp32' on CPU")
    return precision


def _import(target: str) -> Callable:
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def _builder_for(spec: ModelSpec) -> Callable | None:
    for prefix, target in BUILDERS.items():
        if spec.name.startswith(prefix):
            return _import(target)
    if spec.name.startswith("local-dir:"):
        marker = os.path.join(spec.name[len("local-dir:"):], "shopvec_model.json")
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                builder = json.load(f).get("builder")
            if builder not in DIR_BUILDERS:
                raise UserError(f"{marker}: unknown builder {builder!r}; expected one of {sorted(DIR_BUILDERS)}")
            return _import(DIR_BUILDERS[builder])
    return None


def _check_source(spec: ModelSpec) -> None:
    import open_clip

    if spec.name.startswith("local-dir:"):
        d = spec.name[len("local-dir:"):]
        if not os.path.isdir(d):
            raise UserError(f"[model] name = {spec.name!r}: folder {d} does not exist")
        return
    if spec.name.startswith("hf-hub:"):
        return
    if open_clip.get_model_config(spec.name) is None:
        raise UserError(f"[model] name = {spec.name!r} is not an open_clip architecture; see open_clip.list_models(), "
                        f"or use 'hf-hub:org/repo' or 'local-dir:/path'")
    if spec.pretrained:
        if os.path.sep in spec.pretrained or spec.pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            if not os.path.isfile(spec.pretrained):
                raise UserError(f"[model] pretrained = {spec.pretrained!r}: checkpoint file not found")
        elif not open_clip.get_pretrained_cfg(spec.name, spec.pretrained) and not os.path.isfile(spec.pretrained):
            tags = open_clip.list_pretrained_tags_by_model(spec.name)
            raise UserError(f"[model] pretrained = {spec.pretrained!r} is not a tag of {spec.name} (tags: {tags}) "
                            f"nor a checkpoint file")
    elif not spec.allow_random_init:
        raise UserError(f"[model] {spec.name} has no pretrained weights set and allow_random_init = false; "
                        f"set [model] pretrained to a tag or a checkpoint file")


def preprocess_config(spec: ModelSpec) -> dict[str, Any]:
    """The image preprocessing of ``spec`` without building the model (cheap: used by decode workers)."""
    register_project_configs()
    builder = _builder_for(spec)
    if builder is not None:
        mod = importlib.import_module(builder.__module__)
        return mod.preprocess_config(spec)
    from open_clip.factory import _get_hf_config, get_model_config
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = dataclasses.asdict(PreprocessCfg())
    if spec.name.startswith("local-dir:"):
        with open(os.path.join(spec.name[len("local-dir:"):], "open_clip_config.json"), encoding="utf-8") as f:
            j = json.load(f)
        model_cfg = j["model_cfg"]
        cfg = merge_preprocess_dict(cfg, j.get("preprocess_cfg", {}))
    elif spec.name.startswith("hf-hub:"):
        j = _get_hf_config(spec.name[len("hf-hub:"):])
        model_cfg = j["model_cfg"]
        cfg = merge_preprocess_dict(cfg, j.get("preprocess_cfg", {}))
    else:
        model_cfg = get_model_config(spec.name)
        if spec.pretrained:
            tag_cfg = get_pretrained_cfg(spec.name, spec.pretrained)
            if tag_cfg:
                cfg = merge_preprocess_dict(cfg, tag_cfg)
    cfg["size"] = model_cfg["vision_cfg"].get("image_size", cfg["size"])
    return cfg


def build_preprocess(spec: ModelSpec) -> Callable:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = preprocess_config(spec)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def build_tokenizer(spec: ModelSpec) -> Callable:
    register_project_configs()
    builder = _builder_for(spec)
    if builder is not None:
        mod = importlib.import_module(builder.__module__)
        return mod.build_tokenizer(spec)
    import open_clip

    return open_clip.get_tokenizer(spec.name)


def _output_dims(model, image_size: int) -> tuple[int, int]:
    import torch

    with torch.inference_mode():
        dev = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        img = torch.zeros(1, 3, image_size, image_size, device=dev, dtype=dtype)
        image_dim = int(model.encode_image(img).shape[-1])
    proj = getattr(model, "text_projection", None)
    if proj is not None and hasattr(proj, "shape"):
        text_dim = int(proj.shape[-1])
    else:
        text_dim = image_dim
    return image_dim, text_dim


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build the model of ``spec`` on its device and precision, in eval mode."""
    register_project_configs()
    builder = _builder_for(spec)
    if builder is not None:
        return builder(spec)
    import open_clip
    import torch

    _check_source(spec)
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    random_init = spec.random_init
    if random_init:
        # Deterministic weights: same seed -> same model on every machine; the global RNG is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = open_clip.create_model(spec.name, pretrained=None, precision=precision, device=device,
                                           pretrained_text=False, pretrained_image=False)
        log.warning("MODEL %s HAS RANDOM WEIGHTS (random-init, seed=%d): vectors are deterministic but say nothing "
                    "about product similarity", spec.name, spec.seed)
    else:
        try:
            model = open_clip.create_model(spec.name, pretrained=spec.pretrained, precision=precision, device=device,
                                           weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"[model] {spec.pretrained}: refused to load: the checkpoint holds objects other than "
                            f"tensors (loaded with weights_only=True; convert it to a plain state dict or safetensors)"
                            ) from e
        except (RuntimeError, FileNotFoundError, ValueError, OSError, KeyError) as e:
            raise UserError(f"[model] could not load {spec.model_id}: {str(e).splitlines()[0][:300]}") from e
    model.eval()
    pre_cfg = preprocess_config(spec)
    image_size = pre_cfg["size"] if isinstance(pre_cfg["size"], int) else pre_cfg["size"][0]
    image_dim, text_dim = _output_dims(model, image_size)
    loaded = LoadedModel(model=model, preprocess=build_preprocess(spec), tokenizer=build_tokenizer(spec),
                         model_id=spec.model_id, random_init=random_init, image_dim=image_dim, text_dim=text_dim,
                         device=device, dtype=precision, aligned=True, image_size=image_size,
                         info={"name": spec.name, "pretrained": spec.pretrained})
    log.info("loaded model %s on %s (%s): image dim %d, text dim %d%s", spec.model_id, device, precision, image_dim,
             text_dim, " [RANDOM-INIT]" if random_init else "")
    return loaded


def output_dims(spec: ModelSpec) -> tuple[int, int]:
    """(image_dim, text_dim) of ``spec`` from its config, without loading weights when possible."""
    register_project_configs()
    builder = _builder_for(spec)
    if builder is not None:
        mod = importlib.import_module(builder.__module__)
        if hasattr(mod, "output_dims"):
            return tuple(mod.output_dims(spec))  # type: ignore[return-value]
        lm = builder(spec)
        return lm.image_dim, lm.text_dim
    from open_clip.factory import _get_hf_config, get_model_config

    if spec.name.startswith("local-dir:"):
        with open(os.path.join(spec.name[len("local-dir:"):], "open_clip_config.json"), encoding="utf-8") as f:
            model_cfg = json.load(f)["model_cfg"]
    elif spec.name.startswith("hf-hub:"):
        model_cfg = _get_hf_config(spec.name[len("hf-hub:"):])["model_cfg"]
    else:
        model_cfg = get_model_config(spec.name)
        if model_cfg is None:
            _check_source(spec)
    d = int(model_cfg["embed_dim"])
    return d, d
