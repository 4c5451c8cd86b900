"""Strategies: how an adapter's output joins the stream (NeMo's adapter strategy tests)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jadapters
from jadapters import (
    ResidualAddStrategy,
    ReturnResultStrategy,
    ScaledAddStrategy,
    StrategyOutput,
)

SHAPE = (3, 4, 5)  # (batch, time, features)


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _pair(seed=0, shape=SHAPE):
    return _normal(shape, 2 * seed), _normal(shape, 2 * seed + 1)


# --- residual / return-result / scaled add ------------------------------------------------


def test_residual_add_function_equals_sum():
    x, out = _pair()
    result = jadapters.residual_add(x, out)
    assert isinstance(result, StrategyOutput)
    assert result.aux_loss is None
    np.testing.assert_allclose(result.output, np.asarray(x) + np.asarray(out), rtol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_residual_add_strategy_equals_sum(training):
    x, out = _pair()
    result = ResidualAddStrategy()(x, out, key=None, training=training)
    np.testing.assert_array_equal(result.output, x + out)
    assert result.aux_loss is None


@pytest.mark.parametrize("training", [False, True])
def test_return_result_returns_adapter_output(training):
    x, out = _pair()
    result = ReturnResultStrategy()(x, out, key=None, training=training)
    np.testing.assert_array_equal(result.output, out)
    assert result.aux_loss is None


@pytest.mark.parametrize("scale", [0.0, 0.5, -2.0, 3.0])
def test_scaled_add_equals_x_plus_scaled_output(scale):
    x, out = _pair()
    expected = np.asarray(x) + scale * np.asarray(out)
    result = ScaledAddStrategy(scale=scale)(x, out, key=None, training=False)
    np.testing.assert_allclose(result.output, expected, rtol=1e-6, atol=1e-6)
    assert result.aux_loss is None
    np.testing.assert_allclose(jadapters.scaled_add(x, out, scale=scale), expected, rtol=1e-6)


def test_scaled_add_keeps_dtype():
    x, out = (a.astype(jnp.bfloat16) for a in _pair())
    assert ScaledAddStrategy(scale=0.5)(x, out).output.dtype == jnp.bfloat16


# --- stochastic depth -----------------------------------------------------------------------


@pytest.mark.parametrize("per_example", [False, True])
def test_stochastic_depth_zero_is_exact_residual_add_in_training(per_example):
    x, out = _pair()
    strategy = ResidualAddStrategy(stochastic_depth=0.0, per_example=per_example)
    assert not strategy.requires_key
    result = strategy(x, out, key=None, training=True)
    np.testing.assert_array_equal(result.output, x + out)


@pytest.mark.parametrize("per_example", [False, True])
def test_stochastic_depth_one_drops_contribution_in_training(per_example):
    x, out = _pair()
    strategy = ResidualAddStrategy(stochastic_depth=1.0, per_example=per_example)
    for seed in range(3):
        result = strategy(x, out, key=jax.random.key(seed), training=True)
        np.testing.assert_array_equal(result.output, x)


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_stochastic_depth_in_eval_is_exact_residual_add_without_key(p):
    x, out = _pair()
    strategy = ResidualAddStrategy(stochastic_depth=p)
    assert strategy.requires_key
    result = strategy(x, out, key=None, training=False)
    np.testing.assert_array_equal(result.output, x + out)


@pytest.mark.parametrize("per_example", [False, True])
def test_stochastic_depth_in_training_without_key_raises(per_example):
    x, out = _pair()
    strategy = ResidualAddStrategy(stochastic_depth=0.3, per_example=per_example)
    with pytest.raises(ValueError, match="PRNG key"):
        strategy(x, out, key=None, training=True)
    with pytest.raises(ValueError, match="PRNG key"):
        jadapters.residual_add(x, out, training=True, stochastic_depth=0.3, key=None)


def test_stochastic_depth_same_key_same_result_and_keys_differ():
    x, out = _pair()
    strategy = ResidualAddStrategy(stochastic_depth=0.5)
    first = strategy(x, out, key=jax.random.key(7), training=True).output
    again = strategy(x, out, key=jax.random.key(7), training=True).output
    np.testing.assert_array_equal(first, again)
    outputs = [strategy(x, out, key=jax.random.key(s), training=True).output for s in range(32)]
    dropped = [bool(jnp.array_equal(o, x)) for o in outputs]
    # With 32 fixed keys and p = 0.5 both outcomes occur: the key drives the coin.
    assert any(dropped) and not all(dropped)


def _kept_or_dropped(rows, x, out, p):
    """Per row: True if the row is x + out / (1 - p), False if it is x; fails otherwise."""
    x, out, rows = (np.asarray(a, np.float64) for a in (x, out, rows))
    kept_value = x + out / (1.0 - p)
    kinds = []
    for i in range(rows.shape[0]):
        is_dropped = np.allclose(rows[i], x[i], rtol=1e-6, atol=1e-6)
        is_kept = np.allclose(rows[i], kept_value[i], rtol=1e-5, atol=1e-5)
        assert is_dropped != is_kept, f"row {i} is neither x nor x + out/(1-p)"
        kinds.append(is_kept)
    return np.array(kinds)


@pytest.mark.parametrize("p", [0.25, 0.5, 0.9])
def test_stochastic_depth_scales_kept_contribution(p):
    x, out = _pair(shape=(4, 3))
    strategy = ResidualAddStrategy(stochastic_depth=p)
    keys = jax.random.split(jax.random.key(0), 64)
    outputs = jax.vmap(lambda k: strategy(x, out, key=k, training=True).output)(keys)
    kinds = np.concatenate([_kept_or_dropped(o, x, out, p) for o in outputs])
    assert kinds.any(), "no key kept the adapter"
    assert not kinds.all(), "no key dropped the adapter"


def test_stochastic_depth_batch_mode_draws_one_coin_for_the_batch():
    x, out = _pair(shape=(64, 3))
    strategy = ResidualAddStrategy(stochastic_depth=0.5)
    seen = set()
    for seed in range(8):
        kinds = _kept_or_dropped(
            strategy(x, out, key=jax.random.key(seed), training=True).output, x, out, 0.5
        )
        assert kinds.all() or not kinds.any(), "rows of one batch got different coins"
        seen.add(bool(kinds[0]))
    assert seen == {True, False}


def test_stochastic_depth_per_example_draws_one_coin_per_row():
    x, out = _pair(shape=(64, 3, 2))
    strategy = ResidualAddStrategy(stochastic_depth=0.5, per_example=True)
    result = strategy(x, out, key=jax.random.key(0), training=True).output
    kinds = _kept_or_dropped(result, x, out, 0.5)
    assert kinds.any() and not kinds.all()


def test_stochastic_depth_is_unbiased():
    x, out = _pair(shape=(2, 3))
    strategy = ResidualAddStrategy(stochastic_depth=0.5)
    keys = jax.random.split(jax.random.key(0), 2000)
    outputs = jax.jit(jax.vmap(lambda k: strategy(x, out, key=k, training=True).output))(keys)
    # Each mean has standard deviation |out| / sqrt(2000) < 0.03 for |out| < 1.3.
    np.testing.assert_allclose(outputs.mean(axis=0), x + out, atol=0.15)
    assert not np.allclose(outputs.std(axis=0), 0.0)


# --- l2 auxiliary loss ----------------------------------------------------------------------


def test_l2_loss_is_none_in_eval():
    x, out = _pair()
    assert ResidualAddStrategy(l2_lambda=0.5)(x, out, key=None, training=False).aux_loss is None


def test_l2_loss_is_none_when_lambda_is_zero():
    x, out = _pair()
    assert ResidualAddStrategy(l2_lambda=0.0)(x, out, key=None, training=True).aux_loss is None


@pytest.mark.parametrize("lam", [0.1, 2.0])
def test_l2_loss_formula(lam):
    x, out = _pair()
    result = ResidualAddStrategy(l2_lambda=lam)(x, out, key=None, training=True)
    out64 = np.asarray(out, np.float64)
    expected = lam * np.mean(np.sum(out64**2, axis=(1, 2)))
    assert result.aux_loss.shape == ()
    np.testing.assert_allclose(result.aux_loss, expected, rtol=1e-5)
    np.testing.assert_array_equal(result.output, x + out)


def test_l2_loss_is_zero_for_zero_output():
    x, _ = _pair()
    result = ResidualAddStrategy(l2_lambda=1.0)(x, jnp.zeros_like(x), key=None, training=True)
    assert float(result.aux_loss) == 0.0


def test_l2_loss_is_of_the_contribution_actually_added():
    x, out = _pair()
    strategy = ResidualAddStrategy(stochastic_depth=0.5, l2_lambda=1.0)
    out64 = np.asarray(out, np.float64)
    seen = set()
    for seed in range(8):
        result = strategy(x, out, key=jax.random.key(seed), training=True)
        kept = not np.array_equal(np.asarray(result.output), np.asarray(x))
        expected = np.mean(np.sum((2.0 * out64) ** 2, axis=(1, 2))) if kept else 0.0
        np.testing.assert_allclose(result.aux_loss, expected, rtol=1e-5)
        seen.add(kept)
    assert seen == {True, False}


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.5, -0.1])
def test_stochastic_depth_out_of_range_raises(p):
    with pytest.raises(ValueError, match=r"stochastic_depth must be in \[0, 1\]"):
        ResidualAddStrategy(stochastic_depth=p)


def test_negative_l2_lambda_raises():
    with pytest.raises(ValueError, match="l2_lambda must be >= 0"):
        ResidualAddStrategy(l2_lambda=-1.0)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ResidualAddStrategy(stochastic_depth=NAN), r"stochastic_depth must be a finite"),
        (lambda: ResidualAddStrategy(stochastic_depth="0.5"), r"stochastic_depth must be a number"),
        (lambda: ResidualAddStrategy(stochastic_depth=None), r"stochastic_depth .* got None"),
        (lambda: ResidualAddStrategy(stochastic_depth=True), r"stochastic_depth .* got True"),
        (lambda: ResidualAddStrategy(l2_lambda=INF), r"l2_lambda must be a finite number >= 0"),
        (lambda: ResidualAddStrategy(l2_lambda=NAN), r"l2_lambda must be a finite number >= 0"),
        (lambda: ResidualAddStrategy(l2_lambda=[0.1]), r"l2_lambda must be a number >= 0"),
        (lambda: ResidualAddStrategy(l2_lambda=10**400), r"l2_lambda must be a finite number"),
        (lambda: ResidualAddStrategy(per_example=1), r"per_example must be a bool, got 1"),
        (lambda: ResidualAddStrategy(per_example="no"), r"per_example must be a bool, got 'no'"),
        (lambda: ScaledAddStrategy(scale=NAN), r"scale must be a finite number, got nan"),
        (lambda: ScaledAddStrategy(scale=-INF), r"scale must be a finite number, got -inf"),
        (lambda: ScaledAddStrategy(scale="2"), r"scale must be a number, got '2' \(str\)"),
        (lambda: ScaledAddStrategy(scale=None), r"scale must be a number, got None"),
    ],
)
def test_bad_strategy_fields_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_scalars_become_python_values():
    strategy = ResidualAddStrategy(
        stochastic_depth=np.float32(0.5), l2_lambda=np.int64(2), per_example=np.bool_(True)
    )
    assert strategy == ResidualAddStrategy(stochastic_depth=0.5, l2_lambda=2.0, per_example=True)
    assert [type(getattr(strategy, f.name)) for f in dataclasses.fields(strategy)] == [
        float,
        float,
        bool,
    ]
    scaled = ScaledAddStrategy(scale=jnp.asarray(3))
    assert type(scaled.scale) is float and scaled == ScaledAddStrategy(scale=3.0)
    assert hash(scaled) == hash(ScaledAddStrategy(scale=3.0))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_stochastic_depth_bounds_are_accepted(p):
    assert ResidualAddStrategy(stochastic_depth=p).stochastic_depth == p


@pytest.mark.parametrize(
    "make",
    [
        lambda: ResidualAddStrategy(stochastic_depth=0.2, l2_lambda=0.1, per_example=True),
        lambda: ReturnResultStrategy(),
        lambda: ScaledAddStrategy(scale=0.5),
    ],
)
def test_strategies_are_hashable_frozen_dataclasses(make):
    a, b = make(), make()
    assert dataclasses.is_dataclass(a)
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert isinstance(a, jadapters.AdapterStrategy)
    for field in dataclasses.fields(a):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(a, field.name, getattr(a, field.name))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.some_new_attribute = 1


def test_strategies_with_different_fields_differ():
    assert ResidualAddStrategy(stochastic_depth=0.1) != ResidualAddStrategy(stochastic_depth=0.2)
    assert ScaledAddStrategy(scale=1.0) != ScaledAddStrategy(scale=2.0)


# --- strategies through apply_adapter -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SubtractStrategy:
    """A user strategy that returns a plain array, not a StrategyOutput."""

    def __call__(self, x, adapter_output, *, key=None, training=False):
        return x - adapter_output


def _adapter_and_params(strategy, randomize, x):
    adapter = jadapters.LinearAdapter(4, adapter_strategy=strategy)
    variables = randomize(adapter.init(jax.random.key(1), x), 2)
    return adapter, variables


def test_user_strategy_returning_array_works_through_apply_adapter(randomize):
    x = _normal((2, 3, 8), 0)
    adapter, variables = _adapter_and_params(SubtractStrategy(), randomize, x)
    raw = adapter.apply(variables, x)
    assert not np.allclose(raw, 0.0)
    result = jadapters.apply_adapter(adapter, variables, x)
    assert isinstance(result, StrategyOutput)
    assert result.aux_loss is None
    np.testing.assert_array_equal(result.output, x - raw)


def test_apply_adapter_passes_key_to_stochastic_depth(randomize):
    x = _normal((2, 3, 8), 0)
    strategy = ResidualAddStrategy(stochastic_depth=1.0)
    adapter, variables = _adapter_and_params(strategy, randomize, x)
    raw = adapter.apply(variables, x)
    dropped = jadapters.apply_adapter(adapter, variables, x, training=True, key=jax.random.key(3))
    np.testing.assert_array_equal(dropped.output, x)
    evaluated = jadapters.apply_adapter(adapter, variables, x, training=False)
    np.testing.assert_array_equal(evaluated.output, x + raw)
    with pytest.raises(ValueError, match="PRNG key"):
        jadapters.apply_adapter(adapter, variables, x, training=True, key=None)


def test_apply_adapter_joins_the_given_stream(randomize):
    x = _normal((2, 3, 8), 0)
    stream = _normal((2, 3, 8), 5)
    adapter, variables = _adapter_and_params(ResidualAddStrategy(), randomize, x)
    result = jadapters.apply_adapter(adapter, variables, x, stream=stream)
    np.testing.assert_array_equal(result.output, stream + adapter.apply(variables, x))
