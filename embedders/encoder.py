"""Batched inference: preprocessed images / tokenised texts -> float32 L2-normalised numpy.

The expensive-but-model-free work (decode, resize, tokenise) is split from the model call so that a pipeline can do
it in parallel workers and hand the model ready tensors (``prepare_image`` / ``prepare_texts`` then
``encode_image_batch`` / ``encode_token_batch``). ``encode_images`` / ``encode_texts`` do everything for library
callers (the query service, evaluation).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import numpy as np

from .images import ImageLimits, decode_image
from .models import LoadedModel, ModelSpec, load_model

log = logging.getLogger(__name__)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


def _stack_tokens(tokens: Sequence[Any]):
    import torch

    first = tokens[0]
    if isinstance(first, dict):  # HF tokenizers: dict of 1-D tensors
        return {k: torch.stack([t[k] for t in tokens]) for k in first}
    return torch.stack(list(tokens))


class Encoder:
    """Wraps a :class:`LoadedModel` for batched, thread-safe inference."""

    def __init__(self, loaded: LoadedModel, limits: ImageLimits = ImageLimits()):
        self.loaded = loaded
        self.limits = limits
        self._lock = threading.Lock()

    # ---- model-free preparation (safe to run in other workers) -------------------------------------------------
    def prepare_image(self, data: bytes):
        """bytes -> CHW tensor (raises RecordError on a bad image)."""
        return self.loaded.preprocess(decode_image(data, self.limits, target_size=self.loaded.image_size))

    def prepare_texts(self, texts: Sequence[str]) -> list:
        """texts -> per-text token tensors (truncated to the model's context length by the tokenizer)."""
        toks = self.loaded.tokenizer(list(texts))
        if isinstance(toks, dict):
            return [{k: v[i] for k, v in toks.items()} for i in range(len(texts))]
        return list(toks)

    # ---- model calls ------------------------------------------------------------------------------------------
    def _dtype(self):
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.loaded.dtype, torch.float32)

    def encode_image_batch(self, tensors: Sequence[Any]) -> np.ndarray:
        import torch

        if len(tensors) == 0:
            return np.zeros((0, self.loaded.image_dim), np.float32)
        batch = torch.stack(list(tensors)).to(self.loaded.device, dtype=self._dtype())
        with self._lock, torch.inference_mode():
            out = self.loaded.model.encode_image(batch)
        return l2_normalize(out.float().cpu().numpy())

    def encode_token_batch(self, tokens: Sequence[Any]) -> np.ndarray:
        import torch

        if len(tokens) == 0:
            return np.zeros((0, self.loaded.text_dim), np.float32)
        batch = _stack_tokens(tokens)
        if isinstance(batch, dict):
            batch = {k: v.to(self.loaded.device) for k, v in batch.items()}
        else:
            batch = batch.to(self.loaded.device)
        with self._lock, torch.inference_mode():
            out = self.loaded.model.encode_text(batch)
        return l2_normalize(out.float().cpu().numpy())

    # ---- convenience for library callers ----------------------------------------------------------------------
    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        """Images as bytes, PIL images or preprocessed tensors -> [n, image_dim]."""
        from PIL import Image

        out = []
        for i in range(0, len(images), batch_size):
            chunk = []
            for im in images[i:i + batch_size]:
                if isinstance(im, (bytes, bytearray, memoryview)):
                    chunk.append(self.prepare_image(bytes(im)))
                elif isinstance(im, Image.Image):
                    chunk.append(self.loaded.preprocess(im.convert("RGB")))
                else:
                    chunk.append(im)
            out.append(self.encode_image_batch(chunk))
        return np.concatenate(out) if out else np.zeros((0, self.loaded.image_dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = [self.encode_token_batch(self.prepare_texts(texts[i:i + batch_size]))
               for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.loaded.text_dim), np.float32)


def load_encoder(spec: ModelSpec, limits: ImageLimits = ImageLimits()) -> Encoder:
    return Encoder(load_model(spec), limits)


def load_query_encoder(model: dict[str, Any], limits: dict[str, Any] | None = None) -> Encoder:
    """Encoder for the model recorded in an index manifest / embeddings provenance (``model`` = spec dict)."""
    spec_dict = model.get("spec") or (model.get("model") or {}).get("spec")
    if not spec_dict or "name" not in spec_dict:
        from .errors import UserError

        raise UserError(f"the index/embeddings record no model spec (model id {model.get('model_id')!r}); "
                        f"cannot encode text/image queries with the same model")
    spec = ModelSpec.from_dict({k: v for k, v in spec_dict.items() if k in ModelSpec.__dataclass_fields__})
    return Encoder(load_model(spec), ImageLimits.from_dict(limits or {}))
