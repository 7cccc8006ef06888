#!/usr/bin/env bash
# Reproduce the packaged default weights (src/demoe/weights/demoe-compact.safetensors).
#
# 1. Fetch free-licensed photographs from Debian packages (no install; root or
#    any user who may run apt-get download), 2. downscale them, 3. train.
# The packaged weights were trained in six stages:
#   stage 1 (one NVIDIA H200): this config as is (7.5 min budget, 2580 steps at batch 32)
#   stage 2 (H200): --init stage 1, --batch 48 --lr 4e-4 --warmup 50 --router-weight 0.3
#            --time-limit 4.2 (1273 steps)
#   stage 3 (2-core CPU): --init stage 2, --batch 8 --lr 2e-4 --router-weight 0.3,
#            105 min (3116 steps)
#   stage 4 (2-core CPU): --init stage 3, --patch 256 --batch 4 --lr 1e-4 --router-weight 0.3,
#            973 steps (the schedule --fit-to-time gave a 105 min budget while other
#            work shared the CPU; it took 72 min), fixed here with --steps 973
#   stage 5 (2-core CPU): --init stage 4, as stage 4 with --lr 5e-5 --ema 0.998 (exports the
#            moving average of the weights), 1564 steps, 88 min
#   stage 6 (2-core CPU): --init stage 5, as stage 5 with --lr 3e-5 --warmup 20 --ema 0.999,
#            1863 steps (a schedule --fit-to-time fitted to 105 min), fixed here with --steps 1863
# Stages 5 and 6 were each interrupted once and resumed (at steps 500 and 1028). A resumed
# run draws its data from a seed that includes the step, so an uninterrupted rerun sees
# other patches after those steps: the same recipe, not bit-identical weights.
# Stages 1-2 on a CPU: add --device cpu --workers 2 (much slower). The schedules are
# fitted to the time budget (--fit-to-time), so other hardware gets other step counts.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${WORK:-data}
mkdir -p "$work/debs" "$work/extracted"
(cd "$work/debs" && apt-get download plasma-workspace-wallpapers mate-backgrounds ukui-wallpapers opencv-doc)
for f in "$work"/debs/*.deb; do dpkg -x "$f" "$work/extracted"; done
E=$work/extracted
# Largest size of each Plasma wallpaper, MATE/UKUI backgrounds, OpenCV's sample photos;
# logos, charts, calibration boards and synthetic images are excluded.
PLASMA=$(for d in "$E"/usr/share/wallpapers/*/contents/images; do ls -S "$d"/* | head -1; done)
python -m demoe.data $PLASMA "$E/usr/share/backgrounds" -o "$work/photos" \
  --exclude '(?i)(Stripes|Ubuntu-Mate|Arc-Colors|Float-into|mate/abstract/(Flow|Gulp|Silk|Spring|Waves)|Elephants\.jpg|Elephants_3840|fluent|rollpaper|focal)'
python -m demoe.data "$E/usr/share/doc/opencv-doc/examples/data" -o "$work/photos" \
  --exclude '(?i)(logo|chessboard|left\d|right\d|digits|sudoku|alphabet|text|gradient|mask|/ml\.png|notes|pic\d|detect_blob|ellipses|cards|box|board|calibration|imageText|graf|HappyFish|Blender|smarties|shape|licenseplate|Megamind|starry|ela_|blox|aero|npp|chicky|tsukuba|lena|orange|apple)'
demoe train --config examples/training/default.toml --photos "$work/photos" --out runs/stage1 "$@"
demoe train --config examples/training/default.toml --photos "$work/photos" --init runs/stage1/model.safetensors \
  --batch 48 --lr 4e-4 --warmup 50 --router-weight 0.3 --time-limit 4.2 --out runs/stage2 "$@"
demoe train --config examples/training/default.toml --photos "$work/photos" --init runs/stage2/model.safetensors \
  --device cpu --workers 1 --batch 8 --lr 2e-4 --warmup 50 --router-weight 0.3 --seed 7 --time-limit 105 \
  --ckpt-every 200 --out runs/stage3 "$@"
demoe train --config examples/training/default.toml --photos "$work/photos" --init runs/stage3/model.safetensors \
  --device cpu --workers 1 --patch 256 --batch 4 --lr 1e-4 --warmup 50 --router-weight 0.3 --seed 11 \
  --steps 973 --no-fit-to-time --time-limit 0 --ckpt-every 200 --out runs/stage4 "$@"
demoe train --config examples/training/default.toml --photos "$work/photos" --init runs/stage4/model.safetensors \
  --device cpu --workers 1 --patch 256 --batch 4 --lr 5e-5 --warmup 50 --router-weight 0.3 --seed 17 --ema 0.998 \
  --steps 1564 --no-fit-to-time --time-limit 0 --ckpt-every 100 --out runs/stage5 "$@"
demoe train --config examples/training/default.toml --photos "$work/photos" --init runs/stage5/model.safetensors \
  --device cpu --workers 1 --patch 256 --batch 4 --lr 3e-5 --warmup 20 --router-weight 0.3 --seed 19 --ema 0.999 \
  --steps 1863 --no-fit-to-time --time-limit 0 --ckpt-every 100 --out runs/stage6 "$@"
echo "new weights: runs/stage6/model.safetensors"
