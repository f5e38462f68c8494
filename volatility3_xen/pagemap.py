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
    def from_sorted(cls, keys: np.ndarray, values: np.ndarray) -> Runs:
        """Coalesce parallel arrays sorted by ``keys`` into runs where both advance by one."""
        if len(keys) == 0:
            return cls(array("Q"), array("Q"), array("Q"))
        keys = keys.astype(np.uint64, copy=False)
        values = values.astype(np.uint64, copy=False)
        breaks = np.flatnonzero((np.diff(keys) != 1) | (np.diff(values) != 1)) + 1
        starts = np.concatenate(([0], breaks))
        counts = np.diff(np.concatenate((starts, [len(keys)])))
        return cls(uint64_array(keys[starts]), uint64_array(values[starts]), uint64_array(counts))

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
        padding_mask = pfns == INVALID
        if gmfns is not None:
            # {~0, ~0} is padding; a lone ~0 in one column is damage, and dropped too.
            padding_mask |= gmfns == INVALID
        padding = int(np.count_nonzero(padding_mask))
        beyond_mask = pfns >= np.uint64(max_pfn)
        beyond_mask &= ~padding_mask
        beyond = int(np.count_nonzero(beyond_mask))
        if beyond:
            self.warnings.append(
                f"{beyond} table entries name pfns beyond the physical address limit "
                f"(pfn >= {max_pfn:#x}); they are ignored"
            )
        tail_only = bool(np.all(padding_mask[entries - padding :]))
        if padding and not tail_only:
            self.warnings.append(
                "padding entries (~0) found inside the table, not only at its end; they are skipped"
            )
        if gmfns is not None:
            # A contiguous copy, so that the raw 16-byte-per-entry table can be freed.
            gmfns = np.ascontiguousarray(gmfns)
        if tail_only and not beyond:
            # libxc's layout: every entry valid except ~0 padding at the end.  Slices, not
            # boolean gathers: no copy of the table and no index array to build.
            valid = entries - padding
            pfn_valid = pfns[:valid]
            idx_valid = np.arange(valid, dtype=np.uint64)
            gmfn_valid = gmfns[:valid] if gmfns is not None else None
        else:
            keep = ~(padding_mask | beyond_mask)
            idx_valid = np.flatnonzero(keep).astype(np.uint64)
            pfn_valid = pfns[keep]
            gmfn_valid = gmfns[keep] if gmfns is not None else None
        del padding_mask, beyond_mask

        is_sorted = bool(np.all(pfn_valid[1:] > pfn_valid[:-1]))
        duplicates = 0
        if not is_sorted:
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

        self.pfn_runs = Runs.from_sorted(pfn_valid, idx_valid)
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
