"""Exchanging adapters with Hugging Face PEFT: the files' format, real PEFT both ways, bad input.

The round trips run real PyTorch, transformers and peft (the test extra installs them) on
twin models with the same weights: Hugging Face's tiny Flax and PyTorch BERT (Linen), and a
small NNX model with a PyTorch twin written here (``Linear`` and multi-axis ``LinearGeneral``
hosts). A LoRA trained (or set) in jadapters is exported and loaded with
``PeftModel.from_pretrained``; a LoRA or IA3 made with ``get_peft_model`` and saved with
``save_pretrained`` is imported. Outputs must agree to 1e-5.
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
import optax
import pytest
from _hf import torch_logits, twins
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import jadapters
from jadapters.interop import export_peft, import_peft

ATOL = 1e-5

# ---- models -----------------------------------------------------------------------------------


class TinyNNX(nnx.Module):
    """Linear and multi-axis LinearGeneral hosts; its PyTorch twin is :func:`torch_twin`."""

    def __init__(self, rngs: nnx.Rngs):
        bias = nnx.initializers.normal(0.5)
        self.embed = nnx.Linear(6, 8, bias_init=bias, rngs=rngs)
        self.heads = nnx.LinearGeneral(8, (2, 4), bias_init=bias, rngs=rngs)  # kernel (8, 2, 4)
        self.merge = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), bias_init=bias, rngs=rngs)
        self.up = nnx.Linear(8, 16, bias_init=bias, rngs=rngs)
        self.down = nnx.Linear(16, 8, bias_init=bias, rngs=rngs)
        self.head = nnx.Linear(8, 3, bias_init=bias, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.embed(x))
        h = h + self.merge(jnp.tanh(self.heads(h)))  # heads: (..., 2, 4)
        h = h + self.down(jnp.tanh(self.up(h)))
        return self.head(h)


NNX_NAMES = ("embed", "heads", "merge", "up", "down", "head")


def torch_twin(model: TinyNNX):
    """The PyTorch twin of ``model``: every host a ``Linear`` on the flattened features."""
    import torch

    class TinyTorch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (i, o) in zip(
                NNX_NAMES, [(6, 8), (8, 8), (8, 8), (8, 16), (16, 8), (8, 3)], strict=True
            ):
                setattr(self, name, torch.nn.Linear(i, o))

        def forward(self, x):
            h = torch.tanh(self.embed(x))
            v = torch.tanh(self.heads(h)).unflatten(-1, (2, 4))  # the heads' axes, row-major
            h = h + self.merge(v.flatten(-2))
            h = h + self.down(torch.tanh(self.up(h)))
            return self.head(h)

    twin = TinyTorch().eval()
    with torch.no_grad():
        for name in NNX_NAMES:
            host = getattr(model, name)
            kernel = np.asarray(host.kernel[...])
            fan_in = 6 if name == "embed" else 16 if name == "down" else 8
            linear = getattr(twin, name)
            linear.weight.copy_(torch.tensor(kernel.reshape(fan_in, -1).T.copy()))
            linear.bias.copy_(torch.tensor(np.asarray(host.bias[...]).reshape(-1).copy()))
    return twin


BERT = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    num_labels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
IDS = np.array([[1, 5, 9, 13, 17, 21, 2], [3, 7, 11, 15, 19, 23, 4]])
SELF = r"bert/encoder/layer/\d+/attention/self/"


@pytest.fixture(scope="module")
def bert():
    """``(flax_module, params, make_torch_twin)`` of a tiny BERT classifier."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        FlaxBertForSequenceClassification,
    )

    return twins(
        FlaxBertForSequenceClassification,
        BertForSequenceClassification,
        BertConfig(**BERT),
        lambda params: jax.tree.map(lambda x: x + 0.0, params),  # the classifier bias too
    )


def bert_inputs():
    ids = jnp.asarray(IDS)
    return (ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.arange(ids.shape[1])[None], None)


def bert_logits(adapted, variables):
    return np.asarray(adapted.apply(variables, *bert_inputs(), deterministic=True).logits)


def peft_load(twin, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(twin, str(path)).eval()


def tensors_of(path):
    with safe_open(str(pathlib.Path(path) / "adapter_model.safetensors"), "np") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def config_of(path):
    return json.loads((pathlib.Path(path) / "adapter_config.json").read_text())


def rewrite(path, config=None, tensors=None):
    """Replaces the adapter files at ``path`` with a changed config and/or tensors."""
    if config is not None:
        (pathlib.Path(path) / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(pathlib.Path(path) / "adapter_model.safetensors"), {"format": "pt"})


def nnx_adapted(targets, seed=0):
    return jadapters.adapter_transform(TinyNNX(nnx.Rngs(seed)), targets)


def x_nnx():
    return np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)


def set_adapter_weights(model, seed=3, scale=0.3):
    """Gives every adapter weight of an NNX model noise around its init (ones for IA3)."""
    state = nnx.state(model, jadapters.AdapterParam)
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(
        lambda v: jnp.asarray(v + scale * rng.standard_normal(v.shape), v.dtype),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, noisy)
    nnx.update(model, state)


# ---- the format -------------------------------------------------------------------------------


def test_lora_format_names_transposes_scale_and_metadata(tmp_path):
    model = nnx_adapted(r"heads|merge|up")
    model.add_adapter("lora", jadapters.LoRAConfig(rank=3, alpha=6.0), rngs=nnx.Rngs(1))
    set_adapter_weights(model)
    export_peft(tmp_path, model, base_model_name_or_path="tiny")
    metadata, tensors = tensors_of(tmp_path)
    assert metadata == {"format": "pt"}
    a = {n: np.asarray(getattr(model, n).adapter_layer["lora"].params["a"][...]) for n in ["up"]}
    b = {n: np.asarray(getattr(model, n).adapter_layer["lora"].params["b"][...]) for n in ["up"]}
    assert sorted(tensors) == sorted(
        f"base_model.model.{n}.lora_{m}.weight" for n in ("heads", "merge", "up") for m in "AB"
    )
    np.testing.assert_array_equal(tensors["base_model.model.up.lora_A.weight"], a["up"].T)
    np.testing.assert_array_equal(tensors["base_model.model.up.lora_B.weight"], b["up"].T)
    # multi-axis kernels flatten to the Linear layout: heads (8, 2, 4) -> 8 -> 8
    assert tensors["base_model.model.heads.lora_A.weight"].shape == (3, 8)
    assert tensors["base_model.model.heads.lora_B.weight"].shape == (8, 3)
    assert tensors["base_model.model.merge.lora_A.weight"].shape == (3, 8)
    config = config_of(tmp_path)
    assert config == {
        "base_model_name_or_path": "tiny",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": 6,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 3,
        "target_modules": ["heads", "merge", "up"],
        "task_type": None,
        "use_rslora": False,
    }


def test_alpha_none_is_rank_and_rslora_and_strategy_scale_are_kept(tmp_path):
    model = nnx_adapted("up")
    strategy = jadapters.ScaledAddStrategy(scale=0.5)
    cfg = jadapters.LoRAConfig(rank=4, rslora=True, adapter_strategy=strategy)
    model.add_adapter("lora", cfg, rngs=nnx.Rngs(1))
    set_adapter_weights(model)
    export_peft(tmp_path, model)
    config = config_of(tmp_path)
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 4, True)
    _, tensors = tensors_of(tmp_path)
    b = np.asarray(model.up.adapter_layer["lora"].params["b"][...])
    np.testing.assert_allclose(tensors["base_model.model.up.lora_B.weight"], 0.5 * b.T, rtol=1e-6)


def test_ia3_format_output_and_feedforward(tmp_path):
    model = nnx_adapted({"out": r"embed|up", "ff": "down"})
    model.add_adapter("out:ia3", jadapters.IA3Config(), rngs=nnx.Rngs(1))
    model.add_adapter("ff:ia3_ff", jadapters.IA3Config(), rngs=nnx.Rngs(1), insertion="input")
    set_adapter_weights(model)
    export_peft(tmp_path, model)
    _, tensors = tensors_of(tmp_path)
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.embed.ia3_l": (8, 1),
        "base_model.model.up.ia3_l": (16, 1),
        "base_model.model.down.ia3_l": (1, 16),
    }
    scale = np.asarray(model.down.adapter_layer["ia3_ff"].params["scale"][...])
    np.testing.assert_array_equal(tensors["base_model.model.down.ia3_l"][0], scale)
    config = config_of(tmp_path)
    assert config["peft_type"] == "IA3"
    assert config["target_modules"] == ["down", "embed", "up"]
    assert config["feedforward_modules"] == ["down"]
    assert "r" not in config and "peft_version" not in config


@pytest.mark.parametrize("with_inputs", [False, True], ids=["shapes", "hosts read"])
def test_ia3_on_a_linen_einsum_with_a_matrix_kernel(tmp_path, with_inputs):
    """An Einsum ``btd,dk->btk`` is a Linear: its IA3 exports whether the host is read
    (``inputs=``) or its shape is."""

    class Proj(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((3, 5), "btd,dk->btk", name="proj")(x)

    model = jadapters.adapter_transform(Proj(), "proj").add_adapter("ia3", jadapters.IA3Config())
    x = jnp.ones((2, 4, 3))
    variables = model.init(jax.random.key(0), x)
    inputs = (x,) if with_inputs else None
    export_peft(tmp_path, model, variables, inputs=inputs)
    _, tensors = tensors_of(tmp_path)
    assert {k: v.shape for k, v in tensors.items()} == {"base_model.model.proj.ia3_l": (5, 1)}


def test_export_refusals(tmp_path):
    model = nnx_adapted({"": "up", "b": "down"})
    model.add_adapter("bottleneck", jadapters.LinearAdapterConfig(dim=2), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="bottleneck adapters .* have none"):
        export_peft(tmp_path, model)
    model.remove_adapter("bottleneck")
    model.add_adapter("lora", jadapters.LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    model.add_adapter("b:ia3", jadapters.IA3Config(), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="mix PEFT types"):
        export_peft(tmp_path, model)
    with pytest.raises(ValueError, match="task_type 'SEQ_CLS' makes PEFT load the model's head"):
        export_peft(tmp_path, model, name="lora", task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="task_type must be None or one of"):
        export_peft(tmp_path, model, name="lora", task_type="seq_cls")
    with pytest.raises(ValueError, match="name 'nope' is not an adapter"):
        export_peft(tmp_path, model, name="nope")
    # a name that PEFT's suffix matching would also find elsewhere
    names = {"up": "up", "down": "block.up", "embed": "embed", "heads": "heads"}
    with pytest.raises(ValueError, match="entry 'up' would also select modules \\['block.up'\\]"):
        export_peft(tmp_path, model, name="lora", module_names=names.get)
    assert not list(tmp_path.iterdir())


def test_einsum_whose_output_axes_are_reordered_cannot_be_a_linear(tmp_path):
    class M(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Einsum("bd,dhk->bkh", (8, 2, 4), rngs=rngs)

        def __call__(self, x):
            return self.proj(x)

    model = jadapters.adapter_transform(M(nnx.Rngs(0)), "proj")
    model.add_adapter("lora", jadapters.LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="host 'proj' cannot be expressed as a PyTorch Linear"):
        export_peft(tmp_path, model)


def test_linen_multi_axis_kernel_needs_inputs(tmp_path):
    base = nn.Sequential([nn.DenseGeneral((2, 3))])
    model = jadapters.adapter_transform(base, "layers_0")
    model = model.add_adapter("lora", jadapters.LoRAConfig(rank=2))
    x = jnp.ones((1, 4))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"kernel of shape \(4, 2, 3\).*pass inputs="):
        export_peft(tmp_path, model, variables)
    export_peft(tmp_path, model, variables, inputs=(x,))
    assert tensors_of(tmp_path)[1]["base_model.model.layers_0.lora_B.weight"].shape == (6, 2)


def test_linen_export_import_round_trip_keeps_outputs(tmp_path):
    base = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(3)])
    targets = r"layers_[02]"
    cfg = jadapters.LoRAConfig(rank=2, alpha=3.0, rslora=True)
    model = jadapters.adapter_transform(base, targets).add_adapter("lora", cfg)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    variables = {**variables, "adapters": jax.tree.map(lambda v: v + 0.2, variables["adapters"])}
    export_peft(tmp_path, model, variables)
    fresh = jadapters.adapter_transform(base, targets)
    new_model, new_variables = import_peft(tmp_path, fresh, {"params": variables["params"]})
    assert new_model.get_adapter_cfg("peft").rslora is True
    np.testing.assert_allclose(
        new_model.apply(new_variables, x), model.apply(variables, x), atol=ATOL
    )


def test_module_names_map_both_ways(tmp_path):
    model = nnx_adapted(r"up|down")
    model.add_adapter("lora", jadapters.LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    set_adapter_weights(model)
    names = {"up": "mlp.fc1", "down": "mlp.fc2"}
    export_peft(tmp_path, model, module_names=lambda path: names.get(path))
    assert config_of(tmp_path)["target_modules"] == ["mlp.fc1", "mlp.fc2"]
    fresh = nnx_adapted(r"up|down")
    with pytest.raises(ValueError, match=r"modules \['mlp.fc1', 'mlp.fc2'\] do not exist"):
        import_peft(tmp_path, fresh)
    import_peft(tmp_path, fresh, module_names=names)
    x = x_nnx()
    np.testing.assert_allclose(fresh(x), model(x), atol=ATOL)


def test_bfloat16_weights_stay_bfloat16(tmp_path):
    model = nnx_adapted("up")
    cfg = jadapters.LoRAConfig(rank=2, param_dtype="bfloat16")
    model.add_adapter("lora", cfg, rngs=nnx.Rngs(1))
    set_adapter_weights(model)
    export_peft(tmp_path, model)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    fresh = nnx_adapted("up")
    import_peft(tmp_path, fresh, name="lora")
    assert fresh.get_adapter_specs().get("lora").cfg.param_dtype == "bfloat16"
    for key in ("a", "b"):
        np.testing.assert_array_equal(
            fresh.up.adapter_layer["lora"].params[key][...],
            model.up.adapter_layer["lora"].params[key][...],
        )


# ---- real PEFT: Linen (Hugging Face Flax BERT) --------------------------------------------------


def train_bert_lora(module, params, cfg, steps=3):
    adapted = jadapters.adapter_transform(module, SELF + "(query|value)")
    adapted = adapted.add_adapter("lora", cfg)
    variables = adapted.init_adapters(
        jax.random.key(1), {"params": params}, *bert_inputs(), deterministic=True
    )
    labels = jnp.array([0, 2])

    def loss_fn(apply, batch):
        logits = apply(*batch[0], deterministic=True).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    step = jadapters.linen_train_step(adapted, loss_fn, optax.adam(0.05), donate=False)
    adapters, opt_state = variables["adapters"], step.init(variables["adapters"])
    for _ in range(steps):
        adapters, opt_state, _ = step(
            adapters, opt_state, {"params": params}, (bert_inputs(), labels), jax.random.key(2)
        )
    return adapted, {"params": params, "adapters": adapters}


@pytest.mark.parametrize(
    "cfg",
    [jadapters.LoRAConfig(rank=4, alpha=8.0), jadapters.LoRAConfig(rank=4, rslora=True)],
    ids=["lora", "rslora"],
)
def test_bert_lora_trained_in_jax_loads_in_peft(bert, tmp_path, cfg):
    module, params, make_twin = bert
    adapted, variables = train_bert_lora(module, params, cfg)
    b = variables["adapters"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
    assert float(jnp.abs(b["lora"]["b"]).max()) > 0  # trained
    export_peft(tmp_path, adapted, variables)
    twin = make_twin()
    before = torch_logits(twin, IDS)
    expected = bert_logits(adapted, variables)
    assert np.abs(expected - before).max() > 1e-3  # the adapter changes the outputs
    np.testing.assert_allclose(torch_logits(peft_load(twin, tmp_path), IDS), expected, atol=ATOL)


def test_bert_ia3_and_trained_head_load_in_peft(bert, tmp_path):
    module, params, make_twin = bert
    targets = {"attn": SELF + "(key|value)", "ffn": r"bert/encoder/layer/\d+/output/dense"}
    adapted = jadapters.adapter_transform(module, targets)
    adapted = adapted.add_adapter("attn:ia3", jadapters.IA3Config())
    adapted = adapted.add_adapter("ffn:ia3_ff", jadapters.IA3Config(), insertion="input")
    variables = adapted.init_adapters(
        jax.random.key(1), {"params": params}, *bert_inputs(), deterministic=True
    )
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(
        lambda v: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32),
        variables["adapters"],
    )
    head = jax.tree.map(lambda v: v + 0.5, params["classifier"])  # "trained" with the adapter
    variables = {"params": {**params, "classifier": head}, "adapters": adapters}
    export_peft(tmp_path, adapted, variables, task_type="SEQ_CLS", modules_to_save=["classifier"])
    config = config_of(tmp_path)
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    assert all(
        name.endswith(("self.key", "self.value", "layer.0.output.dense", "layer.1.output.dense"))
        for name in config["target_modules"]
    )
    twin = make_twin()  # the original head
    expected = bert_logits(adapted, variables)
    np.testing.assert_allclose(torch_logits(peft_load(twin, tmp_path), IDS), expected, atol=ATOL)


def perturb(peft_model, seed=0):
    """Adds noise to the adapter weights of a PEFT model (LoRA's B starts at zero)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def peft_bert(make_twin, peft_config, path, seed=0):
    """A PEFT adapter made with get_peft_model, given nonzero weights, saved; and its logits."""
    from peft import get_peft_model

    model = get_peft_model(make_twin(), peft_config)
    perturb(model, seed)
    model.save_pretrained(str(path))
    return torch_logits(model.eval(), IDS)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_bert_lora_made_in_peft_imports_into_linen(bert, tmp_path, rslora):
    from peft import LoraConfig

    module, params, make_twin = bert
    peft_config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], use_rslora=rslora
    )
    expected = peft_bert(make_twin, peft_config, tmp_path)
    adapted = jadapters.adapter_transform(module, SELF + "(query|value)")
    adapted, variables = import_peft(tmp_path, adapted, {"params": params}, name="lora")
    cfg = adapted.get_adapter_cfg("lora")
    assert (cfg.rank, cfg.alpha, cfg.rslora) == (4, 8, rslora)
    np.testing.assert_allclose(bert_logits(adapted, variables), expected, atol=ATOL)


def test_bert_ia3_made_in_peft_imports_into_linen(bert, tmp_path):
    from peft import IA3Config

    module, params, make_twin = bert
    # PEFT's BERT default: "output.dense" selects both output projections, as feed-forward.
    peft_config = IA3Config(
        target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
    )
    expected = peft_bert(make_twin, peft_config, tmp_path)
    targets = {
        "attn": SELF + "(key|value)",
        "ffn": r"bert/encoder/layer/\d+/(attention/)?output/dense",
    }
    adapted = jadapters.adapter_transform(module, targets)
    with pytest.raises(ValueError, match="two jadapters adapters in two adapter modules"):
        import_peft(tmp_path, adapted, {"params": params})
    adapted, variables = import_peft(
        tmp_path,
        adapted,
        {"params": params},
        name={"output": "attn:ia3", "input": "ffn:ia3_ff"},
    )
    assert adapted.adapters.get("ia3_ff").insertion == "input"
    np.testing.assert_allclose(bert_logits(adapted, variables), expected, atol=ATOL)


def test_bert_seq_cls_head_and_unadapted_modules_need_skip(bert, tmp_path):
    from peft import LoraConfig

    module, params, make_twin = bert
    peft_config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "key", "value"], task_type="SEQ_CLS"
    )
    peft_bert(make_twin, peft_config, tmp_path)
    adapted = jadapters.adapter_transform(module, SELF + "(query|value)")
    with pytest.raises(ValueError, match=r"not hosts of the adapter's group: \[.*self.key.*"):
        import_peft(tmp_path, adapted, {"params": params})
    with pytest.raises(ValueError, match=r"modules_to_save\): \['classifier'\]"):
        import_peft(tmp_path, adapted, {"params": params})
    adapted, variables = import_peft(tmp_path, adapted, {"params": params}, skip_unadapted=True)
    hosts = jax.tree_util.tree_flatten_with_path(variables["adapters"])[0]
    assert len(hosts) == 2 * 2 * 2  # layers x (query, value) x (A, B); no key, no head


# ---- real PEFT: NNX -----------------------------------------------------------------------------


def test_nnx_lora_trained_in_jax_loads_in_peft(tmp_path):
    model = nnx_adapted(r"heads|merge|up|down")
    model.add_adapter("lora", jadapters.LoRAConfig(rank=3, alpha=5.0), rngs=nnx.Rngs(1))
    optimizer = jadapters.adapter_optimizer(model, optax.adam(0.05))
    x, y = x_nnx(), np.zeros((5, 3), np.float32)
    step = jadapters.nnx_train_step(lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2), donate=False)
    for _ in range(3):
        step(model, optimizer, (x, y))
    assert float(jnp.abs(model.heads.adapter_layer["lora"].params["b"][...]).max()) > 0
    twin = torch_twin(model)
    expected = np.asarray(model(x))
    assert np.abs(torch_logits(twin, x) - expected).max() > 1e-3
    export_peft(tmp_path, model)
    np.testing.assert_allclose(torch_logits(peft_load(twin, tmp_path), x), expected, atol=ATOL)


def test_nnx_ia3_set_in_jax_loads_in_peft(tmp_path):
    model = nnx_adapted({"out": r"embed|up", "ff": "down"})
    model.add_adapter("out:ia3", jadapters.IA3Config(), rngs=nnx.Rngs(1))
    model.add_adapter("ff:ia3_ff", jadapters.IA3Config(), rngs=nnx.Rngs(1), insertion="input")
    set_adapter_weights(model)
    twin = torch_twin(model)
    export_peft(tmp_path, model)
    x = x_nnx()
    np.testing.assert_allclose(torch_logits(peft_load(twin, tmp_path), x), model(x), atol=ATOL)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_nnx_lora_made_in_peft_imports(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    model = nnx_adapted(r"heads|merge|up|down")
    peft_model = get_peft_model(
        torch_twin(model),
        LoraConfig(
            r=2, lora_alpha=3, target_modules=["heads", "merge", "up", "down"], use_rslora=rslora
        ),
    )
    perturb(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    x = x_nnx()
    assert import_peft(tmp_path, model) is model
    np.testing.assert_allclose(model(x), torch_logits(peft_model.eval(), x), atol=ATOL)


def test_nnx_ia3_made_in_peft_imports(tmp_path):
    from peft import IA3Config, get_peft_model

    model = nnx_adapted({"out": r"embed|up", "ff": "down"})
    peft_model = get_peft_model(
        torch_twin(model),
        IA3Config(target_modules=["embed", "up", "down"], feedforward_modules=["down"]),
    )
    perturb(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    import_peft(tmp_path, model, name={"output": "out:ia3", "input": "ff:ia3_ff"})
    x = x_nnx()
    np.testing.assert_allclose(model(x), torch_logits(peft_model.eval(), x), atol=ATOL)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path):
    """An NNX LoRA exported to ``tmp_path``, and a fresh model adapted at the same hosts."""
    model = nnx_adapted(r"up|down")
    model.add_adapter("lora", jadapters.LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    set_adapter_weights(model)
    export_peft(tmp_path, model)
    return tmp_path, nnx_adapted(r"up|down")


def test_another_peft_type_is_refused(exported):
    path, model = exported
    rewrite(path, config={**config_of(path), "peft_type": "PREFIX_TUNING"})
    with pytest.raises(ValueError, match="peft_type is 'PREFIX_TUNING'; jadapters imports"):
        import_peft(path, model)


def test_settings_without_counterpart_are_refused(exported):
    path, model = exported
    rewrite(path, config={**config_of(path), "use_dora": True})
    with pytest.raises(ValueError, match="use_dora=True changes what the weights mean"):
        import_peft(path, model)


def test_missing_keys_are_refused(exported):
    path, model = exported
    _, tensors = tensors_of(path)
    rewrite(path, tensors={k: v for k, v in tensors.items() if not k.endswith("up.lora_B.weight")})
    with pytest.raises(ValueError, match=r"'up' has no \['lora_B.weight'\] \(a missing key\)"):
        import_peft(path, model)
    rewrite(path, tensors={k: v for k, v in tensors.items() if ".up." not in k})
    with pytest.raises(ValueError, match=r"modules \['up'\] of the model are selected by"):
        import_peft(path, model)


def test_a_host_without_weights_is_refused(exported):
    path, _ = exported
    model = nnx_adapted(r"up|down|embed")
    with pytest.raises(ValueError, match=r"without saved weights: \['embed'\]"):
        import_peft(path, model)
    assert model.get_adapter_specs().names() == []  # unchanged


def test_shape_mismatch_is_refused(exported):
    path, model = exported
    rewrite(path, config={**config_of(path), "r": 3})
    with pytest.raises(ValueError, match=r"lora_A.weight: \(2, 8\), expected \(3, 8\)"):
        import_peft(path, model)
    rewrite(path, config={**config_of(path), "r": 2})
    _, tensors = tensors_of(path)
    tensors["base_model.model.up.lora_B.weight"] = np.zeros((15, 2), np.float32)
    rewrite(path, tensors=tensors)
    with pytest.raises(ValueError, match=r"up.lora_B.weight: \(15, 2\), expected \(16, 2\)"):
        import_peft(path, model)


def test_a_module_that_does_not_exist_is_refused(exported):
    path, model = exported
    _, tensors = tensors_of(path)
    tensors = {k.replace(".up.", ".upp."): v for k, v in tensors.items()}
    rewrite(path, config={**config_of(path), "target_modules": ["down", "upp"]}, tensors=tensors)
    with pytest.raises(ValueError, match=r"modules \['upp'\] do not exist in the model.*'up'"):
        import_peft(path, model)


def test_a_target_modules_regex_is_refused(exported):
    path, model = exported
    rewrite(path, config={**config_of(path), "target_modules": ".*(up|down)"})
    with pytest.raises(ValueError, match="target_modules is a regular expression"):
        import_peft(path, model)


def test_pickles_junk_and_oversized_files_are_refused(exported, tmp_path_factory):
    path, model = exported
    with pytest.raises(ValueError, match="larger|more than max_bytes=10"):
        import_peft(path, model, max_bytes=10)
    other = tmp_path_factory.mktemp("bin")
    (other / "adapter_config.json").write_text(json.dumps(config_of(path)))
    (other / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="is a pickle, which can run code when read"):
        import_peft(other, model)
    (other / "adapter_model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{junk")
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        import_peft(other, model)
    (other / "adapter_config.json").write_text('{"peft_type": NaN}')
    with pytest.raises(ValueError, match="adapter_config.json' is not valid JSON"):
        import_peft(other, model)
    (other / "adapter_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        import_peft(other, model)


def test_an_existing_name_needs_replace(exported):
    path, model = exported
    import_peft(path, model, name="task")
    with pytest.raises(ValueError, match="adapter 'task' already exists in the model"):
        import_peft(path, model, name="task")
    import_peft(path, model, name="task", replace=True)
    assert model.get_adapter_specs().names() == ["task"]


def test_nnx_export_walks_the_graph_once(tmp_path, monkeypatch):
    """Exporting asks for each host's base and adapter many times; the NNX model's graph is
    walked once for the whole export (it was walked 175 times for LoRA on 8 projections),
    and the file holds both factors of every projection."""
    from jadapters.demo.models import NNXTransformer

    model = NNXTransformer(
        8, rngs=nnx.Rngs(0), num_classes=10, d_model=16, num_layers=4, num_heads=2, mlp_dim=32
    )
    jadapters.adapter_transform(model, {"attn": r"blocks/\d+/attn/(query|value)"})
    model.add_adapter("attn:l", jadapters.LoRAConfig(rank=2), rngs=nnx.Rngs(2))
    walked = []
    walk = nnx.iter_graph
    monkeypatch.setattr(nnx, "iter_graph", lambda root: walked.append(root) or walk(root))
    out = export_peft(str(tmp_path / "peft"), model, name="l")
    assert len(walked) == 1
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "np") as f:
        assert len(list(f.keys())) == 2 * 2 * 4  # A and B, query and value, 4 layers
