"""Array work for ``deblur()``, without torch: input checks, the channel axis, intensity ranges,
holes (NaN/Inf and masked pixels), the dtype round trip and mean matching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

AUTO = "auto"
#: Percentiles for robust normalisation of 16-bit, integer and out-of-range float data.
PERCENTILES = (0.1, 99.9)


# -- validation ---------------------------------------------------------------------------
def check_image(image, caller: str = "deblur") -> tuple[Any, bool]:
    """``(array, is_dask)``: the image's array (a masked array's data); TypeError or ValueError for what
    ``deblur()`` (or the function named ``caller``) does not take."""
    if isinstance(image, (str, Path)):
        raise TypeError(f"{caller}() takes an image array, not a file name ({str(image)!r}): read it first, e.g. "
                        "with skimage.io.imread or tifffile.imread, or run `demoe deblur FILE`")
    if image is None:
        raise TypeError(f"{caller}() got None instead of an image array")
    is_dask = type(image).__module__.split(".")[0] == "dask"
    arr = image if is_dask else np.ma.getdata(image)  # a masked array's mask is taken by deblur()
    if is_dask and any(not np.isfinite(n) for n in arr.shape):
        raise ValueError(f"a dask array of unknown shape {arr.shape} (its chunk sizes are not known, e.g. after "
                         "boolean indexing); call .compute_chunk_sizes() on it first")
    kind = arr.dtype.kind
    if kind == "b":
        raise TypeError("boolean images are not supported; pass integer or floating-point data")
    if kind not in "uif":
        raise TypeError(f"unsupported dtype {arr.dtype}; accepted: unsigned/signed integers and floats")
    if arr.ndim < 2:
        raise ValueError("expected an image with at least 2 dimensions ((H, W), (H, W, C), (..., H, W[, C])), "
                         f"got shape {arr.shape}")
    if any(s == 0 for s in arr.shape):
        raise ValueError(f"image has a size-0 axis: shape {arr.shape}")
    return arr, is_dask


def resolve_channel_axis(shape, channel_axis) -> int | None:
    """``channel_axis`` (an axis, None or 'auto') as a non-negative axis of ``shape``, or None."""
    if channel_axis == AUTO:
        return len(shape) - 1 if len(shape) >= 3 and shape[-1] in (3, 4) else None
    if channel_axis is None:
        return None
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise ValueError(f"channel_axis must be an axis number, None or 'auto', got {channel_axis!r}")
    if not -len(shape) <= channel_axis < len(shape):
        raise ValueError(f"channel_axis={channel_axis!r} is out of range for an image of {len(shape)} dimensions "
                         f"{tuple(shape)}")
    axis = int(channel_axis) % len(shape)
    if len(shape) < 3:  # a channel axis needs two spatial axes beside it
        raise ValueError(f"channel_axis={channel_axis} leaves fewer than 2 spatial axes in shape {tuple(shape)}")
    return axis


def check_sizes(tile_size, overlap, batch_size, multiple, streams=None):
    """ValueError naming the first of these options that is given and is not a whole number in its range."""
    for name, value, least, what in (("streams", streams, 1, "a positive integer"),
                                      ("tile_size", tile_size, multiple,
                                       f"an integer >= {multiple} (the network's size divisor)"),
                                      ("overlap", overlap, 0, "a non-negative integer"),
                                      ("batch_size", batch_size, 1, "a positive integer")):
        if value is not None and not _whole(value, least):
            raise ValueError(f"{name} must be {what}, got {value!r}")


def _whole(value, least: int) -> bool:
    """``value`` is a whole number (an int, or a float without fraction; not a bool, NaN or inf) >= ``least``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        return False
    if isinstance(value, (float, np.floating)) and not (np.isfinite(value) and float(value).is_integer()):
        return False
    return value >= least


# -- intensities ----------------------------------------------------------------------------
def intensity_range(arr, normalize) -> tuple[float, float]:
    """``(lo, hi)`` such that ``(x - lo) / (hi - lo)`` puts the data in [0, 1]."""
    if isinstance(normalize, (tuple, list, np.ndarray)):
        try:
            lo, hi = (float(v) for v in normalize)
        except (TypeError, ValueError):
            raise ValueError(f"normalize=(low, high) takes two numbers, got {normalize!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"normalize=(low, high) needs finite numbers with low < high, got {normalize!r}")
        return lo, hi
    elif normalize == "none":
        lo, hi = 0.0, 1.0
    elif normalize == "range":
        lo, hi = (0.0, float(np.iinfo(arr.dtype).max)) if arr.dtype.kind in "ui" else (0.0, 1.0)
    elif normalize in ("auto", "percentile"):
        if normalize == "auto" and arr.dtype == np.uint8:
            return 0.0, 255.0
        sample = _sample(arr)
        finite = sample[np.isfinite(sample)]
        if normalize == "auto" and arr.dtype.kind == "f" and finite.size and finite.min() >= 0 and finite.max() <= 1:
            return 0.0, 1.0
        lo, hi = (float(v) for v in np.percentile(finite, PERCENTILES)) if finite.size else (0.0, 1.0)
    else:
        raise ValueError("normalize must be 'auto', 'percentile', 'range', 'none' or a (low, high) pair, "
                         f"got {normalize!r}")
    if not hi > lo:
        hi = lo + 1.0  # constant image: any scale restores it unchanged
    if not max(abs(lo), abs(hi)) <= 1e300:  # sums and the inverse mapping would overflow float64
        raise ValueError(f"the image's intensities ({lo:g} to {hi:g}) are too near float64's limit (1.8e308) "
                         "to restore; rescale it first")
    return lo, hi


def _sample(arr, max_elements: int = 4_000_000) -> np.ndarray:
    """A strided subsample, computed eagerly (cheap even for dask/zarr)."""
    step = max(1, int(np.ceil((arr.size / max_elements) ** (1 / arr.ndim))))
    sub = arr[(slice(None, None, step),) * arr.ndim]
    return np.asarray(sub.compute() if hasattr(sub, "compute") else sub, dtype=np.float64)


def to_unit(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``x`` as float32 with intensities ``lo`` .. ``hi`` at 0 .. 1 (scaled in :func:`float_for`'s type)."""
    ftype = float_for(x.dtype)
    return ((x.astype(ftype) - ftype(lo)) * ftype(1.0 / (hi - lo))).astype(np.float32, copy=False)


def from_unit(y: np.ndarray, lo: float, hi: float, dtype: np.dtype) -> np.ndarray:
    """The inverse of :func:`to_unit`: float ``y`` back to intensities in ``dtype`` (integers rounded and clipped)."""
    ftype = float_for(dtype)
    return to_dtype(y / ftype(1.0 / (hi - lo)) + ftype(lo), dtype)


def to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float ``x`` as ``dtype``: integers rounded and clipped to the type's range."""
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        # The limit as x's float: the largest not above the maximum (float32(2**63) would wrap to -2**63).
        top = x.dtype.type(info.max)
        if int(top) > info.max:
            top = np.nextafter(top, x.dtype.type(0))
        return np.clip(np.rint(x), info.min, top).astype(dtype)
    return x.astype(dtype, copy=False)


def float_for(dtype: np.dtype):
    """The float type intensities are scaled in: float64 for 64-bit data (float64 may lie beyond float32's
    3.4e38; 64-bit integers need its precision), float32 otherwise (the network's own)."""
    return np.float64 if np.dtype(dtype).itemsize == 8 else np.float32


# -- holes: NaN/Inf and masked pixels -------------------------------------------------------
def check_finite(arr):
    """ValueError counting the NaN/Inf of a float array."""
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise ValueError(f"image contains {bad} NaN or infinite value(s); pass nan_policy='keep' to restore the "
                             "pixels around them and keep them as they are, or replace them (e.g. np.nan_to_num) first")


def finite_chunk(block: np.ndarray, block_info=None) -> np.ndarray:
    """``block`` as it is, or ValueError counting its NaN/Inf (checked before neighbours borrow its pixels)."""
    bad = int(np.count_nonzero(~np.isfinite(block)))
    if bad:
        where = ""
        if block_info:
            (y0, y1), (x0, x1) = block_info[0]["array-location"][-3:-1]
            where = f" in its chunk at rows {y0}-{y1 - 1}, columns {x0}-{x1 - 1}"
        raise ValueError(f"image contains {bad} NaN or infinite value(s){where} (lazy input is checked chunk by "
                         "chunk, as it is computed); pass nan_policy='keep' to restore the pixels around them "
                         "and keep them as they are, or replace them (e.g. da.nan_to_num) first")
    return block


#: Gaussian sigma (pixels) of the normalised convolution that fills non-finite pixels.
FILL_SIGMA = 4.0


def find_holes(arr: np.ndarray, nan_policy: str, mask: np.ndarray | None = None) -> np.ndarray | None:
    """Pixels to restore around rather than from: masked ones, and NaN/Inf under ``nan_policy='keep'``."""
    holes = mask if mask is not None and mask.any() else None
    if nan_policy == "keep" and arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            holes = bad if holes is None else holes | bad
    return holes


def without_holes(arr: np.ndarray, nan_policy: str,
                  mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(array for the network, holes or None)``: the holes filled, and no NaN/Inf left (else ValueError)."""
    holes = find_holes(arr, nan_policy, mask)
    filled = arr if holes is None else fill_holes(arr, holes)
    check_finite(filled)
    return filled, holes


def fill_holes(arr: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """A copy of a ``(..., H, W, C)`` array with ``holes`` filled for the network.

    Each hole gets a smooth continuation of the pixels around it (a normalised
    Gaussian convolution), and the plane's median far from any, so the
    network sees no hole edge to sharpen; the caller puts the original values
    back into the result.
    """
    import cv2

    filled = arr.astype(float_for(arr.dtype))  # a copy: the input is never modified
    flat, flat_holes = filled.reshape(-1, *arr.shape[-3:]), holes.reshape(-1, *arr.shape[-3:])
    for p in range(flat.shape[0]):
        for ch in range(flat.shape[-1]):
            x, hole = flat[p, :, :, ch], flat_holes[p, :, :, ch]
            if not hole.any():
                continue
            good = ~hole
            if not good.any():
                x[:] = 0.0
                continue
            x[hole] = 0.0
            num = cv2.GaussianBlur(x, (0, 0), FILL_SIGMA, borderType=cv2.BORDER_REFLECT)
            den = cv2.GaussianBlur(good.astype(np.float32), (0, 0), FILL_SIGMA, borderType=cv2.BORDER_REFLECT)
            far = den < 1e-3
            x[hole] = np.where(far, np.median(x[good]), num / np.where(far, 1.0, den))[hole]
    return filled.astype(arr.dtype, copy=False) if arr.dtype.kind == "f" else to_dtype(filled, arr.dtype)


# -- layout and mean -------------------------------------------------------------------------
def channels_last(a, axis: int | None):
    """``(..., H, W, C)``: the channel axis moved last, or a length-1 one added where there is none."""
    return a[..., None] if axis is None else moveaxis(a, axis, -1)


def moveaxis(a, src, dst):
    """``np.moveaxis``, or dask's for a dask array."""
    if hasattr(a, "compute"):
        import dask.array as da

        return da.moveaxis(a, src, dst)
    return np.moveaxis(a, src, dst)


def channel_jobs(channels: int, model_channels: int, bgr: bool) -> list[tuple[list[int], str]]:
    """How the channels of one plane are restored: lists of channel indices and a mode."""
    rgb = [2, 1, 0] if bgr else [0, 1, 2]
    if model_channels == 3 and channels in (3, 4):
        return [(rgb, "rgb")]  # alpha (channel 3) is passed through
    return [([c], "gray") for c in range(channels)]


def match_mean(out: np.ndarray, src: np.ndarray, chans: list[int], rows: int = 1024) -> None:
    """Shift ``out[..., chans]`` (in place) so its mean equals ``src[..., chans]``'s.

    Works in blocks of rows, so memory stays small on gigapixel planes.
    """
    n = src.shape[0] * src.shape[1] * len(chans)
    total_in = sum(float(src[y : y + rows][..., chans].sum(dtype=np.float64)) for y in range(0, src.shape[0], rows))
    total_out = sum(float(out[y : y + rows][..., chans].sum(dtype=np.float64)) for y in range(0, out.shape[0], rows))
    shift = (total_in - total_out) / n
    if abs(shift) < 1e-12:
        return
    for y in range(0, out.shape[0], rows):
        ftype = float_for(out.dtype)
        block = out[y : y + rows][..., chans].astype(ftype) + ftype(shift)
        out[y : y + rows, :, chans] = to_dtype(block, out.dtype)
