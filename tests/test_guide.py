"""docs/GUIDE.md: every python block runs, and every error shown is the library's own.

Blocks before "## Troubleshooting" run alone, each in a fresh namespace (they are
self-contained); the troubleshooting blocks share one namespace, in order, as the page says.
A python block followed by a ``text`` block must print exactly that text.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "GUIDE.md"
TROUBLESHOOTING = "\n## Troubleshooting\n"
_BLOCK = re.compile(r"```python\n((?:(?!```).)*)```(?:\n\n```text\n((?:(?!```).)*)```)?", re.S)


def _blocks(text: str) -> list[tuple[str, str | None]]:
    """``(code, expected output or None)`` for each python block of ``text``, in order."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def _run(code: str, namespace: dict, name: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), namespace)
    return out.getvalue()


TEXT = GUIDE.read_text()
EXAMPLES_PART, TROUBLE_PART = TEXT.split(TROUBLESHOOTING, 1)
EXAMPLES = _blocks(EXAMPLES_PART)


def test_the_guide_opens_with_the_decision_table():
    headings = re.findall(r"^## (.+)$", TEXT, flags=re.M)
    assert headings[0] == "Decision table"
    assert TEXT.index("| question | choose | when |") < TEXT.index("```python")
    # Every row of the table links a section that exists.
    anchors = set(re.findall(r"\]\(#([a-z0-9_-]+)\)", TEXT))
    slugs = {re.sub(r"[^a-z0-9_ -]", "", h.lower()).replace(" ", "-") for h in headings}
    assert anchors and anchors <= slugs, anchors - slugs


def test_routing_per_example_is_documented():
    assert "not built yet" not in EXAMPLES_PART
    assert "jadapters.route(" in EXAMPLES_PART and "adapter_ids=" in EXAMPLES_PART


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_guide_example_runs(index):
    code, expected = EXAMPLES[index]
    printed = _run(code, {"__name__": "__guide__"}, f"GUIDE.md[python block {index}]")
    if expected is not None:
        assert printed == expected


def test_troubleshooting_shows_the_messages_the_library_raises():
    namespace = {"__name__": "__guide__"}
    blocks = _blocks(TROUBLE_PART)
    assert sum(expected is not None for _, expected in blocks) >= 8
    for index, (code, expected) in enumerate(blocks):
        printed = _run(code, namespace, f"GUIDE.md[troubleshooting block {index}]")
        if expected is not None:
            assert printed == expected, f"troubleshooting block {index}: the message changed"
