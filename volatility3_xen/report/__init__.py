"""What a Xen memory file says, as rows: the data behind ``xen.info`` and ``xen.vcpus``.

The plugins only render what this package returns; every decision about what a field
means lives here, next to the parsers, so that scripts get the same answers::

    from volatility3_xen.formats.dumpcore import XenDumpCore
    from volatility3_xen import report

    core = XenDumpCore.open("guest.core")
    for fact in report.facts(core):
        print(fact.group, fact.field, fact.text, fact.hint)
    table = report.vcpu_table(core, all_registers=False)
    print([c.name for c in table.columns], table.rows)

No Volatility import.  ``facts(image)`` works on any ``formats.image.GuestMemoryImage``:
each source format registers the function that lists its facts (``register_facts``).

- ``model``: Fact, Absent, Column, VcpuTable and the group/column names;
- ``dumpcore``: the facts of an ``xl dump-core`` file;
- ``saveimage``: the facts of a saved domain (``xl save``, libxl/libxc streams, xenopsd);
- ``vcputable``: the ``xen.vcpus`` table (any image).
"""

from __future__ import annotations

from typing import Callable

from ..formats.dumpcore import XenDumpCore
from ..formats.image import GuestMemoryImage
from ..formats.inguest import InGuestPVImage
from ..formats.saveimage import XenSaveImage
from .dumpcore import core_facts, decoded_shared_info, section_rows, vcpu_layout, vcpus
from .inguest import inguest_facts
from .model import (
    COLUMN_DTB_MACHINE,
    COLUMN_DTB_PHYSICAL,
    COLUMN_SLOT,
    GROUP_FILE,
    GROUP_FORMAT,
    GROUP_GUEST,
    GROUP_NOTES,
    GROUP_SECTIONS,
    GROUP_SHARED_INFO,
    GROUP_TABLE,
    GROUP_WARNINGS,
    GROUP_XEN,
    KIND_BOOL,
    KIND_HEX,
    KIND_INT,
    KIND_STR,
    REPORT_VERSION,
    Absent,
    Cell,
    Column,
    Fact,
    FactValue,
    VcpuTable,
)
from .saveimage import (
    GROUP_CONFIG,
    GROUP_HVM,
    GROUP_PAGES,
    GROUP_RECORDS,
    GROUP_WRAPPERS,
    GROUP_XENOPS,
    save_facts,
)
from .vcputable import COLUMN_VCPU, vcpu_rows, vcpu_table

FactSource = Callable[[GuestMemoryImage], "list[Fact]"]
_FACT_SOURCES: dict[type, FactSource] = {XenDumpCore: core_facts}


def register_facts(image_type: type, source: FactSource) -> None:
    """Make ``facts()`` use ``source`` for images of ``image_type`` (and subclasses)."""
    _FACT_SOURCES[image_type] = source


register_facts(XenSaveImage, save_facts)
register_facts(InGuestPVImage, inguest_facts)


def facts(image: GuestMemoryImage) -> list[Fact]:
    """Everything ``xen.info`` shows for ``image``, group by group."""
    for klass in type(image).__mro__:
        source = _FACT_SOURCES.get(klass)
        if source is not None:
            return source(image)
    raise TypeError(f"no xen.info facts are defined for {type(image).__name__}")


__all__ = [
    "COLUMN_DTB_MACHINE",
    "COLUMN_DTB_PHYSICAL",
    "COLUMN_SLOT",
    "COLUMN_VCPU",
    "GROUP_CONFIG",
    "GROUP_FILE",
    "GROUP_FORMAT",
    "GROUP_GUEST",
    "GROUP_HVM",
    "GROUP_NOTES",
    "GROUP_PAGES",
    "GROUP_RECORDS",
    "GROUP_SECTIONS",
    "GROUP_SHARED_INFO",
    "GROUP_TABLE",
    "GROUP_WARNINGS",
    "GROUP_WRAPPERS",
    "GROUP_XEN",
    "GROUP_XENOPS",
    "KIND_BOOL",
    "KIND_HEX",
    "KIND_INT",
    "KIND_STR",
    "REPORT_VERSION",
    "Absent",
    "Cell",
    "Column",
    "Fact",
    "FactValue",
    "VcpuTable",
    "core_facts",
    "decoded_shared_info",
    "facts",
    "register_facts",
    "save_facts",
    "section_rows",
    "vcpu_layout",
    "vcpu_rows",
    "vcpu_table",
    "vcpus",
]
