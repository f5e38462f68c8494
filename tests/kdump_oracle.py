#!/usr/bin/python3
"""Independent reader oracle: answer memory reads on a Xen dump-core with libkdumpfile.

Runs under the *system* python (Debian python3-libkdumpfile), not the project venv, so it imports
nothing from this repository.  Usage::

    echo '[["KPHYSADDR", 4096, 16], ["MACHPHYSADDR", 8192, 4096]]' | kdump_oracle.py CORE

Prints one JSON object: {"open_error": str|null, "attrs": {name: value}, "results": [...]}, where
each result is {"hex": "..."} or {"error": "ExceptionName: message"}, in request order.
Address spaces: KPHYSADDR, MACHPHYSADDR, KVADDR.

libkdumpfile quirks to keep in mind (dump-core-layout.md section 8): its max_pfn overflows on ~0
table padding, it ignores xch_page_size (4 KiB assumed on x86), and EM_386/EM_ARM xc_core files
may crash it; callers should only trust it on little-endian EM_X86_64 4 KiB cores.
"""

from __future__ import annotations

import json
import sys
from typing import Any

ATTRS = (
    "file.format",
    "arch.name",
    "xen.type",
    "xen.xlat",
    "xen.version.major",
    "xen.version.minor",
    "xen.version.extra",
    "cpu.number",
    "cpu.0.reg.cr3",
    "cpu.0.reg.rip",
    "cpu.0.reg.rsp",
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _attrs(kdf: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in ATTRS:
        try:
            found[name] = _jsonable(kdf.attr[name])
        except Exception:  # absent or unreadable attribute: just leave it out
            continue
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import kdumpfile

    requests = json.load(sys.stdin)
    spaces = {
        "KPHYSADDR": kdumpfile.KDUMP_KPHYSADDR,
        "MACHPHYSADDR": kdumpfile.KDUMP_MACHPHYSADDR,
        "KVADDR": kdumpfile.KDUMP_KVADDR,
    }
    out: dict[str, Any] = {"open_error": None, "attrs": {}, "results": []}
    try:
        kdf = kdumpfile.kdumpfile(argv[1])
    except Exception as exc:
        out["open_error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
        return 0
    out["attrs"] = _attrs(kdf)
    for space, address, length in requests:
        try:
            data = kdf.read(spaces[space], int(address), int(length))
            out["results"].append({"hex": bytes(data).hex()})
        except Exception as exc:
            out["results"].append({"error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
