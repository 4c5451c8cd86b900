#!/usr/bin/env bash
# The GPU benchmark set, for a machine with one accelerator and the core dependencies
# installed (jax with its CUDA plugin, flax, optax, orbax-checkpoint, chex): the inline
# minimum (all parts) and routing, with more timed calls per round than on a CPU, since a GPU
# step takes milliseconds. Matrix products run in full float32 (JAX_DEFAULT_MATMUL_PRECISION=
# highest): with a GPU's default TF32 products the benchmarks' equality checks of ours against
# the hand-written models (rtol 1e-5) cannot hold. Results (JSON and logs) go to the folder
# given, default ./gpu-results.
#   bash benchmarks/gpu.sh [OUTDIR]
set -uo pipefail
out="${1:-gpu-results}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_DEFAULT_MATMUL_PRECISION="${JAX_DEFAULT_MATMUL_PRECISION:-highest}"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee "$out/versions.txt"
# One part per process, each with its own limit, JSON and log, so that a part that runs out
# of time costs only its own results.
part() {  # part NAME SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1
    echo "   exit $? after ${SECONDS}s"
    grep -E "^\| (train|forward|compile|Linen|NNX|mixed)" "$out/$name.log" || tail -n 5 "$out/$name.log"
}
inline=(python3 benchmarks/bench_inline.py --rounds 7 --steps 50 --warmup 5 --compile-repeats 3)
part inline_linen "${INLINE_TIMEOUT:-240}" "${inline[@]}" --part main --framework linen
part inline_nnx "${INLINE_TIMEOUT:-240}" "${inline[@]}" --part main --framework nnx
part inline_disabled "${DISABLED_TIMEOUT:-120}" "${inline[@]}" --part disabled
part routing "${ROUTING_TIMEOUT:-200}" python3 benchmarks/bench_routing.py --rounds 5 --steps 30
