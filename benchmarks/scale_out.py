"""deblur() on numpy, on dask with the threaded scheduler, and on a dask.distributed LocalCluster.

The same RGB uint8 image (scikit-image's astronaut tiled to ``--size`` px),
stored as a zarr array in ``--chunk`` px chunks, restored with the packaged
model and one forced expert (``--task``) three ways:

* ``numpy``: the array in memory (``preserve_mean=False``: the dask paths
  never match the mean, so all three compute the same thing);
* ``dask threads``: ``da.from_zarr`` and ``.compute()``, dask's threaded scheduler;
* ``LocalCluster``: the same under ``LocalCluster(n_workers=--workers,
  threads_per_worker=1)``, worker processes reading the zarr chunks themselves.

Each path runs in a fresh process (peak RSS its own; a worker's is read in
the worker), after a warm-up on a small crop (the model loaded; on the cluster,
on every worker); the three run one after the other, ``--rounds`` times,
interleaved, and each round's ratios to the numpy path are printed. The
dask results are compared with the numpy path's (PSNR). Run from the
repository root: ``python benchmarks/scale_out.py`` (3.5 min for 2 rounds on 2 cores at a load average of 2).
Prints a Markdown table (also written to docs/benchmarks/scale_out.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _report import save_report

PATHS = ("numpy", "dask threads", "LocalCluster")

CHILD = r"""
import json, resource, sys, time, warnings
import numpy as np
path, store, result, task, workers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
import dask.array as da
import demoe

def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux

lazy = da.from_zarr(store)
extra = {}
if path == "numpy":
    img = np.asarray(lazy)
    demoe.deblur(img[:256, :256], task=task, preserve_mean=False)  # warm-up: the model loaded
    t0 = time.perf_counter()
    out = demoe.deblur(img, task=task, preserve_mean=False)
    seconds = time.perf_counter() - t0
else:
    client = None
    if path == "LocalCluster":
        from distributed import Client, LocalCluster
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    side = min(lazy.shape[0], 1024)
    demoe.deblur(lazy[:side, :side], task=task).compute()  # warm-up: the model loaded (on every worker)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out = demoe.deblur(lazy, task=task).compute()
        seconds = time.perf_counter() - t0
    extra["warnings"] = sorted({str(w.message).split(".")[0][:80] for w in caught})
    if client is not None:
        from demoe.checkpoint import model_loads

        peaks = client.run(rss_gb)
        extra["worker_rss_gb"] = max(peaks.values())
        extra["worker_loads"] = sorted(sum(v.values()) for v in client.run(model_loads).values())
        client.close()
        cluster.close()
np.save(result, out)
print(json.dumps({"path": path, "seconds": seconds, "mp": out.shape[0] * out.shape[1] / 1e6,
                  "peak_rss_gb": rss_gb(), **extra}))
"""


def run(path: str, store: Path, result: Path, task: str, workers: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, path, str(store), str(result), task, str(workers)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{path} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["mp_per_s"] = r["mp"] / r["seconds"]
    return r


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2560, help="image side, px (RGB uint8)")
    parser.add_argument("--chunk", type=int, default=1280, help="the zarr array's chunk side, px")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes, one thread each")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three paths")
    parser.add_argument("--task", default="defocus", help="the expert forced on every tile")
    parser.add_argument("--out", default="docs/benchmarks/scale_out.md")
    args = parser.parse_args(argv)
    import dask.array as da
    import torch
    from skimage import data

    base = data.astronaut()
    reps = -(-args.size // base.shape[0])
    img = np.ascontiguousarray(np.tile(base, (reps, reps, 1))[: args.size, : args.size])
    load = os.getloadavg()[0]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "image.zarr"
        da.from_array(img, chunks=(args.chunk, args.chunk, 3)).to_zarr(str(store))
        for _ in range(args.rounds):
            rows = {}
            for path in PATHS:
                result = Path(tmp) / f"{path.replace(' ', '_')}.npy"
                rows[path] = run(path, store, result, args.task, args.workers)
                rows[path]["result"] = result
            ref = np.load(rows["numpy"]["result"])
            for path in PATHS[1:]:
                rows[path]["psnr"] = psnr(np.load(rows[path]["result"]), ref)
            rounds.append(rows)
    load = max(load, os.getloadavg()[0])
    median = {p: statistics.median(r[p]["mp_per_s"] for r in rounds) for p in PATHS}
    # The ratios of each round's runs (made one after the other, under the same load), then their median.
    ratio = {p: statistics.median(r[p]["mp_per_s"] / r["numpy"]["mp_per_s"] for r in rounds) for p in PATHS}
    lines = [
        "# Scale out: numpy, dask threads, dask.distributed",
        "",
        f"`python benchmarks/scale_out.py{' ' + ' '.join(argv) if argv else ''}`, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, load average up to "
        f"{load:.2f} (1 min, at the start and the end); packaged model, "
        f"{args.size}x{args.size} RGB uint8 in a zarr array of {args.chunk} px chunks, task={args.task}, default "
        f"tiles; LocalCluster: {args.workers} worker processes x 1 thread. Each path in its own process, after "
        "a warm-up (the model loaded); rounds interleaved.",
        "",
        "| round | path | time (s) | MP/s | vs numpy | PSNR vs numpy (dB) | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, rows in enumerate(rounds, 1):
        for path in PATHS:
            r = rows[path]
            rss = f"{r['peak_rss_gb']:.2f}"
            if "worker_rss_gb" in r:
                rss = f"{r['worker_rss_gb']:.2f} per worker ({r['peak_rss_gb']:.2f} client)"
            lines.append(f"| {k} | {path} | {r['seconds']:.1f} | {r['mp_per_s']:.3f} | "
                         f"{r['mp_per_s'] / rows['numpy']['mp_per_s']:.2f}x | "
                         f"{r['psnr']:.1f} | {rss} |" if "psnr" in r else
                         f"| {k} | {path} | {r['seconds']:.1f} | {r['mp_per_s']:.3f} | 1.00x | - | {rss} |")
    lines += [
        "",
        f"Median over rounds: numpy {median['numpy']:.3f} MP/s; of each round's ratio to it, dask threads "
        f"**{ratio['dask threads']:.2f}x** (target >= 0.8x), LocalCluster "
        f"**{ratio['LocalCluster']:.2f}x** (target >= 0.7x).",
    ]
    cluster = [r["LocalCluster"] for r in rounds]
    lines.append(f"Models loaded per worker (warm-up and timed run together): "
                 f"{sorted({n for r in cluster for n in r['worker_loads']})}. Warnings while the graph was sent "
                 f"and computed: {sorted({w for r in cluster for w in r['warnings']}) or 'none'}.")
    save_report(lines, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
