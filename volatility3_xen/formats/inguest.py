"""An image taken inside a 64-bit Xen PV guest (LiME, AVML, raw) as a ``GuestMemoryImage``.

The image is pseudo-physical already (byte offset = pseudo-physical address in the layer
it comes from), so ``page_runs()`` is the identity over the pfns it holds; what it lacks is
the machine-frame map the PV page walk needs, which ``p2mrecovery`` rebuilds from the
guest's own memory.  ``machine_frames`` is that map as a ``pagemap.PageMap`` — the same
pfn <-> mfn interface a PV dump-core's ``.xen_p2m`` gives — so one PV translation path
serves both sources.

No Volatility import.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .image import GUEST_PV, GuestMemoryImage, MachineFrameMap
from .p2mrecovery import MFN_LIMIT, PAGE_SHIFT, PAGE_SIZE, KernelLayout, Recovery
from .pagemap import PageMap, Runs, uint64_array

FORMAT_NAME = "in-guest image of a Xen PV guest"


def present_runs(ranges: Iterable[tuple[int, int]]) -> Runs:
    """Runs of the whole pages inside byte ranges ``(start, length)`` (sorted, disjoint):
    ``pfn -> pfn`` (count in pages)."""
    keys, counts = [], []
    for start, length in ranges:
        first = -(-start // PAGE_SIZE)
        end = (start + length) // PAGE_SIZE
        if end <= first:
            continue
        if keys and keys[-1] + counts[-1] == first:
            counts[-1] += end - first
        else:
            keys.append(first)
            counts.append(end - first)
    column = uint64_array(np.array(keys, dtype=np.uint64))
    return Runs(column, column, uint64_array(np.array(counts, dtype=np.uint64)))


class InGuestPVImage(GuestMemoryImage):
    """A PV guest's pseudo-physical memory plus the machine-frame map recovered from it.

    Args:
        name: what messages are about (a path or a layer name).
        present: ``present_runs`` of the pfns the image holds.
        recovery: what ``p2mrecovery.recover_machine_frames`` found.
        layout: the kernel parameters the recovery used.
        container: what holds the pages (``raw``, ``LiME``, ...), for ``xen.info``.
    """

    page_shift = PAGE_SHIFT
    page_size = PAGE_SIZE

    def __init__(
        self,
        name: str,
        present: Runs,
        recovery: Recovery,
        layout: KernelLayout,
        container: str = "raw",
    ) -> None:
        self.name = name
        self.present = present
        self.recovery = recovery
        self.layout = layout
        self.container = container
        self._frames = PageMap(recovery.pfns, recovery.mfns, MFN_LIMIT)
        self.warnings = list(recovery.warnings)
        unmapped = self.unmapped_pages
        if unmapped:
            self.warnings.append(
                f"{unmapped} of the image's {self.present_pages} pages have no machine frame "
                "(ballooned, lost or in conflict): page tables cannot reach them"
            )

    @property
    def format_name(self) -> str:
        return FORMAT_NAME

    @property
    def guest_type(self) -> str:
        return GUEST_PV

    def page_runs(self) -> Runs:
        keys = np.frombuffer(self.present.key, dtype=np.uint64)
        offsets = uint64_array(keys << np.uint64(PAGE_SHIFT))
        return Runs(self.present.key, offsets, self.present.count)

    @property
    def machine_frames(self) -> MachineFrameMap:
        return self._frames

    @property
    def present_pages(self) -> int:
        return int(sum(self.present.count))

    @property
    def mapped_present_pages(self) -> int:
        """Recovered pfns that the image holds."""
        pfns = self.recovery.pfns
        total = 0
        for key, count in zip(self.present.key, self.present.count):
            lo, hi = np.searchsorted(pfns, [key, key + count])
            total += int(hi - lo)
        return total

    @property
    def unmapped_pages(self) -> int:
        return self.present_pages - self.mapped_present_pages
