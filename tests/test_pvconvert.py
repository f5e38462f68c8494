"""Tests for testdata.pvconvert (raw image -> Xen PV page tables) and rawguest roots.

Every check compares an independent reference walk of the *raw* tables (identity frames) with a
PV-style walk of the *converted* tables (table base mfn -> m2p -> pfn), address by address.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from volatility3_xen.testdata.pvconvert import (
    XEN_PRIVATE_L4_SLOTS,
    LargePageNotContiguousError,
    assign_machine_frames,
    convert_page_tables,
    machine_to_pseudo,
)

PAGE = 4096
P, RW, US, A, D, PS, G = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80, 0x100
PAT_4K = 0x80  # bit 7 of an L1 entry
PAT_LARGE = 1 << 12  # bit 12 of a 2 MiB / 1 GiB entry
NX = 1 << 63
FRAME_MASK = 0x000F_FFFF_FFFF_F000
LARGE_MASK = {2: 0x000F_FFFF_FFE0_0000, 3: 0x000F_FFFF_C000_0000}
TABLE_FLAGS = P | RW | US | A | D

FrameToPfn = Callable[[int], Optional[int]]
Translation = tuple[str, int, int]  # ("page" | "foreign", pfn or raw frame, leaf flag bits)


# --------------------------------------------------------------------------------------------
# Reference page walker, written independently of the converter.


def translate(entries: np.ndarray, root_pfn: int, va: int, to_pfn: FrameToPfn) -> Translation:
    """Walk 4 levels for ``va``; ``to_pfn`` maps a frame found in an entry to a pfn or None."""
    table = root_pfn
    for level in (4, 3, 2, 1):
        index = (va >> (12 + 9 * (level - 1))) & 511
        entry = int(entries[table * 512 + index])
        if not entry & P:
            return ("absent", level, entry)
        if level in LARGE_MASK and entry & PS:
            span = 512 ** (level - 1)
            frame = ((entry & LARGE_MASK[level]) >> 12) + ((va >> 12) & (span - 1))
            return _leaf(frame, entry & ~LARGE_MASK[level], to_pfn)
        frame = (entry & FRAME_MASK) >> 12
        if level == 1:
            return _leaf(frame, entry & ~FRAME_MASK, to_pfn)
        next_table = to_pfn(frame)
        if next_table is None:
            return ("foreign-table", frame, entry & ~FRAME_MASK)
        table = next_table
    raise AssertionError("unreachable")


def _leaf(frame: int, flags: int, to_pfn: FrameToPfn) -> Translation:
    pfn = to_pfn(frame)
    return ("foreign", frame, flags) if pfn is None else ("page", pfn, flags)


def leaf_mappings(
    entries: np.ndarray, table: int, level: int = 4, va: int = 0
) -> Iterator[tuple[int, int]]:
    """Every (virtual address, level) of a present leaf reachable in the raw tables."""
    n_pfns = len(entries) // 512
    rows = entries[table * 512 : table * 512 + 512]
    for index in np.flatnonzero(rows & 1).tolist():
        entry = int(rows[index])
        child_va = va | (index << (12 + 9 * (level - 1)))
        frame = (entry & FRAME_MASK) >> 12
        if level == 1 or (level in LARGE_MASK and entry & PS):
            yield child_va, level
        elif frame < n_pfns:
            yield from leaf_mappings(entries, frame, level - 1, child_va)


def raw_frames(n_pfns: int) -> FrameToPfn:
    return lambda frame: frame if frame < n_pfns else None


def pv_frames(mfn_of_pfn: np.ndarray) -> FrameToPfn:
    m2p = {int(mfn): pfn for pfn, mfn in enumerate(mfn_of_pfn.tolist())}
    return m2p.get


def assert_same_translations(
    raw: np.ndarray, converted: np.ndarray, mfn_of_pfn: np.ndarray, roots: list[int]
) -> int:
    """Check every leaf VA of every root (2 MiB/1 GiB pages at 3 sub-pages); return the count."""
    to_raw, to_pv = raw_frames(len(raw) // 512), pv_frames(mfn_of_pfn)
    checked = 0
    for root in roots:
        for va, level in leaf_mappings(raw, root // PAGE):
            span = 512 ** (level - 1)
            for sub in sorted({0, span // 2, span - 1}):
                address = va + sub * PAGE
                expected = translate(raw, root // PAGE, address, to_raw)
                assert expected[0] in ("page", "foreign")
                got = translate(converted, root // PAGE, address, to_pv)
                assert got == expected, f"root {root:#x} va {address:#x}: {got} != {expected}"
                checked += 1
    return checked


# --------------------------------------------------------------------------------------------
# assign_machine_frames / machine_to_pseudo


def test_assign_machine_frames_is_chunked_distinct_and_deterministic() -> None:
    n_pfns = 512 * 40 + 100  # a partial last chunk
    mfns = assign_machine_frames(n_pfns, seed=7)
    assert mfns.dtype == np.uint64 and mfns.shape == (n_pfns,)
    assert len(np.unique(mfns)) == n_pfns
    np.testing.assert_array_equal(mfns, assign_machine_frames(n_pfns, seed=7))
    assert not np.array_equal(mfns, assign_machine_frames(n_pfns, seed=8))

    starts = mfns[::512].astype(np.int64)
    assert np.all(starts % 512 == 0)
    for chunk, start in enumerate(starts.tolist()):
        run = mfns[chunk * 512 : (chunk + 1) * 512].astype(np.int64)
        np.testing.assert_array_equal(run, start + np.arange(len(run)))
    high = starts >= 0x100000
    assert int(high.sum()) == round(41 * 0.5)
    assert np.all(starts[~high] + 512 <= 0xC0000)  # low chunks avoid the 3..4 GiB MMIO hole
    # Not the identity order: chunks really are shuffled.
    assert not np.all(np.diff(starts) > 0)


def test_assign_machine_frames_options_and_errors() -> None:
    all_low = assign_machine_frames(2048, seed=1, high_fraction=0.0)
    assert int(all_low.max()) < 0xC0000
    all_high = assign_machine_frames(2048, seed=1, high_fraction=1.0)
    assert int(all_high.min()) >= 0x100000
    gib = assign_machine_frames(262144 + 5, seed=3, chunk_pages=262144)
    assert int(gib[0]) % 262144 == 0
    np.testing.assert_array_equal(gib[:262144] - gib[0], np.arange(262144, dtype=np.uint64))
    assert len(assign_machine_frames(0, seed=1)) == 0
    for bad in (
        {"chunk_pages": 384},
        {"high_fraction": 1.5},
        {"machine_frames": 0x1000},
        {"machine_frames": 0x100000 + 512, "high_fraction": 1.0},
    ):
        with pytest.raises(ValueError):
            assign_machine_frames(4096, seed=1, **bad)


def test_machine_to_pseudo_inverts_and_rejects_foreign_frames() -> None:
    mfns = assign_machine_frames(3000, seed=5, chunk_pages=64)
    pfns = np.array([0, 1, 63, 64, 2999])
    np.testing.assert_array_equal(machine_to_pseudo(mfns, mfns[pfns]), pfns)
    foreign = int(mfns.max()) + 1
    np.testing.assert_array_equal(machine_to_pseudo(mfns, [foreign, 0xFEE00]), [-1, -1])
    np.testing.assert_array_equal(machine_to_pseudo(np.zeros(0, np.uint64), [5]), [-1])


# --------------------------------------------------------------------------------------------
# Synthetic guest

N_PFNS = 1536  # 6 MiB: room for a 2 MiB page at pfn 512 and one at pfn 1024


def _set(image: np.ndarray, pfn: int, index: int, value: int) -> None:
    image.view("<u8")[pfn * 512 + index] = value


def build_synthetic_guest() -> tuple[np.ndarray, list[int], set[int]]:
    """Two processes' tables; returns (image, L4 roots, pfns of every table page)."""
    image = np.zeros(N_PFNS * PAGE, dtype=np.uint8)
    # Recognisable data in every page, so unchanged pages can be compared byte for byte.
    image.view("<u8")[:] = np.arange(N_PFNS * 512, dtype=np.uint64) * 0x9E3779B97F4A7C15
    for table in range(1, 10):
        image[table * PAGE : (table + 1) * PAGE] = 0
    l4_a, l4_b, l3_user, l3_kernel, l2_user, l1_user, l2_kernel, l1_kernel, l3_other = range(1, 10)

    # Both L4s share the user and kernel L3 (and the kernel one must be converted once).
    for l4 in (l4_a, l4_b):
        _set(image, l4, 0, (l3_user << 12) | TABLE_FLAGS)
        _set(image, l4, 511, (l3_kernel << 12) | P | RW | A)
    _set(image, l4_a, 5, (l4_a << 12) | P | RW | A | D)  # self-referencing slot
    _set(image, l4_b, 1, (l3_other << 12) | TABLE_FLAGS)
    # Out-of-image frames sit in the 3..4 GiB MMIO hole, as a real guest's would.
    _set(image, l4_b, 2, (0xFEB00 << 12) | TABLE_FLAGS)  # L3 pointer beyond the image

    _set(image, l3_user, 0, (l2_user << 12) | TABLE_FLAGS)
    _set(image, l3_user, 3, (l3_user << 12) | TABLE_FLAGS)  # loop: an L3 used as its own L2
    _set(image, l2_user, 0, (l1_user << 12) | TABLE_FLAGS)
    # 2 MiB page with PAT, global, NX and software bits 52..62 set.
    _set(image, l2_user, 1, NX | (0x7FF << 52) | (512 << 12) | PAT_LARGE | G | PS | D | A | P | US)
    _set(image, l2_user, 2, (0xFE000 << 12) | PS | P | RW)  # 2 MiB page beyond the image

    _set(image, l1_user, 0, (10 << 12) | P | RW | US | A | D)
    _set(image, l1_user, 1, NX | (0x5A5 << 52) | (11 << 12) | P | US | A)
    _set(image, l1_user, 2, (12 << 12) | PAT_4K | P | RW | US)  # 4 KiB page with PAT
    _set(image, l1_user, 3, NX | (0xFEE00 << 12) | P | RW | 0x18)  # MMIO (LAPIC), PCD|PWT
    _set(image, l1_user, 4, ((~(13 << 12)) & FRAME_MASK) | G | A)  # PROT_NONE, inverted
    _set(image, l1_user, 5, 0x3F00_0000_0000_0E00)  # swap entry, not present
    _set(image, l1_user, 6, (l4_a << 12) | P | US)  # a table page mapped as data
    _set(image, l1_user, 511, (N_PFNS - 1 << 12) | P | RW)  # last page of the image

    _set(image, l3_kernel, 0, (l2_kernel << 12) | P | RW | A | D)
    _set(image, l3_kernel, 1, (0xFEC00 << 12) | P | RW)  # L2 pointer beyond the image
    _set(image, l2_kernel, 0, (1024 << 12) | PAT_LARGE | G | PS | P | RW | A | D)
    _set(image, l2_kernel, 1, (l1_kernel << 12) | P | RW)
    _set(image, l1_kernel, 0, NX | (20 << 12) | G | P | RW)
    _set(image, l1_kernel, 7, (l1_kernel << 12) | P)  # maps itself as data

    _set(image, l3_other, 3, (0xC0000 << 12) | PS | P | RW)  # 1 GiB page beyond the image

    return image, [l4_a << 12, l4_b << 12, l4_a << 12], set(range(1, 10))


def test_synthetic_conversion_preserves_every_mapping_and_flag() -> None:
    raw, roots, table_pfns = build_synthetic_guest()
    converted = raw.copy()
    mfns = assign_machine_frames(N_PFNS, seed=11)
    report = convert_page_tables(converted, roots, mfns)

    assert report.tables == {4: 2, 3: 3, 2: 2, 1: 2}
    assert report.large_pages == {3: 0, 2: 2}
    assert report.out_of_range == {4: 1, 3: 2, 2: 1, 1: 1}
    assert report.out_of_range_owned == 0
    assert report.protnone_left == 1
    assert report.level_conflicts == 2  # L4 self reference, L3 used as L2
    assert report.xen_slots_filled == 0 and report.xen_slot_mfns == ()
    assert set(report.table_pfns) == table_pfns

    raw_q, conv_q = raw.view("<u8"), converted.view("<u8")
    # Only table pages change, and in them only the frame field of present entries.
    for pfn in range(N_PFNS):
        old, new = raw_q[pfn * 512 : pfn * 512 + 512], conv_q[pfn * 512 : pfn * 512 + 512]
        if pfn not in table_pfns:
            np.testing.assert_array_equal(old, new)
            continue
        assert not np.any((old ^ new) & np.uint64(~FRAME_MASK & (2**64 - 1)))
        np.testing.assert_array_equal(old[(old & 1) == 0], new[(old & 1) == 0])
    # Every present in-image entry now holds the mfn of its pfn (2 MiB: of its first pfn).
    assert int(conv_q[5 * 512 + 1]) & LARGE_MASK[2] == int(mfns[512]) << 12
    assert int(conv_q[5 * 512 + 1]) & PAT_LARGE  # PAT kept
    assert int(conv_q[6 * 512 + 2]) & FRAME_MASK == int(mfns[12]) << 12
    assert conv_q[6 * 512 + 3] == raw_q[6 * 512 + 3]  # MMIO left as it is

    checked = assert_same_translations(raw_q, conv_q, mfns, roots)
    # Leaves: A and B reach the same 9 user-L1 + kernel leaves, plus A's self-referencing views.
    assert checked > 40
    # Spot-check concrete addresses through the PV walk.
    to_pv = pv_frames(mfns)
    assert translate(conv_q, 1, 0x0000, to_pv)[:2] == ("page", 10)
    assert translate(conv_q, 1, 0x2000, to_pv) == ("page", 12, PAT_4K | P | RW | US)
    assert translate(conv_q, 1, 0x200000 + 0x5000, to_pv)[:2] == ("page", 512 + 5)
    assert translate(conv_q, 1, 0x3000, to_pv)[:2] == ("foreign", 0xFEE00)
    kernel_2m = (511 << 39) + 0x34 * PAGE
    assert translate(conv_q, 2, kernel_2m, to_pv)[:2] == ("page", 1024 + 0x34)


def test_xen_private_slots_point_at_frames_the_guest_does_not_own() -> None:
    raw, roots, _ = build_synthetic_guest()
    _set(raw, 2, 260, (3 << 12) | TABLE_FLAGS)  # B already uses slot 260: must stay
    converted = raw.copy()
    mfns = assign_machine_frames(N_PFNS, seed=2)
    report = convert_page_tables(converted, roots, mfns, xen_private_slots=True)

    assert report.xen_slots_filled == 2 * 16 - 1
    assert len(set(report.xen_slot_mfns)) == 16
    assert np.all(machine_to_pseudo(mfns, report.xen_slot_mfns) == -1)
    conv_q = converted.view("<u8")
    for l4 in (1, 2):
        for slot, mfn in zip(XEN_PRIVATE_L4_SLOTS, report.xen_slot_mfns):
            entry = int(conv_q[l4 * 512 + slot])
            if (l4, slot) == (2, 260):
                assert entry == (int(mfns[3]) << 12) | TABLE_FLAGS
            else:
                assert entry & P and (entry & FRAME_MASK) >> 12 == mfn
                assert translate(conv_q, l4, slot << 39, pv_frames(mfns))[0] == "foreign-table"
    assert_same_translations(raw.view("<u8"), conv_q, mfns, [PAGE])


def test_large_page_needs_machine_contiguous_frames_and_image_is_left_untouched() -> None:
    raw, roots, _ = build_synthetic_guest()
    image = raw.copy()
    scattered = assign_machine_frames(N_PFNS, seed=4, chunk_pages=8)
    with pytest.raises(LargePageNotContiguousError, match="2 MiB"):
        convert_page_tables(image, roots, scattered)
    np.testing.assert_array_equal(image, raw)


def test_one_gib_page_converts_only_with_gib_chunks() -> None:
    n_pfns = 262144 + 512  # 1 GiB + 2 MiB, zero pages allocated lazily
    image = np.zeros(n_pfns * PAGE, dtype=np.uint8)
    _set(image, 262144, 0, ((262144 + 1) << 12) | TABLE_FLAGS)  # L4 -> L3
    _set(image, 262145, 1, PAT_LARGE | NX | PS | P | RW)  # L3[1]: 1 GiB page at pfn 0
    roots = [262144 * PAGE]
    tables_before = image[262144 * PAGE :].copy()
    with pytest.raises(LargePageNotContiguousError, match="chunk_pages=262144"):
        convert_page_tables(image, roots, assign_machine_frames(n_pfns, seed=1))
    np.testing.assert_array_equal(image[262144 * PAGE :], tables_before)

    # No copy of the 1 GiB image: convert in place on the second try.
    mfns = assign_machine_frames(n_pfns, seed=1, chunk_pages=262144)
    report = convert_page_tables(image, roots, mfns)
    assert report.large_pages == {3: 1, 2: 0}
    to_pv = pv_frames(mfns)
    for page in (0, 1, 0x12345, 262143):
        got = translate(image.view("<u8"), 262144, (1 << 30) + page * PAGE, to_pv)
        assert got == ("page", page, PAT_LARGE | NX | PS | P | RW)


def test_rejects_bad_inputs() -> None:
    raw, roots, _ = build_synthetic_guest()
    mfns = assign_machine_frames(N_PFNS, seed=1)
    with pytest.raises(TypeError):
        convert_page_tables(bytes(raw), roots, mfns)
    with pytest.raises(ValueError, match="root"):
        convert_page_tables(raw.copy(), [PAGE + 8], mfns)
    with pytest.raises(ValueError, match="root"):
        convert_page_tables(raw.copy(), [N_PFNS * PAGE], mfns)
    with pytest.raises(ValueError, match="one entry per image page"):
        convert_page_tables(raw.copy(), roots, mfns[:-1])
    duplicated = mfns.copy()
    duplicated[1] = duplicated[0]
    with pytest.raises(ValueError, match="same machine frame"):
        convert_page_tables(raw.copy(), roots, duplicated)
    # A bytearray is converted in place too.
    buffer = bytearray(raw.tobytes())
    assert convert_page_tables(buffer, roots, mfns).tables[4] == 2
    assert bytes(buffer) != raw.tobytes()


# --------------------------------------------------------------------------------------------
# Real guest (imageC): roots from README.md / factsC.json

REAL_ROOTS = [
    0x6010000,  # kernel DTB (init_top_pgt)
    0x105E000,  # init
    0x292C000,  # demo_server
    0x27B4000,  # demo_shell
    0x27BE000,  # demo_worker
    0x28FE000,  # demo_worker
    0x2942000,  # sleep
    0x29FC000,  # sleep
    0x28FC000,  # sleep
    0x28A8000,  # sleep (CR3 at capture)
]


def test_real_guest_pv_walk_matches_raw_walk(guest_image: Path) -> None:
    raw = np.fromfile(guest_image, dtype=np.uint8)
    converted = raw.copy()
    n_pfns = len(raw) // PAGE
    mfns = assign_machine_frames(n_pfns, seed=2024)
    report = convert_page_tables(converted, REAL_ROOTS, mfns, xen_private_slots=True)

    # Facts of imageC: no PTI user tables, no 1 GiB pages, Xen's slots free, 4 MMIO PTEs.
    assert report.tables == {4: 10, 3: 87, 2: 25, 1: 52}
    assert report.large_pages == {3: 0, 2: 74}
    assert report.out_of_range == {4: 0, 3: 0, 2: 0, 1: 4}
    assert report.out_of_range_owned == 0
    assert report.xen_slots_filled == 16 * len(REAL_ROOTS)

    raw_q, conv_q = raw.view("<u8"), converted.view("<u8")
    to_raw, to_pv = raw_frames(n_pfns), pv_frames(mfns)
    dtb = 0x6010000 // PAGE
    init_task = translate(conv_q, dtb, 0xFFFFFFFFB5A1AA40, to_pv)
    assert init_task[:2] == ("page", 0x601AA40 // PAGE)
    # linux_banner: the kernel image is mapped at virt - phys = 0xffffffffafa00000.
    banner_phys = 91355648
    banner = translate(conv_q, dtb, 0xFFFFFFFFAFA00000 + banner_phys, to_pv)
    assert banner[:2] == ("page", banner_phys // PAGE)
    assert raw[banner_phys : banner_phys + 13].tobytes() == b"Linux version"
    # The per-CPU area through the direct map (GS_BASE at capture), via the current CR3.
    gs = translate(conv_q, 0x28A8000 // PAGE, 0xFFFF8D6E87A00000, to_pv)
    assert gs == translate(raw_q, 0x28A8000 // PAGE, 0xFFFF8D6E87A00000, to_raw)
    assert gs[0] == "page"
    # Every mapping of every root agrees.
    assert assert_same_translations(raw_q, conv_q, mfns, REAL_ROOTS) > 10000


def test_find_page_table_roots_on_real_guest(guest_image: Path, symbols_dir: Path) -> None:
    from volatility3_xen.testdata.rawguest import find_page_table_roots

    assert set(find_page_table_roots(guest_image, symbols_dir)) == set(REAL_ROOTS)
