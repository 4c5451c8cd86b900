"""Config registry: build adapters and strategies from data, never from import paths.

Adapter configs and strategies are frozen dataclasses. They serialize to plain JSON objects
with a ``"type"`` key naming a *registered* type. Reading a config only ever looks that name up
in the registry: a name that was not registered is an error, and nothing is imported.
Users extend the registry with :func:`register_adapter` and :func:`register_strategy`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jadapters.adapters.ia3 import IA3, IA3Config
from jadapters.adapters.linear import LinearAdapter, LinearAdapterConfig
from jadapters.adapters.lora import LoRA, LoRAConfig
from jadapters.adapters.parallel import ParallelAdapter, ParallelAdapterConfig
from jadapters.strategies import ResidualAddStrategy, ReturnResultStrategy, ScaledAddStrategy

__all__ = [
    "register_adapter",
    "register_strategy",
    "build_adapter",
    "config_of",
    "config_to_dict",
    "config_from_dict",
    "config_to_json",
    "config_from_json",
]

_ADAPTERS: dict[str, tuple[type, type]] = {}
_STRATEGIES: dict[str, type] = {}


def _check_frozen_dataclass(cls: type, argument: str) -> None:
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise ValueError(
            f"{argument} must be a frozen dataclass (@dataclasses.dataclass(frozen=True)), "
            f"got {cls!r}."
        )


def register_adapter(config_cls: type, module_cls: type, *, name: str | None = None) -> None:
    """Registers an adapter type so that configs of it can be built and read from files.

    Args:
      config_cls: a frozen dataclass whose fields are the module's constructor arguments.
      module_cls: the Flax Linen module the config builds.
      name: the ``"type"`` written to files; defaults to the module class's name.

    Raises:
      ValueError: if ``config_cls`` is not a frozen dataclass, its fields differ from the
        module's, or ``name`` is taken by another type.
    """
    _check_frozen_dataclass(config_cls, "config_cls")
    config_fields = [f.name for f in dataclasses.fields(config_cls)]
    module_fields = [
        f.name for f in dataclasses.fields(module_cls) if f.name not in ("parent", "name", "_")
    ]
    if config_fields != module_fields:
        raise ValueError(
            f"config_cls {config_cls.__name__} fields {config_fields} must equal module_cls "
            f"{module_cls.__name__} fields {module_fields}, in order."
        )
    key = name or module_cls.__name__
    existing = _ADAPTERS.get(key)
    if existing is not None and existing != (config_cls, module_cls):
        raise ValueError(f"name {key!r} is already registered for {existing[1].__name__}.")
    _ADAPTERS[key] = (config_cls, module_cls)


def register_strategy(cls: type, *, name: str | None = None) -> None:
    """Registers a strategy type (a frozen dataclass) so that configs can name it.

    Raises:
      ValueError: if ``cls`` is not a frozen dataclass or ``name`` is taken by another type.
    """
    _check_frozen_dataclass(cls, "cls")
    key = name or cls.__name__
    existing = _STRATEGIES.get(key)
    if existing is not None and existing is not cls:
        raise ValueError(f"name {key!r} is already registered for {existing.__name__}.")
    _STRATEGIES[key] = cls


def registered_adapter_types() -> dict[str, tuple[type, type]]:
    """The registered adapter types: ``{name: (config_cls, module_cls)}``."""
    return dict(_ADAPTERS)


def _adapter_entry_for_config(cfg: Any) -> tuple[str, type]:
    for key, (config_cls, module_cls) in _ADAPTERS.items():
        if type(cfg) is config_cls:
            return key, module_cls
    raise ValueError(
        f"cfg must be a registered adapter config, got {type(cfg).__name__}; register it with "
        f"jadapters.register_adapter(config_cls, module_cls). Known: {sorted(_ADAPTERS)}."
    )


def build_adapter(cfg: Any) -> Any:
    """Builds the Flax module for a registered adapter config.

    >>> build_adapter(LinearAdapterConfig(dim=4)).dim
    4
    """
    _, module_cls = _adapter_entry_for_config(cfg)
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return module_cls(**kwargs, parent=None)


def config_of(adapter: Any) -> Any:
    """Returns the config of an adapter given as a config or as a module instance.

    Raises:
      ValueError: if ``adapter`` is neither a registered config nor a registered module.

    >>> from jadapters import LinearAdapter
    >>> config_of(LinearAdapter(4, activation="relu"))
    LinearAdapterConfig(dim=4, in_features=None, activation='relu', ...)
    """
    for config_cls, module_cls in _ADAPTERS.values():
        if type(adapter) is config_cls:
            return adapter
        if type(adapter) is module_cls:
            kwargs = {f.name: getattr(adapter, f.name) for f in dataclasses.fields(config_cls)}
            return config_cls(**kwargs)
    raise ValueError(
        f"cfg must be a registered adapter config or module, got {adapter!r}. Known types: "
        f"{sorted(_ADAPTERS)}; register new ones with jadapters.register_adapter."
    )


def _strategy_name(strategy: Any) -> str:
    for key, cls in _STRATEGIES.items():
        if type(strategy) is cls:
            return key
    raise ValueError(
        f"adapter_strategy {strategy!r} is not a registered strategy, so it cannot be written "
        "to a config; register it with jadapters.register_strategy."
    )


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": _strategy_name(value), **fields}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of an adapter config (or module), with its registered ``"type"``.

    >>> config_to_dict(LinearAdapterConfig(dim=4))["type"]
    'LinearAdapter'
    """
    cfg = config_of(cfg)
    key, _ = _adapter_entry_for_config(cfg)
    fields = {f.name: _encode(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    return {"type": key, **fields}


def _decode_strategy(data: Any) -> Any:
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"adapter_strategy must be an object with a 'type', got {data!r}.")
    kind = data["type"]
    if kind not in _STRATEGIES:
        raise ValueError(
            f"unknown strategy type {kind!r}; registered: {sorted(_STRATEGIES)}. Register it "
            "with jadapters.register_strategy before loading."
        )
    cls = _STRATEGIES[kind]
    kwargs = _checked_kwargs(cls, {k: v for k, v in data.items() if k != "type"})
    return cls(**{k: _tuples(v) for k, v in kwargs.items()})


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples frozen dataclasses hold (recursively)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _checked_kwargs(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown fields {unknown} for {cls.__name__}; known: {sorted(names)}.")
    return data


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuilds an adapter config from :func:`config_to_dict` output, via the registry only.

    Raises:
      ValueError: for an unregistered ``"type"`` (nothing is imported) or unknown fields.

    >>> config_from_dict({"type": "LinearAdapter", "dim": 4}).dim
    4
    >>> config_from_dict({"type": "os.system", "dim": 4})
    Traceback (most recent call last):
    ...
    ValueError: unknown adapter type 'os.system'; ...
    """
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"an adapter config must be an object with a 'type', got {data!r}.")
    kind = data["type"]
    if kind not in _ADAPTERS:
        raise ValueError(
            f"unknown adapter type {kind!r}; registered: {sorted(_ADAPTERS)}. Register it with "
            "jadapters.register_adapter before loading."
        )
    config_cls, _ = _ADAPTERS[kind]
    kwargs = _checked_kwargs(config_cls, {k: v for k, v in data.items() if k != "type"})
    if "adapter_strategy" in kwargs:
        kwargs["adapter_strategy"] = _decode_strategy(kwargs["adapter_strategy"])
    return config_cls(**{k: _tuples(v) for k, v in kwargs.items()})


def config_to_json(cfg: Any) -> str:
    """Serializes an adapter config to a JSON string.

    >>> cfg = LinearAdapterConfig(dim=4, activation="relu")
    >>> config_from_json(config_to_json(cfg)) == cfg
    True
    """
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def config_from_json(text: str) -> Any:
    """Reads an adapter config from :func:`config_to_json` output."""
    return config_from_dict(json.loads(text))


register_strategy(ResidualAddStrategy)
register_strategy(ReturnResultStrategy)
register_strategy(ScaledAddStrategy)
register_adapter(LinearAdapterConfig, LinearAdapter)
register_adapter(LoRAConfig, LoRA)
register_adapter(IA3Config, IA3)
register_adapter(ParallelAdapterConfig, ParallelAdapter)
