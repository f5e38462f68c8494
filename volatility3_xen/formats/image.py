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
import mmap
import os
from typing import BinaryIO, Callable, Protocol, TypeVar, Union

from .pagemap import Runs

#: ``map_region(offset, length)`` -> a read-only buffer over those bytes of the file.
Buffer = Union[bytes, memoryview]
RegionMapper = Callable[[int, int], Buffer]


def file_region_mapper(path: str | os.PathLike[str]) -> RegionMapper:
    """Maps regions of a local file with ``mmap`` (the mapping lives as long as the
    returned buffer or any numpy view of it).  Only the region is mapped, so address
    space stays bounded by the table, as memory would be with a read."""

    def map_region(offset: int, length: int) -> memoryview:
        with open(path, "rb") as handle:
            return mmap_file_region(handle.fileno(), offset, length)

    return map_region


def mmap_file_region(fileno: int, offset: int, length: int) -> memoryview:
    """``length`` bytes at ``offset`` of the open file ``fileno``, mapped read-only (the
    mapping holds its own descriptor).  Raises ValueError when the region runs past the
    end of the file, OSError when the file cannot be mapped."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(fileno, length + offset - start, access=mmap.ACCESS_READ, offset=start)
    return memoryview(mapped)[offset - start :]


_Image = TypeVar("_Image", bound="FileImage")

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


class FileImage(GuestMemoryImage):
    """A source parsed straight from one file (a dump-core, a save image), so it can be
    opened from a path; an in-guest image needs its kernel's symbols as well, and is not.
    """

    def __init__(
        self,
        read: Callable[[int, int], bytes],
        file_size: int,
        name: str = "image",
        map_region: RegionMapper | None = None,
    ) -> None:
        """Parse from ``read(offset, length)`` over a file of ``file_size`` bytes (short
        reads at the end are fine); ``map_region`` maps file regions where that is cheaper."""
        raise NotImplementedError

    @classmethod
    def open(cls: type[_Image], path: str | os.PathLike[str]) -> _Image:
        """Parse from a path (the file stays open while the object lives)."""
        handle: BinaryIO = open(path, "rb")  # noqa: SIM115 - owned by the reader closure
        size = os.fstat(handle.fileno()).st_size

        def read(offset: int, length: int) -> bytes:
            # Bounded by the file: a file object allocates the full request up front.
            length = min(length, size - offset)
            if length <= 0:
                return b""
            handle.seek(offset)
            return handle.read(length)

        return cls(read, size, name=os.fspath(path), map_region=file_region_mapper(path))
