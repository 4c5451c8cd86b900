"""LoRA and IA3 on Hugging Face's Flax model families, wrapped unmodified.

Each family is a tiny model built from its config (no download) and adapted on its attention
projections: the adapters are the identity at init, change the output once their weights
move, and merge into kernels that give the adapted model's output (read from the hosts with
``inputs=``, and from shapes alone). Llama's LoRA and IA3 also load in PEFT on a PyTorch twin.
ResNet (convolutions, BatchNorm) trains bottleneck adapters on its frozen base.
BERT (test_peft.py) and GPT-2 (test_hf_gpt2.py) have their own files.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hf import moved, torch_logits, twins

import jadapters
from jadapters.interop import export_peft

ATOL = 1e-5
IDS = np.array([[1, 5, 9, 13, 17, 21, 2], [3, 7, 11, 15, 19, 23, 4]])
TINY = dict(
    vocab_size=32,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
)


def _ids():
    ids = jnp.asarray(IDS)
    return ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


def _families():
    """``(name, config, Flax class, targets, inputs)`` per family."""
    import transformers as hf

    ids, mask, positions = _ids()
    return {
        "llama": (
            hf.LlamaConfig(**TINY, num_key_value_heads=2),
            hf.FlaxLlamaForCausalLM,
            r".*/self_attn/(q_proj|v_proj|o_proj)",
            (ids, mask, positions),
        ),
        "mistral": (  # grouped-query attention: k/v projections narrower than q
            hf.MistralConfig(**TINY, num_key_value_heads=1, sliding_window=None),
            hf.FlaxMistralForCausalLM,
            r".*/self_attn/(q_proj|k_proj|v_proj)",
            (ids, mask, positions),
        ),
        "opt": (
            hf.OPTConfig(
                vocab_size=32,
                hidden_size=16,
                num_hidden_layers=2,
                ffn_dim=32,
                num_attention_heads=2,
                word_embed_proj_dim=16,
                max_position_embeddings=16,
            ),
            hf.FlaxOPTForCausalLM,
            r".*/self_attn/(q_proj|v_proj)",
            (ids, mask, positions),
        ),
        "gpt_neo": (
            hf.GPTNeoConfig(
                vocab_size=32,
                hidden_size=16,
                num_layers=2,
                num_heads=2,
                attention_types=[[["global", "local"], 1]],
                max_position_embeddings=16,
                window_size=4,
            ),
            hf.FlaxGPTNeoForCausalLM,
            r".*/attn/attention/(q_proj|v_proj|out_proj)",
            (ids, mask, positions),
        ),
        "bart": (  # encoder-decoder
            hf.BartConfig(
                vocab_size=32,
                d_model=16,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                max_position_embeddings=16,
            ),
            hf.FlaxBartForConditionalGeneration,
            r".*/self_attn/(q_proj|v_proj)",
            (ids, mask, ids, mask, positions, positions),
        ),
        "vit": (  # images
            hf.ViTConfig(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=8,
                patch_size=4,
                num_channels=3,
            ),
            hf.FlaxViTForImageClassification,
            r".*/attention/attention/(query|value)",
            (jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32),),
        ),
        "gemma": (  # RMSNorm, grouped-query attention, explicit head_dim
            hf.GemmaConfig(**TINY, num_key_value_heads=1, head_dim=8),
            hf.FlaxGemmaForCausalLM,
            r".*/self_attn/(q_proj|v_proj|o_proj)",
            (ids, mask, positions),
        ),
        "gptj": (  # rotary embeddings on part of each head, parallel attention and MLP
            hf.GPTJConfig(
                vocab_size=32, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=16
            ),
            hf.FlaxGPTJForCausalLM,
            r".*/attn/(q_proj|v_proj|out_proj)",
            (ids, mask, positions),
        ),
        "bloom": (  # one fused query_key_value projection, ALiBi
            hf.BloomConfig(vocab_size=32, hidden_size=16, n_layer=2, n_head=2),
            hf.FlaxBloomForCausalLM,
            r".*/self_attention/(query_key_value|dense)",
            (ids, mask),
        ),
        "albert": (  # one layer's weights shared by every layer: so are its adapters
            hf.AlbertConfig(**TINY, embedding_size=8),
            hf.FlaxAlbertForSequenceClassification,
            r".*/attention/(query|value)",
            (ids, mask, jnp.zeros_like(ids), positions),
        ),
        "roberta": (
            hf.RobertaConfig(**TINY, pad_token_id=1),
            hf.FlaxRobertaForMaskedLM,
            r".*/attention/self/(query|value)",
            (ids, mask, jnp.zeros_like(ids), positions, None),
        ),
        "whisper": (  # audio: convolutions over mel features, then an encoder-decoder
            hf.WhisperConfig(
                vocab_size=32,
                d_model=16,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                num_mel_bins=4,
                max_source_positions=8,
                max_target_positions=16,
            ),
            hf.FlaxWhisperForConditionalGeneration,
            r".*/self_attn/(q_proj|v_proj)",
            (
                jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 16)), jnp.float32),
                ids,
                mask,
                positions,
            ),
        ),
        "clip_text": (  # causal mask inside an encoder, final layer norm, pooled output
            hf.CLIPTextConfig(**TINY),
            hf.FlaxCLIPTextModel,
            r".*/self_attn/(q_proj|v_proj)",
            (ids, mask, positions),
        ),
        "distilbert": (
            hf.DistilBertConfig(
                vocab_size=32,
                dim=16,
                n_layers=2,
                n_heads=2,
                hidden_dim=32,
                max_position_embeddings=16,
            ),
            hf.FlaxDistilBertForSequenceClassification,
            r".*/attention/(q_lin|v_lin)",
            (ids, mask),
        ),
    }


FAMILIES = tuple(
    "llama mistral opt gpt_neo bart vit distilbert gemma gptj bloom albert roberta whisper "
    "clip_text".split()
)


@pytest.fixture(scope="module", autouse=True)
def _rank_promotion_allowed():
    """Some families broadcast by implicit rank promotion, which the suite raises on
    elsewhere (conftest.py) to catch it in jadapters' own code."""
    with jax.numpy_rank_promotion("allow"):
        yield


def _output(module, variables, args):
    return np.asarray(jax.tree.leaves(module.apply(variables, *args))[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_and_ia3_are_identity_at_init_and_merge(family):
    config, cls, targets, args = _families()[family]
    model = cls(config, seed=0)
    module, params = model.module, {"params": model.params}
    adapted = jadapters.adapter_transform(module, targets)
    adapted = adapted.add_adapter("lora", jadapters.LoRAConfig(rank=2))
    adapted = adapted.add_adapter("ia3", jadapters.IA3Config())
    variables = adapted.init_adapters(jax.random.key(1), params, *args)
    base = _output(module, params, args)
    np.testing.assert_array_equal(_output(adapted, variables, args), base)

    variables = {"params": model.params, "adapters": moved(variables["adapters"])}
    expected = _output(adapted, variables, args)
    assert np.abs(expected - base).max() > 1e-3
    for inputs in (args, None):
        merged = jadapters.merge_adapters(adapted, variables, inputs=inputs)
        np.testing.assert_allclose(_output(module, {"params": merged}, args), expected, atol=ATOL)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_llama_adapters_made_in_jax_load_in_peft(tmp_path, kind):
    """LoRA on the query and value projections; or IA3 on the key and value projections'
    outputs and, as PEFT's feed-forward modules, on the MLP's down projection's input."""
    from peft import PeftModel
    from transformers import FlaxLlamaForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY, num_key_value_heads=2)
    module, params, make_twin = twins(FlaxLlamaForCausalLM, LlamaForCausalLM, config)
    if kind == "lora":
        adapted = jadapters.adapter_transform(module, r".*/self_attn/(q_proj|v_proj)")
        adapted = adapted.add_adapter("lora", jadapters.LoRAConfig(rank=2, alpha=4.0))
    else:
        targets = {"": r".*/self_attn/(k_proj|v_proj)", "ffn": r".*/mlp/down_proj"}
        adapted = jadapters.adapter_transform(module, targets)
        adapted = adapted.add_adapter("ia3", jadapters.IA3Config())
        adapted = adapted.add_adapter("ffn:ia3_ff", jadapters.IA3Config(), insertion="input")
    variables = adapted.init_adapters(jax.random.key(1), {"params": params}, *_ids())
    variables = {"params": params, "adapters": moved(variables["adapters"])}
    export_peft(tmp_path, adapted, variables)
    expected = np.asarray(adapted.apply(variables, *_ids()).logits)
    twin = make_twin()
    assert np.abs(expected - torch_logits(twin, IDS)).max() > 1e-2
    peft_model = PeftModel.from_pretrained(twin, str(tmp_path)).eval()
    np.testing.assert_allclose(torch_logits(peft_model, IDS), expected, atol=ATOL)


def test_resnet_trains_bottleneck_adapters_on_a_frozen_batchnorm_base():
    """Hugging Face's Flax ResNet: convolutions and BatchNorm, whose statistics one
    ``deterministic`` flag switches on. Bottleneck adapters after each stage's block are the
    identity at init in both modes (the batch statistics update as the base's do); the
    training step refuses a base that would update its statistics, naming the fix; with the
    base in evaluation mode the adapters train and the base model's output is unchanged."""
    import optax
    import transformers as hf

    config = hf.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
    )
    model = hf.FlaxResNetForImageClassification(config, seed=0)
    module, base = model.module, dict(model.params)
    assert sorted(base) == ["batch_stats", "params"]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)
    y = jnp.array([0, 1, 2, 1])
    adapted = jadapters.adapter_transform(module, r"resnet/encoder/stages/\d+/layers/0")
    adapted = adapted.add_adapter("task", jadapters.LinearAdapterConfig(dim=4))
    variables = adapted.init_adapters(jax.random.key(1), base, x)
    np.testing.assert_array_equal(adapted.apply(variables, x).logits, module.apply(base, x).logits)
    ours, our_stats = adapted.apply(variables, x, deterministic=False, mutable=["batch_stats"])
    theirs, their_stats = module.apply(base, x, deterministic=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(ours.logits, theirs.logits)
    jax.tree.map(np.testing.assert_array_equal, our_stats, their_stats)

    def loss_fn(deterministic):
        def loss(apply, batch):
            logits = apply(batch[0], deterministic=deterministic).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

        return loss

    _, adapters = jadapters.split_variables(variables)
    training = jadapters.linen_train_step(adapted, loss_fn(False), optax.adam(1e-2))
    with pytest.raises(
        ValueError,
        match=r"(?s)keeps the base frozen.*batch_stats.*"
        r"deterministic=True",
    ):
        training(adapters, training.init(adapters), base, (x, y), jax.random.key(0))

    step = jadapters.linen_train_step(adapted, loss_fn(True), optax.adam(1e-2), donate=False)
    before = jax.tree.map(np.array, base)
    opt_state, losses = step.init(adapters), []
    for i in range(15):
        adapters, opt_state, metrics = step(adapters, opt_state, base, (x, y), jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0]
    jax.tree.map(np.testing.assert_array_equal, base, before)
    trained = jadapters.merge_variables(base, adapters)
    assert np.abs(adapted.apply(trained, x).logits - module.apply(base, x).logits).max() > 1e-2
    off = adapted.set_enabled_adapters("task", enabled=False)
    np.testing.assert_array_equal(off.apply(trained, x).logits, module.apply(base, x).logits)
