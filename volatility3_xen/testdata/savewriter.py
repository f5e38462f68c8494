"""Writes Xen save images for tests and benchmarks (the save-stream sibling of
``corewriter``).

Every wrapper a reader meets is available: ``xl`` (xl header + libxl v2 + libxc v3, what
``xl save`` writes), ``libxl`` (a bare libxl stream, ``xl migrate``), ``libxc`` (a bare
libxc stream) and ``xenopsd`` (XCP-ng/XenServer's ``XenSavedDomv2-`` suspend image), in
either byte order where the format has one.  Pages are given as ``PageBatch`` records
(pfns, page types, contents), so tests can send a pfn twice, mix in XTAB/XALLOC/BROKEN
entries, or leave contents out (``memory=None`` and no ``data``: the file gets a hole,
which keeps benchmark images of tens of GiB sparse).  A checkpointed stream
(``checkpoint_after``) interleaves libxc CHECKPOINT and libxl CHECKPOINT_END records as
Remus/COLO do.

The files are test data: the libxc domain header's Xen version is whatever the spec says
(default 4.17) and the xl config names the guest ``vx3-generated``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from ..formats import savestream as ss
from ..formats import vcpu

TYPE_NOTAB, TYPE_L1TAB, TYPE_L4TAB_PIN = 0x0, 0x1, 0xC
TYPE_BROKEN, TYPE_XALLOC, TYPE_XTAB = 0xD, 0xE, 0xF
_DOMAIN_CODES = {"pv": 1, "hvm": 2, "pvh": 3, "arm": 4}
WRAPPERS = ("xl", "libxl", "libxc", "xenopsd")
BATCH = 1024  # pfns per PAGE_DATA record, as Xen's saver sends them


@dataclass(frozen=True)
class PageBatch:
    """One PAGE_DATA record: ``pfns`` with their page ``types`` (one type for all, or one
    per pfn) and the contents of the entries whose type carries data, in order (None: from
    ``SaveSpec.memory``, or a hole in the file when there is no memory)."""

    pfns: Sequence[int] | np.ndarray
    types: int | Sequence[int] | np.ndarray = TYPE_NOTAB
    data: bytes | None = None


@dataclass
class SaveSpec:
    guest: str = "pv"  # pv, hvm, pvh
    wrapper: str = "xl"
    byteorder: str = "little"
    page_shift: int = 12
    libxc_version: int = 3
    xen_version: tuple[int, int] = (4, 17)
    batches: Sequence[PageBatch] = ()
    #: Raw guest memory (pfn ``i`` at ``i << page_shift``): contents of batches without data.
    memory: Any = None
    guest_width: int = 8
    pt_levels: int = 4
    #: PV: ``vcpu_guest_context`` bodies (or register dicts) by vCPU id.
    vcpus: dict[int, bytes | dict[str, int]] = field(default_factory=dict)
    hvm_context: bytes | None = None
    hvm_params: dict[int, int] = field(default_factory=dict)
    shared_info: bytes | None = None
    config: dict | None = None
    xenops_metadata: str = '((time "20261129T00:00:00Z")(word_size 64))'
    #: libxc records ``(type, body)`` written just before END.
    extra_records: Sequence[tuple[int, bytes]] = ()
    #: Indices of batches after which a checkpoint boundary is written.
    checkpoint_after: Sequence[int] = ()
    #: Write the END records (False: a stream cut off like an interrupted save).
    end: bool = True


@dataclass
class PageRecordLayout:
    offset: int  # the record header
    words: np.ndarray  # the pfn array as written (type bits included)
    data_at: int  # first page of contents


@dataclass
class SaveLayout:
    size: int
    page_records: list[PageRecordLayout] = field(default_factory=list)
    records: list[tuple[str, int]] = field(default_factory=list)  # (name, offset), libxc

    def expected_offsets(
        self, page_shift: int = 12, file_size: int | None = None
    ) -> dict[int, int]:
        """pfn -> file offset of its last copy (pfns last sent without data, or whose page
        lies past ``file_size``, absent): what a reader must map.  Small images only."""
        size = self.size if file_size is None else file_size
        result: dict[int, int] = {}
        page = 1 << page_shift
        for record in self.page_records:
            if record.offset + 16 + 8 * len(record.words) > size:
                break
            at = record.data_at
            for word in record.words.tolist():
                pfn, kind = word & ss.PFN_MASK, word >> 60
                if kind < TYPE_BROKEN:
                    if at + page <= size:
                        result[pfn] = at
                    else:
                        result.pop(pfn, None)
                    at += page
                else:
                    result.pop(pfn, None)
        return result


def batches_for_pfns(pfns: np.ndarray, per_record: int = BATCH) -> list[PageBatch]:
    """``pfns`` (in order) split into PAGE_DATA records of ``per_record`` entries."""
    pfns = np.asarray(pfns, dtype=np.uint64)
    return [PageBatch(pfns[i : i + per_record]) for i in range(0, len(pfns), per_record)]


def default_config(guest: str, memkb: int = 131072) -> dict:
    return {
        "c_info": {
            "type": guest,
            "name": "vx3-generated",
            "uuid": "00000000-0000-0000-0000-000000000000",
        },
        "b_info": {"max_vcpus": 1, "max_memkb": memkb, "target_memkb": memkb},
        "on_crash": "preserve",
    }


class _Out:
    """Sequential writer that turns skipped page contents into holes."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.position = 0

    def write(self, data: bytes) -> None:
        if data:
            self.handle.seek(self.position)
            self.handle.write(data)
            self.position += len(data)

    def skip(self, length: int) -> None:
        self.position += length


def _record(out: _Out, order: str, rtype: int, body: bytes) -> int:
    at = out.position
    out.write(struct.pack(order + "II", rtype, len(body)) + body + b"\0" * (-len(body) % 8))
    return at


def _types(batch: PageBatch) -> np.ndarray:
    count = len(batch.pfns)
    if isinstance(batch.types, int):
        return np.full(count, batch.types, dtype=np.uint64)
    return np.asarray(batch.types, dtype=np.uint64)


def _page_record(out: _Out, spec: SaveSpec, order: str, batch: PageBatch) -> PageRecordLayout:
    pfns = np.asarray(batch.pfns, dtype=np.uint64)
    types = _types(batch)
    words = pfns | (types << np.uint64(60))
    with_data = pfns[types < TYPE_BROKEN]
    page = 1 << spec.page_shift
    length = 8 + 8 * len(pfns) + page * len(with_data)
    at = out.position
    dtype = np.dtype(np.uint64).newbyteorder(order)
    out.write(
        struct.pack(order + "IIII", ss.REC_PAGE_DATA, length, len(pfns), 0)
        + words.astype(dtype).tobytes()
    )
    data_at = out.position
    if batch.data is not None:
        if len(batch.data) != page * len(with_data):
            raise ValueError(
                f"batch data is {len(batch.data)} bytes, {len(with_data)} pages needed"
            )
        out.write(batch.data)
    elif spec.memory is not None:
        memory = memoryview(spec.memory)
        for pfn in with_data.tolist():
            start = pfn * page
            chunk = bytes(memory[start : start + page])
            out.write(chunk + b"\0" * (page - len(chunk)))
    else:
        out.skip(page * len(with_data))
    out.write(b"\0" * (-length % 8))
    return PageRecordLayout(at, words, data_at)


def _vcpu_body(context: bytes | dict[str, int], spec: SaveSpec) -> bytes:
    if isinstance(context, bytes):
        return context
    layout = vcpu.LAYOUT_X86_32 if spec.guest_width == 4 else vcpu.LAYOUT_X86_64
    return vcpu.encode_vcpu(layout, spec.byteorder, context)


def _libxc_stream(out: _Out, spec: SaveSpec, layout: SaveLayout, libxl_order: str | None) -> None:
    """The libxc stream; with ``libxl_order`` (embedded in libxl) a checkpoint hands over
    to libxl for a CHECKPOINT_END before the libxc records go on."""
    order = ">" if spec.byteorder == "big" else "<"
    options = 1 if spec.byteorder == "big" else 0
    out.write(
        struct.pack(">QIIHHI", ss.LIBXC_MARKER, ss.LIBXC_ID, spec.libxc_version, options, 0, 0)
    )
    major, minor = spec.xen_version
    out.write(
        struct.pack(order + "IHHII", _DOMAIN_CODES[spec.guest], spec.page_shift, 0, major, minor)
    )

    def record(rtype: int, body: bytes = b"") -> None:
        name = ss.LIBXC_RECORD_NAMES.get(rtype, hex(rtype))
        layout.records.append((name, _record(out, order, rtype, body)))

    pv = spec.guest == "pv"
    if pv:
        record(ss.REC_X86_PV_INFO, bytes([spec.guest_width, spec.pt_levels]) + b"\0" * 6)
    if spec.libxc_version >= 3:
        # X86_CPUID_POLICY: xen_cpuid_leaf_t {leaf, subleaf, a, b, c, d}; X86_MSR_POLICY:
        # xen_msr_entry_t {idx, flags, val}.  One each: leaf 0 and MSR_INTEL_PLATFORM_INFO.
        record(0x11, struct.pack(order + "6I", 0, 0xFFFFFFFF, 0xD, 0, 0, 0))
        record(0x12, struct.pack(order + "IIQ", 0xCE, 0, 0))
        record(0x10)  # STATIC_DATA_END
    if pv:
        highest = max((int(np.max(b.pfns)) for b in spec.batches if len(b.pfns)), default=0)
        per_frame = (1 << spec.page_shift) // spec.guest_width
        highest = min(highest, 0xFFFF_FFFF)  # p2m_end_pfn is a u32
        frames = min(highest // per_frame + 1, 1 << 16, highest + 1)
        record(
            ss.REC_X86_PV_P2M_FRAMES,
            struct.pack(order + "II", 0, highest)
            + struct.pack(order + f"{frames}Q", *range(highest, highest - frames, -1)),
        )
    checkpoints = set(spec.checkpoint_after)
    for index, batch in enumerate(spec.batches):
        page_record = _page_record(out, spec, order, batch)
        layout.page_records.append(page_record)
        layout.records.append(("PAGE_DATA", page_record.offset))
        if index in checkpoints:
            record(ss.REC_CHECKPOINT)
            if libxl_order is not None:
                _record(out, libxl_order, ss.LIBXL_CHECKPOINT_END, b"")
    record(0x08, struct.pack(order + "IIQII", 0, 2_000_000, 10**9, 1, 0))  # X86_TSC_INFO
    if pv:
        record(ss.REC_SHARED_INFO, spec.shared_info or b"\0" * (1 << spec.page_shift))
        for vcpu_id, context in sorted(spec.vcpus.items()):
            body = _vcpu_body(context, spec)
            record(ss.REC_X86_PV_VCPU_BASIC, struct.pack(order + "II", vcpu_id, 0) + body)
            record(0x05, struct.pack(order + "II", vcpu_id, 0) + b"\0" * 64)  # EXTENDED
    else:
        if spec.hvm_context is not None:
            record(ss.REC_HVM_CONTEXT, spec.hvm_context)
        params = sorted(spec.hvm_params.items())
        body = struct.pack(order + "II", len(params), 0)
        body += b"".join(struct.pack(order + "QQ", k, v) for k, v in params)
        record(ss.REC_HVM_PARAMS, body)
    for rtype, body in spec.extra_records:
        record(rtype, body)
    if spec.end:
        record(ss.REC_END)


def _libxl_stream(out: _Out, spec: SaveSpec, layout: SaveLayout) -> None:
    order = ">" if spec.byteorder == "big" else "<"
    options = 1 if spec.byteorder == "big" else 0
    out.write(struct.pack(">QII", ss.LIBXL_IDENT, ss.LIBXL_VERSION, options))
    _record(out, order, ss.LIBXL_LIBXC_CONTEXT, b"")
    _libxc_stream(out, spec, layout, order)
    if not spec.end:
        return
    if spec.guest != "pv":
        # EMULATOR_CONTEXT: emulator 2 (qemu upstream), index 0, a stand-in blob.
        _record(out, order, 3, struct.pack(order + "II", 2, 0) + b"QEVM\0\0\0\3vx3")
    _record(out, order, ss.LIBXL_END, b"")


def _xl_header(spec: SaveSpec) -> bytes:
    order = ">" if spec.byteorder == "big" else "<"
    config = spec.config if spec.config is not None else default_config(spec.guest)
    text = json.dumps(config, indent=4).encode() + b"\0"
    optional = struct.pack(order + "I", len(text)) + text
    flags = ss.XL_FLAG_JSON | ss.XL_FLAG_STREAMV2
    return (
        ss.XL_MAGIC
        + struct.pack(order + "4I", ss.XL_BYTEORDER_VALUE, flags, 0, len(optional))
        + optional
    )


def write_save(path: str | os.PathLike[str], spec: SaveSpec) -> SaveLayout:
    """Write ``spec`` to ``path``; returns where the records went."""
    if spec.wrapper not in WRAPPERS:
        raise ValueError(f"unknown wrapper {spec.wrapper!r}")
    if spec.wrapper == "xenopsd" and spec.byteorder != "little":
        raise ValueError("xenopsd images are little-endian")
    layout = SaveLayout(0)
    with open(path, "wb") as handle:
        out = _Out(handle)
        if spec.wrapper == "xl":
            out.write(_xl_header(spec))
            _libxl_stream(out, spec, layout)
        elif spec.wrapper == "libxl":
            _libxl_stream(out, spec, layout)
        elif spec.wrapper == "libxc":
            _libxc_stream(out, spec, layout, None)
        else:
            out.write(ss.XENOPS_SIGNATURE)
            meta = spec.xenops_metadata.encode()
            out.write(struct.pack("<QQ", ss.XENOPS_XENOPS, len(meta)) + meta)
            out.write(struct.pack("<QQ", ss.XENOPS_LIBXC, 0))
            _libxc_stream(out, spec, layout, None)
            if spec.end:
                if spec.guest != "pv":
                    blob = b"QEVM\0\0\0\3vx3-qemu"
                    out.write(struct.pack("<QQ", 0x0F01, len(blob)) + blob)  # Qemu_xen
                out.write(struct.pack("<QQ", ss.XENOPS_END, 0))
        handle.truncate(out.position)
        layout.size = out.position
    return layout


# --- save images of a raw guest image (the bundled sample) --------------------------------------


def pv_save_registers(registers: dict[str, int]) -> dict[str, int]:
    """What X86_PV_VCPU_BASIC holds for a 64-bit PV vCPU with ``registers``: cr3 stays the
    pfn of the L4 (the save code turns Xen's machine frame back into a pfn), Xen's flat
    ring-3 selectors, flags online + i387 valid (+ in_kernel)."""
    regs = {k: v for k, v in registers.items() if k in _names(vcpu.LAYOUT_X86_64)}
    in_kernel = (registers.get("cs", 0) & 3) == 0
    regs["cr3"] = registers.get("cr3", 0) & 0x000F_FFFF_FFFF_F000
    regs["cs"], regs["ss"] = 0xE033, 0xE02B
    regs["flags"] = (
        vcpu.VCPU_FLAG_I387_VALID
        | vcpu.VCPU_FLAG_ONLINE
        | (vcpu.VCPU_FLAG_IN_KERNEL if in_kernel else 0)
    )
    return regs


def _names(layout: str) -> set[str]:
    return {f.name for f in vcpu.layout_fields(layout)}


def hvm_context_for(registers: dict[str, int], byteorder: str = "little") -> bytes | None:
    """An HVM_CONTEXT blob with one CPU record (None if the HVM codec is not available)."""
    try:
        from ..formats import hvmcontext
    except ImportError:
        return None
    names = _names(hvmcontext.LAYOUT_HVM_CPU)
    return hvmcontext.encode_hvm_context(
        {0: {k: v for k, v in registers.items() if k in names}}, byteorder
    )


def write_from_image(
    path: str | os.PathLike[str],
    memory: Any,
    registers: dict[str, int],
    kind: str = "pv",
    wrapper: str = "xl",
    byteorder: str = "little",
    page_size: int = 4096,
) -> SaveLayout:
    """A save image of a raw guest-physical image (``memory``: file offset == address).

    PV: every page as NOTAB except the L4 named by cr3 (L4TAB_PIN), X86_PV_INFO 64-bit
    4-level, one X86_PV_VCPU_BASIC; the page tables need no rewriting, as the real save
    code leaves them holding pfns.  HVM: every page but the legacy VGA hole 0xA0-0xBF,
    sent as XTAB entries like a real HVM saver does, and an HVM_CONTEXT with one CPU.
    """
    pages = len(memoryview(memory)) // page_size
    pfns = np.arange(pages, dtype=np.uint64)
    batches = batches_for_pfns(pfns)
    spec = SaveSpec(guest=kind, wrapper=wrapper, byteorder=byteorder, memory=memory)
    if kind == "pv":
        regs = pv_save_registers(registers)
        l4 = regs["cr3"] // page_size
        typed = []
        for batch in batches:
            types = np.zeros(len(batch.pfns), dtype=np.uint64)
            hit = np.flatnonzero(np.asarray(batch.pfns) == l4)
            types[hit] = TYPE_L4TAB_PIN
            typed.append(PageBatch(batch.pfns, types))
        spec.batches = typed
        spec.vcpus = {0: regs}
    else:
        types = np.where((pfns >= 0xA0) & (pfns < 0xC0), TYPE_XTAB, TYPE_NOTAB).astype(np.uint64)
        spec.batches = [
            PageBatch(pfns[i : i + BATCH], types[i : i + BATCH]) for i in range(0, pages, BATCH)
        ]
        spec.hvm_context = hvm_context_for(
            {**registers, "flags": vcpu.VCPU_FLAG_I387_VALID | vcpu.VCPU_FLAG_ONLINE}, byteorder
        )
        spec.hvm_params = {2: 0xFEFFF, 12: 0}  # HVM_PARAM_STORE_PFN, PAE_ENABLED
    spec.config = default_config(kind, pages * page_size // 1024)
    return write_save(path, spec)
