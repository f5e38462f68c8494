"""The page table of a dump-core (``.xen_pfn`` or ``.xen_p2m``) turned into run maps.

Everything here is bulk numpy work, O(table) with no Python object per page:

- ``PageMap`` maps a guest pseudo-physical frame (pfn) to the index of its page in
  ``.xen_pages``, as sorted runs ``(first pfn, first index, count)`` looked up by binary
  search;
- for PV guests it also keeps the machine frame (gmfn) of every entry and builds, on first
  use, the reverse machine-to-pseudo-physical runs.

Entries equal to ``~0`` are padding (libxc's ``XC_CORE_INVALID_PFN``) and map nothing;
pfn 0 is an ordinary page.  An unsorted table is sorted here (with a warning), duplicates
keep their first occurrence (with a warning): the result is always a function.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

INVALID = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class Runs:
    """Sorted, non-overlapping runs ``key[i] .. key[i]+count[i]-1 -> value[i] ..``.

    Kept as ``array('Q')`` because ``bisect`` on it is C-speed and needs no numpy scalar
    per probe (the lookup sits on every read).
    """

    key: array
    value: array
    count: array

    @classmethod
    def from_sorted(
        cls,
        keys: np.ndarray,
        values: np.ndarray | None = None,
        key_breaks: np.ndarray | None = None,
    ) -> Runs:
        """Coalesce parallel arrays sorted by ``keys`` into runs where both advance by one.

        ``values`` None means value ``i`` is ``i`` (the identity: a table stored in pfn
        order), which never breaks a run.  ``key_breaks``, if the caller has it, holds the
        positions ``i`` where ``keys[i + 1] != keys[i] + 1``.
        """
        if len(keys) == 0:
            return cls(array("Q"), array("Q"), array("Q"))
        if key_breaks is None:
            key_breaks = step_breaks(keys)
        if values is None:
            breaks = key_breaks
        else:
            breaks = np.union1d(key_breaks, step_breaks(values))
        starts = np.concatenate(([0], breaks + 1)).astype(np.uint64)
        counts = np.diff(np.concatenate((starts, [len(keys)])))
        run_values = starts if values is None else values[starts.astype(np.intp)]
        return cls(
            uint64_array(keys[starts.astype(np.intp)]),
            uint64_array(run_values),
            uint64_array(counts),
        )

    def __len__(self) -> int:
        return len(self.key)

    def find(self, key: int) -> int:
        """Index of the run holding ``key``, or -1."""
        i = bisect_right(self.key, key) - 1
        if i >= 0 and key - self.key[i] < self.count[i]:
            return i
        return -1

    def lookup(self, key: int) -> int | None:
        i = self.find(key)
        if i < 0:
            return None
        return self.value[i] + key - self.key[i]

    def next_run(self, key: int) -> int:
        """Index of the first run starting after ``key`` (may be ``len(self)``)."""
        return bisect_right(self.key, key)

    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self.key, self.value, self.count))


# Entries handled per step by the whole-table passes below: the temporaries stay small
# (and cache-warm) instead of being table-sized fresh allocations, whose page faults cost
# more than the arithmetic on a 16 GiB guest's table.
CHUNK_ENTRIES = 1 << 18


def step_breaks(values: np.ndarray) -> np.ndarray:
    """Positions ``i`` where ``values[i + 1] != values[i] + 1`` (uint64 wrap-around makes a
    step down a break too)."""
    steps = len(values) - 1
    found = []
    difference = np.empty(min(max(steps, 0), CHUNK_ENTRIES), dtype=np.uint64)
    for start in range(0, max(steps, 0), CHUNK_ENTRIES):
        stop = min(start + CHUNK_ENTRIES, steps)
        chunk = difference[: stop - start]
        np.subtract(values[start + 1 : stop + 1], values[start:stop], out=chunk)
        hits = np.flatnonzero(chunk != np.uint64(1))
        if len(hits):
            found.append(hits + start)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.intp)


def unusable_entries(pfns: np.ndarray, gmfns: np.ndarray | None, max_pfn: int) -> np.ndarray:
    """Positions of entries that map nothing: pfn beyond ``max_pfn`` (``~0`` padding is
    too) or, in a p2m table, a ``~0`` machine frame."""
    found = []
    limit = np.uint64(max_pfn)
    for start in range(0, len(pfns), CHUNK_ENTRIES):
        stop = min(start + CHUNK_ENTRIES, len(pfns))
        flags = pfns[start:stop] >= limit
        if gmfns is not None:
            flags |= gmfns[start:stop] == INVALID
        hits = np.flatnonzero(flags)
        if len(hits):
            found.append(hits + start)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.intp)


def uint64_array(values: np.ndarray) -> array:
    """A numpy vector as ``array('Q')`` (one bulk copy)."""
    result = array("Q")
    result.frombytes(np.ascontiguousarray(values, dtype=np.uint64).tobytes())
    return result


@dataclass(frozen=True)
class TableStats:
    """What the table held, for ``xen.info`` and for warnings."""

    entries: int
    valid: int
    padding: int
    duplicates: int
    beyond_limit: int
    sorted: bool
    runs: int
    lowest_pfn: int | None
    highest_pfn: int | None


class PageMap:
    """pfn -> page index (and, for PV, pfn <-> machine frame) for one dump-core.

    Args:
        pfns: the table's pfn column, in file order (entry i describes page i).
        gmfns: the machine frame column for ``.xen_p2m`` tables, else None.
        max_pfn: pfns at or above this are beyond the architecture's physical address
            limit and are dropped (they could only come from damage).
    """

    def __init__(self, pfns: np.ndarray, gmfns: np.ndarray | None, max_pfn: int) -> None:
        self.warnings: list[str] = []
        entries = len(pfns)
        if gmfns is not None:
            # A contiguous copy, so that the raw 16-byte-per-entry table can be freed.
            gmfns = np.ascontiguousarray(gmfns)
        # One pass finds every unusable entry (~0 padding is >= max_pfn too); only those,
        # usually a handful, are then told apart.
        bad = unusable_entries(pfns, gmfns, max_pfn)
        is_padding = pfns[bad] == INVALID
        if gmfns is not None:
            is_padding |= gmfns[bad] == INVALID
        padding = int(np.count_nonzero(is_padding))
        beyond = len(bad) - padding
        if beyond:
            self.warnings.append(
                f"{beyond} table entries name pfns beyond the physical address limit "
                f"(pfn >= {max_pfn:#x}); they are ignored"
            )
        padding_at = bad[is_padding]
        if padding and padding_at[0] != entries - padding:
            self.warnings.append(
                "padding entries (~0) found inside the table, not only at its end; they are skipped"
            )
        idx_valid: np.ndarray | None
        if len(bad) == 0 or (not beyond and bad[0] == entries - len(bad)):
            # libxc's layout: every entry valid except ~0 padding at the end.  Slices, not
            # gathers, and the page index is the position (no index array at all).
            valid = entries - len(bad)
            pfn_valid = pfns[:valid]
            idx_valid = None
            gmfn_valid = gmfns[:valid] if gmfns is not None else None
        else:
            keep = np.ones(entries, dtype=bool)
            keep[bad] = False
            idx_valid = np.flatnonzero(keep).astype(np.uint64)
            pfn_valid = pfns[keep]
            gmfn_valid = gmfns[keep] if gmfns is not None else None

        # Runs of consecutive pfns are always ascending; the table is sorted iff every
        # step between runs goes up.  (pfns < max_pfn, so "+1" never wraps.)
        key_breaks = step_breaks(pfn_valid)
        is_sorted = bool(np.all(pfn_valid[key_breaks + 1] > pfn_valid[key_breaks]))
        duplicates = 0
        if not is_sorted:
            if idx_valid is None:
                idx_valid = np.arange(len(pfn_valid), dtype=np.uint64)
            order = np.argsort(pfn_valid, kind="stable")
            pfn_valid, idx_valid = pfn_valid[order], idx_valid[order]
            if gmfn_valid is not None:
                gmfn_valid = gmfn_valid[order]
            first = np.concatenate(([True], pfn_valid[1:] != pfn_valid[:-1]))
            duplicates = int(len(first) - np.count_nonzero(first))
            if duplicates:
                pfn_valid, idx_valid = pfn_valid[first], idx_valid[first]
                if gmfn_valid is not None:
                    gmfn_valid = gmfn_valid[first]
                self.warnings.append(
                    f"{duplicates} pfns appear more than once in the table; "
                    "the first page stored for each is used"
                )
            else:
                self.warnings.append("the page table is not sorted by pfn; sorted it in memory")
            key_breaks = None

        self.pfn_runs = Runs.from_sorted(pfn_valid, idx_valid, key_breaks)
        del idx_valid
        # The machine frame of every stored page, by page index (PV only).
        self._gmfn_by_index: np.ndarray | None = gmfns
        self._gmfn_valid = gmfn_valid
        self._pfn_valid_for_m2p = (
            np.ascontiguousarray(pfn_valid) if gmfn_valid is not None else None
        )
        self._m2p: Runs | None = None
        self.stats = TableStats(
            entries=entries,
            valid=len(pfn_valid),
            padding=padding,
            duplicates=duplicates,
            beyond_limit=beyond,
            sorted=is_sorted,
            runs=len(self.pfn_runs),
            lowest_pfn=int(pfn_valid[0]) if len(pfn_valid) else None,
            highest_pfn=int(pfn_valid[-1]) if len(pfn_valid) else None,
        )

    # -- pseudo-physical -------------------------------------------------------------------

    def page_index(self, pfn: int) -> int | None:
        """Index in ``.xen_pages`` of the page holding ``pfn``, or None."""
        return self.pfn_runs.lookup(pfn)

    # -- machine frames (PV) ---------------------------------------------------------------

    @property
    def has_machine_frames(self) -> bool:
        return self._gmfn_by_index is not None

    def pfn_to_mfn(self, pfn: int) -> int | None:
        if self._gmfn_by_index is None:
            return None
        index = self.page_index(pfn)
        if index is None:
            return None
        return int(self._gmfn_by_index[index])

    def mfn_to_pfn(self, mfn: int) -> int | None:
        return self.m2p_runs.lookup(mfn) if self._gmfn_by_index is not None else None

    @property
    def m2p_runs(self) -> Runs:
        """Machine frame -> pfn runs, built on first use (HVM never needs them)."""
        if self._m2p is None:
            self._m2p = self._build_m2p()
        return self._m2p

    def _build_m2p(self) -> Runs:
        gmfns, pfns = self._gmfn_valid, self._pfn_valid_for_m2p
        if gmfns is None or pfns is None:
            return Runs(array("Q"), array("Q"), array("Q"))
        order = np.argsort(gmfns, kind="stable")
        gmfns, pfns = gmfns[order], pfns[order]
        first = np.concatenate(([True], gmfns[1:] != gmfns[:-1]))
        shared = int(len(first) - np.count_nonzero(first))
        if shared:
            # Two pfns backed by one machine frame: the reverse map is ambiguous, and a
            # page-table walk through such a frame could land in either.  Keep the lowest
            # pfn, and say so.
            self.warnings.append(
                f"{shared} machine frames are listed for more than one pfn; "
                "machine-to-pfn uses the lowest pfn"
            )
            gmfns, pfns = gmfns[first], pfns[first]
        # Free the construction arrays: the runs are all we need from now on.
        self._gmfn_valid = self._pfn_valid_for_m2p = None
        return Runs.from_sorted(gmfns, pfns)

    def nbytes(self) -> int:
        """Memory held by the maps (for the benchmark's memory column)."""
        total = self.pfn_runs.nbytes()
        for extra in (self._gmfn_by_index, self._gmfn_valid, self._pfn_valid_for_m2p):
            if extra is not None and extra.base is None:  # views cost nothing extra
                total += extra.nbytes
        if self._m2p is not None:
            total += self._m2p.nbytes()
        return total
