#!/usr/bin/env bash
# Model size, decided by measurement in one GPU lease (docs/training-rounds.md): each width in
# SIZE_WIDTHS (default "16 24") is trained from scratch for ROUND_MINUTES (default 3.5) on the
# same on-device data and recipe, then scored on the out-of-distribution benchmark. Set against
# the CPU cost of each width (python benchmarks/model_size.py), it says whether a wider default
# pays. Nothing here replaces the packaged weights.
#
#   bash examples/training/size_round.sh OUT [more demoe train options]
#
# OUT receives size.log and, per width W, ood-W.md, ood-W.json and the trained weights as
# width-W/model-partKofN.safetensors (python -m demoe.checkpoint join ... -o FILE).
# Environment: as gpu_round.sh (ROUND_PHOTOS, ROUND_PATCH and ROUND_BATCH, required without
# CUDA, ROUND_MINUTES, ROUND_SEED, ROUND_QUICK=1 for one image per OOD family, PYTHON), and
# SIZE_RUNS (the run folders' parent, default runs).
set -euo pipefail
ROUND_NAME=size_round.sh
# shellcheck source=round_common.sh
. "$(dirname "$0")/round_common.sh"
out=$(absolute "${1:?usage: size_round.sh OUT [demoe train options]}")
shift
photos=${ROUND_PHOTOS:+$(absolute "$ROUND_PHOTOS")}
runs=${SIZE_RUNS:+$(absolute "$SIZE_RUNS")}
cd "$(dirname "$0")/../.."
photos=${photos:-$PWD/data/round/photos}
runs=${runs:-$PWD/runs}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
require_photos "$photos"
require_cuda_or_sizes "$py"
mkdir -p "$out"
for w in ${SIZE_WIDTHS:-16 24}; do
  run=$runs/size-$w
  rm -rf "$run"
  # From scratch: the recipe of the first GPU stage (lr 1e-3, router weight 0.1, no EMA).
  $py -m demoe train --config examples/training/gpu_round.toml --photos "$photos" --width "$w" \
    --patch "${ROUND_PATCH:-192}" --batch "${ROUND_BATCH:-120}" \
    --lr 1e-3 --warmup 200 --router-weight 0.1 --ema 0 --time-limit "${ROUND_MINUTES:-3.5}" \
    --seed "${ROUND_SEED:-1}" --out "$run" --no-progress "$@" 2>&1 | tee -a "$out/size.log"
  $py -m demoe.checkpoint split "$run/model.safetensors" "$out/width-$w" --max-mib 15 | tee -a "$out/size.log"
  $py benchmarks/ood.py --model "$run/model.safetensors" --device auto --out "$out/ood-$w.md" \
    --json "$out/ood-$w.json" ${ROUND_QUICK:+--limit 1} 2>&1 | tee -a "$out/size.log"
done
