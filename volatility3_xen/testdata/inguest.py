"""Images "taken inside" a PV guest, derived from its dump-core: test data for the
in-guest PV reader (``formats.p2mrecovery``, ``layers.inguest``).

A dump-core stores page *i* of ``.xen_pages`` for the pfn its table names; an in-guest
acquisition stores pfn *n* at pseudo-physical address ``n * 4096``:

- ``write_raw``: a flat image (holes in the pfn space are zero, written sparse);
- ``write_lime``: a LiME file, one range header per run of pfns (``struct lime_mem_range_header``:
  magic ``0x4C694D45``, version 1, first and last byte address (inclusive), 8 reserved
  bytes), as Volatility's ``LimeLayer`` reads it.

Neither carries the dump-core's p2m: what the reader must rebuild.  ``python -m
volatility3_xen.testdata.inguest CORE OUT --format raw|lime`` writes one.
"""

from __future__ import annotations

import argparse
import os
import struct
from collections.abc import Iterator

from ..formats.dumpcore import XenDumpCore

LIME_MAGIC = 0x4C694D45
LIME_VERSION = 1
LIME_HEADER = struct.Struct("<IIQQQ")
_CHUNK = 8 << 20


def _page_runs(core: XenDumpCore) -> Iterator[tuple[int, int, int]]:
    """(first pfn, file offset of its page, pages) for each run of the core's table."""
    runs = core.page_runs()
    yield from zip(runs.key, runs.value, runs.count)


def _copy(source, target, offset: int, length: int) -> None:
    source.seek(offset)
    while length:
        block = source.read(min(_CHUNK, length))
        if not block:
            raise ValueError(f"the core ends inside .xen_pages at {source.tell():#x}")
        target.write(block)
        length -= len(block)


def write_raw(core_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> int:
    """Write the core's pages at ``pfn * page_size``; return the image size."""
    core = XenDumpCore.open(core_path)
    size = 0
    with open(core_path, "rb") as source, open(out_path, "wb") as target:
        for pfn, offset, count in _page_runs(core):
            target.seek(pfn * core.page_size)
            _copy(source, target, offset, count * core.page_size)
            size = max(size, (pfn + count) * core.page_size)
        target.truncate(size)
    return size


def write_lime(core_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> int:
    """Write the core's pages as LiME ranges; return the number of ranges."""
    core = XenDumpCore.open(core_path)
    ranges = 0
    with open(core_path, "rb") as source, open(out_path, "wb") as target:
        for pfn, offset, count in _page_runs(core):
            start = pfn * core.page_size
            end = start + count * core.page_size - 1
            target.write(LIME_HEADER.pack(LIME_MAGIC, LIME_VERSION, start, end, 0))
            _copy(source, target, offset, count * core.page_size)
            ranges += 1
    return ranges


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("core", help="a PV dump-core (xl dump-core)")
    parser.add_argument("out", help="the image to write")
    parser.add_argument("--format", choices=("raw", "lime"), default="raw")
    args = parser.parse_args(argv)
    (write_lime if args.format == "lime" else write_raw)(args.core, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
