"""Hostile and damaged dump-cores: every case is named by its damage and pins the exact outcome.

Either the parser refuses with ``XenFormatError`` whose one-line message names the
problem (checked by substring), or it warns and gives a view in which every mapped pfn is
exactly the page the test expects (an explicit pfn -> table index dict, never derived from the
code under test), each page read back through a real Volatility ``FileLayer`` + stacker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from volatility3.framework import contexts, exceptions
from volatility3.framework.layers.physical import FileLayer

from volatility3_xen.formats.errors import XenFormatError
from volatility3_xen.layers import memory as xen_layer
from volatility3_xen.layers.stackers import XenDumpCoreStacker

from .corecraft import (
    INVALID,
    Core,
    make_core,
    note_offset,
    open_bytes,
    rename_sections,
    set_ehdr,
    set_header,
    set_note,
    set_shdr,
    swap_shdrs,
    table_before_pages,
    tagged_page,
)

PS = 4096
IDENTITY = {pfn: pfn for pfn in range(8)}  # the pristine 8-page core: pfn i is page i


@dataclass(frozen=True)
class Refused:
    """Construction raises; the message contains every one of ``words``."""

    words: tuple[str, ...]


@dataclass(frozen=True)
class Viewed:
    """Construction succeeds with these pfn -> page index pairs mapped, and nothing else; each
    of ``warnings`` is a substring of some warning (no warnings at all when empty)."""

    mapping: dict[int, int]
    warnings: tuple[str, ...] = ()
    extra_warnings_ok: bool = False


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[str], Core]  # kind ("hvm"/"pv") -> damaged core
    expect: Refused | Viewed
    kinds: tuple[str, ...] = ("hvm", "pv")
    tags: tuple[str, ...] = field(default=())


def _pristine(kind: str) -> Core:
    return make_core(kind)


def _cut(where: Callable[[Core], int]) -> Callable[[str], Core]:
    def build(kind: str) -> Core:
        core = make_core(kind)
        return core.with_data(core.data[: where(core)])

    return build


def _mut(fn: Callable[[Core], Core], **make: object) -> Callable[[str], Core]:
    return lambda kind: fn(make_core(kind, **make))


def _table(c: Core) -> str:
    return c.table_name


def _pages_off(c: Core) -> int:
    return c.section(".xen_pages").offset


def _table_off(c: Core) -> int:
    return c.section(c.table_name).offset


def _swap_offsets(a: str, b: str) -> Callable[[Core], Core]:
    """ia64-style damage: two headers point at each other's data (sizes stay)."""

    def fn(c: Core) -> Core:
        a_name = c.table_name if a == "table" else a
        b_name = c.table_name if b == "table" else b
        oa, ob = c.section(a_name).offset, c.section(b_name).offset
        return set_shdr(set_shdr(c, a_name, "sh_offset", ob), b_name, "sh_offset", oa)

    return fn


def _table_first_cut_in_pages(kind: str) -> Core:
    core = table_before_pages(make_core(kind))
    return core.with_data(core.data[: core.section(".xen_pages").offset + 3 * PS + 100])


CASES: list[Case] = [
    Case("pristine", _pristine, Viewed(IDENTITY)),
    # --- truncation at every boundary -------------------------------------------------------
    Case("truncated inside e_ident", _cut(lambda c: 3), Refused(("not an ELF file",))),
    Case(
        "truncated inside the ELF header",
        _cut(lambda c: 40),
        Refused(("ELF header is truncated", "40 bytes")),
    ),
    Case(
        "truncated inside the section header table",
        _cut(lambda c: 64 + 100),
        Refused(("section header table", "runs past the end of the file")),
    ),
    Case(
        "truncated inside the notes",
        _cut(lambda c: c.section(".note.Xen").offset + 40),
        Refused(("no usable header note", "cut short")),
    ),
    Case(
        "truncated inside the xen_version note",
        _cut(lambda c: c.section(".note.Xen").offset + 200),
        Refused(("holds no whole page", ".xen_pages")),
    ),
    Case(
        "truncated inside prstatus",
        _cut(lambda c: c.section(".xen_prstatus").offset + 100),
        Refused((".xen_pages at offset 0x2000 holds no whole page", "truncated")),
    ),
    Case(
        "truncated inside the pages (libxc order: the table is lost)",
        _cut(lambda c: _pages_off(c) + 3 * PS + 100),
        Refused(("lies beyond the end of the file", "no page can be located")),
    ),
    Case(
        "truncated inside the pages, table stored first: partial view",
        _table_first_cut_in_pages,
        Viewed(
            {0: 0, 1: 1, 2: 2},
            (".xen_pages promises 8 pages but the file ends after 3", ".shstrtab"),
            extra_warnings_ok=True,
        ),
    ),
    Case(
        "truncated inside the table: partial view",
        _cut(lambda c: _table_off(c) + 5 * c.entsize + 3),
        Viewed(
            {0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
            ("libxc's names", "is truncated"),
            extra_warnings_ok=True,
        ),
    ),
    Case(
        "truncated inside .shstrtab: full view from libxc's names",
        _cut(lambda c: len(c.data) - 3),
        Viewed(IDENTITY, (".shstrtab at offset", "libxc's names")),
    ),
    # --- ELF header -------------------------------------------------------------------------
    Case(
        "e_shnum huge",
        _mut(lambda c: set_ehdr(c, "e_shnum", 0xFFFF)),
        Refused(("65535 entries", "runs past the end of the file")),
    ),
    Case("e_shnum zero", _mut(lambda c: set_ehdr(c, "e_shnum", 0)), Refused(("e_shnum = 0",))),
    Case(
        "e_shentsize too small",
        _mut(lambda c: set_ehdr(c, "e_shentsize", 12)),
        Refused(("e_shentsize 12",)),
    ),
    Case(
        "e_shoff past EOF",
        _mut(lambda c: set_ehdr(c, "e_shoff", 1 << 40)),
        Refused(("section header table at offset 0x10000000000",)),
    ),
    Case(
        "e_shstrndx out of range: libxc names recovered",
        _mut(lambda c: set_ehdr(c, "e_shstrndx", 50)),
        Viewed(IDENTITY, ("e_shstrndx 50 does not name a section",)),
    ),
    Case(
        "e_shstrndx out of range and names not libxc's",
        _mut(lambda c: set_shdr(set_ehdr(c, "e_shstrndx", 50), 2, "sh_name", 3)),
        Refused(("e_shstrndx 50 does not name a section (e_shnum 6)",)),
    ),
    Case("e_type not ET_CORE", _mut(lambda c: set_ehdr(c, "e_type", 2)), Refused(("ET_CORE",))),
    Case(
        "ELF class 3",
        _mut(lambda c: c.with_data(c.data[:4] + b"\3" + c.data[5:])),
        Refused(("unknown ELF class 3 at offset 4",)),
    ),
    Case(
        "ELFCLASS32 (Feb-Mar 2007 dev builds)",
        lambda kind: make_core(kind, elf_class=32),
        Viewed(IDENTITY),
    ),
    Case("big-endian", lambda kind: make_core(kind, byteorder="big"), Viewed(IDENTITY)),
    Case(
        "ELFCLASS32 big-endian",
        lambda kind: make_core(kind, elf_class=32, byteorder="big"),
        Viewed(IDENTITY),
    ),
    # --- section headers --------------------------------------------------------------------
    Case(
        "pages sh_offset past EOF",
        _mut(lambda c: set_shdr(c, ".xen_pages", "sh_offset", len(c.data) + 100)),
        Refused((".xen_pages at offset", "holds no whole page")),
    ),
    Case(
        "pages sh_offset + sh_size overflow 2^64",
        _mut(lambda c: set_shdr(c, ".xen_pages", "sh_offset", (1 << 64) - PS)),
        Refused((".xen_pages at offset 0xfffffffffffff000", "holds no whole page")),
    ),
    Case(
        "pages sh_size 2^64-1 runs over the table",
        _mut(lambda c: set_shdr(c, ".xen_pages", "sh_size", (1 << 64) - 1)),
        Refused((".xen_pages and .xen_", "overlap")),
    ),
    Case(
        "table sh_offset 2^64-8",
        _mut(lambda c: set_shdr(c, c.table_name, "sh_offset", (1 << 64) - 8)),
        Refused(("at offset 0xfffffffffffffff8 lies beyond the end of the file",)),
    ),
    Case(
        "table sh_size past EOF: all present entries mapped",
        _mut(lambda c: set_shdr(c, c.table_name, "sh_size", 1 << 40)),
        Viewed(IDENTITY, ("promises", "is truncated"), extra_warnings_ok=True),
    ),
    Case(
        "table sh_size short: only the covered entries mapped",
        _mut(lambda c: set_shdr(c, c.table_name, "sh_size", 3 * c.entsize + 5)),
        Viewed({0: 0, 1: 1, 2: 2}, ("partial entry is ignored", "has 3 entries")),
    ),
    Case(
        "pages sh_size short: only the covered entries mapped",
        _mut(lambda c: set_shdr(c, ".xen_pages", "sh_size", 3 * PS + 5)),
        Viewed({0: 0, 1: 1, 2: 2}, (".xen_pages holds 3 pages", "not a multiple of the page size")),
    ),
    Case(
        "note sh_offset 2^64-8",
        _mut(lambda c: set_shdr(c, ".note.Xen", "sh_offset", (1 << 64) - 8)),
        Refused((".note.Xen at offset 0xfffffffffffffff8 lies beyond the end",)),
    ),
    Case(
        "prstatus past EOF: view kept, vCPUs lost",
        _mut(lambda c: set_shdr(c, ".xen_prstatus", "sh_offset", (1 << 64) - 8)),
        Viewed(IDENTITY, (".xen_prstatus is truncated",)),
    ),
    Case(
        "sh_name out of .shstrtab",
        _mut(lambda c: set_shdr(c, ".xen_pages", "sh_name", 5000)),
        Refused(("section 4 has name offset 5000 outside .shstrtab",)),
    ),
    Case(
        "duplicate section names",
        _mut(lambda c: rename_sections(c, {".xen_prstatus": ".xen_pages"})),
        Refused(("section .xen_pages appears twice (indices 3 and 4)",)),
    ),
    Case(
        "both .xen_p2m and .xen_pfn",
        _mut(lambda c: rename_sections(c, {".xen_prstatus": ".xen_p2m", ".xen_p2m": ".xen_pfn"})),
        Refused(("both .xen_p2m and .xen_pfn",)),
    ),
    Case(
        "neither .xen_p2m nor .xen_pfn",
        _mut(lambda c: rename_sections(c, {c.table_name: ".xen_foo"})),
        Refused(("neither .xen_p2m nor .xen_pfn",)),
    ),
    Case(
        "no .xen_pages",
        _mut(lambda c: rename_sections(c, {".xen_pages": ".xen_pagez"})),
        Refused(("no .xen_pages section",)),
    ),
    Case(
        "no .note.Xen",
        _mut(lambda c: rename_sections(c, {".note.Xen": ".note.Xem"})),
        Refused(("no .note.Xen section",)),
    ),
    Case(
        "pages overlap the table",
        _mut(lambda c: set_shdr(c, ".xen_pages", "sh_size", 9 * PS)),
        Refused(("overlap at offset 0xa000",)),
    ),
    Case(
        "pages over the ELF header",
        _mut(lambda c: set_shdr(c, ".xen_pages", "sh_offset", 0)),
        Refused(("ELF header and .xen_pages overlap at offset 0x0",)),
    ),
    Case(
        "notes over the section header table",
        _mut(lambda c: set_shdr(c, ".note.Xen", "sh_offset", 128)),
        Refused(("section header table and .note.Xen overlap at offset 0x80",)),
    ),
    Case(
        "pages entsize disagrees with the header page size",
        _mut(lambda c: set_shdr(c, ".xen_pages", "sh_entsize", 8)),
        Refused((".xen_pages entry size 0x8 disagrees with the header note page size 0x1000",)),
    ),
    Case(
        "table entsize wrong",
        _mut(lambda c: set_shdr(c, c.table_name, "sh_entsize", 12)),
        Refused(("entry size 12 is not",)),
    ),
    Case(
        "swapped section header entries (legal permutation)",
        _mut(lambda c: swap_shdrs(c, ".xen_pages", c.table_name)),
        Viewed(IDENTITY),
    ),
    Case(
        "swapped data offsets of pages and table (ia64-style)",
        _mut(_swap_offsets(".xen_pages", "table")),
        Refused((".xen_pages at offset 0xa000 holds no whole page",)),
        tags=("swap",),
    ),
    Case(
        "swapped data offsets of notes and prstatus",
        _mut(_swap_offsets(".note.Xen", ".xen_prstatus")),
        Refused(("overlap",)),
    ),
    Case(
        "appended junk",
        _mut(lambda c: c.with_data(c.data + bytes(range(256)) * 64)),
        Viewed(IDENTITY),
    ),
    # --- notes ------------------------------------------------------------------------------
    Case(
        "NONE note namesz huge hides the header",
        _mut(lambda c: set_note(c, 0, "namesz", 0xFFFFFFF0)),
        Refused(("no usable header note",)),
    ),
    Case(
        "header note descsz huge",
        _mut(lambda c: set_note(c, 1, "descsz", 0xFFFFFFFF)),
        Refused(("no usable header note",)),
    ),
    Case(
        "xen_version note descsz huge: view kept",
        _mut(lambda c: set_note(c, 2, "descsz", 0x7FFFFFFF)),
        Viewed(IDENTITY, ("runs past the end of .note.Xen",)),
    ),
    Case(
        "header note with the wrong name",
        _mut(
            lambda c: c.with_data(
                c.data[: note_offset(c, 1) + 12] + b"Xem\0" + c.data[note_offset(c, 1) + 16 :]
            )
        ),
        Refused(("no usable header note",)),
    ),
    Case("page_size 0", _mut(lambda c: set_header(c, "page_size", 0)), Refused(("0x0 is not",))),
    Case(
        "page_size 3",
        _mut(lambda c: set_header(c, "page_size", 3)),
        Refused(("page size 0x3 is not a power of two",)),
    ),
    Case(
        "page_size 2^40",
        _mut(lambda c: set_header(c, "page_size", 1 << 40)),
        Refused(("page size 0x10000000000 is outside",)),
    ),
    Case(
        "page_size 8192 against 4096-byte pages",
        _mut(lambda c: set_header(c, "page_size", 8192)),
        Refused(("disagrees with the header note page size 0x2000",)),
    ),
    Case(
        "nr_pages 2^63",
        _mut(lambda c: set_header(c, "nr_pages", 1 << 63)),
        Viewed(IDENTITY, ("header promises 9223372036854775808 pages",)),
    ),
    Case(
        "nr_vcpus 2^32",
        _mut(lambda c: set_header(c, "nr_vcpus", 1 << 32)),
        Viewed(IDENTITY, ("header says 4294967296 vCPUs but .xen_prstatus holds 1",)),
        tags=("vcpus",),
    ),
    Case(
        "unknown magic",
        _mut(lambda c: set_header(c, "magic", 0xDEADBEEF)),
        Refused(("unknown dump-core magic 0xdeadbeef",)),
    ),
    # --- the table --------------------------------------------------------------------------
    Case(
        "duplicate pfns: first page wins",
        lambda kind: make_core(kind, pfns=[0, 1, 2, 2, 3, 1, 4, 5]),
        Viewed({0: 0, 1: 1, 2: 2, 3: 4, 4: 6, 5: 7}, ("2 pfns appear more than once",)),
    ),
    Case(
        "unsorted table",
        lambda kind: make_core(kind, pfns=[5, 3, 1, 0, 2, 4, 7, 6]),
        Viewed({5: 0, 3: 1, 1: 2, 0: 3, 2: 4, 4: 5, 7: 6, 6: 7}, ("not sorted",)),
    ),
    Case(
        "~0 in the middle",
        lambda kind: make_core(kind, pfns=[0, 1, INVALID, 3, 4, INVALID, 6, 7]),
        Viewed({0: 0, 1: 1, 3: 3, 4: 4, 6: 6, 7: 7}, ("padding entries (~0) found inside",)),
    ),
    Case(
        "pfn beyond 2^52 (and 2^40 at 4 KiB pages)",
        lambda kind: make_core(kind, pfns=[0, 1, 1 << 40, 3, 1 << 52, 5, 1 << 63, 7]),
        Viewed({0: 0, 1: 1, 3: 3, 5: 5, 7: 7}, ("3 table entries name pfns beyond",)),
    ),
    Case(
        "every entry padding",
        lambda kind: make_core(kind, pfns=[INVALID] * 8),
        Refused(("maps no pages (all 8 entries unusable)",)),
    ),
    Case(
        "PV entry with pfn but gmfn ~0",
        lambda kind: make_core(kind, gmfns=[5, INVALID, 6, 7, 8, 9, 10, 11]),
        Viewed({0: 0, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7}, ("padding entries",)),
        kinds=("pv",),
    ),
    Case(
        "magic says HVM but the table is .xen_p2m",
        _mut(lambda c: set_header(c, "magic", 0xF00FEBEE)),
        Viewed(IDENTITY, ("header magic says HVM/PVH but the table is .xen_p2m",)),
        kinds=("pv",),
    ),
]


def _file_layer(path: Path) -> tuple[contexts.Context, str]:
    context = contexts.Context()
    context.config["FileLayer.location"] = path.as_uri()
    context.layers.add_layer(FileLayer(context, "FileLayer", "FileLayer"))
    return context, "FileLayer"


def _check_layer_reads(stacked: xen_layer.XenDumpCoreLayer, data: bytes, mapping: dict) -> None:
    """Every expected pfn reads back its tagged page; its neighbours that are not expected
    are invalid (reads raise InvalidAddressException)."""
    core = stacked.core
    for pfn, index in mapping.items():
        page = stacked.read(pfn * PS, PS)
        assert page == data[core.page_offset(index) : core.page_offset(index) + PS]
        assert page == tagged_page(index, pfn, PS)
    for pfn in range(max(mapping) + 2):
        if pfn not in mapping:
            assert not stacked.is_valid(pfn * PS)
            with pytest.raises(exceptions.InvalidAddressException):
                stacked.read(pfn * PS, 16)


PARAMS = [
    pytest.param(case, kind, id=f"{kind}: {case.name}") for case in CASES for kind in case.kinds
]


@pytest.mark.parametrize(("case", "kind"), PARAMS)
def test_damage(case: Case, kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    core = case.build(kind)
    data = core.data
    if isinstance(case.expect, Refused):
        with pytest.raises(XenFormatError) as info:
            parsed = open_bytes(data)
            parsed.page_map  # noqa: B018 - construction of the page map is part of opening
        message = str(info.value)
        assert "\n" not in message and message
        for word in case.expect.words:
            assert word in message, (word, message)
    else:
        parsed = open_bytes(data)
        mapped = {}
        runs = parsed.page_map.pfn_runs
        for key, value, count in zip(runs.key, runs.value, runs.count):
            mapped.update({key + k: value + k for k in range(count)})
        assert mapped == case.expect.mapping
        for index in case.expect.mapping.values():  # the tag proves the page is the right one
            page = data[parsed.page_offset(index) : parsed.page_offset(index) + PS]
            assert page == tagged_page(index, core.spec.pfns[index], PS)
        for word in case.expect.warnings:
            assert any(word in warning for warning in parsed.warnings), (word, parsed.warnings)
        if not case.expect.warnings:
            assert parsed.warnings == []
        elif not case.expect.extra_warnings_ok:
            assert len(parsed.warnings) <= len(case.expect.warnings) + 1, parsed.warnings
        if "vcpus" in case.tags:
            assert parsed.vcpu_area is not None and parsed.vcpu_area.count == 1
            assert len(parsed.vcpus()) == 1

    # The stacker on the same bytes: a layer or None, never an exception, and a refusal of a
    # recognisably-Xen file is said at WARNING level (the default `vol` console level).
    path = tmp_path / "damaged.core"
    path.write_bytes(data)
    context, base = _file_layer(path)
    with caplog.at_level(logging.WARNING, logger="volatility3_xen"):
        stacked = XenDumpCoreStacker.stack(context, base)
    if isinstance(case.expect, Viewed):
        assert isinstance(stacked, xen_layer.XenDumpCoreLayer)
        _check_layer_reads(stacked, data, case.expect.mapping)
    else:
        # A recognisably-Xen file is refused with a layer that keeps other stackers off it.
        assert stacked is None or isinstance(stacked, xen_layer.XenRefusedLayer)
        if data[:4] == b"\x7fELF" and len(data) >= 64 and case.name != "e_type not ET_CORE":
            if "ELF class" not in case.name:
                assert any("cannot be used" in r.getMessage() for r in caplog.records), (
                    case.name,
                    [r.getMessage() for r in caplog.records],
                )


# --- `vol xen.info` on damaged cores: a reason, never a traceback ------------------------------


def _vcpus_and_duplicates(kind: str) -> Core:
    return set_header(make_core(kind, pfns=[5, 3, 3, 0, 9, 4, 7, 6]), "nr_vcpus", 1 << 32)


INFO_PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "xen" / "info.py"
CLI_CASES = {
    "truncated inside the table": (_cut(lambda c: _table_off(c) + 2 * c.entsize + 4), "hvm"),
    "truncated inside the pages": (_cut(lambda c: _pages_off(c) + 3 * PS + 100), "pv"),
    "page_size 3": (_mut(lambda c: set_header(c, "page_size", 3)), "hvm"),
    "nr_vcpus 2^32, unsorted duplicates": (_vcpus_and_duplicates, "pv"),
}


@pytest.mark.skipif(not INFO_PLUGIN.exists(), reason="plugins/xen/info.py not written yet")
@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_vol_xen_info_on_damaged_core(name: str, tmp_path: Path) -> None:
    from .conftest import run_vol

    build, kind = CLI_CASES[name]
    path = tmp_path / "damaged.core"
    path.write_bytes(build(kind).data)
    result = run_vol("-f", str(path), "xen.info", timeout=300)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    if result.returncode != 0:  # refused: the reason must be on the console
        assert "Xen dump-core" in result.stderr and ("truncated" in output or "page size" in output)
