"""Save images through Volatility: the layer, the stacker, the real ``xl save`` file and
``vol linux.*`` on save images written from the bundled guest.

The real file (``../shared/realxen/realxen-pv1.save.xz``, or the copy bundled in
``samples/``) is decompressed once into the cache; tests that need it skip with the reason
when neither is present.
"""

from __future__ import annotations

import lzma
import mmap
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from volatility3.framework import contexts, exceptions
from volatility3.framework.layers.physical import FileLayer

from volatility3_xen.formats.saveimage import XenSaveImage
from volatility3_xen.layers.memory import XenRefusedLayer
from volatility3_xen.layers.pv import XenPVLinuxIntelStacker
from volatility3_xen.layers.saveimage import XenSaveImageLayer, XenSaveImageStacker
from volatility3_xen.testdata import samples, savewriter

from .conftest import CACHE, REPO, SHARED, run_vol, sha256_of, strip_banner

REAL_DIRS = (SHARED / "realxen", REPO / "samples")
PAGE = 4096


def _real_source(name: str) -> Path | None:
    for directory in REAL_DIRS:
        if (directory / name).exists():
            return directory / name
    return None


@pytest.fixture(scope="session")
def real_save() -> Path:
    """The real ``xl save`` of realxen-pv1, decompressed and checked against its sha256."""
    source = _real_source("realxen-pv1.save.xz")
    if source is None:
        pytest.skip(f"real save image not available ({SHARED}/realxen and samples/ lack it)")
    digest = source.with_name("realxen-pv1.save.sha256")
    want = digest.read_text().split()[0] if digest.exists() else None
    target = CACHE / "realxen-pv1.save"
    if not target.exists() or (want and sha256_of(target) != want):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.part")
        with lzma.open(source) as compressed, open(partial, "wb") as out:
            shutil.copyfileobj(compressed, out, 8 << 20)
        partial.replace(target)
    return target


@pytest.fixture(scope="session")
def real_ps() -> list[tuple[int, int, str]]:
    source = _real_source("realxen-pv1.ps.txt")
    if source is None:
        pytest.skip(f"the real guest's ps output is not available ({SHARED}/realxen)")
    rows = []
    for line in source.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].isdigit():
            rows.append((int(fields[0]), int(fields[1]), fields[2]))
    return rows


@pytest.fixture(scope="module")
def vol_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A symbol-identifier cache of this module's own: the shared one is rewritten by
    every vol run in this working tree (other test runs too), and a banner lookup that
    misses in the middle of that fails the run with an unsatisfied requirement."""
    return tmp_path_factory.mktemp("vol-cache")


def vol(cache: Path, *args: str):
    return run_vol("--cache-path", str(cache), *args)


def stack(path: Path):
    context = contexts.Context()
    context.config["file.location"] = path.resolve().as_uri()
    context.layers.add_layer(FileLayer(context, "file", "file"))
    layer = XenSaveImageStacker.stack(context, "file")
    if layer is not None:
        context.layers.add_layer(layer)
    return context, layer


# --- the real xl save file ----------------------------------------------------------------


def test_real_save_opens_with_the_records_the_reference_lists(real_save: Path) -> None:
    context, layer = stack(real_save)
    assert isinstance(layer, XenSaveImageLayer)
    image = layer.save_image
    assert [w.kind for w in image.wrappers] == ["xl", "libxl", "libxc"]
    xl, libxl, libxc = image.wrappers
    assert xl.details["mandatory_flags"] == 3 and xl.details["optional_data_len"] == 903
    assert libxl.version == 2 and libxc.version == 3
    assert (image.domain.guest_type, image.domain.page_shift) == ("PV", 12)
    assert (image.domain.xen_major, image.domain.xen_minor) == (4, 17)
    assert image.config["c_info"]["name"] == "realxen-pv1"
    assert image.config["c_info"]["type"] == "pv"
    assert image.pv_info == (8, 4)
    assert image.p2m_frames == 64
    counts = image.record_counts
    for name in ("X86_PV_INFO", "X86_CPUID_POLICY", "X86_MSR_POLICY", "STATIC_DATA_END"):
        assert counts[name] == 1
    assert counts["PAGE_DATA"] == 32 and "X86_PV_VCPU_MSRS" not in counts
    stats = image.page_stats
    assert (stats.records, stats.entries, stats.pages_with_data, stats.duplicates) == (
        32,
        32768,
        32768,
        0,
    )
    assert {"NOTAB", "L1TAB", "L2TAB", "L3TAB", "L1TAB_PIN", "L3TAB_PIN", "L4TAB_PIN"} == set(
        stats.by_type
    )
    assert image.warnings == []
    assert layer.maximum_address == 32768 * PAGE - 1
    assert image.machine_frames is None and layer.machine_frames is None


def test_real_save_page_tables_and_cr3_hold_pfns(real_save: Path) -> None:
    """What makes the stock Intel walk right: cr3 is a pfn of an L4 page the stream typed
    as L4TAB_PIN, and every present entry of that L4 names a pfn of the guest."""
    _, layer = stack(real_save)
    image = layer.save_image
    (context,) = image.vcpus()
    cr3 = context.registers["cr3"]
    assert cr3 == 0x485E000
    l4 = layer.read(cr3, PAGE)
    entries = struct.unpack("<512Q", l4)
    present = [e for e in entries if e & 1]
    assert len(present) >= 3
    frames = {(e & 0x000F_FFFF_FFFF_F000) >> 12 for e in present}
    assert all(layer.is_valid(frame * PAGE, PAGE) for frame in frames)
    assert max(frames) < 32768
    # ctrlreg[1] (the user L4) is a pfn too, with bit 0 set; flags 0x3d as Xen 4.17 wrote.
    cr1 = context.registers["cr1"]
    assert cr1 & 1 and layer.is_valid(cr1 & ~0xFFF, PAGE) and cr1 >> 12 < 32768
    assert context.registers["flags"] == 0x3D


def test_real_save_pslist_lists_the_guests_processes(
    real_save: Path, real_ps: list[tuple[int, int, str]], symbols_dir: Path, vol_cache: Path
) -> None:
    result = vol(
        vol_cache, "-r", "csv", "-s", str(symbols_dir), "-f", str(real_save), "linux.pslist"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    listed = {}
    for line in strip_banner(result.stdout)[1:]:
        fields = line.split(",")
        listed[int(fields[2])] = (int(fields[4]), fields[5])
    # ps itself (pids 99, 121) had exited when the guest was saved.
    expected = {pid: (ppid, comm) for pid, ppid, comm in real_ps if comm != "ps"}
    assert set(listed) == set(expected)
    for pid, (ppid, comm) in expected.items():
        assert listed[pid][0] == ppid
        # ps shows a kworker's current workqueue after the kernel's comm.
        assert comm.startswith(listed[pid][1]), (pid, comm, listed[pid][1])
    names = {comm for _, comm in listed.values()}
    assert {"realxen_server", "realxen_worker", "realxen_shell", "sleep"} <= names


# --- save images written from the bundled guest ------------------------------------------


@pytest.fixture(scope="module")
def written(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    registers = samples.load_facts(samples.bundled_sample_dir()).registers
    out = tmp_path_factory.mktemp("saves")
    paths = {}
    with (
        open(guest_image, "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as raw,
    ):
        for kind, wrapper in (("pv", "xl"), ("hvm", "xenopsd")):
            path = out / f"{kind}-{wrapper}.save"
            savewriter.write_from_image(path, raw, registers, kind, wrapper)
            paths[kind] = path
    return paths


@pytest.mark.parametrize("kind", ["pv", "hvm"])
def test_every_page_reads_as_the_raw_image(
    written: dict[str, Path], guest_image: Path, kind: str
) -> None:
    _, layer = stack(written[kind])
    assert isinstance(layer, XenSaveImageLayer)
    raw = guest_image.read_bytes()
    pages = len(raw) // PAGE
    hole = range(0xA0, 0xC0) if kind == "hvm" else range(0)
    for pfn in range(pages):
        if pfn in hole:
            assert not layer.is_valid(pfn * PAGE, PAGE)
            with pytest.raises(exceptions.InvalidAddressException):
                layer.read(pfn * PAGE, 8)
        else:
            assert layer.read(pfn * PAGE, PAGE) == raw[pfn * PAGE : (pfn + 1) * PAGE], pfn
    # A read across runs (record boundaries) stitches the pages together.
    assert layer.read(1023 * PAGE + 100, 2 * PAGE) == raw[1023 * PAGE + 100 : 1025 * PAGE + 100]
    assert not layer.is_valid(pages * PAGE)


@pytest.mark.parametrize(
    ("kind", "plugin"),
    [
        ("pv", "linux.pslist"),
        ("pv", "linux.psaux"),
        ("pv", "linux.pstree"),
        ("hvm", "linux.pslist"),
        ("hvm", "linux.pstree"),
        ("hvm", "linux.psaux"),
    ],
)
def test_vol_on_save_images_equals_the_raw_image(
    written: dict[str, Path],
    symbols_dir: Path,
    expected_dir: Path,
    kind: str,
    plugin: str,
    vol_cache: Path,
) -> None:
    # -vv also says which layers were stacked: ours on the file, Volatility's own Intel
    # layer on ours (the PV walk over machine frames must not claim a save image).
    result = vol(vol_cache, "-vv", "-s", str(symbols_dir), "-f", str(written[kind]), plugin)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = strip_banner((expected_dir / f"{plugin.split('.')[1]}.txt").read_text())
    assert strip_banner(result.stdout) == expected
    stacked = re.search(r"Stacked layers: \[([^\]]*)\]", result.stderr)
    assert stacked, result.stderr[-2000:]
    names = [name.strip(" '") for name in stacked.group(1).split(",")]
    assert names == ["primary", "XenSaveImageLayer", "FileLayer"]
    assert "XenPVLinuxIntel" not in result.stderr


def test_the_pv_stacker_leaves_a_pv_save_image_alone(written: dict[str, Path]) -> None:
    """The PV stacker (machine-frame walk) leaves a PV save image to Volatility's stock
    Linux stacker: its page tables hold pfns."""
    context, layer = stack(written["pv"])
    assert layer.machine_frames is None
    assert XenPVLinuxIntelStacker.stack(context, layer.name) is None


# --- damage -------------------------------------------------------------------------------


def test_interrupted_save_gives_a_warning_and_a_partial_view(
    written: dict[str, Path], guest_image: Path, tmp_path: Path
) -> None:
    path = tmp_path / "cut.save"
    full = written["pv"].read_bytes()
    cut = len(full) // 2 + 30 * PAGE + 1234  # inside the page contents of a record
    path.write_bytes(full[:cut])
    _, layer = stack(path)
    assert isinstance(layer, XenSaveImageLayer)
    assert any("without an END record" in w for w in layer.save_image.warnings)
    raw = guest_image.read_bytes()
    image = XenSaveImage.open(path)
    runs = image.page_runs()
    valid = 0
    for pfn in range(len(raw) // PAGE):
        i = runs.find(pfn)
        if i < 0:
            assert not layer.is_valid(pfn * PAGE)
            continue
        offset = runs.value[i] + (pfn - runs.key[i]) * PAGE
        assert offset + PAGE <= cut
        assert layer.read(pfn * PAGE, PAGE) == raw[pfn * PAGE : (pfn + 1) * PAGE]
        valid += 1
    assert 0.45 < valid / (len(raw) // PAGE) < 0.55


def test_unusable_save_images_are_refused_with_one_line(tmp_path: Path, vol_cache: Path) -> None:
    legacy = tmp_path / "legacy.save"
    legacy.write_bytes(
        savewriter.ss.XL_MAGIC + struct.pack("<4I", 0x01020304, 1, 0, 0) + b"\0" * 4096
    )
    _, layer = stack(legacy)
    assert isinstance(layer, XenRefusedLayer)
    assert "convert-legacy-stream" in layer.reason
    result = vol(vol_cache, "-f", str(legacy), "linux.pslist")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if "convert-legacy-stream" in line]
    assert len(lines) == 1, result.stderr[-2000:]


def test_a_save_cut_before_its_pages_is_refused_with_one_line(
    written: dict[str, Path], tmp_path: Path, vol_cache: Path
) -> None:
    path = tmp_path / "header-only.save"
    path.write_bytes(written["hvm"].read_bytes()[:2000])
    _, layer = stack(path)
    assert isinstance(layer, XenRefusedLayer)
    result = vol(vol_cache, "-f", str(path), "linux.pslist")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if "Xen save image cannot be used" in line]
    assert len(lines) == 1 and "PAGE_DATA" in lines[0], result.stderr[-2000:]


def test_not_a_save_image_is_left_to_other_stackers(tmp_path: Path) -> None:
    other = tmp_path / "raw.bin"
    other.write_bytes(b"\0" * 8192)
    _, layer = stack(other)
    assert layer is None
