"""The HVM_CONTEXT blob (``hvm_save`` descriptors, ``struct hvm_hw_cpu``) and HVM_PARAMS.

Offsets in these tests are written out from Xen 4.17's ``arch-x86/hvm/save.h`` as gcc laid
the struct out (``offsetof``), independently of the module's field table.
"""

from __future__ import annotations

import random
import struct

import pytest

from volatility3_xen.formats import hvmcontext, vcpu

# (name in the decoded registers, offset in struct hvm_hw_cpu, size)
C_OFFSETS = [
    ("rax", 512, 8),
    ("rsp", 568, 8),
    ("r15", 632, 8),
    ("rip", 640, 8),
    ("rflags", 648, 8),
    ("cr0", 656, 8),
    ("cr2", 664, 8),
    ("cr3", 672, 8),
    ("cr4", 680, 8),
    ("dr6", 720, 8),
    ("dr7", 728, 8),
    ("cs", 736, 4),
    ("ss", 756, 4),
    ("ldtr", 764, 4),
    ("cs_limit", 768, 4),
    ("idtr_limit", 800, 4),
    ("gdtr_limit", 804, 4),
    ("cs_base", 808, 8),
    ("fs_base", 832, 8),
    ("gs_base", 840, 8),
    ("idtr_base", 872, 8),
    ("gdtr_base", 880, 8),
    ("cs_arbytes", 888, 4),
    ("ss_arbytes", 908, 4),
    ("ldtr_arbytes", 916, 4),
    ("sysenter_cs", 920, 8),
    ("sysenter_eip", 936, 8),
    ("shadow_gs", 944, 8),
    ("lstar", 960, 8),
    ("star", 968, 8),
    ("cstar", 976, 8),
    ("sfmask", 984, 8),
    ("efer", 992, 8),
    ("tsc_aux", 1000, 8),
    ("tsc", 1008, 8),
    ("pending_event", 1016, 4),
    ("error_code", 1020, 4),
    ("flags", 1024, 4),
]


def _record(byteorder: str = "little") -> tuple[bytes, dict[str, int]]:
    prefix = "<" if byteorder == "little" else ">"
    raw = bytearray(1032)
    values = {}
    for index, (name, offset, size) in enumerate(C_OFFSETS):
        value = 0x1000 + index * 0x11 + (0xA5 << 24 if size == 8 else 0)
        struct.pack_into(prefix + ("Q" if size == 8 else "I"), raw, offset, value)
        values[name] = value
    return bytes(raw), values


def _blob(records: list[tuple[int, int, bytes]], byteorder: str = "little") -> bytes:
    prefix = "<" if byteorder == "little" else ">"
    return b"".join(struct.pack(prefix + "HHI", t, i, len(body)) + body for t, i, body in records)


def _header(byteorder: str = "little") -> bytes:
    prefix = "<" if byteorder == "little" else ">"
    return struct.pack(prefix + "IIQII", 0x54381286, 1, 0xABC, 0x806F1, 2_000_000)


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_cpu_record_fields_at_the_c_offsets(byteorder: str) -> None:
    raw, values = _record(byteorder)
    blob = _blob([(1, 0, _header(byteorder)), (2, 3, raw), (0, 0, b"")], byteorder)
    parsed = hvmcontext.parse_hvm_context(blob, byteorder)
    assert parsed.warnings == [] and parsed.ended
    assert parsed.header == hvmcontext.HvmSaveHeader(0x54381286, 1, 0xABC, 0x806F1, 2_000_000)
    (context,) = parsed.vcpus
    assert context.slot == 3 and context.layout == vcpu.LAYOUT_HVM_CPU
    for name, value in values.items():
        assert context.registers[name] == value, name
    assert context.ip == values["rip"] and context.sp == values["rsp"]
    assert context.flags_reg == values["rflags"] and context.online


def test_compat_record_is_widened_like_xen() -> None:
    """1016-byte records (Xen < 3.4): tsc/pending_event/error_code sit 8 bytes lower."""
    raw = bytearray(1016)
    struct.pack_into("<Q", raw, 640, 0xFFFF_8000_0000_1234)  # rip
    struct.pack_into("<Q", raw, 992, 0xD01)  # efer
    struct.pack_into("<QII", raw, 1000, 0x1122334455, 0x80000B0E, 7)  # tsc, event, error
    blob = _blob([(1, 0, _header()), (2, 0, bytes(raw)), (0, 0, b"")])
    parsed = hvmcontext.parse_hvm_context(blob)
    assert parsed.warnings == []
    registers = parsed.vcpus[0].registers
    assert registers["rip"] == 0xFFFF_8000_0000_1234 and registers["efer"] == 0xD01
    assert registers["tsc"] == 0x1122334455 and registers["tsc_aux"] == 0
    assert registers["pending_event"] == 0x80000B0E and registers["error_code"] == 7
    assert registers["flags"] == 1  # XEN_X86_FPU_INITIALISED, as _hvm_hw_fix_cpu sets


def test_encoder_round_trip_and_compat_size() -> None:
    registers = {"rip": 0x1234, "cr3": 0x1A2B_3007, "tsc": 99, "error_code": 3, "tr": 0x40}
    blob = hvmcontext.encode_hvm_context({1: registers, 0: {"rip": 7}})
    parsed = hvmcontext.parse_hvm_context(blob)
    assert [c.slot for c in parsed.vcpus] == [0, 1]
    assert {k: parsed.vcpus[1].registers[k] for k in registers} == registers
    assert parsed.counts() == {"HEADER": 1, "CPU": 2}
    compat = hvmcontext.encode_hvm_context({0: registers}, compat=True)
    assert len(compat) == 8 + 24 + 8 + 1016 + 8
    widened = hvmcontext.parse_hvm_context(compat).vcpus[0].registers
    assert {k: widened[k] for k in registers} == registers


@pytest.mark.parametrize(
    ("cr0", "cr4", "efer", "cr3", "mode", "base"),
    [
        (0x8005_0033, 0x6B0, 0xD01, 0x8000_0000_1234_5007, "long", 0x1234_5000),
        (0x8000_0011, 0x20, 0, 0x0123_4567, "pae", 0x0123_4560),
        (0x8000_0011, 0, 0, 0x0123_4567, "32-bit", 0x0123_4000),
        (0x11, 0, 0, 0x5000, "none", 0x5000),
    ],
)
def test_page_table_base_follows_the_paging_mode(cr0, cr4, efer, cr3, mode, base) -> None:
    blob = hvmcontext.encode_hvm_context({0: {"cr0": cr0, "cr4": cr4, "efer": efer, "cr3": cr3}})
    (context,) = hvmcontext.decode_hvm_vcpus(blob, "little")
    assert context.paging_mode == mode
    assert context.decoded_page_table_base(False) == (vcpu.ADDRESS_GUEST_PHYSICAL, base)


@pytest.mark.parametrize(
    ("cr0", "rflags", "ss_arbytes", "kernel"),
    [(0x8000_0011, 0x2, 0xC93, True), (0x8000_0011, 0x2, 0xCF3, False),
     (0x10, 0x2, 0xCF3, True), (0x8000_0011, 0x20002, 0xC93, False)],
)  # fmt: skip
def test_in_kernel_is_cpl_zero(cr0: int, rflags: int, ss_arbytes: int, kernel: bool) -> None:
    regs = {"cr0": cr0, "rflags": rflags, "ss_arbytes": ss_arbytes, "cs": 0x33}
    (context,) = hvmcontext.decode_hvm_vcpus(hvmcontext.encode_hvm_context({0: regs}))
    assert context.in_kernel is kernel


def test_damaged_blobs_give_warnings_not_exceptions() -> None:
    good = hvmcontext.encode_hvm_context({0: {"rip": 1}, 1: {"rip": 2}})
    for cut in range(len(good)):
        parsed = hvmcontext.parse_hvm_context(good[:cut])
        assert not parsed.ended and parsed.warnings, cut
        assert all(c.registers["rip"] in (1, 2) for c in parsed.vcpus)
    # a length running past the end
    overrun = _blob([(1, 0, _header())]) + struct.pack("<HHI", 2, 0, 0xFFFF_FFFF) + b"x" * 64
    parsed = hvmcontext.parse_hvm_context(overrun)
    assert parsed.vcpus == [] and any("claims 4294967295 bytes" in w for w in parsed.warnings)
    # short, long and duplicate CPU records
    raw, _ = _record()
    blob = _blob(
        [(1, 0, _header()), (2, 0, raw[:100]), (2, 1, raw + b"\0" * 8), (2, 1, raw), (0, 0, b"")]
    )
    parsed = hvmcontext.parse_hvm_context(blob)
    assert [c.slot for c in parsed.vcpus] == [1]
    assert len(parsed.warnings) == 3, parsed.warnings
    # wrong magic, header not first, bytes after END
    bad = _blob([(2, 0, raw), (1, 0, b"\0" * 24), (0, 0, b"")]) + b"junk"
    assert len(hvmcontext.parse_hvm_context(bad).warnings) == 3


def test_random_blobs_never_raise() -> None:
    rng = random.Random(11)
    good = hvmcontext.encode_hvm_context({0: {"rip": 1}}, extra=[(5, 0, b"\1" * 40)])
    for _ in range(400):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randrange(len(data) + 1)]
        parsed = hvmcontext.parse_hvm_context(bytes(data), rng.choice(["little", "big"]))
        assert len(parsed.entries) <= len(data) // 8 + 1


def test_hvm_param_names() -> None:
    assert hvmcontext.hvm_param_name(1) == "HVM_PARAM_STORE_PFN"
    assert hvmcontext.hvm_param_name(12) == "HVM_PARAM_IDENT_PT"
    assert hvmcontext.hvm_param_name(38) == "HVM_PARAM_MCA_CAP"
    assert hvmcontext.hvm_param_name(99) == "HVM_PARAM_99"


def test_register_layout_checks_the_table() -> None:
    bad = [vcpu.Field("a", 8, "Q"), vcpu.Field("b", 4, "I")]
    with pytest.raises(AssertionError):
        vcpu.register_layout("bad", bad, 16, ["a"])
    with pytest.raises(AssertionError):
        vcpu.register_layout("bad", bad[:1], 16, ["zz"])
    groups = vcpu.register_groups(vcpu.LAYOUT_HVM_CPU)
    assert groups["basic"][:3] == ["rip", "rsp", "rflags"] and "lstar" in groups["all"]
