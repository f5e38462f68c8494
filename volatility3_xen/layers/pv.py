"""Linux on Xen PV: Intel page walks through page tables that hold machine frames.

In a paravirtualised guest every present page-table entry holds a *machine* frame number
(mfn), while everything else the kernel calls physical (``__pa``, struct page pfns, the
symbol DTB ``init_top_pgt``) is pseudo-physical.  The layers here keep ``memory_layer`` the
pseudo-physical ``XenGuestLayer`` and ``page_map_offset`` pseudo-physical in the config,
and translate inside the walk instead:

- the top-level table's pfn is turned into its mfn once (``__init__``);
- every table base read from an entry is a machine address, turned back into a pfn before
  the table is read (``_get_valid_table``);
- every final frame is a machine frame, turned into a pfn per 4 KiB page
  (``_translate``): a 2 MiB page is machine-contiguous but not necessarily pfn-contiguous.

Frames the guest does not own (Xen's private L4 slots 256-271, grant and foreign frames) are
invalid, never misread.  Because no config key changes, ``build_configuration()``, ``-c``
replays and process layers (``add_process_layer`` instantiates ``parent_layer.__class__``)
work unchanged.

``XenPVLinuxIntelStacker`` (order 33) puts such a layer on a PV core by reusing Volatility's
own Linux stackers and converting their result; ``XenVcpuWindowsStacker`` (order 39) tries
the vCPUs' CR3 as the DTB of a Windows HVM guest.
"""

from __future__ import annotations

import functools
import logging
from bisect import bisect_right
from typing import Any, NamedTuple

from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.automagic import linux as linux_automagic
from volatility3.framework.layers import intel

from ..formats import vcpu as xen_vcpu
from .memory import XenGuestLayer, XenRefusedLayer, find_xen_layer, refuse

vollog = logging.getLogger(__name__)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
_PAGE_OFFSET_MASK = PAGE_SIZE - 1
_path_join = interfaces.configuration.path_join


class XenPVMixin(intel.Intel):
    """Walks page tables whose entries hold machine frames of a Xen PV guest.

    ``memory_layer`` must resolve (through its dependencies) to a ``XenGuestLayer`` with a
    machine-frame map (a PV dump-core, an in-guest PV image) whose addresses it shares;
    ``page_map_offset`` is pseudo-physical.
    """

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        name: str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(context=context, config_path=config_path, name=name, metadata=metadata)
        xen_layer = find_xen_layer(context, self._base_layer)
        frames = xen_layer.machine_frames if xen_layer is not None else None
        if frames is None:
            raise exceptions.LayerException(
                name, f"{self._base_layer} does not rest on a Xen layer with machine frames"
            )
        if xen_layer.page_size != PAGE_SIZE:
            # The p2m runs count the core's pages; the walk counts 4 KiB frames.
            raise exceptions.LayerException(name, _page_size_problem(xen_layer.page_size))
        # The machine-to-pfn runs, bound once: the hot path is one bisect on them.
        runs = frames.m2p_runs
        self._m2p_mfn, self._m2p_pfn, self._m2p_count = runs.key, runs.value, runs.count
        top_mfn = xen_layer.pfn_to_mfn(self._page_map_offset >> PAGE_SHIFT)
        if top_mfn is None:
            # Not a guest page: entry 0 is "not present", so every translation faults.
            vollog.debug(f"{name}: page_map_offset {self._page_map_offset:#x} is not a guest page")
            self._initial_entry = 0
        else:
            # Keep the low bits: a PAE PDPT need only be 32-byte aligned.  Mask with
            # MAXPHYADDR rather than the register width: a 32-bit PV guest's top table may
            # sit above 4 GiB in machine memory (hence Xen's rotated compat cr3).
            machine = (top_mfn << PAGE_SHIFT) | (self._page_map_offset & _PAGE_OFFSET_MASK)
            self._initial_entry = self._mask(machine, self._maxphyaddr - 1, 0) | 0x1

    def machine_frame_to_pfn(self, mfn: int) -> int | None:
        """The guest pfn backing machine frame ``mfn``, or None if the guest does not own it."""
        i = bisect_right(self._m2p_mfn, mfn) - 1
        if i >= 0 and mfn - self._m2p_mfn[i] < self._m2p_count[i]:
            return self._m2p_pfn[i] + mfn - self._m2p_mfn[i]
        return None

    @functools.lru_cache(maxsize=1025)  # noqa: B019 - like intel.Intel._get_valid_table
    def _get_valid_table(self, base_address: int) -> bytes | None:
        """The table at machine address ``base_address``, read through its pfn; None when
        the guest does not own the frame or the table is one repeated entry (Intel's rule)."""
        pfn = self.machine_frame_to_pfn(base_address >> PAGE_SHIFT)
        if pfn is None:
            return None
        try:
            table = self._context.layers.read(self._base_layer, pfn << PAGE_SHIFT, PAGE_SIZE)
        except exceptions.InvalidAddressException:
            return None
        if table == table[: self._entry_size] * self._entry_number:
            return None
        within = base_address & _PAGE_OFFSET_MASK
        return table[within:] if within else table

    def _translate(self, offset: int) -> tuple[int, int, str]:
        page, size = self._translate_page(offset & self.page_mask)
        return page | (offset & _PAGE_OFFSET_MASK), size, self._base_layer

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - per layer and page, like _translate_entry
    def _translate_page(self, page_address: int) -> tuple[int, int]:
        """(pseudo-physical address of the 4 KiB page at ``page_address``, size of the
        aligned pfn-contiguous block around it that ``_mapping`` may treat as one chunk)."""
        entry, position = self._translate_entry(page_address)
        if not self._page_is_valid(entry):
            raise exceptions.PagedInvalidAddressException(
                self.name,
                page_address,
                position + 1,
                entry,
                f"Page Fault at entry {entry:#x} in page entry",
            )
        frame = self._pte_pfn(entry)
        large = position >= PAGE_SHIFT
        if large:
            frame += (page_address & ((1 << (position + 1)) - 1)) >> PAGE_SHIFT
        if not entry & self._PAGE_PRESENT:
            # Linux PROT_NONE: Xen PV converts frames only in present entries
            # (pte_pfn_to_mfn), so this one still holds a pfn.
            return frame << PAGE_SHIFT, PAGE_SIZE
        mfns = self._m2p_mfn
        i = bisect_right(mfns, frame) - 1
        delta = frame - mfns[i] if i >= 0 else -1
        if delta < 0 or delta >= self._m2p_count[i]:
            raise exceptions.PagedInvalidAddressException(
                self.name,
                page_address,
                PAGE_SHIFT,
                entry,
                f"machine frame {frame:#x} is not owned by the guest",
            )
        pfn = self._m2p_pfn[i] + delta
        if not large:
            return pfn << PAGE_SHIFT, PAGE_SIZE
        # Largest aligned block inside the large page whose frames stay in this m2p run,
        # i.e. are pfn-contiguous too; a shuffled 2 MiB page degrades to 4 KiB chunks.
        run_start, run_end = mfns[i], mfns[i] + self._m2p_count[i]
        frames = 1 << (position + 1 - PAGE_SHIFT)
        while frames > 1:
            start = frame & ~(frames - 1)
            if start >= run_start and start + frames <= run_end:
                break
            frames >>= 1
        return pfn << PAGE_SHIFT, frames << PAGE_SHIFT


def _page_size_problem(page_size: int) -> str:
    return (
        f"Xen PV: the core's page size is {page_size} bytes, not {PAGE_SIZE}: machine frames "
        f"in its page tables cannot be translated (x86 PV guests use 4 KiB pages)"
    )


class XenPVLinuxIntel32e(XenPVMixin, intel.LinuxIntel32e):
    """4-level x86_64 Linux PV guest."""


class XenPVLinuxIntelPAE(XenPVMixin, intel.LinuxIntelPAE):
    """32-bit PAE Linux PV guest (32-on-64 or a 32-bit hypervisor)."""

    @functools.cached_property
    def _pte_pfn_mask(self) -> int:
        # LinuxMixin derives this from the 32-bit register width, which would cut PAE's
        # 64-bit entries at 4 GiB; PV machine frames live above 4 GiB routinely.
        return ((1 << self._maxphyaddr) - 1) & ~_PAGE_OFFSET_MASK

    def _protnone_mask(self, entry: int) -> int:
        return 0xFFFF_FFFF_FFFF_FFFF if self._pte_needs_invert(entry) else 0


# --- vCPU page-table roots ---------------------------------------------------------------


class VcpuRoot(NamedTuple):
    """The top-level page table a vCPU was running on."""

    slot: int
    machine_address: int
    physical_address: int | None  # pseudo-physical; None: the guest does not own the frame


def vcpu_page_table_roots(xen_layer: XenGuestLayer) -> list[VcpuRoot]:
    """Decode ``ctrlreg[3]`` of every online x86 vCPU of a PV guest whose page tables
    hold machine frames.

    64-bit PV: ``mfn << 12`` of the kernel L4; 32-bit PV: Xen's rotated compat encoding of
    the L3's mfn (undone by ``vcpu.VcpuContext.decoded_page_table_base``).  The table may be
    a process pgd: its kernel half equals the kernel DTB's.
    """
    if xen_layer.machine_frames is None:
        return []
    try:
        contexts = xen_layer.image.vcpus()
    except (ValueError, exceptions.InvalidAddressException) as exc:
        vollog.debug(f"{xen_layer.name}: vCPU contexts unreadable: {exc}")
        return []
    roots = []
    for context in contexts:
        if context.layout not in (xen_vcpu.LAYOUT_X86_64, xen_vcpu.LAYOUT_X86_32):
            continue
        if not context.online or not context.page_table_base_raw:
            continue
        _, machine = context.decoded_page_table_base(is_pv=True)
        roots.append(VcpuRoot(context.slot, machine, xen_layer.machine_to_physical(machine)))
    return roots


# --- the Linux PV stacker ----------------------------------------------------------------

# What Volatility's Linux stackers build -> the PV layer for it.  The VMCOREINFO route
# builds plain Intel classes; the guest is Linux all the same, so the Linux variants
# (PROT_NONE handling) are used.
_PV_CLASS_FOR: dict[type, type[XenPVMixin]] = {
    intel.LinuxIntel32e: XenPVLinuxIntel32e,
    intel.Intel32e: XenPVLinuxIntel32e,
    intel.LinuxIntelPAE: XenPVLinuxIntelPAE,
    intel.IntelPAE: XenPVLinuxIntelPAE,
}


class KernelProbe(NamedTuple):
    """Bytes that must appear at a kernel virtual address (the banner at linux_banner)."""

    address: int
    expected: bytes


def _reads_probe(layer: interfaces.layers.DataLayerInterface, probe: KernelProbe) -> bool:
    try:
        return layer.read(probe.address, len(probe.expected)) == probe.expected
    except exceptions.InvalidAddressException:
        return False


def _kernel_probe(
    context: interfaces.context.ContextInterface, layer: XenPVMixin, table_names: set[str]
) -> KernelProbe | None:
    """The banner at ``linux_banner`` + KASLR shift, from the symbol table a Linux stacker
    just loaded (``table_names``), or None when that cannot be had."""
    banner = layer.config.get("kernel_banner", None)
    if not banner:
        return None
    shift = layer.config.get("kernel_virtual_offset", 0) or 0
    for table_name in sorted(table_names):
        table = context.symbol_space[table_name]
        if "linux_banner" in table.symbols:
            address = table.get_symbol("linux_banner").address + shift
            return KernelProbe(address, banner.encode("latin-1"))
    return None


def layer_with_dtb(
    context: interfaces.context.ContextInterface, layer: XenPVMixin, dtb: int, purpose: str
) -> XenPVMixin:
    """A copy of ``layer`` on another top-level table (not added to ``context.layers``),
    configured the way ``add_process_layer`` configures process layers."""
    config = layer.build_configuration()
    config["memory_layer"] = layer.config["memory_layer"]
    config["page_map_offset"] = dtb
    name = context.layers.free_layer_name(f"{layer.name}_{purpose}")
    config_path = _path_join("temporary", "xen_pv", name)
    context.config.splice(config_path, config)
    return layer.__class__(context, config_path=config_path, name=name)


def cross_check_vcpu_roots(
    context: interfaces.context.ContextInterface,
    layer: XenPVMixin,
    probe: KernelProbe,
    roots: list[VcpuRoot],
) -> dict[int, bool]:
    """Does each vCPU's top-level table map ``probe.address`` where ``layer`` does?
    Logs agreement at debug level and disagreement as a warning; returns slot -> agreed."""
    expected = layer.translate(probe.address)[0]
    dtb = layer.config["page_map_offset"]
    verdicts = {}
    for root in roots:
        if root.physical_address is None:
            got = None
        else:
            probe_layer = layer_with_dtb(context, layer, root.physical_address, f"vcpu{root.slot}")
            try:
                got = probe_layer.translate(probe.address)[0]
            except exceptions.InvalidAddressException:
                got = None
        verdicts[root.slot] = got == expected
        where = f"vCPU {root.slot} cr3 (machine {root.machine_address:#x}"
        if root.physical_address is not None:
            where += f", pfn address {root.physical_address:#x}"
        where += ")"
        if got == expected:
            vollog.debug(f"Xen PV: {where} maps the kernel like DTB {dtb:#x}")
        else:
            vollog.warning(
                f"Xen PV: {where} does not map kernel address {probe.address:#x} like the "
                f"symbol DTB {dtb:#x} does "
                f"({'unmapped' if got is None else hex(got)} vs {expected:#x})"
            )
    return verdicts


class XenPVLinuxIntelStacker(interfaces.automagic.StackerLayerInterface):
    """Stacks a PV Intel layer on a Linux PV guest's ``XenGuestLayer`` (page tables of
    machine frames).

    Order 33: ahead of Volatility's VMCOREINFO (34) and banner (35) stackers, which would
    build a stock Intel layer that misreads machine frames.  Those stackers still do the
    work (banner, ISF, KASLR, DTB), in their own order; their layer is rebuilt as the PV
    class on the same config path and verified by reading the kernel banner through it.
    """

    stack_order = 33
    exclusion_list = ["mac", "windows"]

    @classmethod
    def stack(
        cls,
        context: interfaces.context.ContextInterface,
        layer_name: str,
        progress_callback: constants.ProgressCallback = None,
    ) -> interfaces.layers.DataLayerInterface | None:
        """The PV layer, verified if possible; a ``XenRefusedLayer`` when a kernel was
        found but cannot be walked here; None only when no Linux stacker finds a kernel
        (so neither will Volatility's own, which run next on the same layer).

        Never None after a Linux stacker built a layer: Volatility's stackers would then
        stack that stock Intel layer, which reads machine frames as pfns and gives empty
        or wrong results without a word.
        """
        xen_layer = context.layers[layer_name]
        if not isinstance(xen_layer, XenGuestLayer) or xen_layer.machine_frames is None:
            return None
        if xen_layer.page_size != PAGE_SIZE:
            return refuse(
                context, layer_name, xen_layer.source, _page_size_problem(xen_layer.page_size)
            )
        try:
            return cls._stack(context, xen_layer, progress_callback)
        except Exception as exc:  # noqa: BLE001 - never leave the layer to the stock stackers
            vollog.log(constants.LOGLEVEL_VVV, f"Xen PV stacker on {layer_name}", exc_info=True)
            reason = f"Xen PV: the kernel layer could not be built: {exc}"
            return refuse(context, layer_name, xen_layer.source, reason)

    @classmethod
    def _stack(
        cls,
        context: interfaces.context.ContextInterface,
        xen_layer: XenGuestLayer,
        progress_callback: constants.ProgressCallback,
    ) -> XenPVMixin | XenRefusedLayer | None:
        layer_name = xen_layer.name
        roots = vcpu_page_table_roots(xen_layer)
        routes = (linux_automagic.LinuxIntelVMCOREINFOStacker, linux_automagic.LinuxIntelStacker)
        unverified: tuple[XenPVMixin, str] | None = None
        unsupported: list[str] = []
        failed: list[str] = []
        for route in sorted(routes, key=lambda stacker: stacker.stack_order):
            tables_before = set(context.symbol_space)
            try:
                stock = route.stack(context, layer_name, progress_callback)
            except Exception as exc:  # Volatility's own stacker failed: try the next route
                vollog.log(constants.LOGLEVEL_VVV, f"{route.__name__} on {layer_name}: {exc}")
                continue
            if stock is None:
                continue
            pv_class = _PV_CLASS_FOR.get(type(stock))
            if pv_class is None:
                vollog.info(f"Xen PV: {route.__name__} built {type(stock).__name__}; unsupported")
                unsupported.append(f"{route.__name__} found a {type(stock).__name__} kernel")
                continue
            try:
                layer = pv_class(context, stock.config_path, stock.name, metadata={"os": "Linux"})
                probe = _kernel_probe(context, layer, set(context.symbol_space) - tables_before)
                verified = cls._verified(context, layer, probe, roots)
            except Exception as exc:  # noqa: BLE001 - the next route may do better
                vollog.log(constants.LOGLEVEL_VVV, f"Xen PV via {route.__name__}", exc_info=True)
                failed.append(f"{pv_class.__name__} via {route.__name__} failed: {exc}")
                continue
            if verified is not None:
                vollog.debug(f"Xen PV: {type(verified).__name__} stacked via {route.__name__}")
                return verified
            if unverified is None:
                unverified = layer, cls._unverified_reason(layer, probe, roots)
        if unverified is not None:
            layer, reason = unverified
            vollog.warning(
                f"Xen PV: {reason}; stacking {type(layer).__name__} unverified: results may be "
                f"incomplete"
            )
            return layer
        if unsupported:
            failed.append(
                f"{'; '.join(unsupported)}, which the PV walk does not support (4-level x86_64 "
                f"and 32-bit PAE only)"
            )
        if failed:
            return refuse(context, layer_name, xen_layer.source, f"Xen PV: {'; '.join(failed)}")
        return None

    @staticmethod
    def _unverified_reason(
        layer: XenPVMixin, probe: KernelProbe | None, roots: list[VcpuRoot]
    ) -> str:
        """What did not verify, in one line (``probe`` is never None here)."""
        dtb = layer.config["page_map_offset"]
        address = probe.address if probe is not None else 0
        tried = ", ".join(
            f"vCPU {root.slot}" for root in roots if root.physical_address is not None
        )
        return (
            f"the kernel banner at {address:#x} does not read through the symbol DTB {dtb:#x}"
            + (f" nor through the page table of {tried}" if tried else "")
        )

    @classmethod
    def _verified(
        cls,
        context: interfaces.context.ContextInterface,
        layer: XenPVMixin,
        probe: KernelProbe | None,
        roots: list[VcpuRoot],
    ) -> XenPVMixin | None:
        if probe is None:
            vollog.warning(
                f"Xen PV: no linux_banner symbol to verify {type(layer).__name__} with; stacked "
                f"unverified"
            )
            return layer
        if _reads_probe(layer, probe):
            cross_check_vcpu_roots(context, layer, probe, roots)
            return layer
        dtb = layer.config["page_map_offset"]
        vollog.debug(f"Xen PV: DTB {dtb:#x} does not map the kernel banner at {probe.address:#x}")
        # The vCPUs' tables map the kernel half too: use one if the symbol DTB is wrong.
        for root in roots:
            if root.physical_address is None:
                continue
            candidate = layer_with_dtb(context, layer, root.physical_address, "vcpu")
            if _reads_probe(candidate, probe):
                vollog.warning(
                    f"Xen PV: the symbol DTB {dtb:#x} does not map the kernel; using vCPU "
                    f"{root.slot}'s page table at {root.physical_address:#x}"
                )
                context.config[_path_join(layer.config_path, "page_map_offset")] = (
                    root.physical_address
                )
                return layer.__class__(
                    context, layer.config_path, layer.name, metadata={"os": "Linux"}
                )
        return None
