"""Turn a raw guest-physical image into the memory a Xen x86_64 PV guest would hold.

In a PV guest the kernel's "physical" addresses are pseudo-physical frame numbers (pfns), but
every present page-table entry holds a *machine* frame number (mfn), and the dump-core's
``.xen_p2m`` section lists the (pfn, mfn) pairs.  Starting from a flat image (file offset ==
guest-physical address, e.g. QEMU ``pmemsave``), this module

1. invents a machine-frame assignment (:func:`assign_machine_frames`), and
2. rewrites the frame field of every present entry of every page table reachable from the given
   L4 roots from pfn to mfn (:func:`convert_page_tables`),

so that a PV-aware page walker (table base mfn -> m2p -> pfn) can be tested on real data.

Design decisions:

* Machine frames are assigned in chunks of ``chunk_pages`` (default 512 = 2 MiB) so that 2 MiB
  pages, which need 512 machine-contiguous, 2 MiB-aligned frames, stay valid.
* 1 GiB pages would need 262144 machine-contiguous frames.  The converter never guesses: any
  large page whose frames are not machine-contiguous and aligned raises
  :class:`LargePageNotContiguousError`.  A guest that does use 1 GiB pages converts cleanly with
  ``assign_machine_frames(..., chunk_pages=262144)``.  (The reference guest uses none.)
* Non-present entries are left untouched, including Linux PROT_NONE PTEs (bit 8 set, bit 0 clear,
  frame inverted for L1TF).  That matches a real PV guest: Xen PV Linux converts pfn -> mfn in
  ``pte_pfn_to_mfn`` only when ``_PAGE_PRESENT`` is set, so such PTEs keep an inverted *pfn*.
* Present entries whose frame lies outside the image (MMIO, PCI BARs, ...) are left as they are
  and counted; in a real PV guest those would be I/O or foreign frames the guest does not own.
* Every table page is converted exactly once, however many tables share it (all processes share
  the kernel's L3 tables), and a visited map keeps looping or self-referencing tables from
  hanging the walk.  A page reached at two levels (e.g. a self-referencing L4 slot) is converted
  as the level it was first reached at and counted in ``level_conflicts``.
* All new table contents are computed first and written at the end, so an error leaves the
  image unmodified.

No Volatility import here: numpy and the standard library only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import numpy.typing as npt

__all__ = [
    "ConversionReport",
    "LargePageNotContiguousError",
    "MachineFrames",
    "XEN_PRIVATE_L4_SLOTS",
    "assign_machine_frames",
    "convert_page_tables",
    "machine_to_pseudo",
]

PAGE_SIZE = 4096
PAGE_SHIFT = 12
ENTRIES_PER_TABLE = 512
LOW_MEMORY_FRAMES = 0x100000  # machine frames below 4 GiB
# Low chunks stay below 3 GiB: on a real host 3..4 GiB is the PCI/MMIO hole (LAPIC 0xfee00000,
# IOAPIC, HPET, BARs), so a guest's MMIO frame values, which are left unconverted, can never
# coincide with a machine frame the guest owns.
HOST_MMIO_HOLE_FIRST_FRAME = 0xC0000
# x86_64 MAXPHYADDR is at most 52 bits, so a frame number has at most 40 bits.
MAX_FRAME = 1 << 40

_PRESENT = np.uint64(1)
_PAGE_SIZE_BIT = np.uint64(1 << 7)  # PS in L3/L2 entries (in L1 entries bit 7 is PAT)
_PAGE_PROTNONE = np.uint64(1 << 8)  # Linux: _PAGE_GLOBAL reused as PROT_NONE when not present
_FRAME_MASK = np.uint64(0x000F_FFFF_FFFF_F000)  # bits 12..51: 4 KiB table/page frame
# For large pages bit 12 is the PAT bit, so the frame field starts higher.
_LARGE_FRAME_MASK = {
    2: np.uint64(0x000F_FFFF_FFE0_0000),  # 2 MiB page: bits 21..51
    3: np.uint64(0x000F_FFFF_C000_0000),  # 1 GiB page: bits 30..51
}
_LARGE_PAGE_FRAMES = {2: 512, 3: 512 * 512}
_LARGE_PAGE_NAME = {2: "2 MiB", 3: "1 GiB"}
_SHIFT = np.uint64(PAGE_SHIFT)

# Xen x86_64 reserves L4 slots 256..271 (0xffff800000000000-0xffff87ffffffffff) for itself and
# installs them in every guest L4; the frames they point at belong to Xen, not the guest.
XEN_PRIVATE_L4_SLOTS = range(256, 272)
# Present | RW | Accessed | Dirty, like Xen's __PAGE_HYPERVISOR_RW without NX.
_XEN_SLOT_FLAGS = 0x63

MachineFrames = npt.NDArray[np.uint64]
ImageBuffer = Union[bytearray, memoryview, npt.NDArray[np.uint8]]


class LargePageNotContiguousError(ValueError):
    """A 2 MiB or 1 GiB page maps frames that are not machine-contiguous and aligned."""


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_page_tables` did.  Per-level dicts are keyed 4, 3, 2, 1."""

    tables: dict[int, int]
    """Table pages converted, by the level they were (first) reached at."""
    large_pages: dict[int, int]
    """Present large-page entries converted: level 3 = 1 GiB, level 2 = 2 MiB."""
    out_of_range: dict[int, int]
    """Present entries whose frame lies outside the image, left as they are."""
    out_of_range_owned: int
    """Of those, entries whose unconverted frame happens to equal a frame the guest owns (these
    would be misread by a PV walker; 0 with :func:`assign_machine_frames` on usual guests)."""
    entries_converted: int
    """Present entries whose frame field was rewritten (tables, 4 KiB and large pages)."""
    protnone_left: int
    """Non-present Linux PROT_NONE L1 entries seen (left as inverted pfns, as Xen PV does)."""
    level_conflicts: int
    """References to an already visited table page from a different level (self references)."""
    xen_slots_filled: int
    """L4 entries added in slots 256..271 (``xen_private_slots=True``)."""
    xen_slot_mfns: tuple[int, ...]
    """The foreign machine frames those entries point at (not owned by the guest)."""
    table_pfns: tuple[int, ...] = field(repr=False)
    """Sorted pseudo-physical frames of every converted table page."""

    def summary(self) -> str:
        levels = " ".join(f"L{lvl}={self.tables[lvl]}" for lvl in (4, 3, 2, 1))
        oor = " ".join(f"L{lvl}={self.out_of_range[lvl]}" for lvl in (4, 3, 2, 1))
        return (
            f"tables {levels}; large pages 1GiB={self.large_pages[3]} "
            f"2MiB={self.large_pages[2]}; entries converted {self.entries_converted}; "
            f"out-of-range entries {oor} ({self.out_of_range_owned} owned); "
            f"PROT_NONE left {self.protnone_left}; "
            f"level conflicts {self.level_conflicts}; Xen slots filled {self.xen_slots_filled}"
        )


def assign_machine_frames(
    n_pfns: int,
    seed: int,
    chunk_pages: int = 512,
    high_fraction: float = 0.5,
    machine_frames: int = 1 << 24,
) -> MachineFrames:
    """Return ``mfn_of_pfn``: a distinct machine frame for every pfn in ``[0, n_pfns)``.

    Pfns are grouped in chunks of ``chunk_pages`` (a power of two; 512 keeps 2 MiB pages valid,
    262144 keeps 1 GiB pages valid).  Chunks are shuffled over the machine's ``machine_frames``
    frames (default 64 GiB host); about ``high_fraction`` of them land above 4 GiB
    (mfn >= 0x100000), the rest below 3 GiB (never in the host's 3..4 GiB MMIO hole).  Each
    chunk-aligned pfn range maps to one chunk-aligned, machine-contiguous mfn range.  The result
    depends only on the arguments.
    """
    if n_pfns < 0:
        raise ValueError(f"n_pfns must be >= 0, got {n_pfns}")
    if chunk_pages < 1 or chunk_pages & (chunk_pages - 1):
        raise ValueError(f"chunk_pages must be a power of two, got {chunk_pages}")
    if not 0.0 <= high_fraction <= 1.0:
        raise ValueError(f"high_fraction must be in [0, 1], got {high_fraction}")
    if machine_frames % chunk_pages or not LOW_MEMORY_FRAMES < machine_frames <= MAX_FRAME:
        raise ValueError(
            f"machine_frames must be a multiple of chunk_pages in (0x100000, 2**40], "
            f"got {machine_frames:#x}"
        )

    n_chunks = -(-n_pfns // chunk_pages)
    n_high = int(round(n_chunks * high_fraction))
    n_low = n_chunks - n_high
    low_slots = HOST_MMIO_HOLE_FIRST_FRAME // chunk_pages
    high_first_slot = -(-LOW_MEMORY_FRAMES // chunk_pages)
    high_slots = machine_frames // chunk_pages - high_first_slot
    if n_low > low_slots or n_high > high_slots:
        raise ValueError(
            f"{n_chunks} chunks of {chunk_pages} pages do not fit: {n_low} below 4 GiB "
            f"(room for {low_slots}), {n_high} above (room for {high_slots})"
        )

    rng = np.random.default_rng(seed)
    slots = np.concatenate(
        [
            rng.choice(low_slots, size=n_low, replace=False),
            high_first_slot + rng.choice(high_slots, size=n_high, replace=False),
        ]
    ).astype(np.uint64)
    # Interleave low and high chunks over the pfn space instead of low-then-high.
    rng.shuffle(slots)

    pfns = np.arange(n_pfns, dtype=np.uint64)
    chunk = np.uint64(chunk_pages)
    return slots[pfns // chunk] * chunk + pfns % chunk


def machine_to_pseudo(mfn_of_pfn: npt.ArrayLike, mfns: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Vectorised m2p: the pfn owning each of ``mfns``, or -1 where the guest does not own it."""
    return _MachineIndex(np.asarray(mfn_of_pfn, dtype=np.uint64)).pfns_of(mfns)


class _MachineIndex:
    """m2p lookups by binary search over the sorted p2m, built on first use."""

    def __init__(self, p2m: MachineFrames) -> None:
        self._p2m = p2m
        self._order: npt.NDArray[np.intp] | None = None
        self._sorted: MachineFrames | None = None

    def pfns_of(self, mfns: npt.ArrayLike) -> npt.NDArray[np.int64]:
        wanted = np.asarray(mfns, dtype=np.uint64)
        if len(self._p2m) == 0 or wanted.size == 0:
            return np.full(wanted.shape, -1, dtype=np.int64)
        if self._order is None or self._sorted is None:
            self._order = np.argsort(self._p2m, kind="stable")
            self._sorted = self._p2m[self._order]
        pos = np.minimum(np.searchsorted(self._sorted, wanted), len(self._sorted) - 1)
        found = self._sorted[pos] == wanted
        return np.where(found, self._order[pos].astype(np.int64), -1)


def convert_page_tables(
    image: ImageBuffer,
    roots: Iterable[int],
    mfn_of_pfn: npt.ArrayLike,
    *,
    xen_private_slots: bool = False,
) -> ConversionReport:
    """Rewrite, in place, every page table reachable from ``roots`` to hold machine frames.

    ``image`` is a writable flat pseudo-physical image (bytearray or C-contiguous uint8 array,
    length a multiple of 4096); ``roots`` are pseudo-physical addresses of x86_64 4-level L4
    tables; ``mfn_of_pfn`` has one distinct machine frame per image page.  Every present entry
    of every reachable L4/L3/L2/L1 table gets its frame field replaced by the mfn of the pfn it
    held, all other bits (flags, PAT, bits 52..63 including NX) unchanged.  Large pages are
    converted but not walked into.  With ``xen_private_slots`` every converted L4 also gets
    present entries in the empty slots of 256..271 pointing at frames the guest does not own.
    """
    entries = _as_entry_array(image)
    n_pfns = len(entries) // ENTRIES_PER_TABLE
    p2m = _validated_p2m(mfn_of_pfn, n_pfns)
    root_pfns = _validated_root_pfns(roots, n_pfns)
    xen_slot_mfns = _foreign_frames(p2m, len(XEN_PRIVATE_L4_SLOTS)) if xen_private_slots else ()

    level_of_table = np.zeros(n_pfns, dtype=np.int8)  # 0 = not reached yet
    queue: deque[int] = deque()
    for pfn in root_pfns:
        if level_of_table[pfn] == 0:
            level_of_table[pfn] = 4
            queue.append(pfn)

    contiguous = _LargePageChecker(p2m)
    m2p = _MachineIndex(p2m)
    new_tables: list[tuple[int, npt.NDArray[np.uint64]]] = []
    tables = dict.fromkeys((4, 3, 2, 1), 0)
    large_pages = {3: 0, 2: 0}
    out_of_range = dict.fromkeys((4, 3, 2, 1), 0)
    entries_converted = protnone_left = level_conflicts = xen_slots_filled = 0
    out_of_range_owned = 0

    while queue:
        table_pfn = queue.popleft()
        level = int(level_of_table[table_pfn])
        old = entries[table_pfn * ENTRIES_PER_TABLE : (table_pfn + 1) * ENTRIES_PER_TABLE]
        new = old.copy()
        tables[level] += 1

        present = (old & _PRESENT) != 0
        if level in _LARGE_FRAME_MASK:
            large = present & ((old & _PAGE_SIZE_BIT) != 0)
        else:
            large = np.zeros(ENTRIES_PER_TABLE, dtype=bool)
        small = present & ~large
        if level == 1:
            protnone_left += int(np.count_nonzero(~present & ((old & _PAGE_PROTNONE) != 0)))

        frames = (old & _FRAME_MASK) >> _SHIFT
        in_image = frames < n_pfns
        to_convert = small & in_image
        foreign = small & ~in_image
        out_of_range[level] += int(np.count_nonzero(foreign))
        out_of_range_owned += int(np.count_nonzero(m2p.pfns_of(frames[foreign]) >= 0))
        new[to_convert] = (old[to_convert] & ~_FRAME_MASK) | (p2m[frames[to_convert]] << _SHIFT)
        entries_converted += int(np.count_nonzero(to_convert))

        if level > 1:
            children = np.unique(frames[to_convert])
            seen_at = level_of_table[children]
            level_conflicts += int(np.count_nonzero((seen_at != 0) & (seen_at != level - 1)))
            fresh = children[seen_at == 0]
            level_of_table[fresh] = level - 1
            queue.extend(fresh.tolist())

        if large.any():
            slots = np.flatnonzero(large)
            beyond = _convert_large(old, new, slots, level, table_pfn, p2m, contiguous)
            large_pages[level] += len(slots) - len(beyond)
            entries_converted += len(slots) - len(beyond)
            out_of_range[level] += len(beyond)
            out_of_range_owned += int(np.count_nonzero(m2p.pfns_of(beyond) >= 0))

        if level == 4 and xen_slot_mfns:
            xen_slots_filled += _fill_xen_slots(new, xen_slot_mfns)
        new_tables.append((table_pfn, new))

    # Commit only after every table converted cleanly, so an error leaves the image untouched.
    for table_pfn, new in new_tables:
        entries[table_pfn * ENTRIES_PER_TABLE : (table_pfn + 1) * ENTRIES_PER_TABLE] = new

    return ConversionReport(
        tables=tables,
        large_pages=large_pages,
        out_of_range=out_of_range,
        out_of_range_owned=out_of_range_owned,
        entries_converted=entries_converted,
        protnone_left=protnone_left,
        level_conflicts=level_conflicts,
        xen_slots_filled=xen_slots_filled,
        xen_slot_mfns=tuple(int(m) for m in xen_slot_mfns),
        table_pfns=tuple(sorted(pfn for pfn, _ in new_tables)),
    )


class _LargePageChecker:
    """Which span-aligned pfn blocks are machine-contiguous and map to a span-aligned mfn."""

    def __init__(self, p2m: MachineFrames) -> None:
        self._p2m = p2m
        self._valid_blocks: dict[int, npt.NDArray[np.bool_]] = {}

    def block_is_valid(self, first_pfn: int, span: int) -> bool:
        if first_pfn + span > len(self._p2m):
            return False
        valid = self._valid_blocks.get(span)
        if valid is None:
            valid = self._compute(span)
            self._valid_blocks[span] = valid
        return bool(valid[first_pfn // span])

    def _compute(self, span: int) -> npt.NDArray[np.bool_]:
        n_blocks = len(self._p2m) // span
        blocks = self._p2m[: n_blocks * span].reshape(n_blocks, span).astype(np.int64)
        starts = blocks[:, :1]
        contiguous = np.all(blocks - starts == np.arange(span, dtype=np.int64), axis=1)
        return contiguous & (starts[:, 0] % span == 0)


def _convert_large(
    old: MachineFrames,
    new: MachineFrames,
    slots: npt.NDArray[np.intp],
    level: int,
    table_pfn: int,
    p2m: MachineFrames,
    checker: _LargePageChecker,
) -> MachineFrames:
    """Convert the large-page entries at ``slots``; return the first frames left out of range."""
    mask = _LARGE_FRAME_MASK[level]
    span = _LARGE_PAGE_FRAMES[level]
    first_pfns = (old[slots] & mask) >> _SHIFT
    beyond = first_pfns >= len(p2m)
    # Large pages are few (one per 2 MiB of direct map at most), so a loop is fine here.
    for slot, first_pfn in zip(slots[~beyond].tolist(), first_pfns[~beyond].tolist()):
        if not checker.block_is_valid(first_pfn, span):
            raise LargePageNotContiguousError(
                f"L{level} table at pfn {table_pfn:#x} slot {slot} maps a "
                f"{_LARGE_PAGE_NAME[level]} page at pfns {first_pfn:#x}..+{span:#x} whose machine "
                f"frames are not contiguous, {span}-aligned and inside the image; use "
                f"assign_machine_frames(chunk_pages={span}) (or larger) for this guest"
            )
        mfn = np.uint64(int(p2m[first_pfn]))
        new[slot] = (old[slot] & ~mask) | (mfn << _SHIFT)
    return first_pfns[beyond]


def _fill_xen_slots(l4: MachineFrames, slot_mfns: tuple[int, ...]) -> int:
    """Put Xen-owned entries into the non-present slots 256..271 of ``l4``; return how many."""
    filled = 0
    for slot, mfn in zip(XEN_PRIVATE_L4_SLOTS, slot_mfns):
        if not int(l4[slot]) & 1:
            l4[slot] = np.uint64((mfn << PAGE_SHIFT) | _XEN_SLOT_FLAGS)
            filled += 1
    return filled


def _foreign_frames(p2m: MachineFrames, count: int) -> tuple[int, ...]:
    """``count`` machine frames the guest does not own: just above its highest frame."""
    first = (int(p2m.max()) + 1) if len(p2m) else 0
    first = -(-first // ENTRIES_PER_TABLE) * ENTRIES_PER_TABLE
    if first + count > MAX_FRAME:
        raise ValueError("no room above the guest's machine frames for Xen's private frames")
    return tuple(range(first, first + count))


def _as_entry_array(image: ImageBuffer) -> MachineFrames:
    """View a writable flat image as little-endian 64-bit page-table entries (no copy)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 1 or not image.flags.c_contiguous:
            raise TypeError("image array must be 1-D, C-contiguous uint8")
        raw = image
    else:
        raw = np.frombuffer(image, dtype=np.uint8)
    if not raw.flags.writeable:
        raise TypeError("image must be writable (pass a bytearray or a writable array copy)")
    if len(raw) % PAGE_SIZE:
        raise ValueError(f"image length {len(raw):#x} is not a multiple of {PAGE_SIZE}")
    return raw.view("<u8")


def _validated_p2m(mfn_of_pfn: npt.ArrayLike, n_pfns: int) -> MachineFrames:
    p2m = np.asarray(mfn_of_pfn)
    if p2m.ndim != 1 or len(p2m) != n_pfns:
        raise ValueError(f"mfn_of_pfn must have one entry per image page ({n_pfns})")
    if n_pfns and (not np.issubdtype(p2m.dtype, np.integer) or int(p2m.min()) < 0):
        raise ValueError("mfn_of_pfn must hold non-negative integers")
    p2m = p2m.astype(np.uint64, copy=False)
    if n_pfns and int(p2m.max()) >= MAX_FRAME:
        raise ValueError("mfn_of_pfn holds a frame beyond 52-bit physical addressing")
    if len(np.unique(p2m)) != n_pfns:
        raise ValueError("mfn_of_pfn maps two pfns to the same machine frame")
    return p2m


def _validated_root_pfns(roots: Iterable[int], n_pfns: int) -> list[int]:
    root_pfns = []
    for root in roots:
        address = int(root)
        if address % PAGE_SIZE or not 0 <= address < n_pfns * PAGE_SIZE:
            raise ValueError(f"root {address:#x} is not a page-aligned address inside the image")
        root_pfns.append(address >> PAGE_SHIFT)
    return root_pfns
