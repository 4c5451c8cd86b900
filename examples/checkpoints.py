import tempfile

import flax.linen as nn
import jax
import optax

import jadapters

model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
x = jax.random.normal(jax.random.key(0), (8, 4))
base = model.init(jax.random.key(1), x)
targets = {"hidden": "layers_0"}
adapted = jadapters.adapter_transform(model, targets)
adapted = adapted.add_adapter("hidden:task", jadapters.LoRAConfig(rank=2))
variables = adapted.init_adapters(jax.random.key(2), base, x)
_, adapters = jadapters.split_variables(variables)

# A finished adapter, to ship or serve: save_adapters / load_adapters. One directory with
# the adapter's config and a fingerprint of its base; loading rebuilds the adapted model.
path = tempfile.mkdtemp()
jadapters.save_adapters(path, adapted, variables, name="hidden:task")
loaded_model, loaded = jadapters.load_adapters(
    path, jadapters.adapter_transform(model, targets), base
)
print("loaded:", loaded_model.get_enabled_adapters())

# Training you may have to resume: AdapterCheckpointManager. Step checkpoints of the adapter
# weights and the optimizer state, the last max_to_keep of them; the base is saved once, apart.
tx = optax.adam(1e-3)
opt_state = tx.init(adapters)
with jadapters.AdapterCheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as manager:
    for step in (100, 200, 300):
        metadata = jadapters.adapter_metadata(adapted, variables)  # configs and fingerprint
        manager.save(step, adapters, opt_state, metadata=metadata)
    restored = manager.restore(adapters=adapters, opt_state=opt_state)  # the latest step
    print("kept steps:", manager.all_steps(), "resumed from", restored.step)
