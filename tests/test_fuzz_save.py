"""Structure-aware fuzzing of the save-stream reader, layer and stacker (``pytest -m fuzz``).

Small streams from ``testdata.savewriter`` (every wrapper, both byte orders, a checkpointed
one) are damaged by *recipes*, plain data so that any input that ever broke the reader can
be replayed: record types and lengths (up to 2^32 - 1), PAGE_DATA counts (up to 2^32 - 1)
and pfn entries, wrapper header fields (xl optional data, libxl/libxc versions and
options, domain type, page shift, xenopsd record types and 64-bit lengths), zero-length
records, wrappers nested in the wrong place, truncation, appended junk and byte flips.
Properties:

- constructing ``XenSaveImage`` raises nothing but ``XenFormatError``, and everything it
  decodes (facts, ``vcpus()``) raises nothing;
- every mapped page lies wholly inside the file; after a truncation alone the map equals
  the writer's own account (``SaveLayout.expected_offsets``) exactly;
- the stacker on a FileLayer returns a layer, a refusal or None, never raises; through the
  layer every mapped page reads the file's bytes and other reads raise only
  InvalidAddressException;
- each example finishes within 5 s (hypothesis deadline: a guard against work that grows
  with a header field);
- ``test_open_memory_is_bounded``: the huge-field recipes open in a subprocess under
  ``RLIMIT_AS`` = 2 GiB.

Profiles: ``ci`` (default; derandomized, a few hundred examples) and ``long``
(``VX3_FUZZ=long``).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
from datetime import timedelta
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from volatility3.framework import contexts, exceptions
from volatility3.framework.layers.physical import FileLayer

from volatility3_xen.formats import savestream as ss
from volatility3_xen.formats.errors import XenFormatError
from volatility3_xen.formats.saveimage import XenSaveImage, probe_save_image
from volatility3_xen.layers.memory import XenRefusedLayer
from volatility3_xen.layers.saveimage import XenSaveImageLayer, XenSaveImageStacker
from volatility3_xen.testdata import savewriter as sw

pytestmark = pytest.mark.fuzz

settings.register_profile(
    "save-ci",
    max_examples=300,
    derandomize=True,
    deadline=timedelta(seconds=5),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "save-long",
    max_examples=5000,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = "save-long" if os.environ.get("VX3_FUZZ") == "long" else "save-ci"
PAGE = 4096


def _page(pfn: int, copy: int) -> bytes:
    return struct.pack("<QQ", pfn, copy) * (PAGE // 16)


def _batch(pfns: list[int], types: list[int] | None = None, copy: int = 0) -> sw.PageBatch:
    kinds = types or [0] * len(pfns)
    data = b"".join(_page(p, copy) for p, t in zip(pfns, kinds) if t < sw.TYPE_BROKEN)
    return sw.PageBatch(pfns, kinds, data)


BASE_SPECS = {
    "pv-xl": dict(guest="pv", wrapper="xl"),
    "pv-libxl-be": dict(guest="pv", wrapper="libxl", byteorder="big"),
    "hvm-libxc": dict(guest="hvm", wrapper="libxc"),
    "hvm-xenopsd": dict(guest="hvm", wrapper="xenopsd"),
    "pv-checkpointed": dict(guest="pv", wrapper="xl", checkpoint_after=[0]),
}


@cache
def base(name: str) -> tuple[bytes, sw.SaveLayout]:
    spec = sw.SaveSpec(
        batches=[
            _batch(list(range(12))),
            _batch([3, 4, 20, 21, 22, 9], [0, sw.TYPE_XTAB, 0, 0xC, sw.TYPE_XALLOC, 0], copy=1),
            _batch([40, 41, 42]),
        ],
        vcpus={0: {"rip": 0x1000, "cr3": 0x3000}},
        hvm_context=sw.hvm_context_for({"rip": 0x1000, "cr3": 0x3000}),
        hvm_params={2: 0xFEFFF},
        **BASE_SPECS[name],
    )
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "base.save"
        layout = sw.write_save(path, spec)
        return path.read_bytes(), layout


# --- recipes ----------------------------------------------------------------------------------

INTERESTING = [0, 1, 7, 8, 9, 0xFF, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF8, 0xFFFFFFFF]
INTERESTING64 = INTERESTING + [1 << 32, 1 << 52, 1 << 63, (1 << 64) - 1]


def _order(name: str) -> str:
    return ">" if name.endswith("-be") else "<"


def _pack(fmt: str, out: bytearray, at: int, value: int) -> None:
    """``struct.pack_into`` where the field still lies inside ``out`` (after a cut)."""
    if 0 <= at and at + struct.calcsize(fmt) <= len(out):
        struct.pack_into(fmt, out, at, value)


def apply(name: str, recipe: list[list]) -> tuple[bytes, bool]:
    """The damaged stream, and whether only truncation touched it."""
    data, layout = base(name)
    out = bytearray(data)
    order = _order(name)
    records = [offset for _, offset in layout.records]
    only_truncated = all(step[0] == "truncate" for step in recipe)
    for step in recipe:
        kind = step[0]
        if kind == "record-type":
            _pack(order + "I", out, records[step[1] % len(records)], step[2])
        elif kind == "record-length":
            _pack(order + "I", out, records[step[1] % len(records)] + 4, step[2])
        elif kind == "page-count":
            page = layout.page_records[step[1] % len(layout.page_records)]
            _pack(order + "I", out, page.offset + 8, step[2])
        elif kind == "pfn":
            page = layout.page_records[step[1] % len(layout.page_records)]
            index = step[2] % len(page.words)
            _pack(order + "Q", out, page.offset + 16 + 8 * index, step[3])
        elif kind == "header":
            # (absolute offset of a wrapper field, struct format, value)
            where = _header_offset(name, data, step[1])
            if where is not None:
                fmt, at = where
                _pack(fmt, out, at, step[2] & ((1 << (8 * struct.calcsize(fmt))) - 1))
        elif kind == "truncate":
            del out[step[1] % (len(out) + 1) :]
        elif kind == "append":
            out += bytes(step[1])
        elif kind == "flip":
            if out:
                out[step[1] % len(out)] ^= step[2] or 1
        elif kind == "nest":
            out = bytearray(_nest(step[1], bytes(out)))
    return bytes(out), only_truncated


def _header_offset(name: str, data: bytes, field: str) -> tuple[str, int] | None:
    """Where a wrapper header field is in the base stream (None: not in this one)."""
    order = _order(name)
    libxl_at = data.find(b"LibxlFmt")
    libxc_at = data.find(b"\xff" * 8 + b"XENF")
    xenops = data.startswith(ss.XENOPS_SIGNATURE)
    places = {
        "xl-byteorder": ("<I", 32) if data.startswith(ss.XL_MAGIC) else None,
        "xl-flags": (order + "I", 36) if data.startswith(ss.XL_MAGIC) else None,
        "xl-optional-len": (order + "I", 44) if data.startswith(ss.XL_MAGIC) else None,
        "xl-config-len": (order + "I", 48) if data.startswith(ss.XL_MAGIC) else None,
        "libxl-version": (">I", libxl_at + 8) if libxl_at >= 0 else None,
        "libxl-options": (">I", libxl_at + 12) if libxl_at >= 0 else None,
        "libxc-version": (">I", libxc_at + 12) if libxc_at >= 0 else None,
        "libxc-options": (">H", libxc_at + 16) if libxc_at >= 0 else None,
        "domain-type": (order + "I", libxc_at + 24) if libxc_at >= 0 else None,
        "page-shift": (order + "H", libxc_at + 28) if libxc_at >= 0 else None,
        "xenops-type": ("<Q", 15) if xenops else None,
        "xenops-length": ("<Q", 23) if xenops else None,
        "xenops-libxc-length": ("<Q", libxc_at - 8) if xenops and libxc_at >= 8 else None,
    }
    return places.get(field)


def _nest(how: str, data: bytes) -> bytes:
    """Wrappers in places they do not belong (or twice)."""
    if how == "xenopsd-around":
        return (
            ss.XENOPS_SIGNATURE
            + struct.pack("<QQ", ss.XENOPS_LIBXC, len(data))
            + data
            + struct.pack("<QQ", ss.XENOPS_END, 0)
        )
    if how == "xenopsd-libxl-around":
        return ss.XENOPS_SIGNATURE + struct.pack("<QQ", ss.XENOPS_LIBXL, 0) + data
    if how == "xl-around":
        return (
            ss.XL_MAGIC
            + struct.pack("<4I", ss.XL_BYTEORDER_VALUE, ss.XL_FLAG_STREAMV2, 0, 0)
            + data
        )
    if how == "doubled":
        return data + data
    return data


HEADER_FIELDS = [
    "xl-byteorder",
    "xl-flags",
    "xl-optional-len",
    "xl-config-len",
    "libxl-version",
    "libxl-options",
    "libxc-version",
    "libxc-options",
    "domain-type",
    "page-shift",
    "xenops-type",
    "xenops-length",
    "xenops-libxc-length",
]
NESTS = ["xenopsd-around", "xenopsd-libxl-around", "xl-around", "doubled"]

steps = st.one_of(
    st.tuples(
        st.just("record-type"), st.integers(0, 40), st.sampled_from(INTERESTING + list(range(20)))
    ),
    st.tuples(st.just("record-length"), st.integers(0, 40), st.sampled_from(INTERESTING)),
    st.tuples(st.just("page-count"), st.integers(0, 3), st.sampled_from(INTERESTING)),
    st.tuples(
        st.just("pfn"), st.integers(0, 3), st.integers(0, 20), st.sampled_from(INTERESTING64)
    ),
    st.tuples(st.just("header"), st.sampled_from(HEADER_FIELDS), st.sampled_from(INTERESTING64)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("append"), st.binary(max_size=64)),
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("nest"), st.sampled_from(NESTS)),
).map(list)
recipes = st.tuples(st.sampled_from(sorted(BASE_SPECS)), st.lists(steps, min_size=1, max_size=4))

# Inputs that once broke the reader (or nearly): replayed on every run.
REGRESSIONS: list[tuple[str, list[list]]] = [
    ("pv-xl", [["page-count", 0, 0xFFFFFFFF]]),
    ("pv-xl", [["record-length", 5, 0xFFFFFFFF]]),
    ("hvm-xenopsd", [["header", "xenops-length", (1 << 64) - 1]]),
    ("hvm-xenopsd", [["header", "xenops-libxc-length", (1 << 63)]]),
    ("pv-libxl-be", [["header", "libxl-options", 0]]),  # the byte order lies
    ("pv-checkpointed", [["truncate", 30000]]),
    ("hvm-libxc", [["nest", "doubled"]]),
    ("hvm-libxc", [["nest", "xl-around"]]),
    ("pv-xl", [["nest", "xenopsd-around"]]),
    ("pv-xl", [["header", "xl-optional-len", 0xFFFFFFFF]]),
    ("pv-xl", [["header", "xl-config-len", 0xFFFFFFF0]]),
    ("pv-xl", [["header", "page-shift", 0xFFFF]]),
    ("hvm-libxc", [["record-type", 30, 0]]),
    ("pv-xl", [["pfn", 1, 0, 0x5000_0000_0000_0003]]),  # a reserved page type
]


# --- the check --------------------------------------------------------------------------------


def _reader(data: bytes):
    return lambda offset, length: data[max(offset, 0) : max(offset, 0) + max(length, 0)]


def check(name: str, recipe: list[list], through_stacker: bool) -> None:
    data, only_truncated = apply(name, recipe)
    probe_save_image(_reader(data), len(data))
    view = memoryview(data)
    try:
        image = XenSaveImage(_reader(data), len(data), map_region=lambda o, n: view[o : o + n])
    except XenFormatError as exc:
        assert "\n" not in str(exc)
        image = None
    if only_truncated:
        _, layout = base(name)
        expected = layout.expected_offsets(file_size=len(data))
        if image is None:
            assert expected == {}
        else:
            assert _offsets(image) == expected
    if image is not None:
        for _key, value, count in zip(
            *(image.page_runs().__dict__[c] for c in ("key", "value", "count"))
        ):
            assert count > 0
            assert value + count * PAGE <= len(data)
        image.vcpus()
        facts = (image.wrappers, image.config, image.record_counts, image.page_stats)
        blobs = (image.hvm_params, image.hvm_context, image.shared_info, image.xenops_metadata)
        assert all(fact is not None for fact in facts[2:]) and len(blobs) == 4
    if through_stacker:
        _through_stacker(data, image)


def _offsets(image: XenSaveImage) -> dict[int, int]:
    runs = image.page_runs()
    return {
        key + i: value + i * PAGE
        for key, value, count in zip(runs.key, runs.value, runs.count)
        for i in range(count)
    }


def _through_stacker(data: bytes, image: XenSaveImage | None) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.save"
        path.write_bytes(data)
        context = contexts.Context()
        context.config["file.location"] = path.as_uri()
        context.layers.add_layer(FileLayer(context, "file", "file"))
        layer = XenSaveImageStacker.stack(context, "file")
        if layer is None or isinstance(layer, XenRefusedLayer):
            return
        assert isinstance(layer, XenSaveImageLayer)
        context.layers.add_layer(layer)
        offsets = _offsets(layer.save_image)
        for pfn, offset in list(offsets.items())[:64]:
            assert layer.read(pfn * PAGE, PAGE) == data[offset : offset + PAGE]
        for pfn in (max(offsets, default=0) + 1, 1 << 39):
            with pytest.raises(exceptions.InvalidAddressException):
                layer.read(pfn * PAGE, 16)


@pytest.mark.parametrize(("name", "recipe"), REGRESSIONS)
def test_regressions(name: str, recipe: list[list]) -> None:
    check(name, recipe, through_stacker=True)


@pytest.mark.parametrize("name", sorted(BASE_SPECS))
def test_every_truncation_of_a_base_is_exact(name: str) -> None:
    data, _ = base(name)
    step = 1 if len(data) < 4096 else 97
    for cut in range(0, len(data) + 1, step):
        check(name, [["truncate", cut]], through_stacker=False)


@settings(settings.get_profile(PROFILE))
@given(recipes)
def test_fuzz_recipes(recipe: tuple[str, list[list]]) -> None:
    check(recipe[0], recipe[1], through_stacker=False)


@settings(settings.get_profile(PROFILE), max_examples=40 if PROFILE == "save-ci" else 500)
@given(recipes)
def test_fuzz_through_the_stacker(recipe: tuple[str, list[list]]) -> None:
    check(recipe[0], recipe[1], through_stacker=True)


# --- memory -----------------------------------------------------------------------------------

_OPEN_ALL = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from volatility3_xen.formats.errors import XenFormatError
from volatility3_xen.formats.saveimage import XenSaveImage
refused = opened = 0
for path in sys.argv[1:]:
    try:
        image = XenSaveImage.open(path)
        image.vcpus()
        opened += 1
    except XenFormatError:
        refused += 1
print(refused, opened)
"""

HUGE: list[tuple[str, list[list]]] = [
    (name, recipe)
    for name in sorted(BASE_SPECS)
    for recipe in (
        [["page-count", 0, 0xFFFFFFFF], ["record-length", 5, 0xFFFFFFFF]],
        [["record-length", 8, 0xFFFFFFFF]],
        [["record-length", 12, 0xFFFFFFF8], ["append", [0] * 64]],
        [["header", "xl-optional-len", 0xFFFFFFFF]],
        [["header", "xl-config-len", 0xFFFFFFFF]],
        [["header", "xenops-length", (1 << 64) - 1]],
        [["header", "xenops-libxc-length", (1 << 64) - 1]],
        [["pfn", 0, 0, (1 << 64) - 1], ["pfn", 2, 1, 1 << 51]],
    )
]


def test_open_memory_is_bounded(tmp_path: Path) -> None:
    paths = []
    for number, (name, recipe) in enumerate(HUGE):
        data, _ = apply(name, recipe)
        path = tmp_path / f"{number}.save"
        path.write_bytes(data)
        paths.append(str(path))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1])] + sys.path)
    result = subprocess.run(
        [sys.executable, "-c", _OPEN_ALL, *paths],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    refused, opened = map(int, result.stdout.split())
    assert refused + opened == len(paths) and opened > 0
