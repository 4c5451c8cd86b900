"""``python -m jadapters.demo.pretrain``: builds the pretrained base that ships with jadapters.

Trains the demo's transformer (:func:`jadapters.demo.pretrained.linen_model`) on the upright
8x8 digits that ship with scikit-learn (the train split of
:func:`jadapters.demo.data.train_test_split`; nothing is downloaded) with every setting fixed
by :class:`~jadapters.demo.pretrained.BaseConfig`, then writes
``jadapters/demo/base_weights.npz`` and prints its size and the base's test accuracy.

The same code and library versions give the same file, byte for byte: the seeds are fixed,
XLA's CPU results are deterministic, and the archive is written with fixed timestamps. (Other
versions of JAX, or other hardware, may round differently and end a little apart.)

Pass ``--out PATH`` to write elsewhere, e.g. to compare with the shipped file.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jadapters.demo import data, pretrained, runs
from jadapters.demo.pretrained import SHIPPED, BaseConfig

# A fixed timestamp for every archive member, so that equal arrays give equal files.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def pretrain(config: BaseConfig = SHIPPED, *, progress: bool = True) -> tuple[dict, dict[str, Any]]:
    """Trains the base from scratch on the source domain.

    Returns:
      ``(params, meta)``: the Linen params and the metadata the file records (config,
      accuracies on the source test split and on each shifted version of it, data, sizes,
      library versions).
    """
    images, labels = data.load_digits_tokens()
    src = data.train_test_split(images, labels, seed=config.seed)
    model = pretrained.linen_model(config)
    # XLA's RngBitGenerator ("rbg") compiles faster than threefry on CPU; fixed key, fixed
    # numbers.
    init_key, batch_key = jax.random.split(jax.random.key(config.seed, impl="rbg"))
    params = runs.init_params(model, init_key)
    indices = runs.batch_indices(batch_key, len(src.x_train), config.steps, config.batch_size)
    params, log = runs.train_full(
        model,
        params,
        src.x_train,
        src.y_train,
        indices,
        lr=config.learning_rate,
        desc="pretrain",
        progress=progress,
    )
    apply = runs.logits_fn(model)
    variables = {"params": params}
    shifted = {
        kind: round(
            runs.accuracy(apply, variables, data.shift_domain(src.x_test, kind), src.y_test), 4
        )
        for kind in data.SHIFTS
    }
    meta = {
        "format": pretrained.FORMAT,
        "config": config.to_dict(),
        "source_test_accuracy": round(runs.accuracy(apply, variables, src.x_test, src.y_test), 4),
        "target_test_accuracy": shifted[data.DEFAULT_SHIFT],
        "shifted_test_accuracy": shifted,
        "final_train_loss": round(float(np.mean(log.losses[-20:])), 4),
        "data": data.SOURCE_DESCRIPTION,
        "split": {"train": len(src.x_train), "test": len(src.x_test)},
        "params": runs.count_params(params),
        "built_with": {"jax": jax.__version__, "numpy": np.__version__},
    }
    return params, meta


def archive_bytes(params: dict, meta: dict[str, Any]) -> bytes:
    """The ``.npz`` file for ``params`` and ``meta``: deflated, with fixed timestamps."""
    arrays = {**pretrained.flatten(params), pretrained.META_KEY: np.array(json.dumps(meta))}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]))
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jadapters.demo.pretrain",
        description=(
            "Pretrains the demo's transformer on the upright 8x8 digits that ship with "
            "scikit-learn (no download) and writes the base weights that ship with jadapters."
        ),
    )
    parser.add_argument("--out", default=str(pretrained.WEIGHTS_PATH), help="file to write")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    params, meta = pretrain(SHIPPED, progress=not args.no_progress)
    blob = archive_bytes(params, meta)
    out = Path(args.out)
    out.write_bytes(blob)
    pretrained.read_weights(out)  # what we wrote must pass the checks every reader makes
    print(
        f"wrote {out}: {len(blob):,} bytes ({len(blob) / 1024:.1f} KiB), {meta['params']:,} "
        "float32 parameters"
    )
    print(f"config: {json.dumps(meta['config'])}")
    print(
        f"test accuracy: {100 * meta['source_test_accuracy']:.1f}% on the upright digits, "
        f"{100 * meta['target_test_accuracy']:.1f}% on the shifted ones "
        f"({data.DEFAULT_SHIFT}, before any adapting)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
