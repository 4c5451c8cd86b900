"""The pretrained base that ships with jadapters: the demo's transformer, trained on upright digits.

Every notebook, the demo and the guide's longer examples start from this one model, so that
what they adapt is a model that already knows its task. The weights are in
``jadapters/demo/base_weights.npz`` (259 KiB), written by ``python -m
jadapters.demo.pretrain`` (see :mod:`jadapters.demo.pretrain`) from the settings in
:class:`BaseConfig`, which the file records.

The file is a plain NumPy ``.npz`` archive: one float32 array per parameter, named by its
path (``"blocks_0/attn/query/kernel"``), and ``"__meta__"``, a JSON string of how it was
built and how accurate it is. It is read with ``allow_pickle=False`` and checked before use:
its recorded config must be the one this code builds, and every array must have exactly the
shape and dtype of the model's parameter of that name, and be finite.

>>> model, variables = pretrained_base()
>>> type(model).__name__, sorted(variables)
('LinenTransformer', ['params'])
>>> base_info()["source_test_accuracy"] > 0.95
True
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jadapters.demo.data import NUM_CLASSES
from jadapters.demo.models import LinenTransformer, NNXTransformer

WEIGHTS_PATH = Path(__file__).with_name("base_weights.npz")
META_KEY = "__meta__"
FORMAT = 1
TOKENS = 8  # an image is 8 tokens (pixel rows) of 8 features


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseConfig:
    """Everything the pretrained base depends on; the file records it.

    ``seed`` seeds the train/test split (:func:`jadapters.demo.data.train_test_split`), the
    initialization and the batches. The base is trained on the *train* split of that seed;
    its accuracies are measured on the test split.
    """

    seed: int = 0
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 1e-3
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    mlp_dim: int = 128

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SHIPPED = BaseConfig()


def linen_model(config: BaseConfig = SHIPPED) -> LinenTransformer:
    """The (unmodified) Linen transformer the base config describes."""
    return LinenTransformer(
        num_classes=NUM_CLASSES,
        d_model=config.d_model,
        num_layers=config.layers,
        num_heads=config.heads,
        mlp_dim=config.mlp_dim,
        max_len=TOKENS,
    )


def nnx_model(config: BaseConfig = SHIPPED, *, seed: int = 0) -> NNXTransformer:
    """The NNX twin of :func:`linen_model`, randomly initialized from ``seed``."""
    from flax import nnx

    return NNXTransformer(
        TOKENS,
        num_classes=NUM_CLASSES,
        d_model=config.d_model,
        num_layers=config.layers,
        num_heads=config.heads,
        mlp_dim=config.mlp_dim,
        max_len=TOKENS,
        rngs=nnx.Rngs(seed),
    )


def flatten(params: Any) -> dict[str, np.ndarray]:
    """``{"blocks_0/attn/query/kernel": array, ...}`` from a Linen params tree."""
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        flat["/".join(str(k.key) for k in path)] = np.asarray(leaf)
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of :func:`flatten`."""
    tree: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


def expected_arrays(config: BaseConfig = SHIPPED) -> dict[str, jax.ShapeDtypeStruct]:
    """The model's parameters by name, as shapes and dtypes (nothing is computed)."""
    model = linen_model(config)
    example = jax.ShapeDtypeStruct((1, TOKENS, TOKENS), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), example)["params"]
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)
    }


def read_weights(path: str | Path = WEIGHTS_PATH) -> tuple[dict[str, np.ndarray], dict]:
    """Reads and checks a base-weights file; returns ``(arrays by name, metadata)``.

    Raises:
      ValueError: for a file that is not such an archive, was built with another config than
        :data:`SHIPPED`, or whose arrays differ from the model's parameters in name, shape or
        dtype, or are not finite.
    """
    path = Path(path)
    hint = "rebuild it with `python -m jadapters.demo.pretrain`"
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the base weights at {path}: {err}; {hint}.") from None
    meta_array = arrays.pop(META_KEY, None)
    if meta_array is None or meta_array.dtype.kind != "U" or meta_array.shape != ():
        raise ValueError(f"{path} has no {META_KEY!r} string; {hint}.")
    try:
        meta = json.loads(str(meta_array))
    except ValueError as err:
        raise ValueError(f"{path}: {META_KEY!r} is not JSON ({err}); {hint}.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a format-{FORMAT} base-weights file; {hint}.")
    if meta.get("config") != SHIPPED.to_dict():
        raise ValueError(
            f"{path} was built with config {meta.get('config')}, but this code builds "
            f"{SHIPPED.to_dict()}; {hint}."
        )
    expected = expected_arrays(SHIPPED)
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise ValueError(f"{path}: missing arrays {missing}, unexpected arrays {extra}; {hint}.")
    for name, want in expected.items():
        got = arrays[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"{path}: {name} is {got.dtype}{list(got.shape)}, the model's parameter is "
                f"{want.dtype}{list(want.shape)}; {hint}."
            )
        if not np.isfinite(got).all():
            raise ValueError(f"{path}: {name} has non-finite values; {hint}.")
    return arrays, meta


@functools.cache
def _shipped() -> tuple[dict[str, np.ndarray], dict]:
    arrays, meta = read_weights(WEIGHTS_PATH)
    for array in arrays.values():
        array.flags.writeable = False  # shared by every caller: nobody may change it
    return arrays, meta


def base_info() -> dict[str, Any]:
    """The shipped base's metadata: ``config``, ``source_test_accuracy``,
    ``target_test_accuracy`` (on the shifted digits, before any adapting), ``data``,
    ``params``, ``built_with`` (library versions)."""
    return json.loads(json.dumps(_shipped()[1]))  # a copy


def pretrained_base(framework: str = "linen") -> tuple[Any, Any]:
    """The demo's transformer with the shipped pretrained weights.

    Args:
      framework: ``"linen"`` or ``"nnx"``.

    Returns:
      Linen: ``(model, {"params": params})``, an unmodified
      :class:`~jadapters.demo.models.LinenTransformer` and its variables. NNX: ``(model,
      state)``, a new :class:`~jadapters.demo.models.NNXTransformer` holding the same
      numbers, and its ``nnx.state(model, nnx.Param)``.

    Raises:
      ValueError: for another ``framework``, or a damaged weights file.

    >>> import numpy as np
    >>> from jadapters.demo.data import load_digits_tokens
    >>> x = load_digits_tokens()[0][:4]
    >>> model, variables = pretrained_base("linen")
    >>> net, _ = pretrained_base("nnx")
    >>> bool(np.allclose(model.apply(variables, x), net(x), atol=1e-4))
    True
    """
    if framework not in ("linen", "nnx"):
        raise ValueError(f'framework must be "linen" or "nnx", got {framework!r}.')
    params = unflatten({k: jnp.asarray(v) for k, v in _shipped()[0].items()})
    if framework == "linen":
        return linen_model(SHIPPED), {"params": params}
    from flax import nnx

    # Built abstractly and filled in: no random initialization to compute and throw away.
    abstract = nnx.eval_shape(lambda: nnx_model(SHIPPED))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    blocks = [params.pop(f"blocks_{i}") for i in range(SHIPPED.layers)]
    nnx.replace_by_pure_dict(state, {**params, "blocks": dict(enumerate(blocks))})
    net = nnx.merge(graphdef, state, jax.tree.map(_concrete, rest))
    return net, nnx.state(net, nnx.Param)


def _concrete(leaf: jax.ShapeDtypeStruct) -> jax.Array:
    """A concrete value for a variable the NNX model holds beside its parameters (the PRNG
    key and count of its dropout layers, which are off)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key(0)
    return jnp.zeros(leaf.shape, leaf.dtype)
