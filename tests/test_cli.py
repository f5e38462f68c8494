"""``vol`` as a subprocess: our layer is stacked (not Volatility's), with ``-p plugins``
from a checkout and without it once the package is installed; real-guest pslist matches."""

from __future__ import annotations

import importlib.metadata
import mmap
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from volatility3_xen.testdata import corewriter as writer

from .conftest import CACHE, PLUGINS, run_vol, strip_banner


def small_core(path: Path) -> Path:
    pfns = np.array([0, 1, 2, 3, writer.INVALID_PFN], dtype=np.uint64)
    pages = {i: bytes([i + 1]) * 4096 for i in range(4)}
    writer.write_core(path, writer.CoreSpec(kind="hvm", pfns=pfns, pages=pages))
    return path


def stacked_layers(output: str) -> str:
    lines = [line for line in output.splitlines() if "Stacked layers" in line]
    assert lines, output[-2000:]
    return lines[-1]


def test_vol_stacks_our_layer_with_plugin_dir(tmp_path: Path) -> None:
    core = small_core(tmp_path / "small.core")
    result = run_vol("-vv", "-f", str(core), "banners.Banners")
    assert result.returncode == 0, result.stderr[-2000:]
    line = stacked_layers(result.stderr)
    assert "XenDumpCoreLayer" in line and "XenCoreDumpLayer" not in line


def test_installed_package_needs_no_plugin_dir(tmp_path: Path) -> None:
    # Look in site-packages only: the checkout's own *.egg-info would shadow it.
    site = [sysconfig.get_paths()["purelib"]]
    found = [
        d
        for d in importlib.metadata.distributions(path=site)
        if d.metadata["Name"] == "volatility3-xen"
    ]
    if not found:
        pytest.skip("volatility3-xen is not installed (pip install . to test plain vol)")
    shipped = {str(f) for f in found[0].files or []}
    if any(f.endswith(".pth") and "editable" in f for f in shipped):
        pytest.skip("editable install: plain vol cannot see it (use -p plugins)")
    assert "volatility3/plugins/xen/stackers.py" in shipped
    # The wheel must never own Volatility's own package markers.
    assert "volatility3/__init__.py" not in shipped
    assert "volatility3/plugins/__init__.py" not in shipped
    core = small_core(tmp_path / "small.core")
    result = run_vol("-vv", "-f", str(core), "banners.Banners", plugins=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "XenDumpCoreLayer" in stacked_layers(result.stderr)


@pytest.fixture(scope="session")
def real_hvm_core(guest_image: Path) -> Path:
    """The real guest as an HVM core, as libxc would write it (VGA hole, ~0 tail)."""
    target = CACHE / "imageC-hvm.core"
    if not target.exists() or target.stat().st_mtime < guest_image.stat().st_mtime:
        with (
            open(guest_image, "rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as image,
        ):
            writer.write_hvm_from_image(target.with_suffix(".part"), image, tail_padding=8)
        target.with_suffix(".part").replace(target)
    return target


def test_real_guest_hvm_pslist_matches_raw_image(
    real_hvm_core: Path, symbols_dir: Path, expected_dir: Path
) -> None:
    result = run_vol("-s", str(symbols_dir), "-f", str(real_hvm_core), "linux.pslist")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = strip_banner((expected_dir / "pslist.txt").read_text())
    assert strip_banner(result.stdout) == expected


def test_plugin_dir_helper_points_at_the_checkout() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "volatility3_xen", "plugin-dir"],
        capture_output=True,
        text=True,
        check=False,
        cwd=PLUGINS.parent,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == PLUGINS
    assert (Path(result.stdout.strip()) / "xen" / "stackers.py").exists()
