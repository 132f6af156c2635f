"""Scale-out benchmark: single-process vs sharded (Beam, 2 worker processes) FAISS build, and an on-disk build whose
raw vectors are larger than its memory budget.

    .venv/bin/python bench/scale_bench.py                       # 1M x 512 Gaussian mixture, IVF1024,Flat, budget 1.5 GiB
    .venv/bin/python bench/scale_bench.py --n 200000 --budget 512MiB --json var/bench-scale/small.json

Steps (every build runs in its own process; this process samples the resident memory of that process *and of
every worker process it starts* every 0.1 s from /proc, and reads each one's own peak, VmHWM):

1. data (cached under ``--workdir``): ``--n`` x ``--dim`` unit vectors around ``--clusters`` centres, written with
   ``index.embeddings_io.write_embeddings`` as ``--files`` Parquet files (row groups of ``--row-group`` rows), plus
   ``--queries`` held-out query vectors from the same mixture and their exact top-``k`` (streamed, never all in RAM);
2. ``single``: what ``shopvec index`` does in one process today: ``read_embeddings`` (all vectors in RAM), train
   ``--key`` on a seeded sample, ``add`` everything (FAISS with all cores), search;
3. ``sharded``: ``pipelines.index_build.build_sharded`` on ``FnApiRunner --direct_num_workers=2
   --direct_running_mode=multi_processing`` (1 FAISS thread per worker), the same seeded sample -> the same trained
   index, merged in RAM; its results must equal the single-process ones (checked);
4. ``ondisk``: the same sharded build with ``rows_per_shard`` derived from ``--budget`` and the shards merged into
   on-disk inverted lists (``index.ivfdata``), then a fresh process loads it (``IO_FLAG_ONDISK_SAME_DIR``, lists
   memory-mapped) and answers the queries. Pass/fail: the build's peak RSS (driver + workers, summed) under
   ``--budget`` while the raw vectors are larger than it, and recall@k >= ``--recall-target``.

Recall@k is measured against exact inner-product search over all vectors, at the smallest ``nprobe`` of
``--nprobes`` that reaches ``--recall-target`` (the same nprobe for every variant).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 1 << 30
MiB = 1 << 20


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 800MB, 512MiB)")
    unit = (m.group(2) or "").upper().rstrip("B")
    mult = {"": 1, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4,
            "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}[unit]
    return int(float(m.group(1)) * mult)


# ------------------------------------------------------------------------------------------------ memory sampling
def _status(pid: int) -> dict[str, int] | None:
    """VmRSS / VmHWM (own peak) / RssAnon / RssFile from status, Pss / Pss_Anon from smaps_rollup (bytes)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text += f.read()
    except OSError:
        return None
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Pss", "Pss_Anon", "Pss_File"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        out[key] = int(m.group(1)) * 1024 if m else 0
    return out


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


class TreeSampler(threading.Thread):
    """Samples /proc of a process tree every ``every`` seconds.

    Per process: its own peak RSS (``VmHWM``, exact, kept by the kernel). For the tree: the peak of the summed PSS
    (proportional set size: a shared library page mapped by 3 processes counts 1/3 in each, so the sum is the
    physical memory the tree uses) and of the summed RSS (which counts shared pages once per process).
    """

    def __init__(self, root_pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.root = root_pid
        self.every = every
        self.stop = threading.Event()
        self.per_pid: dict[int, dict[str, int]] = {}
        self.peak = {"pss": 0, "pss_anon": 0, "rss": 0, "anon": 0}

    def run(self):
        while not self.stop.is_set():
            pids = [self.root] + _children(self.root)
            tot = {"pss": 0, "pss_anon": 0, "rss": 0, "anon": 0}
            for pid in pids:
                st = _status(pid)
                if st is None:
                    continue
                rec = self.per_pid.setdefault(pid, {"VmHWM": 0, "RssAnon": 0, "Pss": 0})
                for k in rec:
                    rec[k] = max(rec[k], st[k])
                tot["pss"] += st["Pss"]
                tot["pss_anon"] += st["Pss_Anon"]
                tot["rss"] += st["VmRSS"]
                tot["anon"] += st["RssAnon"]
            for k, v in tot.items():
                self.peak[k] = max(self.peak[k], v)
            self.stop.wait(self.every)

    def summary(self) -> dict:
        driver = self.per_pid.get(self.root, {})
        workers = [v for pid, v in self.per_pid.items() if pid != self.root and v["VmHWM"] > 64 * MiB]
        return {"driver_peak_rss": driver.get("VmHWM", 0), "driver_peak_anon": driver.get("RssAnon", 0),
                "workers_peak_rss": sorted((v["VmHWM"] for v in workers), reverse=True),
                "sum_of_process_peak_rss": driver.get("VmHWM", 0) + sum(v["VmHWM"] for v in workers),
                "peak_total_pss": self.peak["pss"], "peak_total_pss_anon": self.peak["pss_anon"],
                "peak_total_rss": self.peak["rss"], "peak_total_anon": self.peak["anon"],
                "processes": len(self.per_pid)}


def run_stage(stage: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    """Run ``stage`` in a child process, sampling its process tree; returns the stage's JSON + memory figures."""
    out = Path(args.workdir) / f"{stage}.result.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--stage", stage] + [a for a in sys.argv[1:] if a != "--stage"] + (extra or [])
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"stage {stage} failed with exit code {rc}")
    res = json.loads(out.read_text())
    res["memory"] = sampler.summary()
    res["wall_s"] = round(time.time() - t0, 2)
    return res


# ------------------------------------------------------------------------------------------------ the data
def data_dir(args) -> Path:
    return Path(args.workdir) / f"data-n{args.n}-d{args.dim}-c{args.clusters}-sp{args.spread:g}-s{args.seed}"


def stage_data(args) -> dict:
    import numpy as np

    from index.embeddings_io import write_embeddings

    d = data_dir(args)
    done = d / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    emb = d / "embeddings"
    emb.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int, r) -> np.ndarray:
        c = centres[r.integers(0, args.clusters, m)]
        x = c + r.standard_normal((m, args.dim)).astype(np.float32) * (args.spread / np.sqrt(args.dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    t0 = time.time()
    per_file = -(-args.n // args.files)
    for f in range(args.files):
        lo, hi = f * per_file, min(args.n, (f + 1) * per_file)
        if lo >= hi:
            break
        x = draw(hi - lo, np.random.default_rng([args.seed, f]))
        write_embeddings(emb / f"part-{f:05d}.parquet", [f"P{i:08d}" for i in range(lo, hi)], x,
                         provenance={"model_id": "synthetic-gaussian-mixture", "random_init": True},
                         row_group_size=args.row_group)
    q = draw(args.queries, np.random.default_rng([args.seed, 10 ** 6]))
    np.save(d / "queries.npy", q)
    # exact top-k, streamed file by file
    import pyarrow.parquet as pq

    best_d = np.full((len(q), args.k), -np.inf, np.float32)
    best_i = np.full((len(q), args.k), -1, np.int64)
    base = 0
    for path in sorted(emb.glob("*.parquet")):
        pf = pq.ParquetFile(path)
        for rg in range(pf.metadata.num_row_groups):
            col = pf.read_row_group(rg, columns=["vector"]).column(0).combine_chunks()
            x = col.flatten().to_numpy().reshape(-1, args.dim)
            s = q @ x.T
            part = np.argpartition(-s, args.k - 1, axis=1)[:, :args.k]
            cand_d = np.concatenate([best_d, np.take_along_axis(s, part, 1)], 1)
            cand_i = np.concatenate([best_i, part + base], 1)
            order = np.argsort(-cand_d, axis=1, kind="stable")[:, :args.k]
            best_d, best_i = np.take_along_axis(cand_d, order, 1), np.take_along_axis(cand_i, order, 1)
            base += len(x)
    np.save(d / "gt.npy", best_i)
    info = {"n": args.n, "dim": args.dim, "raw_vector_bytes": args.n * args.dim * 4,
            "files": len(list(emb.glob("*.parquet"))), "row_group": args.row_group,
            "seconds": round(time.time() - t0, 1)}
    done.write_text(json.dumps(info))
    return info


# ------------------------------------------------------------------------------------------------ builds
def _recall(I, gt) -> float:
    import numpy as np

    k = gt.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(I, gt)]))


def _evaluate(index, args, d: Path) -> dict:
    """Recall@k at each nprobe (batched), and single-query latency at the chosen one."""
    import faiss
    import numpy as np

    q, gt = np.load(d / "queries.npy"), np.load(d / "gt.npy")
    ivf = faiss.extract_index_ivf(index)
    curve = {}
    for nprobe in args.nprobes:
        ivf.nprobe = nprobe
        _, I = index.search(q, args.k)
        curve[nprobe] = round(_recall(I, gt), 4)
    chosen = next((p for p in args.nprobes if curve[p] >= args.recall_target), args.nprobes[-1])
    ivf.nprobe = chosen
    D, I = index.search(q, args.k)
    faiss.omp_set_num_threads(1)
    lat = []
    for i in range(min(len(q), 300)):
        t = time.perf_counter()
        index.search(q[i:i + 1], args.k)
        lat.append((time.perf_counter() - t) * 1000)
    return {"recall_curve": curve, "nprobe": chosen, "recall": curve[chosen],
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 3),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 3), "_D": D, "_I": I}


def _train(args, d: Path) -> tuple[bytes, dict]:
    """The index library's training (``create_index`` settings, ``_train_size`` sample, seeded), as `shopvec index`
    and ``build_and_publish_sharded`` train."""
    from index.build import BuildConfig, _train_size, create_index
    from pipelines import index_build as ib

    t0 = time.time()
    cfg = BuildConfig(index_key=args.key, seed=args.seed)
    plan = ib.plan_shards(ib.embeddings_files(str(d)), 10 ** 9)
    n_train = _train_size(args.key, plan.num_rows, cfg)
    index = create_index(args.key, args.dim, plan.num_rows, cfg)
    sample = ib.sample_vectors(plan, n_train, args.seed)
    index.train(sample)
    del sample
    return ib.serialize(index), {"n_train": n_train, "train_s": round(time.time() - t0, 2)}


def stage_single(args) -> dict:
    import numpy as np

    from index.embeddings_io import read_embeddings
    from pipelines import index_build as ib

    d = data_dir(args)
    t0 = time.time()
    emb = read_embeddings(str(d))  # all vectors in RAM, as the single-process build does
    t_read = time.time() - t0
    trained, tr = _train(args, d)
    t1 = time.time()
    index = ib.deserialize(trained)
    index.add(emb.vectors)
    t_add = time.time() - t1
    build_s = time.time() - t0
    ev = _evaluate(index, args, d)
    np.save(Path(args.workdir) / "single_I.npy", ev.pop("_I"))
    np.save(Path(args.workdir) / "single_D.npy", ev.pop("_D"))
    return {"variant": "single-process", "build_s": round(build_s, 2), "read_s": round(t_read, 2), **tr,
            "add_s": round(t_add, 2), **ev}


def stage_sharded(args, on_disk: bool = False) -> dict:
    import faiss
    import numpy as np

    from pipelines import index_build as ib

    d = data_dir(args)
    work = Path(args.workdir) / ("work-ondisk" if on_disk else "work-sharded")
    out_dir = Path(args.workdir) / "ondisk-index"
    for p in (work, out_dir):
        if p.exists():
            import shutil

            shutil.rmtree(p)
    from index.build import BuildConfig, _train_size

    rows = args.rows_per_shard
    if on_disk and not rows:
        rows = ib.rows_per_shard_for_budget(args.budget, workers=2, dim=args.dim, key=args.key,
                                            row_group_rows=args.row_group,
                                            train_rows=_train_size(args.key, args.n, BuildConfig()))
    rows = rows or -(-args.n // 8)  # 8 shards: both workers busy, shards retried cheaply
    t0 = time.time()
    trained, tr = _train(args, d)
    b = ib.build_sharded(str(d), args.key, str(work), runner="FnApiRunner",
                         beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
                         rows_per_shard=rows, trained=trained, on_disk_dir=str(out_dir) if on_disk else None,
                         faiss_threads=1)
    build_s = time.time() - t0
    res = {"variant": "sharded-ondisk" if on_disk else "sharded-in-ram", "build_s": round(build_s, 2), **tr,
           "add_s": b.report["add"]["seconds"], "merge_s": b.report["merge"]["seconds"], "shards": b.report["shards"],
           "rows_per_shard": rows, "workers": len(b.report["add"]["workers"])}
    import shutil

    shutil.rmtree(work / ib.SHARDS_DIR, ignore_errors=True)
    if on_disk:
        ib.write_index(b.index, str(out_dir / "index.faiss"))
        res["ivfdata_bytes"] = os.path.getsize(out_dir / ib.IVFDATA_NAME)
        return res
    ev = _evaluate(b.index, args, d)
    I, D = ev.pop("_I"), ev.pop("_D")
    si = Path(args.workdir) / "single_I.npy"
    if si.is_file():
        res["identical_to_single"] = bool((np.load(si) == I).all() and (np.load(Path(args.workdir) / "single_D.npy")
                                                                         == D).all())
    return {**res, **ev}


def stage_query(args) -> dict:
    """A fresh process: load the on-disk index (lists memory-mapped) and answer the queries."""
    from pipelines import index_build as ib

    d = data_dir(args)
    out_dir = Path(args.workdir) / "ondisk-index"
    t0 = time.time()
    index = ib.read_index(str(out_dir / "index.faiss"))
    load_s = time.time() - t0
    assert ib.has_ondisk_lists(index)
    ev = _evaluate(index, args, d)
    ev.pop("_I"), ev.pop("_D")
    return {"variant": "ondisk-query", "load_s": round(load_s, 3), **ev}


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--spread", type=float, default=1.5,
                    help="norm of the noise around a centre (unit norm); larger = clusters overlap more, harder")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--row-group", type=int, default=4096, help="rows per Parquet row group (the embed output's)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--key", default="IVF1024,Flat")
    ap.add_argument("--nprobes", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 16, 32, 64, 128])
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--budget", type=parse_bytes, default=3 * GiB // 2, help="memory budget of the on-disk build")
    ap.add_argument("--rows-per-shard", type=int, default=0, help="default: n/8 (ondisk: derived from --budget)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=str(REPO / "var" / "bench-scale"))
    ap.add_argument("--only", default="single,sharded,ondisk", help="variants to run")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING)

    if args.stage:
        fn = {"data": stage_data, "single": stage_single, "sharded": stage_sharded,
              "ondisk": lambda a: stage_sharded(a, on_disk=True), "query": stage_query}[args.stage]
        res = fn(args)
        (Path(args.workdir) / f"{args.stage}.result.json").write_text(json.dumps(res, default=str))
        return 0

    results: dict = {"args": {k: v for k, v in vars(args).items() if k != "stage"}, "cpus": os.cpu_count()}
    print(f"data: {args.n} x {args.dim} ({args.n * args.dim * 4 / GiB:.2f} GiB of raw float32 vectors) ...",
          flush=True)
    results["data"] = run_stage("data", args)
    only = args.only.split(",")
    for variant in ("single", "sharded", "ondisk"):
        if variant in only:
            print(f"{variant} ...", flush=True)
            results[variant] = run_stage(variant, args)
            if variant == "ondisk":
                results["ondisk_query"] = run_stage("query", args)
            print(json.dumps({k: v for k, v in results[variant].items() if k != "recall_curve"}), flush=True)
            if variant == "ondisk":
                print(json.dumps(results["ondisk_query"]), flush=True)

    # ---- report
    raw = args.n * args.dim * 4
    rows = []
    for v in ("single", "sharded", "ondisk"):
        r = results.get(v)
        if not r:
            continue
        m = r["memory"]
        rec = r.get("recall", results.get("ondisk_query", {}).get("recall"))
        npr = r.get("nprobe", results.get("ondisk_query", {}).get("nprobe"))
        rows.append((r["variant"], r["build_s"], r.get("train_s"), r.get("add_s"), r.get("merge_s", "-"), rec, npr,
                     m["driver_peak_rss"] / MiB, "/".join(f"{w / MiB:.0f}" for w in m["workers_peak_rss"][:2]) or "-",
                     m["peak_total_pss"] / MiB))
    print()
    print(f"{args.n:,} x {args.dim} vectors (raw {raw / GiB:.2f} GiB), key {args.key}, k={args.k}, "
          f"{args.queries} held-out queries, {os.cpu_count()} CPUs (shared)")
    print(f"{'variant':<17}{'build s':>8}{'train s':>8}{'add s':>7}{'merge s':>8}{'recall':>8}{'nprobe':>7}"
          f"{'driver MiB':>11}{'workers MiB':>13}{'tree PSS MiB':>13}")
    for r in rows:
        print(f"{r[0]:<17}{r[1]:>8.1f}{r[2]:>8.1f}{r[3]:>7.1f}{r[4] if isinstance(r[4], str) else f'{r[4]:.1f}':>8}"
              f"{r[5]:>8.3f}{r[6]:>7}{r[7]:>11.0f}{r[8]:>13}{r[9]:>13.0f}")
    if "ondisk" in results:
        od, q = results["ondisk"], results["ondisk_query"]
        peak = od["memory"]["peak_total_pss"]
        ok = peak <= args.budget and raw > args.budget and q["recall"] >= args.recall_target
        results["ondisk_verdict"] = {"budget": args.budget, "raw_vector_bytes": raw, "build_peak_total_pss": peak,
                                     "build_sum_of_process_peak_rss": od["memory"]["sum_of_process_peak_rss"],
                                     "ivfdata_bytes": od["ivfdata_bytes"], "query_recall": q["recall"],
                                     "query_peak_rss": q["memory"]["driver_peak_rss"],
                                     "query_peak_anon": q["memory"]["driver_peak_anon"], "pass": ok}
        print(f"on-disk build: peak memory of driver + workers {peak / MiB:.0f} MiB (summed PSS; summed per-process "
              f"peak RSS, shared libraries counted in each: {od['memory']['sum_of_process_peak_rss'] / MiB:.0f} MiB) "
              f"vs budget {args.budget / MiB:.0f} MiB; raw vectors {raw / MiB:.0f} MiB; inverted lists on disk "
              f"{od['ivfdata_bytes'] / MiB:.0f} MiB")
        print(f"on-disk query process: recall@{args.k} {q['recall']:.3f} at nprobe {q['nprobe']}, p50 "
              f"{q['latency_ms_p50']} ms, p99 {q['latency_ms_p99']} ms, peak RSS "
              f"{q['memory']['driver_peak_rss'] / MiB:.0f} MiB of which anonymous "
              f"{q['memory']['driver_peak_anon'] / MiB:.0f} MiB (the rest: mapped list pages, page cache)")
        print(f"-> {'PASS' if ok else 'FAIL'}")
    if "sharded" in results and "identical_to_single" in results["sharded"]:
        print(f"sharded results identical to single-process: {results['sharded']['identical_to_single']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0 if results.get("ondisk_verdict", {}).get("pass", True) else 1


if __name__ == "__main__":
    sys.exit(main())
