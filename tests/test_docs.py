"""The README's examples run, the API reference is in sync, and the notebooks execute."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks((ROOT / "README.md").read_text()))))
def test_readme_examples_run(index):
    code = _python_blocks((ROOT / "README.md").read_text())[index]
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert first_block[0] == 'pip install -e ".[demo]" && python -m jadapters demo'
    assert first_block[1] == 'pip install -e ".[test]" && python -m pytest -q'
    ci = (ROOT / ".ci" / "run").read_text()
    assert first_block[1] in ci


def test_api_reference_is_in_sync():
    from jadapters.apidoc import render

    assert (ROOT / "docs" / "API.md").read_text() == render(), (
        "docs/API.md is stale: run `python -m jadapters.apidoc > docs/API.md`"
    )


NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))


# Executes one notebook in a fresh kernel, in its own process: nbclient raises on the first
# cell that fails, with that cell's traceback.
_EXECUTE = """
import sys, nbclient, nbformat
notebook = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3").execute(cwd=sys.argv[2])
"""


@pytest.fixture(scope="module")
def notebook_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every notebook, executed top to bottom in its own kernel and directory, as many at a
    time as there are cores (most of a notebook's time is one core compiling)."""
    pytest.importorskip("nbclient")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("XLA_FLAGS", None)  # as a user runs it: no fake devices from the test setup

    def execute(path: pathlib.Path) -> subprocess.CompletedProcess:
        cwd = tmp_path_factory.mktemp(path.stem)
        return subprocess.run(
            [sys.executable, "-c", _EXECUTE, str(path), str(cwd)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip([p.stem for p in NOTEBOOKS], pool.map(execute, NOTEBOOKS), strict=True))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, notebook_runs):
    nbformat = pytest.importorskip("nbformat")
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name}: commit notebooks with outputs stripped"
    result = notebook_runs[path.stem]
    assert result.returncode == 0, f"{path.name} failed:\n{result.stderr[-6000:]}"


COURSE = NOTEBOOKS  # every notebook follows the course conventions


@pytest.mark.parametrize("path", COURSE, ids=[p.stem for p in COURSE])
def test_course_notebook_opens_with_what_you_learn_and_an_install_cell(path):
    nbformat = pytest.importorskip("nbformat")
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].cell_type == "markdown" and "**What you will learn**" in cells[0].source
    first_code = next(c.source for c in cells if c.cell_type == "code")
    assert 'find_spec("jadapters") is None' in first_code and "%pip install" in first_code


def test_readme_links_and_images_exist():
    text = (ROOT / "README.md").read_text()
    local = [t for t in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text) if "://" not in t]
    assert not [t for t in local if not (ROOT / t).exists()]
    assert "docs/GUIDE.md" in local  # which API when
    assert "docs/figures/demo.png" in local  # the demo's figure


def test_every_public_name_has_a_runnable_example():
    """Each name in ``jadapters.__all__`` shows a ``>>>`` example in its own docstring (run by
    ``--doctest-modules``); a constant, in the docstring of the module that defines it."""
    import doctest

    import jadapters
    from jadapters.apidoc import defining_module, is_constant

    def examples(doc: str | None) -> list[str]:
        return [e.source for e in doctest.DocTestParser().get_examples(doc or "")]

    missing = []
    for name in jadapters.__all__:
        obj = getattr(jadapters, name)
        if is_constant(obj):
            if not any(name in source for source in examples(defining_module(name).__doc__)):
                missing.append(f"{name} (a constant: use it in its module docstring's example)")
        elif not examples(obj.__doc__):
            missing.append(name)
    assert not missing, f"public names without a >>> example: {missing}"
