import warnings

import dask.array as da
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import demoe
import demoe.devices
from demoe import TASKS, deblur
from demoe.checkpoint import cached_model


def psnr(a, b, peak=255.0):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(peak**2 / max(mse, 1e-20))


# -- shapes, dtypes, layouts (exact, with an identity network) ----------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.sampled_from([(1, 1), (1, 9), (7, 1), (23, 31), (2, 17, 12), (19, 21, 3), (9, 8, 4), (2, 3, 10, 11, 3), (12, 13, 5)]),
    dtype=st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64]),
)
def test_identity_network_returns_input(identity_model, shape, dtype):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        img = (rng.random(shape) * 3 - 1).astype(dtype)  # outside [0, 1]: percentile path
    else:
        info = np.iinfo(dtype)
        img = rng.integers(max(info.min, -3000), min(info.max, 4000), shape, endpoint=True).astype(dtype)
    before = img.copy()
    out = deblur(img, model=identity_model, tile_size=16, overlap=4, device="cpu")
    assert out.shape == img.shape and out.dtype == img.dtype
    assert out is not img and not np.shares_memory(out, img)
    np.testing.assert_array_equal(img, before)  # input untouched
    if np.dtype(dtype).kind == "f":
        np.testing.assert_allclose(out, img, atol=1e-5 * (np.abs(img).max() + 1))
    else:
        np.testing.assert_array_equal(out, img)  # rounding, not truncation


def test_float_in_unit_range_is_not_rescaled(identity_model):
    img = np.linspace(0.2, 0.3, 400, dtype=np.float32).reshape(20, 20)
    out, info = deblur(img, model=identity_model, return_info=True, device="cpu")
    assert info["normalization"] == (0.0, 1.0)
    np.testing.assert_allclose(out, img, atol=1e-6)


def test_info_reports_the_tiles_the_network_saw(identity_model):
    shapes = []
    identity_model.register_forward_hook(lambda mod, args, out: shapes.extend([args[0].shape[-2:]] * len(args[0])))
    img = np.zeros((150, 230, 3), np.uint8)
    _, info = deblur(img, model=identity_model, task="defocus", tile_size=128, overlap=16, return_info=True,
                     device="cpu")
    assert info["tiles"] == len(shapes) and set(shapes) == {tuple(info["tile_shape"])}
    assert tuple(info["tile_shape"]) != (128, 128)  # the planner shrank the asked-for tile to fit
    assert info["computed"] == pytest.approx(sum(h * w for h, w in shapes) / (150 * 230))


def test_twelve_bit_in_uint16_uses_percentiles(identity_model):
    img = np.random.default_rng(0).integers(0, 4096, (30, 30), dtype=np.uint16)
    _, info = deblur(img, model=identity_model, return_info=True, device="cpu")
    lo, hi = info["normalization"]
    assert hi < 4096 and lo < 10  # not treated as nearly black in 0..65535


def test_alpha_passes_through_and_bgr_swaps(identity_model):
    shift = demoe.DeMoE(width=4, middle_blk_num=0, enc_blk_nums=[1], dec_blk_nums=[1]).eval()
    with torch.no_grad():  # an "expert" that brightens only the red channel by 0.2
        shift.ending.weight.zero_()
        shift.ending.bias.copy_(torch.tensor([0.2, 0.0, 0.0]))
    img = np.full((10, 12, 4), 100, np.uint8)
    img[..., 3] = 7
    rgb = deblur(img, model=shift, device="cpu", task="defocus", preserve_mean=False)
    assert (rgb[..., 0] == 151).all() and (rgb[..., 1] == 100).all() and (rgb[..., 3] == 7).all()
    bgr = deblur(img, model=shift, device="cpu", task="defocus", bgr=True, preserve_mean=False)
    assert (bgr[..., 2] == 151).all() and (bgr[..., 0] == 100).all()


def test_gray_is_replicated_and_averaged(identity_model):
    shift = demoe.DeMoE(width=4, middle_blk_num=0, enc_blk_nums=[1], dec_blk_nums=[1]).eval()
    with torch.no_grad():
        shift.ending.weight.zero_()
        shift.ending.bias.copy_(torch.tensor([0.3, 0.0, 0.0]))
    out = deblur(np.full((8, 8), 0.5, np.float32), model=shift, device="cpu", task="defocus", preserve_mean=False)
    np.testing.assert_allclose(out, 0.6, atol=1e-6)  # (0.8 + 0.5 + 0.5) / 3


def test_channel_axis_first_and_none(identity_model):
    img = np.random.default_rng(2).random((3, 20, 24)).astype(np.float32)
    out = deblur(img, model=identity_model, channel_axis=0, device="cpu")
    np.testing.assert_allclose(out, img, atol=1e-5)
    stack = np.random.default_rng(3).random((5, 20, 3)).astype(np.float32)  # (Z, H, W) with W = 3
    np.testing.assert_allclose(deblur(stack, model=identity_model, channel_axis=None, device="cpu"), stack, atol=1e-5)


# -- self-ensemble --------------------------------------------------------------------------
def test_ensemble_averages_the_restored_flips_and_transposes(tiny_model):
    img = np.random.default_rng(4).random((32, 48, 3)).astype(np.float32)  # one tile, no padding

    def run(x, ensemble, **kw):
        kw.setdefault("task", "defocus")
        return deblur(x, model=tiny_model, device="cpu", preserve_mean=False, ensemble=ensemble, return_info=True, **kw)

    plain, info1 = run(img, 1)
    flipped = run(img[:, ::-1], 1)[0][:, ::-1]
    assert np.abs(plain - flipped).max() > 1e-3  # the network alone is not flip-symmetric
    pair, info2 = run(img, 2)
    np.testing.assert_allclose(pair, (plain + flipped) / 2, atol=1e-5)
    assert info2["ensemble"] == 2 and info2["computed"] == pytest.approx(2 * info1["computed"])

    # All eight views: the result no longer depends on which way up the image was.
    swap = (1, 0, 2)
    assert np.abs(plain - run(img.transpose(swap), 1)[0].transpose(swap)).max() > 1e-3
    full = run(img, 8)[0]
    np.testing.assert_allclose(run(img.transpose(swap), 8)[0].transpose(swap), full, atol=1e-5)
    np.testing.assert_allclose(run(img[::-1, ::-1], 8)[0][::-1, ::-1], full, atol=1e-5)

    # Automatic routing: every view takes the tile's own routing, so the routing is unchanged.
    for routing in ("image", "tile"):
        probs = [run(img, n, task=None, routing=routing)[1]["probabilities"] for n in (1, 4)]
        assert probs[0] == pytest.approx(probs[1])


# -- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image, kwargs, err, match",
    [
        (np.zeros((0, 5)), {}, ValueError, "size-0 axis"),
        (np.zeros(5), {}, ValueError, "at least 2 dimensions"),
        (np.zeros((4, 4), bool), {}, TypeError, "boolean"),
        (np.zeros((4, 4), complex), {}, TypeError, "unsupported dtype complex128"),
        (np.array([[object()]]), {}, TypeError, "unsupported dtype object"),
        ("photo.png", {}, TypeError, r"not a file name \('photo.png'\): read it first"),
        (None, {}, TypeError, "got None instead of an image array"),
        (np.array([[np.nan, 1, np.inf], [0, 0, 0]]), {}, ValueError, "2 NaN or infinite value.*nan_policy='keep'"),
        (np.zeros((4, 4)), {"nan_policy": "omit"}, ValueError, "nan_policy must be 'raise' or 'keep'"),
        (np.zeros((4, 4)), {"channel_axis": 3}, ValueError, "channel_axis=3 is out of range"),
        (np.zeros((4, 4)), {"task": "rain"}, ValueError, "valid tasks are: auto, defocus"),
        (np.zeros((4, 4)), {"overlap": 16, "tile_size": 32}, ValueError, "less than half the tile"),
        (np.zeros((4, 4)), {"tile_size": -8}, ValueError, "tile_size must be an integer"),
        (np.zeros((4, 4)), {"overlap": -1}, ValueError, "overlap must be a non-negative"),
        (np.zeros((4, 4)), {"batch_size": 0}, ValueError, "batch_size must be a positive"),
        (np.zeros((4, 4)), {"streams": 0}, ValueError, "streams must be a positive"),
        (np.zeros((4, 4)), {"streams": 1.5}, ValueError, "streams must be a positive"),
        (np.zeros((4, 4)), {"routing": "pixel"}, ValueError, "routing must be"),
        (np.zeros((4, 4)), {"normalize": "zscore"}, ValueError, "normalize must be"),
        (np.zeros((4, 4)), {"precision": "int8"}, ValueError, "precision must be one of auto, fp32"),
        (np.zeros((4, 4)), {"ensemble": 3}, ValueError, "ensemble must be one of 1, 2, 4, 8"),
        (np.zeros((4, 4)), {"ensemble": True}, ValueError, "ensemble must be one of 1, 2, 4, 8"),
        (np.zeros((4, 4)), {"ensemble": np.array([2, 4])}, ValueError, "ensemble must be one of 1, 2, 4, 8"),
        (np.zeros((4, 4)), {"ensemble": 4.0}, ValueError, "ensemble must be one of 1, 2, 4, 8"),
        (np.zeros((4, 4)), {"preserve_mean": "yes"}, ValueError, "preserve_mean must be True, False or None"),
        (da.zeros((4, 4), chunks=2), {"preserve_mean": True}, ValueError, r"needs each whole plane.*np.asarray"),
        # Careless values: each names the parameter and what it takes.
        (np.zeros((4, 4)), {"tile_size": float("inf")}, ValueError, r"tile_size must be an integer >= 4 .*got inf"),
        (np.zeros((4, 4)), {"tile_size": float("nan")}, ValueError, r"tile_size must be an integer >= 4 .*got nan"),
        (np.zeros((4, 4)), {"overlap": float("nan")}, ValueError, "overlap must be a non-negative integer, got nan"),
        (np.zeros((4, 4)), {"batch_size": float("inf")}, ValueError, "batch_size must be a positive integer, got inf"),
        (np.zeros((4, 4)), {"streams": float("nan")}, ValueError, "streams must be a positive integer, got nan"),
        (np.zeros((4, 4)), {"tile_size": True}, ValueError, "tile_size must be an integer >= 4 .*got True"),
        (np.zeros((3, 4, 4)), {"channel_axis": True}, ValueError,
         "channel_axis must be an axis number, None or 'auto', got True"),
        (np.zeros((4, 4)), {"normalize": (np.nan, 1)}, ValueError, r"needs finite numbers with low < high, got \(nan"),
        (np.zeros((4, 4)), {"normalize": (1, 0)}, ValueError, r"needs finite numbers with low < high, got \(1, 0\)"),
        (np.zeros((4, 4)), {"normalize": (0, 1, 2)}, ValueError, r"takes two numbers, got \(0, 1, 2\)"),
        (np.zeros((4, 4)), {"normalize": ("a", "b")}, ValueError, r"takes two numbers, got \('a', 'b'\)"),
        (da.zeros((4, 8, 8), chunks=(1, 8, 8))[da.arange(4) > 1], {}, ValueError,
         r"dask array of unknown shape \(nan, 8, 8\).*compute_chunk_sizes\(\)"),
    ],
)
def test_bad_input_clear_errors(identity_model, image, kwargs, err, match):
    with pytest.raises(err, match=match):
        deblur(image, model=identity_model, device="cpu", **kwargs)


def test_bad_model_argument():
    with pytest.raises(TypeError, match="model must be a DeMoE"):
        deblur(np.zeros((4, 4)), model=42)


# -- progress, info, cancel -----------------------------------------------------------------
def test_progress_callback_and_cancel(identity_model):
    img = np.zeros((100, 90), np.float32)
    calls = []
    _, info = deblur(img, model=identity_model, tile_size=32, overlap=8, batch_size=2, device="cpu",
                     progress=lambda d, t: calls.append((d, t)), return_info=True)
    assert calls[-1][0] == calls[-1][1] == info["tiles"] and len(calls) > 3
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done >= 4:
            raise Cancelled

    with pytest.raises(Cancelled):
        deblur(img, model=identity_model, tile_size=32, overlap=8, batch_size=2, device="cpu", progress=cancel)


def test_progress_bar(identity_model, capsys):
    deblur(np.zeros((40, 40), np.float32), model=identity_model, tile_size=16, overlap=4, device="cpu", progress=True)
    assert "tile" in capsys.readouterr().err


def test_info_reports_routing(tiny_model):
    out, info = deblur(np.random.default_rng(0).random((40, 40, 3)).astype(np.float32), model=tiny_model,
                       device="cpu", return_info=True)
    probs = info["probabilities"]
    assert set(probs) == set(TASKS) and abs(sum(probs.values()) - 1) < 1e-5
    assert info["task"] == max(probs, key=probs.get) and not info["forced"]
    assert info["device"] == "cpu" and info["seconds"] > 0
    _, forced = deblur(np.zeros((16, 16)), task="low_light", model=tiny_model, device="cpu", return_info=True)
    assert forced["task"] == "low_light" and forced["probabilities"]["low_light"] == 1.0


def test_tile_routing_runs(tiny_model):
    img = np.random.default_rng(0).random((60, 60, 3)).astype(np.float32)
    a, info = deblur(img, model=tiny_model, routing="tile", tile_size=32, overlap=8, device="cpu", return_info=True)
    assert a.shape == img.shape and np.isfinite(a).all()
    assert abs(sum(info["probabilities"].values()) - 1) < 1e-5  # mean of the tiles' own routings
    assert info["task"] in TASKS and not info["forced"]


def test_nan_policy_keep_restores_around_holes(default_model):
    """Blank sky / masked pixels: the rest is restored, the holes come back exactly as they were."""
    from skimage import data

    from demoe.degrade import degrade

    sharp = data.camera()[100:356, 100:356].astype(np.float32) / 255 * 900 + 100  # counts
    blurry = degrade(sharp / 1000, "defocus", rng=0).blurry * 1000
    img = blurry.copy()
    img[:, :30] = np.nan
    img[100:120, 100:140] = np.nan
    img[5, 200] = np.inf
    before = img.copy()
    out = deblur(img, model=default_model, task="defocus", nan_policy="keep")
    np.testing.assert_array_equal(img, before)  # the input untouched
    finite = np.isfinite(img)
    assert np.array_equal(np.isnan(out), np.isnan(img)) and out[5, 200] == np.inf and np.isfinite(out[finite]).all()

    def psnr(x):
        return 10 * np.log10(1000.0**2 / np.mean((x[finite] - sharp[finite]) ** 2))

    clean = deblur(blurry, model=default_model, task="defocus")
    assert psnr(out) > psnr(blurry) + 1.0 and psnr(out) > psnr(clean) - 1.0  # here: 25.1, 23.6 and 25.6 dB
    lazy = deblur(da.from_array(img, chunks=128), model=default_model, task="defocus", nan_policy="keep").compute()
    assert np.array_equal(np.isnan(lazy), np.isnan(img)) and lazy[5, 200] == np.inf
    assert np.abs(lazy - out)[finite].mean() < 10  # chunked tiles, same restoration (range 1000)
    with pytest.raises(ValueError, match="NaN or infinite value.*nan_policy"):  # counted per chunk
        deblur(da.from_array(img, chunks=128), model=default_model, task="defocus").compute()


def test_masked_array_in_masked_array_out(default_model):
    """Masked pixels (here saturated sentinel columns) are restored around and keep their values."""
    from skimage import data

    from demoe.degrade import degrade

    sharp = data.camera()[100:356, 100:356].astype(np.float32) / 255
    counts = (degrade(sharp, "defocus", rng=0).blurry * 4000).round().astype(np.uint16)
    raw = counts.copy()
    raw[:, :30] = 65535
    masked = np.ma.MaskedArray(raw, mask=raw == 65535)
    out = deblur(masked, model=default_model, task="defocus")
    assert isinstance(out, np.ma.MaskedArray) and out.dtype == np.uint16
    np.testing.assert_array_equal(out.mask, masked.mask)
    assert out.mask is not masked.mask and (masked.data == raw).all()  # its own mask; the input untouched
    np.testing.assert_array_equal(out.data[:, :30], 65535)
    clean = deblur(counts, model=default_model, task="defocus")
    ignored = deblur(raw, model=default_model, task="defocus")  # the sentinels taken as data
    far = (slice(None), slice(80, None))
    err_masked = np.abs(out.data[far].astype(float) - clean[far]).mean()
    assert err_masked < 0.5 * np.abs(ignored[far].astype(float) - clean[far]).mean()  # here 16 against 82
    rgb = np.ma.MaskedArray(np.dstack([sharp] * 3), mask=False)
    plain = deblur(rgb, model=default_model, task="defocus")
    assert isinstance(plain, np.ma.MaskedArray) and not plain.mask.any() and plain.shape == (256, 256, 3)


def test_progress_on_dask_input_warns(identity_model):
    lazy = da.from_array(np.zeros((2, 16, 16), np.float32), chunks=(1, 16, 16))
    with pytest.warns(RuntimeWarning, match="progress is not reported for dask input.*TqdmCallback"):
        deblur(lazy, model=identity_model, device="cpu", progress=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deblur(lazy, model=identity_model, device="cpu")  # no progress asked: no warning


def test_tile_routing_where_only_part_is_low_light(default_model):
    """Per-tile routing: the under-exposed half is brightened, the rest keeps its exposure."""
    from skimage import data

    from demoe.degrade import degrade

    sharp = data.astronaut()[100:196, 100:260].astype(np.float32) / 255
    two = np.concatenate([degrade(sharp[:, :80], "defocus", rng=1).blurry,
                          degrade(sharp[:, 80:], "low_light", rng=2).blurry], axis=1)
    out, info = deblur(two, model=default_model, routing="tile", tile_size=32, overlap=8, return_info=True)
    assert sum(info["tile_tasks"].values()) == info["tiles"] and "low_light" in info["tile_tasks"]
    assert len(info["tile_tasks"]) > 1 and list(info["tile_tasks"].values()) == sorted(info["tile_tasks"].values())[::-1]
    assert out[:, 96:].mean() > two[:, 96:].mean() + 0.03  # the low-light side is brightened...
    assert out[:, :64].mean() == pytest.approx(two[:, :64].mean(), abs=0.005)  # ...and the plane not shifted back
    whole, info = deblur(two, model=default_model, tile_size=32, overlap=8, return_info=True)
    assert "tile_tasks" not in info and info["task"] != "low_light"
    assert whole.mean() == pytest.approx(two.mean(), abs=1e-3)  # one routing, not low light: mean kept
    kept = deblur(two, model=default_model, routing="tile", tile_size=32, overlap=8, preserve_mean=True)
    assert kept.mean() == pytest.approx(two.mean(), abs=1e-3)


def test_tile_streams_match_one_stream(tiny_model):
    """Tiles run in parallel threads stitch to the same image and give the same routing."""
    import torch

    img = np.random.default_rng(3).random((90, 100, 3)).astype(np.float32)
    threads = torch.get_num_threads()
    for routing in ("image", "tile"):
        one, info1 = deblur(img, model=tiny_model, routing=routing, tile_size=32, overlap=8, device="cpu",
                            streams=1, return_info=True)
        three, info3 = deblur(img, model=tiny_model, routing=routing, tile_size=32, overlap=8, batch_size=2,
                              device="cpu", streams=3, return_info=True)
        assert info1["streams"] == 1 and info3["streams"] == 3 and info3["tiles"] == info1["tiles"] > 6
        np.testing.assert_allclose(three, one, atol=1e-5)
        for t in TASKS:
            assert info3["probabilities"][t] == pytest.approx(info1["probabilities"][t], abs=1e-6)
        assert torch.get_num_threads() == threads  # the calling thread's setting is put back


def test_tile_streams_default_and_thread_setting_restored_on_cancel(identity_model):
    import threading

    import torch

    img = np.random.default_rng(0).random((100, 90)).astype(np.float32)
    _, info = deblur(img, model=identity_model, tile_size=32, overlap=8, device="cpu", return_info=True)
    assert info["streams"] == min(2, torch.get_num_threads())

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done >= 4:
            raise Cancelled

    threads = torch.get_num_threads()
    with pytest.raises(Cancelled):
        deblur(img, model=identity_model, tile_size=32, overlap=8, device="cpu", streams=2, progress=cancel)
    assert torch.get_num_threads() == threads
    seen = []  # a thread started afterwards gets torch's usual setting, not a stream's share
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [threads]
    assert not [t for t in threading.enumerate() if t.name.startswith("demoe-tiles")]  # the pool is gone


@pytest.mark.parametrize(("streams", "tried"), [(1, {4, 2, 1}), (2, {3, 1})])  # two streams: 3 + 3 tiles, 3 halves to 1
def test_cuda_oom_halves_the_batch(identity_model, monkeypatch, streams, tried):
    original = identity_model.forward
    sizes = []

    def flaky(x, *args, **kwargs):  # the network runs out of memory on more than one tile
        sizes.append(len(x))
        if len(x) > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return original(x, *args, **kwargs)

    monkeypatch.setattr(identity_model, "forward", flaky)
    img = np.random.default_rng(0).random((40, 64)).astype(np.float32)  # rows of 5 tiles: batches of 4
    with pytest.warns(RuntimeWarning, match="out of memory"):
        out = deblur(img, model=identity_model, tile_size=16, overlap=4, batch_size=4, device="cpu", streams=streams)
    np.testing.assert_allclose(out, img, atol=1e-5)
    assert set(sizes) == tried


def test_default_model_cached_per_device(tmp_path, identity_model, monkeypatch):
    assert cached_model(None, "cpu") is cached_model(None, "cpu")
    if demoe.devices.resolve_device(None).type == "cpu":  # one key per device, however it is named
        assert cached_model(None, None) is cached_model(None, "auto") is cached_model(None, "cpu")
    seen = []  # deblur()'s default model is the cached one
    monkeypatch.setattr(cached_model(None, "cpu"), "forward", lambda x, *a, **k: seen.append(len(x)) or x)
    deblur(np.zeros((16, 16), np.float32), device="cpu", task="defocus")
    assert seen
    path = demoe.save_model(identity_model, tmp_path / "id.safetensors")
    monkeypatch.chdir(tmp_path)
    assert cached_model(path, "cpu") is cached_model("id.safetensors", "cpu")  # one file, however named
    assert cached_model(path, "cpu") is not cached_model(None, "cpu")


def test_checkpoint_path_as_model(tmp_path, identity_model):
    demoe.save_model(identity_model, tmp_path / "id.safetensors")
    img = np.random.default_rng(0).random((20, 20)).astype(np.float32)
    np.testing.assert_allclose(deblur(img, model=tmp_path / "id.safetensors", device="cpu"), img, atol=1e-5)


# -- dask ---------------------------------------------------------------------------------
def test_dask_is_lazy_and_matches(identity_model):
    da = pytest.importorskip("dask.array")
    img = np.random.default_rng(0).integers(0, 4000, (2, 90, 70), dtype=np.uint16)
    lazy = da.from_array(img, chunks=(1, 40, 35))
    out = deblur(lazy, model=identity_model, tile_size=16, overlap=4, device="cpu")
    assert isinstance(out, da.Array) and out.shape == img.shape and out.dtype == img.dtype
    np.testing.assert_array_equal(out.compute(), img)


def test_dask_rgb_default_model_close_to_numpy(default_model, blurred_photo):
    da = pytest.importorskip("dask.array")
    blurry, _ = blurred_photo
    ref = deblur(blurry, model=default_model, task="defocus")
    lazy = deblur(da.from_array(blurry, chunks=(192, 192, 3)), model=default_model, task="defocus")
    assert psnr(lazy.compute(), ref) > 40


def test_dask_distributed_cluster(identity_model):
    distributed = pytest.importorskip("distributed")
    da = pytest.importorskip("dask.array")
    img = np.random.default_rng(1).random((64, 48, 3)).astype(np.float32)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with distributed.Client(cluster):
            out = deblur(da.from_array(img, chunks=(32, 24, 3)), model=identity_model, tile_size=16, overlap=4,
                         device="cpu").compute()
    np.testing.assert_allclose(out, img, atol=1e-5)


# -- quality on a real, trained model -------------------------------------------------------
def test_seams_tile_sizes_agree(default_model, blurred_photo):
    from demoe.tiling import plan_axis

    blurry, _ = blurred_photo
    # The two tile sizes really cut the image differently (else the check is empty).
    assert plan_axis(blurry.shape[0], 256, 32, 16) != plan_axis(blurry.shape[0], 384, 32, 16)
    a = deblur(blurry, model=default_model, task="defocus", tile_size=256, overlap=32)
    b = deblur(blurry, model=default_model, task="defocus", tile_size=384, overlap=32)
    # With the default local converter (window = the 256 px training patch) measured 48.1 dB
    # on the stage-6 weights (46.4 on stage 4); without it 45.7 dB; a stitching bug gives ~30 dB.
    assert 45 <= psnr(a, b) < 100


def test_tiled_matches_whole_pass(default_model, blurred_photo):
    blurry, _ = blurred_photo
    tiled = deblur(blurry, model=default_model, task="defocus", tile_size=256, overlap=32)
    x = torch.from_numpy(blurry.astype(np.float32).transpose(2, 0, 1)[None] / 255)
    with torch.no_grad():
        whole = default_model(x, task="defocus")[0].numpy().transpose(1, 2, 0)
    whole = np.clip(np.rint(whole * 255), 0, 255)
    assert psnr(tiled, whole) >= 40


@pytest.mark.parametrize("task", [None, "defocus", "global_motion"])
def test_mean_intensity_kept(default_model, blurred_photo, task):
    blurry, _ = blurred_photo
    out = deblur(blurry, model=default_model, task=task)
    assert abs(out.mean() / blurry.mean() - 1) < 0.02
    sixteen = (blurry[..., 1].astype(np.uint16) * 16)  # 12-bit gray microscope-like
    out16 = deblur(sixteen, model=default_model, task=task)
    assert abs(out16.mean() / sixteen.mean() - 1) < 0.02


def test_default_model_improves_and_routes_defocus(default_model, blurred_photo):
    blurry, sharp = blurred_photo
    out, info = deblur(blurry, model=default_model, return_info=True)
    assert psnr(out, sharp) >= psnr(blurry, sharp) + 1.0
    assert info["task"] == "defocus"


def test_default_argument_uses_packaged_model(blurred_photo):
    blurry, _ = blurred_photo
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = deblur(blurry[:64, :64], device="cpu")
    assert out.shape == (64, 64, 3)


@pytest.mark.parametrize("shape, chunks", [((40, 40), (40, 40)), ((2, 40, 30), (1, 20, 15)), ((5, 7), (2, 3))])
def test_dask_small_images_and_chunks(identity_model, shape, chunks):
    da = pytest.importorskip("dask.array")
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    out = deblur(da.from_array(img, chunks=chunks), model=identity_model, device="cpu").compute()
    np.testing.assert_allclose(out, img, atol=1e-5)


def test_preserve_mean_against_a_darkening_expert():
    dark = demoe.DeMoE(width=4, middle_blk_num=0, enc_blk_nums=[1], dec_blk_nums=[1]).eval()
    with torch.no_grad():  # every expert darkens by 0.1
        dark.ending.weight.zero_()
        dark.ending.bias.fill_(-0.1)
    img = np.random.default_rng(0).integers(60, 200, (50, 40, 3), dtype=np.uint8)
    kept = deblur(img, model=dark, task="synth_global_motion", device="cpu")
    assert abs(kept.mean() - img.mean()) < 0.5
    raw = deblur(img, model=dark, task="synth_global_motion", device="cpu", preserve_mean=False)
    assert img.mean() - raw.mean() == pytest.approx(25.5, abs=0.6)
    # The low-light expert is meant to change the exposure: not corrected by default.
    low = deblur(img, model=dark, task="low_light", device="cpu")
    np.testing.assert_array_equal(low, raw)
    # ... unless asked to (a microscopist whose photon-limited data is detected as low light).
    low_kept = deblur(img, model=dark, task="low_light", device="cpu", preserve_mean=True)
    assert abs(low_kept.mean() - img.mean()) < 0.5
    stack = np.random.default_rng(1).integers(100, 3000, (2, 30, 30), dtype=np.uint16)
    out = deblur(stack, model=dark, task="defocus", device="cpu")
    for z in range(2):
        assert abs(out[z].mean() / stack[z].mean() - 1) < 1e-3


def test_default_model_keeps_mean_on_gopro_blur(default_model):
    from skimage import data

    from demoe.degrade import degrade

    sharp = data.astronaut()[128:384, 128:384].astype(np.float32) / 255
    blurry = degrade(sharp, "synth_global_motion", rng=3, noise=0.01).blurry  # the benchmark's worst case
    for task in (None, "synth_global_motion"):
        out = deblur(blurry, model=default_model, task=task)
        assert abs(out.mean() / blurry.mean() - 1) < 0.02


def test_tlc_option(default_model, blurred_photo):
    blurry, _ = blurred_photo
    crop = blurry[:200, :200]
    x = torch.from_numpy(crop[:128, :128].transpose(2, 0, 1)[None] / np.float32(255))
    with torch.no_grad():
        own = default_model(x, task="defocus")  # the model's own (published, global) pooling
    plain = deblur(crop, model=default_model, task="defocus", tlc=False)
    local = deblur(crop, model=default_model, task="defocus", tlc=64)
    assert local.shape == plain.shape and np.abs(local.astype(int) - plain.astype(int)).max() > 0
    # The model is left in its published (global pooling) mode afterwards.
    with torch.no_grad():
        torch.testing.assert_close(default_model(x, task="defocus"), own, rtol=0, atol=0)
    np.testing.assert_array_equal(deblur(crop, model=default_model, task="defocus", tlc=False), plain)
    # A window covering the whole tile is the global pooling: so is the default (window = the
    # 256 px training patch) on a tile no larger than that.
    np.testing.assert_array_equal(deblur(crop, model=default_model, task="defocus", tlc=4096), plain)
    assert int(default_model.metadata["patch_size"]) == 256
    np.testing.assert_array_equal(deblur(crop, model=default_model, task="defocus"), plain)
    with pytest.raises(ValueError, match="tlc must be"):
        deblur(blurry[:20, :20], model=default_model, tlc=-3)


def test_tlc_default_acts_on_tiles_larger_than_the_patch(default_model, blurred_photo):
    blurry, _ = blurred_photo
    kw = dict(model=default_model, task="defocus", tile_size=384, overlap=32)
    default = deblur(blurry, **kw)
    np.testing.assert_array_equal(default, deblur(blurry, tlc=256, **kw))
    assert np.abs(default.astype(int) - deblur(blurry, tlc=False, **kw).astype(int)).max() > 0


def test_local_converter_is_per_call_under_concurrency(tiny_model):
    """Calls on one model from several threads (dask chunks, a GUI worker) each get their own
    pooling: one call must not switch another's local converter on or off halfway."""
    import threading

    model = tiny_model
    ramp = np.linspace(0, 1, 192, dtype=np.float32)[None, :, None]  # local means differ from the tile's
    img = (0.2 * np.random.default_rng(0).random((192, 192, 3)) + 0.8 * ramp).astype(np.float32)
    kw = dict(model=model, task="defocus", tile_size=64, overlap=8, device="cpu", streams=1)
    windows = [False, 16, 32]
    x = torch.from_numpy(img[:64, :64].transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        own = model(x, task="defocus")  # the model's own (global) pooling
    alone = {w: deblur(img, tlc=w, **kw) for w in windows}
    assert np.abs(alone[16] - alone[False]).max() > 1e-4  # the windows really differ
    results, errors = {}, []

    def work(w, k):
        try:
            results[(w, k)] = deblur(img, tlc=w, **kw)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w, k)) for k in range(2) for w in windows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (w, _), out in results.items():
        np.testing.assert_allclose(out, alone[w], rtol=0, atol=1e-6)
    with torch.no_grad():  # and none of the calls left its window on the model
        torch.testing.assert_close(model(x, task="defocus"), own, rtol=0, atol=0)


def test_tile_defaults_follow_device_and_training_patch(identity_model):
    img = np.zeros((400, 40), np.float32)  # long enough for a 384 px tile (see the clamping test)
    _, info = deblur(img, model=identity_model, device="cpu", return_info=True)
    assert (info["tile_size"], info["overlap"], info["batch_size"]) == (256, 32, 1)
    identity_model.metadata = {"patch_size": 256}  # trained on the CPU's tile size: tiles stay 256
    _, info = deblur(img, model=identity_model, device="cpu", return_info=True)
    assert (info["tile_size"], info["overlap"]) == (256, 32)
    identity_model.metadata = {"patch_size": 384}  # larger patches: tiles at least as large
    _, info = deblur(img, model=identity_model, device="cpu", return_info=True)
    assert (info["tile_size"], info["overlap"]) == (384, 48)


def test_dask_chunks_get_no_separate_mean_shifts():
    da = pytest.importorskip("dask.array")
    dark = demoe.DeMoE(width=4, middle_blk_num=0, enc_blk_nums=[1], dec_blk_nums=[1]).eval()
    with torch.no_grad():  # a pointwise "expert" that darkens by 0.1
        dark.ending.weight.zero_()
        dark.ending.bias.fill_(-0.1)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img[:32] //= 4  # chunks with very different means: per-chunk shifts would differ
    lazy = deblur(da.from_array(img, chunks=(32, 32, 3)), model=dark, task="defocus", device="cpu").compute()
    plain = deblur(img, model=dark, task="defocus", device="cpu", preserve_mean=False)
    np.testing.assert_array_equal(lazy, plain)


def test_reduced_precision_stays_close(default_model, blurred_photo):
    blurry, _ = blurred_photo
    crop = blurry[:96, :128]
    ref, info = deblur(crop, model=default_model, task="defocus", device="cpu", return_info=True)
    assert info["precision"] == "fp32"  # the CPU default
    low, info = deblur(crop, model=default_model, task="defocus", device="cpu", precision="bf16", return_info=True)
    assert info["precision"] == "bf16"
    diff = np.abs(low.astype(int) - ref.astype(int))
    assert 0 < diff.max() <= 8 and diff.mean() < 1.0  # really bf16, and still the same picture


# -- extreme values and sizes ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint64])
def test_integers_near_their_maximum_stay_in_range(identity_model, dtype):
    """The clip limit, as a float, rounded up past the maximum and wrapped bright pixels to the minimum."""
    info = np.iinfo(dtype)
    img = np.zeros((24, 32), dtype)
    img[:, 16:] = info.max  # a bright half: the identity network gives it back
    img[:, 16:20] -= np.array(range(4), dtype=dtype)
    out = deblur(img, model=identity_model, device="cpu", task="defocus")
    assert out.dtype == dtype
    assert out[:, 16:].min() > info.max // 2 and out[:, :16].max() < info.max // 1000
    # Within float precision of the range (the top pixels lose a few units to the float limit, and
    # the mean is kept by a shift of the same size).
    np.testing.assert_allclose(out.astype(np.float64), img.astype(np.float64), rtol=0, atol=info.max * 1e-6)


def test_float64_beyond_float32_is_restored_or_refused(identity_model):
    rng = np.random.default_rng(0)
    img = (rng.random((24, 32)) + 1) * 1e39  # all above float32's 3.4e38: scaled in float64
    out = deblur(img, model=identity_model, device="cpu", task="defocus")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, img, rtol=1e-6)
    spike = rng.random((64, 64))
    spike[3, 4] = 1e300  # one pixel 1e300 intensity ranges away: float32 overflow, NaN everywhere
    with pytest.raises(ValueError, match="too far for the network's float32 arithmetic; clip them first"):
        deblur(spike, model=identity_model, device="cpu", task="defocus")
    with pytest.raises(ValueError, match="too near float64's limit"):
        deblur(np.full((8, 8), 1e307) * np.arange(1, 9), model=identity_model, device="cpu", task="defocus")


def test_tiles_larger_than_the_image_are_clamped(identity_model):
    """tile_size=200000 on 64 x 64 took 23 GB: a tile beyond the image and its overlap is cut to it."""
    img = np.random.default_rng(1).random((64, 48)).astype(np.float32)
    _, default = deblur(img, model=identity_model, device="cpu", task="defocus", return_info=True)
    for kwargs in ({"tile_size": 2048}, {"tile_size": 10**9}, {"tile_size": 2048, "overlap": 500}):
        out, info = deblur(img, model=identity_model, device="cpu", task="defocus", return_info=True, **kwargs)
        assert info["tile_shape"][0] <= default["tile_shape"][0] + 2 * 64, (kwargs, info["tile_shape"])
        np.testing.assert_allclose(out, img, atol=1e-6)
    _, big = deblur(img, model=identity_model, device="cpu", task="defocus", tile_size=2048, return_info=True)
    assert (big["tile_size"], big["overlap"], big["tile_shape"]) == (256, 32, default["tile_shape"])
    identity_model.metadata = {"patch_size": 100000}  # a checkpoint's training patch, taken as the default tile
    _, patch = deblur(img, model=identity_model, device="cpu", task="defocus", return_info=True)
    assert (patch["tile_size"], patch["tile_shape"]) == (256, default["tile_shape"])
    # Images as large as the tile keep it: 16384 is still asked of a side of 20000.
    from demoe import tiling

    assert tiling.fit_tile(16384, 2048, 20000, 16) == 16384
    assert tiling.fit_tile(16384, 2048, 5000, 16) == 9104  # the side and two overlaps, rounded to 16
    assert tiling.fit_tile(200000, 25000, 64, 16, least=256) == 256


def test_dask_nan_count_is_the_images_own(identity_model):
    img = np.random.default_rng(2).random((32, 48)).astype(np.float32)
    img[5, 40] = np.nan  # one NaN; chunks borrow their neighbours' pixels, which counted it several times
    lazy = deblur(da.from_array(img, chunks=16), model=identity_model, device="cpu", task="defocus")
    with pytest.raises(ValueError, match=r"image contains 1 NaN or infinite value\(s\) in its chunk at rows 0-15, "
                                         r"columns 32-47 \(lazy input is checked chunk by chunk"):
        lazy.compute()
