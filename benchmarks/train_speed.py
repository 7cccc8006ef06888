"""Training throughput: where a training step's time goes, and which precision and layout are fastest.

All in one run, on one device, with the packaged model (or a fresh one of ``--width``):

* **data alone**: batches of ``demoe.batch_degrade.DeviceBatches`` made on the device
  (the GPU round's data path), patches/s;
* **step alone**: one optimiser step (forward, backward, AdamW) on a fixed batch, per
  precision (fp32, bf16 autocast) and memory layout (NCHW, channels-last);
* **data + step**: the two together, as ``demoe train --device-data`` runs them, for the
  fastest precision and layout;
* with ``--loader``, also the DataLoader path ``demoe train`` uses without ``--device-data``
  (numpy generators in ``--workers`` processes), for comparison.

Patches/s are also given in 128 px patches (a 192 px patch counts 2.25). ``--pick`` ends
the output with one line of ``demoe train`` options for the fastest precision and layout,
which the GPU round passes on (examples/training/gpu_round.sh).

Run from the repository root: ``python benchmarks/train_speed.py [--device cuda] [--photos DIR]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
from _report import save_report

import demoe
from demoe.batch_degrade import DeviceBatches
from demoe.devices import resolve_device
from demoe.data import load_photos
from demoe.model import ARCHITECTURES
from demoe.train import TrainConfig, batch_losses, hardware


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps: int, warmup: int = 3) -> float:
    """Seconds per call of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / steps


def step_fn(model, opt, batch, amp: bool, channels_last: bool, device, slices):
    cfg = TrainConfig(router_weight=0.3)
    blurry, sharp, label = batch
    if channels_last:
        blurry = blurry.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def step():
        with autocast:
            loss = batch_losses(model, cfg, blurry, sharp, label, slices)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: the best available")
    parser.add_argument("--photos", nargs="*", default=[], help="folders of photographs (default: dead leaves only)")
    parser.add_argument("--patch", type=int, default=192)
    parser.add_argument("--batch", type=int, default=120)
    parser.add_argument("--width", type=int, default=None, help="a fresh model of this width (default: packaged)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--loader", action="store_true",
                        help="also time the DataLoader path (numpy generators in worker processes)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes for --loader")
    parser.add_argument("--pick", action="store_true", help="end with the fastest options for demoe train")
    parser.add_argument("--out", default=None, help="also write the report here (Markdown)")
    args = parser.parse_args(argv)
    for name in ("patch", "batch", "steps", "workers", "width"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            parser.error(f"--{name} must be at least {0 if name == 'workers' else 1}, got {value}")
    if args.patch % 16:
        parser.error(f"--patch must be a multiple of 16 (the on-device data's), got {args.patch}")
    try:
        device = resolve_device(args.device)
        photos = load_photos(args.photos) if args.photos else []
    except (ValueError, OSError) as err:  # a device this machine lacks, photographs that are not there
        parser.error(str(err))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    stream = DeviceBatches(photos, args.patch, args.batch, device=device, photo_fraction=0.9 if photos else 0.0)
    per128 = (args.patch / 128) ** 2
    rows = []

    def row(what: str, seconds: float, note: str = "") -> None:
        pps = args.batch / seconds
        rows.append(f"| {what} | {1 / seconds:.2f} | {pps:.0f} | {pps * per128:.0f} | {note} |")
        print(rows[-1], file=sys.stderr, flush=True)

    row("data alone (on the device)", timed(stream.sample, device, max(args.steps // 2, 3)),
        f"{stream.n_photos} photographs")
    if args.width:
        model = demoe.DeMoE(**{**ARCHITECTURES["compact"], "width": args.width})
    else:
        model = demoe.load_model(device="cpu")
    model = model.to(device).train()
    batch = stream.sample()
    best = None
    for amp, cl in itertools.product((False, True), (False, True)):
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        try:
            seconds = timed(step_fn(m, opt, batch, amp, cl, device, stream.slices), device, args.steps)
        except RuntimeError as err:  # e.g. a precision this device lacks
            rows.append(f"| step alone, {'bf16' if amp else 'fp32'}, {'channels-last' if cl else 'NCHW'} | "
                        f"- | - | - | failed: {str(err).splitlines()[0][:60]} |")
            continue
        row(f"step alone, {'bf16' if amp else 'fp32'}, {'channels-last' if cl else 'NCHW'}", seconds)
        if best is None or seconds < best[0]:
            best = (seconds, amp, cl)
    _, amp, cl = best
    m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)

    def full():
        step_fn(m, opt, stream.sample(), amp, cl, device, stream.slices)()

    row(f"data + step, {'bf16' if amp else 'fp32'}, {'channels-last' if cl else 'NCHW'}",
        timed(full, device, args.steps), "as demoe train --device-data runs them")
    if args.loader:
        from demoe.train import training_batches

        cfg = TrainConfig(photos=list(args.photos), patch=args.patch, batch=args.batch, workers=args.workers,
                          photo_fraction=0.9 if photos else 0.0)
        it, _, _ = training_batches(cfg, device)
        row(f"DataLoader data alone, {args.workers} workers", timed(lambda: next(it), device,
                                                                    max(args.steps // 2, 3)),
            "numpy generators (demoe train without --device-data)")

    name = f"fresh width {args.width}" if args.width else "packaged model"
    lines = [
        "# Training throughput",
        "",
        f"`python benchmarks/train_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        f"{time.strftime('%Y-%m-%d')}, {hardware()}; {name}, batches of {args.batch} patches of {args.patch} px; "
        f"{(time.perf_counter() - t0) / 60:.1f} min.",
        "",
        "| what | steps/s | patches/s | 128 px patches/s | note |",
        "|---|---|---|---|---|",
        *rows,
    ]
    save_report(lines, args.out)
    if args.pick:
        print(f"--amp {'bf16' if amp else 'none'} --{'' if cl else 'no-'}channels-last")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
