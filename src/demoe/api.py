"""``deblur()``: restore numpy or dask arrays of any size, dtype and layout.

The data path: the arguments are checked and resolved once into a frozen plan
(``_plan.py``); the image, laid out ``(..., H, W, C)``, is restored plane by
plane (numpy) or chunk by chunk (dask): every plane is routed once
(``routing.py``) or tile by tile, cut into overlapping tiles that the network
restores (``tiling.py``, ``_runner.py``), stitched back and mapped to the
input's intensities, dtype and layout (``_arrays.py``).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import tiling
from ._arrays import AUTO, channel_jobs, from_unit, match_mean
from ._chunks import deblur_dask
from ._plan import DeblurPlan, make_plan
from ._runner import Runner
from .devices import tile_streams
from .model import DeMoE
from .routing import experts_used, image_routing, plane_reader, routing_info


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
    chunks: str | None = None,
):
    """Deblur an image with DeMoE.

    Parameters
    ----------
    image : ([P, ...,] M, N[, C]) array_like or dask array
        Gray ``(M, N)``, colour ``(M, N, 3)``, RGBA ``(M, N, 4)`` (alpha passed
        through untouched), any other channel count (each channel restored as
        gray), with any leading axes (Z, T, ...) restored plane by plane. A
        dask array gives a lazy dask array back, computed chunk by chunk
        wherever dask computes it (threads, a dask.distributed cluster; see
        ``chunks``), with the numpy path's result. A
        ``numpy.ma`` masked array gives a masked array back, with the same
        mask: masked pixels are restored around (as NaN under
        ``nan_policy='keep'``) and keep their values.
    task : {None, 'auto', 'defocus', 'global_motion', 'local_motion', 'synth_global_motion', 'low_light'}
        None/'auto' lets the model recognise the blur; a name forces that expert.
    model : DeMoE, path or onnxruntime.InferenceSession, optional
        A loaded model or a checkpoint file. Default: the packaged model
        (loaded once per device). For dask input the tasks carry a reference
        to it: each process that computes them loads the packaged model or
        the file (which it must see) once per device; a model object is put
        on the workers of the active dask.distributed Client once, when
        ``deblur()`` is called (without a Client, threads share it).
        Or a session of a model exported by
        ``demoe export onnx``: onnxruntime runs the network (the same tiling,
        dtypes and routing; float32 on the session's providers, so no
        ``device``, and ``tlc`` only for tiles no larger than its window).
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
        None -> cuda, else mps, else cpu. For dask input None is decided
        where each chunk is computed: each dask.distributed worker picks its
        own (its GPU under dask-cuda), with that device's ``batch_size`` and
        ``precision`` unless they are given.
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
        tiles, device, precision, tile size, overlap, batch size, streams, seconds,
        ``tile_shape`` (the tiles actually used: the planner may shrink
        ``tile_size`` to fit the image) and ``computed`` (pixels the network
        computed per image pixel, the cost of overlap, margins and
        ``ensemble``); for dask input, as planned in the calling process (one
        stream per chunk). With ``routing='tile'`` on numpy
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
    chunks : {None, 'input'}
        Dask input only. The work is cut into chunks of a few whole tiles
        (the input's chunks rounded to whole tiles, 2 to 8 along each side),
        each tile computed once, in the chunk where it starts, and added to
        its neighbours' over the tile overlap (no more); None (default)
        gives the result in those chunks, ``'input'`` in the input's (as
        ``demoe deblur`` writes zarr stores).

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
    plan, inp = make_plan(image, task=task, model=model, channel_axis=channel_axis, tile_size=tile_size,
                          overlap=overlap, routing=routing, normalize=normalize, device=device, batch_size=batch_size,
                          streams=streams, bgr=bgr, preserve_mean=preserve_mean, tlc=tlc, precision=precision,
                          ensemble=ensemble, nan_policy=nan_policy, chunks=chunks)
    if inp.is_dask:
        if progress:
            warnings.warn("progress is not reported for dask input: the result is lazy and computed later; "
                          "wrap its computation in tqdm.dask.TqdmCallback() for a bar", RuntimeWarning, stacklevel=2)
        plan = dataclasses.replace(plan, streams=1)  # dask runs chunks in parallel: one tile stream each
        out, info = deblur_dask(inp.moved, plan, model=model, device=device, batch_size=batch_size,
                                precision=precision, chunks=chunks)
    else:
        out, info = _deblur_numpy(inp.network, plan, progress)
    out = inp.restored(out)
    info.update(plan.info(), seconds=time.perf_counter() - t0)
    return (out, info) if return_info else out


def _deblur_numpy(moved: np.ndarray, plan: DeblurPlan, progress) -> tuple[np.ndarray, dict]:
    """Restore a ``(..., H, W, C)`` array plane by plane."""
    net = plan.net
    *lead, h, w, c = moved.shape
    planes = moved.reshape(-1, h, w, c)
    out = np.empty_like(planes)
    if c == 4 and net.img_channel == 3:
        out[..., 3] = planes[..., 3]
    jobs = channel_jobs(c, net.img_channel, plan.bgr)
    summary = tiling.plan_summary(h, w, plan.tile, plan.overlap, plan.multiple)
    total = summary["tiles"] * len(jobs) * len(planes)
    report = None if progress is False or progress is None else _Progress(progress, total)
    records = []  # routing probabilities: one per plane and job (image routing) or per tile
    with tile_streams(plan.streams) as pool:
        for p, plane in enumerate(planes):
            for chans, mode in jobs:
                read = plane_reader(plane, chans, mode, plan)

                def write(y0, y1, block, p=p, chans=chans, mode=mode):
                    if mode == "gray" and net.img_channel == 3:
                        block = block.mean(axis=0, keepdims=True)
                    out[p][y0:y1, :, chans] = from_unit(block.transpose(1, 2, 0), plan.lo, plan.hi, out.dtype)

                first = len(records)  # this job's routing records start here
                weights = None
                if plan.routes_images:
                    probs = image_routing(read, h, w, plan, pool)
                    weights = torch.from_numpy(np.asarray(probs)).float().to(plan.device)[None]
                    records.append(probs)
                runner = Runner(net, plan.device, plan.task, weights, record=records, precision=plan.precision,
                                pool=pool, streams=plan.streams, ensemble=plan.ensemble, window=plan.window)
                tiling.stitch(read, runner, write, h, w, tile=plan.tile, overlap=plan.overlap,
                              multiple=plan.multiple, batch_size=plan.batch * plan.streams, progress=report)
                # The low-light expert is meant to change the exposure: by default, a plane where it
                # restored anything (the whole plane, or some of its tiles) keeps its new mean.
                used = experts_used(plan.task, records[first:], net)
                keep = plan.preserve_mean if plan.preserve_mean is not None else "low_light" not in used
                if keep:
                    match_mean(out[p], plane, chans)
    if report is not None:
        report.close()
    info = routing_info(plan.task, records, net)
    if plan.task is None and plan.routing == "tile":
        info["tile_tasks"] = dict(Counter(experts_used(None, records, net)).most_common())
    info.update(tiles=total, tile_shape=summary["tile_shape"], computed=summary["computed"] * plan.ensemble)
    return out.reshape(moved.shape), info


class _Progress:
    """Turns per-batch tile counts into ``(done, total)`` callbacks or (``progress=True``) a tqdm bar."""

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
