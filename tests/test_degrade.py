import numpy as np
import pytest
import torch

from demoe import TASKS
from demoe.data import PairFolder, PsfPairs, SyntheticPairs, dead_leaves, read_psf
from demoe.degrade import (GENERATORS, convolve, degrade, make_pair, psf_disk, psf_gaussian, psf_trajectory,
                           random_shake_trajectory)


@pytest.fixture(scope="module")
def sharp():
    return dead_leaves(96, np.random.default_rng(0))


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_seeded_and_labelled(sharp, task):
    a, b = degrade(sharp, task, 5), degrade(sharp, task, 5)
    c = degrade(sharp, task, 6)
    np.testing.assert_array_equal(a.blurry, b.blurry)
    assert not np.array_equal(a.blurry, c.blurry)
    assert a.task == task and a.label == TASKS.index(task)
    assert a.blurry.shape == sharp.shape and a.blurry.dtype == np.float32
    assert 0 <= a.blurry.min() and a.blurry.max() <= 1
    np.testing.assert_array_equal(a.sharp, sharp)  # the target is the untouched sharp image
    assert np.abs(a.blurry - sharp).mean() > 1e-3  # it really degrades
    if a.psf is not None:
        assert a.psf.ndim == 2 and abs(a.psf.sum() - 1) < 1e-5


def test_generators_in_expert_order():
    assert tuple(GENERATORS) == TASKS


@pytest.mark.parametrize("task", ["defocus", "global_motion", "local_motion", "synth_global_motion"])
def test_blur_keeps_mean_intensity(sharp, task):
    from demoe.degrade import to_linear

    pair = degrade(sharp, task, 3)
    if task == "synth_global_motion":
        # Frames are averaged in linear light: the mean is kept there, not after the gamma.
        assert abs(to_linear(pair.blurry).mean() / to_linear(sharp).mean() - 1) < 0.03
    else:
        assert abs(pair.blurry.mean() / sharp.mean() - 1) < 0.03


def test_low_light_is_dark_and_noisy(sharp):
    pair = degrade(sharp, "low_light", 2)
    assert pair.blurry.mean() < 0.75 * sharp.mean()


def test_psfs():
    for psf in (psf_disk(3.5), psf_gaussian(1.5), psf_trajectory(random_shake_trajectory(np.random.default_rng(0), 15))):
        assert abs(psf.sum() - 1) < 1e-5 and (psf >= 0).all() and psf.shape[0] % 2 == 1
    # A disk is round and its radius grows with the argument.
    assert psf_disk(5).shape[0] > psf_disk(2).shape[0]
    # A centred kernel does not shift the image.
    img = np.zeros((41, 41), np.float32)
    img[20, 20] = 1
    out = convolve(img, psf_trajectory(random_shake_trajectory(np.random.default_rng(1), 12)))
    ys, xs = np.nonzero(out > 0)
    cy, cx = (out[ys, xs] * ys).sum() / out.sum(), (out[ys, xs] * xs).sum() / out.sum()
    assert abs(cy - 20) < 0.6 and abs(cx - 20) < 0.6


def test_user_psf_and_options(sharp):
    psf = np.zeros((5, 5))
    psf[2, :] = 2.0  # unnormalised horizontal line: normalised for the user
    mid = 0.25 + 0.5 * sharp  # away from 0 and 1, so clipping does not eat the noise
    pair = make_pair(mid, psf, 0, noise=0.01)
    expected = convolve(mid, psf / psf.sum())
    assert (pair.blurry - expected).std() == pytest.approx(0.01, rel=0.1)
    jpg = degrade(sharp, "defocus", 0, jpeg=30)
    plain = degrade(sharp, "defocus", 0)
    assert 0 < np.abs(jpg.blurry - plain.blurry).mean() < 0.05
    sat = degrade(sharp, "global_motion", 0, saturate=0.05)
    assert (sat.blurry >= 0.999).mean() > (degrade(sharp, "global_motion", 0).blurry >= 0.999).mean()
    pair = degrade(sharp, "defocus", 0, psf=psf_gaussian(2.0))
    np.testing.assert_allclose(pair.blurry, np.clip(convolve(sharp, psf_gaussian(2.0)), 0, 1), atol=1e-6)


def test_bad_arguments(sharp):
    with pytest.raises(ValueError, match="valid tasks are"):
        degrade(sharp, "fog", 0)
    with pytest.raises(TypeError, match="float images"):
        degrade((sharp * 255).astype(np.uint8), "defocus", 0)
    with pytest.raises(ValueError, match="positive sum"):
        make_pair(sharp, np.zeros((3, 3)))
    sat = make_pair(sharp, psf_gaussian(1.0), 0, saturate=0.05)
    assert (sat.blurry >= 0.999).mean() > (make_pair(sharp, psf_gaussian(1.0), 0).blurry >= 0.999).mean()


def test_read_psf(tmp_path):
    import cv2
    import tifffile

    psf = np.zeros((9, 9), np.float32)
    psf[4, 2:7] = 3.0
    psf[0, 0] = -0.5  # background subtraction leaves negatives: clipped
    tifffile.imwrite(tmp_path / "psf.tif", psf)
    expected = np.clip(psf, 0, None) / 15.0
    np.testing.assert_allclose(read_psf(tmp_path / "psf.tif"), expected, atol=1e-7)
    rgb = np.repeat((expected * 255 / expected.max()).round().astype(np.uint8)[..., None], 3, axis=2)
    cv2.imwrite(str(tmp_path / "psf.png"), rgb)  # a picture of it, in colour
    np.testing.assert_allclose(read_psf(tmp_path / "psf.png"), expected, atol=1e-7)
    tifffile.imwrite(tmp_path / "stack.tif", np.ones((5, 9, 9), np.float32))
    with pytest.raises(ValueError, match=r"stack.tif: a PSF must be one 2-D image, got shape \(5, 9, 9\)"):
        read_psf(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "zero.tif", -np.ones((9, 9), np.float32))
    with pytest.raises(ValueError, match="zero.tif: a PSF needs finite values with a positive sum"):
        read_psf(tmp_path / "zero.tif")


def test_psf_stream_blurs_with_your_psf(sharp):
    photo = np.random.default_rng(0).random((300, 300, 3)).astype(np.float32)
    wide = np.ones((1, 41), np.float32) / 41  # a 41 px horizontal smear: wider than the usual 32 px margin
    ds = PsfPairs([photo], [wide], "local_motion", patch=32, photo_fraction=1.0, seed=2)
    assert ds.margin >= 21
    it = iter(ds)
    for _ in range(12):
        b, s, label = next(it)
        assert label == TASKS.index("local_motion") and b.shape == s.shape == (3, 32, 32)
        # Smeared along x only: far less detail is left across x than across y (noise/JPEG aside).
        dx, dy = (b.diff(dim=2).abs().mean() / s.diff(dim=2).abs().mean(),
                  b.diff(dim=1).abs().mean() / s.diff(dim=1).abs().mean())
        assert dx < 0.5 * dy and dy < 0.5
    with pytest.raises(ValueError, match="valid tasks are"):
        PsfPairs([photo], [wide], "fog")
    # Its crops are its own, not the synthetic stream's with the same seed (nor another PSF stream's).
    crops = [next(iter(cls))[1] for cls in (SyntheticPairs([photo], patch=32, photo_fraction=1.0, seed=2, margin=21),
                                             PsfPairs([photo], [wide], "defocus", patch=32, photo_fraction=1.0, seed=2),
                                             PsfPairs([photo], [wide], "defocus", patch=32, photo_fraction=1.0, seed=2,
                                                      stream=1))]
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[1], crops[2])


def test_dead_leaves_statistics():
    img = dead_leaves(128, np.random.default_rng(3))
    assert img.shape == (128, 128, 3) and 0.2 < img.mean() < 0.8
    assert np.abs(np.diff(img, axis=0)).max() > 0.3  # it has edges


def test_synthetic_stream(sharp):
    photo = np.random.default_rng(0).random((300, 300, 3)).astype(np.float32)
    ds = SyntheticPairs([photo], patch=32, photo_fraction=0.5, seed=1)
    it = iter(ds)
    samples = [next(it) for _ in range(40)]
    labels = {s[2] for s in samples}
    assert labels == set(range(5))
    b, s, _ = samples[0]
    assert b.shape == s.shape == (3, 32, 32) and b.dtype == torch.float32
    again = next(iter(SyntheticPairs([photo], patch=32, photo_fraction=0.5, seed=1)))
    torch.testing.assert_close(again[0], samples[0][0])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="the hang needs fork-started workers")
def test_synthetic_stream_in_forked_workers_after_opencv_and_torch_ran_threaded():
    """A user's own DataLoader over SyntheticPairs, after OpenCV and torch already used
    their thread pools here: OpenCV's pool, resized inside a forked worker, hung about
    every second start. Five fresh workers; a hang fails after the loader's timeout."""
    import cv2

    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        big = np.random.default_rng(0).random((1500, 1500, 3), dtype=np.float32)
        for _ in range(3):
            cv2.GaussianBlur(big, (31, 31), 5)
        torch.nn.functional.conv2d(torch.rand(2, 16, 256, 256), torch.rand(16, 16, 3, 3))
        ds = SyntheticPairs([big[:400, :400]], patch=64, seed=3)
        for start in range(5):
            loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, timeout=60,
                                                 multiprocessing_context="fork")
            batches = [b for _, b in zip(range(2), loader)]
            assert [tuple(b[0].shape) for b in batches] == [(4, 3, 64, 64)] * 2
    finally:
        cv2.setNumThreads(threads)


def test_pair_folder(tmp_path):
    import cv2

    for sub in ("blurry", "sharp"):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "a.png"), np.full((40, 40, 3), 100 if sub == "blurry" else 200, np.uint8))
    b, s, label = next(iter(PairFolder(tmp_path, "global_motion", patch=16)))
    assert label == 1 and b.shape == (3, 16, 16)
    assert torch.allclose(b, torch.full_like(b, 100 / 255)) and torch.allclose(s, torch.full_like(s, 200 / 255))
    with pytest.raises(ValueError, match="valid tasks"):
        PairFolder(tmp_path, "rain")
