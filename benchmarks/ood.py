"""Out-of-distribution benchmark: blur that DeMoE's training generators never produce.

``demoe.degrade`` trains the model on defocus disks of radius 1-6 px with a
soft rim, camera shake from a Boracchi-Foi random walk (constant speed, path
length 4-25 px, occasional jerks), moving objects over a sharp background,
GoPro-like averages of a few warped frames, and low light. This benchmark
blurs other scikit-image photos with five families outside that set, each
chosen to test one way the model could have learnt the generators rather
than deblurring:

=================  =====================================================================
family             PSF, and why it is out of distribution
=================  =====================================================================
gaussian           isotropic Gaussian, sigma 1.5-3.5 px: a smooth bell, no disk rim
                   (microscopes, soft lenses, atmosphere); the generators' disks all
                   have a sharp-ish edge.
linear             a straight uniform line of 7-25 px at a random angle over the whole
                   frame: the commonest textbook motion blur. The generators' whole-frame
                   motions are curved random walks or a few discrete warped frames; only
                   moving objects get (near-)straight lines, on part of the image.
smooth_shake       camera shake from another model: the velocity is a Gaussian process
                   (white noise low-pass filtered over 10-30 % of the exposure), the path
                   its integral, 8-25 px long. Speed varies along the path, so the
                   kernel is brighter where the camera lingers, as in recorded shake
                   kernels (Levin et al.); the Boracchi-Foi walk moves at constant speed.
defocus_motion     a disk of radius 2-4 px convolved with a straight line of 6-14 px:
                   a thick, rounded streak (out of focus *and* moving), a shape no
                   single generator makes.
large_defocus      a disk of radius 7-10 px, beyond the generators' 6 px.
=================  =====================================================================

Every family is applied to the same eight 256 px crops (``IMAGES``; none is
used for training, none is a crop that ``benchmarks/quality.py`` scores), with
Gaussian noise sigma 0.01 on [0, 1] and fixed seeds, so the benchmark is
exactly reproducible. Methods: the blurry input; DeMoE auto-routed; DeMoE
forced to the closest expert (``EXPERT``: defocus for the Gaussian and the
large disks, global_motion for the lines, the shake and the streaks of
defocus_motion, which are longer than they are wide); Richardson-Lucy and
Wiener *given the true PSF*, on a reflect-padded image. Their settings
(``RL_ITERATIONS``, ``WIENER_BALANCES``) are chosen per family, by mean PSNR,
on a separate tuning set (gray crops of other photos, other seeds:
``TUNING_IMAGES``), never on the reported cases; the report prints the chosen
values. Per family rather than globally, because the best Wiener balance
differs fifty-fold between families (0.005-0.01 for the Gaussian, 0.5-1 for
lines and large disks): the classical methods are the reference that knows
the exact blur, which DeMoE never does, so they get their best settings.

    python benchmarks/ood.py                     # packaged model; writes docs/benchmarks/ood.md
    python benchmarks/ood.py --model RUN/model.safetensors --device cuda --out run.md --json run.json

``benchmarks/compare_weights.py`` runs this and the in-distribution quality
benchmark for two sets of weights and applies the project's acceptance rule.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import convolve2d

import demoe
from demoe.checkpoint import resolve_device
from demoe.degrade import make_pair, psf_disk, psf_gaussian, psf_trajectory, random_linear_trajectory
from _report import save_report
from _restore import RL_ITERATIONS, WIENER_BALANCES, crop, photo, richardson_lucy, scores, wiener
from _restore import tune as tune_classical

CROP = 256
NOISE = 0.01  # Gaussian sensor noise (sigma, on [0, 1]) added to every blurred image
#: Reported crops: (photo, top, left). None of quality.py's central crops; none used for training.
IMAGES = [
    ("stereo_motorcycle", 200, 180),  # the motorcycle (left view, colour)
    ("stereo_motorcycle", 0, 460),  # the garage shelves behind it
    ("retina", 560, 240),  # optic disc and vessels (colour)
    ("hubble_deep_field", 300, 420),  # galaxies on black (colour)
    ("coins", 24, 64),
    ("gravel", 128, 128),
    ("brick", 128, 128),
    ("moon", 200, 160),
]
#: Tuning crops for the classical methods' settings: other images, other seeds.
TUNING_IMAGES = [
    ("grass", 128, 128),
    ("camera", 0, 0),
    ("astronaut", 256, 0),
    ("coffee", 144, 0),
]
TUNING_SEED = 10_000
METHODS = ["blurry", "demoe_auto", "demoe_expert", "richardson_lucy", "wiener"]


# -- the blur families ---------------------------------------------------------------
def smooth_shake_trajectory(rng: np.random.Generator, length: float, samples: int = 256) -> np.ndarray:
    """A camera path whose velocity is a Gaussian process: low-pass-filtered white noise, integrated.

    The correlation time is 10-30 % of the exposure; the path is scaled to
    ``length`` pixels. Samples are equally spaced in time, so the kernel is
    bright where the camera moves slowly.
    """
    scale = rng.uniform(0.1, 0.3) * samples
    pad = int(4 * scale)
    velocity = gaussian_filter1d(rng.normal(size=(samples + 2 * pad, 2)), scale, axis=0)[pad:-pad]
    path = np.cumsum(velocity, axis=0)
    travelled = np.linalg.norm(np.diff(path, axis=0), axis=1).sum()
    return path * (length / max(travelled, 1e-12))


def _gaussian(rng):
    return psf_gaussian(rng.uniform(1.5, 3.5))


def _linear(rng):
    return psf_trajectory(random_linear_trajectory(rng, rng.uniform(7.0, 25.0), curvature=0.0))


def _smooth_shake(rng):
    return psf_trajectory(smooth_shake_trajectory(rng, rng.uniform(8.0, 25.0)))


def _defocus_motion(rng):
    disk = psf_disk(rng.uniform(2.0, 4.0), softness=rng.uniform(0.3, 1.5))
    line = psf_trajectory(random_linear_trajectory(rng, rng.uniform(6.0, 14.0), curvature=0.0))
    psf = convolve2d(disk, line, mode="full")
    return (psf / psf.sum()).astype(np.float32)


def _large_defocus(rng):
    return psf_disk(rng.uniform(7.0, 10.0), softness=rng.uniform(0.3, 1.5))


#: Family -> PSF generator (takes a numpy Generator).
FAMILIES = {
    "gaussian": _gaussian,
    "linear": _linear,
    "smooth_shake": _smooth_shake,
    "defocus_motion": _defocus_motion,
    "large_defocus": _large_defocus,
}
#: Family -> the expert closest to it, for the forced-expert column.
EXPERT = {
    "gaussian": "defocus",
    "linear": "global_motion",
    "smooth_shake": "global_motion",
    "defocus_motion": "global_motion",
    "large_defocus": "defocus",
}


@dataclass
class Case:
    image: str  # photo name and crop corner
    family: str
    sharp: np.ndarray
    blurry: np.ndarray
    psf: np.ndarray


def cases(images=IMAGES, seed0: int = 0, limit: int | None = None, gray: bool = False) -> list[Case]:
    """Every image (the first ``limit``) blurred by every family; seed = seed0 + 100 * image + family.

    ``gray``: one channel, the mean of the three (for tuning the classical methods,
    which restore each channel alone: a third of the cost of colour).
    """
    out = []
    for i, (name, y, x) in enumerate(images[:limit]):
        sharp = crop(photo(name), CROP, y, x)
        if gray:
            sharp = sharp.mean(axis=-1, keepdims=True)
        for f, (family, make_psf) in enumerate(FAMILIES.items()):
            rng = np.random.default_rng(seed0 + 100 * i + f)
            pair = make_pair(sharp, make_psf(rng), rng, noise=NOISE)
            out.append(Case(f"{name}@{y},{x}", family, pair.sharp, pair.blurry, pair.psf))
    return out


# -- the methods -----------------------------------------------------------------------
def tune(tuning: list[Case]) -> dict[str, dict[str, float]]:
    """Per family, the Richardson-Lucy iterations and Wiener balance of best mean PSNR on ``tuning``
    (``_restore.tune``, on the grids ``RL_ITERATIONS`` and ``WIENER_BALANCES``)."""
    groups = {family: [c for c in tuning if c.family == family] for family in FAMILIES}
    best = tune_classical(groups, ("richardson_lucy", "wiener"))
    return {f: {"rl_iterations": b["richardson_lucy"], "wiener_balance": b["wiener"]} for f, b in best.items()}


def classical_rows(reported: list[Case], settings) -> list[tuple]:
    """(image, family, method, psnr, ssim) of the blurry input, Richardson-Lucy and Wiener."""
    rows = []
    for c in reported:
        s = settings[c.family]
        for method, img in (("blurry", c.blurry),
                            ("richardson_lucy", richardson_lucy(c.blurry, c.psf, s["rl_iterations"])),
                            ("wiener", wiener(c.blurry, c.psf, s["wiener_balance"]))):
            rows.append((c.image, c.family, method, *scores(img, c.sharp)))
    return rows


def demoe_rows(model, reported: list[Case], device=None) -> tuple[list[tuple], list[tuple]]:
    """Rows of DeMoE auto-routed and forced to the closest expert, and (family, routed task) pairs."""
    rows, routed = [], []
    for c in reported:
        auto, info = demoe.deblur(c.blurry, model=model, device=device, return_info=True)
        routed.append((c.family, info["task"]))
        forced = demoe.deblur(c.blurry, EXPERT[c.family], model=model, device=device)
        rows.append((c.image, c.family, "demoe_auto", *scores(auto, c.sharp)))
        rows.append((c.image, c.family, "demoe_expert", *scores(forced, c.sharp)))
    return rows, routed


def summary(rows, routed) -> dict:
    """Per family and overall: each method's mean PSNR, SSIM and PSNR gain over blurry; routing counts."""
    blurry = {(im, f): p for (im, f, m, p, _) in rows if m == "blurry"}

    def means(keep):
        out = {}
        for m in METHODS:
            sel = [(p, s, p - blurry[(im, f)]) for (im, f, mm, p, s) in rows if mm == m and keep(f)]
            if sel:
                p, s, g = np.mean(sel, axis=0)
                out[m] = {"psnr": float(p), "ssim": float(s), "gain": float(g)}
        return out

    families = {}
    for family in FAMILIES:
        got = [t for f, t in routed if f == family]
        families[family] = {
            "cases": sum(1 for (_, f, m, *_) in rows if f == family and m == "blurry"),
            "expert": EXPERT[family],
            "routing": {t: got.count(t) for t in demoe.TASKS if t in got},
            "methods": means(lambda f, family=family: f == family),
        }
    return {"families": families, "mean": means(lambda f: True)}


def run(model, device=None, limit: int | None = None, classical: bool = True) -> dict:
    """The benchmark for ``model``: :func:`summary`'s numbers, ``auto_gain`` (family -> DeMoE auto's
    mean PSNR gain, and "mean") and ``tuning`` (the classical settings; None without ``classical``).

    ``limit`` keeps the first images (reported and tuning) only; ``classical=False``
    leaves out Richardson-Lucy and Wiener (and their tuning), to compare weights quickly.
    """
    reported = cases(limit=limit)
    rows, routed = demoe_rows(model, reported, device)
    settings = None
    if classical:
        settings = tune(cases(TUNING_IMAGES, TUNING_SEED, limit=limit, gray=True))
        rows += classical_rows(reported, settings)
    else:
        rows += [(c.image, c.family, "blurry", *scores(c.blurry, c.sharp)) for c in reported]
    result = summary(rows, routed)
    result["auto_gain"] = {**{f: r["methods"]["demoe_auto"]["gain"] for f, r in result["families"].items()},
                           "mean": result["mean"]["demoe_auto"]["gain"]}
    result["tuning"] = settings
    return result


# -- the report -------------------------------------------------------------------------
def table(result) -> list[str]:
    methods = [m for m in METHODS if m in result["mean"]]
    lines = ["| family | " + " | ".join(methods) + " | auto routed to |", "|---" * (len(methods) + 2) + "|"]
    for family, r in result["families"].items():
        cells = [f"{r['methods'][m]['psnr']:.2f} / {r['methods'][m]['ssim']:.3f}" for m in methods]
        routing = ", ".join(f"{t} {n}" for t, n in r["routing"].items())
        lines.append(f"| {family} | " + " | ".join(cells) + f" | {routing} |")
    mean = result["mean"]
    lines.append("| **mean (PSNR dB / SSIM)** | " + " | ".join(f"**{mean[m]['psnr']:.2f} / {mean[m]['ssim']:.3f}**"
                                                        for m in methods) + " | |")
    lines += ["", "Mean PSNR gain over blurry (dB):", "",
              "| family | " + " | ".join(methods[1:]) + " |", "|---" * len(methods) + "|"]
    for family, r in [*result["families"].items(), ("**mean**", {"methods": mean})]:
        lines.append(f"| {family} | " + " | ".join(f"{r['methods'][m]['gain']:+.2f}" for m in methods[1:]) + " |")
    right = sum(r["routing"].get(r["expert"], 0) for r in result["families"].values())
    total = sum(r["cases"] for r in result["families"].values())
    lines.append(f"\nAuto routing picked the closest expert (the demoe_expert column's) in {right} of {total} cases.")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    parser.add_argument("--device", default="cpu", help="device for DeMoE (default cpu; e.g. cuda)")
    parser.add_argument("--out", default="docs/benchmarks/ood.md", help="Markdown report ('-': print only)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="first N images (and tuning images) only, for a quick check; the report says so")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    check_file_options(parser, {"--out": None if args.out == "-" else args.out, "--json": args.json})
    model = load(parser, args.model, args.device)

    t0 = time.time()
    result = run(model, device=args.device, limit=args.limit)
    elapsed = time.time() - t0
    result.update(model=str(getattr(model, "source", "packaged")), device=args.device, seconds=round(elapsed, 1))

    images = IMAGES[: args.limit]
    names = list(dict.fromkeys(name for name, *_ in images))
    command = " ".join(["python benchmarks/ood.py", *(argv if argv is not None else sys.argv[1:])])
    tuned = "; ".join(f"{f} {s['rl_iterations']} / {s['wiener_balance']}" for f, s in result["tuning"].items())
    tuning = list(dict.fromkeys(name for name, *_ in TUNING_IMAGES[: args.limit]))
    lines = [
        "# Out-of-distribution benchmark",
        "",
        f"Model: `{Path(str(getattr(model, 'source', 'default'))).name}` ({model.config}, k={model.top_k}). "
        f"Blur families that `demoe.degrade` never produces (see the docstring of `benchmarks/ood.py`) on "
        f"{len(images)} crops of {CROP} px from {', '.join(names)} (each blurred by every family), plus Gaussian "
        f"noise sigma={NOISE}; seed = 100*image + family. Cells: PSNR (dB) / SSIM. demoe_expert: DeMoE forced "
        f"to the closest expert ({', '.join(f'{f}: {e}' for f, e in EXPERT.items())}). Richardson-Lucy and "
        f"Wiener get the true PSF and a reflect-padded image, with settings chosen per family by mean PSNR on "
        f"separate tuning crops (gray {CROP} px crops of {', '.join(tuning)}; seeds from {TUNING_SEED}; grids "
        f"{'/'.join(map(str, RL_ITERATIONS))} iterations and balance {'/'.join(map(str, WIENER_BALANCES))}): "
        f"RL iterations / Wiener balance = {tuned}. The in-distribution counterpart is "
        f"[quality.md](quality.md).",
        "",
        f"Command: `{command}`; {device_name(args.device)}, {time.strftime('%Y-%m-%d')}, {elapsed:.0f} s.",
        "",
        *table(result),
    ]
    save_report(lines, None if args.out == "-" else args.out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def load(parser: argparse.ArgumentParser, path, device: str):
    """The model at ``path`` (None or "packaged": the packaged one) on ``device``, or one clear command-line error."""
    if path == "packaged" and not Path(path).exists():
        path = None
    try:
        return demoe.load_model(path, device=resolve_device(device))  # a device this machine lacks: ValueError
    except (OSError, ValueError) as err:
        parser.error(str(err))


def check_file_options(parser: argparse.ArgumentParser, paths: dict) -> None:
    """Refuse, before minutes of work, an output path that is a folder (option -> path or None)."""
    for option, path in paths.items():
        if path is not None and Path(path).is_dir():
            parser.error(f"{option} {path} is a folder; give a file name (e.g. {Path(path) / 'report'}"
                         f"{'.json' if option == '--json' else '.md'})")


def device_name(device: str) -> str:
    import torch

    dev = resolve_device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.machine()} CPU"


if __name__ == "__main__":
    raise SystemExit(main())
