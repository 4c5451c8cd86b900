import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jadapters

model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
x = jax.random.normal(jax.random.key(0), (32, 8))
y = (x[:, 0] > 0).astype(jnp.int32)
base = model.init(jax.random.key(1), x)
adapted = jadapters.adapter_transform(model, {"hidden": "layers_0"})
adapted = adapted.add_adapter("hidden:task", jadapters.LoRAConfig(rank=2))
variables = adapted.init_adapters(jax.random.key(2), base, x)


def loss(v):
    return optax.softmax_cross_entropy_with_integer_labels(adapted.apply(v, x), y).mean()


def base_moved(new):
    old = variables["params"]["layers_0"]["kernel"]
    return not bool(jnp.array_equal(new["params"]["layers_0"]["kernel"], old))


# 1. Best: the train steps (linen_train_step, nnx_train_step) differentiate with respect to
#    the adapters only, so the base gradient is never computed (see the Linen/NNX example).

# 2. Your own loop over all variables: freeze_base gives the base zero updates and keeps
#    optimizer state for the adapters only.
labels = jadapters.param_labels(adapted, variables)  # "adapters" or "frozen", per leaf
tx = jadapters.freeze_base(optax.adam(1e-2), labels)
grads = jax.grad(loss)(variables)  # computes the base gradient too, then throws it away
updates, _ = tx.update(grads, tx.init(variables), variables)
print("freeze_base: base moved?", base_moved(optax.apply_updates(variables, updates)))

# 3. Not optax.masked alone: it passes the raw gradient of the leaves outside its mask through
#    as their update, so the "frozen" base still moves.
mask = jadapters.trainable_mask(adapted, variables)  # True on the enabled adapters only
masked = optax.masked(optax.adam(1e-2), mask)
updates, _ = masked.update(grads, masked.init(variables), variables)
print("optax.masked: base moved?", base_moved(optax.apply_updates(variables, updates)))
