"""The thin Beam ``ModelHandler`` around :mod:`embedders`.

One model per worker process: ``load_model`` goes through a process-wide cache keyed by the model spec, so every
RunInference transform in the process (products and reviews) shares one copy, as RunInference's shared handle does
for one transform. Loads are counted in the Beam metric ``shopvec/model_loads`` and per process in
``shopvec/model_loads.process.<host>:<pid>`` (reported from the first batch a freshly loaded model serves, since
metrics cannot be recorded from ``setup``).

Inputs are :class:`EncodeRequest` (an already preprocessed image tensor and/or already tokenised text): decoding,
resizing and tokenising happen in parallel DoFns upstream, so the model call only stacks and runs the towers.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from embedders.encoder import Encoder
from embedders.images import ImageLimits
from embedders.models import ModelSpec, load_model

log = logging.getLogger(__name__)

_CACHE: dict[Any, Encoder] = {}
_CACHE_LOCK = threading.Lock()
_UNREPORTED_LOADS: dict[Any, int] = {}
PER_PROCESS_LOADS = "model_loads.process."  # + "<host>:<pid>"


def process_tag() -> str:
    """``<host>:<pid>`` of this worker process (computed per call: the pid changes across fork)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def shared_encoder(spec: ModelSpec, limits: ImageLimits) -> Encoder:
    key = (spec, limits)
    with _CACHE_LOCK:
        enc = _CACHE.get(key)
        if enc is None:
            enc = Encoder(load_model(spec), limits)
            _CACHE[key] = enc
            _UNREPORTED_LOADS[key] = _UNREPORTED_LOADS.get(key, 0) + 1
            log.info("model %s loaded in worker process %d", spec.model_id, os.getpid())
        return enc


@dataclass
class EncodeRequest:
    image: Any = None  # CHW tensor or None
    tokens: Any = None  # token tensor / dict or None
    payload: Any = None  # carried through untouched (metadata, hashes, review weight)


class ShopvecModelHandler(ModelHandler):
    """``(key, EncodeRequest)`` batches -> ``(key, PredictionResult(None, {"image": vec|None, "text": vec|None}))``.

    Keyed so that a batch can mix products and reviews; both towers run once per batch.
    """

    def __init__(self, spec: ModelSpec, limits: ImageLimits, batch_size: int = 32, max_wait_s: float | None = None):
        super().__init__()
        self._spec = spec
        self._limits = limits
        self._batch_size = batch_size

    def load_model(self) -> Encoder:
        return shared_encoder(self._spec, self._limits)

    def run_inference(self, batch: Sequence[tuple[Any, EncodeRequest]], model: Encoder,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[tuple[Any, PredictionResult]]:
        key = (self._spec, self._limits)
        with _CACHE_LOCK:
            loads = _UNREPORTED_LOADS.pop(key, 0)
        if loads:
            Metrics.counter("shopvec", "model_loads").inc(loads)
            # Per worker process too (summed by the runner across bundles of that process), so a test can check
            # "loaded at most once per worker process" from Beam metrics on any runner.
            Metrics.counter("shopvec", f"{PER_PROCESS_LOADS}{process_tag()}").inc(loads)
        img_idx = [i for i, (_, r) in enumerate(batch) if r.image is not None]
        txt_idx = [i for i, (_, r) in enumerate(batch) if r.tokens is not None]
        img_vecs = model.encode_image_batch([batch[i][1].image for i in img_idx]) if img_idx else None
        txt_vecs = model.encode_token_batch([batch[i][1].tokens for i in txt_idx]) if txt_idx else None
        out: list[dict[str, Any]] = [{"image": None, "text": None} for _ in batch]
        for j, i in enumerate(img_idx):
            out[i]["image"] = img_vecs[j]
        for j, i in enumerate(txt_idx):
            out[i]["text"] = txt_vecs[j]
        Metrics.counter("shopvec", "image_inferences").inc(len(img_idx))
        Metrics.counter("shopvec", "text_inferences").inc(len(txt_idx))
        return [(k, PredictionResult(r.payload, o, self._spec.model_id)) for (k, r), o in zip(batch, out)]

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}

    def get_num_bytes(self, batch) -> int:
        return len(batch)

    def get_metrics_namespace(self) -> str:
        return "shopvec_inference"

    def share_model_across_processes(self) -> bool:
        return False
