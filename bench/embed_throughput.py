"""Embed pipeline throughput vs model-only throughput, and peak RSS at 1x and 4x catalog size.

    .venv/bin/python bench/embed_throughput.py [--catalog PATH] [--n N] [--model ViT-B-32] [--batch 32]

- catalog: the shared Flipkart sample when present (else a generated demo catalog of --n products);
- model: ViT-B-32 architecture, random init, CPU (the numbers measure compute, not quality);
- model-only: both towers' forward passes over the same products' pre-decoded, pre-processed images and
  pre-tokenised texts, at the pipeline's batch size, in a loop (no I/O, no decode, no Beam);
- end-to-end: `shopvec embed` (DirectRunner) over the same products, wall time including reading, decoding,
  Beam and writing; ratio = end-to-end products/s / model-only products/s (same run, same machine);
- peak RSS: each measurement runs in a fresh subprocess (its ``ru_maxrss``); 4x = the catalog repeated 4 times with
  new ids; the parent also samples the child's RSS to show the running peak at 25/50/75/100 % of each run.
Prints a Markdown table and writes JSON to --json-out.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "flipkart_1050", "products.parquet")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_catalog(src: str, n: int | None, times: int, out: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    cols = [c for c in ("product_id", "title", "description", "image", "category_l1") if c in pf.schema_arrow.names]
    t = pf.read(columns=cols)
    if n:
        t = t.slice(0, n)
    writer = pq.ParquetWriter(out, t.schema)
    for k in range(times):
        ids = pa.array([f"{p}-x{k}" for p in t.column("product_id").to_pylist()])
        writer.write_table(t.set_column(0, "product_id", ids), row_group_size=64)
    writer.close()
    return out


def worker_model_only(catalog: str, model: str, batch: int) -> dict:
    import pyarrow.parquet as pq
    import torch

    from embedders.encoder import Encoder
    from embedders.models import ModelSpec, load_model
    from embedders.text import product_text

    t = pq.read_table(catalog)
    enc = Encoder(load_model(ModelSpec(name=model, device="cpu")))
    imgs, toks = [], []
    for r in t.to_pylist():
        if r.get("image"):
            imgs.append(enc.prepare_image(r["image"]))
        text = product_text([r.get("title"), r.get("description")])
        if text:
            toks.append(enc.prepare_texts([text])[0])
    n = t.num_rows
    # warm-up batch (not timed), as the pipeline's first batch also pays one-off costs inside its wall time
    enc.encode_image_batch(imgs[:batch]), enc.encode_token_batch(toks[:batch])
    t0 = time.perf_counter()
    for i in range(0, max(len(imgs), len(toks)), batch):
        if i < len(imgs):
            enc.encode_image_batch(imgs[i:i + batch])
        if i < len(toks):
            enc.encode_token_batch(toks[i:i + batch])
    dt = time.perf_counter() - t0
    return {"products": n, "seconds": dt, "products_per_s": n / dt, "torch_threads": torch.get_num_threads(),
            "peak_rss_mb": _peak_rss_mb()}


def worker_pipeline(catalog: str, model: str, batch: int) -> dict:
    from pipelines.cli import setup_logging
    from pipelines.config import load_config
    from pipelines.embed import run_embed

    setup_logging(0, True)
    cfg = load_config(os.path.join(REPO, "configs", "demo.toml"),
                      [f'model.name="{model}"', f"batch.image_batch_size={batch}", 'model.device="cpu"'])
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        rep = run_embed(cfg, catalog, None, os.path.join(d, "out"), runner="DirectRunner")
        dt = time.perf_counter() - t0
    n = rep["inputs"]["product_rows"]
    return {"products": n, "embedded": rep["counts"]["embedded"], "seconds": dt, "products_per_s": n / dt,
            "peak_rss_mb": _peak_rss_mb()}


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run_worker(kind: str, catalog: str, model: str, batch: int) -> dict:
    """Run one measurement in a fresh process; also samples its RSS every 0.5 s (Linux /proc) so the report can
    show whether memory keeps growing during the run or levels off (RSS at 25/50/75/100 % of the run)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--catalog", catalog, "--model", model,
                                 "--batch", str(batch)], stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        while proc.poll() is None:
            r = _rss_mb(proc.pid)
            if r is not None:
                samples.append((time.monotonic() - t0, r))
            time.sleep(0.5)
        out = proc.stdout.read()
        proc.stdout.close()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{kind} worker failed:\n{err.read()[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    if samples:
        end = samples[-1][0]
        res["rss_mb_at"] = {f"{q}%": round(max((r for t, r in samples if t <= end * q / 100), default=0.0))
                            for q in (25, 50, 75, 100)}  # running peak up to that point of the run
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalog", default=SHARED if os.path.exists(SHARED) else None)
    ap.add_argument("--n", type=int, default=None, help="use the first N products (default: all)")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--worker", choices=["model", "pipeline"])
    ap.add_argument("--json-out", default=os.path.join(REPO, "bench", "results", "embed_throughput.json"))
    a = ap.parse_args()
    if a.worker:
        fn = worker_model_only if a.worker == "model" else worker_pipeline
        print(json.dumps(fn(a.catalog, a.model, a.batch)))
        return
    with tempfile.TemporaryDirectory() as d:
        src = a.catalog
        if src is None:
            from pipelines.demo_data import generate

            src = generate(os.path.join(d, "demo"), n=a.n or 400, seed=0, bad_records=False)["products"]
        one = make_catalog(src, a.n, 1, os.path.join(d, "x1.parquet"))
        many = make_catalog(src, a.n, a.scale, os.path.join(d, f"x{a.scale}.parquet"))
        # The model-only baseline is measured before and after the pipeline runs and averaged: on a shared host the
        # load changes during the run, and bracketing keeps the ratio honest.
        model_a = run_worker("model", one, a.model, a.batch)
        pipe1 = run_worker("pipeline", one, a.model, a.batch)
        pipe4 = run_worker("pipeline", many, a.model, a.batch)
        model_b = run_worker("model", one, a.model, a.batch)
        model = dict(model_a, products_per_s=(model_a["products_per_s"] + model_b["products_per_s"]) / 2,
                     seconds=(model_a["seconds"] + model_b["seconds"]) / 2,
                     runs_products_per_s=[model_a["products_per_s"], model_b["products_per_s"]])
    res = {"model": f"{a.model} (random init, CPU)", "batch": a.batch, "cpus": os.cpu_count(), "model_only": model,
           "pipeline_1x": pipe1, f"pipeline_{a.scale}x": pipe4,
           "ratio_end_to_end_over_model_only": pipe1["products_per_s"] / model["products_per_s"],
           f"ratio_{a.scale}x_over_model_only": pipe4["products_per_s"] / model["products_per_s"],
           "load_average_end": os.getloadavg(),
           f"rss_growth_{a.scale}x_over_1x": pipe4["peak_rss_mb"] / pipe1["peak_rss_mb"] - 1.0}
    os.makedirs(os.path.dirname(a.json_out), exist_ok=True)
    with open(a.json_out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"| measurement | products | seconds | products/s | peak RSS MB |\n|---|---|---|---|---|")
    for name, r in (("model only (both towers)", model), ("pipeline 1x", pipe1), (f"pipeline {a.scale}x", pipe4)):
        print(f"| {name} | {r['products']} | {r['seconds']:.1f} | {r['products_per_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    print(f"\nmodel-only runs (before/after): {model['runs_products_per_s'][0]:.2f} / {model['runs_products_per_s'][1]:.2f} products/s")
    print(f"ratio end-to-end / model-only = {res['ratio_end_to_end_over_model_only']:.3f} at 1x, "
          f"{res[f'ratio_{a.scale}x_over_model_only']:.3f} at {a.scale}x (target >= 0.85)")
    print(f"peak RSS {a.scale}x vs 1x: {res[f'rss_growth_{a.scale}x_over_1x'] * 100:+.1f}% (target within 10%)")
    for name, r in (("pipeline 1x", pipe1), (f"pipeline {a.scale}x", pipe4)):
        if "rss_mb_at" in r:
            print(f"{name}: running peak RSS at 25/50/75/100 % of the run: "
                  + " / ".join(f"{v}" for v in r["rss_mb_at"].values()) + " MB")


if __name__ == "__main__":
    main()
