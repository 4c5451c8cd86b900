"""NeMo's adapter mixin tests, for NNX modules and models."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _frontends import assert_trees_equal
from flax import nnx

import jadapters
from jadapters import (
    AdapterLoss,
    AdapterParam,
    LinearAdapterConfig,
    ResidualAddStrategy,
    ReturnResultStrategy,
)

D = 4
X_SHAPE = (2, 3, D)


class Block(nnx.Module, jadapters.AdapterModuleMixin):
    def __init__(self, dim, *, rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)
        self.out_features = dim

    def __call__(self, x):
        y = self.linear(x)
        if self.is_adapter_available():
            y = self.forward_enabled_adapters(y)
        return y


class BNBlock(nnx.Module, jadapters.AdapterModuleMixin):
    def __init__(self, dim, *, rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)
        self.bn = nnx.BatchNorm(dim, rngs=rngs)
        self.out_features = dim

    def __call__(self, x):
        y = self.bn(self.linear(x))
        if self.is_adapter_available():
            y = self.forward_enabled_adapters(y)
        return y


class Bare(nnx.Module, jadapters.AdapterModuleMixin):
    """A host with no width attribute: nothing to infer the adapter width from."""

    def __call__(self, x):
        return self.forward_enabled_adapters(x)


class Net(nnx.Module, jadapters.AdapterModelMixin):
    def __init__(self, *, rngs):
        self.enc = Block(D, rngs=rngs)
        self.dec = Block(D, rngs=rngs)
        self._adapter_groups = (
            ("", (("enc",),)),
            ("encoder", (("enc",),)),
            ("decoder", (("dec",),)),
        )

    def __call__(self, x):
        return self.dec(self.enc(x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OtherConfig(jadapters.AdapterConfig):
    dim: int = 1


def _x(seed=0, shape=X_SHAPE):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _cfg(dim=2, **kwargs):
    return LinearAdapterConfig(dim=dim, **kwargs)


@pytest.fixture
def block():
    return Block(D, rngs=nnx.Rngs(0))


@pytest.fixture
def randomize_adapters(randomize):
    """Gives every adapter parameter of ``model`` a random value (so adapters are not identity)."""

    def apply(model, seed=1, scale=0.5):
        state = nnx.state(model, AdapterParam)
        assert jax.tree.leaves(state), "no adapter parameters to randomize"
        nnx.update(model, randomize(state, seed=seed, scale=scale))

    return apply


def _run(shell, y):
    """One adapter applied by hand: its Linen module, its parameters, its strategy (eval)."""
    return jadapters.apply_adapter(shell.module, {"params": shell.param_values()}, y).output


def _raw(shell, y):
    return shell.module.apply({"params": shell.param_values()}, y)


def _flat_paths(state):
    return {tuple(path) for path, _ in nnx.to_flat_state(state)}


def _adapter_paths(model, prefix):
    prefix = tuple(prefix)
    return {p for p in _flat_paths(nnx.state(model, AdapterParam)) if p[: len(prefix)] == prefix}


def _num_params(state):
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(state))


# --- adding adapters ------------------------------------------------------------------------


def test_add_adapter_makes_available_in_insertion_order(block):
    assert not block.is_adapter_available()
    assert block.get_enabled_adapters() == []
    block.add_adapter("zeta", _cfg(), rngs=nnx.Rngs(1))
    assert block.is_adapter_available()
    block.add_adapter("alpha", _cfg(), rngs=nnx.Rngs(2))
    block.add_adapter("mid", _cfg(), rngs=nnx.Rngs(3))
    assert block.get_enabled_adapters() == ["zeta", "alpha", "mid"]


def test_identity_at_init(block):
    block.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    block.add_adapter("a2", _cfg(norm_position="post"), rngs=nnx.Rngs(2))
    x = _x()
    np.testing.assert_array_equal(block(x), block.linear(x))
    block.eval()
    np.testing.assert_array_equal(block(x), block.linear(x))


def test_parameter_count_rises_with_each_adapter(block):
    counts = [_num_params(nnx.state(block, AdapterParam))]
    leaves = [len(jax.tree.leaves(nnx.state(block, AdapterParam)))]
    for i, dim in enumerate([2, 3]):
        block.add_adapter(f"a{i}", _cfg(dim=dim), rngs=nnx.Rngs(i))
        counts.append(_num_params(nnx.state(block, AdapterParam)))
        leaves.append(len(jax.tree.leaves(nnx.state(block, AdapterParam))))
    # LayerNorm scale and bias (D each), down (D x dim) and up (dim x D) kernels.
    assert counts == [0, 2 * D + 2 * D * 2, 2 * D + 2 * D * 2 + 2 * D + 2 * D * 3]
    assert leaves == [0, 4, 8]


def test_add_adapter_leaves_base_params_unchanged(block):
    before = nnx.state(block, nnx.Param)
    before_leaves = [np.asarray(a) for a in jax.tree.leaves(before)]
    before_paths = _flat_paths(before)
    block.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    block.add_adapter("a2", _cfg(), rngs=nnx.Rngs(2))
    after = nnx.state(block, nnx.Param)
    assert _flat_paths(after) == before_paths
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for old, new in zip(before_leaves, jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(old, new)
    # Adapter weights are AdapterParam only: the two partitions do not overlap.
    assert not before_paths & _flat_paths(nnx.state(block, AdapterParam))


def test_duplicate_name_raises(block):
    block.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="adapter name 'a1' already exists"):
        block.add_adapter("a1", _cfg(dim=3), rngs=nnx.Rngs(2))
    assert block.get_enabled_adapters() == ["a1"]
    assert block.get_adapter_cfg("a1") == _cfg()


def test_reserved_name_raises(block):
    with pytest.raises(ValueError, match="adapter name 'global_cfg' is reserved"):
        block.add_adapter("global_cfg", _cfg(), rngs=nnx.Rngs(1))
    assert not block.is_adapter_available()


@pytest.mark.parametrize("name", ["", "a b", "a/b", "1abc", "a.b"])
def test_malformed_name_raises(block, name):
    with pytest.raises(ValueError, match="adapter name must start with a letter"):
        block.add_adapter(name, _cfg(), rngs=nnx.Rngs(1))
    assert not block.is_adapter_available()
    assert not jax.tree.leaves(nnx.state(block, AdapterParam))


def test_set_enabled_unknown_name_raises(block):
    block.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"unknown adapter name 'nope'; available: \['a1'\]"):
        block.set_enabled_adapters("nope", False)
    assert block.get_enabled_adapters() == ["a1"]


@pytest.mark.parametrize("name", [None, "a1"])
def test_set_enabled_without_adapters_raises(block, name):
    with pytest.raises(ValueError, match="no adapter"):
        block.set_enabled_adapters(name, enabled=False)


# --- enabling, chaining and strategies ------------------------------------------------------


@pytest.fixture
def two_adapter_block(block, randomize_adapters):
    block.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    block.add_adapter("a2", _cfg(dim=3, activation="gelu"), rngs=nnx.Rngs(2))
    randomize_adapters(block)
    block.eval()
    return block


def test_output_equals_explicit_chain(two_adapter_block):
    block = two_adapter_block
    a1, a2 = block.get_adapter_module("a1"), block.get_adapter_module("a2")
    x = _x()
    y = block.linear(x)
    np.testing.assert_allclose(block(x), _run(a2, _run(a1, y)), rtol=1e-5, atol=1e-6)
    # The adapters are not identity any more.
    assert not np.allclose(block(x), y)


def test_partial_enabling(two_adapter_block):
    block = two_adapter_block
    a1, a2 = block.get_adapter_module("a1"), block.get_adapter_module("a2")
    x = _x()
    y = block.linear(x)

    block.set_enabled_adapters("a1", enabled=False)
    assert block.get_enabled_adapters() == ["a2"]
    np.testing.assert_allclose(block(x), _run(a2, y), rtol=1e-5, atol=1e-6)

    block.set_enabled_adapters("a1", enabled=True)
    block.set_enabled_adapters("a2", enabled=False)
    assert block.get_enabled_adapters() == ["a1"]
    np.testing.assert_allclose(block(x), _run(a1, y), rtol=1e-5, atol=1e-6)

    block.set_enabled_adapters("a2", enabled=True)
    assert block.get_enabled_adapters() == ["a1", "a2"]
    np.testing.assert_allclose(block(x), _run(a2, _run(a1, y)), rtol=1e-5, atol=1e-6)


def test_chain_order_matters(two_adapter_block):
    block = two_adapter_block
    a1, a2 = block.get_adapter_module("a1"), block.get_adapter_module("a2")
    y = block.linear(_x())
    forward, backward = _run(a2, _run(a1, y)), _run(a1, _run(a2, y))
    assert not np.allclose(forward, backward, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(block(_x()), forward, rtol=1e-5, atol=1e-6)


def test_disabling_all_gives_base_output(two_adapter_block):
    block = two_adapter_block
    x = _x()
    block.set_enabled_adapters(enabled=False)
    assert block.get_enabled_adapters() == []
    assert block.is_adapter_available()
    np.testing.assert_array_equal(block(x), block.linear(x))
    block.set_enabled_adapters(enabled=True)
    assert block.get_enabled_adapters() == ["a1", "a2"]
    assert not np.allclose(block(x), block.linear(x))


def test_return_result_strategy_returns_adapter_output(block, randomize_adapters):
    block.add_adapter("r", _cfg(adapter_strategy=ReturnResultStrategy()), rngs=nnx.Rngs(1))
    x = _x()
    y = block.linear(x)
    # At init the adapter's output is zero, and that is what the block returns.
    np.testing.assert_array_equal(block(x), np.zeros(X_SHAPE, np.float32))
    randomize_adapters(block)
    shell = block.get_adapter_module("r")
    np.testing.assert_allclose(block(x), _raw(shell, y), rtol=1e-5, atol=1e-6)


def test_get_adapter_module_and_cfg(block):
    cfg = _cfg(dim=3, activation="relu")
    block.add_adapter("a1", cfg, rngs=nnx.Rngs(1))
    shell = block.get_adapter_module("a1")
    assert isinstance(shell, jadapters.NNXAdapter)
    assert shell is block.adapter_layer["a1"]
    assert shell.cfg == cfg
    assert block.get_adapter_cfg("a1") == cfg
    assert block.get_adapter_insertion("a1") == "output"
    assert block.get_adapter_module("nope") is None
    assert block.get_adapter_cfg("nope") is None


def test_add_adapter_accepts_a_module(block):
    module = jadapters.LinearAdapter(2, activation="relu")
    block.add_adapter("a1", module, rngs=nnx.Rngs(1))
    assert block.get_adapter_cfg("a1") == _cfg(activation="relu")


# --- accepted types and width inference -----------------------------------------------------


def test_unaccepted_type_raises(block):
    block.set_accepted_adapter_types([OtherConfig])
    assert block.get_accepted_adapter_types() == (OtherConfig,)
    with pytest.raises(ValueError, match="not accepted"):
        block.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    assert not block.is_adapter_available()


@pytest.mark.parametrize("accepted", [LinearAdapterConfig, jadapters.LinearAdapter])
def test_accepted_type_is_added(block, accepted):
    block.set_accepted_adapter_types([OtherConfig, accepted])
    block.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    assert block.get_enabled_adapters() == ["a1"]


def test_accepted_types_must_be_classes(block):
    with pytest.raises(ValueError, match="types must contain classes"):
        block.set_accepted_adapter_types(["LinearAdapterConfig"])


def test_in_features_cannot_be_inferred_raises():
    host = Bare()
    with pytest.raises(ValueError, match="in_features"):
        host.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    assert not host.is_adapter_available()


@pytest.mark.parametrize("how", ["argument", "config"])
def test_in_features_given_explicitly(how):
    host = Bare()
    if how == "argument":
        host.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1), in_features=D)
    else:
        host.add_adapter("a1", _cfg(in_features=D), rngs=nnx.Rngs(1))
    kernel = nnx.state(host, AdapterParam)["adapter_layer"]["a1"]["params"]["down"]["kernel"]
    assert kernel.shape == (D, 2)
    x = _x()
    np.testing.assert_array_equal(host(x), x)


@pytest.mark.parametrize("attribute", ["out_features", "features", "adapter_features"])
def test_in_features_inferred_from_width_attribute(attribute):
    host = Bare()
    setattr(host, attribute, 3)
    host.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    kernel = nnx.state(host, AdapterParam)["adapter_layer"]["a1"]["params"]["up"]["kernel"]
    assert kernel.shape == (2, 3)


# --- trainable filter, BatchNorm, train/eval ------------------------------------------------


def test_unfreeze_filter_selects_exactly_the_enabled_adapters(block):
    block.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    block.add_adapter("a2", _cfg(), rngs=nnx.Rngs(2))
    block.add_adapter("a3", _cfg(), rngs=nnx.Rngs(3))
    block.set_enabled_adapters("a2", enabled=False)
    trainable = block.unfreeze_enabled_adapters()
    selected = _flat_paths(nnx.state(block, trainable))
    expected = _adapter_paths(block, ("adapter_layer", "a1")) | _adapter_paths(
        block, ("adapter_layer", "a3")
    )
    assert len(expected) == 8
    assert selected == expected
    assert not selected & _flat_paths(nnx.state(block, nnx.Param))


def test_unfreeze_filter_is_empty_when_all_disabled(block):
    block.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    block.set_enabled_adapters(enabled=False)
    assert _flat_paths(nnx.state(block, block.unfreeze_enabled_adapters())) == set()


def test_unfreeze_freezes_batchnorm():
    host = BNBlock(D, rngs=nnx.Rngs(0))
    host.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    host.train()
    assert host.bn.use_running_average is False
    host.unfreeze_enabled_adapters(freeze_batchnorm=False)
    assert host.bn.use_running_average is False
    host.unfreeze_enabled_adapters()
    assert host.bn.use_running_average is True
    # Frozen statistics: a forward in training mode no longer updates them.
    mean = np.asarray(host.bn.mean[...])
    host(_x() + 3.0)
    np.testing.assert_array_equal(host.bn.mean[...], mean)


def test_freeze_batchnorm_counts_modules():
    host = BNBlock(D, rngs=nnx.Rngs(0))
    host.train()
    assert jadapters.freeze_batchnorm(host) == 1
    assert host.bn.use_running_average is True


def test_train_and_eval_toggle_adapter_mode(block):
    block.add_adapter("a1", _cfg(), rngs=nnx.Rngs(1))
    shell = block.get_adapter_module("a1")
    block.eval()
    assert shell.deterministic is True
    block.train()
    assert shell.deterministic is False
    block.eval()
    assert shell.deterministic is True


# --- stochastic depth and the auxiliary loss ------------------------------------------------


def test_stochastic_depth_one_drops_adapter_in_training_only(block, randomize_adapters):
    cfg = _cfg(adapter_strategy=ResidualAddStrategy(stochastic_depth=1.0))
    block.add_adapter("sd", cfg, rngs=nnx.Rngs(params=1, dropout=2))
    randomize_adapters(block)
    x = _x()
    y = block.linear(x)
    block.train()
    np.testing.assert_array_equal(block(x), y)
    block.eval()
    adapted = block(x)
    np.testing.assert_allclose(adapted, _run(block.get_adapter_module("sd"), y), rtol=1e-5)
    assert not np.allclose(adapted, y)


def test_stochastic_depth_in_training_without_dropout_stream_raises(block):
    cfg = _cfg(adapter_strategy=ResidualAddStrategy(stochastic_depth=0.5))
    block.add_adapter("sd", cfg, rngs=nnx.Rngs(1))
    block.train()
    with pytest.raises(ValueError, match="PRNG key"):
        block(_x())
    block.eval()
    np.testing.assert_array_equal(block(_x()), block.linear(_x()))


def test_l2_auxiliary_loss(block, randomize_adapters):
    lam = 0.3
    cfg = _cfg(adapter_strategy=ResidualAddStrategy(l2_lambda=lam))
    block.add_adapter("l2", cfg, rngs=nnx.Rngs(1))
    x = _x()
    block.train()

    block(x)
    assert float(jadapters.total_auxiliary_loss(nnx.pop(block, AdapterLoss))) == 0.0

    randomize_adapters(block)
    contribution = np.asarray(_raw(block.get_adapter_module("l2"), block.linear(x)), np.float64)
    expected = lam * np.mean(np.sum(contribution**2, axis=(1, 2)))
    assert expected > 0
    block(x)
    losses = nnx.pop(block, AdapterLoss)
    np.testing.assert_allclose(jadapters.total_auxiliary_loss(losses), expected, rtol=1e-5)
    # Popped: nothing is left for the next step.
    assert float(jadapters.total_auxiliary_loss(nnx.pop(block, AdapterLoss))) == 0.0
    # Two calls record the sum.
    block(x)
    block(x)
    np.testing.assert_allclose(
        jadapters.total_auxiliary_loss(nnx.pop(block, AdapterLoss)), 2 * expected, rtol=1e-5
    )
    # nnx.capture collects the same loss and leaves nothing on the module.
    _, captured = nnx.capture(block, AdapterLoss)(x)
    np.testing.assert_allclose(jadapters.total_auxiliary_loss(captured), expected, rtol=1e-5)
    assert float(jadapters.total_auxiliary_loss(nnx.pop(block, AdapterLoss))) == 0.0
    # No loss in eval.
    block.eval()
    block(x)
    assert float(jadapters.total_auxiliary_loss(nnx.pop(block, AdapterLoss))) == 0.0


# --- jit ------------------------------------------------------------------------------------


def test_nnx_jit_matches_eager_and_retraces_on_enable_change(two_adapter_block):
    block = two_adapter_block
    x = _x()
    traces = []

    @nnx.jit
    def forward(model, x):
        traces.append(1)
        return model(x)

    both = forward(block, x)
    np.testing.assert_allclose(both, block(x), rtol=1e-5, atol=1e-6)
    forward(block, x)
    assert len(traces) == 1

    block.set_enabled_adapters("a1", enabled=False)
    only_a2 = forward(block, x)
    assert len(traces) == 2
    np.testing.assert_allclose(only_a2, block(x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(only_a2, both)

    block.set_enabled_adapters(enabled=False)
    np.testing.assert_allclose(forward(block, x), block.linear(x), rtol=1e-6, atol=1e-6)


# --- AdapterModelMixin ----------------------------------------------------------------------


@pytest.fixture
def net():
    return Net(rngs=nnx.Rngs(0))


def test_adapter_groups_match_graph_paths(net):
    paths = {tuple(p) for p, _ in nnx.iter_graph(net)}
    assert ("enc",) in paths and ("dec",) in paths
    assert net.adapter_module_names == ["", "encoder", "decoder"]
    assert net.adapter_group_modules("encoder") == [net.enc]
    assert net.adapter_group_modules("") == [net.enc]
    assert net.adapter_group_modules("decoder") == [net.dec]


def test_model_add_adapter_routes_to_its_module(net):
    assert not net.is_adapter_available()
    net.add_adapter("decoder:x", _cfg(), rngs=nnx.Rngs(1))
    assert net.is_adapter_available()
    assert net.dec.get_enabled_adapters() == ["x"]
    assert not net.enc.is_adapter_available()
    assert net.get_enabled_adapters() == ["x"]
    assert net.get_adapter_cfg("decoder:x") == _cfg()
    assert set(net.get_adapter_modules("x")) == {("dec",)}
    assert _adapter_paths(net, ("enc",)) == set()
    assert len(_adapter_paths(net, ("dec", "adapter_layer", "x"))) == 4

    net.add_adapter("y", _cfg(), rngs=nnx.Rngs(2))  # the default module
    assert net.enc.get_enabled_adapters() == ["y"]
    assert net.dec.get_enabled_adapters() == ["x"]
    assert net.get_enabled_adapters() == ["x", "y"]
    spec = net.get_adapter_specs().get("x")
    assert (spec.group, spec.qualified_name) == ("decoder", "decoder:x")


def test_model_unknown_module_raises(net):
    valid = re.escape("valid modules are ['', 'encoder', 'decoder']")
    with pytest.raises(ValueError, match=f"unknown adapter module 'foo'.*{valid}"):
        net.add_adapter("foo:x", _cfg(), rngs=nnx.Rngs(1))
    assert not net.is_adapter_available()
    assert not jax.tree.leaves(nnx.state(net, AdapterParam))


def test_model_same_name_in_two_modules_raises(net):
    net.add_adapter("decoder:x", _cfg(), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="adapter name 'x' already exists in module 'decoder'"):
        net.add_adapter("encoder:x", _cfg(), rngs=nnx.Rngs(2))
    assert not net.enc.is_adapter_available()
    assert net.get_enabled_adapters() == ["x"]


def test_model_set_enabled_adapters(net, randomize_adapters):
    net.add_adapter("decoder:x", _cfg(), rngs=nnx.Rngs(1))
    net.add_adapter("encoder:e", _cfg(), rngs=nnx.Rngs(2))
    randomize_adapters(net)
    net.eval()
    x = _x()
    base = net.dec.linear(net.enc.linear(x))
    e, d = net.enc.get_adapter_module("e"), net.dec.get_adapter_module("x")
    expected = _run(d, net.dec.linear(_run(e, net.enc.linear(x))))
    np.testing.assert_allclose(net(x), expected, rtol=1e-5, atol=1e-6)

    net.set_enabled_adapters("decoder:x", False)
    assert net.dec.get_enabled_adapters() == []
    assert net.enc.get_enabled_adapters() == ["e"]
    assert net.get_enabled_adapters() == ["e"]
    assert net.is_adapter_available()
    np.testing.assert_allclose(
        net(x), net.dec.linear(_run(e, net.enc.linear(x))), rtol=1e-5, atol=1e-6
    )

    net.set_enabled_adapters(enabled=False)
    assert net.get_enabled_adapters() == []
    np.testing.assert_array_equal(net(x), base)

    net.set_enabled_adapters("x", True)
    assert net.dec.get_enabled_adapters() == ["x"]
    assert net.get_enabled_adapters() == ["x"]

    with pytest.raises(ValueError, match="unknown adapter name"):
        net.set_enabled_adapters("decoder:nope", False)


def test_model_reports_what_its_hosts_run_after_a_host_level_switch(randomize_adapters):
    """An adapter added through the model is enabled while one of its hosts runs it (NeMo's
    union over modules); a host's own ``set_enabled_adapters`` used to leave the model saying
    "enabled" after every host had turned it off."""
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(D, D, rngs=rngs), nnx.Linear(D, D, rngs=rngs))
    model = jadapters.adapter_transform(model, r"layers/\d")
    model.add_adapter("a", _cfg(), rngs=nnx.Rngs(1))
    model.add_adapter("b", _cfg(), rngs=nnx.Rngs(2))
    randomize_adapters(model)
    first, second = model.layers
    x = _x()
    dense = lambda h, layer: h @ layer.kernel[...] + layer.bias[...].reshape(1, 1, -1)  # noqa: E731
    base = dense(dense(x, first), second)

    first.set_enabled_adapters("a", enabled=False)
    assert model.get_enabled_adapters() == ["a", "b"]  # the second host still runs it
    assert model.get_adapter_specs().get("a").enabled
    second.set_enabled_adapters("a", enabled=False)
    assert model.get_enabled_adapters() == ["b"]
    assert not model.get_adapter_specs().get("a").enabled
    trainable = _flat_paths(nnx.state(model, model.unfreeze_enabled_adapters()))
    assert trainable and all("b" in path and "a" not in path for path in trainable)

    model.set_enabled_adapters("a", enabled=True)  # the model's switch reaches every host
    assert first.get_enabled_adapters() == second.get_enabled_adapters() == ["a", "b"]
    first.set_enabled_adapters(enabled=False)
    second.set_enabled_adapters(enabled=False)
    assert model.get_enabled_adapters() == []
    assert model.is_adapter_available()  # added still, only disabled
    np.testing.assert_allclose(model(x), base, rtol=1e-6, atol=1e-6)


def test_model_unfreeze_filter_covers_enabled_adapters_across_modules(net):
    net.add_adapter("encoder:e1", _cfg(), rngs=nnx.Rngs(1))
    net.add_adapter("decoder:d1", _cfg(), rngs=nnx.Rngs(2))
    net.add_adapter("decoder:d2", _cfg(), rngs=nnx.Rngs(3))
    net.set_enabled_adapters("decoder:d2", False)
    selected = _flat_paths(nnx.state(net, net.unfreeze_enabled_adapters()))
    expected = _adapter_paths(net, ("enc", "adapter_layer", "e1")) | _adapter_paths(
        net, ("dec", "adapter_layer", "d1")
    )
    assert len(expected) == 8
    assert selected == expected


def test_remove_adapter_drops_weights_and_name():
    import jax.numpy as jnp
    from flax import nnx

    import jadapters
    from jadapters.demo.models import NNXTransformer

    net = NNXTransformer(8, num_classes=3, d_model=16, num_heads=2, num_layers=1, rngs=nnx.Rngs(0))
    net = jadapters.adapter_transform(net, {"m": r"blocks/\d+/mlp"})
    net.add_adapter("m:a", jadapters.LinearAdapterConfig(dim=2), rngs=nnx.Rngs(1))
    net.add_adapter("m:b", jadapters.LinearAdapterConfig(dim=2), rngs=nnx.Rngs(1))
    net.remove_adapter("m:a")
    assert net.get_enabled_adapters() == ["b"]
    layer = nnx.to_pure_dict(nnx.state(net, jadapters.AdapterParam))["blocks"][0]["mlp"]
    assert list(layer["adapter_layer"]) == ["b"]
    with pytest.raises(ValueError, match="unknown adapter name 'a'"):
        net.remove_adapter("a")
    with pytest.raises(ValueError, match="unknown adapter module 'x'"):
        net.remove_adapter("x:b")
    assert net(jnp.ones((1, 8, 8))).shape == (1, 3)


# --- adapters added on a module inside a model: part of the model's API ---------------------


def test_module_level_adapter_is_part_of_the_model_api(net):
    net.add_adapter("decoder:x", _cfg(), rngs=nnx.Rngs(1))
    net.enc.add_adapter("h", _cfg(), rngs=nnx.Rngs(2))  # on the module, not through the model
    assert net.get_enabled_adapters() == ["x", "h"]
    assert [s.qualified_name for s in net.get_adapter_specs()] == ["decoder:x", "enc:h"]
    assert net.get_adapter_cfg("enc:h") == _cfg()
    net.set_enabled_adapters("enc:h", enabled=False)
    assert net.enc.get_enabled_adapters() == [] and net.get_enabled_adapters() == ["x"]
    net.set_enabled_adapters(enabled=True)
    assert net.enc.get_enabled_adapters() == ["h"] and net.dec.get_enabled_adapters() == ["x"]
    net.remove_adapter("enc:h")
    assert not net.enc.is_adapter_available() and net.get_enabled_adapters() == ["x"]
    net.add_adapter("enc:h2", _cfg(), rngs=nnx.Rngs(3))  # a module's path routes to it alone
    assert net.enc.get_enabled_adapters() == ["h2"] and net.dec.get_enabled_adapters() == ["x"]
    assert net.get_adapter_specs().get("h2").group == "enc"


def test_module_level_adapter_names_are_unique_in_the_model(net):
    net.enc.add_adapter("h", _cfg(), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="adapter name 'h' already exists in module 'enc'"):
        net.add_adapter("decoder:h", _cfg(), rngs=nnx.Rngs(2))
    assert not net.dec.is_adapter_available()
    net.add_adapter("decoder:x", _cfg(), rngs=nnx.Rngs(2))
    net.enc.add_adapter("x", _cfg(), rngs=nnx.Rngs(3))  # the module cannot see its model
    clash = "adapter name 'x' is used twice in the model: by 'decoder:x' and by 'enc:x'"
    with pytest.raises(ValueError, match=re.escape(clash) + ".*remove_adapter"):
        net.get_enabled_adapters()
    net.enc.remove_adapter("x")
    assert net.get_enabled_adapters() == ["x", "h"]  # through the model first, then on modules


def test_module_level_adapter_saves_loads_and_trains(net, randomize_adapters, tmp_path):
    net.add_adapter("decoder:x", _cfg(), rngs=nnx.Rngs(1))
    net.enc.add_adapter("h", _cfg(), rngs=nnx.Rngs(2))
    randomize_adapters(net)
    x = _x()
    jadapters.save_adapters(str(tmp_path), net)
    fresh = Net(rngs=nnx.Rngs(0))
    jadapters.load_adapters(str(tmp_path), fresh)
    assert fresh.enc.get_enabled_adapters() == ["h"] and fresh.get_enabled_adapters() == ["x", "h"]
    assert_trees_equal(nnx.state(fresh, AdapterParam), nnx.state(net, AdapterParam))
    np.testing.assert_array_equal(fresh(x), net(x))

    base = jax.tree.map(np.asarray, nnx.state(fresh, nnx.Param))
    h = jax.tree.map(np.asarray, nnx.state(fresh.enc, AdapterParam))
    optimizer = jadapters.adapter_optimizer(fresh, optax.sgd(0.1))
    jadapters.nnx_train_step(lambda m, b: jnp.mean(m(b) ** 2))(fresh, optimizer, x)
    assert_trees_equal(nnx.state(fresh, nnx.Param), base)
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: not np.array_equal(a, b), h, nnx.state(fresh.enc, AdapterParam))
    )
    assert len(moved) == 4 and all(moved)


class Wide(nnx.Module, jadapters.AdapterModuleMixin):
    """Adapters on an inner stream twice as wide as the module's own width attribute."""

    def __init__(self, dim, *, rngs):
        self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.down = nnx.Linear(2 * dim, dim, rngs=rngs)
        self.out_features = dim

    def __call__(self, x):
        h = self.up(x)
        if self.is_adapter_available():
            h = self.forward_enabled_adapters(h)
        return self.down(h)


class HostNet(nnx.Module, jadapters.AdapterModelMixin):
    def __init__(self, host, *, rngs):
        self.host = host(D, rngs=rngs) if host is Wide else host()
        self._adapter_groups = (("", (("host",),)),)

    def __call__(self, x):
        return self.host(x)


@pytest.mark.parametrize("host", [Wide, Bare])
@pytest.mark.parametrize("how", ["argument", "config", "module"])
def test_in_features_the_host_does_not_show_is_restored_on_load(
    host, how, randomize_adapters, tmp_path
):
    width = 2 * D if host is Wide else D  # Wide shows D, Bare shows nothing
    net = HostNet(host, rngs=nnx.Rngs(0))
    if how == "argument":
        net.add_adapter("a", _cfg(), rngs=nnx.Rngs(1), in_features=width)
    elif how == "config":
        net.add_adapter("a", _cfg(in_features=width), rngs=nnx.Rngs(1))
    else:
        net.host.add_adapter("a", _cfg(), rngs=nnx.Rngs(1), in_features=width)
    randomize_adapters(net)
    jadapters.save_adapters(str(tmp_path), net)
    fresh = HostNet(host, rngs=nnx.Rngs(0))
    jadapters.load_adapters(str(tmp_path), fresh)
    assert_trees_equal(nnx.state(fresh, AdapterParam), nnx.state(net, AdapterParam))
    assert fresh.host.get_adapter_module("a").param_values()["up"]["kernel"].shape == (2, width)
    x = _x()
    np.testing.assert_array_equal(fresh(x), net(x))
