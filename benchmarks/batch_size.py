"""Tiles per network call through the whole deblur() path, on the CPU.

deblur() on a 1.96 MP RGB uint8 image (scikit-image's astronaut tiled) with
``batch_size`` 1, 2 and 4, interleaved for ``--rounds`` rounds; the median counts.
This is how the CPU default (``demoe.devices.DEFAULT_BATCH["cpu"]``) was chosen.

Run from the repository root: ``python benchmarks/batch_size.py``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from skimage import data

import demoe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=1400)
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    model = demoe.load_model(device="cpu")
    img = np.ascontiguousarray(np.tile(data.astronaut(), (3, 3, 1))[: args.side, : args.side])
    demoe.deblur(img[:256, :256], model=model, device="cpu")  # warm-up
    times = {b: [] for b in args.batches}
    for _ in range(args.rounds):
        for b in args.batches:
            t0 = time.perf_counter()
            demoe.deblur(img, model=model, device="cpu", batch_size=b)
            times[b].append(time.perf_counter() - t0)
    mp = args.side**2 / 1e6
    print(f"`python benchmarks/batch_size.py`, {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, "
          f"{torch.get_num_threads()} threads; deblur() on {mp:.2f} MP RGB uint8, median of {args.rounds} "
          "interleaved rounds\n")
    print("| tiles per call | MP/s | speed vs batch 1 |\n|---|---|---|")
    base = statistics.median(times[args.batches[0]])
    for b in args.batches:
        t = statistics.median(times[b])
        print(f"| {b} | {mp / t:.3f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
