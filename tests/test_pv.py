"""PV page walks (volatility3_xen.layers.pv): crafted machine-frame page tables, and the real guest.

Part (a) writes small PV cores whose page tables hold scrambled machine frames (many above
4 GiB), a machine-contiguous 2 MiB page whose pfns are shuffled, one whose pfns are linear,
Xen-private / grant / foreign frames, a PROT_NONE entry and a self-referencing entry.  Every
page the layer maps is compared with an independent reference walk (a plain dict m2p over
the very bytes written) and read back against the page it must hold; hand-stated
expectations pin the important addresses.

Part (b) (``slow``) converts the real guest image to a PV core with ``pvconvert`` and runs
``vol`` on it, comparing with the expected outputs taken on the raw image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from volatility3.framework import contexts, exceptions
from volatility3.framework.layers import intel, physical

from volatility3_xen.layers import pv, windows
from volatility3_xen.layers.memory import XenDumpCoreLayer
from volatility3_xen.testdata import corewriter as writer
from volatility3_xen.testdata import pvconvert

from .conftest import REPO, SHARED, sha256_of

PAGE = 4096
ZERO_PAGE = bytes(PAGE)
ALL_ONES = (1 << 64) - 1
# Entry flags: present, rw, user, accessed, dirty; PS (large page); PAT bit of a large page;
# Linux PROT_NONE (reuses _PAGE_GLOBAL); NX.
TABLE = 0x67
KTABLE = 0x63
PS = 0x80
PAT_LARGE = 0x1000
PROTNONE = 0x100
NX = 1 << 63

GUEST = SHARED / "guests"


def tag_page(pfn: int) -> bytes:
    """Distinct content for data page ``pfn``."""
    return np.full(PAGE // 8, 0xDA7A_0000_0000_0000 | pfn, dtype="<u8").tobytes()


def table_page(entries: dict[int, int]) -> bytes:
    words = np.zeros(PAGE // 8, dtype="<u8")
    for index, value in entries.items():
        words[index] = value
    return words.tobytes()


@dataclass
class Crafted:
    """A written crafted core and everything the tests need to know about it."""

    path: Path
    p2m: dict[int, int]  # pfn -> mfn
    pages: dict[int, bytes]  # pfn -> stored content (tables hold machine frames)
    shuffled: list[int]  # pfn backing 4 KiB page k of the pfn-shuffled 2 MiB page
    foreign: list[int]  # machine frames the guest does not own

    @property
    def m2p(self) -> dict[int, int]:
        return {mfn: pfn for pfn, mfn in self.p2m.items()}

    def content(self, pfn: int) -> bytes:
        return self.pages.get(pfn, ZERO_PAGE)


def _machine_frames(
    n_pfns: int, chunks: dict[int, int], low: int, high: int, seed: int
) -> dict[int, int]:
    """Distinct random mfns for pfns [0, n_pfns); ``chunks`` maps a 512-aligned pfn to
    the first mfn of its 512-frame machine-contiguous chunk (filled in by the caller)."""
    rng = np.random.default_rng(seed)
    reserved = {m for first in chunks.values() for m in range(first, first + 512)}
    p2m: dict[int, int] = {}
    used = set(reserved)
    for pfn in range(n_pfns):
        if any(start <= pfn < start + 512 for start in chunks):
            continue
        while True:
            mfn = int(rng.integers(low, high))
            if mfn not in used:
                break
        used.add(mfn)
        p2m[pfn] = mfn
    return p2m


def _foreign_frames(p2m: dict[int, int], candidates: list[int]) -> list[int]:
    owned = set(p2m.values())
    assert not owned.intersection(candidates)
    return candidates


# --- the crafted 4-level guest -------------------------------------------------------------

# pfns of the tables and data
L4, L3, L2, L1, L4_PROC, L3_KERN, L2_KERN, L3_USER = 1, 2, 3, 4, 5, 6, 7, 8
DATA = list(range(16, 32))
SHUFFLED_FIRST, LINEAR_FIRST, N_PFNS_64 = 512, 1024, 1536
SHUFFLED_MFN, LINEAR_MFN = 0x1234_5600, 0x0ABC_DE00  # 512-aligned, far above 4 GiB
PROTNONE_PFN = 20


def va64(i4: int, i3: int, i2: int, i1: int, offset: int = 0) -> int:
    """Virtual address from table indices, without sign extension (what mapping() yields)."""
    return i4 << 39 | i3 << 30 | i2 << 21 | i1 << 12 | offset


def canonical(address: int) -> int:
    return address | 0xFFFF_0000_0000_0000 if address >> 47 else address


def build_crafted_64(path: Path) -> Crafted:
    rng = np.random.default_rng(64)
    shuffled = (SHUFFLED_FIRST + rng.permutation(512)).tolist()
    p2m = _machine_frames(
        N_PFNS_64,
        {SHUFFLED_FIRST: SHUFFLED_MFN, LINEAR_FIRST: LINEAR_MFN},
        low=0x100,
        high=1 << 33,
        seed=6464,
    )
    p2m[L1] = 0x00F_FF00  # one table below 4 GiB, the others mostly far above
    for k, pfn in enumerate(shuffled):
        p2m[pfn] = SHUFFLED_MFN + k  # machine-contiguous, pfn-shuffled
    for k in range(512):
        p2m[LINEAR_FIRST + k] = LINEAR_MFN + k  # machine- and pfn-contiguous
    assert len(set(p2m.values())) == len(p2m) == N_PFNS_64
    xen_slot, foreign_table, grant = _foreign_frames(p2m, [0x3_0000_0001, 0x3_0000_0002, 0x77])

    def m(pfn: int) -> int:
        return p2m[pfn] << 12

    protnone = (((1 << 46) - 1) & ~0xFFF & ~(PROTNONE_PFN << 12)) | PROTNONE | 0x60
    l1 = {i: m(pfn) | TABLE | (NX if i % 2 else 0) for i, pfn in enumerate(DATA)}
    l1.update({16: grant << 12 | TABLE, 17: protnone, 19: m(DATA[0]) | 0x65})
    pages = {
        L4: table_page(
            {
                0: m(L3) | TABLE,
                256: xen_slot << 12 | KTABLE,  # Xen's private slot
                510: m(L4) | KTABLE,  # self-reference
                511: m(L3_KERN) | KTABLE,
            }
        ),
        L3: table_page({0: m(L2) | TABLE, 1: m(L2) | TABLE, 2: foreign_table << 12 | TABLE}),
        L2: table_page(
            {
                0: m(L1) | TABLE,
                1: SHUFFLED_MFN << 12 | TABLE | PS,
                2: LINEAR_MFN << 12 | TABLE | PS | PAT_LARGE,
            }
        ),
        L1: table_page(l1),
        L3_KERN: table_page({510: m(L2_KERN) | KTABLE}),
        L2_KERN: table_page({0: m(L1) | KTABLE, 5: LINEAR_MFN << 12 | KTABLE | PS}),
        L4_PROC: table_page(
            {1: m(L3_USER) | TABLE, 256: xen_slot << 12 | KTABLE, 511: m(L3_KERN) | KTABLE}
        ),
        L3_USER: table_page({0: m(L2) | TABLE}),
    }
    for pfn in [*DATA, *range(SHUFFLED_FIRST, LINEAR_FIRST + 512)]:
        pages[pfn] = tag_page(pfn)
    vcpus = [
        writer.vcpu_context_x86_64(cr3=m(L4_PROC)),  # a process pgd, as on a live guest
        writer.vcpu_context_x86_64(cr3=xen_slot << 12),  # not a guest frame
        writer.vcpu_context_x86_64(cr3=m(L4), flags=0),  # offline: ignored
    ]
    pfns = np.arange(N_PFNS_64, dtype=np.uint64)
    spec = writer.CoreSpec(
        kind="pv",
        pfns=pfns,
        gmfns=np.array([p2m[p] for p in range(N_PFNS_64)], dtype=np.uint64),
        pages=pages,
        vcpus=vcpus,
    )
    writer.write_core(path, spec)
    return Crafted(path, p2m, pages, shuffled, [xen_slot, foreign_table, grant])


# --- the crafted PAE guest -----------------------------------------------------------------

PDPT_PAGE, PAE_L2, PAE_L1, PAE_L2_KERN = 1, 2, 3, 4
PDPT_OFFSET = 0x20  # a PDPT need only be 32-byte aligned
N_PFNS_PAE = 1536
PAE_SHUFFLED_MFN, PAE_LINEAR_MFN = 0x0ABC_DE00, 0x0123_4400  # < 2**28 (40-bit), >= 2**20


def va_pae(i3: int, i2: int, i1: int, offset: int = 0) -> int:
    return i3 << 30 | i2 << 21 | i1 << 12 | offset


def build_crafted_pae(path: Path) -> Crafted:
    rng = np.random.default_rng(32)
    shuffled = (SHUFFLED_FIRST + rng.permutation(512)).tolist()
    p2m = _machine_frames(
        N_PFNS_PAE,
        {SHUFFLED_FIRST: PAE_SHUFFLED_MFN, LINEAR_FIRST: PAE_LINEAR_MFN},
        low=1 << 20,  # every frame above 4 GiB: PAE entries must not be cut at 32 bits
        high=1 << 27,
        seed=3232,
    )
    for k, pfn in enumerate(shuffled):
        p2m[pfn] = PAE_SHUFFLED_MFN + k
    for k in range(512):
        p2m[LINEAR_FIRST + k] = PAE_LINEAR_MFN + k
    assert len(set(p2m.values())) == len(p2m) == N_PFNS_PAE
    xen_l2, grant = _foreign_frames(p2m, [0x0FFF_FFF0, 0x55])

    def m(pfn: int) -> int:
        return p2m[pfn] << 12

    pdpt_words = np.zeros(PAGE // 8, dtype="<u8")
    # Decoys at the start of the page: a walk that ignores the PDPT's offset reads these.
    pdpt_words[0:4] = [m(PAE_L2_KERN) | 1, 0, 0, m(PAE_L2_KERN) | 1]
    first = PDPT_OFFSET // 8
    pdpt_words[first : first + 4] = [m(PAE_L2) | 1, xen_l2 << 12 | 1, 0, m(PAE_L2_KERN) | 1]
    protnone = (((1 << 40) - 1) & ~0xFFF & ~(PROTNONE_PFN << 12)) | PROTNONE | 0x60
    l1 = {i: m(pfn) | TABLE | (NX if i % 2 else 0) for i, pfn in enumerate(DATA)}
    l1.update({16: grant << 12 | TABLE, 17: protnone})
    pages = {
        PDPT_PAGE: pdpt_words.tobytes(),
        PAE_L2: table_page(
            {
                0: m(PAE_L1) | TABLE,
                1: PAE_SHUFFLED_MFN << 12 | TABLE | PS,
                2: PAE_LINEAR_MFN << 12 | TABLE | PS | PAT_LARGE,
                511: m(PAE_L2) | KTABLE,  # self-reference
            }
        ),
        PAE_L1: table_page(l1),
        PAE_L2_KERN: table_page({0: m(PAE_L1) | KTABLE, 7: PAE_LINEAR_MFN << 12 | KTABLE | PS}),
    }
    for pfn in [*DATA, *range(SHUFFLED_FIRST, LINEAR_FIRST + 512)]:
        pages[pfn] = tag_page(pfn)
    spec = writer.CoreSpec(
        kind="pv",
        pfns=np.arange(N_PFNS_PAE, dtype=np.uint64),
        gmfns=np.array([p2m[p] for p in range(N_PFNS_PAE)], dtype=np.uint64),
        pages=pages,
        machine=writer.EM_386,
        vcpus=[writer.vcpu_context_x86_32(cr3=writer.compat_cr3(p2m[PDPT_PAGE]))],
    )
    writer.write_core(path, spec)
    return Crafted(path, p2m, pages, shuffled, [xen_l2, grant])


# --- the reference walk --------------------------------------------------------------------


def reference_walk(
    crafted: Crafted,
    top: int,
    structure: list[tuple[int, bool]],
    maxphyaddr: int,
) -> dict[int, int]:
    """{virtual page: pfn} by a plain recursive walk over the written bytes.

    ``top`` is the machine address of the top table; ``structure`` lists (index bits, large
    pages allowed) per level.  Linux semantics: an entry is valid if present or PROT_NONE;
    a present leaf holds a machine frame, a PROT_NONE one an inverted pfn.  A table of one
    repeated entry is invalid (Volatility's rule).
    """
    m2p = crafted.m2p
    phys_mask = (1 << maxphyaddr) - 1
    result: dict[int, int] = {}

    def entries_at(machine: int, count: int) -> list[int] | None:
        pfn = m2p.get(machine >> 12)
        if pfn is None:
            return None
        words = np.frombuffer(crafted.content(pfn), dtype="<u8")
        if bool((words == words[0]).all()):
            return None
        start = (machine & 0xFFF) // 8
        return [int(w) for w in words[start : start + count]]

    def walk(machine: int, level: int, vbase: int) -> None:
        bits, large_ok = structure[level]
        entries = entries_at(machine, 1 << bits)
        if entries is None:
            return
        shift = 12 + sum(b for b, _ in structure[level + 1 :])
        leaf_level = level == len(structure) - 1
        for index, entry in enumerate(entries):
            if not entry & (1 | PROTNONE):
                continue
            vaddr = vbase | index << shift
            if leaf_level or (large_ok and entry & PS):
                if not leaf_level:
                    entry &= ~PAT_LARGE
                frames = 1 << (shift - 12)
                if entry & 1:
                    first = (entry & phys_mask) >> 12
                    for k in range(frames):
                        pfn = m2p.get(first + k)
                        if pfn is not None:
                            result[vaddr | k << 12] = pfn
                else:
                    first = ((entry ^ ALL_ONES) & phys_mask) >> 12
                    for k in range(frames):
                        result[vaddr | k << 12] = first + k
                continue
            next_bits = structure[level + 1][0]
            walk(entry & phys_mask & ~((1 << (next_bits + 3)) - 1), level + 1, vaddr)

    walk(top, 0, 0)
    return result


def layer_pages(layer: intel.Intel, length: int) -> dict[int, int]:
    """{virtual page: pfn} from the layer's own mapping() over [0, length)."""
    pages: dict[int, int] = {}
    for offset, size, mapped, mapped_size, _ in layer.mapping(0, length, ignore_errors=True):
        assert size == mapped_size and offset % PAGE == 0 and mapped % PAGE == 0
        for k in range(0, size, PAGE):
            pages[offset + k] = (mapped + k) >> 12
    return pages


# --- Volatility plumbing -------------------------------------------------------------------


def open_core(path: Path) -> tuple[contexts.Context, XenDumpCoreLayer]:
    context = contexts.Context()
    context.config["file.location"] = path.resolve().as_uri()
    context.layers.add_layer(physical.FileLayer(context, "file", "file"))
    context.config["xen.base_layer"] = "file"
    xen_layer = XenDumpCoreLayer(context, "xen", "xen")
    context.layers.add_layer(xen_layer)
    return context, xen_layer


def make_layer(
    context: contexts.Context, cls: type, dtb: int, name: str = "pv", memory_layer: str = "xen"
) -> intel.Intel:
    context.config[f"{name}.memory_layer"] = memory_layer
    context.config[f"{name}.page_map_offset"] = dtb
    layer = cls(context, name, name, metadata={"os": "Linux"})
    context.layers.add_layer(layer)
    return layer


def process_layer(context: contexts.Context, parent: intel.Intel, dtb: int) -> intel.Intel:
    """What GenericIntelProcess._add_process_layer does."""
    config = parent.build_configuration()
    config["memory_layer"] = parent.config["memory_layer"]
    config["page_map_offset"] = dtb
    context.config.splice("temporary.proc", config)
    layer = parent.__class__(context, config_path="temporary.proc", name="proc")
    context.layers.add_layer(layer)
    return layer


def assert_invalid(layer: intel.Intel, address: int) -> None:
    with pytest.raises(exceptions.PagedInvalidAddressException):
        layer.translate(address)
    assert not layer.is_valid(address)
    assert layer.read(address, 16, pad=True) == bytes(16)


# --- (a) crafted 4-level tables ----------------------------------------------------------


@pytest.fixture(scope="module")
def crafted64(tmp_path_factory: pytest.TempPathFactory) -> Crafted:
    return build_crafted_64(tmp_path_factory.mktemp("pv64") / "crafted64.core")


@pytest.fixture
def pv64(crafted64: Crafted) -> tuple[contexts.Context, intel.Intel]:
    context, _ = open_core(crafted64.path)
    return context, make_layer(context, pv.XenPVLinuxIntel32e, L4 << 12)


def test_every_mapped_page_matches_reference_walk_and_content(pv64, crafted64) -> None:
    _, layer = pv64
    structure = [(9, False), (9, True), (9, True), (9, False)]
    expected = reference_walk(crafted64, crafted64.p2m[L4] << 12, structure, 46)
    mapped = layer_pages(layer, 1 << 48)
    assert mapped == expected
    # Sanity on the reference itself: the data, both 2 MiB pages and the self-map are there.
    assert len(expected) > 3 * 512
    for vaddr, pfn in mapped.items():
        assert layer.read(vaddr, PAGE) == crafted64.content(pfn), hex(vaddr)


def test_data_pages_read_through_every_alias(pv64, crafted64) -> None:
    _, layer = pv64
    for i, pfn in enumerate(DATA):
        for vaddr in (va64(0, 0, 0, i), va64(0, 1, 0, i), canonical(va64(511, 510, 0, i))):
            assert layer.read(vaddr, PAGE) == tag_page(pfn)
            assert layer.translate(vaddr + 0x123)[0] == pfn << 12 | 0x123
    assert layer.read(va64(0, 0, 0, 19), PAGE) == tag_page(DATA[0])
    # A read across a page boundary joins two unrelated pfns.
    assert layer.read(va64(0, 0, 0, 1, 0xFF8), 16) == tag_page(DATA[1])[:8] + tag_page(DATA[2])[:8]


def test_machine_contiguous_large_page_with_shuffled_pfns(pv64, crafted64) -> None:
    _, layer = pv64
    base = va64(0, 0, 1, 0)
    for k, pfn in enumerate(crafted64.shuffled):
        address, size, _ = layer._translate(base + k * PAGE + 8)
        assert address == pfn << 12 | 8
        assert PAGE <= size and (size == PAGE or crafted64.shuffled[k ^ 1] == pfn ^ 1)
    expanded = {}
    for offset, size, mapped, _, _ in layer.mapping(base, 512 * PAGE):
        for k in range(0, size, PAGE):
            expanded[offset + k] = (mapped + k) >> 12
    assert expanded == {base + k * PAGE: pfn for k, pfn in enumerate(crafted64.shuffled)}
    whole = layer.read(base, 512 * PAGE)
    assert whole == b"".join(tag_page(pfn) for pfn in crafted64.shuffled)


def test_pfn_contiguous_large_page_is_one_chunk(pv64) -> None:
    _, layer = pv64
    for base in (va64(0, 0, 2, 0), canonical(va64(511, 510, 5, 0))):
        chunks = list(layer.mapping(base, 512 * PAGE))
        assert chunks == [(base, 512 * PAGE, LINEAR_FIRST << 12, 512 * PAGE, "xen")]
        assert layer._translate(base + 5 * PAGE + 0x123) == (
            (LINEAR_FIRST + 5) << 12 | 0x123,
            512 * PAGE,
            "xen",
        )
        # A mapping that starts inside the page is clipped correctly.
        inner = list(layer.mapping(base + 7 * PAGE + 0x10, 3 * PAGE))
        assert inner == [(base + 7 * PAGE + 0x10, 3 * PAGE, (LINEAR_FIRST + 7) << 12 | 0x10,
                          3 * PAGE, "xen")]  # fmt: skip
        assert layer.read(base + 511 * PAGE, PAGE) == tag_page(LINEAR_FIRST + 511)


def test_frames_the_guest_does_not_own_are_invalid(pv64) -> None:
    _, layer = pv64
    assert_invalid(layer, canonical(va64(256, 0, 0, 0)))  # Xen's private L4 slot
    assert_invalid(layer, canonical(va64(256, 3, 7, 9)))
    assert_invalid(layer, va64(0, 2, 0, 0))  # an L3 entry naming a foreign table
    assert_invalid(layer, va64(0, 0, 0, 16))  # a grant/foreign leaf
    assert_invalid(layer, va64(0, 0, 0, 18))  # simply not present
    assert_invalid(layer, va64(3, 0, 0, 0))


def test_protnone_entry_holds_an_inverted_pfn(pv64) -> None:
    _, layer = pv64
    assert layer.read(va64(0, 0, 0, 17), PAGE) == tag_page(PROTNONE_PFN)


def test_self_reference_reads_tables_without_hanging(pv64, crafted64) -> None:
    _, layer = pv64
    self_map = canonical(va64(510, 510, 510, 510))
    assert layer.read(self_map, PAGE) == crafted64.content(L4)
    assert layer.read(canonical(va64(510, 0, 0, 0)), PAGE) == crafted64.content(L1)
    assert layer.read(canonical(va64(510, 511, 510, 0)), PAGE) == crafted64.content(L1)


def test_process_layer_clone_and_configuration(pv64) -> None:
    context, layer = pv64
    config = layer.build_configuration()
    assert config["class"] == "volatility3_xen.layers.pv.XenPVLinuxIntel32e"
    assert config["page_map_offset"] == L4 << 12  # stays pseudo-physical
    proc = process_layer(context, layer, L4_PROC << 12)
    assert type(proc) is pv.XenPVLinuxIntel32e
    assert proc.read(va64(1, 0, 0, 3), PAGE) == tag_page(DATA[3])
    assert proc.read(canonical(va64(511, 510, 0, 3)), PAGE) == tag_page(DATA[3])
    assert_invalid(proc, va64(0, 0, 0, 3))
    assert_invalid(proc, canonical(va64(256, 0, 0, 0)))


def test_stock_layer_misreads_machine_frames(crafted64) -> None:
    """The reason for the PV layer: Volatility's own walk treats mfns as pfns."""
    context, _ = open_core(crafted64.path)
    stock = make_layer(context, intel.LinuxIntel32e, L4 << 12, name="stock")
    with pytest.raises(exceptions.InvalidAddressException):
        stock.read(va64(0, 0, 0, 0), PAGE)


def test_unowned_dtb_and_non_xen_memory_layer(crafted64) -> None:
    context, _ = open_core(crafted64.path)
    nowhere = make_layer(context, pv.XenPVLinuxIntel32e, 0x7000_0000, name="nowhere")
    assert_invalid(nowhere, va64(0, 0, 0, 0))
    with pytest.raises(exceptions.LayerException):
        make_layer(context, pv.XenPVLinuxIntel32e, L4 << 12, name="bad", memory_layer="file")


def test_vcpu_roots_and_cross_check(pv64, crafted64, caplog: pytest.LogCaptureFixture) -> None:
    context, layer = pv64
    xen_slot = crafted64.foreign[0]
    roots = pv.vcpu_page_table_roots(context.layers["xen"])
    assert roots == [
        pv.VcpuRoot(0, crafted64.p2m[L4_PROC] << 12, L4_PROC << 12),
        pv.VcpuRoot(1, xen_slot << 12, None),
    ]
    probe = pv.KernelProbe(canonical(va64(511, 510, 0, 2)), tag_page(DATA[2]))
    with caplog.at_level(logging.DEBUG, logger="volatility3_xen.layers.pv"):
        assert pv.cross_check_vcpu_roots(context, layer, probe, roots) == {0: True, 1: False}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "vCPU 1" in warnings[0].getMessage()


def test_stacker_falls_back_to_the_vcpu_table(pv64, crafted64) -> None:
    """A symbol DTB that does not map the kernel is replaced by a vCPU's table that does."""
    context, _ = pv64
    wrong = make_layer(context, pv.XenPVLinuxIntel32e, L3_USER << 12, name="wrong")
    probe = pv.KernelProbe(canonical(va64(511, 510, 0, 2)), tag_page(DATA[2]))
    roots = pv.vcpu_page_table_roots(context.layers["xen"])
    fixed = pv.XenPVLinuxIntelStacker._verified(context, wrong, probe, roots)
    assert fixed is not None and fixed.config["page_map_offset"] == L4_PROC << 12
    assert fixed.read(probe.address, PAGE) == probe.expected
    bad_probe = pv.KernelProbe(probe.address, tag_page(DATA[3]))
    assert pv.XenPVLinuxIntelStacker._verified(context, wrong, bad_probe, roots) is None


def test_stackers_ignore_other_layers(crafted64, tmp_path: Path) -> None:
    context, xen_layer = open_core(crafted64.path)
    assert pv.XenPVLinuxIntelStacker.stack(context, "file") is None
    assert windows.XenVcpuWindowsStacker.stack(context, "xen") is None  # PV: not for Windows
    hvm = tmp_path / "hvm.core"
    writer.write_core(hvm, writer.CoreSpec(kind="hvm", pfns=np.arange(4, dtype=np.uint64)))
    hvm_context, _ = open_core(hvm)
    assert pv.XenPVLinuxIntelStacker.stack(hvm_context, "xen") is None
    assert windows.XenVcpuWindowsStacker.stack(hvm_context, "xen") is None  # cr3 0: nothing to try


# --- (a) crafted PAE tables ----------------------------------------------------------------


@pytest.fixture(scope="module")
def crafted_pae(tmp_path_factory: pytest.TempPathFactory) -> Crafted:
    return build_crafted_pae(tmp_path_factory.mktemp("pae") / "crafted_pae.core")


@pytest.fixture
def pae(crafted_pae: Crafted) -> tuple[contexts.Context, intel.Intel]:
    context, _ = open_core(crafted_pae.path)
    return context, make_layer(context, pv.XenPVLinuxIntelPAE, PDPT_PAGE << 12 | PDPT_OFFSET)


def test_pae_every_mapped_page_matches_reference_walk(pae, crafted_pae) -> None:
    _, layer = pae
    top = crafted_pae.p2m[PDPT_PAGE] << 12 | PDPT_OFFSET
    expected = reference_walk(crafted_pae, top, [(2, False), (9, True), (9, False)], 40)
    mapped = layer_pages(layer, 1 << 32)
    assert mapped == expected
    assert len(expected) > 3 * 512
    for vaddr, pfn in mapped.items():
        assert layer.read(vaddr, PAGE) == crafted_pae.content(pfn), hex(vaddr)


def test_pae_hand_checked_addresses(pae, crafted_pae) -> None:
    _, layer = pae
    for i, pfn in enumerate(DATA):
        assert layer.read(va_pae(0, 0, i), PAGE) == tag_page(pfn)  # mfns above 4 GiB
        assert layer.read(va_pae(3, 0, i), PAGE) == tag_page(pfn)
    assert layer.read(va_pae(0, 0, 17), PAGE) == tag_page(PROTNONE_PFN)
    for k, pfn in enumerate(crafted_pae.shuffled):
        assert layer.translate(va_pae(0, 1, k, 0x40))[0] == pfn << 12 | 0x40
    assert list(layer.mapping(va_pae(3, 7, 0), 512 * PAGE)) == [
        (va_pae(3, 7, 0), 512 * PAGE, LINEAR_FIRST << 12, 512 * PAGE, "xen")
    ]
    assert layer.read(va_pae(0, 511, 0), PAGE) == crafted_pae.content(PAE_L1)  # self-reference
    assert_invalid(layer, va_pae(1, 0, 0))  # an L2 Xen keeps for itself
    assert_invalid(layer, va_pae(0, 0, 16))  # a grant frame
    assert_invalid(layer, va_pae(2, 0, 0))


def test_pae_vcpu_root_uses_the_rotated_compat_cr3(pae, crafted_pae) -> None:
    context, _ = pae
    mfn = crafted_pae.p2m[PDPT_PAGE]
    assert mfn >= 1 << 20  # the rotation matters only for frames at or above 4 GiB
    roots = pv.vcpu_page_table_roots(context.layers["xen"])
    assert roots == [pv.VcpuRoot(0, mfn << 12, PDPT_PAGE << 12)]


# --- (b) the real guest, end to end ----------------------------------------------------------

# Page-table roots (pseudo-physical) from shared/guests/README.md: the kernel DTB and every
# task's mm->pgd.  The vCPU was running on the last one.
GUEST_ROOTS = (
    0x6010000,
    0x105E000,
    0x292C000,
    0x27B4000,
    0x27BE000,
    0x28FE000,
    0x2942000,
    0x29FC000,
    0x28FC000,
    0x28A8000,
)
GUEST_SEED = 0x5EED


@dataclass(frozen=True)
class GuestCore:
    path: Path
    vol_cache: Path
    banner_vaddr: int
    banner: bytes


@pytest.fixture(scope="module")
def guest_core(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> GuestCore:
    """A PV core of the real guest: page tables converted to machine frames (with Xen's
    private L4 slots filled), vCPU 0 on a process pgd.  Cached under .cache/test_pv, keyed by
    the converter's and writer's source."""
    cache = REPO / ".cache" / "test_pv"
    cache.mkdir(parents=True, exist_ok=True)
    raw = guest_image
    if not (GUEST / "factsC.json").exists():
        pytest.skip(f"guest facts not available ({GUEST} missing: ../shared absent)")
    facts = json.loads((GUEST / "factsC.json").read_text())
    key = hashlib.sha256()
    for module in (pvconvert, writer):
        key.update(Path(module.__file__).read_bytes())
    key.update(repr((GUEST_ROOTS, GUEST_SEED, sha256_of(raw))).encode())
    core = cache / f"imageC-pv-{key.hexdigest()[:16]}.core"
    if not core.exists():
        image = bytearray(raw.read_bytes())
        mfns = pvconvert.assign_machine_frames(len(image) // PAGE, seed=GUEST_SEED)
        pvconvert.convert_page_tables(image, GUEST_ROOTS, mfns, xen_private_slots=True)
        vcpu = writer.vcpu_context_x86_64(
            cr3=int(mfns[int(facts["reg_CR3"], 16) >> 12]) << 12,
            rip=int(facts["reg_RIP"], 16),
            rsp=int(facts["reg_RSP"], 16),
        )
        partial = core.with_suffix(f".{os.getpid()}.part")
        writer.write_pv_from_image(partial, image, mfns, vcpus=[vcpu])
        partial.replace(core)
    # linux_banner's virtual address: its physical one plus the kernel map's offset.
    shift = int(facts["init_task_virt"], 16) - int(facts["init_task_phys"], 16)
    banner_vaddr = facts["banner_phys_offsets"][0] + shift
    return GuestCore(
        core, tmp_path_factory.mktemp("volcache"), banner_vaddr, facts["linux_banner"].encode()
    )


def _vol(core: GuestCore, plugin: str, *options: str) -> subprocess.CompletedProcess[str]:
    vol = Path(sys.executable).with_name("vol")
    command = [str(vol)] if vol.exists() else [sys.executable, "-c", _VOL_MAIN]
    command += [*options, "--offline", "--cache-path", str(core.vol_cache), "-p", "plugins"]
    command += ["-s", str(GUEST / "symbols"), "-f", str(core.path), plugin]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


_VOL_MAIN = "import sys; from volatility3.cli import main; sys.exit(main())"


def _without_header(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines and lines[0].startswith("Volatility 3 Framework"), text[:200]
    return lines[1:]


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["pslist", "psaux", "pstree"])
def test_guest_plugins_match_raw_image_output(guest_core: GuestCore, plugin: str) -> None:
    verbose = ("-vv",) if plugin == "pslist" else ("-q",)
    result = _vol(guest_core, f"linux.{plugin}", *verbose)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = (GUEST / "expected" / f"{plugin}.txt").read_text()
    assert _without_header(result.stdout) == _without_header(expected)
    if plugin == "pslist":
        # The PV layer did the walking, and vCPU 0's cr3 agreed with the symbol DTB.
        assert "Xen PV: XenPVLinuxIntel32e stacked via" in result.stderr
        assert "vCPU 0 cr3" in result.stderr and "maps the kernel like DTB 0x6010000" in (
            result.stderr
        )


@pytest.mark.slow
def test_guest_banner_through_pv_layer_in_process(guest_core: GuestCore) -> None:
    """Kernel virtual reads and process layers on the real tables, without the CLI."""
    context, _ = open_core(guest_core.path)
    layer = make_layer(context, pv.XenPVLinuxIntel32e, 0x6010000)
    assert layer.read(guest_core.banner_vaddr, len(guest_core.banner)) == guest_core.banner
    for root in GUEST_ROOTS[1:]:
        proc = process_layer(context, layer, root)
        assert proc.read(guest_core.banner_vaddr, len(guest_core.banner)) == guest_core.banner
        context.layers.del_layer("proc")
    # The stock walk cannot read it: the tables hold machine frames.
    stock = make_layer(context, intel.LinuxIntel32e, 0x6010000, name="stock")
    assert stock.read(guest_core.banner_vaddr, len(guest_core.banner), pad=True) != (
        guest_core.banner
    )


_KDUMP_READ = """
import sys, kdumpfile
k = kdumpfile.kdumpfile(sys.argv[1])
k.attr['addrxlat.ostype'] = 'linux'
sys.stdout.write(bytes(k.read(kdumpfile.KDUMP_KVADDR, int(sys.argv[2]), int(sys.argv[3]))).hex())
"""


@pytest.mark.slow
def test_libkdumpfile_reads_banner_at_its_virtual_address(guest_core: GuestCore) -> None:
    system_python = Path("/usr/bin/python3")
    probe = "import kdumpfile"
    if not system_python.exists() or subprocess.run([system_python, "-c", probe]).returncode:
        pytest.skip("libkdumpfile (python3-libkdumpfile under /usr/bin/python3) not available")
    result = subprocess.run(
        [
            system_python,
            "-c",
            _KDUMP_READ,
            str(guest_core.path),
            str(guest_core.banner_vaddr),
            str(len(guest_core.banner)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert bytes.fromhex(result.stdout) == guest_core.banner
