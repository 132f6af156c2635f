"""``shopvec index`` (build / list / rollback) and ``shopvec query``.

    shopvec index --embeddings OUT --out INDEXROOT [--index-key auto|Flat|HNSW32|IVF4096,Flat|OPQ64,IVF16384,PQ64,RFlat]
                  [--recall-target 0.95] [--max-memory 8GB] [-k 10] [--allow-below-target] [--keep 5] [--mmap]
    shopvec index list     --index INDEXROOT [--json]
    shopvec index rollback --index INDEXROOT --to VERSION|previous
    shopvec query --index INDEXROOT (--product-id P | --text T | --image photo.jpg | --vector-file v.npy)
                  [-k 10] [--filter category=Shoes --filter 'price<2000' ...] [--json]

FAISS, numpy and the index package are imported inside the run functions so that ``shopvec --help`` stays instant.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from embedders.errors import UserError

_SHOW_COLUMNS = ("title", "category", "category_l1", "category_l2", "brand", "price", "discounted_price",
                 "retail_price")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index", help="build a tuned FAISS index version from embeddings; list / roll back versions",
        description="Build, tune to a recall target and atomically publish a FAISS index version "
                    "(`shopvec index --embeddings OUT --out INDEXROOT`), or manage versions with "
                    "`shopvec index list` / `shopvec index rollback`.")
    p.add_argument("--embeddings", metavar="PATH",
                   help="embed output dir (OUT/embeddings/*.parquet), a directory or a glob of embeddings Parquet")
    p.add_argument("--out", metavar="INDEXROOT", help="index root; the new version goes to INDEXROOT/versions/")
    p.add_argument("--index-key", default="auto", metavar="KEY",
                   help="auto (default) or any FAISS factory string, e.g. Flat, HNSW32, IVF4096,Flat, "
                        "OPQ64,IVF16384,PQ64,RFlat")
    p.add_argument("--recall-target", type=float, default=0.95, metavar="R",
                   help="recall@k the tuned search must reach on a fresh sample (default 0.95)")
    p.add_argument("--max-memory", metavar="SIZE", help="memory budget for the index, e.g. 8GB (default: 80%% of "
                                                        "available RAM); drives the auto choice")
    p.add_argument("-k", type=int, default=10, help="k of the recall@k target (default 10)")
    p.add_argument("--allow-below-target", action="store_true",
                   help="publish even if the recall target is unreachable (recorded in the manifest)")
    p.add_argument("--keep", type=int, default=5, metavar="N",
                   help="retention: keep the newest N versions (CURRENT and the previous one are always kept)")
    p.add_argument("--mmap", action="store_true",
                   help="the index is served memory-mapped: verify the staged version through mmap and record it")
    p.add_argument("--tuning-queries", type=int, default=500, metavar="Q",
                   help="products sampled as tuning queries (and again as the fresh verification sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (training sample, tuning queries)")
    g = p.add_argument_group("sharded build (Apache Beam; pipelines/index_build.py, docs/scale.md)")
    g.add_argument("--runner", metavar="RUNNER",
                   help="build sharded as a Beam job on this runner (FnApiRunner, PortableRunner, DataflowRunner, "
                        "FlinkRunner, SparkRunner); any option the CLI does not know goes to Beam unchanged, e.g. "
                        "--direct_num_workers=2 --direct_running_mode=multi_processing. Without --runner a catalog "
                        "above --shard-above vectors, or whose vectors exceed --max-memory, is built sharded on the "
                        "local multi-process runner")
    g.add_argument("--shard-above", type=int, default=None, metavar="N",
                   help="auto-shard above N vectors (default 5,000,000)")
    g.add_argument("--shard-rows", type=int, default=None, metavar="N",
                   help="vectors per shard (default: n/8, at most 250,000)")
    g.add_argument("--on-disk", action=argparse.BooleanOptionalAction, default=None,
                   help="merge the shards into on-disk inverted lists (index.ivfdata, memory-mapped at query time); "
                        "default: when the index exceeds the memory budget")
    g.add_argument("--work-dir", metavar="URI",
                   help="shards and the trained index (default OUT/.sharded-work/...); a gs://, s3:// or hdfs:// "
                        "URI on a cluster")
    actions = p.add_subparsers(dest="index_action", metavar="{list,rollback}")
    pl = actions.add_parser("list", help="versions, which is CURRENT, key, n, recall, latency, created_at")
    pl.add_argument("--index", required=True, metavar="INDEXROOT")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pr = actions.add_parser("rollback", help="switch CURRENT to an older version")
    pr.add_argument("--index", required=True, metavar="INDEXROOT")
    pr.add_argument("--to", required=True, metavar="VERSION", help="a version name from `index list`, or 'previous'")
    p.set_defaults(func=run_index, accepts_beam_args=True)  # Beam options of a sharded build pass through
    pl.set_defaults(accepts_beam_args=False)
    pr.set_defaults(accepts_beam_args=False)

    q = subparsers.add_parser("query", help="similar products by product id, text, image or vector",
                              description="Query the CURRENT (or --version) index version.")
    q.add_argument("--index", required=True, metavar="INDEXROOT")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--product-id", metavar="ID", help="products similar to this one (itself excluded)")
    what.add_argument("--text", metavar="TEXT", help="free-text query, encoded with the index's model")
    what.add_argument("--image", metavar="FILE", help="image query, encoded with the index's model")
    what.add_argument("--vector-file", metavar="NPY", help=".npy file with one (dim,) vector or an (m, dim) batch")
    q.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    q.add_argument("--filter", action="append", default=[], metavar="COND",
                   help="metadata filter, repeatable (AND): field=value, field=v1,v2, field<x, field<=x, field>x, "
                        "field>=x; or a JSON object")
    q.add_argument("--json", action="store_true", help="print results as JSON")
    q.add_argument("--version", metavar="VERSION", help="query this version instead of CURRENT")
    q.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=None,
                   help="memory-map the index (default: as recorded at build time)")
    q.add_argument("--no-verify", action="store_true", help="skip sha256 verification of the files (sizes are "
                                                            "still checked)")
    q.set_defaults(func=run_query)


# ------------------------------------------------------------------------------------------------------ index
def run_index(args: argparse.Namespace) -> int:
    action = getattr(args, "index_action", None)
    if action in ("list", "rollback"):
        stray = [opt for opt, val in (("--embeddings", args.embeddings), ("--out", args.out)) if val is not None]
        if stray:
            raise UserError(f"`index {action}` does not take {', '.join(stray)}; to build, run "
                            f"`shopvec index --embeddings OUT --out INDEXROOT` without '{action}'")
        return _run_list(args) if action == "list" else _run_rollback(args)
    return _run_build(args)


def _run_build(args: argparse.Namespace) -> int:
    missing = [opt for opt, val in (("--embeddings", args.embeddings), ("--out", args.out)) if not val]
    if missing:
        raise UserError(f"building needs {' and '.join(missing)} (or use `shopvec index list --index ROOT` / "
                        f"`shopvec index rollback --index ROOT --to VERSION`)")
    from index.build import BuildConfig, build_and_publish, parse_memory
    if args.keep < 1:
        raise UserError(f"--keep must be at least 1, got {args.keep}")
    if args.tuning_queries < 1:
        raise UserError(f"--tuning-queries must be at least 1, got {args.tuning_queries}")
    config = BuildConfig(index_key=args.index_key, recall_target=args.recall_target, k=args.k,
                         max_memory=parse_memory(args.max_memory), allow_below_target=args.allow_below_target,
                         tuning_queries=args.tuning_queries, fresh_queries=args.tuning_queries, seed=args.seed)
    from pipelines.index_build import build_and_publish_sharded, sharding_decision
    runner, beam_args, why = sharding_decision(args.embeddings, args.runner, getattr(args, "beam_args", []),
                                               config.max_memory, args.shard_above)
    if runner:
        version, manifest = build_and_publish_sharded(args.embeddings, args.out, config, runner=runner,
                                                      beam_args=beam_args, rows_per_shard=args.shard_rows,
                                                      on_disk=args.on_disk, work_dir=args.work_dir, keep=args.keep,
                                                      mmap=args.mmap)
        sh = (manifest.get("build") or {}).get("sharded")
        if sh:
            print(f"sharded build ({why}): {sh['shards']} shards on {sh['runner']}, {len(sh['workers'])} worker "
                  f"process(es), add {sh['add_s']:.1f} s, merge {sh['merge_s']:.1f} s"
                  f"{', inverted lists on disk' if sh['on_disk'] else ''}")
    else:
        version, manifest = build_and_publish(args.embeddings, args.out, config, keep=args.keep, mmap=args.mmap)
    m = manifest["measured"]
    params = ",".join(f"{k}={v}" for k, v in sorted(manifest["search_params"].items())) or "-"
    print(f"published {version} -> {os.path.join(args.out, 'CURRENT')}: {manifest['index_key']} n={manifest['n']:,} "
          f"dim={manifest['dim']} params {params}; recall@{m['k']} {m['recall_at_k']:.4f} (fresh sample of "
          f"{m['recall_queries']}), p50 {m['latency_ms']['p50']:.3f} ms, p99 {m['latency_ms']['p99']:.3f} ms, "
          f"{m['batched_qps']:.0f} QPS batched")
    if manifest.get("below_target"):
        print(f"WARNING: recall is below the target {args.recall_target} (published with --allow-below-target)",
              file=sys.stderr)
    return 0


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _run_list(args: argparse.Namespace) -> int:
    from index.store import list_versions
    rows = list_versions(args.index)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no versions under {args.index}")
        return 0
    head = f"{'VERSION':<28} {'':4} {'KEY':<26} {'N':>10} {'RECALL':>8} {'P50 ms':>8} {'P99 ms':>8}  CREATED_AT"
    print(head)
    for r in rows:
        flag = "CUR" if r["current"] else ("prev" if r["previous"] else "")
        if r.get("status") != "ok":
            print(f"{r['version']:<28} {flag:4} {r.get('status')}")
            continue
        recall = _fmt(r.get("recall"), ".4f") + ("!" if r.get("below_target") else "")
        print(f"{r['version']:<28} {flag:4} {str(r.get('index_key')):<26} {_fmt(r.get('n'), ',d'):>10} "
              f"{recall:>8} {_fmt(r.get('latency_p50_ms'), '.3f'):>8} {_fmt(r.get('latency_p99_ms'), '.3f'):>8}  "
              f"{r.get('created_at')}")
    return 0


def _run_rollback(args: argparse.Namespace) -> int:
    from index.store import rollback
    old, new = rollback(args.index, args.to)
    print(f"CURRENT: {old} -> {new}")
    return 0


# ------------------------------------------------------------------------------------------------------ query
def _default_mmap(root: str, version: str | None) -> bool:
    from index import store
    try:
        ver = version or store.read_current(root)
        if not ver:
            return False
        return bool((store.read_manifest(os.path.join(root, store.VERSIONS_DIR, ver)).get("serving") or {})
                    .get("mmap", False))
    except UserError:
        return False  # the load below reports the real problem


def _load_vectors(path: str):
    import numpy as np
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--vector-file {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--vector-file {path}: not a numeric .npy array ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu" or arr.ndim not in (1, 2) or arr.size == 0:
        raise UserError(f"--vector-file {path}: expected a float array of shape (dim,) or (m, dim), got "
                        f"{getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}")
    return arr


def run_query(args: argparse.Namespace) -> int:
    from index.filters import parse_filters
    from index.search import ProductIndex, UnknownProductError
    if args.k < 1:
        raise UserError(f"-k must be a positive integer, got {args.k}")
    flt = parse_filters(args.filter or None)
    mmap = args.mmap if args.mmap is not None else _default_mmap(args.index, args.version)
    ix = ProductIndex.load(args.index, version=args.version, mmap=mmap, verify=not args.no_verify)
    batch = False
    if args.product_id is not None:
        try:
            results: Any = ix.similar(args.product_id, k=args.k, filters=flt)
        except UnknownProductError as e:
            raise UserError(str(e)) from None
        what = f"similar to {args.product_id}"
    elif args.text is not None:
        results, what = ix.search(text=args.text, k=args.k, filters=flt), f"text {args.text!r}"
    elif args.image is not None:
        if not os.path.isfile(args.image):
            raise UserError(f"--image {args.image}: no such file")
        results, what = ix.search(image=args.image, k=args.k, filters=flt), f"image {args.image}"
    else:
        arr = _load_vectors(args.vector_file)
        if arr.ndim == 2 and arr.shape[0] > 1:
            results, batch = ix.search_batch(arr, k=args.k, filters=flt), True
        else:
            results = ix.search(vector=arr.reshape(-1), k=args.k, filters=flt)
        what = f"vector(s) from {args.vector_file}"
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
        return 0
    print(f"# {what}; k={args.k}" + (f"; filter: {flt}" if flt else "") + f"; index version {ix.version}")
    for i, rows in enumerate(results if batch else [results]):
        if batch:
            print(f"## query {i}")
        if not rows:
            print("(no products match)")
        for rank, r in enumerate(rows, 1):
            cols = [c for c in _SHOW_COLUMNS if c in r][:4]
            if not cols:
                cols = [c for c in r if c not in ("product_id", "score") and not c.endswith("_hash")][:3]
            extra = " | ".join(_short(r.get(c)) for c in cols)
            print(f"{rank:>3}  {r['score']:.4f}  {r['product_id']}  {extra}")
    return 0


def _short(v: Any, width: int = 60) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= width else s[: width - 1] + "…"
