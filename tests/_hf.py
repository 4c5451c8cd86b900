"""Hugging Face twins for the exchange tests: a Flax model and a PyTorch one with its weights."""

from __future__ import annotations

import jax
import numpy as np


def twins(flax_cls, torch_cls, config, params=None):
    """``(flax_module, params, make_twin)``: a Flax model of ``config`` (seed 0) and a function
    that builds a fresh PyTorch ``torch_cls`` in evaluation mode holding ``params`` (default:
    the Flax model's), converted by transformers' own weight loader."""
    import torch
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    flax_model = flax_cls(config, seed=0)
    params = flax_model.params if params is None else params(flax_model.params)

    def make_twin(base_params=params):
        torch.manual_seed(0)
        twin = torch_cls(config).eval()
        load_flax_weights_in_pytorch_model(twin, jax.tree.map(np.array, base_params))
        return twin

    return flax_model.module, params, make_twin


def torch_logits(model, x):
    """A PyTorch model's logits (or output) on ``x``, without gradients, as NumPy."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor(np.asarray(x)))
    return (out.logits if hasattr(out, "logits") else out).numpy()


def moved(tree, seed=0, scale=0.3):
    """``tree`` (adapter weights) plus Gaussian noise: off their identity init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: v + scale * rng.standard_normal(v.shape).astype(v.dtype), tree)
