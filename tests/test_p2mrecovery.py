"""The machine-frame map recovered from a PV guest's own memory (``formats.p2mrecovery``),
checked pair by pair against the ``.xen_p2m`` of the real Xen 4.17 dump-core it is derived
from; damage cases (anchor lost, random pages zeroed, planted conflicts, lost p2m pages,
foreign frames, hostile images) and the ``InGuestPVImage`` model over the result."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from volatility3_xen import report
from volatility3_xen.formats import p2mrecovery
from volatility3_xen.formats.dumpcore import XenDumpCore
from volatility3_xen.formats.errors import XenFormatError
from volatility3_xen.formats.inguest import InGuestPVImage, present_runs
from volatility3_xen.formats.p2mrecovery import KernelLayout, recover_machine_frames
from volatility3_xen.testdata import inguest as inguest_data
from volatility3_xen.testdata import samples

from .conftest import CACHE, REPO, SHARED

PAGE = 4096
FRAME = ((1 << 52) - 1) & ~(PAGE - 1)
SYMBOLS_NAME = Path("linux") / "debian-cloud-6.1.0-47.json.xz"


def _quiet(_message: str) -> None:
    pass


def real_core_path() -> Path:
    """The real PV dump-core bundled in samples/ (the same file as ../shared/realxen's:
    ``samples/realxen.json`` records its published sha256), unpacked once into the cache
    and checked (``samples.ensure_realxen``)."""
    if not (REPO / "samples" / samples.REALXEN_FACTS).exists():
        pytest.skip("the real PV dump-core is not available (samples/realxen.json missing)")
    return samples.ensure_realxen("core", cache=CACHE / "samples", status=_quiet)


def derived_image(core: Path, kind: str) -> Path:
    """A raw or LiME image of the core's pages, written once next to the core."""
    target = core.with_name(f"{core.stem}.inguest.{kind}")
    if not target.exists() or target.stat().st_mtime < core.stat().st_mtime:
        partial = target.with_suffix(f".{os.getpid()}.part")
        (inguest_data.write_lime if kind == "lime" else inguest_data.write_raw)(core, partial)
        partial.replace(target)
    return target


def isf_path() -> Path:
    for directory in (SHARED / "guests" / "symbols", REPO / "samples" / "symbols"):
        if (directory / SYMBOLS_NAME).exists():
            return directory / SYMBOLS_NAME
    pytest.skip("the guest kernel's symbol table is not available")


@pytest.fixture(scope="session")
def real_core() -> Path:
    return real_core_path()


@pytest.fixture(scope="session")
def truth(real_core: Path) -> np.ndarray:
    """pfn -> mfn as the dump-core's ``.xen_p2m`` says (read straight from the section)."""
    core = XenDumpCore.open(real_core)
    section = core.sections[".xen_p2m"]
    with open(real_core, "rb") as handle:
        handle.seek(section.offset)
        pairs = np.frombuffer(handle.read(section.size), dtype="<u8").reshape(-1, 2)
    table = np.full(int(pairs[:, 0].max()) + 1, p2mrecovery.INVALID, dtype=np.uint64)
    table[pairs[:, 0].astype(np.intp)] = pairs[:, 1]
    return table


@pytest.fixture(scope="session")
def raw_path(real_core: Path) -> Path:
    return derived_image(real_core, "raw")


@pytest.fixture(scope="session")
def parameters() -> dict:
    from volatility3_xen.layers import inguest

    found = inguest._read_isf(isf_path().resolve().as_uri())
    assert found is not None
    return found


@pytest.fixture(scope="session")
def layout(parameters: dict) -> KernelLayout:
    from volatility3_xen.layers import inguest

    banner = b"Linux version 6.1.0-47-cloud-amd64"
    return inguest.kernel_layout(parameters, banner)


class Image:
    """The raw image (memory-mapped) with some pages zeroed or patched: a reader."""

    def __init__(self, path: Path) -> None:
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.words = self.data.view("<u8")
        self.size = len(self.data)
        self.patches: dict[int, bytes] = {}

    def zero(self, *pfns: int) -> Image:
        for pfn in pfns:
            self.patches[int(pfn)] = bytes(PAGE)
        return self

    def set_word(self, address: int, value: int) -> Image:
        pfn = address // PAGE
        page = bytearray(self.patches.get(pfn, self.page(pfn)))
        offset = address % PAGE
        page[offset : offset + 8] = value.to_bytes(8, "little")
        self.patches[pfn] = bytes(page)
        return self

    def page(self, pfn: int) -> bytes:
        return self.patches.get(pfn) or bytes(self.data[pfn * PAGE : (pfn + 1) * PAGE])

    def word(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        data = bytearray(self.data[offset:end])
        for pfn, page in self.patches.items():
            lo, hi = max(offset, pfn * PAGE), min(end, (pfn + 1) * PAGE)
            if lo < hi:
                data[lo - offset : hi - offset] = page[lo - pfn * PAGE : hi - pfn * PAGE]
        return bytes(data)


def recover(image: Image, layout: KernelLayout, size: int | None = None):
    return recover_machine_frames(image.read, image.size if size is None else size, layout, "t")


def wrong_pairs(result, truth: np.ndarray) -> int:
    return int(np.count_nonzero(truth[result.pfns.astype(np.intp)] != result.mfns))


def kernel_pfn(layout: KernelLayout, address: int) -> int:
    return (address - layout.kernel_map) // PAGE


def anchor_pfn(raw_path: Path, layout: KernelLayout) -> int:
    return recover(Image(raw_path), layout).anchors[0][0]


def l1_pfn(image: Image, layout: KernelLayout, truth: np.ndarray, j: int) -> int:
    """pfn of the L1 table that maps direct-map pfns [512 j, 512 j + 512)."""
    entry = image.word(kernel_pfn(layout, layout.ident_l2) * PAGE + 8 * j)
    mfn = (entry & FRAME) >> 12
    return int(np.flatnonzero(truth == mfn)[0])


def list_page_pfn(image: Image, layout: KernelLayout, truth: np.ndarray, k: int) -> int:
    """pfn of the kernel's p2m list page for pfns [512 k, 512 k + 512): the page that
    holds exactly those machine frames."""
    pages = image.words[: image.size // 8].reshape(-1, 512)
    want = truth[512 * k : 512 * k + 512]
    hits = np.flatnonzero((pages[:, 0] == want[0]) & (pages[:, 1] == want[1]))
    hits = [h for h in hits if np.array_equal(pages[h], want)]
    assert len(hits) == 1
    return int(hits[0])


# -- the complete map ----------------------------------------------------------------------


def test_every_pair_equals_the_dump_core_p2m(raw_path: Path, layout: KernelLayout, truth):
    result = recover(Image(raw_path), layout)
    assert result.mapped == len(truth) == result.image_pages
    assert np.array_equal(result.pfns, np.arange(len(truth), dtype=np.uint64))
    assert np.array_equal(result.mfns, truth)
    assert result.conflicts == 0 and result.warnings == []
    assert len(result.anchors) == 1
    # The search starts at the range holding _end (the builder's tables follow the
    # kernel): a handful of 2 MiB ranges, not every one below the anchor (32 here).
    assert result.ranges_tested <= 4
    pfn, mfn = result.anchors[0]
    assert truth[pfn] == mfn
    top = kernel_pfn(layout, layout.top_table)
    assert result.linear_slot == (top, int(truth[top]))
    # The kernel's p2m list was read through the recovered tables and agrees everywhere.
    assert result.list_source.startswith("xen_p2m_addr")
    assert result.list_pages == result.list_pages_used == len(truth) // 512
    assert result.list_compared == result.list_agreed == len(truth)
    assert result.direct_map == 0xFFFF_8880_0000_0000


def test_domain_type_says_pv(raw_path: Path, layout: KernelLayout):
    image = Image(raw_path)
    assert p2mrecovery.is_pv_guest(image.read, layout)
    image.set_word(layout.domain_type - layout.kernel_map, 2)  # XEN_HVM_DOMAIN
    assert not p2mrecovery.is_pv_guest(image.read, layout)
    assert not p2mrecovery.is_pv_guest(lambda offset, length: b"", layout)


def test_direct_map_default_when_the_variable_is_unusable(raw_path: Path, layout: KernelLayout):
    image = Image(raw_path).set_word(layout.direct_map_variable - layout.kernel_map, 12345)
    assert p2mrecovery.direct_map_base(image.read, layout) == layout.direct_map


# -- damage --------------------------------------------------------------------------------


def test_anchor_page_zeroed_is_a_one_line_failure(raw_path: Path, layout: KernelLayout):
    image = Image(raw_path).zero(anchor_pfn(raw_path, layout))
    with pytest.raises(XenFormatError) as caught:
        recover(image, layout)
    message = str(caught.value)
    assert "no self-mapping anchor page" in message and "\n" not in message


def test_one_percent_of_pages_zeroed_still_complete(raw_path: Path, layout: KernelLayout, truth):
    anchor = anchor_pfn(raw_path, layout)
    rng = np.random.default_rng(1)
    lost = rng.choice(len(truth), len(truth) // 100, replace=False)
    assert anchor not in lost  # else the failure above is the expected outcome
    result = recover(Image(raw_path).zero(*lost), layout)
    assert wrong_pairs(result, truth) == 0
    assert result.mapped == len(truth)


def test_ten_percent_zeroed_partial_without_a_wrong_pair(raw_path: Path, layout, truth):
    rng = np.random.default_rng(0)
    lost = rng.choice(len(truth), len(truth) // 10, replace=False)
    assert anchor_pfn(raw_path, layout) not in lost
    result = recover(Image(raw_path).zero(*lost), layout)
    assert wrong_pairs(result, truth) == 0
    assert 0 < result.mapped < len(truth)
    assert any("could not be used" in warning for warning in result.warnings)


def test_lost_l1_filled_from_the_kernel_p2m(raw_path: Path, layout: KernelLayout, truth):
    image = Image(raw_path)
    lost = l1_pfn(image, layout, truth, 5)
    result = recover(image.zero(lost), layout)
    assert result.list_filled >= 512
    assert np.array_equal(result.mfns, truth) and result.mapped == len(truth)


def test_zeroed_p2m_page_is_refused_not_read_as_mfn_zero(raw_path: Path, layout, truth):
    image = Image(raw_path)
    lost_list = list_page_pfn(image, layout, truth, 7)
    lost_l1 = l1_pfn(image, layout, truth, 7)  # the same pfns have no page table either
    result = recover(image.zero(lost_list, lost_l1), layout)
    assert result.list_pages_refused == 1
    assert wrong_pairs(result, truth) == 0
    assert not np.isin(np.arange(512 * 7, 512 * 8), result.pfns).any()
    assert result.mapped == len(truth) - 512


def test_planted_pair_sharing_an_mfn_is_a_conflict(raw_path: Path, layout: KernelLayout, truth):
    image = Image(raw_path)
    table = l1_pfn(image, layout, truth, 9)
    address = table * PAGE + 8 * 3  # maps pfn 512*9 + 3
    entry = image.word(address)
    image.set_word(address, (entry & ~FRAME) | (int(truth[0x100]) << 12))
    result = recover(image, layout)
    assert result.conflicts == 2
    assert wrong_pairs(result, truth) == 0
    assert not np.isin([0x100, 512 * 9 + 3], result.pfns).any()
    assert any("in conflict" in warning for warning in result.warnings)
    assert any("pfn 0x100" in example for example in result.conflict_examples)


def test_planted_pair_against_the_kernel_p2m_is_a_conflict(raw_path: Path, layout, truth):
    image = Image(raw_path)
    table = l1_pfn(image, layout, truth, 9)
    entry = image.word(table * PAGE + 8 * 3)
    image.set_word(table * PAGE + 8 * 3, (entry & ~FRAME) | (0x155555 << 12))
    result = recover(image, layout)
    assert result.conflicts == 1
    assert wrong_pairs(result, truth) == 0 and 512 * 9 + 3 not in result.pfns
    assert "p2m names another machine frame" in result.conflict_examples[0]


def test_foreign_p2m_entry_drops_its_pair(raw_path: Path, layout: KernelLayout, truth):
    image = Image(raw_path)
    page = list_page_pfn(image, layout, truth, 11)
    pfn = 512 * 11 + 20
    image.set_word(page * PAGE + 8 * 20, int(truth[pfn]) | 1 << 63)
    result = recover(image, layout)
    assert result.foreign_dropped == 1 and pfn not in result.pfns
    assert wrong_pairs(result, truth) == 0 and result.mapped == len(truth) - 1


def test_p2m_tree_of_old_kernels(raw_path: Path, layout: KernelLayout, truth):
    """<= 3.18: p2m_top[] -> mid[] -> leaf pages, reached through the direct map.  Built
    here from the real list pages in free (zero) pages; one L1 lost, so the tree must fill."""
    image = Image(raw_path)
    pages = image.words[: image.size // 8].reshape(-1, 512)
    free = [int(p) for p in np.flatnonzero(~pages.any(axis=1))[-3:]]
    top, mid, variable = free
    direct = 0xFFFF_8880_0000_0000
    for k in range(len(truth) // 512):
        image.set_word(mid * PAGE + 8 * k, direct + list_page_pfn(image, layout, truth, k) * PAGE)
    image.set_word(top * PAGE, direct + mid * PAGE)
    image.set_word(variable * PAGE, direct + top * PAGE)
    lost = l1_pfn(image, layout, truth, 5)
    tree = KernelLayout(
        **{
            **{f: getattr(layout, f) for f in layout.__dataclass_fields__},
            "p2m_list": None,
            "p2m_size": None,
            "p2m_top": layout.kernel_map + variable * PAGE,
        }
    )
    result = recover(image.zero(lost), tree)
    assert result.list_source == "p2m_top (tree)"
    assert result.list_filled >= 512 and result.list_agreed == result.list_compared > 0
    assert result.mapped == len(truth) and wrong_pairs(result, truth) == 0


# -- hostile images ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, 16 << 20])
def test_truncated_image_fails_in_one_line(raw_path: Path, layout: KernelLayout, size: int):
    image = Image(raw_path)
    with pytest.raises(XenFormatError) as caught:
        recover_machine_frames(lambda o, n: image.read(o, min(n, max(0, size - o))), size, layout)
    assert "\n" not in str(caught.value)


def test_random_image_fails_in_one_line(layout: KernelLayout):
    noise = np.random.default_rng(7).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    with pytest.raises(XenFormatError):
        recover_machine_frames(lambda o, n: noise[o : o + n], len(noise), layout)


def test_hostile_p2m_size_is_bounded_by_the_image(raw_path: Path, layout, truth):
    """xen_p2m_size ~0: the list is read only as far as the image has pfns (arrays are
    sized by the image, never by a value read from it)."""
    image = Image(raw_path).set_word(layout.p2m_size - layout.kernel_map, (1 << 64) - 1)
    result = recover(image, layout)
    assert result.list_pages == len(truth) // 512
    assert result.mapped == len(truth) and wrong_pairs(result, truth) == 0


def test_hostile_l2_every_entry_the_same_l1(raw_path: Path, layout: KernelLayout):
    """Every entry of level2_ident_pgt names one L1: bounded work, one-line failure (the
    anchor's range is no longer named)."""
    image = Image(raw_path)
    l2 = kernel_pfn(layout, layout.ident_l2) * PAGE
    first = image.word(l2)
    for j in range(512):
        image.set_word(l2 + 8 * j, first)
    with pytest.raises(XenFormatError) as caught:
        recover(image, layout)
    assert "no self-mapping anchor page" in str(caught.value)


# -- the image model -----------------------------------------------------------------------


def test_inguest_image_gives_the_dump_core_interface(raw_path: Path, layout, truth):
    result = recover(Image(raw_path), layout)
    image = InGuestPVImage("t", present_runs([(0, len(truth) * PAGE)]), result, layout)
    assert image.is_pv and image.guest_type == "PV" and image.unmapped_pages == 0
    runs = image.page_runs()
    assert list(runs.key) == [0] and list(runs.value) == [0] and list(runs.count) == [len(truth)]
    for pfn in (0, 0x2A10, 0x3E25, len(truth) - 1):
        assert image.pfn_to_mfn(pfn) == truth[pfn]
        assert image.mfn_to_pfn(int(truth[pfn])) == pfn
        assert image.physical_to_machine(pfn * PAGE + 5) == int(truth[pfn]) * PAGE + 5
    m2p = image.machine_frames.m2p_runs
    assert sum(m2p.count) == len(truth)
    for key, value, count in zip(m2p.key, m2p.value, m2p.count):
        assert np.array_equal(truth[value : value + count], np.arange(key, key + count))
    assert image.mfn_to_pfn(0x1) is None


def test_present_runs_and_unmapped_pages(raw_path: Path, layout: KernelLayout, truth):
    """A LiME-like image with a hole: only the pfns it holds count; pfns without a machine
    frame are counted and warned about."""
    result = recover(Image(raw_path).zero(l1_pfn(Image(raw_path), layout, truth, 7)), layout)
    holes = present_runs([(0, 0x1000 * PAGE), (0x1000 * PAGE + 100, 0x7000 * PAGE - 100)])
    assert list(holes.key) == [0, 0x1001] and list(holes.count) == [0x1000, 0x7000 - 1]
    image = InGuestPVImage("t", holes, result, layout, container="LiME")
    assert image.present_pages == len(truth) - 1
    assert image.unmapped_pages == image.present_pages - (result.mapped - 1)


def test_xen_info_facts(raw_path: Path, layout: KernelLayout, truth):
    result = recover(Image(raw_path), layout)
    image = InGuestPVImage("t", present_runs([(0, len(truth) * PAGE)]), result, layout)
    facts = {(fact.group, fact.field): fact for fact in report.facts(image)}
    assert facts["recovery", "pfns_mapped"].value == len(truth)
    assert facts["recovery", "pfns_unmapped"].value == 0
    assert facts["recovery", "conflicts"].value == 0
    assert facts["recovery", "anchor"].text.startswith("pfn 0x")
    assert facts["cross_check", "agreement"].value == "100.00 %"
    assert facts["guest", "type"].value == "PV"
    assert facts["file", "container"].value == "raw"


def test_rounds_are_capped(raw_path: Path, layout: KernelLayout, truth, monkeypatch):
    """A chain that keeps growing one table per round stops at the cap, with a warning
    and only sound pairs (the real guest needs 6 rounds in all)."""
    monkeypatch.setattr(p2mrecovery, "_MAX_ROUNDS", 2)
    result = recover(Image(raw_path), layout)
    assert any("rounds stopped after 2" in warning for warning in result.warnings)
    assert wrong_pairs(result, truth) == 0
