"""``shopvec embed``: the Beam embed pipeline from the command line."""
from __future__ import annotations

import argparse
import json
import sys

EPILOG = """Any option the CLI does not know is passed to Beam unchanged, e.g. for Dataflow:
  --runner DataflowRunner --project P --region R --temp_location gs://B/tmp --dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver
"""


def register(sub) -> None:
    p = sub.add_parser("embed", help="catalog Parquet -> fused product vectors (Apache Beam)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.toml", help="TOML config (default: %(default)s)")
    p.add_argument("--products", required=True, help="products Parquet: a file, a directory or a glob")
    p.add_argument("--reviews", help="reviews Parquet: a file, a directory or a glob (optional)")
    p.add_argument("--out", required=True, help="output folder: embeddings/, dead_letters/, run_report.json")
    p.add_argument("--runner", help="Beam runner (default from config: DirectRunner); e.g. FnApiRunner, "
                                    "PortableRunner, DataflowRunner, FlinkRunner, SparkRunner")
    p.add_argument("--device", help="override [model] device (auto|cpu|cuda)")
    p.add_argument("--batch-size", type=int, help="override [batch] image_batch_size")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set fusion.mode='\"concat\"' (repeatable)")
    p.add_argument("--json", action="store_true", help="print the run report as JSON on stdout")
    p.set_defaults(func=run, accepts_beam_args=True)


def run(args) -> int:
    from .config import load_config
    from .embed import run_embed

    overrides = list(args.set)
    if args.device:
        overrides.append(f'model.device="{args.device}"')
    if args.batch_size:
        overrides.append(f"batch.image_batch_size={args.batch_size}")
    cfg = load_config(args.config, overrides)
    report = run_embed(cfg, args.products, args.reviews, args.out, runner=args.runner,
                       beam_args=getattr(args, "beam_args", []))
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        c = report["counts"]
        print(f"embedded {c['embedded']} products ({c['partial']} partial: image failed, other modalities used), "
              f"{c['dead_letters']} dead letters, {report['throughput_products_per_s']} products/s, "
              f"model {report['model_id']}{' [RANDOM-INIT]' if report['random_init'] else ''}")
        print(f"output: {args.out}/embeddings  dead letters: {args.out}/dead_letters  report: {args.out}/run_report.json")
    return 0
