"""Deterministic demo catalog: ``products.parquet`` + ``reviews.parquet`` with pictures drawn by PIL.

``shopvec demo-data --out DIR --n N [--seed S] [--n-reviews R] [--no-bad-records]`` writes::

    DIR/products.parquet   n rows, row groups of 64 rows
    DIR/reviews.parquet    0-6 reviews per product (or exactly --n-reviews), row groups of 64 rows
    DIR/images/            image files referenced by the ``image_uri`` column of a few rows

Products (default column names): ``product_id`` (string ``P000123``), ``title``, ``description``, ``image`` (JPEG or
PNG bytes, 112-160 px), ``image_uri`` (null except a few rows), ``category`` (one of :data:`CATEGORIES`), ``price``
(float64), ``brand``, ``in_stock`` (bool). Every category is drawn as its own kind of object (shoe, mug, T-shirt,
lamp, wrist watch, handbag, stack of books) in category-typical colours, with per-product colour, size, position,
background and noise, so images of one category look alike and differ from the others. Titles and descriptions come
from per-category vocabularies and name the drawn colour; some contain Unicode on purpose (``Café``, full-width
``Ｋｏｍｏｒｅｂｉ``, an emoji, a decomposed ``e`` + U+0301 accent, CJK). Reviews: ``product_id``, ``text`` (about
the category, sentiment matching the rating), ``rating`` (int32 1-5), ``helpful_votes`` (int32),
``created_at`` (timestamp[us, UTC], fixed 2023-2025 range, never "now").

Determinism: the same ``seed``, ``n``, ``n_reviews``, ``bad_records`` *and* ``out_dir`` give byte-identical Parquet
files (fixed writer options, no wall-clock values). ``image_uri`` holds absolute paths under ``out_dir``, so only
that column differs between two output directories; ``reviews.parquet`` is identical anywhere.

Valid edge rows (present whenever ``n >= 20``; not errors):

- URI rows: 5 rows have ``image`` null and ``image_uri`` set: 3 as ``file:///abs/DIR/images/P….jpg|png``, 2 as a plain
  absolute path. The files exist.
- text-only: ``image`` and ``image_uri`` null.
- image-only: ``title`` and ``description`` null.
- review-only: ``title``, ``description``, ``image``, ``image_uri`` null, 3+ reviews (embedded from reviews alone).
- reviews with a null ``rating``, a null ``helpful_votes`` and a null ``created_at`` (every review column is nullable).

For ``n=200`` these are: ``file://`` URIs P000022, P000130, P000178; plain paths P000070, P000154; text-only
P000046; image-only P000094; review-only P000118; null-field reviews on P000190 (``generate()["special"]``).

Bad records (``bad_records=True``, needs ``n >= 20``; rows placed at fixed fractions of ``n``; for ``n=200, seed=0``
the ids are the ones in brackets). Expected dead letters ``(product_id, stage, error)``:

1. non-image bytes in ``image`` (an HTML 404 page), title present  -> ``(P000010, image, not_an_image)``;
   still embedded from text + reviews (partial).
2. truncated JPEG (cut at 55 %, no EOI), title present            -> ``(P000034, image, corrupt_image)``; partial.
3. ``image_uri`` = ``file://…/images/P000058.jpg`` that does not exist -> ``(P000058, image, image_not_found)``; partial.
4. no title (whitespace only), no description, no image, no URI and no reviews
                                                                   -> ``(P000082, fuse, no_usable_modality)``.
5. decompression-bomb PNG: 8000x8000 1-bit black (64 M pixels declared, ~8 KB on disk; above the demo config's
   16 M cap and ``ImageLimits()``'s 40 M default, below PIL's own 89 M warning, so the project's cap must catch it),
   title present                                                   -> ``(P000106, image, decompression_bomb)``; partial.
6. duplicate ``product_id``: row 142 repeats the id of row 4 with other content; the first occurrence (row 4) is
   kept                                                            -> ``(P000004, dedup, duplicate_id)``.

Review-level (counted in the run report, not dead letters): 3 reviews for two product ids not in the catalog
(``P{n+17}``, ``P{n+42}``: ``P000217``, ``P000242``) and 2 reviews with null ``text`` (for ``P000166``).

:func:`generate` returns the paths, the counts and these expectations (``bad``, ``bad_reviews``, ``special``,
``expected``) so tests do not hard-code them.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import random
import struct
import time
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from embedders.errors import UserError

CATEGORIES = ("shoes", "mugs", "shirts", "lamps", "watches", "bags", "books")
MIN_N_SPECIAL = 20  # below this no edge/bad rows are placed (bad_records=True requires at least this many)
ROW_GROUP_SIZE = 64
GENERATOR_VERSION = 1

# Expected dead-letter error classes (embedders.images.decode_image, pipelines.fetch, pipelines.embed names).
ERR_NOT_AN_IMAGE = "not_an_image"
ERR_CORRUPT_IMAGE = "corrupt_image"
ERR_IMAGE_NOT_FOUND = "image_not_found"
ERR_NO_MODALITY = "no_usable_modality"
ERR_BOMB = "decompression_bomb"
ERR_DUPLICATE = "duplicate_id"

BOMB_SIDE = 8000            # 64 M pixels declared: above the demo cap (16 M) and ImageLimits()'s default (40 M), below PIL's own 89 M
DEMO_MAX_PIXELS = 16_000_000  # what configs/demo.toml is expected to use for image.max_pixels
_BASE_TIME = _dt.datetime(2023, 1, 1, tzinfo=_dt.timezone.utc)
_TIME_SPAN_S = 900 * 86400

_CORRUPT_BYTES = (b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1>"
                  b"<p>The requested image was not found on this server.</p></body></html>\n")

# --------------------------------------------------------------------------------------------------------------------
# vocabularies
# --------------------------------------------------------------------------------------------------------------------

_PALETTES: dict[str, list[tuple[str, tuple[int, int, int]]]] = {
    "shoes": [("red", (200, 30, 40)), ("navy", (25, 40, 100)), ("black", (32, 32, 34)), ("white", (236, 236, 232)),
              ("grey", (128, 130, 136)), ("neon green", (110, 215, 60))],
    "mugs": [("white", (242, 242, 238)), ("cream", (240, 226, 196)), ("teal", (30, 138, 140)),
             ("terracotta", (190, 96, 62)), ("sky blue", (122, 180, 228)), ("charcoal", (62, 62, 68))],
    "shirts": [("white", (246, 246, 246)), ("navy", (30, 46, 110)), ("olive", (110, 120, 52)),
               ("burgundy", (122, 26, 46)), ("mustard", (214, 170, 42)), ("sky blue", (136, 186, 230))],
    "lamps": [("ivory", (246, 238, 214)), ("sage", (160, 182, 140)), ("black", (36, 36, 36)),
              ("amber", (230, 160, 52)), ("linen white", (238, 234, 224)), ("coral", (236, 120, 100))],
    "watches": [("silver", (192, 194, 200)), ("gold", (212, 175, 55)), ("rose gold", (202, 142, 120)),
                ("black", (30, 30, 34)), ("steel blue", (70, 100, 142))],
    "bags": [("tan", (190, 140, 90)), ("brown", (110, 70, 40)), ("black", (32, 28, 28)), ("burgundy", (112, 30, 42)),
             ("camel", (196, 156, 100)), ("olive", (102, 106, 62))],
    "books": [("red", (170, 40, 40)), ("forest green", (40, 90, 60)), ("navy", (30, 46, 92)),
              ("mustard", (206, 160, 46)), ("teal", (40, 120, 126)), ("plum", (100, 50, 92))],
}

_ITEMS = {
    "shoes": ["Running Shoes", "Sneakers", "Trail Runners", "Canvas Shoes", "Court Sneakers", "Walking Shoes"],
    "mugs": ["Coffee Mug", "Tea Mug", "Travel Mug", "Espresso Cup", "Latte Mug"],
    "shirts": ["T-Shirt", "Polo Shirt", "Crew-Neck Tee", "V-Neck T-Shirt", "Henley Tee"],
    "lamps": ["Desk Lamp", "Floor Lamp", "Bedside Lamp", "Reading Lamp", "Table Lamp"],
    "watches": ["Analog Watch", "Chronograph Watch", "Dive Watch", "Dress Watch", "Field Watch"],
    "bags": ["Handbag", "Tote Bag", "Shoulder Bag", "Satchel", "Top-Handle Bag"],
    "books": ["Hardcover Novel", "Cookbook", "Travel Guide", "Poetry Collection", "Box Set of Novels"],
}

_MATERIALS = {
    "shoes": ["mesh", "leather", "suede", "canvas", "knit"],
    "mugs": ["ceramic", "stoneware", "porcelain", "enamel", "bone china"],
    "shirts": ["cotton", "organic cotton", "linen", "jersey", "piqué cotton"],
    "lamps": ["brass", "steel", "linen-shade", "rattan", "ceramic-base"],
    "watches": ["stainless steel", "titanium", "leather-strap", "mesh-bracelet", "sapphire-crystal"],
    "bags": ["leather", "vegan leather", "waxed canvas", "suede", "pebbled leather"],
    "books": ["hardcover", "paperback", "clothbound", "illustrated", "large-print"],
}

_BRANDS = {
    "shoes": ["Strideon", "Nordlys", "Ｋａｚｅ Ｒｕｎ", "Pace & Co"],
    "mugs": ["Café Tasse", "Kiln & Clay", "Morning Ritual", "北欧 Home"],
    "shirts": ["Loomwell", "Threadbare", "Maison Élan", "Basics Lab"],
    "lamps": ["Ｋｏｍｏｒｅｂｉ", "Lumen Works", "Brightside", "Atelier Lys"],
    "watches": ["Zürich Zeit", "Tidewater", "Meridian", "Ōkura"],
    "bags": ["Maison Élan", "Carryall", "Saddle & Stitch", "Fjällvik"],
    "books": ["Libro Ñ", "Paperhouse", "Inkwell Press", "Bücherei"],
}

_FEATURES = {
    "shoes": ["cushioned sole", "breathable upper", "non-slip outsole", "padded collar", "lightweight build"],
    "mugs": ["dishwasher safe", "microwave safe", "350 ml", "double-walled", "hand-glazed"],
    "shirts": ["regular fit", "slim fit", "pre-shrunk", "tag-free collar", "breathable weave"],
    "lamps": ["E27 bulb", "dimmable", "warm white LED", "adjustable arm", "fabric shade"],
    "watches": ["water resistant 100 m", "quartz movement", "automatic movement", "luminous hands", "date window"],
    "bags": ["zip closure", "inner pockets", "detachable strap", "fits a 13\" laptop", "magnetic clasp"],
    "books": ["320 pages", "illustrated edition", "award-winning", "signed print run", "with ribbon marker"],
}

_CAT_SENTENCES = {
    "shoes": ["Built for everyday miles, from the commute to weekend trails.",
              "The padded tongue and collar keep your foot comfortable all day.",
              "A grippy rubber outsole handles wet pavement with confidence.",
              "True to size; choose half a size up if you wear thick socks."],
    "mugs": ["Perfect for your morning coffee, tea or hot chocolate.",
             "The wide handle fits comfortably even when the mug is full.",
             "Each piece is glazed by hand, so small variations are part of its charm.",
             "Holds a generous 350 ml and keeps drinks warm for longer."],
    "shirts": ["A wardrobe staple that works on its own or layered under a jacket.",
               "Soft, breathable fabric that keeps its shape wash after wash.",
               "Machine wash cold with similar colours; tumble dry low.",
               "Cut for a relaxed fit through the chest and shoulders."],
    "lamps": ["Casts a warm, even light that is easy on the eyes for reading.",
              "The weighted base keeps the lamp steady on desks and side tables.",
              "Works with standard E27 bulbs; bulb not included.",
              "A 1.8 m fabric cable with an inline switch is included."],
    "watches": ["A clean, legible dial with luminous hands for low-light reading.",
                "Scratch-resistant crystal and a screw-down crown protect the movement.",
                "The strap is quick-release, so it is easy to swap for a different look.",
                "Comes in a gift box with a two-year warranty."],
    "bags": ["Roomy enough for a tablet, a water bottle and the day's essentials.",
             "Reinforced handles and stitched seams are built to last.",
             "An interior zip pocket keeps keys and cards within reach.",
             "Wear it on the shoulder or carry it by the top handle."],
    "books": ["A page-turner that readers of every age have taken to heart.",
              "Printed on acid-free paper with a sewn binding that lies flat.",
              "Includes a new foreword and notes for book clubs.",
              "A thoughtful gift for the reader in your life."],
}

_REVIEW_POS = {
    "shoes": ["super comfortable for long runs", "the sole has great grip on wet roads", "true to size and very light",
              "no blisters even on day one"],
    "mugs": ["keeps my coffee warm for ages", "survived months in the dishwasher", "the handle is really comfortable",
             "lovely glaze, looks even better in person"],
    "shirts": ["the cotton is soft and did not shrink", "fits perfectly across the shoulders",
               "colour stayed bright after many washes", "great quality for the price"],
    "lamps": ["gives a warm cosy light for reading", "sturdy base and easy to assemble",
              "looks great on my bedside table", "the dimmer works smoothly"],
    "watches": ["keeps perfect time and looks elegant", "the strap is comfortable all day",
                "dial is easy to read at night", "feels much more expensive than it was"],
    "bags": ["fits my laptop and lunch easily", "the leather feels premium", "strap is comfortable on my shoulder",
             "lots of useful pockets inside"],
    "books": ["could not put it down", "beautifully written and moving", "the recipes actually work",
              "gorgeous print quality and binding"],
}
_REVIEW_NEG = {
    "shoes": ["the sole started peeling after two weeks", "runs half a size small", "gave me blisters on the heel",
              "laces keep coming undone"],
    "mugs": ["chipped on the first wash", "the handle gets too hot", "much smaller than the photo suggests",
             "glaze has a rough spot on the rim"],
    "shirts": ["shrank a full size after one wash", "the fabric is thin and see-through", "seams came apart quickly",
               "colour faded fast"],
    "lamps": ["the switch broke within a month", "wobbly and the shade sits crooked", "light is too dim to read",
              "arrived with a dent in the base"],
    "watches": ["stopped working after a week", "the strap broke at the buckle", "scratches far too easily",
                "the date window is misaligned"],
    "bags": ["strap snapped after a month", "smells strongly of chemicals", "zip gets stuck all the time",
             "smaller than expected, laptop does not fit"],
    "books": ["the plot dragged in the middle", "pages arrived bent and creased", "too many typos",
              "the ending was disappointing"],
}
_OPEN_POS = ["Love it!", "Great buy.", "Five stars:", "Très bien —", "👍 Really happy!", "Excellent,"]
_OPEN_MID = ["It's okay.", "Mixed feelings:", "Decent, but", "Not bad;"]
_OPEN_NEG = ["Disappointed.", "Would not buy again:", "Returned it —", "Meh."]
_CLOSE_POS = ["Would recommend.", "Buying another one.", "Fast delivery too.", ""]
_CLOSE_NEG = ["Customer service was slow.", "Expected better.", "Not worth the price.", ""]

_EXTRA_UNICODE = ["", "", "", "", "", " ⭐ Bestseller", " 🔥 New", " — Édition limitée"]


# --------------------------------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------------------------------

def _jitter(c: tuple[int, int, int], rng: random.Random, amount: int = 14) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in c)  # type: ignore[return-value]


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    if f >= 1:
        return tuple(int(min(255, v + (255 - v) * (f - 1))) for v in c)  # type: ignore[return-value]
    return tuple(int(v * f) for v in c)  # type: ignore[return-value]


_ASPECT = {"shoes": 1.75, "mugs": 1.25, "shirts": 1.05, "lamps": 0.7, "watches": 0.55, "bags": 1.1, "books": 1.35}


def _draw_shoe(d, x0, y0, w, h, c, rng):
    """Side view of a sneaker: heel on the left, toe on the right, contrasting sole and laces."""
    sole = (238, 236, 230) if sum(c) < 420 else (40, 40, 44)
    x1, y1 = x0 + w, y0 + h
    upper = [(x0 + 0.02 * w, y1 - 0.2 * h), (x0, y0 + 0.12 * h), (x0 + 0.12 * w, y0 + 0.04 * h),
             (x0 + 0.26 * w, y0 + 0.2 * h), (x0 + 0.4 * w, y0), (x0 + 0.5 * w, y0 + 0.06 * h),
             (x0 + 0.78 * w, y0 + 0.46 * h), (x0 + 0.95 * w, y0 + 0.56 * h), (x1, y0 + 0.7 * h), (x1, y1 - 0.2 * h)]
    d.polygon(upper, fill=c)
    d.rounded_rectangle([x0, y1 - 0.24 * h, x1, y1], radius=max(1, int(0.1 * h)), fill=sole)
    accent = _shade(c, 0.55) if sum(c) > 300 else _shade(c, 1.6)
    d.line([(x0 + 0.1 * w, y1 - 0.34 * h), (x0 + 0.45 * w, y0 + 0.55 * h), (x0 + 0.8 * w, y0 + 0.6 * h)],
           fill=accent, width=max(1, int(0.06 * h)))
    for k in range(4):  # laces across the instep
        t = 0.15 + 0.2 * k
        lx, ly = x0 + (0.42 + 0.3 * t) * w, y0 + (0.06 + 0.4 * t) * h
        d.line([(lx - 0.04 * w, ly + 0.06 * h), (lx + 0.05 * w, ly - 0.05 * h)], fill=sole,
               width=max(1, int(0.04 * h)))


def _draw_mug(d, x0, y0, w, h, c, rng):
    bw = 0.74 * w
    dark = _shade(c, 0.7)
    d.ellipse([x0 + 0.56 * w, y0 + 0.25 * h, x0 + w, y0 + 0.78 * h], outline=dark, width=max(2, int(0.09 * w)))
    d.rounded_rectangle([x0, y0 + 0.1 * h, x0 + bw, y0 + h], radius=max(1, int(0.1 * w)), fill=c)
    d.ellipse([x0, y0, x0 + bw, y0 + 0.2 * h], fill=_shade(c, 0.85))
    d.ellipse([x0 + 0.06 * bw, y0 + 0.03 * h, x0 + 0.94 * bw, y0 + 0.17 * h], fill=(92, 56, 30))  # coffee
    if rng.random() < 0.5:
        d.rectangle([x0 + 0.2 * bw, y0 + 0.45 * h, x0 + 0.8 * bw, y0 + 0.6 * h], fill=_shade(c, 0.6))


def _draw_shirt(d, x0, y0, w, h, c, rng):
    cx, x1, y1 = x0 + w / 2, x0 + w, y0 + h
    pts = [(cx - 0.15 * w, y0), (x0 + 0.2 * w, y0 + 0.06 * h), (x0, y0 + 0.3 * h), (x0 + 0.14 * w, y0 + 0.43 * h),
           (x0 + 0.24 * w, y0 + 0.34 * h), (x0 + 0.24 * w, y1), (x1 - 0.24 * w, y1), (x1 - 0.24 * w, y0 + 0.34 * h),
           (x1 - 0.14 * w, y0 + 0.43 * h), (x1, y0 + 0.3 * h), (x1 - 0.2 * w, y0 + 0.06 * h), (cx + 0.15 * w, y0)]
    d.polygon(pts, fill=c)
    d.pieslice([cx - 0.15 * w, y0 - 0.12 * h, cx + 0.15 * w, y0 + 0.12 * h], 0, 180, fill=_shade(c, 0.72))
    if rng.random() < 0.4:
        stripe = _shade(c, 0.6) if sum(c) > 300 else _shade(c, 1.7)
        for k in range(3):
            yy = y0 + (0.5 + 0.14 * k) * h
            d.line([(x0 + 0.25 * w, yy), (x1 - 0.25 * w, yy)], fill=stripe, width=max(1, int(0.04 * h)))


def _draw_lamp(d, x0, y0, w, h, c, rng):
    cx, y1 = x0 + w / 2, y0 + h
    metal = rng.choice([(190, 150, 60), (60, 60, 64), (200, 200, 205)])
    d.ellipse([cx - 0.42 * w, y0 + 0.28 * h, cx + 0.42 * w, y0 + 0.6 * h], fill=(255, 244, 190))  # glow
    d.rectangle([cx - 0.035 * w, y0 + 0.35 * h, cx + 0.035 * w, y1 - 0.08 * h], fill=metal)
    d.ellipse([cx - 0.3 * w, y1 - 0.13 * h, cx + 0.3 * w, y1], fill=metal)
    d.polygon([(cx - 0.22 * w, y0), (cx + 0.22 * w, y0), (cx + 0.48 * w, y0 + 0.38 * h), (cx - 0.48 * w, y0 + 0.38 * h)],
              fill=c)
    d.line([(cx - 0.48 * w, y0 + 0.38 * h), (cx + 0.48 * w, y0 + 0.38 * h)], fill=_shade(c, 0.75),
           width=max(1, int(0.02 * h)))


def _draw_watch(d, x0, y0, w, h, c, rng):
    cx, cy, y1 = x0 + w / 2, y0 + h / 2, y0 + h
    band = rng.choice([(96, 60, 34), (30, 30, 30), (150, 152, 158), (60, 40, 30)])
    d.rectangle([cx - 0.3 * w, y0, cx + 0.3 * w, y1], fill=band)
    r = 0.5 * w
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
    face = (248, 248, 244) if sum(c) > 200 else (236, 236, 236)
    ri = 0.8 * r
    d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=face)
    for k in range(12):
        a = k * np.pi / 6
        d.line([(cx + 0.66 * r * np.sin(a), cy - 0.66 * r * np.cos(a)),
                (cx + 0.76 * r * np.sin(a), cy - 0.76 * r * np.cos(a))], fill=(40, 40, 40), width=1)
    ha, ma = rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
    d.line([(cx, cy), (cx + 0.4 * r * np.sin(ha), cy - 0.4 * r * np.cos(ha))], fill=(20, 20, 20),
           width=max(1, int(0.08 * r)))
    d.line([(cx, cy), (cx + 0.62 * r * np.sin(ma), cy - 0.62 * r * np.cos(ma))], fill=(20, 20, 20),
           width=max(1, int(0.05 * r)))
    d.rectangle([cx + r - 1, cy - 0.1 * r, cx + r + 0.12 * w, cy + 0.1 * r], fill=c)


def _draw_bag(d, x0, y0, w, h, c, rng):
    x1, y1 = x0 + w, y0 + h
    d.arc([x0 + 0.24 * w, y0, x1 - 0.24 * w, y0 + 0.75 * h], 180, 360, fill=_shade(c, 0.7),
          width=max(2, int(0.06 * w)))
    d.polygon([(x0 + 0.1 * w, y0 + 0.34 * h), (x1 - 0.1 * w, y0 + 0.34 * h), (x1, y1), (x0, y1)], fill=c)
    d.polygon([(x0 + 0.1 * w, y0 + 0.34 * h), (x1 - 0.1 * w, y0 + 0.34 * h), (x1 - 0.06 * w, y0 + 0.58 * h),
               (x0 + 0.06 * w, y0 + 0.58 * h)], fill=_shade(c, 0.8))
    d.rectangle([x0 + 0.45 * w, y0 + 0.54 * h, x0 + 0.55 * w, y0 + 0.64 * h], fill=(214, 178, 70))  # clasp


def _draw_books(d, x0, y0, w, h, c, rng):
    k = rng.randint(2, 4)
    bh = h / k
    pal = [col for _, col in _PALETTES["books"]]
    for i in range(k):
        col = c if i == 0 else _jitter(rng.choice(pal), rng, 10)
        inset = rng.uniform(0, 0.12) * w
        top = y0 + h - (i + 1) * bh
        d.rounded_rectangle([x0 + inset, top + 1, x0 + w - 0.12 * w + inset * 0.5, top + bh - 1],
                            radius=max(1, int(0.08 * bh)), fill=col)
        d.rectangle([x0 + w - 0.2 * w + inset * 0.5, top + 0.18 * bh, x0 + w - 0.12 * w + inset * 0.5,
                     top + bh - 0.18 * bh], fill=(242, 234, 212))  # pages
        d.line([(x0 + inset + 0.1 * w, top + bh / 2), (x0 + inset + 0.45 * w, top + bh / 2)],
               fill=(230, 200, 120), width=max(1, int(0.1 * bh)))


_DRAW = {"shoes": _draw_shoe, "mugs": _draw_mug, "shirts": _draw_shirt, "lamps": _draw_lamp,
         "watches": _draw_watch, "bags": _draw_bag, "books": _draw_books}

_SIZES = [(128, 128), (128, 128), (144, 112), (112, 144), (160, 120), (120, 160)]


def draw_product(category: str, colour: tuple[int, int, int], rng: random.Random, noise_seed: int,
                 noise: float = 4.0) -> Image.Image:
    """Draw one product picture (RGB ``PIL.Image``) of ``category`` in ``colour``; deterministic in the arguments.

    ``noise``: std of the seeded Gaussian pixel noise (0 = clean; used for PNGs to keep them small).
    """
    W, H = rng.choice(_SIZES)
    bg_top = (rng.randint(212, 250), rng.randint(212, 250), rng.randint(212, 250))
    bg_bot = _shade(bg_top, rng.uniform(0.82, 0.95))
    # vertical background gradient
    t = np.linspace(0.0, 1.0, H, dtype=np.float32)[:, None, None]
    arr = (np.asarray(bg_top, np.float32)[None, None, :] * (1 - t) + np.asarray(bg_bot, np.float32) * t)
    img = Image.fromarray(np.repeat(arr, W, axis=1).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    aspect = _ASPECT[category]
    scale = rng.uniform(0.6, 0.86)
    bw = min(W * scale, H * scale * aspect)
    bh = bw / aspect
    x0 = rng.uniform(0.04 * W, W - bw - 0.04 * W)
    y0 = rng.uniform(0.04 * H, H - bh - 0.08 * H)
    # soft floor shadow
    d.ellipse([x0 + 0.05 * bw, y0 + bh - 0.04 * bh, x0 + 0.95 * bw, y0 + bh + 0.08 * bh], fill=_shade(bg_bot, 0.8))
    _DRAW[category](d, x0, y0, bw, bh, colour, rng)
    # mild sensor-like noise (seeded numpy, so deterministic) -> realistic JPEG sizes (~3-6 KB)
    if noise <= 0:
        return img
    grain = np.random.default_rng(noise_seed).normal(0.0, noise, size=(H, W, 1)).astype(np.float32)
    out = np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def encode_jpeg(img: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A valid single-colour (black) 1-bit greyscale PNG declaring ``width x height`` pixels; a few KB on disk.

    Built by hand (streaming zlib), so producing it never allocates the full raster.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, colour type 0 (grey)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0 + all-black pixels: one long zero run
    comp = zlib.compressobj(9)
    parts = []
    rows_per_chunk = max(1, (1 << 20) // len(row))
    block = row * rows_per_chunk
    left = height
    while left > 0:
        k = min(left, rows_per_chunk)
        parts.append(comp.compress(block if k == rows_per_chunk else row * k))
        left -= k
    parts.append(comp.flush())
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------------------------
# layout of special rows
# --------------------------------------------------------------------------------------------------------------------

# name -> fraction of n. Bad rows only with bad_records=True; edge/URI rows whenever n >= MIN_N_SPECIAL.
_BAD_FRACTIONS = [("not_an_image", 0.05), ("truncated_jpeg", 0.17), ("missing_uri_file", 0.29),
                  ("no_usable_modality", 0.41), ("decompression_bomb", 0.53), ("duplicate_id", 0.71),
                  ("duplicate_target", 0.02), ("null_text_reviews", 0.83)]
_EDGE_FRACTIONS = [("text_only", 0.23), ("image_only", 0.47), ("review_only", 0.59),
                   ("uri_file_1", 0.11), ("uri_path_1", 0.35), ("uri_file_2", 0.65), ("uri_path_2", 0.77),
                   ("uri_file_3", 0.89), ("null_fields_reviews", 0.95)]


def _layout(n: int, bad_records: bool) -> dict[str, int]:
    """Row index of every special row; collisions resolved by moving to the next free row."""
    if n < MIN_N_SPECIAL:
        return {}
    wanted = (_BAD_FRACTIONS if bad_records else []) + _EDGE_FRACTIONS
    taken: dict[int, str] = {}
    out: dict[str, int] = {}
    for name, frac in wanted:
        i = min(n - 1, int(round(n * frac)))
        while i in taken:
            i = (i + 1) % n
        taken[i] = name
        out[name] = i
    if bad_records and out["duplicate_target"] > out["duplicate_id"]:  # the kept copy must come first
        out["duplicate_target"], out["duplicate_id"] = out["duplicate_id"], out["duplicate_target"]
    return out


def _pid(i: int) -> str:
    return f"P{i:06d}"


# --------------------------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------------------------

def _text_fields(cat: str, colour_name: str, rng: random.Random, i: int) -> tuple[str, str, str]:
    brand = rng.choice(_BRANDS[cat])
    item = rng.choice(_ITEMS[cat])
    material = rng.choice(_MATERIALS[cat])
    feature = rng.choice(_FEATURES[cat])
    title = f"{brand} {colour_name.title()} {material.title()} {item} – {feature.capitalize()}"
    title += rng.choice(_EXTRA_UNICODE)
    plural = item.endswith(("Shoes", "Sneakers", "Runners"))
    sentences = [f"{'These' if plural else 'This'} {colour_name} {item.lower()} from {brand} "
                 f"{'are' if plural else 'is'} made of {material} ({feature})."]
    k = rng.randint(1, 3)
    sentences += rng.sample(_CAT_SENTENCES[cat], k)
    if rng.random() < 0.12:  # a few very long descriptions (beyond the text tower's context length)
        sentences += _CAT_SENTENCES[cat] * 3
    if rng.random() < 0.08:  # decomposed accent: NFC normalisation must turn this into "Café"
        sentences.append("Designed at our Cafe\u0301 studio in Zu\u0308rich.")
    description = " ".join(sentences)
    return title, description, brand


def _price(cat: str, rng: random.Random) -> float:
    lo, hi = {"shoes": (29, 180), "mugs": (6, 35), "shirts": (12, 90), "lamps": (25, 250), "watches": (40, 900),
              "bags": (30, 400), "books": (8, 45)}[cat]
    return round(int(rng.uniform(lo, hi)) + rng.choice([0.0, 0.49, 0.95, 0.99]), 2)


def _make_image(cat: str, colour, rng: random.Random, seed: int, i: int, fmt: str | None = None) -> tuple[bytes, str]:
    r = rng.random()
    fmt = fmt or ("jpeg" if r < 0.85 else ("png" if r < 0.95 else "png_p"))
    img = draw_product(cat, colour, rng, noise_seed=seed * 1_000_003 + i, noise=4.0 if fmt == "jpeg" else 0.0)
    if fmt == "jpeg":
        return encode_jpeg(img, quality=rng.choice([82, 85, 88, 90])), "jpg"
    if fmt == "png_p":
        return encode_png(img.quantize(colors=64, dither=Image.Dither.NONE)), "png"
    return encode_png(img), "png"


def _sentence(opener: str, body: str) -> str:
    if opener[-1] in ".!:":
        body = body[0].upper() + body[1:]
    return f"{opener} {body}."


def _review_text(cat: str, rating: int, rng: random.Random) -> str:
    if rating >= 4:
        text = f"{_sentence(rng.choice(_OPEN_POS), rng.choice(_REVIEW_POS[cat]))} {rng.choice(_CLOSE_POS)}"
    elif rating == 3:
        text = _sentence(rng.choice(_OPEN_MID), f"{rng.choice(_REVIEW_POS[cat])}, but {rng.choice(_REVIEW_NEG[cat])}")
    else:
        text = f"{_sentence(rng.choice(_OPEN_NEG), rng.choice(_REVIEW_NEG[cat]))} {rng.choice(_CLOSE_NEG)}"
    return text.strip()


def _review(pid: str, cat: str, rng: random.Random) -> dict:
    rating = rng.choices([1, 2, 3, 4, 5], weights=[6, 8, 14, 32, 40])[0]
    return {"product_id": pid, "text": _review_text(cat, rating, rng), "rating": rating,
            "helpful_votes": min(250, int(rng.expovariate(1 / 4.0))),
            "created_at": _BASE_TIME + _dt.timedelta(seconds=rng.randrange(_TIME_SPAN_S))}


# --------------------------------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------------------------------

def _schemas():
    import pyarrow as pa
    products = pa.schema([
        ("product_id", pa.string()), ("title", pa.string()), ("description", pa.string()), ("image", pa.binary()),
        ("image_uri", pa.string()), ("category", pa.string()), ("price", pa.float64()), ("brand", pa.string()),
        ("in_stock", pa.bool_())])
    reviews = pa.schema([
        ("product_id", pa.string()), ("text", pa.string()), ("rating", pa.int32()), ("helpful_votes", pa.int32()),
        ("created_at", pa.timestamp("us", tz="UTC"))])
    return products, reviews


def _write_parquet(rows: list[dict], schema, path: str, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    table = pa.Table.from_pydict(cols, schema=schema.with_metadata({b"shopvec_demo": json.dumps(
        meta, sort_keys=True, separators=(",", ":")).encode()}))
    tmp = path + ".tmp"
    # Fixed writer options -> byte-identical files for identical content.
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd", compression_level=3,
                   use_dictionary=["category", "brand"], write_statistics=True, version="2.6",
                   data_page_version="1.0")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------

def generate(out_dir: str, n: int = 200, seed: int = 0, n_reviews: int | None = None,
             bad_records: bool = True) -> dict[str, Any]:
    """Write ``products.parquet``, ``reviews.parquet`` and ``images/`` under ``out_dir``; deterministic.

    ``n``: number of product rows (including bad rows; with ``bad_records`` one of them repeats an id).
    ``n_reviews``: ``None`` -> 0-6 reviews per product; an int -> exactly that many regular reviews spread over the
    products (the 3 null-field edge reviews and, with ``bad_records``, the 5 bad reviews come on top). Returns a dict: ``products``, ``reviews``, ``images_dir`` (paths);
    ``n_products`` (rows), ``n_unique_ids``, ``n_reviews`` (rows), ``n_reviews_valid``; ``bad`` (list of expected
    dead letters ``{"product_id", "stage", "error", "kind", "row", "embedded"}``); ``bad_reviews``; ``special``
    (ids of the edge rows); ``expected`` (``embedded``, ``partial``, ``dead_letters``, ``orphan_reviews``,
    ``null_text_reviews``); ``categories``; ``seed``.
    """
    if not isinstance(n, int) or n <= 0:
        raise UserError(f"--n must be a positive integer, got {n!r}")
    if bad_records and n < MIN_N_SPECIAL:
        raise UserError(f"--n {n} is too small to hold the bad records (need at least {MIN_N_SPECIAL}); "
                        f"use a larger --n or --no-bad-records")
    if n_reviews is not None and (not isinstance(n_reviews, int) or n_reviews < 0):
        raise UserError(f"--n-reviews must be a non-negative integer, got {n_reviews!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} exists and is not a directory; choose a directory path")
    images_dir = os.path.join(out_dir, "images")
    try:
        os.makedirs(images_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {images_dir}: {e.strerror}; choose a writable --out") from None

    lay = _layout(n, bad_records)
    if n_reviews is not None and n_reviews < 3:
        lay.pop("review_only", None)  # it could not get the reviews it relies on
    role = {i: name for name, i in lay.items()}

    products: list[dict] = []
    product_cat: dict[str, str] = {}
    bad: list[dict] = []
    special: dict[str, Any] = {"uri_file": [], "uri_path": []}
    for i in range(n):
        rng = random.Random(f"shopvec-demo:{seed}:{i}")
        cat = CATEGORIES[rng.randrange(len(CATEGORIES))]
        colour_name, base = rng.choice(_PALETTES[cat])
        colour = _jitter(base, rng)
        title, description, brand = _text_fields(cat, colour_name, rng, i)
        if rng.random() < 0.06:
            description = None
        image, ext = _make_image(cat, colour, rng, seed, i)
        rec = {"product_id": _pid(i), "title": title, "description": description, "image": image,
               "image_uri": None, "category": cat, "price": _price(cat, rng), "brand": brand,
               "in_stock": rng.random() < 0.85}
        name = role.get(i)
        pid = rec["product_id"]
        if name == "not_an_image":
            rec["image"] = _CORRUPT_BYTES
            bad.append({"kind": name, "row": i, "product_id": pid, "stage": "image", "error": ERR_NOT_AN_IMAGE,
                        "embedded": True})
        elif name == "truncated_jpeg":
            full, _ = _make_image(cat, colour, rng, seed, i, fmt="jpeg")
            rec["image"] = full[: int(len(full) * 0.55)]
            bad.append({"kind": name, "row": i, "product_id": pid, "stage": "image", "error": ERR_CORRUPT_IMAGE,
                        "embedded": True})
        elif name == "missing_uri_file":
            rec["image"] = None
            rec["image_uri"] = "file://" + os.path.join(images_dir, f"{pid}.jpg")
            bad.append({"kind": name, "row": i, "product_id": pid, "stage": "image", "error": ERR_IMAGE_NOT_FOUND,
                        "embedded": True})
        elif name == "no_usable_modality":
            rec.update(title="   ", description=None, image=None, image_uri=None)
            bad.append({"kind": name, "row": i, "product_id": pid, "stage": "fuse", "error": ERR_NO_MODALITY,
                        "embedded": False})
        elif name == "decompression_bomb":
            rec["image"] = bomb_png()
            bad.append({"kind": name, "row": i, "product_id": pid, "stage": "image", "error": ERR_BOMB,
                        "embedded": True, "declared_pixels": BOMB_SIDE * BOMB_SIDE})
        elif name == "duplicate_id":
            pid = rec["product_id"] = _pid(lay["duplicate_target"])
            bad.append({"kind": name, "row": i, "product_id": pid, "stage": "dedup", "error": ERR_DUPLICATE,
                        "embedded": True, "kept_row": lay["duplicate_target"]})
        elif name == "text_only":
            rec["image"] = None
            special["text_only"] = pid
        elif name == "image_only":
            rec.update(title=None, description=None)
            special["image_only"] = pid
        elif name == "review_only":
            rec.update(title=None, description=None, image=None)
            special["review_only"] = pid
        elif name and name.startswith("uri_"):
            fname = f"{pid}.{ext}"
            fpath = os.path.join(images_dir, fname)
            with open(fpath, "wb") as f:
                f.write(rec["image"])
            rec["image"] = None
            if name.startswith("uri_file"):
                rec["image_uri"] = "file://" + fpath
                special["uri_file"].append(pid)
            else:
                rec["image_uri"] = fpath
                special["uri_path"].append(pid)
        elif name == "duplicate_target":
            special["duplicate_kept"] = pid
        elif name == "null_text_reviews":
            special["null_text_reviews"] = pid
        elif name == "null_fields_reviews":
            special["null_fields_reviews"] = pid
        products.append(rec)
        if name != "duplicate_id":
            product_cat[pid] = cat
    if "missing_uri_file" in lay:  # make sure the "missing" file really is missing after a re-run elsewhere
        missing = os.path.join(images_dir, f"{_pid(lay['missing_uri_file'])}.jpg")
        if os.path.exists(missing):
            os.remove(missing)

    # ---- reviews -------------------------------------------------------------------------------------------------
    no_reviews = {_pid(lay["no_usable_modality"])} if "no_usable_modality" in lay else set()
    review_only = special.get("review_only")
    eligible = [p for p in product_cat if p not in no_reviews]
    per_product: dict[str, list[dict]] = {p: [] for p in product_cat}
    if n_reviews is None:
        for p in eligible:
            rng = random.Random(f"shopvec-demo-reviews:{seed}:{p}")
            k = rng.choices(range(7), weights=[12, 18, 20, 18, 14, 10, 8])[0]
            if p == review_only:
                k = max(k, 3)
            per_product[p] = [_review(p, product_cat[p], rng) for _ in range(k)]
    else:
        rng = random.Random(f"shopvec-demo-reviews:{seed}:total:{n_reviews}")
        left = n_reviews
        if review_only and left >= 3:
            per_product[review_only] = [_review(review_only, product_cat[review_only], rng) for _ in range(3)]
            left -= 3
        for _ in range(left):
            p = eligible[rng.randrange(len(eligible))] if eligible else None
            if p is None:
                break
            per_product[p].append(_review(p, product_cat[p], rng))
    nulls = special.get("null_fields_reviews")
    if nulls:
        rng = random.Random(f"shopvec-demo-nulls:{seed}")
        extra = [_review(nulls, product_cat[nulls], rng) for _ in range(3)]
        extra[0]["rating"] = None
        extra[1]["helpful_votes"] = None
        extra[2]["created_at"] = None
        per_product[nulls].extend(extra)
    n_valid = sum(len(v) for v in per_product.values())

    bad_reviews: dict[str, Any] = {"orphan": 0, "orphan_product_ids": [], "null_text": 0,
                                   "null_text_product_id": None}
    orphan_rows: list[dict] = []
    if bad_records and lay:
        rng = random.Random(f"shopvec-demo-bad-reviews:{seed}")
        ghosts = [_pid(n + 17), _pid(n + 42)]
        orphan_rows = [_review(ghosts[0], "shoes", rng), _review(ghosts[0], "shoes", rng),
                       _review(ghosts[1], "mugs", rng)]
        nt = special["null_text_reviews"]
        nulls_text = [_review(nt, product_cat[nt], rng) for _ in range(2)]
        for r in nulls_text:
            r["text"] = None
        per_product[nt].extend(nulls_text)
        bad_reviews = {"orphan": len(orphan_rows), "orphan_product_ids": ghosts, "null_text": 2,
                       "null_text_product_id": nt}
    reviews: list[dict] = []
    half = len(per_product) // 2
    for k, p in enumerate(per_product):
        if k == half:
            reviews.extend(orphan_rows)  # orphans sit in the middle of the file, not conveniently at the end
        reviews.extend(per_product[p])
    if not per_product:
        reviews.extend(orphan_rows)

    products_schema, reviews_schema = _schemas()
    meta = {"generator": "pipelines.demo_data", "version": GENERATOR_VERSION, "seed": seed, "n": n,
            "n_reviews": n_reviews, "bad_records": bad_records}
    products_path = os.path.join(out_dir, "products.parquet")
    reviews_path = os.path.join(out_dir, "reviews.parquet")
    _write_parquet(products, products_schema, products_path, meta)
    _write_parquet(reviews, reviews_schema, reviews_path, meta)

    n_dead = len(bad)
    n_embedded = len(product_cat) - sum(1 for b in bad if not b["embedded"])
    return {
        "products": products_path, "reviews": reviews_path, "images_dir": images_dir,
        "n_products": n, "n_unique_ids": len(product_cat), "n_reviews": len(reviews), "n_reviews_valid": n_valid,
        "categories": list(CATEGORIES), "seed": seed,
        "bad": bad, "bad_reviews": bad_reviews, "special": special,
        "expected": {"embedded": n_embedded,
                     "partial": sum(1 for b in bad if b["stage"] == "image"),
                     "dead_letters": n_dead,
                     "dead_letter_keys": sorted((b["product_id"], b["stage"], b["error"]) for b in bad),
                     "orphan_reviews": bad_reviews["orphan"], "null_text_reviews": bad_reviews["null_text"],
                     "max_pixels": DEMO_MAX_PIXELS},
    }


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo-data", help="write a deterministic demo catalog (products + reviews Parquet, drawn images)",
        description="Write DIR/products.parquet, DIR/reviews.parquet and DIR/images/: a deterministic demo catalog "
                    "with pictures drawn per category, titles, descriptions, prices and reviews, including a few "
                    "bad records (see pipelines/demo_data.py) unless --no-bad-records.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--n", type=int, default=200, metavar="N", help="number of product rows (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed -> same bytes")
    p.add_argument("--n-reviews", type=int, default=None, metavar="R",
                   help="exact number of regular reviews (default: 0-6 per product)")
    p.add_argument("--no-bad-records", dest="bad_records", action="store_false",
                   help="leave out the deliberately bad records")
    p.set_defaults(func=run)


def run(args) -> int:
    t0 = time.perf_counter()
    res = generate(args.out, n=args.n, seed=args.seed, n_reviews=args.n_reviews, bad_records=args.bad_records)
    dt = time.perf_counter() - t0
    print(f"wrote {res['n_products']} products ({res['n_unique_ids']} unique ids, {len(CATEGORIES)} categories) "
          f"to {res['products']}")
    print(f"wrote {res['n_reviews']} reviews to {res['reviews']}")
    n_files = len(res["special"].get("uri_file", [])) + len(res["special"].get("uri_path", []))
    print(f"wrote {n_files} image files referenced by image_uri under {res['images_dir']}")
    if res["bad"]:
        keys = ", ".join(f"{b['product_id']} {b['stage']}/{b['error']}" for b in res["bad"])
        br = res["bad_reviews"]
        print(f"bad records: {len(res['bad'])} expected dead letters ({keys}); {br['orphan']} reviews for unknown "
              f"products, {br['null_text']} reviews with null text")
    else:
        print("bad records: none (--no-bad-records)")
    print(f"done in {dt:.1f}s; next: shopvec embed --config configs/demo.toml --products {res['products']} "
          f"--reviews {res['reviews']} --out OUT")
    return 0
