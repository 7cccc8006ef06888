#!/usr/bin/env bash
# One GPU training round, sized for a 15-minute lease of one GPU (docs/training-rounds.md):
# the packaged weights trained for ROUND_MINUTES on batches made on the GPU itself, the
# result compared with the old weights (benchmarks/compare_weights.py: out-of-distribution
# and in-distribution tables and the acceptance verdict), and the new weights cut into
# shards small enough to come back from the lease.
#
#   bash examples/training/gpu_round.sh OUT [more demoe train options]
#
# OUT receives: train.log, compare.md, compare.json and model-partKofN.safetensors
# (join them with: python -m demoe.checkpoint join OUT/model-part*.safetensors -o FILE).
# Needs the photographs of examples/training/prepare_photos.sh in data/round/photos.
# Environment: ROUND_MINUTES (training time, default 5), ROUND_INIT (weights to start
# from, default the packaged ones), ROUND_SEED (default: today's date), PYTHON (python3),
# ROUND_PATCH / ROUND_BATCH (only for the speed check; pass --patch/--batch to change the
# training's), ROUND_QUICK=1 (a cut-down comparison, for the CPU check in tests/test_round.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: gpu_round.sh OUT [demoe train options]}
shift
py=${PYTHON:-python3}
photos=${ROUND_PHOTOS:-data/round/photos}
init=${ROUND_INIT:-packaged}
run=${ROUND_RUN:-runs/round}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

n=$( { find "$photos" -maxdepth 1 -type f 2>/dev/null || true; } | wc -l)
if [ "$n" -lt 1 ]; then
  echo "gpu_round.sh: no photographs in $photos: run examples/training/prepare_photos.sh first" >&2
  exit 2
fi
mkdir -p "$out"
rm -rf "$run"  # a round starts from ROUND_INIT, never from an older round's last.pt
$py - <<'PY' | tee "$out/train.log"
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"round on {gpu}, torch {torch.__version__}, Python {platform.python_version()}")
PY
# Precision and layout: whichever trains fastest here (bf16 / fp32, channels-last / NCHW), timed
# on the round's own batches (about 20 s on a GPU).
fastest=$($py benchmarks/train_speed.py --photos "$photos" --pick --steps "${ROUND_SPEED_STEPS:-15}" \
  --patch "${ROUND_PATCH:-192}" --batch "${ROUND_BATCH:-120}" 2>>"$out/train.log" | tee -a "$out/train.log" | tail -1) \
  || fastest=""
case $fastest in --amp*) ;; *) fastest="" ;; esac  # no verdict: the config file's settings
# shellcheck disable=SC2086
$py -m demoe train --config examples/training/gpu_round.toml --photos "$photos" --init "$init" $fastest \
  --time-limit "${ROUND_MINUTES:-5}" --seed "${ROUND_SEED:-$(date +%Y%m%d)}" --out "$run" --no-progress "$@" \
  2>&1 | tee -a "$out/train.log"
$py -m demoe.checkpoint split "$run/model.safetensors" "$out" --max-mib 15
# The comparison last, and allowed to fail: the weights are safe in OUT already, and
# benchmarks/compare_weights.py can be rerun on any machine.
if ! $py benchmarks/compare_weights.py --old "$init" --new "$run/model.safetensors" --device auto \
  --json "$out/compare.json" ${ROUND_QUICK:+--limit 1} > "$out/compare.md" 2>>"$out/train.log"; then
  echo "gpu_round.sh: the comparison failed (see train.log); rerun benchmarks/compare_weights.py" >&2
fi
cat "$out/compare.md"
ls -l "$out"
