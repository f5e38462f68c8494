"""ia64 dump-cores (Xen 3.2-4.2): writer-made cores opened pseudo-physically, the
22208-byte ``vcpu_guest_context`` and the ``mapped_regs_t`` of ``.xen_ia64_mapped_regs``
decoded, libxc's crossed mapped_regs / shared_info headers undone, and ``xen.info`` /
``xen.vcpus`` through ``vol``.

Offsets below come from compiling ``xen/include/public/arch-ia64.h`` (xen-project/xen
e567964a54^) with an LP64 compiler, not from the code under test.
"""

from __future__ import annotations

import csv
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from volatility3.framework import contexts, exceptions

from volatility3_xen import api, report
from volatility3_xen.formats import ia64, vcpu
from volatility3_xen.formats.dumpcore import XenDumpCore
from volatility3_xen.testdata import corewriter as w

from .conftest import run_vol, strip_banner

PAGE = 16384  # ia64's usual PAGE_SIZE
PFNS = np.array([0, 1, 2, 5, 6, 0x40000, 0x40001], dtype=np.uint64)  # holes at 3-4, 7..
EM_IA_64 = 50

# (offset, size) in vcpu_guest_context / mapped_regs, from the compiled header.
CONTEXT_OFFSETS = {
    "flags": (0, 8),
    "r1": (16 + 8, 8),
    "r12": (16 + 96, 8),
    "b0": (16 + 256, 8),
    "ip": (464, 8),
    "psr": (472, 8),
    "cfm": (480, 8),
    "pr": (488, 8),
    "nats": (496, 4),
    "ar_rsc": (16 + 616, 8),
    "ar_bsp": (16 + 624, 8),
    "ar_bspstore": (16 + 632, 8),
    "ar_unat": (16 + 776, 8),
    "ar_pfs": (16 + 1000, 8),
    "ar_ec": (16 + 1016, 8),
    "cr_iva": (16 + 1528, 8),
    "cr_pta": (16 + 1576, 8),
    "cr_ipsr": (16 + 1640, 8),
    "cr_iip": (16 + 1664, 8),
    "cr_ifs": (16 + 1696, 8),
    "cr_tpr": (16 + 2040, 8),
    "dbr0": (16 + 4592, 8),
    "rr0": (16 + 4720, 8),
    "rr7": (16 + 4720 + 56, 8),
    "excp_vector": (16 + 5760, 4),
    "num_phys_stacked": (16 + 22160, 8),
    "event_callback_ip": (22192, 8),
    "privregs_pfn": (22200, 8),
}
MAPPED_OFFSETS = {
    "vpsr": (1424, 8),
    "vpr": (1432, 8),
    "iva": (2064, 8),
    "ipsr": (2176, 8),
    "iip": (2200, 8),
    "ifs": (2232, 8),
    "tpr": (2576, 8),
    "interrupt_collection_enabled": (3088, 4),
    "metaphysical_mode": (3144, 4),
    "banknum": (3148, 4),
    "rrs0": (3152, 8),
    "krs7": (3216 + 56, 8),
    "itc_last": (3416, 8),
}


def _values(offsets: dict[str, tuple[int, int]], seed: int) -> dict[str, int]:
    """A value per field that no other field holds, filling its width."""
    out = {}
    for i, (name, (_, size)) in enumerate(offsets.items()):
        value = (seed << 8 | (i + 1)) * 0x0101_0101_0101_0101
        out[name] = value & ((1 << (8 * size)) - 1)
    return out


def _raw(offsets: dict[str, tuple[int, int]], values: dict[str, int], size: int) -> bytes:
    raw = bytearray(size)
    for name, (offset, width) in offsets.items():
        raw[offset : offset + width] = values[name].to_bytes(width, "little")
    return bytes(raw)


def _context(slot: int) -> tuple[bytes, dict[str, int]]:
    values = _values(CONTEXT_OFFSETS, 0x10 + slot)
    values["psr"] = 0x0000_1210_0800_6010  # cpl 0 (bits 33:32): kernel
    values["flags"] = ia64.VGCF_ONLINE
    return _raw(CONTEXT_OFFSETS, values, 22208), values


def _mapped(slot: int, entsize: int) -> tuple[bytes, dict[str, int]]:
    values = _values(MAPPED_OFFSETS, 0x40 + slot)
    return _raw(MAPPED_OFFSETS, values, 4096).ljust(entsize, b"\xcc"), values


def _page(pfn: int) -> bytes:
    return f"ia64 pfn {pfn:#x}".encode().ljust(64, b".") * (PAGE // 64)


def _write(path: Path, *, pv: bool = True, crossed: bool = True, vcpus: int = 2) -> dict:
    contexts_, mapped = zip(*(_context(k) for k in range(vcpus)))
    pages, regs = zip(*(_mapped(k, PAGE) for k in range(vcpus)))
    spec = w.CoreSpec(
        kind="hvm",  # auto-translated: .xen_pfn
        pfns=PFNS,
        pages={i: _page(int(pfn)) for i, pfn in enumerate(PFNS)},
        page_size=PAGE,
        machine=EM_IA_64,
        magic=w.XC_CORE_MAGIC if pv else w.XC_CORE_MAGIC_HVM,
        vcpus=list(contexts_),
        vcpu_entsize=22208,
        shared_info=b"ia64 shared_info page".ljust(PAGE, b"s") if pv else None,
        ia64_mapped_regs=list(pages) if pv else None,
        ia64_crossed_headers=crossed,
    )
    layout = w.write_core(path, spec)
    return {"layout": layout, "contexts": mapped, "regs": regs}


def test_decode_matches_the_header_offsets() -> None:
    raw, values = _context(3)
    page, mapped = _mapped(3, 4096)
    (context,) = ia64.decode_ia64_vcpus(raw, 22208, 1, [page])
    assert context.layout == ia64.LAYOUT_IA64_PV
    for name, value in values.items():
        assert context.registers[name] == value, name
    for name, value in mapped.items():
        assert context.registers[f"mr_{name}"] == value, name
    assert (context.ip, context.sp, context.flags_reg) == (
        values["ip"],
        values["r12"],
        values["psr"],
    )
    assert context.online and context.in_kernel
    assert context.decoded_page_table_base() == (vcpu.ADDRESS_NONE, 0)
    user = dict(values, psr=values["psr"] | 3 << 32)
    (user_context,) = ia64.decode_ia64_vcpus(_raw(CONTEXT_OFFSETS, user, 22208), 22208, 1)
    assert not user_context.in_kernel and user_context.layout == ia64.LAYOUT_IA64


@pytest.mark.parametrize("crossed", [True, False], ids=["libxc-crossed", "straight"])
def test_pv_core_opens_with_regs_and_shared_info_where_they_are(
    tmp_path: Path, crossed: bool
) -> None:
    path = tmp_path / "ia64pv.core"
    written = _write(path, crossed=crossed)
    header = {s.name: s for s in written["layout"].sections}
    regs_header = header[".xen_ia64_mapped_regs"]
    info_header = header[".xen_shared_info"]
    if crossed:  # libxc's headers: back to back from the end of prstatus, regs first...
        assert info_header.offset == regs_header.offset + regs_header.size
    else:  # ...where the data is shared info first.
        assert regs_header.offset == info_header.offset + info_header.size
    core = XenDumpCore.open(path)
    assert core.warnings == []
    assert (core.guest_type, core.is_pv, core.machine_frames) == ("PV", False, None)
    assert core.shared_info[:21] == b"ia64 shared_info page"
    assert core.ia64_extent is not None and core.ia64_extent.crossed is crossed
    # ...and with crossed headers the shared info really sits at the regs header's offset.
    data = path.read_bytes()
    if crossed:
        assert data[regs_header.offset : regs_header.offset + 21] == b"ia64 shared_info page"
    contexts_ = core.vcpus()
    assert [c.layout for c in contexts_] == [ia64.LAYOUT_IA64_PV] * 2
    for context, values, regs in zip(contexts_, written["contexts"], written["regs"]):
        assert all(context.registers[k] == v for k, v in values.items())
        assert all(context.registers[f"mr_{k}"] == v for k, v in regs.items())


def test_pv_core_pseudo_physical_reads(tmp_path: Path) -> None:
    path = tmp_path / "ia64pv.core"
    _write(path)
    context = contexts.Context()
    layer = context.layers[api.open_core(context, path)]
    for pfn in PFNS.tolist():
        assert layer.read(pfn * PAGE, PAGE) == _page(pfn), hex(pfn)
        assert layer.read(pfn * PAGE + PAGE - 5, 5) == _page(pfn)[-5:]
    for hole in (3, 4, 7, 0x3FFFF, 0x40002):
        assert not layer.is_valid(hole * PAGE)
        with pytest.raises(exceptions.InvalidAddressException):
            layer.read(hole * PAGE, 8)
    assert layer.read(3 * PAGE, 8, pad=True) == bytes(8)


def test_report_rows(tmp_path: Path) -> None:
    path = tmp_path / "ia64pv.core"
    written = _write(path)
    core = XenDumpCore.open(path)
    facts = {(f.group, f.field): f for f in report.facts(core)}
    assert facts["guest", "type"].value == "PV"
    assert "auto-translated" in facts["guest", "type"].hint
    assert facts["guest", "width"].value == "64-bit"
    assert facts["ia64", "vcpu_slot_size"].value == 22208
    assert facts["ia64", "mapped_regs_entries"].value == 2
    assert facts["ia64", "headers_crossed"].value is True
    regs_header = written["layout"].section(".xen_ia64_mapped_regs")
    assert facts["ia64", "mapped_regs_offset"].value == regs_header.offset + PAGE
    assert not any(group == "warnings" for group, _ in facts)
    rows = report.vcpu_table(core, all_registers=True).as_dicts()
    assert len(rows) == 2
    values, regs = written["contexts"][1], written["regs"][1]
    assert rows[1]["IP"] == values["ip"] and rows[1]["R12"] == values["r12"]
    assert rows[1]["CR_IIP"] == values["cr_iip"] and rows[1]["RR7"] == values["rr7"]
    assert rows[1]["MR_VPSR"] == regs["vpsr"] and rows[1]["MR_KRS7"] == regs["krs7"]
    assert rows[1]["DTB(P)"] is report.Absent.NOT_APPLICABLE


def test_hvm_core_has_no_mapped_regs(tmp_path: Path) -> None:
    path = tmp_path / "ia64hvm.core"
    _write(path, pv=False)
    core = XenDumpCore.open(path)
    assert core.warnings == [] and core.guest_type == "HVM/PVH"
    assert [c.layout for c in core.vcpus()] == [ia64.LAYOUT_IA64] * 2
    facts = {(f.group, f.field): f.value for f in report.facts(core)}
    assert facts["ia64", "mapped_regs"] is False


def test_unknown_slot_size_is_reported_not_guessed(tmp_path: Path) -> None:
    path = tmp_path / "ia64old.core"
    spec = w.CoreSpec(
        kind="hvm",
        pfns=PFNS,
        page_size=PAGE,
        machine=EM_IA_64,
        vcpus=[b"\x01" * 21000],
        vcpu_entsize=21000,  # an older Xen's vcpu_guest_context: layout not established
    )
    w.write_core(path, spec)
    core = XenDumpCore.open(path)
    assert core.vcpus() == []
    assert report.vcpu_table(core).rows == ()
    facts = {(f.group, f.field): f for f in report.facts(core)}
    assert facts["ia64", "vcpu_slot_size"].value == 21000
    assert "not decoded" in facts["ia64", "vcpu_slot_size"].hint
    assert any("21000 bytes" in text for text in core.warnings)


@pytest.mark.parametrize(
    ("entsize", "problem"), [(1024, "cannot hold"), (1 << 40, None), (0, "cannot hold")]
)
def test_damaged_mapped_regs_header(tmp_path: Path, entsize: int, problem: str | None) -> None:
    path = tmp_path / "ia64bad.core"
    layout = _write(path)["layout"]
    regs = layout.section(".xen_ia64_mapped_regs")
    data = bytearray(path.read_bytes())
    # sh_entsize of the mapped_regs header (Elf64_Shdr: entsize at +56).
    struct.pack_into("<Q", data, 64 + 64 * regs.index + 56, entsize)
    if entsize == 0:
        struct.pack_into("<Q", data, 64 + 64 * regs.index + 32, 8)  # and sh_size 8
    path.write_bytes(bytes(data))
    core = XenDumpCore.open(path)
    contexts_ = core.vcpus()
    assert len(contexts_) == 2 and all(c.layout == ia64.LAYOUT_IA64 for c in contexts_)
    if problem:
        assert any(problem in text for text in core.warnings)
    report.facts(core)  # rows, never an exception


def test_vol_info_and_vcpus(tmp_path: Path) -> None:
    path = tmp_path / "ia64pv.core"
    written = _write(path)
    info = run_vol("-r", "csv", "-f", str(path), "xen.info", timeout=120)
    assert info.returncode == 0, info.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO("\n".join(strip_banner(info.stdout)))))
    by_field = {(r["Group"], r["Field"]): r for r in rows}
    assert by_field["ia64", "mapped_regs_entries"]["Number"] == "2"
    assert by_field["guest", "machine"]["Value"] == "EM_IA_64 (50)"
    vcpus = run_vol("-r", "csv", "-f", str(path), "xen.vcpus", timeout=120)
    assert vcpus.returncode == 0, vcpus.stderr[-2000:]
    table = list(csv.DictReader(io.StringIO("\n".join(strip_banner(vcpus.stdout)))))
    assert [int(r["FileSlot"]) for r in table] == [0, 1]
    assert int(table[0]["IP"], 16) == written["contexts"][0]["ip"]
    assert int(table[1]["MR_VPSR"], 16) == written["regs"][1]["vpsr"]


def test_vol_vcpus_names_undecoded_slots(tmp_path: Path) -> None:
    path = tmp_path / "ia64old.core"
    spec = w.CoreSpec(
        kind="hvm", pfns=PFNS, page_size=PAGE, machine=EM_IA_64, vcpus=[b""] * 2,
        vcpu_entsize=21000,
    )  # fmt: skip
    w.write_core(path, spec)
    result = run_vol("-f", str(path), "xen.vcpus", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 vCPU slot(s) of 21000 bytes" in result.stderr
    assert strip_banner(result.stdout) == ["FileSlot\tOnline\tInKernel"]
