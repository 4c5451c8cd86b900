"""Base and adapter partitions of one model, and a printable summary of its adapters."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from jadapters.storage import ADAPTER_COLLECTION, AdapterParam
from jadapters.view import view_of


def split_variables(variables: dict) -> tuple[dict, dict]:
    """Splits Linen ``variables`` into ``(base, adapters)``.

    ``base`` is every collection but ``"adapters"`` (``{"params": ..., "batch_stats": ...}``),
    ``adapters`` the ``"adapters"`` collection.

    >>> split_variables({"params": {"w": 1}, "adapters": {"a": 2}})
    ({'params': {'w': 1}}, {'a': 2})
    """
    base = {k: v for k, v in variables.items() if k != ADAPTER_COLLECTION}
    return base, variables.get(ADAPTER_COLLECTION, {})


def merge_variables(base: dict, adapters: dict) -> dict:
    """Inverse of :func:`split_variables`.

    >>> merge_variables({"params": {"w": 1}}, {"a": 2})
    {'params': {'w': 1}, 'adapters': {'a': 2}}
    """
    return {**base, ADAPTER_COLLECTION: adapters}


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Splits an NNX model into ``(graphdef, adapters, base)``: adapter weights, then all else.

    ``nnx.merge(graphdef, adapters, base)`` rebuilds the model.

    >>> import jax, jax.numpy as jnp, jadapters
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> model = jadapters.adapter_transform(model, "layers/0")
    >>> model.add_adapter("task", jadapters.LoRAConfig(rank=1), rngs=nnx.Rngs(1))
    >>> graphdef, adapters, base = split_model(model)
    >>> [x.shape for x in jax.tree.leaves(adapters)], [x.shape for x in jax.tree.leaves(base)]
    ([(3, 1), (1, 2)], [(2,), (3, 2)])
    >>> nnx.merge(graphdef, adapters, base)(jnp.ones((1, 3))).shape
    (1, 2)
    """
    graphdef, adapters, base = nnx.split(model, AdapterParam, ...)
    return graphdef, adapters, base


def _count(tree: Any) -> tuple[int, int]:
    leaves = jax.tree.leaves(tree)
    return (
        sum(int(np.prod(x.shape)) for x in leaves),
        sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves),
    )


@dataclasses.dataclass(frozen=True)
class AdapterSummaryRow:
    name: str
    group: str
    type: str
    insertion: str
    enabled: bool
    hosts: tuple[str, ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    params: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class AdapterSummary:
    """What :func:`summarize` returns; ``str()`` renders a table.

    Attributes:
      rows: one row per adapter (name, group, type, insertion, enabled, hosts, shapes, params,
        bytes), in chain order.
      base_params, base_bytes: the size of the base model's parameters.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> adapted = jadapters.adapter_transform(nn.Sequential([nn.Dense(2)]), "layers_0")
    >>> adapted = adapted.add_adapter("task", jadapters.IA3Config())
    >>> summary = jadapters.summarize(adapted, adapted.init(jax.random.key(0), jnp.ones((1, 3))))
    >>> summary.adapter_params, summary.base_params, summary.rows[0].hosts
    (2, 8, ('layers_0',))
    """

    rows: tuple[AdapterSummaryRow, ...]
    base_params: int
    base_bytes: int

    @property
    def adapter_params(self) -> int:
        """The number of adapter parameters, all adapters together."""
        return sum(r.params for r in self.rows)

    def __str__(self) -> str:
        lines = [
            f"{'name':<14}{'group':<10}{'type':<16}{'insertion':<10}{'on':<4}"
            f"{'hosts':>6}{'params':>12}{'% of base':>11}"
        ]
        for r in self.rows:
            share = 100.0 * r.params / max(self.base_params, 1)
            lines.append(
                f"{r.name:<14}{r.group or chr(39) * 2:<10}{r.type:<16}{r.insertion:<10}"
                f"{'yes' if r.enabled else 'no':<4}{len(r.hosts):>6}{r.params:>12,}{share:>10.3f}%"
            )
        share = 100.0 * self.adapter_params / max(self.base_params, 1)
        lines.append(
            f"total: {self.adapter_params:,} adapter parameters, {share:.3f}% of the base's "
            f"{self.base_params:,}"
        )
        for r in self.rows:
            lines.append(f"  {r.name}: hosts {list(r.hosts)}")
            for path, shape in r.shapes:
                lines.append(f"    {path}: {shape}")
        return "\n".join(lines)


def _flat(tree: Any) -> list[tuple[str, Any]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out.append(("/".join(keys), leaf))
    return out


def summarize(model: Any, variables: Any = None) -> AdapterSummary:
    """Summarizes a model's adapters: name, group, type, insertion, hosts, shapes, counts.

    Args:
      model: an adapted Linen model (pass its ``variables`` too) or adapted NNX model.
      variables: the Linen model's variables; ``None`` for NNX.

    Raises:
      ValueError: for a model that is not adapted, or an adapter without weights.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
    >>> adapted = jadapters.adapter_transform(nn.Sequential([nn.Dense(2)]), "layers_0")
    >>> adapted = adapted.add_adapter("task", jadapters.IA3Config())
    >>> print(summarize(adapted, adapted.init(jax.random.key(0), jnp.ones((1, 3)))))
    name          group     type            insertion on   hosts      params  % of base
    task          ''        IA3             output    yes      1           2    25.000%
    total: 2 adapter parameters, 25.000% of the base's 8
      task: hosts ['layers_0']
        layers_0/task/scale: (2,)
    """
    view = view_of(model, variables)
    base_params, base_bytes = _count(view.base_params())
    rows = []
    specs = list(view.specs())
    for item in view.weights(specs):
        spec = item.spec
        mine = [
            (f"{host}/{spec.name}/{p}" if host else f"{spec.name}/{p}", x)
            for host, params in item.hosts.items()
            for p, x in _flat(params)
        ]
        params, nbytes = _count([x for _, x in mine])
        rows.append(
            AdapterSummaryRow(
                name=spec.name,
                group=spec.group,
                type=type(spec.cfg).__name__.removesuffix("Config"),
                insertion=spec.insertion,
                enabled=spec.enabled,
                hosts=tuple(item.hosts),
                shapes=tuple((p, tuple(x.shape)) for p, x in mine),
                params=params,
                bytes=nbytes,
            )
        )
    return AdapterSummary(tuple(rows), base_params, base_bytes)
