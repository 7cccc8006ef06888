"""The ``demoe`` command: ``demoe deblur``, ``demoe info``, ``demoe export``, ``demoe train``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
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
    from .files import SUFFIXES, natural_key, split_name

    found: list[tuple[Path, Path]] = []
    earlier: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and p.suffix != ".zarr":
            pattern = "**/*" if recursive else "*"
            files = [f for f in p.glob(pattern) if not f.name.startswith(".")  # hidden: e.g. a run's temporaries
                     and ((f.is_file() and f.suffix.lower() in SUFFIXES) or (f.is_dir() and f.suffix == ".zarr"))]
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


def _deblur_zarr(src: Path, dest: Path, kwargs: dict, quiet: bool = False, max_pixels: int | None = None) -> dict:
    """A zarr array, or an OME-Zarr image (its full-resolution level), deblurred lazily into ``dest``."""
    import contextlib

    from tqdm.auto import tqdm
    from tqdm.dask import TqdmCallback

    from .api import deblur
    from .files import read_zarr, write_zarr

    image = read_zarr(src, max_pixels)
    out, info = deblur(image.data, return_info=True, chunks="input", **kwargs)  # written in the input's chunks
    # dask computes the chunks as the store is written: a bar over its tasks (chunks read, restored, written).
    bar = (contextlib.nullcontext() if quiet else
           TqdmCallback(tqdm_class=tqdm, desc=src.name, unit="task", leave=False, mininterval=1.0))
    with bar:
        write_zarr(dest, dataclasses.replace(image, data=out))
    return info


def _key(path: Path) -> Path:
    """``path`` resolved, for comparing names (as it is, where the file system refuses the name)."""
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def plan_outputs(items: list[tuple[Path, Path]], outdir: Path | None, suffix: str) -> list[tuple[Path, Path]]:
    """``(input, output)`` pairs; ValueError (naming the files) if an output would be an input, or if two
    inputs would be written to one output."""
    inputs = {_key(src): src for src, _ in items}
    plan, first, taken = [], {}, set()
    collisions = []
    for src, rel in items:
        if _key(src) in taken:  # the same file named twice: once is enough
            continue
        taken.add(_key(src))
        dest = output_path(src, rel, outdir, suffix)
        key = _key(dest)
        if key in inputs:
            raise ValueError(f"refusing to write {dest}: it would overwrite an input "
                             "(choose another --output folder or a non-empty --suffix)")
        if key in first:
            collisions.append(f"{first[key]} and {src} -> {dest}")
        first.setdefault(key, src)
        plan.append((src, dest))
    if collisions:
        raise ValueError(f"{len(collisions)} output name(s) would be written twice: {'; '.join(collisions[:5])}"
                         + (f"; ... {len(collisions) - 5} more" if len(collisions) > 5 else "")
                         + ". Give such inputs separate runs or --output folders, or pass their common parent "
                           "folder with --recursive (sub-folders are kept)")
    return plan


def _suffix_error(suffix: str) -> str | None:
    seps = {"/", os.sep, os.altsep} - {None}
    if any(sep in suffix for sep in seps) or "\0" in suffix:
        return (f"--suffix {suffix!r} may not contain a path separator ({' or '.join(sorted(seps))}): outputs are "
                "named <name><suffix><ext>, beside their input or in --output")
    return None


def run_deblur(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .checkpoint import CheckpointError, load_model
    from .files import SUFFIXES, max_pixels

    def fail(message: str) -> int:  # a problem of the whole run: one line, exit 2
        print(f"demoe: {message}", file=sys.stderr)
        return 2

    if _suffix_error(args.suffix):
        return fail(_suffix_error(args.suffix))
    try:
        max_pixels()  # DEMOE_MAX_PIXELS, if set, is a number
    except ValueError as err:
        return fail(str(err))
    outdir = Path(args.output) if args.output else None
    try:
        items, earlier = collect_inputs(args.inputs, args.recursive, args.suffix)
    except (FileNotFoundError, OSError) as err:
        return fail(str(err))
    if earlier:
        print(f"demoe: left out {len(earlier)} earlier output(s) found beside their source, "
              f"e.g. {earlier[0]} (name such files to deblur them)", file=sys.stderr)
    if not items:
        return fail(f"no images found (accepted: {' '.join(sorted(SUFFIXES))} .zarr)")
    try:
        plan = plan_outputs(items, outdir, args.suffix)
    except ValueError as err:
        return fail(str(err))
    if outdir is not None and outdir.exists() and not outdir.is_dir():
        return fail(f"--output {outdir} is a file; give a folder (it is created if missing)")

    try:
        model = load_model(args.model, device=args.device)
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        return fail(str(err))
    if args.tile_size is not None and args.tile_size < model.padder_size:  # else every file fails alike
        return fail(f"--tile-size must be at least {model.padder_size} (the model's size divisor), got {args.tile_size}")
    if args.overlap is not None and args.tile_size is not None and 2 * args.overlap >= args.tile_size:
        return fail(f"--overlap ({args.overlap}) must be less than half of --tile-size ({args.tile_size})")
    if outdir is not None:
        try:
            outdir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return fail(f"cannot create the output folder {outdir}: {err.strerror or err}")
    kwargs = dict(task=args.task, model=model, device=args.device,
                  tile_size=args.tile_size, overlap=args.overlap, ensemble=args.ensemble, routing=args.routing,
                  preserve_mean=True if args.preserve_mean else None, nan_policy=args.nan_policy)
    failed = skipped = 0
    bar = tqdm(plan, unit="image", desc="images", disable=not _bars(args))
    for src, dest in bar:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # shown as this file's lines
            warnings.simplefilter("always")
            try:
                result = _deblur_file(src, dest, args, kwargs)
            except (ValueError, TypeError, OSError, MemoryError) as err:
                result = f"FAILED: {_one_line(err)}"
            except Exception as err:  # noqa: BLE001 - one file's unforeseen error must not stop the batch
                result = f"FAILED: {type(err).__name__}: {_one_line(err)} (unexpected; please report it)"
        _show_warnings(src, caught)
        if result is None:
            tqdm.write(f"{src}: skipped, {dest} exists (use --overwrite)")
            skipped += 1
        elif result.startswith("FAILED: "):
            tqdm.write(f"{src}: {result}")
            failed += 1
        else:
            tqdm.write(f"{src}: {result} -> {dest} [{time.perf_counter() - t0:.1f} s]")
    done = len(plan) - failed - skipped
    print(f"{done} deblurred, {skipped} skipped, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _show_warnings(src: Path, caught: list) -> None:
    """Runtime and user warnings of one file as its own lines; others (deprecations...) as Python shows them."""
    from tqdm.auto import tqdm

    for w in caught:
        if issubclass(w.category, (RuntimeWarning, UserWarning)) and not issubclass(w.category, DeprecationWarning):
            tqdm.write(f"{src}: warning: {_one_line(w.message)}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _deblur_file(src: Path, dest: Path, args: argparse.Namespace, kwargs: dict) -> str | None:
    """Deblur one input into ``dest``: what the command's line says about it, or None if it was skipped."""
    from tqdm.auto import tqdm

    from .api import deblur
    from .files import read_image, remove_leftovers, write_image

    remove_leftovers(dest)  # temporaries of runs that were killed while writing it
    if dest.exists() and not args.overwrite:
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    more = ""  # what else the file holds, when not all of it is in one image
    if src.suffix == ".zarr":
        if args.preserve_mean:
            raise ValueError("--preserve-mean is not available for zarr stores (it needs each whole "
                             "plane in memory)")
        info = _deblur_zarr(src, dest, kwargs, quiet=not _bars(args), max_pixels=args.max_pixels)
    else:
        img = read_image(src, max_pixels=args.max_pixels)
        tiles = tqdm(total=0, unit="tile", desc=src.name, leave=False, disable=not _bars(args))

        def report(done, total, tiles=tiles):
            tiles.total = total
            tiles.n = done
            tiles.refresh()

        def restore(image, **extra):
            return deblur(image.data, channel_axis=image.channel_axis, bgr=image.bgr, progress=report,
                          **kwargs, **extra)

        try:
            out, info = restore(img, return_info=True)
            # A FITS file's other image HDUs, each routed on its own.
            parts = [dataclasses.replace(part, data=restore(part)) for part in img.parts]
        finally:
            tiles.close()
        write_image(dest, dataclasses.replace(img, data=out, parts=parts))
        if img.parts:
            more = f" (and {len(img.parts)} more image HDUs)"
        elif img.tiff.get("other_series"):
            more = f" (its first series only: {img.tiff['other_series']} more not in the result)"
    p = info["probabilities"].get(info["task"]) if info.get("task") else None
    how = "forced" if info.get("forced") else "detected"
    label = f"{info['task']} ({how}, p={p:.2f})" if p is not None else "routing n/a"
    if info.get("tile_tasks"):
        label = "per tile: " + ", ".join(f"{task} {n}" for task, n in info["tile_tasks"].items())
    return label + more


# -- demoe info -------------------------------------------------------------------------------
def run_info(args: argparse.Namespace) -> int:
    import json
    import platform

    import numpy as np
    import torch

    from . import __version__
    from .checkpoint import CheckpointError, default_weights_path, load_model, weights_description
    from .devices import available_devices, resolve_device

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
    print(f"  config: {json.dumps(model.config)} ({model.architecture or 'a custom'} architecture), top_k={model.top_k}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    convention = meta.get("input_convention")
    print("  input convention: " + (json.dumps(convention) if convention else
                                    "not recorded in the file (published DeMoE: RGB in [0, 1], float32)"))
    for line in weights_description(meta, record):
        print("  " + line)
    return 0


def _bars(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal only (or with --progress): in a log they are fragments and escape codes."""
    return not args.quiet and (args.progress or sys.stderr.isatty())


# -- demoe export ---------------------------------------------------------------------------------------
def run_export(args: argparse.Namespace) -> int:
    """``demoe export onnx|bioimageio [MODEL] -o FILE``: one line on success, one line and status 2 on failure."""
    import json

    from .checkpoint import CheckpointError, load_model
    from .export import OPSET, MissingDependencyError, check_output, export_bioimageio, export_onnx, require_extra

    what = {"onnx": "an ONNX graph", "bioimageio": "a bioimage.io model package"}[args.format]
    try:
        check_output(args.output, {"onnx": ".onnx", "bioimageio": ".zip"}[args.format], args.overwrite)
        require_extra(args.format)
        if args.model is not None and not Path(args.model).exists():  # one line now, not after the notice
            raise FileNotFoundError(f"checkpoint not found: {args.model}")
        print(f"demoe: exporting {args.model or 'the packaged model'} as {what} (torch.onnx traces every layer: "
              "up to half a minute)", file=sys.stderr)
        model = args.model
        if args.top_k is not None:  # else the exports load the file (after checking the output path)
            model = load_model(args.model, top_k=args.top_k, device="cpu")
        if args.format == "onnx":
            path = export_onnx(model, args.output, task_input=args.task_input, overwrite=args.overwrite)
        else:
            path = export_bioimageio(model, args.output, authors=args.author, license=args.license,
                                     name=args.name, overwrite=args.overwrite)
    except (MissingDependencyError, CheckpointError, OSError, ValueError) as err:
        print(f"demoe: {_one_line(err)}", file=sys.stderr)
        return 2
    if args.format == "onnx":
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        print(f"{path}: ONNX opset {OPSET}; inputs image (N, {json.loads(meta['demoe_config'])['img_channel']}, "
              f"H, W; float32 in [0, 1]; H and W multiples of {meta['size_multiple']}) and task ({args.task_input}; "
              "routing weights, zeros: the router chooses); outputs restored and probabilities")
    else:
        print(f"{path}: bioimage.io model (spec 0.5) with pytorch_state_dict and onnx weights; check it with "
              f"bioimageio.core: python -c \"from demoe.export import check_package; print(check_package('{path}')"
              '.status)"')
    return 0


# -- entry point -------------------------------------------------------------------------------
def _count_arg(least: int):
    """An argparse type: a whole number >= ``least`` (argparse then gives its one-line usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {'positive' if least == 1 else f'>= {least}'}, got {value}")
        return value

    return parse


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
    d.add_argument("--tile-size", type=_count_arg(1), metavar="N", help="tile size in pixels (default: by device)")
    d.add_argument("--overlap", type=_count_arg(0), metavar="N", help="tile overlap in pixels (default: tile/8)")
    d.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    d.add_argument("--ensemble", type=int, default=1, choices=ENSEMBLES, metavar="N",
                   help=f"average each tile restored in N orientations: {', '.join(map(str, ENSEMBLES))} "
                        "(N times slower; default 1)")
    d.add_argument("--suffix", default="_deblurred", help="added to output names, no path separators "
                   "(default: _deblurred)")
    d.add_argument("--max-pixels", type=_count_arg(1), metavar="N",
                   help="largest image read into memory, in pixels per plane (default: 16384 x 16384, or "
                        "$DEMOE_MAX_PIXELS); larger files are refused before decoding. Zarr is read by chunks")
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

    e = sub.add_parser("export", help="write a model for onnxruntime and OpenCV (ONNX) or bioimage.io",
                       description="Export a DeMoE model to run outside PyTorch. Needs the export extra: "
                                   'pip install "napari-demoe[export]".')
    formats = e.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, suffix, text in (("onnx", ".onnx", "an ONNX graph (opset 18) for onnxruntime and OpenCV's dnn"),
                               ("bioimageio", ".zip", "a bioimage.io model package (spec 0.5, PyTorch + ONNX)")):
        f = formats.add_parser(name, help=text, description=f"Write {text}.")
        f.add_argument("model", nargs="?", metavar="MODEL",
                       help="checkpoint file or training run folder (default: the packaged model)")
        f.add_argument("-o", "--output", default=f"demoe{suffix}", metavar="FILE",
                       help=f"the {suffix} file to write (default: demoe{suffix}; its folder is created)")
        f.add_argument("--top-k", type=_count_arg(1), metavar="K",
                       help="experts mixed per image (default: the weights' header, else 1, as published)")
        f.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
        if name == "onnx":
            f.add_argument("--task-input", choices=["optional", "required"], default="optional",
                           help="optional (default): the task input has a default (zeros: the router chooses), "
                                "for onnxruntime; required: a plain input, which OpenCV's dnn can set (it reads "
                                "an input with a default as a constant)")
        if name == "bioimageio":
            f.add_argument("--author", action="append", metavar="NAME",
                           help="an author of the weights, repeatable (default: the weights' header; the "
                                "packaged model's: the napari-demoe developers)")
            f.add_argument("--license", metavar="SPDX", help="the weights' licence (default: the weights' header)")
            f.add_argument("--name", help="the package's name (default: DeMoE deblurring (ARCHITECTURE))")
    e.set_defaults(func=run_export)

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
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 are shown escaped, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
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
