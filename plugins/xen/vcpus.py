"""The vCPU registers stored in a Xen dump-core (``.xen_prstatus``), one row per slot.

``FileSlot`` k is the k-th context in the file, not necessarily vCPU id k: Xen stores
only initialised vCPUs, packed.  ``DTB(M)``/``DTB(P)`` are the kernel's top-level page
table as a machine address (PV only) and as a guest pseudo-physical address (what an OS
layer needs): HVM/PVH the masked CR3, PV the CR3 machine frame translated through the
core's p2m table, ARM the kernel TTBR base.
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
from volatility3_xen.layers.magic import XenCoreRequirement

vollog = logging.getLogger(__name__)

_COLUMN_TYPES: dict[str, type] = {
    report.KIND_INT: int,
    report.KIND_HEX: format_hints.Hex,
    report.KIND_BOOL: bool,
    report.KIND_STR: str,
}


class Vcpus(interfaces.plugins.PluginInterface):
    """Lists the vCPU registers of a Xen dump-core and the decoded page-table base.

    Without --all: IP, SP, flags, segment selectors, control registers, fs/gs bases (x86)
    or PC, SP, CPSR, SP_EL0/1, ELR_EL1, SCTLR, TTBR0/1, TTBCR (ARM).  FileSlot k is the
    k-th stored context, not necessarily vCPU k (only initialised vCPUs are stored).
    """

    _required_framework_version = (2, 0, 0)
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
            vollog.error(f"{self.config['primary']} is not a Xen dump-core layer")
            table = report.VcpuTable(None, (report.Column(report.COLUMN_SLOT, "int"),), ())
        else:
            table = report.vcpu_table(layer.core, all_registers=bool(self.config.get("all")))
            if not table.rows:
                vollog.warning(f"{layer.core.name}: the core holds no decodable vCPU context")
        columns = [(column.name, _COLUMN_TYPES[column.kind]) for column in table.columns]
        return renderers.TreeGrid(columns, self._generator(table))

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
