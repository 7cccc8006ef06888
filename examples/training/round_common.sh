# Shared by gpu_round.sh and size_round.sh (sourced, with ROUND_NAME set): paths, checks.
absolute() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
fail() { echo "$ROUND_NAME: $*" >&2; exit 2; }
# At least one photograph in $1 (the suffixes demoe.data.IMAGE_SUFFIXES reads), or stop.
require_photos() {
  local n
  n=$( { find "$1" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.tif' \
    -o -iname '*.tiff' -o -iname '*.bmp' -o -iname '*.webp' \) 2>/dev/null || true; } | wc -l)
  [ "$n" -ge 1 ] || fail "no photographs in $1: run examples/training/prepare_photos.sh first"
}
# CUDA, or the patch and batch of a small machine given explicitly ($1: the python to ask).
require_cuda_or_sizes() {
  if [ "$($1 -c 'import torch; print(int(torch.cuda.is_available()))')" != 1 ] \
    && { [ -z "${ROUND_PATCH:-}" ] || [ -z "${ROUND_BATCH:-}" ]; }; then
    fail "no CUDA device: the round's batches (120 patches of 192 px) need a large GPU; to try it here, set" \
      "ROUND_PATCH and ROUND_BATCH (e.g. 32 and 5)"
  fi
}
