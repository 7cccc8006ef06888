"""Quality benchmark: DeMoE's default model against classical restoration.

Crops of scikit-image's bundled photographs (never used for training) are
degraded by every task's generator with fixed seeds and a little sensor noise,
then restored by: nothing (the blurry input), the default model with
automatic routing, the default model told the true task, Richardson-Lucy and
Wiener deconvolution given the true PSF (where one exists), and unsharp
masking. PSNR and SSIM come from ``skimage.metrics``; routing accuracy is the
share of images whose detected task is the true one.

Run from the repository root::

    python benchmarks/quality.py            # writes docs/benchmarks/quality.{md,png}, examples.png

Needs matplotlib for the figures (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from skimage import data, filters

import demoe
from demoe.degrade import degrade
from demoe.tasks import ENSEMBLES
from _restore import crop, photo, richardson_lucy, scores, wiener

IMAGES = ["astronaut", "camera", "coffee", "chelsea", "rocket", "immunohistochemistry"]
CROP = 256
NOISE = 0.01  # Gaussian sensor noise (sigma, on [0, 1]) added to every degraded image
RL_ITERATIONS = 30  # best of 5/10/30 on these noisy crops
WIENER_BALANCE = 0.05
METHODS = ["blurry", "demoe_auto", "demoe_true_task", "richardson_lucy", "wiener", "unsharp_mask"]


def eval_images(limit: int | None = None) -> dict[str, np.ndarray]:
    """Central crops (float RGB in [0, 1]) of scikit-image's bundled photos (the first ``limit``)."""
    return {name: crop(photo(name), CROP) for name in IMAGES[:limit]}


def unsharp(image, sigma=2.0, amount=1.0):
    """Unsharp masking, ``x + amount * (x - G_sigma * x)``.

    (skimage.filters.unsharp_mask returned values of 1e30 on some of these
    float crops with scikit-image 0.26, so the formula is applied directly.)
    """
    blurred = filters.gaussian(image.astype(np.float64), sigma=sigma, channel_axis=-1)
    return image + amount * (image - blurred)


def run(model, seed0: int = 0, tlc: bool | int = True, ensemble: int = 1, *, device=None,
        limit: int | None = None, classical: bool = True):
    """Degrade every image by every task and restore it by every method.

    ``device`` goes to ``deblur()``; ``limit`` keeps the first images only and
    ``classical=False`` leaves out the methods that do not depend on the model
    (Richardson-Lucy, Wiener, unsharp masking), for a quick comparison of weights.
    """
    rows = []  # (image, task, method, psnr, ssim, mean_ratio)
    routed = []  # (true task, detected task)
    pictures = {}
    for i, (name, sharp) in enumerate(eval_images(limit).items()):
        for t, task in enumerate(demoe.TASKS):
            pair = degrade(sharp, task, rng=seed0 + 100 * i + t, noise=NOISE)
            blurry = pair.blurry
            results = {"blurry": blurry}
            auto, info = demoe.deblur(blurry, model=model, return_info=True, tlc=tlc, ensemble=ensemble, device=device)
            results["demoe_auto"] = auto
            routed.append((task, info["task"]))
            results["demoe_true_task"] = demoe.deblur(blurry, task=task, model=model, tlc=tlc, ensemble=ensemble,
                                                      device=device)
            if classical:
                if pair.psf is not None and pair.psf.size > 1:
                    results["richardson_lucy"] = richardson_lucy(blurry, pair.psf, RL_ITERATIONS)
                    results["wiener"] = wiener(blurry, pair.psf, WIENER_BALANCE)
                results["unsharp_mask"] = unsharp(blurry)
            for method, img in results.items():
                p, s = scores(img, pair.sharp)
                rows.append((name, task, method, p, s, float(np.mean(img) / max(np.mean(blurry), 1e-6))))
            if name == "coffee":
                pictures[task] = (blurry, auto, pair.sharp)
    return rows, routed, pictures


def table(rows, routed) -> str:
    lines = ["| task | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    means = {m: [] for m in METHODS}
    for task in demoe.TASKS:
        cells = []
        for m in METHODS:
            vals = [(p, s) for (_, t, mm, p, s, _) in rows if t == task and mm == m]
            if vals:
                p, s = np.mean(vals, axis=0)
                cells.append(f"{p:.2f} / {s:.3f}")
                means[m].append(p)
            else:
                cells.append("n/a")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    all_cells = []
    for m in METHODS:
        vals = [(p, s) for (_, _, mm, p, s, _) in rows if mm == m]
        p, s = np.mean(vals, axis=0)
        all_cells.append(f"**{p:.2f} / {s:.3f}**")
    lines.append("| **mean (PSNR dB / SSIM)** | " + " | ".join(all_cells) + " |")
    blurry = {(im, t): p for (im, t, m, p, _, _) in rows if m == "blurry"}
    gains = {m: np.mean([p - blurry[(im, t)] for (im, t, mm, p, _, _) in rows if mm == m]) for m in METHODS}
    lines.append("| mean PSNR gain over blurry | " + " | ".join(f"{gains[m]:+.2f} dB" for m in METHODS) + " |")
    # Where a PSF exists, compare DeMoE with Richardson-Lucy on the same images.
    psf_cases = {(im, t) for (im, t, m, *_ ) in rows if m == "richardson_lucy"}
    for m in ("demoe_auto", "demoe_true_task", "richardson_lucy", "wiener"):
        v = np.mean([p for (im, t, mm, p, _, _) in rows if mm == m and (im, t) in psf_cases])
        lines.append(f"\nMean PSNR on the {len(psf_cases)} cases with a PSF, {m}: {v:.2f} dB")
    blur_only = {(im, t) for (im, t) in psf_cases if t != "low_light"}
    parts = []
    for m in METHODS:
        v = np.mean([p for (im, t, mm, p, _, _) in rows if mm == m and (im, t) in blur_only])
        parts.append(f"{m} {v:.2f} dB")
    lines.append(f"\nThe same without low_light (pure blur with a PSF, {len(blur_only)} cases): " + ", ".join(parts))
    acc = np.mean([a == b for a, b in routed])
    lines.append(f"\nRouting accuracy (auto-detected task = true task): {acc:.1%} of {len(routed)} images")
    for task in demoe.TASKS:
        got = [b for a, b in routed if a == task]
        lines.append(f"- {task}: {sum(g == task for g in got)}/{len(got)} (detected: {', '.join(sorted(set(g or '?' for g in got)))})")
    ratios = [r for (_, t, m, _, _, r) in rows if m == "demoe_auto" and t != "low_light"]
    lines.append(f"\nMean intensity of the auto result / input, tasks other than low_light: "
                 f"{min(ratios):.3f} .. {max(ratios):.3f}")
    return "\n".join(lines), gains


def figures(rows, pictures, clock_pair, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.13
    x = np.arange(len(demoe.TASKS))
    for k, m in enumerate(METHODS):
        vals = [np.mean([p for (_, t, mm, p, _, _) in rows if t == task and mm == m] or [np.nan]) for task in demoe.TASKS]
        ax.bar(x + (k - 2.5) * width, vals, width, label=m)
    ax.set_xticks(x, demoe.TASKS)
    ax.set_ylabel("PSNR (dB)")
    ax.set_ylim(bottom=15)
    ax.legend(ncol=3, fontsize=8)
    ax.set_title("Mean PSNR per task (scikit-image photos, 256 px crops)")
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(3, len(pictures) + 1, figsize=(2.4 * (len(pictures) + 1), 7.4))
    for j, (task, imgs) in enumerate(pictures.items()):
        for i, (img, label) in enumerate(zip(imgs, ("blurry", "DeMoE (auto)", "sharp"))):
            axes[i, j].imshow(np.clip(img, 0, 1))
            axes[i, j].set_title(f"{task}\n{label}" if i == 0 else label, fontsize=8)
    for i, img in enumerate(clock_pair + (None,)):
        a = axes[i, -1]
        if img is not None:
            a.imshow(img, cmap="gray", vmin=0, vmax=255)
            a.set_title("clock_motion (real)\n" + ("blurry" if i == 0 else "DeMoE (auto)"), fontsize=8)
    for a in axes.flat:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(out / "examples.png", dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    parser.add_argument("--out", default="docs/benchmarks", help="folder for quality.md / quality.png / examples.png")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--tlc", type=int, default=None, metavar="PX",
                        help="local converter window in pixels, 0 for off (default: deblur()'s, the training patch)")
    parser.add_argument("--ensemble", type=int, default=1, choices=ENSEMBLES,
                        help="deblur()'s geometric self-ensemble: copies of each tile averaged (default 1: off)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = demoe.load_model(args.model, device="cpu")
    t0 = time.time()
    rows, routed, pictures = run(model, tlc=True if args.tlc is None else (args.tlc or False), ensemble=args.ensemble)
    clock = data.clock()
    clock_out = demoe.deblur(clock, model=model, ensemble=args.ensemble)
    elapsed = time.time() - t0
    text, gains = table(rows, routed)
    notes = "" if args.tlc is None else f"; local converter window: {args.tlc or 'off'}"
    if args.ensemble > 1:
        notes += f"; DeMoE with deblur(ensemble={args.ensemble}) (each tile and its flipped/transposed copies averaged)"
    command = " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    header = (f"# Quality benchmark\n\nModel: `{Path(model.source or 'default').name}` "
              f"({model.config}, k={model.top_k}). Images: {', '.join(IMAGES)} (central {CROP} px crops), "
              f"each degraded by every task's generator (seed = 100*image + task) plus Gaussian noise "
              f"sigma={NOISE}{notes}. Cells: PSNR (dB) / SSIM. Richardson-Lucy ({RL_ITERATIONS} iterations) and Wiener "
              f"(balance {WIENER_BALANCE}) get the true PSF and a reflect-padded image; n/a where the blur has no single PSF.\n\n"
              f"Command: `{command}`; {platform.machine()} CPU, "
              f"{time.strftime('%Y-%m-%d')}, {elapsed:.0f} s.\n\n")
    (out / "quality.md").write_text(header + text + "\n")
    print(header + text)
    if not args.no_figures:
        figures(rows, pictures, (clock, clock_out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
