"""``adapter_transform``: one call that gives an unmodified Linen or NNX model adapters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
from flax import nnx

from jadapters.adapters.base import ShardingRule
from jadapters.linen.transform import AdaptedLinen, _Boxed
from jadapters.nnx.transform import transform_nnx
from jadapters.targets import TargetsLike, normalize_targets


def adapter_transform(
    model: Any,
    targets: TargetsLike,
    *,
    accepted_types: Iterable[type] = (),
    sharding: ShardingRule | None = None,
) -> Any:
    """Gives ``model`` (Linen or NNX, unmodified) NeMo's adapter API at the ``targets``.

    ``targets`` names where adapters may go: a regex (or list of them, or
    :class:`~jadapters.Target` rules) for the default group ``''``, or a mapping of group names
    to patterns (``{"encoder": r"encoder/.*/mlp", "decoder": r"decoder/.*/mlp"}``) so that
    ``add_adapter("decoder:name", cfg)`` routes to a group. A bare ``add_adapter("name", cfg)``
    goes to the default group ``''`` only; a mapping without a ``''`` entry has none, and its
    adapters need ``"group:name"``. Group names are any ``str`` without ``':'``. Patterns match
    whole module paths: submodule names from the root joined by ``/``.

    * **Linen**: returns an :class:`~jadapters.AdaptedLinen` module. It is immutable:
      ``add_adapter``/``set_enabled_adapters`` return a new module. ``init`` returns
      ``{"params": <exactly the base's params>, "adapters": ..., ...}``. A pattern matching
      nothing raises at ``init`` (the first time module paths are known).
    * **NNX**: changes ``model`` in place and returns it. Hosts gain
      :class:`~jadapters.AdapterModuleMixin`, the root :class:`~jadapters.AdapterModelMixin`;
      ``nnx.state(model, nnx.Param)`` keeps exactly the base's structure and
      ``nnx.state(model, jadapters.AdapterParam)`` holds the adapters. A pattern matching
      nothing raises here.

    Args:
      model: a ``flax.linen.Module`` or ``flax.nnx.Module``.
      targets: where adapters go (see above).
      accepted_types: adapter types (config or module classes) allowed; empty means all.
      sharding: ``None``, or a rule ``rule(host_path, adapter_name, param_path, derived) ->
        names`` that overrides the axis names adapter weights derive from their host's
        partitioned kernel (``derived``: one name or ``None`` per axis; return it to keep
        them). The same as ``.with_sharding(rule)`` on the result: see
        :meth:`~jadapters.AdaptedLinen.with_sharding` and ``docs/SCALING.md``.

    Returns:
      The adapted model.

    Raises:
      ValueError: for a pattern that matches no module (listing the paths that exist,
        closest first), ``targets`` of another form (``None``, a number, an empty group, a
        group name with ``':'``; the message names the accepted forms), or a model that is
        neither Linen nor NNX.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jadapters
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> adapted = adapter_transform(model, "layers_0")
    >>> adapted = adapted.add_adapter("task", jadapters.LinearAdapterConfig(dim=4))
    >>> x = jnp.ones((3, 5))
    >>> variables = adapted.init(jax.random.key(0), x)
    >>> sorted(variables)
    ['adapters', 'params']
    >>> base_out = model.apply({"params": variables["params"]}, x)
    >>> bool((adapted.apply(variables, x) == base_out).all())
    True
    """
    groups = normalize_targets(targets)
    accepted = tuple(accepted_types)
    if isinstance(model, AdaptedLinen) or getattr(model, "_adapter_groups", None):
        raise ValueError(
            f"model is already adapted (a {type(model).__name__}); add adapters to it with "
            "add_adapter, or adapt the unwrapped model with all its target groups at once."
        )
    if isinstance(model, nn.Module):
        return AdaptedLinen(
            boxed=_Boxed(model), groups=groups, accepted_types=accepted, sharding=sharding
        )
    if isinstance(model, nnx.Module):
        adapted = transform_nnx(model, groups, accepted_types=accepted)
        return adapted if sharding is None else adapted.with_sharding(sharding)
    raise ValueError(
        f"model must be a flax.linen.Module or flax.nnx.Module, got {type(model).__name__}."
    )
