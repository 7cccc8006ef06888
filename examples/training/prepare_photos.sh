#!/usr/bin/env bash
# Prepare the sharp photographs of a training round: about 400 distinct free-licensed
# photographs and textures from Debian packages (landscapes, cities, monuments, animals,
# people, macro nature, textures), downscaled into data/round/photos/ small enough for the
# round to carry them to a GPU machine (the travelling work tree is limited to 64 MiB).
#
# 1. fetch the packages (no install: `apt-get download`, run `apt-get update` once first)
#    into $DEBS (default data/debs), keeping those already there;
# 2. unpack each into data/extracted/PKG/ (again only when its .deb changed), and the
#    photographs inside its archives (GCompris' Qt resources need a Qt binding: the
#    napari extra);
# 3. select the photographs (examples/training/photo_sources.py says which, and why the
#    rest are left), then `python -m demoe.data`: each centre-cropped to a square and
#    shrunk (area interpolation) by at least 1.5x to 448 x 448 px (a square costs the pack
#    least per distinct picture), written as JPEG quality 94 without chroma subsampling,
#    one copy of each picture (the largest); 384 px at least, or left out;
# 4. write examples/training/photos-manifest.tsv (file, package, version, source path,
#    licence from the package's copyright file, sha256), check that none of them is one of
#    scikit-image's bundled images (the evaluation set), print the count and size.
# Running it again rebuilds data/round/photos/ from scratch: the same files, no more.
# Environment: WORK (default data), DEBS (default $WORK/debs), BUDGET_MIB (default 36),
# LICENCES (a regular expression: only photographs under a matching licence, e.g.
# '^(public-domain|CC0-1\.0|CC-BY-[0-9.]+|Apache-2\.0 AND BSD-3-Clause)$' for the permissive
# ones, 215 of the 445; docs/training-data.md lists them all).
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${WORK:-data}
debs=${DEBS:-$work/debs}
budget=${BUDGET_MIB:-36}
out=$work/round/photos
packages=(plasma-workspace-wallpapers mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 opencv-doc
          digikam-data endless-sky-high-dpi gcompris-qt-data ufoai-textures palapeli-data)
mkdir -p "$debs" "$work/extracted" "$work/round"

missing=()
for p in "${packages[@]}"; do compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p"); done
if ((${#missing[@]})); then (cd "$debs" && apt-get download "${missing[@]}"); fi
for p in "${packages[@]}"; do
  deb=$(ls "$debs/${p}"_*.deb | sort -V | tail -n 1)
  dest=$work/extracted/$p
  if [ "$(cat "$dest/.deb" 2>/dev/null)" != "$(basename "$deb")" ]; then
    rm -rf "$dest" && mkdir -p "$dest" && dpkg -x "$deb" "$dest" && basename "$deb" > "$dest/.deb"
  fi
done
python examples/training/photo_sources.py unpack "$work/extracted"
python examples/training/photo_sources.py list "$work/extracted" ${LICENCES:+--licences "$LICENCES"} \
  > "$work/round/sources.txt"

rm -rf "$out"
python -m demoe.data @"$work/round/sources.txt" -o "$out" --short-side 448 --max-aspect 1 --min-size 384 \
  --jpeg 94 --dedupe 0.99 --manifest "$work/round/prepared.tsv"
python examples/training/photo_sources.py manifest "$work/extracted" "$work/round/prepared.tsv" "$out" \
  > examples/training/photos-manifest.tsv
python examples/training/photo_sources.py check "$out"  # none of them is one of scikit-image's images

count=$(find "$out" -type f -name '*.jpg' | wc -l)
bytes=$(find "$out" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "$count photographs, $mib MiB in $out (of $budget MiB allowed); licences:"
cut -f5 examples/training/photos-manifest.tsv | tail -n +2 | sort | uniq -c | sort -rn
if awk -v b="$bytes" -v m="$budget" 'BEGIN { exit !(b > m * 1048576) }'; then
  echo "error: $out is over the $budget MiB that a round can carry" >&2
  exit 1
fi
