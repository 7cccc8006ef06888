"""Seam check: the same image through different tile grids, and tiled vs one whole pass.

On scikit-image's astronaut (512 x 512) with defocus blur, PSNR (dB) between
``deblur`` with tile sizes 256 and 384, and between tiled ``deblur`` and one
pass of the network over the whole image, without the test-time local
converter (TLC), with it at its default window (the model's training patch)
and with a smaller 192 px window. Higher is more seam-free.
``python benchmarks/seams.py`` (``--model FILE`` for other weights)
"""

import argparse

import numpy as np
from skimage import data

import demoe
from demoe.degrade import degrade


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-20))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    args = parser.parse_args(argv)
    model = demoe.load_model(args.model, device="cpu")
    sharp = data.astronaut().astype(np.float32) / 255
    blurry = np.clip(np.rint(degrade(sharp, "defocus", rng=1, radius=(3, 3)).blurry * 255), 0, 255).astype(np.uint8)
    print("| TLC | 256 vs 384 tiles | tiled vs whole pass | PSNR vs sharp (tiled 256) |")
    print("|---|---|---|---|")
    patch = int(model.metadata.get("patch_size", 0) or 256)
    labels = {False: "off", True: f"on, default window ({patch} px)", 192: "on, 192 px window"}
    for tlc, label in labels.items():
        a = demoe.deblur(blurry, model=model, task="defocus", tile_size=256, overlap=32, tlc=tlc)
        b = demoe.deblur(blurry, model=model, task="defocus", tile_size=384, overlap=32, tlc=tlc)
        whole = demoe.deblur(blurry, model=model, task="defocus", tile_size=1024, overlap=0, tlc=tlc)
        print(f"| {label} | {psnr(a, b):.1f} | {psnr(a, whole):.1f} | "
              f"{psnr(a, np.rint(sharp * 255)):.2f} |")


if __name__ == "__main__":
    main()
