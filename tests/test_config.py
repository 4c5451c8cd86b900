"""Config registry: configs match modules, JSON round-trips, nothing is imported from data."""

import dataclasses
import functools
import json
import sys
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jadapters
from jadapters import (
    IA3Config,
    LinearAdapter,
    LinearAdapterConfig,
    LoRAConfig,
    ParallelAdapterConfig,
    ResidualAddStrategy,
    ReturnResultStrategy,
    ScaledAddStrategy,
)
from jadapters.config import registered_adapter_types

ACTIVATIONS = ["identity", "hardtanh", "relu", "selu", "swish", "silu", "gelu"]


def _module_fields(module_cls):
    return [f for f in dataclasses.fields(module_cls) if f.name not in ("parent", "name", "_")]


# --- configs mirror modules -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(registered_adapter_types()))
def test_config_fields_equal_module_fields(name):
    config_cls, module_cls = registered_adapter_types()[name]
    config_fields = dataclasses.fields(config_cls)
    module_fields = _module_fields(module_cls)
    assert [f.name for f in config_fields] == [f.name for f in module_fields]
    for c, m in zip(config_fields, module_fields, strict=True):
        assert c.default == m.default, f"default of {c.name} differs"
        assert c.default_factory == m.default_factory, f"default_factory of {c.name} differs"
    assert config_cls.__dataclass_params__.frozen


def test_linear_adapter_is_registered():
    assert registered_adapter_types()["LinearAdapter"] == (LinearAdapterConfig, LinearAdapter)


@pytest.mark.parametrize("name", sorted(registered_adapter_types()))
def test_every_field_is_checked_by_one_table(name):
    config_cls, module_cls = registered_adapter_types()[name]
    assert config_cls.field_checks is module_cls.field_checks
    assert list(config_cls.field_checks) == [f.name for f in dataclasses.fields(config_cls)]


# --- JSON round-trip ------------------------------------------------------------------------

finite = dict(allow_nan=False, allow_infinity=False)
MAX_INT = 2**63 - 1
any_number = st.floats(**finite) | st.integers(-(2**70), 2**70)  # ints become floats
widths = st.integers(1, MAX_INT)
rates = st.floats(0.0, 1.0, exclude_max=True) | st.just(0)
strategies_st = st.one_of(
    st.builds(
        ResidualAddStrategy,
        stochastic_depth=st.floats(0.0, 1.0) | st.sampled_from([0, 1]),
        l2_lambda=st.floats(0.0, **finite) | st.integers(0, 2**70),
        per_example=st.booleans(),
    ),
    st.just(ReturnResultStrategy()),
    st.builds(ScaledAddStrategy, scale=any_number),
)
linear_configs_st = st.builds(
    LinearAdapterConfig,
    dim=widths,
    in_features=st.none() | widths,
    activation=st.sampled_from(ACTIVATIONS),
    norm_position=st.sampled_from(["pre", "post"]),
    norm_epsilon=st.floats(0.0, exclude_min=True, **finite),
    dropout=rates,
    adapter_strategy=strategies_st,
)
configs_st = st.one_of(
    linear_configs_st,
    st.builds(
        LoRAConfig,
        rank=widths,
        alpha=st.none() | any_number,
        rslora=st.booleans(),
        dropout=rates,
        a_init=st.sampled_from(["he_uniform", "gaussian"]),
        param_dtype=st.sampled_from(["float32", "bfloat16", "float16", "float64"]),
        adapter_strategy=strategies_st,
    ),
    st.builds(
        IA3Config,
        in_features=st.none() | widths,
        param_dtype=st.sampled_from(["float32", "bfloat16"]),
        adapter_strategy=strategies_st,
    ),
    st.builds(
        ParallelAdapterConfig,
        dim=widths,
        activation=st.sampled_from(ACTIVATIONS),
        scale=any_number,
        learn_scale=st.booleans(),
        dropout=rates,
        adapter_strategy=strategies_st,
    ),
)


# An adapter bank nests one of the configs above.
configs_st = configs_st | st.builds(
    jadapters.AdapterBankConfig, adapter=configs_st, slots=st.integers(1, 64)
)


def _strategy_of(cfg):
    return getattr(cfg, "adapter_strategy", None) or cfg.adapter.adapter_strategy


def _assert_valid_and_round_trips(cfg):
    """``cfg`` is a valid config (its constructor accepts its fields again) that round-trips
    exactly through dicts and strict JSON, field types included."""
    assert dataclasses.replace(cfg) == cfg  # the checks run again and accept every field
    data = jadapters.config_to_dict(cfg)
    text = json.dumps(data, sort_keys=True, allow_nan=False)  # finite numbers only
    assert text == jadapters.config_to_json(cfg)
    back = jadapters.config_from_json(text)
    assert back == cfg and type(back) is type(cfg)
    assert type(_strategy_of(back)) is type(_strategy_of(cfg))
    assert jadapters.config_from_dict(data) == cfg
    assert json.dumps(jadapters.config_to_dict(back), sort_keys=True) == text  # same types
    # A module serializes like its config.
    assert jadapters.config_to_json(jadapters.build_adapter(cfg)) == text


@settings(max_examples=200, deadline=None)
@given(cfg=configs_st)
def test_every_valid_config_round_trips_exactly(cfg):
    _assert_valid_and_round_trips(cfg)
    data = json.loads(jadapters.config_to_json(cfg))
    data = data.get("adapter", data)
    assert data["adapter_strategy"]["type"] == type(_strategy_of(cfg)).__name__


@pytest.mark.parametrize(
    "strategy",
    [
        ResidualAddStrategy(),
        ResidualAddStrategy(stochastic_depth=0.3, l2_lambda=0.01, per_example=True),
        ReturnResultStrategy(),
        ScaledAddStrategy(scale=0.25),
    ],
)
def test_json_round_trip_every_strategy_type(strategy):
    cfg = LinearAdapterConfig(dim=8, in_features=16, activation="gelu", adapter_strategy=strategy)
    data = jadapters.config_to_dict(cfg)
    expected_strategy = {"type": type(strategy).__name__, **dataclasses.asdict(strategy)}
    assert data == {
        "type": "LinearAdapter",
        "dim": 8,
        "in_features": 16,
        "activation": "gelu",
        "norm_position": "pre",
        "norm_epsilon": 1e-5,
        "dropout": 0.0,
        "adapter_strategy": expected_strategy,
    }
    back = jadapters.config_from_json(json.dumps(data))
    assert back == cfg
    assert type(back.adapter_strategy) is type(strategy)


# --- config_of / build_adapter --------------------------------------------------------------


def test_config_of_module_equals_config():
    kwargs = dict(
        activation="relu",
        norm_position="post",
        dropout=0.1,
        adapter_strategy=ScaledAddStrategy(scale=2.0),
    )
    cfg = LinearAdapterConfig(dim=3, **kwargs)
    assert jadapters.config_of(jadapters.build_adapter(cfg)) == cfg
    assert jadapters.config_of(LinearAdapter(3, **kwargs)) == cfg
    assert jadapters.config_of(cfg) is cfg
    assert jadapters.config_of(LinearAdapter(4, **kwargs)) != cfg


def test_build_adapter_builds_the_module():
    cfg = LinearAdapterConfig(dim=5, in_features=7, activation="selu", norm_position="post")
    module = jadapters.build_adapter(cfg)
    assert type(module) is LinearAdapter
    for field in dataclasses.fields(cfg):
        assert getattr(module, field.name) == getattr(cfg, field.name)
    assert type(cfg.build()) is LinearAdapter
    assert cfg.build().dim == 5


def test_unregistered_config_raises():
    @dataclasses.dataclass(frozen=True)
    class NotRegistered:
        dim: int = 1

    with pytest.raises(ValueError, match="registered adapter config"):
        jadapters.build_adapter(NotRegistered())
    with pytest.raises(ValueError, match="registered adapter config or module"):
        jadapters.config_of(NotRegistered())
    with pytest.raises(ValueError, match="registered adapter config or module"):
        jadapters.config_to_dict(object())


# --- reading untrusted data -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["os.system", "json_bomb.X", "this.d", "builtins.eval"])
def test_unknown_type_raises_and_imports_nothing(kind):
    module_name = kind.split(".")[0]
    was_loaded = module_name in sys.modules
    before = set(sys.modules)
    with pytest.raises(ValueError, match=f"unknown adapter type '{kind}'"):
        jadapters.config_from_dict({"type": kind, "dim": 4})
    with pytest.raises(ValueError, match="unknown adapter type"):
        jadapters.config_from_json(json.dumps({"type": kind}))
    assert set(sys.modules) == before
    assert (module_name in sys.modules) == was_loaded


@pytest.mark.parametrize("kind", ["os.system", "json_bomb.X"])
def test_unknown_strategy_type_raises_and_imports_nothing(kind):
    before = set(sys.modules)
    data = {"type": "LinearAdapter", "dim": 4, "adapter_strategy": {"type": kind}}
    with pytest.raises(ValueError, match=f"unknown strategy type '{kind}'"):
        jadapters.config_from_dict(data)
    assert set(sys.modules) == before


@pytest.mark.parametrize("data", [{"dim": 4}, [], "LinearAdapter", None])
def test_config_without_type_raises(data):
    with pytest.raises(ValueError, match="must be an object with a 'type'"):
        jadapters.config_from_dict(data)


def test_strategy_without_type_raises():
    data = {"type": "LinearAdapter", "dim": 4, "adapter_strategy": {"scale": 1.0}}
    with pytest.raises(ValueError, match="adapter_strategy must be an object with a 'type'"):
        jadapters.config_from_dict(data)


def test_unknown_fields_raise():
    with pytest.raises(ValueError, match=r"unknown fields \['bogus'\] for LinearAdapterConfig"):
        jadapters.config_from_dict({"type": "LinearAdapter", "dim": 4, "bogus": 1})
    data = {
        "type": "LinearAdapter",
        "dim": 4,
        "adapter_strategy": {"type": "ScaledAddStrategy", "scale": 1.0, "gain": 2.0},
    }
    with pytest.raises(ValueError, match=r"unknown fields \['gain'\] for ScaledAddStrategy"):
        jadapters.config_from_dict(data)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"dim": 0}, "dim must be a positive int"),
        ({"dim": 4, "activation": "tanhh"}, "activation must be one of"),
        ({"dim": 4, "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        (
            {"dim": 4, "adapter_strategy": {"type": "ResidualAddStrategy", "stochastic_depth": 2}},
            r"stochastic_depth must be in \[0, 1\]",
        ),
    ],
)
def test_invalid_values_in_data_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        jadapters.config_from_dict({"type": "LinearAdapter", **fields})


LINEAR = {"type": "LinearAdapter", "dim": 4}
NESTED = functools.reduce(lambda inner, _: [inner], range(40), 4)  # [[...[4]...]], 40 deep


def _with_strategy(**fields):
    return {**LINEAR, "adapter_strategy": fields}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"type": "LinearAdapter"}, r"'LinearAdapter' is missing required fields \['dim'\]"),
        ({"type": "LoRA", "alpha": 2.0}, r"'LoRA' is missing required fields \['rank'\]"),
        ({"type": 3, "dim": 4}, r"an adapter config\['type'\] must be a string .*got 3"),
        ({"type": ["LinearAdapter"], "dim": 4}, r"\['type'\] must be a string"),
        ({"type": None}, r"\['type'\] must be a string .*got None"),
        ({"type": "LinearAdapter", "dim": "4"}, r"dim must be a positive int, got '4' \(str\)"),
        ({"type": "LinearAdapter", "dim": 4.0}, r"dim must be a positive int, got 4.0"),
        ({"type": "LinearAdapter", "dim": True}, r"dim must be a positive int, got True"),
        ({"type": "LinearAdapter", "dim": None}, r"dim must be a positive int, got None"),
        ({"type": "LinearAdapter", "dim": 10**30}, r"dim must be at most 2\*\*63 - 1"),
        ({"type": "LinearAdapter", "dim": [4]}, r"dim must be a positive int, got \(4,\)"),
        ({"type": "LinearAdapter", "dim": {"a": 1}}, r"dim must be a positive int, got \{'a'"),
        ({**LINEAR, 1: 2}, r"field names must be strings, got \[1\]"),
        ({**LINEAR, "norm_epsilon": 0}, r"norm_epsilon must be > 0, got 0"),
        ({**LINEAR, "in_features": -1}, r"in_features must be a positive int or None"),
        ({**LINEAR, "activation": ["relu"]}, r"activation must be one of .*got \('relu',\)"),
        ({**LINEAR, "adapter_strategy": "ResidualAddStrategy"}, "adapter_strategy must be an"),
        ({**LINEAR, "adapter_strategy": None}, r"adapter_strategy must be an object .*got None"),
        (_with_strategy(type=5), r"adapter_strategy\['type'\] must be a string .*got 5"),
        (_with_strategy(type="ResidualAddStrategy", l2_lambda="big"), "l2_lambda must be a number"),
        (_with_strategy(type="ResidualAddStrategy", per_example=0), "per_example must be a bool"),
        (_with_strategy(type="ScaledAddStrategy", scale=None), "scale must be a number, got None"),
        (_with_strategy(type="ScaledAddStrategy", scale=[1.0]), r"scale must be a number, got \("),
        (_with_strategy(type="ReturnResultStrategy", x=1), r"unknown fields \['x'\]"),
        ({"type": "IA3", "param_dtype": "int8"}, "param_dtype must name a floating dtype"),
        ({"type": "ParallelAdapter", "dim": 2, "learn_scale": "true"}, "learn_scale must be a"),
        (
            {
                "type": "LinearAdapter",
                "dim": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[4]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
            },
            r"dim is nested more than 32 levels deep",
        ),
    ],
)
def test_malformed_data_raises_value_error_naming_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        jadapters.config_from_dict(data)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"type": "LoRA", "rank": 4, "alpha": NaN}', r"alpha must be a finite number, got nan"),
        ('{"type": "LoRA", "rank": 4, "alpha": 1e400}', r"alpha must be a finite number, got inf"),
        ('{"type": "ParallelAdapter", "dim": 2, "scale": -Infinity}', r"scale must be a finite"),
        ('{"type": "LinearAdapter", "dim": 4, "dropout": NaN}', r"dropout must be a finite number"),
        (
            '{"type": "LinearAdapter", "dim": 4, "adapter_strategy": '
            '{"type": "ResidualAddStrategy", "stochastic_depth": NaN}}',
            r"stochastic_depth must be a finite number in \[0, 1\], got nan",
        ),
        ('{"type": "LinearAdapter", "dim": 4', r"Expecting"),  # not JSON
        ('["LinearAdapter", 4]', r"must be an object with a 'type'"),
        ("[" * 100_000 + "]" * 100_000, r"nested too deeply|must be an object"),
    ],
)
def test_malformed_json_raises_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        jadapters.config_from_json(text)


@pytest.mark.parametrize("text", [None, 3, {"type": "LinearAdapter", "dim": 4}])
def test_config_from_json_needs_text(text):
    with pytest.raises(ValueError, match="text must be a JSON string, got"):
        jadapters.config_from_json(text)


def test_config_from_json_reads_bytes():
    text = b'{"type": "LinearAdapter", "dim": 4}'
    assert jadapters.config_from_json(text) == LinearAdapterConfig(dim=4)


# Arbitrary JSON-like data: configs are read from untrusted files.
edge_values = st.sampled_from(
    [None, True, False, 0, -1, 1, 2**64, 10**400, 0.5, -0.0, 1e-300, float("nan"), float("inf")]
    + [-float("inf"), "", "1", "relu", "float32", [], [1], {}, {"type": "ScaledAddStrategy"}]
)
json_values = st.recursive(
    edge_values | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
ADAPTER_FIELDS = sorted(
    {f.name for cls, _ in registered_adapter_types().values() for f in dataclasses.fields(cls)}
)
STRATEGY_FIELDS = ["stochastic_depth", "l2_lambda", "per_example", "scale"]
STRATEGY_NAMES = ["ResidualAddStrategy", "ReturnResultStrategy", "ScaledAddStrategy"]


@st.composite
def strategy_objects(draw):
    """A strategy type's name (or another string) with arbitrary values for its fields."""
    fields = draw(st.dictionaries(st.sampled_from(STRATEGY_FIELDS), json_values, max_size=3))
    return {**fields, "type": draw(st.sampled_from(STRATEGY_NAMES) | json_values)}


@st.composite
def adapter_objects(draw):
    """An adapter type's name (or another value) with arbitrary values for real field names,
    and a strategy object."""
    fields = draw(st.dictionaries(st.sampled_from(ADAPTER_FIELDS), json_values, max_size=4))
    fields["adapter_strategy"] = draw(strategy_objects() | json_values)
    return {**fields, "type": draw(st.sampled_from(sorted(registered_adapter_types())))}


@st.composite
def mutated_configs(draw):
    """A valid config's dict with one field (of it or its strategy) replaced, removed or
    added."""
    data = jadapters.config_to_dict(draw(configs_st))
    inner = data.get("adapter") if isinstance(data.get("adapter"), dict) else data
    target = inner["adapter_strategy"] if draw(st.booleans()) else data
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "add":
        name = draw(st.sampled_from(ADAPTER_FIELDS + STRATEGY_FIELDS) | st.text(max_size=6))
        target[name] = draw(json_values)
    else:
        key = draw(st.sampled_from(sorted(target)))
        if action == "remove":
            del target[key]
        else:
            target[key] = draw(json_values | strategy_objects() | adapter_objects())
    return data


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(mutated_configs(), mutated_configs(), adapter_objects(), json_values))
def test_arbitrary_data_builds_a_valid_config_or_raises_value_error(data):
    for read, arg in [
        (jadapters.config_from_dict, data),
        (jadapters.config_from_json, json.dumps(data)),
    ]:
        try:
            cfg = read(arg)
        except ValueError as err:
            # The built-in types check every field themselves: no error is a TypeError caught
            # late (config_from_dict's fallback for user types that check less).
            assert not isinstance(err.__cause__, TypeError), err
            continue
        _assert_valid_and_round_trips(cfg)


# --- registering types ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MissingFieldConfig:
    dim: int
    activation: str = "swish"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReorderedConfig:
    in_features: int | None = None
    dim: int = 1
    activation: str = "swish"
    norm_position: str = "pre"
    norm_epsilon: float = 1e-5
    dropout: float = 0.0
    adapter_strategy: Any = ResidualAddStrategy()


@pytest.mark.parametrize("config_cls", [MissingFieldConfig, ReorderedConfig])
def test_register_adapter_with_different_fields_raises(config_cls, restore_registry):
    with pytest.raises(ValueError, match=f"config_cls {config_cls.__name__} fields .* must equal"):
        jadapters.register_adapter(config_cls, LinearAdapter, name="Other")
    assert "Other" not in registered_adapter_types()


@dataclasses.dataclass(kw_only=True)
class MutableConfig:
    dim: int
    in_features: int | None = None
    activation: str = "swish"
    norm_position: str = "pre"
    norm_epsilon: float = 1e-5
    dropout: float = 0.0
    adapter_strategy: Any = ResidualAddStrategy()


class PlainClass:
    pass


@pytest.mark.parametrize("config_cls", [MutableConfig, PlainClass])
def test_register_adapter_needs_frozen_dataclass(config_cls, restore_registry):
    with pytest.raises(ValueError, match="config_cls must be a frozen dataclass"):
        jadapters.register_adapter(config_cls, LinearAdapter, name="Other")
    assert "Other" not in registered_adapter_types()


@dataclasses.dataclass
class MutableStrategy:
    scale: float = 1.0

    def __call__(self, x, adapter_output, *, key=None, training=False):
        return x + self.scale * adapter_output


def test_register_strategy_needs_frozen_dataclass(restore_registry):
    with pytest.raises(ValueError, match="cls must be a frozen dataclass"):
        jadapters.register_strategy(MutableStrategy)


# A user adapter: a Linen module with the adapter protocol, plus its frozen config.


class ScaleAdapter(nn.Module):
    """Output ``scale * w * x`` (w per feature, starting at zero) for 2-D inputs."""

    scale: float = 1.0
    adapter_strategy: Any = ResidualAddStrategy()

    default_insertion: ClassVar[str] = "output"

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        w = self.param("w", nn.initializers.zeros, (x.shape[-1],))
        return self.scale * x * w[None, :]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaleAdapterConfig(jadapters.AdapterConfig):
    scale: float = 1.0
    adapter_strategy: Any = ResidualAddStrategy()


@pytest.mark.parametrize("name", [None, "my_scale"])
def test_user_adapter_round_trip(name, restore_registry):
    cfg = ScaleAdapterConfig(scale=2.5, adapter_strategy=ScaledAddStrategy(scale=0.5))
    with pytest.raises(ValueError, match="registered adapter config"):
        jadapters.config_to_dict(cfg)
    jadapters.register_adapter(ScaleAdapterConfig, ScaleAdapter, name=name)
    jadapters.register_adapter(ScaleAdapterConfig, ScaleAdapter, name=name)  # idempotent
    type_name = name or "ScaleAdapter"
    assert registered_adapter_types()[type_name] == (ScaleAdapterConfig, ScaleAdapter)

    data = jadapters.config_to_dict(cfg)
    assert data == {
        "type": type_name,
        "scale": 2.5,
        "adapter_strategy": {"type": "ScaledAddStrategy", "scale": 0.5},
    }
    assert jadapters.config_from_json(jadapters.config_to_json(cfg)) == cfg

    module = jadapters.build_adapter(cfg)
    assert type(module) is ScaleAdapter and module.scale == 2.5
    assert jadapters.config_of(module) == cfg

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    np.testing.assert_array_equal(jadapters.apply_adapter(module, variables, x).output, x)
    w = jnp.asarray([1.0, -2.0, 0.5])
    out = jadapters.apply_adapter(module, {"params": {"w": w}}, x).output
    np.testing.assert_allclose(out, np.asarray(x) * (1 + 0.5 * 2.5 * np.asarray(w)), rtol=1e-6)


def test_register_adapter_name_taken_raises(restore_registry):
    with pytest.raises(ValueError, match="'LinearAdapter' is already registered"):
        jadapters.register_adapter(ScaleAdapterConfig, ScaleAdapter, name="LinearAdapter")
    assert registered_adapter_types()["LinearAdapter"] == (LinearAdapterConfig, LinearAdapter)


# A user strategy.


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedAdd:
    gate: float = 0.5

    def __call__(self, x, adapter_output, *, key=None, training=False):
        return x + self.gate * adapter_output


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightedAdd:
    """A strategy with a tuple field (one weight per feature)."""

    weights: tuple[float, ...] = (1.0,)

    def __call__(self, x, adapter_output, *, key=None, training=False):
        return x + jnp.asarray(self.weights, adapter_output.dtype) * adapter_output


def test_user_strategy_round_trip(restore_registry):
    cfg = LinearAdapterConfig(dim=2, adapter_strategy=GatedAdd(gate=0.25))
    with pytest.raises(ValueError, match="not a registered strategy"):
        jadapters.config_to_json(cfg)
    jadapters.register_strategy(GatedAdd)
    data = jadapters.config_to_dict(cfg)
    assert data["adapter_strategy"] == {"type": "GatedAdd", "gate": 0.25}
    back = jadapters.config_from_json(jadapters.config_to_json(cfg))
    assert back == cfg and type(back.adapter_strategy) is GatedAdd


def test_user_strategy_with_custom_name_round_trip(restore_registry):
    jadapters.register_strategy(GatedAdd, name="gated")
    cfg = LinearAdapterConfig(dim=2, adapter_strategy=GatedAdd(gate=0.75))
    assert jadapters.config_to_dict(cfg)["adapter_strategy"]["type"] == "gated"
    assert jadapters.config_from_json(jadapters.config_to_json(cfg)) == cfg


def test_user_strategy_with_tuple_field_round_trip(restore_registry):
    # config_to_dict writes tuples as JSON lists; reading must turn them back into tuples,
    # as it does for adapter config fields, or the strategy is unhashable.
    jadapters.register_strategy(WeightedAdd)
    cfg = LinearAdapterConfig(dim=2, adapter_strategy=WeightedAdd(weights=(1.0, 0.5, 2.0)))
    assert jadapters.config_to_dict(cfg)["adapter_strategy"]["weights"] == [1.0, 0.5, 2.0]
    back = jadapters.config_from_json(jadapters.config_to_json(cfg))
    assert back == cfg
    assert back.adapter_strategy.weights == (1.0, 0.5, 2.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffsetAdd:
    """A user strategy that checks its field only by using it (a TypeError for a string)."""

    offset: float = 0.0

    def __post_init__(self):
        self.offset + 0.0

    def __call__(self, x, adapter_output, *, key=None, training=False):
        return x + adapter_output + self.offset


def test_user_type_type_error_becomes_value_error(restore_registry):
    jadapters.register_strategy(OffsetAdd)
    data = {**LINEAR, "adapter_strategy": {"type": "OffsetAdd", "offset": "big"}}
    with pytest.raises(
        ValueError, match=r"cannot build adapter_strategy of type 'OffsetAdd' from \{'offset'"
    ) as info:
        jadapters.config_from_dict(data)
    assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.parametrize("name", [3, "", ("LinearAdapter",)])
def test_register_with_bad_name_raises(name, restore_registry):
    before = (registered_adapter_types(), jadapters.registry.registered_strategy_types())
    with pytest.raises(ValueError, match=r"name must be a non-empty string .*got"):
        jadapters.register_adapter(ScaleAdapterConfig, ScaleAdapter, name=name)
    with pytest.raises(ValueError, match=r"name must be a non-empty string .*got"):
        jadapters.register_strategy(GatedAdd, name=name)
    assert (registered_adapter_types(), jadapters.registry.registered_strategy_types()) == before


def test_register_adapter_needs_a_module_class(restore_registry):
    with pytest.raises(ValueError, match="module_cls must be a Flax Linen module class, got 3"):
        jadapters.register_adapter(ScaleAdapterConfig, 3)


def test_register_strategy_name_taken_raises(restore_registry):
    with pytest.raises(ValueError, match="'ScaledAddStrategy' is already registered"):
        jadapters.register_strategy(GatedAdd, name="ScaledAddStrategy")
