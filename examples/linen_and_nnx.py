import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jadapters

x = jax.random.normal(jax.random.key(0), (64, 8))
y = (x.sum(axis=1) > 0).astype(jnp.int32)


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# Linen: functional. The wrapper is a new module; weights are variables you pass around.
linen_model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(2)])
base = linen_model.init(jax.random.key(1), x)  # your pretrained {"params": ...}
adapted = jadapters.adapter_transform(linen_model, {"hidden": "layers_0"})
adapted = adapted.add_adapter("hidden:task", jadapters.LoRAConfig(rank=4))
variables = adapted.init_adapters(jax.random.key(2), base, x)
_, adapters = jadapters.split_variables(variables)
step = jadapters.linen_train_step(
    adapted, lambda apply, batch: xent(apply(batch[0]), batch[1]), optax.adam(1e-2)
)
opt_state = step.init(adapters)
for i in range(20):
    adapters, opt_state, metrics = step(adapters, opt_state, base, (x, y), jax.random.key(i))
print(f"Linen: loss {float(metrics['loss']):.3f}")

# NNX: in place. The same call changes the model; the optimizer holds the adapters only.
rngs = nnx.Rngs(0)
nnx_model = nnx.Sequential(nnx.Linear(8, 32, rngs=rngs), nnx.relu, nnx.Linear(32, 2, rngs=rngs))
nnx_model = jadapters.adapter_transform(nnx_model, {"hidden": "layers/0"})  # NNX paths: "/0"
nnx_model.add_adapter(
    "hidden:task", jadapters.LoRAConfig(rank=4), rngs=nnx.Rngs(params=1, dropout=2)
)
optimizer = jadapters.adapter_optimizer(nnx_model, optax.adam(1e-2))
nnx_step = jadapters.nnx_train_step(lambda model, batch: xent(model(batch[0]), batch[1]))
for _ in range(20):
    metrics = nnx_step(nnx_model, optimizer, (x, y))
print(f"NNX:   loss {float(metrics['loss']):.3f}")
