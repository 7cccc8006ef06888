"""The ``demoe`` command: ``demoe deblur``, ``demoe info``, ``demoe train``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .tasks import ENSEMBLES, TASKS


# -- demoe deblur ---------------------------------------------------------------------------
def collect_inputs(inputs: Sequence[str], recursive: bool,
                   suffix: str = "") -> tuple[list[tuple[Path, Path]], list[Path]]:
    """``(file, relative name)`` pairs in natural order; folders expanded (zarr stores kept whole).

    In an expanded folder, ``<name><suffix><ext>`` next to ``<name><ext>`` is an earlier
    output of this command: it is left out, so that running the command twice on a folder
    skips what is done instead of deblurring the results again. Those files come back as
    the second list. Files named on the command line are always taken.
    """
    from .data import natural_key
    from .files import SUFFIXES, split_name

    found: list[tuple[Path, Path]] = []
    earlier: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and p.suffix != ".zarr":
            pattern = "**/*" if recursive else "*"
            files = [f for f in p.glob(pattern)
                     if (f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith("."))
                     or (f.is_dir() and f.suffix == ".zarr")]
            files = [f for f in files if not any(part.endswith(".zarr") for part in f.relative_to(p).parts[:-1])]
            names = set(files)
            for f in sorted(files, key=natural_key):
                base, ext = split_name(f.name)
                if suffix and base.endswith(suffix) and f.with_name(base[: -len(suffix)] + ext) in names:
                    earlier.append(f)
                else:
                    found.append((f, f.relative_to(p)))
        elif p.exists():
            found.append((p, Path(p.name)))
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return found, earlier


def output_path(src: Path, rel: Path, outdir: Path | None, suffix: str) -> Path:
    from .files import split_name

    base, ext = split_name(src.name)
    name = base + suffix + ext
    return (outdir / rel.parent / name) if outdir is not None else src.with_name(name)


def _deblur_zarr(src: Path, dest: Path, kwargs: dict, quiet: bool = False) -> dict:
    """A zarr array, or an OME-Zarr image (its full-resolution level), deblurred lazily into ``dest``."""
    import contextlib
    import shutil

    import dask.array as da
    import zarr
    from tqdm.auto import tqdm
    from tqdm.dask import TqdmCallback

    from .api import deblur

    node = zarr.open(str(src), mode="r")
    attrs = None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        ome = attrs.get("ome", attrs)  # OME-Zarr 0.5 nests its metadata under "ome"
        multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
        if not multiscales:
            raise ValueError(f"{src.name} is a zarr group without OME-Zarr 'multiscales' metadata; "
                             "accepted: a zarr array, or an OME-Zarr image")
        levels = multiscales[0]["datasets"]
        arr = da.from_zarr(node[levels[0]["path"]])
    else:
        arr = da.from_zarr(node)
    out, info = deblur(arr, return_info=True, **kwargs)
    tmp = dest.with_name(f".{dest.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    # dask computes the chunks as the store is written: a bar over its tasks (chunks read, restored, written).
    bar = (contextlib.nullcontext() if quiet else
           TqdmCallback(tqdm_class=tqdm, desc=src.name, unit="task", leave=False, mininterval=1.0))
    try:
        with bar:
            if attrs is None:
                out.to_zarr(str(tmp))
            else:
                fmt = getattr(getattr(node, "metadata", None), "zarr_format", None)
                group = zarr.open_group(str(tmp), mode="w", **({"zarr_format": fmt} if fmt else {}))
                written = _write_pyramid(group, out, levels, [node[level["path"]] for level in levels])
                ome["multiscales"] = [{**multiscales[0], "datasets": written}, *multiscales[1:]]
                group.attrs.update(attrs)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return info


def _write_pyramid(group, full, levels: list[dict], sources: list) -> list[dict]:
    """Write ``full`` as the first level and remake the input's lower levels from it.

    Each lower level is the block mean of the level above it, by the factors
    between the input's own levels (read back from the store, so the network
    runs once). Returns the levels written (a level that would be empty ends it).
    """
    import dask.array as da
    import numpy as np

    create = getattr(group, "create_array", None) or group.create_dataset  # zarr 3, zarr 2
    target = create(levels[0]["path"], shape=full.shape, chunks=full.chunksize, dtype=full.dtype)
    da.store(full, target, lock=False)
    written, above = [levels[0]], da.from_zarr(target)
    for level, upper, lower in zip(levels[1:], sources, sources[1:]):
        factors = {ax: max(1, round(a / max(b, 1))) for ax, (a, b) in enumerate(zip(upper.shape, lower.shape))}
        if any(above.shape[ax] < f for ax, f in factors.items()):
            break
        mean = da.coarsen(np.mean, above.astype(np.float64), factors, trim_excess=True)
        if np.issubdtype(full.dtype, np.integer):
            mean = mean.round()
        chunks = tuple(min(c, n) for c, n in zip(lower.chunks, mean.shape))
        target = create(level["path"], shape=mean.shape, chunks=chunks, dtype=full.dtype)
        da.store(mean.astype(full.dtype).rechunk(chunks), target, lock=False)
        written.append(level)
        above = da.from_zarr(target)
    return written


def run_deblur(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .api import deblur
    from .checkpoint import load_model
    from .files import SUFFIXES, read_image, write_image

    outdir = Path(args.output) if args.output else None
    try:
        items, earlier = collect_inputs(args.inputs, args.recursive, args.suffix)
    except FileNotFoundError as err:
        print(f"demoe: {err}", file=sys.stderr)
        return 2
    if earlier:
        print(f"demoe: left out {len(earlier)} earlier output(s) found beside their source, "
              f"e.g. {earlier[0]} (name such files to deblur them)", file=sys.stderr)
    if not items:
        print(f"demoe: no images found (accepted: {' '.join(sorted(SUFFIXES))} .zarr)", file=sys.stderr)
        return 2
    inputs = {src.resolve() for src, _ in items}
    plan = []
    for src, rel in items:
        dest = output_path(src, rel, outdir, args.suffix)
        if dest.resolve() in inputs or dest.resolve() == src.resolve():
            print(f"demoe: refusing to write {dest}: it would overwrite an input "
                  "(choose another --output folder or a non-empty --suffix)", file=sys.stderr)
            return 2
        plan.append((src, dest))

    model = load_model(args.model, device=args.device)
    kwargs = dict(task=None if args.task == "auto" else args.task, model=model, device=args.device,
                  tile_size=args.tile_size, overlap=args.overlap, ensemble=args.ensemble, routing=args.routing,
                  preserve_mean=True if args.preserve_mean else None, nan_policy=args.nan_policy)
    failed = skipped = 0
    # Bars on a terminal only (or with --progress): in a log they are fragments and escape codes.
    bars = not args.quiet and (args.progress or sys.stderr.isatty())
    bar = tqdm(plan, unit="image", desc="images", disable=not bars)
    for src, dest in bar:
        if dest.exists() and not args.overwrite:
            tqdm.write(f"{src}: skipped, {dest} exists (use --overwrite)")
            skipped += 1
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        more = ""  # what else the file holds, when not all of it is in one image
        try:
            if src.suffix == ".zarr":
                if args.preserve_mean:
                    raise ValueError("--preserve-mean is not available for zarr stores (it needs each whole "
                                     "plane in memory)")
                info = _deblur_zarr(src, dest, kwargs, quiet=not bars)
            else:
                img = read_image(src)
                tiles = tqdm(total=0, unit="tile", desc=src.name, leave=False, disable=not bars)

                def report(done, total, tiles=tiles):
                    tiles.total = total
                    tiles.n = done
                    tiles.refresh()

                def restore(image, **extra):
                    return deblur(image.data, channel_axis=image.channel_axis, bgr=image.bgr, progress=report,
                                  **kwargs, **extra)

                out, info = restore(img, return_info=True)
                # A FITS file's other image HDUs, each routed on its own.
                parts = [dataclasses.replace(part, data=restore(part)) for part in img.parts]
                tiles.close()
                write_image(dest, dataclasses.replace(img, data=out, parts=parts))
                if img.parts:
                    more = f" (and {len(img.parts)} more image HDUs)"
                elif img.tiff.get("other_series"):
                    more = f" (its first series only: {img.tiff['other_series']} more not in the result)"
        except (ValueError, TypeError, OSError, MemoryError) as err:
            failed += 1
            tqdm.write(f"{src}: FAILED: {err}")
            continue
        p = info["probabilities"].get(info["task"]) if info.get("task") else None
        how = "forced" if info.get("forced") else "detected"
        label = f"{info['task']} ({how}, p={p:.2f})" if p is not None else "routing n/a"
        if info.get("tile_tasks"):
            label = "per tile: " + ", ".join(f"{task} {n}" for task, n in info["tile_tasks"].items())
        tqdm.write(f"{src}: {label}{more} -> {dest} [{time.perf_counter() - t0:.1f} s]")
    done = len(plan) - failed - skipped
    print(f"{done} deblurred, {skipped} skipped, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


# -- demoe info -------------------------------------------------------------------------------
def run_info(args: argparse.Namespace) -> int:
    import json
    import platform

    import numpy as np
    import torch

    from . import __version__
    from .checkpoint import (CheckpointError, available_devices, default_weights_path, load_model, resolve_device,
                             training_stages)

    print(f"demoe {__version__}, torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    print(f"devices available: {', '.join(available_devices())}; would use: {resolve_device(None)}")
    if args.model is None:
        path, title = default_weights_path(), "default model"
        if not path.is_file():
            print(f"default model: not packaged ({path})")
            return 0
    else:
        path, title = Path(args.model), "model"
    try:
        model = load_model(path, device="cpu")
    except (FileNotFoundError, CheckpointError) as err:
        print(f"demoe: {err}", file=sys.stderr)
        return 2
    meta = dict(model.metadata)
    record = meta.pop("training", {})
    print(f"{title}: {path}")
    print(f"  config: {json.dumps(model.config)}, top_k={model.k_used}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    convention = meta.get("input_convention")
    print("  input convention: " + (json.dumps(convention) if convention else
                                    "not recorded in the file (published DeMoE: RGB in [0, 1], float32)"))
    for line in _licence_lines(meta):
        print("  " + line)
    for stage in training_stages(record):
        for line in _stage_lines(stage):
            print("  " + line)
    return 0


def _licence_lines(meta: dict) -> list[str]:
    """The weights' licence, what they were trained on, and what that implies (when the file says)."""
    import textwrap

    lines = [f"licence: {meta['license']}"] if meta.get("license") else []
    data = meta.get("training_data")
    if isinstance(data, dict):
        sources = [f"{p['images']} from {p['package']} {p['version']} ({p['license']})"
                   for p in data.get("photographs", [])]
        lines += textwrap.wrap("trained on photographs: " + "; ".join(sources) + f"; {data.get('generated', '')}",
                               width=100, subsequent_indent="  ")
    if meta.get("license_note"):
        lines += textwrap.wrap(f"licence note: {meta['license_note']}", width=100, subsequent_indent="  ")
    return lines


def _stage_lines(record: dict) -> list[str]:
    """One stage of the weights' training record (a fine-tune names the file it started from)."""
    lines = [f"then fine-tuned from {record['init'].get('source')}:"] if record.get("init") else []
    for s in record.get("sessions", []):
        lines.append(f"training: steps {s.get('start_step')}-{s.get('end_step')} on {s.get('hardware')}, "
                     f"{s.get('wall_time_s', 0) / 60:.1f} min, started {s.get('started')}")
    if "data" in record:
        lines.append(f"data: {record['data']}")
    elif "photos" in record:
        pairs = (record.get("config") or {}).get("pairs") or []
        psfs = (record.get("config") or {}).get("psf") or []
        lines.append(f"data: {record['photos']} photographs + dead leaves"
                     + (f" + real pairs {', '.join(pairs)}" if pairs else "")
                     + (f" + your PSFs {', '.join(psfs)}" if psfs else ""))
    return lines


# -- entry point -------------------------------------------------------------------------------
def build_parser(train: bool = True) -> argparse.ArgumentParser:
    """The ``demoe`` parser; ``train=False`` leaves out the trainer's options (and torch, which they import)."""
    parser = argparse.ArgumentParser(prog="demoe", description="All-in-one image deblurring with DeMoE.")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("deblur", help="deblur image files or folders",
                       description="Deblur images (PNG, JPEG, TIFF incl. 16-bit, multi-page and OME, FITS, .npy, "
                                   "zarr incl. OME-Zarr).")
    d.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or .zarr stores (in a folder, earlier outputs "
                   "beside their source are left out)")
    d.add_argument("-o", "--output", metavar="OUTDIR", help="output folder (default: beside each input)")
    d.add_argument("-t", "--task", default="auto", choices=["auto", *TASKS], help="blur type (default: detect)")
    d.add_argument("--preserve-mean", action="store_true",
                   help="keep every plane's mean intensity, also where low light is detected (default: kept "
                        "unless the low-light expert is used; not for .zarr)")
    d.add_argument("--routing", default="image", choices=["image", "tile"],
                   help="one blur type for the whole image (default), or one per tile for blur that varies "
                        "across the image")
    d.add_argument("--nan-policy", default="keep", choices=["keep", "raise"],
                   help="NaN/Inf pixels in float images: restore around them and keep them as they are (default), "
                        "or fail that image")
    d.add_argument("--model", metavar="PATH", help="checkpoint file or training run folder (default: the packaged model)")
    d.add_argument("--tile-size", type=int, metavar="N", help="tile size in pixels (default: by device)")
    d.add_argument("--overlap", type=int, metavar="N", help="tile overlap in pixels (default: tile/8)")
    d.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    d.add_argument("--ensemble", type=int, default=1, choices=ENSEMBLES, metavar="N",
                   help=f"average each tile restored in N orientations: {', '.join(map(str, ENSEMBLES))} "
                        "(N times slower; default 1)")
    d.add_argument("--suffix", default="_deblurred", help="added to output names (default: _deblurred)")
    d.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    d.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d.add_argument("--progress", action="store_true",
                   help="progress bars even when stderr is not a terminal (default: on a terminal only; "
                        "a log gets one line per file either way)")
    d.set_defaults(func=run_deblur)

    i = sub.add_parser("info", help="versions, devices and a model's config and training record")
    i.add_argument("model", nargs="?", metavar="MODEL",
                   help="checkpoint file or training run folder (default: the packaged model)")
    i.set_defaults(func=run_info)

    t = sub.add_parser("train", help="train or fine-tune a model", description="Train or fine-tune DeMoE.")
    if train:
        from .train import build_parser as train_parser

        train_parser(t)
    t.set_defaults(func=lambda a: __import__("demoe.train", fromlist=["train"]).run_from_args(a))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The trainer's options come with torch: only `demoe train ...` builds them, so that
    # `demoe --help` and `demoe deblur --help` answer at once.
    args = build_parser(train=bool(argv) and argv[0] == "train").parse_args(argv)
    if getattr(args, "device", None) == "auto":
        args.device = None
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
        return status
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (finished outputs are complete files)
        print("demoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`demoe info | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
