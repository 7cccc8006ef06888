"""Speed and memory of deblur() with the packaged default model.

Each measurement runs in a fresh subprocess so its peak RSS is its own:

* throughput (MP/s) of ``deblur`` on RGB uint8 images of 1, 4 and 16 MP;
* tiled ``deblur`` vs one whole pass of the network on the same 4 MP image;
* peak RSS at 16 MP and 64 MP (RGB uint8).

Run from the repository root: ``python benchmarks/speed.py [--sizes 1 4 16 64]``.
Prints a Markdown table (also written to docs/benchmarks/speed.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

from _report import save_report


CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from skimage import data
import demoe
mode, mp = sys.argv[1], float(sys.argv[2])
side = int((mp * 1e6) ** 0.5)
base = data.astronaut()
reps = -(-side // base.shape[0])
img = np.ascontiguousarray(np.tile(base, (reps, reps, 1))[:side, :side])
model = demoe.load_model(device="cpu")
torch.set_num_threads(torch.get_num_threads())
demoe.deblur(img[:256, :256], model=model)  # warm-up
t0 = time.perf_counter()
if mode == "tiled":
    out, info = demoe.deblur(img, model=model, return_info=True)
    extra = {"tile_size": info["tile_shape"][0], "overlap": info["overlap"], "tiles": info["tiles"],
             "computed": info["computed"]}
else:  # one whole pass of the network, no tiling
    x = torch.from_numpy(img.transpose(2, 0, 1)[None].astype(np.float32) / 255)
    with torch.inference_mode():
        model(x, task="defocus")
    extra = {}
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # GiB (ru_maxrss is KiB on Linux)
print(json.dumps({"mode": mode, "mp": side * side / 1e6, "seconds": dt, "mp_per_s": side * side / 1e6 / dt,
                  "peak_rss_gb": rss, **extra}))
"""


def measure(mode: str, mp: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(mp)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", type=float, default=[1, 4, 16, 64], help="megapixels (tiled)")
    parser.add_argument("--out", default="docs/benchmarks/speed.md")
    args = parser.parse_args(argv)
    import torch

    rows = [measure("tiled", mp) for mp in args.sizes]
    whole = measure("whole", 4)
    tiled4 = next((r for r in rows if abs(r["mp"] - 4) < 0.1), None) or measure("tiled", 4)
    lines = [
        "# Speed and memory",
        "",
        f"`python benchmarks/speed.py`, {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; packaged default model, RGB uint8, "
        "auto routing, default tiles.",
        "",
        "| image | time (s) | MP/s | peak RSS (GB) | tiles | pixels computed / image |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mp']:.1f} MP tiled | {r['seconds']:.1f} | {r['mp_per_s']:.3f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['tiles']} x {r['tile_size']} px | {r['computed']:.2f} |")
    lines.append(f"| {whole['mp']:.1f} MP one whole pass | {whole['seconds']:.1f} | {whole['mp_per_s']:.3f} | "
                 f"{whole['peak_rss_gb']:.2f} | 1 | 1.00 |")
    lines.append("")
    lines.append(f"Tiled / whole-pass time at 4 MP: {tiled4['seconds'] / whole['seconds']:.2f} "
                 f"(peak RSS {tiled4['peak_rss_gb']:.2f} vs {whole['peak_rss_gb']:.2f} GB).")
    by_mp = {round(r["mp"]): r for r in rows}
    if 4 in by_mp and 64 in by_mp:
        lines.append(f"Time per MP, 64 MP vs 4 MP: {by_mp[64]['seconds'] / 64 / (by_mp[4]['seconds'] / 4):.2f}.")
    save_report(lines, args.out)


if __name__ == "__main__":
    main()
