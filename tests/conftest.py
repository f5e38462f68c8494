"""Shared fixtures: paths to the real guest in ../shared, a vol runner, a scratch context."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VX3_SHARED", REPO.parent / "shared"))
GUEST_XZ = SHARED / "guests" / "imageC.raw.xz"
GUEST_SHA256 = SHARED / "guests" / "imageC.raw.sha256"
SYMBOLS = SHARED / "guests" / "symbols"
EXPECTED = SHARED / "guests" / "expected"
CACHE = Path(os.environ.get("VX3_CACHE", REPO / ".cache"))
PLUGINS = REPO / "plugins"


def vol_command() -> list[str]:
    """``vol`` of the interpreter running the tests (the one with our package)."""
    script = Path(sys.executable).with_name("vol")
    if script.exists():
        return [str(script)]
    found = shutil.which("vol")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from volatility3.cli import main; sys.exit(main())"]


# A private symbol-identifier cache: vol runs elsewhere on the machine with other ``-s``
# directories rewrite the shared ~/.cache/volatility3 one, and banner lookups then miss.
VOL_CACHE = CACHE / "volatility3-cache"


def run_vol(*args: str, plugins: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    VOL_CACHE.mkdir(parents=True, exist_ok=True)
    command = vol_command() + ["-q", "--cache-path", str(VOL_CACHE)]
    if plugins:
        command += ["-p", str(PLUGINS)]
    return subprocess.run(
        command + list(args), capture_output=True, text=True, timeout=timeout, check=False
    )


def strip_banner(output: str) -> list[str]:
    """vol's output without the "Volatility 3 Framework x.y" line and blank lines."""
    return [line for line in output.splitlines() if line and not line.startswith("Volatility 3")]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def guest_source() -> tuple[Path, str] | None:
    """The real guest's compressed image and its sha256: ../shared's copy, else the one
    bundled in samples/ (the same guest), else None."""
    if GUEST_XZ.exists():
        return GUEST_XZ, GUEST_SHA256.read_text().split()[0]
    bundled = REPO / "samples" / "imageC.raw.xz"
    if bundled.exists():
        facts = json.loads((REPO / "samples" / "imageC.json").read_text())
        return bundled, facts["raw_sha256"]
    return None


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The real guest's raw memory, decompressed once into the cache and checked against
    its published sha256."""
    source = guest_source()
    if source is None:
        pytest.skip(f"real guest image not available ({GUEST_XZ} and samples/ missing)")
    compressed, want = source
    target = CACHE / "imageC.raw"
    if not target.exists() or sha256_of(target) != want:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.part")
        with lzma.open(compressed) as source_file, open(partial, "wb") as out:
            shutil.copyfileobj(source_file, out, 8 << 20)
        if sha256_of(partial) != want:
            partial.unlink()
            pytest.fail(f"{compressed} does not decompress to sha256 {want}")
        partial.replace(target)
    return target


@pytest.fixture(scope="session")
def symbols_dir() -> Path:
    """The guest kernel's symbol table: ../shared's, else the copy bundled in samples/."""
    for candidate in (SYMBOLS, REPO / "samples" / "symbols"):
        if candidate.exists():
            return candidate
    pytest.skip(f"guest symbols not available ({SYMBOLS} and samples/symbols missing)")


@pytest.fixture(scope="session")
def expected_dir() -> Path:
    if not EXPECTED.exists():
        pytest.skip(f"expected plugin output not available ({EXPECTED} missing)")
    return EXPECTED
