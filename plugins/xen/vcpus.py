"""The vCPU registers stored in a Xen dump-core or save image, one row per context.

Dump-cores (``.xen_prstatus``): ``FileSlot`` k is the k-th context in the file, not
necessarily vCPU id k: Xen stores only initialised vCPUs, packed.  Save images: ``VCPU``
is the vCPU id the record names; PV images hold the same ``vcpu_guest_context`` (same
columns), HVM images a ``struct hvm_hw_cpu`` per online vCPU, which has more registers
than a dump-core: EFER, every segment's base/limit/attributes (TR and LDTR too),
GDTR/IDTR, SYSENTER_CS/ESP/EIP, STAR/LSTAR/CSTAR/SFMASK, the inactive GS base
(``SHADOW_GS``), TSC_AUX, the guest TSC and the pending event.

``DTB(M)``/``DTB(P)`` are the kernel's top-level page table as a machine address (PV
dump-cores only) and as a guest pseudo-physical address (what an OS layer needs):
HVM/PVH the masked CR3 (HVM save records: masked for the paging mode they state), PV
dump-cores the CR3 machine frame translated through the core's p2m table, PV save images
the CR3 as saved (the save code already made it a pfn), ARM the kernel TTBR base.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from volatility3.framework import interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

# Makes volatility3_xen importable from a source checkout (``vol -p plugins``).
from volatility3.plugins.xen import stackers  # noqa: F401

from volatility3_xen import api, report
from volatility3_xen.formats.errors import XenFormatError
from volatility3_xen.formats.image import GuestMemoryImage
from volatility3_xen.layers.magic import XenCoreRequirement

vollog = logging.getLogger(__name__)

_COLUMN_TYPES: dict[str, type] = {
    report.KIND_INT: int,
    report.KIND_HEX: format_hints.Hex,
    report.KIND_BOOL: bool,
    report.KIND_STR: str,
}


class Vcpus(interfaces.plugins.PluginInterface):
    """Lists the vCPU registers of a Xen dump-core or save image and the decoded
    page-table base.

    Without --all: IP, SP, flags, segment selectors, control registers, fs/gs bases (x86;
    HVM save records add EFER and SHADOW_GS) or PC, SP, CPSR, SP_EL0/1, ELR_EL1, SCTLR,
    TTBR0/1, TTBCR (ARM).  FileSlot k (dump-cores) is the k-th stored context, not
    necessarily vCPU k; VCPU (save images) is the vCPU id.  --all adds general, debug and
    segment-table registers, callbacks (PV) or segment bases/limits/attributes,
    GDTR/IDTR, SYSENTER/SYSCALL MSRs, TSC and the pending event (HVM save records).
    """

    _required_framework_version = (2, 26, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            XenCoreRequirement(name="primary"),
            requirements.BooleanRequirement(
                name="all",
                description="Also show general, debug and segment-table registers, callbacks",
                default=False,
                optional=True,
            ),
        ]

    def run(self) -> renderers.TreeGrid:
        layer = api.find_xen_layer(self.context, self.config["primary"])
        if layer is None:  # XenCoreRequirement guarantees one; a hand-made config may not
            vollog.error(f"{self.config['primary']} is not a Xen guest layer")
            table = report.VcpuTable(None, (report.Column(report.COLUMN_SLOT, "int"),), ())
        else:
            table = self._table(layer.image)
        columns = [(column.name, _COLUMN_TYPES[column.kind]) for column in table.columns]
        return renderers.TreeGrid(columns, self._generator(table))

    def _table(self, image: GuestMemoryImage) -> report.VcpuTable:
        try:
            table = report.vcpu_table(image, all_registers=bool(self.config.get("all")))
        except (XenFormatError, ValueError) as exc:
            vollog.error(f"{image.name}: vCPU contexts cannot be decoded: {exc}")
            return report.VcpuTable(None, (report.Column(report.COLUMN_SLOT, "int"),), ())
        if not table.rows:
            area = getattr(image, "vcpu_area", None)  # a dump-core's .xen_prstatus slots
            if area is not None and area.count:
                vollog.warning(
                    f"{image.name}: {area.count} vCPU slot(s) of {area.entsize} bytes, in no "
                    "layout known for this machine: not decoded (xen.info lists them)"
                )
            else:
                vollog.warning(f"{image.name}: the file holds no decodable vCPU context")
        return table

    @staticmethod
    def _generator(table: report.VcpuTable) -> Iterator[tuple[int, tuple[Any, ...]]]:
        kinds = [column.kind for column in table.columns]
        for row in table.rows:
            yield 0, tuple(_cell(kind, value) for kind, value in zip(kinds, row))


def _cell(kind: str, value: report.Cell) -> Any:
    if value is report.Absent.NOT_APPLICABLE:
        return renderers.NotApplicableValue()
    if value is report.Absent.NOT_FOUND:
        return renderers.UnreadableValue()
    if kind == report.KIND_HEX:
        return format_hints.Hex(value)
    return value
