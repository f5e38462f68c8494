"""PageMap's bulk passes against a plain-Python reference, across chunk boundaries, and
the mapped (mmap) table against the read one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from volatility3_xen.formats import pagemap
from volatility3_xen.formats.dumpcore import XenDumpCore
from volatility3_xen.formats.pagemap import INVALID, PageMap
from volatility3_xen.testdata.corewriter import INVALID_PFN, CoreSpec, write_core

MAX_PFN = 1 << 40


def reference_m2p(pfns: list[int], gmfns: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """(pfn -> mfn, mfn -> lowest pfn) by the format's rules: only the first entry of a pfn
    counts, and machine frames at or beyond MAX_PFN (Linux's FOREIGN/IDENTITY bits put them
    there) are no frames of the guest."""
    mfn_of = {
        pfn: gmfns[index]
        for pfn, index in reference_map(pfns, gmfns).items()
        if gmfns[index] < MAX_PFN
    }
    pfn_of: dict[int, int] = {}
    for pfn in sorted(mfn_of):
        pfn_of.setdefault(mfn_of[pfn], pfn)
    return mfn_of, pfn_of


def reference_map(pfns: list[int], gmfns: list[int] | None) -> dict[int, int]:
    """pfn -> page index by the format's rules, one entry at a time (first one wins)."""
    result: dict[int, int] = {}
    for index, pfn in enumerate(pfns):
        if pfn == INVALID_PFN or pfn >= MAX_PFN:
            continue
        if gmfns is not None and gmfns[index] == INVALID_PFN:
            continue
        result.setdefault(pfn, index)
    return result


def reference_runs(mapping: dict[int, int]) -> int:
    """Maximal runs where pfn and page index both advance by one."""
    items = sorted(mapping.items())
    return sum(
        1
        for i, (pfn, index) in enumerate(items)
        if i == 0 or (pfn, index) != (items[i - 1][0] + 1, items[i - 1][1] + 1)
    )


def tables(seed: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(seed)
    runs = np.concatenate(
        [np.arange(s, s + n, dtype=np.uint64) for s, n in ((0, 37), (100, 5), (1 << 20, 60))]
    )
    shuffled = rng.permutation(runs)
    damaged = runs.copy()
    damaged[[3, 50]] = MAX_PFN + 7  # beyond the limit
    damaged[[10, 11]] = INVALID  # padding inside
    duplicated = np.concatenate([runs[:20], runs[5:9], runs[20:]])
    padded = np.concatenate([runs, np.full(4, INVALID, dtype=np.uint64)])
    pv_mfns = rng.permutation(np.arange(5000, 5000 + len(padded))).astype(np.uint64)
    pv_mfns[-4:] = INVALID
    # Linux's p2m flags, a frame beyond the machine limit, one that wraps when shifted by
    # 12, frames shared by two pfns; then the same with a usable frame above 2^32.
    flagged = pv_mfns.copy()
    flagged[[1, 7]] = [(1 << 63) | 5001, (1 << 62) | 5002]
    flagged[[9, 30]] = [MAX_PFN, (1 << 52) | 5003]
    flagged[[40, 41]] = flagged[42]
    wide = flagged.copy()
    wide[50] = 1 << 35
    unsorted_pv = np.concatenate([shuffled, shuffled[:6]]).astype(np.uint64)
    unsorted_mfns = rng.integers(5000, 5040, len(unsorted_pv)).astype(np.uint64)
    return [
        (runs.astype(np.uint64), None),
        (shuffled.astype(np.uint64), None),
        (damaged.astype(np.uint64), None),
        (duplicated.astype(np.uint64), None),
        (padded.astype(np.uint64), None),
        (padded.astype(np.uint64), pv_mfns),
        (padded.astype(np.uint64), flagged),
        (padded.astype(np.uint64), wide),
        (unsorted_pv, unsorted_mfns),
        (damaged.astype(np.uint64), rng.permutation(len(damaged)).astype(np.uint64) + 7),
    ]


@pytest.mark.parametrize("chunk", [1, 3, 16, 1 << 18])
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("few_breaks", [True, False])
def test_page_map_equals_reference(monkeypatch, chunk: int, seed: int, few_breaks: bool) -> None:
    """Both ways of cutting runs: at break positions held in memory (few breaks, a libxc
    table) and by chunked passes that hold none (many breaks: forced here)."""
    monkeypatch.setattr(pagemap, "CHUNK_ENTRIES", chunk)
    if not few_breaks:
        monkeypatch.setattr(pagemap, "_break_limit", lambda length: 2)
    for pfns, gmfns in tables(seed):
        page_map = PageMap(pfns, gmfns, MAX_PFN)
        expected = reference_map(pfns.tolist(), None if gmfns is None else gmfns.tolist())
        got = {pfn: page_map.page_index(pfn) for pfn in expected}
        assert got == expected
        for absent in (38, 99, 105, (1 << 20) + 60, MAX_PFN + 7):
            assert page_map.page_index(absent) is None
        assert page_map.stats.valid == len(expected)
        assert page_map.stats.runs == len(page_map.pfn_runs) == reference_runs(expected)
        if gmfns is not None:
            mfn_of, pfn_of = reference_m2p(pfns.tolist(), gmfns.tolist())
            assert {pfn: page_map.pfn_to_mfn(pfn) for pfn in expected} == {
                pfn: mfn_of.get(pfn) for pfn in expected
            }
            assert expand(page_map.m2p_runs) == pfn_of
            assert maximal(page_map.m2p_runs)
            for mfn in set(gmfns.tolist()) - set(pfn_of):
                assert page_map.mfn_to_pfn(mfn) is None
        assert expand(page_map.pfn_runs) == expected
        assert maximal(page_map.pfn_runs)


def expand(runs: pagemap.Runs, value_step: int = 1) -> dict[int, int]:
    return {
        key + i: value + i * value_step
        for key, value, count in zip(runs.key, runs.value, runs.count)
        for i in range(count)
    }


def maximal(runs: pagemap.Runs, value_step: int = 1) -> bool:
    """Sorted, disjoint, non-empty, and no two neighbours could have been one run."""
    rows = list(zip(runs.key, runs.value, runs.count))
    return all(count > 0 for _, _, count in rows) and all(
        key + count <= next_key and (key + count, value + count * value_step) != (next_key, nv)
        for (key, value, count), (next_key, nv, _) in zip(rows, rows[1:])
    )


@pytest.mark.parametrize("chunk", [1, 2, 5, 1 << 18])
@pytest.mark.parametrize("keep", ["first", "last"])
def test_runs_from_pairs_equals_a_dict(monkeypatch, chunk: int, keep: str) -> None:
    """Unsorted pairs, duplicates first- or last-wins, values that step by 1 or by a page,
    keys too wide to pack beside a position (the argsort path)."""
    monkeypatch.setattr(pagemap, "CHUNK_ENTRIES", chunk)
    rng = np.random.default_rng(chunk)
    for trial in range(60):
        length = int(rng.integers(0, 40))
        high = [4, 64, 1 << 20, 1 << 40, 1 << 62, (1 << 64) - 1][trial % 6]
        keys = rng.integers(0, high, length, dtype=np.uint64, endpoint=True)
        if trial % 3 == 0:
            keys = np.sort(keys)
        step = [1, 4096][trial % 2]
        values = None if trial % 4 == 0 else rng.integers(0, 30, length).astype(np.uint64) * step
        runs, duplicates = pagemap.runs_from_pairs(keys, values, keep=keep, value_step=step)
        reference: dict[int, int] = {}
        for i, key in enumerate(keys.tolist()):
            value = i * (1 if values is None else 0) + (0 if values is None else int(values[i]))
            if keep == "last" or key not in reference:
                reference[key] = value
        if values is None:
            step = 1
        assert expand(runs, step) == reference
        assert maximal(runs, step)
        assert duplicates == length - len(reference)


def test_empty_and_single_entry_maps() -> None:
    empty = np.zeros(0, dtype=np.uint64)
    assert len(pagemap.Runs.from_sorted(empty)) == 0
    assert len(pagemap.runs_from_pairs(empty)[0]) == 0
    one = PageMap(np.array([5], np.uint64), np.array([9], np.uint64), MAX_PFN)
    assert (one.page_index(5), one.pfn_to_mfn(5), one.mfn_to_pfn(9)) == (0, 9, 5)
    none = PageMap(np.array([5], np.uint64), np.array([INVALID], np.uint64), MAX_PFN)
    assert none.stats.valid == 0 and len(none.m2p_runs) == 0


def test_m2p_packing_never_joins_across_a_pfn_wrap() -> None:
    """mfn k -> the highest pfn and mfn k+2 -> pfn 0 differ by exactly (1 << b) + 1 when
    pfns are packed in b = bits(highest pfn) bits: they must stay two runs."""
    pfns = np.array([0, 1, 0x7FFF], dtype=np.uint64)
    gmfns = np.array([0x102, 0x200, 0x100], dtype=np.uint64)
    page_map = PageMap(pfns, gmfns, MAX_PFN)
    assert expand(page_map.m2p_runs) == {0x102: 0, 0x200: 1, 0x100: 0x7FFF}
    assert page_map.mfn_to_pfn(0x101) is None


def test_flagged_machine_frames_warn_and_have_no_mfn() -> None:
    pfns = np.arange(4, dtype=np.uint64)
    gmfns = np.array([0x10, (1 << 63) | 0x11, (1 << 62) | 0x12, (1 << 52) | 0x10], np.uint64)
    page_map = PageMap(pfns, gmfns, MAX_PFN)
    assert [page_map.pfn_to_mfn(pfn) for pfn in range(4)] == [0x10, None, None, None]
    assert [page_map.page_index(pfn) for pfn in range(4)] == [0, 1, 2, 3]
    assert expand(page_map.m2p_runs) == {0x10: 0}
    assert page_map.warnings == [
        "2 table entries carry Linux's FOREIGN_FRAME_BIT (bit 63) or IDENTITY_FRAME_BIT "
        "(bit 62) in their machine frame: not frames of this guest; those pfns keep their "
        "pages but have no machine frame",
        "1 table entries name machine frames beyond the machine address limit "
        f"(mfn >= {MAX_PFN:#x}); those pfns keep their pages but have no machine frame",
    ]


def test_fragmented_maps_stay_within_their_memory_bounds(monkeypatch) -> None:
    """Allocation bounds (tracemalloc, numpy included), not timings: a shuffled 1 Mi-entry
    HVM table peaks at about its three run columns (3x the table); a PV table whose machine
    frames are shuffled page by page keeps maps under 2x the table.  The old union1d and
    argsort/gather code peaked at over 10x.  (Chunks of 16 Ki entries, as 256 Ki-entry
    chunk temporaries are large beside a 1 Mi-entry table.)"""
    import tracemalloc

    monkeypatch.setattr(pagemap, "CHUNK_ENTRIES", 1 << 14)
    rng = np.random.default_rng(10)
    table = rng.permutation(1 << 20).astype(np.uint64)
    tracemalloc.start()
    page_map = PageMap(table, None, MAX_PFN)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(page_map.pfn_runs) > 0.99 * len(table)
    assert peak <= 3.1 * table.nbytes, peak / table.nbytes
    for pfn in rng.integers(0, len(table), 500):
        assert table[page_map.page_index(int(pfn))] == pfn
    del page_map

    entries = 1 << 18
    raw = np.empty(2 * entries, dtype=np.uint64)
    raw[0::2] = np.arange(entries)
    raw[1::2] = rng.permutation(entries) + 0x100000
    tracemalloc.start()
    page_map = PageMap(raw[0::2], raw[1::2], MAX_PFN)
    runs = page_map.m2p_runs
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(runs) > entries * 0.99
    assert page_map.nbytes() <= 2 * raw.nbytes, page_map.nbytes() / raw.nbytes
    assert peak <= 2.5 * raw.nbytes, peak / raw.nbytes
    for pfn in rng.integers(0, entries, 500):
        assert page_map.mfn_to_pfn(int(raw[2 * pfn + 1])) == pfn


def test_step_breaks_matches_a_loop(monkeypatch) -> None:
    values = np.array([0, 1, 2, 5, 6, 4, 5, 9, 9, 10], dtype=np.uint64)
    expected = [i for i in range(len(values) - 1) if int(values[i + 1]) != int(values[i]) + 1]
    for chunk in (1, 2, 4, 100):
        monkeypatch.setattr(pagemap, "CHUNK_ENTRIES", chunk)
        assert pagemap.step_breaks(values).tolist() == expected
    assert pagemap.step_breaks(values[:1]).tolist() == []
    assert pagemap.step_breaks(values[:0]).tolist() == []


@pytest.mark.parametrize("kind", ["hvm", "pv"])
def test_mapped_table_gives_the_same_map_as_a_read_one(tmp_path: Path, kind: str) -> None:
    pfns = np.array([0, 1, 2, 9, 4, INVALID_PFN], dtype=np.uint64)
    gmfns = np.array([7, 3, 11, 12, 13, INVALID_PFN], dtype=np.uint64) if kind == "pv" else None
    path = tmp_path / "core"
    write_core(path, CoreSpec(kind=kind, pfns=pfns, gmfns=gmfns))
    mapped = XenDumpCore.open(path)
    data = path.read_bytes()
    plain = XenDumpCore(lambda offset, length: data[offset : offset + length], len(data))
    assert mapped._map_region is not None and plain._map_region is None
    assert mapped.page_map.stats == plain.page_map.stats
    assert mapped.page_map.pfn_runs == plain.page_map.pfn_runs
    assert mapped.warnings == plain.warnings
