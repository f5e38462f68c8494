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
    return [
        (runs.astype(np.uint64), None),
        (shuffled.astype(np.uint64), None),
        (damaged.astype(np.uint64), None),
        (duplicated.astype(np.uint64), None),
        (padded.astype(np.uint64), None),
        (padded.astype(np.uint64), pv_mfns),
    ]


@pytest.mark.parametrize("chunk", [1, 3, 16, 1 << 18])
@pytest.mark.parametrize("seed", [1, 2])
def test_page_map_equals_reference(monkeypatch, chunk: int, seed: int) -> None:
    monkeypatch.setattr(pagemap, "CHUNK_ENTRIES", chunk)
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
            for pfn, index in expected.items():
                assert page_map.pfn_to_mfn(pfn) == int(gmfns[index])
                assert page_map.mfn_to_pfn(int(gmfns[index])) == pfn


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
