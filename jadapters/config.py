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
import jadapters.adapters.bank  # noqa: F401
import jadapters.adapters.fusion  # noqa: F401
import jadapters.adapters.ia3  # noqa: F401
import jadapters.adapters.linear  # noqa: F401
import jadapters.adapters.lora  # noqa: F401
import jadapters.adapters.parallel  # noqa: F401
from jadapters._checks import show
from jadapters.adapters.base import AdapterConfig
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
    if isinstance(value, AdapterConfig):  # a nested adapter config (an adapter bank's)
        return config_to_dict(value)
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


# How deeply lists may nest in a config file (a real config nests a few levels at most).
_MAX_DEPTH = 32


def _tuples(value: Any, field: str, depth: int = 0) -> Any:
    """JSON lists back to the tuples frozen dataclasses hold (recursively)."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{field} is nested more than {_MAX_DEPTH} levels deep.")
    if isinstance(value, list):
        return tuple(_tuples(v, field, depth + 1) for v in value)
    return value


def _build(data: Any, what: str, lookup: Any) -> Any:
    """Builds the registered type that ``data["type"]`` names from ``data``'s other fields.

    Raises:
      ValueError: for data that is not an object with a string ``"type"``, an unregistered
        type, unknown or missing fields, or a field value the type refuses.
    """
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"{what} must be an object with a 'type', got {show(data)}.")
    name = data["type"]
    if not isinstance(name, str):
        raise ValueError(
            f"{what}['type'] must be a string naming a registered type, got {show(name)}."
        )
    cls = lookup(name)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    keys = [k for k in data if k != "type"]
    not_strings = [k for k in keys if not isinstance(k, str)]
    if not_strings:
        raise ValueError(f"{what} field names must be strings, got {show(not_strings)}.")
    unknown = sorted(set(keys) - set(fields))
    if unknown:
        raise ValueError(f"unknown fields {unknown} for {cls.__name__}; known: {sorted(fields)}.")
    missing = sorted(
        n
        for n, f in fields.items()
        if n not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(f"{what} of type {name!r} is missing required fields {missing}.")
    kwargs = {}
    for key in keys:
        if key == "adapter_strategy":
            kwargs[key] = _build(data[key], "adapter_strategy", strategy_type)
        elif key in getattr(cls, "config_fields", ()):
            kwargs[key] = _build(data[key], key, adapter_config_type)
        else:
            kwargs[key] = _tuples(data[key], key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a user type that checks its fields less carefully
        raise ValueError(
            f"cannot build {what} of type {name!r} from {show(kwargs)}: {err}"
        ) from err


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuilds an adapter config from :func:`config_to_dict` output, via the registry only.

    Data is untrusted: every failure is a ``ValueError`` that names the field.

    Raises:
      ValueError: for data that is not an object with a string ``"type"``, an unregistered
        type (nothing is imported), unknown or missing fields, or a field value the config
        refuses (wrong type, out of range, NaN or infinity), in the config or its strategy.

    >>> config_from_dict({"type": "LinearAdapter", "dim": 4}).dim
    4
    >>> config_from_dict({"type": "os.system", "dim": 4})
    Traceback (most recent call last):
    ...
    ValueError: unknown adapter type 'os.system'; ...
    >>> config_from_dict({"type": "LoRA", "rank": 4, "alpha": float("nan")})
    Traceback (most recent call last):
    ...
    ValueError: alpha must be a finite number, got nan; NaN and infinity are not allowed.
    """
    return _build(data, "an adapter config", adapter_config_type)


def config_to_json(cfg: Any) -> str:
    """Serializes an adapter config to a JSON string.

    >>> from jadapters import LinearAdapterConfig
    >>> cfg = LinearAdapterConfig(dim=4, activation="relu")
    >>> config_from_json(config_to_json(cfg)) == cfg
    True
    """
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def config_from_json(text: str | bytes) -> Any:
    """Reads an adapter config from :func:`config_to_json` output.

    Raises:
      ValueError: for text that is not JSON (or is nested too deeply), and everything
        :func:`config_from_dict` refuses.

    >>> config_from_json('{"type": "LoRA", "rank": 4, "alpha": 8.0}').build().scale
    2.0
    >>> config_from_json('{"type": "LoRA", "rank": -1}')
    Traceback (most recent call last):
    ValueError: rank must be a positive int, got -1.
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise ValueError(f"text must be a JSON string, got {type(text).__name__}.")
    try:
        data = json.loads(text)
    except RecursionError as err:
        raise ValueError("text is nested too deeply to be an adapter config.") from err
    return config_from_dict(data)
