"""One ``deblur()`` call planned: its arguments checked once, its defaults resolved against the device,
the model and the image, into a frozen :class:`DeblurPlan`; the image laid out as the paths take it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import tiling
from ._arrays import (
    AUTO,
    channels_last,
    check_image,
    check_sizes,
    intensity_range,
    moveaxis,
    resolve_channel_axis,
    without_holes,
)
from .checkpoint import cached_model, load_model
from .devices import AUTO_PRECISION, DEFAULT_BATCH, DEFAULT_TILE, PRECISIONS, default_streams, resolve_device
from .model import DeMoE
from .onnx_model import OnnxDeMoE, is_session
from .tasks import ENSEMBLES, task_index


@dataclass(frozen=True)
class DeblurPlan:
    """Every setting of one ``deblur()`` call, checked, with its defaults filled in."""

    net: DeMoE | OnnxDeMoE  # OnnxDeMoE: an onnxruntime session of an exported DeMoE
    device: torch.device
    task: str | None  # the expert forced on every tile; None: the model routes
    routing: str  # "image": one routing per plane; "tile": every tile routed on its own
    tile: int  # tile side asked of the planner (pixels, a multiple of the network's size divisor)
    overlap: int
    batch: int  # tiles per network call, in each stream
    streams: int  # network calls at once, in threads
    bgr: bool
    lo: float  # intensities lo .. hi are 0 .. 1 for the network
    hi: float
    preserve_mean: bool | None  # None: on unless the low-light expert restored the plane
    window: int | None  # the local converter's pooling window; None: global pooling
    precision: str  # a key of devices.PRECISIONS
    ensemble: int
    nan_policy: str

    @property
    def multiple(self) -> int:
        """The network's size divisor: tile sides are multiples of it."""
        return self.net.padder_size

    @property
    def routes_images(self) -> bool:
        """One routing per plane (estimated from its most textured tiles) for all its tiles."""
        return self.task is None and self.routing == "image"

    def info(self) -> dict[str, Any]:
        """The settings ``deblur(return_info=True)`` reports."""
        return dict(device=str(self.device), precision=self.precision, ensemble=self.ensemble, tile_size=self.tile,
                    overlap=self.overlap, batch_size=self.batch, streams=self.streams, normalization=(self.lo, self.hi))


@dataclass(frozen=True)
class Input:
    """The image laid out ``(..., H, W, C)`` for the paths, and what gives a result the image's own layout."""

    image: Any  # as given
    moved: Any  # numpy or dask, channels last (a length-1 channel axis where there is none)
    network: Any  # what the network reads: for numpy, ``moved`` with its holes filled
    holes: np.ndarray | None  # numpy: pixels restored around and given back as they were
    axis: int | None  # the image's channel axis
    is_dask: bool

    def restored(self, out):
        """``out`` (laid out as :attr:`moved`) in the image's layout, holes and mask included."""
        if self.holes is not None:
            out[self.holes] = self.moved[self.holes]
        out = out[..., 0] if self.axis is None else moveaxis(out, -1, self.axis)
        if isinstance(self.image, np.ma.MaskedArray):
            mask = np.ma.getmask(self.image)
            out = np.ma.MaskedArray(out, mask=np.ma.nomask if mask is np.ma.nomask else mask.copy())
        return out


def make_plan(image, *, task, model, channel_axis, tile_size, overlap, routing, normalize, device, batch_size,
              streams, bgr, preserve_mean, tlc, precision, ensemble, nan_policy, chunks=None,
              caller: str = "deblur") -> tuple[DeblurPlan, Input]:
    """Check ``deblur()``'s arguments (one clear error for the first that is wrong) and plan the call."""
    arr, is_dask = check_image(image, caller)
    task = None if task == AUTO else task
    _check_options(task, routing, precision, ensemble, preserve_mean, nan_policy, is_dask, chunks)
    axis = resolve_channel_axis(arr.shape, channel_axis)
    if is_session(model):  # onnxruntime: its session's providers choose where it runs
        _check_session_options(device, precision)
        device = "cpu"
    dev = resolve_device(device)
    net = _network(model, dev)
    check_sizes(tile_size, overlap, batch_size, net.padder_size, streams)
    patch = int(net.metadata.get("patch_size", 0) or 0)  # training patch, if recorded
    longest = max([n for i, n in enumerate(arr.shape) if i != axis][-2:])
    tile, ovl = _tiles(tile_size, overlap, patch, longest, dev, net.padder_size)
    inp = _input(image, arr, axis, is_dask, nan_policy)
    lo, hi = intensity_range(inp.network, normalize)
    plan = DeblurPlan(net=net, device=dev, task=task, routing=routing, tile=tile, overlap=ovl,
                      batch=int(batch_size) if batch_size is not None else DEFAULT_BATCH.get(dev.type, 1),
                      streams=default_streams(dev) if streams is None else int(streams), bgr=bgr, lo=lo, hi=hi,
                      preserve_mean=preserve_mean, window=_window(tlc, patch, tile, isinstance(net, OnnxDeMoE)),
                      precision=AUTO_PRECISION.get(dev.type, "fp32") if precision == AUTO else precision,
                      ensemble=int(ensemble), nan_policy=nan_policy)
    return plan, inp


def _check_options(task, routing, precision, ensemble, preserve_mean, nan_policy, is_dask, chunks) -> None:
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
    if chunks is not None and (not isinstance(chunks, str) or chunks != "input"):
        raise ValueError(f"chunks must be None (the result in the chunks it is computed in) or 'input' (in the "
                         f"input's chunks), got {chunks!r}")
    if chunks is not None and not is_dask:
        raise ValueError("chunks='input' is for dask input (the chunks of a lazy result); this image is not a dask "
                         "array")


def _network(model, device: torch.device) -> DeMoE | OnnxDeMoE:
    """The model to run, on ``device``: the packaged default (loaded once per device), a checkpoint, as given,
    or an onnxruntime session of an exported DeMoE."""
    if model is None:
        return cached_model(None, device)
    if isinstance(model, (str, Path)):
        return load_model(model, device=device)
    if isinstance(model, DeMoE):
        return model.to(device).eval()
    if is_session(model):
        return OnnxDeMoE(model)
    raise TypeError(f"model must be a DeMoE, a checkpoint path, an onnxruntime.InferenceSession of an exported "
                    f"DeMoE or None, got {type(model).__name__}")


def _check_session_options(device, precision) -> None:
    """What a model run by onnxruntime cannot take: a device (its session chooses), autocast precisions."""
    if device not in (None, "auto", "cpu") and not (isinstance(device, torch.device) and device.type == "cpu"):
        raise ValueError(f"device={device!r} does not apply to an onnxruntime session: it runs on the execution "
                         "providers it was created with (e.g. InferenceSession(path, providers=[...]))")
    if precision not in (AUTO, "fp32"):
        raise ValueError(f"precision={precision!r} does not apply to an onnxruntime session: the exported graph "
                         "computes in float32 (precision='auto' or 'fp32')")


def _tiles(tile_size, overlap, patch: int, longest: int, device: torch.device, multiple: int) -> tuple[int, int]:
    """``(tile, overlap)``: as asked, or the device's defaults, and no larger than the image needs."""
    if tile_size is not None:
        tile = int(tile_size)
    else:  # the device's best size, but no smaller than the patches the model was trained on
        tile = max(DEFAULT_TILE.get(device.type, 256), patch)
    tile = -(-tile // multiple) * multiple
    ovl = int(overlap) if overlap is not None else tile // 8
    if 2 * ovl >= tile:
        raise ValueError(f"overlap ({ovl}) must be less than half the tile size ({tile})")
    # A tile beyond the image and its overlap adds nothing but memory (tile_size=200000 took 23 GB on 64 x 64).
    fitted = tiling.fit_tile(tile, ovl, longest, multiple, least=DEFAULT_TILE.get(device.type, 256))
    if fitted < tile:
        tile, ovl = fitted, (fitted // 8 if overlap is None else min(ovl, longest))
    return tile, ovl


def _input(image, arr, axis: int | None, is_dask: bool, nan_policy: str) -> Input:
    # Channels last, planes first: (P, H, W, C).
    moved = channels_last(arr, axis)
    # Masked pixels (numpy.ma) and, with nan_policy='keep', NaN/Inf: restored around, given back as they were.
    mask = np.ma.getmask(image) if isinstance(image, np.ma.MaskedArray) else np.ma.nomask
    masked = None if mask is np.ma.nomask else channels_last(np.broadcast_to(mask, arr.shape), axis)
    filled, holes = without_holes(moved, nan_policy, masked) if not is_dask else (moved, None)
    return Input(image=image, moved=moved, network=filled, holes=holes, axis=axis, is_dask=is_dask)


def _window(tlc, patch: int, tile: int, exported: bool = False) -> int | None:
    """The local converter's window for ``tlc``: None for the global pooling (``exported``: an exported graph,
    which pools globally, or a ValueError where a window would be used)."""
    if tlc is True:
        window = int(patch or 256)
    elif tlc is False or tlc is None:
        window = None
    elif isinstance(tlc, (int, np.integer)) and tlc > 0:
        window = int(tlc)
    else:
        raise ValueError(f"tlc must be True, False or a window size in pixels (> 0), got {tlc!r}")
    window = None if window is not None and window >= tile else window  # a window spanning every tile: global
    if exported and window is not None:
        raise ValueError(f"an exported DeMoE pools globally, but tiles of {tile} px would pool over {window} px "
                         f"(tlc): pass tlc=False, or tile_size={window} or less")
    return window
