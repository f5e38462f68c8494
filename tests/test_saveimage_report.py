"""xen.info / xen.vcpus on save images: the report rows, the plugins' ``-r json`` output, the
magic and ``api.open_image``, the Windows vCPU stacker on HVM CPU records, and the facts
of the real ``xl save`` file Xen 4.17 wrote."""

from __future__ import annotations

import json
import lzma
import re
import shutil
import struct
from pathlib import Path

import pytest
from volatility3.framework import contexts

from volatility3_xen import api, report
from volatility3_xen.formats import hvmcontext
from volatility3_xen.formats.saveimage import XenSaveImage
from volatility3_xen.layers import windows
from volatility3_xen.testdata import samples
from volatility3_xen.testdata import savewriter as sw

from .conftest import CACHE, REPO, SHARED, run_vol, sha256_of

PAGE = 4096
CONFIG = {
    "c_info": {"type": "hvm", "name": "report-guest", "uuid": "11111111-2222-3333-4444-5555"},
    "b_info": {"max_vcpus": 2, "max_memkb": 4096, "target_memkb": 2048},
    "disks": [{"vdev": "xvda"}, {"vdev": "xvdb"}],
    "nics": [{"mac": "00:16:3e:00:00:01"}],
}  # fmt: skip
HVM_CPU0 = {
    "rip": 0xFFFF_F800_1234_5678, "rsp": 0xFFFF_F800_0000_1000, "rflags": 0x246,
    "cr0": 0x8005_0033, "cr2": 0x7FF0_0000, "cr3": 0x3005, "cr4": 0x2_06F8, "efer": 0xD01,
    "cs": 0x10, "ss": 0x18, "cs_arbytes": 0xA9B, "ss_arbytes": 0xC93, "fs_base": 0x1000,
    "gs_base": 0xFFFF_F800_AAAA_0000, "shadow_gs": 0x7FF_0000, "lstar": 0xFFFF_F800_0000_2000,
    "star": 0x23_0010_0000_0000, "tsc": 123456789, "tr": 0x40, "gdtr_base": 0xFFFF_F800_0000_3000,
}  # fmt: skip
HVM_CPU1 = {"rip": 0x1000, "cr0": 0x10, "cr3": 0x12_3456_7000, "ss_arbytes": 0xCF3}


def page(pfn: int, copy: int = 0) -> bytes:
    return struct.pack("<QQ", pfn, copy) * (PAGE // 16)


def batch(pfns: list[int], types: int | list[int] = 0, copy: int = 0) -> sw.PageBatch:
    kinds = [types] * len(pfns) if isinstance(types, int) else types
    data = b"".join(page(p, copy) for p, t in zip(pfns, kinds) if t < sw.TYPE_BROKEN)
    return sw.PageBatch(pfns, kinds, data)


def hvm_spec(**changes) -> sw.SaveSpec:
    """pfns 0-15 sent, then 3-4 again (the last copy wins), 16-17 as XTAB; two CPU records."""
    spec = sw.SaveSpec(
        guest="hvm",
        batches=[batch(list(range(16))), batch([3, 4], copy=1), batch([16, 17], sw.TYPE_XTAB)],
        hvm_context=hvmcontext.encode_hvm_context({0: HVM_CPU0, 1: HVM_CPU1}),
        hvm_params={1: 0xFEFFC, 2: 5, 99: 7},
        config=CONFIG,
        checkpoint_after=[0],
    )
    for name, value in changes.items():
        setattr(spec, name, value)
    return spec


@pytest.fixture(scope="module")
def hvm_save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("save") / "hvm.save"
    sw.write_save(path, hvm_spec())
    return path


@pytest.fixture(scope="module")
def pv_save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("save") / "pv.save"
    spec = sw.SaveSpec(
        batches=[batch(list(range(8)))],
        vcpus={
            0: {"rip": 0xFFFF_FFFF_8100_0000, "cr3": 0x5000, "flags": 0x3D, "cs": 0xE033},
            2: {"rip": 0xFFFF_FFFF_8100_0010, "cr3": 0x9000, "flags": 0x20},  # pfn 9 absent
        },
    )
    sw.write_save(path, spec)
    return path


def facts_by_key(image) -> dict[tuple[str, str], report.Fact]:
    return {(fact.group, fact.field): fact for fact in report.facts(image)}


# --- the report rows --------------------------------------------------------------------------


def test_hvm_save_facts(hvm_save: Path) -> None:
    facts = facts_by_key(XenSaveImage.open(hvm_save))
    values = {key: fact.value for key, fact in facts.items()}
    expected = {
        ("file", "format"): "Xen save image",
        ("wrappers", "xl"): "present",
        ("wrappers", "libxl"): 2,
        ("wrappers", "libxc"): 3,
        ("guest", "type"): "HVM",
        ("guest", "page_size"): 4096,
        ("guest", "nr_vcpus"): 2,
        ("guest", "vcpu_layout"): "hvm_cpu",
        ("xen", "version"): "4.17",
        ("config", "name"): "report-guest",
        ("config", "uuid"): "11111111-2222-3333-4444-5555",
        ("config", "max_memkb"): 4096,
        ("config", "max_vcpus"): 2,
        ("config", "disks"): 2,
        ("config", "vifs"): 1,
        ("records", "PAGE_DATA"): 3,
        ("records", "CHECKPOINT"): 1,
        ("pages", "page_data_records"): 3,
        ("pages", "entries"): 20,
        ("pages", "pages_with_data"): 18,
        ("pages", "duplicates"): 2,
        ("pages", "checkpoints"): 1,
        ("pages", "type_NOTAB"): 18,
        ("pages", "type_XTAB"): 2,
        ("table", "valid_pages"): 16,
        ("table", "highest_pfn"): 15,
        ("hvm", "entries_CPU"): 2,
        ("hvm", "entries_HEADER"): 1,
        ("hvm", "header_magic"): hvmcontext.HVM_FILE_MAGIC,
        ("hvm", "HVM_PARAM_STORE_PFN"): 0xFEFFC,
        ("hvm", "HVM_PARAM_STORE_EVTCHN"): 5,
        ("hvm", "HVM_PARAM_99"): 7,
        ("shared_info", "present"): False,
    }
    assert {key: values.get(key) for key in expected} == expected
    assert facts[("config", "disks")].hint == "xvda, xvdb"
    warnings = [fact.text for key, fact in facts.items() if key[0] == "warnings"]
    assert len(warnings) == 1 and "2 pfn entries repeat" in warnings[0]


def test_hvm_save_vcpu_table(hvm_save: Path) -> None:
    image = XenSaveImage.open(hvm_save)
    basic = report.vcpu_table(image)
    names = [column.name for column in basic.columns]
    assert names[:4] == ["VCPU", "Online", "InKernel", "RIP"]
    assert {"EFER", "SHADOW_GS", "GS_BASE"} <= set(names) and names[-2:] == ["DTB(M)", "DTB(P)"]
    rows = basic.as_dicts()
    assert [row["VCPU"] for row in rows] == [0, 1]
    first, second = rows
    assert (first["RIP"], first["EFER"], first["SHADOW_GS"]) == (
        HVM_CPU0["rip"], 0xD01, 0x7FF_0000
    )  # fmt: skip
    # PCIDE set, LMA set: the PCID (5) is dropped; vCPU 1 has paging off (real mode).
    assert (first["DTB(M)"], first["DTB(P)"]) == (report.Absent.NOT_APPLICABLE, 0x3000)
    assert (first["InKernel"], second["InKernel"], second["Online"]) == (True, True, True)
    full = report.vcpu_table(image, all_registers=True).as_dicts()[0]
    for name in ("lstar", "star", "tsc", "tr", "gdtr_base", "cs_arbytes"):
        assert full[name.upper()] == HVM_CPU0[name], name


def test_pv_save_vcpu_table_dtb_is_the_saved_pfn(pv_save: Path) -> None:
    image = XenSaveImage.open(pv_save)
    table = report.vcpu_table(image)
    names = [column.name for column in table.columns]
    core_names = [c.name for c in report.vcpu_table(_pv_core_like(), False).columns]
    assert names[1:] == core_names[1:]  # the dump-core's columns after the first
    rows = table.as_dicts()
    assert [row["VCPU"] for row in rows] == [0, 2]
    assert (rows[0]["DTB(M)"], rows[0]["DTB(P)"]) == (report.Absent.NOT_APPLICABLE, 0x5000)
    assert rows[1]["DTB(P)"] is report.Absent.NOT_FOUND  # pfn 9 was never saved
    assert rows[0]["InKernel"] and not rows[1]["InKernel"]


def _pv_core_like():
    """A PV dump-core's table layout, for comparing columns (the tiny sample)."""
    from volatility3_xen.formats.dumpcore import XenDumpCore

    pv_core, _ = samples.build_tiny(CACHE / "samples", status=lambda _m: None)
    return XenDumpCore.open(pv_core)


def test_odd_configs_and_damaged_hvm_context_are_facts_not_errors(tmp_path: Path) -> None:
    blob = hvmcontext.encode_hvm_context({0: HVM_CPU0})
    odd = {"c_info": ["not", "a", "dict"], "b_info": {"max_memkb": "lots"}, "disks": 5}
    path = tmp_path / "odd.save"
    sw.write_save(path, hvm_spec(config=odd, hvm_context=blob[:700]))
    image = XenSaveImage.open(path)
    facts = facts_by_key(image)
    assert facts[("config", "name")].value is None and facts[("config", "disks")].value == 0
    assert facts[("config", "max_memkb")].value is None
    warnings = [f.text for key, f in facts.items() if key[0] == "warnings"]
    assert any("no END descriptor" in text for text in warnings), warnings
    assert report.vcpu_table(image).rows == ()


# --- the plugins through vol -r json ------------------------------------------------------------


def _vol_json(*args: str) -> list[dict]:
    result = run_vol("-r", "json", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout[result.stdout.index("[") :])


def test_vol_xen_info_json_on_hvm_save(hvm_save: Path) -> None:
    rows = {(row["Group"], row["Field"]): row for row in _vol_json("-f", str(hvm_save), "xen.info")}
    assert (
        rows[("wrappers", "libxc")]["Number"] == 3 and rows[("wrappers", "libxc")]["Value"] == "3"
    )
    assert rows[("guest", "type")]["Value"] == "HVM" and rows[("guest", "type")]["Number"] is None
    assert rows[("config", "name")]["Value"] == "report-guest"
    assert rows[("pages", "duplicates")]["Number"] == 2
    assert rows[("hvm", "HVM_PARAM_STORE_PFN")]["Number"] == 0xFEFFC
    assert rows[("hvm", "HVM_PARAM_STORE_PFN")]["Value"] == "0xfeffc"
    assert rows[("table", "memory")]["Number"] == 16 * PAGE


def test_vol_xen_vcpus_json_on_hvm_save(hvm_save: Path) -> None:
    rows = _vol_json("-f", str(hvm_save), "xen.vcpus", "--all")
    assert [row["VCPU"] for row in rows] == [0, 1]
    first = rows[0]
    assert first["RIP"] == HVM_CPU0["rip"] and first["LSTAR"] == HVM_CPU0["lstar"]
    assert first["EFER"] == 0xD01 and first["TSC"] == 123456789
    assert first["DTB(P)"] == 0x3000 and first["DTB(M)"] is None
    assert first["Online"] is True and first["InKernel"] is True


def test_vol_xen_plugins_refuse_a_damaged_save_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.save"
    sw.write_save(path, hvm_spec())
    data = path.read_bytes()
    path.write_bytes(data[:32] + b"\xff" * 4 + data[36:])  # the xl byte-order word
    result = run_vol("-f", str(path), "xen.info", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output
    assert output.count("not a usable Xen save image:") == 1, output[-2000:]


# --- api.open_image and the magic's layer choice -----------------------------------------------


def test_open_image_picks_the_format(hvm_save: Path, tmp_path: Path) -> None:
    context = contexts.Context()
    name = api.open_image(context, hvm_save)
    layer = context.layers[name]
    assert type(layer).__name__ == "XenSaveImageLayer"
    assert layer.read(3 * PAGE, PAGE) == page(3, copy=1)  # the last copy
    assert layer.read(5 * PAGE, PAGE) == page(5)
    assert not layer.is_valid(16 * PAGE)  # XTAB: no contents
    pv_core, _ = samples.build_tiny(CACHE / "samples", status=lambda _m: None)
    core = context.layers[api.open_image(context, pv_core)]
    assert type(core).__name__ == "XenDumpCoreLayer"
    before = set(context.layers)
    not_xen = tmp_path / "plain.bin"
    not_xen.write_bytes(b"\0" * 8192)
    with pytest.raises(api.XenImageOpenError) as caught:
        api.open_image(context, not_xen)
    assert caught.value.format_name == "Xen dump-core" and "not an ELF file" in str(caught.value)
    broken = tmp_path / "broken.save"
    broken.write_bytes(hvm_save.read_bytes()[:60])
    with pytest.raises(api.XenImageOpenError) as caught:
        api.open_image(context, broken)
    assert caught.value.format_name == "Xen save image"
    assert set(context.layers) == before  # nothing left behind by the failures


# --- the Windows vCPU stacker tries HVM CPU records -----------------------------------------


def _windows_x64_pages() -> dict[int, bytes]:
    """A 4-level space mapping KUSER_SHARED_DATA (pfn 9) at 0xFFFFF78000000000 and
    0x7FFE0000 under the L4 at pfn 1."""

    def table(entries: dict[int, int]) -> bytes:
        out = bytearray(PAGE)
        for index, target in entries.items():
            struct.pack_into("<Q", out, 8 * index, target << 12 | 0x63)
        return bytes(out)

    kuser = bytearray(PAGE)
    struct.pack_into("<I", kuser, 0x26C, 10)  # NtMajorVersion
    return {
        1: table({0x1EF: 2, 0: 5}),
        2: table({0: 3}),
        3: table({0: 4}),
        4: table({0: 9}),
        5: table({1: 6}),
        6: table({0x1FF: 7}),
        7: table({0x1E0: 9}),
        9: bytes(kuser),
    }


def test_windows_stacker_uses_a_verified_hvm_cpu_record_cr3(tmp_path: Path) -> None:
    pages = _windows_x64_pages()
    pfns = sorted(set(range(12)))
    data = b"".join(pages.get(pfn, bytes(PAGE)) for pfn in pfns)
    long_mode = {"cr0": 0x8005_0033, "cr4": 0x2_06F8, "efer": 0xD01}
    cpus = {
        0: {**long_mode, "cr3": 0xB000},  # a zero page: fails Volatility's check
        1: {**long_mode, "cr3": 0x1000 | 0x7},  # the Windows L4, PCID 7
    }
    path = tmp_path / "win.save"
    spec = sw.SaveSpec(
        guest="hvm",
        batches=[sw.PageBatch(pfns, 0, data)],
        hvm_context=hvmcontext.encode_hvm_context(cpus),
    )
    sw.write_save(path, spec)
    context = contexts.Context()
    xen = api.open_image(context, path)
    layer = windows.XenVcpuWindowsStacker.stack(context, xen)
    assert layer is not None and type(layer).__name__ == "WindowsIntel32e"
    assert layer.config["page_map_offset"] == 0x1000
    assert layer.translate(0xFFFF_F780_0000_0000)[0] == 9 * PAGE
    # Only the unverifiable record: nothing is trusted, the usual scan gets its turn.
    spec.hvm_context = hvmcontext.encode_hvm_context({0: cpus[0]})
    sw.write_save(path, spec)
    context = contexts.Context()
    assert windows.XenVcpuWindowsStacker.stack(context, api.open_image(context, path)) is None


# --- the real xl save --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_save() -> Path:
    """The real Xen 4.17 ``xl save`` of realxen-pv1: the bundled copy, else ../shared's."""
    quiet = {"cache": CACHE / "samples", "status": lambda _m: None}
    if (REPO / "samples" / samples.REALXEN_FACTS).exists():
        return samples.ensure_realxen("save", **quiet)
    compressed = SHARED / "realxen" / "realxen-pv1.save.xz"
    if not compressed.exists():
        pytest.skip(f"the real xl save is neither bundled (samples/) nor in {compressed.parent}")
    target = CACHE / "realxen-pv1.save"
    want = (SHARED / "realxen" / "realxen-pv1.save.sha256").read_text().split()[0]
    if not target.exists() or sha256_of(target) != want:
        target.parent.mkdir(parents=True, exist_ok=True)
        with lzma.open(compressed) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 8 << 20)
    return target


def test_real_save_facts(real_save: Path) -> None:
    image = XenSaveImage.open(real_save)
    assert [(w.kind, w.version) for w in image.wrappers] == [
        ("xl", None), ("libxl", 2), ("libxc", 3)
    ]  # fmt: skip
    values = {key: fact.value for key, fact in facts_by_key(image).items()}
    expected = {
        ("guest", "type"): "PV",
        ("guest", "page_size"): 4096,
        ("guest", "width"): "64-bit",
        ("guest", "pt_levels"): 4,
        ("guest", "p2m_frames"): 64,
        ("guest", "nr_vcpus"): 1,
        ("xen", "version"): "4.17",
        ("wrappers", "xl.mandatory_flags"): 3,
        ("wrappers", "xl.optional_data_len"): 903,
        ("config", "name"): "realxen-pv1",
        ("config", "uuid"): "ab095578-9660-4344-8dab-8f4c66e54952",
        ("config", "type"): "pv",
        ("config", "max_memkb"): 131072,
        ("config", "max_vcpus"): 1,
        ("config", "disks"): 0,
        ("config", "vifs"): 0,
        ("records", "PAGE_DATA"): 32,
        ("records", "X86_PV_VCPU_BASIC"): 1,
        ("records", "X86_PV_VCPU_XSAVE"): 1,
        ("pages", "entries"): 32768,
        ("pages", "pages_with_data"): 32768,
        ("pages", "duplicates"): 0,
        ("pages", "checkpoints"): 0,
        ("pages", "type_L4TAB_PIN"): 19,
        ("table", "valid_pages"): 32768,
        ("table", "highest_pfn"): 0x7FFF,
        ("shared_info", "present"): True,
        ("shared_info", "max_pfn"): 0x8000,
    }
    assert {key: values.get(key) for key in expected} == expected
    assert not [key for key in values if key[0] == "warnings"]
    assert ("records", "X86_PV_VCPU_MSRS") not in values  # the real file has none
    (row,) = report.vcpu_table(image).as_dicts()
    # cr3 is a pfn address (pfn 0x485e), flags 0x3d: online, in kernel.
    assert (row["VCPU"], row["CR3"], row["DTB(P)"]) == (0, 0x485E000, 0x485E000)
    assert row["Online"] and row["InKernel"] and row["CS"] == 0xE033


@pytest.mark.parametrize("plugin", ["xen.info", "xen.vcpus"])
def test_readme_save_examples_are_real_output(real_save: Path, plugin: str) -> None:
    """The README's ``<!-- save-example: PLUGIN -->`` blocks: lines vol prints on the real
    ``xl save`` (a subset of them)."""
    text = (REPO / "README.md").read_text()
    blocks = dict(re.findall(r"<!-- save-example: (\S+) -->\n```\n(.*?)```", text, re.S))
    example = blocks[plugin].splitlines()
    assert len(example) >= 2, f"README save example for {plugin} is empty"
    result = run_vol("-f", str(real_save), plugin)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = set(result.stdout.splitlines())
    assert not [line for line in example if line not in printed]
