"""Helpers shared by the query-service tests (no tests here): small real index versions, a live loopback server."""
from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

N = 300
DIM = 64  # the tiny model's embedding dim (fusion "sum")
TOKEN = "s3cret-test-token"
CATEGORIES = ["Shoes", "Mugs", "Lamps"]


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def provenance(model_seed: int = 0, fusion: str = "sum", dim: int = DIM) -> dict:
    """What `shopvec embed` records, for the tiny seeded model (its text/image towers give 64-d vectors)."""
    from embedders.fusion import FusionConfig
    from embedders.models import ModelSpec

    spec = ModelSpec(name="shopvec-tiny", seed=model_seed, device="cpu")
    return {"model_id": spec.model_id, "random_init": True, "model": {"spec": spec.to_dict()}, "dim": dim,
            "modality_dims": {"image": 64, "text": 64},
            "fusion": FusionConfig.from_dict({"mode": fusion}).to_dict()}


def publish(root: Path | str, version: str, *, seed: int, n: int = N, dim: int = DIM, model_seed: int = 0,
            fusion: str = "sum", with_model: bool = True) -> str:
    """Write embeddings (clustered random unit vectors + metadata) and build + publish them as ``version`` with the
    index library (exact Flat; CURRENT switches atomically)."""
    from index.build import BuildConfig, build_and_publish
    from index.embeddings_io import write_embeddings

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, dim)).astype(np.float32)
    x = centers[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"P{i:06d}" for i in range(n)]
    meta = {"title": [f"product {i}" for i in range(n)], "category": [CATEGORIES[i % 3] for i in range(n)],
            "price": [float((i * 37) % 400) for i in range(n)], "in_stock": [i % 4 != 0 for i in range(n)]}
    emb = Path(root).parent / f"emb-{Path(root).name}-{version}"
    write_embeddings(emb, ids, x, metadata=meta,
                     provenance=provenance(model_seed, fusion, dim) if with_model else None)
    cfg = BuildConfig(index_key="Flat", tuning_queries=40, fresh_queries=40, latency_queries=10,
                      publish_check_queries=10)
    ver, _ = build_and_publish(str(emb), str(root), cfg, version=version)
    return ver


def expected_similar(root, product_id: str, k: int, version: str | None = None) -> list[dict]:
    from index.search import ProductIndex

    return ProductIndex.load(str(root), version=version).similar(product_id, k=k)


def make_png(colour=(200, 30, 30), size: int = 48) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((6, 6, size - 6, size - 6), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wait_for(cond: Callable[[], bool], timeout: float, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(poll)


@contextlib.contextmanager
def live_server(app, **config) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 (an ephemeral port bound up front) in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
