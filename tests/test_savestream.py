"""The save-stream reader without Volatility: wrappers, page map, facts, damage.

Small synthetic guests written by ``testdata.savewriter``: every page's contents name its
pfn and copy, so a page read through the map is checked against the copy it must hold.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from volatility3_xen.formats import savestream as ss
from volatility3_xen.formats import vcpu
from volatility3_xen.formats.errors import XenFormatError
from volatility3_xen.formats.image import GUEST_HVM, GUEST_PV
from volatility3_xen.formats.saveimage import XenSaveImage, probe_save_image
from volatility3_xen.testdata import savewriter as sw

PAGE = 4096


def page(pfn: int, copy: int = 0) -> bytes:
    """Contents that say which pfn and which copy they are."""
    return struct.pack("<QQ", pfn, copy) * (PAGE // 16)


def batch(pfns: list[int], types: list[int] | int = 0, copy: int = 0) -> sw.PageBatch:
    kinds = [types] * len(pfns) if isinstance(types, int) else types
    data = b"".join(page(p, copy) for p, t in zip(pfns, kinds) if t < sw.TYPE_BROKEN)
    return sw.PageBatch(pfns, kinds, data)


def read_page(path: Path, image: XenSaveImage, pfn: int) -> bytes | None:
    runs = image.page_runs()
    offset = runs.lookup(pfn)
    if offset is None:
        return None
    # Values are byte offsets: lookup adds (pfn - key), so redo it in bytes.
    i = runs.find(pfn)
    offset = runs.value[i] + (pfn - runs.key[i]) * PAGE
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(PAGE)


def mapped(image: XenSaveImage) -> set[int]:
    runs = image.page_runs()
    return {k + i for k, c in zip(runs.key, runs.count) for i in range(c)}


def small_spec(**changes) -> sw.SaveSpec:
    spec = sw.SaveSpec(
        batches=[batch(list(range(0, 40))), batch(list(range(40, 64)) + [200, 201, 202])],
        vcpus={0: {"rip": 0xFFFFFFFF81000000, "cr3": 0x5000, "flags": vcpu.VCPU_FLAG_ONLINE}},
    )
    for name, value in changes.items():
        setattr(spec, name, value)
    return spec


CASES = [
    (guest, wrapper, order)
    for guest in ("pv", "hvm")
    for wrapper in sw.WRAPPERS
    for order in ("little", "big")
    if not (wrapper == "xenopsd" and order == "big")
]


@pytest.mark.parametrize(("guest", "wrapper", "order"), CASES)
def test_every_wrapper_and_byte_order_maps_every_page(
    tmp_path: Path, guest: str, wrapper: str, order: str
) -> None:
    path = tmp_path / "guest.save"
    spec = small_spec(guest=guest, wrapper=wrapper, byteorder=order)
    sw.write_save(path, spec)
    assert probe_save_image(_reader(path), path.stat().st_size).is_xen
    image = XenSaveImage.open(path)
    assert image.warnings == []
    assert image.guest_type == (GUEST_PV if guest == "pv" else GUEST_HVM)
    assert image.byteorder == order
    assert image.machine_frames is None
    kinds = [w.kind for w in image.wrappers]
    assert (
        kinds
        == {
            "xl": ["xl", "libxl", "libxc"],
            "libxl": ["libxl", "libxc"],
            "libxc": ["libxc"],
            "xenopsd": ["xenopsd", "libxc"],
        }[wrapper]
    )
    assert all(w.byteorder == order for w in image.wrappers if w.kind != "xenopsd")
    expected = set(range(64)) | {200, 201, 202}
    assert mapped(image) == expected
    for pfn in expected:
        assert read_page(path, image, pfn) == page(pfn)
    for hole in (64, 199, 203, 1 << 40):
        assert image.page_runs().find(hole) < 0
        assert not image.has_pfn(hole)
    assert image.page_stats.records == 2
    assert image.page_stats.entries == 67
    assert image.record_counts["PAGE_DATA"] == 2
    if wrapper == "xl":
        assert image.config is not None and image.config["c_info"]["type"] == guest
    if wrapper == "xenopsd":
        assert image.xenops_metadata is not None and "word_size" in image.xenops_metadata
    if guest == "pv":
        assert image.pv_info == (8, 4)
        assert image.p2m_frames == 1
        (context,) = image.vcpus()
        assert context.slot == 0 and context.registers["cr3"] == 0x5000


def _reader(path: Path):
    data = path.read_bytes()
    return lambda offset, length: data[offset : offset + length]


def test_duplicates_map_to_the_last_copy_and_a_later_xtab_invalidates(tmp_path: Path) -> None:
    path = tmp_path / "live.save"
    spec = small_spec(
        batches=[
            batch(list(range(32))),
            batch([5, 6, 7, 30, 31, 40], copy=1),  # pages dirtied during a live migration
            batch([6, 20], [0, sw.TYPE_XTAB], copy=2),  # 20 ballooned out: now invalid
            batch([41, 7], copy=3),
        ]
    )
    sw.write_save(path, spec)
    image = XenSaveImage.open(path)
    want = {p: 0 for p in range(32)} | {5: 1, 6: 2, 7: 3, 30: 1, 31: 1, 40: 1, 41: 3}
    del want[20]
    assert mapped(image) == set(want)
    for pfn, copy in want.items():
        assert read_page(path, image, pfn) == page(pfn, copy), pfn
    assert image.page_stats.duplicates == 8
    assert any("last copy" in w for w in image.warnings)


def test_xtab_xalloc_broken_carry_no_data_and_read_as_invalid(tmp_path: Path) -> None:
    path = tmp_path / "types.save"
    types = [0, sw.TYPE_XTAB, 0, sw.TYPE_XALLOC, sw.TYPE_BROKEN, 0x1, 0xC, sw.TYPE_XTAB]
    spec = small_spec(batches=[batch(list(range(100, 108)), types)])
    sw.write_save(path, spec)
    image = XenSaveImage.open(path)
    assert mapped(image) == {100, 102, 105, 106}
    for pfn in (100, 102, 105, 106):
        assert read_page(path, image, pfn) == page(pfn)
    stats = image.page_stats
    assert stats.pages_with_data == 4 and stats.entries == 8
    assert stats.by_type == {
        "NOTAB": 2,
        "XTAB": 2,
        "XALLOC": 1,
        "BROKEN": 1,
        "L1TAB": 1,
        "L4TAB_PIN": 1,
    }


def test_checkpointed_libxl_stream_resumes_libxc_after_checkpoint_end(tmp_path: Path) -> None:
    path = tmp_path / "remus.save"
    spec = small_spec(
        batches=[batch(list(range(16))), batch([3, 4, 16], copy=1), batch([4, 17], copy=2)],
        checkpoint_after=[0, 1],
    )
    sw.write_save(path, spec)
    image = XenSaveImage.open(path)
    assert image.page_stats.duplicates == 3
    assert image.page_stats.checkpoints == 2
    assert image.record_counts["libxl:CHECKPOINT_END"] == 2
    want = {p: 0 for p in range(16)} | {3: 1, 4: 2, 16: 1, 17: 2}
    assert mapped(image) == set(want)
    for pfn, copy in want.items():
        assert read_page(path, image, pfn) == page(pfn, copy)


def test_truncated_inside_page_data_maps_the_whole_pages_only(tmp_path: Path) -> None:
    path = tmp_path / "cut.save"
    layout = sw.write_save(path, small_spec())
    second = layout.page_records[1]
    cut = second.data_at + 10 * PAGE + 123  # 10 whole pages of the second record remain
    os.truncate(path, cut)
    image = XenSaveImage.open(path)
    assert any("without an END record" in w for w in image.warnings)
    want = set(range(40)) | set(range(40, 50))
    assert mapped(image) == want
    assert set(layout.expected_offsets(file_size=cut)) == want
    for pfn in want:
        assert read_page(path, image, pfn) == page(pfn)


def test_truncated_inside_a_pfn_array_keeps_the_earlier_records(tmp_path: Path) -> None:
    path = tmp_path / "cut.save"
    layout = sw.write_save(path, small_spec())
    os.truncate(path, layout.page_records[1].offset + 40)
    image = XenSaveImage.open(path)
    assert mapped(image) == set(range(40))
    assert any("pfn array is cut short" in w for w in image.warnings)


def test_truncated_before_any_page_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.save"
    layout = sw.write_save(path, small_spec())
    os.truncate(path, layout.page_records[0].offset + 20)
    with pytest.raises(XenFormatError) as info:
        XenSaveImage.open(path)
    assert "\n" not in str(info.value) and "PAGE_DATA" in str(info.value)


def test_missing_end_records_warn(tmp_path: Path) -> None:
    path = tmp_path / "noend.save"
    sw.write_save(path, small_spec(end=False))
    image = XenSaveImage.open(path)
    assert mapped(image) == set(range(64)) | {200, 201, 202}
    assert any("without an END record" in w for w in image.warnings)


def test_legacy_streams_are_refused_naming_convert_legacy_stream(tmp_path: Path) -> None:
    path = tmp_path / "legacy.save"
    header = ss.XL_MAGIC + struct.pack("<4I", ss.XL_BYTEORDER_VALUE, ss.XL_FLAG_JSON, 0, 0)
    path.write_bytes(header + b"\0" * 64)
    probe = probe_save_image(_reader(path), path.stat().st_size)
    assert probe.is_xen and "convert-legacy-stream" in (probe.problem or "")
    with pytest.raises(XenFormatError, match="legacy.*convert-legacy-stream"):
        XenSaveImage.open(path)
    path.write_bytes(ss.XENOPS_LEGACY_SIGNATURE + b"\0" * 64)
    assert "convert-legacy-stream" in (probe_save_image(_reader(path), 79).problem or "")
    with pytest.raises(XenFormatError, match="legacy xenopsd"):
        XenSaveImage.open(path)
    path.write_bytes(ss.XENOPS_SIGNATURE + struct.pack("<QQ", ss.XENOPS_LIBXC_LEGACY, 0))
    with pytest.raises(XenFormatError, match="legacy.*convert-legacy-stream"):
        XenSaveImage.open(path)


def test_probe_says_no_to_other_files_and_names_header_damage(tmp_path: Path) -> None:
    def probe(data: bytes):
        return probe_save_image(lambda o, n: data[o : o + n], len(data))

    assert not probe(b"\x7fELF" + b"\0" * 60).is_xen
    assert not probe(b"\0" * 4096).is_xen
    assert not probe(b"").is_xen
    path = tmp_path / "ok.save"
    sw.write_save(path, small_spec(wrapper="libxc"))
    good = path.read_bytes()
    assert probe(good).problem is None
    bad_version = good[:12] + struct.pack(">I", 9) + good[16:]
    assert "version 9" in (probe(bad_version).problem or "")
    bad_type = good[:24] + struct.pack("<I", 77) + good[28:]
    assert "domain type" in (probe(bad_type).problem or "")
    sw.write_save(path, small_spec())
    xl = bytearray(path.read_bytes())
    struct.pack_into("<I", xl, 44, len(xl))  # optional data past the end
    assert probe(bytes(xl)).problem


def test_huge_lengths_and_counts_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "huge.save"
    layout = sw.write_save(path, small_spec(wrapper="libxc"))
    data = bytearray(path.read_bytes())
    first = layout.page_records[0].offset
    struct.pack_into("<II", data, first + 4, 0xFFFFFFF8, 0xFFFFFFFF)  # length, count
    path.write_bytes(data)
    with pytest.raises(XenFormatError):
        XenSaveImage.open(path)
    # A huge non-page record after usable pages: a warning, the pages stay.
    extra = [(0x80000001, b"x" * 16)]
    layout = sw.write_save(path, small_spec(wrapper="libxc", extra_records=extra))
    (offset,) = [at for name, at in layout.records if name == "0x80000001"]
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, offset + 4, 0xFFFFFFFF)
    path.write_bytes(data)
    image = XenSaveImage.open(path)
    assert len(mapped(image)) == 67
    assert any("runs past the end" in w for w in image.warnings)


def test_config_is_parsed_and_broken_json_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "cfg.save"
    config = sw.default_config("pv") | {"extra": "é \u2028"}
    sw.write_save(path, small_spec(config=config))
    assert XenSaveImage.open(path).config == json.loads(json.dumps(config))
    data = bytearray(path.read_bytes())
    start = data.index(b"{")
    data[start] = ord("[")
    path.write_bytes(bytes(data))
    image = XenSaveImage.open(path)
    assert image.config is None
    assert any("JSON domain config" in w for w in image.warnings)


def test_mismatched_config_type_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "cfg.save"
    sw.write_save(path, small_spec(config=sw.default_config("hvm")))
    image = XenSaveImage.open(path)
    assert image.guest_type == GUEST_PV
    assert any("following the domain header" in w for w in image.warnings)


def test_pv_32bit_vcpus_use_the_compat_layout(tmp_path: Path) -> None:
    path = tmp_path / "pv32.save"
    regs = {"eip": 0xC0100000, "cr3": 0x1234 << 12, "flags": vcpu.VCPU_FLAG_ONLINE}
    sw.write_save(path, small_spec(guest_width=4, pt_levels=3, vcpus={0: regs, 3: regs}))
    image = XenSaveImage.open(path)
    assert image.pv_info == (4, 3)
    contexts = image.vcpus()
    assert [c.slot for c in contexts] == [0, 3]
    assert all(
        c.layout == vcpu.LAYOUT_X86_32 and c.registers["eip"] == 0xC0100000 for c in contexts
    )
    assert set(image.pv_vcpu_contexts) == {0, 3}


def test_hvm_context_and_params_are_kept(tmp_path: Path) -> None:
    hvmcontext = pytest.importorskip("volatility3_xen.formats.hvmcontext")
    path = tmp_path / "hvm.save"
    blob = sw.hvm_context_for({"rip": 0x1234, "cr3": 0x6010000})
    sw.write_save(path, small_spec(guest="hvm", hvm_context=blob, hvm_params={2: 0xFEFFF}))
    image = XenSaveImage.open(path)
    assert image.hvm_context == blob
    assert image.hvm_params == {2: 0xFEFFF}
    (cpu,) = image.vcpus()
    assert cpu.registers["rip"] == 0x1234
    assert hvmcontext.decode_hvm_vcpus(blob)[0].registers["cr3"] == 0x6010000


def test_pages_need_not_be_sorted_and_large_pfns_work(tmp_path: Path) -> None:
    path = tmp_path / "order.save"
    pfns = [0xFFFFFFFFF, 7, 3, 0xFEFF0, 4, 5]
    sw.write_save(path, small_spec(batches=[batch(pfns)]))
    image = XenSaveImage.open(path)
    assert mapped(image) == set(pfns)
    for pfn in pfns:
        assert read_page(path, image, pfn) == page(pfn)


def _verify_stream_v2() -> tuple[Path, Path] | None:
    """Xen's own stream checker (Debian's xen-utils ships it with its Python package):
    ``VX3_XEN_TOOLS`` (a directory holding ``bin/verify-stream-v2`` and
    ``lib/python/xen``), else an installed ``/usr/lib/xen-*``."""
    candidates = [Path(os.environ["VX3_XEN_TOOLS"])] if "VX3_XEN_TOOLS" in os.environ else []
    candidates += sorted(Path("/usr/lib").glob("xen-*"))
    for root in candidates:
        script, library = root / "bin" / "verify-stream-v2", root / "lib" / "python"
        if script.exists() and (library / "xen" / "migration").exists():
            return script, library
    return None


@pytest.mark.parametrize(
    ("guest", "wrapper"), [(g, w) for g in ("pv", "hvm") for w in ("xl", "libxl", "libxc")]
)
def test_xens_verify_stream_v2_accepts_the_writers_streams(
    tmp_path: Path, guest: str, wrapper: str
) -> None:
    tool = _verify_stream_v2()
    if tool is None:
        pytest.skip(
            "Xen's verify-stream-v2 not found "
            "(set VX3_XEN_TOOLS to an unpacked xen-utils /usr/lib/xen-4.x)"
        )
    script, library = tool
    path = tmp_path / "guest.save"
    types = [0, 0, sw.TYPE_XTAB, 0x1, 0xC, sw.TYPE_XALLOC] + [0] * 34
    spec = small_spec(guest=guest, wrapper=wrapper)
    spec.batches = [batch(list(range(40)), types), batch([3, 4, 50], copy=1)]
    sw.write_save(path, spec)
    result = subprocess.run(
        [sys.executable, str(script), "-f", wrapper, "-i", str(path)],
        env={**os.environ, "PYTHONPATH": str(library)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]


@pytest.mark.parametrize("seed", range(6))
def test_random_resends_match_the_writers_last_wins_account(tmp_path: Path, seed: int) -> None:
    """Streams that resend pfns in random order with random types (a live migration's
    later rounds): the map is exactly the writer's account of each pfn's last entry."""
    rng = random.Random(seed)
    batches = []
    for copy in range(rng.randrange(2, 6)):
        pfns = rng.sample(range(300), rng.randrange(1, 120))
        if rng.random() < 0.5:
            pfns.sort()
        types = [rng.choice([0, 0, 0, 1, 0xC, sw.TYPE_XTAB, sw.TYPE_XALLOC]) for _ in pfns]
        batches.append(batch(pfns, types, copy=copy))
    path = tmp_path / "resend.save"
    layout = sw.write_save(path, small_spec(batches=batches, guest=rng.choice(["pv", "hvm"])))
    cut = rng.choice([layout.size, rng.randrange(layout.page_records[-1].offset, layout.size)])
    os.truncate(path, cut)
    image = XenSaveImage.open(path)
    runs = image.page_runs()
    got = {
        key + i: value + i * PAGE
        for key, value, count in zip(runs.key, runs.value, runs.count)
        for i in range(count)
    }
    assert got == layout.expected_offsets(file_size=cut)
