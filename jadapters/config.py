"""Configs as data: build adapters and strategies from data, never from import paths.

Adapter configs and strategies are frozen dataclasses. They serialize to plain JSON objects
with a ``"type"`` key naming a *registered* type. Reading a config only ever looks that name up
in the registry: a name that was not registered is an error, and nothing is imported.
Users extend the registry with :func:`register_adapter` and :func:`register_strategy`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

# The built-in adapters register themselves when imported; importing them here makes sure
# they are known to every reader of configs.
import jadapters.adapters.ia3  # noqa: F401
import jadapters.adapters.linear  # noqa: F401
import jadapters.adapters.lora  # noqa: F401
import jadapters.adapters.parallel  # noqa: F401
from jadapters.registry import (
    adapter_config_type,
    adapter_type_name,
    build_adapter,
    config_of,
    register_adapter,
    register_strategy,
    registered_adapter_types,
    strategy_name,
    strategy_type,
)

__all__ = [
    "registered_adapter_types",
    "register_adapter",
    "register_strategy",
    "build_adapter",
    "config_of",
    "config_to_dict",
    "config_from_dict",
    "config_to_json",
    "config_from_json",
]


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": strategy_name(value), **fields}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of an adapter config (or module), with its registered ``"type"``.

    >>> from jadapters import LinearAdapterConfig
    >>> config_to_dict(LinearAdapterConfig(dim=4))["type"]
    'LinearAdapter'
    """
    cfg = config_of(cfg)
    key, _ = adapter_type_name(cfg)
    fields = {f.name: _encode(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    return {"type": key, **fields}


def _decode_strategy(data: Any) -> Any:
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"adapter_strategy must be an object with a 'type', got {data!r}.")
    cls = strategy_type(data["type"])
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
    config_cls = adapter_config_type(data["type"])
    kwargs = _checked_kwargs(config_cls, {k: v for k, v in data.items() if k != "type"})
    if "adapter_strategy" in kwargs:
        kwargs["adapter_strategy"] = _decode_strategy(kwargs["adapter_strategy"])
    return config_cls(**{k: _tuples(v) for k, v in kwargs.items()})


def config_to_json(cfg: Any) -> str:
    """Serializes an adapter config to a JSON string.

    >>> from jadapters import LinearAdapterConfig
    >>> cfg = LinearAdapterConfig(dim=4, activation="relu")
    >>> config_from_json(config_to_json(cfg)) == cfg
    True
    """
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def config_from_json(text: str) -> Any:
    """Reads an adapter config from :func:`config_to_json` output."""
    return config_from_dict(json.loads(text))
