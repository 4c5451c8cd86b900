"""Config registry: configs match modules, JSON round-trips, nothing is imported from data."""

import dataclasses
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
    LinearAdapter,
    LinearAdapterConfig,
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


# --- JSON round-trip ------------------------------------------------------------------------

finite = dict(allow_nan=False, allow_infinity=False)
strategies_st = st.one_of(
    st.builds(
        ResidualAddStrategy,
        stochastic_depth=st.floats(0.0, 1.0),
        l2_lambda=st.floats(0.0, 1e3, **finite),
        per_example=st.booleans(),
    ),
    st.just(ReturnResultStrategy()),
    st.builds(ScaledAddStrategy, scale=st.floats(-1e3, 1e3, **finite)),
)
linear_configs_st = st.builds(
    LinearAdapterConfig,
    dim=st.integers(1, 4096),
    in_features=st.none() | st.integers(1, 4096),
    activation=st.sampled_from(ACTIVATIONS),
    norm_position=st.sampled_from(["pre", "post"]),
    dropout=st.floats(0.0, 1.0, exclude_max=True),
    adapter_strategy=strategies_st,
)


@settings(max_examples=25, deadline=None)
@given(cfg=linear_configs_st)
def test_json_round_trip(cfg):
    text = jadapters.config_to_json(cfg)
    data = json.loads(text)
    assert data["type"] == "LinearAdapter"
    assert data["adapter_strategy"]["type"] == type(cfg.adapter_strategy).__name__
    assert jadapters.config_from_json(text) == cfg
    assert jadapters.config_from_dict(jadapters.config_to_dict(cfg)) == cfg
    # A module serializes like its config.
    assert jadapters.config_to_json(jadapters.build_adapter(cfg)) == text


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
        ({"dim": 4, "dropout": 1.0}, r"dropout must be a float in \[0, 1\)"),
        (
            {"dim": 4, "adapter_strategy": {"type": "ResidualAddStrategy", "stochastic_depth": 2}},
            r"stochastic_depth must be in \[0, 1\]",
        ),
    ],
)
def test_invalid_values_in_data_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        jadapters.config_from_dict({"type": "LinearAdapter", **fields})


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


def test_register_strategy_name_taken_raises(restore_registry):
    with pytest.raises(ValueError, match="'ScaledAddStrategy' is already registered"):
        jadapters.register_strategy(GatedAdd, name="ScaledAddStrategy")
