"""The demo's data: scikit-learn's bundled 8x8 handwritten digits as token sequences.

The digits (1,797 grey-scale 8x8 images of the digits 0-9, from the UCI ML hand-written
digits data set) ship inside the scikit-learn package, so nothing is downloaded.

Each image becomes a sequence of 8 tokens, one per pixel row, each token the row's 8 pixel
intensities scaled to ``[0, 1]``: arrays of shape ``(N, 8, 8)``, float32, ready for
:class:`jadapters.demo.models.LinenTransformer`.

The *source* domain is the upright digits. The *target* domain (:func:`shift_domain`) is the
same digits rotated by 90 degrees and inverted: the tokens become the image's columns (so
every token, and every position's meaning, changes) and the ink turns from bright to dark.
The classes stay the same, so the pretrained head still means something, but the features
the frozen base computes do not fit the new inputs: the pretrained model is near chance there.
Training the head alone recovers part of it; adapters inside the blocks re-route the features
and come closer to full fine-tuning.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

NUM_CLASSES = 10
SHIFTS = ("rotate", "invert", "rotate+invert")
DEFAULT_SHIFT = "rotate+invert"
SHIFT_DESCRIPTIONS = {
    "rotate": "rotated by 90 degrees (tokens become image columns)",
    "invert": "inverted (1 - x: dark ink on a bright background)",
    "rotate+invert": "rotated by 90 degrees (tokens become image columns) and inverted (1 - x)",
}
SOURCE_DESCRIPTION = (
    "scikit-learn's bundled 8x8 handwritten digits (sklearn.datasets.load_digits: 1,797 "
    "images, classes 0-9; ships with the package, nothing is downloaded)"
)


class Split(NamedTuple):
    """A train/test split: images ``(N, 8, 8)`` float32 in ``[0, 1]``, labels ``(N,)`` int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_tokens() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``(images (N, 8, 8) float32 in [0, 1], labels (N,) int32)``.

    Token ``t`` of an image is its pixel row ``t``; its 8 features are that row's pixels.

    >>> x, y = load_digits_tokens()
    >>> x.shape, x.dtype, float(x.min()), float(x.max()), y.shape
    ((1797, 8, 8), dtype('float32'), 0.0, 1.0, (1797,))
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.asarray(digits.images, dtype=np.float32) / 16.0  # pixel intensities are 0..16
    return x, np.asarray(digits.target, dtype=np.int32)


def train_test_split(
    x: np.ndarray, y: np.ndarray, *, seed: int, test_fraction: float = 0.25
) -> Split:
    """A deterministic, stratified split: the same ``seed`` gives the same split.

    Args:
      x: images ``(N, ...)``.
      y: integer labels ``(N,)``.
      seed: seeds the permutation within each class.
      test_fraction: share of each class held out for testing, in ``(0, 1)``.

    Raises:
      ValueError: for ``test_fraction`` outside ``(0, 1)`` or ``x`` and ``y`` of different
        lengths.

    >>> x, y = load_digits_tokens()
    >>> split = train_test_split(x, y, seed=0)
    >>> len(split.x_train) + len(split.x_test) == len(x)
    True
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = max(1, round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train))
    test_idx = np.sort(np.concatenate(test))
    return Split(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def shift_domain(x: np.ndarray, kind: str = DEFAULT_SHIFT) -> np.ndarray:
    """The target domain: the images ``x`` ``(N, 8, 8)`` rotated and/or inverted.

    Args:
      x: images in ``[0, 1]``, shape ``(N, 8, 8)``.
      kind: ``"rotate"`` (90 degrees counter-clockwise: tokens become columns),
        ``"invert"`` (``1 - x``: dark ink on a bright background) or ``"rotate+invert"``.

    Returns:
      The shifted images, same shape and dtype, still in ``[0, 1]``.

    Raises:
      ValueError: for an unknown ``kind``.

    >>> x = np.zeros((1, 8, 8), np.float32); x[0, 0, 7] = 1.0  # top-right pixel
    >>> y = shift_domain(x, "rotate+invert")
    >>> float(y[0, 0, 0]), float(y[0, 0, 7])  # it moved to the top-left, and went dark
    (0.0, 1.0)
    """
    if kind not in SHIFTS:
        raise ValueError(f"kind must be one of {SHIFTS}, got {kind!r}.")
    if "rotate" in kind:
        x = np.rot90(x, k=1, axes=(1, 2))
    if "invert" in kind:
        x = 1.0 - x
    return np.ascontiguousarray(x, dtype=np.float32)
