#!/usr/bin/env bash
# Model size, decided by measurement in one GPU lease (docs/training-rounds.md): each width in
# SIZE_WIDTHS (default "16 24") is trained from scratch for ROUND_MINUTES (default 3.5) on the
# same on-device data and recipe, then scored on the out-of-distribution benchmark. Set against
# the CPU cost of each width (python benchmarks/model_size.py), it says whether a wider default
# pays. Nothing here replaces the packaged weights.
#
#   bash examples/training/size_round.sh OUT [more demoe train options]
#
# OUT receives size.log and, per width W, ood-W.md and ood-W.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: size_round.sh OUT [demoe train options]}
shift
py=${PYTHON:-python3}
photos=${ROUND_PHOTOS:-data/round/photos}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$( { find "$photos" -maxdepth 1 -type f 2>/dev/null || true; } | wc -l)" -lt 1 ]; then
  echo "size_round.sh: no photographs in $photos: run examples/training/prepare_photos.sh first" >&2
  exit 2
fi
mkdir -p "$out"
for w in ${SIZE_WIDTHS:-16 24}; do
  run=runs/size-$w
  rm -rf "$run"
  # From scratch: the recipe of the first GPU stage (lr 1e-3, router weight 0.1, no EMA).
  $py -m demoe train --config examples/training/gpu_round.toml --photos "$photos" --width "$w" \
    --lr 1e-3 --warmup 200 --router-weight 0.1 --ema 0 --time-limit "${ROUND_MINUTES:-3.5}" \
    --seed "${ROUND_SEED:-1}" --out "$run" --no-progress "$@" 2>&1 | tee -a "$out/size.log"
  $py benchmarks/ood.py --model "$run/model.safetensors" --device auto --out "$out/ood-$w.md" \
    --json "$out/ood-$w.json" ${ROUND_QUICK:+--quick} 2>&1 | tee -a "$out/size.log"
done
