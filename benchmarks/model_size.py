"""What a wider compact DeMoE costs on a CPU: deblur() speed, parameters and FLOPs per width.

The packaged model is the compact architecture at width 16 (encoder 1-1-2-4,
middle 2, decoder 1-1-1-1). Wider variants of the same blocks are timed with
random weights (speed does not depend on the values), all in one run with the
measurements interleaved, and each is given as a ratio to width 16: issue 19
asks that the default stay at >= 0.5x today's CPU speed. The training cost is
the FLOPs of one 128 px patch, forward and backward.

Quality per width needs training, so it is not measured here; the GPU size round
(examples/training/size_round.sh) trains each width from scratch for the same
time and compares them on the out-of-distribution benchmark.

Run from the repository root: ``python benchmarks/model_size.py``
(``--widths 16 24 32 --mp 1 --rounds 3``). Writes docs/benchmarks/model_size.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import numpy as np
import torch
from _report import save_report
from skimage import data
from torch.utils.flop_counter import FlopCounterMode

import demoe
from demoe.model import ARCHITECTURES


def image(mp: float) -> np.ndarray:
    side = int((mp * 1e6) ** 0.5)
    base = data.astronaut()
    reps = -(-side // base.shape[0])
    return np.ascontiguousarray(np.tile(base, (reps, reps, 1))[:side, :side])


def training_gflops(model: demoe.DeMoE, patch: int = 128) -> float:
    """FLOPs of one patch through the model and back, in GFLOP (each image to its own expert)."""
    model = model.train()
    x = torch.rand(5, 3, patch, patch)
    weights = torch.eye(5)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, weights=weights)[0].mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 5 / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 24, 32])
    parser.add_argument("--mp", type=float, default=1.0, help="image size (megapixels)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median is kept)")
    parser.add_argument("--out", default="docs/benchmarks/model_size.md")
    args = parser.parse_args(argv)

    img = image(args.mp)
    models = {}
    for w in args.widths:
        torch.manual_seed(w)
        models[w] = demoe.DeMoE(**{**ARCHITECTURES["compact"], "width": w}).eval()
    flops = {w: training_gflops(m) for w, m in models.items()}
    for m in models.values():
        m.eval()
        demoe.deblur(img[:256, :256], model=m, device="cpu", task="defocus")  # warm-up
    speeds = {w: [] for w in models}
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        for w, m in models.items():
            t = time.perf_counter()
            demoe.deblur(img, model=m, device="cpu", task="defocus")
            speeds[w].append(img.shape[0] * img.shape[1] / 1e6 / (time.perf_counter() - t))
    base = args.widths[0]
    mp_s = {w: statistics.median(v) for w, v in speeds.items()}
    lines = [
        "# Model size: CPU cost per width",
        "",
        f"`python benchmarks/model_size.py {' '.join(sys.argv[1:] if argv is None else argv)}`".replace(" `", "`"),
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; deblur() on {img.shape[0]} x {img.shape[1]} RGB uint8 (astronaut tiled), "
        f"defocus forced, default tiles; median of {args.rounds} interleaved rounds; random weights; "
        f"{(time.perf_counter() - t0) / 60:.1f} min.",
        "",
        "| width | parameters | training GFLOP per 128 px patch | deblur() MP/s | speed vs width " + f"{base} |",
        "|---|---|---|---|---|",
    ]
    for w, m in models.items():
        params = sum(p.numel() for p in m.parameters()) / 1e6
        lines.append(f"| {w} | {params:.1f} M | {flops[w]:.1f} | {mp_s[w]:.3f} | {mp_s[w] / mp_s[base]:.2f}x |")
    save_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
