"""Shared test setup.

The environment is configured before JAX is imported: eight fake CPU devices (for sharding
tests) and rank promotion as an error, so that an accidental broadcast between arrays of
different ranks fails loudly instead of silently producing a wrong shape. In this process
XLA skips most of its optimization passes (``jax_disable_most_optimizations``): the tests here
compile far more programs than they run steps, and none of them measures speed. The scripts
and notebooks the tests run in their own processes, which train for real, keep them.
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("XLA_FLAGS", _DEVICE_FLAG)
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_DEVICE_FLAG}"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_disable_most_optimizations", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import jadapters.registry  # noqa: E402

settings.register_profile("jadapters", max_examples=25, deadline=None)
settings.load_profile("jadapters")


def random_like(tree, seed=0, scale=0.5):
    """Replaces every array leaf of ``tree`` by ``scale * normal`` noise of its shape and dtype.

    The noise comes from NumPy, so no JAX computation has to be compiled for it.
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(tree)
    new = [
        jnp.asarray(scale * rng.standard_normal(np.shape(x)), dtype=jnp.result_type(x))
        for x in leaves
    ]
    return jax.tree.unflatten(treedef, new)


def normal(shape, seed=0, dtype=np.float32):
    """A standard normal array made with NumPy (nothing to compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=dtype)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def np_rng():
    return np.random.default_rng(0)


@pytest.fixture
def randomize():
    """``randomize(tree, seed=0, scale=0.5)``: ``tree`` with every leaf replaced by noise."""
    return random_like


@pytest.fixture
def restore_registry():
    """Restores the adapter and strategy registries after a test that registers types."""
    adapters = dict(jadapters.registry._ADAPTERS)
    strategies = dict(jadapters.registry._STRATEGIES)
    yield
    jadapters.registry._ADAPTERS.clear()
    jadapters.registry._ADAPTERS.update(adapters)
    jadapters.registry._STRATEGIES.clear()
    jadapters.registry._STRATEGIES.update(strategies)
