"""Renders the public API's docstrings as Markdown: ``python -m jadapters.apidoc``."""

from __future__ import annotations

import inspect
import sys


def render() -> str:
    """The Markdown reference of every name in ``jadapters.__all__``."""
    import jadapters

    lines = [
        "# jadapters API",
        "",
        "Generated from the docstrings by `python -m jadapters.apidoc`; do not edit by hand.",
        "",
    ]
    for name in sorted(jadapters.__all__, key=str.lower):
        obj = getattr(jadapters, name)
        doc = inspect.getdoc(obj) if (inspect.isclass(obj) or callable(obj)) else None
        kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "constant"
        lines.append(f"## `{name}` ({kind})")
        lines.append("")
        if callable(obj) and not inspect.isclass(obj):
            try:
                lines += [f"`{name}{inspect.signature(obj)}`", ""]
            except (TypeError, ValueError):
                pass
        if kind == "constant":
            lines += [f"`{name} = {obj!r}`", ""]
        elif doc:
            lines += [doc, ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
