import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jadapters


class MLP(nnx.Module):  # any NNX model: this one knows nothing about adapters
    def __init__(self, *, rngs):
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.out = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


x = jax.random.normal(jax.random.key(0), (256, 8))
y = (x[:, 0] > 0).astype(jnp.int32) + 2 * (x[:, 1] > 0).astype(jnp.int32)  # 4 classes
model = MLP(rngs=nnx.Rngs(0))  # stands in for your pretrained model
base_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))

# NNX changes the model in place: the hosts gain adapters, the parameters stay as they were.
model = jadapters.adapter_transform(model, {"mlp": "hidden|out"})
model.add_adapter("mlp:task", jadapters.LoRAConfig(rank=4), rngs=nnx.Rngs(params=1, dropout=2))

optimizer = jadapters.adapter_optimizer(model, optax.adam(1e-2))  # the enabled adapters only
step = jadapters.nnx_train_step(
    lambda m, batch: optax.softmax_cross_entropy_with_integer_labels(m(batch[0]), batch[1]).mean()
)
losses = [float(step(model, optimizer, (x, y))["loss"]) for _ in range(100)]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

# nnx.Param is exactly the base, untouched; jadapters.AdapterParam is every adapter weight.
same = jax.tree.map(jnp.array_equal, base_before, nnx.state(model, nnx.Param))
print("base unchanged:", all(jax.tree.leaves(same)))
adapter_weights = nnx.state(model, jadapters.AdapterParam)
print("adapter weights:", sum(w.size for w in jax.tree.leaves(adapter_weights)))
