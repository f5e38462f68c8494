"""The page table of a dump-core (``.xen_pfn`` or ``.xen_p2m``) turned into run maps.

Everything here is bulk numpy work, O(table) with no Python object per page:

- ``PageMap`` maps a guest pseudo-physical frame (pfn) to the index of its page in
  ``.xen_pages``, as sorted runs ``(first pfn, first index, count)`` looked up by binary
  search;
- for PV guests it also keeps the machine frame (gmfn) of every entry and builds, on first
  use, the reverse machine-to-pseudo-physical runs;
- ``runs_from_pairs`` is the general builder: unsorted ``(key, value)`` pairs, duplicates
  resolved first-wins or last-wins, coalesced into ``Runs``.

Entries equal to ``~0`` are padding (libxc's ``XC_CORE_INVALID_PFN``) and map nothing;
pfn 0 is an ordinary page.  An unsorted table is sorted here (with a warning), duplicates
keep their first occurrence (with a warning): the result is always a function.  A machine
frame at or beyond the machine address limit (Linux's p2m flags ``FOREIGN_FRAME_BIT``, bit
63, and ``IDENTITY_FRAME_BIT``, bit 62, on a 64-bit guest, put it there too) is no frame of
the guest: its pfn keeps its page but has no machine frame (with a warning).

Cost: unsorted keys are sorted as one ``uint64`` array packing ``key << b | position`` (an
in-place sort, no index permutation), deduplicated and coalesced in place in chunks; the
run columns are written straight into their ``array('Q')`` storage.  A fully fragmented
map therefore peaks at about its three run columns.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

INVALID = np.uint64(0xFFFFFFFFFFFFFFFF)
# Linux's p2m entry flags (arch/x86/include/asm/xen/page.h, 64-bit BITS_PER_LONG).
FOREIGN_FRAME_BIT = 1 << 63
IDENTITY_FRAME_BIT = 1 << 62

Keep = Literal["first", "last"]


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
        positions ``i`` where ``keys[i + 1] != keys[i] + 1``.  When breaks are few (a
        libxc table has a handful) the runs are cut at them directly; otherwise chunked
        passes find them again without holding them.
        """
        if len(keys) == 0:
            return cls(array("Q"), array("Q"), array("Q"))
        limit = _break_limit(len(keys))
        if key_breaks is None:
            key_breaks = _breaks(keys, limit)
        if key_breaks is not None and values is not None:
            value_breaks = _breaks(values, limit)
            key_breaks = None if value_breaks is None else np.union1d(key_breaks, value_breaks)
        if key_breaks is not None and len(key_breaks) <= limit:
            return _runs_at(keys, values, key_breaks)

        def continues(start: int, stop: int) -> np.ndarray:
            flags = _steps_equal(keys, start, stop, 1)
            if values is not None:
                flags &= _steps_equal(values, start, stop, 1)
            return flags

        def value_of(starts: np.ndarray) -> np.ndarray:
            return starts.astype(np.uint64) if values is None else values[starts]

        return _coalesce(len(keys), continues, lambda starts: keys[starts], value_of)

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


def _chunks(length: int):
    for start in range(0, length, CHUNK_ENTRIES):
        yield start, min(start + CHUNK_ENTRIES, length)


def _steps_equal(values: np.ndarray, start: int, stop: int, step: int) -> np.ndarray:
    """``flags[i - start]``: ``values[i] - values[i - 1] == step`` for ``start <= i <
    stop`` (False at ``i == 0``; uint64 wrap-around makes a step down unequal)."""
    flags = np.zeros(stop - start, dtype=bool)
    lo = max(start, 1)
    if lo < stop:
        difference = values[lo:stop] - values[lo - 1 : stop - 1]
        np.equal(difference, np.uint64(step), out=flags[lo - start :])
    return flags


def _break_limit(length: int) -> int:
    """Most break positions held at once (an eighth of the table's size in memory)."""
    return max(1 << 16, length // 64)


def _breaks(values: np.ndarray, limit: int | None = None, step: int = 1) -> np.ndarray | None:
    """Positions ``i`` where ``values[i + 1] != values[i] + step``, or None as soon as
    there are more than ``limit`` (the caller then goes the chunked way)."""
    found, total = [], 0
    for start, stop in _chunks(len(values)):
        hits = np.flatnonzero(~_steps_equal(values, start, stop, step)[(start == 0) :])
        if len(hits):
            total += len(hits)
            if limit is not None and total > limit:
                return None
            found.append(hits + max(start, 1) - 1)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.intp)


def step_breaks(values: np.ndarray) -> np.ndarray:
    """Positions ``i`` where ``values[i + 1] != values[i] + 1`` (uint64 wrap-around makes a
    step down a break too)."""
    found = _breaks(values)
    assert found is not None
    return found


def _zeros_q(length: int) -> tuple[array, np.ndarray]:
    """A zeroed ``array('Q')`` and a writable numpy view of it (no intermediate copy)."""
    column = array("Q", [0]) * length if length else array("Q")
    view = np.frombuffer(column, dtype=np.uint64) if length else np.zeros(0, np.uint64)
    return column, view


def _coalesce(
    length: int,
    continues: Callable[[int, int], np.ndarray],
    key_of: Callable[[np.ndarray], np.ndarray],
    value_of: Callable[[np.ndarray], np.ndarray],
    key_column: array | None = None,
) -> Runs:
    """Runs over ``length`` sorted entries: entry ``i`` starts a run unless
    ``continues(start, stop)[i - start]``; a run's key and value are those of its first
    entry (``key_of``/``value_of`` of start positions).

    Chunked passes: count the runs, write values and start positions, then keys (into
    ``key_column``'s own storage when given: its entry ``i`` is read, through ``key_of``,
    before entry ``i`` is overwritten, as run ``r`` starts at a position ``>= r``), then
    turn start positions into counts in place.  A given ``key_column`` is returned as
    it is: the caller shrinks it to the run count once it holds no view of it.
    """
    total = sum(
        int(stop - start - np.count_nonzero(continues(start, stop)))
        for start, stop in _chunks(length)
    )
    count_column, counts = _zeros_q(total)
    written = 0
    for start, stop in _chunks(length):
        starts = np.flatnonzero(~continues(start, stop)) + start
        counts[written : written + len(starts)] = starts
        written += len(starts)
    return _fill_runs(count_column, length, key_of, value_of, key_column)


def _starts_at(breaks: np.ndarray) -> array:
    """Run start positions for runs cut after each position in ``breaks``."""
    count_column, counts = _zeros_q(len(breaks) + 1)
    np.add(breaks, 1, out=counts[1:], casting="unsafe")
    return count_column


def _runs_at(keys: np.ndarray, values: np.ndarray | None, breaks: np.ndarray) -> Runs:
    """Runs of sorted ``keys`` (and ``values``, None: the position) cut after each
    position in ``breaks`` (sorted, unique)."""

    def value_of(starts: np.ndarray) -> np.ndarray:
        return starts.astype(np.uint64) if values is None else values[starts]

    return _fill_runs(_starts_at(breaks), len(keys), lambda starts: keys[starts], value_of)


def _fill_runs(
    count_column: array,
    length: int,
    key_of: Callable[[np.ndarray], np.ndarray],
    value_of: Callable[[np.ndarray], np.ndarray],
    key_column: array | None = None,
) -> Runs:
    """Runs whose start positions (in ``length`` sorted entries) ``count_column`` holds:
    values, then keys (into ``key_column`` when given, see ``_coalesce``), then the start
    positions turned into counts in place; all in chunks."""
    total = len(count_column)
    counts = np.frombuffer(count_column, dtype=np.uint64) if total else np.zeros(0, np.uint64)
    value_column, values = _zeros_q(total)
    for start, stop in _chunks(total):
        values[start:stop] = value_of(counts[start:stop].astype(np.intp))
    if key_column is None:
        key_column, keys = _zeros_q(total)
    else:
        keys = np.frombuffer(key_column, dtype=np.uint64) if len(key_column) else values[:0]
    for start, stop in _chunks(total):
        keys[start:stop] = key_of(counts[start:stop].astype(np.intp))
    for start, stop in _chunks(total):
        following = counts[start + 1 : stop + 1]
        if stop == total:
            following = np.append(following, np.uint64(length))
        counts[start:stop] = following - counts[start:stop]
    return Runs(key_column, value_column, count_column)


def _bits(value: int) -> int:
    return max(int(value).bit_length(), 1)


def _maximum(values: np.ndarray) -> int:
    return max((int(values[a:b].max()) for a, b in _chunks(len(values))), default=0)


def _dedup_packed(packed: np.ndarray, shift: int, keep: Keep) -> int:
    """Drop, in place, entries of sorted ``packed`` whose key (``>> shift``) equals a
    neighbour's: the first of each key is kept (``keep='first'``) or the last.  Returns
    the new length."""
    length, written = len(packed), 0
    shift_ = np.uint64(shift)
    previous = None
    for start, stop in _chunks(length):
        chunk_keys = packed[start:stop] >> shift_
        if keep == "first":
            neighbour = np.empty_like(chunk_keys)
            neighbour[1:] = chunk_keys[:-1]
            if previous is not None:
                neighbour[0] = previous
            keep_flags = chunk_keys != neighbour
            if previous is None:
                keep_flags[0] = True
            previous = chunk_keys[-1]
        else:
            neighbour = np.empty_like(chunk_keys)
            neighbour[:-1] = chunk_keys[1:]
            if stop < length:
                neighbour[-1] = packed[stop] >> shift_
            keep_flags = chunk_keys != neighbour
            if stop == length:
                keep_flags[-1] = True
        if written == start and keep_flags.all():
            written = stop  # nothing dropped so far: the chunk is already in place
            continue
        kept = packed[start:stop][keep_flags]
        packed[written : written + len(kept)] = kept
        written += len(kept)
    return written


def _packed_runs(
    column: array,
    length: int,
    shift: int,
    keep: Keep,
    value_of: Callable[[np.ndarray], np.ndarray] | None = None,
    value_step: int = 1,
) -> tuple[Runs, int]:
    """Runs from ``column[:length]`` holding ``key << shift | low`` (``low < 2^shift - 1``,
    so that a difference of ``(1 << shift) + 1`` means key and low both advance by one):
    sorted and deduplicated in place, then coalesced with the keys written back into
    ``column``.
    Values are ``low`` unless ``value_of`` maps positions-in-low to values.  Returns the
    runs and the number of duplicates dropped."""
    packed = np.frombuffer(column, dtype=np.uint64)[:length] if length else np.zeros(0, np.uint64)
    packed.sort()
    kept = _dedup_packed(packed, shift, keep)
    packed = packed[:kept]
    shift_, low_mask = np.uint64(shift), np.uint64((1 << shift) - 1)

    def continues(start: int, stop: int) -> np.ndarray:
        if value_of is None:  # key and low both advance by one: one subtraction
            return _steps_equal(packed, start, stop, (1 << shift) + 1)
        lo = max(start - 1, 0)
        window = packed[lo:stop]
        keys = window >> shift_
        values = value_of((window & low_mask).astype(np.intp))
        flags = np.zeros(stop - start, dtype=bool)
        flags[(start == 0) :] = (keys[1:] - keys[:-1] == 1) & (
            values[1:] - values[:-1] == value_step
        )
        return flags

    def low_of(starts: np.ndarray) -> np.ndarray:
        low = packed[starts] & low_mask
        return low if value_of is None else value_of(low.astype(np.intp))

    def key_of(starts: np.ndarray) -> np.ndarray:
        return packed[starts] >> shift_

    breaks = None
    if value_of is None and kept:  # a map in a few long runs: cut at its breaks in one pass
        breaks = _breaks(packed, _break_limit(kept), (1 << shift) + 1)
    if breaks is not None:
        runs = _fill_runs(_starts_at(breaks), kept, key_of, low_of, key_column=column)
    else:
        runs = _coalesce(kept, continues, key_of, low_of, key_column=column)
    packed = breaks = None  # the last view of ``column``: it can shrink to the run count now
    del column[len(runs.value) :]
    return runs, length - kept


def runs_from_pairs(
    keys: np.ndarray,
    values: np.ndarray | None = None,
    keep: Keep = "first",
    value_step: int = 1,
) -> tuple[Runs, int]:
    """``Runs`` from unsorted ``(keys[i], values[i])`` pairs of non-negative integers;
    returns ``(runs, duplicates)``.

    A key given more than once maps to the value of its first pair (``keep='first'``) or of
    its last (``keep='last'``, e.g. a page sent twice in a migration stream).  ``values``
    None means value ``i`` is ``i``.  Runs coalesce where the key advances by one and the
    value by ``value_step``.

    Cost: keys and positions are packed into one ``uint64`` (when their bits fit, as they
    do for any real table) and sorted in place; otherwise a stable argsort.  Peak memory is
    about one packed array plus the three run columns.
    """
    keys = np.asarray(keys).astype(np.uint64, copy=False)
    if values is not None:
        values = np.asarray(values).astype(np.uint64, copy=False)
    length = len(keys)
    if values is not None and len(values) != length:
        raise ValueError("keys and values differ in length")
    if length == 0:
        return Runs(array("Q"), array("Q"), array("Q")), 0
    shift = _bits(length)  # positions <= length - 1 <= 2^shift - 2
    if _bits(_maximum(keys)) + shift <= 64:
        column, packed = _zeros_q(length)
        shift_ = np.uint64(shift)
        for start, stop in _chunks(length):
            np.left_shift(keys[start:stop], shift_, out=packed[start:stop])
            packed[start:stop] |= np.arange(start, stop, dtype=np.uint64)
        del packed
        if values is None and value_step == 1:
            return _packed_runs(column, length, shift, keep)
        if values is None:
            values = np.arange(length, dtype=np.uint64)
        return _packed_runs(column, length, shift, keep, values.__getitem__, value_step)
    # Keys too wide to pack beside a position: a stable argsort keeps file order.
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    last = np.ones(length, dtype=bool)
    last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    if keep == "first":
        chosen = np.ones(length, dtype=bool)
        chosen[1:] = last[:-1]
    else:
        chosen = last
    order = order[chosen]
    sorted_keys = sorted_keys[chosen]
    sorted_values = order.astype(np.uint64) if values is None else values[order]
    del order

    def continues(start: int, stop: int) -> np.ndarray:
        return _steps_equal(sorted_keys, start, stop, 1) & _steps_equal(
            sorted_values, start, stop, value_step
        )

    runs = _coalesce(
        len(sorted_keys), continues, lambda s: sorted_keys[s], lambda s: sorted_values[s]
    )
    return runs, length - len(sorted_keys)


def unusable_entries(pfns: np.ndarray, gmfns: np.ndarray | None, max_pfn: int) -> np.ndarray:
    """Positions of entries that map nothing: pfn beyond ``max_pfn`` (``~0`` padding is
    too) or, in a p2m table, a ``~0`` machine frame."""
    found = []
    limit = np.uint64(max_pfn)
    for start, stop in _chunks(len(pfns)):
        flags = pfns[start:stop] >= limit
        if gmfns is not None:
            flags |= gmfns[start:stop] == INVALID
        hits = np.flatnonzero(flags)
        if len(hits):
            found.append(hits + start)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.intp)


def uint64_array(values: np.ndarray) -> array:
    """A numpy vector as ``array('Q')`` (one bulk copy, no intermediate ``bytes``)."""
    result = array("Q")
    result.frombytes(memoryview(np.ascontiguousarray(values, dtype=np.uint64)).cast("B"))
    return result


def scaled_column(column: array, shift: int, base: int = 0) -> array:
    """``column << shift + base`` as a new ``array('Q')``: one copy, then in place (a
    hostile table can make every entry its own run, so no numpy temporaries).  With
    nothing to do the column itself is shared (the runs are never modified)."""
    if not shift and not base:
        return column
    result = array("Q", column)
    view = np.frombuffer(result, dtype=np.uint64)
    if shift:
        view <<= np.uint64(shift)
    if base:
        view += np.uint64(base)
    del view  # release the buffer export
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


def _strictly_increasing(values: np.ndarray) -> bool:
    for start, stop in _chunks(len(values)):
        lo = max(start, 1)
        if lo < stop and not np.all(values[lo:stop] > values[lo - 1 : stop - 1]):
            return False
    return True


class PageMap:
    """pfn -> page index (and, for PV, pfn <-> machine frame) for one dump-core.

    Args:
        pfns: the table's pfn column, in file order (entry i describes page i).
        gmfns: the machine frame column for ``.xen_p2m`` tables, else None.
        max_pfn: pfns at or above this are beyond the architecture's physical address
            limit and are dropped (they could only come from damage).
        max_mfn: machine frames at or above this (default ``max_pfn``) are no frames of
            the guest: their pfn keeps its page but has no machine frame.
    """

    def __init__(
        self,
        pfns: np.ndarray,
        gmfns: np.ndarray | None,
        max_pfn: int,
        max_mfn: int | None = None,
    ) -> None:
        self.warnings: list[str] = []
        entries = len(pfns)
        max_mfn = max_pfn if max_mfn is None else min(max_mfn, int(INVALID))
        # The machine frame of every stored page, by page index (PV only), in our own
        # copy (the raw table can be freed) with unusable frames set to the sentinel; the
        # same pass finds the ~0 frames.
        self._gmfn_by_index: np.ndarray | None = None
        self._mfn_sentinel = self._highest_mfn = 0
        no_frame = None
        if gmfns is not None:
            self._gmfn_by_index, no_frame = self._machine_frames(gmfns, max_mfn)
        # One pass finds every unusable entry (~0 padding is >= max_pfn too); only those,
        # usually a handful, are then told apart.
        bad = unusable_entries(pfns, None, max_pfn)
        if no_frame is not None and len(no_frame):
            bad = np.union1d(bad, no_frame)
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
            pfn_valid = pfns[: entries - len(bad)]
            idx_valid = None
        else:
            keep = np.ones(entries, dtype=bool)
            keep[bad] = False
            idx_valid = np.flatnonzero(keep).astype(np.uint64)
            pfn_valid = pfns[keep]
            del keep

        # Runs of consecutive pfns are always ascending: with few breaks, the table is
        # sorted iff every step between runs goes up (pfns < max_pfn: "+1" never wraps).
        breaks = _breaks(pfn_valid, _break_limit(len(pfn_valid)))
        if breaks is not None:
            is_sorted = bool(np.all(pfn_valid[breaks + 1] > pfn_valid[breaks]))
        else:
            is_sorted = _strictly_increasing(pfn_valid)
        duplicates = 0
        if is_sorted:
            self.pfn_runs = Runs.from_sorted(pfn_valid, idx_valid, breaks)
        else:
            self.pfn_runs, duplicates = runs_from_pairs(pfn_valid, idx_valid, keep="first")
            if duplicates:
                self.warnings.append(
                    f"{duplicates} pfns appear more than once in the table; "
                    "the first page stored for each is used"
                )
            else:
                self.warnings.append("the page table is not sorted by pfn; sorted it in memory")
        valid = len(pfn_valid) - duplicates
        del idx_valid, pfn_valid, breaks
        self._m2p: Runs | None = None
        runs = self.pfn_runs
        self.stats = TableStats(
            entries=entries,
            valid=valid,
            padding=padding,
            duplicates=duplicates,
            beyond_limit=beyond,
            sorted=is_sorted,
            runs=len(runs),
            lowest_pfn=runs.key[0] if len(runs) else None,
            highest_pfn=runs.key[-1] + runs.count[-1] - 1 if len(runs) else None,
        )

    def _machine_frames(self, gmfns: np.ndarray, max_mfn: int) -> tuple[np.ndarray, ...]:
        """(frames, positions of ``~0`` frames).  Frames: a copy of the gmfn column,
        ``uint32`` when every usable frame fits, with the frames that are no guest frame
        (flagged, beyond ``max_mfn``, ``~0``) replaced by ``self._mfn_sentinel``; warns
        about the flagged and out-of-range ones.  One pass (a second, in ``uint64``, only
        when a usable frame needs more than 32 bits)."""
        limit = np.uint64(max_mfn)
        for dtype in (np.uint32, np.uint64):
            sentinel = np.iinfo(dtype).max
            result = np.empty(len(gmfns), dtype=dtype)
            flagged = beyond = highest = 0
            no_frame = []
            for start, stop in _chunks(len(gmfns)):
                chunk = gmfns[start:stop]
                unusable = chunk >= limit
                if unusable.any():
                    at = np.flatnonzero(unusable)
                    odd = chunk[at]
                    invalid = odd == INVALID
                    no_frame.append(at[invalid] + start)
                    marked = (odd & np.uint64(FOREIGN_FRAME_BIT | IDENTITY_FRAME_BIT)) != 0
                    marked &= ~invalid
                    flagged += int(np.count_nonzero(marked))
                    beyond += len(odd) - int(np.count_nonzero(invalid | marked))
                    usable = chunk[~unusable]
                else:
                    usable = chunk
                if len(usable):
                    highest = max(highest, int(usable.max()))
                if highest >= sentinel:
                    break
                result[start:stop] = chunk
                if len(usable) < len(chunk):
                    result[start:stop][unusable] = sentinel
            else:
                break
        self._mfn_sentinel, self._highest_mfn = int(sentinel), highest
        if flagged:
            self.warnings.append(
                f"{flagged} table entries carry Linux's FOREIGN_FRAME_BIT (bit 63) or "
                "IDENTITY_FRAME_BIT (bit 62) in their machine frame: not frames of this "
                "guest; those pfns keep their pages but have no machine frame"
            )
        if beyond:
            self.warnings.append(
                f"{beyond} table entries name machine frames beyond the machine address "
                f"limit (mfn >= {max_mfn:#x}); those pfns keep their pages but have no "
                "machine frame"
            )
        return result, (np.concatenate(no_frame) if no_frame else np.zeros(0, np.intp))

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
        mfn = int(self._gmfn_by_index[index])
        return None if mfn == self._mfn_sentinel else mfn

    def mfn_to_pfn(self, mfn: int) -> int | None:
        return self.m2p_runs.lookup(mfn) if self._gmfn_by_index is not None else None

    @property
    def m2p_runs(self) -> Runs:
        """Machine frame -> pfn runs, built on first use (HVM never needs them)."""
        if self._m2p is None:
            self._m2p = self._build_m2p()
        return self._m2p

    def _mapped_frames(self):
        """(pfn, mfn) of every pfn in the map, in pfn order, a chunk at a time; entries
        without a usable machine frame are left out."""
        frames, runs = self._gmfn_by_index, self.pfn_runs
        assert frames is not None
        sentinel = frames.dtype.type(self._mfn_sentinel)

        def usable(pfn: np.ndarray, mfn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            keep = mfn != sentinel
            return pfn[keep], mfn[keep].astype(np.uint64)

        if len(runs) * 64 <= self.stats.valid:
            # Few runs (a libxc table is one): slices of the frame column, no gathers.
            for key, value, count in zip(runs.key, runs.value, runs.count):
                for start, stop in _chunks(count):
                    pfn = np.arange(key + start, key + stop, dtype=np.uint64)
                    yield usable(pfn, frames[value + start : value + stop])
            return
        keys, values, counts = (
            np.frombuffer(column, dtype=np.uint64) for column in (runs.key, runs.value, runs.count)
        )
        ends = np.cumsum(counts)
        for start, stop in _chunks(int(ends[-1])):
            positions = np.arange(start, stop, dtype=np.uint64)
            run = np.searchsorted(ends, positions, side="right")
            offset = positions - (ends[run] - counts[run])
            yield usable(keys[run] + offset, frames[(values[run] + offset).astype(np.intp)])

    def _build_m2p(self) -> Runs:
        if self._gmfn_by_index is None or not len(self.pfn_runs):
            return Runs(array("Q"), array("Q"), array("Q"))
        # pfn <= 2^shift - 2, so a step of (1 << shift) + 1 is only ever mfn+1 and pfn+1.
        shift = _bits((self.stats.highest_pfn or 0) + 1)
        packable = _bits(self._highest_mfn) + shift <= 64
        # (mfn << shift | pfn), pfn-ascending: among pfns sharing a frame the lowest sorts
        # first.  Written into array('Q') storage that becomes the runs' key column.
        column, packed = _zeros_q(self.stats.valid)
        pfn_list = []
        written = 0
        for pfn, mfn in self._mapped_frames():
            if packable:
                np.left_shift(mfn, np.uint64(shift), out=packed[written : written + len(mfn)])
                packed[written : written + len(mfn)] |= pfn
            else:
                packed[written : written + len(mfn)] = mfn
                pfn_list.append(pfn)
            written += len(mfn)
        del packed
        if packable:
            m2p, shared = _packed_runs(column, written, shift, "first")
        else:
            mfns = np.frombuffer(column, dtype=np.uint64)[:written].copy()
            del column
            pfns = np.concatenate(pfn_list) if pfn_list else mfns[:0]
            m2p, shared = runs_from_pairs(mfns, pfns, keep="first")
        if shared:
            # Two pfns backed by one machine frame: the reverse map is ambiguous, and a
            # page-table walk through such a frame could land in either.  Keep the lowest
            # pfn, and say so.
            self.warnings.append(
                f"{shared} machine frames are listed for more than one pfn; "
                "machine-to-pfn uses the lowest pfn"
            )
        return m2p

    def nbytes(self) -> int:
        """Memory held by the maps (for the benchmark's memory column)."""
        total = self.pfn_runs.nbytes()
        if self._gmfn_by_index is not None:
            total += self._gmfn_by_index.nbytes
        if self._m2p is not None:
            total += self._m2p.nbytes()
        return total
