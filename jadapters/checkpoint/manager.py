"""``AdapterCheckpointManager``: step checkpoints of adapter training on orbax's manager.

Each step holds the adapter weights, optionally the optimizer state (which exists for adapter
leaves only) and optionally JSON metadata (:func:`jadapters.adapter_metadata`). The base is
not part of it: it does not change while adapters train, so save it once, on its own.

For an exact NNX resume of adapters that use dropout or stochastic depth, save their PRNG
stream state too, e.g. ``adapters={"params": ..., "rngs": nnx.state(model, nnx.RngState)
.to_pure_dict()}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

_ADAPTERS = "adapters"
_OPT_STATE = "opt_state"
_METADATA = "metadata"


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
    """What :meth:`AdapterCheckpointManager.restore` returns.

    Attributes:
      step: the step restored.
      adapters: the adapter weights.
      opt_state: the optimizer state, or ``None`` if it was not saved or no target was given.
      metadata: the JSON metadata saved with the step, or ``None``.
    """

    step: int
    adapters: Any
    opt_state: Any
    metadata: dict | None


def _abstract(target: Any) -> Any:
    """Array leaves become ``ShapeDtypeStruct`` keeping their sharding; others pass through."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return ocp.utils.to_shape_dtype_struct(x)

    return jax.tree.map(one, target)


class AdapterCheckpointManager:
    """Keeps the last ``max_to_keep`` step checkpoints of adapter training in ``directory``.

    A thin layer on ``orbax.checkpoint.CheckpointManager``: each step is written atomically
    (a crash mid-save leaves the earlier steps readable) and old steps are deleted.

    Args:
      directory: where the steps go (one subdirectory per step).
      max_to_keep: how many of the latest steps to keep.
      async_save: return from :meth:`save` while the write goes on in the background (call
        :meth:`wait_until_finished` before exiting). Off by default because training steps
        usually donate their input buffers, which must not change while being written.

    Raises:
      ValueError: for ``max_to_keep < 1``.

    >>> import tempfile, jax.numpy as jnp
    >>> with AdapterCheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as manager:
    ...     for step in range(3):
    ...         _ = manager.save(step, {"w": jnp.full((2,), step, jnp.float32)})
    ...     restored = manager.restore(adapters={"w": jnp.zeros((2,), jnp.float32)})
    ...     manager.all_steps(), restored.step, restored.adapters["w"].tolist()
    ([1, 2], 2, [2.0, 2.0])
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = False):
        if not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be a positive int, got {max_to_keep!r}.")
        self._directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self._directory, options=options)

    @property
    def directory(self) -> str:
        return self._directory

    def save(
        self,
        step: int,
        adapters: Any,
        opt_state: Any = None,
        *,
        metadata: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves one step.

        Args:
          step: the training step.
          adapters: the adapter weights (a pytree of arrays).
          opt_state: the optimizer state, if any.
          metadata: JSON-serializable dict saved beside, e.g. :func:`jadapters.adapter_metadata`.
          force: save even if a checkpoint for ``step`` would otherwise be skipped.

        Returns:
          Whether a checkpoint was written.

        Raises:
          ValueError: if ``metadata`` is not JSON-serializable or ``step`` exists already.
        """
        if step in self.all_steps():
            raise ValueError(f"step {step} is already saved in {self._directory!r}.")
        items = {_ADAPTERS: ocp.args.StandardSave(adapters)}
        if opt_state is not None:
            items[_OPT_STATE] = ocp.args.StandardSave(opt_state)
        if metadata is not None:
            try:
                metadata = json.loads(json.dumps(metadata))
            except (TypeError, ValueError) as err:
                raise ValueError(f"metadata must be JSON-serializable: {err}") from None
            items[_METADATA] = ocp.args.JsonSave(metadata)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self, step: int | None = None, *, adapters: Any = None, opt_state: Any = None
    ) -> RestoredCheckpoint:
        """Restores a step (the latest for ``step=None``) onto the given targets.

        Args:
          step: the step, or ``None`` for the latest.
          adapters: target for the adapter weights: a pytree of arrays or
            ``jax.ShapeDtypeStruct`` (with ``sharding``) giving structure, dtypes and
            placement; ``None`` restores the tree as saved.
          opt_state: target for the optimizer state (e.g. ``tx.init(adapters)`` or its
            ``jax.eval_shape``); ``None`` skips it, since an optax state's structure cannot be
            rebuilt from the files alone.

        Returns:
          A :class:`RestoredCheckpoint`.

        Raises:
          ValueError: if there is no checkpoint (at ``step``) or it does not fit the targets.
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise ValueError(f"no checkpoint to restore in {self._directory!r}.")
            step = steps[-1]
        if step not in steps:
            raise ValueError(f"step {step} is not in {self._directory!r}; saved steps: {steps}.")
        present = set(self._item_names(step))
        items = {
            _ADAPTERS: ocp.args.StandardRestore(None if adapters is None else _abstract(adapters))
        }
        if opt_state is not None:
            if _OPT_STATE not in present:
                raise ValueError(f"step {step} has no optimizer state; pass opt_state=None.")
            items[_OPT_STATE] = ocp.args.StandardRestore(_abstract(opt_state))
        if _METADATA in present:
            items[_METADATA] = ocp.args.JsonRestore()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # orbax raises many types for a mismatch or damage
            raise ValueError(
                f"cannot restore step {step} from {self._directory!r}: "
                f"{type(err).__name__}: {str(err)[:500]}"
            ) from None
        return RestoredCheckpoint(
            step=step,
            adapters=out[_ADAPTERS],
            opt_state=out[_OPT_STATE] if opt_state is not None else None,
            metadata=out[_METADATA] if _METADATA in present else None,
        )

    def _item_names(self, step: int) -> list[str]:
        path = os.path.join(self._directory, str(step))
        return [n for n in (_ADAPTERS, _OPT_STATE, _METADATA) if os.path.isdir(f"{path}/{n}")]

    def latest_step(self) -> int | None:
        """The latest saved step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, ascending."""
        return sorted(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Blocks until a background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> AdapterCheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
