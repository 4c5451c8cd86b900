"""Many hosts on JAX's own engine: two CPU processes under ``jax.distributed`` (gloo
collectives) train data-parallel on a base sharded over both, save from both processes with
orbax, and one process loads the result, which equals the same steps run in one process.

The processes are ``tests/_multihost_worker.py``, started here on a free port; nothing but
``jax.distributed`` and orbax passes between them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import _multihost_worker as worker
import flax.linen as nn
import jax
import numpy as np
import pytest

import jadapters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(directory: str) -> None:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        # XLA's optimizations as in this process (conftest turns most off): the base is
        # initialized here too, and its content digest must match bit for bit
        "JAX_DISABLE_MOST_OPTIMIZATIONS": str(
            int(jax.config.read("jax_disable_most_optimizations"))
        ),
    }
    script = os.path.join(ROOT, "tests", "_multihost_worker.py")
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, script, port, str(i), directory],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i} failed ({proc.returncode}):\n{out[-4000:]}"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("multihost"))
    _run_two_processes(directory)
    return directory


def _reference():
    """The same steps in this one process, on one device."""
    adapted, base, adapters, tx = worker.start()
    x, y = worker.batch()
    step = jax.jit(worker.step_fn(adapted, tx))
    adapters, opt_state = worker.train(step, adapters, tx.init(adapters), base, (x, y))
    return adapted, base, nn.unbox(adapters), nn.unbox(opt_state)


def _close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)


def test_two_processes_train_save_and_load_in_one(two_process_run):
    adapted, base, adapters, opt_state = _reference()
    path = os.path.join(two_process_run, "adapters")
    meta = jadapters.read_adapter_metadata(path)
    assert meta["base_content"] is True  # digested shard-wise: no process held the base whole
    written = {p for _, dirs, _ in os.walk(meta["version_dir"]) for p in dirs}
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= written  # each process wrote its shards
    # The base's content, digested on two processes over a sharded base, checks against the
    # same base here on one device.
    fresh = jadapters.adapter_transform(worker.MLP(), "up|down")
    loaded, variables = jadapters.load_adapters(path, fresh, {"params": base}, check_base="content")
    assert loaded.get_enabled_adapters() == ["t"]
    _close(nn.unbox(variables["adapters"]), adapters)

    other = jax.tree.map(lambda k: k + 1.0, base)
    with pytest.raises(ValueError, match="other values"):
        jadapters.load_adapters(path, fresh, {"params": other})

    with jadapters.AdapterCheckpointManager(os.path.join(two_process_run, "steps")) as manager:
        restored = manager.restore(adapters=adapters, opt_state=opt_state)
    assert restored.step == worker.STEPS
    _close(restored.adapters, adapters)
    _close(restored.opt_state, opt_state)
