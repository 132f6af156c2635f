"""Sanity checks for the bad-input corpus (``tests/corpus.py``): every item has the properties it claims."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError, features

from tests import corpus
from tests.corpus import DEFAULT_CAP, ORIENTATION_TAG

CASES = {c.name: c for c in corpus.image_cases()}


def _open(name: str) -> Image.Image:
    return Image.open(io.BytesIO(CASES[name].data))


def test_corpus_covers_issue_cases():
    want = {"palette_png", "palette_transparent_png", "rgba_png", "la_png", "cmyk_jpeg", "grey16_png", "bilevel_png",
            "exif_orientation_6_jpeg", "exif_orientation_8_jpeg", "tiny_1x1_png", "extreme_aspect_2000x60_jpeg",
            "animated_gif", "truncated_jpeg", "random_bytes", "empty_bytes", "decompression_bomb_png"}
    if features.check("webp"):
        want.add("webp_rgba")
    assert want <= set(CASES)
    assert len(CASES) == len(corpus.image_cases())  # unique names
    for c in CASES.values():
        assert c.expect == "ok" or c.expect in ("corrupt_image", "not_an_image", "empty_image", "decompression_bomb")
        if c.expect == "ok":
            assert c.size and c.probes, c.name


def test_deterministic():
    again = {c.name: c.data for c in corpus.image_cases()}
    assert again == {n: c.data for n, c in CASES.items()}


@pytest.mark.parametrize("name,fmt,mode", [
    ("palette_png", "PNG", "P"), ("palette_transparent_png", "PNG", "P"), ("rgba_png", "PNG", "RGBA"),
    ("la_png", "PNG", "LA"), ("cmyk_jpeg", "JPEG", "CMYK"), ("grey16_png", "PNG", "I;16"), ("bilevel_png", "PNG", "1"),
    ("grey_jpeg", "JPEG", "L"), ("exif_orientation_6_jpeg", "JPEG", "RGB"), ("tiny_1x1_png", "PNG", "RGB"),
    ("extreme_aspect_2000x60_jpeg", "JPEG", "RGB"), ("animated_gif", "GIF", "P"),
])
def test_format_and_mode(name, fmt, mode):
    img = _open(name)
    assert (img.format, img.mode) == (fmt, mode)


def test_palette_transparency_is_a_trap():
    img = _open("palette_transparent_png")
    assert img.info.get("transparency") == 0
    assert img.convert("RGB").getpixel((5, 10)) == (0, 255, 0)  # naive conversion shows green, not white
    assert "transparency" not in _open("palette_png").info


def test_rgba_and_la_have_transparent_pixels_with_loud_colour():
    rgba = _open("rgba_png")
    assert rgba.getpixel((5, 10)) == (255, 0, 0, 0)
    assert rgba.convert("RGB").getpixel((5, 10)) == (255, 0, 0)  # what compositing on white must avoid
    assert _open("la_png").getpixel((5, 10)) == (0, 0)


def test_grey16_values_and_clipping_trap():
    img = _open("grey16_png")
    assert img.getpixel((5, 10)) == 16384 and img.getpixel((35, 10)) == 49152
    assert img.convert("RGB").getpixel((5, 10)) == (255, 255, 255)  # naive conversion clips to white


def test_exif_orientation_tags():
    for o in (6, 8):
        img = _open(f"exif_orientation_{o}_jpeg")
        assert img.getexif().get(ORIENTATION_TAG) == o
        assert img.size == (120, 60)  # stored landscape
        assert ImageOps.exif_transpose(img).size == (60, 120)  # displayed portrait
    with pytest.raises(ValueError):
        corpus.exif_rotated_jpeg(3)


def test_gif_has_two_frames_first_red():
    img = _open("animated_gif")
    assert img.n_frames == 2
    assert img.convert("RGB").getpixel((1, 1)) == (255, 0, 0)
    img.seek(1)
    assert img.convert("RGB").getpixel((1, 1)) == (0, 0, 255)


def test_webp_when_supported():
    c = corpus.webp_rgba()
    if not features.check("webp"):
        assert c is None
        pytest.skip("PIL without WebP")
    img = Image.open(io.BytesIO(c.data))
    assert (img.format, img.mode) == ("WEBP", "RGBA")


def test_tiny_and_extreme_sizes():
    assert _open("tiny_1x1_png").size == (1, 1)
    assert _open("extreme_aspect_2000x60_jpeg").size == (2000, 60)


def test_truncated_images_fail_on_load_not_open():
    for name, magic in (("truncated_jpeg", b"\xff\xd8"), ("truncated_png", b"\x89PNG")):
        data = CASES[name].data
        assert data.startswith(magic) and len(data) > 1000
        img = Image.open(io.BytesIO(data))  # header parses
        with pytest.raises((OSError, SyntaxError)):
            img.load()
    assert not CASES["truncated_jpeg"].data.endswith(b"\xff\xd9")


def test_random_and_empty_bytes():
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(CASES["random_bytes"].data))
    assert CASES["empty_bytes"].data == b""
    assert CASES["empty_bytes"].catalog_expect == "missing" and CASES["random_bytes"].catalog_expect == "not_an_image"


def test_bombs_declare_more_than_the_cap_and_are_small():
    c = CASES["decompression_bomb_png"]
    assert c.max_pixels == DEFAULT_CAP
    img = Image.open(io.BytesIO(c.data))  # reads the header only
    w, h = img.size
    assert w * h > c.max_pixels and w * h < Image.MAX_IMAGE_PIXELS  # the project's cap must catch it, not PIL
    assert len(c.data) < 8_000
    big = CASES["decompression_bomb_beyond_pil_png"]
    assert len(big.data) < 64_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(big.data))
    small_cap = corpus.bomb_png(cap=1_000_000)
    assert np.prod(Image.open(io.BytesIO(small_cap.data)).size) > 1_000_000


def test_bomb_png_is_a_valid_png():
    data = corpus.bomb_png_bytes(300, 17)
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size == (300, 17) and img.getextrema() == (0, 0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_decoder_agrees_with_expectations(name):
    """Self-consistency: the probes, sizes and error classes hold for a straightforward correct decoder."""
    c = CASES[name]
    cap = c.max_pixels or DEFAULT_CAP
    if c.expect != "ok":
        with pytest.raises(ValueError, match=f"^{c.expect}$"):
            corpus.reference_decode(c.data, cap)
        return
    img = corpus.reference_decode(c.data, cap)
    assert img.mode == "RGB" and img.size == c.size
    for xy, rgb in c.probes:
        got = img.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, rgb)) <= c.tol, (xy, got, rgb)


@pytest.mark.parametrize("name", sorted(CASES))
def test_embedders_decode_matches_corpus(name):
    """Cross-check with the real decoder (``embedders.images``) when it is importable."""
    images = pytest.importorskip("embedders.images")
    from embedders.errors import RecordError
    c = CASES[name]
    limits = images.ImageLimits(max_pixels=c.max_pixels or DEFAULT_CAP)
    if c.expect != "ok":
        with pytest.raises(RecordError) as ei:
            images.decode_image(c.data, limits)
        assert ei.value.error == c.expect
        return
    img = images.decode_image(c.data, limits)
    assert img.mode == "RGB" and img.size == c.size
    for xy, rgb in c.probes:
        got = img.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, rgb)) <= c.tol, (xy, got, rgb)


def test_image_corpus_catalog(tmp_path):
    path, by_id = corpus.write_image_corpus_catalog(str(tmp_path))
    t = pq.read_table(path)
    assert t.column("product_id").to_pylist() == list(by_id)
    assert t.schema.field("image").type == pa.binary()
    assert [len(b) for b in t.column("image").to_pylist()] == [len(c.data) for c in by_id.values()]
    assert all(title for title in t.column("title").to_pylist())


# ------------------------------------------------------------------------------------------------ catalog cases

def test_catalog_cases_have_the_claimed_types(tmp_path):
    cases = {c.name: c for c in corpus.catalog_cases(str(tmp_path))}
    schema = {n: (pq.read_schema(c.path) if os.path.isfile(c.path) else None) for n, c in cases.items()}

    assert "product_id" not in schema["products_missing_product_id"].names
    assert pa.types.is_floating(schema["products_float_product_id"].field("product_id").type)
    assert pa.types.is_list(schema["products_list_product_id"].field("product_id").type)
    assert pa.types.is_string(schema["products_image_as_string"].field("image").type)
    assert pa.types.is_integer(schema["products_int_product_id"].field("product_id").type)
    assert cases["products_int_product_id"].ids == ("7", "42", "9007199254740993")
    assert pq.read_table(cases["products_int_product_id"].path).column("product_id").to_pylist()[2] == 2 ** 53 + 1
    assert not {"title", "description", "image", "image_uri"} & set(schema["products_no_content_columns"].names)
    assert schema["products_text_only_columns"].names == ["product_id", "title"]
    assert pa.types.is_integer(schema["reviews_text_wrong_type"].field("text").type)
    assert "product_id" not in schema["reviews_missing_product_id"].names
    assert not os.path.exists(cases["products_missing_file"].path)

    rv = pq.read_table(cases["reviews_flexible_types"].path)
    assert pa.types.is_floating(rv.schema.field("rating").type)
    assert pa.types.is_string(rv.schema.field("created_at").type)
    assert rv.column("text").null_count == 1 and rv.column("product_id").null_count == 1

    d = cases["products_dir_cross_file_duplicate"]
    files = sorted(os.listdir(d.path))
    assert files == ["part-a.parquet", "part-b.parquet"]
    first = pq.read_table(os.path.join(d.path, files[0]))
    assert first.column("title").to_pylist()[0] == d.extra["kept_title"]
    all_ids = [i for f in files for i in pq.read_table(os.path.join(d.path, f)).column("product_id").to_pylist()]
    assert sorted(set(all_ids)) == list(d.ids) and all_ids.count("X1") == 2

    for c in cases.values():
        assert c.expect in ("ok", "user_error")
        if c.expect == "user_error" and c.name != "products_missing_file":
            assert c.column, c.name
