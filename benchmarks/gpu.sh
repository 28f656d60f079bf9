#!/usr/bin/env bash
# The train-step benchmark matrix on one GPU, in about 9 minutes (issue #8).
# (Whether the loader feeds the step, `xdistill train` end to end: benchmarks/gpu_feed.sh, a
# call of its own, about 4 minutes; its header says what to carry.)
#
#   ResNet-18, 640x192, batch 12 (configs/kitti_resnet18_640x192.py), full X-Distill step
#   (depth net + 2 pose passes + warping + losses [+ translator + distillation] + Adam):
#     1. bf16, distillation on  -- cold start: empty compilation cache
#     2. bf16, distillation on  -- warm start: the cache written by run 1
#    2b. the same warm start with the init and the step's compile one after the other
#        (`--start sequential`, 5 steps): the A/B of the overlapped start runs 1 and 2 use
#     3. bf16, distillation off -- cold
#    3b. bf16, distillation on, --config.model.gpu_channel_padding=False: the convolutions with
#        channel counts the tensor cores do not take (the stems' 3 and 6 input channels, the pose
#        decoder's 12 outputs, the translator head's 7) as they are, not padded to 4, 8, 16 and 8
#        (models/conv.py; the default since 2026-12-06, not yet measured): what the padding buys,
#        its median step against run 1's. Its other convolutions reuse run 1's autotuning
#     4. bf16, distillation on, cold, XLA_FLAGS=--xla_gpu_autotune_level=0: no autotuning of the
#        cuDNN convolutions' algorithms while compiling (cuDNN's heuristic pick instead): what
#        autotuning costs of run 1's cold start (on an H200, 2026-12-04: ~70 of its 98 s of
#        compile) and what it buys in step time (not yet measured: cut by DEADLINE_S then)
#     5. bf16, distillation on, cold with an empty cache of its own,
#        XLA_FLAGS=--xla_gpu_autotune_level=1: autotuning without initialising, re-initialising
#        and cross-checking the candidates' buffers (the default is level 4, all three): whether
#        those checks are a large part of the ~70 s of autotuning, and the step time it picks
#     6. as run 4, with --xla_gpu_enable_llvm_module_compilation_parallelism=true: XLA:GPU's
#        LLVM modules compiled on several threads (off by default; JAX turns it on only with its
#        kernel cache): what is left of run 4's compile (27.8 s on an H200, 2026-12-04) with the
#        host's cores. The deviceless H200 compile on a 2-core VM did not change with it
#        (21.5 vs 21.7 s; benchmarks/gpu_aot.py)
#     7. fp32, distillation on  -- cold
#     8. fp32, distillation off -- cold
#     9. the loss alone (benchmarks/loss_cost.py, 640x192 batch 12): XLA cost and time per call
#    10. bf16, distillation on, XLA_FLAGS=--xla_gpu_enable_command_buffer= (no CUDA graphs),
#        profiled: with command buffers 38 % of run 2's profiled op time sat inside them,
#        unattributed ("other"); without them every kernel is named by scope. Also what the
#        command buffers buy in step time, against run 1.
#    11. bf16, distillation on, cold, --config.distill.translator.output_stride=1 (the
#        full-resolution translator, the default until 2026-12-03), against runs 1 and 3
#    12. bf16, distillation on, cold, --config.model.kernel_layout=HWIO: conv kernels stored in
#        flax's order, as before 2026-12-04 (OHWI is the default; HWIO took +3.8 % step time on
#        an H200, 2026-12-04), against run 1; measured once already, so last: the first run
#        DEADLINE_S cuts
#   The order (since 2026-12-05) puts what decides the open targets first: the cold start's
#   three experiments (4-6) right after the targets' bf16 runs, then fp32. One device call of
#   540 s was estimated to reach about run 8 on an H200 (the first H200 machine ran 9 runs of
#   the old order in 450 s, its cold run 1 alone about 125 s); runs 9-12 are what it cuts.
#   (Before 2026-12-05 runs 4-6 were numbered 6, 10 and 11, fp32 4 and 5, the loss alone 7, the
#   profile without command buffers 8 and the full-resolution translator 9; the JSON and log
#   files are named by run, not number.)
#   Runs 3-12 are cold starts of their own programs, but XLA's autotuning results live in the
#   compilation cache directory too (jax_persistent_cache_enable_xla_caches), so where they share
#   run 1's convolutions they reuse its autotuning: only run 1 (and runs 4 and 6, which do not
#   autotune, and run 5, which has a cache of its own) times a first compile on a fresh machine.
#   (The init lowers its random draws to jaxlib's threefry GPU kernel in every run,
#   `train.threefry_kernel_lowering`; an earlier run 8 set JAX_THREEFRY_GPU_KERNEL_LOWERING=1.)
#   summary.md ends with benchmarks/gpu_targets.py's tables: the targets' (each figure, its
#   target, met or MISSED; "not measured" where a run is missing), then each run's slowest step.
#   OUTDIR/autotune_cache_run1 keeps what run 1's compile autotuned (XLA's per-fusion cache).
#   Run 2 also traces 5 steps: OUTDIR/profile/*/summary.md says where the device time goes (by
#   named scope: depth_net, pose_net, warp, reprojection, ..., optimizer; by kind of op; top ops),
#   with the optimised HLO beside it to look the named ops up in.
#   Each run is its own process, so "peak mem GB" (device.memory_stats peak_bytes_in_use) is that
#   variant's peak, and "start s" is what a fresh `xdistill train` would pay before its first
#   step: the step compiling on a thread while the init compiles and runs, as the training loop
#   starts ("init s" and "compile s" are each one's own time; until 2026-12-04, night, the
#   start was their sum: `xdistill bench --start sequential`).
#   Median images/s over 50 steps after 5 warm-up steps, on device-resident synthetic batches.
#
# Run from the repository root:   bash benchmarks/gpu.sh [OUTDIR]
# (runs that would start after DEADLINE_S seconds, default 540, are skipped and said to be, so a
# caller's 600 s limit still sees the summary; runs 1-3, 7 and 8 are the targets' figures, 2b,
# 3b, 4-6 and 9-12 experiments).
# (OUTDIR defaults to $OUT, else ./gpu_bench). It writes OUTDIR/*.json, OUTDIR/*.log and
# OUTDIR/summary.md (the markdown tables, device named). Copy the figures into
# benchmarks/RESULTS.md with the date and this command.
#
# What the GPU image needs: jax[cuda] (0.10/0.11), flax, optax, orbax-checkpoint, numpy. NOT
# tensorflow-datasets or grain (the train step and the bench never import them). ml_collections
# (pure Python; its dependencies absl-py and PyYAML come with orbax and flax) travels as a wheel:
#   on a machine with network access, from the repository root:
#     pip download ml_collections --no-deps --only-binary=:all: -d .whl/
#   this script then installs it with no network:
#     pip install --no-index --no-deps --target .pydeps .whl/ml_collections-*.whl
#   (without pip it unpacks the wheel with `python -m zipfile`). .whl/ is not git-ignored, so an
#   untracked .whl/ travels with a copy of the working tree.
# The project itself is not installed: PYTHONPATH=.:.pydeps and `python -m xdistill_jax bench`.
set -euo pipefail

cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-gpu_bench}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"

if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  if ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
    if ! "$PY" -m pip install --quiet --no-index --no-deps --target .pydeps .whl/ml_collections-*.whl; then
      # no pip in the image: a pure-Python wheel is a zip of the package, unpack it as is
      "$PY" -m zipfile -e .whl/ml_collections-*.whl .pydeps
    fi
  else
    echo "ml_collections is not installed and no .whl/ml_collections-*.whl was found (see the header)" >&2
    exit 2
  fi
fi
export PYTHONPATH=".:.pydeps${PYTHONPATH:+:$PYTHONPATH}"

# A fresh, private compilation cache: run 1 is a true cold start, run 2 reads what run 1 wrote.
CACHE="$(mktemp -d "${TMPDIR:-/tmp}/xdistill-gpu-cache.XXXXXX")"
trap 'rm -rf "$CACHE"' EXIT
export XDISTILL_COMPILATION_CACHE="$CACHE"
# Op metadata in the cache key (the profiled run sets it; all runs must, for run 2 to read run 1)
export JAX_COMPILATION_CACHE_INCLUDE_METADATA_IN_KEY=true

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "host: $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} | tee "$OUTDIR/environment.txt"

CONFIG=configs/kitti_resnet18_640x192.py
COMMON=(--config "$CONFIG" --steps 50 --warmup 5 --config.optim.batch_size=12 --config.mesh.num_devices=1)
# BENCH_ARGS: extra arguments appended to every run (later ones win), e.g. a CPU dry run:
#   BENCH_ARGS="--steps 2 --warmup 0 --config.data.height=32 --config.data.width=64" bash benchmarks/gpu.sh /tmp/dry
read -r -a EXTRA <<<"${BENCH_ARGS:-}"
LIMIT_SCALE="${LIMIT_SCALE:-1}"  # multiplies every time limit (e.g. 6 for a CPU dry run)
# The whole script stops starting runs at DEADLINE_S seconds and cuts each run's limit to what is
# left, so that it ends (summary written) inside a caller's own time limit (e.g. 600 s per call).
DEADLINE_S="${DEADLINE_S:-$((540 * LIMIT_SCALE))}"

# GPU_RUNS: run only these (names as in the JSON/log files, space-separated; "loss_cost" for the
# loss alone), e.g. the cold-start experiments alone:
#   GPU_RUNS="bf16_distill_cold bf16_distill_noautotune_cold bf16_distill_autotune1_cold" bash benchmarks/gpu.sh
selected() { [ -z "${GPU_RUNS:-}" ] || [[ " $GPU_RUNS " == *" $1 "* ]]; }

run() {  # name dtype distill [time limit s] [more bench arguments...]
  local name=$1 dtype=$2 distill=$3 limit=$((${4:-150} * LIMIT_SCALE))
  shift $(($# < 4 ? $# : 4))
  if ! selected "$name"; then
    echo "=== $name: not in GPU_RUNS" | tee -a "$OUTDIR/summary.md"
    return 0
  fi
  local left=$((DEADLINE_S - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "=== $name: SKIPPED, ${left}s left before DEADLINE_S=${DEADLINE_S}" | tee -a "$OUTDIR/summary.md"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  # an earlier call's JSON of this run must not stand in for this one's if it fails (OUTDIR reused)
  rm -f "$OUTDIR/$name.json"
  local flags="${XLA_FLAGS:+ XLA_FLAGS=$XLA_FLAGS}"
  echo "=== $name: dtype=$dtype distill=$distill $*$flags (limit ${limit}s)"
  local start=$SECONDS
  if timeout "$limit" "$PY" -u -m xdistill_jax bench "${COMMON[@]}" --dtypes "$dtype" --distill "$distill" \
      "$@" "${EXTRA[@]}" --json "$OUTDIR/$name.json" >"$OUTDIR/$name.log" 2>&1; then
    echo "    process wall time $((SECONDS - start)) s (imports + init + compile + warm-up + timed steps)"
    { echo "$name (process wall time $((SECONDS - start)) s$flags):"; awk '/^[|]/{p=1; print; next} p{exit}' "$OUTDIR/$name.log"; echo; } \
      | tee -a "$OUTDIR/summary.md"
  else
    local status=$?
    echo "=== $name: FAILED (exit status $status$([ "$status" = 124 ] && echo ': timed out')) after $((SECONDS - start)) s; its log: $OUTDIR/$name.log" \
      | tee -a "$OUTDIR/summary.md"
    tail -n 20 "$OUTDIR/$name.log"
    FAILED_RUNS="${FAILED_RUNS:+$FAILED_RUNS }$name"
  fi
}
FAILED_RUNS=""

echo "# GPU train-step benchmark ($(date -u +%F), $("$PY" -c 'import jax; print(jax.devices()[0].device_kind)'))" >"$OUTDIR/summary.md"
echo "" >>"$OUTDIR/summary.md"
run bf16_distill_cold bfloat16 on 140
# What run 1's compile autotuned: XLA's per-fusion autotune cache, which JAX keeps in the
# compilation cache directory (jax_persistent_cache_enable_xla_caches), one file per autotuned
# convolution or fusion configuration with the algorithm chosen. Kept with the results (small
# text files), to set against gpu_aot.py's count of distinct cuDNN configurations (133).
if [ -d "$CACHE/xla_gpu_per_fusion_autotune_cache_dir" ]; then
  cp -r "$CACHE/xla_gpu_per_fusion_autotune_cache_dir" "$OUTDIR/autotune_cache_run1"
  echo "XLA autotune cache entries after run 1: $(find "$OUTDIR/autotune_cache_run1" -type f | wc -l) (OUTDIR/autotune_cache_run1)" \
    | tee -a "$OUTDIR/summary.md"
else
  echo "XLA autotune cache after run 1: none (no autotuning here, or a jax that does not keep it)" | tee -a "$OUTDIR/summary.md"
fi
run bf16_distill_warm bfloat16 on 70 --profile-dir "$OUTDIR/profile"
for f in "$OUTDIR"/profile/*/summary.md; do
  [ -f "$f" ] && { echo "Profile of bf16_distill_warm ($f):"; echo; cat "$f"; echo; } | tee -a "$OUTDIR/summary.md"
done
run bf16_distill_warm_sequential bfloat16 on 60 --start sequential --steps 5 --warmup 1
run bf16_nodistill_cold bfloat16 off 120
# The tensor-core channel padding (models/conv.py) off: run 1's step with the odd channel counts.
run bf16_distill_nopad_cold bfloat16 on 100 --config.model.gpu_channel_padding=False
# Cold start without autotuning: how much of run 1's compile is the algorithm search, and its worth.
XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0" \
  run bf16_distill_noautotune_cold bfloat16 on 120
# Autotuning without its buffer initialisation and cross-checks, from an empty cache of its own
# (run 1's autotuning results would otherwise be read back).
CACHE_L1="$(mktemp -d "${TMPDIR:-/tmp}/xdistill-gpu-cache-l1.XXXXXX")"
trap 'rm -rf "$CACHE" "$CACHE_L1"' EXIT
XDISTILL_COMPILATION_CACHE="$CACHE_L1" XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=1" \
  run bf16_distill_autotune1_cold bfloat16 on 140
# Run 4 with XLA's LLVM modules compiled on several threads: what is left of the compile.
XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0 --xla_gpu_enable_llvm_module_compilation_parallelism=true" \
  run bf16_distill_noautotune_parallel_cold bfloat16 on 90 --steps 5 --warmup 1
run fp32_distill_cold float32 on 120
run fp32_nodistill_cold float32 off 120
# The loss work alone (no networks), forward + gradient, fp32: its share of the step.
echo "=== loss alone (limit $((60 * LIMIT_SCALE))s)"
if ! selected loss_cost; then
  echo "    loss_cost: not in GPU_RUNS" | tee -a "$OUTDIR/summary.md"
elif [ $((DEADLINE_S - SECONDS)) -lt $((60 * LIMIT_SCALE)) ]; then
  echo "    loss_cost SKIPPED (DEADLINE_S)" | tee -a "$OUTDIR/summary.md"
elif timeout $((60 * LIMIT_SCALE)) "$PY" -u benchmarks/loss_cost.py --batch 12 --height 192 --width 640 --iters 20 \
    >"$OUTDIR/loss_cost.log" 2>&1; then
  tail -n 1 "$OUTDIR/loss_cost.log" | tee -a "$OUTDIR/summary.md"
else
  echo "=== loss_cost: FAILED or timed out; its log: $OUTDIR/loss_cost.log" | tee -a "$OUTDIR/summary.md"
  tail -n 5 "$OUTDIR/loss_cost.log"
  FAILED_RUNS="${FAILED_RUNS:+$FAILED_RUNS }loss_cost"
fi
echo "cache entries written: $(ls "$CACHE" | wc -l)" | tee -a "$OUTDIR/summary.md"
# Without command buffers: a profile whose every kernel is named by scope, and what CUDA graphs buy.
XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=" \
  run bf16_distill_nocmdbuf bfloat16 on 120 --profile-dir "$OUTDIR/profile_nocmdbuf"
for f in "$OUTDIR"/profile_nocmdbuf/*/summary.md; do
  [ -f "$f" ] && { echo "Profile of bf16_distill_nocmdbuf ($f):"; echo; cat "$f"; echo; } | tee -a "$OUTDIR/summary.md"
done
# The full-resolution translator (the default until 2026-12-03; README "Ablations"): what
# distillation costs on the device with it.
run bf16_distill_stride1_cold bfloat16 on 120 --config.distill.translator.output_stride=1
run bf16_distill_hwio_cold bfloat16 on 120 --config.model.kernel_layout=HWIO
# The issue's targets, each figure against its target (benchmarks/gpu_targets.py).
{ echo; "$PY" benchmarks/gpu_targets.py "$OUTDIR"; } | tee -a "$OUTDIR/summary.md"
if [ -n "$FAILED_RUNS" ]; then
  echo "runs that FAILED: $FAILED_RUNS (their logs in $OUTDIR)" | tee -a "$OUTDIR/summary.md"
  echo "done; results in $OUTDIR"
  exit 1
fi
echo "done; results in $OUTDIR"
