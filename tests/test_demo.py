"""The demo, ``python -m jadapters demo``, at a small size, and the pretrained base it ships.

The module runs the demo once through the CLI (on the shipped base, with few steps) and once
more through ``run_demo``, which reuses the first run's compiled steps (they are cached per
model), so it costs about one cold run.
"""

import contextlib
import dataclasses
import io
import json
import zipfile

import numpy as np
import pytest

from jadapters.demo import base_info, data, pretrain, pretrained, pretrained_base, runs
from jadapters.demo.main import METHODS, DemoConfig, main, run_demo

# The shipped base's model, few steps: what the full demo does, quickly.
SMALL = DemoConfig(steps=150, adapter_dim=8, lora_rank=4, batch_size=32, progress=False)
SMALL_ARGS = [
    "--steps",
    "150",
    "--adapter-dim",
    "8",
    "--lora-rank",
    "4",
    "--batch-size",
    "32",
    "--no-progress",
]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """``main`` on the small flags, writing into a temporary directory."""
    out_dir = tmp_path_factory.mktemp("demo")
    figure = out_dir / "figures" / "demo.png"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*SMALL_ARGS, "--out-dir", str(out_dir), "--figure", str(figure)])
    results = json.loads((out_dir / "results.json").read_text())
    return code, stdout.getvalue(), out_dir, results


def test_cli_exits_zero_and_writes_its_outputs(cli):
    code, _, out_dir, results = cli
    assert code == 0
    png = out_dir / "figures" / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["figure"] == str(png)
    for name in ["base", *results["methods"], "adapter_inverted"]:
        checkpoint = out_dir / name
        assert checkpoint.is_dir() and any(p.is_file() for p in checkpoint.rglob("*")), name
    adapter = results["methods"]["adapter"]
    # The adapter checkpoint holds the adapters only: far less than the whole model.
    assert 0 < adapter["checkpoint_bytes"] < results["model"]["checkpoint_bytes"] / 3


def test_cli_starts_from_the_shipped_base_and_says_so(cli):
    _, stdout, _, results = cli
    assert "shipped with jadapters" in results["pretrained"]["where"]
    assert "base_weights.npz" in stdout
    recorded = base_info()
    assert results["pretrained"]["source_acc"] == pytest.approx(
        recorded["source_test_accuracy"], abs=1e-4
    )
    assert results["pretrained"]["target_acc"] == pytest.approx(
        recorded["target_test_accuracy"], abs=1e-4
    )


def test_cli_table_lists_the_base_and_every_method(cli):
    _, stdout, _, results = cli
    rows = {line.split()[0] for line in stdout.splitlines() if line.strip()}
    assert {"base", *METHODS} <= rows
    assert set(results["methods"]) == set(METHODS)
    assert "load_digits" in stdout  # says where the data comes from
    for name, result in results["methods"].items():
        lo, hi = result["step_seconds_quartiles"]
        assert lo <= result["step_seconds"] <= hi, name
        lo, hi = result["step_ratio_range"]
        assert lo <= result["step_ratio"] <= hi, name


def test_same_seed_gives_the_same_numbers(cli, tmp_path):
    _, _, _, first = cli
    again = run_demo(dataclasses.replace(SMALL, out_dir=str(tmp_path), plot=False))
    assert again["pretrained"] == first["pretrained"]
    for name, result in first["methods"].items():
        for field in ("target_acc", "source_acc", "source_acc_disabled", "losses"):
            assert again["methods"][name][field] == result[field], (name, field)
    assert again["switch"]["accuracy"] == first["switch"]["accuracy"]
    assert again["merged"] == first["merged"]
    assert again["figure"] is None and not (tmp_path / "demo.png").exists()


def test_adapting_forgets_the_source_domain_but_disabled_adapters_do_not(cli):
    _, stdout, _, results = cli
    before = results["pretrained"]["source_acc"]
    assert results["methods"]["full"]["source_acc"] < before - 0.3  # full fine-tuning forgets
    for name in ("adapter", "lora"):
        result = results["methods"][name]
        assert result["source_acc_disabled"] == before, name
        assert result["disabled_logits_identical"], name
    assert "forgetting:" in stdout


def test_adapter_checkpoints_load_back_onto_the_base(cli):
    _, _, _, results = cli
    for name in ("adapter", "lora"):
        assert results["methods"][name]["saved_with"] == "jadapters.save_adapters"
        assert results["methods"][name]["reloaded_identical"] is True, name


def test_two_task_adapters_load_into_a_fresh_model_and_switch(cli):
    _, stdout, _, results = cli
    switched = results["switch"]
    assert switched["adapters"] == ["blocks:rotated_inverted", "blocks:inverted"]
    acc = switched["accuracy"]
    pre = results["pretrained"]
    assert acc["none"]["upright"] == pre["source_acc"]  # all disabled: the base
    assert acc["none"]["rotate+invert"] == pre["target_acc"]
    # Each task adapter is the best on its own domain, and far above the base there.
    assert acc["blocks:rotated_inverted"]["rotate+invert"] > pre["target_acc"] + 0.4
    assert acc["blocks:inverted"]["invert"] > acc["none"]["invert"] + 0.4
    assert acc["blocks:rotated_inverted"]["invert"] < acc["blocks:inverted"]["invert"]
    assert acc["blocks:inverted"]["rotate+invert"] < acc["blocks:rotated_inverted"]["rotate+invert"]
    assert "switched by name" in stdout


def test_merged_lora_classifies_like_the_unmerged_model(cli):
    _, stdout, _, results = cli
    merged = results["merged"]
    assert merged["same_predictions"]
    assert merged["target_acc_merged"] == merged["target_acc_unmerged"]
    assert merged["target_acc_unmerged"] == results["methods"]["lora"]["target_acc"]
    assert merged["max_abs_logit_diff"] < 1e-4
    assert "merged LoRA" in stdout


def test_adapters_learn_the_shifted_domain(cli):
    _, _, _, results = cli
    before = results["pretrained"]["target_acc"]
    assert before < 0.25  # the shift breaks the pretrained model: near chance (0.1)
    for name in ("adapter", "lora"):
        assert results["methods"][name]["target_acc"] > max(0.75, before + 0.5), name
    # Only the adapters trained, a small share of the model.
    assert results["methods"]["adapter"]["trainable_share"] < 0.15


def test_another_model_is_pretrained_first(tmp_path):
    config = DemoConfig(
        d_model=16,
        layers=1,
        heads=2,
        pretrain_steps=20,
        steps=5,
        methods=("head",),
        out_dir=str(tmp_path),
        plot=False,
        progress=False,
    )
    stdout = io.StringIO()
    results = run_demo(config, out=stdout)
    assert results["pretrained"]["where"].startswith("pretrained now")
    assert "pretrained now" in stdout.getvalue()
    assert set(results["methods"]) == {"head"}
    assert results["switch"] is None and results["merged"] is None
    assert results["methods"]["head"]["step_ratio"] is None  # no full run to compare with


def test_help_says_what_and_where_the_data_comes_from(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "load_digits" in text and "no download" in text
    for flag in ("--seed", "--steps", "--methods", "--out-dir", "--figure", "--no-progress"):
        assert flag in text


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--methods", "head,bogus"], "methods must be distinct names"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--d-model", "10", "--heads", "4"], "divisible by heads"),
        (["--shift", "invert", "--second-shift", "invert"], "second_shift must be one of"),
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


# ------------------------------------------------------------------- the pretrained base


def test_shipped_base_has_its_recorded_accuracy():
    info = base_info()
    assert info["config"] == pretrained.SHIPPED.to_dict()
    assert info["params"] == 68_810
    model, variables = pretrained_base("linen")
    x, y = data.load_digits_tokens()
    split = data.train_test_split(x, y, seed=info["config"]["seed"])
    apply = runs.logits_fn(model)
    accuracy = runs.accuracy(apply, variables, split.x_test, split.y_test)
    assert accuracy == pytest.approx(info["source_test_accuracy"], abs=0.005)
    assert accuracy > 0.95  # it knows the upright digits ...
    shifted = data.shift_domain(split.x_test, data.DEFAULT_SHIFT)
    target = runs.accuracy(apply, variables, shifted, split.y_test)
    assert target == pytest.approx(info["target_test_accuracy"], abs=0.005)
    assert target < 0.25  # ... and not the shifted ones


def test_shipped_file_is_small_and_exactly_what_the_build_script_writes():
    size = pretrained.WEIGHTS_PATH.stat().st_size
    assert 200_000 < size < 300_000  # about 260 KiB: 68,810 float32 numbers, deflated
    arrays, meta = pretrained.read_weights()
    params = pretrained.unflatten(arrays)
    assert pretrain.archive_bytes(params, meta) == pretrained.WEIGHTS_PATH.read_bytes()


def test_the_build_script_is_deterministic():
    """Two short runs of the build's own code give the same bytes (the full run takes longer
    than a test should; it was checked the same way when the file was built)."""
    short = dataclasses.replace(pretrained.SHIPPED, steps=3)
    first = pretrain.archive_bytes(*pretrain.pretrain(short, progress=False))
    second = pretrain.archive_bytes(*pretrain.pretrain(short, progress=False))
    assert first == second


def test_nnx_base_holds_the_same_numbers():
    from flax import nnx

    model, variables = pretrained_base("linen")
    net, state = pretrained_base("nnx")
    x = data.load_digits_tokens()[0][:64]
    np.testing.assert_allclose(np.asarray(net(x)), model.apply(variables, x), atol=1e-4)
    np.testing.assert_array_equal(
        nnx.to_pure_dict(state)["blocks"][1]["attn"]["query"]["kernel"],
        variables["params"]["blocks_1"]["attn"]["query"]["kernel"],
    )
    with pytest.raises(ValueError, match='framework must be "linen" or "nnx"'):
        pretrained_base("torch")


def _rewrite(src, dst, change):
    """Copies the archive ``src`` to ``dst``, passing ``{member name: bytes}`` to ``change``."""
    with zipfile.ZipFile(src) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)


def _npy(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda m: m.update({"head/kernel.npy": _npy(np.zeros((64, 9), np.float32))}),
            r"head/kernel is float32\[64, 9\], the model's parameter is float32\[64, 10\]",
        ),
        (
            lambda m: m.update({"head/bias.npy": _npy(np.zeros((10,), np.float64))}),
            r"head/bias is float64\[10\]",
        ),
        (
            lambda m: m.update({"head/bias.npy": _npy(np.full((10,), np.nan, np.float32))}),
            "non-finite",
        ),
        (lambda m: m.pop("pos.npy"), r"missing arrays \['pos'\]"),
        (
            lambda m: m.update({"extra.npy": _npy(np.zeros(2, np.float32))}),
            r"unexpected arrays \['extra'\]",
        ),
        (
            lambda m: m.update({"head/bias.npy": _npy(np.array([{"a": 1}], dtype=object))}),
            "cannot read the base weights",  # a pickled object: refused, never loaded
        ),
        (
            lambda m: m.update(
                {
                    "__meta__.npy": _npy(
                        np.array(json.dumps({**base_info(), "config": {"d_model": 32}}))
                    )
                }
            ),
            "was built with config",
        ),
        (lambda m: m.pop("__meta__.npy"), "has no '__meta__' string"),
    ],
    ids=["shape", "dtype", "nan", "missing", "extra", "pickle", "config", "no-meta"],
)
def test_a_damaged_weights_file_is_refused(tmp_path, change, match):
    path = tmp_path / "base.npz"
    _rewrite(pretrained.WEIGHTS_PATH, path, change)
    with pytest.raises(ValueError, match=match):
        pretrained.read_weights(path)


def test_a_file_that_is_no_archive_is_refused(tmp_path):
    path = tmp_path / "base.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read the base weights"):
        pretrained.read_weights(path)
