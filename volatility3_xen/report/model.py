"""The rows every ``xen.*`` plugin prints, whatever the file: facts and vCPU tables.

No Volatility import.  Versioning (``REPORT_VERSION``, semantic): a new group, fact, or
column is a minor change; renaming or removing one, or changing a value's type, is a
major change.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass
from typing import Union

from ..formats.errors import printable

REPORT_VERSION = (1, 0, 0)

# Fact groups, in the order ``core_facts`` emits them.
GROUP_FILE = "file"
GROUP_GUEST = "guest"
GROUP_FORMAT = "format"
GROUP_XEN = "xen"
GROUP_NOTES = "notes"
GROUP_SECTIONS = "sections"
GROUP_TABLE = "table"
GROUP_SHARED_INFO = "shared_info"
GROUP_WARNINGS = "warnings"


class Absent(enum.Enum):
    """Why a cell has no value (plugins map these to Volatility's absent values)."""

    NOT_APPLICABLE = "not applicable"  # the field does not exist for this guest kind
    NOT_FOUND = "not found"  # the value points at something the core does not hold


FactValue = Union[int, str, bool, None]
Cell = Union[int, str, bool, Absent]


@dataclass(frozen=True)
class Fact:
    """One line of ``xen.info``.

    ``value`` is typed (int, str, bool; None when the file lacks it); ``hex`` says an int
    is best read in hex (addresses, magics); ``hint`` is a short note for the analyst:
    where the value comes from, or why it may mislead.
    """

    group: str
    field: str
    value: FactValue
    hint: str = ""
    hex: bool = False

    @property
    def text(self) -> str:
        """The value as ``xen.info`` prints it."""
        value = self.value
        if value is None:
            return "absent"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, int) and self.hex:
            return f"{value:#x}"
        return printable(str(value))


def utc_text(seconds: int | None) -> str:
    if seconds is None:
        return ""
    try:
        moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "out of range"
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC at guest system time 0"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # unreachable


KIND_INT, KIND_HEX, KIND_BOOL, KIND_STR = "int", "hex", "bool", "str"


@dataclass(frozen=True)
class Column:
    """A column of ``vcpu_table``: its title and how its values should be shown."""

    name: str
    kind: str  # KIND_INT, KIND_HEX, KIND_BOOL or KIND_STR


@dataclass(frozen=True)
class VcpuTable:
    """One row per stored ``.xen_prstatus`` slot; the columns depend on the layout.

    ``FileSlot`` k is the k-th context stored in the file, not necessarily vCPU id k:
    Xen stores only initialised vCPUs, packed without gaps.
    """

    layout: str | None
    columns: tuple[Column, ...]
    rows: tuple[tuple[Cell, ...], ...]

    def as_dicts(self) -> list[dict[str, Cell]]:
        names = [column.name for column in self.columns]
        return [dict(zip(names, row)) for row in self.rows]


COLUMN_SLOT = "FileSlot"
COLUMN_DTB_MACHINE = "DTB(M)"
COLUMN_DTB_PHYSICAL = "DTB(P)"
