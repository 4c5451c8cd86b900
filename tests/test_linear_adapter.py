"""The Houlsby bottleneck adapter (NeMo's LinearAdapter tests)."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jadapters
from jadapters import LinearAdapter, LinearAdapterConfig, apply_adapter

ACTIVATIONS = ["identity", "hardtanh", "relu", "selu", "swish", "silu", "gelu"]
NORM_POSITIONS = ["pre", "post"]
D, DIM = 8, 4
X_SHAPE = (2, 3, D)


def _x(dtype=jnp.float32, shape=X_SHAPE, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _params(variables):
    return flax.core.unfreeze(variables)["params"]


# --- reference implementation in float64 NumPy ----------------------------------------------

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_erf = np.vectorize(math.erf)

NP_ACTIVATIONS = {
    "identity": lambda h: h,
    "hardtanh": lambda h: np.clip(h, -1.0, 1.0),
    "relu": lambda h: np.maximum(h, 0.0),
    "selu": lambda h: _SELU_SCALE * np.where(h > 0, h, _SELU_ALPHA * np.expm1(h)),
    "swish": lambda h: h / (1.0 + np.exp(-h)),
    "silu": lambda h: h / (1.0 + np.exp(-h)),
    "gelu": lambda h: 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0))),
}


def np_layer_norm(h, scale, bias, eps=1e-6):
    mean = h.mean(axis=-1, keepdims=True)
    var = ((h - mean) ** 2).mean(axis=-1, keepdims=True)
    return (h - mean) / np.sqrt(var + eps) * scale + bias


def np_linear_adapter(params, x, activation, norm_position):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    act = NP_ACTIVATIONS[activation]
    if norm_position == "pre":
        h = np_layer_norm(x, p["norm"]["scale"], p["norm"]["bias"])
        return act(h @ p["down"]["kernel"]) @ p["up"]["kernel"]
    h = act(x @ p["down"]["kernel"]) @ p["up"]["kernel"]
    return np_layer_norm(h, p["norm"]["scale"], p["norm"]["bias"])


def test_activation_names_are_the_documented_seven():
    assert sorted(jadapters._activations.ACTIVATIONS) == sorted(ACTIVATIONS)


# --- identity at init -----------------------------------------------------------------------


@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_identity_at_init(activation, norm_position, key):
    adapter = LinearAdapter(DIM, activation=activation, norm_position=norm_position)
    x = _x()
    variables = adapter.init(key, x)
    np.testing.assert_array_equal(adapter.apply(variables, x), np.zeros(X_SHAPE, np.float32))
    result = apply_adapter(adapter, variables, x)
    np.testing.assert_array_equal(result.output, x)
    assert result.aux_loss is None


@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
def test_param_shapes_and_init(norm_position, key):
    adapter = LinearAdapter(DIM, norm_position=norm_position)
    params = _params(adapter.init(key, _x()))
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {
        "norm": {"scale": (D,), "bias": (D,)},
        "down": {"kernel": (D, DIM)},
        "up": {"kernel": (DIM, D)},
    }
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert np.any(params["down"]["kernel"] != 0)
    if norm_position == "pre":
        # LayerNorm starts as the plain normalization; the up-projection starts at zero.
        np.testing.assert_array_equal(params["norm"]["scale"], np.ones(D))
        np.testing.assert_array_equal(params["norm"]["bias"], np.zeros(D))
        np.testing.assert_array_equal(params["up"]["kernel"], np.zeros((DIM, D)))
    else:
        # The final LayerNorm's scale and bias start at zero; the projections are random.
        np.testing.assert_array_equal(params["norm"]["scale"], np.zeros(D))
        np.testing.assert_array_equal(params["norm"]["bias"], np.zeros(D))
        assert np.any(params["up"]["kernel"] != 0)


@pytest.mark.parametrize("features", [3, D])
def test_in_features_inferred_from_input(features, key):
    adapter = LinearAdapter(DIM)
    x = _x(shape=(2, features))
    params = _params(adapter.init(key, x))
    assert params["down"]["kernel"].shape == (features, DIM)
    assert params["up"]["kernel"].shape == (DIM, features)
    assert apply_adapter(adapter, adapter.init(key, x), x).output.shape == x.shape


def test_explicit_in_features_matching_input_works(key):
    adapter = LinearAdapter(DIM, in_features=D)
    x = _x()
    np.testing.assert_array_equal(apply_adapter(adapter, adapter.init(key, x), x).output, x)


def test_in_features_mismatch_raises(key):
    adapter = LinearAdapter(DIM, in_features=D + 1)
    with pytest.raises(
        ValueError, match=rf"in_features={D + 1} but got an input with last axis {D}"
    ):
        adapter.init(key, _x())


def test_in_features_mismatch_raises_at_apply(key):
    variables = LinearAdapter(DIM).init(key, _x())
    with pytest.raises(ValueError, match="in_features"):
        apply_adapter(LinearAdapter(DIM, in_features=D + 1), variables, _x())


# --- explicit formula -----------------------------------------------------------------------


@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_explicit_formula(activation, norm_position, key, randomize):
    adapter = LinearAdapter(DIM, activation=activation, norm_position=norm_position)
    x = _x()
    variables = randomize(adapter.init(key, x), seed=1)
    expected = np_linear_adapter(_params(variables), x, activation, norm_position)
    raw = adapter.apply(variables, x)
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        apply_adapter(adapter, variables, x).output, np.asarray(x) + expected, rtol=1e-4, atol=1e-5
    )


# --- dropout --------------------------------------------------------------------------------


def _dropout_setup(key, randomize, rate=0.5):
    x = _x()
    adapter = LinearAdapter(DIM, dropout=rate)
    variables = randomize(adapter.init(key, x), seed=1)
    return adapter, variables, x


def test_dropout_is_off_when_deterministic(key, randomize):
    adapter, variables, x = _dropout_setup(key, randomize)
    first = adapter.apply(variables, x, deterministic=True)
    second = adapter.apply(variables, x, deterministic=True)
    np.testing.assert_array_equal(first, second)
    without_dropout = LinearAdapter(DIM).apply(variables, x)
    np.testing.assert_array_equal(first, without_dropout)
    np.testing.assert_array_equal(apply_adapter(adapter, variables, x).output, x + first)


def test_dropout_in_training_masks_and_rescales(key, randomize):
    rate = 0.5
    adapter, variables, x = _dropout_setup(key, randomize, rate)
    clean = np.asarray(adapter.apply(variables, x))
    assert np.all(clean != 0)
    noisy = np.asarray(
        adapter.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    )
    dropped = noisy == 0
    assert dropped.any() and not dropped.all()
    np.testing.assert_allclose(noisy[~dropped], clean[~dropped] / (1 - rate), rtol=1e-5)
    # Through apply_adapter: the stream gets x + (masked, rescaled) output.
    out = apply_adapter(adapter, variables, x, training=True, key=jax.random.key(3)).output
    delta = np.asarray(out) - np.asarray(x)
    assert not np.allclose(delta, clean)
    is_zero = np.isclose(delta, 0.0, atol=1e-6)
    assert is_zero.any() and not is_zero.all()
    np.testing.assert_allclose(delta[~is_zero], clean[~is_zero] / (1 - rate), rtol=1e-4, atol=1e-5)


def test_dropout_same_key_same_result(key, randomize):
    adapter, variables, x = _dropout_setup(key, randomize)
    a = apply_adapter(adapter, variables, x, training=True, key=jax.random.key(4)).output
    b = apply_adapter(adapter, variables, x, training=True, key=jax.random.key(4)).output
    np.testing.assert_array_equal(a, b)


def test_dropout_in_training_without_key_raises(key, randomize):
    adapter, variables, x = _dropout_setup(key, randomize)
    with pytest.raises(ValueError, match="dropout=0.5 and needs a PRNG key"):
        apply_adapter(adapter, variables, x, training=True, key=None)


def test_no_dropout_in_training_needs_no_key(key, randomize):
    x = _x()
    adapter = LinearAdapter(DIM)
    variables = randomize(adapter.init(key, x), seed=1)
    np.testing.assert_array_equal(
        apply_adapter(adapter, variables, x, training=True, key=None).output,
        apply_adapter(adapter, variables, x, training=False).output,
    )


# --- construction errors --------------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(dim=0), "dim must be a positive int"),
    (dict(dim=-3), "dim must be a positive int"),
    (dict(dim=2.5), "dim must be a positive int"),
    (dict(dim=True), "dim must be a positive int"),
    (dict(dim=4, in_features=0), "in_features must be a positive int"),
    (dict(dim=4, activation="tanhh"), "activation must be one of"),
    (dict(dim=4, norm_position="middle"), "norm_position must be one of"),
    (dict(dim=4, dropout=1.0), r"dropout must be a float in \[0, 1\)"),
    (dict(dim=4, dropout=-0.1), r"dropout must be a float in \[0, 1\)"),
    (dict(dim=4, adapter_strategy=3), "adapter_strategy must be a strategy"),
]


@pytest.mark.parametrize("factory", [LinearAdapter, LinearAdapterConfig], ids=["module", "config"])
@pytest.mark.parametrize("kwargs,message", BAD_ARGUMENTS)
def test_invalid_arguments_raise(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


class _UnhashableStrategy:
    __hash__ = None

    def __call__(self, x, adapter_output, *, key=None, training=False):
        return x + adapter_output


@pytest.mark.parametrize("factory", [LinearAdapter, LinearAdapterConfig], ids=["module", "config"])
def test_unhashable_strategy_raises(factory):
    with pytest.raises(ValueError, match="must be hashable"):
        factory(dim=4, adapter_strategy=_UnhashableStrategy())


# --- jit, dtypes and tracing ----------------------------------------------------------------


@pytest.mark.parametrize("use_jit", [True, False])
def test_jit_matches_eager_and_formula(use_jit, key, randomize):
    adapter = LinearAdapter(DIM, activation="gelu")
    x = _x()
    variables = randomize(adapter.init(key, x), seed=2)

    def forward(variables, x):
        return apply_adapter(adapter, variables, x).output

    fn = jax.jit(forward) if use_jit else forward
    out = fn(variables, x)
    expected = np.asarray(x) + np_linear_adapter(_params(variables), x, "gelu", "pre")
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    other = forward if use_jit else jax.jit(forward)
    np.testing.assert_allclose(out, other(variables, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_is_preserved_and_identity_holds(dtype, norm_position, key, randomize):
    adapter = LinearAdapter(DIM, norm_position=norm_position)
    x = _x(dtype)
    variables = adapter.init(key, x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    raw = adapter.apply(variables, x)
    assert raw.dtype == dtype
    result = apply_adapter(adapter, variables, x).output
    assert result.dtype == dtype
    np.testing.assert_array_equal(np.asarray(result, np.float32), np.asarray(x, np.float32))
    trained = randomize(variables, seed=3)
    out = apply_adapter(adapter, trained, x).output
    assert out.dtype == dtype
    assert not np.array_equal(np.asarray(out, np.float32), np.asarray(x, np.float32))


def test_no_retrace_on_second_call(key, randomize):
    adapter = LinearAdapter(DIM)
    x = _x()
    variables = adapter.init(key, x)
    traces = []

    @jax.jit
    def forward(variables, x):
        traces.append(1)
        return apply_adapter(adapter, variables, x).output

    forward(variables, x)
    forward(randomize(variables, seed=4), x + 1.0)
    assert len(traces) == 1
    forward(variables, x[:1])  # a new shape does retrace, so the counter works
    assert len(traces) == 2


# --- property: identity at init for any configuration ---------------------------------------


@settings(max_examples=10, deadline=None)
@given(
    dim=st.integers(1, 16),
    features=st.integers(1, 16),
    activation=st.sampled_from(ACTIVATIONS),
    norm_position=st.sampled_from(NORM_POSITIONS),
    dropout=st.floats(0.0, 0.9, exclude_max=True),
    seed=st.integers(0, 2**16),
)
def test_identity_at_init_for_any_config(dim, features, activation, norm_position, dropout, seed):
    # Every example has new shapes, so it is compiled once as a whole (much faster than
    # compiling each eager op for the new shapes), with an "rbg" key (cheaper to compile than
    # threefry; the property does not depend on the random bits).
    adapter = LinearAdapter(
        dim, activation=activation, norm_position=norm_position, dropout=dropout
    )
    x = _x(shape=(2, features), seed=seed)

    @jax.jit
    def run(x, key):
        variables = adapter.init(key, x)
        raw = adapter.apply(variables, x)
        evaluated = apply_adapter(adapter, variables, x).output
        trained = apply_adapter(adapter, variables, x, training=True, key=key).output
        return raw, evaluated, trained

    raw, evaluated, trained = run(x, jax.random.key(seed, impl="rbg"))
    np.testing.assert_array_equal(raw, np.zeros_like(x))
    np.testing.assert_array_equal(evaluated, x)
    np.testing.assert_array_equal(trained, x)
