"""Composition blocks (Stack, Parallel, Average, BatchSplit) in both front-ends: each output
against its formula written out in float64, JSON, checkpoints and declaration errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jadapters
from jadapters import LinearAdapterConfig, LoRAConfig
from jadapters.checkpoint.inspect import describe, render
from jadapters.composition import (
    Average,
    BatchSplit,
    Parallel,
    Stack,
    composition_from_dict,
    composition_to_dict,
)
from tests._frontends import FRONTENDS, f64, get_at, np_adapter, np_dense

RANK, ALPHA = 2, 3.0


@pytest.fixture(params=list(FRONTENDS))
def fe(request):
    return FRONTENDS[request.param]


def _x(shape=(4, 4), seed=2):
    return jax.random.normal(jax.random.key(seed), shape)


def _compose(h, group, block):
    if h.base.fe.name == "linen":
        h.model = h.model.set_composition(group, block)
    else:
        h.model.set_composition(group, block)


def _adapted(fe, kind, x):
    """One dense 4 -> 5 host (``layers#0``) with adapters a, b, c of ``kind``."""
    base = fe.base(fe.sequential(fe.dense(4, 5)), x)
    if kind == "linear":
        cfgs = [(n, LinearAdapterConfig(dim=d)) for n, d in (("a", 2), ("b", 3), ("c", 2))]
    else:
        cfgs = [(n, LoRAConfig(rank=RANK, alpha=ALPHA)) for n in "abc"]
    return fe.adapt(base, fe.path("layers#0"), cfgs, x).randomize(seed=5)


def _alone(fe, h, kind, x):
    """``(host output z, {name: y_i})``: each adapter's full output alone, in float64."""
    host = fe.path("layers#0")
    z = np_dense(get_at(h.base_params(), host), x)
    out = {}
    for name in "abc":
        p = f64(h.params_at(host, name))
        if kind == "linear":
            out[name] = z + np_adapter(p, z)
        else:
            out[name] = z + (ALPHA / RANK) * np.asarray(x, np.float64) @ p["a"] @ p["b"]
    return z, out


def _check(got, expected):
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "lora"])
def test_blocks_match_their_formulas(fe, kind):
    x = _x()
    h = _adapted(fe, kind, x)
    z, y = _alone(fe, h, kind, x)
    assert np.abs(y["a"] - z).max() > 1e-3 and np.abs(y["b"] - z).max() > 1e-3

    _compose(h, "", Parallel("a", "b"))
    # c is outside the block: it runs after it, chained (LoRA: its delta adds).
    c_delta = y["c"] - z
    par = z + (y["a"] - z) + (y["b"] - z)
    if kind == "linear":
        p = f64(h.params_at(fe.path("layers#0"), "c"))
        _check(h(x), par + np_adapter(p, par))
    else:
        _check(h(x), par + c_delta)

    h.set_enabled("c", False)
    _compose(h, "", Parallel("a", "b", "c"))
    _check(h(x), z + (y["a"] - z) + (y["b"] - z))  # a disabled member adds nothing
    h.set_enabled("c", True)
    _check(h(x), z + sum(y[n] - z for n in "abc"))
    _check(h.jit(x), z + sum(y[n] - z for n in "abc"))

    _compose(h, "", Average("a", "b", "c", weights=(1.0, 3.0, 0.0)))
    _check(h(x), 0.25 * y["a"] + 0.75 * y["b"])  # w_i / sum(w) times the full outputs
    _compose(h, "", Average("a", "b"))
    mean = (y["a"] + y["b"]) / 2
    if kind == "linear":
        p = f64(h.params_at(fe.path("layers#0"), "c"))
        _check(h(x), mean + np_adapter(p, mean))  # c chained after the block
    else:
        _check(h(x), mean + c_delta)

    _compose(h, "", BatchSplit("a", "b", "c", sizes=(1, 2, 1)))
    _check(h(x), np.concatenate([y["a"][:1], y["b"][1:3], y["c"][3:]]))
    with pytest.raises(ValueError, match=r"sizes=\(1, 2, 1\) sum to 4, but the batch .* is 3"):
        h(x[:3])

    _compose(h, "", Stack("b", "a"))
    if kind == "linear":
        pa = f64(h.params_at(fe.path("layers#0"), "a"))
        pc = f64(h.params_at(fe.path("layers#0"), "c"))
        ab = y["b"] + np_adapter(pa, y["b"])
        _check(h(x), ab + np_adapter(pc, ab))
    _compose(h, "", None)
    assert h.specs().compositions() == {}


def test_declaration_errors(fe):
    x = _x()
    h = _adapted(fe, "linear", x)
    with pytest.raises(ValueError, match=r"unknown adapter name 'z' in Parallel"):
        _compose(h, "", Parallel("a", "z"))
    with pytest.raises(ValueError, match=r"names adapters \['a'\] more than once"):
        Parallel("a", "a")
    for weights, what in [((1, float("nan")), "nan"), ((1, -1), "-1"), ((0, 0), "sum to more")]:
        with pytest.raises(ValueError, match=rf"Average weights.*{what}"):
            Average("a", "b", weights=weights)
    with pytest.raises(ValueError, match=r"one weight per adapter: weights=\(1,\)"):
        Average("a", "b", weights=(1,))
    with pytest.raises(ValueError, match=r"sizes must be positive ints, got sizes=\(2, 0\)"):
        BatchSplit("a", "b", sizes=(2, 0))
    with pytest.raises(ValueError, match=r"BatchSplit needs sizes="):
        BatchSplit("a", "b")
    with pytest.raises(ValueError, match=r"block must be one of"):
        _compose(h, "", ("a", "b"))


def test_other_group_and_stages():
    fe = FRONTENDS["linen"]
    x = _x()
    base = fe.base(fe.sequential(fe.dense(4, 5), fe.dense(5, 5)), x)
    model = jadapters.adapter_transform(base.module, {"": ["layers_0"], "g": ["layers_1"]})
    model = model.add_adapter("a", LinearAdapterConfig(dim=2)).add_adapter("b", LoRAConfig(rank=2))
    model = model.add_adapter("g:c", LinearAdapterConfig(dim=2))
    with pytest.raises(ValueError, match=r"'c' in Parallel.*belongs to group 'g', not to group"):
        model.set_composition("", Parallel("a", "c"))
    with pytest.raises(ValueError, match=r"must run in one stage.*'b': 'weight'"):
        model.set_composition("", Parallel("a", "b"))


def test_json_round_trip():
    for block in [
        Stack("a", "b"),
        Parallel("a", "b"),
        Average("a", "b", weights=(1, 2)),
        Average("a", "b"),
        BatchSplit("a", "b", sizes=(3, 1)),
    ]:
        data = json.loads(json.dumps(composition_to_dict(block)))
        assert composition_from_dict(data) == block
    with pytest.raises(ValueError, match=r"unknown fields \['x'\]"):
        composition_from_dict({"type": "Parallel", "adapters": ["a"], "x": 1})
    with pytest.raises(ValueError, match=r"Average weights"):
        composition_from_dict({"type": "Average", "adapters": ["a"], "weights": [-1]})


def test_checkpoint_keeps_the_composition(fe, tmp_path):
    x = _x()
    h = _adapted(fe, "linear", x)
    block = Average("a", "b", weights=(1.0, 3.0))
    _compose(h, "", block)
    expected = h(x)
    if fe.name == "linen":
        jadapters.save_adapters(tmp_path, h.model, h.variables)
        fresh = fe.adapt(h.base, fe.path("layers#0"), [], x)
        model, variables = jadapters.load_adapters(tmp_path, fresh.model, fresh.variables)
        assert model.adapters.compositions() == {"": block}
        _check(model.apply(variables, x), np.asarray(expected, np.float64))
    else:
        jadapters.save_adapters(tmp_path, h.model)
        fresh = fe.adapt(h.base, fe.path("layers#0"), [], x)
        fresh.model = jadapters.load_adapters(tmp_path, fresh.model)
        assert fresh.model.get_adapter_specs().compositions() == {"": block}
        _check(fresh(x), np.asarray(expected, np.float64))
    data = describe(str(tmp_path))
    assert data["compositions"] == [{"group": "", "block": composition_to_dict(block)}]
    assert "composition of group '': Average" in render(data)
