"""One view of an adapted model, whatever its front-end.

Partition, optimizer masks, merge, summaries and checkpoints are written once, against the
:class:`AdapterView` protocol: list the adapters (name, group, host paths, config, weights),
read the base at a host, put new weights in. Each front-end implements it once
(:mod:`jadapters.linen.view`, :mod:`jadapters.nnx.view`), and an adapted model hands out its
own view through ``model.adapter_view(variables)``, so no module above the front-ends asks
which one it has.

Results that must be native to the front-end (merged base parameters, a model with loaded
adapters, optax labels) come back in the front-end's own structure: a Linen ``params`` dict
or ``(model, variables)``; an NNX ``State`` or the model, changed in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from jadapters._adapter_set import AdapterSet, AdapterSpec
from jadapters.kernels import KernelLayout

TRAINABLE = "adapters"
FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class AdapterWeights:
    """One adapter as the view sees it: its spec and ``{host path: params}``."""

    spec: AdapterSpec
    hosts: Mapping[str, Any]


class AdapterView(Protocol):
    """The protocol every front-end's view implements."""

    framework: str  # "linen" or "nnx": written into checkpoints, never branched on

    def specs(self) -> AdapterSet:
        """Every adapter's name, group, config, insertion and enabled state, in chain order."""

    def groups(self) -> list[str]:
        """The adapter module (group) names, the default ``''`` first (when declared); NNX adds
        the paths of its other adapter-capable modules (the group of an adapter added on one
        itself)."""

    def weights(self, specs: Sequence[AdapterSpec]) -> list[AdapterWeights]:
        """The weights of ``specs`` at each of their hosts.

        Raises:
          ValueError: for an adapter whose weights do not exist yet.
        """

    def host_base(self, path: str) -> Any:
        """The host's own base parameters (nested dict of arrays, adapters excluded)."""

    def base_params(self) -> Any:
        """Every base parameter (any pytree of arrays), for counting."""

    def kernel_layouts(self, inputs: Sequence[Any] | None) -> Mapping[str, KernelLayout]:
        """``{host path: kernel layout}`` of the hosts that are known exactly: every host for
        NNX; for Linen those read in an abstract run on example ``inputs`` (none without). The
        caller infers a missing one from shapes."""

    def replace_base(self, hosts: Mapping[str, Mapping[str, Any]]) -> Any:
        """New base parameters with ``{host path: {param name: array}}`` replaced, in the
        front-end's own structure; the model is not changed."""

    def labels(self) -> Any:
        """``"adapters"``/``"frozen"`` labels of the trainable tree (enabled adapters are
        ``"adapters"``), in the front-end's own structure."""

    def check_hosts(self, spec: AdapterSpec, paths: Sequence[str]) -> None:
        """Raises ``ValueError`` unless adapter ``spec`` saved at ``paths`` fits this model."""

    def in_group(self, group: str, path: str) -> bool:
        """Whether the module at ``path`` is a host of adapter module ``group`` (Linen: one
        of the group's target patterns matches the path)."""

    def insert(self, loaded: Sequence[AdapterWeights], *, rngs: Any = None) -> Any:
        """Adds (or replaces) the adapters with their weights; the front-end's own result."""

    def layer_flags(self, path: str, spec: AdapterSpec, size: int) -> tuple[bool, ...] | None:
        """For adapter ``spec`` at ``path``, a host inside a stack of ``size`` layers: one flag
        per layer, those where it acts (``Target(layers=...)``); ``None``: every layer."""


def view_of(model: Any, variables: Any = None) -> AdapterView:
    """The :class:`AdapterView` of an adapted model (Linen needs its ``variables``).

    Raises:
      ValueError: for a model that is not adapted, or a ``variables`` argument that does not
        fit the front-end (required for Linen, ``None`` for NNX).

    >>> import flax.linen as nn
    >>> view_of(nn.Dense(2))
    Traceback (most recent call last):
    ...
    ValueError: model must be an adapted Linen or NNX model ... got Dense.
    """
    make = getattr(model, "adapter_view", None)
    if make is None:
        raise ValueError(
            "model must be an adapted Linen or NNX model (see jadapters.adapter_transform), "
            f"got {type(model).__name__}."
        )
    return make(variables)


def requested_names(name: Any) -> list[str] | None:
    """``None`` (everything), or the list of names in ``name`` (a name or a list of them)."""
    if name is None:
        return None
    if isinstance(name, str):
        return [name]
    if isinstance(name, Sequence) and name and all(isinstance(n, str) for n in name):
        return list(dict.fromkeys(name))
    raise ValueError(f"name must be None, an adapter name or a list of names, got {name!r}.")
