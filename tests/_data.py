"""Real data for the training tests: scikit-learn's bundled 8x8 handwritten digits.

``sklearn.datasets.load_digits`` reads a file that ships inside scikit-learn, so nothing is
downloaded. Each image is read as a sequence of 8 tokens (its rows) of 8 features (its
pixels), the input layout of the demo transformers; the conv nets take the same array with
a channel axis added.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def digits(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``(tokens, labels)``.

    Args:
      n: keep only the first ``n`` examples; all 1797 when ``None``.

    Returns:
      ``tokens``: float32 ``(N, 8, 8)`` with pixel values scaled from ``[0, 16]`` to
      ``[0, 1]``; ``labels``: int32 ``(N,)`` in ``[0, 10)``. Both are read-only: the arrays
      are cached and shared between callers.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    tokens = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int32)
    if n is not None:
        tokens, labels = tokens[:n], labels[:n]
    tokens, labels = np.ascontiguousarray(tokens), np.ascontiguousarray(labels)
    tokens.setflags(write=False)
    labels.setflags(write=False)
    return tokens, labels
