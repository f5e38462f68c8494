"""``XenSaveImage``: a saved Xen domain (``xl save``, libxl/libxc streams, xenopsd suspend
images) as a ``GuestMemoryImage``.

- ``probe_save_image(read, size)`` is the stacker's cheap, strict test: it reads the first
  few dozen bytes (and, for an ``xl`` file, the 16 bytes after its optional data);
- ``XenSaveImage(read, size)`` walks the stream once (``savestream.scan_stream``): every
  record header, the pfn arrays of ``PAGE_DATA`` records, and the small records a reader
  needs (vCPU contexts, HVM context and params, shared info); page contents are never read.

A PV save image needs no machine frames: the save code (``normalise_pagetable()`` in
``xg_sr_save_x86_pv.c``) rewrites every page-table entry, and CR3/CR1 in
``X86_PV_VCPU_BASIC``, from machine frames to pfns, so ``machine_frames`` is None and the
stock Intel page walk is right.

Nothing here imports Volatility.
"""

from __future__ import annotations

import json
import struct
from functools import cached_property

from . import savestream
from .dumpcore import Probe
from .errors import XenFormatError
from .image import GUEST_PV, FileImage, RegionMapper
from .pagemap import Runs
from .savestream import (  # noqa: F401 - re-exported: the model's public types
    DomainHeader,
    PageStats,
    Reader,
    SaveScan,
    Wrapper,
)

PROBE_BYTES = 64


def probe_save_image(read: Reader, file_size: int) -> Probe:
    """Is the file a Xen save image?  Reads at most a few dozen bytes twice.

    ``Probe(False)`` for anything else (the other stackers get their turn);
    ``Probe(True, problem)`` for a recognisable save image that cannot be used (legacy
    format, unknown version, damaged header): the caller should say so.
    """
    head = read(0, PROBE_BYTES)
    kind = savestream.identify(head)
    if kind is None:
        return Probe(False)
    source = "save image"
    try:
        if kind == "xl":
            wrapper = savestream.parse_xl_header(head, source)
            start = savestream.XL_HEADER_SIZE + int(wrapper.details["optional_data_len"])
            if start + savestream.LIBXL_HEADER_SIZE > file_size:
                return Probe(True, "xl header: optional data runs past the end of the file")
            savestream.parse_libxl_header(read(start, savestream.LIBXL_HEADER_SIZE), source, start)
        elif kind == "libxl":
            savestream.parse_libxl_header(head, source, 0)
        elif kind == "libxc":
            savestream.parse_libxc_headers(head, source, 0)
        elif kind == "xenopsd-legacy":
            return Probe(
                True, "legacy xenopsd suspend image (XenSavedDomain): " + savestream.CONVERT_HINT
            )
        else:
            start = len(savestream.XENOPS_SIGNATURE)
            raw = read(start, 16)
            if len(raw) < 16:
                return Probe(True, "xenopsd suspend image is cut short after its signature")
            (rtype,) = struct.unpack_from("<Q", raw)
            if rtype not in savestream.XENOPS_RECORD_NAMES:
                return Probe(True, f"xenopsd record at {start:#x} has unknown type {rtype:#x}")
    except XenFormatError as exc:
        return Probe(True, exc.message)
    return Probe(True)


class XenSaveImage(FileImage):
    """A parsed Xen save image.

    Args:
        read: ``read(offset, length) -> bytes`` on the file (short reads at the end are fine).
        file_size: the file's size in bytes.
        name: used in messages (a layer name or a path).
        map_region: ``map_region(offset, length)`` -> a buffer over the file's bytes; when
            given, the whole file is mapped once and the walk reads the record headers and
            pfn arrays from it (much cheaper than one ``read`` per record).
        scan: the result of an earlier walk over the very same file (reused as is).

    Raises:
        XenFormatError: the file cannot be used; ``str(exc)`` is one line.
    """

    format_name = "Xen save image"

    def __init__(
        self,
        read: Reader,
        file_size: int,
        name: str = "save image",
        map_region: RegionMapper | None = None,
        *,
        scan: SaveScan | None = None,
    ) -> None:
        self.name = name
        self.file_size = file_size
        self._read = read
        if scan is None:
            view = None
            if map_region is not None and file_size > 0:
                try:
                    view = map_region(0, file_size)
                except (OSError, ValueError):
                    view = None
            scan = savestream.scan_stream(read, file_size, name, view)
            del view
        self.scan = scan
        domain = scan.domain
        assert domain is not None  # scan_stream raises otherwise
        self.domain: DomainHeader = domain
        self.page_shift = domain.page_shift
        self.page_size = 1 << self.page_shift
        self.warnings: list[str] = list(scan.warnings)
        if scan.runs is None or len(scan.runs) == 0:
            raise XenFormatError(name, self._why_no_pages())
        self.config = self._config()

    def _why_no_pages(self) -> str:
        stats = self.scan.page_stats
        tail = f"; {self.warnings[-1]}" if self.warnings else ""
        if stats is None or stats.records == 0:
            return f"the save image holds no usable PAGE_DATA record{tail}"
        return (
            f"none of the {stats.entries} pfns in {stats.records} PAGE_DATA records has its "
            f"page in the file{tail}"
        )

    def _config(self) -> dict | None:
        text = self.scan.config_text
        if text is None:
            return None
        try:
            value = json.loads(text.rstrip(b"\0").decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self.warnings.append(f"the xl header's JSON domain config cannot be parsed: {exc}")
            return None
        if not isinstance(value, dict):
            self.warnings.append("the xl header's domain config is not a JSON object")
            return None
        kind = (
            value.get("c_info", {}).get("type") if isinstance(value.get("c_info"), dict) else None
        )
        if isinstance(kind, str) and kind.upper() != self.guest_type:
            self.warnings.append(
                f"the xl config says type {kind!r} but the libxc domain header says "
                f"{self.guest_type}; following the domain header"
            )
        return value

    # -- facts -----------------------------------------------------------------------------

    @property
    def guest_type(self) -> str:
        return self.domain.guest_type

    @property
    def byteorder(self) -> str:
        """Byte order of the libxc records."""
        return self.scan.libxc_byteorder

    @property
    def wrappers(self) -> list[Wrapper]:
        return self.scan.wrappers

    @property
    def xenops_metadata(self) -> str | None:
        return self.scan.xenops_metadata

    @property
    def record_counts(self) -> dict[str, int]:
        return self.scan.record_counts

    @property
    def page_stats(self) -> PageStats:
        stats = self.scan.page_stats
        assert stats is not None
        return stats

    @property
    def pv_info(self) -> tuple[int, int] | None:
        return self.scan.pv_info

    @property
    def p2m_frames(self) -> int | None:
        return self.scan.p2m_frames

    @property
    def pv_vcpu_contexts(self) -> dict[int, bytes]:
        return self.scan.pv_vcpu_contexts

    @property
    def hvm_context(self) -> bytes | None:
        return self.scan.hvm_context

    @property
    def hvm_params(self) -> dict[int, int]:
        return self.scan.hvm_params

    @property
    def shared_info(self) -> bytes | None:
        return self.scan.shared_info

    @property
    def guest_width(self) -> int | None:
        """Guest pointer size in bytes (PV: from X86_PV_INFO)."""
        return self.pv_info[0] if self.pv_info else None

    # -- the model the layers use ----------------------------------------------------------

    def page_runs(self) -> Runs:
        """pfn -> file offset runs (the last copy of each page)."""
        runs = self.scan.runs
        assert runs is not None
        return runs

    @property
    def machine_frames(self) -> None:
        """None: the save code already rewrote the page tables (and CR3) to pfns."""
        return None

    @cached_property
    def _vcpus(self) -> tuple:
        from . import vcpu

        if self.guest_type != GUEST_PV:
            try:
                from .hvmcontext import decode_hvm_vcpus  # type: ignore[import-not-found]
            except ImportError:
                self.warnings.append("HVM vCPU decoding is not available in this version")
                return ()
            if self.hvm_context is None:
                return ()
            return tuple(decode_hvm_vcpus(self.hvm_context, self.byteorder))
        width = self.guest_width
        if width is None:
            self.warnings.append("no X86_PV_INFO record: assuming a 64-bit PV guest")
            width = 8
        layout = vcpu.LAYOUT_X86_32 if width == 4 else vcpu.LAYOUT_X86_64
        contexts = []
        for vcpu_id in sorted(self.pv_vcpu_contexts):
            raw = self.pv_vcpu_contexts[vcpu_id]
            try:
                contexts.append(vcpu.decode_vcpu(raw, layout, self.byteorder, vcpu_id))
            except ValueError as exc:
                self.warnings.append(f"X86_PV_VCPU_BASIC of vCPU {vcpu_id}: {exc}")
        return tuple(contexts)

    def vcpus(self) -> list:
        """PV: the ``vcpu_guest_context`` of each X86_PV_VCPU_BASIC record (slot = vCPU id;
        cr3 holds a pfn, not a machine frame).  HVM/PVH: decoded from HVM_CONTEXT."""
        return list(self._vcpus)
