"""``deblur()`` on dask arrays: chunks of whole tiles, restored wherever dask runs them.

The numpy path's tile grid is cut into chunks of a few whole tiles each
(:func:`chunk_bounds`), and every tile is computed once, in the chunk where
it starts. Stage 1 gives each chunk its tiles' windowed sum (the chunk,
``overlap`` pixels of its upper and left neighbours and the image's mirrored
margins in; a sum ``overlap`` pixels larger than the chunk on each side out);
stage 2 adds, where neighbouring sums overlap, the ``overlap`` pixels of the
next chunk down and right; stage 3 maps the result to the input's
intensities and dtype. That is the numpy path's stitching split at tile
borders: the same tiles and windows, the same result but for the order of
float32 additions, with nothing computed twice.

The tasks carry the model by reference (:class:`ModelRef`), and the device,
tiles per batch and precision as asked: a process that runs them (a
dask.distributed worker) loads the model once per device
(:func:`demoe.checkpoint.cached_model`), on the device it picks itself, and
runs torch on the threads dask gives it (:func:`demoe.devices.chunk_threads`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import tiling
from ._arrays import AUTO, channel_jobs, finite_chunk, from_unit, without_holes
from ._plan import DeblurPlan
from ._runner import Runner
from .checkpoint import cached_model, checkpoint_file, registered_model
from .devices import AUTO_PRECISION, DEFAULT_BATCH, chunk_threads, resolve_device
from .model import DeMoE
from .routing import lazy_image_routing, plane_reader, routing_info

#: glibc malloc's trim and mmap thresholds for the chunk tasks on a dask.distributed worker. dask's nanny
#: starts workers with MALLOC_TRIM_THRESHOLD_=65536 (freed memory handed back to the system at once), which
#: also pins glibc's mmap threshold at 128 KiB: every large tensor then comes fresh from the kernel, and
#: deblur() ran half as fast there (7x the page faults). These are about what glibc's own dynamic
#: thresholds rise to; with them a worker ran as fast as a process without the setting.
MALLOC_THRESHOLDS = {"trim": 64 * 2**20, "mmap": 32 * 2**20}
_malloc_set: dict[str, int] | None = None  # what this process set, once

#: Tiles along each side of a chunk: the input's chunks rounded to whole tiles, then at least the first
#: (smaller chunks cost more in tasks and borders passed between them than they gain) and at most the
#: second (larger ones hold more memory per task and give dask fewer to spread over its threads).
CHUNK_TILES = (2, 8)


def chunk_bounds(axis: tiling.Axis, chunk: int) -> tuple[int, ...]:
    """Where the chunks of one image axis start, and its end: each a whole number of tiles of ``axis`` (a
    multiple of its stride), about ``chunk`` pixels but :data:`CHUNK_TILES` tiles at least and at most, and
    as even as the tile count allows (the last chunk ends with the image)."""
    want = min(max(round(chunk / axis.stride), CHUNK_TILES[0]), CHUNK_TILES[1])
    pieces = -(-axis.count // want)
    each = -(-axis.count // pieces) * axis.stride
    return (0, *[k * each for k in range(1, pieces) if k * each < axis.length], axis.length)


@dataclass(frozen=True)
class Grid:
    """The numpy path's tile grid on a plane (``rows`` x ``cols``), and the chunk bounds that cut it."""

    rows: tiling.Axis
    cols: tiling.Axis
    row_bounds: tuple[int, ...]
    col_bounds: tuple[int, ...]

    def piece(self, dim: int, k: int) -> tiling.Axis:
        """The tiles of chunk ``k`` along ``dim`` (0: rows, 1: columns): those that start in it."""
        axis, bounds = (self.rows, self.row_bounds) if dim == 0 else (self.cols, self.col_bounds)
        first = bounds[k] // axis.stride
        last = bounds[k + 1] // axis.stride if k + 2 < len(bounds) else axis.count
        n = last - first
        return tiling.Axis(n * axis.stride + axis.overlap, axis.tile, axis.overlap, n)

    def sums(self, dim: int) -> tuple[int, ...]:
        """The sizes of the chunks' tile sums along ``dim``: their tiles and the overlap after the last."""
        return tuple(self.piece(dim, k).length for k in range(len(self.row_bounds if dim == 0 else self.col_bounds)
                                                             - 1))

    def margins(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """The image indices the tiles read before and after the image along ``dim``, mirrored into it."""
        axis = self.rows if dim == 0 else self.cols
        return (tiling.reflect_index(np.arange(-axis.overlap, 0), axis.length),
                tiling.reflect_index(np.arange(axis.length, axis.count * axis.stride), axis.length))


class ModelRef:
    """The model as chunk tasks carry it: a name where there is one, each process that runs them loading
    the model once per device.

    ``kind``: ``'packaged'`` (the packaged weights), ``'file'`` (a checkpoint
    file, ``name`` its path: the workers must see it, e.g. on a shared
    file system), ``'registered'`` (a model put on a dask.distributed
    cluster's workers as ``name`` by :func:`demoe._cluster.share_model`) or
    ``'object'`` (nothing names it: the model travels whole, pickled into
    every task). Within the process that made it, the model itself is used.
    """

    def __init__(self, kind: str, name: str | None = None, model: DeMoE | None = None, device: str | None = None):
        self.kind, self.name, self.model, self.device = kind, name, model, device

    def __reduce__(self):
        if self.kind == "object":
            return ModelRef, (self.kind, None, self.model, self.device)
        return ModelRef, (self.kind, self.name)

    def __repr__(self):
        return f"ModelRef({self.kind!r}, {self.name!r})"

    def get(self, device: torch.device) -> DeMoE:
        """The model on ``device``."""
        if self.model is not None and str(device) == self.device:
            return self.model
        if self.kind == "packaged":
            return cached_model(None, device)
        if self.kind == "file":
            try:
                return cached_model(self.name, device)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"checkpoint not found where this chunk is computed: {self.name} (deblur() saw it, but each "
                    f"dask.distributed worker loads it itself: {_where()} does not see that path); put it on a "
                    "file system the workers share, at the same absolute path, or pass the model instead "
                    "(model=demoe.load_model(path), with the Client active: it is sent to the workers)") from None
        if self.kind == "registered":
            return registered_model(self.name, device)
        self.device = str(device)  # a copy of its own (unpickled): moved once
        return self.model.to(device).eval()


def model_ref(model, plan: DeblurPlan) -> ModelRef:
    """How chunk tasks carry ``deblur()``'s ``model`` argument (loaded as ``plan.net``)."""
    device = str(plan.device)
    if model is None:
        return ModelRef("packaged", None, plan.net, device)
    if isinstance(model, (str, Path)):
        return ModelRef("file", str(checkpoint_file(Path(model).resolve())), plan.net, device)
    client = _active_client()
    if client is not None and not getattr(client, "asynchronous", False):
        from ._cluster import share_model

        return ModelRef("registered", share_model(client, plan.net), plan.net, device)
    return ModelRef("object", None, plan.net, device)


def _where() -> str:
    """This process as an error names it: its dask.distributed worker, or its host."""
    import socket

    distributed = sys.modules.get("distributed")
    try:
        return f"worker {distributed.get_worker().address}"
    except (AttributeError, ValueError):
        return f"process {os.getpid()} on {socket.gethostname()}"


def _active_client():
    """The dask.distributed Client that computes dask collections now, or None (distributed not imported)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.default_client()
    except ValueError:
        return None


@dataclass(frozen=True)
class ChunkPlan:
    """A :class:`DeblurPlan` as chunk tasks carry it: the model by reference, and the device, tiles per
    batch and precision as asked (None, ``'auto'``: the defaults of the device the task picks)."""

    model: ModelRef
    device: str | None
    batch: int | None
    precision: str
    settings: tuple[tuple[str, Any], ...]  # the plan's other fields

    @classmethod
    def of(cls, plan: DeblurPlan, model: ModelRef, device, batch_size, precision) -> ChunkPlan:
        own = ("net", "device", "batch", "precision")
        settings = tuple((f.name, getattr(plan, f.name)) for f in dataclasses.fields(plan) if f.name not in own)
        asked = None if device is None or device == AUTO else str(plan.device)  # checked on the client
        return cls(model, asked, None if batch_size is None else plan.batch, precision, settings)

    def plan(self) -> DeblurPlan:
        """The plan where the task runs: its device (``device=None``: its own choice) and the model there."""
        device = resolve_device(self.device)
        batch = self.batch if self.batch is not None else DEFAULT_BATCH.get(device.type, 1)
        precision = AUTO_PRECISION.get(device.type, "fp32") if self.precision == AUTO else self.precision
        return DeblurPlan(net=self.model.get(device), device=device, batch=batch, precision=precision,
                          **dict(self.settings))


def deblur_dask(moved, plan: DeblurPlan, *, model, device, batch_size, precision, chunks) -> tuple[Any, dict]:
    """Restore a lazy ``(..., H, W, C)`` array; ``model``, ``device``, ``batch_size``, ``precision`` as
    ``deblur()`` got them (the tasks settle the defaults where they run); ``chunks='input'``: the result in
    the input's chunks."""
    import dask.array as da

    *lead, h, w, c = moved.shape
    dy, dx = moved.ndim - 3, moved.ndim - 2
    ovl = plan.overlap
    ay, ax = (tiling.plan_axis(n, plan.tile, ovl, plan.multiple) for n in (h, w))
    grid = Grid(ay, ax, chunk_bounds(ay, moved.chunksize[dy]), chunk_bounds(ax, moved.chunksize[dx]))
    if plan.nan_policy == "raise" and moved.dtype.kind == "f":  # in the input's chunks, each pixel counted once
        moved = moved.map_blocks(finite_chunk, dtype=moved.dtype)
    # One plane per chunk, the channels whole, whole tiles along the image's sides.
    x = moved.rechunk({**dict.fromkeys(range(len(lead)), 1), dy: tuple(np.diff(grid.row_bounds)),
                       dx: tuple(np.diff(grid.col_bounds)), moved.ndim - 1: -1})
    probs = lazy_image_routing(x, plan) if plan.routes_images else None
    jobs = channel_jobs(c, plan.net.img_channel, plan.bgr)
    info = routing_info(plan.task, [] if probs is None else [probs], plan.net)
    info.update(tiles=ay.count * ax.count * len(jobs) * int(np.prod(lead, dtype=np.int64)),
                tile_shape=(ay.tile, ax.tile),
                computed=ay.count * ay.tile * ax.count * ax.tile / (h * w) * plan.ensemble)
    # What the tiles read: the image and its mirrored margins, a chunk each the pixels its tiles start in.
    space = x
    for dim, k in ((dy, 0), (dx, 1)):
        before, after = grid.margins(k)
        parts = [da.take(space, before, axis=dim), space, da.take(space, after, axis=dim)]
        space = da.concatenate([part for part in parts if part.shape[dim]], axis=dim)
        sizes = list(grid.sums(k))
        sizes[1:] = [n - ovl for n in sizes[1:]]  # each after the first gets its overlap from the one before
        space = space.rechunk({dim: tuple(sizes)})
    spec = ChunkPlan.of(plan, model_ref(model, plan), device, batch_size, precision)
    depth = dict.fromkeys(range(moved.ndim), 0)
    sums = da.map_overlap(_tile_sums, space, depth={**depth, dy: (ovl, 0), dx: (ovl, 0)}, boundary="none",
                          trim=False, chunks=(*space.chunks[:dy], grid.sums(0), grid.sums(1), space.chunks[-1]),
                          dtype=np.float32, spec=spec, probs=probs, grid=grid, jobs=jobs)
    stitched = da.map_overlap(_add_neighbours, sums, depth={**depth, dy: (0, ovl), dx: (0, ovl)}, boundary="none",
                              trim=False, chunks=x.chunks, dtype=np.float32, overlap=ovl)
    alpha = c == 4 and plan.net.img_channel == 3
    out = da.map_blocks(_to_image, stitched, x, dtype=x.dtype, lo=plan.lo, hi=plan.hi, alpha=alpha,
                        nan_policy=plan.nan_policy)
    if chunks == "input":
        out = out.rechunk(moved.chunks)
    return out, info


def _tile_sums(space: np.ndarray, *, spec: ChunkPlan, probs, grid: Grid, jobs, block_info=None) -> np.ndarray:
    """Stage 1: the windowed sum of the tiles that start in this chunk (``space``: the pixels they read)."""
    where = block_info[0]["chunk-location"]
    ay, ax = grid.piece(0, where[-3]), grid.piece(1, where[-2])
    _malloc_for_torch()
    plan = spec.plan()
    net = plan.net
    sums = np.zeros(space.shape, np.float32)
    with chunk_threads():
        filled, _ = without_holes(space, plan.nan_policy)
        weights = None if probs is None else torch.from_numpy(np.asarray(probs)).float().to(plan.device)[None]
        runner = Runner(net, plan.device, plan.task, weights, precision=plan.precision, ensemble=plan.ensemble,
                        window=plan.window)
        for p in np.ndindex(*space.shape[:-3]):
            for chans, mode in jobs:
                total = tiling.tile_sum(plane_reader(filled[p], chans, mode, plan), runner, ay, ax,
                                        batch_size=plan.batch)
                if mode == "gray" and net.img_channel == 3:
                    total = total.mean(axis=0, keepdims=True)
                sums[p][..., chans] = total.transpose(1, 2, 0)
    return sums


def _malloc_for_torch() -> None:
    """On a dask.distributed worker whose MALLOC_TRIM_THRESHOLD_ is below :data:`MALLOC_THRESHOLDS`' (dask's
    nanny sets 64 KiB), raise glibc's trim and mmap thresholds to them, once per process."""
    global _malloc_set
    if _malloc_set is not None:
        return
    _malloc_set = {}
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = int(os.environ["MALLOC_TRIM_THRESHOLD_"])
        sys.modules["distributed"].get_worker()
        mallopt = ctypes.CDLL(None).mallopt  # glibc (Linux); elsewhere there is no such setting to undo
    except (KeyError, ValueError, AttributeError, OSError):
        return
    if trim < MALLOC_THRESHOLDS["trim"]:
        for name, option in (("trim", -1), ("mmap", -3)):  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
            if mallopt(option, MALLOC_THRESHOLDS[name]) == 1:
                _malloc_set[name] = MALLOC_THRESHOLDS[name]


def _add_neighbours(sums: np.ndarray, *, overlap: int, block_info=None) -> np.ndarray:
    """Stage 2: a chunk's pixels, its tile sum plus where they overlap, the next chunks' (down, right)."""
    here, count = block_info[0]["chunk-location"], block_info[0]["num-chunks"]
    shape = block_info[None]["chunk-shape"]
    for dim in (-3, -2):
        n = shape[dim]
        if here[dim] + 1 < count[dim]:  # the first `overlap` rows (columns) of the next chunk's sum follow
            own = np.moveaxis(sums, dim, 0)
            own[n : n + overlap] += own[n + overlap :]
        sums = np.moveaxis(np.moveaxis(sums, dim, 0)[overlap : overlap + n], 0, dim)
    return sums


def _to_image(stitched: np.ndarray, block: np.ndarray, *, lo: float, hi: float, alpha: bool,
              nan_policy: str) -> np.ndarray:
    """Stage 3: the restored chunk in the input's intensities and dtype; alpha and holes as they were."""
    out = from_unit(stitched, lo, hi, block.dtype)
    if alpha:
        out[..., 3] = block[..., 3]
    if nan_policy == "keep" and block.dtype.kind == "f":
        holes = ~np.isfinite(block)
        out[holes] = block[holes]
    return out
