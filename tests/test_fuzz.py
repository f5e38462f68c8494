"""Structure-aware fuzzing of the dump-core parser, layer and stacker (``pytest -m fuzz``).

Small tagged cores from ``writer.py`` are damaged by a short list of *recipes*: header fields,
section headers, notes, table entries, truncation, swapped headers, appended junk and raw byte
flips.  Each recipe is plain data, so every input that ever broke the reader is kept below in
``REGRESSIONS`` and replayed on every run.  Properties checked in-process:

- constructing ``XenDumpCore`` (page map included) raises nothing but XenCoreFormatException;
- every mapped page lies wholly inside the file at the index of the first usable table entry
  naming its pfn; when only the table, header counts, the tail or appended bytes were touched,
  the mapping equals the oracle's exactly (``corecraft.expected_map``);
- the stacker on a FileLayer returns a layer or None, never raises; through the layer every
  mapped page reads the file's bytes and other reads raise only InvalidAddressException;
- each example finishes within 5 s (hypothesis deadline: a guard against work that grows with a
  header field, not a performance test).

Memory is checked by ``test_construction_memory_is_bounded``: a sample of mutated files is
opened in a subprocess under ``RLIMIT_AS`` = 3 GiB.

Profiles: ``ci`` (default; derandomized, bounded to well under two minutes) and ``long``
(``VX3_FUZZ=long``: thousands of random examples).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from datetime import timedelta
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from volatility3.framework import contexts, exceptions
from volatility3.framework.layers.physical import FileLayer

from volatility3_xen import layer as xen_layer
from volatility3_xen.errors import XenCoreFormatException

from .corecraft import (
    INVALID,
    Core,
    assert_view_is_sound,
    expected_map,
    make_core,
    open_bytes,
    set_ehdr,
    set_entry,
    set_header,
    set_note,
    set_shdr,
    swap_shdrs,
)

pytestmark = pytest.mark.fuzz

settings.register_profile(
    "ci",
    max_examples=1000,
    derandomize=True,
    deadline=timedelta(seconds=5),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=5000,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = "long" if os.environ.get("VX3_FUZZ") == "long" else "ci"

# --- base cores -------------------------------------------------------------------------------

BASES = {
    "hvm": dict(kind="hvm"),
    "pv": dict(kind="pv"),
    "hvm-be": dict(kind="hvm", byteorder="big"),
    "pv-32": dict(kind="pv", elf_class=32),
    "hvm-shinfo-pad": dict(kind="hvm", pfns=[0, 1, 2, 5, 6, 9, INVALID, INVALID],
                           shared_info=b"\1" * 64),
    "pv-2vcpu-unsorted": dict(kind="pv", pfns=[3, 1, 2, 0, 7, 6, 5, 4],
                              vcpus=[b"\1" * 16, b"\2" * 16]),
}  # fmt: skip


@cache
def base_core(name: str) -> Core:
    fields = dict(BASES[name])
    return make_core(fields.pop("kind"), **fields)


# --- recipes: each step is a JSON-able list ---------------------------------------------------

EHDR_FIELDS = ["e_shoff", "e_shentsize", "e_shnum", "e_shstrndx", "e_machine", "e_type"]
SHDR_FIELDS = ["sh_name", "sh_type", "sh_offset", "sh_size", "sh_addralign", "sh_entsize"]
HEADER_FIELDS = ["magic", "nr_vcpus", "nr_pages", "page_size"]
NOTE_FIELDS = ["namesz", "descsz", "type"]
# Steps after which the writer's layout still tells where the table and pages are, so the
# oracle's exact mapping applies.
LAYOUT_KEEPING = {"entry", "truncate", "append", "header-count"}

INTERESTING = [0, 1, 2, 3, 7, 8, 12, 16, 64, 511, 512, 4095, 4096, 4097, 8192, 1 << 16,
               (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 52, 1 << 63,
               (1 << 64) - 4096, (1 << 64) - 1]  # fmt: skip


def values(core_size: int | None = None) -> st.SearchStrategy[int]:
    around = [] if core_size is None else [core_size + d for d in (-4097, -64, -8, -1, 0, 1)]
    return st.one_of(
        st.sampled_from(INTERESTING + around),
        st.integers(0, 1 << 16),
        st.integers(0, (1 << 64) - 1),
    )


def steps() -> st.SearchStrategy[list]:
    section = st.integers(0, 7)
    return st.one_of(
        st.tuples(st.just("ehdr"), st.sampled_from(EHDR_FIELDS), values(45000)),
        st.tuples(st.just("shdr"), section, st.sampled_from(SHDR_FIELDS), values(45000)),
        st.tuples(st.just("header"), st.sampled_from(["magic", "page_size"]), values()),
        st.tuples(st.just("header-count"), st.sampled_from(["nr_vcpus", "nr_pages"]), values()),
        st.tuples(st.just("note"), st.integers(0, 3), st.sampled_from(NOTE_FIELDS), values()),
        st.tuples(
            st.just("entry"),
            st.integers(0, 7),
            st.one_of(st.integers(0, 12), st.sampled_from([INVALID, 1 << 40, 1 << 52])),
            st.one_of(st.integers(0, 0x2000), st.just(INVALID)),
        ),
        st.tuples(st.just("truncate"), st.integers(0, 45000)),
        st.tuples(st.just("append"), st.integers(1, 9000), st.integers(0, 255)),
        st.tuples(st.just("swap"), section, section),
        st.tuples(st.just("flip"), st.integers(0, 45000), st.integers(1, 255)),
    ).map(list)


recipes = st.tuples(st.sampled_from(sorted(BASES)), st.lists(steps(), min_size=1, max_size=4))


def apply(base: str, recipe: list[list]) -> tuple[Core, bool]:
    """The damaged core, and whether the writer's layout still locates the table and pages."""
    core = base_core(base)
    keeps_layout = True
    for step in recipe:
        kind, args = step[0], step[1:]
        keeps_layout &= kind in LAYOUT_KEEPING
        shnum = len(core.layout.sections)
        if kind == "ehdr":
            core = set_ehdr(core, *args)
        elif kind == "shdr":
            core = set_shdr(core, args[0] % shnum, args[1], args[2])
        elif kind in ("header", "header-count"):
            core = set_header(core, *args)
        elif kind == "note":
            core = set_note(core, *args)
        elif kind == "entry":
            core = set_entry(core, args[0], args[1], args[2] if core.entsize == 16 else None)
        elif kind == "truncate":
            core = core.with_data(core.data[: args[0]])
        elif kind == "append":
            core = core.with_data(core.data + bytes([args[1]]) * args[0])
        elif kind == "swap":
            a, b = (core.layout.sections[i % shnum].name for i in args)
            if a and b and a != b:
                core = swap_shdrs(core, a, b)
        elif kind == "flip":
            if args[0] < len(core.data):
                data = bytearray(core.data)
                data[args[0]] ^= args[1]
                core = core.with_data(data)
        else:
            raise ValueError(step)
    return core, keeps_layout


# --- the properties ---------------------------------------------------------------------------

_COUNTER = itertools.count()
_TMP = Path(tempfile.mkdtemp(prefix="vx3-fuzz-"))
atexit.register(shutil.rmtree, _TMP, True)


def check(base: str, recipe: list[list], through_stacker: bool = True) -> str:
    """Run every property on one recipe; returns "refused" or "mapped"."""
    core, keeps_layout = apply(base, recipe)
    data = core.data
    try:
        parsed = open_bytes(data)
        parsed.page_map  # noqa: B018 - building the page map is part of opening
        parsed.vcpus()
        parsed.shared_info  # noqa: B018
    except XenCoreFormatException as exc:
        message = str(exc)
        assert message and "\n" not in message
        outcome = "refused"
    else:
        assert_view_is_sound(parsed, data)
        if keeps_layout:
            mapped = {}
            runs = parsed.page_map.pfn_runs
            for key, value, count in zip(runs.key, runs.value, runs.count):
                mapped.update({key + k: value + k for k in range(count)})
            assert mapped == expected_map(core), (mapped, expected_map(core))
        outcome = "mapped"
    if through_stacker:
        check_stacker(data, outcome)
    return outcome


def check_stacker(data: bytes, outcome: str) -> None:
    # A fresh path per example: the layer caches page maps by (path, size, mtime).
    path = _TMP / f"core-{next(_COUNTER)}"
    path.write_bytes(data)
    context = contexts.Context()
    context.config["FileLayer.location"] = path.as_uri()
    context.layers.add_layer(FileLayer(context, "FileLayer", "FileLayer"))
    try:
        stacked = xen_layer.XenDumpCoreStacker.stack(context, "FileLayer")
        if outcome == "refused":
            assert stacked is None
            return
        assert isinstance(stacked, xen_layer.XenDumpCoreLayer)
        core = stacked.core
        ps = core.page_size
        runs = stacked.page_map.pfn_runs
        for key, value, count in zip(runs.key, runs.value, runs.count):
            for k in range(count):
                offset = core.page_offset(value + k)
                assert stacked.read((key + k) * ps, ps) == data[offset : offset + ps]
        for address in (0, ps - 1, 5 * ps + 3, 1 << 40, (1 << 64) - 16):
            try:
                stacked.read(address, 32)
            except exceptions.InvalidAddressException:
                pass
    finally:
        context.layers["FileLayer"].destroy()  # closes the file now, not at garbage collection
        path.unlink()


# Every input the fuzzer (or a reviewer) ever found breaking the reader: (base, recipe, outcome).
REGRESSIONS: list[tuple[str, list[list], str]] = [
    # .shstrtab is the last thing in a libxc file: a truncated copy lost every name.
    ("hvm", [["truncate", 40990]], "mapped"),
    ("pv-32", [["truncate", 41000]], "mapped"),
    # a header page size that disagrees with .xen_pages' sh_entsize mapped 8 KiB "pages".
    ("hvm", [["header", "page_size", 8192]], "refused"),
    # .xen_pages laid over the ELF header was accepted.
    ("pv", [["shdr", 4, "sh_offset", 0]], "refused"),
    # e_shstrndx out of range (libxc names recovered).
    ("hvm-be", [["ehdr", "e_shstrndx", 9]], "mapped"),
    # an empty .shstrtab (sh_size 0) refused the file instead of using libxc's names.
    ("hvm", [["shdr", 1, "sh_size", 0]], "mapped"),
    # two nameless sections (neither one this reader needs) refused the file.
    ("hvm-shinfo-pad", [["shdr", 3, "sh_name", 0], ["shdr", 4, "sh_name", 0]], "mapped"),
]


@pytest.mark.parametrize(("base", "recipe", "outcome"), REGRESSIONS)
def test_regressions(base: str, recipe: list[list], outcome: str) -> None:
    assert check(base, recipe) == outcome


@settings(settings.get_profile(PROFILE))
@given(recipe=recipes)
def test_fuzz_recipes(recipe: tuple[str, list[list]]) -> None:
    check(recipe[0], recipe[1])


# --- memory: a sample under RLIMIT_AS ---------------------------------------------------------

_OPEN_ALL = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from volatility3_xen.dumpcore import XenDumpCore
from volatility3_xen.errors import XenCoreFormatException
refused = mapped = 0
for path in sys.argv[1:]:
    try:
        core = XenDumpCore.open(path)
        core.page_map
        core.vcpus()
        mapped += 1
    except XenCoreFormatException:
        refused += 1
print(refused, mapped)
"""

# Header fields that would drive allocations if anything trusted them.
_HUGE = [
    [["header-count", "nr_pages", (1 << 63)], ["header-count", "nr_vcpus", (1 << 32)]],
    [["shdr", 5, "sh_size", (1 << 64) - 1]],
    [["shdr", 4, "sh_size", (1 << 62)]],
    [["shdr", 3, "sh_size", (1 << 40)], ["shdr", 3, "sh_entsize", 1]],
    [["shdr", 2, "sh_size", (1 << 63)]],
    [["shdr", 1, "sh_size", (1 << 48)]],
    [["note", 2, "descsz", 0xFFFFFFFF]],
    [["ehdr", "e_shnum", 0xFFFF], ["ehdr", "e_shentsize", 0xFFFF]],
    [["truncate", 41000], ["shdr", 5, "sh_size", 1 << 60]],
]


def test_construction_memory_is_bounded(tmp_path: Path) -> None:
    rng = random.Random(1234)
    strategy_free = []  # a deterministic sample mixing the huge-field recipes with random ones
    for base in sorted(BASES):
        for recipe in _HUGE:
            strategy_free.append((base, recipe))
        for _ in range(10):
            recipe = [
                ["shdr", rng.randrange(8), rng.choice(SHDR_FIELDS), rng.choice(INTERESTING)],
                ["header-count", rng.choice(["nr_pages", "nr_vcpus"]), rng.choice(INTERESTING)],
            ]
            strategy_free.append((base, recipe))
    paths = []
    for number, (base, recipe) in enumerate(strategy_free):
        core, _ = apply(base, recipe)
        path = tmp_path / f"{number}.core"
        path.write_bytes(core.data)
        paths.append(str(path))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1])] + sys.path)
    result = subprocess.run(
        [sys.executable, "-c", _OPEN_ALL, *paths],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    refused, mapped = map(int, result.stdout.split())
    assert refused + mapped == len(paths) and mapped > 0 and refused > 0
    json.dumps(strategy_free)  # the sample stays replayable as plain data


# --- PV page tables are data too: looping and self-referencing tables --------------------------

PV_PFNS = list(range(8))
PV_MFNS = [0x300 + 5 * i for i in range(8)]  # owned machine frames, not pfn-contiguous
_SLOTS = [0, 1, 2, 255, 256, 511]
PTE_FLAGS = st.sampled_from([0x0, 0x1, 0x3, 0x7, 0x67, 0x83, 0xE7, 0x8000000000000067])
pte_targets = st.one_of(
    st.sampled_from(PV_MFNS),  # a guest frame (maybe the table itself: a loop)
    st.sampled_from([0, 0x1, 0x2FF, 0xFFFFFFFFF, (1 << 40) - 1]),  # not the guest's
)
pv_tables = st.lists(
    st.tuples(st.integers(0, 7), st.sampled_from(_SLOTS), pte_targets, PTE_FLAGS),
    min_size=1,
    max_size=24,
)


def _pv_core(entries: list[tuple[int, int, int, int]]) -> bytes:
    pages = {i: bytearray(4096) for i in PV_PFNS}  # empty tables but for the drawn entries
    for page, slot, mfn, flags in entries:
        struct.pack_into("<Q", pages[page], slot * 8, (mfn << 12) | flags)
    spec_pages = {i: bytes(p) for i, p in pages.items()}
    core = make_core("pv", pfns=PV_PFNS, gmfns=PV_MFNS)
    data = bytearray(core.data)
    for index, page in spec_pages.items():
        offset = core.section(".xen_pages").offset + index * 4096
        data[offset : offset + 4096] = page
    return bytes(data)


def _canonical(l4: int, l3: int, l2: int, l1: int) -> int:
    address = (l4 << 39) | (l3 << 30) | (l2 << 21) | (l1 << 12)
    return address | (0xFFFF << 48) if l4 >= 256 else address


def check_pv_walk(entries: list[tuple[int, int, int, int]], top_pfn: int) -> None:
    from volatility3_xen import pv

    path = _TMP / f"pv-{next(_COUNTER)}"
    path.write_bytes(_pv_core(entries))
    context = contexts.Context()
    context.config["FileLayer.location"] = path.as_uri()
    context.layers.add_layer(FileLayer(context, "FileLayer", "FileLayer"))
    try:
        xen = xen_layer.XenDumpCoreStacker.stack(context, "FileLayer")
        assert isinstance(xen, xen_layer.XenDumpCoreLayer)
        context.layers.add_layer(xen)
        context.config["pv.memory_layer"] = xen.name
        context.config["pv.page_map_offset"] = top_pfn << 12
        walker = pv.XenPVLinuxIntel32e(context, "pv", "pv")
        context.layers.add_layer(walker)
        for l4, l3, l2, l1 in itertools.product(_SLOTS[:3] + _SLOTS[-2:], repeat=4):
            if (l3, l2, l1) != (l4, l4, l4) and l1 not in (0, 511):
                continue  # keep the product small: full diagonals plus slot-0/511 leaves
            address = _canonical(l4, l3, l2, l1)
            try:
                data = walker.read(address, 16)
                physical, _, layer_name = walker._translate(address)
            except exceptions.InvalidAddressException:
                continue
            # A walk that ends anywhere must end on a stored guest page, read through it.
            assert layer_name == xen.name
            assert data == xen.read(physical, 16)
        # A bounded range walk finishes even when tables loop onto themselves.
        chunks = list(walker.mapping(0, 1 << 24, ignore_errors=True))
        assert all(xen.is_valid(mapped, length) for _, _, mapped, length, _ in chunks)
    finally:
        context.layers["FileLayer"].destroy()
        path.unlink()


PV_REGRESSIONS: list[tuple[list[tuple[int, int, int, int]], int]] = [
    ([(0, 0, PV_MFNS[0], 0x67)], 0),  # L4[0] -> itself: every level is the same table
    ([(0, slot, PV_MFNS[0], 0xE7) for slot in _SLOTS], 0),  # self-map with large-page bits
    ([(0, 0, PV_MFNS[1], 0x67), (1, 0, PV_MFNS[0], 0x67)], 0),  # two tables pointing at each other
    ([(0, 0, 0xFFFFFFFFF, 0x67)], 0),  # a frame the guest does not own
]


@pytest.mark.parametrize(("entries", "top"), PV_REGRESSIONS)
def test_pv_table_regressions(entries: list, top: int) -> None:
    pytest.importorskip("volatility3_xen.pv")
    check_pv_walk(entries, top)


@settings(settings.get_profile(PROFILE), max_examples=60 if PROFILE == "ci" else 1000)
@given(entries=pv_tables, top=st.integers(0, 7))
def test_fuzz_pv_page_tables(entries: list, top: int) -> None:
    pytest.importorskip("volatility3_xen.pv")
    check_pv_walk(entries, top)
