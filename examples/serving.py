import flax.linen as nn
import jax
import numpy as np

import jadapters

model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(3)])
x = jax.random.normal(jax.random.key(0), (6, 8))
base = model.init(jax.random.key(1), x)
adapted = jadapters.adapter_transform(model, {"mlp": r"layers_\d"})
tasks = ["sports", "news"]
for task in tasks:
    adapted = adapted.add_adapter(f"mlp:{task}", jadapters.LoRAConfig(rank=4))
variables = adapted.init_adapters(jax.random.key(2), base, x)
_, adapters = jadapters.split_variables(variables)
adapters = jax.tree.map(lambda w: w + 0.1, adapters)  # stand-ins for trained weights
variables = jadapters.merge_variables(base, adapters)


def only(task):  # the adapted model with just this task's adapter enabled
    return adapted.set_enabled_adapters(enabled=False).set_enabled_adapters(f"mlp:{task}")


# Keep unmerged, switch per request batch: one base in memory, one compiled function per task.
serve = {task: jax.jit(only(task).apply) for task in tasks}
sports = np.asarray(serve["sports"](variables, x))

# Merge: one task per deployment, at exactly the base model's cost (the unwrapped model).
merged = jadapters.merge_adapters(adapted, variables, names=["sports"])
same = np.allclose(model.apply({"params": merged}, x), sports, atol=1e-5)
print("merged model == unmerged, sports enabled:", same)

# Route per example: not built yet. Today, split a mixed batch by task and reassemble it.
task_of = np.array([0, 1, 1, 0, 1, 0])  # each example's task, an index into tasks
out = np.zeros((len(x), 3), np.float32)
for i, task in enumerate(tasks):
    rows = np.flatnonzero(task_of == i)
    out[rows] = serve[task](variables, x[rows])
print("routed sports rows == sports batch:", np.allclose(out[task_of == 0], sports[task_of == 0]))
