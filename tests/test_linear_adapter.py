"""The Houlsby bottleneck adapter (NeMo's LinearAdapter tests)."""

import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _frontends import noise_like
from absl.testing import parameterized
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


def np_layer_norm(h, scale, bias, eps=1e-5):
    """PyTorch's ``nn.LayerNorm`` (NeMo's adapter norm): biased variance, ``eps`` inside."""
    mean = h.mean(axis=-1, keepdims=True)
    var = ((h - mean) ** 2).mean(axis=-1, keepdims=True)
    return (h - mean) / np.sqrt(var + eps) * scale + bias


def np_linear_adapter(params, x, activation, norm_position, eps=1e-5):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    act = NP_ACTIVATIONS[activation]
    if norm_position == "pre":
        h = np_layer_norm(x, p["norm"]["scale"], p["norm"]["bias"], eps)
        return act(h @ p["down"]["kernel"]) @ p["up"]["kernel"]
    h = act(x @ p["down"]["kernel"]) @ p["up"]["kernel"]
    return np_layer_norm(h, p["norm"]["scale"], p["norm"]["bias"], eps)


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
    chex.assert_type(jax.tree.leaves(params), jnp.float32)
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

NAN, INF = float("nan"), float("inf")
BAD_ARGUMENTS = [
    (dict(dim=0), "dim must be a positive int, got 0"),
    (dict(dim=-3), "dim must be a positive int"),
    (dict(dim=2.5), r"dim must be a positive int, got 2.5 \(float\); pass a Python int"),
    (dict(dim=True), r"dim must be a positive int, got True \(bool\)"),
    (dict(dim="4"), r"dim must be a positive int, got '4' \(str\)"),
    (dict(dim=None), r"dim must be a positive int, got None"),
    (dict(dim=[4]), r"dim must be a positive int, got \[4\] \(list\)"),
    (dict(dim=np.float64(4.0)), r"dim must be a positive int, got np.float64\(4.0\)"),
    (dict(dim=2**64), r"dim must be at most 2\*\*63 - 1"),
    (dict(dim=4, in_features=0), "in_features must be a positive int or None"),
    (dict(dim=4, in_features=True), "in_features must be a positive int or None"),
    (dict(dim=4, activation="tanhh"), "activation must be one of"),
    (dict(dim=4, activation=["relu"]), r"activation must be one of .*, got \['relu'\]"),
    (dict(dim=4, activation=None), "activation must be one of .*, got None"),
    (dict(dim=4, norm_position="middle"), "norm_position must be one of"),
    (dict(dim=4, norm_position=0), "norm_position must be one of .*, got 0"),
    (dict(dim=4, norm_epsilon=0.0), r"norm_epsilon must be > 0, got 0.0"),
    (dict(dim=4, norm_epsilon=-1e-5), r"norm_epsilon must be > 0, got -1e-05"),
    (dict(dim=4, norm_epsilon=NAN), r"norm_epsilon must be a finite number > 0, got nan"),
    (dict(dim=4, norm_epsilon=INF), r"norm_epsilon must be a finite number > 0, got inf"),
    (dict(dim=4, norm_epsilon=None), r"norm_epsilon must be a number > 0, got None"),
    (dict(dim=4, norm_epsilon="1e-5"), r"norm_epsilon must be a number > 0, got '1e-5' \(str\)"),
    (dict(dim=4, dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(dim=4, dropout=-0.1), r"dropout must be in \[0, 1\), got -0.1"),
    (dict(dim=4, dropout=NAN), r"dropout must be a finite number in \[0, 1\), got nan"),
    (dict(dim=4, dropout=True), r"dropout must be a number in \[0, 1\), got True \(bool\)"),
    (dict(dim=4, dropout="0.1"), r"dropout must be a number in \[0, 1\), got '0.1'"),
    (dict(dim=4, adapter_strategy=3), "adapter_strategy must be a strategy"),
    (dict(dim=4, adapter_strategy=None), "adapter_strategy must be a strategy .*, got None"),
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


@pytest.mark.parametrize("factory", [LinearAdapter, LinearAdapterConfig], ids=["module", "config"])
def test_numpy_and_jax_scalars_become_python_numbers(factory):
    got = factory(
        dim=np.int64(4),
        in_features=jnp.asarray(8),
        norm_epsilon=np.float32(0.25),
        dropout=jnp.asarray(0.5, jnp.bfloat16),
    )
    expected = factory(dim=4, in_features=8, norm_epsilon=0.25, dropout=0.5)
    assert jadapters.config_of(got) == jadapters.config_of(expected)
    for name, kind in [("dim", int), ("in_features", int), ("norm_epsilon", float)]:
        assert type(getattr(got, name)) is kind, name
    assert type(got.dropout) is float
    assert jadapters.config_to_json(got) == jadapters.config_to_json(expected)


def test_ints_for_floats_become_floats():
    cfg = LinearAdapterConfig(dim=4, norm_epsilon=1)
    assert type(cfg.norm_epsilon) is float and cfg.norm_epsilon == 1.0


def test_traced_value_raises():
    @jax.jit
    def build(rate):
        LinearAdapterConfig(dim=4, dropout=rate)
        return rate

    with pytest.raises(ValueError, match="dropout must be a concrete value, got a traced array"):
        build(0.1)


# --- the LayerNorm's epsilon ------------------------------------------------------------------


def test_norm_epsilon_defaults_to_nemo():
    assert LinearAdapterConfig(dim=4).norm_epsilon == 1e-5
    assert LinearAdapter(4).norm_epsilon == 1e-5


@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
def test_norm_epsilon_enters_the_formula(norm_position, key, randomize):
    """The default (1e-5) and a custom epsilon each give the float64 formula with that epsilon
    and not with the other one (the input is small enough for the epsilon to matter)."""
    x = 3e-3 * _x(seed=5)
    variables = randomize(LinearAdapter(DIM, norm_position=norm_position).init(key, x), seed=1)
    formula = {
        eps: np_linear_adapter(_params(variables), x, "swish", norm_position, eps)
        for eps in (1e-5, 1e-4)
    }
    for kwargs, eps, other in [({}, 1e-5, 1e-4), ({"norm_epsilon": 1e-4}, 1e-4, 1e-5)]:
        got = np.asarray(
            LinearAdapter(DIM, norm_position=norm_position, **kwargs).apply(variables, x)
        )
        np.testing.assert_allclose(got, formula[eps], rtol=1e-3, atol=1e-6)
        assert not np.allclose(got, formula[other], rtol=1e-3, atol=1e-6)


def test_norm_epsilon_matters_on_low_variance_input(key, randomize):
    """On an input of variance ~1e-6, NeMo's 1e-5 and Flax's 1e-6 give clearly different
    outputs; each equals the float64 formula with its own epsilon."""
    x = 1e-3 * _x(seed=5)
    variables = randomize(LinearAdapter(DIM).init(key, x), seed=1)
    params = _params(variables)
    outputs = {}
    for eps in (1e-5, 1e-6):
        outputs[eps] = np.asarray(LinearAdapter(DIM, norm_epsilon=eps).apply(variables, x))
        expected = np_linear_adapter(params, x, "swish", "pre", eps)
        np.testing.assert_allclose(outputs[eps], expected, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(
        LinearAdapter(DIM).apply(variables, x), outputs[1e-5], rtol=0, atol=0
    )
    assert np.abs(outputs[1e-5] - outputs[1e-6]).max() > 0.05


# --- input checks at trace time -------------------------------------------------------------


@pytest.mark.parametrize("use_jit", [False, True])
def test_integer_input_raises(use_jit, key):
    adapter = LinearAdapter(DIM)
    init = jax.jit(adapter.init) if use_jit else adapter.init
    with pytest.raises(ValueError, match="LinearAdapter needs a floating x, got dtype int32"):
        init(key, jnp.ones((2, D), jnp.int32))


def test_scalar_input_raises(key):
    with pytest.raises(ValueError, match=r"LinearAdapter needs x of rank >= 1 .*got shape \(\)"):
        LinearAdapter(DIM).init(key, jnp.ones((), jnp.float32))


def test_in_features_mismatch_raises_under_jit(key):
    variables = LinearAdapter(DIM).init(key, _x())
    adapter = LinearAdapter(DIM, in_features=D + 1)
    with pytest.raises(ValueError, match=rf"set in_features={D} or None"):
        jax.jit(adapter.apply)(variables, _x())


# --- jit, dtypes and tracing ----------------------------------------------------------------


class LinearAdapterBattery(chex.TestCase):
    """Identity at init and the explicit formula, eagerly and under ``jit`` (chex.variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("pre", "pre"), ("post", "post"))
    def test_identity_at_init(self, norm_position):
        adapter = LinearAdapter(DIM, norm_position=norm_position)
        x = _x()
        variables = adapter.init(jax.random.key(0), x)
        forward = self.variant(lambda variables, x: apply_adapter(adapter, variables, x).output)
        chex.assert_trees_all_equal(forward(variables, x), x)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("gelu_pre", "gelu", "pre", {}), ("relu_post_eps", "relu", "post", {"norm_epsilon": 1e-3})
    )
    def test_matches_explicit_formula(self, activation, norm_position, eps_kwargs):
        adapter = LinearAdapter(
            DIM, activation=activation, norm_position=norm_position, **eps_kwargs
        )
        x = _x()
        variables = noise_like(adapter.init(jax.random.key(0), x), seed=2)
        forward = self.variant(lambda variables, x: apply_adapter(adapter, variables, x).output)
        eps = eps_kwargs.get("norm_epsilon", 1e-5)
        expected = np.asarray(x) + np_linear_adapter(
            _params(variables), x, activation, norm_position, eps
        )
        chex.assert_trees_all_close(forward(variables, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_is_preserved_and_identity_holds(dtype, norm_position, key, randomize):
    adapter = LinearAdapter(DIM, norm_position=norm_position)
    x = _x(dtype)
    variables = adapter.init(key, x)
    chex.assert_type(jax.tree.leaves(variables), jnp.float32)
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
