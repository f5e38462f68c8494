"""Page-table roots of a raw (pseudo-physical) Linux guest image, found with Volatility 3.

Used to feed :func:`volatility3_xen.pvconvert.convert_page_tables`, which turns a raw image into
what a Xen PV guest's memory would hold.  Volatility is imported inside the function so that
``pvconvert`` stays importable (and fast to import) without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["find_page_table_roots"]

_PAGE_SIZE = 4096
# arch/x86/include/asm/cpufeatures.h: X86_FEATURE_PTI is (7*32+11), "Kernel Page Table Isolation
# enabled"; it is set at boot only when PTI is actually in use.
_X86_FEATURE_PTI_WORD = 7
_X86_FEATURE_PTI_BIT = 11
_ENTRIES_PER_TABLE = 512


def find_page_table_roots(
    raw_image_path: str | os.PathLike[str], symbols_dir: str | os.PathLike[str]
) -> list[int]:
    """Return the sorted pseudo-physical addresses of every top-level (L4) page table.

    The result holds the kernel DTB (``init_top_pgt``) and every task's ``mm->pgd`` translated to
    physical; kernel threads (``mm == NULL``) run on a borrowed ``active_mm`` and add nothing.
    With page-table isolation (PTI, ``X86_FEATURE_PTI`` set in ``boot_cpu_data``) every mm also
    owns a user-mode L4 at ``pgd + 4096``; those pages are included when they hold a present
    entry.  Without PTI the kernel may still allocate an order-1 pgd, but the second page is not a
    page table (and for ``init_top_pgt`` it is other kernel data), so it is never included then.

    ``raw_image_path`` must be a flat guest-physical image (file offset == physical address).
    """
    import volatility3.plugins
    import volatility3.symbols
    from volatility3 import framework
    from volatility3.framework import automagic, contexts, plugins
    from volatility3.framework.automagic import stacker
    from volatility3.framework.configuration import requirements
    from volatility3.plugins.linux import pslist

    framework.require_interface_version(2, 0, 0)
    framework.import_files(volatility3.plugins, True)

    # The symbol search path is module-global in Volatility (this is what `vol -s` sets);
    # restore it so that callers in the same process are not affected.
    saved_symbol_path = list(volatility3.symbols.__path__)
    volatility3.symbols.__path__ = [str(Path(symbols_dir).resolve()), *saved_symbol_path]
    try:
        ctx = contexts.Context()
        # available() imports the automagic modules; choose_os_stackers() only sees the Linux
        # stackers once they are imported.
        available_automagics = automagic.available(ctx)
        plugin_class = pslist.PsList
        base_config_path = "plugins"
        ctx.config["automagic.LayerStacker.single_location"] = (
            requirements.URIRequirement.location_from_file(str(raw_image_path))
        )
        ctx.config["automagic.LayerStacker.stackers"] = stacker.choose_os_stackers(plugin_class)
        automagics = automagic.choose_automagic(available_automagics, plugin_class)
        plugin = plugins.construct_plugin(
            ctx, automagics, plugin_class, base_config_path, None, None
        )
        kernel = ctx.modules[plugin.config["kernel"]]
        kernel_layer = ctx.layers[kernel.layer_name]
        physical_layer = ctx.layers[kernel_layer.config["memory_layer"]]

        roots = {int(kernel_layer.config["page_map_offset"])}
        for task in pslist.PsList.list_tasks(ctx, kernel.name, include_threads=True):
            mm = task.mm
            if not mm:
                continue
            pgd_phys, _ = kernel_layer.translate(int(mm.pgd))
            roots.add(int(pgd_phys))

        if not _pti_enabled(kernel):
            return sorted(roots)
        for pgd in list(roots):
            user_pgd = pgd + _PAGE_SIZE
            if not physical_layer.is_valid(user_pgd, _PAGE_SIZE):
                continue
            entries = physical_layer.read(user_pgd, _PAGE_SIZE)
            if _has_present_entry(entries):
                roots.add(user_pgd)
        return sorted(roots)
    finally:
        volatility3.symbols.__path__ = saved_symbol_path


def _pti_enabled(kernel: Any) -> bool:
    """Read X86_FEATURE_PTI from ``boot_cpu_data.x86_capability`` (kernel module object)."""
    cpu = kernel.object_from_symbol("boot_cpu_data")
    word = int(cpu.x86_capability[_X86_FEATURE_PTI_WORD])
    return bool((word >> _X86_FEATURE_PTI_BIT) & 1)


def _has_present_entry(table: bytes) -> bool:
    """True if any of the 512 little-endian 64-bit entries has the present bit (bit 0) set."""
    # Bit 0 of each little-endian u64 is bit 0 of its first byte.
    return any(table[i] & 1 for i in range(0, _ENTRIES_PER_TABLE * 8, 8))
