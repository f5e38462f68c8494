"""The cores the benchmark reads: sparse synthetic guests and the real guest, cached on disk.

Synthetic cores hold real tables (what opening costs) but only a few marker pages: the page
area is a sparse hole, so a 64 GiB guest takes ~130 MiB (HVM) / ~260 MiB (PV) of disk.
Files are named with ``CORE_VERSION``; bump it when the generator changes so stale caches are
rebuilt rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volatility3_xen.testdata import corewriter as writer

CORE_VERSION = 1
PAGE = 4096
GIB = 1 << 30
MARKER_MAGIC = 0x48434E4542584E45  # "ENXBENCH"
MARKER_PAGES = 16  # explicit pages per synthetic core, spread over the table
HVM_TAIL_PADDING = 8  # libxc's ~0 entries for the special pages (dump-core-layout.md 5)
PV_EXTENT_PAGES = 512  # machine frames come in shuffled 2 MiB extents (m2p is fragmented)
LOW_MMIO_START_PFN = 0xF0000  # HVM RAM beyond 3.75 GiB is relocated above 4 GiB
HIGH_RAM_START_PFN = 0x100000


@dataclass(frozen=True)
class BenchCore:
    """A core on disk plus the facts the measurements need."""

    label: str  # e.g. "HVM 16 GiB"
    kind: str  # "hvm" or "pv"
    guest_bytes: int  # RAM the guest has (table entries x page size, padding excluded)
    path: Path
    marker_pfns: tuple[int, ...]  # pfns whose page holds marker_page(pfn)
    raw_image: Path | None = None  # real guest only: the same memory as a flat file


def marker_page(pfn: int) -> bytes:
    return struct.pack("<QQ", pfn, MARKER_MAGIC) * (PAGE // 16)


def hvm_pfns(guest_bytes: int) -> np.ndarray:
    """Pfns of an x86 HVM guest with ``guest_bytes`` of RAM, as libxc dumps them: VGA hole
    skipped, RAM above 3.75 GiB relocated to 4 GiB and up."""
    pages = guest_bytes // PAGE
    low = min(pages, LOW_MMIO_START_PFN)
    parts = [np.arange(0, min(low, 0xA0)), np.arange(0xC0, low)]
    if pages > low:
        parts.append(np.arange(HIGH_RAM_START_PFN, HIGH_RAM_START_PFN + pages - low))
    return np.concatenate(parts).astype(np.uint64)


def pv_tables(guest_bytes: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A PV guest's contiguous pfns and its machine frames in shuffled 2 MiB extents."""
    pages = guest_bytes // PAGE
    extents = -(-pages // PV_EXTENT_PAGES)
    order = np.random.default_rng(seed).permutation(extents).astype(np.uint64)
    within = np.arange(PV_EXTENT_PAGES, dtype=np.uint64)
    mfns = (order[:, None] * np.uint64(PV_EXTENT_PAGES) + within[None, :]).ravel()[:pages]
    return np.arange(pages, dtype=np.uint64), mfns + np.uint64(HIGH_RAM_START_PFN)


def fragmented_pv_tables(guest_bytes: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A PV guest's contiguous pfns and machine frames shuffled page by page (a long-lived
    or migrated guest: no two neighbouring pfns in neighbouring frames)."""
    pages = guest_bytes // PAGE
    mfns = np.random.default_rng(seed).permutation(pages).astype(np.uint64)
    return np.arange(pages, dtype=np.uint64), mfns + np.uint64(HIGH_RAM_START_PFN)


# Table variants beside libxc's own layout: the two worst cases.
RANDOM = "random"  # HVM: the pfn table in random order (damaged or hostile)
FRAGMENTED = "frag4k"  # PV: machine frames fragmented at 4 KiB
VARIANT_LABELS = {RANDOM: "random table", FRAGMENTED: "frames fragmented at 4 KiB"}


def synthetic_core(cache: Path, kind: str, gib: int, variant: str = "") -> BenchCore:
    """The cached sparse core of a ``gib`` GiB ``kind`` guest, written if missing."""
    guest_bytes = gib * GIB
    if kind == "hvm":
        pfns = hvm_pfns(guest_bytes)
        if variant == RANDOM:
            pfns = np.random.default_rng(3).permutation(pfns)
        table = np.concatenate([pfns, np.full(HVM_TAIL_PADDING, writer.INVALID_PFN, np.uint64)])
        gmfns = None
    else:
        tables = fragmented_pv_tables if variant == FRAGMENTED else pv_tables
        pfns, gmfns = tables(guest_bytes)
        table = pfns
    indices = np.linspace(0, len(pfns) - 1, MARKER_PAGES).astype(np.int64)
    markers = tuple(int(pfns[i]) for i in indices)
    spec = writer.CoreSpec(
        kind=kind,  # type: ignore[arg-type]
        pfns=table,
        gmfns=gmfns,
        pages={int(i): marker_page(int(pfns[i])) for i in indices},
        vcpus=[writer.vcpu_context_x86_64(cr3=0x1000)],
    )
    name = f"{kind}-{gib}g" + (f"-{variant}" if variant else "")
    path = cache / f"{name}-v{CORE_VERSION}.core"
    if not _cached(path, writer.plan_layout(spec).file_size):
        _write_atomically(path, lambda tmp: writer.write_core(tmp, spec))
    label = f"{kind.upper()} {gib} GiB" + (f", {VARIANT_LABELS[variant]}" if variant else "")
    return BenchCore(label, kind, len(pfns) * PAGE, path, markers)


def real_guest_core(cache: Path, shared: Path) -> BenchCore | None:
    """HVM core of the real guest (``imageC``), or None when ``shared`` is absent."""
    guests = shared / "guests"
    source = guests / "imageC.raw.xz"
    if not source.exists():
        return None
    image = cache / "imageC.raw"
    if not image.exists():
        expected = (guests / "imageC.raw.sha256").read_text().split()[0]
        _write_atomically(image, lambda tmp: _decompress(source, tmp, expected))
    facts = json.loads((guests / "factsC.json").read_text())
    core = cache / f"imageC-hvm-v{CORE_VERSION}.core"
    if not core.exists() or core.stat().st_mtime < image.stat().st_mtime:
        context = writer.vcpu_context_x86_64(
            cr3=int(facts["reg_CR3"], 16),
            rip=int(facts["reg_RIP"], 16),
            rsp=int(facts["reg_RSP"], 16),
            cr0=int(facts["reg_CR0"], 16),
            cr4=int(facts["reg_CR4"], 16),
            gs_base_kernel=int(facts["reg_GS_BASE"], 16),
        )
        with open(image, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as m:
            _write_atomically(
                core,
                lambda tmp: writer.write_hvm_from_image(
                    tmp, m, tail_padding=HVM_TAIL_PADDING, vcpus=[context]
                ),
            )
    guest_bytes = image.stat().st_size
    pfns = hvm_pfns(guest_bytes)
    return BenchCore("HVM real guest (128 MiB)", "hvm", len(pfns) * PAGE, core, (), image)


def _cached(path: Path, size: int) -> bool:
    return path.exists() and path.stat().st_size == size


def _write_atomically(path: Path, write) -> None:  # noqa: ANN001 - a one-argument callable
    """Write through a temporary name so an interrupted run leaves no half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


def _decompress(source: Path, target: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    with lzma.open(source) as inp, open(target, "wb") as out:
        while chunk := inp.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        target.unlink()
        raise RuntimeError(f"{source} does not decompress to the published sha256")
