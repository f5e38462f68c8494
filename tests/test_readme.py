"""The README's promises that a test can hold: two quick-start commands, the second one
exactly what CI runs, and the example output the sample really prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from volatility3_xen.testdata import samples

from .conftest import CACHE, REPO, run_vol


def quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no fenced sh block under ## Quick start"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_has_exactly_two_commands() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert "samples realxen-save" in commands[0] and "linux.pslist" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci_lines


def readme_examples() -> dict[str, list[str]]:
    """``<!-- example: PLUGIN -->`` blocks: lines vol printed, possibly a subset of them."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"<!-- example: (\S+) -->\n```\n(.*?)```", text, re.S)
    return {plugin: block.splitlines() for plugin, block in blocks}


@pytest.fixture(scope="module")
def pv_sample() -> Path:
    """The bundled guest's PV core (built once into the repository's .cache)."""
    return samples.build_sample("pv", cache=CACHE / "samples", status=lambda _message: None)


@pytest.mark.parametrize("plugin", ["xen.info", "xen.vcpus", "linux.pstree"])
def test_readme_example_is_real_output(plugin: str, pv_sample: Path) -> None:
    example = readme_examples()[plugin]
    assert len(example) >= 2, f"README example for {plugin} is empty"
    result = run_vol("-s", str(REPO / "samples" / "symbols"), "-f", str(pv_sample), plugin)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = set(result.stdout.splitlines())
    missing = [line for line in example if line not in printed]
    assert not missing, f"README lines {plugin} does not print: {missing}"


def test_readme_script_api_example_runs(pv_sample: Path) -> None:
    """The Script API snippet, run as written on the PV sample (whose vCPU's cr3 is
    machine frame 0xa3cea8, pfn 0x28a8, as the snippet's numbers assume)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Script API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code.replace('"guest.core"', repr(str(pv_sample))), "README", "exec"), namespace)
    layer, machine = namespace["layer"], namespace["machine"]
    assert layer.pfn_to_mfn(0x28A8) == 0xA3CEA8 and layer.mfn_to_pfn(0xA3CEA8) == 0x28A8
    assert machine.read(0xA3CEA8000, 4096) == layer.read(0x28A8000, 4096)
    assert namespace["core"].notes.header.is_pv
