"""The adapter and strategy type registry: the one table that maps a name in a file to a type.

Configs are built from data by looking their ``"type"`` up here; a name that was never
registered is an error and nothing is imported. Each built-in adapter module registers its
own type when it is imported; users add theirs with :func:`register_adapter` and
:func:`register_strategy`. This module imports no adapter, so every adapter can import it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_ADAPTERS: dict[str, tuple[type, type]] = {}
_STRATEGIES: dict[str, type] = {}


def _check_frozen_dataclass(cls: type, argument: str) -> None:
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise ValueError(
            f"{argument} must be a frozen dataclass (@dataclasses.dataclass(frozen=True)), "
            f"got {cls!r}."
        )


def _check_name(name: Any) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(
            f"name must be a non-empty string (the 'type' written to files) or None for the "
            f"class's name, got {name!r}."
        )


def module_fields(module_cls: type) -> list[str]:
    """A Linen module class's configuration fields (``parent``, ``name``, ``_`` left out)."""
    return [f.name for f in dataclasses.fields(module_cls) if f.name not in ("parent", "name", "_")]


def register_adapter(config_cls: type, module_cls: type, *, name: str | None = None) -> None:
    """Registers an adapter type so that configs of it can be built and read from files.

    The module's ``__call__(x, *, deterministic)`` returns the adapter's raw output. It may
    also write that math as a pure method ``forward(params, x, *, training, key)``
    (as the built-in types do, with ``jadapters.adapters.functional``) and have ``__call__``
    only declare the weights and call it: the runtime then calls ``forward`` and skips Flax's
    ``apply`` machinery when tracing. Without ``forward`` the module is applied as it is.

    Args:
      config_cls: a frozen dataclass whose fields are the module's constructor arguments.
      module_cls: the Flax Linen module the config builds.
      name: the ``"type"`` written to files; defaults to the module class's name.

    Raises:
      ValueError: if ``config_cls`` is not a frozen dataclass, ``module_cls`` not a dataclass
        (a Linen module), their fields differ, or ``name`` is not a string or is taken by
        another type.

    >>> import dataclasses, flax.linen as nn, jadapters
    >>> class Scale(nn.Module):
    ...     scale: float = 1.0
    ...     @nn.compact
    ...     def __call__(self, x, *, deterministic=True):
    ...         return self.scale * x * self.param("w", nn.initializers.zeros, (x.shape[-1],))
    >>> @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class ScaleConfig(jadapters.AdapterConfig):
    ...     factor: float = 1.0
    >>> register_adapter(ScaleConfig, Scale)  # the config must mirror the module's fields
    Traceback (most recent call last):
    ValueError: config_cls ScaleConfig fields ['factor'] must equal module_cls Scale fields
    ['scale'], in order.
    >>> register_adapter(jadapters.LoRAConfig, jadapters.LoRA, name="IA3")
    Traceback (most recent call last):
    ValueError: name 'IA3' is already registered for IA3.
    >>> register_adapter(jadapters.LoRAConfig, jadapters.LoRA)  # the same pair again: a no-op
    >>> jadapters.config_from_dict({"type": "LoRA", "rank": 2}) == jadapters.LoRAConfig(rank=2)
    True
    """
    _check_frozen_dataclass(config_cls, "config_cls")
    if not isinstance(module_cls, type) or not dataclasses.is_dataclass(module_cls):
        raise ValueError(f"module_cls must be a Flax Linen module class, got {module_cls!r}.")
    _check_name(name)
    config_fields = [f.name for f in dataclasses.fields(config_cls)]
    if config_fields != module_fields(module_cls):
        raise ValueError(
            f"config_cls {config_cls.__name__} fields {config_fields} must equal module_cls "
            f"{module_cls.__name__} fields {module_fields(module_cls)}, in order."
        )
    key = name or module_cls.__name__
    existing = _ADAPTERS.get(key)
    if existing is not None and existing != (config_cls, module_cls):
        raise ValueError(f"name {key!r} is already registered for {existing[1].__name__}.")
    _ADAPTERS[key] = (config_cls, module_cls)


def register_strategy(cls: type, *, name: str | None = None) -> None:
    """Registers a strategy type (a frozen dataclass) so that configs can name it.

    Raises:
      ValueError: if ``cls`` is not a frozen dataclass or ``name`` is not a string or is
        taken by another type.

    >>> import dataclasses, jadapters
    >>> @dataclasses.dataclass(frozen=True)
    ... class HalfAddDocExample:
    ...     def __call__(self, x, adapter_output, *, key=None, training=False):
    ...         return x + 0.5 * adapter_output
    >>> register_strategy(HalfAddDocExample)
    >>> cfg = jadapters.LinearAdapterConfig(dim=2, adapter_strategy=HalfAddDocExample())
    >>> jadapters.config_to_dict(cfg)["adapter_strategy"]
    {'type': 'HalfAddDocExample'}
    >>> jadapters.config_from_json(jadapters.config_to_json(cfg)) == cfg
    True
    """
    _check_frozen_dataclass(cls, "cls")
    _check_name(name)
    key = name or cls.__name__
    existing = _STRATEGIES.get(key)
    if existing is not None and existing is not cls:
        raise ValueError(f"name {key!r} is already registered for {existing.__name__}.")
    _STRATEGIES[key] = cls


def registered_adapter_types() -> dict[str, tuple[type, type]]:
    """The registered adapter types: ``{name: (config_cls, module_cls)}``."""
    return dict(_ADAPTERS)


def registered_strategy_types() -> dict[str, type]:
    """The registered strategy types: ``{name: cls}``."""
    return dict(_STRATEGIES)


def adapter_type_name(cfg: Any) -> tuple[str, type]:
    """``(registered name, module class)`` of an adapter config."""
    for key, (config_cls, module_cls) in _ADAPTERS.items():
        if type(cfg) is config_cls:
            return key, module_cls
    raise ValueError(
        f"cfg must be a registered adapter config, got {type(cfg).__name__}; register it with "
        f"jadapters.register_adapter(config_cls, module_cls). Known: {sorted(_ADAPTERS)}."
    )


def build_adapter(cfg: Any) -> Any:
    """Builds the Flax module for a registered adapter config.

    >>> from jadapters import LinearAdapterConfig
    >>> build_adapter(LinearAdapterConfig(dim=4)).dim
    4
    """
    _, module_cls = adapter_type_name(cfg)
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


def strategy_type(name: str) -> type:
    """The strategy class registered as ``name``."""
    if name not in _STRATEGIES:
        raise ValueError(
            f"unknown strategy type {name!r}; registered: {sorted(_STRATEGIES)}. Register it "
            "with jadapters.register_strategy before loading."
        )
    return _STRATEGIES[name]


def strategy_name(strategy: Any) -> str:
    """The registered name of a strategy instance."""
    for key, cls in _STRATEGIES.items():
        if type(strategy) is cls:
            return key
    raise ValueError(
        f"adapter_strategy {strategy!r} is not a registered strategy, so it cannot be written "
        "to a config; register it with jadapters.register_strategy."
    )


def adapter_config_type(name: str) -> type:
    """The config class registered as ``name``."""
    if name not in _ADAPTERS:
        raise ValueError(
            f"unknown adapter type {name!r}; registered: {sorted(_ADAPTERS)}. Register it with "
            "jadapters.register_adapter before loading."
        )
    return _ADAPTERS[name][0]
