"""Routing accuracy on many crops: how often the router names the blur it was given.

quality.py scores routing on 30 images, where one image is 3.3 points. This
script draws many 256 px crops from a folder of sharp photographs (by default
the training photographs that ``examples/training/train_default.sh`` fetches;
the crops are fresh, but the photos are not held out), degrades each with every
task's generator plus sensor noise sigma=0.01 as quality.py does, and routes it
exactly as ``deblur()`` does (``demoe.classify_blur``: one routing from the image's most textured tiles).

    python benchmarks/routing.py --photos data/photos            # packaged model, 50 crops x 5 tasks
    python benchmarks/routing.py --photos data/photos --model runs/stage3/model.safetensors
"""

from __future__ import annotations

import argparse

import numpy as np

import demoe
from demoe.data import load_photos
from demoe.degrade import degrade
from quality import CROP, NOISE  # degraded exactly as in the quality benchmark


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default="data/photos", help="folder of sharp photographs")
    parser.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    parser.add_argument("--crops", type=int, default=50, help="crops; each is degraded by all 5 tasks")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)

    model = demoe.load_model(args.model, device="cpu")
    photos = [p for p in load_photos([args.photos]) if min(p.shape[:2]) > CROP]
    if not photos:
        parser.error(f"no photographs larger than {CROP} px in {args.photos}")
    rng = np.random.default_rng(args.seed)
    confusion = np.zeros((len(demoe.TASKS), len(demoe.TASKS)), int)
    by_size = {task: [] for task in demoe.TASKS}  # (PSF radius of gyration, routed right) where a PSF exists
    for _ in range(args.crops):
        img = photos[rng.integers(len(photos))]
        y, x = rng.integers(0, img.shape[0] - CROP), rng.integers(0, img.shape[1] - CROP)
        sharp = np.ascontiguousarray(img[y : y + CROP, x : x + CROP])
        for t, task in enumerate(demoe.TASKS):
            degraded = degrade(sharp, task, rng=int(rng.integers(1 << 30)), noise=NOISE)
            routed = demoe.classify_blur(degraded.blurry, model=model, device="cpu")
            probs = [routed[name] for name in demoe.TASKS]
            confusion[t, int(np.argmax(probs))] += 1
            if degraded.psf is not None:
                by_size[task].append((radius_of_gyration(degraded.psf), int(np.argmax(probs)) == t))

    print(f"Routing of {confusion.sum()} degraded {CROP} px crops from {args.photos} "
          f"(model: {args.model or 'packaged'}); rows: true task, columns: detected\n")
    print("| true \\ detected | " + " | ".join(demoe.TASKS) + " |")
    print("|---" * (len(demoe.TASKS) + 1) + "|")
    for t, task in enumerate(demoe.TASKS):
        print(f"| {task} | " + " | ".join(str(v) for v in confusion[t]) + " |")
    print(f"\nAccuracy: {np.trace(confusion) / confusion.sum():.1%}")
    print("\nBy blur size, where the blur has one PSF (thirds of the crops by the PSF's radius of gyration):")
    for task, rows in by_size.items():
        if len(rows) >= 3:
            size, right = np.array(rows, float).T
            edges = np.quantile(size, [0, 1 / 3, 2 / 3, 1])
            parts = [f"{lo:.1f}-{hi:.1f} px {right[(size >= lo) & (size <= hi)].mean():.0%}"
                     for lo, hi in zip(edges[:-1], edges[1:])]
            print(f"- {task}: " + ", ".join(parts))


def radius_of_gyration(psf: np.ndarray) -> float:
    """RMS distance of the PSF's mass from its centre, in pixels: one number for blur size."""
    w = psf / psf.sum()
    yy, xx = np.indices(psf.shape)
    cy, cx = (w * yy).sum(), (w * xx).sum()
    return float(np.sqrt((w * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum()))


if __name__ == "__main__":
    main()
