"""The compiled forwards beyond what both front-ends share (``test_frontends.py``): NNX's base
is an input only and its changing state is written back; static and traced keywords; a
third-party model (Hugging Face's Flax BERT); errors."""

import gc
import weakref

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _frontends import assert_trees_equal
from flax import nnx

import jadapters
from jadapters import AdapterParam, LinearAdapterConfig
from jadapters.compiled import DisabledWeights, split_kwargs
from jadapters.demo.models import NNXTransformer
from jadapters.losses import AUX_LOSS_COLLECTION

MODEL = dict(num_classes=10, d_model=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=8)
DROPPY = LinearAdapterConfig(
    dim=4, dropout=0.5, adapter_strategy=jadapters.ResidualAddStrategy(l2_lambda=1e-2)
)


def _x(shape=(2, 8, 8), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _nnx_model(seed=0):
    model = NNXTransformer(8, rngs=nnx.Rngs(seed), **MODEL)
    jadapters.adapter_transform(model, {"mlp": r"blocks/\d+/mlp"})
    model.add_adapter("mlp:task", DROPPY, rngs=nnx.Rngs(params=1, dropout=2))
    nnx.update(model, jax.tree.map(lambda a: a + 0.1, nnx.state(model, AdapterParam)))
    return model


# --- which keywords are static ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "static"),
    [
        (True, True),
        (3, True),
        (0.5, True),
        ("encode", True),
        (None, True),
        (["batch_stats", "aux"], True),
        (len, True),
        (jnp.ones(2), False),
        (np.ones(2), False),
        ({"dropout": jax.random.key(0)}, False),
        ((1, jnp.ones(1)), False),
    ],
)
def test_plain_python_keywords_are_static_and_arrays_are_traced(value, static):
    got_static, dynamic = split_kwargs({"k": value})
    assert (got_static != ()) is static and ("k" in dynamic) is not static
    if static:
        hash(got_static)  # a cache key: lists became tuples


# --- NNX ----------------------------------------------------------------------------------------


def test_nnx_forward_neither_outputs_nor_copies_the_base():
    """The base is an input only: after a call every base variable holds the very array it
    held. In evaluation mode nothing else changes either (the adapter's weights, its dropout
    stream): the compiled program's only output is the logits, where ``nnx.jit`` returns the
    whole model, and every variable keeps its very array."""
    model, x = _nnx_model(), _x()
    model.eval()
    forward = jadapters.nnx_forward()
    variables = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]
    before = [v.get_raw_value() for v in variables]
    forward(model, x)
    assert all(v.get_raw_value() is a for v, a in zip(variables, before, strict=True))
    out_bytes = forward.lower(model, x).compile().memory_analysis().output_size_in_bytes
    assert out_bytes == 2 * 10 * 4  # the logits alone


def test_nnx_forward_in_training_mode_writes_back_the_rng_counts_and_losses_pop():
    """Adapters in training mode draw dropout keys: the compiled forward advances the RNG
    counters as the eager call does (so the next call draws new masks), and the auxiliary
    losses it sows come back out of the compiled call as part of the model."""
    compiled_model, eager_model, x = _nnx_model(), _nnx_model(), _x()
    forward = jadapters.nnx_forward(
        lambda m, x: (m(x), nnx.to_pure_dict(nnx.pop(m, jadapters.AdapterLoss)))
    )
    for model in (compiled_model, eager_model):
        model.train()
    for _ in range(2):
        out, losses = forward(compiled_model, x)
        expected = eager_model(x)
        expected_losses = nnx.to_pure_dict(nnx.pop(eager_model, jadapters.AdapterLoss))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), losses, expected_losses
        )
        assert_trees_equal(
            nnx.state(compiled_model, nnx.RngCount), nnx.state(eager_model, nnx.RngCount)
        )
    first, _ = forward(compiled_model, x)
    second, _ = forward(compiled_model, x)
    assert not np.array_equal(first, second)  # new masks each call


def test_nnx_forward_is_traced_once_and_again_when_a_mode_changes():
    model, x = _nnx_model(), _x()
    model.eval()
    traces = []

    def fn(m, x):
        traces.append(1)  # runs at trace time only
        out = m(x)
        nnx.pop(m, jadapters.AdapterLoss)  # sown in training mode
        return out

    forward = jadapters.nnx_forward(fn)
    for _ in range(3):
        forward(model, x)
    assert len(traces) == 1
    model.train()
    forward(model, x)
    assert len(traces) == 2
    model.eval()
    forward(model, x)
    assert len(traces) == 2  # the eval-mode program is cached


def test_nnx_forward_lets_go_of_a_model_that_is_gone():
    """The forward holds its model weakly: once the caller drops the model, the cached split
    goes too and keeps none of the model's arrays alive."""
    forward, x = jadapters.nnx_forward(), _x()
    model = _nnx_model()
    model.eval()
    forward(model, x)
    kernel = weakref.ref(model.blocks[0].mlp.fc1.kernel.get_raw_value())
    assert forward._split._bound is not None and kernel() is not None
    del model
    gc.collect()
    assert forward._split._bound is None and kernel() is None


class _Scaled(nnx.Module):
    """A host whose call takes a Python flag (branched on) and an array keyword."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x, *, double: bool = False, shift=None):
        y = self.dense(x)
        if double:  # a Python branch: needs a static value
            y = 2 * y
        return y if shift is None else y + shift


def test_nnx_forward_keywords_python_values_static_arrays_traced():
    model = jadapters.adapter_transform(_Scaled(nnx.Rngs(0)), "dense")
    model.add_adapter("t", jadapters.IA3Config(), rngs=nnx.Rngs(1))
    forward, x = jadapters.nnx_forward(), _x((2, 3))
    for kwargs in ({}, {"double": True}, {"double": True, "shift": jnp.ones((2, 3))}):
        np.testing.assert_allclose(forward(model, x, **kwargs), model(x, **kwargs), rtol=1e-6)
    assert len(forward._split._compiled) == 2  # one per static set; the array is traced


def test_nnx_forward_refuses_a_function_that_changes_the_models_structure():
    model, x = _nnx_model(), _x()
    model.train()  # the adapters sow auxiliary losses; a plain call leaves them in the model
    forward = jadapters.nnx_forward()
    with pytest.raises(ValueError) as error:
        forward(model, x)
    message = str(error.value)
    assert message.startswith("the forward changed the model's structure: added blocks/0/mlp/")
    assert "aux_loss (AdapterLoss)" in message and "added blocks/1/mlp/" in message
    assert "nnx.pop(model, jadapters.AdapterLoss)" in message and "model.eval()" in message


# --- Linen ----------------------------------------------------------------------------------------


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.Dense(8, name="fc1")(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(4, name="fc2")(nn.relu(x))


@pytest.fixture(scope="module")
def linen_net():
    model = jadapters.adapter_transform(_Net(), "fc1")
    model = model.add_adapter("task", DROPPY).add_adapter("off", LinearAdapterConfig(dim=2))
    model = model.set_enabled_adapters("off", False)
    x = _x((3, 5))
    variables = model.init(jax.random.key(0), x)
    variables = {
        **variables,
        "adapters": jax.tree.map(lambda a: a + 0.1, variables["adapters"]),
    }
    return model, variables, x


def test_linen_forward_passes_static_flags_and_traced_keys_like_apply(linen_net):
    model, variables, x = linen_net
    forward, reference = (
        jadapters.linen_forward(model),
        jax.jit(model.apply, static_argnames=("train", "adapter_train", "mutable")),
    )
    key = jax.random.key(3)
    for kwargs in (
        {},
        {"train": False, "adapter_train": True, "rngs": {"dropout": key}},
        {"train": True, "rngs": {"dropout": key}},
    ):
        np.testing.assert_array_equal(
            forward(variables, x, **kwargs), reference(variables, x, **kwargs)
        )
    kwargs = {"adapter_train": True, "rngs": {"dropout": key}, "mutable": [AUX_LOSS_COLLECTION]}
    out, state = forward(variables, x, **kwargs)
    want, want_state = reference(variables, x, **{**kwargs, "mutable": (AUX_LOSS_COLLECTION,)})
    np.testing.assert_array_equal(out, want)
    assert_trees_equal(state, want_state)
    assert float(jax.tree.leaves(state)[0]) > 0  # the l2 loss of the training-mode adapter
    assert len(forward._compiled) == 4  # one per set of static keywords


def test_linen_forward_leaves_the_disabled_weights_out_and_the_callers_tree_alone(linen_net):
    model, variables, x = linen_net
    forward = jadapters.linen_forward(model)
    only_enabled = {
        **variables,
        "adapters": {"fc1": {"task": variables["adapters"]["fc1"]["task"]}},
    }
    inputs = [
        len(jax.tree.leaves(forward.lower(v, x).args_info)) for v in (variables, only_enabled)
    ]
    assert inputs[0] == inputs[1]
    assert "off" in variables["adapters"]["fc1"]  # the caller's tree is not changed


def _same_arrays(a, b) -> bool:
    """The same tree of the very same arrays, keys in the same order."""
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and list(a) == list(b) and all(_same_arrays(a[k], b[k]) for k in a)
        )
    return a is b


def test_setting_aside_reads_every_new_tree_and_puts_back_the_same_arrays():
    """``DisabledWeights`` remembers which keys a host kept, to touch only those per call; a
    new tree (new arrays, or other keys at a host) is never served from that memory."""
    model = jadapters.adapter_transform(_Net(), r"fc\d")
    for name in ("a", "b", "c"):
        model = model.add_adapter(name, LinearAdapterConfig(dim=2))
    model = model.set_enabled_adapters(enabled=False).set_enabled_adapters("b", enabled=True)
    adapters = model.init(jax.random.key(0), _x((3, 5)))["adapters"]
    disabled = DisabledWeights(model)
    for _ in range(3):  # new arrays under the same keys every time, as in a training loop
        adapters = jax.tree.map(lambda a: a + 1.0, adapters)
        active, parked = disabled.park(adapters)
        assert _same_arrays(active, {h: {"b": adapters[h]["b"]} for h in ("fc1", "fc2")})
        trained = jax.tree.map(lambda a: a * 2.0, active)
        back = DisabledWeights.unpark(trained, parked)
        assert list(back["fc1"]) == ["a", "b", "c"]  # the caller's order
        for host in ("fc1", "fc2"):
            assert back[host]["b"] is trained[host]["b"]
            assert _same_arrays(
                {k: back[host][k] for k in "ac"}, {k: adapters[host][k] for k in "ac"}
            )
    assert set(adapters["fc1"]) == {"a", "b", "c"}  # the caller's tree is not changed
    # other keys at a host, at another size or at the same size: filtered afresh
    fewer = {**adapters, "fc1": {"b": adapters["fc1"]["b"], "c": adapters["fc1"]["c"]}}
    assert _same_arrays(disabled.park(fewer, keep=False)[0]["fc1"], {"b": adapters["fc1"]["b"]})
    swapped = {**adapters, "fc1": {"a": 1, "c": 2, "other": adapters["fc1"]["b"]}}
    assert disabled.park(swapped, keep=False)[0]["fc1"] == {"other": adapters["fc1"]["b"]}
    assert _same_arrays(disabled.park(adapters, keep=False)[0]["fc2"], {"b": adapters["fc2"]["b"]})


def test_linen_forward_names_a_wrong_first_argument(linen_net):
    model, _, x = linen_net
    with pytest.raises(TypeError, match=r"forward\(variables, \*args, \*\*kwargs\).*ArrayImpl"):
        jadapters.linen_forward(model)(x, x)


def test_linen_forward_on_hugging_face_flax_bert():
    """A third-party model: a ``deterministic`` flag (static), a ``None`` positional argument
    and a dataclass output; LoRA on the attention query and value, one of two enabled."""
    from transformers import BertConfig, FlaxBertForSequenceClassification

    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    hf = FlaxBertForSequenceClassification(config, seed=0)
    targets = {"qv": r"bert/encoder/layer/\d+/attention/self/(query|value)"}
    model = jadapters.adapter_transform(hf.module, targets)
    model = model.add_adapter("qv:a", jadapters.LoRAConfig(rank=2)).add_adapter(
        "qv:b", jadapters.LoRAConfig(rank=4)
    )
    ids = jnp.asarray([[1, 5, 9, 13, 2], [3, 7, 11, 15, 4]])
    args = (ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.arange(5)[None], None)
    variables = model.init_adapters(jax.random.key(1), {"params": hf.params}, *args)
    variables = {**variables, "adapters": jax.tree.map(lambda a: a + 0.05, variables["adapters"])}
    model = model.set_enabled_adapters("b", False)
    forward = jadapters.linen_forward(model)
    out = forward(variables, *args, deterministic=True)
    want = jax.jit(model.apply, static_argnames="deterministic")(
        variables, *args, deterministic=True
    )
    np.testing.assert_array_equal(out.logits, want.logits)
    plain = hf.module.apply({"params": hf.params}, *args, deterministic=True).logits
    assert not np.allclose(out.logits, plain, atol=1e-4)  # the enabled LoRA ran
    alone = model.remove_adapter("b")
    a_only = {
        "params": hf.params,
        "adapters": jax.tree.map(
            lambda node: {"a": node["a"]},
            variables["adapters"],
            is_leaf=lambda n: isinstance(n, dict) and "a" in n,
        ),
    }
    assert len(jax.tree.leaves(forward.lower(variables, *args, deterministic=True).args_info)) == (
        len(
            jax.tree.leaves(
                jadapters.linen_forward(alone).lower(a_only, *args, deterministic=True).args_info
            )
        )
    )


def test_nnx_train_step_writes_back_only_what_the_step_changed():
    """A frozen adapter (``trainable`` names the other) and the RNG streams keep their very
    arrays through a step; the trained adapter's weights are new arrays."""
    model = NNXTransformer(8, rngs=nnx.Rngs(0), **MODEL)
    jadapters.adapter_transform(model, r"blocks/\d+/mlp")
    for i, name in enumerate("ab"):
        model.add_adapter(name, LinearAdapterConfig(dim=4), rngs=nnx.Rngs(params=i))
    nnx.update(model, jax.tree.map(lambda a: a + 0.1, nnx.state(model, AdapterParam)))
    optimizer = jadapters.adapter_optimizer(model, optax.sgd(0.1), trainable="a")
    step = jadapters.nnx_train_step(lambda m, b: jnp.mean(m(b) ** 2), trainable="a")

    def arrays(name, weights):
        return [
            v.get_raw_value()
            for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable)
            and name in path
            and isinstance(v, AdapterParam) is weights
        ]

    kept = arrays("b", True) + arrays("b", False) + arrays("a", False)
    trained = arrays("a", True)
    step(model, optimizer, _x())
    assert all(
        a is b
        for a, b in zip(
            arrays("b", True) + arrays("b", False) + arrays("a", False), kept, strict=True
        )
    )
    assert trained and not any(a is b for a, b in zip(arrays("a", True), trained, strict=True))


def test_nnx_forward_serves_a_slot_put_after_it_compiled():
    """Hot swap into an adapter bank: the compiled forward reads the slot's new weights at
    its next call, without tracing again, and the other slot's examples are unchanged."""
    model = NNXTransformer(8, rngs=nnx.Rngs(0), **MODEL)
    jadapters.adapter_transform(model, r"blocks/\d+/mlp")
    bank = jadapters.AdapterBankConfig(adapter=LinearAdapterConfig(dim=4), slots=2)
    model.add_adapter("tenants", bank, rngs=nnx.Rngs(1))
    model.eval()
    traces = []

    def routed(m, x, ids):
        traces.append(len(traces))
        with jadapters.route(ids):
            return m(x)

    forward, x, ids = jadapters.nnx_forward(routed), _x(), jnp.array([0, 1])
    before = forward(model, x, ids)
    weights = jadapters.slot_weights(model, bank="tenants", slot=1)
    noise = jax.tree.map(lambda a: a + 0.5 * _x(a.shape, seed=a.size), weights)
    jadapters.put_slot(model, bank="tenants", slot=1, weights=noise)
    after = forward(model, x, ids)
    assert len(traces) == 1
    np.testing.assert_array_equal(after[0], before[0])
    assert not np.allclose(after[1], before[1], atol=1e-3)
    np.testing.assert_allclose(after, routed(model, x, ids), rtol=1e-5, atol=1e-6)
