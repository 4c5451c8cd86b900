import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jadapters


class MLP(nn.Module):  # any Linen model: this one knows nothing about adapters
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="hidden")(x))
        return nn.Dense(4, name="out")(x)


model = MLP()
x = jax.random.normal(jax.random.key(0), (256, 8))
y = (x[:, 0] > 0).astype(jnp.int32) + 2 * (x[:, 1] > 0).astype(jnp.int32)  # 4 classes
base = model.init(jax.random.key(1), x)  # stands in for your pretrained weights

# 1. Wrap the unmodified model: a LoRA adapter on both Dense layers, in a group named "mlp".
targets = {"mlp": "hidden|out"}  # regular expressions over module paths
adapted = jadapters.adapter_transform(model, targets)
adapted = adapted.add_adapter("mlp:task", jadapters.LoRAConfig(rank=4))
variables = adapted.init_adapters(jax.random.key(2), base, x)  # the base, plus adapter weights
_, adapters = jadapters.split_variables(variables)
assert jnp.array_equal(adapted.apply(variables, x), model.apply(base, x))  # identity at init


# 2. Train the adapter only: the base is a constant of the compiled step.
def loss_fn(apply, batch):
    return optax.softmax_cross_entropy_with_integer_labels(apply(batch[0]), batch[1]).mean()


step = jadapters.linen_train_step(adapted, loss_fn, optax.adam(1e-2))
opt_state = step.init(adapters)  # optimizer state for the adapter only
losses = []
for i in range(100):
    adapters, opt_state, metrics = step(adapters, opt_state, base, (x, y), jax.random.key(i))
    losses.append(float(metrics["loss"]))
variables = jadapters.merge_variables(base, adapters)
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

# 3. Save the adapter alone; load it into a fresh wrapper of the same base.
path = tempfile.mkdtemp()
jadapters.save_adapters(path, adapted, variables)
fresh, loaded = jadapters.load_adapters(path, jadapters.adapter_transform(model, targets), base)
print("loaded:", fresh.get_enabled_adapters())

# 4. Merge LoRA into the base kernels: the unwrapped model, at exactly the base's cost.
merged = jadapters.merge_adapters(fresh, loaded)
gap = jnp.abs(model.apply({"params": merged}, x) - adapted.apply(variables, x)).max()
print(f"merged vs adapted: largest difference {float(gap):.1e}")
