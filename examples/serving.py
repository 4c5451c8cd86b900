import functools
import os
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

import jadapters

model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(64), nn.relu, nn.Dense(10)])
x = jax.random.normal(jax.random.key(0), (512, 32))  # a stream of 512 requests
base = model.init(jax.random.key(1), x[:1])  # your pretrained {"params": ...}
targets = {"mlp": r"layers_[024]"}

# Training side: one LoRA per task, each saved alone (the weights are stand-ins for trained
# ones). Ranks may differ: a smaller adapter goes into a larger slot zero-padded, exactly.
ranks = {"sports": 4, "news": 8, "legal": 8, "code": 2, "medical": 8}
trained = jadapters.adapter_transform(model, targets)
for task, rank in ranks.items():
    trained = trained.add_adapter(f"mlp:{task}", jadapters.LoRAConfig(rank=rank, alpha=16.0))
variables = trained.init_adapters(jax.random.key(2), base, x[:1])
noise = np.random.default_rng(0)
variables["adapters"] = jax.tree.map(
    lambda w: w + 0.1 * noise.standard_normal(w.shape, np.float32), variables["adapters"]
)
workdir = tempfile.mkdtemp()
paths = {task: os.path.join(workdir, task) for task in ranks}
for task, path in paths.items():
    jadapters.save_adapters(path, trained, variables, name=f"mlp:{task}")

# Serving side: the base and a bank of 4 slots, each a LoRA of the largest rank served.
bank = jadapters.AdapterBankConfig(adapter=jadapters.LoRAConfig(rank=8, alpha=16.0), slots=4)
served = jadapters.adapter_transform(model, targets).add_adapter("mlp:tenants", bank)
variables = served.init_adapters(jax.random.key(3), base, x[:1])
table = jadapters.SlotTable(4)  # which task is in which slot
for task in ["sports", "news", "legal", "code"]:
    slot = table.assign(task)
    variables = jadapters.load_slot(paths[task], served, variables, bank="tenants", slot=slot)
forward = jax.jit(lambda v, x, ids: served.apply(v, x, adapter_ids=ids))

# A mixed stream: each request names its task, or None for the base model alone.
choices = [None, "sports", "news", "legal", "code"]
requests = [choices[k] for k in np.random.default_rng(1).integers(0, 5, len(x))]
batch = 64


def answer(variables):
    outs = []
    for start in range(0, len(x), batch):
        ids = table.ids(requests[start : start + batch])  # each request's slot, -1: the base
        outs.append(forward(variables, x[start : start + batch], ids))
    return np.concatenate(jax.block_until_ready(outs))


answer(variables)  # compiles, once
start = time.perf_counter()
answers = answer(variables)
rate = len(x) / (time.perf_counter() - start)
print(f"{len(x)} mixed requests, batches of {batch}, one program: {rate:,.0f} requests/s")


# Each answer equals its request run alone through an ordinary model with its adapter.
@functools.cache
def reference(task):
    if task is None:
        return jax.jit(lambda xs: model.apply(base, xs))
    ref, ref_vars = jadapters.load_adapters(
        paths[task], jadapters.adapter_transform(model, targets), base
    )
    return jax.jit(lambda xs: ref.apply(ref_vars, xs))


def check(answers):
    alone = [reference(task)(x[i : i + 1])[0] for i, task in enumerate(requests)]
    return float(np.abs(answers - np.stack(alone)).max())


print(f"routed == each request alone with its adapter, max |diff| {check(answers):.1e}")

# Hot swap: unload "code", load "medical" into its slot. Same shapes: no new compile.
slot = table.free("code")
variables = jadapters.clear_slot(served, variables, bank="tenants", slot=slot)
slot = table.assign("medical")
variables = jadapters.load_slot(paths["medical"], served, variables, bank="tenants", slot=slot)
requests = ["medical" if task == "code" else task for task in requests]
answers = answer(variables)
print(f"swapped 'code' for 'medical', slots {table.names}, max |diff| {check(answers):.1e}")
print("compiled programs:", forward._cache_size())

# One task per deployment instead: merge its adapter, at exactly the base model's cost.
single, single_vars = jadapters.load_adapters(
    paths["sports"], jadapters.adapter_transform(model, targets), base
)
merged = jadapters.merge_adapters(single, single_vars)
same = np.allclose(model.apply({"params": merged}, x), single.apply(single_vars, x), atol=1e-5)
print("merged model == unmerged adapter:", same)
