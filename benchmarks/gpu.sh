#!/usr/bin/env bash
# The GPU benchmark set, for a machine with one accelerator and the core dependencies
# installed (jax with its CUDA plugin, flax, optax, orbax-checkpoint, chex): the inline
# minimum (all parts) and routing, with more timed calls per round than on a CPU, since a GPU
# step takes milliseconds. Results (JSON and logs) go to the folder given, default ./gpu-results.
#   bash benchmarks/gpu.sh [OUTDIR]
set -uo pipefail
out="${1:-gpu-results}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee "$out/versions.txt"
timeout "${INLINE_TIMEOUT:-300}" python3 benchmarks/bench_inline.py --rounds 7 --steps 50 --warmup 5 \
    --json "$out/inline.json" 2>&1 | tee "$out/inline.log"
timeout "${ROUTING_TIMEOUT:-150}" python3 benchmarks/bench_routing.py --rounds 5 --steps 30 \
    --json "$out/routing.json" 2>&1 | tee "$out/routing.log"
