"""docs/SCALING.md: its python blocks run in order as one program, on 8 (fake) devices, and
print what the page shows; the many-hosts block is the code that tests/test_multihost.py runs
in two processes (tests/_multihost_worker.py), verbatim."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = (ROOT / "docs" / "SCALING.md").read_text()
_BLOCK = re.compile(r"```python\n((?:(?!```).)*)```(?:\n\n```text\n((?:(?!```).)*)```)?", re.S)
BLOCKS = [(m.group(1), m.group(2)) for m in _BLOCK.finditer(TEXT)]
MULTIHOST = "jax.distributed.initialize"


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_the_blocks_run_in_order_and_print_what_the_page_shows():
    namespace = {"__name__": "__scaling__"}
    ran = 0
    for index, (code, expected) in enumerate(BLOCKS):
        if MULTIHOST in code:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"SCALING.md[python block {index}]", "exec"), namespace)
        ran += 1
        if expected is not None:
            assert out.getvalue() == expected, f"block {index} printed {out.getvalue()!r}"
    assert ran >= 5


def test_the_many_hosts_block_is_the_tested_worker():
    (code,) = [code for code, _ in BLOCKS if MULTIHOST in code]
    worker = (ROOT / "tests" / "_multihost_worker.py").read_text()
    assert code in worker
