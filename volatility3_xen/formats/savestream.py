"""Xen saved-domain streams: the wrappers and one pass over the records.

What ``xl save``, libxl migration, ``xc_domain_save`` users and XCP-ng/XenServer's
xenopsd write (see ``docs/specs/libxc-migration-stream.pandoc`` and
``libxl-migration-stream.pandoc`` in xen.git, ``tools/xl/xl.h`` and xenopsd's
``suspend_image.ml``)::

    xl header -> libxl stream v2 -> LIBXC_CONTEXT -> libxc stream v2/v3 ... -> libxl END
    libxl stream v2 alone (xl migrate, libxl users)
    libxc stream alone (xc_domain_save users)
    "XenSavedDomv2-\\n" -> {Xenops, Libxc (a libxc stream), Qemu_*, ..., End_of_image}

``scan_stream(read, size)`` walks the wrappers and every record header once, seeking past
page contents (it never reads them): the pfn arrays of ``PAGE_DATA`` records are turned,
in batches of bulk numpy work, into runs ``pfn -> file offset``; a pfn sent more than once
(live migration, checkpoints, VERIFY) maps to its last copy, and a later copy without data
(``XTAB``, ``XALLOC``, ``BROKEN``) makes it invalid.  Memory is O(records + runs).

Nothing here imports Volatility.  Damage that leaves nothing usable raises
``XenFormatError`` (one line); damage after usable pages (an interrupted suspend, a bad
record) stops the walk with a warning and keeps what was read.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

from .errors import XenFormatError
from .image import GUEST_ARM, GUEST_HVM, GUEST_PV, GUEST_PVH
from .pagemap import Runs, runs_from_pairs, uint64_array

Reader = Callable[[int, int], bytes]
Buffer = Union[bytes, memoryview]

# --- the wrappers -------------------------------------------------------------------------

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_HEADER_SIZE = len(XL_MAGIC) + 16
XL_BYTEORDER_VALUE = 0x01020304
XL_FLAG_JSON = 1 << 0
XL_FLAG_STREAMV2 = 1 << 1
XL_KNOWN_FLAGS = XL_FLAG_JSON | XL_FLAG_STREAMV2

LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_HEADER_SIZE = 16
LIBXL_VERSION = 2
LIBXL_OPT_BIG_ENDIAN = 1 << 0
LIBXL_OPT_LEGACY = 1 << 1

LIBXC_MARKER = 0xFFFFFFFFFFFFFFFF
LIBXC_ID = 0x58454E46  # "XENF"
LIBXC_VERSIONS = (2, 3)
LIBXC_HEADER_SIZE = 24
DOMAIN_HEADER_SIZE = 16
LIBXC_OPT_BIG_ENDIAN = 1 << 0

XENOPS_SIGNATURE = b"XenSavedDomv2-\n"
XENOPS_LEGACY_SIGNATURE = b"XenSavedDomain\n"

CONVERT_HINT = "convert it with Xen's tools/python/scripts/convert-legacy-stream first"

# --- libxc records ------------------------------------------------------------------------

REC_END = 0x00
REC_PAGE_DATA = 0x01
REC_X86_PV_INFO = 0x02
REC_X86_PV_P2M_FRAMES = 0x03
REC_X86_PV_VCPU_BASIC = 0x04
REC_SHARED_INFO = 0x07
REC_HVM_CONTEXT = 0x09
REC_HVM_PARAMS = 0x0A
REC_CHECKPOINT = 0x0E

LIBXC_RECORD_NAMES = {
    0x00: "END",
    0x01: "PAGE_DATA",
    0x02: "X86_PV_INFO",
    0x03: "X86_PV_P2M_FRAMES",
    0x04: "X86_PV_VCPU_BASIC",
    0x05: "X86_PV_VCPU_EXTENDED",
    0x06: "X86_PV_VCPU_XSAVE",
    0x07: "SHARED_INFO",
    0x08: "X86_TSC_INFO",
    0x09: "HVM_CONTEXT",
    0x0A: "HVM_PARAMS",
    0x0B: "TOOLSTACK",
    0x0C: "X86_PV_VCPU_MSRS",
    0x0D: "VERIFY",
    0x0E: "CHECKPOINT",
    0x0F: "CHECKPOINT_DIRTY_PFN_LIST",
    0x10: "STATIC_DATA_END",
    0x11: "X86_CPUID_POLICY",
    0x12: "X86_MSR_POLICY",
}

LIBXL_END = 0
LIBXL_LIBXC_CONTEXT = 1
LIBXL_CHECKPOINT_END = 4
LIBXL_RECORD_NAMES = {
    0: "END",
    1: "LIBXC_CONTEXT",
    2: "EMULATOR_XENSTORE_DATA",
    3: "EMULATOR_CONTEXT",
    4: "CHECKPOINT_END",
    5: "CHECKPOINT_STATE",
}

XENOPS_XENOPS = 0x000F
XENOPS_LIBXC = 0x00F0
XENOPS_LIBXL = 0x00F1
XENOPS_LIBXC_LEGACY = 0x00F2
XENOPS_END = 0xFFFF
XENOPS_RECORD_NAMES = {
    0x000F: "Xenops",
    0x00F0: "Libxc",
    0x00F1: "Libxl",
    0x00F2: "Libxc_legacy",
    0x0F00: "Qemu_trad",
    0x0F01: "Qemu_xen",
    0x0F10: "Demu",
    0x0F11: "Varstored",
    0x0F12: "Swtpm0",
    0x0F13: "Swtpm",
    0xFFFF: "End_of_image",
}

DOMAIN_TYPES = {1: GUEST_PV, 2: GUEST_HVM, 3: GUEST_PVH, 4: GUEST_ARM}

# --- page types (XEN_DOMCTL_PFINFO_* in bits 63-60 of a pfn entry) ------------------------

PAGE_TYPE_NAMES = {
    0x0: "NOTAB",
    0x1: "L1TAB",
    0x2: "L2TAB",
    0x3: "L3TAB",
    0x4: "L4TAB",
    0x9: "L1TAB_PIN",
    0xA: "L2TAB_PIN",
    0xB: "L3TAB_PIN",
    0xC: "L4TAB_PIN",
    0xD: "BROKEN",
    0xE: "XALLOC",
    0xF: "XTAB",
}
TYPE_BROKEN = 0xD  # BROKEN, XALLOC, XTAB (0xD-0xF) carry no page contents
PFN_MASK = (1 << 52) - 1

# Bounds no real stream comes near; they stop damaged headers from driving work.
MIN_PAGE_SHIFT, MAX_PAGE_SHIFT = 9, 24
REC_LENGTH_MAX = 128 << 20  # Xen's own restore limit (xg_sr_stream_format.h)
MAX_KEPT_BODY = 16 << 20  # blobs kept in memory (HVM context, metadata text, config)
MAX_OTHER_RECORDS = 1 << 20  # records that are not PAGE_DATA, per file
BATCH_ENTRIES = 1 << 16  # pfn entries turned into runs per numpy step


@dataclass(frozen=True)
class Wrapper:
    """One layer of the onion, outermost first."""

    kind: str  # "xl", "libxl", "libxc", "xenopsd"
    offset: int
    version: int | None
    byteorder: str
    details: dict[str, int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class DomainHeader:
    """The libxc domain header."""

    type_code: int
    guest_type: str
    page_shift: int
    xen_major: int
    xen_minor: int


@dataclass(frozen=True)
class PageStats:
    """What the PAGE_DATA records held."""

    records: int
    entries: int
    pages_with_data: int
    duplicates: int  # entries naming a pfn an earlier entry named too
    by_type: dict[str, int]
    checkpoints: int


@dataclass
class SaveScan:
    """Everything one pass over a save stream found (pure data: reusable across opens)."""

    wrappers: list[Wrapper] = field(default_factory=list)
    domain: DomainHeader | None = None
    libxc_byteorder: str = "little"
    config_text: bytes | None = None
    xenops_metadata: str | None = None
    record_counts: dict[str, int] = field(default_factory=dict)
    page_stats: PageStats | None = None
    runs: Runs | None = None  # pfn -> file byte offset
    pv_info: tuple[int, int] | None = None
    p2m_frames: int | None = None
    pv_vcpu_contexts: dict[int, bytes] = field(default_factory=dict)
    hvm_context: bytes | None = None
    hvm_params: dict[int, int] = field(default_factory=dict)
    shared_info: bytes | None = None
    warnings: list[str] = field(default_factory=list)


# --- recognising the outermost wrapper ----------------------------------------------------


def identify(head: bytes) -> str | None:
    """Which wrapper starts ``head`` (the file's first 32+ bytes): ``xl``, ``libxl``,
    ``libxc``, ``xenopsd``, ``xenopsd-legacy`` or None."""
    if head.startswith(XL_MAGIC):
        return "xl"
    if head.startswith(XENOPS_SIGNATURE):
        return "xenopsd"
    if head.startswith(XENOPS_LEGACY_SIGNATURE):
        return "xenopsd-legacy"
    if len(head) >= 8 and int.from_bytes(head[:8], "big") == LIBXL_IDENT:
        return "libxl"
    if (
        len(head) >= 12
        and head[:8] == b"\xff" * 8
        and int.from_bytes(head[8:12], "big") == LIBXC_ID
    ):
        return "libxc"
    return None


def _order(big: bool) -> str:
    return "big" if big else "little"


def _prefix(byteorder: str) -> str:
    return ">" if byteorder == "big" else "<"


def parse_xl_header(head: bytes, source: str, offset: int = 0) -> Wrapper:
    """The xl file header (``tools/xl/xl.h``); refuses legacy (pre-STREAMv2) files."""
    if len(head) < XL_HEADER_SIZE:
        raise XenFormatError(source, f"xl save header at {offset:#x} is cut short")
    raw = head[len(XL_MAGIC) : XL_HEADER_SIZE]
    if struct.unpack("<I", raw[:4])[0] == XL_BYTEORDER_VALUE:
        byteorder = "little"
    elif struct.unpack(">I", raw[:4])[0] == XL_BYTEORDER_VALUE:
        byteorder = "big"
    else:
        raise XenFormatError(
            source,
            f"xl save header at {offset:#x}: byte-order mark {raw[:4].hex()} is not 01020304",
        )
    _, mandatory, optional, optional_len = struct.unpack(_prefix(byteorder) + "4I", raw)
    if not mandatory & XL_FLAG_STREAMV2:
        raise XenFormatError(
            source,
            "legacy (pre-Xen 4.6) xl save image: the mandatory flags lack STREAMv2, so a v1 "
            f"libxc stream follows; {CONVERT_HINT}",
        )
    return Wrapper(
        "xl",
        offset,
        None,
        byteorder,
        {
            "mandatory_flags": mandatory,
            "optional_flags": optional,
            "optional_data_len": optional_len,
        },
    )


def parse_libxl_header(head: bytes, source: str, offset: int) -> Wrapper:
    if len(head) < LIBXL_HEADER_SIZE:
        raise XenFormatError(source, f"libxl stream header at {offset:#x} is cut short")
    ident, version, options = struct.unpack(">QII", head[:LIBXL_HEADER_SIZE])
    if ident != LIBXL_IDENT:
        raise XenFormatError(source, f"no libxl stream header (LibxlFmt) at {offset:#x}")
    if version != LIBXL_VERSION:
        raise XenFormatError(
            source, f"libxl stream at {offset:#x} has version {version}, only 2 is known"
        )
    return Wrapper(
        "libxl",
        offset,
        version,
        _order(bool(options & LIBXL_OPT_BIG_ENDIAN)),
        {"options": options, "from_legacy": "yes" if options & LIBXL_OPT_LEGACY else "no"},
    )


def parse_libxc_headers(head: bytes, source: str, offset: int) -> tuple[Wrapper, DomainHeader]:
    """The libxc image header (big-endian) and the domain header after it."""
    if len(head) < LIBXC_HEADER_SIZE + DOMAIN_HEADER_SIZE:
        raise XenFormatError(source, f"libxc stream headers at {offset:#x} are cut short")
    marker, ident, version, options = struct.unpack(">QIIH", head[:18])
    if marker != LIBXC_MARKER or ident != LIBXC_ID:
        if marker != LIBXC_MARKER and ident != LIBXC_ID:
            raise XenFormatError(
                source,
                f"no libxc stream header (XENF) at {offset:#x}: a legacy (v1) libxc stream? "
                + CONVERT_HINT,
            )
        raise XenFormatError(source, f"damaged libxc stream header at {offset:#x}")
    if version not in LIBXC_VERSIONS:
        raise XenFormatError(
            source, f"libxc stream at {offset:#x} has version {version}, only 2 and 3 are known"
        )
    byteorder = _order(bool(options & LIBXC_OPT_BIG_ENDIAN))
    type_code, page_shift, _, major, minor = struct.unpack(
        _prefix(byteorder) + "IHHII", head[LIBXC_HEADER_SIZE : LIBXC_HEADER_SIZE + 16]
    )
    guest_type = DOMAIN_TYPES.get(type_code)
    if guest_type is None:
        raise XenFormatError(
            source, f"libxc domain header at {offset + 24:#x}: unknown domain type {type_code:#x}"
        )
    if not MIN_PAGE_SHIFT <= page_shift <= MAX_PAGE_SHIFT:
        raise XenFormatError(
            source, f"libxc domain header at {offset + 24:#x}: page_shift {page_shift} is unusable"
        )
    wrapper = Wrapper(
        "libxc",
        offset,
        version,
        byteorder,
        {
            "options": options,
            "domain_type": type_code,
            "page_shift": page_shift,
            "xen_version": f"{major}.{minor}",
        },
    )
    return wrapper, DomainHeader(type_code, guest_type, page_shift, major, minor)


# --- the pass over the records ------------------------------------------------------------


class _Stop(Exception):
    """The walk cannot go on (damage after something usable); carries the warning."""


class _Scanner:
    def __init__(self, read: Reader, size: int, source: str, view: Buffer | None) -> None:
        self.read_file = read
        self.size = size
        self.source = source
        self.view = view
        self.scan = SaveScan()
        self.other_records = 0
        # PAGE_DATA bookkeeping: pending pfn arrays, then runs in stream order.
        self.pending: list[tuple[np.ndarray, int]] = []
        self.pending_entries = 0
        self.run_pfn: list[np.ndarray] = []
        self.run_off: list[np.ndarray] = []
        self.run_count: list[np.ndarray] = []
        self.run_valid: list[np.ndarray] = []
        self.run_order: list[np.ndarray] = []  # stream position of each run's first entry
        self.reordered = False  # runs were appended out of stream order (cut runs' tails)
        self.flushed = 0
        self.page_records_seen = 0  # PAGE_DATA records counted outside record_counts
        self.page_records = 0
        self.entries = 0
        self.with_data = 0
        self.by_type = np.zeros(16, dtype=np.int64)
        self.checkpoints = 0
        self.libxc_started = False
        self.page_shift = 12

    # -- reading ---------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> Buffer:
        length = min(length, self.size - offset)
        if length <= 0:
            return b""
        if self.view is not None:
            return self.view[offset : offset + length]
        return self.read_file(offset, length)

    def count(self, name: str) -> None:
        counts = self.scan.record_counts
        counts[name] = counts.get(name, 0) + 1

    def warn(self, message: str) -> None:
        if message not in self.scan.warnings:
            self.scan.warnings.append(message)

    # -- the onion -------------------------------------------------------------------------

    def run(self) -> SaveScan:
        head = bytes(self.read(0, 64))
        kind = identify(head)
        if kind is None:
            raise XenFormatError(self.source, "not a Xen save image (no known stream header)")
        try:
            if kind == "xl":
                self.xl(head)
            elif kind == "libxl":
                self.libxl(0)
            elif kind == "libxc":
                self.libxc(0, embedded=False)
            elif kind == "xenopsd":
                self.xenopsd(0)
            else:
                raise XenFormatError(
                    self.source,
                    "legacy xenopsd suspend image (XenSavedDomain): not supported; " + CONVERT_HINT,
                )
        except _Stop as stop:
            self.warn(str(stop))
        self.finish()
        return self.scan

    def xl(self, head: bytes) -> None:
        wrapper = parse_xl_header(head, self.source)
        self.scan.wrappers.append(wrapper)
        optional_len = int(wrapper.details["optional_data_len"])
        mandatory = int(wrapper.details["mandatory_flags"])
        if mandatory & ~XL_KNOWN_FLAGS:
            self.warn(f"xl header: unknown mandatory flags {mandatory & ~XL_KNOWN_FLAGS:#x}")
        start = XL_HEADER_SIZE + optional_len
        if start > self.size:
            raise XenFormatError(
                self.source,
                f"xl header promises {optional_len} bytes of optional data but the file ends at "
                f"{self.size:#x}",
            )
        if mandatory & XL_FLAG_JSON:
            self.xl_config(XL_HEADER_SIZE, optional_len, wrapper.byteorder)
        self.libxl(start)

    def xl_config(self, offset: int, optional_len: int, byteorder: str) -> None:
        if optional_len < 4:
            self.warn("xl header says a JSON config follows, but there is no optional data")
            return
        (length,) = struct.unpack(_prefix(byteorder) + "I", bytes(self.read(offset, 4)))
        if length > optional_len - 4:
            self.warn(f"xl config length {length} exceeds the optional data ({optional_len} bytes)")
            return
        if length > MAX_KEPT_BODY:
            self.warn(f"xl config of {length} bytes is too large to keep")
            return
        self.scan.config_text = bytes(self.read(offset + 4, length))

    def libxl(self, offset: int, end: int | None = None) -> int:
        """A libxl stream at ``offset``; returns the offset after its END."""
        wrapper = parse_libxl_header(
            bytes(self.read(offset, LIBXL_HEADER_SIZE)), self.source, offset
        )
        self.scan.wrappers.append(wrapper)
        fmt = _prefix(wrapper.byteorder) + "II"
        position = offset + LIBXL_HEADER_SIZE
        limit = self.size if end is None else end
        libxc_state: int | None = None  # where a checkpointed libxc stream resumes
        while True:
            rtype, length, body_at, next_at = self.record_header(position, fmt, limit, "libxl")
            name = LIBXL_RECORD_NAMES.get(rtype)
            self.count(f"libxl:{name}" if name else f"libxl:{rtype:#x}")
            if rtype == LIBXL_END:
                return next_at
            if rtype == LIBXL_LIBXC_CONTEXT:
                if self.libxc_started:
                    raise _Stop(f"a second libxc stream at {next_at:#x} is not supported; ignored")
                next_at, checkpoint = self.libxc(next_at, embedded=True, end=limit)
                libxc_state = next_at if checkpoint else None
            elif rtype == LIBXL_CHECKPOINT_END and libxc_state is not None:
                # The checkpointed libxc stream carries on right after CHECKPOINT_END.
                next_at, checkpoint = self.libxc_records(next_at, embedded=True, end=limit)
                libxc_state = next_at if checkpoint else None
            self.other_record()
            position = next_at

    def xenopsd(self, offset: int) -> None:
        self.scan.wrappers.append(
            Wrapper(
                "xenopsd", offset, 2, "little", {"signature": XENOPS_SIGNATURE.decode().strip()}
            )
        )
        position = offset + len(XENOPS_SIGNATURE)
        while True:
            raw = bytes(self.read(position, 16))
            if len(raw) < 16:
                raise _Stop(
                    f"xenopsd image ends at {position:#x} without End_of_image (truncated?)"
                )
            rtype, length = struct.unpack("<QQ", raw)
            name = XENOPS_RECORD_NAMES.get(rtype)
            if name is None:
                raise _Stop(
                    f"xenopsd record at {position:#x} has unknown type {rtype:#x}; stopped there"
                )
            self.count(f"xenopsd:{name}")
            body_at = position + 16
            if rtype == XENOPS_END:
                return
            if rtype == XENOPS_LIBXC_LEGACY:
                raise XenFormatError(
                    self.source,
                    f"xenopsd record at {position:#x} holds a legacy (v1) libxc stream; "
                    + CONVERT_HINT,
                )
            if length > self.size - body_at:
                if rtype not in (XENOPS_LIBXC, XENOPS_LIBXL):
                    raise _Stop(
                        f"xenopsd {name} record at {position:#x} claims {length} bytes past the "
                        f"end of the file ({self.size:#x}); stopped there"
                    )
            end = body_at + length if length else None
            if rtype == XENOPS_XENOPS:
                if length <= MAX_KEPT_BODY:
                    text = bytes(self.read(body_at, length))
                    self.scan.xenops_metadata = text.decode("utf-8", "replace")
                else:
                    self.warn(f"xenopsd metadata of {length} bytes is too large to keep")
                next_at = body_at + length
            elif rtype == XENOPS_LIBXC:
                if self.libxc_started:
                    raise _Stop(f"a second libxc stream at {body_at:#x} is not supported; ignored")
                after, _ = self.libxc(body_at, embedded=False, end=end)
                next_at = end if end is not None else after
            elif rtype == XENOPS_LIBXL:
                head = bytes(self.read(body_at, 8))
                if identify(head) == "libxl":
                    after = self.libxl(body_at, end=end)
                    next_at = end if end is not None else after
                else:
                    next_at = body_at + length
            else:
                next_at = body_at + length
            self.other_record()
            position = next_at

    def libxc(self, offset: int, embedded: bool, end: int | None = None) -> tuple[int, bool]:
        head = bytes(self.read(offset, LIBXC_HEADER_SIZE + DOMAIN_HEADER_SIZE))
        wrapper, domain = parse_libxc_headers(head, self.source, offset)
        self.scan.wrappers.append(wrapper)
        self.scan.domain = domain
        self.scan.libxc_byteorder = wrapper.byteorder
        self.page_shift = domain.page_shift
        self.libxc_started = True
        return self.libxc_records(
            offset + LIBXC_HEADER_SIZE + DOMAIN_HEADER_SIZE, embedded, end=end
        )

    def record_header(
        self, position: int, fmt: str, limit: int, what: str
    ) -> tuple[int, int, int, int]:
        if position + 8 > min(limit, self.size):
            raise _Stop(
                f"{what} stream ends at {position:#x} without an END record "
                "(truncated file or interrupted save)"
            )
        if self.view is not None:
            rtype, length = struct.unpack_from(fmt, self.view, position)
        else:
            rtype, length = struct.unpack(fmt, bytes(self.read(position, 8)))
        body_at = position + 8
        next_at = body_at + ((length + 7) & ~7)
        return rtype, length, body_at, next_at

    def other_record(self) -> None:
        self.other_records += 1
        if self.other_records > MAX_OTHER_RECORDS:
            raise _Stop(f"more than {MAX_OTHER_RECORDS} records that are not PAGE_DATA; stopped")

    def libxc_records(self, position: int, embedded: bool, end: int | None) -> tuple[int, bool]:
        """libxc records from ``position`` up to END (returns (after END, False)) or, in a
        stream embedded in libxl, CHECKPOINT (returns (after it, True))."""
        byteorder = self.scan.libxc_byteorder
        fmt = _prefix(byteorder) + "II"
        limit = self.size if end is None else min(end, self.size)
        page_data, view = self.page_data, self.view
        unpack_page = struct.Struct(_prefix(byteorder) + "III").unpack_from
        while True:
            if view is not None and position + 16 <= limit:
                # The common case, kept lean (16 Ki records for a 64 GiB guest): a
                # PAGE_DATA header and its count in one unpack from the mapped file.
                rtype, length, count = unpack_page(view, position)
                if rtype == REC_PAGE_DATA:
                    if not self.page_records_seen:
                        self.scan.record_counts.setdefault("PAGE_DATA", 0)  # in stream order
                    self.page_records_seen += 1
                    page_data(position, length, count, limit)
                    position += 8 + ((length + 7) & ~7)
                    continue
            rtype, length, body_at, next_at = self.record_header(position, fmt, limit, "libxc")
            name = LIBXC_RECORD_NAMES.get(rtype, f"{rtype:#x}")
            self.count(name)
            if rtype == REC_END:
                return next_at, False
            if rtype == REC_PAGE_DATA:
                count = None
                if position + 16 <= limit:
                    count = int.from_bytes(bytes(self.read(position + 8, 4)), byteorder)
                page_data(position, length, count, limit)
            else:
                self.other_record()
                if body_at + length > limit:
                    raise _Stop(
                        f"libxc {name} record at {position:#x} ({length} bytes) runs past the end "
                        f"of the {'file' if limit == self.size else 'enclosing record'} "
                        f"({limit:#x}); stopped there"
                    )
                if rtype == REC_CHECKPOINT:
                    self.checkpoints += 1
                    if embedded:
                        return next_at, True
                else:
                    self.small_record(rtype, name, position, body_at, length, byteorder)
            position = next_at

    def small_record(
        self, rtype: int, name: str, position: int, body_at: int, length: int, byteorder: str
    ) -> None:
        scan = self.scan
        if rtype not in (
            REC_X86_PV_INFO,
            REC_X86_PV_P2M_FRAMES,
            REC_X86_PV_VCPU_BASIC,
            REC_SHARED_INFO,
            REC_HVM_CONTEXT,
            REC_HVM_PARAMS,
        ):
            return
        if rtype == REC_X86_PV_P2M_FRAMES:
            if length < 8:
                self.warn(f"{name} record at {position:#x} is too short ({length} bytes)")
            else:
                scan.p2m_frames = (length - 8) // 8
            return
        if length > MAX_KEPT_BODY:
            self.warn(f"{name} record at {position:#x} of {length} bytes is too large to keep")
            return
        body = bytes(self.read(body_at, length))
        order = _prefix(byteorder)
        if rtype == REC_X86_PV_INFO:
            if length < 2:
                self.warn(f"{name} record at {position:#x} is too short ({length} bytes)")
                return
            width, levels = body[0], body[1]
            if width not in (4, 8) or levels not in (3, 4):
                self.warn(f"{name}: guest width {width} / {levels} paging levels are not valid")
            scan.pv_info = (width, levels)
        elif rtype == REC_X86_PV_VCPU_BASIC:
            if length < 8:
                self.warn(f"{name} record at {position:#x} is too short ({length} bytes)")
                return
            (vcpu_id,) = struct.unpack_from(order + "I", body, 0)
            scan.pv_vcpu_contexts[vcpu_id] = body[8:]
        elif rtype == REC_SHARED_INFO:
            scan.shared_info = body
        elif rtype == REC_HVM_CONTEXT:
            scan.hvm_context = body
        else:
            if length < 8:
                self.warn(f"{name} record at {position:#x} is too short ({length} bytes)")
                return
            (count,) = struct.unpack_from(order + "I", body, 0)
            usable = min(count, (length - 8) // 16)
            if usable < count:
                self.warn(
                    f"{name} record at {position:#x} promises {count} entries, holds {usable}"
                )
            pairs = struct.unpack_from(order + f"{2 * usable}Q", body, 8)
            scan.hvm_params.update(zip(pairs[0::2], pairs[1::2]))

    # -- PAGE_DATA -------------------------------------------------------------------------

    def page_data(self, position: int, length: int, count: int | None, limit: int) -> None:
        """Queue one record's pfn array; the numpy work is done per batch (``flush``)."""
        end = min(limit, self.size)
        if count is None or position + 16 > end:
            raise _Stop(f"PAGE_DATA record at {position:#x} is cut short; stopped there")
        if count == 0:
            self.warn(f"PAGE_DATA record at {position:#x} has no pfns (count 0); skipped")
            return
        if 8 + 8 * count > length:
            raise _Stop(
                f"PAGE_DATA record at {position:#x}: {count} pfns do not fit its {length}-byte "
                "body; stopped there"
            )
        array_at = position + 16
        if array_at + 8 * count > end:
            raise _Stop(
                f"PAGE_DATA record at {position:#x}: the pfn array is cut short by the end of "
                "the file; stopped there"
            )
        self.pending.append((self.read(array_at, 8 * count), array_at, position + 8 + length, end))
        self.pending_entries += count
        if self.pending_entries >= BATCH_ENTRIES:
            self.flush()

    def flush(self) -> None:
        """Turn the queued pfn arrays into runs (stream order): a handful of whole-batch
        numpy passes, never a Python step per page."""
        if not self.pending:
            return
        pending, self.pending, self.pending_entries = self.pending, [], 0
        shift, page = self.page_shift, 1 << self.page_shift
        dtype = np.dtype(np.uint64).newbyteorder(_prefix(self.scan.libxc_byteorder))
        words = np.frombuffer(b"".join(p[0] for p in pending), dtype=dtype)
        words = words.astype(np.uint64, copy=False)  # native order (a copy only if swapped)
        counts = np.fromiter((len(p[0]) >> 3 for p in pending), dtype=np.int64, count=len(pending))
        array_at = np.fromiter((p[1] for p in pending), dtype=np.int64, count=len(pending))
        body_end = np.fromiter((p[2] for p in pending), dtype=np.int64, count=len(pending))
        usable_end = np.minimum(
            body_end, np.fromiter((p[3] for p in pending), dtype=np.int64, count=len(pending))
        )
        del pending
        data_at = array_at + 8 * counts
        starts = np.zeros(len(counts), dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        n = len(words)
        # Runs: a record's first entry, or an entry whose whole word (type bits included)
        # is not its predecessor's plus one: a pfn that does not follow, or a change of
        # page type.  A run has one type, so entries with and without data never share one,
        # and inside a run of data entries the pages follow each other in the file.  Four
        # passes over the entries; everything else is per run.
        breaks = np.empty(n, dtype=bool)
        breaks[0] = True
        np.not_equal(words[1:], words[:-1] + np.uint64(1), out=breaks[1:])
        breaks[starts] = True
        first = np.flatnonzero(breaks)
        del breaks
        run_count = np.diff(np.append(first, n))
        head = words[first]
        del words
        run_type = (head >> np.uint64(60)).astype(np.intp)
        pfns = head & np.uint64(PFN_MASK)
        record = np.searchsorted(starts, first, side="right") - 1
        has_data = run_type < TYPE_BROKEN
        reserved = (run_type >= 5) & (run_type <= 8)
        if reserved.any():
            bad_records = np.unique(record[reserved])
            for number in bad_records.tolist():
                self.warn(
                    f"PAGE_DATA record at {int(array_at[number]) - 16:#x} has reserved page "
                    "types (5-8); its pages are ignored"
                )
            has_data = has_data & ~np.isin(record, bad_records)
        by_type = np.bincount(run_type, weights=run_count, minlength=16).astype(np.int64)
        # A data run's first page: the data pages of the record's earlier runs.
        data_runs = np.where(has_data, run_count, 0)
        before = np.cumsum(data_runs) - data_runs
        record_first_run = np.searchsorted(record, np.arange(len(counts)))
        rank = before - before[record_first_run][record]
        offsets = data_at[record] + (rank << shift)
        data_pages = np.bincount(record, weights=data_runs, minlength=len(counts)).astype(np.int64)
        short = np.flatnonzero(data_at + (data_pages << shift) > body_end)
        for number in short.tolist():
            self.warn(
                f"PAGE_DATA record at {int(array_at[number]) - 16:#x}: "
                f"{int(data_pages[number])} pages of data do not fit its "
                f"{int(body_end[number] - array_at[number] + 8)}-byte body"
            )
        self.page_records += len(counts)
        self.entries += n
        self.with_data += int(data_pages.sum())
        self.by_type += by_type
        # A run whose pfn would pass the 52-bit limit (the +1 carried into the reserved or
        # type bits: damage) maps only up to the limit.
        room = np.uint64(PFN_MASK) - pfns + np.uint64(1)
        run_count = np.minimum(run_count.astype(np.uint64), room).astype(np.int64)
        valid = has_data
        # Pages past the end of the record or of the file (an interrupted save) are not
        # there: a run keeps its whole pages and the rest of it becomes invalid.
        whole = np.clip((usable_end[record] - offsets) // page, 0, None)
        cut = valid & (whole < run_count)
        if cut.any():
            kept = np.where(cut, whole, run_count)
            lost = run_count - kept
            extra = np.flatnonzero(cut & (lost > 0))
            run_count = kept
            valid = valid & (kept > 0)
            first_pfn = pfns
            tail_pfn = first_pfn[extra] + kept[extra].astype(np.uint64)
            self.run_pfn += [first_pfn, tail_pfn]
            self.run_off += [offsets.astype(np.uint64), np.zeros(len(extra), dtype=np.uint64)]
            self.run_count += [run_count.astype(np.uint64), lost[extra].astype(np.uint64)]
            self.run_valid += [valid, np.zeros(len(extra), dtype=bool)]
            self.run_order += [first + self.flushed, first[extra] + self.flushed]
            self.reordered = True
        else:
            self.run_pfn.append(pfns)
            self.run_off.append(offsets.astype(np.uint64))
            self.run_count.append(run_count.astype(np.uint64))
            self.run_valid.append(valid)
            self.run_order.append(first + self.flushed)
        self.flushed += n

    # -- the result ------------------------------------------------------------------------

    def finish(self) -> None:
        self.flush()
        scan = self.scan
        if self.page_records_seen:
            counts = scan.record_counts
            counts["PAGE_DATA"] = counts.get("PAGE_DATA", 0) + self.page_records_seen
        if scan.domain is None:
            raise XenFormatError(self.source, "the save image holds no libxc stream")
        duplicates = 0
        if self.run_pfn:
            pfn = np.concatenate(self.run_pfn)
            off = np.concatenate(self.run_off)
            count = np.concatenate(self.run_count)
            valid = np.concatenate(self.run_valid)
            if self.reordered:
                order = np.argsort(np.concatenate(self.run_order), kind="stable")
                pfn, off, count, valid = pfn[order], off[order], count[order], valid[order]
            self.run_pfn, self.run_off, self.run_count, self.run_valid = [], [], [], []
            self.run_order = []
            ends = pfn + count
            if len(pfn) > 1 and not np.all(pfn[1:] >= ends[:-1]):
                pfn, off, count, valid, duplicates = _last_wins(
                    pfn, off, count, valid, self.page_shift
                )
            keep = valid
            runs = Runs(uint64_array(pfn[keep]), uint64_array(off[keep]), uint64_array(count[keep]))
        else:
            runs = Runs(array("Q"), array("Q"), array("Q"))
        if duplicates:
            self.warn(
                f"{duplicates} pfn entries repeat an earlier one (live migration or checkpoints); "
                "the last copy of each page is used"
            )
        scan.runs = runs
        names = PAGE_TYPE_NAMES
        scan.page_stats = PageStats(
            records=self.page_records,
            entries=self.entries,
            pages_with_data=self.with_data,
            duplicates=duplicates,
            by_type={
                names.get(t, f"{t:#x}"): int(c) for t, c in enumerate(self.by_type.tolist()) if c
            },
            checkpoints=self.checkpoints,
        )


# Values of pages without contents while duplicates are resolved: above any file offset,
# stepping like offsets so that neighbouring ones still coalesce, dropped afterwards.
_NO_DATA = np.uint64(1 << 63)


def _last_wins(
    pfn: np.ndarray, off: np.ndarray, count: np.ndarray, valid: np.ndarray, shift: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Runs that overlap (a pfn sent more than once): expand to pages in stream order and
    let ``pagemap.runs_from_pairs`` keep each pfn's last entry.  Only streams that resend
    pages get here."""
    counts = count.astype(np.int64)
    total = int(counts.sum())
    run_of = np.repeat(np.arange(len(pfn)), counts)
    within = np.arange(total, dtype=np.uint64) - np.repeat(
        (np.cumsum(counts) - counts).astype(np.uint64), counts
    )
    pages = pfn[run_of] + within
    values = np.where(valid[run_of], off[run_of], _NO_DATA) + (within << np.uint64(shift))
    del run_of, within
    runs, duplicates = runs_from_pairs(pages, values, keep="last", value_step=1 << shift)
    key, value, run_count = (
        np.frombuffer(c, dtype=np.uint64) for c in (runs.key, runs.value, runs.count)
    )
    return key, value, run_count, value < _NO_DATA, duplicates


def scan_stream(
    read: Reader, file_size: int, source: str = "save image", view: Buffer | None = None
) -> SaveScan:
    """One pass over a save image (see the module docstring).  ``view``, if given, is a
    buffer over the whole file (an mmap) used instead of ``read``."""
    return _Scanner(read, file_size, source, view).run()
