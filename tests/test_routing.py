"""Adapter banks: per-example routing, padding, slots and hot swap, routed training.

Every routed result is checked against the plain library without banks: each example run
alone through an ordinary adapter holding its slot's weights (or through the base alone).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jadapters
from jadapters.demo.models import NNXTransformer
from jadapters.view import AdapterWeights, view_of
from tests._frontends import primitive_counts

TARGETS_LINEN = {"": "layers_0", "out": "layers_2"}
TARGETS_NNX = {"": "layers/0", "out": "layers/2"}
X = jax.random.normal(jax.random.key(7), (5, 3, 6))
IDS = np.array([0, 2, -1, 1, 0], np.int32)

TYPES = {
    "lora": ("", jadapters.LoRAConfig(rank=2, alpha=3.0)),
    "ia3": ("out", jadapters.IA3Config()),
    "bottleneck": ("out", jadapters.LinearAdapterConfig(dim=4)),
}


def bank(cfg, slots=3):
    return jadapters.AdapterBankConfig(adapter=cfg, slots=slots)


def noise(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [
            x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ]
    )


class Linen:
    """A small Linen model; adapters added by name, weights through the view."""

    name = "linen"

    def __init__(self):
        self.base = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8)])
        self.model = jadapters.adapter_transform(self.base, TARGETS_LINEN)
        self.variables = None

    def add(self, name, cfg):
        self.model = self.model.add_adapter(name, cfg)
        self.variables = self.model.init(jax.random.key(0), X)
        return self

    def base_out(self, x):
        return self.base.apply({"params": self.variables["params"]}, x)

    def __call__(self, x, ids=None):
        if ids is None:
            return self.model.apply(self.variables, x)
        return self.model.apply(self.variables, x, adapter_ids=ids)

    def jitted(self):
        fn = jax.jit(lambda v, x, ids: self.model.apply(v, x, adapter_ids=ids))
        return fn, lambda x, ids: fn(self.variables, x, ids)

    def view(self):
        return view_of(self.model, self.variables)

    def insert(self, spec, hosts):
        self.model, self.variables = self.view().insert([AdapterWeights(spec, hosts)])

    def slot_args(self):
        return (self.model, self.variables)

    def update(self, result):
        self.variables = result


class NNX:
    name = "nnx"

    def __init__(self):
        base = nnx.Sequential(
            nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 8, rngs=nnx.Rngs(1))
        )
        self.base = nnx.clone(base)
        self.model = jadapters.adapter_transform(base, TARGETS_NNX)

    def add(self, name, cfg):
        self.model.add_adapter(name, cfg, rngs=nnx.Rngs(3))
        return self

    def base_out(self, x):
        return self.base(x)

    def __call__(self, x, ids=None):
        if ids is None:
            return self.model(x)
        with jadapters.route(ids):
            return self.model(x)

    def jitted(self):
        graphdef, state = nnx.split(self.model)

        @jax.jit
        def fn(state, x, ids):
            with jadapters.route(ids):
                return nnx.merge(graphdef, state)(x)

        return fn, lambda x, ids: fn(nnx.state(self.model), x, ids)

    def view(self):
        return view_of(self.model)

    def insert(self, spec, hosts):
        self.view().insert([AdapterWeights(spec, hosts)])

    def slot_args(self):
        return (self.model,)

    def update(self, result):
        assert result is self.model


FRONTENDS = {"linen": Linen, "nnx": NNX}


@pytest.fixture(params=list(FRONTENDS))
def fe(request):
    return FRONTENDS[request.param]


def randomize_bank(case, name):
    """Noise on every slot of bank ``name``, through put_slot (one slot at a time)."""
    spec = case.view().specs().get(name)
    for slot in range(spec.cfg.slots):
        weights = jadapters.slot_weights(*case.slot_args(), bank=name, slot=slot)
        case.update(
            jadapters.put_slot(
                *case.slot_args(), bank=name, slot=slot, weights=noise(weights, 10 + slot)
            )
        )


def alone(fe, group, cfg, weights, x, adapter_name="solo"):
    """``x`` through an ordinary adapter ``cfg`` holding ``weights`` (``{host: params}``)."""
    ref = fe().add(f"{group}:{adapter_name}" if group else adapter_name, cfg)
    spec = ref.view().specs().get(adapter_name)
    ref.insert(spec, weights)
    return ref(x)


@pytest.mark.parametrize("kind", list(TYPES))
def test_each_example_runs_through_its_own_slot(fe, kind):
    group, cfg = TYPES[kind]
    name = f"{group}:tenants" if group else "tenants"
    case = fe().add(name, bank(cfg))
    randomize_bank(case, "tenants")
    routed = case(X, IDS)
    for slot in np.unique(IDS):
        rows = IDS == slot
        if slot < 0:
            expected = case.base_out(X[rows])
        else:
            weights = jadapters.slot_weights(*case.slot_args(), bank="tenants", slot=int(slot))
            expected = alone(fe, group, cfg, weights, X[rows])
            assert float(jnp.abs(expected - case.base_out(X[rows])).max()) > 1e-2  # it acts
        # the rows of this slot, run without the others and with this adapter only
        np.testing.assert_allclose(routed[rows], expected, atol=1e-6, rtol=1e-6)


def test_a_bank_is_the_identity_at_init(fe):
    case = fe().add("tenants", bank(TYPES["lora"][1])).add("out:b", bank(TYPES["bottleneck"][1]))
    np.testing.assert_allclose(case(X, IDS), case.base_out(X), atol=1e-6, rtol=1e-6)


def test_two_banks_share_the_ids(fe):
    case = fe().add("tenants", bank(TYPES["lora"][1])).add("out:b", bank(TYPES["ia3"][1]))
    randomize_bank(case, "tenants")
    randomize_bank(case, "b")
    routed = case(X, IDS)
    for i, slot in enumerate(IDS):
        x = X[i : i + 1]
        if slot < 0:
            np.testing.assert_allclose(routed[i : i + 1], case.base_out(x), atol=1e-6)
            continue
        ref = fe().add("solo", TYPES["lora"][1]).add("out:b2", TYPES["ia3"][1])
        view = ref.view()
        for bank_name, ref_name in (("tenants", "solo"), ("b", "b2")):
            w = jadapters.slot_weights(*case.slot_args(), bank=bank_name, slot=int(slot))
            ref.insert(view.specs().get(ref_name), w)
            view = ref.view()
        np.testing.assert_allclose(routed[i : i + 1], ref(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("group", "small", "large"),
    [
        ("", jadapters.LoRAConfig(rank=2), jadapters.LoRAConfig(rank=5, alpha=2.0)),
        ("", jadapters.LoRAConfig(rank=3, rslora=True), jadapters.LoRAConfig(rank=4)),
        ("out", jadapters.LinearAdapterConfig(dim=2), jadapters.LinearAdapterConfig(dim=7)),
    ],
)
def test_smaller_adapters_are_padded_exactly(fe, group, small, large):
    """An adapter of a smaller rank or width in a larger slot gives its own output."""
    name = f"{group}:tenants" if group else "tenants"
    case = fe().add(name, bank(large, slots=2))
    solo = fe().add(f"{group}:solo" if group else "solo", small)
    solo_spec = solo.view().specs().get("solo")
    [current] = solo.view().weights([solo_spec])
    weights = noise(dict(current.hosts), 3)
    solo.insert(solo_spec, weights)
    case.update(
        jadapters.put_slot(*case.slot_args(), bank="tenants", slot=1, weights=weights, cfg=small)
    )
    padded = jadapters.slot_weights(*case.slot_args(), bank="tenants", slot=1)
    # the padding is zeros: every array of the slot starts with the adapter's own
    for host, params in padded.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            own = weights[host]
            for key in path:
                own = own[key.key]
            index = tuple(slice(0, n) for n in own.shape)
            rest = np.asarray(leaf).copy()
            rest[index] = 0
            assert not rest.any()
    routed = case(X, np.ones(len(X), np.int32))
    np.testing.assert_allclose(routed, solo(X), atol=1e-6, rtol=1e-6)


def test_the_cost_does_not_grow_with_the_number_of_slots(fe):
    """The traced program is the same for 2 and 64 slots: a gather, not a loop."""
    counts = {}
    for slots in (2, 64):
        case = fe().add("tenants", bank(TYPES["lora"][1], slots=slots))
        fn, _ = case.jitted()
        if fe is Linen:
            counts[slots] = primitive_counts(
                lambda v, x, ids, c=case: c.model.apply(v, x, adapter_ids=ids),
                case.variables,
                X,
                IDS,
            )
        else:
            graphdef, state = nnx.split(case.model)

            def run(state, x, ids, graphdef=graphdef):
                with jadapters.route(ids):
                    return nnx.merge(graphdef, state)(x)

            counts[slots] = primitive_counts(run, state, X, IDS)
    assert counts[2] == counts[64]


def test_hot_swap_does_not_recompile(fe, tmp_path):
    group, cfg = TYPES["lora"]
    case = fe().add("tenants", bank(cfg, slots=2))
    fn, call = case.jitted()
    before = call(X, IDS % 2)
    assert fn._cache_size() == 1
    # a trained adapter, saved from an ordinary model, into slot 1
    trained = fe().add("task", cfg)
    spec = trained.view().specs().get("task")
    [current] = trained.view().weights([spec])
    trained.insert(spec, noise(dict(current.hosts), 5))
    jadapters.save_adapters(str(tmp_path / "task"), *trained.slot_args())
    case.update(
        jadapters.load_slot(str(tmp_path / "task"), *case.slot_args(), bank="tenants", slot=1)
    )
    after = call(X, IDS % 2)
    assert fn._cache_size() == 1
    ones = IDS % 2 == 1
    np.testing.assert_allclose(after[~ones], before[~ones], atol=0)
    np.testing.assert_allclose(after[ones], trained(X)[ones], atol=1e-6, rtol=1e-6)
    # unloading frees the slot: its examples get the base again, still without a compile
    case.update(jadapters.clear_slot(*case.slot_args(), bank="tenants", slot=1))
    cleared = call(X, IDS % 2)
    assert fn._cache_size() == 1
    np.testing.assert_allclose(cleared, case.base_out(X), atol=1e-6, rtol=1e-6)


def _sum_loss(out, y):
    return jnp.sum((out - y) ** 2)


def test_routed_training_equals_separate_steps_linen():
    """One step over a mixed batch moves each slot as a step on its own examples would."""
    cfg = TYPES["lora"][1]
    case = Linen().add("tenants", bank(cfg, slots=3))
    randomize_bank(case, "tenants")
    before = [jadapters.slot_weights(*case.slot_args(), bank="tenants", slot=s) for s in range(3)]
    target = jax.random.normal(jax.random.key(9), (len(X), 3, 8))
    ids = jnp.array([0, 2, 1, 1, 0])

    def loss_fn(apply, batch):
        x, y, ids = batch
        return _sum_loss(apply(x, adapter_ids=ids), y)

    tx = optax.adam(0.05)
    step = jadapters.linen_train_step(case.model, loss_fn, tx, donate=False)
    params = case.variables["adapters"]
    base = {"params": case.variables["params"]}
    new, _, _ = step(params, step.init(params), base, (X, target, ids), jax.random.key(0))
    case.variables = {**case.variables, "adapters": new}
    for slot in range(3):
        rows = np.asarray(ids) == slot
        solo = Linen().add("solo", cfg)
        solo.insert(solo.view().specs().get("solo"), before[slot])
        alone_step = jadapters.linen_train_step(
            solo.model, lambda apply, b: _sum_loss(apply(b[0]), b[1]), tx, donate=False
        )
        p = solo.variables["adapters"]
        got, _, _ = alone_step(
            p, alone_step.init(p), base, (X[rows], target[rows]), jax.random.key(0)
        )
        trained = jadapters.slot_weights(*case.slot_args(), bank="tenants", slot=slot)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
            trained["layers_0"],
            got["layers_0"]["solo"],
        )
        assert not np.allclose(trained["layers_0"]["b"], before[slot]["layers_0"]["b"])


def test_routed_training_equals_separate_steps_nnx():
    cfg = TYPES["bottleneck"][1]
    case = NNX().add("out:tenants", bank(cfg, slots=2))
    randomize_bank(case, "tenants")
    before = [jadapters.slot_weights(*case.slot_args(), bank="tenants", slot=s) for s in range(2)]
    target = jax.random.normal(jax.random.key(9), (len(X), 3, 8))
    ids = jnp.array([1, 0, 0, 1, 1])

    def loss_fn(model, batch):
        x, y, ids = batch
        with jadapters.route(ids):
            return _sum_loss(model(x), y)

    tx = optax.sgd(0.01)
    opt = jadapters.adapter_optimizer(case.model, tx)
    jadapters.nnx_train_step(loss_fn, donate=False)(case.model, opt, (X, target, ids))
    for slot in range(2):
        rows = np.asarray(ids) == slot
        solo = NNX().add("out:solo", cfg)
        solo.insert(solo.view().specs().get("solo"), before[slot])
        alone_opt = jadapters.adapter_optimizer(solo.model, tx)
        jadapters.nnx_train_step(lambda m, b: _sum_loss(m(b[0]), b[1]), donate=False)(
            solo.model, alone_opt, (X[rows], target[rows])
        )
        [got] = solo.view().weights([solo.view().specs().get("solo")])
        trained = jadapters.slot_weights(*case.slot_args(), bank="tenants", slot=slot)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), trained, dict(got.hosts)
        )
        assert not np.allclose(
            trained["layers/2"]["up"]["kernel"], before[slot]["layers/2"]["up"]["kernel"]
        )


def test_a_bank_round_trips_through_a_checkpoint(fe, tmp_path):
    case = fe().add("tenants", bank(TYPES["lora"][1]))
    randomize_bank(case, "tenants")
    jadapters.save_adapters(str(tmp_path / "bank"), *case.slot_args())
    fresh = fe()
    if fe is Linen:
        fresh.variables = fresh.base.init(jax.random.key(0), X)
        fresh.model, fresh.variables = jadapters.load_adapters(
            str(tmp_path / "bank"), fresh.model, fresh.variables
        )
        fresh.variables = {**case.variables, "adapters": fresh.variables["adapters"]}
    else:
        jadapters.load_adapters(str(tmp_path / "bank"), fresh.model)
    assert fresh.view().specs().get("tenants").cfg == bank(TYPES["lora"][1])
    np.testing.assert_array_equal(fresh(X, IDS), case(X, IDS))


# --- errors ---------------------------------------------------------------------------------


def test_a_bank_without_ids_says_how_to_route(fe):
    case = fe().add("tenants", bank(TYPES["lora"][1]))
    with pytest.raises(ValueError, match=r"no ids were given: call the model inside "):
        case(X)
    case_off = fe().add("tenants", bank(TYPES["lora"][1]))
    if fe is Linen:
        case_off.model = case_off.model.set_enabled_adapters("tenants", False)
    else:
        case_off.model.set_enabled_adapters("tenants", False)
    np.testing.assert_allclose(case_off(X), case_off.base_out(X), atol=1e-6)


def test_ids_are_checked(fe):
    case = fe().add("tenants", bank(TYPES["lora"][1]))
    with pytest.raises(ValueError, match=r"adapter_ids has shape \(2,\) but the adapter bank"):
        case(X, np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match=r"1-d integer array"):
        case(X, np.zeros(len(X), np.float32))
    with pytest.raises(ValueError, match=r"-1 \(the base\) or a slot index, got values from -2"):
        case(X, np.array([-2, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"below the bank's 3 slots, got values from 0 to 3"):
        case(X, np.array([0, 3, 0, 0, 0]))
    # traced ids out of range: NaN for that example only
    _, call = case.jitted()
    out = np.asarray(call(X, jnp.array([0, 3, -1, 1, 7])))
    assert np.isnan(out[[1, 4]]).all() and not np.isnan(out[[0, 2, 3]]).any()


def test_bank_configs_are_checked():
    with pytest.raises(ValueError, match=r"adapter must be the config of one adapter .* not a"):
        bank(bank(TYPES["lora"][1]))
    with pytest.raises(ValueError, match=r"slots must be at most 65536, got 65537"):
        bank(TYPES["lora"][1], slots=65537)
    with pytest.raises(ValueError, match=r"unknown adapter type 'Nope'"):
        jadapters.config_from_dict({"type": "AdapterBank", "adapter": {"type": "Nope"}})


def test_slots_refuse_what_does_not_fit(fe):
    case = fe().add("out:tenants", bank(jadapters.LinearAdapterConfig(dim=4), slots=2))
    weights = jadapters.slot_weights(*case.slot_args(), bank="tenants", slot=0)
    with pytest.raises(ValueError, match=r"slot must be an int in \[0, 2\)"):
        jadapters.put_slot(*case.slot_args(), bank="tenants", slot=2, weights=weights)
    with pytest.raises(ValueError, match=r"bank must name an adapter bank of the model"):
        jadapters.put_slot(*case.slot_args(), bank="nope", slot=0, weights=weights)
    relu = jadapters.LinearAdapterConfig(dim=4, activation="relu")
    with pytest.raises(ValueError, match=r"activation='relu' differs from the bank's"):
        jadapters.put_slot(*case.slot_args(), bank="tenants", slot=0, weights=weights, cfg=relu)
    wide = jadapters.LinearAdapterConfig(dim=6)
    big = jax.tree.map(lambda x: x, weights)
    for host in big:
        big[host] = {
            "norm": big[host]["norm"],
            "down": {"kernel": jnp.zeros((8, 6))},
            "up": {"kernel": jnp.zeros((6, 8))},
        }
    with pytest.raises(ValueError, match=r"'bottleneck' axis \(6\) is larger than the slot's"):
        jadapters.put_slot(*case.slot_args(), bank="tenants", slot=0, weights=big, cfg=wide)
    with pytest.raises(ValueError, match=r"a LoRAConfig adapter does not fit a bank of"):
        jadapters.put_slot(
            *case.slot_args(), bank="tenants", slot=0, weights=weights, cfg=TYPES["lora"][1]
        )
    with pytest.raises(ValueError, match=r"weights must map each host of bank"):
        jadapters.put_slot(*case.slot_args(), bank="tenants", slot=0, weights={})


def test_a_bank_does_not_merge(fe):
    case = fe().add("tenants", bank(TYPES["lora"][1]))
    with pytest.raises(ValueError, match=r"is an adapter bank"):
        if fe is Linen:
            jadapters.merge_adapters(case.model, case.variables)
        else:
            jadapters.merge_adapters(case.model)


def test_load_slot_checks_the_module(fe, tmp_path):
    other = fe().add("out:task", TYPES["ia3"][1])
    jadapters.save_adapters(str(tmp_path / "t"), *other.slot_args())
    case = fe().add("tenants", bank(TYPES["ia3"][1]))
    with pytest.raises(ValueError, match=r"belongs to adapter module 'out', but bank"):
        jadapters.load_slot(str(tmp_path / "t"), *case.slot_args(), bank="tenants", slot=0)


def test_an_nnx_bank_on_one_module_takes_its_inner_insertion():
    """A bank added on one module (``"path:name"``) inserts as its inner adapter does."""
    case = NNX()
    case.model.add_adapter("layers/0:tenants", bank(TYPES["lora"][1]), rngs=nnx.Rngs(3))
    assert case.view().specs().get("tenants").insertion == "weight"
    randomize_bank(case, "tenants")
    routed = case(X, IDS)
    np.testing.assert_allclose(routed[IDS < 0], case.base_out(X[IDS < 0]), atol=1e-6)
    assert float(jnp.abs(routed[IDS >= 0] - case.base_out(X[IDS >= 0])).max()) > 1e-2


def test_a_slot_table_names_the_slots_a_batch_routes_through(fe):
    """SlotTable turns request names into ids; a freed slot is reused by the next adapter."""
    group, cfg = TYPES["ia3"]
    case = fe().add(f"{group}:tenants", bank(cfg, slots=2))
    table = jadapters.SlotTable(2)
    scales = {"legal": 2.0, "medical": 3.0, "code": 5.0}
    host = next(iter(jadapters.slot_weights(*case.slot_args(), bank="tenants", slot=0)))

    def load(name):
        weights = {host: {"scale": jnp.full(8, scales[name])}}
        slot = table.assign(name)
        case.update(
            jadapters.put_slot(*case.slot_args(), bank="tenants", slot=slot, weights=weights)
        )

    load("legal")
    load("medical")
    with pytest.raises(ValueError, match=r"all 2 slots are taken \(\['legal', 'medical'\]\)"):
        table.assign("code")
    names = ["medical", None, "legal", "medical", None]
    ids = table.ids(names)
    assert ids.tolist() == [1, -1, 0, 1, -1] and ids.dtype == np.int32
    out, base = case(X, ids), case.base_out(X)
    for i, name in enumerate(names):  # IA3 at the output: the base scaled by the tenant's
        expected = base[i] if name is None else base[i] * scales[name]
        np.testing.assert_allclose(out[i], expected, rtol=1e-6, atol=1e-6)
    assert table.free("legal") == 0
    load("code")  # takes the freed slot
    assert table.names == {"code": 0, "medical": 1}
    np.testing.assert_allclose(case(X, table.ids(["code"] * len(X))), base * 5.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"'legal' is in no slot; loaded: \['code', 'medical'\]"):
        table.ids(["legal"])


def test_nnx_slot_functions_walk_the_graph_once(monkeypatch):
    """Putting an adapter into a slot of an NNX model asks for its hosts and adapters many
    times; the model's graph is walked once per change of its adapters (it was walked 30
    times for two banks, each walk visiting every module and variable). Outside the slot
    functions every walk is fresh: a graph changed by the user in between is seen."""
    model = NNXTransformer(
        8,
        rngs=nnx.Rngs(0),
        num_classes=10,
        d_model=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=32,
        max_len=8,
    )
    jadapters.adapter_transform(model, {"mlp": r"blocks/\d+/mlp", "attn": r"blocks/\d+/attn"})
    for group in ("mlp", "attn"):
        cfg = jadapters.AdapterBankConfig(adapter=jadapters.LinearAdapterConfig(dim=4), slots=2)
        model.add_adapter(f"{group}:bank_{group}", cfg, rngs=nnx.Rngs(1))
    weights = {g: jadapters.slot_weights(model, bank=f"bank_{g}", slot=1) for g in ("mlp", "attn")}
    walked = []
    walk = nnx.iter_graph
    monkeypatch.setattr(nnx, "iter_graph", lambda root: walked.append(root) or walk(root))
    for group, w in weights.items():
        noisy = jax.tree.map(lambda a: a + 1.0, w)
        jadapters.put_slot(model, bank=f"bank_{group}", slot=1, weights=noisy)
    assert len(walked) == 2  # once per call
    for group, w in weights.items():
        got = jadapters.slot_weights(model, bank=f"bank_{group}", slot=1)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b + 1.0), got, w)
    walked.clear()
    model.set_enabled_adapters("bank_mlp", False)
    model.set_enabled_adapters("bank_mlp", True)
    assert len(walked) >= 2  # outside the slot functions, every walk is fresh
