"""What ``xen.info`` says about an image taken inside a PV guest: the recovered map.

Groups: ``file`` (where the pages come from), ``guest`` (PV, 64-bit, page size, the
kernel table the recovery started from), ``recovery`` (pfns mapped and left unmapped,
the anchor, the linear slot, rounds, tables read, conflicts, time), ``cross_check`` (the
kernel's own p2m: pages used or refused, pairs compared and agreed, pfns filled, foreign
frames dropped) and ``warnings``.  No Volatility import.
"""

from __future__ import annotations

from ..formats.image import GUEST_PV
from ..formats.inguest import InGuestPVImage
from .model import GROUP_FILE, GROUP_GUEST, GROUP_WARNINGS, Fact, human_size

GROUP_RECOVERY = "recovery"
GROUP_CROSS_CHECK = "cross_check"


def inguest_facts(image: InGuestPVImage) -> list[Fact]:
    """Everything ``xen.info`` shows for an in-guest PV image, group by group."""
    recovery, layout = image.recovery, image.layout
    present = image.present_pages
    size = present * image.page_size
    pairs = f"{recovery.list_agreed} of {recovery.list_compared}"
    agreement = (
        f"{100.0 * recovery.list_agreed / recovery.list_compared:.2f} %"
        if recovery.list_compared
        else None
    )
    anchors = ", ".join(f"pfn {pfn:#x} = mfn {mfn:#x}" for pfn, mfn in recovery.anchors)
    slot = recovery.linear_slot
    facts = [
        Fact(GROUP_FILE, "name", image.name),
        Fact(GROUP_FILE, "container", image.container, "what holds the pages"),
        Fact(GROUP_FILE, "pages", present, f"{human_size(size)} of guest memory in the image"),
        Fact(GROUP_FILE, "runs", len(image.present), "contiguous pfn ranges in the image"),
        Fact(GROUP_GUEST, "type", GUEST_PV, "xen_domain_type is XEN_PV_DOMAIN"),
        Fact(GROUP_GUEST, "width", "64-bit", "x86_64 PV Linux"),
        Fact(GROUP_GUEST, "page_size", image.page_size),
        Fact(GROUP_GUEST, "top_table", layout.top_table, layout.top_table_name, hex=True),
        Fact(GROUP_GUEST, "direct_map", recovery.direct_map, "page_offset_base", hex=True),
        Fact(
            GROUP_RECOVERY,
            "pfns_mapped",
            recovery.mapped,
            "pfn <-> mfn pairs recovered from the guest's own memory",
        ),
        Fact(
            GROUP_RECOVERY,
            "pfns_unmapped",
            image.unmapped_pages,
            "pages of the image with no machine frame (ballooned, lost or in conflict)",
        ),
        Fact(GROUP_RECOVERY, "anchor", anchors or None, "self-mapping builder L1 page"),
        Fact(
            GROUP_RECOVERY,
            "linear_slot",
            None if slot is None else f"pfn {slot[0]:#x} = mfn {slot[1]:#x}",
            f"slot 258 of {layout.top_table_name}",
        ),
        Fact(GROUP_RECOVERY, "ranges_tested", recovery.ranges_tested, "2 MiB ranges searched"),
        Fact(GROUP_RECOVERY, "rounds", recovery.rounds, "page-table passes to the fixed point"),
        Fact(GROUP_RECOVERY, "tables_read", recovery.tables_read, "4 KiB pages read"),
        Fact(GROUP_RECOVERY, "from_page_tables", recovery.from_tables),
        Fact(
            GROUP_RECOVERY,
            "conflicts",
            recovery.conflicts,
            "; ".join(recovery.conflict_examples) or "pfns or mfns with two partners, left out",
        ),
        Fact(GROUP_RECOVERY, "seconds", round(recovery.seconds, 3), "time to recover the map"),
        Fact(GROUP_CROSS_CHECK, "source", recovery.list_source, "the kernel's own p2m"),
        Fact(GROUP_CROSS_CHECK, "pages", recovery.list_pages),
        Fact(GROUP_CROSS_CHECK, "pages_used", recovery.list_pages_used, "agreed with every pair"),
        Fact(
            GROUP_CROSS_CHECK,
            "pages_refused",
            recovery.list_pages_refused,
            "all zeros or disagreeing: not used to fill",
        ),
        Fact(GROUP_CROSS_CHECK, "pages_unreadable", recovery.list_pages_unreadable),
        Fact(GROUP_CROSS_CHECK, "agreement", agreement, f"{pairs} page-table pairs"),
        Fact(GROUP_CROSS_CHECK, "pfns_filled", recovery.list_filled, "pairs only the p2m gave"),
        Fact(GROUP_CROSS_CHECK, "foreign_dropped", recovery.foreign_dropped, "FOREIGN_FRAME_BIT"),
    ]
    facts += [Fact(GROUP_WARNINGS, f"warning_{i}", text) for i, text in enumerate(image.warnings)]
    return facts
