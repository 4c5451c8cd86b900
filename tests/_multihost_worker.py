"""One process of the 2-process ``jax.distributed`` run of ``tests/test_multihost.py``.

Run as ``python _multihost_worker.py PORT PROCESS_ID CHECKPOINT_DIR`` (one CPU device per
process, gloo collectives): the processes train ``STEPS`` data-parallel Adam steps of a LoRA
on a base sharded over both processes (no process holds it whole), then save the adapters
(``save_adapters`` with the base's content digest) and a training step
(``AdapterCheckpointManager``: adapters and optimizer state) from both processes. The test
loads both in one process and compares them with the same steps run there. The model, data
and step are defined here once, for both sides.
"""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadapters

STEPS = 3
# The base: ``up``'s input axis and ``down``'s output axis split over the processes (FSDP);
# LoRA's ``a`` at ``up`` and ``b`` at ``down`` follow them, the other factors are replicated.
UP, DOWN = ("data", None), (None, "data")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        part, init = nn.with_partitioning, nn.initializers.lecun_normal()
        h = nn.relu(nn.Dense(16, kernel_init=part(init, UP), name="up")(x))
        return nn.Dense(8, kernel_init=part(init, DOWN), name="down")(h)


def model():
    return jadapters.adapter_transform(MLP(), "up|down").add_adapter(
        "t", jadapters.LoRAConfig(rank=2)
    )


def batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)


def start():
    """``(adapted, base, adapters, tx)``: the same values in every process (from seeds)."""
    adapted = model()
    variables = adapted.init(jax.random.key(0), jnp.zeros((1, 8)))
    adapters = jax.tree.map(lambda a: a + 0.01, variables["adapters"])  # leave the identity
    return adapted, variables["params"], adapters, optax.adam(1e-2)


def step_fn(adapted, tx):
    def step(adapters, opt_state, base, data):
        x, y = data

        def loss(a):
            return jnp.mean((adapted.apply({"params": base, "adapters": a}, x) - y) ** 2)

        grads = jax.grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    return step


def train(step, adapters, opt_state, base, data):
    for _ in range(STEPS):
        adapters, opt_state = step(adapters, opt_state, base, data)
    return adapters, opt_state


def main(port: str, process_id: str, directory: str) -> None:
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id), initialization_timeout=60
    )
    assert jax.process_count() == 2 and len(jax.devices()) == 2
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    adapted, base, adapters, tx = start()
    opt_state = tx.init(adapters)
    a_sh, o_sh, b_sh = (nn.get_sharding(t, mesh) for t in (adapters, opt_state, base))
    d_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    # Every process passes the same global values; each keeps the shards of its own device.
    args = jax.device_put((adapters, opt_state, base, batch()), (a_sh, o_sh, b_sh, d_sh))
    assert not nn.unbox(args[2])["up"]["kernel"].is_fully_addressable  # no process has it all
    step = jax.jit(
        step_fn(adapted, tx), in_shardings=(a_sh, o_sh, b_sh, d_sh), out_shardings=(a_sh, o_sh)
    )
    adapters, opt_state = train(step, *args)
    variables = {"params": args[2], "adapters": adapters}
    jadapters.save_adapters(
        os.path.join(directory, "adapters"), adapted, variables, base_content=True
    )
    with jadapters.AdapterCheckpointManager(os.path.join(directory, "steps")) as manager:
        manager.save(STEPS, nn.unbox(adapters), nn.unbox(opt_state))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
