"""``shopvec serve``: the HTTP query service (index/service.py) under uvicorn."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os

from embedders.errors import UserError

log = logging.getLogger(__name__)

EPILOG = """environment:
  SHOPVEC_API_TOKEN   when set (non-empty), every /v1/* route and /metrics need 'Authorization: Bearer <token>'

examples:
  SHOPVEC_API_TOKEN=secret shopvec serve --index var/demo/index
  curl -H 'Authorization: Bearer secret' 'http://127.0.0.1:8080/v1/products/P000001/similar?k=10&filter=category=Shoes'
"""


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP query service over a published index (hot reload of CURRENT)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, metavar="ROOT", help="index root (the one `shopvec index --out` wrote)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default %(default)s: loopback only; put a reverse proxy in front)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes; each loads the index (use --mmap to share pages) (default 1)")
    p.add_argument("--max-k", type=int, default=1000, help="largest k a request may ask for (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=1000,
                   help="most product ids in one /v1/similar:batch call (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="request body cap, larger is 413 (default %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=16_000_000,
                   help="decompression-bomb guard for image queries (default %(default)s)")
    p.add_argument("--reload-interval", type=float, default=2.0, metavar="SECONDS",
                   help="how often CURRENT is polled for a new version; 0 = never (default %(default)s)")
    p.add_argument("--mmap", action="store_true", help="memory-map the index files instead of reading them")
    p.add_argument("--omp-threads", type=int, default=1, metavar="N",
                   help="FAISS OpenMP threads per request (default 1: concurrency comes from parallel requests, "
                        "nested OpenMP teams only contend for the cores; 0 = FAISS default)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip sha256 checks when loading a version (faster start, less safe)")
    p.add_argument("--no-warm-encoder", dest="warm_encoder", action="store_false",
                   help="do not load the text/image query encoder before a version goes live")
    p.add_argument("--wait-for-index", action="store_true",
                   help="start even when nothing is published yet (not ready until CURRENT appears)")
    p.add_argument("--access-log", action="store_true", help="uvicorn access log (off by default; see /metrics)")
    p.set_defaults(func=run)


def _check(args) -> None:
    root = args.index
    if not os.path.isdir(root):
        raise UserError(f"--index {root}: no such directory; build one with `shopvec index --embeddings OUT --out {root}`")
    if not os.path.exists(os.path.join(root, "CURRENT")) and not args.wait_for_index:
        raise UserError(f"--index {root}: no CURRENT file (nothing published there); publish with `shopvec index "
                        f"--out {root}` or pass --wait-for-index")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1..65535")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected >= 1")
    for name in ("max_k", "max_batch", "max_body_bytes", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if args.omp_threads < 0:
        raise UserError(f"--omp-threads {args.omp_threads}: expected >= 0")
    if args.reload_interval < 0:
        raise UserError(f"--reload-interval {args.reload_interval}: expected >= 0 seconds")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    _check(args)
    import uvicorn

    from index.service import ENV_CONFIG, ENV_TOKEN

    token = os.environ.get(ENV_TOKEN) or None
    if not _is_loopback(args.host):
        if token:
            log.warning("binding %s (not loopback): the API is reachable from other machines; use TLS in front",
                        args.host)
        else:
            log.warning("binding %s (not loopback) WITHOUT a token: anyone who can reach this port can query the "
                        "index; set %s", args.host, ENV_TOKEN)
    os.environ[ENV_CONFIG] = json.dumps({
        "index_root": os.path.abspath(args.index), "max_k": args.max_k, "max_batch": args.max_batch,
        "max_body_bytes": args.max_body_bytes, "max_image_pixels": args.max_image_pixels,
        "reload_interval_s": args.reload_interval, "mmap": args.mmap, "verify": args.verify,
        "warm_encoder": args.warm_encoder, "omp_threads": args.omp_threads or None,
        "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
    })
    log.info("serving %s on http://%s:%d (%d worker(s), auth %s)", args.index, args.host, args.port, args.workers,
             "on" if token else "off")
    uvicorn.run("index.service:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                access_log=args.access_log, log_level="info" if not args.quiet else "warning",
                timeout_graceful_shutdown=10, server_header=False)
    return 0
