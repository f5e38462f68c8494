"""Opening a compressed dump-core: how much of the cost is ours, how much decompression.

    python benchmarks/bench_compressed.py [--repeat N] [--formats gz,xz]

For the PV and HVM cores of the bundled guest (``python -m volatility3_xen samples all``),
compressed to ``.gz`` (level 1) and ``.xz`` (preset 0) in a temporary directory, it
measures in this process, best of ``--repeat``:

- ``size``: Volatility's ``FileLayer`` learning the size (it decompresses the whole file);
- ``table``: on a sized ``FileLayer``, reading the page table the way any reader must
  (from the start of the stream up to the table's end): the decompression floor;
- ``open``: ``XenDumpCoreLayer`` on a sized ``FileLayer`` (probe, parse, table, maps);
- ``again``: the second construction Volatility makes, on a fresh sized ``FileLayer``.

``ours`` is ``open - table``: what we add beyond the one pass that reaching the table costs.
Times are CPU seconds of this process (``time.process_time``): decompression is CPU work,
and the machine may be shared.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from volatility3.framework import contexts
from volatility3.framework.layers import physical

from volatility3_xen.layers import memory
from volatility3_xen.testdata import samples

OPENERS = {
    "gz": lambda path: gzip.open(path, "wb", compresslevel=1),
    "xz": lambda path: lzma.open(path, "wb", preset=0),
    "bz2": lambda path: bz2.open(path, "wb", compresslevel=1),
}


def sized_file_layer(path: Path) -> tuple[contexts.Context, physical.FileLayer]:
    context = contexts.Context()
    context.config["file.location"] = path.resolve().as_uri()
    layer = physical.FileLayer(context, "file", "file")
    context.layers.add_layer(layer)
    layer.maximum_address  # noqa: B018 - Volatility sizes the file before any stacker runs
    return context, layer


def forget() -> None:
    """Drop what the layer remembers about files (a fresh process)."""
    memory._PAGE_MAP_CACHE.clear()
    memory._WINDOWS.clear()


def best(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


def measure(path: Path, repeat: int) -> dict[str, float]:
    def size() -> float:
        start = time.process_time()
        sized_file_layer(path)
        return time.process_time() - start

    forget()
    context, _ = sized_file_layer(path)
    context.config["xen.base_layer"] = "file"
    table = memory.XenDumpCoreLayer(context, "xen", "xen").core.table

    def table_read() -> float:
        _, layer = sized_file_layer(path)
        start = time.process_time()
        layer.read(table.offset, table.size)
        return time.process_time() - start

    def open_first() -> float:
        forget()
        context, _ = sized_file_layer(path)
        context.config["xen.base_layer"] = "file"
        start = time.process_time()
        memory.XenDumpCoreLayer(context, "xen", "xen")
        return time.process_time() - start

    def open_again() -> float:
        forget()
        context, _ = sized_file_layer(path)
        context.config["xen.base_layer"] = "file"
        memory.XenDumpCoreLayer(context, "xen", "xen")
        context, _ = sized_file_layer(path)
        context.config["xen.base_layer"] = "file"
        start = time.process_time()
        memory.XenDumpCoreLayer(context, "xen", "xen")
        return time.process_time() - start

    figures = {
        "size": best(repeat, size),
        "table": best(repeat, table_read),
        "open": best(repeat, open_first),
        "again": best(repeat, open_again),
    }
    figures["ours"] = figures["open"] - figures["table"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", default="gz,xz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vx3-bench-compressed-") as tmp:
        print("core\tformat\tcompressed MiB\tsize s\ttable s\topen s\tagain s\tours s\tours %")
        for kind in ("pv", "hvm"):
            core = samples.build_sample(kind)
            plain = measure(core, args.repeat)
            print(
                f"{kind}\tnone\t{core.stat().st_size / 2**20:.1f}\t{plain['size']:.3f}\t"
                f"{plain['table']:.3f}\t{plain['open']:.3f}\t{plain['again']:.4f}\t-\t-"
            )
            for suffix in args.formats.split(","):
                packed = Path(tmp) / f"{core.name}.{suffix}"
                with open(core, "rb") as source, OPENERS[suffix](packed) as out:
                    shutil.copyfileobj(source, out, 8 << 20)
                f = measure(packed, args.repeat)
                share = 100 * max(f["ours"], 0.0) / f["open"]
                print(
                    f"{kind}\t{suffix}\t{packed.stat().st_size / 2**20:.1f}\t{f['size']:.3f}\t"
                    f"{f['table']:.3f}\t{f['open']:.3f}\t{f['again']:.4f}\t{f['ours']:+.3f}\t"
                    f"{share:.0f}%"
                )


if __name__ == "__main__":
    main()
