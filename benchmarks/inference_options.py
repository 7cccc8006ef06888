"""Which inference settings make the network fastest here, and what do they cost in accuracy?

The packaged model runs on the same batch of 256 px tiles (crops of scikit-image's
astronaut) under each candidate setting; rounds are interleaved, so a busy moment
hurts every candidate alike, and the median round counts. Every candidate's output
is compared with the plain float32 reference (max |difference|, images in [0, 1]).

Candidates: tiles per batch, ``torch.inference_mode`` vs ``no_grad``, channels-last
memory format (with the layer norm fused into ``F.layer_norm``), bfloat16 autocast,
one vs all torch threads, two tile streams in parallel threads (one torch thread
each), and optionally ``torch.compile`` (``--compile``; needs a C++ compiler).

Run from the repository root: ``python benchmarks/inference_options.py``.
Writes docs/benchmarks/inference_options.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time


import numpy as np
import torch
from skimage import data

import demoe
from _report import save_report


def tiles(n: int, size: int) -> torch.Tensor:
    img = np.tile(data.astronaut(), (2, 2, 1)).astype(np.float32) / 255
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, img.shape[0] - size, 2)
        out.append(img[y : y + size, x : x + size].transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def run_batches(model, x, batch, *, channels_last=False, autocast=None, grad_mode="inference"):
    ctx = torch.inference_mode if grad_mode == "inference" else torch.no_grad
    outs = []
    with ctx(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16"):
        for i in range(0, len(x), batch):
            b = x[i : i + batch]
            if channels_last:
                b = b.contiguous(memory_format=torch.channels_last)
            outs.append(model(b, task="defocus").float())
    return torch.cat(outs)


def run_two_streams(model, x, batch):
    """Two Python threads, each with its own half of the batches (torch threads set by caller)."""
    halves = [None, None]
    idx = [list(range(0, len(x), batch))[k::2] for k in range(2)]

    def work(k):
        with torch.inference_mode():
            halves[k] = {i: model(x[i : i + batch], task="defocus") for i in idx[k]}

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = {**halves[0], **halves[1]}
    return torch.cat([merged[i] for i in sorted(merged)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also try torch.compile")
    parser.add_argument("--out", default="docs/benchmarks/inference_options.md")
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    model = demoe.load_model(device="cpu")
    model_cl = demoe.load_model(device="cpu").to(memory_format=torch.channels_last)
    x = tiles(args.tiles, args.size)

    def with_threads(n, fn):
        def call():
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(threads)
        return call

    candidates = {
        "reference: fp32, batch 1, inference_mode": lambda: run_batches(model, x, 1),
        "batch 2": lambda: run_batches(model, x, 2),
        "batch 4": lambda: run_batches(model, x, 4),
        "batch 8": lambda: run_batches(model, x, 8),
        "no_grad instead of inference_mode": lambda: run_batches(model, x, 1, grad_mode="no_grad"),
        "channels-last + fused layer norm": lambda: run_batches(model_cl, x, 1, channels_last=True),
        "bfloat16 autocast": lambda: run_batches(model, x, 1, autocast="bf16"),
        "1 torch thread": with_threads(1, lambda: run_batches(model, x, 1)),
        "2 tile streams x 1 thread": with_threads(1, lambda: run_two_streams(model, x, 1)),
    }
    if args.compile:
        compiled = torch.compile(model)
        candidates["torch.compile"] = lambda: run_batches(compiled, x, 1)

    reference = None
    times = {name: [] for name in candidates}
    errors = {}
    for name, fn in candidates.items():  # warm-up (and torch.compile's compilation)
        out = fn()
        if reference is None:
            reference = out
        errors[name] = float((out - reference).abs().max())
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    mp = args.tiles * args.size**2 / 1e6
    base = statistics.median(times[next(iter(candidates))])
    lines = [
        "# Inference options",
        "",
        f"`python benchmarks/inference_options.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
        f"{time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()} CPU, {threads} threads, torch {torch.__version__}; packaged model, "
        f"{args.tiles} tiles of {args.size} px, median of {args.rounds} interleaved rounds.",
        "",
        "| setting | MP/s | speed vs reference | max abs diff vs reference |",
        "|---|---|---|---|",
    ]
    for name in candidates:
        t = statistics.median(times[name])
        lines.append(f"| {name} | {mp / t:.3f} | {base / t:.2f}x | {errors[name]:.1e} |")
    save_report(lines, args.out)


if __name__ == "__main__":
    main()
