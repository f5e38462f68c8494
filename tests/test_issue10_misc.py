"""Issue 10, items 5, 7, 9, 10 and 11: the CR3 -> DTB rule (PAE keeps bits 11:5), ARM's
64-bit ``sctlr``, outputs that never follow a planted symlink or trust a stamp others could
write, ``xen.info`` naming the location the user gave, and the framework version the
plugins and layers declare.

Expected values are computed here from the Intel SDM / Xen headers, not by the code under
test.
"""

from __future__ import annotations

import csv
import http.server
import io
import os
import re
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from volatility3.framework import contexts

from volatility3_xen import api, report
from volatility3_xen.formats import vcpu
from volatility3_xen.formats.dumpcore import XenDumpCore
from volatility3_xen.layers import windows
from volatility3_xen.testdata import corewriter as w
from volatility3_xen.testdata import samples

from .conftest import PLUGINS, REPO, run_vol, strip_banner

PAGE = 4096
CR4_PAE, CR4_PCIDE = 1 << 5, 1 << 17
EFER_LMA = 1 << 10
PWT, PCD = 1 << 3, 1 << 4


# --- item 5: CR3 -> DTB -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cr3", "cr4", "efer", "mode", "base"),
    [
        # PAE: the PDPT is 32-byte aligned; bits 11:5 are address, 4:0 (PWT, PCD) dropped.
        (0x07F5_B0A0 | PWT | PCD, CR4_PAE, None, "pae", 0x07F5_B0A0),
        (0x0018_5FE0, CR4_PAE, 0, "pae", 0x0018_5FE0),
        # 32-bit paging: bits 31:12.
        (0x0012_3000 | PWT | PCD, 0, None, "32-bit", 0x0012_3000),
        # PCIDE (long mode only): the low 12 bits are the PCID, bit 63 no-flush.
        ((1 << 63) | 0x0012_3000 | 0xABC, CR4_PAE | CR4_PCIDE, None, "long", 0x0012_3000),
        # Long mode without PCID, CR3 above 4 GiB: PAE's CR3 cannot be, so 4-level.
        (0x0001_2345_6000 | PCD, CR4_PAE, None, "long", 0x0001_2345_6000),
        # EFER.LMA, where the source has it, decides; LAM bits 62:61 dropped.
        ((3 << 61) | 0x0045_6000 | PWT, CR4_PAE, EFER_LMA, "long", 0x0045_6000),
        (0x0045_6060, CR4_PAE, EFER_LMA, "long", 0x0045_6000),
        # Legacy PAE with EFER known: bits above 31 are not address.
        (0x0045_6060, CR4_PAE, 0, "pae", 0x0045_6060),
    ],
)
def test_cr3_base_rule(cr3: int, cr4: int, efer: int | None, mode: str, base: int) -> None:
    assert vcpu.x86_cr3_base(cr3, cr4, efer) == (mode, base)


def _hvm_core(path: Path, registers: dict[str, int], pages: dict[int, bytes]) -> XenDumpCore:
    """An HVM core of ``max(pages) + 1`` pfns holding ``pages`` (pfn -> bytes)."""
    n_pfns = max(pages) + 1
    spec = w.CoreSpec(
        kind="hvm",
        pfns=np.arange(n_pfns, dtype=np.uint64),
        pages=pages,
        vcpus=[vcpu.encode_vcpu(vcpu.LAYOUT_X86_64, "little", registers)],
    )
    w.write_core(path, spec)
    return XenDumpCore.open(path)


def test_vcpus_pae_dtb_keeps_bits_5_to_11(tmp_path: Path) -> None:
    """A 32-bit PAE HVM guest's process PDPT at a 32-byte offset: DTB(P) is that offset."""
    registers = {"cr0": 0x8001_0031, "cr3": 0x5020 | PWT | PCD, "cr4": CR4_PAE, "flags": 0x21}
    core = _hvm_core(tmp_path / "pae.core", registers, {7: b""})
    (row,) = report.vcpu_table(core).as_dicts()
    assert row[report.COLUMN_DTB_PHYSICAL] == 0x5020
    assert row["CR3"] == 0x5020 | PWT | PCD


# A 32-bit PAE Windows-like address space: KUSER_SHARED_DATA mapped at its kernel
# (0xFFDF0000) and user (0x7FFE0000) addresses, PDPT at 0x5020 (not page aligned).
_PDPT, _PD_HIGH, _PD_LOW, _PT, _KUSER = 0x5020, 6, 7, 8, 9


def _pae_windows_pages() -> dict[int, bytes]:
    def entries(pairs: dict[int, int], offset: int = 0) -> bytes:
        page = bytearray(PAGE)
        for index, value in pairs.items():
            struct.pack_into("<Q", page, offset + 8 * index, value)
        return bytes(page)

    table = 0x63  # present, rw, accessed, dirty
    kuser = bytearray(PAGE)
    struct.pack_into("<I", kuser, 0x26C, 6)  # NtMajorVersion
    return {
        _PDPT // PAGE: entries({1: _PD_LOW << 12 | 1, 3: _PD_HIGH << 12 | 1}, _PDPT % PAGE),
        _PD_HIGH: entries({0x1FE: _PT << 12 | table}),  # 0xFFDF0000: PDPT 3, PD 0x1FE
        _PD_LOW: entries({0x1FF: _PT << 12 | table}),  # 0x7FFE0000: PDPT 1, PD 0x1FF
        _PT: entries({0x1F0: _KUSER << 12 | table, 0x1E0: _KUSER << 12 | table}),
        _KUSER: bytes(kuser),
    }


def test_windows_stacker_pae_cr3(tmp_path: Path) -> None:
    path = tmp_path / "winpae.core"
    registers = {"cr0": 0x8001_0031, "cr3": _PDPT | PWT | PCD, "cr4": CR4_PAE, "flags": 0x21}
    _hvm_core(path, registers, _pae_windows_pages())
    context = contexts.Context()
    xen = api.open_core(context, path)
    layer = windows.XenVcpuWindowsStacker.stack(context, xen)
    assert layer is not None, "the PAE vCPU CR3 was not accepted as a Windows DTB"
    assert type(layer).__name__ == "WindowsIntelPAE"
    assert layer.config["page_map_offset"] == _PDPT
    assert layer.read(0xFFDF0000 + 0x26C, 4) == struct.pack("<I", 6)
    assert layer.translate(0x7FFE0000)[0] == _KUSER * PAGE


def _long_mode_windows_pages(l4_pfn: int) -> dict[int, bytes]:
    """4-level tables mapping KUSER_SHARED_DATA at 0xFFFFF78000000000 and 0x7FFE0000."""
    table, kuser_pfn = 0x63, 20
    pages: dict[int, bytearray] = {l4_pfn: bytearray(PAGE)}
    next_pfn = iter(range(l4_pfn + 1, l4_pfn + 16))
    for va in (0xFFFFF78000000000, 0x7FFE0000):
        pfn = l4_pfn
        for shift in (39, 30, 21):
            index = (va >> shift) & 0x1FF
            (entry,) = struct.unpack_from("<Q", pages[pfn], 8 * index)
            if not entry:
                entry = next(next_pfn) << 12 | table
                struct.pack_into("<Q", pages[pfn], 8 * index, entry)
                pages[entry >> 12] = bytearray(PAGE)
            pfn = entry >> 12
        struct.pack_into("<Q", pages[pfn], 8 * ((va >> 12) & 0x1FF), kuser_pfn << 12 | table)
    kuser = bytearray(PAGE)
    struct.pack_into("<I", kuser, 0x26C, 10)
    pages[kuser_pfn] = kuser
    return {pfn: bytes(page) for pfn, page in pages.items()}


def test_windows_stacker_long_mode_cr3_with_pcid(tmp_path: Path) -> None:
    path = tmp_path / "win64.core"
    l4 = 4
    registers = {"cr0": 0x8005_0033, "cr3": l4 << 12 | 0x5, "cr4": CR4_PAE | CR4_PCIDE}
    _hvm_core(path, registers | {"flags": 0x21}, _long_mode_windows_pages(l4))
    context = contexts.Context()
    layer = windows.XenVcpuWindowsStacker.stack(context, api.open_core(context, path))
    assert layer is not None and type(layer).__name__ == "WindowsIntel32e"
    assert layer.config["page_map_offset"] == l4 << 12
    assert layer.read(0xFFFFF78000000000 + 0x26C, 4) == struct.pack("<I", 10)


def test_windows_stacker_rejects_a_non_windows_space(tmp_path: Path) -> None:
    path = tmp_path / "notwin.core"
    registers = {"cr0": 0x8005_0033, "cr3": 4 << 12, "cr4": CR4_PAE | CR4_PCIDE}
    _hvm_core(path, registers, {4: bytes(PAGE), 9: b""})  # an empty L4: nothing mapped
    context = contexts.Context()
    assert windows.XenVcpuWindowsStacker.stack(context, api.open_core(context, path)) is None


# --- item 7: ARM sctlr is uint64_t ------------------------------------------------------------

ARM_SCTLR = 0x0000_1000_30D5_1805  # SCTLR_EL1 with bit 44 (DSSBS) set


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_arm_sctlr_is_64_bit(byteorder: str) -> None:
    """arch-arm.h: ``uint64_t sctlr`` at 320, then ttbcr/ttbr0/ttbr1 at 328/336/344."""
    order = "<" if byteorder == "little" else ">"
    raw = bytearray(352)
    struct.pack_into(order + "I", raw, 0, 1)  # VGCF_online
    struct.pack_into(order + "4Q", raw, 320, ARM_SCTLR, 0x8035_3520, 0x4000_1000, 0x4000_2000)
    context = vcpu.decode_vcpu(bytes(raw), vcpu.LAYOUT_ARM, byteorder, slot=0)
    assert context.registers["sctlr"] == ARM_SCTLR
    assert context.registers["ttbcr"] == 0x8035_3520
    assert (context.registers["ttbr0"], context.registers["ttbr1"]) == (0x4000_1000, 0x4000_2000)
    assert vcpu.encode_vcpu(vcpu.LAYOUT_ARM, byteorder, context.registers) == bytes(raw)


# --- item 9: no planted symlink is followed, no foreign stamp trusted -------------------------


def _raw_image(path: Path, pages: int = 64) -> Path:
    image = bytearray(pages * PAGE)
    for pfn in range(pages):
        image[pfn * PAGE : pfn * PAGE + 16] = f"raw pfn {pfn:#06x}".encode().ljust(16, b".")
    path.write_bytes(bytes(image))
    return path


def test_convert_does_not_follow_a_planted_temporary_symlink(tmp_path: Path) -> None:
    raw = _raw_image(tmp_path / "guest.raw")
    out = tmp_path / "out.core"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    # The name the converter used to write through: another user can guess it.
    planted = tmp_path / f".{out.name}.{os.getpid()}.tmp"
    planted.symlink_to(victim)
    assert samples.main(["convert", str(raw), str(out), "--kind", "hvm"]) == 0
    assert victim.read_bytes() == b"precious"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)
    core = XenDumpCore.open(out)
    assert core.page_map.page_index(5) is not None
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted(["guest.raw", "out.core", "victim", planted.name])


def test_writer_refuses_to_write_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "link.core"
    link.symlink_to(victim)
    spec = w.CoreSpec(kind="hvm", pfns=np.arange(2, dtype=np.uint64))
    with pytest.raises(OSError):
        w.write_core(link, spec)
    assert victim.read_bytes() == b"precious"


def _built(cache: Path) -> list[str]:
    messages: list[str] = []
    samples.build_tiny(cache, status=messages.append)
    return messages


def test_stamps_in_a_directory_others_can_write_are_not_trusted(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert len(_built(cache)) == 2  # built once
    assert _built(cache) == []  # and reused from a private directory
    os.chmod(cache, 0o777)  # now anyone could have planted core + stamp
    try:
        assert len(_built(cache)) == 2
    finally:
        os.chmod(cache, 0o700)
    os.chmod(cache, 0o1777)  # sticky, like /tmp: others cannot replace our files
    try:
        assert _built(cache) == []
    finally:
        os.chmod(cache, 0o700)
    stamp = cache / "tiny-pv.core.stamp"
    stamp.unlink()
    stamp.symlink_to(tmp_path / "elsewhere.stamp")  # a stamp that is not a file of ours
    (tmp_path / "elsewhere.stamp").write_text("{}")
    assert len(_built(cache)) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_stamp_owned_by_another_user_is_not_trusted(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _built(cache)
    os.chown(cache / "tiny-hvm.core.stamp", 4242, 4242)
    assert len(_built(cache)) == 1


# --- item 10: xen.info names the location the user gave -------------------------------------


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local HTTP server over ``tmp_path``: (directory, base URL)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_info_shows_a_url_location(http_root: tuple[Path, str]) -> None:
    directory, base = http_root
    w.write_core(
        directory / "served.core", w.CoreSpec(kind="hvm", pfns=np.arange(4, dtype=np.uint64))
    )
    url = f"{base}/served.core"
    result = run_vol("-r", "csv", "-f", url, "xen.info", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO("\n".join(strip_banner(result.stdout)))))
    (name,) = [row for row in rows if (row["Group"], row["Field"]) == ("file", "name")]
    assert name["Value"] == url
    (size,) = [row for row in rows if (row["Group"], row["Field"]) == ("file", "size")]
    assert int(size["Number"]) == (directory / "served.core").stat().st_size


def test_info_location_text() -> None:
    """file: URLs show as paths; any other URL as given, its password masked."""
    code = (
        "import sys, volatility3.plugins as p; p.__path__.append(sys.argv[1]);"
        "from volatility3.plugins.xen.info import _shown_location as s;"
        "print(s('file:///data/x%20y.core')); print(s('https://ann:hunter2@h.example/c'));"
        "print(s('s3://bucket/k.core'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(PLUGINS)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "/data/x y.core",
        "https://ann:***@h.example/c",
        "s3://bucket/k.core",
    ]


# --- item 11: the framework version declared is the one the code needs -------------------------

FLOOR = (2, 26, 0)  # setup.cfg's volatility3 floor; the APIs used are listed in the README


def _declared_versions() -> dict[str, tuple[int, int, int]]:
    found = {}
    pattern = re.compile(r"_required_framework_version = \((\d+), (\d+), (\d+)\)")
    for path in [*REPO.joinpath("volatility3_xen").rglob("*.py"), *PLUGINS.rglob("*.py")]:
        for match in pattern.finditer(path.read_text()):
            found[f"{path.relative_to(REPO)}:{match.start()}"] = tuple(map(int, match.groups()))
    return found


def test_declared_framework_version_is_the_floor() -> None:
    declared = _declared_versions()
    assert len(declared) >= 4  # two plugins, the layers
    assert set(declared.values()) == {FLOOR}, declared
    setup = (REPO / "setup.cfg").read_text()
    assert f"volatility3>={FLOOR[0]}.{FLOOR[1]}" in setup.replace(" ", "")


def test_installed_framework_satisfies_the_declared_floor() -> None:
    from volatility3.framework import constants

    installed = (constants.VERSION_MAJOR, constants.VERSION_MINOR, constants.VERSION_PATCH)
    assert installed[0] == FLOOR[0] and installed >= FLOOR


def test_ci_runs_the_suite_against_the_floor_after_the_readme_command() -> None:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert "set -euo pipefail" in lines  # a failing floor run fails CI
    readme = "pip install -q '.[test]' &&"
    readme_command = next(i for i, line in enumerate(lines) if readme in line)
    pin = next(i for i, line in enumerate(lines) if "volatility3==" in line)
    assert f"'volatility3=={FLOOR[0]}.{FLOOR[1]}.{FLOOR[2]}'" in lines[pin]
    run = next(i for i, line in enumerate(lines) if i > pin and "python -m pytest" in line)
    assert readme_command < pin < run
