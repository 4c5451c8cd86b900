"""Where adapter weights live, named once for both front-ends.

* Linen: the ``"adapters"`` collection, ``variables["adapters"]``, nested by host path and
  then adapter name.
* NNX: variables of type :class:`AdapterParam` inside each host's ``adapter_layer``.

Auxiliary losses live in :mod:`jadapters.losses`.

>>> import jax, jax.numpy as jnp, flax.linen as nn, jadapters
>>> model = jadapters.adapter_transform(nn.Sequential([nn.Dense(2)]), "layers_0")
>>> model = model.add_adapter("task", jadapters.IA3Config())
>>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
>>> jadapters.ADAPTER_COLLECTION, jax.tree.map(jnp.shape, variables[jadapters.ADAPTER_COLLECTION])
('adapters', {'layers_0': {'task': {'scale': (2,)}}})
"""

from __future__ import annotations

from flax import nnx

ADAPTER_COLLECTION = "adapters"
NNX_ADAPTER_ATTR = "adapter_layer"


class AdapterParam(nnx.Variable):
    """The NNX variable type of every adapter weight.

    It deliberately does **not** subclass ``nnx.Param``: ``nnx.state(model, nnx.Param)`` is
    exactly the base model's parameters and ``nnx.state(model, AdapterParam)`` exactly the
    adapters'. (Flax's own ``nnx.LoRAParam`` subclasses ``nnx.Param``, so a ``nnx.Param``
    filter also catches it; ours never mixes the two partitions.)

    >>> import jax
    >>> from flax import nnx
    >>> import jadapters
    >>> model = jadapters.adapter_transform(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0))),
    ...                                     "layers/0")
    >>> model.add_adapter("task", jadapters.IA3Config(), rngs=nnx.Rngs(1))
    >>> [v.shape for v in jax.tree.leaves(nnx.state(model, AdapterParam))]
    [(2,)]
    >>> len(jax.tree.leaves(nnx.state(model, nnx.Param)))  # the base: kernel and bias
    2
    """
