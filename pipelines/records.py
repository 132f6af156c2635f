"""Record normalisation shared by the embed pipeline and the incremental planner (no Beam import: cheap)."""
from __future__ import annotations

import datetime as _dt
import math
from typing import Any


def norm_id(value: Any) -> str | None:
    """product_id as a string: integers kept exact (``7`` -> ``"7"``), strings stripped; null/empty/bool -> None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    s = str(value).strip()
    return s or None


def num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def ts_seconds(value: Any) -> float | None:
    """created_at as epoch seconds: timestamps, dates or ISO-8601 strings; anything unparsable -> None."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, _dt.date):
        return _dt.datetime(value.year, value.month, value.day, tzinfo=_dt.timezone.utc).timestamp()
    if isinstance(value, str):
        try:
            return ts_seconds(_dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
        except ValueError:
            return None
    return None
