"""The ``shopvec`` command line.

Each command group lives in its own module exposing ``register(subparsers)``; the module adds its parser(s) and sets
``func=<callable(args) -> int>``. Heavy imports (torch, Beam, FAISS) happen inside the command functions so that
``shopvec --help`` is instant. A :class:`embedders.errors.UserError` becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from embedders.errors import UserError

# Order = order in --help.
COMMAND_MODULES = [
    "pipelines.cli_embed",      # embed
    "pipelines.demo_data",      # demo-data
    "pipelines.cli_index",      # index, index list, index rollback, query
    "pipelines.cli_serve",      # serve
    "pipelines.cli_nightly",    # nightly
    "pipelines.cli_quality",    # eval, tune-fusion, finetune
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shopvec", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a command module not present in this build
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return parser


_NOISE = ("Resource module is not available", "Using yield and return in the process method",
          "apitools not found", "No semi_persistent_directory found")


def _drop_noise(record: logging.LogRecord) -> bool:
    if record.name == "root" and record.levelno < logging.WARNING:
        return False  # libraries that log INFO chatter on the root logger (open_clip)
    msg = record.getMessage()
    return not any(n in msg for n in _NOISE)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for h in logging.getLogger().handlers:
        h.addFilter(_drop_noise)
    if verbose < 2:
        for noisy in ("apache_beam", "urllib3", "httpx", "PIL", "timm", "open_clip", "h5py", "faiss.loader"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if getattr(args, "accepts_beam_args", False):
            args.beam_args = unknown  # Beam pipeline options pass through unchanged
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose, args.quiet)
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"shopvec {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("shopvec: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
