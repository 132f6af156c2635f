"""Bad-input corpus for tests: image bytes and catalog Parquet files, each with its expected outcome.

Dependency-free on purpose (PIL, numpy, pyarrow only; nothing from ``embedders``/``pipelines``), so it can judge the
code under test rather than mirror it.

Images
------
Every ``*()`` image function returns an :class:`ImageCase`: ``data`` (the encoded bytes), ``expect`` (``"ok"`` or the
dead-letter ``error`` class that ``embedders.images.decode_image`` is expected to raise), and for ``"ok"`` cases the
``size`` of the decoded RGB image *after* EXIF orientation plus ``probes``: ``((x, y), (r, g, b))`` pixels the
decoded RGB image must have, within ``tol`` per channel. Probes are chosen so that the naive conversion gets them
wrong: transparent pixels carry a loud colour (an RGB-only ``convert`` shows it; compositing on white shows white),
16-bit grey values are mid-range (clipping shows 255), EXIF-rotated images have their colours on the rotated axis.

Error classes used (``embedders.images`` names): ``corrupt_image`` (truncated / broken stream), ``not_an_image``
(unrecognised bytes), ``empty_image`` (zero bytes), ``decompression_bomb`` (declared pixels above the cap, with
``max_pixels`` saying which cap; the bitmap must never be decoded). ``catalog_expect`` is the outcome when the bytes
sit in a catalog's ``image`` column: the same, except empty bytes, which mean "no image" there (``"missing"``).

Catalogs
--------
``write_*`` functions write a small Parquet file (or directory) under the given directory and return a
:class:`CatalogCase`: ``expect`` is ``"ok"`` or ``"user_error"`` (exit code 2, one line naming the file and
``column``). "Wrong type" means:

- ``product_id``: anything other than a string type (string / large_string / string_view) or an integer type.
  Floats are wrong even when integral (``3.0`` vs ``"3"`` is ambiguous and loses precision above 2**53); lists and
  structs are wrong. Integers are valid and are kept as their decimal string (``7`` -> ``"7"``, never ``"7.0"``).
- ``image``: anything other than binary / large_binary / binary_view (fixed-size binary is accepted too). A *string*
  column called ``image`` is a user error, not a silent guess: strings of paths or URLs belong in ``image_uri``, and
  base64 text is not decoded implicitly. The message should say so.
- review ``text``: anything other than a string type.
"""
from __future__ import annotations

import functools
import io
import math
import os
import random
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, features

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

DEFAULT_CAP = 16_000_000  # max_pixels the demo config uses
ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageCase:
    name: str
    data: bytes
    expect: str                                   # "ok" or a dead-letter error class
    size: tuple[int, int] | None = None           # decoded (w, h) after EXIF orientation, for "ok"
    probes: tuple = ()                            # ((x, y), (r, g, b)) on the decoded RGB image
    tol: int = 0                                  # per-channel tolerance for probes
    note: str = ""
    max_pixels: int | None = None                 # the cap under which ``expect`` holds (bombs)
    in_catalog: str | None = None                 # outcome when the bytes sit in a catalog's image column, if it
    #                                               differs from ``expect`` ("missing": image modality absent, no
    #                                               dead letter)

    @property
    def catalog_expect(self) -> str:
        return self.in_catalog or self.expect


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------

def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _halves_rgb(w: int, h: int, left, right) -> Image.Image:
    img = Image.new("RGB", (w, h), left)
    img.paste(right, (w // 2, 0, w, h))
    return img


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=8)
def bomb_png_bytes(width: int, height: int) -> bytes:
    """Valid 1-bit black PNG declaring ``width x height``; built by streaming zlib, never holding the raster."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    per = max(1, (4 << 20) // len(row))
    block = row * per
    parts, left = [], height
    while left > 0:
        k = min(left, per)
        parts.append(comp.compress(block if k == per else row * k))
        left -= k
    parts.append(comp.flush())
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------------------------
# valid but awkward images
# --------------------------------------------------------------------------------------------------------------------

def palette_png() -> ImageCase:
    img = Image.new("P", (40, 20), 0)
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.paste(2, (20, 0, 40, 20))
    return ImageCase("palette_png", _save(img, "PNG"), "ok", (40, 20), (((5, 10), RED), ((35, 10), BLUE)),
                     note="mode P without transparency")


def palette_transparent_png() -> ImageCase:
    img = Image.new("P", (40, 20), 0)
    img.putpalette([0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # index 0 green (transparent), 1 blue
    img.paste(1, (20, 0, 40, 20))
    data = _save(img, "PNG", transparency=0)
    return ImageCase("palette_transparent_png", data, "ok", (40, 20), (((5, 10), WHITE), ((35, 10), BLUE)),
                     note="mode P, tRNS makes index 0 (green) transparent: must composite on white, not show green")


def rgba_png() -> ImageCase:
    img = Image.new("RGBA", (60, 20), (255, 0, 0, 0))           # left: fully transparent RED
    img.paste((0, 0, 0, 128), (20, 0, 40, 20))                  # middle: half-transparent black
    img.paste((0, 0, 255, 255), (40, 0, 60, 20))                # right: opaque blue
    return ImageCase("rgba_png", _save(img, "PNG"), "ok", (60, 20),
                     (((5, 10), WHITE), ((30, 10), (127, 127, 127)), ((55, 10), BLUE)), tol=2,
                     note="RGBA composited on WHITE (a plain convert('RGB') shows red on the left)")


def la_png() -> ImageCase:
    img = Image.new("LA", (40, 20), (0, 0))                      # left: transparent black
    img.paste((100, 255), (20, 0, 40, 20))                      # right: opaque grey 100
    return ImageCase("la_png", _save(img, "PNG"), "ok", (40, 20), (((5, 10), WHITE), ((35, 10), (100, 100, 100))),
                     tol=1, note="LA composited on white")


def cmyk_jpeg() -> ImageCase:
    img = Image.new("CMYK", (48, 32), (0, 255, 255, 0))          # pure red in CMYK
    img.paste((255, 255, 0, 0), (24, 0, 48, 32))                 # pure blue in CMYK
    return ImageCase("cmyk_jpeg", _save(img, "JPEG", quality=95), "ok", (48, 32),
                     (((6, 16), RED), ((42, 16), BLUE)), tol=40, note="Adobe CMYK JPEG")


def grey16_png() -> ImageCase:
    arr = np.full((20, 40), 16384, dtype=np.uint16)
    arr[:, 20:] = 49152
    img = Image.fromarray(arr)  # mode I;16
    return ImageCase("grey16_png", _save(img, "PNG"), "ok", (40, 20),
                     (((5, 10), (64, 64, 64)), ((35, 10), (191, 191, 191))), tol=2,
                     note="16-bit grey (I;16): 16384 -> 64 and 49152 -> 191 (value/65535*255); a naive convert "
                          "clips both to 255")


def bilevel_png() -> ImageCase:
    img = Image.new("1", (40, 20), 0)
    img.paste(1, (20, 0, 40, 20))
    return ImageCase("bilevel_png", _save(img, "PNG"), "ok", (40, 20), (((5, 10), BLACK), ((35, 10), WHITE)),
                     note="mode 1")


def grey_jpeg() -> ImageCase:
    img = Image.new("L", (40, 20), 128)
    return ImageCase("grey_jpeg", _save(img, "JPEG", quality=95), "ok", (40, 20), (((20, 10), (128, 128, 128)),),
                     tol=3, note="mode L JPEG")


def exif_rotated_jpeg(orientation: int = 6) -> ImageCase:
    """Stored 120x60, left half red, right half blue, with EXIF Orientation ``orientation`` (6 or 8).

    Displayed (after applying the tag) it is 60x120: orientation 6 (rotate 90 deg clockwise) puts red on top,
    orientation 8 (90 deg counter-clockwise) puts blue on top.
    """
    if orientation not in (6, 8):
        raise ValueError("orientation must be 6 or 8")
    img = _halves_rgb(120, 60, RED, BLUE)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    data = _save(img, "JPEG", quality=95, exif=exif.tobytes())
    top, bottom = (RED, BLUE) if orientation == 6 else (BLUE, RED)
    return ImageCase(f"exif_orientation_{orientation}_jpeg", data, "ok", (60, 120),
                     (((30, 15), top), ((30, 105), bottom)), tol=16,
                     note=f"EXIF orientation {orientation}: stored 120x60, displayed 60x120")


def tiny_png() -> ImageCase:
    img = Image.new("RGB", (1, 1), (10, 200, 30))
    return ImageCase("tiny_1x1_png", _save(img, "PNG"), "ok", (1, 1), (((0, 0), (10, 200, 30)),), note="1x1 is valid")


def extreme_aspect_jpeg() -> ImageCase:
    img = Image.new("RGB", (2000, 60), BLUE)
    img.paste(RED, (0, 0, 500, 60))
    return ImageCase("extreme_aspect_2000x60_jpeg", _save(img, "JPEG", quality=95), "ok", (2000, 60),
                     (((250, 30), RED), ((1500, 30), BLUE)), tol=16, note="2000x60 is valid")


def webp_rgba() -> ImageCase | None:
    """Lossless WebP with alpha (left half transparent green); ``None`` when this PIL has no WebP support."""
    if not features.check("webp"):
        return None
    img = Image.new("RGBA", (40, 20), (0, 255, 0, 0))
    img.paste((0, 0, 255, 255), (20, 0, 40, 20))
    return ImageCase("webp_rgba", _save(img, "WEBP", lossless=True), "ok", (40, 20),
                     (((5, 10), WHITE), ((35, 10), BLUE)), tol=1, note="WebP with alpha composited on white")


def animated_gif() -> ImageCase:
    f0 = Image.new("RGB", (40, 30), RED)
    f1 = Image.new("RGB", (40, 30), BLUE)
    data = _save(f0, "GIF", save_all=True, append_images=[f1], duration=100, loop=0)
    return ImageCase("animated_gif", data, "ok", (40, 30), (((20, 15), RED),),
                     note="2 frames (red, blue): the first frame is used")


# --------------------------------------------------------------------------------------------------------------------
# bad images
# --------------------------------------------------------------------------------------------------------------------

def _detailed_rgb(w: int = 160, h: int = 120, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def truncated_jpeg() -> ImageCase:
    full = _save(_detailed_rgb(), "JPEG", quality=90)
    return ImageCase("truncated_jpeg", full[: len(full) // 2], "corrupt_image",
                     note="first half of a valid JPEG (no EOI): header parses, decoding fails")


def truncated_png() -> ImageCase:
    full = _save(_detailed_rgb(seed=1), "PNG")
    return ImageCase("truncated_png", full[: len(full) // 2], "corrupt_image",
                     note="first half of a valid PNG: IHDR parses, IDAT is cut")


def not_an_image() -> ImageCase:
    data = b"GARBAGE!" + random.Random(1234).randbytes(2040)
    return ImageCase("random_bytes", data, "not_an_image", note="2 KB of seeded random bytes, no image magic")


def empty_bytes() -> ImageCase:
    return ImageCase("empty_bytes", b"", "empty_image", in_catalog="missing",
                     note="zero-length bytes: the decoder refuses them (empty_image), but in a catalog an empty "
                          "image cell means 'no image', like null: modality missing, no dead letter")


def bomb_png(cap: int = DEFAULT_CAP) -> ImageCase:
    """A valid PNG declaring ~2.25x ``cap`` pixels (6000x6000 for the 16 M default); a few KB on disk."""
    side = int(math.isqrt(int(cap * 2.25))) + 1
    return ImageCase("decompression_bomb_png", bomb_png_bytes(side, side), "decompression_bomb", max_pixels=cap,
                     note=f"{side}x{side} declared (> cap {cap}, < PIL's own 89 M limit): the cap must catch it "
                          f"from the header, before decoding")


def bomb_png_beyond_pil() -> ImageCase:
    """14000x14000 = 196 M pixels: above 2x PIL's MAX_IMAGE_PIXELS, so ``Image.open`` itself raises."""
    return ImageCase("decompression_bomb_beyond_pil_png", bomb_png_bytes(14000, 14000), "decompression_bomb",
                     max_pixels=DEFAULT_CAP, note="PIL raises DecompressionBombError on open; still a dead letter")


# --------------------------------------------------------------------------------------------------------------------

def image_cases(cap: int = DEFAULT_CAP) -> list[ImageCase]:
    """The whole image corpus (WebP only when PIL supports it)."""
    cases = [palette_png(), palette_transparent_png(), rgba_png(), la_png(), cmyk_jpeg(), grey16_png(),
             bilevel_png(), grey_jpeg(), exif_rotated_jpeg(6), exif_rotated_jpeg(8), tiny_png(),
             extreme_aspect_jpeg(), webp_rgba(), animated_gif(),
             truncated_jpeg(), truncated_png(), not_an_image(), empty_bytes(), bomb_png(cap), bomb_png_beyond_pil()]
    return [c for c in cases if c is not None]


def reference_decode(data: bytes, max_pixels: int = DEFAULT_CAP) -> Image.Image:
    """Minimal reference decoder the corpus's probes were designed against (used to self-check the corpus).

    Raises ``ValueError(error_class)`` for the bad cases. Not a replacement for ``embedders.images``.
    """
    import warnings

    from PIL import ImageOps, UnidentifiedImageError
    if not data:
        raise ValueError("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.size[0] * img.size[1] > max_pixels:
                raise ValueError("decompression_bomb")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError("decompression_bomb") from None
    except UnidentifiedImageError:
        raise ValueError("not_an_image") from None
    except (OSError, SyntaxError, EOFError):
        raise ValueError("corrupt_image") from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, WHITE)
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64) / 65535.0 * 255.0
        return Image.fromarray(np.rint(arr).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def write_image_corpus_catalog(out_dir: str, cap: int = DEFAULT_CAP) -> tuple[str, dict[str, ImageCase]]:
    """A products Parquet with one row per image case (``product_id`` = ``img_<name>``, a title so every row
    still embeds from text). Returns (path, {product_id: case}). Every product is embedded; for a case whose
    ``catalog_expect`` is an error class the expected dead letter is ``(product_id, "image", case.catalog_expect)``
    and the product is embedded from text only; ``"missing"`` means text only and no dead letter."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    cases = image_cases(cap)
    ids = [f"img_{c.name}" for c in cases]
    table = pa.table({"product_id": pa.array(ids, pa.string()),
                      "title": pa.array([f"Corpus item {c.name.replace('_', ' ')}" for c in cases], pa.string()),
                      "image": pa.array([c.data for c in cases], pa.binary())})
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "image_corpus.parquet")
    pq.write_table(table, path, row_group_size=8)
    return path, dict(zip(ids, cases))


# --------------------------------------------------------------------------------------------------------------------
# catalog-level bad inputs
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CatalogCase:
    name: str
    path: str
    expect: str                     # "ok" or "user_error"
    column: str | None = None       # the column a user_error message must name
    ids: tuple[str, ...] | None = None  # product ids (as strings) the pipeline must produce, for "ok"
    note: str = ""
    extra: dict = field(default_factory=dict)


def _small_jpeg(colour=(200, 30, 40)) -> bytes:
    return _save(Image.new("RGB", (32, 32), colour), "JPEG", quality=90)


def _write(table, out_dir: str, fname: str) -> str:
    import pyarrow.parquet as pq
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, fname)
    pq.write_table(table, path)
    return path


def write_products_missing_product_id(out_dir: str) -> CatalogCase:
    import pyarrow as pa
    t = pa.table({"sku": pa.array(["A1", "A2"]), "title": pa.array(["Red mug", "Blue mug"]),
                  "image": pa.array([_small_jpeg(), _small_jpeg((0, 0, 200))], pa.binary())})
    return CatalogCase("products_missing_product_id", _write(t, out_dir, "missing_product_id.parquet"),
                       "user_error", "product_id", note="no product_id column (an 'sku' column instead)")


def write_products_float_product_id(out_dir: str) -> CatalogCase:
    import pyarrow as pa
    t = pa.table({"product_id": pa.array([1.0, 2.0, 3.5], pa.float64()),
                  "title": pa.array(["Red mug", "Blue mug", "Green mug"])})
    return CatalogCase("products_float_product_id", _write(t, out_dir, "float_product_id.parquet"),
                       "user_error", "product_id", note="product_id is float64: expected string or integer")


def write_products_list_product_id(out_dir: str) -> CatalogCase:
    import pyarrow as pa
    t = pa.table({"product_id": pa.array([["A1"], ["A2", "A3"]], pa.list_(pa.string())),
                  "title": pa.array(["Red mug", "Blue mug"])})
    return CatalogCase("products_list_product_id", _write(t, out_dir, "list_product_id.parquet"),
                       "user_error", "product_id", note="product_id is list<string>: expected string or integer")


def write_products_image_as_string(out_dir: str) -> CatalogCase:
    import base64

    import pyarrow as pa
    t = pa.table({"product_id": pa.array(["A1", "A2"]), "title": pa.array(["Red mug", "Blue mug"]),
                  "image": pa.array([base64.b64encode(_small_jpeg()).decode(), "/data/images/A2.jpg"], pa.string())})
    return CatalogCase("products_image_as_string", _write(t, out_dir, "image_as_string.parquet"),
                       "user_error", "image",
                       note="image is string (base64 text and a path): expected binary; paths belong in image_uri")


def write_products_int_product_id(out_dir: str) -> CatalogCase:
    import pyarrow as pa
    ids = [7, 42, 9007199254740993]  # the last one is 2**53 + 1: a float round-trip would change it
    t = pa.table({"product_id": pa.array(ids, pa.int64()),
                  "title": pa.array(["Red mug", "Blue mug", "Green mug"]),
                  "image": pa.array([_small_jpeg(), None, _small_jpeg((0, 150, 0))], pa.binary())})
    return CatalogCase("products_int_product_id", _write(t, out_dir, "int_product_id.parquet"), "ok",
                       ids=tuple(str(i) for i in ids),
                       note="integer product_id is valid and kept as its decimal string (never '7.0')")


def write_products_no_content_columns(out_dir: str) -> CatalogCase:
    import pyarrow as pa
    t = pa.table({"product_id": pa.array(["A1", "A2"]), "category": pa.array(["mugs", "mugs"]),
                  "price": pa.array([9.99, 12.5])})
    return CatalogCase("products_no_content_columns", _write(t, out_dir, "no_content_columns.parquet"),
                       "user_error", "title",
                       note="none of title/description/image/image_uri: the message names them (checked by 'title')")


def write_products_text_only_columns(out_dir: str) -> CatalogCase:
    import pyarrow as pa
    t = pa.table({"product_id": pa.array(["T1", "T2"]), "title": pa.array(["Café crème mug ☕", "Ｔｅａ cup"])})
    return CatalogCase("products_text_only_columns", _write(t, out_dir, "text_only_columns.parquet"), "ok",
                       ids=("T1", "T2"), note="only product_id + title: absent optional columns are a logged note")


def write_products_dir_cross_file_duplicate(out_dir: str) -> CatalogCase:
    """A directory of two files; ``X1`` is in both. Files are read in sorted path order, so ``part-a``'s X1 is kept
    and ``part-b``'s X1 is the ``duplicate_id`` dead letter (even though part-b was written first)."""
    import pyarrow as pa
    d = os.path.join(out_dir, "products_dir")
    _write(pa.table({"product_id": pa.array(["X1", "X3"]), "title": pa.array(["from part-b", "third"])}),
           d, "part-b.parquet")
    _write(pa.table({"product_id": pa.array(["X1", "X2"]), "title": pa.array(["from part-a", "second"])}),
           d, "part-a.parquet")
    return CatalogCase("products_dir_cross_file_duplicate", d, "ok", ids=("X1", "X2", "X3"),
                       extra={"duplicate": ("X1", "dedup", "duplicate_id"), "kept_title": "from part-a"},
                       note="duplicates across files: sorted path order decides which is first")


def write_reviews_flexible_types(out_dir: str) -> CatalogCase:
    """Valid reviews with the loose types the issue allows: float rating, ISO-8601 string created_at, nulls
    everywhere, integer product_id matching :func:`write_products_int_product_id`'s ids."""
    import pyarrow as pa
    t = pa.table({
        "product_id": pa.array([7, 7, 42, 42, None], pa.int64()),
        "text": pa.array(["Great mug, keeps coffee hot", None, "Chipped on arrival", "Nice", "orphan without id"]),
        "rating": pa.array([4.5, None, 1.0, 3.0, 5.0], pa.float64()),
        "helpful_votes": pa.array([3, 0, None, 1, 0], pa.int64()),
        "created_at": pa.array(["2024-05-01T10:00:00Z", "2024-05-02T11:30:00+02:00", None, "2023-12-31", "2024-01-01"],
                               pa.string()),
    })
    return CatalogCase("reviews_flexible_types", _write(t, out_dir, "reviews_flexible.parquet"), "ok",
                       ids=("7", "42"), extra={"null_text": 1, "null_product_id": 1},
                       note="float rating, string timestamps, nullable everything")


def write_reviews_text_wrong_type(out_dir: str) -> CatalogCase:
    import pyarrow as pa
    t = pa.table({"product_id": pa.array(["A1", "A2"]), "text": pa.array([5, 4], pa.int64())})
    return CatalogCase("reviews_text_wrong_type", _write(t, out_dir, "reviews_text_int.parquet"), "user_error",
                       "text", note="review text is int64: expected string")


def write_reviews_missing_product_id(out_dir: str) -> CatalogCase:
    import pyarrow as pa
    t = pa.table({"item": pa.array(["A1"]), "text": pa.array(["ok"])})
    return CatalogCase("reviews_missing_product_id", _write(t, out_dir, "reviews_no_product_id.parquet"),
                       "user_error", "product_id", note="reviews without product_id")


def missing_products_path(out_dir: str) -> CatalogCase:
    return CatalogCase("products_missing_file", os.path.join(out_dir, "does_not_exist.parquet"), "user_error",
                       None, note="no such file: exit 2, one line naming the path")


def catalog_cases(out_dir: str) -> list[CatalogCase]:
    """Write every catalog case under ``out_dir`` and return them."""
    return [write_products_missing_product_id(out_dir), write_products_float_product_id(out_dir),
            write_products_list_product_id(out_dir), write_products_image_as_string(out_dir),
            write_products_int_product_id(out_dir), write_products_no_content_columns(out_dir),
            write_products_text_only_columns(out_dir), write_products_dir_cross_file_duplicate(out_dir),
            write_reviews_flexible_types(out_dir), write_reviews_text_wrong_type(out_dir),
            write_reviews_missing_product_id(out_dir), missing_products_path(out_dir)]
