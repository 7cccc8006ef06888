"""The on-device batch generators (demoe.batch_degrade) against the numpy ones they mirror."""

import numpy as np
import pytest
import torch
from skimage import data, metrics

from demoe import degrade
from demoe.batch_degrade import (
    KERNEL,
    BatchGenerators,
    DeviceBatches,
    RandomDraws,
    disk_psfs,
    fft_convolve,
    jpeg,
    shake_trajectories,
    soft_masks,
    splat,
)


def _centre(psf: np.ndarray, size: int = KERNEL) -> np.ndarray:
    """A numpy PSF zero-padded to ``size`` x ``size`` about its centre."""
    pad = (size - psf.shape[0]) // 2
    return np.pad(psf, pad)


@pytest.fixture(scope="module")
def photos():
    """Four photographs, float RGB (test data only: scikit-image's photos never train the shipped model)."""
    imgs = [data.astronaut(), data.coffee(), data.rocket(), np.repeat(data.camera()[..., None], 3, axis=2)]
    return [im.astype(np.float32) / 255 for im in imgs]


@pytest.mark.parametrize("radius, softness", [(1.0, 0.3), (3.7, 1.2), (6.0, 1.5)])
def test_disk_psfs_are_the_numpy_disks(radius, softness):
    want = _centre(degrade.psf_disk(radius, softness=softness))
    got = disk_psfs(torch.tensor([radius]), torch.tensor([softness]))[0].numpy()
    assert abs(got.sum() - 1) < 1e-5
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_splat_is_the_numpy_rasteriser():
    traj = degrade.random_shake_trajectory(np.random.default_rng(3), 20.0)
    want = _centre(degrade.psf_trajectory(traj))
    got = splat(torch.tensor(traj, dtype=torch.float32)[None])[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_fft_convolution_is_exact_inside_the_margin():
    img = data.astronaut()[:160, :192].astype(np.float32) / 255
    psf = degrade.psf_trajectory(degrade.random_shake_trajectory(np.random.default_rng(4), 25.0))
    want = degrade.convolve(img, psf)
    got = fft_convolve(torch.from_numpy(img).permute(2, 0, 1)[None], torch.from_numpy(_centre(psf))[None])
    got = got[0].permute(1, 2, 0).numpy()
    m = KERNEL // 2
    np.testing.assert_allclose(got[m:-m, m:-m], want[m:-m, m:-m], atol=1e-5)
    assert np.abs(got - want).max() > 1e-3  # the border wraps around: why crops carry a margin


@pytest.mark.parametrize("quality", [60, 90])
def test_jpeg_simulation_matches_the_codec(quality):
    img = data.astronaut()[100:292, 100:292].astype(np.float32) / 255
    codec = degrade.jpeg_compress(np.ascontiguousarray(img[..., ::-1]), quality)[..., ::-1]  # OpenCV is BGR
    sim = jpeg(torch.from_numpy(img).permute(2, 0, 1)[None].contiguous(), torch.tensor([quality]))
    sim = sim[0].permute(1, 2, 0).numpy()
    assert metrics.peak_signal_noise_ratio(codec, sim, data_range=1) > 42
    loss_codec = metrics.peak_signal_noise_ratio(img, codec, data_range=1)
    loss_sim = metrics.peak_signal_noise_ratio(img, sim, data_range=1)
    assert abs(loss_codec - loss_sim) < 0.5 and loss_sim < 40  # as lossy as the codec, and lossy


def _gyration(psf: np.ndarray) -> float:
    yy, xx = np.mgrid[: psf.shape[0], : psf.shape[1]]
    cy, cx = (psf * yy).sum(), (psf * xx).sum()
    return float(np.sqrt((psf * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum()))


def test_shake_kernels_have_the_numpy_sizes():
    rng = np.random.default_rng(5)
    lengths = rng.uniform(4, 25, 200)
    numpy_sizes = [_gyration(degrade.psf_trajectory(degrade.random_shake_trajectory(rng, L))) for L in lengths]
    gen = torch.Generator().manual_seed(5)
    draws = RandomDraws(gen, torch.device("cpu"))
    bank = splat(shake_trajectories(draws, torch.tensor(lengths, dtype=torch.float32)))
    torch_sizes = [_gyration(k) for k in bank.numpy()]
    assert abs(np.median(torch_sizes) / np.median(numpy_sizes) - 1) < 0.15
    assert abs(np.percentile(torch_sizes, 90) / np.percentile(numpy_sizes, 90) - 1) < 0.2


def test_batches_shape_range_labels_and_seeds(photos):
    stream = DeviceBatches(photos, patch=32, batch=12, seed=3, bank=32, leaves=1)
    blurry, sharp, label = stream.sample()
    assert blurry.shape == sharp.shape == (12, 3, 32, 32) and blurry.dtype == torch.float32
    assert float(blurry.min()) >= 0 and float(blurry.max()) <= 1 and float(sharp.min()) >= 0 and float(sharp.max()) <= 1
    assert label.tolist() == sorted(label.tolist())  # grouped by task: one slice per expert
    assert np.bincount(label.numpy(), minlength=5).tolist() == [3, 3, 2, 2, 2]
    again = DeviceBatches(photos, patch=32, batch=12, seed=3, bank=32, leaves=1).sample()
    other = DeviceBatches(photos, patch=32, batch=12, seed=4, bank=32, leaves=1).sample()
    assert torch.equal(again[0], blurry) and torch.equal(again[1], sharp)
    assert not torch.equal(other[1], sharp)
    follow = stream.sample()
    assert not torch.equal(follow[1], sharp)  # an endless stream, not one batch again


def test_small_photos_are_left_out_with_a_warning_and_none_at_all_is_an_error():
    small, big = np.ones((50, 50, 3), np.float32), np.full((100, 100, 3), 0.5, np.float32)
    with pytest.warns(RuntimeWarning, match="1 of 2 photographs are smaller than 96 x 96 px"):
        stream = DeviceBatches([small, big], patch=32, batch=5, seed=0, bank=16, leaves=2, photo_fraction=1.0)
    assert stream.n_photos == 1
    assert torch.equal(stream.sample()[1], torch.full((5, 3, 32, 32), 128 / 255))  # the big one, never the small
    with pytest.raises(ValueError, match="none of the 1 photographs is at least 96 x 96 px"):
        DeviceBatches([small], patch=32, batch=5, seed=0, bank=16)
    only_leaves = DeviceBatches([], patch=32, batch=5, seed=0, bank=16, leaves=2)
    assert only_leaves.n_leaves == 2 and float(only_leaves.sample()[1].std()) > 0.05


def test_bad_patch_or_margin_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        DeviceBatches([], patch=40)
    with pytest.raises(ValueError, match="margin"):
        DeviceBatches([], patch=32, margin=16)


@pytest.mark.parametrize("task", ["defocus", "global_motion", "synth_global_motion", "low_light"])
def test_each_task_degrades_like_its_numpy_generator(photos, task):
    """On the same 40 crops, the PSNR of blurry against sharp is on average within 1 dB of numpy's."""
    rng = np.random.default_rng(7)
    crops = []
    for i in range(40):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 96), rng.integers(0, p.shape[1] - 96)
        crops.append(p[y : y + 96, x : x + 96])
    g = BatchGenerators(RandomDraws(torch.Generator().manual_seed(7), torch.device("cpu")), bank=256, refresh=0)
    ours = getattr(g, task)(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()).clamp(0, 1)
    ours = ours.permute(0, 2, 3, 1).numpy()
    inner = slice(32, 64)  # the patch: clear of either path's border handling

    def psnr(a, b):
        return -10 * np.log10(((a[inner, inner] - b[inner, inner]) ** 2).mean() + 1e-12)

    diff = [psnr(o, c) - psnr(degrade.GENERATORS[task](c, rng).blurry, c) for o, c in zip(ours, crops)]
    assert abs(np.mean(diff)) < 1.0, f"{task}: {np.mean(diff):+.2f} dB against numpy on the same crops"


def test_moving_object_masks_cover_what_numpys_cover():
    rng = np.random.default_rng(0)
    theirs = [degrade.random_mask((64, 64), rng).mean() for _ in range(400)]
    ours = soft_masks(RandomDraws(torch.Generator().manual_seed(0), torch.device("cpu")), 400, 64).flatten(1).mean(1)
    for q in (10, 50, 90):
        assert abs(np.percentile(ours.numpy(), q) - np.percentile(theirs, q)) < 0.04, q


def test_low_light_is_dark_and_noisy_and_moving_objects_leave_background_sharp(photos):
    gen = torch.Generator().manual_seed(2)
    g = BatchGenerators(RandomDraws(gen, torch.device("cpu")), bank=32, refresh=0)
    x = torch.from_numpy(np.stack([p[:128, :128] for p in photos])).permute(0, 3, 1, 2).contiguous()
    dark = g.low_light(x)
    assert float(dark.mean()) < 0.75 * float(x.mean())
    moved = g.local_motion(x)
    unchanged = ((moved - x).abs().amax(1) < 1e-4).float().mean()
    assert 0.2 < float(unchanged) < 0.97  # objects blurred, the rest of the scene as it was
