"""deblur() on the CPU with the packaged model in PyTorch and in onnxruntime (``demoe export onnx``), in one run.

Both deblur the same image with the same settings (default tiles, the router
choosing), interleaved, the median of ``--rounds`` kept. PyTorch runs
``DeMoE.forward``, which runs only the chosen expert; the ONNX graph is
``DeMoE.forward_dense``, which mixes every expert by its routing weight (zero
for those not chosen): one graph for every image, about twice the decoder's work.
The network alone on one 256 px tile is timed too, with PyTorch's dense forward
for comparison. The results must agree: the largest difference is printed.

Run from the repository root: ``python benchmarks/onnx_speed.py`` (``--mp 1
--rounds 3``; ``--onnx FILE`` reuses an export, else one is written to a
temporary folder, half a minute). Writes docs/benchmarks/onnx_speed.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import onnxruntime
import torch
from _report import save_report
from skimage import data

import demoe
from demoe.export import export_onnx


def image(mp: float) -> np.ndarray:
    side = int((mp * 1e6) ** 0.5)
    base = data.astronaut()
    reps = -(-side // base.shape[0])
    return np.ascontiguousarray(np.tile(base, (reps, reps, 1))[:side, :side])


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mp", type=float, default=1.0, help="image size (megapixels)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median is kept)")
    parser.add_argument("--onnx", help="an exported graph of the packaged model (default: export one now)")
    parser.add_argument("--out", default="docs/benchmarks/onnx_speed.md")
    args = parser.parse_args(argv)

    model = demoe.load_model(device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx
        if path is None:
            t = time.perf_counter()
            path = export_onnx(model, os.path.join(tmp, "demoe.onnx"))
            export_s = time.perf_counter() - t
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    load = os.getloadavg()[0]  # other work on the machine slows both alike (they are interleaved)
    img = image(args.mp)
    runs = {"PyTorch": lambda: demoe.deblur(img, model=model, device="cpu"),
            "onnxruntime": lambda: demoe.deblur(img, model=session)}
    results = {name: run() for name, run in runs.items()}  # warm-up, and the results compared
    diff = int(np.abs(results["PyTorch"].astype(int) - results["onnxruntime"]).max())
    times = {name: [] for name in runs}
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(median_time(run, 1))
    seconds = {name: statistics.median(v) for name, v in times.items()}

    tile = torch.from_numpy(img[:256, :256].transpose(2, 0, 1)[None].astype(np.float32) / 255)
    feeds = {"image": tile.numpy()}
    with torch.inference_mode():
        networks = {"PyTorch forward (the chosen expert)": lambda: model(tile),
                    "PyTorch forward_dense (every expert, as exported)": lambda: model.forward_dense(tile),
                    "onnxruntime (the exported graph)": lambda: session.run(["restored"], feeds)}
        for run in networks.values():
            run()
        tile_s = {name: median_time(run, args.rounds) for name, run in networks.items()}

    mp = img.shape[0] * img.shape[1] / 1e6
    lines = [
        "# deblur() in PyTorch and in onnxruntime, on the CPU",
        "",
        f"`python benchmarks/onnx_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}`".replace(" `", "`"),
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; the packaged model, "
        f"{img.shape[0]} x {img.shape[1]} RGB uint8 (astronaut tiled), default settings (the router chooses); "
        f"median of {args.rounds} interleaved rounds, {(time.perf_counter() - t0) / 60:.1f} min"
        + (f"; the export took {export_s:.0f} s" if args.onnx is None else "")
        + f"; load average {load:.1f} at the start ({os.cpu_count()} cores).",
        "",
        "| deblur(image, model=...) | time | megapixels / s | vs PyTorch |",
        "|---|---|---|---|",
    ]
    for name, s in seconds.items():
        lines.append(f"| {name} | {s:.2f} s | {mp / s:.3f} | {seconds['PyTorch'] / s:.2f}x |")
    lines += [
        "",
        f"Largest difference between the two restored images: {diff} (uint8 levels).",
        "",
        "| the network on one 256 x 256 tile | time |",
        "|---|---|",
        *(f"| {name} | {s * 1000:.0f} ms |" for name, s in tile_s.items()),
    ]
    save_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
