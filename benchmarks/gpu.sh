#!/usr/bin/env bash
# The GPU benchmark set, for a machine with one accelerator and the core dependencies
# installed (jax with its CUDA plugin, flax, optax, orbax-checkpoint, chex): the inline
# minimum (three parts) and routing, with more timed calls per round than on a CPU, since a GPU
# step takes milliseconds. Matrix products run in full float32 (JAX_DEFAULT_MATMUL_PRECISION=
# highest): with a GPU's default TF32 products the benchmarks' equality checks of ours against
# the hand-written models (rtol 1e-5) cannot hold. Results (JSON and logs) go to the folder
# given, default ./gpu-results; the parts named after it run (default: all four), so that a
# machine lent for a few minutes at a time can take them in two calls:
#   bash benchmarks/gpu.sh [OUTDIR [inline_linen|inline_nnx|inline_disabled|routing ...]]
# Each part has its own time limit (seconds, from the environment: INLINE_TIMEOUT,
# DISABLED_TIMEOUT, ROUTING_TIMEOUT). On an H200 the first run needed more than 150 s for each
# main part, 100 s for the disabled part and more than 130 s for routing; the logs show the
# progress with times (stderr), and each JSON holds the sections finished so far, so a part
# stopped by its limit shows how far it got and keeps what it measured.
set -uo pipefail
out="${1:-gpu-results}"
shift || true
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(inline_linen inline_nnx inline_disabled routing)
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_DEFAULT_MATMUL_PRECISION="${JAX_DEFAULT_MATMUL_PRECISION:-highest}"
# Stop at once where the package does not import (a jax or flax there that it does not support).
python3 -c "import jax, flax, optax, orbax.checkpoint as ocp, jadapters; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax-checkpoint', ocp.__version__, 'jadapters', jadapters.__version__, jax.devices())" 2>&1 | tee "$out/versions.txt" || exit 1
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
inline=(python3 benchmarks/bench_inline.py --rounds 7 --steps 50 --warmup 5 --compile-repeats 2)
for p in "${parts[@]}"; do
    case "$p" in
        inline_linen) part "$p" "${INLINE_TIMEOUT:-240}" "${inline[@]}" --part main --framework linen ;;
        inline_nnx) part "$p" "${INLINE_TIMEOUT:-240}" "${inline[@]}" --part main --framework nnx ;;
        inline_disabled) part "$p" "${DISABLED_TIMEOUT:-130}" "${inline[@]}" --part disabled ;;
        routing) part "$p" "${ROUTING_TIMEOUT:-200}" python3 benchmarks/bench_routing.py --rounds 5 --steps 30 ;;
        *) echo "unknown part: $p (inline_linen, inline_nnx, inline_disabled or routing)"; exit 2 ;;
    esac
done
