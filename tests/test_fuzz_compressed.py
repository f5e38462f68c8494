"""Hostile compressed input: damaged ``.gz``/``.bz2``/``.xz`` copies of small cores.

Volatility's ``FileLayer`` decompresses by file name; a truncated or corrupted stream then
fails inside the decompressor (while Volatility sizes the file, or at a later read).  The
Xen stacker must answer with a layer, a refusal or None and at most a one-line message,
never an exception, and every page it maps must be the page the uncompressed bytes hold.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import random
from pathlib import Path

import pytest
from volatility3.framework import contexts
from volatility3.framework.layers.physical import FileLayer

from volatility3_xen.formats.dumpcore import XenDumpCore
from volatility3_xen.formats.errors import XenFormatError
from volatility3_xen.layers import memory
from volatility3_xen.layers.stackers import XenDumpCoreStacker

from .conftest import run_vol
from .corecraft import make_core, set_header

COMPRESS = {
    "gz": lambda data: gzip.compress(data, compresslevel=1, mtime=0),
    "bz2": lambda data: bz2.compress(data, compresslevel=1),
    "xz": lambda data: lzma.compress(data, preset=0),
}


def _damaged(seed: int) -> tuple[str, bytes, bytes]:
    """(suffix, uncompressed core bytes, damaged compressed bytes) for one seed."""
    rng = random.Random(seed)
    suffix = rng.choice(sorted(COMPRESS))
    core = make_core(rng.choice(["hvm", "pv"]))
    data = core.data
    if rng.random() < 0.3:
        data = set_header(core, "page_size", rng.choice([3, 0, 1 << 40])).data
    packed = bytearray(COMPRESS[suffix](data))
    damage = rng.choice(["truncate", "flip", "append", "none", "inner-truncate"])
    if damage == "truncate":
        del packed[rng.randrange(1, len(packed)) :]
    elif damage == "flip":
        for _ in range(rng.randrange(1, 4)):
            packed[rng.randrange(len(packed))] ^= 1 << rng.randrange(8)
    elif damage == "append":
        packed += rng.randbytes(rng.randrange(1, 64))
    elif damage == "inner-truncate":  # a well-formed stream of a truncated core
        data = data[: rng.randrange(64, len(data))]
        packed = bytearray(COMPRESS[suffix](data))
    return suffix, data, bytes(packed)


def _expected(data: bytes) -> XenDumpCore | None:
    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    try:
        core = XenDumpCore(read, len(data))
        core.page_map  # noqa: B018
        return core
    except XenFormatError:
        return None


@pytest.mark.parametrize("seed", range(60))
def test_damaged_compressed_core(
    seed: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    suffix, data, packed = _damaged(seed)
    path = tmp_path / f"core.{suffix}"
    path.write_bytes(packed)
    context = contexts.Context()
    context.config["file.location"] = path.as_uri()
    try:
        context.layers.add_layer(FileLayer(context, "file", "file"))
    except memory.UNREADABLE:
        return  # Volatility's FileLayer itself could not open it: nothing reaches us
    with caplog.at_level(logging.WARNING, logger="volatility3_xen"):
        stacked = XenDumpCoreStacker.stack(context, "file")
    for record in caplog.records:
        assert "\n" not in record.getMessage()
    if isinstance(stacked, memory.XenDumpCoreLayer):
        # The stream decompressed whole (damage the decompressor did not notice is the
        # data itself): every mapped page is the page of what it decompresses to.
        with open(path, "rb") as handle:
            decompressed = {"gz": gzip, "bz2": bz2, "xz": lzma}[suffix].open(handle).read()
        core = stacked.core
        runs = stacked.page_map.pfn_runs
        for key, value, count in zip(runs.key, runs.value, runs.count):
            for k in range(count):
                offset = core.page_offset(value + k)
                want = decompressed[offset : offset + core.page_size]
                assert stacked.read((key + k) * core.page_size, core.page_size) == want
        if decompressed == data:
            assert _expected(data) is not None
    else:
        assert stacked is None or isinstance(stacked, memory.XenRefusedLayer)
        if stacked is None:
            try:
                context.layers["file"].maximum_address  # noqa: B018
            except memory.UNREADABLE:
                assert any("cannot be read" in r.getMessage() for r in caplog.records)
    for address in (0, 4096, 1 << 40):
        try:
            (stacked or context.layers["file"]).read(address, 16)
        except memory.UNREADABLE:
            pass


def test_vol_on_truncated_gz_core_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "core.gz"
    packed = COMPRESS["gz"](make_core("pv").data)
    path.write_bytes(packed[: len(packed) // 2])
    result = run_vol("-f", str(path), "linux.pslist")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert "cannot be read" in result.stderr
