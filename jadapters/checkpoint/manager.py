"""``AdapterCheckpointManager``: step checkpoints of adapter training on orbax's manager.

Each step holds the adapter weights, optionally the optimizer state (which exists for adapter
leaves only) and optionally JSON metadata (:func:`jadapters.adapter_metadata`), in the layout
:func:`jadapters.save_adapters` writes (see :mod:`jadapters.checkpoint.store`), verified the
same way on restore. The base is not part of it: it does not change while adapters train, so
save it once, on its own.

For an exact NNX resume of adapters that use dropout or stochastic depth, save their PRNG
stream state too, e.g. ``adapters={"params": ..., "rngs": nnx.to_pure_dict(nnx.state(model,
nnx.RngState))}``.

One manager saves to a ``directory`` at a time (its first save removes the debris of killed
saves, which would include another writer's save in progress). In a multi-process job
(``jax.distributed``) every process opens the manager and calls :meth:`save` and
:meth:`restore` with its part of the same global arrays: each writes its own shards, process 0
alone removes debris and writes the file lists (see :mod:`jadapters.checkpoint.store`).
Managers that only restore may run beside it, in other processes: each restore reads the
directory as it is then, reads one whole step, and starts again on the new latest step if a
save prunes the one it reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jadapters.checkpoint import files, store


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
    """What :meth:`AdapterCheckpointManager.restore` returns.

    Attributes:
      step: the step restored.
      adapters: the adapter weights.
      opt_state: the optimizer state, or ``None`` if it was not saved or no target was given.
      metadata: the JSON metadata saved with the step, or ``None``.

    >>> import tempfile, jax.numpy as jnp
    >>> with AdapterCheckpointManager(tempfile.mkdtemp()) as manager:
    ...     _ = manager.save(7, {"w": jnp.ones((2,))}, metadata={"note": "after warm-up"})
    ...     restored = manager.restore()
    >>> restored.step, restored.adapters["w"].tolist(), restored.opt_state, restored.metadata
    (7, [1.0, 1.0], None, {'note': 'after warm-up'})
    """

    step: int
    adapters: Any
    opt_state: Any
    metadata: dict | None


ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's record of a step, with its items


def _check_whole(where: str, step: int) -> list[str]:
    """The items orbax recorded for the step; raises ``ValueError`` unless each is there with
    exactly the files its list names, at their listed sizes: a step is restored whole or not
    at all."""
    bad = f"step {step} in {os.path.dirname(where)!r} is incomplete (partly deleted or damaged)"
    record = os.path.join(where, ORBAX_STEP_METADATA)
    if not os.path.lexists(record):
        raise ValueError(f"{bad}: orbax's {ORBAX_STEP_METADATA} is missing.")
    try:  # bounded reads of regular files only: a FIFO or a huge file is an error, not a hang
        record = files.read_json(record, where)
        items = sorted(record["item_handlers"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{bad}: orbax's {ORBAX_STEP_METADATA} is malformed: {err}") from None
    if store.ARRAYS not in items:
        raise ValueError(f"{bad}: orbax's {ORBAX_STEP_METADATA} lists no {store.ARRAYS!r} item.")
    for item in items:  # whole: each item's files as listed, by size (restore checks hashes)
        try:
            store.verify_files(where, item, hashes=False)
        except ValueError as err:
            raise ValueError(f"{bad}: {err}") from None
    return items


def _restore_args(target: Any) -> ocp.args.PyTreeRestore:
    """Restores onto ``target``'s structure, dtypes and shardings; as saved for ``None``."""
    if target is None:
        return ocp.args.PyTreeRestore()

    def abstract(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x)

    target = jax.tree.map(abstract, target)
    return ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target))


class AdapterCheckpointManager:
    """Keeps the last ``max_to_keep`` step checkpoints of adapter training in ``directory``.

    A thin layer on ``orbax.checkpoint.CheckpointManager``: each step is written atomically
    (a crash mid-save leaves the earlier steps readable) and old steps are deleted whole (a
    crash mid-delete never leaves a step listed without some of its items).

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
        self._manager = store.open_manager(
            self._directory, max_to_keep=max_to_keep, async_save=async_save
        )
        self._async = async_save
        self._saved = False  # only a manager that saves removes anything

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

        The first save of a manager removes the debris of saves killed before it (orbax's
        temporary directories); each save removes the steps it prunes.

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
        items = {store.ARRAYS: ocp.args.PyTreeSave(adapters)}
        if opt_state is not None:
            items[store.OPT_STATE] = ocp.args.PyTreeSave(opt_state)
        if metadata is not None:
            try:
                metadata = json.loads(json.dumps(metadata, allow_nan=False))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"metadata must be JSON-serializable, without NaN or infinities: {err}"
                ) from None
            items[store.METADATA] = ocp.args.JsonSave(metadata)
        self._manager.wait_until_finished()
        if store.primary():
            if self._saved:
                store.empty_deleted(self._directory)
            else:
                store.clean(self._directory)
        self._saved = True
        store.barrier("manager_clean")
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if not self._async:
            self._empty_deleted()
        return saved

    def _empty_deleted(self) -> None:
        if store.primary():
            store.empty_deleted(self._directory)
        store.barrier("manager_deleted")

    def restore(
        self, step: int | None = None, *, adapters: Any = None, opt_state: Any = None
    ) -> RestoredCheckpoint:
        """Restores a step (the latest for ``step=None``) onto the given targets.

        The step must be whole: every item orbax recorded for it present, with the files
        listed at save time (a step of which only some items remain is an error, not a
        partial restore); every file read is first checked against its listed size and
        checksum. The steps are those on disk now, so a manager in another process restores
        the writer's latest step; if a save prunes the step being read, the read starts
        again on the new latest step (for ``step=None``) or says so.

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
          ValueError: if there is no checkpoint (at ``step``), it is damaged, or it does not
            fit the targets.
        """
        self._manager.wait_until_finished()
        return store.read_version(
            self._directory, step, lambda s: self._restore(s, adapters, opt_state)
        )

    def _restore(self, step: int | None, adapters: Any, opt_state: Any) -> RestoredCheckpoint:
        steps = store.steps(self._directory)
        if step is None:
            raise ValueError(f"no checkpoint to restore in {self._directory!r}.")
        if step not in steps:
            raise ValueError(f"step {step} is not in {self._directory!r}; saved steps: {steps}.")
        where = os.path.join(self._directory, str(step))
        items = _check_whole(where, step)
        targets = {store.ARRAYS: adapters}
        if opt_state is not None:
            if store.OPT_STATE not in items:
                raise ValueError(f"step {step} has no optimizer state; pass opt_state=None.")
            targets[store.OPT_STATE] = opt_state
        out = {item: store.restore(where, item, _restore_args(t)) for item, t in targets.items()}
        return RestoredCheckpoint(  # every item read from the step, or an error
            step=step,
            adapters=out[store.ARRAYS],
            opt_state=out.get(store.OPT_STATE),
            metadata=store.read_json(where) if store.METADATA in items else None,
        )

    def latest_step(self) -> int | None:
        """The latest saved step, or ``None``: those on disk when the manager opened and those
        it saved since (orbax's record; :meth:`restore` looks at the directory anew)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, ascending, as :meth:`latest_step` knows them."""
        return sorted(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Blocks until a background save has finished."""
        self._manager.wait_until_finished()
        if self._saved:
            self._empty_deleted()

    def close(self) -> None:
        self._manager.close()
        if self._saved:
            self._empty_deleted()

    def __enter__(self) -> AdapterCheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
