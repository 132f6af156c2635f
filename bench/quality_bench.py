"""Retrieval quality on the shared Flipkart sample: offline towers before/after `shopvec finetune`, vs random init.

    .venv/bin/python bench/quality_bench.py [--catalog PATH] [--workdir DIR] [--label category_l1] [--k 10]
                                           [--reuse] [--skip-tiny] [--json-out FILE]

Every step is the ordinary command line, in a subprocess (wall times are real, logs go to WORKDIR/*.log):
  1. `shopvec embed --config configs/demo.toml`      random-init tiny model (the floor);
  2. `shopvec embed --config configs/offline.toml`   pretrained unimodal towers, unaligned, concat fusion;
  3. `shopvec tune-fusion`                           mode + weights on the validation split;
  4. `shopvec finetune --config configs/offline.toml`  alignment heads (default mode), timed;
  5. `shopvec embed` with [model] name = "local-dir:<checkpoint>" (the fine-tuned model, through the real pipeline);
  6. `shopvec eval --queries test`                   on each embeddings folder.
Protocol (issue 6, point 5): seeded 70/10/20 split by product id; queries are the test products; neighbours are
searched in the whole catalog (as in production); label = category_l1 (7 classes). Prints a Markdown table, checks
the targets, writes JSON to --json-out (default WORKDIR/quality_bench.json). Needs the offline-models extra.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "flipkart_1050", "products.parquet")
TARGETS = {"fused_precision": 0.90, "t2i_recall": 0.40, "t2i_precision": 0.85, "finetune_minutes": 10.0}
ABLATIONS = {  # name -> --set overrides of configs/offline.toml [finetune]
    "infonce_plain": ["finetune.init=\"random\"", "finetune.private=false", "finetune.lr=1e-3"],
    "cca_plain": ["finetune.private=false"],
    "infonce_blocks": ["finetune.init=\"random\"", "finetune.lr=1e-3"],
}
ABLATION_TITLES = {
    "infonce_plain": "random-init linear heads + InfoNCE, plain aligned vectors (the issue's baseline recipe)",
    "cca_plain": "CCA init + InfoNCE, plain aligned vectors (no own blocks)",
    "infonce_blocks": "random-init heads + InfoNCE, with own blocks",
}
BASELINES = {"heads_infonce_recall": 0.335, "heads_infonce_precision": 0.821, "naive_aligned_fused": 0.868}


def shopvec(args: list[str], log_path: str, stdout_json: bool = False) -> tuple[float, dict | None]:
    """Run ``shopvec ARGS`` (this interpreter), stderr to ``log_path``; returns (wall seconds, parsed stdout)."""
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as err:
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=err, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.time() - t0
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"shopvec {' '.join(args[:1])} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return wall, (json.loads(proc.stdout) if stdout_json else None)


def embed(config: str, catalog: str, out: str, workdir: str, name: str, reuse: bool, sets: list[str] = ()) -> float:
    if reuse and os.path.isfile(os.path.join(out, "run_report.json")):
        with open(os.path.join(out, "run_report.json"), encoding="utf-8") as f:
            return float(json.load(f).get("wall_time_s", 0.0))
    args = ["embed", "--config", config, "--products", catalog, "--out", out]
    for s in sets:
        args += ["--set", s]
    wall, _ = shopvec(args, os.path.join(workdir, f"embed_{name}.log"))
    return wall


def evaluate(out: str, label: str, k: int, workdir: str, name: str, report: bool = False) -> dict:
    args = ["eval", "--embeddings", out, "--label", label, "--k", str(k), "--queries", "test", "--json"]
    if report:
        args += ["--report", os.path.join(workdir, f"eval_{name}.html")]
    _, m = shopvec(args, os.path.join(workdir, f"eval_{name}.log"), stdout_json=True)
    return m


def figures(m: dict | None, k: int) -> dict:
    if not m:
        return {}
    it = m.get("item_to_item") or {}
    t = m.get("text_to_image") or {}

    def p(mod: str) -> float | None:
        return (it.get(mod) or {}).get(f"precision@{k}")

    return {"fused": p("fused"), "image": p("image"), "text": p("text"),
            "fused_ndcg": (it.get("fused") or {}).get(f"ndcg@{k}"), "fused_map": (it.get("fused") or {}).get("map"),
            "t2i_recall": t.get(f"recall@{k}"), "t2i_precision": t.get(f"precision@{k}"),
            "coverage": m.get(f"coverage@{k}")}


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default=SHARED)
    ap.add_argument("--workdir", default="/tmp/shopvec-quality-bench")
    ap.add_argument("--label", default="category_l1")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reuse", action="store_true", help="reuse embeddings/checkpoint already in --workdir")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--no-ablations", action="store_true", help="skip the ablation finetunes (plain InfoNCE heads, "
                                                                  "no own blocks)")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    from embedders.offline import INSTALL_HINT, extra_installed

    if not os.path.isfile(args.catalog):
        raise SystemExit(f"{args.catalog}: catalog not found (the shared Flipkart sample)")
    if not extra_installed():
        raise SystemExit(f"the offline-models extra is not installed: {INSTALL_HINT}")
    wd = args.workdir
    os.makedirs(wd, exist_ok=True)
    k = args.k
    res: dict = {"catalog": args.catalog, "label": args.label, "k": k, "cpu_count": os.cpu_count(),
                 "torch_threads": None, "steps": {}}
    import torch

    res["torch_threads"] = torch.get_num_threads()

    # 1. random-init floor
    if not args.skip_tiny:
        out = os.path.join(wd, "emb_tiny")
        w = embed("configs/demo.toml", args.catalog, out, wd, "tiny", args.reuse)
        res["steps"]["embed_tiny_s"] = round(w, 1)
        res["tiny"] = evaluate(out, args.label, k, wd, "tiny")
        print(f"[tiny] embed {w:.0f}s", file=sys.stderr)

    # 2. offline towers (unaligned, the config's concat fusion)
    off = os.path.join(wd, "emb_offline")
    w = embed("configs/offline.toml", args.catalog, off, wd, "offline", args.reuse)
    res["steps"]["embed_offline_s"] = round(w, 1)
    res["offline"] = evaluate(off, args.label, k, wd, "offline", report=True)
    print(f"[offline] embed {w:.0f}s", file=sys.stderr)

    # 3. fusion tuning on validation
    w, tune = shopvec(["tune-fusion", "--embeddings", off, "--label", args.label, "--k", str(k), "--json",
                       "--out", os.path.join(wd, "tuned_fusion.toml")], os.path.join(wd, "tune.log"), True)
    res["tune_fusion"] = tune
    res["steps"]["tune_fusion_s"] = round(w, 1)

    # 4. finetune (default mode: heads), timed
    ckpt = os.path.join(wd, "finetuned")
    cache = os.path.join(wd, "features.npz")
    if not (args.reuse and os.path.isfile(os.path.join(ckpt, "manifest.json"))):
        if os.path.exists(cache) and not args.reuse:
            os.remove(cache)  # the timed run computes its features itself
        w, _ = shopvec(["finetune", "--config", "configs/offline.toml", "--products", args.catalog, "--out", ckpt,
                        "--label", args.label, "--feature-cache", cache, "--json"], os.path.join(wd, "finetune.log"),
                       True)
        res["steps"]["finetune_s"] = round(w, 1)
    with open(os.path.join(ckpt, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    res["finetune_manifest_metrics"] = manifest["metrics"]
    res["finetune_training"] = {k2: manifest["training"].get(k2) for k2 in
                                ("best_epoch", "stopped_by", "timing_s", "init", "block_scales")}
    res["steps"].setdefault("finetune_s", manifest["training"]["timing_s"]["total"])

    # 5. the fine-tuned model through the real embed path
    ft_out = os.path.join(wd, "emb_finetuned")
    w = embed("configs/offline.toml", args.catalog, ft_out, wd, "finetuned", args.reuse,
              [f'model.name="local-dir:{os.path.abspath(ckpt)}"'])
    res["steps"]["embed_finetuned_s"] = round(w, 1)
    res["finetuned"] = evaluate(ft_out, args.label, k, wd, "finetuned", report=True)
    w, tune_ft = shopvec(["tune-fusion", "--embeddings", ft_out, "--label", args.label, "--k", str(k), "--json",
                          "--out", os.path.join(wd, "tuned_fusion_finetuned.toml")], os.path.join(wd, "tune_ft.log"),
                         True)
    res["tune_fusion_finetuned"] = tune_ft

    # ablations: same features (cached), other recipes; figures from each run's manifest (test split)
    ablations = {}
    if not args.no_ablations:
        for name, sets in ABLATIONS.items():
            d = os.path.join(wd, f"ablation_{name}")
            if not (args.reuse and os.path.isfile(os.path.join(d, "manifest.json"))):
                cmd = ["finetune", "--config", "configs/offline.toml", "--products", args.catalog, "--out", d,
                       "--label", args.label, "--feature-cache", cache, "--json"]
                for kv in sets:
                    cmd += ["--set", kv]
                shopvec(cmd, os.path.join(wd, f"ablation_{name}.log"), True)
            with open(os.path.join(d, "manifest.json"), encoding="utf-8") as f:
                ablations[name] = json.load(f)["metrics"]["after"]
    res["ablations"] = ablations

    # ---- table ----------------------------------------------------------------------------------------------
    tiny = figures(res.get("tiny"), k)
    base = figures(res["offline"], k)
    before = figures(manifest["metrics"].get("before"), k)
    after = figures(res["finetuned"], k)
    tv = tune["test"]
    ch = tune["chosen"]
    rows = []
    if tiny:
        rows.append(("shopvec-tiny, random init (configs/demo.toml)", tiny))
    rows.append((f"shopvec-offline, concat {fmtw(res['offline'])} (configs/offline.toml)", base))
    rows.append(("shopvec-offline + finetune, heads at init (before training)", before))
    rows.append(("shopvec-offline + finetune (heads), embedded by `shopvec embed`", after))
    for name, m in ablations.items():
        rows.append((f"ablation: {ABLATION_TITLES[name]}", figures(m, k)))
    q = res["offline"]["meta"]["queries"]
    lines = [f"Queries: {q} test products (seeded 70/10/20 split by product id), neighbours searched in all "
             f"{res['offline']['meta']['products']} products; label {args.label}; k = {k}; "
             f"random neighbours: precision@{k} {fmt(res['offline']['meta'].get('chance_precision'))}.", "",
             f"| model | item-to-item fused p@{k} | image p@{k} | text p@{k} | text→image recall@{k} | "
             f"text→image p@{k} | coverage@{k} |", "|---|---|---|---|---|---|---|"]
    for name, f in rows:
        lines.append(f"| {name} | {fmt(f.get('fused'))} | {fmt(f.get('image'))} | {fmt(f.get('text'))} | "
                     f"{fmt(f.get('t2i_recall'))} | {fmt(f.get('t2i_precision'))} | {fmt(f.get('coverage'))} |")
    lines += ["", f"Fusion tuning (offline towers): validation picks {ch['mode']} "
                  f"image {ch['weights']['image']:g} / text {ch['weights']['text']:g}; test precision@{k} "
                  f"{fmt(tv[f'precision@{k}'])} vs equal weights {fmt(tv[f'equal_weights_precision@{k}'])} "
                  f"(gain {fmt(tv.get('gain_over_equal'))})."]
    tvf = tune_ft["test"]
    lines.append(f"Fusion tuning (fine-tuned): {tune_ft['chosen']['mode']} image "
                 f"{tune_ft['chosen']['weights']['image']:g} / text {tune_ft['chosen']['weights']['text']:g}; test "
                 f"{fmt(tvf[f'precision@{k}'])} vs equal {fmt(tvf[f'equal_weights_precision@{k}'])}.")
    st = res["steps"]
    lines.append(f"Wall times: embed tiny {st.get('embed_tiny_s', 'n/a')}s, embed offline {st['embed_offline_s']}s, "
                 f"finetune {st['finetune_s']}s (features {manifest['training']['timing_s']['features']}s, "
                 f"training {manifest['training']['timing_s']['training']}s), embed fine-tuned "
                 f"{st['embed_finetuned_s']}s; {os.cpu_count()} CPU cores, torch threads {res['torch_threads']}.")
    best_fused = max(x for x in (base.get("fused"), tv[f"precision@{k}"]) if x is not None)
    checks = [
        (f"item-to-item fused precision@{k} ≥ {TARGETS['fused_precision']} (offline, tuned fusion)",
         tv[f"precision@{k}"], tv[f"precision@{k}"] >= TARGETS["fused_precision"]),
        ("tuned weights beat equal weights (test)", tv.get("gain_over_equal"), (tv.get("gain_over_equal") or 0) > 0),
        (f"text→image recall@{k} ≥ {TARGETS['t2i_recall']} after finetune (baseline {BASELINES['heads_infonce_recall']})",
         after.get("t2i_recall"), (after.get("t2i_recall") or 0) >= TARGETS["t2i_recall"]),
        (f"text→image precision@{k} ≥ {TARGETS['t2i_precision']} after finetune "
         f"(baseline {BASELINES['heads_infonce_precision']})",
         after.get("t2i_precision"), (after.get("t2i_precision") or 0) >= TARGETS["t2i_precision"]),
        (f"item-to-item fused precision@{k} does not fall after finetune (offline {fmt(best_fused)})",
         after.get("fused"), (after.get("fused") or 0) >= base.get("fused", 1) - 1e-9),
        (f"finetune ≤ {TARGETS['finetune_minutes']:g} minutes wall", st["finetune_s"] / 60.0,
         st["finetune_s"] / 60.0 <= TARGETS["finetune_minutes"]),
    ]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {n} | {fmt(v)} | {'yes' if ok else 'NO'} |" for n, v, ok in checks]
    res["table_markdown"] = "\n".join(lines)
    res["checks"] = [{"target": n, "measured": v, "met": bool(ok)} for n, v, ok in checks]
    print(res["table_markdown"])
    out = args.json_out or os.path.join(wd, "quality_bench.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2, default=str)
    print(f"\nJSON: {out}\nreports: {os.path.join(wd, 'eval_offline.html')}, {os.path.join(wd, 'eval_finetuned.html')}")
    return 0


def fmtw(m: dict) -> str:
    f = (m.get("meta") or {}).get("fusion") or {}
    w = f.get("weights") or {}
    return f"image {w.get('image', 0):g} / text {w.get('text', 0):g}"


if __name__ == "__main__":
    sys.exit(main())
