"""merge_adapters: LoRA and IA3 folded into the base kernels, for inference at the base's cost.

The checks both front-ends share (a transformer merged and unmerged, merging by name and with
weights, strategies folded, unmergeable adapters and unknown names refused, bfloat16 kernels)
are in ``test_frontends.py``; here is what depends on how each front-end knows its hosts: every
NNX host kind merges exactly, Linen merges or refuses when shapes are ambiguous and reads the
hosts from example inputs.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from _frontends import merge_noise
from flax import nnx

import jadapters
from jadapters import IA3Config, LoRAConfig

D = 5


class _Holder(nnx.Module):
    def __init__(self, host):
        self.host = host

    def __call__(self, x):
        return self.host(x)


# --- every Dense-like host kind --------------------------------------------------------------

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
    nnx.update(model, merge_noise(nnx.state(model, jadapters.AdapterParam)))
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
    variables = {**variables, "adapters": merge_noise(variables["adapters"])}
    try:
        merged = jadapters.merge_adapters(adapted, variables)
    except ValueError as err:  # refusing is fine; a silently wrong kernel is not
        assert "cannot tell which axes" in str(err)
        return
    np.testing.assert_allclose(
        model.apply({"params": merged}, x), adapted.apply(variables, x), rtol=1e-5, atol=1e-5
    )


def test_linen_merge_reads_the_host_when_given_inputs(key):
    """``'btd,hdk->bthk'`` with h == d: shapes alone cannot say which axis meets the input, so
    without inputs the merge refuses; with example inputs it reads the Einsum and is exact."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, D)), jnp.float32)
    model = nn.Sequential([nn.Einsum((D, D, K), "btd,hdk->bthk")])
    adapted = jadapters.adapter_transform(model, "layers_0")
    adapted = adapted.add_adapter("lora", LoRAConfig(rank=2, alpha=3.0))
    variables = adapted.init(key, x)
    variables = {**variables, "adapters": merge_noise(variables["adapters"])}
    with pytest.raises(ValueError, match="pass inputs="):
        jadapters.merge_adapters(adapted, variables)
    merged = jadapters.merge_adapters(adapted, variables, inputs=(x,))
    np.testing.assert_allclose(
        model.apply({"params": merged}, x), adapted.apply(variables, x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("form", ["keyword array", "tuple", "list"])
def test_linen_merge_inputs_by_keyword(form, key):
    """``inputs=x`` is one example input (not ``x`` split along its first axis); a tuple or
    list holds the positional inputs. Each form reads the Einsum that shapes alone cannot."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((D, 4, D)), jnp.float32)
    model = nn.Sequential([nn.Einsum((D, D, K), "btd,hdk->bthk")])
    adapted = jadapters.adapter_transform(model, "layers_0")
    adapted = adapted.add_adapter("lora", LoRAConfig(rank=2, alpha=3.0))
    variables = adapted.init(key, x)
    variables = {**variables, "adapters": merge_noise(variables["adapters"])}
    inputs = {"keyword array": x, "tuple": (x,), "list": [x]}[form]
    merged = jadapters.merge_adapters(adapted, variables, inputs=inputs)
    np.testing.assert_allclose(
        model.apply({"params": merged}, x), adapted.apply(variables, x), rtol=1e-5, atol=1e-5
    )


def test_linen_merge_inputs_as_one_dict_input(key):
    """A dict given as ``inputs`` is the model's one input, as an array is."""

    class DictInput(nn.Module):
        @nn.compact
        def __call__(self, batch):
            return nn.Dense(3, name="proj")(batch["x"])

    x = jnp.ones((2, D))
    adapted = jadapters.adapter_transform(DictInput(), "proj")
    adapted = adapted.add_adapter("lora", LoRAConfig(rank=2))
    variables = adapted.init(key, {"x": x})
    variables = {**variables, "adapters": merge_noise(variables["adapters"])}
    merged = jadapters.merge_adapters(adapted, variables, inputs={"x": x})
    np.testing.assert_allclose(
        DictInput().apply({"params": merged}, {"x": x}),
        adapted.apply(variables, {"x": x}),
        rtol=1e-5,
        atol=1e-5,
    )


def test_linen_merge_needs_the_variables_of_an_adapted_model(key):
    adapted = jadapters.adapter_transform(nn.Sequential([nn.Dense(D)]), "layers_0")
    adapted = adapted.add_adapter("lora", LoRAConfig(rank=2))
    variables = adapted.init(key, jnp.ones((2, D)))
    with pytest.raises(ValueError, match="variables is required"):
        jadapters.merge_adapters(adapted)
    with pytest.raises(ValueError, match="must be an adapted Linen or NNX model"):
        jadapters.merge_adapters(nn.Dense(3), variables)


def test_nnx_merge_walks_the_graph_once(monkeypatch):
    """Merging asks for each host's base and adapters; the NNX model's graph is walked once
    for the whole merge (it was walked 175 times for LoRA on 8 projections), and the merged
    model still computes what the unmerged one did."""
    from jadapters.demo.models import NNXTransformer

    model = NNXTransformer(
        8, rngs=nnx.Rngs(0), num_classes=10, d_model=16, num_layers=4, num_heads=2, mlp_dim=32
    )
    jadapters.adapter_transform(model, {"attn": r"blocks/\d+/attn/(query|value)"})
    model.add_adapter("attn:l", LoRAConfig(rank=2), rngs=nnx.Rngs(2))
    nnx.update(model, merge_noise(nnx.state(model, jadapters.AdapterParam)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8)), jnp.float32)
    before = model(x)
    walked = []
    walk = nnx.iter_graph
    monkeypatch.setattr(nnx, "iter_graph", lambda root: walked.append(root) or walk(root))
    merged = jadapters.merge_adapters(model)
    assert len(walked) == 1
    monkeypatch.undo()
    nnx.update(model, merged)
    model.set_enabled_adapters(enabled=False)
    np.testing.assert_allclose(model(x), before, rtol=1e-5, atol=1e-5)
