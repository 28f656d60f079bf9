#!/usr/bin/env bash
# Does the loader feed the GPU? `xdistill train` end to end on one GPU host (issue #8), in about
# 4 minutes: benchmarks/train_feed.py with data.num_workers=-1 (one grain worker process per core
# less one, the KITTI configs' default) and 0 (this process's two threads), 640x192, bf16,
# batch 12, 600 steps each, on the raw + stored-scales + uncompressed store of 240 textured
# 1242x375 triplets and random geometric teacher logits. The figures: the loop's images/s and
# the share of its time spent waiting for data (medians over the log windows between the
# compile's and the final checkpoint's), the loader alone beside them. The step alone ran at
# 647-734 images/s on an H200 (benchmarks/RESULTS.md); this process's threads made 185-192
# examples/s on a 2-core VM.
#
# Run from the repository root:   bash benchmarks/gpu_feed.sh [OUTDIR]
# (OUTDIR defaults to $OUT, else ./gpu_feed). Writes OUTDIR/train_feed.md (the table, device
# named), OUTDIR/train_feed.json, OUTDIR/run_workers_*.log and OUTDIR/environment.txt. The data
# and run workdirs go to a scratch directory (FEED_DIR, default a temp dir), not OUTDIR.
#
# What the GPU image lacks (its package list: /work/.library/device/KINDS.md): the loader's
# tensorflow-datasets, array_record, grain and their small dependencies, ml_collections and
# tensorboardX. They travel as wheels for the image's Python (3.12), in .whl/ (git-ignored: name
# it in the device call's carry). On a machine with network access, from the repository root:
#   P="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
#      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
#   for p in ml_collections==1.1.0 tensorflow-datasets==4.9.10 array_record==0.8.6 grain==0.2.18 \
#       dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring_parser==0.18.0 \
#       tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2 \
#       portpicker==1.6.0 tensorboardX==2.6.5; do
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .whl $p; done
#   pip wheel --no-deps -w .whl promise==2.3      # an sdist only: built here, pure Python
# (about 11 MB; the rest of what they need, numpy, pillow, protobuf, pyarrow, psutil, etils, absl,
# cloudpickle, wrapt, attrs, requests, tqdm, is in the image). Each is installed below only where
# the image cannot import it already.
# A device session's 15 minutes do not hold this and a full `benchmarks/gpu.sh` (540 s): run this
# alone, or with gpu.sh's cold-start experiments in one call of under 600 s (a device call brings
# back at most 8 files of $OUT, so the results are copied there):
#   GPU_RUNS="bf16_distill_cold bf16_distill_noautotune_cold bf16_distill_autotune1_cold" \
#     DEADLINE_S=330 bash benchmarks/gpu.sh /tmp/g; FEED_TIMEOUT_S=240 FEED_STEPS=400 bash benchmarks/gpu_feed.sh /tmp/f;
#   cp /tmp/g/summary.md /tmp/f/train_feed.md /tmp/f/train_feed.json /tmp/f/environment.txt $OUT/
# Estimated here (2-core VM): the 240 frames 29 s, their store and teacher logits 14 s; the GPU
# host's cores are faster and prepare on 15 of them.
set -euo pipefail

cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-gpu_feed}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
SITE="${FEED_SITE:-.pydeps}"

# module -> wheel name prefix in .whl/
missing=()
for pair in ml_collections:ml_collections tensorflow_datasets:tensorflow_datasets array_record:array_record \
    grain:grain tree:dm_tree immutabledict:immutabledict simple_parsing:simple_parsing \
    docstring_parser:docstring_parser tensorflow_metadata:tensorflow_metadata \
    google.api:googleapis_common_protos termcolor:termcolor toml:toml portpicker:portpicker \
    tensorboardX:tensorboardx promise:promise; do
  module=${pair%%:*} wheel=${pair##*:}
  if ! "$PY" -c "import $module" 2>/dev/null; then
    found=$(ls .whl/"$wheel"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$found" ]; then
      echo "$module is not installed and no .whl/$wheel-*.whl was found (see the header)" >&2
      exit 2
    fi
    missing+=("$found")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing into $SITE: ${missing[*]}"
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "${missing[@]}"
fi
export PYTHONPATH=".:$SITE${PYTHONPATH:+:$PYTHONPATH}"

FEED_DIR="${FEED_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/xdistill-feed.XXXXXX")}"
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "host: $(hostname), $(nproc) CPU cores"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import jax, grain, tensorflow_datasets as t; print('jax', jax.__version__, 'grain', grain.__version__, 'tfds', t.__version__)"
} | tee "$OUTDIR/environment.txt"

status=0
timeout "${FEED_TIMEOUT_S:-500}" "$PY" -u benchmarks/train_feed.py --out "$FEED_DIR" --steps "${FEED_STEPS:-600}" \
    --log-every "${FEED_LOG_EVERY:-50}" ${FEED_ARGS:-} || status=$?
cp "$FEED_DIR"/train_feed.md "$FEED_DIR"/train_feed.json "$OUTDIR"/ 2>/dev/null || true
cp "$FEED_DIR"/run_workers_*.log "$OUTDIR"/ 2>/dev/null || true
[ "$status" -eq 0 ] || echo "train_feed.py exited with status $status (see $OUTDIR/run_workers_*.log)" >&2
exit "$status"
