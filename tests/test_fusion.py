"""The Fuse block (AdapterFusion) in both front-ends: its output against the formula written
out in float64, its initialisation, training the fusion alone, checkpoints, merge and errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jadapters
from jadapters import (
    AdapterFusionConfig,
    Fuse,
    IA3Config,
    LinearAdapterConfig,
    LoRAConfig,
    ParallelAdapterConfig,
)
from jadapters.checkpoint.inspect import describe, render
from jadapters.composition import composition_from_dict, composition_to_dict
from tests._frontends import (
    FRONTENDS,
    LinenAdapted,
    f64,
    get_at,
    host_copy,
    noise_like,
    np_adapter,
    np_dense,
)

HOST = "layers#0"


@pytest.fixture(params=list(FRONTENDS))
def fe(request):
    return FRONTENDS[request.param]


def _x(shape=(4, 4), seed=2):
    return jax.random.normal(jax.random.key(seed), shape)


def _fused(fe, x, adapters, block, *, seed=0):
    """One dense 4 -> 5 host with ``adapters`` (``(name, cfg)`` or ``(name, cfg, insertion)``)
    and ``block`` declared before Linen's ``init`` (a fusion adapter runs only in its block)."""
    base = fe.base(fe.sequential(fe.dense(4, 5)), x)
    if fe.name == "nnx":
        h = fe.adapt(base, fe.path(HOST), adapters, x)
        h.model.set_composition("", block)
        return h
    model = jadapters.adapter_transform(base.module, fe.path(HOST))
    for name, cfg, *insertion in adapters:
        model = model.add_adapter(name, cfg, insertion=insertion[0] if insertion else None)
    model = model.set_composition("", block)
    return LinenAdapted(base, model, model.init(jax.random.key(seed), x), ((x,), {}))


def _compose(h, block):
    if h.base.fe.name == "linen":
        h.model = h.model.set_composition("", block)
    else:
        h.model.set_composition("", block)


def _randomize(h, names, seed=5):
    """Noise in the weights of ``names`` only (the others keep their init)."""
    host = h.base.fe.path(HOST)
    for i, name in enumerate(names):
        h.set_params_at(host, name, noise_like(h.params_at(host, name), seed=seed + i))


def np_fuse(p, s, deltas, temperature=1.0):
    """AdapterFusion written out in float64: the stream ``s`` plus the attention-weighted
    value projections of the members' deltas, queried by the stream."""
    p, s = f64(p), np.asarray(s, np.float64)
    q = s @ p["query"]["kernel"] + p["query"]["bias"]
    scores = np.stack([(q * (d @ p["key"]["kernel"] + p["key"]["bias"])).sum(-1) for d in deltas])
    scores = scores / temperature
    a = np.exp(scores - scores.max(0))
    a = a / a.sum(0)
    fused = sum(a[n][..., None] * (d @ p["value"]["kernel"]) for n, d in enumerate(deltas))
    return s + fused, a


def _check(got, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=tol, atol=tol)


LINEAR = [(n, LinearAdapterConfig(dim=d)) for n, d in (("a", 2), ("b", 3), ("c", 2))]


def test_fuse_matches_its_formula(fe):
    x = _x()
    block = Fuse("a", "b", "c", fusion="f")
    h = _fused(fe, x, [*LINEAR, ("f", AdapterFusionConfig(temperature=0.7))], block)
    _randomize(h, "abcf")
    host = fe.path(HOST)
    z = np_dense(get_at(h.base_params(), host), x)
    d = {n: np_adapter(h.params_at(host, n), z) for n in "abc"}  # residual adapters: y - z
    pf = h.params_at(host, "f")

    expected, a = np_fuse(pf, z, [d["a"], d["b"], d["c"]], temperature=0.7)
    assert np.ptp(a, axis=0).max() > 0.05  # the attention is far from uniform here
    _check(h(x), expected)
    _check(h.jit(x), expected)

    h.set_enabled("b", False)  # attends over the enabled members only
    _check(h(x), np_fuse(pf, z, [d["a"], d["c"]], temperature=0.7)[0])
    h.set_enabled("c", False)  # one member: its value projection, weight 1
    _check(h(x), z + d["a"] @ f64(pf)["value"]["kernel"])
    h.set_enabled("a", False)  # none: the stream as it is
    _check(h(x), z)

    h.set_enabled(None, True)
    h.set_enabled("f", False)  # a disabled fusion turns the block off: the members chain
    pa, pb, pc = (h.params_at(host, n) for n in "abc")
    ya = z + np_adapter(pa, z)
    yb = ya + np_adapter(pb, ya)
    _check(h(x), yb + np_adapter(pc, yb))


def test_fuse_of_a_parallel_and_an_output_adapter(fe):
    """Members of the output stage of two kinds: a parallel adapter's delta is its output on
    the host's input."""
    x = _x()
    adapters = [
        ("a", LinearAdapterConfig(dim=2)),
        ("p", ParallelAdapterConfig(dim=3, scale=0.5)),
        ("f", AdapterFusionConfig()),
    ]
    h = _fused(fe, x, adapters, Fuse("p", "a", fusion="f"))
    _randomize(h, "apf")
    host = fe.path(HOST)
    z = np_dense(get_at(h.base_params(), host), x)
    pp = f64(h.params_at(host, "p"))
    hidden = np.maximum(np.asarray(x, np.float64) @ pp["down"]["kernel"] + pp["down"]["bias"], 0)
    d_p = 0.5 * (hidden @ pp["up"]["kernel"] + pp["up"]["bias"])
    d_a = np_adapter(h.params_at(host, "a"), z)
    _check(h(x), np_fuse(h.params_at(host, "f"), z, [d_p, d_a])[0])


def test_fuse_at_init_is_the_mean_of_the_members(fe):
    x = _x()
    h = _fused(fe, x, [*LINEAR[:2], ("f", AdapterFusionConfig())], Fuse("a", "b", fusion="f"))
    _randomize(h, "ab")  # trained members; the fusion as initialised
    host = fe.path(HOST)
    pf = f64(h.params_at(host, "f"))
    d = 5
    assert not pf["query"]["kernel"].any() and not pf["query"]["bias"].any()
    assert not pf["key"]["bias"].any() and 0 < pf["key"]["kernel"].std() < 0.1
    value = np.where(np.eye(d), 1.0, 1e-6).astype(np.float32)  # the paper's, in float32
    np.testing.assert_array_equal(pf["value"]["kernel"], value)

    z = np_dense(get_at(h.base_params(), host), x)
    y = {n: z + np_adapter(h.params_at(host, n), z) for n in "ab"}
    expected, a = np_fuse(pf, z, [y["a"] - z, y["b"] - z])
    np.testing.assert_array_equal(a, 0.5)  # uniform attention: the query starts at zero
    _check(h(x), expected)
    _check(h(x), (y["a"] + y["b"]) / 2, tol=1e-4)  # the mean, up to Wv's 1e-6 terms


def _train_fusion_only(fe, h, x, target, steps=3):
    loss = lambda out, batch: jnp.mean((out - batch[1]) ** 2)  # noqa: E731
    batches = [(x, target)] * steps
    if fe.name == "linen":
        step = jadapters.linen_train_step(
            h.model, lambda apply, b: loss(apply(b[0]), b), optax.adam(0.05), trainable=["f"]
        )
        base, adapters = jadapters.split_variables(h.variables)
        adapters = jax.tree.map(jnp.array, adapters)
        opt_state = step.init(adapters)
        n_f = len(jax.tree.leaves(adapters["layers_0"]["f"]))
        assert len(jax.tree.leaves(opt_state)) == 1 + 2 * n_f  # state for the fusion only
        losses = []
        for i, batch in enumerate(batches):
            adapters, opt_state, m = step(adapters, opt_state, base, batch, jax.random.key(i))
            losses.append(float(m["loss"]))
        h.set_adapters(adapters)
        return losses
    optimizer = jadapters.adapter_optimizer(h.model, optax.adam(0.05), trainable="f")
    n_f = len(jax.tree.leaves(h.params_at(fe.path(HOST), "f")))
    assert len(jax.tree.leaves(nnx.state(optimizer.opt_state))) == 1 + 2 * n_f
    step = jadapters.nnx_train_step(lambda m, b: loss(m(b[0]), b), trainable="f")
    h.model.train()
    try:
        return [float(step(h.model, optimizer, b)["loss"]) for b in batches]
    finally:
        h.model.eval()


def test_training_moves_only_the_fusion(fe):
    x = _x()
    h = _fused(fe, x, [*LINEAR[:2], ("f", AdapterFusionConfig())], Fuse("a", "b", fusion="f"))
    _randomize(h, "ab")
    host = fe.path(HOST)
    before = {n: host_copy(h.params_at(host, n)) for n in "abf"}
    base = host_copy(h.base_params())
    losses = _train_fusion_only(fe, h, x, jnp.zeros((4, 5)))
    assert losses[-1] < losses[0]
    for n in "ab":  # the members and the base: bitwise unchanged
        jax.tree.map(np.testing.assert_array_equal, host_copy(h.params_at(host, n)), before[n])
    jax.tree.map(np.testing.assert_array_equal, host_copy(h.base_params()), base)
    after = host_copy(h.params_at(host, "f"))
    for part in ("query", "key", "value"):
        assert not np.array_equal(after[part]["kernel"], before["f"][part]["kernel"])


def test_trainable_errors(fe):
    x = _x()
    h = _fused(fe, x, [*LINEAR[:2], ("f", AdapterFusionConfig())], Fuse("a", "b", fusion="f"))
    h.set_enabled("b", False)
    tx = optax.sgd(0.1)
    if fe.name == "linen":
        build = lambda t: jadapters.linen_train_step(h.model, lambda a, b: 0.0, tx, trainable=t)  # noqa: E731
    else:
        build = lambda t: jadapters.adapter_optimizer(h.model, tx, trainable=t)  # noqa: E731
    with pytest.raises(ValueError, match=r"trainable names unknown adapter 'z' in trainable=\['z'"):
        build(["z"])
    with pytest.raises(ValueError, match=r"trainable names adapter 'b', which is disabled"):
        build(["f", "b"])
    with pytest.raises(ValueError, match=r"trainable must be None .* got trainable=\[\]"):
        build([])
    if fe.name == "nnx":  # the optimizer and the step must train the same adapters
        optimizer = jadapters.adapter_optimizer(h.model, tx)
        step = jadapters.nnx_train_step(lambda m, b: jnp.mean(m(b) ** 2), trainable=["f"])
        with pytest.raises(
            ValueError,
            match=r"built for adapters \['a', 'f'\], but the adapters this step trains \(its "
            r"trainable=\) are now \['f'\].*adapter_optimizer\(model, tx, trainable=\['f'\]\)",
        ):
            step(h.model, optimizer, x)


def test_checkpoint_keeps_the_block_and_the_fusion_weights(fe, tmp_path):
    x = _x()
    block = Fuse("a", "b", fusion="f")
    h = _fused(fe, x, [*LINEAR[:2], ("f", AdapterFusionConfig(temperature=2.0))], block)
    _randomize(h, "abf")
    expected = np.asarray(h(x), np.float64)
    fresh = fe.adapt(h.base, fe.path(HOST), [], x)
    if fe.name == "linen":
        jadapters.save_adapters(tmp_path, h.model, h.variables)
        model, variables = jadapters.load_adapters(tmp_path, fresh.model, fresh.variables)
        assert model.adapters.compositions() == {"": block}
        assert model.adapters.get("f").cfg == AdapterFusionConfig(temperature=2.0)
        _check(model.apply(variables, x), expected)
    else:
        jadapters.save_adapters(tmp_path, h.model)
        fresh.model = jadapters.load_adapters(tmp_path, fresh.model)
        assert fresh.model.get_adapter_specs().compositions() == {"": block}
        _check(fresh(x), expected)
    data = describe(str(tmp_path))
    assert data["compositions"] == [
        {"group": "", "block": {"type": "Fuse", "adapters": ["a", "b"], "fusion": "f"}}
    ]
    text = render(data)
    assert 'composition of group \'\': Fuse {"adapters": ["a", "b"], "fusion": "f"}' in text
    assert any(a["name"] == "f" and a["type"] == "AdapterFusion" for a in data["adapters"])


def test_the_fusion_weights_are_adapter_weights(fe):
    """Listed, counted and labelled trainable like any adapter's."""
    x = _x()
    h = _fused(fe, x, [*LINEAR[:2], ("f", AdapterFusionConfig())], Fuse("a", "b", fusion="f"))
    d, host = 5, fe.path(HOST)
    assert (host, "f") in h.sites()
    f_params = sum(v.size for v in jax.tree.leaves(h.params_at(host, "f")))
    assert f_params == 3 * d * d + 2 * d  # query and key with biases, value without
    assert h.summary().adapter_params == sum(v.size for v in jax.tree.leaves(h.adapters()))
    labels = [lab for path, lab in _flat_labels(h).items() if "/f/" in path]
    assert labels and set(labels) == {"adapters"}


def _flat_labels(h):
    from tests._frontends import flat

    return flat(h.labels())


def test_merge_refuses_a_fused_model(fe):
    x = _x()
    ia3 = [("a", IA3Config()), ("b", IA3Config()), ("f", AdapterFusionConfig())]
    h = _fused(fe, x, ia3, Fuse("a", "b", fusion="f"))
    _randomize(h, "ab")
    with pytest.raises(ValueError, match=r"adapter 'a' runs in Fuse\(.*fusion adapter 'f' is"):
        h.merge()
    with pytest.raises(ValueError, match=r"fused model cannot be merged.*disable 'f'"):
        h.merge(names=["b"])
    h.set_enabled("f", False)  # the block is off: the IA3s chain, and fold
    merged = h.merge()
    _check(h.base.run_with(merged, x), np.asarray(h(x), np.float64))


def test_declaration_errors(fe):
    x = _x()
    adapters = [*LINEAR, ("f", AdapterFusionConfig()), ("l", LoRAConfig(rank=2))]
    h = _fused(fe, x, adapters, Fuse("a", "b", fusion="f"))
    for block, message in [
        (Fuse("a", "z", fusion="f"), r"unknown adapter name 'z' in Fuse\(adapters=\('a', 'z'\)"),
        (Fuse("a", "b", fusion="g"), r"unknown adapter name 'g' in Fuse\(.*fusion='g'\)"),
        (Fuse("a", "b", fusion="c"), r"fusion='c' in Fuse.* must name an adapter added with "),
        (Fuse("a", "l", fusion="f"), r"adapter 'l' .* has insertion 'weight' \(LoRAConfig\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            _compose(h, block)
    with pytest.raises(ValueError, match=r"fusion='f' is also among the fused adapters"):
        Fuse("a", "f", fusion="f")
    with pytest.raises(ValueError, match=r"Fuse needs fusion=.*got fusion=None"):
        Fuse("a", "b")
    with pytest.raises(ValueError, match=r"Fuse fuses two or more adapters, got adapters=\('a',\)"):
        Fuse("a", fusion="f")
    with pytest.raises(ValueError, match=r"temperature must be > 0, got -1"):
        AdapterFusionConfig(temperature=-1)
    _compose(h, None)  # a fusion adapter outside its block has nothing to attend over
    with pytest.raises(ValueError, match=r"runs only inside a Fuse block"):
        h(x)
    h.set_enabled("f", False)
    h(x)


def test_fusion_adapters_cannot_be_fused_or_split_across_stages():
    fe = FRONTENDS["linen"]
    x = _x()
    base = fe.base(fe.sequential(fe.dense(4, 5)), x)
    model = jadapters.adapter_transform(base.module, "layers_0")
    for name, cfg, insertion in [
        ("a", LinearAdapterConfig(dim=2), "output"),
        ("b", LinearAdapterConfig(dim=2), "output"),
        ("f", AdapterFusionConfig(), "output"),
        ("g", AdapterFusionConfig(), "output"),
        ("i", AdapterFusionConfig(), "input"),
    ]:
        model = model.add_adapter(name, cfg, insertion=insertion)
    with pytest.raises(ValueError, match=r"adapter 'g' in Fuse.* is a fusion adapter"):
        model.set_composition("", Fuse("a", "g", fusion="f"))
    with pytest.raises(ValueError, match=r"must run in one stage.*'i': 'input'"):
        model.set_composition("", Fuse("a", "b", fusion="i"))


def test_json_round_trip():
    block = Fuse("a", "b", fusion="f")
    data = composition_to_dict(block)
    assert data == {"type": "Fuse", "adapters": ["a", "b"], "fusion": "f"}
    assert composition_from_dict(json.loads(json.dumps(data))) == block
    with pytest.raises(ValueError, match=r"Fuse needs fusion="):
        composition_from_dict({"type": "Fuse", "adapters": ["a", "b"]})
    with pytest.raises(ValueError, match=r"unknown fields \['weights'\] for Fuse"):
        composition_from_dict({"type": "Fuse", "adapters": ["a"], "fusion": "f", "weights": [1]})
