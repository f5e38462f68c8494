"""The machine layer (``XenMachineLayer``) against a dict oracle, fuzzed (``pytest -m fuzz``).

A small PV (or HVM) core is written from drawn ``(pfn, gmfn)`` entries whose pages are tagged
with their table index and pfn (``corecraft.tagged_page``), so a machine address that reaches
the wrong page can never look right.  The oracle applies the format's rules one entry at a
time with plain dicts: ``~0`` padding and pfns >= 2^(52-shift) map nothing, a pfn listed twice
keeps its first page, a machine frame >= 2^(52-shift) (Linux's FOREIGN/IDENTITY bits 63/62
put it there) is no frame of the guest, a frame listed for two pfns belongs to the lower one.
Every frame the oracle knows must read its page through the machine layer, and every other
frame drawn (plus the frames its address would wrap onto modulo 2^64, and neighbours) must be
invalid.  ``pfn_to_mfn``/``mfn_to_pfn`` are compared too.
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from array import array
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from volatility3.framework import contexts, exceptions

from volatility3_xen.formats import dumpcore
from volatility3_xen.formats.pagemap import PageMap, Runs
from volatility3_xen.layers import memory

from .corecraft import INVALID, make_core, tagged_page
from .test_fuzz import PROFILE

pytestmark = pytest.mark.fuzz

SHIFT = 12
LIMIT = 1 << (52 - SHIFT)  # pfns and machine frames at or above it are damage
WRAP = 1 << (64 - SHIFT)  # frames whose byte address wraps around 2^64
_TMP = Path(tempfile.mkdtemp(prefix="vx3-machine-"))
atexit.register(shutil.rmtree, _TMP, True)
_COUNTER = itertools.count()

PFNS = st.one_of(
    st.integers(0, 12),
    st.sampled_from([0x100, 0x101, 0xFFFFF, LIMIT - 1, LIMIT, LIMIT + 0x10, 1 << 52, INVALID]),
)
GMFNS = st.one_of(
    st.integers(0x10, 0x20),
    st.sampled_from(
        [
            0,
            LIMIT - 1,
            LIMIT,
            (1 << 52) | 0x10,  # wraps onto 0x10 when shifted by 12 in 64 bits
            WRAP - 1,
            WRAP | 0x11,
            (1 << 63) | 0x12,  # Linux FOREIGN_FRAME_BIT
            (1 << 62) | 0x13,  # Linux IDENTITY_FRAME_BIT
            (3 << 62) | 0x14,
            INVALID,
        ]
    ),
)
TABLES = st.lists(st.tuples(PFNS, GMFNS), min_size=1, max_size=14)


def oracle(entries: list[tuple[int, int]], kind: str) -> tuple[dict, dict, dict]:
    """(pfn -> page index, pfn -> mfn, mfn -> pfn) by the rules, one entry at a time."""
    index_of: dict[int, int] = {}
    mfn_of: dict[int, int] = {}
    for index, (pfn, gmfn) in enumerate(entries):
        if pfn == INVALID or pfn >= LIMIT or pfn in index_of:
            continue
        if kind == "pv" and gmfn == INVALID:
            continue
        index_of[pfn] = index
        if kind == "pv" and gmfn < LIMIT:
            mfn_of[pfn] = gmfn
    if kind == "hvm":
        mfn_of = {pfn: pfn for pfn in index_of}
    pfn_of: dict[int, int] = {}
    for pfn in sorted(mfn_of):
        pfn_of.setdefault(mfn_of[pfn], pfn)
    return index_of, mfn_of, pfn_of


def open_machine(entries: list[tuple[int, int]], kind: str):
    pfns = [pfn for pfn, _ in entries]
    gmfns = [gmfn for _, gmfn in entries] if kind == "pv" else None
    core = make_core(kind, pfns=pfns, gmfns=gmfns)
    path = _TMP / f"core-{next(_COUNTER)}"
    path.write_bytes(core.data)
    context = contexts.Context()
    xen = memory.open_core(context, path)
    machine = context.layers[memory.add_machine_layer(context, xen)]
    return context, context.layers[xen], machine


def check(entries: list[tuple[int, int]], kind: str = "pv") -> None:
    index_of, mfn_of, pfn_of = oracle(entries, kind)
    if not index_of:
        return  # nothing usable: the core is refused (tested elsewhere)
    context, xen, machine = open_machine(entries, kind)
    try:
        for pfn, index in index_of.items():
            assert xen.pfn_to_mfn(pfn) == mfn_of.get(pfn), (pfn, index)
        for mfn, pfn in pfn_of.items():
            expected = tagged_page(index_of[pfn], pfn, 1 << SHIFT)
            assert xen.mfn_to_pfn(mfn) == pfn
            assert machine.is_valid(mfn << SHIFT, 1 << SHIFT), hex(mfn)
            assert machine.read(mfn << SHIFT, 1 << SHIFT) == expected, hex(mfn)
            assert machine.read((mfn << SHIFT) + 0xFF8, 8) == expected[0xFF8:]
        drawn = {gmfn for _, gmfn in entries} | {pfn for pfn, _ in entries}
        probes = set()
        for frame in drawn | set(pfn_of):
            for near in (frame - 1, frame, frame + 1):
                probes |= {near, (near << SHIFT) % (1 << 64) >> SHIFT}
        for frame in sorted(probes - set(pfn_of)):
            if frame < 0 or frame >= WRAP:
                continue
            assert xen.mfn_to_pfn(frame) is None, hex(frame)
            assert not machine.is_valid(frame << SHIFT), hex(frame)
            with pytest.raises(exceptions.InvalidAddressException):
                machine.read(frame << SHIFT, 8)
        # A whole-range walk yields exactly the oracle's frames, each to its pfn's page.
        mapped = {}
        for offset, length, target, _, _ in machine.mapping(
            0, machine.maximum_address + 1, ignore_errors=True
        ):
            for k in range(0, length, 1 << SHIFT):
                mapped[(offset + k) >> SHIFT] = (target + k) >> SHIFT
        assert mapped == pfn_of
    finally:
        context.layers[xen.config["base_layer"]].destroy()


# Every input that ever broke the machine layer, replayed on every run.
REGRESSIONS: list[tuple[str, list[tuple[int, int]]]] = [
    # issue 10 item 4: gmfn (1<<52)|0x10 shifted into uint64 wrapped onto machine address
    # 0x10000, which then read another pfn's page, and broke the bisect for valid frames.
    ("pv", [(0, 0x11), (1, (1 << 52) | 0x10), (2, 0x10), (3, 0x12)]),
    # Linux's p2m flags (FOREIGN bit 63, IDENTITY bit 62) on otherwise valid frames.
    ("pv", [(0, (1 << 63) | 0x10), (1, 0x10), (2, (1 << 62) | 0x11), (3, 0x11)]),
    # the wrap point itself, and a frame just below the machine limit.
    ("pv", [(0, WRAP), (1, 0), (2, LIMIT - 1), (3, LIMIT)]),
    # one frame shared by two pfns (the lower wins), unsorted pfns, a duplicate pfn.
    ("pv", [(5, 0x15), (2, 0x15), (5, 0x16), (3, 0x17)]),
]


@pytest.mark.parametrize(("kind", "entries"), REGRESSIONS)
def test_machine_layer_regressions(kind: str, entries: list[tuple[int, int]]) -> None:
    check(entries, kind)


def test_unusable_machine_frames_are_reported() -> None:
    entries = [(0, 0x11), (1, (1 << 52) | 0x10), (2, (1 << 63) | 0x10), (3, 0x12)]
    context, xen, _ = open_machine(entries, "pv")
    try:
        warnings = "\n".join(xen.core.warnings)
        assert "1 table entries carry Linux's FOREIGN_FRAME_BIT" in warnings
        assert "1 table entries name machine frames beyond the machine address limit" in warnings
        # Their pfns keep their pages in the pseudo-physical layer.
        assert xen.read(1 << SHIFT, 16) == tagged_page(1, 1, 1 << SHIFT)[:16]
        assert xen.read(2 << SHIFT, 16) == tagged_page(2, 2, 1 << SHIFT)[:16]
    finally:
        context.layers[xen.config["base_layer"]].destroy()


def test_machine_layer_cuts_frames_that_would_wrap(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence in depth: a frame map from any source whose frames reach 2^(64-shift)
    (here a page map told to accept every frame) never wraps onto low machine addresses."""
    monkeypatch.setattr(
        dumpcore, "PageMap", lambda pfns, gmfns, max_pfn: PageMap(pfns, gmfns, max_pfn, 1 << 64)
    )
    entries = [(0, 0x11), (1, WRAP | 0x10), (2, 0x10), (3, WRAP - 1), (4, WRAP - 2)]
    context, xen, machine = open_machine(entries, "pv")
    try:
        assert machine.read(0x10 << SHIFT, 16) == tagged_page(2, 2, 1 << SHIFT)[:16]
        assert machine.read(0x11 << SHIFT, 16) == tagged_page(0, 0, 1 << SHIFT)[:16]
        top = (WRAP - 1) << SHIFT
        assert machine.read(top, 16) == tagged_page(3, 3, 1 << SHIFT)[:16]
        assert machine.read(top - (1 << SHIFT), 16) == tagged_page(4, 4, 1 << SHIFT)[:16]
        assert machine.maximum_address == (1 << 64) - 1
        assert "1 machine frames lie beyond the 64-bit machine address space" in caplog.text
    finally:
        context.layers[xen.config["base_layer"]].destroy()


def test_runs_below_against_a_dict() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        limit = int(rng.integers(1, 40))
        keys = sorted(set(rng.integers(0, 48, 6).tolist()))
        runs = [(k, int(rng.integers(0, 99)), int(rng.integers(1, 4))) for k in keys]
        runs = [r for i, r in enumerate(runs) if i == 0 or runs[i - 1][0] + runs[i - 1][2] <= r[0]]
        source = Runs(*(array("Q", [r[i] for r in runs]) for i in range(3)))
        cut, dropped = memory._runs_below(source, limit)
        full = {k + i: v + i for k, v, c in runs for i in range(c)}
        got = {k + i: v + i for k, v, c in zip(cut.key, cut.value, cut.count) for i in range(c)}
        assert got == {k: v for k, v in full.items() if k < limit}
        assert dropped == len(full) - len(got)
        assert all(c > 0 for c in cut.count)


@settings(settings.get_profile(PROFILE), max_examples=120 if PROFILE == "ci" else 3000)
@given(entries=TABLES, kind=st.sampled_from(["pv", "pv", "pv", "hvm"]))
def test_fuzz_machine_layer(entries: list[tuple[int, int]], kind: str) -> None:
    check(entries, kind)
