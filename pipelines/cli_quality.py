"""``shopvec eval``, ``shopvec tune-fusion`` and ``shopvec finetune``: measure, tune and improve retrieval quality.

- ``eval`` reads the embeddings of ``shopvec embed`` and scores item-to-item neighbours (per modality and fused),
  text->image retrieval, catalog coverage and, with ``--index``, the ANN against exact search; ``--report`` writes
  a self-contained HTML page (headline table, per-label chart, sample queries with thumbnails).
- ``tune-fusion`` picks the fusion mode and weights on a validation split and reports the test figure.
- ``finetune`` aligns the towers on the catalog's own image-text pairs (``embedders.finetune``) and writes a
  checkpoint folder that ``[model] name = "local-dir:DIR"`` loads.

Heavy imports happen inside the run functions; metrics JSON goes to stdout, logs to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from embedders.errors import UserError

log = logging.getLogger(__name__)


def _split_arg(s: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected three fractions like 0.7,0.1,0.2") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{s!r}: expected three fractions like 0.7,0.1,0.2")
    return parts  # type: ignore[return-value]


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: expected an integer >= 1")
    return v


def _add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split-seed", type=int, default=0, help="seed of the product-id split (default: %(default)s)")
    p.add_argument("--split", type=_split_arg, default=(0.7, 0.1, 0.2), metavar="TRAIN,VAL,TEST",
                   help="split fractions (default: 0.7,0.1,0.2)")


def register(sub) -> None:
    p = sub.add_parser("eval", help="retrieval quality of an embeddings folder (metrics JSON, HTML report)",
                       description="Same-label precision@k, nDCG@k and mAP of item-to-item neighbours per modality, "
                                   "text->image recall of the exact product, coverage, ANN recall vs exact.")
    p.add_argument("--embeddings", required=True, metavar="OUT", help="the --out folder of `shopvec embed`")
    p.add_argument("--label", required=True, help="metadata column holding the ground-truth label, e.g. category")
    p.add_argument("--k", type=_positive_int, default=10, help="list length (default: %(default)s)")
    p.add_argument("--index", metavar="ROOT", help="an index root (shopvec index): also measure the ANN against "
                                                    "exact search")
    p.add_argument("--report", metavar="HTML", help="write a self-contained HTML report here")
    p.add_argument("--products", help="catalog Parquet for report thumbnails (default: the inputs recorded in "
                                      "OUT/run_report.json)")
    p.add_argument("--samples", type=int, default=12, help="sample queries in the report (default: %(default)s)")
    p.add_argument("--queries", choices=["all", "train", "val", "test"], default="all",
                   help="which products are queries (neighbours are always searched in the whole catalog); "
                        "train/val/test use the deterministic product-id split (default: %(default)s)")
    _add_split_args(p)
    p.add_argument("--no-map", action="store_true", help="skip mAP (it ranks the whole catalog per query)")
    p.add_argument("--json", action="store_true", help="print the metrics JSON on stdout")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("tune-fusion", help="choose fusion mode and weights on a validation split",
                       description="Grid-search the fusion mode (concat, and sum for one shared space) and modality "
                                   "weights for the best same-label precision@k of item-to-item neighbours on the "
                                   "validation split; report the test split against equal weights; write the "
                                   "choice as a config snippet.")
    p.add_argument("--embeddings", required=True, metavar="OUT", help="the --out folder of `shopvec embed`")
    p.add_argument("--label", required=True, help="metadata column holding the ground-truth label")
    p.add_argument("--k", type=_positive_int, default=10, help="list length (default: %(default)s)")
    p.add_argument("--step", type=float, default=0.05, help="weight grid step, 1/N (default: %(default)s)")
    p.add_argument("--modes", help="comma-separated fusion modes to try (default: every mode that fits)")
    _add_split_args(p)
    p.add_argument("--out", metavar="TOML", help="write the [fusion] snippet here (default: OUT/tuned_fusion.toml)")
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    p.set_defaults(func=run_tune_fusion)

    p = sub.add_parser("finetune", help="align the model on the catalog's image-text pairs (contrastive training)",
                       description="CLIP-style contrastive training on (image, title + description) pairs: "
                                   "projection heads on frozen-tower features (default), locked-image tuning (lit) "
                                   "or everything (full). Writes a checkpoint folder loadable as "
                                   "[model] name = \"local-dir:DIR\".")
    p.add_argument("--config", default="configs/offline.toml", help="TOML config: [model] is the base model, "
                                                                    "[finetune] the settings (default: %(default)s)")
    p.add_argument("--products", required=True, help="products Parquet: a file, a directory or a glob")
    p.add_argument("--reviews", help="reviews Parquet (used in the fused vectors that are evaluated)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    p.add_argument("--label", help="catalog column (or role) for the label metrics (default: [eval] label of the "
                                   "config, else 'category')")
    p.add_argument("--mode", choices=["heads", "lit", "full"], help="what trains (default: [finetune] mode, heads)")
    p.add_argument("--epochs", type=_positive_int, help="override [finetune] epochs")
    p.add_argument("--max-minutes", type=float, help="override [finetune] max_minutes (training budget)")
    p.add_argument("--device", help="override [finetune] device (auto|cpu|cuda)")
    p.add_argument("--resume", action="store_true", help="continue from the state saved in DIR by an interrupted run")
    p.add_argument("--feature-cache", metavar="NPZ", help="heads mode: reuse / save the frozen-tower features here "
                                                           "(keyed by base model, data and code version)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set finetune.lr=1e-3 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the manifest's metrics JSON on stdout")
    p.set_defaults(func=run_finetune)


# ---------------------------------------------------------------------------------------------------------------
# eval
def _query_ids(ids: list[str], which: str, seed: int, fractions) -> list[str] | None:
    if which == "all":
        return None
    from embedders.finetune import split_ids

    return split_ids(ids, seed, fractions)[which]


def run_eval(args) -> int:
    from index.evaluate import evaluate_vectors, index_ann_search, load_vector_set

    vs = load_vector_set(args.embeddings, args.label)
    query_ids = _query_ids(vs.ids, args.queries, args.split_seed, args.split)
    if query_ids is not None and not query_ids:
        raise UserError(f"--queries {args.queries}: no product falls in that split")
    ann = index_ann_search(args.index, vs) if args.index else None
    ev = evaluate_vectors(vs, k=args.k, query_ids=query_ids, ann=ann, with_map=not args.no_map)
    m = ev.metrics
    m["meta"].update({"label": args.label, "embeddings": os.path.abspath(args.embeddings),
                      "queries_from": args.queries,
                      **({"split": {"seed": args.split_seed, "fractions": list(args.split)}}
                         if args.queries != "all" else {}),
                      **({"index": os.path.abspath(args.index)} if args.index else {})})
    if args.report:
        from index.report import write_report

        write_report(ev, args.report, products=args.products, embeddings=args.embeddings, samples=args.samples)
        log.info("report: %s", os.path.abspath(args.report))
    if args.json:
        json.dump(m, sys.stdout, indent=2, sort_keys=False, default=str)
        print()
    else:
        print(format_summary(m))
        if args.report:
            print(f"report: {os.path.abspath(args.report)}")
    return 0


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_summary(m: dict[str, Any]) -> str:
    k = m["meta"]["k"]
    lines = [f"model {m['meta'].get('model_id')}{' [RANDOM-INIT]' if m['meta'].get('random_init') else ''}: "
             f"{m['meta']['products']} products, {m['meta']['queries']} queries, {m['meta']['labels']} labels "
             f"(random neighbours: precision@{k} {_f(m['meta'].get('chance_precision'))})",
             f"{'item-to-item':<14}{'precision@' + str(k):>14}{'ndcg@' + str(k):>10}{'mAP':>8}"]
    for mod, v in m["item_to_item"].items():
        if v is None:
            lines.append(f"  {mod:<12}{'(no vectors)':>14}")
        else:
            lines.append(f"  {mod:<12}{_f(v.get(f'precision@{k}')):>14}{_f(v.get(f'ndcg@{k}')):>10}"
                         f"{_f(v.get('map')):>8}")
    t = m["text_to_image"] or {}
    if t.get("skipped"):
        lines.append(f"text->image: not evaluated ({t['skipped']})")
    else:
        lines.append(f"text->image: recall@{k} {_f(t.get(f'recall@{k}'))} (exact product), "
                     f"precision@{k} {_f(t.get(f'precision@{k}'))} (same label)")
    lines.append(f"coverage@{k}: {_f(m.get(f'coverage@{k}'))}")
    if m.get("worst_labels"):
        lines.append("worst labels: " + ", ".join(f"{w['label']} {_f(w[f'precision@{k}'])}"
                                                   for w in m["worst_labels"]))
    if m.get("ann"):
        a = m["ann"]
        lines.append(f"ANN vs exact: recall@{k} {_f(a.get(f'recall@{k}'))}, label precision lost "
                     f"{_f(a.get(f'precision_lost@{k}'))}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# tune-fusion
def run_tune_fusion(args) -> int:
    from embedders.finetune import split_ids
    from index.evaluate import embeddings_path, fusion_snippet, load_vector_set, tune_fusion

    vs = load_vector_set(args.embeddings, args.label)
    splits = split_ids(vs.ids, args.split_seed, args.split)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else None
    res = tune_fusion(vs, splits["val"], splits["test"], k=args.k, step=args.step, modes=modes)
    res["split"] = {"seed": args.split_seed, "fractions": list(args.split)}
    res["label"] = args.label
    folder = os.path.dirname(embeddings_path(args.embeddings).rstrip("/")) \
        if os.path.isdir(os.path.join(args.embeddings, "embeddings")) else args.embeddings
    out = args.out or os.path.join(folder if os.path.isdir(folder) else ".", "tuned_fusion.toml")
    snippet = fusion_snippet(res, source=os.path.abspath(args.embeddings))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(snippet)
    res["snippet_file"] = os.path.abspath(out)
    if args.json:
        json.dump(res, sys.stdout, indent=2, default=str)
        print()
    else:
        k = res["k"]
        c = res["chosen"]
        print(f"chosen: mode {c['mode']}, weights " + ", ".join(f"{m} {w:g}" for m, w in c["weights"].items()))
        print(f"validation precision@{k}: tuned {_f(res['validation'][f'precision@{k}'])}, equal weights "
              f"{_f(res['validation'][f'equal_weights_precision@{k}'])} ({res['queries']['validation']} queries)")
        print(f"test precision@{k}:       tuned {_f(res['test'][f'precision@{k}'])}, equal weights "
              f"{_f(res['test'][f'equal_weights_precision@{k}'])} ({res['queries']['test']} queries)")
        print(f"snippet: {os.path.abspath(out)}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# finetune
def read_catalog_items(cfg, products: str, reviews: str | None, label: str | None):
    """The catalog as :class:`embedders.finetune.CatalogItem` records (first occurrence of an id wins, text built
    exactly as the embed pipeline builds it, image bytes or fetched URIs)."""
    import pyarrow.parquet as pq

    from embedders.finetune import CatalogItem
    from embedders.text import clean_text, product_text

    from .catalog import inspect_products, inspect_reviews
    from .embed import _norm_id, _num, _ts_seconds

    table = inspect_products(products, cfg.product_columns)
    roles = table.roles
    label_col = None
    if label:
        names = pq.ParquetFile(table.paths[0]).schema_arrow.names
        label_col = roles.get(label, label if label in names else None)
        if label_col is None:
            raise UserError(f"--label {label!r}: neither a role in [columns.products] nor a column of "
                            f"{table.paths[0]} (columns: {names[:20]})")
    text_cfg = cfg.raw["text"]
    cols = list(dict.fromkeys([c for c in roles.values()] + ([label_col] if label_col else [])))
    items: dict[str, CatalogItem] = {}
    uris: dict[str, str] = {}
    dups = missing_id = 0
    for path in table.paths:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=256, columns=[c for c in cols if c in pf.schema_arrow.names]):
            for row in batch.to_pylist():
                pid = _norm_id(row.get(roles["product_id"]))
                if pid is None:
                    missing_id += 1
                    continue
                if pid in items:
                    dups += 1
                    continue
                text = product_text([row.get(roles[f]) for f in text_cfg["fields"] if f in roles],
                                    text_cfg.get("separator", ". "), text_cfg.get("unicode_form", "NFKC"))
                image = row.get(roles["image"]) if "image" in roles else None
                if image is None and "image_uri" in roles:
                    uri = clean_text(row.get(roles["image_uri"]))
                    if uri:
                        uris[pid] = uri
                lab = row.get(label_col) if label_col else None
                items[pid] = CatalogItem(pid, text, image, None if lab is None else str(lab))
    if missing_id or dups:
        log.warning("catalog: %d rows without product_id and %d duplicate ids skipped (first occurrence kept)",
                    missing_id, dups)
    if uris:
        from .fetch import fetch_many

        im = cfg.raw["images"]
        log.info("fetching %d images by URI", len(uris))
        for pid, r in zip(list(uris), fetch_many(list(uris.values()), float(im.get("fetch_timeout_s", 10.0)),
                                                 int(im.get("fetch_retries", 2)), int(im.get("max_bytes", 20_000_000)),
                                                 int(im.get("fetch_max_concurrency", 8)))):
            if isinstance(r, bytes):
                items[pid].image = r
    n_reviews = 0
    if reviews:
        rt = inspect_reviews(reviews, cfg.review_columns)
        r = rt.roles
        form = text_cfg.get("unicode_form", "NFKC")
        for path in rt.paths:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=1024, columns=list(r.values())):
                for row in batch.to_pylist():
                    pid = _norm_id(row.get(r["product_id"]))
                    if pid is None or pid not in items:
                        continue
                    text = clean_text(row.get(r["text"]), form) if "text" in r else None
                    if not text:
                        continue
                    items[pid].reviews.append({
                        "text": text,
                        "helpful_votes": _num(row.get(r["helpful_votes"])) if "helpful_votes" in r else None,
                        "created_ts": _ts_seconds(row.get(r["created_at"])) if "created_at" in r else None})
                    n_reviews += 1
    info = {"products_input": table.paths, "reviews_input": reviews, "product_rows": table.num_rows,
            "reviews_used": n_reviews, "label_column": label_col}
    return list(items.values()), info


def run_finetune(args) -> int:
    import functools

    from embedders.finetune import FinetuneConfig, finetune
    from index.evaluate import evaluate_modalities

    from .config import load_config

    cfg = load_config(args.config, list(args.set))
    ft_raw = cfg.section("finetune")
    for key, val in (("mode", args.mode), ("epochs", args.epochs), ("max_minutes", args.max_minutes),
                     ("device", args.device)):
        if val is not None:
            ft_raw[key] = val
    ft = FinetuneConfig.from_dict(ft_raw)
    label = args.label or cfg.section("eval").get("label") or "category"
    items, info = read_catalog_items(cfg, args.products, args.reviews, label)
    if not any(it.label for it in items):
        log.warning("label column %r is empty: label metrics and block-scale selection are skipped", label)
    evaluator = functools.partial(evaluate_modalities, meta={"model_id": cfg.model.model_id})
    res = finetune(cfg.model, items, ft, args.out, fusion=cfg.fusion.to_dict(), review_cfg=cfg.reviews,
                   evaluator=evaluator, label=label, resume=args.resume, data_info=info,
                   feature_cache=args.feature_cache)
    m = res.manifest
    if args.json:
        json.dump({"out": os.path.abspath(args.out), "metrics": m["metrics"], "training": {
            k: m["training"].get(k) for k in ("best_epoch", "stopped_by", "timing_s")}}, sys.stdout, indent=2,
            default=str)
        print()
    else:
        k = ft.k
        for name in ("base", "before", "after"):
            mm = m["metrics"].get(name)
            if not mm:
                continue
            t = mm.get("text_to_image") or {}
            fused = (mm.get("item_to_item") or {}).get("fused") or {}
            print(f"{name:>7} (test): text->image recall@{k} {_f(t.get(f'recall@{k}'))}, precision@{k} "
                  f"{_f(t.get(f'precision@{k}'))}; item-to-item fused precision@{k} "
                  f"{_f(fused.get(f'precision@{k}'))}")
        print(f"best epoch {m['training']['best_epoch']} ({m['training']['stopped_by']}), "
              f"{m['training']['timing_s']['total']:.0f}s in all")
        print(f"checkpoint: {os.path.abspath(args.out)}  (use [model] name = \"local-dir:{os.path.abspath(args.out)}\")")
    return 0
