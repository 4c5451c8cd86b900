"""Ordinary Flax models built from Flax's own layers, with no adapter code in them.

They are the "model you did not write" of the demo, the notebooks, the tests and the
benchmarks: the Linen and NNX transformers have the same architecture and module names, so
the same target patterns fit both:

* Linen paths: ``embed``, ``blocks_0/attn/query``, ``blocks_0/mlp``, ``head``, ...
* NNX paths: ``embed``, ``blocks/0/attn/query``, ``blocks/0/mlp``, ``head``, ...

Inputs are token sequences ``(batch, tokens, features)``; outputs are class logits.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

# --------------------------------------------------------------------------------- Linen


class LinenMLP(nn.Module):
    """``Dense(mlp_dim) -> gelu -> Dense(d_model)``."""

    mlp_dim: int
    d_model: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(x))
        return nn.Dense(self.d_model, name="fc2")(h)


class LinenBlock(nn.Module):
    """Pre-norm transformer block: attention and MLP, each with a residual."""

    d_model: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.LayerNorm(name="ln1")(x)
        h = nn.MultiHeadDotProductAttention(
            self.num_heads, dropout_rate=self.dropout, deterministic=not train, name="attn"
        )(h, h)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        h = LinenMLP(self.mlp_dim, self.d_model, name="mlp")(nn.LayerNorm(name="ln2")(x))
        return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class LinenTransformer(nn.Module):
    """A small encoder-only transformer classifier (Linen).

    >>> model = LinenTransformer(num_classes=3, d_model=16, num_layers=1, num_heads=2)
    >>> x = jnp.ones((2, 8, 8))
    >>> model.apply(model.init(jax.random.key(0), x), x).shape
    (2, 3)
    """

    num_classes: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    max_len: int = 512
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.Dense(self.d_model, name="embed")(x)
        pos = self.param(
            "pos", nn.initializers.normal(0.02), (self.max_len, self.d_model), jnp.float32
        )
        x = x + pos[None, : x.shape[1]].astype(x.dtype)
        for i in range(self.num_layers):
            x = LinenBlock(
                self.d_model, self.num_heads, self.mlp_dim, self.dropout, name=f"blocks_{i}"
            )(x, train=train)
        x = nn.LayerNorm(name="ln_f")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


class LinenConvNet(nn.Module):
    """A small CNN with batch norm for ``(batch, height, width, channels)`` images."""

    num_classes: int
    features: int = 16

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        for i in range(2):
            x = nn.Conv(self.features, (3, 3), name=f"conv_{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"bn_{i}")(x)
            x = nn.relu(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


# ----------------------------------------------------------------------------------- NNX


class NNXMLP(nnx.Module):
    def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_model, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, d_model, rngs=rngs)
        self.out_features = d_model

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


class NNXBlock(nnx.Module):
    def __init__(self, d_model, num_heads, mlp_dim, dropout=0.0, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads, d_model, dropout_rate=dropout, decode=False, rngs=rngs
        )
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp = NNXMLP(d_model, mlp_dim, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, h))
        return x + self.drop(self.mlp(self.ln2(x)))


class NNXTransformer(nnx.Module):
    """The NNX twin of :class:`LinenTransformer` (same architecture and module names).

    >>> model = NNXTransformer(8, num_classes=3, d_model=16, num_layers=1, num_heads=2,
    ...                        rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 8, 8))).shape
    (2, 3)
    """

    def __init__(
        self,
        in_features: int,
        *,
        num_classes: int,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_dim: int = 128,
        max_len: int = 512,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Linear(in_features, d_model, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (max_len, d_model)) * 0.02)
        self.blocks = nnx.List(
            [NNXBlock(d_model, num_heads, mlp_dim, dropout, rngs=rngs) for _ in range(num_layers)]
        )
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        x = x + self.pos[None, : x.shape[1]].astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(axis=1))


class NNXConvNet(nnx.Module):
    """The NNX twin of :class:`LinenConvNet`."""

    def __init__(self, in_channels: int, *, num_classes: int, features: int = 16, rngs):
        self.conv_0 = nnx.Conv(in_channels, features, (3, 3), rngs=rngs)
        self.bn_0 = nnx.BatchNorm(features, rngs=rngs)
        self.conv_1 = nnx.Conv(features, features, (3, 3), rngs=rngs)
        self.bn_1 = nnx.BatchNorm(features, rngs=rngs)
        self.head = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn_0(self.conv_0(x)))
        x = nnx.relu(self.bn_1(self.conv_1(x)))
        return self.head(x.mean(axis=(1, 2)))


class NNXLayerStack(nnx.Module):
    """``layers`` blocks created with ``nnx.vmap`` and run with ``nnx.scan``: Flax's recipe for
    a scanned layer stack (MaxText's NNX pattern). One block's weights are stacked on a
    leading axis of size ``layers``, at path ``layers``.

    ``make_block(rngs)`` builds one block, which maps ``x`` to an ``x`` of the same shape;
    ``transform_metadata`` goes to ``nnx.vmap`` (``{nnx.PARTITION_NAME: "layers"}`` names the
    stack's axis in the weights' sharding annotations).

    >>> from flax import nnx
    >>> stack = NNXLayerStack(lambda rngs: nnx.Linear(2, 2, rngs=rngs), 3)
    >>> stack.layers.kernel.shape
    (3, 2, 2)
    """

    def __init__(self, make_block, layers: int, *, seed: int = 0, transform_metadata=None):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=transform_metadata or {})
        def create(rngs):
            return make_block(rngs)

        self.layers = create(nnx.Rngs(seed))

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.layers)
