"""Argument checks shared by configs and modules: errors name the argument, show the value
and say the fix.

Every check has the form ``check(name, value) -> value``: it raises a ``ValueError`` for a bad
value and returns a good one in its canonical Python form (a NumPy or concrete JAX scalar of
the right kind becomes the Python ``int``, ``float`` or ``bool``; an ``int`` given for a float
becomes a ``float``), so that configs compare, hash and serialize to JSON the same way
whatever the value came from. A type lists its fields' checks in one table and runs them with
:func:`apply_checks`; numbers always go through :func:`check_number` or
:func:`check_positive_int`, which refuse bools, strings, NaN and infinity.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

Check = Callable[[str, Any], Any]

# The largest value an int field may hold: an array dimension is an int64.
MAX_INT = 2**63 - 1


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, shortened to ``limit`` characters (and safe for huge ints)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for its decimal string
        return f"<an int of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scalar_kind(value: Any) -> str | None:
    """``"bool"``, ``"int"`` or ``"float"`` for a Python, NumPy or 0-d JAX scalar; else None."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    if dtype is None or shape != ():
        return None
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return None
    for kind, base in (("bool", jnp.bool_), ("int", jnp.integer), ("float", jnp.floating)):
        if jnp.issubdtype(dtype, base):
            return kind
    return None


def _concrete(name: str, value: Any, convert: Callable[[Any], Any]) -> Any:
    try:
        return convert(value)
    except jax.errors.ConcretizationTypeError as err:
        raise ValueError(
            f"{name} must be a concrete value, got a traced array {show(value)}; configuration "
            "is static, so pass a Python number (not a value computed inside jit)."
        ) from err


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """A positive ``int`` (at most :data:`MAX_INT`), or ``None`` with ``allow_none``."""
    if value is None and allow_none:
        return None
    hint = " or None to infer it from the input" if allow_none else ""
    if _scalar_kind(value) != "int":
        raise ValueError(
            f"{name} must be a positive int{hint}, got {show(value)} "
            f"({type(value).__name__}); pass a Python int such as 8."
        )
    value = _concrete(name, value, operator.index)
    if value < 1:
        raise ValueError(f"{name} must be a positive int{hint}, got {value}.")
    if value > MAX_INT:
        raise ValueError(
            f"{name} must be at most 2**63 - 1 (an array dimension), got {show(value)}."
        )
    return value


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    none_means: str = "",
) -> float | None:
    """A finite number within the bounds, as a Python ``float`` (``None`` with ``allow_none``).

    Bools, strings, NaN and infinity are refused. ``none_means`` says what ``None`` stands for,
    in the error message.
    """
    if value is None and allow_none:
        return None
    bounds = _bounds(low, high, low_open, high_open)
    if _scalar_kind(value) not in ("int", "float"):
        what = "a number" + (f" {bounds}" if bounds else "")
        if allow_none:
            what += f" or None{f' ({none_means})' if none_means else ''}"
        raise ValueError(
            f"{name} must be {what}, got {show(value)} ({type(value).__name__}); pass a "
            "Python float or int."
        )
    try:
        number = _concrete(name, value, float)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(
            f"{name} must be a finite number{f' {bounds}' if bounds else ''}, got {show(value)}; "
            "NaN and infinity are not allowed."
        )
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        raise ValueError(f"{name} must be {bounds}, got {show(value)}.")
    return number


def check_rate(name: str, value: Any) -> float:
    """A probability in ``[0, 1)`` (dropout)."""
    return check_number(name, value, low=0.0, high=1.0, high_open=True)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (a NumPy or JAX bool becomes the Python one; ints are refused)."""
    if _scalar_kind(value) != "bool":
        raise ValueError(f"{name} must be a bool, got {show(value)}; pass True or False.")
    return _concrete(name, value, bool)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices`` (returned as the choice itself)."""
    if isinstance(value, str):
        for choice in choices:
            if value == choice:
                return choice
    raise ValueError(f"{name} must be one of {list(choices)}, got {show(value)}.")


def check_strategy(name: str, value: Any) -> Any:
    """A hashable callable strategy."""
    if not callable(value):
        raise ValueError(
            f"{name} must be a strategy (a callable such as ResidualAddStrategy()), "
            f"got {show(value)}."
        )
    try:
        hash(value)
    except TypeError as err:
        raise ValueError(
            f"{name} must be hashable so it can live in static model structure; "
            f"make it a frozen dataclass. Got {show(value)}."
        ) from err
    return value


def check_dtype(name: str, value: Any) -> str:
    """The name of a floating dtype, e.g. ``'float32'`` or ``'bfloat16'``."""
    try:
        ok = isinstance(value, str) and bool(jnp.issubdtype(jnp.dtype(value), jnp.floating))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must name a floating dtype such as 'float32' or 'bfloat16', got {show(value)}."
        )
    return str(value)


def apply_checks(obj: Any, checks: Mapping[str, Check]) -> None:
    """Runs each field's check on ``obj`` (a frozen dataclass or a Linen module, before
    ``super().__post_init__()``) and stores the canonical value it returns.

    Raises:
      ValueError: from the first check that fails; the message names the field.
    """
    for name, check in checks.items():
        value = getattr(obj, name)
        canonical = check(name, value)
        if canonical is not value:
            object.__setattr__(obj, name, canonical)


def check_input(adapter: str, argument: str, x: Any, *, in_features: int | None = None) -> None:
    """Trace-time checks of an adapter's input ``x`` (with ``chex``): a floating array of
    rank >= 1 whose last axis is ``in_features`` when that is given.

    Raises:
      ValueError: naming ``adapter`` and ``argument``, with the shape or dtype found.
    """
    shape = tuple(getattr(x, "shape", ()))
    if not shape:
        message = (
            f"{adapter} needs {argument} of rank >= 1 (features on the last axis), got "
            f"shape {shape}; add a feature axis, e.g. {argument}[None]."
        )
    else:
        message = (
            f"{adapter} was built with in_features={in_features} but got an input with last "
            f"axis {shape[-1]} ({argument} of shape {shape}); set in_features={shape[-1]} or None."
        )
    chex.assert_shape(
        x,
        (..., in_features),
        custom_message=message,
        include_default_message=False,
        exception_type=ValueError,
    )
    chex.assert_type(
        x,
        float,
        custom_message=(
            f"{adapter} needs a floating {argument}, got dtype {getattr(x, 'dtype', None)}; "
            f"cast it, e.g. {argument}.astype(jnp.float32)."
        ),
        include_default_message=False,
        exception_type=ValueError,
    )
