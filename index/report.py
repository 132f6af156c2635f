"""The ``shopvec eval --report`` page: one self-contained HTML file a person reads offline in a browser.

Headline table (per modality precision@k / nDCG@k / mAP, text->image, coverage, ANN), a per-label bar chart (inline
SVG), the worst labels, and a grid of sample queries with the thumbnails of their neighbours (same label marked).
Thumbnails are embedded as base64 ``data:`` URIs; the page loads nothing from anywhere.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from embedders.errors import UserError

log = logging.getLogger(__name__)

THUMB_PX = 112
COLORS = {"fused": "#2b6cb0", "text": "#2f855a", "image": "#c05621", "reviews": "#6b46c1", "text_to_image": "#718096"}

TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>shopvec eval — {{ title }}</title>
<style>
 body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1a202c;background:#fff}
 h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
 .meta{color:#4a5568;font-size:13px;margin:2px 0}
 .warn{background:#fff5f5;border:1px solid #fc8181;color:#9b2c2c;padding:8px 12px;border-radius:6px;margin:10px 0}
 table.h{border-collapse:collapse;font-size:14px} table.h td,table.h th{border:1px solid #e2e8f0;padding:5px 10px;text-align:right}
 table.h th{background:#f7fafc} table.h td:first-child,table.h th:first-child{text-align:left}
 .grid{display:flex;flex-direction:column;gap:14px}
 .q{display:flex;gap:14px;align-items:flex-start;border:1px solid #e2e8f0;border-radius:8px;padding:10px}
 .qimg{flex:0 0 auto;width:150px} .qimg img{width:140px;height:140px;object-fit:contain;border:3px solid #2b6cb0;border-radius:6px;background:#f7fafc}
 .cap{font-size:12px;line-height:1.25;max-width:150px;overflow:hidden;text-overflow:ellipsis}
 .lab{font-size:11px;color:#4a5568}
 .nbrs{display:flex;flex-wrap:wrap;gap:8px}
 .nb{width:{{ thumb }}px} .nb img,.nb .ph{width:{{ thumb - 6 }}px;height:{{ thumb - 6 }}px;object-fit:contain;border-radius:5px;background:#f7fafc}
 .ok img,.ok .ph{border:3px solid #38a169} .ko img,.ko .ph{border:3px solid #e53e3e}
 .ph{display:flex;align-items:center;justify-content:center;font-size:10px;color:#a0aec0;text-align:center}
 .mark{font-weight:700} .ok .mark{color:#2f855a} .ko .mark{color:#c53030}
 .row-title{font-size:12px;color:#4a5568;margin:2px 0 4px}
 .legend span{display:inline-block;margin-right:14px;font-size:12px} .sw{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
 footer{margin-top:30px;color:#a0aec0;font-size:11px}
</style></head><body>
<h1>Retrieval quality — {{ title }}</h1>
<p class="meta">model <b>{{ meta.model_id }}</b>{% if fusion_text %} · fusion {{ fusion_text }}{% endif %} · label column <b>{{ meta.label }}</b> · k = {{ k }}</p>
<p class="meta">{{ meta.products }} products · {{ meta.queries }} queries ({{ meta.queries_from }}) · {{ meta.labels }} labels · random neighbours would give precision@{{ k }} ≈ {{ chance }}</p>
{% if random_init %}<div class="warn"><b>RANDOM-INIT MODEL.</b> These vectors come from random weights: the figures below show the floor, not the product.</div>{% endif %}
{% if t2i_skipped %}<div class="warn">Text→image not evaluated: {{ t2i_skipped }}</div>{% endif %}

<h2>Headline</h2>
<table class="h">
<tr><th>item-to-item neighbours</th><th>precision@{{ k }}</th><th>nDCG@{{ k }}</th><th>mAP</th></tr>
{% for row in headline %}<tr><td>{{ row.name }}</td><td>{{ row.p }}</td><td>{{ row.n }}</td><td>{{ row.m }}</td></tr>
{% endfor %}
<tr><th>text → image</th><th>recall@{{ k }} (exact product)</th><th>precision@{{ k }} (same label)</th><th></th></tr>
<tr><td>title + description → image</td><td>{{ t2i.recall }}</td><td>{{ t2i.precision }}</td><td></td></tr>
<tr><th>catalog</th><th>coverage@{{ k }}</th><th></th><th></th></tr>
<tr><td>share of products ever recommended</td><td>{{ coverage }}</td><td></td><td></td></tr>
{% if ann %}<tr><th>ANN index vs exact search</th><th>recall@{{ k }}</th><th>precision@{{ k }} lost</th><th></th></tr>
<tr><td>fused vectors, {{ ann.queries }} queries</td><td>{{ ann.recall }}</td><td>{{ ann.lost }}</td><td></td></tr>{% endif %}
</table>

<h2>Per label</h2>
<div class="legend">{% for name, color in legend %}<span><i class="sw" style="background:{{ color }}"></i>{{ name }}</span>{% endfor %}<span><i class="sw" style="background:#e53e3e;height:2px"></i>random neighbours</span></div>
{{ chart | safe }}
{% if worst %}<p class="meta">Worst labels (fused precision@{{ k }}): {% for w in worst %}<b>{{ w.label }}</b> {{ w.p }}{% if not loop.last %}, {% endif %}{% endfor %}</p>{% endif %}

<h2>Sample queries</h2>
<p class="meta">Each row: the query product (blue) and its {{ k }} nearest neighbours by the fused vector{% if has_t2i %}, then the {{ k }} nearest images to its title + description{% endif %}. Green ✓ = same {{ meta.label }}, red ✗ = different.</p>
<div class="grid">
{% for q in samples %}<div class="q">
 <div class="qimg">{% if q.thumb %}<img src="{{ q.thumb }}" alt="query">{% else %}<div class="ph" style="width:140px;height:140px;border:3px solid #2b6cb0">no image</div>{% endif %}
  <div class="cap" title="{{ q.title }}">{{ q.short }}</div><div class="lab">{{ q.label }}</div><div class="lab">{{ q.id }}</div></div>
 <div>{% for block in q.blocks %}<div class="row-title">{{ block.name }} · {{ block.hits }}/{{ block.nbrs|length }} same label</div>
  <div class="nbrs">{% for n in block.nbrs %}<div class="nb {{ 'ok' if n.same else 'ko' }}" title="{{ n.title }} — {{ n.label }}">
   {% if n.thumb %}<img src="{{ n.thumb }}" alt="neighbour">{% else %}<div class="ph">no image</div>{% endif %}
   <div class="cap"><span class="mark">{{ '✓' if n.same else '✗' }}</span> {{ n.short }}</div><div class="lab">{{ n.label }}</div></div>{% endfor %}</div>{% endfor %}
 </div></div>
{% endfor %}</div>
<footer>shopvec eval · {{ meta.created_at }} · embeddings {{ meta.embeddings }}</footer>
</body></html>
"""


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{float(x):.3f}"


def _short(s: Any, n: int = 48) -> str:
    s = "" if s is None else str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def thumbnail_data_uri(data: bytes | None, px: int = THUMB_PX) -> str | None:
    """Image bytes -> small JPEG as a ``data:`` URI (``None`` when the bytes are not a decodable image)."""
    if not data:
        return None
    try:
        from embedders.images import ImageLimits, decode_image

        img = decode_image(bytes(data), ImageLimits(), target_size=px)
    except Exception:  # noqa: BLE001 - a bad image becomes a placeholder, never a failed report
        return None
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _catalog_source(products: str | None, embeddings: str | None) -> tuple[list[str], dict[str, str]]:
    """Catalog files and column roles: ``--products`` or the inputs recorded in ``OUT/run_report.json``."""
    cols = {"product_id": "product_id", "image": "image", "image_uri": "image_uri"}
    paths: list[str] = []
    report = None
    if embeddings:
        for cand in (os.path.join(embeddings, "run_report.json"),
                     os.path.join(os.path.dirname(os.path.abspath(embeddings)), "run_report.json")):
            if os.path.isfile(cand):
                with open(cand, encoding="utf-8") as f:
                    report = json.load(f)
                break
    if report:
        cp = ((report.get("config") or {}).get("columns") or {}).get("products") or {}
        cols.update({k: v for k, v in cp.items() if k in cols})
        paths = list((report.get("inputs") or {}).get("products") or [])
    if products:
        from glob import glob

        if os.path.isdir(products):
            paths = sorted(glob(os.path.join(products, "**", "*.parquet"), recursive=True))
        else:
            paths = sorted(glob(products)) or [products]
    return [p for p in paths if "://" not in p or p.startswith("file://")], cols


def load_images(ids: Sequence[str], products: str | None, embeddings: str | None) -> dict[str, bytes]:
    """Image bytes of ``ids`` from the catalog (inline bytes, or local ``image_uri`` files); missing ones omitted."""
    paths, cols = _catalog_source(products, embeddings)
    if not paths:
        log.warning("report: no catalog to take thumbnails from (pass --products); showing placeholders")
        return {}
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    wanted = list(dict.fromkeys(ids))
    out: dict[str, bytes] = {}
    try:
        d = ds.dataset([p[len("file://"):] if p.startswith("file://") else p for p in paths], format="parquet")
    except Exception as e:  # noqa: BLE001
        log.warning("report: cannot open the catalog for thumbnails (%s); showing placeholders", str(e)[:200])
        return {}
    names = d.schema.names
    pid = cols["product_id"]
    if pid not in names:
        log.warning("report: catalog has no %r column; showing placeholders", pid)
        return {}
    read = [c for c in (pid, cols["image"], cols["image_uri"]) if c in names]
    id_type = d.schema.field(pid).type
    keys = wanted if str(id_type) in ("string", "large_string") else [int(x) for x in wanted if x.lstrip("-").isdigit()]
    table = d.to_table(columns=read, filter=pc.field(pid).isin(keys))
    for row in table.to_pylist():
        key = str(row[pid])
        if key in out:
            continue  # first occurrence wins, as in embed
        data = row.get(cols["image"])
        if data is None and row.get(cols["image_uri"]):
            uri = str(row[cols["image_uri"]])
            uri = uri[len("file://"):] if uri.startswith("file://") else uri
            if "://" not in uri and os.path.isfile(uri):
                with open(uri, "rb") as f:
                    data = f.read()
        if data is not None:
            out[key] = bytes(data)
    return out


def bar_chart_svg(per_label: Mapping[str, Any], k: int, chance: float | None, width: int = 760) -> str:
    """Grouped horizontal bars: precision@k per label and modality (fused, text, image, reviews, text->image)."""
    series = [m for m in ("fused", "text", "image", "reviews")
              if any(m in (v.get(f"precision@{k}") or {}) for v in per_label.values())]
    has_t2i = any(v.get("text_to_image") for v in per_label.values())
    if has_t2i:
        series.append("text_to_image")
    labels = sorted(per_label, key=lambda n: ((per_label[n].get(f"precision@{k}") or {}).get("fused") or 0.0, n))
    left, right, bar, gap = 230, 60, 11, 10
    group = bar * max(len(series), 1) + gap
    height = 30 + group * len(labels) + 20
    plot = width - left - right

    def x(v: float) -> float:
        return left + plot * max(0.0, min(1.0, v))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="precision@{k} per label" style="font-family:system-ui,sans-serif;font-size:11px">']
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{x(t):.1f}" y1="20" x2="{x(t):.1f}" y2="{height - 18}" stroke="#edf2f7"/>'
                     f'<text x="{x(t):.1f}" y="14" text-anchor="middle" fill="#718096">{t:.2f}</text>')
    for i, name in enumerate(labels):
        y0 = 24 + i * group
        entry = per_label[name]
        parts.append(f'<text x="{left - 8}" y="{y0 + group / 2 - 2:.1f}" text-anchor="end" fill="#2d3748">'
                     f'{html.escape(_short(name, 34))} (n={entry.get("queries", 0)})</text>')
        for j, s in enumerate(series):
            v = (entry.get("text_to_image") or {}).get(f"precision@{k}") if s == "text_to_image" \
                else (entry.get(f"precision@{k}") or {}).get(s)
            if v is None:
                continue
            y = y0 + j * bar
            parts.append(f'<rect x="{left}" y="{y}" width="{max(x(v) - left, 0.5):.1f}" height="{bar - 2}" '
                         f'fill="{COLORS[s]}"><title>{html.escape(str(name))} · {s}: {v:.3f}</title></rect>'
                         f'<text x="{x(v) + 4:.1f}" y="{y + bar - 3}" fill="#4a5568">{v:.2f}</text>')
    if chance is not None:
        parts.append(f'<line x1="{x(chance):.1f}" y1="20" x2="{x(chance):.1f}" y2="{height - 18}" stroke="#e53e3e" '
                     f'stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def choose_samples(labels: np.ndarray, query_rows: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """Up to ``n`` query rows spread over labels (round-robin in label order, seeded order within a label)."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[int]] = {}
    for r in query_rows:
        by_label.setdefault(int(labels[r]), []).append(int(r))
    queues = {lab: list(rng.permutation(rows)) for lab, rows in sorted(by_label.items())}
    out: list[int] = []
    while len(out) < n and any(queues.values()):
        for lab in sorted(queues):
            if queues[lab] and len(out) < n:
                out.append(int(queues[lab].pop(0)))
    return out


def render_report(ev, products: str | None = None, embeddings: str | None = None, samples: int = 12,
                  title: str | None = None) -> str:
    """The HTML text of the report for an :class:`index.evaluate.Evaluation`."""
    import jinja2

    m = ev.metrics
    vs = ev.vectors
    meta = dict(m.get("meta") or {})
    k = int(meta.get("k", 10))
    fusion = meta.get("fusion") or vs.meta.get("fusion")
    if fusion:
        w = ", ".join(f"{a} {b:g}" for a, b in (fusion.get("weights") or {}).items())
        meta["fusion_text"] = f"{fusion.get('mode')} ({w})"
    meta.setdefault("label", "label")
    meta.setdefault("queries_from", "all")
    from embedders.provenance import utc_now

    meta["created_at"] = utc_now()
    headline = []
    for mod in ("image", "text", "reviews", "fused"):
        v = m["item_to_item"].get(mod)
        if v is None:
            continue
        headline.append({"name": mod, "p": _fmt(v.get(f"precision@{k}")), "n": _fmt(v.get(f"ndcg@{k}")),
                         "m": _fmt(v.get("map"))})
    t = m.get("text_to_image") or {}
    ann = m.get("ann")
    main = ev.item.get("fused") or ev.item.get("text") or ev.item.get("image")
    sample_rows: list[int] = []
    if main is not None and len(main.query_rows):
        sample_rows = choose_samples(vs.labels, main.query_rows, samples)
    pos_in_main = {int(r): i for i, r in enumerate(main.query_rows)} if main is not None else {}
    pos_in_cross = {int(r): i for i, r in enumerate(ev.cross.query_rows)} if ev.cross is not None else {}
    needed: list[str] = []
    for r in sample_rows:
        needed.append(vs.ids[r])
        needed += [vs.ids[x] for x in main.neighbours[pos_in_main[r]] if x >= 0]
        if r in pos_in_cross:
            needed += [vs.ids[x] for x in ev.cross.neighbours[pos_in_cross[r]] if x >= 0]
    images = load_images(needed, products, embeddings) if needed else {}
    thumbs = {pid: thumbnail_data_uri(images.get(pid)) for pid in dict.fromkeys(needed)}
    titles = vs.columns.get("title") or [None] * vs.n
    names = vs.label_names

    def lab(r: int) -> str:
        c = int(vs.labels[r])
        return names[c] if c >= 0 else "(no label)"

    def item(r: int, qr: int) -> dict[str, Any]:
        same = int(vs.labels[r]) == int(vs.labels[qr]) and int(vs.labels[qr]) >= 0
        return {"id": vs.ids[r], "thumb": thumbs.get(vs.ids[r]), "title": titles[r] or vs.ids[r],
                "short": _short(titles[r] or vs.ids[r], 40), "label": lab(r), "same": same, "score": ""}

    cards = []
    for r in sample_rows:
        blocks = []
        nb = [int(x) for x in main.neighbours[pos_in_main[r]] if x >= 0]
        items = [item(x, r) for x in nb]
        blocks.append({"name": f"similar products ({'fused' if 'fused' in ev.item else 'text'})", "nbrs": items,
                       "hits": sum(i["same"] for i in items)})
        if r in pos_in_cross:
            nb2 = [int(x) for x in ev.cross.neighbours[pos_in_cross[r]] if x >= 0]
            items2 = [item(x, r) for x in nb2]
            for it in items2:
                if it["id"] == vs.ids[r]:
                    it["short"] = "◎ its own image · " + it["short"]
            blocks.append({"name": "text → image (title + description against images)", "nbrs": items2,
                           "hits": sum(i["same"] for i in items2)})
        cards.append({"id": vs.ids[r], "thumb": thumbs.get(vs.ids[r]), "title": titles[r] or vs.ids[r],
                      "short": _short(titles[r] or vs.ids[r], 60), "label": lab(r), "blocks": blocks})
    per_label = m.get("per_label") or {}
    series = [s for s in ("fused", "text", "image", "reviews")
              if any(s in (v.get(f"precision@{k}") or {}) for v in per_label.values())]
    legend = [(s, COLORS[s]) for s in series]
    if any(v.get("text_to_image") for v in per_label.values()):
        legend.append(("text → image", COLORS["text_to_image"]))
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    tpl = env.from_string(TEMPLATE)
    return tpl.render(
        title=title or meta.get("model_id") or "embeddings", meta=_Meta(meta), k=k,
        fusion_text=meta.get("fusion_text"), random_init=bool(meta.get("random_init")),
        chance=_fmt(meta.get("chance_precision")), headline=headline,
        t2i={"recall": _fmt(t.get(f"recall@{k}")), "precision": _fmt(t.get(f"precision@{k}"))},
        t2i_skipped=t.get("skipped"), has_t2i=ev.cross is not None,
        coverage=_fmt(m.get(f"coverage@{k}")),
        ann=({"recall": _fmt(ann.get(f"recall@{k}")), "lost": _fmt(ann.get(f"precision_lost@{k}")),
              "queries": ann.get("queries")} if ann else None),
        chart=bar_chart_svg(per_label, k, meta.get("chance_precision")) if per_label else "<p>(no labels)</p>",
        legend=legend,
        worst=[{"label": w["label"], "p": _fmt(w.get(f"precision@{k}"))} for w in m.get("worst_labels") or []],
        samples=cards, thumb=THUMB_PX)


class _Meta(dict):
    """Template access ``meta.x`` with a dash for absent keys."""

    def __getattr__(self, name: str) -> Any:
        v = self.get(name)
        return "–" if v is None else v


def write_report(ev, path: str, products: str | None = None, embeddings: str | None = None, samples: int = 12,
                 title: str | None = None) -> str:
    text = render_report(ev, products=products, embeddings=embeddings, samples=samples, title=title)
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"--report {path}: cannot write ({e.strerror})") from None
    return path
