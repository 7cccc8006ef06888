"""Quality benchmark: DeMoE's default model against classical restoration tuned as well.

Crops of scikit-image's bundled photographs (never used for training) are
degraded by every task's generator with fixed seeds and a little sensor noise,
then restored by: nothing (the blurry input), the default model with
automatic routing, the default model told the true task, and the classical
method that fits the degradation: Richardson-Lucy and Wiener deconvolution
given the true PSF for the blurs that have one (defocus, camera shake), unsharp
masking for every blur, and for low light exposure and gamma correction
followed by denoising (``_restore.exposure_denoise``). Every classical setting
(RL iterations, Wiener balance, unsharp sigma and amount, the exposure target
and denoising weight) is chosen per task from a small grid by mean PSNR on a
separate tuning set (``TUNING_IMAGES``: other photographs, other seeds), never
on the reported images; the report states the grids and the choices. The
tables compare like with like: the pure blurs with a PSF, the blurs without
one, and low light, each against the methods made for it. PSNR and SSIM come
from ``skimage.metrics``; routing accuracy is the share of images whose
detected task is the true one.

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
from skimage import data

import demoe
from demoe.degrade import degrade
from demoe.tasks import ENSEMBLES
from _restore import (
    EXPOSURE_TARGETS,
    RL_ITERATIONS,
    TV_WEIGHTS,
    UNSHARP_AMOUNTS,
    UNSHARP_SIGMAS,
    WIENER_BALANCES,
    best_setting,
    classical,
    crop,
    photo,
    scores,
    tune,
)

IMAGES = ["astronaut", "camera", "coffee", "chelsea", "rocket", "immunohistochemistry"]
CROP = 256
NOISE = 0.01  # Gaussian sensor noise (sigma, on [0, 1]) added to every degraded image
#: Tuning crops for the classical methods' settings: (photo, top, left), none of the reported photographs.
#: Photographs of scenes and objects like the reported ones; not scikit-image's fundus or microscopy
#: images, nearly flat at this noise level (on them the deconvolutions' best settings are the grids' most
#: regularised, 5 iterations or less and balance 0.5, against 10-50 and 0.005-0.02 on photographs).
TUNING_IMAGES = [
    ("stereo_motorcycle", 244, 0),  # a street scene (colour): a scooter's wheel, a wall
    ("stereo_motorcycle", 0, 485),  # the garage behind it: shelves, boxes
    ("coins", 40, 100),  # coins on a plain ground (gray)
    ("brick", 0, 0),  # a brick wall (gray)
]
TUNING_SEED = 10_000
#: The classical methods run on each task: deconvolution where the blur has one PSF, unsharp masking
#: on every blur, exposure correction and denoising on low light (no deconvolution undoes it).
CLASSICAL_FOR = {
    "defocus": ("richardson_lucy", "wiener", "unsharp_mask"),
    "global_motion": ("richardson_lucy", "wiener", "unsharp_mask"),
    "local_motion": ("unsharp_mask",),
    "synth_global_motion": ("unsharp_mask",),
    "low_light": ("exposure_denoise",),
}
DEMOE = ["blurry", "demoe_auto", "demoe_true_task"]
METHODS = [*DEMOE, "richardson_lucy", "wiener", "unsharp_mask", "exposure_denoise"]
#: The report's tables: (title, tasks, methods compared).
GROUPS = [
    ("Pure blur with one PSF (Richardson-Lucy and Wiener are given the true PSF)", ("defocus", "global_motion"),
     [*DEMOE, "richardson_lucy", "wiener", "unsharp_mask"]),
    ("Blur without a single PSF", ("local_motion", "synth_global_motion"), [*DEMOE, "unsharp_mask"]),
    ("Low light (under-exposure, noise and a short shake)", ("low_light",), [*DEMOE, "exposure_denoise"]),
]


def eval_images(limit: int | None = None) -> dict[str, np.ndarray]:
    """Central crops (float RGB in [0, 1]) of scikit-image's bundled photos (the first ``limit``)."""
    return {name: crop(photo(name), CROP) for name in IMAGES[:limit]}


def tuning_cases(limit: int | None = None) -> dict[str, list]:
    """Task -> the tuning set: ``TUNING_IMAGES`` (the first ``limit``) degraded by the task's generator,
    seed = ``TUNING_SEED`` + 100*image + task."""
    groups = {task: [] for task in demoe.TASKS}
    for i, (name, y, x) in enumerate(TUNING_IMAGES[:limit]):
        sharp = crop(photo(name), CROP, y, x)
        for t, task in enumerate(demoe.TASKS):
            groups[task].append(degrade(sharp, task, rng=TUNING_SEED + 100 * i + t, noise=NOISE))
    return groups


def reported_cases(tasks, limit: int | None = None) -> dict[str, list]:
    """Task -> the reported images (the first ``limit``) degraded as :func:`run` degrades them."""
    return {task: [degrade(sharp, task, rng=100 * i + demoe.TASKS.index(task), noise=NOISE)
                   for i, sharp in enumerate(eval_images(limit).values())] for task in tasks}


def oracle(limit: int | None = None) -> dict[str, dict[str, tuple]]:
    """The deconvolutions' best settings on the reported pure-blur images themselves, which no user can
    choose (the sharp images are needed): task -> method -> (setting, mean PSNR). A bound on what
    tuning on a separate set may cost them."""
    groups = reported_cases(GROUPS[0][1], limit)
    return {task: {m: best_setting(cases, m) for m in ("richardson_lucy", "wiener")} for task, cases in groups.items()}


def tune_classical(limit: int | None = None) -> dict[str, dict]:
    """Task -> {classical method: its setting of best mean PSNR on that task's tuning set}."""
    return tune(tuning_cases(limit), CLASSICAL_FOR)


def run(model, seed0: int = 0, tlc: bool | int = True, ensemble: int = 1, *, device=None,
        limit: int | None = None, settings: dict | None = None):
    """Degrade every image by every task and restore it by DeMoE and, given ``settings``, the classical methods.

    ``device`` goes to ``deblur()``; ``limit`` keeps the first images only.
    ``settings`` (from :func:`tune_classical`) runs the classical methods of
    ``CLASSICAL_FOR`` with them; None leaves them out, for a quick comparison of
    weights. Returns rows ``(image, task, method, psnr, ssim)``, ``(true task,
    detected task)`` pairs and the pictures of the figure.
    """
    rows = []
    routed = []
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
            for method, setting in (settings or {}).get(task, {}).items():
                results[method] = classical(method, pair, setting)
            for method, img in results.items():
                rows.append((name, task, method, *scores(img, pair.sharp)))
            if name == "coffee":
                pictures[task] = (blurry, auto, pair.sharp)
    return rows, routed, pictures


LABELS = {"blurry": "blurry", "demoe_auto": "DeMoE, auto", "demoe_true_task": "DeMoE, true task",
          "richardson_lucy": "Richardson-Lucy", "wiener": "Wiener", "unsharp_mask": "unsharp mask",
          "exposure_denoise": "exposure + denoising"}


def _mean(rows, method, tasks, column=3):
    vals = [r[column] for r in rows if r[2] == method and r[1] in tasks]
    return float(np.mean(vals)) if vals else float("nan")


def _gain(rows, method, tasks):
    blurry = {(im, t): p for (im, t, m, p, _) in rows if m == "blurry"}
    return float(np.mean([p - blurry[(im, t)] for (im, t, m, p, _) in rows if m == method and t in tasks]))


def setting_text(method: str, setting) -> str:
    if method == "richardson_lucy":
        return f"{setting} iterations"
    if method == "wiener":
        return f"balance {setting}"
    if method == "unsharp_mask":
        return f"sigma {setting[0]} px, amount {setting[1]}"
    return f"mean {setting[0]} in linear light, TV weight {setting[1]}"


def table(rows, routed, settings: dict | None = None, best: dict | None = None) -> str:
    """The report: a table per group of tasks (like against like), DeMoE over all images, routing, the
    classical ``settings`` and, given ``best`` (:func:`oracle`), what the deconvolutions' oracle settings give."""
    lines = []
    for title, tasks, methods in GROUPS:
        methods = [m for m in methods if any(r[2] == m for r in rows)]
        n = sum(1 for r in rows if r[2] == "blurry" and r[1] in tasks)
        lines += [f"## {title}: {n} images", "", "| task | " + " | ".join(LABELS[m] for m in methods) + " |",
                  "|---" * (len(methods) + 1) + "|"]
        for task in tasks:
            lines.append(f"| {task} | " + " | ".join(f"{_mean(rows, m, [task]):.2f} / {_mean(rows, m, [task], 4):.3f}"
                                                   for m in methods) + " |")
        if len(tasks) > 1:
            lines.append("| **mean (PSNR dB / SSIM)** | " + " | ".join(
                f"**{_mean(rows, m, tasks):.2f} / {_mean(rows, m, tasks, 4):.3f}**" for m in methods) + " |")
        lines.append("| mean PSNR gain over blurry | " + " | ".join(f"{_gain(rows, m, tasks):+.2f} dB"
                                                                 for m in methods) + " |")
        lines.append("")
    every = demoe.TASKS
    n = sum(1 for r in rows if r[2] == "blurry")
    lines.append(f"All {n} images, DeMoE: " + ", ".join(
        f"{LABELS[m]} {_mean(rows, m, every):.2f} dB / {_mean(rows, m, every, 4):.3f} (gain {_gain(rows, m, every):+.2f} dB)"
        for m in DEMOE[1:]) + f"; blurry {_mean(rows, 'blurry', every):.2f} dB / {_mean(rows, 'blurry', every, 4):.3f}.")
    acc = np.mean([a == b for a, b in routed])
    lines.append(f"\nRouting accuracy (auto-detected task = true task): {acc:.1%} of {len(routed)} images")
    for task in demoe.TASKS:
        got = [b for a, b in routed if a == task]
        lines.append(f"- {task}: {sum(g == task for g in got)}/{len(got)} (detected: {', '.join(sorted(set(g or '?' for g in got)))})")
    if settings:
        lines += ["", "Classical settings, chosen per task by mean PSNR on the tuning set:", ""]
        for task, chosen in settings.items():
            lines.append(f"- {task}: " + "; ".join(f"{LABELS[m]} {setting_text(m, s)}" for m, s in chosen.items()))
    if best:
        tasks = list(best)
        lines += ["", "Check: chosen on the reported pure-blur images themselves (an oracle, which needs the sharp "
                  "images), the deconvolutions' settings would give them, over the same images:"]
        for m in ("richardson_lucy", "wiener"):
            mean = np.mean([best[t][m][1] for t in tasks])  # the tasks have equally many images
            lines.append(f"- {LABELS[m]}: {mean:.2f} dB (tuned on the tuning set: {_mean(rows, m, tasks):.2f} dB); "
                         + ", ".join(f"{t} {setting_text(m, best[t][m][0])}" for t in tasks))
    return "\n".join(lines)


def figures(rows, pictures, clock_pair, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.14
    colours = {m: f"C{k}" for k, m in enumerate(METHODS)}
    for x, task in enumerate(demoe.TASKS):  # each task's bars: DeMoE and the methods made for its blur
        methods = [m for m in METHODS if any(r[1] == task and r[2] == m for r in rows)]
        for k, m in enumerate(methods):
            ax.bar(x + (k - (len(methods) - 1) / 2) * width, _mean(rows, m, [task]), width, color=colours[m],
                   label=LABELS[m] if x == 0 or m == "exposure_denoise" else None)
    ax.set_xticks(range(len(demoe.TASKS)), demoe.TASKS)
    ax.set_ylabel("PSNR (dB)")
    ax.set_ylim(bottom=8)
    ax.legend(ncol=4, fontsize=8, loc="lower left")
    ax.set_title("Mean PSNR per task (scikit-image photos, 256 px crops; classical settings tuned on other photos)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)

    if not pictures:  # coffee was left out (--limit)
        return
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
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="first N images (and tuning images) only, for a quick check; the report says so")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = demoe.load_model(args.model, device="cpu")
    t0 = time.time()
    settings = tune_classical(args.limit)
    tuning_seconds = time.time() - t0
    rows, routed, pictures = run(model, tlc=True if args.tlc is None else (args.tlc or False), ensemble=args.ensemble,
                                 limit=args.limit, settings=settings)
    best = oracle(args.limit)
    clock = data.clock()
    clock_out = demoe.deblur(clock, model=model, ensemble=args.ensemble)
    elapsed = time.time() - t0
    text = table(rows, routed, settings, best)
    notes = "" if args.tlc is None else f"; local converter window: {args.tlc or 'off'}"
    if args.ensemble > 1:
        notes += f"; DeMoE with deblur(ensemble={args.ensemble}) (each tile and its flipped/transposed copies averaged)"
    if args.limit is not None:
        notes += f"; first {args.limit} image(s) and tuning image(s) only"
    def axis(values):
        return "/".join(map(str, values))

    grids = (f"Richardson-Lucy {axis(RL_ITERATIONS)} iterations, Wiener balance {axis(WIENER_BALANCES)}, unsharp "
             f"masking sigma {axis(UNSHARP_SIGMAS)} px x amount {axis(UNSHARP_AMOUNTS)}, exposure target "
             f"{axis(EXPOSURE_TARGETS)} (mean in linear light) x TV weight {axis(TV_WEIGHTS)}")
    tuning = ", ".join(f"{name} at ({y}, {x})" for name, y, x in TUNING_IMAGES[: args.limit])
    command = " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    header = (f"# Quality benchmark\n\nModel: `{Path(model.source or 'default').name}` "
              f"({model.config}, k={model.top_k}). Images: {', '.join(IMAGES[: args.limit])} (central {CROP} px "
              f"crops), each degraded by every task's generator (seed = 100*image + task) plus Gaussian noise "
              f"sigma={NOISE}{notes}. Cells: PSNR (dB) / SSIM. Each task is compared with the classical methods "
              "made for its degradation: Richardson-Lucy and Wiener deconvolution (given the true PSF, on a "
              "reflect-padded image) where the blur has one PSF, unsharp masking on every blur, and on low light "
              "exposure and gamma correction followed by total-variation denoising. Their settings are chosen per "
              f"task by mean PSNR on a separate tuning set ({CROP} px crops of {tuning}, degraded the same way with "
              f"seeds from {TUNING_SEED}), never on the reported images, from these grids: {grids}.\n\n"
              f"Command: `{command}`; {platform.machine()} CPU, {time.strftime('%Y-%m-%d')}, {elapsed:.0f} s "
              f"(tuning {tuning_seconds:.0f} s).\n\n")
    (out / "quality.md").write_text(header + text + "\n")
    print(header + text)
    if not args.no_figures:
        figures(rows, pictures, (clock, clock_out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
