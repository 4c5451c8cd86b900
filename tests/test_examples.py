"""examples/: every script runs on its own, and each is the code the docs show.

``examples/quickstart.py`` and ``examples/quickstart_nnx.py`` are the README's examples; every
other script is the example of one row of docs/GUIDE.md, where it is marked
``<!-- example: examples/NAME.py -->``.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))
QUICKSTARTS = ("quickstart.py", "quickstart_nnx.py")  # the README's; the others are the guide's


def _run(script: pathlib.Path, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # as a user runs it: no fake devices from the test setup
    return subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every script, run in its own process and directory, as many at a time as there are
    cores (most of an example's time is starting JAX and compiling, on one core)."""
    workers = max(2, os.cpu_count() or 2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {p.stem: pool.submit(_run, p, tmp_path_factory.mktemp(p.stem)) for p in SCRIPTS}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", [p.stem for p in SCRIPTS])
def test_example_runs_as_a_script(runs, name):
    result = runs[name]
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip(), "an example shows what it did"


def test_the_quickstarts_are_the_readme_examples():
    """The README's python blocks, in order, are examples/quickstart.py (Linen) and
    examples/quickstart_nnx.py: self-contained, with their models defined inline."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    for block, name in zip(blocks, QUICKSTARTS, strict=False):
        assert block == (ROOT / "examples" / name).read_text(), name
        assert "jadapters.demo" not in block
    assert len(blocks) >= len(QUICKSTARTS)


def test_each_guide_example_is_a_script_here():
    guide = (ROOT / "docs" / "GUIDE.md").read_text()
    marked = dict(
        re.findall(r"<!-- example: (examples/[\w.]+) -->\n```python\n(.*?)```", guide, re.S)
    )
    scripts = {f"examples/{p.name}" for p in SCRIPTS if p.name not in QUICKSTARTS}
    assert set(marked) == scripts
    for path, code in marked.items():
        assert code == (ROOT / path).read_text(), f"{path} differs from its block in GUIDE.md"
