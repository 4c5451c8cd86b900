"""merge_adapters: LoRA and IA3 folded into the base kernels, for inference at the base's cost."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jadapters
from jadapters import IA3Config, LoRAConfig, ScaledAddStrategy
from jadapters.demo.models import LinenTransformer, NNXTransformer

# The same sizes as the other transformer tests, so that eager ops compiled there are reused.
TF = dict(num_classes=10, d_model=16, num_layers=2, num_heads=2, mlp_dim=32)
X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8)), jnp.float32)
LINEN_GROUPS = {
    "lora": [r"blocks_\d+/attn/(query|value|out)", r"blocks_\d+/mlp/fc1"],
    "ia3": r"blocks_\d+/attn/(key|value)",
}
NNX_GROUPS = {
    "lora": [r"blocks/\d+/attn/(query|value|out)", r"blocks/\d+/mlp/fc1"],
    "ia3": r"blocks/\d+/attn/(key|value)",
}
D, OUT = 5, 6


class _Holder(nnx.Module):
    def __init__(self, host):
        self.host = host

    def __call__(self, x):
        return self.host(x)


def _f64(x):
    return np.asarray(x, np.float64)


def _copy(tree):
    return jax.tree.map(np.array, tree)


def _random_adapters(tree, seed=1):
    """LoRA factors as noise; IA3 scales as ``1 + noise`` (so far from 0)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        noise = 0.3 * rng.standard_normal(np.shape(x))
        if getattr(path[-1], "key", None) == "scale":
            noise = 1.0 + noise
        return jnp.asarray(noise, jnp.result_type(x))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _primitive_counts(fn, *args):
    """How often each primitive occurs in ``fn``'s jaxpr, nested jaxprs included."""
    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


def _nnx_counts(model, x):
    graphdef, state = nnx.split(model)
    return _primitive_counts(lambda s, x: nnx.merge(graphdef, s)(x), state, x)


# --- transformers with LoRA on q/v/out and mlp/fc1, IA3 on k/v -------------------------------


@pytest.fixture(scope="module")
def linen_setup():
    base = LinenTransformer(**TF)
    adapted = jadapters.adapter_transform(base, LINEN_GROUPS)
    adapted = adapted.add_adapter("lora:lora", LoRAConfig(rank=2, alpha=4.0))
    adapted = adapted.add_adapter("ia3:ia3", IA3Config())
    variables = adapted.init(jax.random.key(0), X)
    variables = {**variables, "adapters": _random_adapters(variables["adapters"])}
    return base, adapted, variables


@pytest.fixture(scope="module")
def nnx_setup():
    model = NNXTransformer(8, **TF, rngs=nnx.Rngs(0))
    base = nnx.clone(model)
    model = jadapters.adapter_transform(model, NNX_GROUPS)
    model.add_adapter("lora:lora", LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    model.add_adapter("ia3:ia3", IA3Config(), rngs=nnx.Rngs(2))
    nnx.update(model, _random_adapters(nnx.state(model, jadapters.AdapterParam)))
    return base, model


def test_linen_merged_equals_adapted(linen_setup):
    base, adapted, variables = linen_setup
    original = _copy(variables["params"])
    adapted_out = adapted.apply(variables, X)
    base_out = base.apply({"params": variables["params"]}, X)
    assert np.abs(_f64(adapted_out) - _f64(base_out)).max() > 1e-2

    merged = jadapters.merge_adapters(adapted, variables)
    np.testing.assert_allclose(base.apply({"params": merged}, X), adapted_out, rtol=1e-5, atol=1e-5)
    # Same structure, shapes and dtypes as the base: a drop-in replacement.
    assert jax.tree.structure(merged) == jax.tree.structure(variables["params"])
    for m, p in zip(jax.tree.leaves(merged), jax.tree.leaves(variables["params"]), strict=True):
        assert m.shape == p.shape and m.dtype == p.dtype
    # Folded hosts changed, everything else is the very same value.
    attn = merged["blocks_0"]["attn"]
    for name in ("query", "key", "value", "out"):
        orig = variables["params"]["blocks_0"]["attn"][name]["kernel"]
        assert np.abs(_f64(attn[name]["kernel"]) - _f64(orig)).max() > 1e-3
    for path in (("blocks_0", "mlp", "fc2"), ("embed",), ("head",), ("blocks_1", "ln1")):
        m, o = merged, variables["params"]
        for k in path:
            m, o = m[k], o[k]
        jax.tree.map(np.testing.assert_array_equal, m, o)
    # The original base is untouched: the adapted model still runs on it unchanged.
    jax.tree.map(np.testing.assert_array_equal, variables["params"], original)
    np.testing.assert_array_equal(adapted.apply(variables, X), adapted_out)


def test_nnx_merged_equals_adapted_at_base_cost(nnx_setup):
    base, model = nnx_setup
    adapted_out = model(X)
    assert np.abs(_f64(adapted_out) - _f64(base(X))).max() > 1e-2
    adapted_counts = _nnx_counts(model, X)
    base_counts = _nnx_counts(base, X)
    assert adapted_counts["dot_general"] > base_counts["dot_general"]

    # nnx.state holds the model's own variables, which nnx.update overwrites: copy them out.
    original = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    original_values = _copy(original)
    merged = jadapters.merge_adapters(model)
    np.testing.assert_array_equal(model(X), adapted_out)  # merging changed nothing in place
    try:
        nnx.update(model, merged)
        model.set_enabled_adapters(enabled=False)
        np.testing.assert_allclose(model(X), adapted_out, rtol=1e-5, atol=1e-5)
        assert _nnx_counts(model, X) == base_counts  # no adapter op left
    finally:  # unmerge: the original base state and the adapters back on
        nnx.update(model, original)
        model.set_enabled_adapters(enabled=True)
    np.testing.assert_array_equal(model(X), adapted_out)
    restored = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, restored, original_values)


def test_linen_merge_of_disabled_adapters_by_name(linen_setup):
    base, adapted, variables = linen_setup
    only_lora = adapted.set_enabled_adapters("ia3", enabled=False)
    merged = jadapters.merge_adapters(adapted, variables, names=["lora"])
    np.testing.assert_allclose(
        base.apply({"params": merged}, X), only_lora.apply(variables, X), rtol=1e-5, atol=1e-5
    )
    # names=None merges the enabled adapters only.
    merged_enabled = jadapters.merge_adapters(only_lora, variables)
    jax.tree.map(np.testing.assert_array_equal, merged_enabled, merged)


# --- what cannot be merged ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, kind",
    [
        (jadapters.LinearAdapterConfig(dim=4), "LinearAdapter"),
        (jadapters.ParallelAdapterConfig(dim=4), "ParallelAdapter"),
        (
            LoRAConfig(rank=2, adapter_strategy=jadapters.ReturnResultStrategy()),
            "ReturnResultStrategy",
        ),
    ],
    ids=["LinearAdapter", "ParallelAdapter", "ReturnResult-LoRA"],
)
def test_unmergeable_adapter_raises_naming_it(cfg, kind, key):
    model = nn.Sequential([nn.Dense(D)])
    adapted = jadapters.adapter_transform(model, "layers_0")
    adapted = adapted.add_adapter("lora", LoRAConfig(rank=2)).add_adapter("bad", cfg)
    variables = adapted.init(key, jnp.ones((2, D)))
    with pytest.raises(ValueError, match=rf"adapter 'bad' .*{kind}"):
        jadapters.merge_adapters(adapted, variables)
    merged = jadapters.merge_adapters(adapted, variables, names="lora")  # the others still merge
    assert merged["layers_0"]["kernel"].shape == (D, D)

    host = _Holder(nnx.Linear(D, D, rngs=nnx.Rngs(0)))
    host = jadapters.adapter_transform(host, "host")
    host.add_adapter("bad", cfg, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=rf"adapter 'bad' .*{kind}"):
        jadapters.merge_adapters(host)


def test_unknown_names_raise(linen_setup, nnx_setup):
    _, adapted, variables = linen_setup
    with pytest.raises(ValueError, match=r"unknown adapter name 'nope'"):
        jadapters.merge_adapters(adapted, variables, names=["lora", "nope"])
    with pytest.raises(ValueError, match=r"weights names adapters not being merged: \['ia3x'\]"):
        jadapters.merge_adapters(adapted, variables, weights={"ia3x": 0.5})
    with pytest.raises(ValueError, match=r"unknown adapter name 'nope'"):
        jadapters.merge_adapters(nnx_setup[1], names="nope")
    with pytest.raises(ValueError, match="variables is required"):
        jadapters.merge_adapters(adapted)
    with pytest.raises(ValueError, match="must be an adapted Linen or NNX model"):
        jadapters.merge_adapters(nn.Dense(3), variables)


# --- weights and strategies folded -------------------------------------------------------------


L1 = LoRAConfig(rank=2, alpha=3.0)  # scale 1.5
L2 = LoRAConfig(rank=4, alpha=2.0, rslora=True)  # scale 1.0


def _ab(params):
    return _f64(params["a"]) @ _f64(params["b"])


@pytest.mark.parametrize("front_end", ["linen", "nnx"])
def test_weighted_combination_of_two_loras(front_end, key):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, D)), jnp.float32)
    weights = {"l1": 0.3, "l2": 0.7}
    if front_end == "linen":
        model = nn.Sequential([nn.Dense(OUT)])
        adapted = jadapters.adapter_transform(model, "layers_0")
        adapted = adapted.add_adapter("l1", L1).add_adapter("l2", L2)
        variables = adapted.init(key, x)
        variables = {**variables, "adapters": _random_adapters(variables["adapters"])}
        host, lora = variables["params"]["layers_0"], variables["adapters"]["layers_0"]
        merged = jadapters.merge_adapters(adapted, variables, weights=weights)["layers_0"]
        merged_out = model.apply({"params": {"layers_0": merged}}, x)
    else:
        adapted = jadapters.adapter_transform(_Holder(nnx.Linear(D, OUT, rngs=nnx.Rngs(0))), "host")
        adapted.add_adapter("l1", L1, rngs=nnx.Rngs(1))
        adapted.add_adapter("l2", L2, rngs=nnx.Rngs(2))
        nnx.update(adapted, _random_adapters(nnx.state(adapted, jadapters.AdapterParam)))
        host = {"kernel": adapted.host.kernel[...], "bias": adapted.host.bias[...]}
        lora = {n: adapted.host.adapter_layer[n].param_values() for n in ("l1", "l2")}
        merged_state = jadapters.merge_adapters(adapted, weights=weights)
        merged = nnx.to_pure_dict(merged_state)["host"]
        nnx.update(adapted, merged_state)
        adapted.set_enabled_adapters(enabled=False)
        merged_out = adapted(x)
    expected = _f64(host["kernel"]) + 0.3 * 1.5 * _ab(lora["l1"]) + 0.7 * 1.0 * _ab(lora["l2"])
    np.testing.assert_allclose(merged["kernel"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merged["bias"], host["bias"])
    np.testing.assert_allclose(
        merged_out, _f64(x) @ expected + _f64(host["bias"]), rtol=1e-5, atol=1e-5
    )


def test_scaled_add_strategy_factor_is_folded(key):
    model = nn.Sequential([nn.Dense(OUT)])
    adapted = jadapters.adapter_transform(model, "layers_0")
    strategy = ScaledAddStrategy(scale=0.25)
    adapted = adapted.add_adapter("lora", LoRAConfig(rank=2, alpha=4.0, adapter_strategy=strategy))
    adapted = adapted.add_adapter("ia3", IA3Config(adapter_strategy=ScaledAddStrategy(scale=0.5)))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, D)), jnp.float32)
    variables = adapted.init(key, x)
    variables = {**variables, "adapters": _random_adapters(variables["adapters"])}
    w, bias = (_f64(variables["params"]["layers_0"][k]) for k in ("kernel", "bias"))
    lora = variables["adapters"]["layers_0"]["lora"]
    ia3 = 1.0 + 0.5 * (_f64(variables["adapters"]["layers_0"]["ia3"]["scale"]) - 1.0)
    expected_kernel = (w + 0.25 * 2.0 * _ab(lora)) * ia3
    merged = jadapters.merge_adapters(adapted, variables)["layers_0"]
    np.testing.assert_allclose(merged["kernel"], expected_kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged["bias"], bias * ia3, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        model.apply({"params": {"layers_0": merged}}, x),
        adapted.apply(variables, x),
        rtol=1e-5,
        atol=1e-5,
    )


# --- every Dense-like host kind, and dtypes ----------------------------------------------------

H, K = 2, 3
NNX_HOSTS = {  # (host, input shape, width of the output's last axis)
    "LinearGeneral-axis-1": (lambda r: nnx.LinearGeneral(D, (H, K), rngs=r), (2, 4, D), K),
    "LinearGeneral-axis(-2,-1)": (
        lambda r: nnx.LinearGeneral((H, K), D, axis=(-2, -1), rngs=r),
        (2, 4, H, K),
        D,
    ),
    "Einsum": (
        lambda r: nnx.Einsum("btd,dhk->bthk", (D, H, K), (H, K), rngs=r),
        (2, 4, D),
        K,
    ),
    "Einsum-contracted-middle": (
        lambda r: nnx.Einsum("btd,hdk->bthk", (H, D, K), (H, K), rngs=r),
        (2, 4, D),
        K,
    ),
}


def _nnx_lora_ia3(make_host, ia3_width):
    model = jadapters.adapter_transform(_Holder(make_host(nnx.Rngs(0))), "host")
    model.add_adapter("lora", LoRAConfig(rank=2, alpha=3.0), rngs=nnx.Rngs(1))
    model.add_adapter("ia3", IA3Config(in_features=ia3_width), rngs=nnx.Rngs(2))
    nnx.update(model, _random_adapters(nnx.state(model, jadapters.AdapterParam)))
    return model


@pytest.mark.parametrize("host_id", list(NNX_HOSTS))
def test_nnx_merge_on_every_host_kind(host_id):
    make_host, x_shape, ia3_width = NNX_HOSTS[host_id]
    x = jnp.asarray(np.random.default_rng(3).standard_normal(x_shape), jnp.float32)
    model = _nnx_lora_ia3(make_host, ia3_width)
    adapted_out = model(x)
    nnx.update(model, jadapters.merge_adapters(model))
    model.set_enabled_adapters(enabled=False)
    np.testing.assert_allclose(model(x), adapted_out, rtol=1e-5, atol=1e-5)


def test_ia3_on_einsum_output_axis_not_last_in_kernel_is_refused():
    """``'btd,dkh->bthk'``: IA3 scales ``k``, the kernel's middle axis; folding it as the last
    axis would be wrong, so merging refuses (the LoRA alone still merges)."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, D)), jnp.float32)
    model = _nnx_lora_ia3(lambda r: nnx.Einsum("btd,dkh->bthk", (D, K, H), (H, K), rngs=r), K)
    adapted_out = model(x)
    with pytest.raises(ValueError, match=r"adapter 'ia3' \(IA3\) .* not the kernel's last axis"):
        jadapters.merge_adapters(model)
    nnx.update(model, jadapters.merge_adapters(model, names="lora"))
    model.set_enabled_adapters("lora", enabled=False)
    np.testing.assert_allclose(model(x), adapted_out, rtol=1e-5, atol=1e-5)


LINEN_HOSTS = {
    "DenseGeneral-axis-1": (lambda: nn.DenseGeneral((H, K)), (2, 4, D)),
    "DenseGeneral-axis(-2,-1)": (lambda: nn.DenseGeneral(D, axis=(-2, -1)), (2, 4, H, K)),
    "Einsum": (lambda: nn.Einsum((D, H, K), "btd,dhk->bthk"), (2, 4, D)),
    # The contracted axis is not the kernel's first; with a square (D, D, K) kernel nothing in
    # the parameters tells which of its first two axes meets the input.
    "Einsum-contracted-middle-square": (lambda: nn.Einsum((D, D, K), "btd,hdk->bthk"), (2, 4, D)),
}


@pytest.mark.parametrize("host_id", list(LINEN_HOSTS))
def test_linen_merge_on_every_host_kind_is_right_or_refused(host_id, key):
    make_host, x_shape = LINEN_HOSTS[host_id]
    x = jnp.asarray(np.random.default_rng(3).standard_normal(x_shape), jnp.float32)
    model = nn.Sequential([make_host()])
    adapted = jadapters.adapter_transform(model, "layers_0")
    adapted = adapted.add_adapter("lora", LoRAConfig(rank=2, alpha=3.0))
    variables = adapted.init(key, x)
    variables = {**variables, "adapters": _random_adapters(variables["adapters"])}
    try:
        merged = jadapters.merge_adapters(adapted, variables)
    except ValueError as err:  # refusing is fine; a silently wrong kernel is not
        assert "cannot tell which axes" in str(err)
        return
    np.testing.assert_allclose(
        model.apply({"params": merged}, x), adapted.apply(variables, x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("front_end", ["linen", "nnx"])
def test_bfloat16_base_kernel_stays_bfloat16(front_end, key):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, D)), jnp.bfloat16)
    if front_end == "linen":
        model = nn.Sequential([nn.Dense(OUT, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)])
        adapted = jadapters.adapter_transform(model, "layers_0")
        adapted = adapted.add_adapter("lora", LoRAConfig(rank=2, alpha=4.0))
        variables = adapted.init(key, x)
        variables = {**variables, "adapters": _random_adapters(variables["adapters"])}
        kernel = variables["params"]["layers_0"]["kernel"]
        lora = variables["adapters"]["layers_0"]["lora"]
        merged = jadapters.merge_adapters(adapted, variables)["layers_0"]["kernel"]
    else:
        host = nnx.Linear(D, OUT, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        adapted = jadapters.adapter_transform(_Holder(host), "host")
        adapted.add_adapter("lora", LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
        nnx.update(adapted, _random_adapters(nnx.state(adapted, jadapters.AdapterParam)))
        kernel = adapted.host.kernel[...]
        lora = adapted.host.adapter_layer["lora"].param_values()
        merged = nnx.to_pure_dict(jadapters.merge_adapters(adapted))["host"]["kernel"]
    assert kernel.dtype == merged.dtype == jnp.bfloat16
    expected = (_f64(kernel) + 2.0 * _ab(lora)).astype(np.float32)
    np.testing.assert_allclose(_f64(merged), expected, rtol=1e-2, atol=1e-2)
    assert np.abs(_f64(merged) - _f64(kernel)).max() > 0.1


def test_linen_merge_reads_the_host_when_given_inputs(key):
    """``'btd,hdk->bthk'`` with h == d: shapes alone cannot say which axis meets the input, so
    without inputs the merge refuses; with example inputs it reads the Einsum and is exact."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, D)), jnp.float32)
    model = nn.Sequential([nn.Einsum((D, D, K), "btd,hdk->bthk")])
    adapted = jadapters.adapter_transform(model, "layers_0")
    adapted = adapted.add_adapter("lora", LoRAConfig(rank=2, alpha=3.0))
    variables = adapted.init(key, x)
    variables = {**variables, "adapters": _random_adapters(variables["adapters"])}
    with pytest.raises(ValueError, match="pass inputs="):
        jadapters.merge_adapters(adapted, variables)
    merged = jadapters.merge_adapters(adapted, variables, inputs=(x,))
    np.testing.assert_allclose(
        model.apply({"params": merged}, x), adapted.apply(variables, x), rtol=1e-5, atol=1e-5
    )
