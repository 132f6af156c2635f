"""One metadata-filter grammar for the CLI, HTTP query strings and JSON bodies.

String form (``--filter`` on the CLI, repeated ``filter=`` in HTTP query strings)::

    field=value          equality
    field=v1,v2,v3       set membership (a literal comma: ``\\,`` or double quotes around the item)
    field<x  field<=x    numeric (or date/time) ranges
    field>x  field>=x

JSON form (HTTP bodies, Python callers)::

    {"category": "Shoes", "brand": ["Nike", "Puma"], "price": {"ge": 100, "lt": 2000}}

Several conditions are AND-ed (also two conditions on the same field). A row whose value is null never matches.
Values are coerced to the column's type when evaluated: numbers for numeric columns, ``true/false`` for booleans,
ISO strings for dates/timestamps; strings compare exactly (case-sensitive). Every mistake raises
:class:`FilterError` (a :class:`embedders.errors.UserError`, so exit code 2 on the CLI) naming the field.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedders.errors import UserError

RANGE_OPS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_SYMBOL_TO_OP = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "=": "in"}
_CONDITION_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*(<=|>=|<|>|=)(.*)$", re.S)
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


class FilterError(UserError, ValueError):
    """A filter that cannot be parsed or applied; the message names the field."""


@dataclass(frozen=True)
class Condition:
    field: str
    op: str                  # "in" (equality / membership) or one of RANGE_OPS
    value: Any               # tuple of values for "in", a scalar for ranges

    def __str__(self) -> str:
        if self.op == "in":
            return f"{self.field}=" + ",".join(_quote(v) for v in self.value)
        return f"{self.field}{RANGE_OPS[self.op]}{self.value}"

    def to_json(self) -> Any:
        if self.op == "in":
            return self.value[0] if len(self.value) == 1 else list(self.value)
        return {self.op: self.value}


def _quote(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s.replace("\\", "\\\\").replace(",", "\\,")


@dataclass(frozen=True)
class Filter:
    """A conjunction of :class:`Condition` s."""

    conditions: tuple[Condition, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def __str__(self) -> str:
        return " AND ".join(str(c) for c in self.conditions)

    @property
    def key(self) -> str:
        """Canonical, hashable description (used to cache masks)."""
        return json.dumps([[c.field, c.op, list(c.value) if c.op == "in" else c.value] for c in self.conditions],
                          sort_keys=True, default=str)

    @property
    def fields(self) -> list[str]:
        return sorted({c.field for c in self.conditions})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in self.conditions:
            v = c.to_json()
            if c.field in out and isinstance(out[c.field], dict) and isinstance(v, dict):
                out[c.field].update(v)
            else:
                out[c.field] = v
        return out

    def mask(self, table: pa.Table) -> np.ndarray:
        return evaluate(self, table)


# --------------------------------------------------------------------------------------------------------- parsing
def _split_values(text: str, field: str) -> list[str]:
    """Split ``v1,v2`` honouring ``\\,`` escapes and double-quoted items."""
    items: list[str] = []
    cur: list[str] = []
    quoted = False
    was_quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
            was_quoted = True
        elif ch == "," and not quoted:
            items.append(("".join(cur), was_quoted))  # type: ignore[arg-type]
            cur, was_quoted = [], False
        else:
            cur.append(ch)
        i += 1
    if quoted:
        raise FilterError(f"filter on '{field}': unbalanced double quote in {text!r}")
    items.append(("".join(cur), was_quoted))  # type: ignore[arg-type]
    out = []
    for item, q in items:  # type: ignore[misc]
        value = item if q else item.strip()
        if value == "" and not q:
            raise FilterError(f"filter on '{field}': empty value in {field}={text!r}; write field=value or field=v1,v2")
        out.append(value)
    return out


def parse_condition(text: str) -> Condition:
    """Parse one string condition: ``field=value``, ``field=v1,v2``, ``field<x``, ``<=``, ``>``, ``>=``."""
    if not isinstance(text, str):
        raise FilterError(f"filter {text!r}: expected a string like 'category=Shoes' or 'price<2000'")
    m = _CONDITION_RE.match(text)
    if not m:
        raise FilterError(f"filter {text!r}: expected field=value, field=v1,v2, field<x, field<=x, field>x or "
                          f"field>=x (field names: letters, digits, _ . -)")
    field, symbol, raw = m.group(1), m.group(2), m.group(3)
    if symbol == "=":
        return Condition(field, "in", tuple(_split_values(raw, field)))
    value = raw.strip()
    if not value:
        raise FilterError(f"filter on '{field}': missing value after '{symbol}' in {text!r}")
    return Condition(field, _SYMBOL_TO_OP[symbol], value)


def _json_conditions(field: str, spec: Any) -> list[Condition]:
    if not isinstance(field, str) or not field:
        raise FilterError(f"filter field {field!r}: field names must be non-empty strings")
    if isinstance(spec, Mapping):
        if not spec:
            raise FilterError(f"filter on '{field}': empty range object; use {{\"lt\"|\"le\"|\"gt\"|\"ge\": x}}")
        out = []
        for op, v in spec.items():
            if op not in RANGE_OPS:
                raise FilterError(f"filter on '{field}': unknown operator {op!r}; use lt, le, gt or ge")
            if isinstance(v, (list, dict)) or v is None:
                raise FilterError(f"filter on '{field}': operator {op!r} needs a single number or date, got {v!r}")
            out.append(Condition(field, op, v))
        return out
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise FilterError(f"filter on '{field}': empty value list")
        for v in spec:
            if isinstance(v, (list, dict)) or v is None:
                raise FilterError(f"filter on '{field}': list items must be scalars, got {v!r}")
        return [Condition(field, "in", tuple(spec))]
    if spec is None:
        raise FilterError(f"filter on '{field}': null is not a filter value")
    return [Condition(field, "in", (spec,))]


def parse_filters(spec: Any) -> Filter:
    """Normalise any accepted filter spec into a :class:`Filter`.

    Accepts ``None``, a :class:`Filter`, a condition string, a JSON-object string (``'{"price": {"lt": 5}}'``),
    a mapping (the JSON form), or an iterable of those (AND-ed).
    """
    if spec is None:
        return Filter()
    if isinstance(spec, Filter):
        return spec
    if isinstance(spec, Condition):
        return Filter((spec,))
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("{"):
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise FilterError(f"filter {spec!r}: invalid JSON ({e.msg})") from None
            return parse_filters(obj)
        return Filter((parse_condition(spec),))
    if isinstance(spec, Mapping):
        conds: list[Condition] = []
        for field, v in spec.items():
            conds.extend(_json_conditions(field, v))
        return Filter(tuple(conds))
    if isinstance(spec, Iterable):
        conds = []
        for item in spec:
            conds.extend(parse_filters(item).conditions)
        return Filter(tuple(conds))
    raise FilterError(f"filter {spec!r}: expected a string, a list of strings or a JSON object")


# ------------------------------------------------------------------------------------------------------ evaluation
def _numeric(field: str, v: Any) -> float:
    if isinstance(v, bool):
        raise FilterError(f"filter on '{field}': {v!r} is not a number")
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise FilterError(f"filter on '{field}': {v!r} is not a number ('{field}' is numeric)") from None
    if np.isnan(out):
        raise FilterError(f"filter on '{field}': NaN is not a filter value")
    return out


def _boolean(field: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise FilterError(f"filter on '{field}': {v!r} is not a boolean (use true or false)")


def _temporal(field: str, typ: pa.DataType, v: Any) -> pa.Scalar:
    try:
        return pa.array([str(v)]).cast(typ)[0]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise FilterError(f"filter on '{field}': {v!r} is not a valid {typ} "
                          f"(use ISO format, e.g. 2024-05-01)") from None


def _column(table: pa.Table, field: str) -> pa.ChunkedArray:
    if field not in table.column_names:
        names = [c for c in table.column_names]
        shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
        raise FilterError(f"unknown filter field '{field}'; available: {shown}")
    col = table.column(field)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col


def _condition_mask(table: pa.Table, c: Condition) -> pa.ChunkedArray:
    col = _column(table, c.field)
    typ = col.type
    is_num = pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ)
    is_str = pa.types.is_string(typ) or pa.types.is_large_string(typ)
    is_time = pa.types.is_temporal(typ)
    if c.op == "in":
        if is_num:
            values = pa.array([_numeric(c.field, v) for v in c.value], type=pa.float64())
            return pc.is_in(col.cast(pa.float64()), value_set=values)
        if is_str:
            values = pa.array([v if isinstance(v, str) else json.dumps(v) for v in c.value], type=pa.string())
            return pc.is_in(col.cast(pa.string()), value_set=values)
        if pa.types.is_boolean(typ):
            values = pa.array([_boolean(c.field, v) for v in c.value], type=pa.bool_())
            return pc.is_in(col, value_set=values)
        if is_time:
            values = pa.array([_temporal(c.field, typ, v) for v in c.value], type=typ)
            return pc.is_in(col, value_set=values)
        raise FilterError(f"filter on '{c.field}': column type {typ} cannot be filtered")
    fn = {"lt": pc.less, "le": pc.less_equal, "gt": pc.greater, "ge": pc.greater_equal}[c.op]
    if is_num:
        return fn(col.cast(pa.float64()), pa.scalar(_numeric(c.field, c.value), type=pa.float64()))
    if is_time:
        return fn(col, _temporal(c.field, typ, c.value))
    raise FilterError(f"filter on '{c.field}': '{RANGE_OPS[c.op]}' needs a numeric or date column, but "
                      f"'{c.field}' is {typ}; use {c.field}=value or {c.field}=v1,v2")


def evaluate(spec: Any, table: pa.Table) -> np.ndarray:
    """Boolean mask (numpy, one entry per row of ``table``) of the rows matching every condition of ``spec``."""
    flt = parse_filters(spec)
    n = table.num_rows
    mask = np.ones(n, dtype=bool)
    for c in flt.conditions:
        m = _condition_mask(table, c)
        m = pc.fill_null(m, False)
        mask &= np.asarray(m.to_numpy(zero_copy_only=False), dtype=bool)
    return mask


def validate(spec: Any, table_or_schema: pa.Table | pa.Schema) -> Filter:
    """Parse ``spec`` and check its fields exist and its values fit the column types (without a full scan)."""
    flt = parse_filters(spec)
    table = table_or_schema if isinstance(table_or_schema, pa.Table) else table_or_schema.empty_table()
    evaluate(flt, table.slice(0, 0))
    return flt
