"""The demo, ``python -m jadapters demo``, at a tiny size: one CLI run, one ``run_demo`` run.

The second run reuses the first one's compiled steps (they are cached per model), so the
module costs about one cold run.
"""

import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest

import jadapters
from jadapters.demo import data
from jadapters.demo.main import METHODS, DemoConfig, main, run_demo

TINY = DemoConfig(
    seed=1,
    steps=200,
    pretrain_steps=300,
    d_model=32,
    layers=1,
    heads=2,
    adapter_dim=8,
    lora_rank=4,
    batch_size=32,
    progress=False,
)
TINY_ARGS = [
    "--seed",
    "1",
    "--steps",
    "200",
    "--pretrain-steps",
    "300",
    "--d-model",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--adapter-dim",
    "8",
    "--lora-rank",
    "4",
    "--batch-size",
    "32",
    "--no-progress",
]
HAS_LORA = hasattr(jadapters, "LoRAConfig")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """``main`` on the tiny flags, plotting into a temporary directory."""
    out_dir = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*TINY_ARGS, "--out-dir", str(out_dir)])
    results = json.loads((out_dir / "results.json").read_text())
    return code, stdout.getvalue(), out_dir, results


def test_cli_exits_zero_and_writes_its_outputs(cli):
    code, _, out_dir, results = cli
    assert code == 0
    png = out_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["plot"] == str(png)
    for name in ["base", *results["methods"]]:
        checkpoint = out_dir / name
        assert checkpoint.is_dir() and any(p.is_file() for p in checkpoint.rglob("*")), name
    adapter = results["methods"]["adapter"]
    assert adapter["checkpoint_bytes"] > 0
    # The adapter checkpoint holds the adapters only: far less than the whole model.
    assert adapter["checkpoint_bytes"] < results["model"]["checkpoint_bytes"]


def test_cli_table_lists_every_method(cli):
    _, stdout, _, results = cli
    rows = {line.split()[0] for line in stdout.splitlines() if line.strip()}
    ran = set(METHODS) if HAS_LORA else set(METHODS) - {"lora"}
    assert ran <= rows
    assert set(results["methods"]) == ran
    if not HAS_LORA:
        assert "lora: skipped" in stdout
    assert "load_digits" in stdout  # says where the data comes from


def test_same_seed_gives_the_same_numbers(cli, tmp_path):
    _, _, _, first = cli
    again = run_demo(dataclasses.replace(TINY, out_dir=str(tmp_path), plot=False))
    assert again["pretrained"]["source_acc"] == first["pretrained"]["source_acc"]
    assert again["pretrained"]["losses"] == first["pretrained"]["losses"]
    for name, result in first["methods"].items():
        for field in ("target_acc", "source_acc", "source_acc_disabled", "losses"):
            assert again["methods"][name][field] == result[field], (name, field)
    assert again["plot"] is None and not (tmp_path / "curves.png").exists()


def test_disabled_adapters_give_back_the_pretrained_model(cli):
    _, _, _, results = cli
    pretrained = results["pretrained"]["source_acc"]
    for name in ("adapter", "lora") if HAS_LORA else ("adapter",):
        result = results["methods"][name]
        assert result["source_acc_disabled"] == pretrained, name
        assert result["disabled_logits_identical"], name


def test_adapter_checkpoints_load_back_onto_the_base(cli):
    _, _, _, results = cli
    if not hasattr(jadapters, "load_adapters"):
        pytest.skip("jadapters.load_adapters is not in this version")
    for name in ("adapter", "lora") if HAS_LORA else ("adapter",):
        assert results["methods"][name]["saved_with"] == "jadapters.save_adapters"
        assert results["methods"][name]["reloaded_identical"] is True, name


def test_lora_is_skipped_where_jadapters_has_none(monkeypatch, tmp_path):
    monkeypatch.delattr(jadapters, "LoRAConfig", raising=False)
    config = dataclasses.replace(TINY, methods=("lora", "head"), out_dir=str(tmp_path), plot=False)
    stdout = io.StringIO()
    results = run_demo(config, out=stdout)
    assert set(results["methods"]) == {"head"}
    assert "LoRAConfig" in results["skipped"]["lora"]
    assert "lora: skipped" in stdout.getvalue()
    assert results["methods"]["head"]["step_ratio"] is None  # no full run to compare with


def test_adapters_learn_the_shifted_domain(cli):
    _, _, _, results = cli
    before = results["pretrained"]["target_acc"]
    adapter = results["methods"]["adapter"]["target_acc"]
    assert before < 0.25  # the shift breaks the pretrained model: near chance (0.1)
    # Far above chance and the unadapted model. (At this tiny size, one block of width 32,
    # adapters beat training the head in most seeds but not all; the default demo shows it.)
    assert adapter > max(0.5, before + 0.3)
    # Only the adapters trained, a small share of the model.
    assert results["methods"]["adapter"]["trainable_share"] < 0.15


def test_help_says_what_and_where_the_data_comes_from(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "load_digits" in text and "no download" in text
    for flag in ("--seed", "--steps", "--methods", "--out-dir", "--no-plot", "--no-progress"):
        assert flag in text


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--methods", "head,bogus"], "methods must be distinct names"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--d-model", "10", "--heads", "4"], "divisible by heads"),
    ],
)
def test_bad_flags_exit_with_a_usage_error(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_domain_shift_rotates_and_inverts():
    x, y = data.load_digits_tokens()
    assert x.shape == (1797, 8, 8) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    shifted = data.shift_domain(x, "rotate+invert")
    np.testing.assert_array_equal(shifted, 1.0 - np.rot90(x, 1, axes=(1, 2)))
    np.testing.assert_array_equal(data.shift_domain(x, "invert"), 1.0 - x)
    with pytest.raises(ValueError, match="kind must be one of"):
        data.shift_domain(x, "flip")


def test_split_is_deterministic_and_stratified():
    x, y = data.load_digits_tokens()
    a, b = data.train_test_split(x, y, seed=5), data.train_test_split(x, y, seed=5)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    c = data.train_test_split(x, y, seed=6)
    assert not np.array_equal(a.y_train, c.y_train)
    assert len(a.x_train) + len(a.x_test) == len(x)
    assert set(np.bincount(a.y_test)) <= {44, 45, 46}  # a quarter of each class of ~180
