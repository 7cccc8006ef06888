"""Seam-free tile-and-stitch for any callable, in bounded memory.

Knows nothing about the network: it takes a function from a batch of tiles
``(B, C, th, tw)`` to a batch of the same shape, and stitches its outputs.
:func:`tile_reader` reads the tiles of a plane in memory.

How it stays seam-free and small:

* The tile grid starts ``overlap`` pixels before the image and ends at least
  ``overlap`` after it, so every image pixel is covered by tiles whose
  raised-cosine windows sum to exactly one (a partition of unity): no weight
  buffer, no division, and the stitch of an identity function is the input.
* Pixels outside the image are read by reflection (``dcb|abcd|cba``), never
  zeros, so tiles at the border see plausible context.
* Rows are finished band by band: once a row of tiles is done, the rows no
  later tile touches are handed to ``write`` and forgotten. Memory is one or
  two bands of float32 plus the batch, whatever the image height.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ._arrays import to_unit

#: Largest tile value, in intensity ranges from the range (:func:`tile_reader`): beyond, float32
#: arithmetic overflows in the network.
INPUT_LIMIT = 1e20


@dataclass(frozen=True)
class Axis:
    """The tiling of one axis: ``count`` tiles of ``tile`` px, ``stride`` apart,
    the first starting at ``-overlap`` (virtual coordinates)."""

    length: int
    tile: int
    overlap: int
    count: int

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def start(self, i: int) -> int:
        return -self.overlap + i * self.stride

    def indices(self, first: int | None = None) -> list[np.ndarray]:
        """Every tile's indices into the axis, reflected into range (the grid stitching and routing share).

        The first tile starts at ``first``: by default ``-overlap``, the stitching
        grid; 0 starts it at the image's edge.
        """
        first = -self.overlap if first is None else first
        return [reflect_index(np.arange(first + i * self.stride, first + i * self.stride + self.tile), self.length)
                for i in range(self.count)]


def plan_axis(length: int, tile: int, overlap: int, multiple: int = 1) -> Axis:
    """Fewest tiles (then the smallest tile, a multiple of ``multiple``) covering ``length``.

    With ``n`` tiles of stride ``s`` the full-weight cover is ``[0, n*s - overlap)``,
    so we need ``n*s - overlap >= length``.
    """
    if length < 1:
        raise ValueError(f"cannot tile an axis of length {length}")
    if tile % multiple or tile <= 2 * overlap:
        raise ValueError(f"tile ({tile}) must be a multiple of {multiple} and more than twice the overlap ({overlap})")
    stride = tile - overlap
    count = -(-(length + overlap) // stride)
    # Shrink the tile as far as the same count allows (small images, last row).
    need = -(-(length + overlap) // count) + overlap  # smallest tile with count tiles
    small = max(-(-need // multiple) * multiple, 2 * overlap + multiple)
    tile = min(tile, small)
    return Axis(length, tile, overlap, count)


def fit_tile(tile: int, overlap: int, length: int, multiple: int = 1, least: int = 0) -> int:
    """The largest tile worth using on an image whose longest side is ``length``: ``tile``, or less.

    One tile covering the side with an overlap of up to the side itself at both ends
    (beyond that, the reflected context is the image again) is the most any tile
    can need; a larger one computes nothing more and costs memory. The cap is
    rounded up to ``multiple`` and is never below ``least``.
    """
    need = -(-(length + 2 * min(overlap, length)) // multiple) * multiple
    return min(tile, max(need, least))


def ramp(overlap: int) -> np.ndarray:
    """Rising raised-cosine of ``overlap`` samples; ``ramp + ramp[::-1] == 1``."""
    t = (np.arange(overlap) + 0.5) / max(overlap, 1)
    return (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)


def window_1d(axis: Axis) -> np.ndarray:
    w = np.ones(axis.tile, np.float32)
    if axis.overlap:
        r = ramp(axis.overlap)
        w[: axis.overlap] = r
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


def plan_summary(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> dict:
    """What tiling a ``height`` x ``width`` plane costs: the tile shape the planner
    chose (it may shrink the asked-for tile to fit), the tile count, and ``computed``,
    the pixels the tiles hold per image pixel (the price of overlap and margins)."""
    ay, ax = plan_axis(height, tile, overlap, multiple), plan_axis(width, tile, overlap, multiple)
    return {"tile_shape": (ay.tile, ax.tile), "tiles": ay.count * ax.count,
            "computed": ay.count * ay.tile * ax.count * ax.tile / (height * width)}


def num_tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> int:
    return plan_summary(height, width, tile, overlap, multiple)["tiles"]


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
    for i, band in enumerate(_bands(read, fn, ay, ax, ay.indices(), ax.indices(), batch_size, progress)):
        # Rows [y0, y0 + stride) get no more contributions; the rest is carried on.
        y0 = ay.start(i)
        lo, hi = max(y0, 0), min(y0 + ay.stride, height)
        if hi > lo:
            write(lo, hi, band[:, lo - y0 : hi - y0, ax.overlap : ax.overlap + width])


def tile_sum(
    read: Callable[[np.ndarray, np.ndarray], np.ndarray],
    fn: Callable[[np.ndarray], np.ndarray],
    ay: Axis,
    ax: Axis,
    *,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The tiles of the grid ``ay`` x ``ax``, windowed and summed, over all the rows and columns they cover.

    :func:`stitch` for a piece of a larger grid, computed apart from the
    rest (a dask chunk): each tile of the large grid is computed in the piece
    where it starts, and the sums of neighbouring pieces, which overlap by
    ``overlap`` pixels, add up to the stitched image. ``read`` gets indices
    from the piece's first tile on (tile ``i`` reads ``i * stride`` to
    ``i * stride + tile``); returns ``(C', ay.count * ay.stride + ay.overlap,
    ax.count * ax.stride + ax.overlap)`` float32.
    """
    def starts(axis):
        return [np.arange(i * axis.stride, i * axis.stride + axis.tile) for i in range(axis.count)]

    out = None
    for i, band in enumerate(_bands(read, fn, ay, ax, starts(ay), starts(ax), batch_size, progress)):
        if out is None:
            out = np.empty((band.shape[0], ay.count * ay.stride + ay.overlap, band.shape[2]), np.float32)
        out[:, i * ay.stride : (i + 1) * ay.stride] = band[:, : ay.stride]
    out[:, ay.count * ay.stride :] = band[:, ay.stride :]  # the last row of tiles' lower overlap
    return out


def _bands(read, fn, ay: Axis, ax: Axis, rows: list[np.ndarray], cols: list[np.ndarray], batch_size: int,
           progress) -> Iterator[np.ndarray]:
    """Each row of tiles (``rows[i]`` x every ``cols[j]``), windowed and summed with the rows the one above
    left unfinished: ``(C', ay.tile, vwidth)``, whose first ``ay.stride`` rows get nothing more."""
    window = window_1d(ay)[:, None] * window_1d(ax)[None, :]  # raised cosine, partition of unity
    vwidth = ax.count * ax.stride + ax.overlap  # the virtual columns the tiles cover
    carry = None  # the last `overlap` rows of the previous band, already weighted
    for row in rows:
        band = None
        for j0 in range(0, ax.count, batch_size):
            js = range(j0, min(j0 + batch_size, ax.count))
            batch = np.stack([read(row, cols[j]) for j in js]).astype(np.float32, copy=False)
            out = np.asarray(fn(batch), dtype=np.float32)
            if band is None:
                band = np.zeros((out.shape[1], ay.tile, vwidth), np.float32)
                if carry is not None:
                    band[:, : carry.shape[1]] += carry
            for k, j in enumerate(js):
                x0 = j * ax.stride
                band[:, :, x0 : x0 + ax.tile] += out[k] * window
            if progress is not None:
                progress(len(js))
        yield band
        carry = band[:, ay.stride :].copy() if ay.overlap else None


# -- reading tiles of a plane ---------------------------------------------------------------
def _as_slice(idx: np.ndarray) -> slice | None:
    """``idx`` as a slice when it is a run of consecutive indices, else None."""
    if idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return None


def crop(plane: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``plane[rows][:, cols]``; interior tiles are sliced, only border tiles gather reflected indices."""
    rs, cs = _as_slice(rows), _as_slice(cols)
    if rs is not None:
        return plane[rs, cs] if cs is not None else plane[rs][:, cols]
    if cs is not None:
        return plane[:, cs][rows]
    return plane[rows[:, None], cols[None, :]]


def tile_reader(plane: np.ndarray, channels: list[int], lo: float, hi: float, repeat: int = 1):
    """``read(rows, cols)`` for :func:`stitch`: the ``(C, h, w)`` float32 tile of an ``(H, W, C)`` plane.

    ``channels`` are taken in that order, intensities ``lo`` .. ``hi`` put at
    0 .. 1, tile by tile (never the whole plane at once), and each channel is
    repeated ``repeat`` times (gray for a colour network). ValueError for a
    tile with values beyond :data:`INPUT_LIMIT`.
    """
    def read(rows, cols):
        t = to_unit(crop(plane, rows, cols)[..., channels], lo, hi)
        if not np.abs(t).max() <= INPUT_LIMIT:  # inf once in float32, and NaN all over the tile after the network
            raise ValueError(f"some pixels lie over {INPUT_LIMIT:g} times the intensity range ({lo:g} to "
                             f"{hi:g}) away from it, too far for the network's float32 arithmetic; clip them "
                             "first (np.clip), or mark them as holes (NaN with nan_policy='keep', or a numpy.ma mask)")
        t = t.transpose(2, 0, 1)
        return np.repeat(t, repeat, axis=0) if repeat > 1 else t

    return read
