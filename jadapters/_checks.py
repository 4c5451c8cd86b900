"""Argument checks shared by configs and modules: errors name the argument, show the value
and say the fix."""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = " or None to infer it from the input" if allow_none else ""
        raise ValueError(f"{name} must be a positive int{hint}, got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


def check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}.")


def check_strategy(value: Any, *, argument: str = "adapter_strategy") -> None:
    if not callable(value):
        raise ValueError(
            f"{argument} must be a strategy (a callable such as ResidualAddStrategy()), "
            f"got {value!r}."
        )
    try:
        hash(value)
    except TypeError as err:
        raise ValueError(
            f"{argument} must be hashable so it can live in static model structure; "
            f"make it a frozen dataclass. Got {value!r}."
        ) from err


def check_dtype(name: str, value: Any) -> None:
    import jax.numpy as jnp

    try:
        ok = isinstance(value, str) and bool(jnp.issubdtype(_dtype_of(value), jnp.floating))
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must name a floating dtype such as 'float32' or 'bfloat16', got {value!r}."
        )


def _dtype_of(name: str):
    import jax.numpy as jnp

    return jnp.dtype(name)
