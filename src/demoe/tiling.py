"""Seam-free tile-and-stitch for any callable, in bounded memory.

Knows nothing about the network: it takes a function from a batch of tiles
``(B, C, th, tw)`` to a batch of the same shape, and stitches its outputs.

How it stays seam-free and small:

* Neighbouring tiles overlap by ``overlap`` pixels and blend there with
  raised-cosine ramps that sum to exactly one (a partition of unity): no weight
  buffer, no division, and the stitch of an identity function is the input. The
  image's own borders get no ramp: the first tile starts at pixel 0 and the last
  one ends at (or just past) the far border, so no tile is spent on context
  outside the image.
* Pixels a last tile reaches beyond the image (its side is rounded up to the
  network's size multiple) are read by reflection (``dcb|abcd|cba``), never zeros.
* Rows are finished band by band: once a row of tiles is done, the rows no
  later tile touches are handed to ``write`` and forgotten. Memory is one or
  two bands of float32 plus the batch, whatever the image height.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Axis:
    """The tiling of one axis: ``count`` tiles of ``tile`` px, ``stride`` apart,
    the first starting at pixel 0, the last ending at or past ``length``."""

    length: int
    tile: int
    overlap: int
    count: int

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def start(self, i: int) -> int:
        return i * self.stride

    @property
    def extent(self) -> int:
        """Pixels the tiles span, from 0 (at least ``length``)."""
        return (self.count - 1) * self.stride + self.tile


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_axis(length: int, tile: int, overlap: int, multiple: int = 1) -> Axis:
    """Fewest tiles (then the smallest tile, a multiple of ``multiple``) covering ``length``.

    ``n`` tiles of stride ``s`` span ``(n - 1) * s + tile = n * s + overlap``
    pixels, so we need ``n * s + overlap >= length``.
    """
    if length < 1:
        raise ValueError(f"cannot tile an axis of length {length}")
    if tile % multiple or tile <= 2 * overlap:
        raise ValueError(f"tile ({tile}) must be a multiple of {multiple} and more than twice the overlap ({overlap})")
    count = max(1, -(-(length - overlap) // (tile - overlap)))
    if count == 1:  # one tile: the whole axis, rounded up to the size multiple
        return Axis(length, min(tile, _round_up(length, multiple)), 0, 1)
    # Shrink the tile as far as the same count allows; a tile keeps room for both ramps.
    need = -(-(length - overlap) // count) + overlap
    small = max(_round_up(need, multiple), _round_up(2 * overlap, multiple))
    return Axis(length, min(tile, small), overlap, count)


def ramp(overlap: int) -> np.ndarray:
    """Rising raised-cosine of ``overlap`` samples; ``ramp + ramp[::-1] == 1``."""
    t = (np.arange(overlap) + 0.5) / max(overlap, 1)
    return (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)


def window_1d(axis: Axis, i: int) -> np.ndarray:
    """Blending weights of tile ``i``: ramps towards its neighbours, flat at the image borders."""
    w = np.ones(axis.tile, np.float32)
    if axis.overlap:
        r = ramp(axis.overlap)
        if i > 0:
            w[: axis.overlap] = r
        if i < axis.count - 1:
            w[-axis.overlap :] = r[::-1]
    return w


def reflect_index(idx: np.ndarray, length: int) -> np.ndarray:
    """Map any integer index into ``[0, length)`` by mirror reflection (no edge repeat)."""
    idx = np.asarray(idx)
    if length == 1:
        return np.zeros_like(idx)
    period = 2 * length - 2
    i = np.abs(idx) % period
    return np.where(i >= length, period - i, i)


def num_tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> int:
    return plan_axis(height, tile, overlap, multiple).count * plan_axis(width, tile, overlap, multiple).count


def stitch(
    read: Callable[[np.ndarray, np.ndarray], np.ndarray],
    fn: Callable[[np.ndarray], np.ndarray],
    write: Callable[[int, int, np.ndarray], None],
    height: int,
    width: int,
    *,
    tile: int,
    overlap: int,
    multiple: int = 1,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Run ``fn`` over overlapping tiles of an image and stitch the results.

    Parameters
    ----------
    read : callable (rows, cols) -> (C, len(rows), len(cols)) float32
        Returns the image at the given (already reflected, in-range) indices.
    fn : callable (B, C, th, tw) -> (B, C', th, tw)
        The per-tile operation; ``C'`` may differ from ``C``.
    write : callable (y0, y1, block)
        Receives finished rows ``[y0, y1)`` as a ``(C', y1 - y0, width)`` float32 block,
        top to bottom, each row exactly once.
    tile, overlap : int
        Tile size and overlap in pixels (``tile > 2 * overlap``).
    multiple : int
        Tile sides are multiples of this (the network's size divisor).
    batch_size : int
        Tiles per call of ``fn``.
    progress : callable (n), optional
        Called with the number of tiles finished after every batch.
    """
    ay = plan_axis(height, tile, overlap, multiple)
    ax = plan_axis(width, tile, overlap, multiple)
    wx = [window_1d(ax, j) for j in range(ax.count)]
    cols = [reflect_index(np.arange(ax.start(j), ax.start(j) + ax.tile), width) for j in range(ax.count)]

    carry = None  # the last `overlap` rows of the previous band, already weighted
    for i in range(ay.count):
        y0 = ay.start(i)
        rows = reflect_index(np.arange(y0, y0 + ay.tile), height)
        wy = window_1d(ay, i)[:, None]
        band = None
        for j0 in range(0, ax.count, batch_size):
            js = range(j0, min(j0 + batch_size, ax.count))
            batch = np.stack([read(rows, cols[j]) for j in js]).astype(np.float32, copy=False)
            out = np.asarray(fn(batch), dtype=np.float32)
            if band is None:
                band = np.zeros((out.shape[1], ay.tile, ax.extent), np.float32)
                if carry is not None:
                    band[:, : carry.shape[1]] += carry
            for k, j in enumerate(js):
                x0 = ax.start(j)
                band[:, :, x0 : x0 + ax.tile] += out[k] * (wy * wx[j][None, :])
            if progress is not None:
                progress(len(js))
        # Rows [y0, y0 + stride) get no more contributions (the last band: all of them).
        last = i == ay.count - 1
        hi = min(y0 + (ay.tile if last else ay.stride), height)
        if hi > y0:
            write(y0, hi, band[:, : hi - y0, :width])
        carry = None if last or not ay.overlap else band[:, ay.stride :].copy()
