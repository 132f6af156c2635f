"""Query-service load benchmark: `similar` (k=10) over HTTP on loopback vs the in-process library call, same run.

    .venv/bin/python bench/serve_bench.py                      # 1M x 512 clustered synthetic set (built once, cached)
    .venv/bin/python bench/serve_bench.py --n 200000 --duration 20 --concurrency 4 --rate 300
    .venv/bin/python bench/serve_bench.py --index INDEXROOT    # an index already published (e.g. by index_bench)

Steps:
1. the index: ``--index ROOT``, or a Gaussian-mixture set of ``--n`` x ``--dim`` unit vectors written with
   ``index.embeddings_io.write_embeddings`` and built + tuned to ``--recall-target`` (default 0.95) by
   ``shopvec index`` (cached under ``--workdir``; rebuilt only when missing);
2. in-process baseline: ``ProductIndex.similar(pid, k=10)`` on random ids, one thread, then ``--threads`` threads;
3. ``shopvec serve`` in its own process on 127.0.0.1 (``--workers``), then a load generator in *another* process
   (raw asyncio HTTP/1.1 keep-alive, so it spends little CPU) for ``--duration`` seconds:
   - closed loop with ``--concurrency`` connections (max throughput), and
   - open loop at ``--rate`` requests/s (latency measured from each request's *scheduled* time, so a stalled
     server is not hidden by coordinated omission);
4. prints p50/p90/p99/max, QPS, errors, the load generator's and the server's CPU use (the load generator shares the
   cores), and the overhead ratios service/library; ``--json FILE`` saves everything.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------------------------
# Load generator (runs in its own process: `serve_bench.py --loadgen ...`)
def _request_bytes(path: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Accept: application/json\r\n\r\n".encode()


async def _one(reader, writer, req: bytes, check: bool, k: int) -> int:
    writer.write(req)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split(b" ", 2)[1])
    length = None
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        if line[:15].lower() == b"content-length:":
            length = int(line[15:].strip())
    if length is None:
        raise ConnectionError("response without Content-Length")
    body = await reader.readexactly(length)
    if check and status == 200:
        doc = json.loads(body)
        if len(doc["results"]) != k:
            return -1
    return status


async def _loadgen(port: int, ids: list[str], duration: float, concurrency: int, rate: float | None, k: int,
                   token: str | None, seed: int) -> dict:
    from urllib.parse import quote

    rng = random.Random(seed)
    reqs = [_request_bytes(f"/v1/products/{quote(p, safe='')}/similar?k={k}", token) for p in ids]
    lat: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    t_start = time.perf_counter()
    t_end = t_start + duration
    sched: asyncio.Queue | None = None

    async def producer():  # open loop: one scheduled time per request, uniform spacing
        n = 0
        interval = 1.0 / rate
        while True:
            t = t_start + n * interval
            if t >= t_end:
                break
            await sched.put(t)
            n += 1
            if n % 64 == 0:
                delay = t - time.perf_counter() - 0.05
                if delay > 0:
                    await asyncio.sleep(delay)
        for _ in range(concurrency):
            await sched.put(None)

    async def worker(i: int):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        n = 0
        try:
            while True:
                if sched is not None:
                    t_sched = await sched.get()
                    if t_sched is None:
                        break
                    wait = t_sched - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    t0 = t_sched
                else:
                    t0 = time.perf_counter()
                    if t0 >= t_end:
                        break
                req = reqs[rng.randrange(len(reqs))]
                try:
                    st = await _one(reader, writer, req, check=(n % 50 == 0), k=k)
                except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                lat.append(time.perf_counter() - t0)
                key = "bad_result_count" if st == -1 else str(st)
                statuses[key] = statuses.get(key, 0) + 1
                n += 1
        finally:
            writer.close()

    if rate:
        sched = asyncio.Queue()
        tasks = [asyncio.create_task(producer())] + [asyncio.create_task(worker(i)) for i in range(concurrency)]
    else:
        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t_start
    return {"latencies_s": lat, "statuses": statuses, "errors": errors[:20], "n_errors": len(errors), "wall_s": wall}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    i = min(len(s) - 1, max(0, int(round(q / 100.0 * (len(s) - 1)))))
    return s[i]


def _summary(lat_s: list[float], wall: float) -> dict:
    ms = [x * 1000 for x in lat_s]
    return {"requests": len(ms), "qps": round(len(ms) / wall, 1) if wall > 0 else 0.0,
            "p50_ms": round(_pct(ms, 50), 3), "p90_ms": round(_pct(ms, 90), 3), "p99_ms": round(_pct(ms, 99), 3),
            "max_ms": round(max(ms), 3) if ms else float("nan"), "mean_ms": round(sum(ms) / len(ms), 3) if ms else 0}


def loadgen_main(a) -> int:
    ids = Path(a.ids_file).read_text().split("\n")
    ids = [i for i in ids if i]
    r0 = os.times()
    res = asyncio.run(_loadgen(a.port, ids, a.duration, a.concurrency, a.rate or None, a.k,
                               os.environ.get("BENCH_TOKEN") or None, a.seed))
    r1 = os.times()
    cpu = (r1.user - r0.user) + (r1.system - r0.system)
    out = {**_summary(res["latencies_s"], res["wall_s"]), "statuses": res["statuses"], "n_errors": res["n_errors"],
           "errors": res["errors"], "wall_s": round(res["wall_s"], 3), "loadgen_cpu_s": round(cpu, 3)}
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Index (synthetic, cached) and the in-process baseline
def synthetic_vectors(n: int, dim: int, clusters: int, seed: int, spread: float = 0.6, chunk: int = 100_000):
    """Gaussian mixture of unit vectors (the index bench's recipe: ``clusters`` random unit centres plus isotropic
    noise of norm ~``spread``), generated in chunks; yields (start, float32 [m, dim], labels)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        lab = rng.integers(clusters, size=m)
        x = centres[lab] + rng.standard_normal((m, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield start, np.ascontiguousarray(x, dtype=np.float32), lab


def build_index(workdir: Path, n: int, dim: int, clusters: int, recall_target: float, seed: int,
                index_key: str | None) -> Path:
    """Synthetic embeddings (cached) -> index.build.build_and_publish in a child process (frees its memory)."""
    tag = f"n{n}_d{dim}_c{clusters}_s{seed}" + (f"_{index_key.replace(',', '-')}" if index_key else "")
    root = workdir / f"index_{tag}"
    if (root / "CURRENT").exists():
        print(f"[index] reusing {root}", file=sys.stderr)
        return root
    emb = workdir / f"emb_n{n}_d{dim}_c{clusters}_s{seed}"
    if not (emb / "_SUCCESS").exists():
        import numpy as np

        from index.embeddings_io import write_embeddings

        cats = ["Shoes", "Mugs", "Shirts", "Lamps", "Watches", "Bags", "Books"]
        t0 = time.time()
        for part, (start, x, lab) in enumerate(synthetic_vectors(n, dim, clusters, seed)):
            ids = [f"P{start + i:08d}" for i in range(len(x))]
            meta = {"title": [f"product {start + i}" for i in range(len(x))],
                    "category": [cats[int(c) % len(cats)] for c in lab],
                    "price": ((np.asarray(lab, dtype=np.float64) % 97) + 1.0) * 10.0}
            write_embeddings(emb / f"part-{part:05d}.parquet", ids, x, metadata=meta)  # no model: synthetic
        (emb / "_SUCCESS").write_text("ok")
        print(f"[index] wrote {n} x {dim} synthetic embeddings in {time.time() - t0:.0f} s", file=sys.stderr)
    code = ("import logging, sys, json; logging.basicConfig(level=logging.INFO, stream=sys.stderr, "
            "format='%(asctime)s %(name)s: %(message)s');"
            "from index.build import BuildConfig, build_and_publish;"
            f"v, m = build_and_publish({str(emb)!r}, {str(root)!r}, BuildConfig(index_key={index_key or 'auto'!r}, "
            f"recall_target={recall_target}, k=10));"
            "print(json.dumps({'version': v, 'index_key': m['index_key'], 'build': m['build'], "
            "'measured': m['measured'], 'search_params': m['search_params']}))")
    print(f"[index] building {n} x {dim} with index.build (recall target {recall_target})", file=sys.stderr)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), check=True, stdout=subprocess.PIPE, text=True)
    (workdir / f"index_{tag}.build.json").write_text(out.stdout)
    print(f"[index] built in {time.time() - t0:.0f} s: {out.stdout.strip()[:500]}", file=sys.stderr)
    return root


def library_baseline(root: Path, ids: list[str], k: int, seconds: float, threads: int, seed: int,
                     omp: int) -> dict:
    import faiss

    from index.search import ProductIndex
    from index.service import load_product_index

    if omp:
        faiss.omp_set_num_threads(omp)  # per calling thread, like the service's request threads

    t0 = time.time()
    plain = ProductIndex.load(str(root), verify=False)  # the library as is (metadata in Parquet row-group chunks)
    rng = random.Random(seed)
    plain_lat = []
    for pid in rng.sample(ids, min(300, len(ids))):
        t = time.perf_counter()
        plain.similar(pid, k=k)
        plain_lat.append(time.perf_counter() - t)
    del plain
    gc.collect()
    t0 = time.time()
    ix = load_product_index(str(root))  # what the service serves: the same, metadata in one chunk per column
    load_s = time.time() - t0
    rng = random.Random(seed)
    for pid in rng.sample(ids, min(200, len(ids))):  # warm-up
        ix.similar(pid, k=k)
    lat = []
    end = time.perf_counter() + seconds
    t_start = time.perf_counter()
    while time.perf_counter() < end:
        pid = ids[rng.randrange(len(ids))]
        t = time.perf_counter()
        res = ix.similar(pid, k=k)
        lat.append(time.perf_counter() - t)
        assert len(res) == k
    one = _summary(lat, time.perf_counter() - t_start)
    counts = [0] * threads
    stop = threading.Event()

    def hammer(i):
        if omp:
            faiss.omp_set_num_threads(omp)
        r = random.Random(seed + i)
        while not stop.is_set():
            ix.similar(ids[r.randrange(len(ids))], k=k)
            counts[i] += 1

    ts = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
    t_start = time.perf_counter()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    multi_qps = sum(counts) / (time.perf_counter() - t_start)
    info = {"version": ix.version, "n": ix.n, "dim": ix.dim, "index_key": ix.manifest.get("index_key"),
            "search_params": ix.manifest.get("search_params"),
            "recall_at_10": (ix.manifest.get("measured") or {}).get("recall_at_k"),
            "load_s": round(load_s, 2)}
    del ix
    gc.collect()
    return {"single_thread": one, f"threads_{threads}_qps": round(multi_qps, 1), "index": info,
            "plain_ProductIndex_load_single_thread": _summary(plain_lat, sum(plain_lat))}


# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (uvicorn workers), from /proc via psutil."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    tot = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            tot += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return tot


def run_server(root: Path, port: int, workers: int, token: str | None, omp: int, mmap: bool = False):
    env = dict(os.environ)
    env.pop("SHOPVEC_API_TOKEN", None)
    if token:
        env["SHOPVEC_API_TOKEN"] = token
    cmd = [sys.executable, "-m", "pipelines.cli", "-q", "serve", "--index", str(root), "--port", str(port),
           "--workers", str(workers), "--no-warm-encoder", "--omp-threads", str(omp)] + (["--mmap"] if mmap else [])
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, start_new_session=True)
    import httpx

    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server not ready after 900 s")


def run_load(port: int, ids_file: str, duration: float, concurrency: int, rate: float | None, k: int,
             server_pid: int, token: str | None) -> dict:
    cmd = [sys.executable, __file__, "--loadgen", "--port", str(port), "--ids-file", ids_file, "--duration",
           str(duration), "--concurrency", str(concurrency), "--k", str(k)]
    cmd += ["--rate", str(rate or 0)]
    env = dict(os.environ, BENCH_TOKEN=token or "")
    s0 = _proc_cpu(server_pid)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t0
    s1 = _proc_cpu(server_pid)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    ncpu = os.cpu_count() or 1
    server_cpu = s1 - s0
    res["server_cpu_s"] = round(server_cpu, 2)
    res["loadavg_1m_before_after"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    res["loadgen_cpu_share_of_machine"] = round(res["loadgen_cpu_s"] / (wall * ncpu), 3)
    res["loadgen_cpu_share_of_used"] = round(res["loadgen_cpu_s"] / max(1e-9, res["loadgen_cpu_s"] + server_cpu), 3)
    res["server_cpu_ms_per_request"] = round(1000 * server_cpu / max(1, res["requests"]), 3)
    res["mode"] = f"open loop {rate:g}/s" if rate else f"closed loop x{concurrency}"
    res["concurrency"] = concurrency
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--index", help="an index root already published (skips the synthetic build)")
    ap.add_argument("--workdir", default=str(REPO / "var" / "bench" / "serve"), help="cache for the synthetic index")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index-key", help="FAISS factory string for the build (default: the library's auto choice)")
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load phase (default 20)")
    ap.add_argument("--concurrency", type=int, default=4, help="connections (default 4)")
    ap.add_argument("--rate", type=float, default=300.0, help="open-loop rate, requests/s (0 = skip; default 300)")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn workers (default 1)")
    ap.add_argument("--mmap", action="store_true", help="serve with --mmap (workers share the page cache)")
    ap.add_argument("--threads", type=int, default=2, help="threads for the in-process QPS figure (default 2)")
    ap.add_argument("--library-seconds", type=float, default=10.0)
    ap.add_argument("--omp-threads", type=int, default=1,
                    help="FAISS OpenMP threads per query thread, library and service alike (default 1; 0 = default)")
    ap.add_argument("--token", default="bench-token", help="bearer token the server requires ('' = auth off)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.loadgen:
        return loadgen_main(a)

    import numpy as np  # noqa: F401  (fail early when the venv is wrong)

    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(a.index) if a.index else build_index(workdir, a.n, a.dim, a.clusters, a.recall_target, a.seed,
                                                    a.index_key)
    import pyarrow.parquet as pq

    from index.search import ProductIndex  # noqa: F401

    version = (root / "CURRENT").read_text().strip()
    all_ids = pq.read_table(root / "versions" / version / "ids.parquet", columns=["product_id"]).column(0).to_pylist()
    rng = random.Random(a.seed)
    ids = rng.sample(all_ids, min(20_000, len(all_ids)))
    del all_ids
    print(f"[library] in-process ProductIndex.similar(k={a.k}), {a.library_seconds:g} s", file=sys.stderr)
    lib = library_baseline(root, ids, a.k, a.library_seconds, a.threads, a.seed, a.omp_threads)
    print(json.dumps(lib), file=sys.stderr)

    ids_file = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    ids_file.write("\n".join(ids))
    ids_file.close()
    port = a.port or _free_port()
    print(f"[serve] starting shopvec serve on 127.0.0.1:{port} ({a.workers} worker(s))", file=sys.stderr)
    t0 = time.time()
    server = run_server(root, port, a.workers, a.token or None, a.omp_threads, a.mmap)
    ready_s = time.time() - t0
    phases = []
    try:
        # short warm-up (connections, caches), not recorded
        run_load(port, ids_file.name, 2.0, a.concurrency, None, a.k, server.pid, a.token or None)
        # one connection: the round trip of a lone request (latency overhead without queueing)
        phases.append(run_load(port, ids_file.name, min(10.0, a.duration), 1, None, a.k, server.pid,
                               a.token or None))
        print(json.dumps({k: v for k, v in phases[-1].items() if k != "errors"}), file=sys.stderr)
        # several connections back to back: throughput
        phases.append(run_load(port, ids_file.name, a.duration, a.concurrency, None, a.k, server.pid,
                               a.token or None))
        print(json.dumps({k: v for k, v in phases[-1].items() if k != "errors"}), file=sys.stderr)
        if a.rate:
            phases.append(run_load(port, ids_file.name, a.duration, max(a.concurrency, 16), a.rate, a.k,
                                   server.pid, a.token or None))
            print(json.dumps({k: v for k, v in phases[-1].items() if k != "errors"}), file=sys.stderr)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        os.unlink(ids_file.name)

    one = lib["single_thread"]
    report = {"index": lib["index"], "library": lib, "service": phases, "server_ready_s": round(ready_s, 1),
              "machine": {"cpus": os.cpu_count(), "workers": a.workers, "mmap": a.mmap},
              "command": " ".join([os.path.relpath(sys.executable, REPO)] + sys.argv)}
    lone, closed = phases[0], phases[1]
    report["overhead"] = {
        "p50_ms_added_by_http_1conn": round(lone["p50_ms"] - one["p50_ms"], 3),
        "p50_ratio_service_1conn_over_library": round(lone["p50_ms"] / one["p50_ms"], 2),
        "p99_ratio_service_1conn_over_library": round(lone["p99_ms"] / one["p99_ms"], 2),
        f"qps_ratio_service_x{a.concurrency}_over_library_1thread": round(closed["qps"] / one["qps"], 2),
        f"qps_ratio_service_x{a.concurrency}_over_library_{a.threads}threads":
            round(closed["qps"] / lib[f"threads_{a.threads}_qps"], 2)}
    ix = lib["index"]
    print()
    print(f"index: version {ix['version']}, {ix['n']} x {ix['dim']}, key {ix['index_key']}, "
          f"search params {ix['search_params']}, measured recall@10 {ix['recall_at_10']}")
    print(f"library (in process, 1 thread): p50 {one['p50_ms']} ms, p99 {one['p99_ms']} ms, {one['qps']} QPS; "
          f"{a.threads} threads: {lib[f'threads_{a.threads}_qps']} QPS")
    pl = lib["plain_ProductIndex_load_single_thread"]
    print(f"  (plain ProductIndex.load, metadata in row-group chunks: p50 {pl['p50_ms']} ms, p99 {pl['p99_ms']} ms)")
    print("| mode | requests | QPS | p50 ms | p90 ms | p99 ms | max ms | non-200 | load-gen CPU (share of machine / of "
          "used) | server CPU ms/req | machine load avg (before/after) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in phases:
        bad = sum(v for s, v in p["statuses"].items() if s != "200") + p["n_errors"]
        print(f"| {p['mode']} | {p['requests']} | {p['qps']} | {p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} | "
              f"{p['max_ms']} | {bad} | {p['loadgen_cpu_share_of_machine']:.0%} / "
              f"{p['loadgen_cpu_share_of_used']:.0%} | {p['server_cpu_ms_per_request']} | "
              f"{p['loadavg_1m_before_after'][0]} / {p['loadavg_1m_before_after'][1]} |")
    print(f"overhead: {report['overhead']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
