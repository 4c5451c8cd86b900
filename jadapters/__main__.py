"""Command line: ``python -m jadapters {demo,inspect} ...`` (also installed as ``jadapters``).

``python -m jadapters --version`` prints the version; an unknown command is a usage error
(exit status 2) that lists the commands. When the reader of the output goes away early, as in
``python -m jadapters inspect PATH | head -1``, the command stops quietly with exit status 141,
the status a shell reports for a program ended by ``SIGPIPE`` (``yes | head -1`` gives the
same), and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from jadapters._version import __version__

COMMANDS = {
    "demo": (
        "jadapters.demo.main",
        "fine-tune a pretrained transformer with adapters on shipped data",
    ),
    "inspect": ("jadapters.checkpoint.inspect", "print what an adapter checkpoint holds"),
}
# 128 + SIGPIPE: what a shell reports for a program that its pipe's reader ended early.
BROKEN_PIPE_STATUS = 141


def parser() -> argparse.ArgumentParser:
    """The top-level parser: a command and the arguments handed to it unread.

    >>> parser().parse_args(["inspect", "ckpt", "--json"])
    Namespace(command='inspect', args=['ckpt', '--json'])
    """
    commands = "\n".join(f"  {name:<9}{what}" for name, (_, what) in COMMANDS.items())
    result = argparse.ArgumentParser(
        prog="python -m jadapters",
        description=f"commands:\n{commands}",
        epilog="Run `python -m jadapters COMMAND --help` for a command's own arguments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    result.add_argument("--version", action="version", version=f"jadapters {__version__}")
    result.add_argument("command", choices=list(COMMANDS), help="one of the commands above")
    result.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    return result


def main(argv: list[str] | None = None) -> int:
    """Runs a command; returns its exit status.

    >>> main(["inspect", "/nonexistent/checkpoint"])  # the error goes to stderr
    1
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no command: the full help, which lists the commands, as a usage error
        parser().print_help(sys.stderr)
        return 2
    try:
        try:
            args = parser().parse_args(argv)
            module = importlib.import_module(COMMANDS[args.command][0])  # a fixed table
            return int(module.main(args.args) or 0)
        finally:
            # A reader that went away shows here at the latest, inside the outer try, also
            # when --help or a usage error exits through SystemExit.
            sys.stdout.flush()
    except BrokenPipeError:
        # As Python's documentation of SIGPIPE recommends: point stdout at devnull so that the
        # interpreter's own flush at exit does not fail again, and stop without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_STATUS


if __name__ == "__main__":
    sys.exit(main())
