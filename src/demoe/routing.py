"""Which blur an image has: the router's probabilities per task, as ``deblur()`` estimates them.

With ``routing="image"`` (the default), ``deblur()`` routes every plane once,
from its most textured tiles, and restores all its tiles with that routing;
:func:`classify_blur` returns those probabilities without restoring anything.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import tiling
from ._arrays import AUTO, channel_jobs, without_holes
from ._plan import DeblurPlan, make_plan
from .devices import tile_streams
from .model import TASKS, DeMoE

#: Tiles used to estimate one routing for a whole image.
ROUTING_TILES = 8


def classify_blur(
    image,
    *,
    model: DeMoE | str | Path | None = None,
    channel_axis: int | None | str = AUTO,
    tile_size: int | None = None,
    overlap: int | None = None,
    normalize: str | tuple[float, float] = "auto",
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    streams: int | None = None,
    bgr: bool = False,
    tlc: bool | int = True,
    nan_policy: str = "raise",
) -> dict[str, float]:
    """Probabilities of each blur type in an image, as ``deblur()`` routes it.

    Parameters
    ----------
    image : ([P, ...,] M, N[, C]) array_like or dask array
        As for :func:`demoe.deblur`. The planes (and, for images with other
        than 3 or 4 channels, the channels) are routed one by one and their
        probabilities averaged; a dask array is routed from a central crop of
        its first plane, as ``deblur()`` routes it.
    model, channel_axis, tile_size, overlap, normalize, device, batch_size, streams, bgr, tlc, nan_policy
        As for :func:`demoe.deblur`: with the same arguments, ``deblur()``
        routes the image with exactly these probabilities.

    Returns
    -------
    dict
        Task name (:data:`demoe.TASKS`) -> probability; they sum to one.
        ``deblur(image, return_info=True)[1]["probabilities"]``, without
        restoring the image.

    Examples
    --------
    >>> import numpy as np
    >>> from demoe import classify_blur
    >>> photo = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    >>> probabilities = classify_blur(photo)
    >>> sorted(probabilities) == sorted(["defocus", "global_motion", "local_motion", "synth_global_motion",
    ...                                  "low_light"])
    True
    >>> round(sum(probabilities.values()), 6)
    1.0
    """
    plan, inp = make_plan(image, task=None, model=model, channel_axis=channel_axis, tile_size=tile_size,
                          overlap=overlap, routing="image", normalize=normalize, device=device, batch_size=batch_size,
                          streams=streams, bgr=bgr, preserve_mean=None, tlc=tlc, precision=AUTO, ensemble=1,
                          nan_policy=nan_policy, caller="classify_blur")
    if inp.is_dask:
        records = [lazy_image_routing(inp.moved, plan)]
    else:
        *_, h, w, c = inp.network.shape
        jobs = channel_jobs(c, plan.net.img_channel, plan.bgr)
        with tile_streams(plan.streams) as pool:
            records = [image_routing(plane_reader(plane, chans, mode, plan), h, w, plan, pool)
                       for plane in inp.network.reshape(-1, h, w, c) for chans, mode in jobs]
    return routing_info(None, records, plan.net)["probabilities"]


def plane_reader(plane: np.ndarray, chans: list[int], mode: str, plan: DeblurPlan):
    """The tiles of ``plane``'s channels ``chans`` as the network reads them: gray replicated to a colour network's
    three channels (:func:`demoe.tiling.tile_reader`)."""
    repeat = 3 if mode == "gray" and plan.net.img_channel == 3 else 1
    return tiling.tile_reader(plane, chans, plan.lo, plan.hi, repeat=repeat)


def image_routing(read: Callable, height: int, width: int, plan: DeblurPlan,
                  pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Routing weights for a whole image: the average over its most textured tiles.

    The tiles go through the router ``plan.batch`` at a time, spread over
    ``pool``'s threads when one is given, with the plan's pooling window.
    """
    tile, multiple = plan.tile, plan.multiple
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
            return plan.net.route(torch.from_numpy(part).to(plan.device), pool_window=plan.window).float().cpu().numpy()

    parts = np.array_split(chosen, -(-len(chosen) // (plan.batch or len(chosen))))
    probs = np.concatenate(list(pool.map(route, parts)) if pool is not None else [route(p) for p in parts])
    w = energy[order] + 1e-12
    return (probs * w[:, None]).sum(0) / w.sum()


def lazy_image_routing(moved, plan: DeblurPlan) -> np.ndarray:
    """One routing for a whole lazy ``(..., H, W, C)`` image, from a central crop of its first plane."""
    *lead, h, w, _ = moved.shape
    plane = moved[(0,) * len(lead)]
    ch, cw = min(h, 4 * plan.tile), min(w, 4 * plan.tile)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    crop = np.asarray(plane[y0 : y0 + ch, x0 : x0 + cw].compute())
    crop = without_holes(crop, plan.nan_policy)[0]
    chans, mode = channel_jobs(crop.shape[-1], plan.net.img_channel, plan.bgr)[0]
    return image_routing(plane_reader(crop, chans, mode, plan), crop.shape[0], crop.shape[1], plan)


def experts_used(task: str | None, records: list, net: DeMoE) -> list[str]:
    """The expert that restored each routed tile (its top routing weight), or the forced one."""
    if task is not None:
        return [task]
    names = TASKS[: net.num_exp]
    return [names[int(np.argmax(p))] for p in records]


def routing_info(task: str | None, records: list, net: DeMoE) -> dict:
    """``deblur()``'s routing report: probabilities per task (the mean of ``records``), the task used, forced."""
    names = TASKS[: net.num_exp]
    if task is not None:
        probs, used = np.eye(net.num_exp)[TASKS.index(task)], task
    elif records:
        probs = np.mean(records, axis=0)
        used = names[int(np.argmax(probs))]
    else:
        probs, used = np.full(net.num_exp, np.nan), None
    return {"probabilities": {n: float(p) for n, p in zip(names, probs)}, "task": used,
            "forced": task is not None}
