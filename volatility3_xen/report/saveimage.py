"""What a saved-domain image says, as rows: the data behind ``xen.info`` on a save image.

Groups, in order: ``file``, ``wrappers`` (the onion, outermost first: xl header, libxl
stream, libxc stream, xenopsd image, each with its version and details), ``guest``
(domain type, page size, width; from the libxc domain header and X86_PV_INFO), ``xen``
(the version in the domain header), ``config`` (name, uuid, type, memory, vcpus, disks,
vifs of the xl header's JSON domain configuration), ``xenops`` (XCP-ng/XenServer
metadata), ``records`` (libxc record counts by type), ``pages`` (PAGE_DATA statistics:
entries, pages stored, duplicates, counts by page type, checkpoints) and ``table`` (the
pfn runs actually mapped), ``hvm`` (HVM_CONTEXT entries and header, HVM_PARAMS),
``shared_info`` and ``warnings``.

No Volatility import; reads only what the image parsed (never guest memory).  The image
is duck-typed against ``formats.saveimage.XenSaveImage`` (wrappers, domain, config,
xenops_metadata, record_counts, page_stats, pv_info, p2m_frames, hvm_context,
hvm_params, shared_info).
"""

from __future__ import annotations

from typing import Any

from ..formats import hvmcontext
from ..formats.errors import XenFormatError, printable
from ..formats.sharedinfo import decode_shared_info
from ..formats.vcpu import LAYOUT_X86_32, LAYOUT_X86_64
from .model import (
    GROUP_FILE,
    GROUP_GUEST,
    GROUP_SHARED_INFO,
    GROUP_TABLE,
    GROUP_WARNINGS,
    GROUP_XEN,
    Fact,
    FactValue,
    human_size,
    utc_text,
)

GROUP_WRAPPERS = "wrappers"
GROUP_CONFIG = "config"
GROUP_XENOPS = "xenops"
GROUP_RECORDS = "records"
GROUP_PAGES = "pages"
GROUP_HVM = "hvm"

# The libxc domain header's type codes (libxc-migration-stream, DOMAIN_HEADER).
_DOMAIN_TYPES = {1: "x86 PV", 2: "x86 HVM", 3: "x86 PVH", 4: "ARM"}
_WRAPPER_NAMES = {
    "xl": "xl save header",
    "libxl": "libxl migration stream",
    "libxc": "libxc migration stream",
    "xenopsd": "xenopsd suspend image (XCP-ng/XenServer)",
}


def save_facts(image: Any) -> list[Fact]:
    """Everything ``xen.info`` shows for a save image, group by group."""
    facts = [
        Fact(GROUP_FILE, "name", image.name),
        Fact(GROUP_FILE, "size", image.file_size, human_size(image.file_size)),
        Fact(GROUP_FILE, "format", image.format_name),
        Fact(GROUP_FILE, "byte_order", getattr(image, "byteorder", None)),
    ]
    facts += _wrapper_facts(image)
    contexts = _contexts(image)  # may add warnings
    facts += _guest_facts(image, contexts)
    domain = image.domain
    facts += [
        Fact(GROUP_XEN, "version", f"{domain.xen_major}.{domain.xen_minor}", "libxc domain header"),
        Fact(GROUP_XEN, "major", domain.xen_major),
        Fact(GROUP_XEN, "minor", domain.xen_minor),
    ]
    facts += _config_facts(image.config)
    if image.xenops_metadata is not None:
        text = image.xenops_metadata
        facts.append(
            Fact(GROUP_XENOPS, "metadata", len(text), "bytes of S-expression (VM metadata)")
        )
    facts += [Fact(GROUP_RECORDS, name, count) for name, count in image.record_counts.items()]
    facts += _page_facts(image)
    hvm_facts, hvm_warnings = _hvm_facts(image)
    facts += hvm_facts
    facts += _shared_info_facts(image)
    warnings = [*image.warnings, *hvm_warnings]
    facts += [Fact(GROUP_WARNINGS, f"warning_{i}", text) for i, text in enumerate(warnings)]
    return facts


def _contexts(image: Any) -> list:
    try:
        return list(image.vcpus())
    except (XenFormatError, ValueError) as exc:
        image.warnings.append(f"vCPU contexts not decodable: {exc}")
        return []


def _wrapper_facts(image: Any) -> list[Fact]:
    facts = []
    for wrapper in image.wrappers:
        version: FactValue = wrapper.version if wrapper.version is not None else "present"
        hint = (
            f"{_WRAPPER_NAMES.get(wrapper.kind, wrapper.kind)} at offset {wrapper.offset:#x}, "
            f"{wrapper.byteorder}-endian"
        )
        facts.append(Fact(GROUP_WRAPPERS, wrapper.kind, version, hint))
        for key, value in wrapper.details.items():
            hexed = isinstance(value, int) and ("flags" in key or "options" in key)
            facts.append(Fact(GROUP_WRAPPERS, f"{wrapper.kind}.{key}", value, hex=hexed))
    return facts


def _guest_facts(image: Any, contexts: list) -> list[Fact]:
    domain = image.domain
    guest = GROUP_GUEST
    facts = [
        Fact(
            guest,
            "type",
            image.guest_type,
            f"libxc domain header type {domain.type_code} "
            f"({_DOMAIN_TYPES.get(domain.type_code, 'unknown')})",
        ),
        Fact(guest, "page_size", image.page_size, f"page_shift {image.page_shift}"),
    ]
    pv_info = image.pv_info
    if pv_info is not None:
        width, levels = pv_info
        facts += [
            Fact(guest, "width", f"{width * 8}-bit", "X86_PV_INFO guest_width"),
            Fact(guest, "pt_levels", levels, "X86_PV_INFO"),
        ]
    if image.p2m_frames is not None:
        facts.append(Fact(guest, "p2m_frames", image.p2m_frames, "X86_PV_P2M_FRAMES (pfns)"))
    layout = contexts[0].layout if contexts else None
    facts += [
        Fact(guest, "nr_vcpus", len(contexts), "vCPU contexts stored"),
        Fact(guest, "vcpu_layout", layout),
    ]
    return facts


def _config_facts(config: Any) -> list[Fact]:
    group = GROUP_CONFIG
    if not isinstance(config, dict):
        return [Fact(group, "present", False, "no JSON domain configuration (xl header)")]
    c_info = _dict(config.get("c_info"))
    b_info = _dict(config.get("b_info"))
    memkb = _int(b_info.get("max_memkb"))
    target = _int(b_info.get("target_memkb"))
    return [
        Fact(group, "name", _str(c_info.get("name"))),
        Fact(group, "uuid", _str(c_info.get("uuid"))),
        Fact(group, "type", _str(c_info.get("type")), "c_info.type"),
        Fact(group, "max_memkb", memkb, "" if memkb is None else human_size(memkb * 1024)),
        Fact(group, "target_memkb", target, "" if target is None else human_size(target * 1024)),
        Fact(group, "max_vcpus", _int(b_info.get("max_vcpus"))),
        Fact(group, "disks", _count(config.get("disks")), _devices(config.get("disks"), "vdev")),
        Fact(group, "vifs", _count(config.get("nics")), _devices(config.get("nics"), "mac")),
        Fact(group, "kernel", _str(b_info.get("kernel"))),
        Fact(group, "cmdline", _str(b_info.get("cmdline"))),
    ]


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return printable(value) if isinstance(value, str) else None


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _devices(value: Any, key: str) -> str:
    """``vdev``s of the disks / ``mac``s of the nics, up to 8."""
    if not isinstance(value, list):
        return ""
    names = [_str(item.get(key)) for item in value[:8] if isinstance(item, dict)]
    text = ", ".join(name for name in names if name)
    return text + (", ..." if len(value) > 8 else "")


def _page_facts(image: Any) -> list[Fact]:
    stats = image.page_stats
    group = GROUP_PAGES
    facts = [
        Fact(group, "page_data_records", stats.records, "PAGE_DATA records"),
        Fact(group, "entries", stats.entries, "pfn entries in them"),
        Fact(group, "pages_with_data", stats.pages_with_data, "entries carrying a page"),
        Fact(group, "duplicates", stats.duplicates, "pfns sent again: the last copy is used"),
        Fact(group, "checkpoints", stats.checkpoints, "CHECKPOINT records (Remus/COLO)"),
    ]
    facts += [Fact(group, f"type_{name}", count) for name, count in stats.by_type.items()]
    runs = image.page_runs()
    counts = runs.count
    valid = int(sum(counts))
    memory = valid * image.page_size
    facts += [
        Fact(GROUP_TABLE, "valid_pages", valid, "distinct pfns with contents"),
        Fact(GROUP_TABLE, "runs", len(counts), "contiguous pfn ranges"),
        Fact(GROUP_TABLE, "lowest_pfn", runs.key[0] if len(counts) else None, hex=True),
        Fact(
            GROUP_TABLE,
            "highest_pfn",
            runs.key[-1] + counts[-1] - 1 if len(counts) else None,
            hex=True,
        ),
        Fact(GROUP_TABLE, "memory", memory, f"{human_size(memory)} (valid pages x page size)"),
    ]
    return facts


def _hvm_facts(image: Any) -> tuple[list[Fact], list[str]]:
    """The HVM group, and what decoding HVM_CONTEXT found wrong (for the warnings)."""
    facts: list[Fact] = []
    warnings: list[str] = []
    blob = image.hvm_context
    byteorder = getattr(image, "byteorder", "little")
    if blob is not None:
        parsed = hvmcontext.parse_hvm_context(blob, byteorder)
        facts.append(Fact(GROUP_HVM, "context_bytes", len(blob), "HVM_CONTEXT record"))
        header = parsed.header
        if header is not None:
            facts += [
                Fact(GROUP_HVM, "header_magic", header.magic, "HVM_FILE_MAGIC", hex=True),
                Fact(GROUP_HVM, "header_version", header.version),
                Fact(GROUP_HVM, "host_cpuid", header.cpuid, "CPUID[1].EAX of the host", hex=True),
                Fact(GROUP_HVM, "gtsc_khz", header.gtsc_khz, "guest TSC frequency"),
            ]
        facts += [
            Fact(GROUP_HVM, f"entries_{name}", count, "hvm_save entries")
            for name, count in parsed.counts().items()
        ]
        warnings += parsed.warnings
    for index, value in sorted(image.hvm_params.items()):
        facts.append(Fact(GROUP_HVM, hvmcontext.hvm_param_name(index), value, hex=True))
    return facts, warnings


def _shared_info_facts(image: Any) -> list[Fact]:
    group = GROUP_SHARED_INFO
    data = image.shared_info
    if data is None:
        return [Fact(group, "present", False, "no SHARED_INFO record (PV only)")]
    facts = [Fact(group, "present", True, f"{len(data)} bytes")]
    layout = {8: LAYOUT_X86_64, 4: LAYOUT_X86_32}.get((image.pv_info or (0, 0))[0])
    if layout is None:
        return facts
    try:
        info = decode_shared_info(data, layout, getattr(image, "byteorder", "little"))
    except ValueError:
        return facts
    facts += [
        Fact(group, "max_pfn", info.max_pfn, "size of the guest's p2m list", hex=True),
        Fact(
            group,
            "pfn_to_mfn_frame_list_list",
            info.pfn_to_mfn_frame_list_list,
            "a machine frame: the save code does not normalise shared_info",
            hex=True,
        ),
        Fact(group, "wallclock_sec", info.wallclock_seconds, utc_text(info.wallclock_seconds)),
    ]
    return facts
