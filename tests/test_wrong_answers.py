"""Issue 10, items 1, 2, 3 and 6: the layer and stacker gave wrong answers without a word.

1. compressed evidence (``FileLayer`` decompresses ``.gz``/``.bz2``/``.xz``) had its page
   table read from the compressed file on disk; a file replaced after Volatility opened it
   mixed two files' bytes;
2. a PV core whose kernel check failed was left to Volatility's stock Intel stackers, which
   read machine frames as pfns (``linux.pslist``: a header and no rows);
3. a core we refuse was then opened by Volatility's own (broken) Xen or ELF layer;
6. the PV walk assumed 4 KiB core pages.

Every test here fails on the code before the fix (said per test).
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import os
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from volatility3.framework import contexts, exceptions, interfaces
from volatility3.framework.automagic import linux as linux_automagic
from volatility3.framework.automagic import stacker
from volatility3.framework.layers import elf, intel, physical, xen

from volatility3_xen.layers import memory, pv
from volatility3_xen.layers.stackers import XenDumpCoreStacker
from volatility3_xen.testdata import corewriter as writer

from .conftest import EXPECTED, SHARED, run_vol, strip_banner
from .corecraft import make_core, set_header
from .test_pv import (
    DATA,
    L4,
    PDPT_OFFSET,
    PDPT_PAGE,
    build_crafted_64,
    build_crafted_pae,
    canonical,
    tag_page,
    va64,
)

PAGE = 4096
PAE_DTB = PDPT_PAGE << 12 | PDPT_OFFSET
COMPRESSORS = {
    "gz": lambda data: gzip.compress(data, compresslevel=1, mtime=0),
    "bz2": lambda data: bz2.compress(data, compresslevel=1),
    "xz": lambda data: lzma.compress(data, preset=0),
}


def file_layer(path: Path, name: str = "file") -> tuple[contexts.Context, physical.FileLayer]:
    context = contexts.Context()
    context.config[f"{name}.location"] = path.resolve().as_uri()
    layer = physical.FileLayer(context, name, name)
    context.layers.add_layer(layer)
    return context, layer


def xen_on(context: contexts.Context, base: str, name: str = "xen") -> memory.XenDumpCoreLayer:
    context.config[f"{name}.base_layer"] = base
    layer = memory.XenDumpCoreLayer(context, name, name)
    context.layers.add_layer(layer)
    return layer


def random_core(
    path: Path, seed: int, pages: int = 256, kind: str = "hvm", trailer: int = 0
) -> dict[int, bytes]:
    """A core of ``pages`` incompressible pages, then ``trailer`` random bytes after its
    last section (so that a compressed copy reaches past the table's offset); pfns shuffled,
    so a table read from wrong bytes cannot look right.  Returns pfn -> page."""
    rng = random.Random(seed)
    pfns = list(range(pages))
    rng.shuffle(pfns)
    content = {pfn: rng.randbytes(PAGE) for pfn in pfns}
    writer.write_core(
        path,
        writer.CoreSpec(
            kind=kind,  # type: ignore[arg-type]
            pfns=np.array(pfns, dtype=np.uint64),
            gmfns=np.array([0x9000 + p for p in pfns], dtype=np.uint64) if kind == "pv" else None,
            pages={index: content[pfn] for index, pfn in enumerate(pfns)},
        ),
    )
    with open(path, "ab") as out:
        out.write(rng.randbytes(trailer))
    return content


def assert_pages(layer: memory.XenGuestLayer, content: dict[int, bytes]) -> None:
    assert layer.image.page_map.stats.valid == len(content)
    for pfn, page in content.items():
        assert layer.read(pfn * PAGE, PAGE) == page, f"pfn {pfn:#x}"
    assert not layer.is_valid(len(content) * PAGE)


# --- 1. compressed evidence ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_compressed_core_maps_the_decompressed_table(
    suffix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Old code mmapped the compressed file at the table's offset (it is larger than that
    offset here): pfns read other pages, valid_pages was short, a vague warning."""
    plain = tmp_path / "guest.core"
    kind = "pv" if suffix == "bz2" else "hvm"
    content = random_core(plain, seed=10, kind=kind, trailer=128 << 10)
    packed = tmp_path / f"guest.core.{suffix}"
    packed.write_bytes(COMPRESSORS[suffix](plain.read_bytes()))
    plain_context, plain_base = file_layer(plain)
    plain_layer = xen_on(plain_context, "file")
    assert memory.base_file(plain_base).own_bytes
    # The compressed file reaches past the table's end: the old code's mmap succeeded.
    assert packed.stat().st_size >= plain_layer.core.table.end
    context, base = file_layer(packed)
    source = memory.base_file(base)
    assert not source.own_bytes and source.size == plain.stat().st_size
    assert source.identity is not None and source.identity[0] != "file"
    with caplog.at_level(logging.WARNING, logger="volatility3_xen"):
        stacked = XenDumpCoreStacker.stack(context, "file")
    assert isinstance(stacked, memory.XenDumpCoreLayer)
    assert_pages(stacked, content)
    # The same bytes, so the same map and warnings (the shuffled table), nothing else said.
    assert plain_layer.page_map.pfn_runs == stacked.page_map.pfn_runs
    assert stacked.core.warnings == plain_layer.core.warnings
    said = {r.getMessage().split(": ", 1)[1] for r in caplog.records}
    assert said <= set(plain_layer.core.warnings), said


def test_cache_keys_never_alias_decodings(tmp_path: Path) -> None:
    """One inode read raw and decompressed: two page-map cache keys (the old key was the
    path and its stat, which says nothing about the decoding)."""
    plain = tmp_path / "guest.core"
    random_core(plain, seed=11, pages=16)
    packed = tmp_path / "guest.core.gz"
    packed.write_bytes(COMPRESSORS["gz"](plain.read_bytes()))
    raw_name = tmp_path / "guest.bin"
    os.link(packed, raw_name)
    decoded = memory.base_file(file_layer(packed)[1]).identity
    raw = memory.base_file(file_layer(raw_name)[1]).identity
    assert decoded is not None and raw is not None
    assert decoded[1:3] == raw[1:3]  # same device and inode
    assert decoded != raw and decoded[0] == "GzipFile" and raw[0] == "file"
    assert decoded[-1] == plain.stat().st_size and raw[-1] == packed.stat().st_size


def test_file_replaced_after_open_is_read_whole(tmp_path: Path) -> None:
    """Old code took the table from the path (the new file) and the pages from the open
    descriptor (the old one)."""
    path, other = tmp_path / "guest.core", tmp_path / "other.core"
    content = random_core(path, seed=12)
    random_core(other, seed=13)
    assert path.stat().st_size == other.stat().st_size
    context, base = file_layer(path)
    base.maximum_address  # noqa: B018 - Volatility has the file open and sized
    os.replace(other, path)
    assert_pages(xen_on(context, "file"), content)


def test_descriptor_mapper_refuses_another_file(tmp_path: Path) -> None:
    path = tmp_path / "guest.core"
    random_core(path, seed=14, pages=16)
    other = tmp_path / "other.bin"
    other.write_bytes(bytes(1 << 16))
    _, base = file_layer(path)
    source = memory.base_file(base)
    assert source.map_region is not None and bytes(source.map_region(0, 4)) == b"\x7fELF"
    fileno = base._file.fileno()
    base.destroy()
    with pytest.raises(OSError):  # closed
        source.map_region(0, 4)
    replacement = os.open(other, os.O_RDONLY)
    try:
        os.dup2(replacement, fileno)  # the number now names another file
        with pytest.raises(OSError, match="no longer names"):
            source.map_region(0, 4)
    finally:
        os.close(fileno)
        os.close(replacement)


def test_windowed_reader_serves_the_table_without_another_pass(tmp_path: Path) -> None:
    """The second construction on a compressed core reads nothing but what Volatility's
    size check reads; the first decompresses up to the table once (no rewinds)."""
    plain = tmp_path / "guest.core"
    content = random_core(plain, seed=15)
    packed = tmp_path / "guest.core.gz"
    packed.write_bytes(COMPRESSORS["gz"](plain.read_bytes()))
    reads: list[tuple[int, int]] = []
    for _ in range(2):
        context, base = file_layer(packed)
        original = base.read

        def counting(offset: int, length: int, pad: bool = False, _read=original) -> bytes:
            reads.append((offset, length))
            return _read(offset, length, pad)

        base.read = counting  # type: ignore[method-assign]
        before = len(reads)
        assert_pages(xen_on(context, "file"), content)
        positions = [offset for offset, _ in reads[before:]]
        if _ == 0:
            # Head reads, then one read reaching forward to the string table: no read goes
            # back to the table after the string table (a backward seek decompresses again).
            table = xen_on(context, "file", "again").core.table
            assert not any(table.offset <= p < table.end for p in positions[:-1] if p), positions
    # Second construction: page reads only (every read is a page of the assert).
    assert all(length == PAGE for _, length in reads[before:])


@pytest.fixture(scope="module")
def vol_cache(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A private identifier cache (the shared one is rewritten by vol runs with other ``-s``
    directories, and banner lookups then miss)."""
    return ["--cache-path", str(tmp_path_factory.mktemp("volcache"))]


@pytest.fixture(scope="module")
def sample_cores() -> dict[str, Path]:
    from volatility3_xen.testdata import samples

    try:
        return {kind: samples.build_sample(kind) for kind in ("pv", "hvm")}
    except Exception as exc:  # noqa: BLE001 - no bundled guest: nothing to compress
        pytest.skip(f"sample cores not available: {exc}")


def _compressed_copy(core: Path, suffix: str, directory: Path) -> Path:
    target = directory / f"{core.name}.{suffix}"
    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[suffix]
    options = {"gz": {"compresslevel": 1}, "bz2": {"compresslevel": 1}, "xz": {"preset": 0}}
    with open(core, "rb") as source, opener(target, "wb", **options[suffix]) as out:
        shutil.copyfileobj(source, out, 8 << 20)
    return target


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "suffix"), [("pv", "gz"), ("hvm", "gz")])
def test_vol_pslist_on_compressed_sample_equals_uncompressed(
    sample_cores: dict[str, Path],
    kind: str,
    suffix: str,
    tmp_path: Path,
    symbols_dir: Path,
    vol_cache: list[str],
) -> None:
    core = sample_cores[kind]
    expected_file = EXPECTED / "pslist.txt"
    if expected_file.exists():
        expected = strip_banner(expected_file.read_text())
    else:
        plain = run_vol(*vol_cache, "-s", str(symbols_dir), "-f", str(core), "linux.pslist")
        assert plain.returncode == 0, plain.stderr[-2000:]
        expected = strip_banner(plain.stdout)
    packed = _compressed_copy(core, suffix, tmp_path)
    result = run_vol(*vol_cache, "-s", str(symbols_dir), "-f", str(packed), "linux.pslist")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(expected) > 10 and strip_banner(result.stdout) == expected


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "suffix"), [("pv", "xz")])
def test_sample_compressed_maps_like_the_uncompressed_core(
    sample_cores: dict[str, Path], kind: str, suffix: str, tmp_path: Path
) -> None:
    """Another decompressor on a real core, in process (``vol`` on a ``.xz``/``.bz2`` core
    spends minutes in Volatility's backward seeks, each a fresh decompression; ``.bz2`` is
    covered on small cores above): the same page map, machine frames and bytes at a spread
    of pfns."""
    core = sample_cores[kind]
    packed = _compressed_copy(core, suffix, tmp_path)
    plain_context, _ = file_layer(core)
    plain = xen_on(plain_context, "file")
    context, _ = file_layer(packed)
    stacked = XenDumpCoreStacker.stack(context, "file")
    assert isinstance(stacked, memory.XenDumpCoreLayer)
    assert stacked.page_map.pfn_runs == plain.page_map.pfn_runs
    if kind == "pv":
        assert stacked.machine_frames.m2p_runs == plain.machine_frames.m2p_runs
    for pfn in sorted({0, 1, 0x28A8, 0x6010, 0x7FFF} | set(range(0x100, 0x7000, 0x3E1))):
        assert stacked.read(pfn * PAGE, PAGE) == plain.read(pfn * PAGE, PAGE), hex(pfn)


# --- 2. a PV core is never left to the stock Intel stackers -----------------------------------


class _FakeRoute:
    """Stands in for one of Volatility's Linux stackers: builds ``cls`` on ``dtb``."""

    def __init__(self, cls: type, dtb: int) -> None:
        self.cls, self.dtb, self.stack_order = cls, dtb, 34
        self.__name__ = f"Fake{cls.__name__}Stacker"

    def stack(self, context, layer_name, progress_callback=None):  # noqa: ANN001, ANN201
        path = interfaces.configuration.path_join("fake", self.__name__)
        context.config[f"{path}.memory_layer"] = layer_name
        context.config[f"{path}.page_map_offset"] = self.dtb
        context.config[f"{path}.kernel_banner"] = "Linux version fake"
        return self.cls(context, path, "IntelLayer", metadata={"os": "Linux"})


def _with_routes(monkeypatch: pytest.MonkeyPatch, route: _FakeRoute, probe: pv.KernelProbe):
    monkeypatch.setattr(linux_automagic, "LinuxIntelVMCOREINFOStacker", route)
    monkeypatch.setattr(linux_automagic, "LinuxIntelStacker", route)
    monkeypatch.setattr(pv, "_kernel_probe", lambda context, layer, tables: probe)


@pytest.fixture(scope="module")
def crafted64(tmp_path_factory: pytest.TempPathFactory):
    return build_crafted_64(tmp_path_factory.mktemp("crafted64") / "pv64.core")


@pytest.fixture(scope="module")
def crafted_pae(tmp_path_factory: pytest.TempPathFactory):
    return build_crafted_pae(tmp_path_factory.mktemp("crafted_pae") / "pae.core")


@pytest.mark.parametrize(
    ("which", "stock_class", "pv_class"),
    [
        ("64", intel.Intel32e, pv.XenPVLinuxIntel32e),
        ("64", intel.LinuxIntel32e, pv.XenPVLinuxIntel32e),
        ("pae", intel.IntelPAE, pv.XenPVLinuxIntelPAE),
        ("pae", intel.LinuxIntelPAE, pv.XenPVLinuxIntelPAE),
    ],
)
def test_unverified_kernel_gets_the_pv_layer_and_a_warning(
    which: str,
    stock_class: type,
    pv_class: type,
    crafted64,
    crafted_pae,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Old code returned None here, and the stock stacker that runs next stacked
    ``stock_class`` on the Xen layer (checked below with the real stacking loop)."""
    crafted = crafted64 if which == "64" else crafted_pae
    dtb = L4 << 12 if which == "64" else PAE_DTB
    context, _ = file_layer(crafted.path)
    xen_on(context, "file")
    route = _FakeRoute(stock_class, dtb)
    _with_routes(monkeypatch, route, pv.KernelProbe(0xFFFF_FFFF_8000_0000, b"not there"))

    class StockAfterUs(interfaces.automagic.StackerLayerInterface):
        stack_order = 35

        @classmethod
        def stack(cls, context, layer_name, progress_callback=None):  # noqa: ANN001, ANN206
            if isinstance(context.layers[layer_name], intel.Intel):  # as Volatility's do
                return None
            return route.stack(context, layer_name)

    with caplog.at_level(logging.WARNING, logger="volatility3_xen"):
        stacked = stacker.LayerStacker.stack_layer(
            context, "xen", [pv.XenPVLinuxIntelStacker, StockAfterUs]
        )
    top = context.layers[stacked[0]]
    assert type(top) is pv_class, stacked
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("does not read through the symbol DTB" in w and "unverified" in w for w in warnings)


def test_pv_layer_still_reads_the_tables(crafted64, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unverified layer is the PV walk: kernel data reads through machine frames."""
    context, _ = file_layer(crafted64.path)
    xen_on(context, "file")
    _with_routes(monkeypatch, _FakeRoute(intel.Intel32e, L4 << 12), pv.KernelProbe(0, b"x"))
    layer = pv.XenPVLinuxIntelStacker.stack(context, "xen")
    assert isinstance(layer, pv.XenPVLinuxIntel32e)
    address = canonical(va64(511, 510, 0, 2))
    assert layer.read(address, PAGE) == tag_page(DATA[2])


def test_unsupported_kernel_class_is_refused(
    crafted_pae, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-PAE 32-bit kernel: no PV walk exists; old code returned None and let the stock
    ``Intel`` layer read machine frames."""
    context, _ = file_layer(crafted_pae.path)
    xen_on(context, "file")
    _with_routes(monkeypatch, _FakeRoute(intel.LinuxIntel, PAE_DTB), pv.KernelProbe(0, b""))
    with caplog.at_level(logging.WARNING, logger="volatility3_xen"):
        refused = pv.XenPVLinuxIntelStacker.stack(context, "xen")
    assert isinstance(refused, memory.XenRefusedLayer)
    assert "LinuxIntel kernel" in refused.reason and "does not support" in refused.reason
    assert any("does not support" in r.getMessage() for r in caplog.records)
    # Stackers that scan it find nothing; no kernel requirement accepts it.
    assert list(refused.mapping(0, 1 << 40, ignore_errors=True)) == []
    assert not refused.is_valid(0)
    assert refused.metadata.get("architecture") not in ("Intel32", "Intel64")


def test_pv_layer_that_cannot_be_built_is_refused(
    crafted64, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while converting or verifying used to escape the stacker, and
    Volatility, which swallows it, then ran its own Linux stackers."""
    context, _ = file_layer(crafted64.path)
    xen_on(context, "file")
    _with_routes(monkeypatch, _FakeRoute(intel.Intel32e, L4 << 12), pv.KernelProbe(0, b""))

    def broken(context, layer, tables):  # noqa: ANN001, ANN202
        raise ValueError("symbol table unreadable")

    monkeypatch.setattr(pv, "_kernel_probe", broken)
    refused = pv.XenPVLinuxIntelStacker.stack(context, "xen")
    assert isinstance(refused, memory.XenRefusedLayer)
    assert "XenPVLinuxIntel32e via" in refused.reason
    assert "failed: symbol table unreadable" in refused.reason and "\n" not in refused.reason


def test_pseudo_physical_pv_image_keeps_the_stock_layer(tmp_path: Path) -> None:
    """The guard is machine frames, not PV: an HVM (or PV save) layer is not ours to take."""
    path = tmp_path / "hvm.core"
    writer.write_core(path, writer.CoreSpec(kind="hvm", pfns=np.arange(4, dtype=np.uint64)))
    context, _ = file_layer(path)
    assert xen_on(context, "file").machine_frames is None
    assert pv.XenPVLinuxIntelStacker.stack(context, "xen") is None


def _pv_sample_without_banner_leaf(core: Path, target: Path, banner_vaddr: int) -> None:
    """A copy of the PV sample whose page-table leaf for ``linux_banner`` is cleared."""
    shutil.copyfile(core, target)
    context, _ = file_layer(target)
    layer = xen_on(context, "file")
    table_pfn = 0x6010000 >> 12  # the guest's init_top_pgt (pseudo-physical)
    for level, shift in enumerate((39, 30, 21, 12)):
        slot = (banner_vaddr >> shift) & 0x1FF
        address = table_pfn * PAGE + slot * 8
        (entry,) = struct.unpack("<Q", layer.read(address, 8))
        assert entry & 1, (level, hex(entry))
        if level == 3 or entry & 0x80:  # a 4 KiB leaf or a large page: the banner's leaf
            (_, _, file_offset, _, _), *_ = layer.mapping(address, 8)
            break
        table_pfn = layer.mfn_to_pfn((entry & 0x000F_FFFF_FFFF_F000) >> 12)
    context.layers["file"].destroy()
    with open(target, "r+b") as handle:
        handle.seek(file_offset)
        handle.write(bytes(8))


@pytest.mark.slow
def test_vol_pslist_on_pv_core_whose_banner_does_not_verify(
    sample_cores: dict[str, Path], tmp_path: Path, symbols_dir: Path, vol_cache: list[str]
) -> None:
    """Old code: Volatility's banner stacker put a stock Intel32e on the PV core and
    ``linux.pslist`` printed its header and no row, silently."""
    facts_file = SHARED / "guests" / "factsC.json"
    if not facts_file.exists():
        pytest.skip(f"guest facts not available ({facts_file} missing: ../shared absent)")
    facts = json.loads(facts_file.read_text())
    shift = int(facts["init_task_virt"], 16) - int(facts["init_task_phys"], 16)
    banner_vaddr = facts["banner_phys_offsets"][0] + shift
    damaged = tmp_path / "pv-no-banner.core"
    _pv_sample_without_banner_leaf(sample_cores["pv"], damaged, banner_vaddr)
    result = run_vol(*vol_cache, "-s", str(symbols_dir), "-f", str(damaged), "linux.pslist")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "does not read through the symbol DTB" in result.stderr
    assert "stacking XenPVLinuxIntel32e unverified" in result.stderr
    rows = strip_banner(result.stdout)
    assert len(rows) > 10 and any("demo_server" in row for row in rows)


# --- 3. a refused core is not handed to Volatility's Xen or ELF layer -------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda: set_header(make_core("hvm"), "page_size", 3), id="page size 3"),
        pytest.param(lambda: set_header(make_core("pv"), "magic", 0xF00FEB00), id="bad magic"),
        pytest.param(lambda: make_core("hvm", pfns=[1 << 60] * 8), id="no usable entry"),
    ],
)
def test_refused_core_stays_refused(
    damage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Old code returned None and Volatility's XenCoreDumpStacker (order 10) stacked its
    own layer on the file."""
    path = tmp_path / "damaged.core"
    path.write_bytes(damage().data)
    context, _ = file_layer(path, "FileLayer")
    with caplog.at_level(logging.WARNING, logger="volatility3_xen"):
        stacked = stacker.LayerStacker.stack_layer(
            context, "FileLayer", [XenDumpCoreStacker, xen.XenCoreDumpStacker, elf.Elf64Stacker]
        )
    assert stacked[1:] == ["FileLayer"] and stacked[0].startswith("XenRefusedLayer"), stacked
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "Xen dump-core cannot be used" in messages[0]
    # Rebuilt from its configuration (a requirement that takes any layer chose it) it
    # raises the one-line reason rather than giving an empty view.
    refused = context.layers[stacked[0]]
    context.config["rebuilt.base_layer"] = "FileLayer"
    context.config["rebuilt.reason"] = refused.config["reason"]
    with pytest.raises(memory.XenCoreFormatException) as info:
        memory.XenRefusedLayer(context, "rebuilt", "rebuilt")
    assert "cannot be used" in str(info.value) and "\n" not in str(info.value)


def test_vol_on_refused_core_prints_our_reason(tmp_path: Path) -> None:
    path = tmp_path / "damaged.core"
    path.write_bytes(set_header(make_core("hvm"), "page_size", 3).data)
    result = run_vol("-f", str(path), "banners.Banners")
    assert result.returncode != 0
    assert "Xen dump-core cannot be used: header note page size 0x3" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- 6. PV walks need 4 KiB pages -------------------------------------------------------------


def test_pv_translation_refused_for_other_page_sizes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Old code walked a 16 KiB-page PV core with 4 KiB frame numbers (wrong pages)."""
    path = tmp_path / "pv16k.core"
    pfns = np.arange(8, dtype=np.uint64)
    writer.write_core(
        path, writer.CoreSpec(kind="pv", pfns=pfns, gmfns=pfns + 0x100, page_size=16384)
    )
    context, _ = file_layer(path)
    xen_on(context, "file")
    context.config["walk.memory_layer"] = "xen"
    context.config["walk.page_map_offset"] = 0
    with pytest.raises(exceptions.LayerException, match="page size is 16384 bytes"):
        pv.XenPVLinuxIntel32e(context, "walk", "walk")
    with caplog.at_level(logging.WARNING, logger="volatility3_xen"):
        refused = pv.XenPVLinuxIntelStacker.stack(context, "xen")
    assert isinstance(refused, memory.XenRefusedLayer) and "16384" in refused.reason
    assert any("16384" in r.getMessage() for r in caplog.records)
