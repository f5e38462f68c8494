"""What a dump-core says, as rows: the data behind ``xen.info`` and ``xen.vcpus``.

The plugins only render what this module returns; every decision about what a field
means lives here, next to the parser, so that scripts get the same answers::

    from volatility3_xen.dumpcore import XenDumpCore
    from volatility3_xen import report

    core = XenDumpCore.open("guest.core")
    for fact in report.core_facts(core):
        print(fact.group, fact.field, fact.text, fact.hint)
    table = report.vcpu_table(core, all_registers=False)
    print([c.name for c in table.columns], table.rows)

No Volatility import: the module works on a bare ``XenDumpCore``.

Versioning (``REPORT_VERSION``, semantic): a new group, fact, or column is a minor
change; renaming or removing one, or changing a value's type, is a major change.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..formats import ia64 as ia64_mod
from ..formats import vcpu as vcpu_mod
from ..formats.dumpcore import XenDumpCore
from ..formats.elfcore import Section
from ..formats.errors import printable
from ..formats.notes import NOTE_TYPE_NAMES
from ..formats.sharedinfo import SharedInfo, decode_shared_info
from ..formats.vcpu import LAYOUT_X86_32, LAYOUT_X86_64, VcpuContext
from .model import (
    GROUP_FILE,
    GROUP_FORMAT,
    GROUP_GUEST,
    GROUP_NOTES,
    GROUP_SECTIONS,
    GROUP_SHARED_INFO,
    GROUP_TABLE,
    GROUP_WARNINGS,
    GROUP_XEN,
    Fact,
    FactValue,
    human_size,
    utc_text,
)

EM_386, EM_X86_64 = 3, 62
#: ia64 cores only: the auto-translation, ``.xen_ia64_mapped_regs`` and slot sizes.
GROUP_IA64 = "ia64"

# -- cached per-core decoding ---------------------------------------------------------------


def vcpus(core: XenDumpCore) -> tuple[VcpuContext, ...]:
    """Every stored vCPU context (decoded once per core, by the core)."""
    return core.vcpu_contexts


def vcpu_layout(core: XenDumpCore) -> str | None:
    """The context layout of this core's ``.xen_prstatus`` slots, or None."""
    return core.vcpu_layout


def decoded_shared_info(core: XenDumpCore, layout: str | None = None) -> SharedInfo | None:
    """``.xen_shared_info`` decoded, or None when absent or not decodable.

    The layout follows the guest's width: for PV it is what ``e_machine`` says (EM_386:
    the compat layout).  An HVM core is always EM_X86_64 whatever the guest runs, so the
    x86_64 layout is only a guess there; pass ``layout`` for a 32-bit HVM guest.  ARM has
    no decoder (None).
    """
    data = core.shared_info
    if data is None:
        return None
    if layout is None:
        machine = core.elf.facts.e_machine
        layout = {EM_X86_64: LAYOUT_X86_64, EM_386: LAYOUT_X86_32}.get(machine)
        if layout is None:
            return None
    return decode_shared_info(data, layout, core.elf.facts.byteorder)


# -- xen.info --------------------------------------------------------------------------------


def section_rows(core: XenDumpCore) -> list[Section]:
    """The file's sections in section-header order."""
    return sorted(core.sections.values(), key=lambda section: section.index)


def core_facts(core: XenDumpCore) -> list[Fact]:
    """Everything ``xen.info`` shows, group by group (see the GROUP_* constants).

    Builds the page map if the core has not yet (one bulk read of the table), so that its
    statistics and warnings are included.
    """
    stats = core.page_map.stats  # first: building it may add warnings
    contexts = vcpus(core)
    facts = [
        *_file_facts(core),
        *_guest_facts(core, contexts),
        *_format_facts(core),
        *_xen_facts(core),
        *_note_facts(core),
        *_section_facts(core),
    ]
    memory = stats.valid * core.page_size
    table = GROUP_TABLE
    facts += [
        Fact(table, "section", core.table.name, "PV: pfn + machine frame" if core.is_pv else ""),
        Fact(table, "entries", stats.entries),
        Fact(table, "valid_pages", stats.valid),
        Fact(table, "padding_entries", stats.padding, "~0 entries: zero pages, no pfn"),
        Fact(table, "duplicate_pfns", stats.duplicates),
        Fact(table, "beyond_address_limit", stats.beyond_limit),
        Fact(table, "sorted", stats.sorted),
        Fact(table, "runs", stats.runs, "contiguous pfn ranges"),
        Fact(table, "lowest_pfn", stats.lowest_pfn, hex=True),
        Fact(table, "highest_pfn", stats.highest_pfn, hex=True),
        Fact(table, "memory", memory, f"{human_size(memory)} (valid pages x page size)"),
    ]
    facts += _ia64_facts(core)
    facts += _shared_info_facts(core)
    # Last: everything above may have added warnings to the core.
    facts += [Fact(GROUP_WARNINGS, f"warning_{i}", text) for i, text in enumerate(core.warnings)]
    return facts


def _file_facts(core: XenDumpCore) -> list[Fact]:
    elf = core.elf.facts
    return [
        Fact(GROUP_FILE, "name", core.name),
        Fact(GROUP_FILE, "size", core.file_size, human_size(core.file_size)),
        Fact(GROUP_FILE, "elf_class", f"ELF{elf.elfclass}"),
        Fact(GROUP_FILE, "byte_order", elf.byteorder),
        Fact(GROUP_FILE, "abi_version", elf.e_abiversion),
    ]


def _guest_facts(core: XenDumpCore, contexts: Sequence[VcpuContext]) -> list[Fact]:
    header, elf = core.header, core.elf.facts
    guest = GROUP_GUEST
    stored = len(contexts)
    layout = vcpu_layout(core)
    return [
        Fact(guest, "type", header.guest_type, _guest_type_hint(core)),
        Fact(guest, "magic", header.magic, hex=True),
        Fact(guest, "width", *_guest_width(core)),
        Fact(guest, "machine", f"{elf.machine_name} ({elf.e_machine})", "ELF e_machine"),
        Fact(guest, "page_size", core.page_size),
        Fact(guest, "nr_pages", header.nr_pages, "tot_pages when the dump started"),
        Fact(
            guest,
            "nr_vcpus",
            header.nr_vcpus,
            f"{stored} contexts decoded" if stored != header.nr_vcpus else "contexts stored",
        ),
        Fact(guest, "vcpu_layout", layout, _vcpu_layout_hint(core)),
    ]


def _guest_type_hint(core: XenDumpCore) -> str:
    hint = f"from the header magic {core.header.magic:#x}"
    if core.is_ia64 and core.header.is_pv:
        hint += "; ia64 PV is auto-translated (.xen_pfn, pseudo-physical page tables)"
    return hint


def _guest_width(core: XenDumpCore) -> tuple[FactValue, str]:
    machine = core.elf.facts.e_machine
    if core.is_ia64:
        return "64-bit", "ia64 guests are 64-bit"
    if core.is_pv and machine in (EM_386, EM_X86_64):
        return f"{32 if machine == EM_386 else 64}-bit", "PV: from e_machine"
    if machine == EM_X86_64:
        return "unknown", "HVM/PVH cores say EM_X86_64 whatever the guest runs"
    return "unknown", "the core does not record it"


def _vcpu_layout_hint(core: XenDumpCore) -> str:
    area = core.vcpu_area
    if area is None:
        return "no .xen_prstatus section"
    return f"{area.count} slot(s) of {area.entsize} bytes"


def _format_facts(core: XenDumpCore) -> list[Fact]:
    version = core.notes.format_version
    if version is None:
        return [Fact(GROUP_FORMAT, "version", None, "no format_version note")]
    return [
        Fact(GROUP_FORMAT, "version", str(version)),
        Fact(GROUP_FORMAT, "known", version.known, "" if version.known else "read as 0.x"),
    ]


def _xen_facts(core: XenDumpCore) -> list[Fact]:
    xv = core.notes.xen_version
    xen = GROUP_XEN
    if xv is None:
        return [Fact(xen, "version", None, "no usable xen_version note")]
    return [
        Fact(xen, "version", f"{xv.major}.{xv.minor}{xv.extra}", "major.minor + extra"),
        Fact(xen, "major", xv.major),
        Fact(xen, "minor", xv.minor),
        Fact(xen, "extra", xv.extra),
        Fact(xen, "compiler", xv.compiler),
        Fact(xen, "compile_by", xv.compile_by),
        Fact(xen, "compile_domain", xv.compile_domain),
        Fact(xen, "compile_date", xv.compile_date),
        Fact(xen, "capabilities", xv.capabilities),
        Fact(xen, "changeset", xv.changeset),
        Fact(xen, "virt_start", xv.virt_start, _virt_start_hint(xv.layout), hex=True),
        Fact(xen, "pagesize", xv.pagesize, "XENVER_pagesize"),
        Fact(xen, "note_layout", xv.layout, "of the xen_version note"),
    ]


def _virt_start_hint(layout: str) -> str:
    hint = "dom0's platform parameter, not the guest's"
    if layout != "64-bit":
        hint += "; low 32 bits only"
    return hint


def _note_facts(core: XenDumpCore) -> list[Fact]:
    facts = []
    for note in core.notes.raw:
        name = NOTE_TYPE_NAMES.get(note.type, f"type {note.type:#x}")
        name = name.replace("XEN_ELFNOTE_DUMPCORE_", "").lower()
        owner = printable(note.name.decode("ascii", "replace"))
        facts.append(
            Fact(
                GROUP_NOTES,
                name if owner == "Xen" else f"{owner} {name}",
                f"offset {note.offset:#x}, {len(note.desc)} bytes",
            )
        )
    return facts


def _section_facts(core: XenDumpCore) -> list[Fact]:
    return [
        Fact(
            GROUP_SECTIONS,
            printable(row.name) or f"[{row.index}]",
            f"offset {row.offset:#x}, size {row.size:#x}, entsize {row.entsize}",
            human_size(row.size),
        )
        for row in section_rows(core)
    ]


def _ia64_facts(core: XenDumpCore) -> list[Fact]:
    """ia64 only: what is particular to its cores (formats/ia64.py)."""
    if not core.is_ia64:
        return []
    group = GROUP_IA64
    facts = [Fact(group, "translation", "auto-translated", f"PV and HVM alike: {core.table.name}")]
    area = core.vcpu_area
    if area is not None:
        known = area.entsize == ia64_mod.CONTEXT_SIZE
        hint = (
            "vcpu_guest_context of Xen 3.2-4.2, decoded"
            if known
            else f"not the {ia64_mod.CONTEXT_SIZE}-byte layout of Xen 3.2-4.2: slots not decoded"
        )
        facts.append(Fact(group, "vcpu_slot_size", area.entsize, hint))
        facts.append(Fact(group, "vcpu_slots", area.count, f"{area.count} x {area.entsize} bytes"))
    section = core.sections.get(ia64_mod.MAPPED_REGS_SECTION)
    if section is None:
        facts.append(Fact(group, "mapped_regs", False, "PV only: absent for HVM (VTi)"))
        return facts
    regs = core.ia64_mapped_regs_area
    extent = core.ia64_extent
    count = 0 if regs is None else regs.count
    entsize = section.entsize or (regs.entsize if regs else 0)
    facts += [
        Fact(group, "mapped_regs", True, ia64_mod.MAPPED_REGS_SECTION),
        Fact(
            group,
            "mapped_regs_entries",
            count,
            f"{entsize}-byte entries, each starting with a "
            f"{ia64_mod.MAPPED_REGS_SIZE}-byte mapped_regs_t",
        ),
    ]
    if extent is not None:
        crossed = extent.crossed
        note = (
            f"the header says {section.offset:#x}: libxc crossed it with .xen_shared_info's"
            if crossed
            else "as the section header says"
        )
        facts.append(Fact(group, "mapped_regs_offset", extent.regs_offset, note, hex=True))
        facts.append(Fact(group, "headers_crossed", crossed, "undone" if crossed else "as written"))
    return facts


def _shared_info_facts(core: XenDumpCore) -> list[Fact]:
    group = GROUP_SHARED_INFO
    if core.shared_info is None:
        return [Fact(group, "present", False, "HVM/PVH/ARM: only if the guest mapped it")]
    facts = [Fact(group, "present", True, f"{len(core.shared_info)} bytes")]
    if not core.is_pv:
        # A translated guest's width is unknown, so its layout would be a guess; the p2m
        # fields mean nothing for it anyway.
        return facts
    info = decoded_shared_info(core)
    if info is None:
        return facts
    facts += [
        Fact(group, "layout", info.layout),
        Fact(group, "max_pfn", info.max_pfn, "size of the guest's p2m list", hex=True),
        Fact(
            group,
            "pfn_to_mfn_frame_list_list",
            info.pfn_to_mfn_frame_list_list,
            "mfn of the 3-level p2m tree",
            hex=True,
        ),
        Fact(group, "p2m_vaddr", info.p2m_vaddr, "linear p2m list (Xen >= 4.16)", hex=True),
    ]
    if info.p2m_cr3 is not None:
        machine = vcpu_mod.pv_cr3_to_machine_address(info.p2m_cr3, info.layout)
        facts.append(
            Fact(group, "p2m_cr3", info.p2m_cr3, f"machine address {machine:#x}", hex=True)
        )
    facts.append(Fact(group, "p2m_generation", info.p2m_generation))
    seconds = info.wallclock_seconds
    facts.append(Fact(group, "wallclock_sec", seconds, utc_text(seconds)))
    return facts
