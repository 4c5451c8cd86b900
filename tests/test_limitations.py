"""What docs/LIMITATIONS.md says is refused is refused, with the message it quotes.

A Linen ``nn.scan``/``nn.vmap`` whose ``variable_axes`` do not carry the ``"adapters"``
collection cannot hold per-layer adapter weights: the error names the construct and the one
line to add. (With it, and for NNX ``nnx.vmap``/``nnx.scan`` stacks, adapters work:
``tests/test_scan.py``.)
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jadapters
from tests._frontends import LinenScanLayer, LinenScanStack, NNXScanBlock, NNXScanStack

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = jadapters.LinearAdapterConfig(dim=2)


# --- Linen: nn.scan and nn.vmap ---------------------------------------------------------------


class LinenVmapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        ensemble = nn.vmap(
            LinenScanLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=3,
        )
        return ensemble(name="layers")(x)[0]


class LinenUnrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x, _ = LinenScanLayer(name=f"layers_{i}")(x)
        return x


LINEN_MESSAGE = (
    r"adapter 's' has no weights at host 'layers/mlp': the host runs inside a lifted "
    r"transform \(nn\.scan, nn\.vmap\) that does not carry the 'adapters' collection.*"
    r"variable_axes=\{'params': 0, jadapters\.ADAPTER_COLLECTION: 0\}"
)


@pytest.mark.parametrize("stack", [LinenScanStack, LinenVmapped])
def test_linen_stacks_without_the_adapter_collection_name_the_fix(stack):
    """A scan/vmap that does not carry the 'adapters' collection cannot hold per-layer
    adapter weights; the error says which line to add (tests/test_scan.py: with it, works)."""
    adapted = jadapters.adapter_transform(stack(), r".*mlp").add_adapter("s", CFG)
    with pytest.raises(ValueError, match=LINEN_MESSAGE):
        adapted.init(jax.random.key(0), jnp.ones((2, 4)))


def test_linen_unrolled_layers_adapt():
    adapted = jadapters.adapter_transform(LinenUnrolled(), r".*mlp").add_adapter("s", CFG)
    variables = adapted.init(jax.random.key(0), jnp.ones((2, 4)))
    assert sorted(variables["adapters"]) == ["layers_0", "layers_1", "layers_2"]


def test_linen_remat_is_not_a_stack():
    """``nn.remat`` carries every collection: adapters inside it work (no limitation)."""

    class Remat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.remat(LinenScanLayer)(name="layer")(x)[0]

    adapted = jadapters.adapter_transform(Remat(), r".*mlp").add_adapter("s", CFG)
    variables = adapted.init(jax.random.key(0), jnp.ones((2, 4)))
    assert adapted.apply(variables, jnp.ones((2, 4))).shape == (2, 4)


# --- NNX: nnx.vmap + nnx.scan -------------------------------------------------------------------


class NNXUnrolled(nnx.Module):
    def __init__(self):
        self.layers = nnx.List([NNXScanBlock(nnx.Rngs(i)) for i in range(3)])

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return x


@pytest.mark.parametrize("pattern", ["layers/mlp", r".*mlp"])
def test_nnx_vmap_scan_stack_is_no_longer_refused(pattern):
    """Adapters on an nnx.vmap/nnx.scan stack get one weight slice per layer."""
    model = jadapters.adapter_transform(NNXScanStack(), pattern)
    model.add_adapter("s", CFG, rngs=nnx.Rngs(1))
    assert model(jnp.ones((2, 4))).shape == (2, 4)
    adapters = nnx.to_pure_dict(nnx.state(model, jadapters.AdapterParam))
    assert jax.tree.leaves(adapters)[0].shape[0] == 3


def test_nnx_unrolled_layers_adapt():
    model = jadapters.adapter_transform(NNXUnrolled(), r"layers/\d+/mlp")
    model.add_adapter("s", CFG, rngs=nnx.Rngs(1))
    assert model(jnp.ones((2, 4))).shape == (2, 4)
    adapters = nnx.to_pure_dict(nnx.state(model, jadapters.AdapterParam))
    assert sorted(adapters["layers"]) == [0, 1, 2]


def test_the_limitations_page_quotes_these_refusals():
    text = (ROOT / "docs" / "LIMITATIONS.md").read_text()
    for construct in ("nn.scan", "nn.vmap", "nnx.vmap", "nnx.scan", "ADAPTER_COLLECTION: 0"):
        assert construct in text
