"""Safe image decoding: bytes -> RGB ``PIL.Image`` or a :class:`RecordError` with a reason.

- decompression bombs: the header's declared size is checked *before* any pixel is decoded (``max_pixels``);
- ``max_bytes`` caps the encoded size;
- EXIF orientation is applied;
- every PIL mode becomes RGB correctly: palette (with transparency), RGBA/LA/PA composited on white, CMYK,
  16-bit and 32-bit grey rescaled to 8 bits (not clipped), 1-bit, YCbCr/LAB/HSV;
- truncated/corrupt/non-image bytes raise ``RecordError`` (``corrupt_image``, ``not_an_image``, ``empty_image``).
- JPEGs larger than needed are decoded with DCT scaling (``draft``) to at least ``target_size`` on each side:
  much faster and never below the model's input resolution.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RecordError

WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 40_000_000
    max_bytes: int = 20_000_000

    @classmethod
    def from_dict(cls, d: dict) -> "ImageLimits":
        return cls(**{k: int(v) for k, v in d.items() if k in ("max_pixels", "max_bytes")})


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    bg = Image.new("RGB", rgba.size, WHITE)
    bg.paste(rgba, mask=rgba.getchannel("A"))
    return bg


def _high_bit_grey_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr, dtype=np.float64) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
    else:
        # 16-bit data (I;16*, or I holding 16-bit values) maps 0..65535 -> 0..255; wider data by its own max.
        hi = float(arr.max()) if arr.size else 0.0
        full = 65535.0 if hi <= 65535 else hi
        scaled = arr.astype(np.float64) / full * 255.0
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    return grey.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(img)
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bit_grey_to_rgb(img)
    # 1, L, CMYK, YCbCr, LAB, HSV, RGBX ...
    return img.convert("RGB")


def declared_size(data: bytes) -> tuple[int, int]:
    """Width/height from the header only (no pixel decoded)."""
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def decode_image(data: bytes | None, limits: ImageLimits = ImageLimits(), target_size: int | None = None) -> Image.Image:
    """Decode ``data`` into an RGB image, applying EXIF orientation. Raises :class:`RecordError` on bad input."""
    if data is None or len(data) == 0:
        raise RecordError("empty_image", "image bytes are empty")
    if len(data) > limits.max_bytes:
        raise RecordError("image_too_large", f"encoded image is {len(data)} bytes > max_bytes {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise RecordError("decompression_bomb",
                                  f"declared size {w}x{h} = {w * h} pixels > max_pixels {limits.max_pixels}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if img.format == "JPEG" and target_size:
                img.draft("RGB", (target_size, target_size))
            img.load()
    except RecordError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RecordError("decompression_bomb", str(e)[:200]) from None
    except UnidentifiedImageError:
        raise RecordError("not_an_image", "bytes are not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt streams
        raise RecordError("corrupt_image", f"{type(e).__name__}: {str(e)[:160]}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        pass
    try:
        return to_rgb(img)
    except (OSError, ValueError) as e:
        raise RecordError("unsupported_image_mode", f"mode {img.mode}: {str(e)[:160]}") from None
