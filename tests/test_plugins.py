"""xen.info / xen.vcpus: report.py in-process, the automagic in-process, and the plugins run
through ``vol`` on crafted cores of every layout (x86_64 HVM, x86_64 PV, x86_32 PV on EM_386,
ARM 352-byte contexts).

Every register of every core holds a value no other field holds, so a column showing the
wrong field cannot pass.  Expected values are computed here from the Xen layouts, not by
the code under test.  The ``vol`` runs (the slow part, ~1 s each) all start once per session,
two at a time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:
    from volatility3_xen import report
except ModuleNotFoundError:  # package not installed and the repo root not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from volatility3_xen import report

from volatility3 import framework
from volatility3.framework import contexts, interfaces
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import physical

from volatility3_xen.formats import vcpu
from volatility3_xen.formats.dumpcore import XenDumpCore
from volatility3_xen.layers import magic
from volatility3_xen.testdata import corewriter as w

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "plugins"

VGCF_I387, VGCF_IN_KERNEL, VGCF_ONLINE = 1, 4, 0x20

XEN_VERSION = w.XenVersion(
    major=4,
    minor=19,
    extra=".3-test",
    compiler="gcc (Debian 12.2.0-14) 12.2.0",
    compile_by="pbuilder",
    compile_domain="example.org",
    compile_date="Tue Mar  5 10:11:12 UTC 2024",
    capabilities="xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_64",
    changeset="c0ffee1234 2024-03-05",
    virt_start=0xFFFF_8000_0000_0000,
)

# --- distinct register values ----------------------------------------------------------------


def distinct_registers(layout: str, **overrides: int) -> dict[str, int]:
    """A value per field that no other field of the layout holds (per-size ranges)."""
    base = {1: 0x40, 2: 0x4000, 4: 0x4100_0000, 8: 0x4200_0000_0000_0000}
    step = {1: 1, 2: 1, 4: 0x101, 8: 0x1_0001_0001}
    values = {
        field.name: base[field.size] + index * step[field.size]
        for index, field in enumerate(vcpu.layout_fields(layout))
    }
    values.update(overrides)
    return values


def column_title(register: str) -> str:
    """How xen.vcpus names a register's column (the plugin's documented convention)."""
    return {"pc64": "PC", "flags": "VGCF_FLAGS"}.get(register, register.upper())


def compat_rotate(mfn: int) -> int:
    """Xen's compat_pfn_to_cr3: a 32-bit rotate left by 12 (xen-x86_32.h)."""
    return ((mfn << 12) | (mfn >> 20)) & 0xFFFF_FFFF


# --- the crafted cores -----------------------------------------------------------------------

N_PAGES = 64
HVM_CR3 = 0x8000_0001_2345_6007  # bit 63 "no flush" + PCID 7
HVM_PAGE5 = b"the page of pfn 5"
PV_PFNS = np.arange(N_PAGES, dtype=np.uint64)
PV_MFNS = np.array([0x5_0000 + (pfn * 37) % N_PAGES * 3 for pfn in range(N_PAGES)], np.uint64)
PV_KERNEL_PFN = 13  # pfn of the kernel L4 whose machine frame goes into cr3
PV_FOREIGN_MFN = 0x7_7777  # a frame the guest does not own
PV32_MFNS = PV_MFNS + np.uint64(0x12_0000)  # >= 2^20: the compat rotate matters
PV32_KERNEL_PFN = 21
PV32_VIRT_START = 0xF580_0000
ARM_PFNS = np.arange(0x80000, 0x80000 + N_PAGES, dtype=np.uint64)
ARM_TTBR1 = (0x42 << 48) | 0x4_1234_5000 | 1  # ASID 0x42, CnP
ARM_CPSR = 0x3C5  # AArch64 EL1h, DAIF masked


def shared_info_x86_64() -> bytes:
    page = bytearray(4096)
    struct.pack_into("<IIII", page, 3072, 2, 1_700_000_000, 123, 0)  # wc version/sec/nsec/hi
    struct.pack_into(
        "<6Q", page, 3088, 0x3F, 0x5_0042, 0, int(PV_MFNS[7]) << 12, 0xFFFF_C900_0000_0000, 9
    )
    return bytes(page)


def hvm_spec() -> w.CoreSpec:
    regs = distinct_registers(
        "x86_64", flags=VGCF_I387 | VGCF_ONLINE, cs=0x10, ss=0x18, cr3=HVM_CR3
    )
    return w.CoreSpec(
        kind="hvm",
        pfns=w.hvm_table_for_image(N_PAGES, tail_padding=3),
        vcpus=[vcpu.encode_vcpu("x86_64", "little", regs)],
        pages={5: HVM_PAGE5},
        xen_version=XEN_VERSION,
        marker=None,
    )


def pv64_spec() -> w.CoreSpec:
    slot0 = distinct_registers(
        "x86_64",
        flags=VGCF_I387 | VGCF_IN_KERNEL | VGCF_ONLINE,
        cs=0xE033,
        cr3=int(PV_MFNS[PV_KERNEL_PFN]) << 12,
    )
    # Slot 1: offline, in user mode, its cr3 names a frame outside the guest.
    slot1 = dict(slot0, flags=VGCF_I387, cs=0xE02B, cr3=PV_FOREIGN_MFN << 12, rip=0x7F00_1234)
    pfns, mfns = w.pv_table(PV_PFNS, PV_MFNS, tail_padding=2)
    return w.CoreSpec(
        kind="pv",
        pfns=pfns,
        gmfns=mfns,
        vcpus=[vcpu.encode_vcpu("x86_64", "little", r) for r in (slot0, slot1)],
        shared_info=shared_info_x86_64(),
        xen_version=XEN_VERSION,
        marker=None,
    )


def pv32_spec() -> w.CoreSpec:
    regs = distinct_registers(
        "x86_32",
        flags=VGCF_I387 | VGCF_IN_KERNEL | VGCF_ONLINE,
        cs=0xE019,
        cr3=compat_rotate(int(PV32_MFNS[PV32_KERNEL_PFN])),
    )
    pfns, mfns = w.pv_table(PV_PFNS, PV32_MFNS)
    return w.CoreSpec(
        kind="pv",
        pfns=pfns,
        gmfns=mfns,
        machine=w.EM_386,
        vcpus=[vcpu.encode_vcpu("x86_32", "little", regs)],
        xen_version=dataclasses.replace(XEN_VERSION, virt_start=PV32_VIRT_START),
        marker=None,
    )


def arm_spec() -> w.CoreSpec:
    regs = distinct_registers("arm", flags=1, cpsr=ARM_CPSR, ttbr1=ARM_TTBR1)
    return w.CoreSpec(
        kind="hvm",
        pfns=np.concatenate([ARM_PFNS, np.full(5, w.INVALID_PFN, np.uint64)]),
        machine=w.EM_ARM,
        vcpus=[vcpu.encode_vcpu("arm", "little", regs)],
        vcpu_entsize=w.VCPU_CONTEXT_SIZE_ARM,
        xen_version=XEN_VERSION,
        marker=None,
    )


SPECS = {"hvm": hvm_spec, "pv64": pv64_spec, "pv32": pv32_spec, "arm": arm_spec}


@pytest.fixture(scope="session")
def cores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("cores")
    paths = {}
    for name, make in SPECS.items():
        paths[name] = directory / f"{name}.core"
        w.write_core(paths[name], make())
    paths["not_xen"] = directory / "raw.img"
    paths["not_xen"].write_bytes(bytes(range(256)) * 64)
    return paths


def open_core(path: Path) -> XenDumpCore:
    return XenDumpCore.open(path)


# --- report.py, in-process ---------------------------------------------------------------------


def facts_by_key(core: XenDumpCore) -> dict[tuple[str, str], report.Fact]:
    facts = report.core_facts(core)
    keys = [(f.group, f.field) for f in facts]
    assert len(keys) == len(set(keys)), "every (group, field) must be unique"
    return dict(zip(keys, facts))


def test_core_facts_hvm(cores: dict[str, Path]) -> None:
    facts = facts_by_key(open_core(cores["hvm"]))
    expect = {
        ("guest", "type"): "HVM/PVH",
        ("guest", "magic"): "0xf00febee",
        ("guest", "machine"): "EM_X86_64 (62)",
        ("guest", "width"): "unknown",
        ("guest", "nr_pages"): str(N_PAGES + 3),  # below the VGA hole; 3 padding entries
        ("guest", "nr_vcpus"): "1",
        ("format", "version"): "0.1",
        ("format", "known"): "yes",
        ("xen", "version"): "4.19.3-test",
        ("xen", "changeset"): XEN_VERSION.changeset,
        ("xen", "compile_date"): XEN_VERSION.compile_date,
        ("xen", "virt_start"): "0xffff800000000000",
        ("xen", "note_layout"): "64-bit",
        ("table", "valid_pages"): str(N_PAGES),
        ("table", "padding_entries"): "3",
        ("table", "highest_pfn"): hex(N_PAGES - 1),
        ("table", "memory"): str(N_PAGES * 4096),
        ("shared_info", "present"): "no",
    }
    assert {key: facts[key].text for key in expect} == expect
    assert facts[("sections", ".xen_pfn")].text.endswith("entsize 8")
    assert not any(group == "warnings" for group, _ in facts)


def test_core_facts_pv32_version_quirk_and_shared_info(cores: dict[str, Path]) -> None:
    facts = facts_by_key(open_core(cores["pv32"]))
    assert facts[("guest", "type")].text == "PV"
    assert facts[("guest", "width")].text == "32-bit"
    assert facts[("guest", "machine")].text == "EM_386 (3)"
    assert facts[("xen", "virt_start")].value == PV32_VIRT_START
    assert facts[("xen", "pagesize")].value == 4096  # read at 1268, after libxc's memmove
    assert facts[("xen", "note_layout")].text == "32-bit PV (pagesize at 1268)"
    assert facts[("shared_info", "present")].value is False


def test_decoded_shared_info_pv64(cores: dict[str, Path]) -> None:
    core = open_core(cores["pv64"])
    info = report.decoded_shared_info(core)
    assert info is not None and info.layout == "x86_64"
    assert (info.max_pfn, info.pfn_to_mfn_frame_list_list) == (0x3F, 0x5_0042)
    assert (info.p2m_cr3, info.p2m_vaddr, info.p2m_generation) == (
        int(PV_MFNS[7]) << 12,
        0xFFFF_C900_0000_0000,
        9,
    )
    facts = facts_by_key(core)
    assert facts[("shared_info", "p2m_cr3")].hint == f"machine address {int(PV_MFNS[7]) << 12:#x}"
    assert facts[("shared_info", "wallclock_sec")].value == 1_700_000_000
    assert report.decoded_shared_info(open_core(cores["hvm"])) is None  # no section


def test_vcpus_cached_per_core(cores: dict[str, Path]) -> None:
    core = open_core(cores["pv64"])
    first = report.vcpus(core)
    assert report.vcpus(core) is first and len(first) == 2
    assert report.vcpus(open_core(cores["pv64"])) is not first


def test_vcpu_rows_pv64_decodes_cr3_through_p2m(cores: dict[str, Path]) -> None:
    rows = report.vcpu_rows(open_core(cores["pv64"]))
    mfn = int(PV_MFNS[PV_KERNEL_PFN])
    assert [(r["FileSlot"], r["Online"], r["InKernel"]) for r in rows] == [
        (0, True, True),
        (1, False, False),
    ]
    assert (rows[0]["CR3"], rows[0]["DTB(M)"], rows[0]["DTB(P)"]) == (
        mfn << 12,
        mfn << 12,
        PV_KERNEL_PFN << 12,
    )
    assert (rows[1]["DTB(M)"], rows[1]["DTB(P)"]) == (
        PV_FOREIGN_MFN << 12,
        report.Absent.NOT_FOUND,
    )


def test_vcpu_table_columns_without_all(cores: dict[str, Path]) -> None:
    table = report.vcpu_table(open_core(cores["pv32"]), all_registers=False)
    assert [c.name for c in table.columns] == [
        "FileSlot", "Online", "InKernel", "EIP", "ESP", "EFLAGS", "CS", "SS", "DS", "ES",
        "FS", "GS", "CR0", "CR2", "CR3", "CR4", "DTB(M)", "DTB(P)",
    ]  # fmt: skip
    assert table.layout == "x86_32" and len(table.rows) == 1


def test_vcpu_table_of_core_without_contexts(tmp_path: Path) -> None:
    spec = hvm_spec()
    spec.omit_sections = frozenset({w.SECTION_PRSTATUS})
    w.write_core(tmp_path / "novcpu.core", spec)
    table = report.vcpu_table(open_core(tmp_path / "novcpu.core"), all_registers=True)
    assert table.layout is None and table.rows == ()
    assert [c.name for c in table.columns] == ["FileSlot", "Online", "InKernel"]


# --- the automagic, in-process -----------------------------------------------------------------


def run_magic(path: Path) -> tuple[contexts.Context, requirements.MultiRequirement]:
    context = contexts.Context()
    context.config[magic.SINGLE_LOCATION_KEY] = path.resolve().as_uri()
    # What the CLI selects for a "xen" plugin: every stacker.
    context.config[magic.STACKERS_KEY] = [
        cls.__name__
        for cls in framework.class_subclasses(interfaces.automagic.StackerLayerInterface)
    ]
    top = requirements.MultiRequirement(name="Info")
    top.add_requirement(magic.XenCoreRequirement(name="primary"))
    automagic = magic.XenCoreMagic(context, "automagic.XenCoreMagic")
    automagic(context, "plugins", top)
    return context, top


def test_magic_satisfies_requirement_with_xen_layer(cores: dict[str, Path]) -> None:
    context, top = run_magic(cores["hvm"])
    assert top.unsatisfied(context, "plugins") == {}
    layer = context.layers[context.config["plugins.Info.primary"]]
    assert layer.core.header.nr_pages == N_PAGES + 3
    assert layer.read(5 * 4096, len(HVM_PAGE5)) == HVM_PAGE5
    assert context.config[magic.STACKERS_KEY] != [magic.NO_STACKER]


def test_magic_rejects_non_xen_file_without_leaving_layers(
    cores: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    context, top = run_magic(cores["not_xen"])
    assert "plugins.Info.primary" in top.unsatisfied(context, "plugins")
    assert list(context.layers) == []
    assert context.config[magic.STACKERS_KEY] == [magic.NO_STACKER]
    errors = [r.getMessage() for r in caplog.records if r.name == "volatility3_xen.layers.magic"]
    assert errors == [f"{cores['not_xen'].resolve()}: not a usable Xen dump-core: "
                      "not an ELF file (no \\x7fELF magic at offset 0)"]  # fmt: skip


def test_requirement_refuses_a_non_xen_layer(cores: dict[str, Path]) -> None:
    context = contexts.Context()
    context.config["raw.location"] = cores["not_xen"].resolve().as_uri()
    context.layers.add_layer(physical.FileLayer(context, "raw", "raw"))
    context.config["plugins.primary"] = "raw"
    requirement = magic.XenCoreRequirement(name="primary")
    assert "plugins.primary" in requirement.unsatisfied(context, "plugins")


# --- the plugins through vol -------------------------------------------------------------------

# volatility3.cli has no __main__; its first argument pass reads sys.argv *including* argv[0],
# which ``python -c`` sets to "-c" (taken for --config), hence the rename.
VOL = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'vol'; from volatility3.cli import main; main()",
]
RUNS: dict[str, tuple[str, list[str]]] = {
    "hvm_info": ("hvm", ["-r", "json", "xen.info"]),
    "hvm_vcpus_all": ("hvm", ["-r", "json", "xen.vcpus", "--all"]),
    "hvm_vcpus_csv": ("hvm", ["-r", "csv", "xen.vcpus"]),
    "pv64_info": ("pv64", ["-r", "json", "xen.info"]),
    "pv64_vcpus_all": ("pv64", ["-r", "json", "xen.vcpus", "--all"]),
    "pv32_info": ("pv32", ["-r", "json", "xen.info"]),
    "pv32_vcpus_all": ("pv32", ["-r", "json", "xen.vcpus", "--all"]),
    "arm_vcpus_all": ("arm", ["-r", "json", "xen.vcpus", "--all"]),
    "not_xen_info": ("not_xen", ["xen.info"]),
}


@pytest.fixture(scope="session")
def vol_runs(cores: dict[str, Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    def run(key: str) -> subprocess.CompletedProcess[str]:
        core, args = RUNS[key]
        command = [*VOL, "-q", "-p", str(PLUGIN_DIR), "-f", str(cores[core]), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)

    with ThreadPoolExecutor(max_workers=2) as pool:  # the test machine has two cores
        return dict(zip(RUNS, pool.map(run, RUNS)))


def json_rows(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = json.loads(result.stdout)
    assert all(row.pop("__children") == [] for row in rows)
    return rows


def info_values(result: subprocess.CompletedProcess[str]) -> dict[tuple[str, str], str]:
    return {(r["Group"], r["Field"]): r["Value"] for r in json_rows(result)}


def test_vol_info_hvm(vol_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    values = info_values(vol_runs["hvm_info"])
    expect = {
        ("guest", "type"): "HVM/PVH",
        ("guest", "nr_pages"): str(N_PAGES + 3),
        ("xen", "version"): "4.19.3-test",
        ("xen", "extra"): ".3-test",
        ("xen", "changeset"): "c0ffee1234 2024-03-05",
        ("xen", "capabilities"): "xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_64",
        ("xen", "compile_date"): "Tue Mar  5 10:11:12 UTC 2024",
        ("xen", "compiler"): "gcc (Debian 12.2.0-14) 12.2.0",
        ("xen", "virt_start"): "0xffff800000000000",
        ("format", "version"): "0.1",
        ("table", "memory"): str(N_PAGES * 4096),
        ("shared_info", "present"): "no",
    }
    assert {key: values.get(key) for key in expect} == expect


def test_vol_info_pv(vol_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    pv64 = info_values(vol_runs["pv64_info"])
    assert (pv64[("guest", "type")], pv64[("guest", "width")]) == ("PV", "64-bit")
    assert pv64[("guest", "nr_pages")] == str(N_PAGES + 2)
    assert pv64[("table", "section")] == ".xen_p2m"
    assert pv64[("shared_info", "p2m_cr3")] == hex(int(PV_MFNS[7]) << 12)
    pv32 = info_values(vol_runs["pv32_info"])
    assert pv32[("guest", "width")] == "32-bit"
    assert pv32[("xen", "virt_start")] == hex(PV32_VIRT_START)
    assert pv32[("xen", "pagesize")] == "4096"
    assert pv32[("xen", "note_layout")] == "32-bit PV (pagesize at 1268)"


def expected_register_columns(layout: str, registers: dict[str, int]) -> dict[str, Any]:
    """Every decoded field as its xen.vcpus --all column, gdt_frame0..15 folded."""
    expect: dict[str, Any] = {}
    for name, value in registers.items():
        if not name.startswith("gdt_frame"):
            expect[column_title(name)] = value
    if layout != "arm":
        expect["GDT_FRAMES"] = " ".join(hex(registers[f"gdt_frame{i}"]) for i in range(16))
    return expect


def test_vol_vcpus_hvm(vol_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    (row,) = json_rows(vol_runs["hvm_vcpus_all"])
    registers = vcpu.decode_vcpu(hvm_spec().vcpus[0], "x86_64", "little", 0).registers
    expect = expected_register_columns("x86_64", registers)
    assert {key: row[key] for key in expect} == expect
    assert row["RIP"] == 0x4200_0000_0000_0000 + 18 * 0x1_0001_0001  # rip is field 18
    assert (row["CR3"], row["DTB(M)"], row["DTB(P)"]) == (HVM_CR3, None, 0x1_2345_6000)
    assert (row["FileSlot"], row["Online"], row["InKernel"]) == (0, True, True)
    assert len(row) == len(expect) + 5  # FileSlot, Online, InKernel, DTB(M), DTB(P)


def test_vol_vcpus_csv_basic_columns(vol_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = vol_runs["hvm_vcpus_csv"]
    assert result.returncode == 0, result.stderr
    (row,) = list(csv.DictReader(io.StringIO(result.stdout.strip())))
    assert list(row) == [
        "TreeDepth", "FileSlot", "Online", "InKernel", "RIP", "RSP", "RFLAGS", "CS", "SS", "DS",
        "ES", "FS", "GS", "CR0", "CR2", "CR3", "CR4", "FS_BASE", "GS_BASE_KERNEL",
        "GS_BASE_USER", "DTB(M)", "DTB(P)",
    ]  # fmt: skip
    assert (row["CR3"], row["DTB(M)"], row["DTB(P)"]) == (hex(HVM_CR3), "N/A", "0x123456000")


def test_vol_vcpus_pv64(vol_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    slot0, slot1 = json_rows(vol_runs["pv64_vcpus_all"])
    registers = vcpu.decode_vcpu(pv64_spec().vcpus[0], "x86_64", "little", 0).registers
    expect = expected_register_columns("x86_64", registers)
    assert {key: slot0[key] for key in expect} == expect
    mfn = int(PV_MFNS[PV_KERNEL_PFN])
    assert (slot0["CR3"], slot0["DTB(M)"], slot0["DTB(P)"]) == (
        mfn << 12,
        mfn << 12,
        PV_KERNEL_PFN << 12,
    )
    assert (slot0["Online"], slot0["InKernel"]) == (True, True)
    assert (slot1["FileSlot"], slot1["Online"], slot1["InKernel"]) == (1, False, False)
    assert (slot1["RIP"], slot1["DTB(M)"], slot1["DTB(P)"]) == (
        0x7F00_1234,
        PV_FOREIGN_MFN << 12,
        None,
    )


def test_vol_vcpus_pv32(vol_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    (row,) = json_rows(vol_runs["pv32_vcpus_all"])
    registers = vcpu.decode_vcpu(pv32_spec().vcpus[0], "x86_32", "little", 0).registers
    expect = expected_register_columns("x86_32", registers)
    assert {key: row[key] for key in expect} == expect
    mfn = int(PV32_MFNS[PV32_KERNEL_PFN])
    assert (row["CR3"], row["DTB(M)"], row["DTB(P)"]) == (
        compat_rotate(mfn),
        mfn << 12,
        PV32_KERNEL_PFN << 12,
    )
    assert "RIP" not in row and "FS_BASE" not in row


def test_vol_vcpus_arm(vol_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    (row,) = json_rows(vol_runs["arm_vcpus_all"])
    registers = vcpu.decode_vcpu(arm_spec().vcpus[0], "arm", "little", 0).registers
    expect = expected_register_columns("arm", registers)
    assert {key: row[key] for key in expect} == expect
    assert row["CPSR"] == ARM_CPSR and row["TTBR1"] == ARM_TTBR1
    assert row["SP"] == registers["sp_el1"]  # EL1h selects SP_EL1
    assert (row["DTB(M)"], row["DTB(P)"]) == (None, 0x4_1234_5000)
    assert (row["Online"], row["InKernel"]) == (True, True)


def test_vol_info_on_non_xen_file(vol_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = vol_runs["not_xen_info"]
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert output.count("not a usable Xen dump-core: not an ELF file") == 1
    assert "Unsatisfied requirement plugins.Info.primary" in output
