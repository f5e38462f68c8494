"""XenDumpCoreLayer / XenMachineLayer on crafted cores: every mapped page checked against
its source, every hole checked invalid, for HVM and PV, both byte orders and page sizes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from volatility3.framework import contexts, exceptions
from volatility3.framework.layers import physical

from volatility3_xen import api
from volatility3_xen.layers.memory import XenDumpCoreLayer
from volatility3_xen.layers.stackers import XenDumpCoreStacker
from volatility3_xen.testdata.corewriter import INVALID_PFN, CoreSpec, write_core

PAGE = 4096


def page_for(pfn: int, page_size: int = PAGE) -> bytes:
    """Distinct content per pfn: the pfn and a checksum-ish word, repeated."""
    word = np.array([pfn, pfn * 0x9E3779B97F4A7C15 % (1 << 64)], dtype="<u8").tobytes()
    return word * (page_size // 16)


def hvm_pfns() -> np.ndarray:
    """Like libxc: pfn 0 present, VGA hole 0xA0-0xBF absent, RAM above 4 GiB, ~0 tail."""
    low = [p for p in range(0x100) if not 0xA0 <= p < 0xC0]
    high = list(range(0x100000, 0x100010))  # 4 GiB and up
    return np.array(low + [0x200, 0x201, 0x203] + high + [INVALID_PFN] * 3, dtype=np.uint64)


def write_spec(path: Path, spec: CoreSpec) -> Path:
    write_core(path, spec)
    return path


def explicit_pages(pfns: np.ndarray, page_size: int = PAGE) -> dict[int, bytes]:
    return {
        i: page_for(int(pfn), page_size) for i, pfn in enumerate(pfns) if int(pfn) != INVALID_PFN
    }


def open_layer(path: Path) -> tuple[contexts.Context, XenDumpCoreLayer]:
    context = contexts.Context()
    name = api.open_core(context, path)
    return context, context.layers[name]


def check_every_page(layer: XenDumpCoreLayer, pfns: np.ndarray, page_size: int) -> None:
    valid = {int(p) for p in pfns if int(p) != INVALID_PFN}
    for pfn in sorted(valid):
        assert layer.read(pfn * page_size, page_size) == page_for(pfn, page_size), hex(pfn)
        assert layer.is_valid(pfn * page_size, page_size)
    # Every gap between stored pfns (and one page past the end) is invalid.
    top = max(valid) + 2
    for pfn in set(range(0, 0x300)) | set(range(0xFFFF0, top)):
        if pfn not in valid:
            assert not layer.is_valid(pfn * page_size), hex(pfn)
            with pytest.raises(exceptions.InvalidAddressException):
                layer.read(pfn * page_size, 8)


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("page_size", [4096, 65536])
def test_hvm_every_page(tmp_path: Path, byteorder: str, page_size: int) -> None:
    pfns = hvm_pfns()
    path = write_spec(
        tmp_path / "hvm.core",
        CoreSpec(
            kind="hvm",
            pfns=pfns,
            pages=explicit_pages(pfns, page_size),
            page_size=page_size,
            byteorder=byteorder,
        ),
    )
    _, layer = open_layer(path)
    assert not layer.is_pv
    assert layer.page_size == page_size
    assert layer.read(0, 16) == page_for(0, page_size)[:16]  # pfn 0 is a page like any other
    check_every_page(layer, pfns, page_size)
    assert layer.maximum_address == 0x10000F * page_size + page_size - 1
    stats = layer.page_map.stats
    assert (stats.padding, stats.valid, stats.lowest_pfn) == (3, len(pfns) - 3, 0)


def test_reads_across_runs_and_holes(tmp_path: Path) -> None:
    pfns = hvm_pfns()
    path = write_spec(
        tmp_path / "c.core", CoreSpec(kind="hvm", pfns=pfns, pages=explicit_pages(pfns))
    )
    _, layer = open_layer(path)
    # 0x9F|hole 0xA0-0xBF|0xC0: a padded read spans two runs and zero-fills the hole.
    start = 0x9F * PAGE + 100
    data = layer.read(start, 0x22 * PAGE, pad=True)
    assert data[: PAGE - 100] == page_for(0x9F)[100:]
    assert data[PAGE - 100 : PAGE - 100 + 0x20 * PAGE] == bytes(0x20 * PAGE)
    assert data[PAGE - 100 + 0x20 * PAGE :] == page_for(0xC0) + page_for(0xC1)[:100]
    with pytest.raises(exceptions.InvalidAddressException):
        layer.read(start, 0x22 * PAGE)
    # 0x200, 0x201 adjacent in the file and in pfn space: one run; 0x203 after a gap.
    assert layer.read(0x200 * PAGE + PAGE - 8, 16) == page_for(0x200)[-8:] + page_for(0x201)[:8]
    chunks = list(layer.mapping(0x1FF * PAGE, 5 * PAGE, ignore_errors=True))
    assert [(c[0] // PAGE, c[1] // PAGE) for c in chunks] == [(0x200, 2), (0x203, 1)]
    # translate() gives the file offset of the page's copy
    offset, _ = layer.translate(0x201 * PAGE + 5)
    index = list(pfns).index(0x201)
    assert offset == layer.core.pages.offset + index * PAGE + 5


def scrambled_mfns(count: int, seed: int = 7) -> np.ndarray:
    """Distinct machine frames, shuffled, some above 4 GiB (mfn >= 0x100000)."""
    rng = np.random.default_rng(seed)
    pool = np.concatenate([np.arange(0x300, 0x300 + count), np.arange(0x123400, 0x123400 + count)])
    return rng.permutation(pool)[:count].astype(np.uint64)


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_pv_frames(tmp_path: Path, byteorder: str) -> None:
    pfns = np.array(list(range(0, 0x40)) + list(range(0x80, 0x90)), dtype=np.uint64)
    mfns = scrambled_mfns(len(pfns))
    table_pfns = np.concatenate([pfns, [INVALID_PFN] * 2]).astype(np.uint64)
    table_mfns = np.concatenate([mfns, [INVALID_PFN] * 2]).astype(np.uint64)
    path = write_spec(
        tmp_path / "pv.core",
        CoreSpec(
            kind="pv",
            pfns=table_pfns,
            gmfns=table_mfns,
            pages=explicit_pages(table_pfns),
            byteorder=byteorder,
        ),
    )
    context, layer = open_layer(path)
    assert layer.is_pv
    check_every_page(layer, table_pfns, PAGE)
    for pfn, mfn in zip(pfns.tolist(), mfns.tolist()):
        assert layer.pfn_to_mfn(pfn) == mfn
        assert layer.mfn_to_pfn(mfn) == pfn
        assert layer.machine_to_physical(mfn * PAGE + 9) == pfn * PAGE + 9
    assert layer.pfn_to_mfn(0x50) is None
    assert layer.mfn_to_pfn(0x200) is None  # a frame the guest does not own
    machine = context.layers[api.add_machine_layer(context, layer.name)]
    for pfn, mfn in zip(pfns.tolist(), mfns.tolist()):
        assert machine.read(mfn * PAGE, PAGE) == page_for(pfn)
    assert not machine.is_valid(0x200 * PAGE)
    assert not machine.is_valid(pfns[5] * PAGE) or int(pfns[5]) in set(mfns.tolist())


def test_unsorted_table_is_sorted_with_a_warning(tmp_path: Path, caplog) -> None:
    pfns = np.array([5, 3, 0, 9, 4, 1], dtype=np.uint64)
    path = write_spec(
        tmp_path / "u.core", CoreSpec(kind="hvm", pfns=pfns, pages=explicit_pages(pfns))
    )
    with caplog.at_level(logging.WARNING):
        _, layer = open_layer(path)
    assert any("not sorted" in r.getMessage() for r in caplog.records)
    check_every_page(layer, pfns, PAGE)


def test_elfclass32_core(tmp_path: Path) -> None:
    pfns = np.array([0, 1, 2, 7], dtype=np.uint64)
    path = write_spec(
        tmp_path / "e32.core",
        CoreSpec(kind="hvm", pfns=pfns, pages=explicit_pages(pfns), elf_class=32),
    )
    _, layer = open_layer(path)
    assert layer.core.elf.facts.elfclass == 32
    check_every_page(layer, pfns, PAGE)


def test_stacker_ignores_other_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\x7fELF" + bytes(8188))
    context = contexts.Context()
    context.config["f.location"] = raw.as_uri()
    context.layers.add_layer(physical.FileLayer(context, "f", "f"))
    assert XenDumpCoreStacker.stack(context, "f") is None


def test_stacker_precedence_over_builtin(tmp_path: Path) -> None:
    """With every stacker Volatility knows, ours wins and the built-in never stacks."""
    from volatility3 import framework
    from volatility3.framework import interfaces
    from volatility3.framework.automagic import stacker

    pfns = hvm_pfns()
    path = write_spec(
        tmp_path / "p.core", CoreSpec(kind="hvm", pfns=pfns, pages=explicit_pages(pfns))
    )
    context = contexts.Context()
    context.config["f.location"] = path.as_uri()
    context.layers.add_layer(physical.FileLayer(context, "f", "f"))
    framework.import_files(framework.layers, True)  # every built-in stacker, as vol does
    stackers = sorted(
        framework.class_subclasses(interfaces.automagic.StackerLayerInterface),
        key=lambda s: s.stack_order,
    )
    names = [s.__name__ for s in stackers]
    assert names.index("XenDumpCoreStacker") < names.index("XenCoreDumpStacker")
    stacked = stacker.LayerStacker.stack_layer(context, "f", stackers)
    assert stacked is not None
    layers = [type(context.layers[name]).__name__ for name in stacked if name in context.layers]
    assert "XenDumpCoreLayer" in layers and "XenCoreDumpLayer" not in layers
    top = context.layers[stacked[0]]
    assert isinstance(top, XenDumpCoreLayer)
    assert top.read(0, 16) == page_for(0)[:16]


def test_builtin_layer_drops_pfn_0(tmp_path: Path) -> None:
    """The defect we replace, shown on the same file (documents why we take precedence)."""
    from volatility3.framework.layers.xen import XenCoreDumpLayer

    pfns = np.array([0, 1, INVALID_PFN], dtype=np.uint64)
    path = write_spec(
        tmp_path / "b.core", CoreSpec(kind="hvm", pfns=pfns, pages=explicit_pages(pfns))
    )
    context = contexts.Context()
    context.config["f.location"] = path.as_uri()
    context.layers.add_layer(physical.FileLayer(context, "f", "f"))
    context.config["x.base_layer"] = "f"
    builtin = XenCoreDumpLayer(context, "x", "x")
    assert not builtin.is_valid(0)
    assert builtin.maximum_address > 1 << 64  # the ~0 padding entry mapped near 2^76
    _, ours = open_layer(path)
    assert ours.is_valid(0) and ours.maximum_address == 2 * PAGE - 1


def test_page_map_cache_never_serves_a_rewritten_file(tmp_path: Path) -> None:
    """Same path, same size, mtime restored (``cp -p``): the new table must be used."""
    import os

    path = tmp_path / "same.core"
    first = np.array([0, 1, 2, 3], dtype=np.uint64)
    second = np.array([4, 5, 6, 7], dtype=np.uint64)
    write_spec(path, CoreSpec(kind="hvm", pfns=first, pages=explicit_pages(first)))
    stat = os.stat(path)
    _, layer = open_layer(path)
    assert layer.is_valid(0)
    write_spec(path, CoreSpec(kind="hvm", pfns=second, pages=explicit_pages(second)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    _, layer = open_layer(path)
    assert not layer.is_valid(0)
    check_every_page(layer, second, PAGE)


def test_second_construction_keeps_the_table_warnings(tmp_path: Path) -> None:
    """vol builds the layer twice; the page map is reused, its warnings must be too."""
    pfns = np.array([5, 3, 0, 9], dtype=np.uint64)
    path = write_spec(
        tmp_path / "w.core", CoreSpec(kind="hvm", pfns=pfns, pages=explicit_pages(pfns))
    )
    _, first = open_layer(path)
    _, second = open_layer(path)
    assert second.page_map is first.page_map
    assert any("not sorted" in w for w in second.core.warnings)


def test_messages_from_file_bytes_are_escaped() -> None:
    """Text taken from a hostile file must not reach the terminal raw."""
    from volatility3_xen.formats.errors import printable
    from volatility3_xen.layers.errors import XenCoreFormatException

    exc = XenCoreFormatException("layer", "section .xen\x1b[2J\nfake appears twice")
    assert str(exc) == "section .xen\\x1b[2J\\nfake appears twice"
    assert "\n" not in str(exc) and "\x1b" not in str(exc)
    assert printable("plain text") == "plain text"
