"""``shopvec nightly``: incremental embed -> index -> quality gates -> atomic publish -> report.

Exit codes (what cron, systemd and Airflow act on): 0 published or nothing to do; 1 a stage failed; 2 bad
invocation or config; 3 a quality gate refused (CURRENT untouched); 75 another run holds the lock (EX_TEMPFAIL).
The JSON report is written in every case (``STATE/nightly_report.json``, and ``--report PATH`` when given).
"""
from __future__ import annotations

import argparse
import json
import sys

EPILOG = """exit codes: 0 published or no change | 1 stage failed | 2 bad config | 3 gate refused | 75 locked
state, reports and the Prometheus textfile live under [nightly] state_dir (see README, "Nightly job")"""


def register(sub) -> None:
    p = sub.add_parser("nightly", help="incremental re-embed, index, quality gates and atomic publish (run nightly)",
                       description="Incremental embed -> index -> quality gates -> atomic publish -> report "
                                   "(one run; schedule it nightly).", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/nightly.toml", help="TOML config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set gates.max_row_drop_pct=5 (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="rebuild, gate and publish a new version even when nothing changed (e.g. after an index "
                        "library upgrade); changed products are still the only ones embedded")
    p.add_argument("--report", metavar="PATH", help="also write the JSON report here")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from .config import load_config
    from .nightly import _write_json_atomic, run_nightly, summary_text

    from embedders.errors import UserError

    try:
        cfg = load_config(args.config, list(args.set))
        result = run_nightly(cfg, force=args.force)
    except UserError as e:  # the config cannot be used: no state directory to report into, but --report gets it
        if args.report:
            _write_json_atomic(args.report, {"status": "failed", "exit_code": e.exit_code, "config_file": args.config,
                                             "error": {"stage": "config", "type": "UserError", "message": str(e)}})
        raise
    if args.report:
        _write_json_atomic(args.report, result.report)
    if args.json:
        json.dump(result.report, sys.stdout, indent=2, sort_keys=True, default=str)
        print()
    else:
        print(summary_text(result.report))
    sys.stdout.flush()
    return result.exit_code
