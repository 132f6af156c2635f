"""Text preparation: Unicode normalisation, whitespace collapsing, empty -> missing modality."""
from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, Iterable

_WS = re.compile(r"\s+")


def clean_text(value: Any, form: str = "NFKC") -> str | None:
    """Normalised text, or ``None`` when the value is null/NaN/empty/whitespace only."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    s = unicodedata.normalize(form, str(value))
    s = "".join(ch for ch in s if unicodedata.category(ch) not in ("Cc", "Cf") or ch in "\t\n")
    s = _WS.sub(" ", s).strip()
    return s or None


def product_text(parts: Iterable[Any], separator: str = ". ", form: str = "NFKC") -> str | None:
    """Join the product's text fields (title, description, ...) in order; ``None`` if all are missing.

    Over-long text is truncated by the tokenizer at the model's context length (title first, so it survives).
    """
    cleaned = [c for c in (clean_text(p, form) for p in parts) if c]
    return separator.join(cleaned) if cleaned else None
