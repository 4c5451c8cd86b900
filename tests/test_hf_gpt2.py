"""Hugging Face's Flax GPT-2: its projections are ``FlaxConv1D``, kernels stored ``(out, in)``.

PyTorch's GPT-2 keeps them in ``Conv1D`` (weights ``(in, out)``), the one popular LoRA target
that is not a ``Linear``; the Flax port stores the transpose. LoRA must add ``x A B`` to what
the host computes, fold ``(A B)^T`` into the kernel when merged, IA3 must scale the kernel's
rows or columns that are really its outputs or inputs, and a PEFT file must say
``fan_in_fan_out`` for PyTorch's twin. Expected values come from the kernels themselves in
NumPy and from real PyTorch, transformers and peft on a twin with the same weights.
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hf import moved, torch_logits, twins

import jadapters
from jadapters.demo.models import LinenTransformer
from jadapters.interop import export_peft, import_peft
from jadapters.kernels import kernel_layout, may_hold_transposed_kernels

ATOL = 1e-5
IDS = np.array([[1, 5, 9, 13, 17, 21, 2], [3, 7, 11, 15, 19, 23, 4]])
TINY = dict(num_classes=3, d_model=8, num_layers=1, num_heads=2, mlp_dim=16, max_len=4)
ATTN = r"transformer/h/\d+/attn/(c_attn|c_proj)"  # c_attn (48, 16); c_proj square (16, 16)
GPT2 = dict(
    vocab_size=32,
    n_positions=8,
    n_embd=16,
    n_layer=2,
    n_head=2,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)


@pytest.fixture(scope="module", autouse=True)
def _rank_promotion_allowed():
    """Hugging Face's ``FlaxConv1D`` adds its bias by implicit rank promotion, which the
    suite raises on elsewhere (conftest.py) to catch it in jadapters' own code."""
    with jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture(scope="module")
def gpt2():
    """``(flax_module, params, make_torch_twin)`` of a tiny GPT-2 language model."""
    from transformers import FlaxGPT2LMHeadModel, GPT2Config, GPT2LMHeadModel

    return twins(FlaxGPT2LMHeadModel, GPT2LMHeadModel, GPT2Config(**GPT2))


def inputs():
    ids = jnp.asarray(IDS)
    return ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


def logits(module, variables):
    return np.asarray(module.apply(variables, *inputs()).logits)


def adapted_with(module, params, targets, *adapters, seed=0):
    """``adapter_transform(module, targets)`` with ``adapters`` (``(name, cfg, insertion)``)
    added and their weights moved off their identity init."""
    adapted = jadapters.adapter_transform(module, targets)
    for name, cfg, insertion in adapters:
        adapted = adapted.add_adapter(name, cfg, insertion=insertion)
    variables = adapted.init_adapters(jax.random.key(1), {"params": params}, *inputs())
    return adapted, {"params": params, "adapters": moved(variables["adapters"], seed)}


def hosts(tree):
    """``{(layer, name): subtree}`` of the attention projections."""
    h = tree["transformer"]["h"]
    return {(i, n): h[i]["attn"][n] for i in h for n in ("c_attn", "c_proj")}


def test_the_layout_of_a_conv1d_host(gpt2):
    module, params, _ = gpt2
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxConv1D

    layout = kernel_layout(FlaxConv1D(features=48), (48, 16))
    assert (layout.in_dims, layout.in_features, layout.out_features) == ((1,), 16, 48)
    assert layout.out_first
    assert not kernel_layout(nn.Dense(48), (16, 48)).out_first
    assert may_hold_transposed_kernels(module)
    assert not may_hold_transposed_kernels(LinenTransformer(**TINY))

    class Wrapper(nn.Module):  # a model of one's own around GPT-2's
        backbone: nn.Module

    assert may_hold_transposed_kernels(Wrapper(module))


def test_lora_on_conv1d_adds_x_a_b_to_the_host(gpt2):
    """The adapted model equals the base model whose kernels (stored ``(out, in)``) got
    ``scale * (A B)^T`` written in by hand; at init, the base model itself."""
    module, params, _ = gpt2
    cfg = jadapters.LoRAConfig(rank=2, alpha=6.0)
    adapted = jadapters.adapter_transform(module, ATTN).add_adapter("lora", cfg)
    at_init = adapted.init_adapters(jax.random.key(1), {"params": params}, *inputs())
    np.testing.assert_array_equal(logits(adapted, at_init), logits(module, {"params": params}))

    adapted, variables = adapted_with(module, params, ATTN, ("lora", cfg, None))
    by_hand = jax.tree.map(np.array, params)
    for (i, name), lora in hosts(variables["adapters"]).items():
        a, b = np.asarray(lora["lora"]["a"]), np.asarray(lora["lora"]["b"])
        assert a.shape[0] == 16  # the input width, not the kernel's leading axis
        by_hand["transformer"]["h"][i]["attn"][name]["kernel"] += (6.0 / 2 * a @ b).T
    expected = logits(module, {"params": by_hand})
    assert np.abs(expected - logits(module, {"params": params})).max() > 1e-2
    np.testing.assert_allclose(logits(adapted, variables), expected, atol=ATOL)


def test_merge_folds_lora_and_ia3_into_conv1d_kernels_given_inputs(gpt2):
    module, params, _ = gpt2
    targets = {"attn": ATTN, "out": r"transformer/h/\d+/mlp/c_fc"}
    adapted, variables = adapted_with(
        module,
        params,
        targets,
        ("attn:lora", jadapters.LoRAConfig(rank=2), None),
        ("out:ia3", jadapters.IA3Config(), None),  # scales the rows of a (64, 16) kernel
    )
    with pytest.raises(ValueError, match="FlaxConv1D kernels are stored .out_features"):
        jadapters.merge_adapters(adapted, variables)  # the square c_proj is ambiguous
    merged = jadapters.merge_adapters(adapted, variables, inputs=inputs())
    expected = logits(adapted, variables)
    assert np.abs(expected - logits(module, {"params": params})).max() > 1e-2
    np.testing.assert_allclose(logits(module, {"params": merged}), expected, atol=ATOL)


def test_lora_made_in_jax_loads_in_peft_as_conv1d(gpt2, tmp_path):
    from peft import PeftModel

    module, params, make_twin = gpt2
    cfg = jadapters.LoRAConfig(rank=2, alpha=4.0)
    adapted, variables = adapted_with(module, params, ATTN, ("lora", cfg, None))
    with pytest.raises(ValueError, match="Pass inputs="):
        export_peft(tmp_path / "no_inputs", adapted, variables)
    export_peft(tmp_path, adapted, variables, inputs=inputs())
    config = json.loads((pathlib.Path(tmp_path) / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True  # PyTorch's GPT-2 holds these in Conv1D
    expected = logits(adapted, variables)
    twin = make_twin()
    assert np.abs(expected - torch_logits(twin, IDS)).max() > 1e-2
    peft_model = PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    np.testing.assert_allclose(torch_logits(peft_model, IDS), expected, atol=ATOL)


def test_lora_made_in_peft_on_conv1d_imports_into_linen(gpt2, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    module, params, make_twin = gpt2
    peft_config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    peft_model = get_peft_model(make_twin(), peft_config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(str(tmp_path))
    expected = torch_logits(peft_model.eval(), IDS)

    # PEFT's "c_proj" matches the attention's and the MLP's projections alike.
    adapted = jadapters.adapter_transform(module, r"transformer/h/\d+/(attn/c_attn|.*/c_proj)")
    adapted, variables = import_peft(
        tmp_path, adapted, {"params": params}, name="lora", inputs=inputs()
    )
    assert np.abs(expected - logits(module, {"params": params})).max() > 1e-2
    np.testing.assert_allclose(logits(adapted, variables), expected, atol=ATOL)


def test_ia3_made_in_jax_loads_in_peft_as_conv1d(gpt2, tmp_path):
    """IA3 on the MLP of GPT-2: its output (``c_fc``, a (64, 16) kernel) and, as PEFT's
    feed-forward modules, the input of ``c_proj`` (16, 64)."""
    from peft import PeftModel

    module, params, make_twin = gpt2
    targets = {"": r"transformer/h/\d+/mlp/c_fc", "ffn": r"transformer/h/\d+/mlp/c_proj"}
    adapted, variables = adapted_with(
        module,
        params,
        targets,
        ("ia3", jadapters.IA3Config(), None),
        ("ffn:ia3_ff", jadapters.IA3Config(), "input"),
    )
    export_peft(tmp_path, adapted, variables, inputs=inputs())
    config = json.loads((pathlib.Path(tmp_path) / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] is True
    expected = logits(adapted, variables)
    twin = make_twin()
    assert np.abs(expected - torch_logits(twin, IDS)).max() > 1e-2
    peft_model = PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    np.testing.assert_allclose(torch_logits(peft_model, IDS), expected, atol=ATOL)


def test_lora_on_conv1d_trains_with_the_base_frozen(gpt2):
    """Next-token loss on a repeated batch falls under ``linen_train_step``; the base
    arrays come back unchanged, bit for bit."""
    import optax

    module, params, _ = gpt2
    adapted = jadapters.adapter_transform(module, ATTN)
    adapted = adapted.add_adapter("lora", jadapters.LoRAConfig(rank=4, alpha=8.0))
    variables = adapted.init_adapters(jax.random.key(1), {"params": params}, *inputs())
    before = jax.tree.map(np.array, params)

    def loss_fn(apply, batch):
        out = apply(*batch).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(out, batch[0][:, 1:]).mean()

    step = jadapters.linen_train_step(adapted, loss_fn, optax.adam(0.05), donate=False)
    adapters, opt_state = variables["adapters"], step.init(variables["adapters"])
    losses = []
    for _ in range(5):
        adapters, opt_state, metrics = step(
            adapters, opt_state, {"params": params}, inputs(), jax.random.key(2)
        )
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, params), before)
