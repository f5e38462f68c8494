"""vcpu_guest_context / shared_info decoding against the byte offsets of the reference
(dump-core-layout.md sections 4 and 5), written out here independently of the tables in
volatility3_xen.formats.vcpu so that a wrong table entry cannot hide behind itself."""

from __future__ import annotations

import random
import struct

import pytest

from volatility3_xen.formats import sharedinfo, vcpu

BYTEORDERS = ("little", "big")
PREFIX = {"little": "<", "big": ">"}


def _x86_64_expected() -> dict[str, tuple[int, int]]:
    """name -> (absolute offset, size) for the x86_64 context, from the reference."""
    regs = {"flags": (512, 8)}
    user = 520
    for i, name in enumerate("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi".split()):
        regs[name] = (user + 8 * i, 8)
    regs.update(
        error_code=(user + 120, 4),
        entry_vector=(user + 124, 4),
        rip=(648, 8),
        cs=(user + 136, 2),
        saved_upcall_mask=(user + 140, 1),
        rflags=(664, 8),
        rsp=(672, 8),
        ss=(user + 160, 2),
        es=(user + 168, 2),
        ds=(user + 176, 2),
        fs=(user + 184, 2),
        gs=(user + 192, 2),
        ldt_base=(4816, 8),
        ldt_ents=(4824, 8),
        gdt_ents=(4960, 8),
        kernel_ss=(4968, 8),
        kernel_sp=(4976, 8),
        event_callback_eip=(5112, 8),
        failsafe_callback_eip=(5120, 8),
        syscall_callback_eip=(5128, 8),
        vm_assist=(5136, 8),
        fs_base=(5144, 8),
        gs_base_kernel=(5152, 8),
        gs_base_user=(5160, 8),
    )
    regs.update({f"gdt_frame{i}": (4832 + 8 * i, 8) for i in range(16)})
    regs.update({f"cr{i}": (4984 + 8 * i, 8) for i in range(8)})
    regs.update({f"dr{i}": (5048 + 8 * i, 8) for i in range(8)})
    assert regs["cr3"][0] == 5008 and regs["dr7"][0] == 5104
    return regs


def _x86_32_expected() -> dict[str, tuple[int, int]]:
    regs = {"flags": (512, 4)}
    user = 516
    for i, name in enumerate("ebx ecx edx esi edi ebp eax".split()):
        regs[name] = (user + 4 * i, 4)
    regs.update(
        error_code=(user + 28, 2),
        entry_vector=(user + 30, 2),
        eip=(548, 4),
        cs=(user + 36, 2),
        saved_upcall_mask=(user + 38, 1),
        eflags=(user + 40, 4),
        esp=(user + 44, 4),
        ss=(user + 48, 2),
        es=(user + 52, 2),
        ds=(user + 56, 2),
        fs=(user + 60, 2),
        gs=(user + 64, 2),
        ldt_base=(2632, 4),
        ldt_ents=(2636, 4),
        gdt_ents=(2704, 4),
        kernel_ss=(2708, 4),
        kernel_sp=(2712, 4),
        event_callback_cs=(2780, 4),
        event_callback_eip=(2784, 4),
        failsafe_callback_cs=(2788, 4),
        failsafe_callback_eip=(2792, 4),
        vm_assist=(2796, 4),
    )
    regs.update({f"gdt_frame{i}": (2640 + 4 * i, 4) for i in range(16)})
    regs.update({f"cr{i}": (2716 + 4 * i, 4) for i in range(8)})
    regs.update({f"dr{i}": (2748 + 4 * i, 4) for i in range(8)})
    assert regs["cr3"][0] == 2728
    return regs


def _arm_expected() -> dict[str, tuple[int, int]]:
    regs = {"flags": (0, 4)}
    regs.update({f"x{i}": (8 + 8 * i, 8) for i in range(31)})
    regs.update(
        pc64=(256, 8),
        cpsr=(264, 8),
        spsr_el1=(272, 8),
        spsr_fiq=(280, 4),
        spsr_irq=(284, 4),
        spsr_und=(288, 4),
        spsr_abt=(292, 4),
        sp_el0=(296, 8),
        sp_el1=(304, 8),
        elr_el1=(312, 8),
        sctlr=(320, 8),  # uint64_t (arch-arm.h, Xen >= 4.16)
        ttbcr=(328, 8),
        ttbr0=(336, 8),
        ttbr1=(344, 8),
    )
    return regs


EXPECTED = {
    "x86_64": (5168, _x86_64_expected()),
    "x86_32": (2800, _x86_32_expected()),
    "arm": (352, _arm_expected()),
}


def _distinct_value(index: int, size: int) -> int:
    """A value unique to the field, with different first and last bytes, so that a wrong
    offset, width or byte order changes what is read back."""
    if size == 1:
        return (index + 1) & 0xFF
    middle = [(0x11 * k) & 0xFF for k in range(1, size - 1)]
    return int.from_bytes(bytes([index + 1, *middle, (index + 1) ^ 0xFF]), "big")


def _distinct_registers(layout: str) -> dict[str, int]:
    _, expected = EXPECTED[layout]
    return {name: _distinct_value(i, size) for i, (name, (_, size)) in enumerate(expected.items())}


@pytest.mark.parametrize("byteorder", BYTEORDERS)
@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_encode_places_every_field_at_reference_offset(layout: str, byteorder: str) -> None:
    size, expected = EXPECTED[layout]
    registers = _distinct_registers(layout)
    raw = vcpu.encode_vcpu(layout, byteorder, registers)
    assert len(raw) == size == vcpu.LAYOUT_SIZES[layout]
    covered = bytearray(size)
    for name, (offset, width) in expected.items():
        assert raw[offset : offset + width] == registers[name].to_bytes(width, byteorder), name
        covered[offset : offset + width] = b"\x01" * width
    # Everything that is not a field (fpu_ctxt, trap_ctxt, padding) stays zero.
    assert all(b == 0 for b, c in zip(raw, covered) if not c)

    decoded = vcpu.decode_vcpu(raw, layout, byteorder, slot=3)
    assert decoded.slot == 3 and decoded.layout == layout
    assert decoded.registers == registers
    # Every field, displayed in structure order.
    assert list(decoded.registers) == sorted(expected, key=lambda name: expected[name][0])
    assert set(vcpu.register_groups(layout)["all"]) == set(expected)


@pytest.mark.parametrize("byteorder", BYTEORDERS)
@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_decode_random_bytes_matches_independent_unpack(layout: str, byteorder: str) -> None:
    size, expected = EXPECTED[layout]
    raw = random.Random(f"{layout}-{byteorder}").randbytes(5168)  # a whole x86 slot
    decoded = vcpu.decode_vcpu(raw, layout, byteorder, slot=0).registers
    fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}
    for name, (offset, width) in expected.items():
        want = struct.unpack_from(PREFIX[byteorder] + fmt[width], raw, offset)[0]
        assert decoded[name] == want, name


@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_register_groups_basic_are_real_registers(layout: str) -> None:
    groups = vcpu.register_groups(layout)
    assert groups["basic"] and set(groups["basic"]) <= set(groups["all"])
    assert {"cr3", "rip"} <= set(vcpu.register_groups("x86_64")["basic"])
    assert {"ttbr0", "ttbr1", "pc64"} <= set(vcpu.register_groups("arm")["basic"])


def test_short_input_raises_value_error() -> None:
    for layout, (size, _) in EXPECTED.items():
        with pytest.raises(ValueError, match="needs"):
            vcpu.decode_vcpu(bytes(size - 1), layout, "little", slot=0)
    with pytest.raises(ValueError):
        vcpu.decode_vcpu(bytes(5168), "ia64", "little", slot=0)
    with pytest.raises(ValueError):
        vcpu.decode_vcpu(bytes(5168), "x86_64", "middle", slot=0)


def test_encode_rejects_unknown_and_oversized() -> None:
    with pytest.raises(KeyError):
        vcpu.encode_vcpu("x86_64", "little", {"eip": 1})
    with pytest.raises(ValueError):
        vcpu.encode_vcpu("x86_32", "little", {"cs": 0x10000})
    with pytest.raises(ValueError):
        vcpu.encode_vcpu("x86_64", "little", {}, entsize=2800)


def test_layout_for() -> None:
    assert vcpu.layout_for(62, 5168) == "x86_64"
    assert vcpu.layout_for(3, 5168) == "x86_32"
    assert vcpu.layout_for(3, 2800) == "x86_32"
    assert vcpu.layout_for(40, 352) == "arm"
    assert vcpu.layout_for(183, 352) == "arm"
    assert vcpu.layout_for(40, 344) is None  # pre-4.16 ARM (32-bit cpsr): not this layout
    assert vcpu.layout_for(62, 2800) is None
    assert vcpu.layout_for(50, 5168) is None  # ia64


def test_decode_all_x86_32_in_5168_slots_and_bounds() -> None:
    slots = [
        vcpu.encode_vcpu("x86_32", "little", {"eip": 0xC0100000 + k, "flags": 0x20}, 5168)
        for k in range(3)
    ]
    # The tail of each slot is undefined in real dumps: fill it with garbage.
    data = b"".join(s[:2800] + b"\xee" * (5168 - 2800) for s in slots)
    contexts = vcpu.decode_all(data, 5168, 3, "x86_32", "little")
    assert [c.ip for c in contexts] == [0xC0100000, 0xC0100001, 0xC0100002]
    assert [c.slot for c in contexts] == [0, 1, 2]
    # A huge (untrusted) count is bounded by the data; a last slot cut inside its
    # tail still holds a whole compat context and is decoded.
    assert len(vcpu.decode_all(data, 5168, 1 << 40, "x86_32", "little")) == 3
    assert len(vcpu.decode_all(data[: 2 * 5168 + 2800], 5168, 9, "x86_32", "little")) == 3
    assert len(vcpu.decode_all(data[: 2 * 5168 + 2799], 5168, 9, "x86_32", "little")) == 2
    assert vcpu.decode_all(b"", 5168, 5, "x86_64", "little") == []
    with pytest.raises(ValueError):
        vcpu.decode_all(data, 2800, 1, "x86_64", "little")


def _context(layout: str, **registers: int) -> vcpu.VcpuContext:
    raw = vcpu.encode_vcpu(layout, "little", registers)
    return vcpu.decode_vcpu(raw, layout, "little", slot=0)


def test_pv32_rotated_cr3_round_trips_large_mfn() -> None:
    for mfn in (0x123456, 0x1, 0xFFFFF, 0x100000, 0xFFFFFFFF):
        cr3 = ((mfn << 12) | (mfn >> 20)) & 0xFFFFFFFF  # Xen's compat_pfn_to_cr3
        ctx = _context("x86_32", cr3=cr3)
        assert ctx.page_table_base_raw == cr3
        assert ctx.decoded_page_table_base(is_pv=True) == ("machine", mfn << 12)
    assert _context("x86_32", cr3=0x23456001).decoded_page_table_base(True)[1] == 0x123456000


def test_pv64_cr3_is_machine_address() -> None:
    ctx = _context("x86_64", cr3=0x1234567000)
    assert ctx.decoded_page_table_base(is_pv=True) == ("machine", 0x1234567000)


def test_hvm_cr3_masking() -> None:
    cases = {
        0x700A006: 0x700A000,  # libkdumpfile's SLE15 HVM sample (PWT/PCD bits)
        0x12345ABC: 0x12345000,  # PCID in bits 11:0
        (1 << 63) | 0x7654321000 | 0x5: 0x7654321000,  # no-flush bit 63
        0xFFF0_0000_0000_0000 | 0x1000: 0x1000,  # bits 63:52 are not address bits
    }
    for cr3, base in cases.items():
        kind, value = _context("x86_64", cr3=cr3).decoded_page_table_base(is_pv=False)
        assert (kind, value) == ("guest_physical", base)


def test_x86_properties_and_flags() -> None:
    pv_kernel = _context(
        "x86_64", flags=vcpu.VCPU_FLAG_ONLINE | vcpu.VCPU_FLAG_IN_KERNEL, rip=0xFFFF0001,
        rsp=0xFFFF0002, rflags=0x246, cs=0xE033,
    )  # fmt: skip
    assert pv_kernel.online and pv_kernel.in_kernel
    assert (pv_kernel.ip, pv_kernel.sp, pv_kernel.flags_reg) == (0xFFFF0001, 0xFFFF0002, 0x246)
    hvm_kernel = _context("x86_64", cs=0x10)  # HVM: Xen sets no VGCF_in_kernel
    assert hvm_kernel.in_kernel and not hvm_kernel.online
    assert not _context("x86_64", cs=0x33).in_kernel
    assert not _context("x86_64").in_kernel  # an all-zero (never run) context
    pv32 = _context("x86_32", eip=0xC0001000, esp=0xC0002000, eflags=0x202, flags=0x24)
    assert (pv32.ip, pv32.sp, pv32.flags_reg) == (0xC0001000, 0xC0002000, 0x202)
    assert pv32.online and pv32.in_kernel
    assert vcpu.VCPU_FLAG_I387_VALID == 1 and vcpu.VCPU_FLAG_SYSCALL_DISABLES_EVENTS == 0x10
    assert vcpu.VCPU_FLAG_FAILSAFE_DISABLES_EVENTS == 8


def test_arm_properties_and_ttbr() -> None:
    # AArch64 EL1h (cpsr 0x3c5): online is bit 0 on ARM, kernel table in TTBR1.
    ctx = _context(
        "arm", flags=1, cpsr=0x3C5, pc64=0xFFFF800010000000, sp_el0=0x1000, sp_el1=0x2000,
        ttbr0=0x0001_0000_4123_4000, ttbr1=0x0002_0000_4567_8001,
    )  # fmt: skip
    assert ctx.online and ctx.in_kernel
    assert (ctx.ip, ctx.sp, ctx.flags_reg) == (0xFFFF800010000000, 0x2000, 0x3C5)
    assert ctx.page_table_base_raw == 0x0002_0000_4567_8001
    assert ctx.decoded_page_table_base(is_pv=False) == ("guest_physical", 0x4567_8000)
    user = _context("arm", flags=0x20, cpsr=0x0, sp_el0=0x1000, sp_el1=0x2000)
    assert not user.online and not user.in_kernel and user.sp == 0x1000
    # AArch32 svc mode, short descriptors, TTBCR.N = 0: TTBR0 with attribute bits 13:0.
    arm32 = _context("arm", cpsr=0x1D3, x13=0xBEE0, x19=0xC0DE, ttbr0=0x4000406A, ttbcr=0)
    assert arm32.in_kernel and arm32.sp == 0xC0DE
    assert arm32.decoded_page_table_base(False) == ("guest_physical", 0x40004000)
    # AArch32 LPAE with a 3G/1G split (EAE, T1SZ = 2): the kernel is in TTBR1.
    lpae = _context("arm", cpsr=0x1D3, ttbcr=(1 << 31) | (2 << 16), ttbr1=0x00FF_0000_8000_0000)
    assert lpae.decoded_page_table_base(False) == ("guest_physical", 0x8000_0000)
    assert not _context("arm", cpsr=0x10).in_kernel  # AArch32 usr


@pytest.mark.parametrize("byteorder", BYTEORDERS)
def test_shared_info_x86_64(byteorder: str) -> None:
    p = PREFIX[byteorder]
    page = bytearray(4096)
    for i in range(32):
        struct.pack_into(p + "Q", page, 64 * i + 16, 0xFFFF_8800_0000_0000 + i)
    struct.pack_into(p + "IIII", page, 3072, 7, 0x6000_0001, 999, 1)
    struct.pack_into(p + "6Q", page, 3088, 0x40000, 0x1234, 0, 0x5678000, 0xFFFF_C900_0000_0000, 42)
    info = sharedinfo.decode_shared_info(bytes(page), "x86_64", byteorder)
    assert (info.wc_version, info.wc_sec, info.wc_nsec, info.wc_sec_hi) == (7, 0x60000001, 999, 1)
    assert info.wallclock_seconds == 0x1_6000_0001
    assert (info.max_pfn, info.pfn_to_mfn_frame_list_list, info.nmi_reason) == (0x40000, 0x1234, 0)
    assert (info.p2m_cr3, info.p2m_vaddr, info.p2m_generation) == (
        0x5678000,
        0xFFFF_C900_0000_0000,
        42,
    )
    assert info.vcpu_cr2 == tuple(0xFFFF_8800_0000_0000 + i for i in range(32))
    # Truncated data: what fits is decoded, the rest is None.
    cut = sharedinfo.decode_shared_info(bytes(page[:3100]), "x86_64", byteorder)
    assert cut.max_pfn == 0x40000 and cut.pfn_to_mfn_frame_list_list is None
    assert cut.p2m_generation is None and len(cut.vcpu_cr2) == 32
    tiny = sharedinfo.decode_shared_info(bytes(page[:80]), "x86_64", byteorder)
    assert tiny.vcpu_cr2 == (0xFFFF_8800_0000_0000,) and tiny.wc_sec is None


@pytest.mark.parametrize("byteorder", BYTEORDERS)
def test_shared_info_x86_32(byteorder: str) -> None:
    p = PREFIX[byteorder]
    page = bytearray(4096)
    for i in range(32):
        struct.pack_into(p + "I", page, 64 * i + 8, 0xC000_0000 + i)
    struct.pack_into(p + "III", page, 2304, 3, 0x5000_0000, 123)
    struct.pack_into(p + "7I", page, 2316, 0x8000, 0xABC, 0, 0x23456001, 0xF000_0000, 9, 2)
    info = sharedinfo.decode_shared_info(bytes(page), "x86_32", byteorder)
    assert (info.wc_version, info.wc_sec, info.wc_nsec, info.wc_sec_hi) == (3, 0x5000_0000, 123, 2)
    assert (info.max_pfn, info.pfn_to_mfn_frame_list_list) == (0x8000, 0xABC)
    assert (info.p2m_cr3, info.p2m_vaddr, info.p2m_generation) == (0x23456001, 0xF000_0000, 9)
    assert vcpu.pv_cr3_to_machine_address(info.p2m_cr3, "x86_32") == 0x123456000
    assert info.vcpu_cr2 == tuple(0xC000_0000 + i for i in range(32))
    with pytest.raises(ValueError):
        sharedinfo.decode_shared_info(bytes(page), "arm", byteorder)
