"""``deblur()``: restore numpy or dask arrays of any size, dtype and layout."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import tiling
from ._arrays import (AUTO, channel_jobs, channels_last, check_image, check_sizes, finite_chunk, from_unit,
                      intensity_range, match_mean, moveaxis, resolve_channel_axis, without_holes)
from ._runner import Runner
from .checkpoint import cached_model, load_model
from .devices import (AUTO_PRECISION, DEFAULT_BATCH, DEFAULT_TILE, PRECISIONS, default_streams, resolve_device,
                      tile_streams)
from .model import TASKS, DeMoE
from .tasks import ENSEMBLES, task_index

#: Tiles used to estimate one routing for a whole image.
ROUTING_TILES = 8

def _route_image(model: DeMoE, device, read, height, width, tile, multiple, batch: int | None = None,
                 pool: ThreadPoolExecutor | None = None, window: int | None = None) -> np.ndarray:
    """Routing weights for a whole image: the average over its most textured tiles.

    The tiles go through the router ``batch`` at a time (default: all at once),
    spread over ``pool``'s threads when one is given, with the network's pooling
    ``window`` (``DeMoE.forward(pool_window=...)``).
    """
    ay = tiling.plan_axis(height, tile, 0 if tile <= multiple else min(multiple, tile // 4), multiple)
    ax = tiling.plan_axis(width, tile, 0 if tile <= multiple else min(multiple, tile // 4), multiple)
    candidates = [(rows, cols) for rows in ay.indices(first=0) for cols in ax.indices(first=0)]
    if len(candidates) > 4 * ROUTING_TILES:  # spread a subset evenly over the image
        pick = np.linspace(0, len(candidates) - 1, 4 * ROUTING_TILES).round().astype(int)
        candidates = [candidates[k] for k in pick]
    tiles = [read(r, c) for r, c in candidates]
    # Flat tiles say nothing about blur: weight the vote by texture (gradient energy).
    energy = np.array([np.abs(np.diff(t, axis=-1)).mean() + np.abs(np.diff(t, axis=-2)).mean() for t in tiles])
    order = np.argsort(-energy)[:ROUTING_TILES]
    chosen = np.stack([tiles[k] for k in order])

    def route(part: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.route(torch.from_numpy(part).to(device), pool_window=window).float().cpu().numpy()

    parts = np.array_split(chosen, -(-len(chosen) // (batch or len(chosen))))
    probs = np.concatenate(list(pool.map(route, parts)) if pool is not None else [route(p) for p in parts])
    w = energy[order] + 1e-12
    return (probs * w[:, None]).sum(0) / w.sum()


# -- public API -----------------------------------------------------------------------------
def deblur(
    image,
    task: str | None = None,
    *,
    model: DeMoE | str | Path | None = None,
    channel_axis: int | None | str = AUTO,
    tile_size: int | None = None,
    overlap: int | None = None,
    routing: str = "image",
    normalize: str | tuple[float, float] = "auto",
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    streams: int | None = None,
    bgr: bool = False,
    progress: bool | Callable[[int, int], None] = False,
    return_info: bool = False,
    preserve_mean: bool | None = None,
    tlc: bool | int = True,
    precision: str = "auto",
    ensemble: int = 1,
    nan_policy: str = "raise",
):
    """Deblur an image with DeMoE.

    Parameters
    ----------
    image : ([P, ...,] M, N[, C]) array_like or dask array
        Gray ``(M, N)``, colour ``(M, N, 3)``, RGBA ``(M, N, 4)`` (alpha passed
        through untouched), any other channel count (each channel restored as
        gray), with any leading axes (Z, T, ...) restored plane by plane. A
        dask array gives a lazy dask array back, computed chunk by chunk. A
        ``numpy.ma`` masked array gives a masked array back, with the same
        mask: masked pixels are restored around (as NaN under
        ``nan_policy='keep'``) and keep their values.
    task : {None, 'auto', 'defocus', 'global_motion', 'local_motion', 'synth_global_motion', 'low_light'}
        None/'auto' lets the model recognise the blur; a name forces that expert.
    model : DeMoE or path, optional
        A loaded model or a checkpoint file. Default: the packaged model
        (loaded once per device).
    channel_axis : int or None, optional
        Axis holding colour channels. Default: the last axis when ``image.ndim
        >= 3`` and it has 3 or 4 entries, otherwise no channel axis.
    tile_size, overlap : int, optional
        Tiles (pixels) fed to the network and their overlap. Default tile: 256
        on CPU, 512 on GPU, and at least the model's training patch
        (``metadata['patch_size']``); default overlap: tile / 8. ``overlap``
        must be under half a tile.
    routing : {'image', 'tile'}
        'image': one routing for the whole image, estimated from its most
        textured tiles (no expert switch can show as a seam); 'tile': every
        tile routed on its own, for spatially varying blur.
    normalize : {'auto', 'percentile', 'range', 'none'} or (low, high)
        'auto': uint8 / 255, floats already in [0, 1] as they are, anything else
        (uint16, other integers, other floats) by its 0.1 / 99.9 percentiles;
        the result is mapped back by the exact inverse.
    device : str, optional
        None -> cuda, else mps, else cpu.
    batch_size : int, optional
        Tiles per network call (default 1 on CPU, 8 on MPS, 16 on CUDA).
    streams : int, optional
        Network calls run at once in parallel threads, torch's CPU threads shared
        among them (default 2 on a CPU with at least two threads, else 1; meant
        for CPUs). On two cores, two one-thread streams ran 0.96-1.25x as fast
        as one two-thread stream (bare tiles: 1.25-1.78x). While they run, threads that start using torch
        get a stream's share of threads. On CUDA each stream halves its own
        batch on out-of-memory.
    bgr : bool
        Colour channels are in BGR order (``cv2.imread``).
    progress : bool or callable
        True shows a tqdm bar; a callable receives ``(done, total)`` tiles after
        every batch and may raise to cancel. Not for dask input, whose result is
        lazy: time goes by when it is computed (``tqdm.dask.TqdmCallback`` or
        dask's own diagnostics show that), so asking for progress there warns.
    return_info : bool
        Also return a dict: routing probabilities per task, the task used,
        tiles, device, precision, tile size, overlap, batch size, streams, seconds;
        for numpy input also ``tile_shape`` (the tiles actually used: the planner
        may shrink ``tile_size`` to fit the image) and ``computed`` (pixels the
        network computed per image pixel, the cost of overlap, margins and
        ``ensemble``; None for dask input). With ``routing='tile'`` on numpy
        input, ``tile_tasks`` counts the tiles each expert restored (the
        ``task`` is then the top of the tiles' mean routing).
    preserve_mean : bool, optional
        Shift every restored plane back to its input's mean intensity, so a
        deblur never re-exposes the data. Default: on, except where the
        ``low_light`` expert is used (its job is to change the exposure): with
        ``routing='tile'``, a plane where any tile went to it is left as it is.
        Needed because the ``synth_global_motion`` expert, trained on frames
        averaged in linear light, darkens by 1-3 %. Not applied to dask input
        (it needs the whole plane); True with dask input is a ValueError.
    tlc : bool or int
        Test-time local converter (Chu et al., 2022): the channel attention
        averages over a local window instead of the whole tile, so a tile
        larger than the training patches sees the statistics the network was
        trained on. True (default) uses the model's training patch
        (``metadata['patch_size']``, else 256) as the window; an int sets it in
        pixels; False gives the published global pooling. A tile no larger than
        the window is pooled globally either way, so on CPU (256 px tiles, the
        packaged model's 256 px patch) the default costs nothing; it takes
        effect for larger tiles (GPU defaults, a larger ``tile_size``), where
        it keeps the result independent of the tile size (see README, "Seams").
    precision : {'auto', 'fp32', 'fp16', 'bf16'}
        Arithmetic of the network (autocast). 'auto': fp16 on CUDA, fp32
        elsewhere: on a CPU without native bf16 (this project's AMD EPYC)
        bf16 autocast ran 20x slower, see docs/benchmarks/inference_options.md.
    ensemble : {1, 2, 4, 8}
        Geometric self-ensemble: the network also restores 1, 3 or 7 flipped
        or transposed copies of every tile (2: a left-right flip; 4: all
        flips; 8: all flips and transposes), each routed as the tile itself,
        and the results are averaged. Costs ``ensemble`` times the network
        time; on the quality benchmark 4 and 8 added 0.04 and 0.06 dB with the
        packaged weights (README, "How good is the packaged model?").
    nan_policy : {'raise', 'keep'}
        NaN or infinite pixels in float data (blank sky, masked regions): 'raise'
        (default) refuses the image with their count; 'keep' restores the rest
        and leaves them as they were. For the network they are filled with a
        smooth continuation of the pixels around them (a Gaussian-weighted
        mean of the finite pixels nearby, sigma 4 px; the plane's median far
        from any), which costs one float32 copy of the image.

    Returns
    -------
    out : ndarray or dask array
        A new array of the input's shape and dtype (integers rounded and
        clipped). The input is never modified.

    Raises
    ------
    ValueError
        Unknown task, empty or NaN/Inf images, bad axis or tile parameters.
    TypeError
        Boolean, complex or object arrays.

    Examples
    --------
    >>> import numpy as np
    >>> from demoe import deblur
    >>> photo = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    >>> restored = deblur(photo, task="defocus")
    >>> restored.shape, restored.dtype
    ((64, 96, 3), dtype('uint8'))
    >>> stack = np.random.default_rng(1).integers(0, 4096, (2, 40, 50), dtype=np.uint16)
    >>> out, info = deblur(stack, return_info=True)
    >>> out.dtype, sorted(info["probabilities"]) == sorted(["defocus", "global_motion",
    ...     "local_motion", "synth_global_motion", "low_light"])
    (dtype('uint16'), True)
    """
    t0 = time.perf_counter()
    arr, is_dask = check_image(image)
    if task == AUTO:
        task = None
    if task is not None:
        task_index(task, auto=True)
    if routing not in ("image", "tile"):
        raise ValueError(f"routing must be 'image' or 'tile', got {routing!r}")
    if precision != AUTO and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    if isinstance(ensemble, bool) or not isinstance(ensemble, (int, np.integer)) or ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLES))} (copies of each tile averaged), "
                         f"got {ensemble!r}")
    if preserve_mean not in (None, True, False):
        raise ValueError(f"preserve_mean must be True, False or None (default: on unless low light is used), "
                         f"got {preserve_mean!r}")
    if is_dask and preserve_mean:
        raise ValueError("preserve_mean=True needs each whole plane, which a lazy dask array does not give; "
                         "compute it first (np.asarray(image)) or leave preserve_mean at None")
    if nan_policy not in ("raise", "keep"):
        raise ValueError(f"nan_policy must be 'raise' or 'keep', got {nan_policy!r}")
    axis = resolve_channel_axis(arr.shape, channel_axis)

    dev = resolve_device(device)
    if model is None:
        net = cached_model(None, dev)
    elif isinstance(model, (str, Path)):
        net = load_model(model, device=dev)
    elif isinstance(model, DeMoE):
        net = model.to(dev).eval()
    else:
        raise TypeError(f"model must be a DeMoE, a checkpoint path or None, got {type(model).__name__}")
    multiple = net.padder_size
    check_sizes(tile_size, overlap, batch_size, multiple, streams)
    patch = int(net.metadata.get("patch_size", 0) or 0)  # training patch, if recorded
    if tile_size is not None:
        tile = int(tile_size)
    else:  # the device's best size, but no smaller than the patches the model was trained on
        tile = max(DEFAULT_TILE.get(dev.type, 256), patch)
    tile = -(-tile // multiple) * multiple
    ovl = int(overlap) if overlap is not None else tile // 8
    if 2 * ovl >= tile:
        raise ValueError(f"overlap ({ovl}) must be less than half the tile size ({tile})")
    # A tile beyond the image and its overlap adds nothing but memory (tile_size=200000 took 23 GB on 64 x 64).
    longest = max([n for i, n in enumerate(arr.shape) if i != axis][-2:])
    fitted = tiling.fit_tile(tile, ovl, longest, multiple, least=DEFAULT_TILE.get(dev.type, 256))
    if fitted < tile:
        tile, ovl = fitted, (fitted // 8 if overlap is None else min(ovl, longest))
    batch = int(batch_size) if batch_size is not None else DEFAULT_BATCH.get(dev.type, 1)
    streams = default_streams(dev) if streams is None else int(streams)

    # Channels last, planes first: (P, H, W, C).
    moved = channels_last(arr, axis)
    # Masked pixels (numpy.ma) and, with nan_policy='keep', NaN/Inf: restored around, given back as they were.
    mask = np.ma.getmask(image) if isinstance(image, np.ma.MaskedArray) else np.ma.nomask
    masked = None if mask is np.ma.nomask else channels_last(np.broadcast_to(mask, arr.shape), axis)
    filled, holes = without_holes(moved, nan_policy, masked) if not is_dask else (moved, None)
    lo, hi = intensity_range(filled, normalize)
    if tlc is True:
        window = int(patch or 256)
    elif tlc is False or tlc is None:
        window = None
    elif isinstance(tlc, (int, np.integer)) and tlc > 0:
        window = int(tlc)
    else:
        raise ValueError(f"tlc must be True, False or a window size in pixels (> 0), got {tlc!r}")
    if window is not None and window >= tile:
        window = None  # a window spanning every tile is the global pooling
    if precision == AUTO:
        precision = AUTO_PRECISION.get(dev.type, "fp32")
    settings = dict(net=net, dev=dev, task=task, routing=routing, tile=tile, ovl=ovl, batch=batch, streams=streams, bgr=bgr,
                    lo=lo, hi=hi, multiple=multiple, preserve_mean=preserve_mean, tlc_window=window,
                    precision=precision, ensemble=int(ensemble), nan_policy=nan_policy)

    if is_dask:
        if progress:
            warnings.warn("progress is not reported for dask input: the result is lazy and computed later; "
                          "wrap its computation in tqdm.dask.TqdmCallback() for a bar", RuntimeWarning, stacklevel=2)
        out, info = _deblur_dask(moved, settings)
    else:
        out, info = _deblur_numpy(filled, settings, progress)
        if holes is not None:
            out[holes] = moved[holes]
    if axis is None:
        out = out[..., 0]
    else:
        out = moveaxis(out, -1, axis)
    if isinstance(image, np.ma.MaskedArray):
        out = np.ma.MaskedArray(out, mask=np.ma.nomask if mask is np.ma.nomask else mask.copy())
    info.update(device=str(dev), precision=precision, ensemble=int(ensemble), tile_size=tile, overlap=ovl,
                batch_size=batch, streams=streams,
                normalization=(lo, hi), seconds=time.perf_counter() - t0)
    return (out, info) if return_info else out


def _tile_reader(plane: np.ndarray, chans: list[int], mode: str, s: dict):
    """The tiler's reader of ``plane``'s channels ``chans``: gray replicated to a colour network's three."""
    return tiling.tile_reader(plane, chans, s["lo"], s["hi"], repeat=3 if mode == "gray" and s["net"].img_channel == 3 else 1)


def _deblur_numpy(moved: np.ndarray, s: dict, progress, fixed_probs: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Restore a ``(..., H, W, C)`` array."""
    with tile_streams(s["streams"]) as pool:
        return _deblur_planes(moved, s, progress, fixed_probs, pool)


def _deblur_planes(moved: np.ndarray, s: dict, progress, fixed_probs: np.ndarray | None,
                   pool: ThreadPoolExecutor | None) -> tuple[np.ndarray, dict]:
    net, dev = s["net"], s["dev"]
    *lead, h, w, c = moved.shape
    planes = moved.reshape(-1, h, w, c)
    out = np.empty_like(planes)
    if c == 4 and net.img_channel == 3:
        out[..., 3] = planes[..., 3]
    jobs = channel_jobs(c, net.img_channel, s["bgr"])
    plan = tiling.plan_summary(h, w, s["tile"], s["ovl"], s["multiple"])
    total = plan["tiles"] * len(jobs) * len(planes)
    report = _progress(progress, total)
    probs_all = []

    for p, plane in enumerate(planes):
        for chans, mode in jobs:
            read = _tile_reader(plane, chans, mode, s)

            def write(y0, y1, block, p=p, chans=chans, mode=mode):
                if mode == "gray" and net.img_channel == 3:
                    block = block.mean(axis=0, keepdims=True)
                out[p][y0:y1, :, chans] = from_unit(block.transpose(1, 2, 0), s["lo"], s["hi"], out.dtype)

            first = len(probs_all)  # this job's routing records start here
            weights = None
            if s["task"] is None and s["routing"] == "image":
                probs = fixed_probs
                if probs is None:
                    probs = _route_image(net, dev, read, h, w, s["tile"], s["multiple"], batch=s["batch"], pool=pool,
                                         window=s["tlc_window"])
                weights = torch.from_numpy(np.asarray(probs)).float().to(dev)[None]
                probs_all.append(probs)
            runner = Runner(net, dev, s["task"], weights, record=probs_all, precision=s["precision"],
                             pool=pool, streams=s["streams"], ensemble=s["ensemble"], window=s["tlc_window"])
            tiling.stitch(read, runner, write, h, w, tile=s["tile"], overlap=s["ovl"], multiple=s["multiple"],
                          batch_size=s["batch"] * s["streams"], progress=report)
            # The low-light expert is meant to change the exposure: by default, a plane where it
            # restored anything (the whole plane, or some of its tiles) keeps its new mean.
            used = _experts_used(s["task"], probs_all[first:], net)
            keep = s["preserve_mean"] if s["preserve_mean"] is not None else "low_light" not in used
            if keep:
                match_mean(out[p], plane, chans)
    if report is not None:
        report.close()
    info = _routing_info(s["task"], probs_all, net)
    if s["task"] is None and s["routing"] == "tile":
        info["tile_tasks"] = dict(Counter(_experts_used(None, probs_all, net)).most_common())
    info.update(tiles=total, tile_shape=plan["tile_shape"], computed=plan["computed"] * s["ensemble"])
    return out.reshape(moved.shape), info


def _experts_used(task, records, net) -> list[str]:
    """The expert that restored each routed tile (its top routing weight), or the forced one."""
    if task is not None:
        return [task]
    names = TASKS[: net.num_exp]
    return [names[int(np.argmax(p))] for p in records]


def _routing_info(task, probs_all, net) -> dict:
    names = TASKS[: net.num_exp]
    if task is not None:
        probs, used = np.eye(net.num_exp)[TASKS.index(task)], task
    elif probs_all:
        probs = np.mean(probs_all, axis=0)
        used = names[int(np.argmax(probs))]
    else:
        probs, used = np.full(net.num_exp, np.nan), None
    return {"probabilities": {n: float(p) for n, p in zip(names, probs)}, "task": used,
            "forced": task is not None}


def _progress(progress, total: int):
    """None, or a reporter that turns per-batch tile counts into callbacks or a bar."""
    if progress is False or progress is None:
        return None
    return _Progress(progress, total)


class _Progress:
    """Turns per-batch tile counts into ``(done, total)`` callbacks or a tqdm bar."""

    def __init__(self, progress, total: int):
        self.total, self.done = total, 0
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="tile", desc="deblur")

    def __call__(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _deblur_dask(moved, s: dict):
    """Lazy: every chunk (all channels, overlapping neighbours) restored on demand."""
    net = s["net"]
    *lead, h, w, c = moved.shape
    # Whole channel axis per chunk, one plane per chunk, spatial chunks as given.
    moved = moved.rechunk({**{i: 1 for i in range(len(lead))}, moved.ndim - 1: -1})
    probs = None
    if s["task"] is None and s["routing"] == "image":
        # One routing for the whole lazy image, from a central crop of its first plane.
        plane = moved[(0,) * len(lead)]
        ch, cw = min(h, 4 * s["tile"]), min(w, 4 * s["tile"])
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        crop = np.asarray(plane[y0 : y0 + ch, x0 : x0 + cw].compute())
        crop = without_holes(crop, s["nan_policy"])[0]
        probs = _route_crop(crop, s)
    info = _routing_info(s["task"], [] if probs is None else [probs], net)
    info.update(tiles=None, tile_shape=None, computed=None)  # planned per chunk, lazily
    if s["nan_policy"] == "raise" and moved.dtype.kind == "f":  # each chunk's own pixels, counted once
        moved = moved.map_blocks(finite_chunk, dtype=moved.dtype)
    margin = 2 * s["ovl"] + s["multiple"]  # context each chunk borrows from its neighbours
    depth = {i: 0 for i in range(moved.ndim)}
    depth[moved.ndim - 3] = min(margin, h)  # dask refuses a depth beyond the array
    depth[moved.ndim - 2] = min(margin, w)

    # Mean matching needs the whole plane; per chunk it could leave steps at chunk borders.
    # dask's own threads already restore chunks in parallel: one tile stream per chunk.
    block_settings = {**s, "preserve_mean": False, "streams": 1}

    def block_fn(block):
        filled, holes = without_holes(block, s["nan_policy"])
        out = _deblur_numpy(filled, block_settings, False, fixed_probs=probs)[0]
        if holes is not None:
            out[holes] = block[holes]
        return out

    out = moved.map_overlap(block_fn, depth=depth, boundary="reflect", dtype=moved.dtype)
    return out, info


def _route_crop(crop: np.ndarray, s: dict) -> np.ndarray:
    """Routing probabilities of a ``(H, W, C)`` crop, estimated as for a whole image."""
    chans, mode = channel_jobs(crop.shape[-1], s["net"].img_channel, s["bgr"])[0]
    read = _tile_reader(crop, chans, mode, s)
    return _route_image(s["net"], s["dev"], read, crop.shape[0], crop.shape[1], s["tile"], s["multiple"],
                        batch=s["batch"], window=s["tlc_window"])  # the pooling the chunks are restored with
