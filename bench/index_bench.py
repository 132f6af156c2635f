"""FAISS index benchmark: the tuned index from ``index.build`` versus exact search, in the same run.

    # 1M x 512 clustered synthetic set (Gaussian mixture, 2,000 clusters), auto index choice:
    python bench/index_bench.py --n 1000000
    # quick run, several keys side by side, JSON next to the printed table:
    python bench/index_bench.py --n 100000 --key auto --key HNSW32 --json-out /tmp/bench.json
    # the real catalog's embeddings (shopvec embed output dir / Parquet dir / glob):
    python bench/index_bench.py --embeddings OUT

Measured for every key, against exact inner-product search over the same vectors (ground truth and baseline):
recall@k of ``similar()`` (queries are indexed products, the product itself excluded from both lists),
single-query p50/p99 latency (1 OpenMP thread; exact search is also timed with all threads and its better figure is
the baseline), batched QPS (all threads), build time (train + add, then tuning), peak RSS and the serialized index
size. The synthetic set is generated in float32 chunks: cluster weights are log-normal (unequal cluster sizes),
each cluster has its own spread, and the vectors are L2-normalised.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import psutil  # noqa: E402

from index.build import BuildConfig, build_index, parse_memory  # noqa: E402
from index.search import omp_threads  # noqa: E402

log = logging.getLogger("index_bench")


# --------------------------------------------------------------------------------------------------------- data
def gaussian_mixture(n: int, dim: int, clusters: int, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """n x dim float32 unit vectors from a mixture of ``clusters`` Gaussians (generated chunk by chunk).

    Centres are random unit vectors; cluster weights ~ log-normal(0, 0.7) (unequal sizes); each cluster's isotropic
    noise has a total norm uniform in [0.7, 1.3] x the centre's norm, so neighbours are mostly, not only, in-cluster.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 0.7, clusters)
    weights /= weights.sum()
    sigma = (rng.uniform(0.7, 1.3, clusters) / np.sqrt(dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        lab = rng.choice(clusters, size=m, p=weights)
        block = centres[lab] + rng.standard_normal((m, dim), dtype=np.float32) * sigma[lab, None]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s:s + m] = block
    return x


# ------------------------------------------------------------------------------------------------------ helpers
class PeakRSS:
    """Samples this process' RSS in a thread (peak over a phase; ru_maxrss only gives the whole-process peak)."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._proc = psutil.Process()

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def rss() -> int:
    return psutil.Process().memory_info().rss


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def gib(b: float) -> float:
    return round(b / (1 << 30), 3)


def exact_truth(x: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact top-k (self excluded) and the k-th score for each query position; also the batched exact seconds."""
    t0 = time.perf_counter()
    D, I = faiss.knn(np.ascontiguousarray(x[positions]), x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    dt = time.perf_counter() - t0
    ids = np.empty((len(positions), k), dtype=np.int64)
    kth = np.empty(len(positions), dtype=np.float32)
    for r, p in enumerate(positions):
        keep = I[r] != p
        ids[r] = I[r][keep][:k]
        kth[r] = D[r][keep][:k][-1]
    return ids, kth, dt


def exact_single_latency(x: np.ndarray, positions: np.ndarray, k: int, threads: int) -> np.ndarray:
    out = []
    with omp_threads(threads):
        faiss.knn(np.ascontiguousarray(x[positions[:1]]), x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)  # warm
        for p in positions:
            q = np.ascontiguousarray(x[p:p + 1])
            t0 = time.perf_counter()
            faiss.knn(q, x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
            out.append(time.perf_counter() - t0)
    return np.asarray(out) * 1000.0


def recall_at_k(x, positions, I, kth, k) -> float:
    valid = (I[:, :k] >= 0) & (I[:, :k] != positions[:, None])
    safe = np.where(valid, I[:, :k], 0)
    scores = np.einsum("rkd,rd->rk", x[safe], x[positions])
    return float((valid & (scores >= kth[:, None] - 1e-5)).sum()) / (k * len(positions))


# -------------------------------------------------------------------------------------------------------- bench
def bench_key(x: np.ndarray, ids, key: str, args, eval_pos, kth, lat_pos) -> dict:
    cfg = BuildConfig(index_key=key, recall_target=args.recall_target, k=args.k, max_memory=args.max_memory,
                      tuning_queries=args.tuning_queries, fresh_queries=args.tuning_queries,
                      latency_queries=min(50, args.latency_queries), seed=args.seed + 7)
    log.info("building %s ...", key)
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        res = build_index(x, ids, cfg)
    wall = time.perf_counter() - t0
    pix, k = res.pix, args.k
    # recall on the evaluation queries (not the tuner's samples), through similar()
    t1 = time.perf_counter()
    _, I = pix.similar_positions(eval_pos, k)
    batched_s = time.perf_counter() - t1
    rec = recall_at_k(x, eval_pos, I, kth, k)
    lat = []
    with omp_threads(1):
        for p in lat_pos[:5]:
            pix.similar_positions([p], k)
        for p in lat_pos:
            t2 = time.perf_counter()
            pix.similar_positions([p], k)
            lat.append(time.perf_counter() - t2)
    lat_ms = np.asarray(lat) * 1000.0
    reps, t3 = 0, time.perf_counter()
    while time.perf_counter() - t3 < 1.0 or reps < 2:
        pix.similar_positions(eval_pos, k)
        reps += 1
    qps = reps * len(eval_pos) / (time.perf_counter() - t3)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = os.path.join(tmp, "index.faiss")
        t4 = time.perf_counter()
        faiss.write_index(res.index, path)
        size = os.path.getsize(path)
        write_s = time.perf_counter() - t4
    return {
        "key": res.index_key, "requested": key, "reason": res.choice_reason, "search_params": res.search_params,
        "recall_at_k": round(rec, 4), "recall_at_k_manifest": res.measured["recall_at_k"],
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 3), "p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
        "mean_ms": round(float(lat_ms.mean()), 3), "batched_qps": round(qps, 1),
        "first_batch_s": round(batched_s, 3),
        "train_s": round(res.build["train_s"], 1), "add_s": round(res.build["add_s"], 1),
        "train_add_s": round(res.build["train_s"] + res.build["add_s"], 1), "tune_s": round(res.tuning["seconds"], 1),
        "build_total_s": round(wall, 1), "peak_rss_build_gib": gib(peak.peak), "index_bytes": size,
        "index_gib": gib(size), "write_s": round(write_s, 1), "below_target": res.below_target,
        "tuning_evaluated": len(res.tuning["evaluated"]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (default 1,000,000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embeddings", help="benchmark these embeddings (embed OUT dir / Parquet dir / glob) instead")
    ap.add_argument("--key", action="append", dest="keys", metavar="KEY",
                    help="index key to benchmark, repeatable: auto (default) or a FAISS factory string")
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--max-memory", default=None, help="memory budget for the auto choice, e.g. 8GB")
    ap.add_argument("--tuning-queries", type=int, default=500)
    ap.add_argument("--queries", type=int, default=1000, help="evaluation queries (recall, batched QPS)")
    ap.add_argument("--latency-queries", type=int, default=500, help="single queries timed for the index")
    ap.add_argument("--exact-latency-queries", type=int, default=20, help="single queries timed for exact search")
    ap.add_argument("--tmp", default=None, help="where to write the index to measure its size")
    ap.add_argument("--json-out", help="write the results as JSON here too")
    args = ap.parse_args(argv)
    args.max_memory = parse_memory(args.max_memory)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    keys = args.keys or ["auto"]

    info = {"host": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "faiss": faiss.__version__,
                     "omp_threads": faiss.omp_get_max_threads(), "gpus": faiss.get_num_gpus()}}
    rss0 = rss()
    t0 = time.perf_counter()
    if args.embeddings:
        from index.embeddings_io import read_embeddings
        emb = read_embeddings(args.embeddings)
        x, ids = emb.vectors, emb.ids
        info["data"] = {"source": args.embeddings, "n": emb.n, "dim": emb.dim,
                        "model_id": emb.provenance.get("model_id")}
    else:
        x = gaussian_mixture(args.n, args.dim, args.clusters, args.seed)
        ids = None
        info["data"] = {"source": "gaussian_mixture", "n": args.n, "dim": args.dim, "clusters": args.clusters,
                        "seed": args.seed}
    n = len(x)
    info["data"]["seconds"] = round(time.perf_counter() - t0, 1)
    info["data"]["gib"] = gib(x.nbytes)
    if ids is None:
        import pyarrow as pa
        ids = pa.array([f"P{i:08d}" for i in range(n)], type=pa.string())
    log.info("data: %d x %d (%.2f GiB) in %.1f s", n, x.shape[1], x.nbytes / (1 << 30), info["data"]["seconds"])

    rng = np.random.default_rng(args.seed + 1000)
    eval_pos = np.sort(rng.choice(n, size=min(args.queries, n), replace=False))
    lat_pos = rng.choice(n, size=min(args.latency_queries, n), replace=False)
    k = min(args.k, n - 1)
    truth, kth, exact_batch_s = exact_truth(x, eval_pos, k)
    exact_lat = {}
    for th in sorted({1, faiss.omp_get_max_threads()}):
        ms = exact_single_latency(x, eval_pos[: args.exact_latency_queries], k, th)
        exact_lat[th] = {"p50_ms": round(float(np.percentile(ms, 50)), 2),
                         "p99_ms": round(float(np.percentile(ms, 99)), 2)}
    best_th = min(exact_lat, key=lambda t: exact_lat[t]["p50_ms"])
    exact = {"batched_qps": round(len(eval_pos) / exact_batch_s, 1), "single": exact_lat,
             "single_best_threads": best_th, "p50_ms": exact_lat[best_th]["p50_ms"],
             "p99_ms": exact_lat[best_th]["p99_ms"], "bytes": int(x.nbytes)}
    log.info("exact: p50 %.1f ms (%d threads), batched %.1f QPS", exact["p50_ms"], best_th, exact["batched_qps"])

    results = []
    for key in keys:
        r = bench_key(x, ids, key, args, eval_pos, kth, lat_pos)
        r["speedup_single_p50"] = round(exact["p50_ms"] / r["p50_ms"], 1)
        r["speedup_batched_qps"] = round(r["batched_qps"] / exact["batched_qps"], 1)
        results.append(r)
        log.info("%s: %s", key, json.dumps(r))
    info.update({"exact": exact, "results": results, "rss_before_data_gib": gib(rss0),
                 "peak_rss_process_gib": gib(maxrss()), "load_avg_end": os.getloadavg(),
                 "args": {k2: v for k2, v in vars(args).items()}})

    print()
    print(f"data: {info['data']}")
    print(f"host: {info['host']}; load avg at end {tuple(round(v, 2) for v in os.getloadavg())}")
    print(f"exact (FlatIP, same vectors): single-query p50 {exact['p50_ms']} ms / p99 {exact['p99_ms']} ms "
          f"({best_th} thread(s); {exact_lat}), batched {exact['batched_qps']} QPS")
    print()
    print("| index | params | recall@%d | p50 ms | p99 ms | x exact (p50) | batched QPS | x exact (QPS) | "
          "train+add s | tune s | build total s | peak RSS GiB | index GiB |" % k)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        params = ",".join(f"{a}={b}" for a, b in sorted(r["search_params"].items())) or "-"
        print(f"| {r['key']} | {params} | {r['recall_at_k']:.4f} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['speedup_single_p50']} | {r['batched_qps']} | {r['speedup_batched_qps']} | {r['train_add_s']} | "
              f"{r['tune_s']} | {r['build_total_s']} | {r['peak_rss_build_gib']} | {r['index_gib']} |")
    print(f"\nprocess peak RSS (ru_maxrss, incl. the {info['data']['gib']} GiB dataset): "
          f"{info['peak_rss_process_gib']} GiB")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(info, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
