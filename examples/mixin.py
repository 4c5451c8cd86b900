import jax
import jax.numpy as jnp
from flax import nnx

import jadapters


# A module you write: call the enabled adapters where you want them in the forward pass.
class Encoder(nnx.Module, jadapters.AdapterModuleMixin):
    def __init__(self, *, rngs):
        self.linear = nnx.Linear(8, 16, rngs=rngs)
        self.out = nnx.Linear(16, 2, rngs=rngs)
        self.adapter_features = 16  # the width the adapters see

    def __call__(self, x):
        h = nnx.relu(self.linear(x))
        if self.is_adapter_available():
            h = self.forward_enabled_adapters(h)  # here, between the two layers
        return self.out(h)


x = jax.random.normal(jax.random.key(0), (4, 8))
encoder = Encoder(rngs=nnx.Rngs(0))
before = encoder(x)
encoder.add_adapter("task", jadapters.LinearAdapterConfig(dim=4), rngs=nnx.Rngs(1))
print("mixin:", encoder.get_enabled_adapters(), bool(jnp.array_equal(encoder(x), before)))

# A model you did not write: name the module paths; its code stays as it is.
rngs = nnx.Rngs(0)
model = nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), nnx.relu, nnx.Linear(16, 2, rngs=rngs))
before = model(x)
model = jadapters.adapter_transform(model, {"hidden": "layers/0"})
model.add_adapter("hidden:task", jadapters.LinearAdapterConfig(dim=4), rngs=nnx.Rngs(1))
print("wrapped:", model.get_enabled_adapters(), bool(jnp.array_equal(model(x), before)))
