"""``python -m jadapters inspect PATH``: what an adapter checkpoint holds, without a model.

Reads only the checkpoint's JSON metadata (checked against its listed size and SHA-256 first,
like every read) and file sizes; no array is loaded, no model or adapter type is needed.
``PATH`` is the checkpoint directory (its latest version) or one version's directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import numpy as np

from jadapters.checkpoint.io import read_adapter_metadata


def _count(leaves: list[dict]) -> tuple[int, int]:
    sizes = [(math.prod(x["shape"]), np.dtype(x["dtype"]).itemsize) for x in leaves]
    return sum(n for n, _ in sizes), sum(n * b for n, b in sizes)


def describe(path: str) -> dict[str, Any]:
    """A JSON-ready summary of the checkpoint at ``path``: the metadata plus counts and sizes.

    Raises:
      ValueError: for a missing or corrupted checkpoint.
    """
    data = read_adapter_metadata(path)
    for a in data["adapters"]:
        a["param_count"], a["param_bytes"] = _count([x for h in a["hosts"] for x in h["params"]])
    data["path"] = path
    data["param_count"] = sum(a["param_count"] for a in data["adapters"])
    data["param_bytes"] = sum(a["param_bytes"] for a in data["adapters"])
    base = [x for leaves in data["base_fingerprint"].values() for x in leaves]
    data["base_host_param_count"] = _count(base)[0]
    return data


def _leaves(host: str, leaves: list[dict]) -> list[str]:
    rows = [
        f"    {'/'.join(x['path']):<28}{str(tuple(x['shape'])):<16}{x['dtype']}" for x in leaves
    ]
    return [f"  {host}", *rows]


def render(data: dict[str, Any]) -> str:
    """The human-readable report of :func:`describe`'s output."""
    lines = [
        f"adapter checkpoint {data['path']}",
        f"  version dir {data['version_dir']}; format {data['format_version']}; written by "
        f"jadapters {data['library_version']} ({data['framework']}); "
        f"{data['disk_bytes']:,} bytes on disk",
        "",
        f"{'name':<16}{'group':<10}{'type':<16}{'insertion':<10}{'enabled':<8}{'hosts':>6}"
        f"{'params':>12}{'bytes':>12}",
    ]
    for a in data["adapters"]:
        lines.append(
            f"{a['name']:<16}{a['group'] or chr(39) * 2:<10}{a['type']:<16}{a['insertion']:<10}"
            f"{'yes' if a['enabled'] else 'no':<8}{len(a['hosts']):>6}{a['param_count']:>12,}"
            f"{a['param_bytes']:>12,}"
        )
    lines.append(
        f"total: {len(data['adapters'])} adapters, {data['param_count']:,} parameters, "
        f"{data['param_bytes']:,} bytes"
    )
    for c in data.get("compositions", []):
        block = {k: v for k, v in c["block"].items() if k != "type"}
        lines.append(
            f"composition of group {c['group']!r}: {c['block']['type']} "
            f"{json.dumps(block, sort_keys=True)}"
        )
    for a in data["adapters"]:
        lines += ["", f"{a['name']}: {json.dumps(a['config'], sort_keys=True)}"]
        for host in a["hosts"]:
            lines += _leaves(host["path"], host["params"])
    content = "structure and content" if data.get("base_content") else "structure only"
    lines += [
        "",
        f"base fingerprint sha256:{data['base_fingerprint_sha256']} "
        f"({data['base_host_param_count']:,} parameters at the hosts; {content})",
    ]
    for host, leaves in data["base_fingerprint"].items():
        lines += _leaves(host, leaves)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m jadapters inspect``; returns the exit status.

    >>> main(["/nonexistent/checkpoint"])
    1
    """
    parser = argparse.ArgumentParser(
        prog="python -m jadapters inspect",
        description="Print what an adapter checkpoint written by jadapters.save_adapters "
        "holds: names, groups, types, insertion, shapes, parameter counts, bytes and the base "
        "fingerprint. Reads metadata only; needs no model.",
    )
    parser.add_argument("path", help="the checkpoint directory, or one version's directory")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    try:
        data = describe(args.path)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
