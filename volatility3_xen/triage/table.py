"""TreeGrid values -> plain Python (on the worker) -> typed Arrow columns (on the driver).

A column's *kind* comes from the type the plugin declares for it, so every task of a
plugin gets the same columns whatever its rows hold; values go over the wire as plain
Python (int, str, float, bool, bytes, datetime, None) and become Arrow arrays only when a
batch is written, where all tasks of the batch are typed together.

Typing rules, and why:
- ``int`` -> int64, ``format_hints.Hex``/``Bin`` -> uint64 (kernel addresses are above
  2**63); a batch whose values do not fit takes the other one, and DuckDB reads int64 and
  uint64 files of one table together as HUGEINT.  Values beyond both become text.
- ``datetime`` -> timestamp[us, UTC] (naive values are taken as UTC, as Volatility means).
- ``bytes``/``HexBytes``/``LayerData`` -> binary; ``MultiTypeData`` and ``Disassembly``
  -> the text vol's JSON renderer prints; anything else -> ``str(value)``.
- Absent values (N/A, unreadable, unparsable) -> null, as in vol's JSON output.
"""

from __future__ import annotations

import datetime
from typing import Any

KIND_INT, KIND_UINT, KIND_BOOL, KIND_FLOAT = "int", "uint", "bool", "float"
KIND_STR, KIND_TIME, KIND_BYTES = "str", "datetime", "bytes"
_INT64 = (-(2**63), 2**63 - 1)
_UINT64 = (0, 2**64 - 1)


def kind_of(declared: Any) -> str:
    """The storage kind of a TreeGrid column type."""
    from volatility3.framework import renderers
    from volatility3.framework.renderers import format_hints

    if not isinstance(declared, type):
        return KIND_STR
    if issubclass(declared, bool):
        return KIND_BOOL
    if issubclass(declared, (format_hints.Hex, format_hints.Bin)):
        return KIND_UINT
    if issubclass(declared, int):
        return KIND_INT
    if issubclass(declared, float):
        return KIND_FLOAT
    if issubclass(declared, datetime.datetime):
        return KIND_TIME
    if issubclass(declared, format_hints.MultiTypeData):
        return KIND_STR  # a bytes subclass vol renders as text: test before bytes
    if issubclass(declared, (bytes, bytearray, renderers.LayerData)):
        return KIND_BYTES
    return KIND_STR


def plain(value: Any, kind: str) -> Any:
    """One TreeGrid value as a plain Python value of its column's kind (None if absent)."""
    from volatility3.framework import interfaces, renderers
    from volatility3.framework.renderers import format_hints

    if value is None or isinstance(value, interfaces.renderers.BaseAbsentValue):
        return None
    if kind == KIND_BOOL and isinstance(value, (bool, int)):
        return bool(value)
    if kind in (KIND_INT, KIND_UINT) and isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if kind == KIND_FLOAT and isinstance(value, (int, float)):
        return float(value)
    if kind == KIND_TIME and isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=datetime.timezone.utc)
        return value.astimezone(datetime.timezone.utc)
    if isinstance(value, format_hints.MultiTypeData):
        from volatility3.cli.text_renderer import multitypedata_as_text

        return multitypedata_as_text(value)
    if isinstance(value, renderers.Disassembly):
        from volatility3.cli.text_renderer import display_disassembly

        return display_disassembly(value)
    if kind == KIND_BYTES:
        if isinstance(value, renderers.LayerData):
            from volatility3.cli.text_renderer import LayerDataRenderer

            return bytes(LayerDataRenderer().render_bytes(value)[0])
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
    if isinstance(value, (bytes, bytearray)) and kind == KIND_STR:
        return bytes(value).hex(" ")
    # A value that does not match its declared type (plugins do this): keep it as text.
    return str(value)


def arrow_type(kind: str) -> Any:
    import pyarrow as pa

    return {
        KIND_INT: pa.int64(),
        KIND_UINT: pa.uint64(),
        KIND_BOOL: pa.bool_(),
        KIND_FLOAT: pa.float64(),
        KIND_STR: pa.string(),
        KIND_TIME: pa.timestamp("us", tz="UTC"),
        KIND_BYTES: pa.binary(),
    }.get(kind, pa.string())


def _fits(values: list[int], bounds: tuple[int, int]) -> bool:
    return all(bounds[0] <= v <= bounds[1] for v in values)


def column_array(kind: str, values: list[Any]) -> Any:
    """An Arrow array for one column: the kind's type, or the closest that holds every
    value (text as the last resort, never a lost value)."""
    import pyarrow as pa

    present = [v for v in values if v is not None]
    if kind in (KIND_INT, KIND_UINT) and all(isinstance(v, int) for v in present):
        order = [_UINT64, _INT64] if kind == KIND_UINT else [_INT64, _UINT64]
        for bounds in order:
            if _fits(present, bounds):
                return pa.array(values, pa.uint64() if bounds is _UINT64 else pa.int64())
    elif all(_matches(kind, v) for v in present):
        try:
            return pa.array(values, arrow_type(kind))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
            pass
    return pa.array([None if v is None else _text(v) for v in values], pa.string())


def _matches(kind: str, value: Any) -> bool:
    expected = {
        KIND_BOOL: bool,
        KIND_FLOAT: float,
        KIND_STR: str,
        KIND_TIME: datetime.datetime,
        KIND_BYTES: bytes,
    }.get(kind, object)
    return isinstance(value, expected)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex(" ")
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return str(value)
