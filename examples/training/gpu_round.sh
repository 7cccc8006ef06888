#!/usr/bin/env bash
# One GPU training round, sized for a 15-minute lease of one GPU (docs/training-rounds.md):
# the packaged weights trained on batches made on the GPU itself, the new weights cut into
# shards small enough to come back from the lease, then compared with the old ones
# (benchmarks/compare_weights.py: out-of-distribution and in-distribution tables and the
# acceptance verdict). The whole script keeps to ROUND_BUDGET_S seconds from its start.
#
#   bash examples/training/gpu_round.sh OUT [more demoe train options]
#
# OUT receives: train.log, compare.md, compare.json and model-partKofN.safetensors
# (join them with: python -m demoe.checkpoint join OUT/model-part*.safetensors -o FILE).
# Needs the photographs of examples/training/prepare_photos.sh in data/round/photos.
# Environment (paths are taken from where you run the script; options after OUT are read by
# demoe train from the repository's root):
#   ROUND_BUDGET_S   seconds the whole script may take (default 420: a 600 s command with
#                    benchmarks/gpu.py after it)
#   ROUND_RESERVE_S  seconds kept after training for loading, export, shards and the
#                    comparison (default 150)
#   ROUND_MINUTES    most minutes of training (default 4.5; less when the budget says so)
#   ROUND_INIT       weights to start from (default: the packaged ones)
#   ROUND_SEED       default: today's date
#   ROUND_PHOTOS, ROUND_RUN, PYTHON (python3)
#   ROUND_PATCH, ROUND_BATCH  patch and batch of the speed check and the training (default
#                    192 and 120, which need a large GPU; without CUDA they must be given)
#   ROUND_SPEED_S    most seconds for the speed check (default 90)
#   ROUND_QUICK=1    a cut-down comparison, for the CPU check in tests/test_round.py
set -euo pipefail
start=$SECONDS
ROUND_NAME=gpu_round.sh
# shellcheck source=round_common.sh
. "$(dirname "$0")/round_common.sh"
out=$(absolute "${1:?usage: gpu_round.sh OUT [demoe train options]}")
shift
photos=${ROUND_PHOTOS:+$(absolute "$ROUND_PHOTOS")}
run=${ROUND_RUN:+$(absolute "$ROUND_RUN")}
init=${ROUND_INIT:-packaged}
[ "$init" = packaged ] || [ ! -e "$init" ] || init=$(absolute "$init")
cd "$(dirname "$0")/../.."
photos=${photos:-$PWD/data/round/photos}
run=${run:-$PWD/runs/round}
py=${PYTHON:-python3}
budget=${ROUND_BUDGET_S:-420}
reserve=${ROUND_RESERVE_S:-150}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

require_photos "$photos"
case "$(realpath -m "$init")/" in
  "$(realpath -m "$run")"/*) fail "ROUND_INIT ($init) is inside ROUND_RUN ($run), which a round empties first" ;;
esac
case "$(realpath -m "$out")/" in
  "$(realpath -m "$run")"/*) fail "OUT ($out) is inside ROUND_RUN ($run), which a round empties first" ;;
esac
require_cuda_or_sizes "$py"
sizes=(--patch "${ROUND_PATCH:-192}" --batch "${ROUND_BATCH:-120}")
mkdir -p "$out"
rm -rf "$run"  # a round starts from ROUND_INIT, never from an older round's last.pt
$py - <<'PY' | tee "$out/train.log"
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"round on {gpu}, torch {torch.__version__}, Python {platform.python_version()}")
PY
# Precision and layout: whichever trains fastest here (bf16 / fp32, channels-last / NCHW), timed
# on the round's own batches (about 20 s on a GPU; never more than ROUND_SPEED_S, default 90).
fastest=$(timeout "${ROUND_SPEED_S:-90}" $py benchmarks/train_speed.py --photos "$photos" --pick --steps "${ROUND_SPEED_STEPS:-15}" \
  "${sizes[@]}" 2>>"$out/train.log" | tee -a "$out/train.log" | tail -1) || fastest=""
case $fastest in --amp*) ;; *) fastest="" ;; esac  # no verdict: the config file's settings
# Training gets what the budget leaves after the reserve, and at most ROUND_MINUTES.
minutes=$(awk -v most="${ROUND_MINUTES:-4.5}" -v left="$((budget - (SECONDS - start) - reserve))" \
  'BEGIN { m = left / 60; if (most + 0 < m) m = most + 0; printf "%.2f", m }')
awk -v m="$minutes" 'BEGIN { exit !(m >= 0.25) }' \
  || fail "only $minutes minutes of ROUND_BUDGET_S=$budget s are left for training: nothing trained"
echo "training for $minutes minutes ($((SECONDS - start)) s of the round's $budget s used)" | tee -a "$out/train.log"
# shellcheck disable=SC2086
$py -m demoe train --config examples/training/gpu_round.toml --photos "$photos" --init "$init" $fastest \
  "${sizes[@]}" --time-limit "$minutes" --seed "${ROUND_SEED:-$(date +%Y%m%d)}" --out "$run" --no-progress "$@" \
  2>&1 | tee -a "$out/train.log"
$py -m demoe.checkpoint split "$run/model.safetensors" "$out" --max-mib 15
# The comparison last, in the time that is left, and allowed to fail: the weights are safe in
# OUT already, and benchmarks/compare_weights.py can be rerun on any machine.
left=$((budget - (SECONDS - start)))
[ "$left" -ge 30 ] || left=30
if ! timeout "$left" $py benchmarks/compare_weights.py --old "$init" --new "$run/model.safetensors" --device auto \
  --json "$out/compare.json" ${ROUND_QUICK:+--limit 1} > "$out/compare.md" 2>>"$out/train.log"; then
  echo "gpu_round.sh: the comparison failed or ran out of time (see train.log); rerun benchmarks/compare_weights.py" >&2
fi
cat "$out/compare.md"
echo "round: $((SECONDS - start)) s"
ls -l "$out"
