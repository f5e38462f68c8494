"""Rebuild a 64-bit Xen PV Linux guest's pfn <-> mfn map from an image taken inside it.

An image acquired inside a PV guest (LiME, AVML, a raw copy) is pseudo-physical, but every
page-table entry holds a machine frame (mfn) and the image carries no p2m table.  The map
is recovered from the guest's own memory (``reference/pv-inguest-images.md``):

1. **No page tables needed for kernel data**: a PV kernel runs at its link address
   (``phys_base`` 0, no KASLR), so kernel-image variables are read at
   ``va - __START_KERNEL_map`` and direct-map objects at ``va - page_offset_base``.
2. **Anchor**: the domain builder's L1 tables map themselves.  For an L1 slot (mfn ``c``)
   that maps pfns ``[b, b + 512)``, the page ``p`` in that range which is that L1 holds
   ``c`` at index ``p - b``.  One bulk read of the range tests all 512 candidates; a
   unique, L1-shaped hit gives the pair ``(p, c)``.  Slot 258 of the top-level table
   (Xen's linear slot: the table's own mfn) gives one more pair.
3. **Fixed point**: every L1 whose pfn is known and that maps the direct map or the
   kernel image gives one pair per present entry; walking the top-level table (and
   ``level2_ident_pgt`` / ``level2_kernel_pgt``, at known pfns) through resolved mfns
   finds more L1s; repeat until nothing new.
4. **The kernel's p2m** (``xen_p2m_addr`` list, read through the recovered tables, or the
   ``p2m_top`` tree of kernels <= 3.18, read through the direct map) cross-checks every
   pair and fills pfns whose L1 was lost, one 512-entry page at a time, and only from a
   page that is not all zeros and agrees with every pair already known.  Entries with
   ``FOREIGN_FRAME_BIT`` drop their pfn's pair; identity entries are no guest frame.
5. **One partner**: a pfn or mfn that would get a second partner is a conflict: it is
   reported and never used.

Everything is bulk numpy over 4 KiB tables and 2 MiB ranges: no Python object per pfn,
and every array is sized by the image (``size``), never by a value read from it.

No Volatility import: the caller passes ``read(pseudo_physical_address, length)`` (zero
bytes where the image has no data) and a ``KernelLayout`` filled from the kernel's ISF.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .errors import XenFormatError

Reader = Callable[[int, int], bytes]
Progress = Callable[[float, str], None]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ENTRIES = 512
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
#: Direct-map bases when the ISF has no ``page_offset_base`` (kernels before and after 4.20).
DIRECT_MAP_BEFORE_4_20 = 0xFFFF_8800_0000_0000
DIRECT_MAP_SINCE_4_20 = 0xFFFF_8880_0000_0000
#: ``enum xen_domain_type``: XEN_PV_DOMAIN.
XEN_PV_DOMAIN = 1
#: Xen's linear page-table slot in every 64-bit PV L4: it holds the L4's own mfn.
LINEAR_SLOT = 258
#: Frames are bits 12-51 of an entry (MAXPHYADDR 52): an mfn is below 2^40.
MFN_LIMIT = 1 << 40
_FRAME_MASK = np.uint64(((1 << 52) - 1) & ~(PAGE_SIZE - 1))
_PRESENT = np.uint64(1)
_PSE = np.uint64(1 << 7)
_U12 = np.uint64(PAGE_SHIFT)
INVALID = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_FOREIGN = np.uint64(1 << 63)
_IDENTITY = np.uint64(1 << 62)
_UPPER_HALF = 0xFFFF_0000_0000_0000
_EXAMPLES = 5
_ANCHOR_BLOCK = 64
_MAX_ROUNDS = 64
_MAX_ANCHORS = 16


@dataclass(frozen=True)
class KernelLayout:
    """Where the kernel keeps what the recovery reads: virtual addresses from its ISF.

    ``top_table``: ``init_top_pgt`` (>= 4.13) or ``init_level4_pgt``; ``ident_l2`` /
    ``kernel_l2``: ``level2_ident_pgt`` (first GiB of the direct map) and
    ``level2_kernel_pgt``; ``kernel_end``: ``_end`` (the kernel image's linear range ends
    there).  ``direct_map_variable``: ``page_offset_base`` when the ISF has it, else
    ``direct_map`` is used (``DIRECT_MAP_*``).  The p2m: ``p2m_list`` / ``p2m_size``
    (``xen_p2m_addr`` / ``xen_p2m_size``, >= 3.19) or ``p2m_top`` (<= 3.18).
    """

    top_table: int
    top_table_name: str = "init_top_pgt"
    kernel_end: int | None = None
    ident_l2: int | None = None
    kernel_l2: int | None = None
    direct_map_variable: int | None = None
    direct_map: int = DIRECT_MAP_SINCE_4_20
    p2m_list: int | None = None
    p2m_size: int | None = None
    p2m_top: int | None = None
    domain_type: int | None = None
    pv_domain_value: int = XEN_PV_DOMAIN
    kernel_map: int = START_KERNEL_MAP


@dataclass
class Recovery:
    """The recovered map and how it was found (what ``xen.info`` reports)."""

    pfns: np.ndarray  # sorted uint64
    mfns: np.ndarray  # uint64, mfns[i] backs pfns[i]
    image_pages: int
    direct_map: int
    anchors: list[tuple[int, int]] = field(default_factory=list)  # (pfn, mfn)
    linear_slot: tuple[int, int] | None = None  # (top table pfn, its mfn from slot 258)
    ranges_tested: int = 0
    rounds: int = 0
    tables_read: int = 0
    from_tables: int = 0
    list_source: str | None = None
    list_pages: int = 0
    list_pages_used: int = 0
    list_pages_refused: int = 0
    list_pages_unreadable: int = 0
    list_compared: int = 0
    list_agreed: int = 0
    list_filled: int = 0
    foreign_dropped: int = 0
    conflicts: int = 0
    conflict_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def mapped(self) -> int:
        return len(self.pfns)


class KernelReadError(ValueError):
    """A kernel-image address lies outside the image."""


def read_kernel_bytes(read: Reader, layout: KernelLayout, address: int, length: int) -> bytes:
    """``length`` bytes at kernel-image address ``address`` (``phys = va - kernel_map``)."""
    offset = address - layout.kernel_map
    if offset < 0 or address >= 1 << 64:
        raise KernelReadError(f"{address:#x} is not a kernel-image address")
    data = read(offset, length)
    if len(data) != length:
        raise KernelReadError(f"kernel-image address {address:#x} is beyond the image")
    return data


def read_kernel_word(read: Reader, layout: KernelLayout, address: int, size: int = 8) -> int:
    return int.from_bytes(read_kernel_bytes(read, layout, address, size), "little")


def is_pv_guest(read: Reader, layout: KernelLayout) -> bool:
    """Does ``xen_domain_type``, read through the kernel-image mapping, say XEN_PV_DOMAIN?"""
    if layout.domain_type is None:
        return False
    try:
        return read_kernel_word(read, layout, layout.domain_type, 4) == layout.pv_domain_value
    except KernelReadError:
        return False


def direct_map_base(read: Reader, layout: KernelLayout) -> int:
    """``page_offset_base`` as the guest holds it, else the layout's default."""
    if layout.direct_map_variable is not None:
        try:
            value = read_kernel_word(read, layout, layout.direct_map_variable)
        except KernelReadError:
            value = 0
        # A 1 GiB-aligned upper-half address (KASLR randomises it in 1 GiB steps).
        if value >= 0xFFFF_8000_0000_0000 and value & ((1 << 30) - 1) == 0:
            return value
    return layout.direct_map


class _Region:
    """A linear kernel mapping: ``va -> pfn = (va - base) >> 12`` for ``lo <= va < hi``."""

    def __init__(self, base: int, lo: int, hi: int) -> None:
        self.base, self.lo, self.hi = base, lo, hi


class _Recoverer:
    def __init__(
        self, read: Reader, size: int, layout: KernelLayout, name: str, progress: Progress | None
    ) -> None:
        self.name = name
        self.read = read
        self.layout = layout
        self.progress = progress
        self.pages = size >> PAGE_SHIFT
        self.p2m = np.full(self.pages, INVALID, dtype=np.uint64)
        self.bad_pfn = np.zeros(self.pages, dtype=bool)
        self.bad_mfns = np.zeros(0, dtype=np.uint64)
        self._sorted: np.ndarray | None = None
        self.pfn_bits = max(1, self.pages.bit_length())
        if self.pfn_bits + 40 > 64:
            raise XenFormatError(name, f"an image of {self.pages} pages is beyond this reader")
        self.harvested: set[tuple[int, int]] = set()
        # Page-table pairs merged per step: an eighth of the image (at least 16 tables).
        self.batch = max(16 * ENTRIES, self.pages // 8)
        self.unresolved: dict[int, int] = {}  # base pfn -> L1 mfn not yet resolved
        self.tested: set[int] = set()
        self.direct = direct_map_base(read, layout)
        self.result = Recovery(
            np.zeros(0, np.uint64), np.zeros(0, np.uint64), self.pages, self.direct
        )
        self.regions = [_Region(self.direct, self.direct, self.direct + self.pages * PAGE_SIZE)]
        if layout.kernel_end is not None:
            end = min(layout.kernel_end, layout.kernel_map + self.pages * PAGE_SIZE)
            self.regions.append(_Region(layout.kernel_map, layout.kernel_map, end))

    # -- reading -----------------------------------------------------------------------

    def page(self, pfn: int) -> np.ndarray | None:
        if not 0 <= pfn < self.pages:
            return None
        data = self.read(pfn << PAGE_SHIFT, PAGE_SIZE)
        if len(data) != PAGE_SIZE:
            return None
        self.result.tables_read += 1
        return np.frombuffer(data, dtype="<u8").astype(np.uint64)

    def kernel_pfn(self, address: int) -> int:
        return (address - self.layout.kernel_map) >> PAGE_SHIFT

    # -- the map -----------------------------------------------------------------------

    def resolve(self, mfns: np.ndarray) -> np.ndarray:
        """pfn of each mfn (``INVALID`` where unknown).

        The reverse index is one sorted ``uint64`` per pair, ``mfn << bits | pfn`` (pfns
        are below the image's page count, mfns below 2^40), rebuilt after a merge."""
        if self._sorted is None:
            known = np.flatnonzero(self.p2m != INVALID)
            packed = self.p2m[known]
            packed <<= np.uint64(self.pfn_bits)
            packed |= known.view(np.uint64)
            del known
            packed.sort()
            self._sorted = packed
        packed = self._sorted
        mfns = np.asarray(mfns, dtype=np.uint64)
        out = np.full(len(mfns), INVALID, dtype=np.uint64)
        if len(packed) == 0 or len(mfns) == 0:
            return out
        shift = np.uint64(self.pfn_bits)
        at = np.minimum(np.searchsorted(packed, mfns << shift), len(packed) - 1)
        found = packed[at]
        hit = (found >> shift) == mfns
        out[hit] = found[hit] & np.uint64((1 << self.pfn_bits) - 1)
        return out

    def conflict(self, pfns: np.ndarray, mfns: Iterable[int], why: str) -> None:
        pfns = np.unique(np.asarray(pfns, dtype=np.uint64))
        fresh = pfns[~self.bad_pfn[pfns.astype(np.intp)]]
        if len(fresh) == 0:
            return
        self.result.conflicts += len(fresh)
        for pfn in fresh[: max(0, _EXAMPLES - len(self.result.conflict_examples))]:
            self.result.conflict_examples.append(f"pfn {int(pfn):#x}: {why}")
        self.bad_pfn[fresh.astype(np.intp)] = True
        self.p2m[fresh.astype(np.intp)] = INVALID
        extra = np.fromiter((int(m) for m in mfns), dtype=np.uint64)
        self.bad_mfns = np.union1d(self.bad_mfns, extra[extra != INVALID])
        self._sorted = None

    def merge(self, pfns: np.ndarray, mfns: np.ndarray, source: str) -> int:
        """Add candidate pairs under the one-partner rule; return how many are new."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        mfns = np.asarray(mfns, dtype=np.uint64)
        keep = (pfns < np.uint64(self.pages)) & (mfns < np.uint64(MFN_LIMIT)) & (mfns != 0)
        pfns, mfns = pfns[keep], mfns[keep]
        if len(self.bad_mfns):
            keep = ~np.isin(mfns, self.bad_mfns)
            pfns, mfns = pfns[keep], mfns[keep]
        keep = ~self.bad_pfn[pfns.astype(np.intp)]
        pfns, mfns = pfns[keep], mfns[keep]
        if len(pfns) == 0:
            return 0
        # Identical candidates collapse; one pfn with two mfns in the batch conflicts.
        order = np.lexsort((mfns, pfns))
        pfns, mfns = pfns[order], mfns[order]
        distinct = np.ones(len(pfns), dtype=bool)
        distinct[1:] = (pfns[1:] != pfns[:-1]) | (mfns[1:] != mfns[:-1])
        pfns, mfns = pfns[distinct], mfns[distinct]
        twice = np.flatnonzero(pfns[1:] == pfns[:-1])
        if len(twice):
            both = np.concatenate((twice, twice + 1))
            self.conflict(pfns[both], mfns[both], f"two machine frames in {source}")
            keep = ~self.bad_pfn[pfns.astype(np.intp)]
            pfns, mfns = pfns[keep], mfns[keep]
        current = self.p2m[pfns.astype(np.intp)]
        clash = (current != INVALID) & (current != mfns)
        if clash.any():
            self.conflict(
                pfns[clash],
                np.concatenate((mfns[clash], current[clash])),
                f"{source} disagrees with an earlier pair",
            )
        new = current == INVALID
        new &= ~self.bad_pfn[pfns.astype(np.intp)]
        if not new.any():
            return 0
        pfns, mfns = pfns[new], mfns[new]
        # One mfn, two pfns (within the batch, or a batch pfn and a known one): neither
        # pair can be trusted.
        order = np.argsort(mfns, kind="stable")
        same = np.flatnonzero(mfns[order][1:] == mfns[order][:-1])
        shared = np.unique(mfns[order][same])
        owners = self.resolve(mfns)
        taken = owners != INVALID
        if len(shared) or taken.any():
            shared = np.union1d(shared, mfns[taken])
            involved = np.isin(mfns, shared)
            self.conflict(
                np.concatenate((pfns[involved], owners[taken])),
                shared,
                "its machine frame backs another pfn too",
            )
            pfns, mfns = pfns[~involved], mfns[~involved]
        if len(pfns) == 0:
            return 0
        self.p2m[pfns.astype(np.intp)] = mfns
        self._sorted = None
        return len(pfns)

    # -- page-table walks ----------------------------------------------------------------

    def _l1_slots(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """(L1 mfn, first virtual address it maps) for every present L2 entry covering
        ``[lo, hi)``, reached through resolved mfns from the top table and the two L2
        tables at known pfns."""
        slots: list[tuple[int, int]] = []
        roots = [(self.kernel_pfn(self.layout.top_table), 4, _UPPER_HALF)]
        for address, base in (
            (self.layout.ident_l2, self.direct),
            (self.layout.kernel_l2, self.layout.kernel_map),
        ):
            if address is not None and base <= lo < base + (1 << 30):
                roots.append((self.kernel_pfn(address), 2, base))
        pending = list(roots)
        seen: set[tuple[int, int, int]] = set()
        while pending:
            pfn, level, va_base = pending.pop()
            if (pfn, level, va_base) in seen:
                continue
            seen.add((pfn, level, va_base))
            entries = self.page(pfn)
            if entries is None:
                continue
            span = 1 << (PAGE_SHIFT + 9 * (level - 1))
            first = max(0, (lo - va_base) // span)
            last = min(ENTRIES - 1, (hi - 1 - va_base) // span)
            if first > last:
                continue
            index = np.arange(first, last + 1)
            chosen = entries[first : last + 1]
            present = ((chosen & _PRESENT) != 0) & ((chosen & _PSE) == 0)
            if level == 4:
                present[(index >= 256) & (index < 272)] = False  # Xen's slots
            index, chosen = index[present], chosen[present]
            frames = (chosen & _FRAME_MASK) >> _U12
            addresses = [va_base + int(i) * span for i in index]
            if level == 2:
                slots.extend(zip((int(f) for f in frames), addresses))
                continue
            for child, address in zip(self.resolve(frames), addresses):
                if child != INVALID:
                    pending.append((int(child), level - 1, address))
        return slots

    def harvest(self) -> int:
        """One round: pairs from every readable L1 of the linear regions."""
        cand_pfn: list[np.ndarray] = []
        cand_mfn: list[np.ndarray] = []
        added = pending = 0
        for region in self.regions:
            if region.lo >= region.hi:
                continue
            slots = self._l1_slots(region.lo, region.hi)
            frames = np.fromiter((s[0] for s in slots), dtype=np.uint64, count=len(slots))
            refused = np.isin(frames, self.bad_mfns)
            for (mfn, address), table, bad in zip(slots, self.resolve(frames), refused):
                base = (address - region.base) >> PAGE_SHIFT
                if table == INVALID:
                    if not bad:
                        self.unresolved.setdefault(base, mfn)
                    continue
                self.unresolved.pop(base, None)
                if (int(table), base) in self.harvested:
                    continue
                self.harvested.add((int(table), base))
                entries = self.page(int(table))
                if entries is None:
                    continue
                count = min(ENTRIES, (region.hi - address) >> PAGE_SHIFT)
                entries = entries[:count]
                present = np.flatnonzero(entries & _PRESENT)
                cand_pfn.append(present.astype(np.uint64) + np.uint64(base))
                cand_mfn.append((entries[present] & _FRAME_MASK) >> _U12)
                pending += len(present)
                if pending >= self.batch:  # bounded temporaries: merge as we go
                    added += self.merge_tables(cand_pfn, cand_mfn)
                    pending = 0
        added += self.merge_tables(cand_pfn, cand_mfn)
        return added

    def merge_tables(self, cand_pfn: list, cand_mfn: list) -> int:
        if not cand_pfn:
            return 0
        added = self.merge(np.concatenate(cand_pfn), np.concatenate(cand_mfn), "a page table")
        cand_pfn.clear()
        cand_mfn.clear()
        self.result.from_tables += added
        return added

    def fixed_point(self) -> None:
        for _ in range(_MAX_ROUNDS):
            self.result.rounds += 1
            if self.harvest() == 0:
                return
        # Real guests close in a handful of rounds; a chain that keeps growing one table
        # at a time would cost rounds x tables: stop with what is known (all of it sound).
        self.result.warnings.append(
            f"page-table rounds stopped after {_MAX_ROUNDS} (each still found new pairs)"
        )

    # -- the anchor --------------------------------------------------------------------

    def find_anchor(self) -> bool:
        """Test the ranges of unresolved L1 slots; adopt the first hit.

        The domain builder puts its page tables after the kernel image (and the initrd,
        start_info and its p2m list), so ranges from the one holding ``_end`` upwards go
        first, then the lower ones."""
        end = 0
        if self.layout.kernel_end is not None:
            end = (self.kernel_pfn(self.layout.kernel_end) // ENTRIES) * ENTRIES
        for base in sorted(self.unresolved, key=lambda base: (base < end, base)):
            mfn = self.unresolved[base]
            if base in self.tested or base >= self.pages:
                continue
            self.tested.add(base)
            self.result.ranges_tested += 1
            hits = []
            # 64 pages (256 KiB) per read: a bounded buffer, still one call per 64 pages.
            for first in range(base, min(base + ENTRIES, self.pages), _ANCHOR_BLOCK):
                count = min(_ANCHOR_BLOCK, base + ENTRIES - first, self.pages - first)
                data = self.read(first << PAGE_SHIFT, count * PAGE_SIZE)
                if len(data) != count * PAGE_SIZE:
                    break
                block = np.frombuffer(data, dtype="<u8").reshape(count, ENTRIES)
                rows = np.arange(count)
                diagonal = block[rows, rows + (first - base)]
                found = np.flatnonzero(
                    ((diagonal & _PRESENT) != 0) & ((diagonal & _FRAME_MASK) >> _U12 == mfn)
                )
                hits += [(first - base + int(k), block[k].copy()) for k in found[:2]]
                if len(hits) > 1:
                    break
            if len(hits) != 1 or not _l1_shaped(hits[0][1]):
                continue
            pfn = base + hits[0][0]
            if self.merge(np.array([pfn]), np.array([mfn]), "the anchor"):
                self.result.anchors.append((pfn, mfn))
                return True
        return False

    def linear_slot(self) -> None:
        top = self.kernel_pfn(self.layout.top_table)
        entries = self.page(top)
        if entries is None:
            return
        entry = entries[LINEAR_SLOT]
        if entry & _PRESENT:
            mfn = int((entry & _FRAME_MASK) >> _U12)
            self.result.linear_slot = (top, mfn)
            self.merge(np.array([top]), np.array([mfn]), "the top table's linear slot")

    # -- the kernel's own p2m ----------------------------------------------------------

    def translate(self, lo: int, pages: int) -> np.ndarray:
        """pfn of each page of ``[lo, lo + pages*4096)`` through the recovered tables."""
        out = np.full(pages, INVALID, dtype=np.uint64)
        hi = lo + pages * PAGE_SIZE
        slots = self._l1_slots(lo, hi)
        frames = np.fromiter((s[0] for s in slots), dtype=np.uint64, count=len(slots))
        for (_, address), table in zip(slots, self.resolve(frames)):
            entries = self.page(int(table)) if table != INVALID else None
            if entries is None:
                continue
            start = max(lo, address)
            stop = min(hi, address + ENTRIES * PAGE_SIZE)
            chosen = entries[(start - address) >> PAGE_SHIFT : (stop - address) >> PAGE_SHIFT]
            pfns = self.resolve((chosen & _FRAME_MASK) >> _U12)
            pfns[(chosen & _PRESENT) == 0] = INVALID
            first = (start - lo) >> PAGE_SHIFT
            out[first : first + len(pfns)] = pfns
        return out

    def list_pages(self) -> list[tuple[int, int]]:
        """(first pfn, pfn of the p2m page holding it) for the kernel's p2m."""
        layout = self.layout
        if layout.p2m_list is not None and layout.p2m_size is not None:
            self.result.list_source = "xen_p2m_addr (linear list)"
            address = read_kernel_word(self.read, layout, layout.p2m_list)
            entries = min(read_kernel_word(self.read, layout, layout.p2m_size), self.pages)
            count = -(-entries // ENTRIES)
            if address % PAGE_SIZE or address < _UPPER_HALF or count == 0:
                return []
            where = self.translate(address, count)
            return [(k * ENTRIES, int(p)) for k, p in enumerate(where)]
        if layout.p2m_top is not None:
            self.result.list_source = "p2m_top (tree)"
            return self._tree_pages(read_kernel_word(self.read, layout, layout.p2m_top))
        return []

    def linear_pfn(self, address: int) -> int | None:
        for region in self.regions:
            if region.lo <= address < region.hi:
                return (address - region.base) >> PAGE_SHIFT
        return None

    def _tree_pages(self, top: int) -> list[tuple[int, int]]:
        """``p2m_top[512][512] -> leaf[512]`` (3.0-3.18), through the linear mappings."""
        found = []
        top_pfn = self.linear_pfn(top)
        top_entries = self.page(top_pfn) if top_pfn is not None else None
        if top_entries is None:
            return []
        span = ENTRIES * ENTRIES
        for i in range(min(ENTRIES, -(-self.pages // span))):
            mid_pfn = self.linear_pfn(int(top_entries[i]))
            mid = self.page(mid_pfn) if mid_pfn is not None else None
            if mid is None:
                continue
            for j in range(min(ENTRIES, -(-(self.pages - i * span) // ENTRIES))):
                leaf = self.linear_pfn(int(mid[j]))
                found.append((i * span + j * ENTRIES, INVALID if leaf is None else leaf))
        return found

    def merge_list(self) -> int:
        """Cross-check with the kernel's p2m and fill from pages that agree."""
        result = self.result
        try:
            pages = self.list_pages()
        except KernelReadError as exc:
            result.warnings.append(f"the kernel's p2m cannot be read: {exc}")
            return 0
        # Each pass re-reads every page: the counters describe the last pass.
        result.list_pages = len(pages)
        result.list_pages_used = result.list_pages_refused = result.list_pages_unreadable = 0
        fill_pfn, fill_mfn = [], []
        compared = agreed = 0
        for first, where in pages:
            entries = self.page(where) if where != INVALID else None
            if entries is None:
                result.list_pages_unreadable += 1
                continue
            count = min(ENTRIES, self.pages - first)
            entries = entries[:count]
            if not entries.any():
                result.list_pages_refused += 1  # lost page: zeros would be mfn 0 for all
                continue
            pfns = np.arange(first, first + count, dtype=np.uint64)
            known = self.p2m[first : first + count]
            valid = entries != INVALID
            foreign = valid & ((entries & _FOREIGN) != 0)
            frame = valid & ~foreign & ((entries & _IDENTITY) == 0) & (entries < MFN_LIMIT)
            has = known != INVALID
            if (foreign & has).any():
                dropped = np.flatnonzero(foreign & has) + first
                result.foreign_dropped += len(dropped)
                self.p2m[dropped] = INVALID
                self.bad_pfn[dropped] = True
                self._sorted = None
                has &= ~foreign
            both = has & frame
            compared += int(np.count_nonzero(both))
            agree = both & (entries == known)
            agreed += int(np.count_nonzero(agree))
            clash = both & ~agree
            if clash.any():
                self.conflict(
                    pfns[clash],
                    np.concatenate((entries[clash], known[clash])),
                    "the kernel's p2m names another machine frame",
                )
            if clash.any() or (has & ~frame).any():
                result.list_pages_refused += 1
                continue
            result.list_pages_used += 1
            fill = frame & ~has
            fill_pfn.append(pfns[fill])
            fill_mfn.append(entries[fill])
        result.list_compared, result.list_agreed = compared, agreed
        if not fill_pfn:
            return 0
        added = self.merge(np.concatenate(fill_pfn), np.concatenate(fill_mfn), "the kernel's p2m")
        result.list_filled += added
        return added

    # -- driver ------------------------------------------------------------------------

    def run(self) -> Recovery:
        started = time.perf_counter()
        self.say(0, "reading the top-level page table")
        self.linear_slot()
        self.fixed_point()
        while len(self.result.anchors) < _MAX_ANCHORS and self.find_anchor():
            self.say(30, f"anchor {len(self.result.anchors)}: following page tables")
            self.fixed_point()
        if not self.result.anchors:
            raise XenFormatError(
                self.name,
                f"no self-mapping anchor page among the {self.result.ranges_tested} 2 MiB "
                "ranges that unresolved kernel L1 tables map (the anchor page is missing or "
                "damaged); the machine-frame map cannot be started",
            )
        self.say(60, "cross-checking with the kernel's p2m")
        for _ in range(4):  # a fill can resolve tables, which can make more p2m readable
            if self.merge_list() == 0:
                break
            self.fixed_point()
        top = self.kernel_pfn(self.layout.top_table)
        if not 0 <= top < self.pages or self.p2m[top] == INVALID:
            why = "is in conflict" if 0 <= top < self.pages and self.bad_pfn[top] else "is unknown"
            raise XenFormatError(
                self.name,
                f"the machine frame of {self.layout.top_table_name} (pfn {top:#x}) {why} "
                f"after recovery ({self.result.conflicts} conflicts)",
            )
        self._sorted = None  # the working index goes before the result is built
        known = np.flatnonzero(self.p2m != INVALID)
        result = self.result
        result.pfns = known.view(np.uint64)
        result.mfns = self.p2m[known]
        self.p2m = self.bad_pfn = np.zeros(0, dtype=np.uint64)
        if result.conflicts:
            result.warnings.append(
                f"{result.conflicts} pfns left out: their machine frame is in conflict "
                f"(e.g. {result.conflict_examples[0]})"
            )
        if result.list_source is None:
            result.warnings.append("the kernel has no p2m this reader knows: no cross-check")
        elif result.list_pages_used == 0:
            result.warnings.append(
                f"the kernel's p2m ({result.list_source}) could not be used: "
                f"{result.list_pages} pages, {result.list_pages_unreadable} unreadable, "
                f"{result.list_pages_refused} refused"
            )
        if result.list_compared and result.list_agreed != result.list_compared:
            result.warnings.append(
                f"the kernel's p2m agrees with {result.list_agreed} of {result.list_compared} "
                "pairs read from page tables"
            )
        result.seconds = time.perf_counter() - started
        self.say(100, "machine-frame map recovered")
        return result

    def say(self, percent: float, what: str) -> None:
        if self.progress is not None:
            self.progress(percent, f"Xen PV in-guest image: {what}")


def _l1_shaped(entries: np.ndarray) -> bool:
    """Every non-zero entry present, frames below 2^40 and distinct: an L1 table."""
    used = entries[entries != 0]
    if len(used) == 0 or not np.all(used & _PRESENT):
        return False
    frames = (used & _FRAME_MASK) >> _U12
    return len(np.unique(frames)) == len(frames)


def recover_machine_frames(
    read: Reader,
    size: int,
    layout: KernelLayout,
    name: str = "image",
    progress: Progress | None = None,
) -> Recovery:
    """Recover the pfn -> mfn map of the 64-bit PV guest whose pseudo-physical memory
    ``read`` gives (``size`` bytes from address 0).

    Raises ``XenFormatError`` with a one-line reason when no map can be had (no anchor
    page, the top table's frame unknown or in conflict).
    """
    if size < PAGE_SIZE:
        raise XenFormatError(name, "the image holds no complete page")
    return _Recoverer(read, size, layout, name, progress).run()
