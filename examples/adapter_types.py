import flax.linen as nn
import jax

import jadapters

model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(64), nn.relu, nn.Dense(10)])
x = jax.random.normal(jax.random.key(0), (4, 32))
base = model.init(jax.random.key(1), x)

adapted = jadapters.adapter_transform(model, {"hidden": r"layers_[02]"})  # both hidden Dense
configs = {
    "hidden:bottleneck": jadapters.LinearAdapterConfig(dim=8),  # after the layer, nonlinear
    "hidden:lora": jadapters.LoRAConfig(rank=4, alpha=8.0),  # on the kernel, W + s * A @ B
    "hidden:ia3": jadapters.IA3Config(),  # rescales the layer's outputs
    "hidden:parallel": jadapters.ParallelAdapterConfig(dim=8),  # beside the layer, input -> output
}
for name, cfg in configs.items():
    adapted = adapted.add_adapter(name, cfg)
variables = adapted.init_adapters(jax.random.key(2), base, x)
print(jadapters.summarize(adapted, variables))

# LoRA and IA3 are linear in the kernel, so they fold into it; the other two cannot.
merged = jadapters.merge_adapters(adapted, variables, names=["lora", "ia3"])
try:
    jadapters.merge_adapters(adapted, variables, names=["bottleneck"])
except ValueError as err:
    print(err)
