"""GPU speed: fp32 vs fp16 vs bf16, and the largest whole image one forward pass takes.

For the packaged default model and a published-size DeMoE (width 32, encoder
[1, 1, 1, 28], untrained: speed does not depend on the weights):

* MP/s of ``deblur()`` on an RGB uint8 image (default tiles and batch for the
  device), per precision;
* the largest square image one forward pass of the network processes without
  running out of memory (sides tried in steps of 1024 px), per precision.

On a machine without CUDA it prints a note and exits 0 (nothing to measure).
``--device cpu --mp 0.1 --max-side 512`` runs the same code on the CPU, small, as
a check of the script itself.

Run from the repository root: ``python benchmarks/gpu.py``. Writes
docs/benchmarks/gpu.md (only when it ran on a GPU, unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data

import demoe
from demoe import devices
from _report import save_report

PRECISIONS = tuple(devices.PRECISIONS)  # fp32, fp16, bf16


def image(mp: float) -> np.ndarray:
    side = int((mp * 1e6) ** 0.5)
    base = data.astronaut()
    reps = -(-side // base.shape[0])
    return np.ascontiguousarray(np.tile(base, (reps, reps, 1))[:side, :side])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def deblur_speed(model, img, device, precision) -> float:
    demoe.deblur(img[:512, :512], model=model, device=device, precision=precision)  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    demoe.deblur(img, model=model, device=device, precision=precision)
    synchronize(device)
    return img.shape[0] * img.shape[1] / 1e6 / (time.perf_counter() - t0)


def largest_whole_image(model, device, precision, max_side: int, step: int) -> int:
    """Largest square side (multiple of ``step``) one forward pass survives; 0 if none."""
    dtype = devices.PRECISIONS[precision]
    best = 0
    for side in range(step, max_side + 1, step):
        try:
            x = torch.rand(1, 3, side, side, device=device)
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                model(x, task="defocus")
            synchronize(device)
            best = side
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as err:
            if "out of memory" not in str(err).lower() and not isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
                raise
            break
        finally:
            x = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda, skipped when there is none")
    parser.add_argument("--mp", type=float, default=16.0, help="image size for the speed rows (megapixels)")
    parser.add_argument("--max-side", type=int, default=16384, help="largest side tried for one whole pass")
    parser.add_argument("--step", type=int, default=1024)
    parser.add_argument("--out", default=None, help="default: docs/benchmarks/gpu.md on a GPU")
    args = parser.parse_args(argv)

    if args.device is None and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device on this machine; nothing to measure (skipped).")
        return 0
    device = torch.device(args.device or "cuda")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    models = {
        "packaged default (width 16)": demoe.load_model(device=device),
        "published size (width 32, enc 1-1-1-28)": demoe.DeMoE().to(device).eval(),
    }
    img = image(args.mp)
    out = args.out or ("docs/benchmarks/gpu.md" if device.type == "cuda" else None)
    t0 = time.perf_counter()
    lines = [
        "# GPU speed",
        "",
        f"`python benchmarks/gpu.py`, {time.strftime('%Y-%m-%d')}, {card}, torch {torch.__version__}; "
        f"deblur() on {img.shape[0] * img.shape[1] / 1e6:.1f} MP RGB uint8 (default tiles), and the largest "
        f"square image one forward pass takes (steps of {args.step} px, up to {args.max_side}).",
        "",
        "| model | precision | deblur() MP/s | largest whole image (px) |",
        "|---|---|---|---|",
    ]
    for name, model in models.items():
        for precision in PRECISIONS:
            try:
                speed = f"{deblur_speed(model, img, device, precision):.2f}"
            except (RuntimeError, TypeError) as err:  # e.g. a precision the device lacks
                speed = f"unsupported ({str(err).splitlines()[0][:60]})"
            side = largest_whole_image(model, device, precision, args.max_side, args.step)
            row = f"| {name} | {precision} | {speed} | {side} x {side} |"
            lines.append(row)
            print(row, flush=True)
            if out:  # every row as soon as it is measured: a lease may end before the table does
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text("\n".join([*lines, "", "(unfinished: the run stopped here)"]) + "\n")
    lines.append("")
    lines.append(f"Total {(time.perf_counter() - t0) / 60:.1f} min.")
    save_report(lines, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
