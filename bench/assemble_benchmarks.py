"""Assemble BENCHMARKS.md from the per-benchmark write-ups in docs/bench-*.md.

    .venv/bin/python bench/assemble_benchmarks.py

Each benchmark's figures, command and host conditions live next to its discussion in ``docs/bench-<name>.md``; this
script only concatenates them (in pipeline order) under a common header, so BENCHMARKS.md never drifts from them.
"""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ("embed", "index", "serve", "nightly", "scale", "quality")
HEADER = """# Benchmarks

Every benchmark reports its figures against a baseline measured in the same run on the same machine.
**Host:** 2 vCPUs, 24 GiB, no GPU. Each section says under which load it ran: some ran while other engineers' test
runs and benchmarks shared the two cores (load average 5-12; absolute times pessimistic, tail latencies noisy), the
reruns marked "quiet host" ran alone. Ratios measured within one run and memory figures are the robust ones. No GPU
machine was lent to this project so far, so no GPU figures are reported.
"""


def _demote(md: str) -> str:
    """Every Markdown heading one level down (code fences left alone): the page's title becomes a section."""
    out, fenced = [], False
    for line in md.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and line.startswith("#") else line)
    return "\n".join(out)


def main() -> None:
    parts = [HEADER]
    for name in ORDER:
        path = os.path.join(REPO, "docs", f"bench-{name}.md")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                txt = f.read().strip()
            parts.append((_demote(txt) if txt.startswith("# ") else txt) + "\n")  # a page title becomes a section
    with open(os.path.join(REPO, "BENCHMARKS.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    main()
