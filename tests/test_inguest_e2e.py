"""End to end: ``vol`` on raw and LiME images derived from the real PV guest's dump-core
(an in-guest acquisition has no p2m: the map is recovered from the guest's memory) prints
what it prints on the dump-core itself, plugin by plugin; a non-PV guest is left to
Volatility's own stackers; a PV image whose map cannot be recovered stops with one line.

The compared plugins run in one process per image (``python -m tests.test_inguest_e2e``:
the first plugin stacks and loads the ISF, the others reuse its kernel module, as vol
would for each), the dump-core side once; the images go two at a time."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from .conftest import CACHE, PLUGINS, REPO, vol_command
from .test_p2mrecovery import derived_image, real_core_path

PLUGINS_COMPARED = (
    "linux.pslist.PsList",
    "linux.psaux.PsAux",
    "linux.pstree.PsTree",
    "linux.lsmod.Lsmod",
    "linux.proc.Maps",
)
KINDS = ("core", "raw", "lime")
# Our own identifier cache: vol runs elsewhere with other -s directories rewrite a shared
# one while these run, and the symbol finder then misses the banner.
VOL_CACHE = CACHE / "volatility3-cache-inguest"
PAGE = 4096


def vol(symbols: Path, *args: str) -> subprocess.CompletedProcess:
    VOL_CACHE.mkdir(parents=True, exist_ok=True)
    command = vol_command() + ["-q", "--cache-path", str(VOL_CACHE), "-p", str(PLUGINS)]
    return subprocess.run(
        command + ["-s", str(symbols), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def csv_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("Volatility 3")]


def problem_lines(stderr: str) -> list[str]:
    """vol's log lines (not its usual "unsatisfied requirement" help text)."""
    return [line for line in stderr.splitlines() if line.startswith(("ERROR", "WARNING"))]


@pytest.fixture(scope="module")
def images() -> dict[str, Path]:
    core = real_core_path()
    return {"core": core, "raw": derived_image(core, "raw"), "lime": derived_image(core, "lime")}


@pytest.fixture(scope="module")
def outputs(images: dict[str, Path], symbols_dir: Path) -> dict:
    """``{(kind, plugin): csv}``: one process per image runs every compared plugin."""
    VOL_CACHE.mkdir(parents=True, exist_ok=True)

    def run(kind: str) -> tuple[str, subprocess.CompletedProcess]:
        command = [sys.executable, "-m", "tests.test_inguest_e2e", str(images[kind])]
        command += [str(symbols_dir), str(VOL_CACHE), *PLUGINS_COMPARED]
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False
        )
        return kind, done

    first = run("core")  # fills the identifier cache once
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict([first, *pool.map(run, KINDS[1:])])
    results = {}
    for kind, process in done.items():
        assert process.returncode == 0, f"{kind}: {process.stderr[-3000:]}"
        for plugin, text in json.loads(process.stdout).items():
            results[kind, plugin] = text
    return results


@pytest.fixture(scope="module")
def no_anchor(images: dict[str, Path], tmp_path_factory) -> Path:
    """The raw image with the anchor page (the builder L1 that maps itself) zeroed."""
    from volatility3_xen.formats.p2mrecovery import recover_machine_frames
    from volatility3_xen.layers import inguest

    from .test_p2mrecovery import Image, isf_path

    parameters = inguest._read_isf(isf_path().resolve().as_uri())
    layout = inguest.kernel_layout(parameters, b"Linux version 6.1")
    image = Image(images["raw"])
    anchor = recover_machine_frames(image.read, image.size, layout).anchors[0][0]
    target = tmp_path_factory.mktemp("inguest") / "no-anchor.raw"
    shutil.copyfile(images["raw"], target)
    with open(target, "r+b") as handle:
        handle.seek(anchor * PAGE)
        handle.write(bytes(PAGE))
    return target


@pytest.mark.parametrize("plugin", PLUGINS_COMPARED)
def test_plugin_output_equals_the_dump_core(outputs: dict, plugin: str):
    core = outputs["core", plugin]
    assert csv_rows(core)[0].startswith("TreeDepth,")
    for kind in ("raw", "lime"):
        assert outputs[kind, plugin] == core, f"{kind}: {plugin} differs from the dump-core"


def test_the_guest_processes_are_listed(outputs: dict):
    """The comparison above is not between empty outputs: the guest's own ps (lsmod is
    empty on this guest: its busybox initramfs loads no module)."""
    listed = {}
    for line in csv_rows(outputs["raw", "linux.pslist.PsList"])[1:]:
        fields = line.split(",")
        listed[int(fields[2])] = fields[5]
    for comm in ("realxen_server", "realxen_worker", "realxen_shell", "sleep"):
        assert comm in listed.values()
    assert len(listed) > 50
    maps = csv_rows(outputs["lime", "linux.proc.Maps"])
    assert any("realxen_server" in line for line in maps)


def test_xen_info_on_a_lime_image(images: dict[str, Path], symbols_dir: Path):
    result = vol(symbols_dir, "-r", "json", "-f", str(images["lime"]), "xen.info")
    assert result.returncode == 0, result.stderr
    rows = {(row["Group"], row["Field"]): row for row in json.loads(result.stdout)}
    assert rows["file", "container"]["Value"] == "LiME"
    assert rows["recovery", "pfns_mapped"]["Number"] == 32768
    assert rows["recovery", "pfns_unmapped"]["Number"] == 0
    assert rows["recovery", "conflicts"]["Number"] == 0
    assert rows["cross_check", "agreement"]["Value"] == "100.00 %"


def test_failed_recovery_stops_with_one_line(no_anchor: Path, symbols_dir: Path):
    result = vol(symbols_dir, "-f", str(no_anchor), "linux.pslist")
    assert result.returncode != 0
    lines = problem_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "machine-frame map cannot be recovered" in lines[0]
    assert "no self-mapping anchor page" in lines[0]
    assert "Traceback" not in result.stderr and "sleep" not in result.stdout
    info = vol(symbols_dir, "-f", str(no_anchor), "xen.info")
    assert info.returncode != 0
    lines = problem_lines(info.stderr)
    assert len(lines) == 1 and "no self-mapping anchor page" in lines[0], info.stderr


def test_non_pv_guest_is_left_to_volatility(guest_image: Path, symbols_dir: Path, outputs):
    """The bundled guest was not booted under Xen: the in-guest stacker declines after
    the first banner and adds no layer and no symbol table (Volatility's own stackers
    then run as without us; tests/test_plugins.py runs vol on it)."""
    with volatility_paths(symbols_dir):
        from volatility3.framework import contexts
        from volatility3.framework.layers import physical

        from volatility3_xen.layers import inguest

        context = contexts.Context()
        context.config["file.location"] = guest_image.resolve().as_uri()
        context.layers.add_layer(physical.FileLayer(context, "file", "file"))
        assert inguest.find_banner(context, "file") is not None  # a Linux the ISF knows
        assert inguest.XenInGuestPVStacker.stack(context, "file") is None
        assert list(context.layers) == ["file"] and not list(context.symbol_space)


def test_machine_addresses_on_an_inguest_image(images: dict[str, Path], symbols_dir: Path):
    """In-process: open_inguest + the machine-address layer read what the dump-core's
    p2m says backs each pfn."""
    from .test_p2mrecovery import Image

    with volatility_paths(symbols_dir):
        from volatility3.framework import contexts

        from volatility3_xen import api
        from volatility3_xen.layers import inguest

        context = contexts.Context()
        name = inguest.open_inguest(context, images["lime"])
        layer = context.layers[name]
        machine = context.layers[api.add_machine_layer(context, name)]
        raw = Image(images["raw"])
        frames = layer.image.recovery
        for pfn in (0, 0x2A10, 0x3E25, 0x7FFF):
            mfn = int(frames.mfns[pfn])
            assert machine.read(mfn * PAGE, PAGE) == raw.page(pfn) == layer.read(pfn * PAGE, PAGE)
        assert api.find_xen_layer(context, name) is layer
        with pytest.raises(Exception) as caught:
            inguest.open_inguest(context, images["core"])
        assert "not the memory of a 64-bit Xen PV Linux guest" in str(caught.value)
    assert np.all(frames.mfns)


@contextmanager
def volatility_paths(symbols: Path) -> Iterator[None]:
    """Volatility's module-global symbol path and cache path set as ``vol -s``/
    ``--cache-path`` would, and its plugins imported; restored afterwards."""
    import volatility3.plugins
    import volatility3.symbols
    from volatility3 import framework
    from volatility3.framework import constants

    saved = list(volatility3.symbols.__path__), constants.CACHE_PATH
    volatility3.symbols.__path__ = [str(symbols), *saved[0]]
    constants.CACHE_PATH = str(VOL_CACHE)
    try:
        framework.import_files(volatility3.plugins, True)
        yield
    finally:
        volatility3.symbols.__path__, constants.CACHE_PATH = saved


def run_plugins(image: str, symbols: str, cache: str, names: list[str]) -> dict[str, str]:
    """Each plugin's CSV (what ``vol -r csv`` prints), run in one context: the first
    stacks the layers and loads the kernel's symbols; the next ones get its ``kernel``
    configuration, so automagic has nothing left to find."""
    import volatility3.plugins
    import volatility3.symbols
    from volatility3 import framework
    from volatility3.cli import text_renderer
    from volatility3.framework import automagic, constants, contexts
    from volatility3.framework import plugins as volatility_plugins

    constants.CACHE_PATH = cache
    volatility3.symbols.__path__ = [symbols, *volatility3.symbols.__path__]
    volatility3.plugins.__path__ = [str(PLUGINS), *volatility3.plugins.__path__]
    framework.import_files(volatility3.plugins, True)
    available = framework.list_plugins()
    context = contexts.Context()
    location = Path(image).resolve().as_uri()
    context.config["automagic.LayerStacker.single_location"] = location
    results, previous = {}, None
    for name in names:
        plugin_class = available[name]
        path = f"plugins.{plugin_class.__name__}"
        if previous is not None:
            context.config.splice(f"{path}.kernel", context.config.branch(f"{previous}.kernel"))
        chosen = automagic.choose_automagic(automagic.available(context), plugin_class)
        plugin = volatility_plugins.construct_plugin(
            context, chosen, plugin_class, "plugins", None, None
        )
        previous = path
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            text_renderer.CSVRenderer().render(plugin.run())
        results[name] = buffer.getvalue()
    return results


if __name__ == "__main__":
    image_path, symbols_path, cache_path, *plugin_names = sys.argv[1:]
    print(json.dumps(run_plugins(image_path, symbols_path, cache_path, plugin_names)))
