"""The model every Xen memory source gives the layers: ``GuestMemoryImage``.

A dump-core (``dumpcore.XenDumpCore``), a saved-domain stream and an image taken inside a
PV guest (with its recovered machine-frame map) differ in how they store pages, but the
layers, stackers, plugins and the script API need the same few things from each:

- where each guest page (pfn) lies in the file: ``page_runs()``, sorted runs of
  ``pfn -> file byte offset`` (``count`` in pages);
- whether the guest's page tables hold machine frames, and if so the pfn <-> mfn map
  (``machine_frames``).  A PV dump-core and an in-guest PV image do; a PV *save* image
  does not (the save code rewrites page tables to pfns), nor does any HVM/PVH guest;
- the vCPU contexts (``vcpus()``) and the facts ``xen.info`` prints (``report``).

Nothing here imports Volatility.
"""

from __future__ import annotations

import abc
from typing import Protocol

from .pagemap import Runs

# Guest types, as ``xen.info`` prints them.
GUEST_PV = "PV"
GUEST_HVM = "HVM"
GUEST_PVH = "PVH"
GUEST_HVM_OR_PVH = "HVM/PVH"  # a dump-core cannot tell them apart
GUEST_ARM = "ARM"


class MachineFrameMap(Protocol):
    """pfn <-> machine frame (mfn) of a guest whose page tables hold machine frames."""

    warnings: list[str]

    def pfn_to_mfn(self, pfn: int) -> int | None: ...

    def mfn_to_pfn(self, mfn: int) -> int | None: ...

    @property
    def m2p_runs(self) -> Runs:
        """Sorted runs ``mfn -> pfn`` (what the PV page walk bisects)."""
        ...


class GuestMemoryImage(abc.ABC):
    """A guest's pseudo-physical memory as stored in one file, plus what the file says."""

    #: Used in messages (a path or a layer name).
    name: str
    #: Problems that still allow a correct (possibly partial) view, one line each.
    warnings: list[str]
    page_shift: int
    page_size: int

    @property
    @abc.abstractmethod
    def format_name(self) -> str:
        """What the file is, for messages (``Xen dump-core``, ``Xen save image``)."""

    @property
    @abc.abstractmethod
    def guest_type(self) -> str:
        """One of the ``GUEST_*`` strings."""

    @property
    def is_pv(self) -> bool:
        return self.guest_type == GUEST_PV

    @abc.abstractmethod
    def page_runs(self) -> Runs:
        """Sorted runs ``pfn -> file byte offset of that page`` (``count`` in pages)."""

    @property
    def machine_frames(self) -> MachineFrameMap | None:
        """The pfn <-> mfn map when the guest's page tables hold machine frames, else None."""
        return None

    def vcpus(self) -> list:
        """Decoded vCPU contexts (``vcpu.VcpuContext``), in file order."""
        return []

    # -- machine frames, through ``machine_frames`` (identity where there are none) -------

    def pfn_to_mfn(self, pfn: int) -> int | None:
        frames = self.machine_frames
        if frames is None:
            return pfn if self.has_pfn(pfn) else None
        return frames.pfn_to_mfn(pfn)

    def mfn_to_pfn(self, mfn: int) -> int | None:
        frames = self.machine_frames
        if frames is None:
            return mfn if self.has_pfn(mfn) else None
        return frames.mfn_to_pfn(mfn)

    def has_pfn(self, pfn: int) -> bool:
        return self.page_runs().find(pfn) >= 0

    def machine_to_physical(self, address: int) -> int | None:
        """A machine address as the guest's pseudo-physical address, or None."""
        pfn = self.mfn_to_pfn(address >> self.page_shift)
        if pfn is None:
            return None
        return (pfn << self.page_shift) | (address & (self.page_size - 1))

    def physical_to_machine(self, address: int) -> int | None:
        """A pseudo-physical address as the machine address backing it, or None."""
        mfn = self.pfn_to_mfn(address >> self.page_shift)
        if mfn is None:
            return None
        return (mfn << self.page_shift) | (address & (self.page_size - 1))
