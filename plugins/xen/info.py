"""Everything a Xen memory file says about itself, one row per fact.

``vol -f guest.core xen.info``: a dump-core's groups are file, guest, format, xen, notes,
sections, table, shared_info, warnings; it reads only the ELF header, the notes and the
pfn table.  ``vol -f guest.save xen.info``: a save image's groups are file, wrappers (xl,
libxl, libxc, xenopsd and their versions), guest, xen (from the domain header), config
(the xl header's JSON: name, uuid, memory, vcpus, disks, vifs), records (counts by type),
pages (stored, duplicates, by page type, checkpoints), table, hvm (HVM_CONTEXT entries,
HVM_PARAMS), shared_info, warnings; it reads only record headers and small records.
Neither scans guest memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import unquote, urlparse

from volatility3.framework import interfaces, renderers
from volatility3.framework.renderers import format_hints

# Makes volatility3_xen importable from a source checkout (``vol -p plugins``).
from volatility3.plugins.xen import stackers  # noqa: F401

from volatility3_xen import api, report
from volatility3_xen.formats.errors import printable
from volatility3_xen.layers.magic import XenCoreRequirement

vollog = logging.getLogger(__name__)


def _number(fact: report.Fact) -> int | interfaces.renderers.BaseAbsentValue:
    """The fact as a typed integer (bools and text have none)."""
    if isinstance(fact.value, bool) or not isinstance(fact.value, int):
        return renderers.NotApplicableValue()
    return format_hints.Hex(fact.value) if fact.hex else fact.value


def given_location(context: interfaces.context.ContextInterface, layer_name: str) -> str | None:
    """Where the file under ``layer_name`` came from, as the user gave it (``-f``,
    ``--single-location`` or a config): a ``file:`` URL as its path, any other URL as
    written but with a password masked.  None when no layer below has a location."""
    seen: set[str] = set()
    pending = [layer_name]
    while pending:
        name = pending.pop(0)
        if name in seen or name not in context.layers:
            continue
        seen.add(name)
        layer = context.layers[name]
        location = getattr(layer, "location", None)
        if isinstance(location, str) and location:
            return _shown_location(location)
        pending.extend(layer.dependencies)
    return None


def _shown_location(location: str) -> str:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return printable(unquote(parsed.path))
    if parsed.password is not None:
        host = parsed.netloc.rsplit("@", 1)[-1]
        location = parsed._replace(netloc=f"{parsed.username}:***@{host}").geturl()
    return printable(location)


class Info(interfaces.plugins.PluginInterface):
    """Shows the facts of a Xen dump-core (notes, sections, page table) or save image
    (wrappers, domain header, JSON config, record and page statistics, HVM state).

    Columns: Group, Field, Value (as text), Number (the same value typed as an integer,
    hex for addresses, where the fact is a number, so that ``-r json``/``-r csv`` give
    machine-readable values) and Note (where a value comes from or why it may mislead,
    e.g. virt_start is dom0's, not the guest's).  The same facts are available to
    scripts as volatility3_xen.report.facts().
    """

    _required_framework_version = (2, 26, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [XenCoreRequirement(name="primary")]

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        layer = api.find_xen_layer(self.context, self.config["primary"])
        if layer is None:  # XenCoreRequirement guarantees one; a hand-made config may not
            vollog.error(f"{self.config['primary']} is not a Xen guest layer")
            return
        location = given_location(self.context, layer.name)
        for fact in report.facts(layer.image):
            value = renderers.NotAvailableValue() if fact.value is None else fact.text
            hint = fact.hint
            if (fact.group, fact.field) == (report.GROUP_FILE, "name") and location:
                # The location the user gave, not the layer name a non-file URL leaves.
                value, hint = location, "the location given"
            yield 0, (fact.group, fact.field, value, _number(fact), hint)

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [("Group", str), ("Field", str), ("Value", str), ("Number", int), ("Note", str)],
            self._generator(),
        )
