"""Command line: ``python -m jadapters {demo,inspect} ...``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "jadapters.demo.main",
        "inspect": "jadapters.checkpoint.inspect",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m jadapters {demo,inspect} [--help]")
        print("  demo     fine-tune a pretrained transformer with adapters on shipped data")
        print("  inspect  print what an adapter checkpoint holds")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(commands[argv[0]])  # fixed table, never user input
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
