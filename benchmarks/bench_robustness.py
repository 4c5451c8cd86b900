"""Adapter checkpoints under kills, damaged files and concurrent readers: counts of outcomes.

Not timings: every row counts what happened, and the rows marked *must be 0* are failures of
the library when they are not. Three parts, each with real processes:

* **kills**: a child process saves in a loop (``save_adapters`` and an
  ``AdapterCheckpointManager``, each keeping 2, so that saves also prune) and is killed with
  SIGKILL after a random time, ``--kills`` times. After each kill every listed version must load
  whole and be one of the saved versions bit for bit (each manager step with its optimizer
  state and metadata), and the next save must leave no temporary directory behind.
* **damage**: every file of a saved step (a ``save_adapters`` version and a manager step) is
  damaged in turn: ``--flips`` single-bit flips, truncations (to 0 bytes, to half, by one byte),
  deletion, replacement by random bytes of the same size and by the same file of another
  version. Each damaged copy is loaded by a worker process (with a timeout), and the outcome
  counted: *exact* (the original, as if undamaged), *error naming the file* (a ``ValueError``
  that names the damaged file), *error* (another ``ValueError``), *silent* (a different result,
  no error: must be 0), *crash* (any other exception, or the worker died) or *hang* (no answer
  within ``--timeout`` seconds). ``load_adapters`` and ``read_adapter_metadata`` are counted
  apart; a manager step is read with ``AdapterCheckpointManager.restore``.
* **readers**: a writer process saves (keep 1: every save deletes the version before) while
  ``--readers`` processes load the latest version in a loop for ``--read-seconds``; every read
  must be one saved version, whole, without error.

Only the public API is used. Usage::

    python benchmarks/bench_robustness.py                          # 10 kills, 2 flips per file
    python benchmarks/bench_robustness.py --kills 3 --flips 1 --read-seconds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jadapters
from jadapters.demo.models import LinenTransformer

try:
    from benchmarks._common import machine_line
except ImportError:  # run as a script: python benchmarks/bench_robustness.py
    from _common import machine_line  # type: ignore[no-redef]

TMP = ".orbax-checkpoint-tmp"  # orbax's temporary directory of a step being written
DELETING = "deleting"  # where pruned steps go before they are removed
OUTCOMES = ("exact", "error naming the file", "error", "silent", "crash", "hang")
MUST_BE_ZERO = ("silent", "crash", "hang")


# ---- the model and its versions (the same in every process) ---------------------------------


def _model(d_model: int):
    base = LinenTransformer(
        num_classes=10, d_model=d_model, num_layers=2, num_heads=2, mlp_dim=2 * d_model, max_len=8
    )
    return jadapters.adapter_transform(base, {"mlp": r"blocks_\d+/mlp"})


class Versions:
    """Version ``v`` of the adapter weights: seeded noise with ``v`` as its first entry."""

    def __init__(self, d_model: int):
        self.d_model = d_model
        self.model = _model(d_model).add_adapter("mlp:t", jadapters.LinearAdapterConfig(dim=4))
        x = jax.ShapeDtypeStruct((2, 8, d_model), jnp.float32)
        self.shapes = jax.eval_shape(self.model.init, jax.random.key(0), x)
        self.base = {
            "params": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self.shapes["params"])
        }

    def adapters(self, v: int, salt: int = 0) -> Any:
        rng = np.random.default_rng([v, salt])
        tree = jax.tree.map(
            lambda s: rng.standard_normal(s.shape).astype(s.dtype), self.shapes["adapters"]
        )
        jax.tree.leaves(tree)[0].flat[0] = v
        return tree

    def which(self, tree: Any, salt: int = 0) -> int | None:
        """The version ``tree`` is bit for bit, or ``None``."""
        v = int(np.asarray(jax.tree.leaves(tree)[0]).flat[0])
        want = jax.tree.leaves(self.adapters(v, salt))
        got = jax.tree.leaves(tree)
        if len(got) != len(want):
            return None
        same = all(np.array_equal(np.asarray(g), w) for g, w in zip(got, want, strict=True))
        return v if same else None

    def save(self, path: str, v: int, keep: int) -> None:
        variables = {**self.base, "adapters": self.adapters(v)}
        jadapters.save_adapters(path, self.model, variables, keep=keep)

    def load(self, path: str, version: int | None = None) -> int | None:
        _, new = jadapters.load_adapters(path, _model(self.d_model), self.base, version=version)
        return self.which(new["adapters"])

    def manager_save(self, manager, v: int) -> None:
        step = (manager.latest_step() or 0) + 1
        manager.save(step, self.adapters(v), self.adapters(v, 1), metadata={"v": v})

    def restore(self, manager, step: int | None = None) -> int | None:
        got = manager.restore(step, adapters=self.adapters(0), opt_state=self.adapters(0, 1))
        v = self.which(got.adapters)
        whole = got.opt_state is not None and self.which(got.opt_state, 1) == v
        return v if whole and got.metadata == {"v": v} else None


def _debris(path: str) -> list[str]:
    if not os.path.isdir(path):
        return []
    return sorted(e for e in os.listdir(path) if TMP in e or e == DELETING)


# ---- child processes: this file with --child, its role on stdin -----------------------------


def _child_save(versions: Versions, a: str, b: str, start: int) -> None:
    with jadapters.AdapterCheckpointManager(b, max_to_keep=2) as manager:
        for v in range(start, start + 100_000):
            versions.save(a, v, keep=2)
            versions.manager_save(manager, v)


def _child_write(versions: Versions, a: str, b: str, start: int, seconds: float) -> None:
    saved, end = [], time.monotonic() + seconds
    with jadapters.AdapterCheckpointManager(b, max_to_keep=1) as manager:
        for v in range(start, start + 100_000):
            versions.save(a, v, keep=1)
            versions.manager_save(manager, v)
            saved.append(v)
            if time.monotonic() > end:
                break
    _reply({"saved": saved})


def _child_read(versions: Versions, a: str, b: str, stop: str) -> None:
    out: dict[str, Any] = {"reads": 0, "versions": [], "errors": [], "not_saved": 0}
    with jadapters.AdapterCheckpointManager(b) as manager:  # restores only
        while not os.path.exists(stop):
            for read in (lambda: versions.load(a), lambda: versions.restore(manager)):
                try:
                    v = read()
                    out["versions"].append(v)
                    out["not_saved"] += v is None
                except Exception as err:  # noqa: BLE001 - every failure counts
                    out["errors"].append(f"{type(err).__name__}: {err}"[:300])
                out["reads"] += 1
    _reply(out)


def _names(message: str, step_dir: str, rel: str) -> bool:
    """Whether an error message names the damaged file ``rel`` of the step at ``step_dir``."""
    full = os.path.join(step_dir, *rel.split("/"))
    base = os.path.basename(rel)
    generic = base in {"metadata", "commit_success.txt", "manifest.ocdbt", "_METADATA"}
    return rel in message or full in message or (not generic and base in message)


def _classify(read, original) -> tuple[str, str]:
    try:
        got = read()
    except ValueError as err:
        return "error", str(err)
    except Exception as err:  # noqa: BLE001 - what the library must not raise
        return "crash", f"{type(err).__name__}: {err}"
    return ("exact" if got == original else "silent"), ""


def _child_load(versions: Versions) -> None:
    """Answers damage cases from stdin, one JSON line each, until stdin closes."""
    for line in sys.stdin:
        _reply(_answer(versions, json.loads(line)))


def _answer(versions: Versions, case: dict) -> dict:
    path, rel, step_dir = case["path"], case["file"], case["step_dir"]
    if case["layout"] == "save_adapters":
        reads = {
            "load_adapters": (lambda: versions.load(path), case["v"]),
            "read_adapter_metadata": (
                lambda: _metadata(jadapters.read_adapter_metadata(path)),
                case["metadata"],
            ),
        }
    else:

        def restore():
            with jadapters.AdapterCheckpointManager(path) as manager:
                return versions.restore(manager)

        reads = {"restore": (restore, case["v"])}
    answer = {}
    for name, (read, original) in reads.items():
        outcome, message = _classify(read, original)
        if outcome == "error" and _names(message, step_dir, rel):
            outcome = "error naming the file"
        answer[name] = [outcome, message[:300]]
    return answer


def _metadata(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in ("version_dir", "disk_bytes")}


def _reply(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _child_main(d_model: int) -> None:
    versions = Versions(d_model)
    _reply("ready")
    command = json.loads(sys.stdin.readline())
    role = command.pop("role")
    roles = {"save": _child_save, "write": _child_write, "read": _child_read, "load": _child_load}
    roles[role](versions, **command)


class Child:
    """This file run as a child process: it imports, says ``ready``, then takes a role."""

    def __init__(self, d_model: int, log: str):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["JAX_PLATFORMS"] = "cpu"
        self.log = log
        with open(log, "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--child", "--d-model", str(d_model)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
        self.ready = False

    def send(self, obj: Any) -> None:
        if not self.ready:
            line = self.proc.stdout.readline()
            if json.loads(line or "null") != "ready":
                raise RuntimeError(f"child did not start: {line!r}; see {self.log}")
            self.ready = True
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float) -> Any:
        """The next reply line; ``"hang"`` after ``timeout`` s, ``"died"`` if it exited."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return "hang"
        line = self.proc.stdout.readline()
        return json.loads(line) if line else "died"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


# ---- the three parts ------------------------------------------------------------------------


def run_kills(args, versions: Versions, work: str) -> dict:
    a, b = os.path.join(work, "kill_adapters"), os.path.join(work, "kill_training")
    rng = random.Random(args.seed)
    versions.save(a, 0, keep=2)
    with jadapters.AdapterCheckpointManager(b, max_to_keep=2) as manager:
        versions.manager_save(manager, 0)
    saved = {0}
    out = {"kills": 0, "mid_save": 0, "survived": 0, "versions_checked": 0, "stale_tmp_dirs": 0}
    problems: list[str] = []
    log = os.path.join(work, "children.log")
    child = Child(args.d_model, log)
    for k in range(1, args.kills + 1):
        start = 100_000 * k
        child.send({"role": "save", "a": a, "b": b, "start": start})
        following = Child(args.d_model, log) if k < args.kills else None
        time.sleep(rng.uniform(0.05, args.max_kill_delay))
        alive = child.proc.poll() is None
        child.kill()
        out["kills"] += alive
        if not alive:
            problems.append(f"kill {k}: the child had stopped on its own; see {log}")
        saved |= set(range(start, start + 100_000))
        out["mid_save"] += bool(_debris(a) or _debris(b))
        ok = True
        try:
            for version in _listed(a):
                ok &= versions.load(a, version) in saved
                out["versions_checked"] += 1
            with jadapters.AdapterCheckpointManager(b, max_to_keep=2) as manager:
                listed = manager.all_steps()
                ok &= listed == _listed(b) and bool(listed)
                for step in listed:
                    ok &= versions.restore(manager, step) in saved
                    out["versions_checked"] += 1
                versions.manager_save(manager, 50_000 + k)  # the next save
            versions.save(a, 50_000 + k, keep=2)
            saved |= {50_000 + k}
        except Exception as err:  # noqa: BLE001 - counted, reported
            ok = False
            problems.append(f"kill {k}: {type(err).__name__}: {str(err)[:300]}")
        stale = _debris(a) + _debris(b)
        out["stale_tmp_dirs"] += len(stale)
        ok &= not stale
        out["survived"] += ok
        if not ok and len(problems) < 10:
            problems.append(f"kill {k}: a listed version was not whole or not saved, or {stale}")
        child = following
    out["problems"] = problems
    return out


def _listed(path: str) -> list[int]:
    return sorted(int(e) for e in os.listdir(path) if e.isdigit())


def _damages(data: bytes, other: bytes | None, flips: int, rng: random.Random):
    """``(kind, new bytes or None for deletion)`` for one file's content."""
    size = len(data)
    for i in range(flips if size else 0):
        bit = rng.randrange(8 * size)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        yield f"bit flip {i + 1}", bytes(flipped)
    for kind, length in (("truncated to 0", 0), ("truncated to half", size // 2)):
        if length < size:
            yield kind, data[:length]
    if size > 1:
        yield "truncated by 1 byte", data[:-1]
    yield "deleted", None
    if size:
        yield "random bytes", bytes(rng.getrandbits(8) for _ in range(size))
    if other is not None and other != data:
        yield "another version's file", other


def run_damage(args, versions: Versions, work: str) -> dict:
    rng = random.Random(args.seed)
    pristine = {}
    for layout in ("save_adapters", "manager"):
        for v in (1, 2):
            path = os.path.join(work, f"pristine_{layout}_{v}")
            if layout == "save_adapters":
                versions.save(path, v, keep=1)
            else:
                with jadapters.AdapterCheckpointManager(path) as manager:
                    versions.manager_save(manager, v)
            pristine[layout, v] = path
    metadata = _metadata(jadapters.read_adapter_metadata(pristine["save_adapters", 1]))
    counts = {
        read: dict.fromkeys(OUTCOMES, 0)
        for read in ("load_adapters", "read_adapter_metadata", "restore")
    }
    examples: dict[str, list[str]] = {}
    log = os.path.join(work, "children.log")
    worker = Child(args.d_model, log)
    worker.send({"role": "load"})
    files = cases = 0
    scratch = os.path.join(work, "damaged")
    for layout in ("save_adapters", "manager"):
        root = pristine[layout, 1]
        (step,) = _listed(root)
        step_dir = os.path.join(root, str(step))
        other_root = pristine[layout, 2]
        other_dir = os.path.join(other_root, str(_listed(other_root)[0]))
        for rel in sorted(_walk(step_dir)):
            files += 1
            with open(os.path.join(step_dir, *rel.split("/")), "rb") as f:
                data = f.read()
            other_file = os.path.join(other_dir, *rel.split("/"))
            other = open(other_file, "rb").read() if os.path.isfile(other_file) else None  # noqa: SIM115
            for kind, new in _damages(data, other, args.flips, rng):
                cases += 1
                shutil.rmtree(scratch, ignore_errors=True)
                shutil.copytree(root, scratch)
                damaged_step = os.path.join(scratch, str(step))
                target = os.path.join(damaged_step, *rel.split("/"))
                if new is None:
                    os.remove(target)
                else:
                    with open(target, "wb") as f:
                        f.write(new)
                case = {"layout": layout, "path": scratch, "file": rel, "v": 1}
                worker.send({**case, "step_dir": damaged_step, "metadata": metadata})
                answer = worker.answer(args.timeout)
                if not isinstance(answer, dict):  # hung or died: count it, start a new worker
                    worker.kill()
                    names = ["load_adapters", "read_adapter_metadata"]
                    answer = {
                        n: ["hang" if answer == "hang" else "crash", answer]
                        for n in (names if layout == "save_adapters" else ["restore"])
                    }
                    worker = Child(args.d_model, log)
                    worker.send({"role": "load"})
                for read, (outcome, message) in answer.items():
                    counts[read][outcome] += 1
                    if outcome in MUST_BE_ZERO or outcome == "error":
                        examples.setdefault(f"{read}: {outcome}", [])
                        if len(examples[f"{read}: {outcome}"]) < 3:
                            examples[f"{read}: {outcome}"].append(f"{rel} ({kind}): {message}")
    worker.proc.stdin.close()
    worker.proc.wait(timeout=args.timeout)
    worker.proc.stdout.close()
    return {"files": files, "cases": cases, "counts": counts, "examples": examples}


def _walk(directory: str) -> list[str]:
    return [
        os.path.relpath(os.path.join(d, name), directory).replace(os.sep, "/")
        for d, _, names in os.walk(directory)
        for name in names
    ]


def run_readers(args, versions: Versions, work: str) -> dict:
    a, b = os.path.join(work, "read_adapters"), os.path.join(work, "read_training")
    stop = os.path.join(work, "stop")
    versions.save(a, 0, keep=1)
    with jadapters.AdapterCheckpointManager(b, max_to_keep=1) as manager:
        versions.manager_save(manager, 0)
    log = os.path.join(work, "children.log")
    writer = Child(args.d_model, log)
    readers = [Child(args.d_model, log) for _ in range(args.readers)]
    for reader in readers:
        reader.send({"role": "read", "a": a, "b": b, "stop": stop})
    writer.send({"role": "write", "a": a, "b": b, "start": 1, "seconds": args.read_seconds})
    saved = writer.answer(args.read_seconds + args.timeout)
    writer.kill()
    with open(stop, "w"):
        pass
    results = [reader.answer(args.timeout) for reader in readers]
    for reader in readers:
        reader.kill()
    if not isinstance(saved, dict) or not all(isinstance(r, dict) for r in results):
        raise RuntimeError(f"a reader or the writer failed; see {log}")
    allowed = {0, *saved["saved"]}
    return {
        "saves": len(saved["saved"]),
        "readers": args.readers,
        "reads": sum(r["reads"] for r in results),
        "errors": sum(len(r["errors"]) for r in results),
        "not_a_saved_version": sum(
            r["not_saved"] + sum(v not in allowed for v in r["versions"] if v is not None)
            for r in results
        ),
        "distinct_versions_read": len({v for r in results for v in r["versions"]}),
        "error_examples": [e for r in results for e in r["errors"]][:5],
    }


def run(args: argparse.Namespace) -> dict:
    """Runs the three parts; returns their counts as a dict."""
    work = args.workdir or tempfile.mkdtemp(prefix="bench_robustness_")
    os.makedirs(work, exist_ok=True)
    versions = Versions(args.d_model)
    start = time.perf_counter()
    try:
        results = {
            "kills": run_kills(args, versions, work) if args.kills else None,
            "damage": run_damage(args, versions, work),
            "readers": run_readers(args, versions, work) if args.read_seconds else None,
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results.update(
        {
            "seconds": time.perf_counter() - start,
            "d_model": args.d_model,
            "flips": args.flips,
            "seed": args.seed,
            "machine": machine_line(),
        }
    )
    return results


def table(r: dict) -> str:
    """The markdown tables of :func:`run`'s result."""
    lines = ["| part | count | value | must be |", "| --- | --- | ---: | --- |"]
    k = r["kills"]
    if k:
        lines += [
            f"| kills | SIGKILLs of a saving process | {k['kills']} | |",
            f"| kills | ... that left a save or a prune unfinished | {k['mid_save']} | |",
            f"| kills | ... survived (all listed versions whole and saved) | {k['survived']} "
            f"| {k['kills']} |",
            f"| kills | versions loaded and compared bit for bit | {k['versions_checked']} | |",
            f"| kills | stale temporary directories after the next save | "
            f"{k['stale_tmp_dirs']} | 0 |",
        ]
    d = r["damage"]
    lines.append(
        f"| damage | files damaged / damaged copies read | {d['files']} / {d['cases']} | |"
    )
    rd = r["readers"]
    if rd:
        lines += [
            f"| readers | saves (keep 1) beside {rd['readers']} reading processes | "
            f"{rd['saves']} | |",
            f"| readers | reads of the latest version | {rd['reads']} | |",
            f"| readers | errors | {rd['errors']} | 0 |",
            f"| readers | reads that are not one saved version, whole | "
            f"{rd['not_a_saved_version']} | 0 |",
        ]
    lines += ["", "| damaged file, read with | " + " | ".join(OUTCOMES) + " |"]
    lines.append("| --- |" + " ---: |" * len(OUTCOMES))
    for read, counts in d["counts"].items():
        if sum(counts.values()):
            lines.append(f"| `{read}` | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    silent = sum(c[o] for c in d["counts"].values() for o in MUST_BE_ZERO)
    lines += [
        "",
        f"Silent, crash and hang outcomes: {silent} (must be 0). Damage: {r['flips']} bit "
        "flips, truncation to 0 / half / one byte less, deletion, random bytes and another "
        "version's file, for every file of a save_adapters version (load_adapters, "
        "read_adapter_metadata) and of a manager step with optimizer state and metadata "
        f"(restore). LinenTransformer d_model={r['d_model']}, 2 layers, LinearAdapter(dim=4) "
        f"after each block MLP; seed {r['seed']}; {r['seconds']:.0f} s; {r['machine']}.",
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs of a saving process")
    p.add_argument(
        "--max-kill-delay", type=float, default=1.5, help="kill after up to this many s of saving"
    )
    p.add_argument("--flips", type=int, default=2, help="single-bit flips per file")
    p.add_argument("--read-seconds", type=float, default=8.0, help="0 skips the readers part")
    p.add_argument("--readers", type=int, default=2, help="reading processes")
    p.add_argument("--timeout", type=float, default=120.0, help="s before a load counts as hung")
    p.add_argument("--d-model", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="", help="where checkpoints go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        _child_main(args.d_model)
        return 0
    results = run(args)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    problems = results["kills"]["problems"] if results["kills"] else []
    for problem in problems:
        print("problem:", problem, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
