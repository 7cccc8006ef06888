import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from demoe.tiling import num_tiles, plan_axis, ramp, reflect_index, stitch


def _run(img, fn, tile, overlap, multiple=4, batch_size=3, progress=None):
    c, h, w = img.shape
    out = np.full((c if fn is None else fn(img[None]).shape[1], h, w), np.nan, np.float32)
    written = []

    def write(y0, y1, block):
        written.append((y0, y1))
        out[:, y0:y1] = block

    stitch(lambda r, cc: img[:, r[:, None], cc[None, :]], fn, write, h, w, tile=tile, overlap=overlap,
           multiple=multiple, batch_size=batch_size, progress=progress)
    return out, written


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 90), w=st.integers(1, 90), tile=st.sampled_from([16, 24, 32, 64]),
       ovl=st.integers(0, 7), batch=st.integers(1, 5))
def test_identity_stitch_is_exact_and_rows_written_once(h, w, tile, ovl, batch):
    img = np.random.default_rng(h * 100 + w).random((2, h, w), dtype=np.float32)
    out, written = _run(img, lambda b: b, tile, ovl, batch_size=batch)
    np.testing.assert_allclose(out, img, atol=1e-6)
    rows = [r for y0, y1 in written for r in range(y0, y1)]
    assert rows == list(range(h))  # top to bottom, each row exactly once


def test_windows_are_a_partition_of_unity():
    for o in (1, 2, 8, 31):
        r = ramp(o)
        np.testing.assert_allclose(r + r[::-1], 1.0, atol=1e-7)
        assert np.all(np.diff(r) > 0) and r[0] > 0


def test_channel_count_may_change():
    img = np.random.default_rng(0).random((1, 40, 50), dtype=np.float32)
    out, _ = _run(img, lambda b: np.repeat(b, 3, axis=1) * 2, 16, 4)
    np.testing.assert_allclose(out, np.repeat(img, 3, axis=0) * 2, atol=1e-6)


def test_pointwise_function_matches_whole_image():
    img = np.random.default_rng(1).random((3, 70, 45), dtype=np.float32)
    out, _ = _run(img, lambda b: np.tanh(3 * b) + b**2, 32, 8)
    np.testing.assert_allclose(out, np.tanh(3 * img) + img**2, atol=1e-5)


def test_border_context_is_reflective():
    # A tile function that reports the mean of its tile: at the borders the tile
    # sees mirrored pixels, never zeros, so a constant image stays constant.
    img = np.full((1, 50, 50), 0.7, np.float32)
    out, _ = _run(img, lambda b: np.broadcast_to(b.mean(axis=(1, 2, 3), keepdims=True), b.shape), 32, 8)
    np.testing.assert_allclose(out, 0.7, atol=1e-6)


def test_tile_sizes_are_multiples_and_cover():
    for length in (1, 5, 63, 64, 65, 200, 1000):
        for tile, ovl in ((64, 16), (256, 32), (48, 0)):
            ax = plan_axis(length, tile, ovl, 16)
            assert ax.tile % 16 == 0 and ax.tile <= max(tile, 2 * ovl + 16)
            assert ax.count * ax.stride - ovl >= length  # full-weight cover of the image
            assert (ax.count - 1) * ax.stride - ovl < length  # and no wasted tile


def test_progress_counts_every_tile():
    img = np.zeros((1, 100, 130), np.float32)
    seen = []
    _run(img, lambda b: b, 32, 8, batch_size=4, progress=seen.append)
    assert sum(seen) == num_tiles(100, 130, 32, 8, 4)


def test_reflect_index():
    np.testing.assert_array_equal(reflect_index(np.arange(-3, 8), 5), [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1])
    np.testing.assert_array_equal(reflect_index(np.arange(-2, 3), 1), [0, 0, 0, 0, 0])
    big = reflect_index(np.arange(-50, 50), 3)
    assert big.min() == 0 and big.max() == 2


def test_bad_parameters():
    with pytest.raises(ValueError, match="more than twice the overlap"):
        plan_axis(100, 32, 16, 4)
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_axis(100, 40, 8, 16)
    with pytest.raises(ValueError, match="length 0"):
        plan_axis(0, 32, 8, 4)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), r0=st.integers(-20, 50), c0=st.integers(-20, 50),
       th=st.integers(1, 30), tw=st.integers(1, 30))
def test_tile_crop_slices_and_gathers_alike(h, w, r0, c0, th, tw):
    # deblur reads interior tiles as slices and border tiles by reflected indices:
    # both must give exactly the gathered pixels.
    from demoe.tiling import crop

    plane = np.arange(h * w * 2, dtype=np.float32).reshape(h, w, 2)
    rows = reflect_index(np.arange(r0, r0 + th), h)
    cols = reflect_index(np.arange(c0, c0 + tw), w)
    np.testing.assert_array_equal(crop(plane, rows, cols), plane[rows[:, None], cols[None, :]])


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 120), w=st.integers(1, 120), tile=st.sampled_from([16, 24, 32]), ovl=st.integers(0, 7),
       cut_y=st.integers(1, 4), cut_x=st.integers(1, 4))
def test_tile_sums_of_pieces_add_up_to_the_stitch(h, w, tile, ovl, cut_y, cut_x):
    # dask chunks: each piece of the grid summed apart, the sums added where they overlap.
    from demoe.tiling import Axis, tile_sum

    img = np.random.default_rng(h * 1000 + w).random((2, h, w), dtype=np.float32)
    fn = lambda b: np.tanh(3 * b) + b.mean(axis=(2, 3), keepdims=True)  # noqa: E731 - depends on the whole tile
    ref, _ = _run(img, fn, tile, ovl)
    ay, ax = plan_axis(h, tile, ovl, 4), plan_axis(w, tile, ovl, 4)
    rows, cols = reflect_index(np.arange(-ovl, ay.count * ay.stride), h), reflect_index(
        np.arange(-ovl, ax.count * ax.stride), w)
    space = img[:, rows[:, None], cols[None, :]]  # what the tiles read, from the first one's start
    total = np.zeros_like(space)
    for y0, y1 in zip(*[np.linspace(0, ay.count, cut_y + 1).astype(int)[k:] for k in (0, 1)]):
        for x0, x1 in zip(*[np.linspace(0, ax.count, cut_x + 1).astype(int)[k:] for k in (0, 1)]):
            if y1 == y0 or x1 == x0:
                continue
            py = Axis(0, ay.tile, ovl, y1 - y0)
            px = Axis(0, ax.tile, ovl, x1 - x0)
            r0, c0 = y0 * ay.stride, x0 * ax.stride
            piece = space[:, r0 : r0 + py.count * py.stride + ovl, c0 : c0 + px.count * px.stride + ovl]
            total[:, r0 : r0 + piece.shape[1], c0 : c0 + piece.shape[2]] += tile_sum(
                lambda r, c, piece=piece: piece[:, r[:, None], c[None, :]], fn, py, px, batch_size=2)
    np.testing.assert_allclose(total[:, ovl : ovl + h, ovl : ovl + w], ref, atol=1e-5)
