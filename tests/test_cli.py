"""``python -m jadapters``: version, usage errors, and a reader that closes the pipe early."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import shlex
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jadapters
from jadapters.__main__ import BROKEN_PIPE_STATUS, COMMANDS, main


def _cli(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jadapters", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt"))
    model = jadapters.adapter_transform(nn.Sequential([nn.Dense(4)]), {"": "layers_0"})
    model = model.add_adapter("lora", jadapters.LoRAConfig(rank=2))
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    jadapters.save_adapters(path, model, variables)
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"jadapters {jadapters.__version__}\n"


def test_version_in_a_process():
    result = _cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"jadapters {jadapters.__version__}\n"


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err
    for command in COMMANDS:
        assert repr(command) in err


def test_no_command_prints_the_commands_as_a_usage_error(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    for command, (_, what) in COMMANDS.items():
        assert command in err and what in err


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "inspect" in capsys.readouterr().out


def test_arguments_after_the_command_go_to_it(checkpoint, capsys):
    assert main(["inspect", checkpoint, "--json"]) == 0
    assert '"lora"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, status",
    [
        (["inspect", "CKPT"], BROKEN_PIPE_STATUS),
        (["inspect", "--help"], 0),  # argparse ignores a failed write of its help: exit 0
    ],
)
def test_output_into_a_closed_pipe_is_quiet(checkpoint, args, status):
    """``python -m jadapters inspect PATH | head -1`` where the reader is already gone: the
    writer gets EPIPE, and stops with status 141 and no traceback."""
    read_end, write_end = os.pipe()
    # A real reader that exits before reading anything, like `head` after its first line.
    reader = subprocess.Popen([sys.executable, "-c", "pass"], stdin=read_end)
    os.close(read_end)
    assert reader.wait(timeout=60) == 0
    try:
        result = _cli(*[checkpoint if a == "CKPT" else a for a in args], stdout=write_end)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == status
    assert BROKEN_PIPE_STATUS == 141


def test_inspect_piped_into_head_is_quiet(checkpoint):
    """The shell's own pipe: whichever way the race goes, no traceback on stderr."""
    result = subprocess.run(
        f"{shlex.quote(sys.executable)} -m jadapters inspect {shlex.quote(checkpoint)} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1


# --- python -m benchmarks: arguments only, with stand-in benchmarks ---------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _FakeBenchmark:
    """A benchmark module's interface (``parse_args``, ``run``, ``table``), instantly."""

    def __init__(self):
        self.argv = []

    def parse_args(self, argv):
        self.argv.append(list(argv))
        return argparse.Namespace(quick=bool(argv))

    def run(self, args):
        return {"quick": args.quick, "ms": 1.5}

    def table(self, results):
        return f"| quick | ms |\n| --- | ---: |\n| {results['quick']} | {results['ms']} |"


@pytest.fixture
def bench_cli(monkeypatch, tmp_path):
    """``benchmarks.__main__`` with every benchmark a stand-in and README.md a temporary copy."""
    monkeypatch.syspath_prepend(str(ROOT))
    bench_main = importlib.import_module("benchmarks.__main__")
    fake = _FakeBenchmark()
    monkeypatch.setattr(bench_main, "load", lambda name: fake)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\n{bench_main.START}\nold results\n{bench_main.END}\n")
    monkeypatch.setattr(bench_main, "README", readme)
    monkeypatch.setattr(bench_main, "machine", lambda: "test machine")
    return bench_main, fake, readme


def test_benchmarks_write_nothing_by_default(bench_cli, capsys, tmp_path):
    bench_main, fake, readme = bench_cli
    before = readme.read_text()
    assert bench_main.main(["--quick", "--only", "bench_lora"]) == 0
    assert readme.read_text() == before
    assert fake.argv == [bench_main.QUICK["bench_lora"]]
    assert "| True | 1.5 |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_benchmarks_write_json_and_readme_only_when_asked(bench_cli, tmp_path):
    bench_main, _, readme = bench_cli
    out = tmp_path / "results.json"
    assert bench_main.main(["--only", "bench_lora", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == {"bench_lora": {"quick": False, "ms": 1.5}}
    assert "old results" in readme.read_text()
    assert bench_main.main(["--only", "bench_lora", "--write-readme"]) == 0
    text = readme.read_text()
    assert "old results" not in text and "| False | 1.5 |" in text and "test machine" in text


def test_benchmarks_list_runs_nothing(bench_cli, capsys):
    bench_main, fake, _ = bench_cli
    assert bench_main.main(["--list"]) == 0
    assert fake.argv == []
    out = capsys.readouterr().out
    assert all(name in out for name in bench_main.BENCHMARKS)
