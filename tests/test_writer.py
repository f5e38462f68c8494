"""Tests for testdata.corewriter: byte-exact layout (dump-core-layout.md), contents page by page.

Cores are read back with pyelftools and an independent note parser, and (when the system python has
Debian's python3-libkdumpfile) through libkdumpfile via tests/kdump_oracle.py.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile

try:
    from volatility3_xen.testdata import corewriter as w
except ModuleNotFoundError:  # package not installed and the repo root not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from volatility3_xen.testdata import corewriter as w

ORACLE = Path(__file__).with_name("kdump_oracle.py")
SYSTEM_PYTHON = "/usr/bin/python3"

# --- fixtures and independent readers -------------------------------------------------------------


def pattern_page(pfn: int, page_size: int) -> bytes:
    """A page that can only be pfn's: its pfn, tagged, in every 8-byte word."""
    return struct.pack("<Q", 0x5A00_0000_0000_0000 | pfn) * (page_size // 8)


def pattern_image(n_pages: int, page_size: int, zero_pfns: tuple[int, ...] = ()) -> bytearray:
    image = bytearray(n_pages * page_size)
    for pfn in range(n_pages):
        if pfn not in zero_pfns:
            image[pfn * page_size : (pfn + 1) * page_size] = pattern_page(pfn, page_size)
    return image


def expected_page(spec: w.CoreSpec, index: int) -> bytes:
    """What the writer promises for table entry ``index`` (independent of its implementation)."""
    ps = spec.page_size
    if index in spec.pages:
        return bytes(spec.pages[index]).ljust(ps, b"\0")
    pfn = int(spec.pfns[index])
    image = b"" if spec.image is None else bytes(spec.image)
    if pfn == w.INVALID_PFN or pfn * ps >= len(image):
        return bytes(ps)
    return image[pfn * ps : (pfn + 1) * ps].ljust(ps, b"\0")


def sections(elf: ELFFile) -> dict[str, Any]:
    return {sec.name: sec for sec in elf.iter_sections()}


def parse_notes(blob: bytes, endian: str) -> list[tuple[bytes, int, bytes]]:
    notes = []
    pos = 0
    while pos < len(blob):
        namesz, descsz, ntype = struct.unpack_from(endian + "III", blob, pos)
        pos += 12
        name = blob[pos : pos + namesz]
        pos += -(-namesz // 4) * 4
        notes.append((name, ntype, blob[pos : pos + descsz]))
        pos += -(-descsz // 4) * 4
    return notes


def read_core(path: Path) -> tuple[ELFFile, dict[str, Any], Any]:
    handle = open(path, "rb")  # closed by the caller via the returned handle
    elf = ELFFile(handle)
    return elf, sections(elf), handle


@pytest.fixture
def core_path(tmp_path: Path) -> Path:
    return tmp_path / "test.core"


# --- byte-exact layout (worked examples of dump-core-layout.md section 2) -------------------------


def test_hvm_worked_example_layout(core_path: Path) -> None:
    pfns = w.hvm_table_for_image(4)
    layout = w.write_core(core_path, w.CoreSpec(kind="hvm", pfns=pfns))
    elf, secs, handle = read_core(core_path)
    with handle:
        hdr = elf.header
        assert hdr.e_ident.EI_CLASS == "ELFCLASS64" and hdr.e_ident.EI_DATA == "ELFDATA2LSB"
        assert hdr.e_ident.EI_ABIVERSION == 1 and hdr.e_ident.EI_OSABI == "ELFOSABI_SYSV"
        assert (hdr.e_type, hdr.e_machine) == ("ET_CORE", "EM_X86_64")
        assert (hdr.e_shoff, hdr.e_shnum, hdr.e_shstrndx) == (64, 6, 1)
        assert (hdr.e_phoff, hdr.e_phnum, hdr.e_phentsize, hdr.e_shentsize) == (0, 0, 56, 64)
        names = [s.name for s in elf.iter_sections()]
        assert names == ["", ".shstrtab", ".note.Xen", ".xen_prstatus", ".xen_pages", ".xen_pfn"]
        expect = {  # name: (sh_type, offset, size, addralign, entsize, sh_name)
            ".shstrtab": ("SHT_STRTAB", 0x2000 + 4 * 4096 + 32, 55, 0, 0, 1),
            ".note.Xen": ("SHT_NOTE", 0x1C0, 0x568, 0, 0, 11),
            ".xen_prstatus": ("SHT_PROGBITS", 0x728, 5168, 8, 5168, 21),
            ".xen_pages": ("SHT_PROGBITS", 0x2000, 4 * 4096, 4096, 4096, 35),
            ".xen_pfn": ("SHT_PROGBITS", 0x2000 + 4 * 4096, 32, 8, 8, 46),
        }
        for name, (sh_type, off, size, align, entsize, sh_name) in expect.items():
            h = secs[name].header
            got = (h.sh_type, h.sh_offset, h.sh_size, h.sh_addralign, h.sh_entsize, h.sh_name)
            assert got == (sh_type, off, size, align, entsize, sh_name), name
            assert (h.sh_flags, h.sh_addr, h.sh_link, h.sh_info) == (0, 0, 0, 0)
        assert secs[".shstrtab"].data() == (
            b"\0.shstrtab\0.note.Xen\0.xen_prstatus\0.xen_pages\0.xen_pfn\0"
        )
    assert core_path.stat().st_size == layout.file_size == 0x2000 + 4 * 4096 + 32 + 55
    # The alignment pad between prstatus and pages is explicit zeros.
    raw = core_path.read_bytes()
    assert raw[0x1B58:0x2000] == bytes(0x2000 - 0x1B58)


def test_pv_worked_example_layout(core_path: Path) -> None:
    # 64-bit PV guest, 2 vCPUs, shared info; a small table instead of 262144 entries.
    n = 5
    pfns, mfns = w.pv_table(range(n), [0x9000 + i for i in range(n)])
    spec = w.CoreSpec(kind="pv", pfns=pfns, gmfns=mfns, vcpus=[b"a", b"b"], shared_info=b"S" * 8)
    w.write_core(core_path, spec)
    elf, secs, handle = read_core(core_path)
    with handle:
        assert elf.header.e_shnum == 7
        offsets = {name: sec.header.sh_offset for name, sec in secs.items() if name}
        assert offsets == {
            ".note.Xen": 0x200,
            ".xen_prstatus": 0x768,
            ".xen_shared_info": 0x2FC8,
            ".xen_pages": 0x4000,
            ".xen_p2m": 0x4000 + n * 4096,
            ".shstrtab": 0x4000 + n * 4096 + n * 16,
        }
        assert secs[".xen_prstatus"].header.sh_size == 0x2860
        si = secs[".xen_shared_info"].header
        assert (si.sh_size, si.sh_entsize, si.sh_addralign, si.sh_name) == (4096, 4096, 8, 35)
        assert secs[".xen_pages"].header.sh_name == 52 and secs[".xen_p2m"].header.sh_name == 63
        p2m = secs[".xen_p2m"].header
        assert (p2m.sh_entsize, p2m.sh_addralign, p2m.sh_size) == (16, 8, n * 16)
        assert secs[".shstrtab"].header.sh_size == 72
        assert secs[".xen_shared_info"].data() == b"S" * 8 + bytes(4088)
        prstatus = secs[".xen_prstatus"].data()
        assert prstatus == b"a" + bytes(5167) + b"b" + bytes(5167)
        table = np.frombuffer(p2m_data := secs[".xen_p2m"].data(), dtype="<u8").reshape(-1, 2)
        assert len(p2m_data) == n * 16
        assert table[:, 0].tolist() == list(range(n))
        assert table[:, 1].tolist() == [0x9000 + i for i in range(n)]
    assert core_path.stat().st_size == 0x4000 + n * 4096 + n * 16 + 72


def test_notes_decode(core_path: Path) -> None:
    pfns = w.hvm_table_for_image(3, tail_padding=2)
    spec = w.CoreSpec(kind="hvm", pfns=pfns, vcpus=[b"", b"", b""])
    w.write_core(core_path, spec)
    elf, secs, handle = read_core(core_path)
    with handle:
        notes = parse_notes(secs[".note.Xen"].data(), "<")
        # pyelftools must also be able to walk the note section.
        assert [n["n_type"] for n in secs[".note.Xen"].iter_notes()] == list(w.STANDARD_NOTES)
    assert [(name, t, len(d)) for name, t, d in notes] == [
        (b"Xen\0", w.NOTE_NONE, 0),
        (b"Xen\0", w.NOTE_HEADER, 32),
        (b"Xen\0", w.NOTE_XEN_VERSION, 1280),
        (b"Xen\0", w.NOTE_FORMAT_VERSION, 8),
    ]
    assert struct.unpack("<4Q", notes[1][2]) == (0xF00FEBEE, 3, 5, 4096)
    assert struct.unpack("<Q", notes[3][2]) == (1,)
    xv = notes[2][2]
    assert struct.unpack_from("<QQ", xv, 0) == (4, 17)
    assert xv[16:32].rstrip(b"\0") == w.GENERATED_EXTRA.encode()
    assert xv[1200:1264].rstrip(b"\0") == w.GENERATED_MARKER.encode()
    assert xv[176:1200].startswith(b"xen-3.0-x86_64 ")
    assert struct.unpack_from("<QQ", xv, 1264) == (0xFFFF_8000_0000_0000, 4096)


def test_pv32_and_toolstack32_xen_version_quirks(tmp_path: Path) -> None:
    pfns, mfns = w.pv_table([0], [7])
    version = w.XenVersion(virt_start=0xF580_0000_1122_3344)
    pv32 = w.write_core(
        tmp_path / "pv32.core",
        w.CoreSpec(kind="pv", pfns=pfns, gmfns=mfns, machine=w.EM_386, xen_version=version),
    )
    xv = parse_notes((tmp_path / "pv32.core").read_bytes()[0x1C0 : 0x1C0 + 1384], "<")[2][2]
    assert len(xv) == 1280  # descsz unchanged, pagesize memmoved down 4 bytes
    assert struct.unpack_from("<I", xv, 1264) == (0x1122_3344,)
    assert struct.unpack_from("<Q", xv, 1268) == (4096,)
    assert xv[1276:1280] == bytes(4)
    assert pv32.section(".note.Xen").size == 1384

    ts32 = w.write_core(
        tmp_path / "ts32.core",
        w.CoreSpec(kind="pv", pfns=pfns, gmfns=mfns, toolstack32=True, xen_version=version),
    )
    notes_sec = ts32.section(".note.Xen")
    assert notes_sec.size == 1380
    assert ts32.section(".xen_prstatus").offset % 8 == 4  # as on a real i386 toolstack
    assert ts32.section(".xen_p2m").addralign == 4
    raw = (tmp_path / "ts32.core").read_bytes()
    xv = parse_notes(raw[notes_sec.offset : notes_sec.offset + notes_sec.size], "<")[2][2]
    assert len(xv) == 1276
    assert struct.unpack_from("<IQ", xv, 1264) == (0x1122_3344, 4096)


# --- contents, page by page -----------------------------------------------------------------------

CONTENT_CASES = [
    pytest.param("hvm", "little", 4096, 64, id="hvm-le-4k"),
    pytest.param("hvm", "big", 4096, 64, id="hvm-be-4k"),
    pytest.param("hvm", "little", 65536, 64, id="hvm-le-64k"),
    pytest.param("pv", "little", 4096, 64, id="pv-le-4k"),
    pytest.param("pv", "big", 4096, 64, id="pv-be-4k"),
    pytest.param("pv", "big", 65536, 64, id="pv-be-64k"),
    pytest.param("pv", "little", 16384, 64, id="pv-le-16k"),
    pytest.param("hvm", "little", 4096, 32, id="hvm-le-4k-elf32"),
    pytest.param("pv", "big", 4096, 32, id="pv-be-4k-elf32"),
]


def content_spec(kind: str, byteorder: str, page_size: int, elf_class: int) -> w.CoreSpec:
    # pfn 3 is all zero in the image (written as a hole), pfns 12/13 lie beyond the image, index 2
    # gets an explicit page overriding the image, two ~0 padding entries end the table.
    image = pattern_image(10, page_size, zero_pfns=(3,))
    pfn_list = [0, 1, 2, 3, 5, 6, 9, 12, 13]
    tail = 2
    common: dict[str, Any] = {
        "image": image,
        "pages": {2: b"explicit page" * 3},
        "page_size": page_size,
        "byteorder": byteorder,
        "elf_class": elf_class,
        "machine": w.EM_386 if elf_class == 32 else w.EM_X86_64,
    }
    if kind == "hvm":
        pfns = np.concatenate(
            [np.array(pfn_list, dtype=np.uint64), w.hvm_table_for_image(0, (), tail)]
        )
        return w.CoreSpec(kind="hvm", pfns=pfns, **common)
    mfns = [0x7_0000 - 3 * p for p in pfn_list]  # descending, non-contiguous machine frames
    pfns, gmfns = w.pv_table(pfn_list, mfns, tail_padding=tail)
    return w.CoreSpec(kind="pv", pfns=pfns, gmfns=gmfns, **common)


@pytest.mark.parametrize(("kind", "byteorder", "page_size", "elf_class"), CONTENT_CASES)
def test_every_page_and_entry(
    core_path: Path, kind: str, byteorder: str, page_size: int, elf_class: int
) -> None:
    spec = content_spec(kind, byteorder, page_size, elf_class)
    layout = w.write_core(core_path, spec)
    endian = "<" if byteorder == "little" else ">"
    elf, secs, handle = read_core(core_path)
    with handle:
        hdr = elf.header
        assert elf.little_endian == (byteorder == "little")
        assert elf.elfclass == elf_class
        shdr_size = 64 if elf_class == 64 else 40
        assert (hdr.e_shoff, hdr.e_shentsize) == (64 if elf_class == 64 else 52, shdr_size)
        assert hdr.e_phentsize == (56 if elf_class == 64 else 32)
        note = secs[".note.Xen"].header
        assert note.sh_offset == hdr.e_shoff + hdr.e_shnum * shdr_size
        pages = secs[".xen_pages"].header
        n = len(spec.pfns)
        assert pages.sh_offset % page_size == 0
        assert (pages.sh_size, pages.sh_entsize, pages.sh_addralign) == (n * page_size,) + (
            page_size,
        ) * 2
        table_name = ".xen_p2m" if kind == "pv" else ".xen_pfn"
        table_hdr = secs[table_name].header
        assert table_hdr.sh_offset == pages.sh_offset + n * page_size
        assert table_hdr.sh_entsize == (16 if kind == "pv" else 8)
        table = np.frombuffer(secs[table_name].data(), dtype=endian + "u8")
        if kind == "pv":
            table = table.reshape(-1, 2)
            assert table[:, 1].tolist() == [int(x) for x in spec.gmfns]
            table = table[:, 0]
        assert table.tolist() == [int(x) for x in spec.pfns]
        header_desc = parse_notes(secs[".note.Xen"].data(), endian)[1][2]
        magic = 0xF00FEBED if kind == "pv" else 0xF00FEBEE
        assert struct.unpack(endian + "4Q", header_desc) == (magic, 1, n, page_size)
    raw = core_path.read_bytes()
    assert len(raw) == layout.file_size
    for i in range(n):
        page = raw[pages.sh_offset + i * page_size : pages.sh_offset + (i + 1) * page_size]
        assert page == expected_page(spec, i), f"table entry {i} (pfn {int(spec.pfns[i]):#x})"
    # Sanity-check the expectations themselves: explicit, pattern, hole and padding pages differ.
    assert raw[pages.sh_offset + 2 * page_size :].startswith(b"explicit page")
    assert expected_page(spec, 1) == pattern_page(1, page_size)
    assert expected_page(spec, 3) == bytes(page_size) == expected_page(spec, n - 1)


def test_partial_last_image_page_and_wide_page_sizes(core_path: Path) -> None:
    image = pattern_image(2, 4096) + b"tail"
    spec = w.write_hvm_from_image(core_path, image, holes=())
    assert spec.pfns.tolist() == [0, 1, 2]
    raw = core_path.read_bytes()
    assert raw[0x2000 + 2 * 4096 : 0x2000 + 3 * 4096] == b"tail" + bytes(4092)
    with pytest.raises(ValueError, match="power of two"):
        w.plan_layout(w.CoreSpec(kind="hvm", pfns=spec.pfns, page_size=3000))


def test_sparse_one_gib_guest(core_path: Path) -> None:
    n_pages = (1 << 30) // 4096
    pfns = w.hvm_table_for_image(n_pages, tail_padding=8)
    data_pages = {0: b"first", 100_000: b"middle" * 100, len(pfns) - 9: b"last real page"}
    layout = w.write_core(core_path, w.CoreSpec(kind="hvm", pfns=pfns, pages=data_pages))
    st = core_path.stat()
    assert st.st_size == layout.file_size > 1 << 30
    table_bytes = len(pfns) * 8
    # Allocated: head + 3 pages + the 2 MiB table, plus filesystem slack; never the 1 GiB.
    assert st.st_blocks * 512 < table_bytes + (1 << 20), st.st_blocks
    pages_offset = layout.section(".xen_pages").offset
    with open(core_path, "rb") as f:
        for index, data in data_pages.items():
            f.seek(pages_offset + index * 4096)
            assert f.read(4096) == data.ljust(4096, b"\0")
        f.seek(pages_offset + 5 * 4096)
        assert f.read(4096) == bytes(4096)
        f.seek(layout.section(".xen_pfn").offset)
        assert np.array_equal(np.frombuffer(f.read(table_bytes), "<u8"), pfns)


# --- helpers and knobs ----------------------------------------------------------------------------


def test_hvm_table_skips_libxc_holes_and_pads() -> None:
    pfns = w.hvm_table_for_image(0x100, tail_padding=3)
    real = pfns[:-3]
    assert real.tolist() == [p for p in range(0x100) if not 0xA0 <= p < 0xC0]
    assert pfns[-3:].tolist() == [w.INVALID_PFN] * 3
    big = w.hvm_table_for_image(0x100_010)
    assert big.size == 0x100_010 - 0x20 - 0x10000 and int(big[-1]) == 0x100_00F
    assert w.hvm_table_for_image(0x200, holes=((0xA0, 0xC0),)).size == 0x200 - 0x20


def test_write_pv_from_image_skips_invalid_p2m(core_path: Path) -> None:
    image = pattern_image(4, 4096)
    p2m = [0x50, w.INVALID_PFN, 0x40, 0x41]
    spec = w.write_pv_from_image(core_path, image, p2m, tail_padding=1, vcpus=[b"x"])
    assert spec.pfns.tolist() == [0, 2, 3, w.INVALID_PFN]
    assert spec.gmfns.tolist() == [0x50, 0x40, 0x41, w.INVALID_PFN]
    raw = core_path.read_bytes()
    pages_offset = w.plan_layout(spec).section(".xen_pages").offset
    assert raw[pages_offset + 4096 : pages_offset + 8192] == pattern_page(2, 4096)


def test_damaged_core_knobs(core_path: Path) -> None:
    pfns = w.hvm_table_for_image(2)
    odd_note = w.RawNote(b".note.Xen", w.NOTE_FORMAT_VERSION, struct.pack("<Q", 2))
    spec = w.CoreSpec(
        kind="hvm",
        pfns=pfns,
        nr_pages=99,
        nr_vcpus=4,
        magic=0x12345678,
        format_version=(1, 0),
        notes=(w.NOTE_FORMAT_VERSION, w.NOTE_HEADER, odd_note),
        omit_sections=frozenset({".xen_prstatus"}),
        marker=None,
        xen_version=w.XenVersion(changeset="abc123", extra=".0"),
    )
    layout = w.write_core(core_path, spec)
    assert not layout.has(".xen_prstatus")
    elf, secs, handle = read_core(core_path)
    with handle:
        assert list(secs) == ["", ".shstrtab", ".note.Xen", ".xen_pages", ".xen_pfn"]
        notes = parse_notes(secs[".note.Xen"].data(), "<")
    assert [(n, t) for n, t, _ in notes] == [
        (b"Xen\0", w.NOTE_FORMAT_VERSION),
        (b"Xen\0", w.NOTE_HEADER),
        (b".note.Xen\0", w.NOTE_FORMAT_VERSION),
    ]
    assert struct.unpack("<Q", notes[0][2]) == (1 << 32,)
    assert struct.unpack("<4Q", notes[1][2]) == (0x12345678, 4, 99, 4096)
    # The unmarked variant honours xen_version verbatim.
    spec2 = w.CoreSpec(kind="hvm", pfns=pfns, marker=None, xen_version=spec.xen_version)
    w.write_core(core_path, spec2)
    xv = parse_notes(read_notes(core_path), "<")[2][2]
    assert xv[1200:1264].rstrip(b"\0") == b"abc123" and xv[16:32].rstrip(b"\0") == b".0"


def read_notes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return sections(ELFFile(f))[".note.Xen"].data()


def test_invalid_specs_are_rejected() -> None:
    pfns = w.hvm_table_for_image(2)
    with pytest.raises(ValueError, match="gmfns"):
        w.plan_layout(w.CoreSpec(kind="pv", pfns=pfns))
    with pytest.raises(ValueError, match="fit"):
        w.plan_layout(w.CoreSpec(kind="hvm", pfns=pfns, marker="x" * 64))
    with pytest.raises(ValueError, match="entsize"):
        w.plan_layout(w.CoreSpec(kind="hvm", pfns=pfns, vcpus=[bytes(5169)]))
    with pytest.raises(ValueError, match="4 GiB"):
        big = w.hvm_table_for_image(1 << 20, holes=())
        w.plan_layout(w.CoreSpec(kind="hvm", pfns=big, elf_class=32))


def test_vcpu_context_helpers() -> None:
    ctx = w.vcpu_context_x86_64(cr3=0x1234_5000, rip=0xFFFF_FFFF_8100_0000, rsp=0x42)
    assert len(ctx) == 5168
    assert struct.unpack_from("<Q", ctx, 5008) == (0x1234_5000,)
    assert struct.unpack_from("<Q", ctx, 648) == (0xFFFF_FFFF_8100_0000,)
    assert struct.unpack_from("<Q", ctx, 672) == (0x42,)
    assert struct.unpack_from("<Q", ctx, 512)[0] & w.VGCF_ONLINE
    mfn = 0x1_2345_6  # needs the rotate: above 2^20
    cr3 = w.compat_cr3(mfn)
    assert ((cr3 >> 12) | (cr3 << 20)) & 0xFFFF_FFFF == mfn
    ctx32 = w.vcpu_context_x86_32(cr3=cr3, eip=0xC010_0000, byteorder="big")
    assert len(ctx32) == 2800 and struct.unpack_from(">I", ctx32, 2728) == (cr3,)
    assert struct.unpack_from(">I", ctx32, 516 + 32) == (0xC010_0000,)


# --- libkdumpfile oracle --------------------------------------------------------------------------


def _oracle_unavailable() -> str | None:
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import kdumpfile"], capture_output=True, text=True, check=False
    )
    if probe.returncode:
        return f"{SYSTEM_PYTHON} cannot import kdumpfile (install python3-libkdumpfile)"
    return None


def run_oracle(core: Path, requests: list[tuple[str, int, int]]) -> dict[str, Any]:
    proc = subprocess.run(
        [SYSTEM_PYTHON, str(ORACLE), str(core)],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(proc.stdout)
    assert result["open_error"] is None, result["open_error"]
    assert len(result["results"]) == len(requests)
    return result


@pytest.fixture(scope="module")
def oracle() -> None:
    reason = _oracle_unavailable()
    if reason:
        pytest.skip(reason)


ORACLE_PAGES = 0xC8  # spans the VGA hole 0xA0-0xBF


def test_oracle_hvm_every_page(oracle: None, core_path: Path) -> None:
    image = pattern_image(ORACLE_PAGES, 4096, zero_pfns=(7,))
    ctx = w.vcpu_context_x86_64(cr3=0x1ABC_D000)
    # No ~0 tail: libkdumpfile's max_pfn overflows on it (dump-core-layout.md section 8).
    spec = w.write_hvm_from_image(core_path, image, vcpus=[ctx])
    requests = [("KPHYSADDR", int(pfn) << 12, 4096) for pfn in spec.pfns]
    requests.append(("KPHYSADDR", 0xA5 << 12, 16))  # VGA hole: not in the table
    requests.append(("KPHYSADDR", ORACLE_PAGES << 12, 16))  # beyond the guest
    result = run_oracle(core_path, requests)
    assert result["attrs"].get("file.format") == "xc_core_elf"
    assert result["attrs"].get("xen.xlat") == 0  # auto-translated
    assert result["attrs"].get("cpu.0.reg.cr3") == 0x1ABC_D000
    for index, (req, got) in enumerate(zip(requests[:-2], result["results"])):
        assert got.get("hex") == expected_page(spec, index).hex(), req
    assert "error" in result["results"][-2] and "error" in result["results"][-1]


def test_oracle_pv_every_page_kphys_and_mach(oracle: None, core_path: Path) -> None:
    image = pattern_image(40, 4096, zero_pfns=(5,))
    # Descending runs, an ascending run and singles, like real MFN assignments; pfn 9 absent.
    p2m = (
        [0x8_0000 - p for p in range(20)]
        + [0x3_0000 + p for p in range(12)]
        + [0x100 + 7 * i for i in range(8)]
    )
    p2m[9] = w.INVALID_PFN
    spec = w.write_pv_from_image(core_path, image, p2m, vcpus=[b"", b""], shared_info=b"si")
    requests = [("KPHYSADDR", int(pfn) << 12, 4096) for pfn in spec.pfns]
    requests += [("MACHPHYSADDR", int(mfn) << 12, 4096) for mfn in spec.gmfns]
    requests += [("KPHYSADDR", 9 << 12, 8), ("MACHPHYSADDR", 0x5_0000 << 12, 8)]
    result = run_oracle(core_path, requests)
    assert result["attrs"].get("xen.xlat") == 1  # non-auto-translated (PV)
    n = len(spec.pfns)
    results = result["results"]
    for index in range(n):
        expected = expected_page(spec, index).hex()
        assert results[index].get("hex") == expected, f"pfn {int(spec.pfns[index]):#x}"
        assert results[n + index].get("hex") == expected, f"mfn {int(spec.gmfns[index]):#x}"
    assert "error" in results[-2] and "error" in results[-1]
