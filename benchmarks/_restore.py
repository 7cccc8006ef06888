"""Shared by the restoration benchmarks (quality.py, ood.py): test crops, the classical methods, their
tuning on a separate set, scores.

The classical methods are the reference DeMoE is measured against, so each gets its best
setting: :func:`tune` picks it from the method's grid in :data:`CLASSICAL` by mean PSNR on
tuning cases (other photographs, other seeds), never on the reported ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from skimage import data, filters, metrics, restoration

from demoe.degrade import to_display, to_linear

#: Grids the classical methods' settings are chosen from (:func:`tune`).
RL_ITERATIONS = (2, 3, 5, 10, 20, 30, 50)  # tried 80 and 120: +0.03 and -0.03 dB on ood.py's Gaussian, the only family that wanted 50
WIENER_BALANCES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
UNSHARP_SIGMAS, UNSHARP_AMOUNTS = (0.5, 1.0, 2.0, 4.0), (0.1, 0.25, 0.5, 1.0)
UNSHARP_SETTINGS = tuple((sigma, amount) for sigma in UNSHARP_SIGMAS for amount in UNSHARP_AMOUNTS)
#: :func:`exposure_denoise`'s target mean brightness in linear light, and its total-variation weight.
EXPOSURE_TARGETS, TV_WEIGHTS = (0.1, 0.18, 0.3, 0.45), (0.05, 0.1, 0.2, 0.4)
EXPOSURE_DENOISE_SETTINGS = tuple((target, weight) for target in EXPOSURE_TARGETS for weight in TV_WEIGHTS)


def photo(name: str) -> np.ndarray:
    """A scikit-image bundled photo as float RGB in [0, 1] (gray repeated; a stereo pair's left view)."""
    img = getattr(data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].astype(np.float32) / 255.0


def crop(img: np.ndarray, size: int, y: int | None = None, x: int | None = None) -> np.ndarray:
    """A ``size`` px square of ``img`` from corner (y, x); None centres the crop on that axis."""
    h, w = img.shape[:2]
    y = (h - size) // 2 if y is None else y
    x = (w - size) // 2 if x is None else x
    if not (0 <= y <= h - size and 0 <= x <= w - size):
        raise ValueError(f"a {size} px crop at ({y}, {x}) does not fit in an image of {h} x {w} px")
    return np.ascontiguousarray(img[y : y + size, x : x + size])


def per_channel(fn, image):
    return np.stack([fn(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def _reflect_padded(fn, image, psf):
    """``fn(channel)`` per channel on a float64 copy reflect-padded by the PSF's size, cropped back.

    scikit-image's deconvolutions assume zero (Richardson-Lucy) or periodic
    (Wiener) borders; without padding, border ringing dominates a 256 px crop.
    """
    pad = max(psf.shape)
    padded = np.pad(image.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return per_channel(fn, padded)[pad:-pad, pad:-pad]


def richardson_lucy(image, psf, iterations: int):
    """Richardson-Lucy deconvolution of ``(H, W, C)`` ``image`` by the true ``psf``.

    In float64: in float32 the FFT convolution's round-off (about 1e-7) outweighs
    scikit-image's 1e-12 guard against division by zero, and RL blows up on
    images with black regions (hubble_deep_field: 30.6 dB in float64, 11.4 in float32).
    """
    psf = psf.astype(np.float64)
    return _reflect_padded(lambda c: restoration.richardson_lucy(c, psf, num_iter=iterations, clip=True), image, psf)


def wiener(image, psf, balance: float):
    """Wiener deconvolution of ``(H, W, C)`` ``image`` by the true ``psf``."""
    psf = psf.astype(np.float64)
    return _reflect_padded(lambda c: restoration.wiener(c, psf, balance=balance, clip=True), image, psf)


def scores(restored, sharp):
    """PSNR (dB) and SSIM of ``restored`` (clipped to [0, 1]) against ``sharp``."""
    restored = np.clip(restored, 0, 1)
    psnr = metrics.peak_signal_noise_ratio(sharp, restored, data_range=1.0)
    ssim = metrics.structural_similarity(sharp, restored, data_range=1.0, channel_axis=-1)
    return psnr, ssim


def unsharp(image, sigma: float, amount: float):
    """Unsharp masking, ``x + amount * (x - G_sigma * x)``.

    (skimage.filters.unsharp_mask returned values of 1e30 on some of these
    float crops with scikit-image 0.26, so the formula is applied directly.)
    """
    blurred = filters.gaussian(image.astype(np.float64), sigma=sigma, channel_axis=-1)
    return image + amount * (image - blurred)


def exposure_denoise(image, target: float, weight: float):
    """The low-light baseline: exposure and gamma correction, then denoising.

    In linear light (the display gamma undone) the image gets the gain that
    brings its mean to ``target``, goes back through the display gamma, and is
    denoised by total variation (``skimage.restoration.denoise_tv_chambolle``
    with ``weight``, each channel alone).
    """
    linear = to_linear(image.astype(np.float64))
    bright = to_display(np.clip(linear * (target / max(float(linear.mean()), 1e-6)), 0, 1))
    return restoration.denoise_tv_chambolle(bright, weight=weight, channel_axis=-1)


#: Method -> (restore(case, setting), the grid its setting is tuned on). A case has ``blurry``,
#: ``sharp`` and ``psf`` (the deconvolutions are given the true PSF).
CLASSICAL = {
    "richardson_lucy": (lambda c, n: richardson_lucy(c.blurry, c.psf, n), RL_ITERATIONS),
    "wiener": (lambda c, b: wiener(c.blurry, c.psf, b), WIENER_BALANCES),
    "unsharp_mask": (lambda c, s: unsharp(c.blurry, *s), UNSHARP_SETTINGS),
    "exposure_denoise": (lambda c, s: exposure_denoise(c.blurry, *s), EXPOSURE_DENOISE_SETTINGS),
}


def classical(method: str, case, setting):
    """``case`` restored by the classical ``method`` (a key of :data:`CLASSICAL`) with ``setting``."""
    return CLASSICAL[method][0](case, setting)


def mean_psnr(cases: Sequence, restore) -> float:
    """Mean PSNR of ``restore(case)`` against each case's sharp image."""
    return float(np.mean([scores(restore(c), c.sharp)[0] for c in cases]))


def best_setting(cases: Sequence, method: str) -> tuple[Any, float]:
    """``(setting, mean PSNR)`` of the setting in ``method``'s grid with the best mean PSNR on ``cases``
    (ties go to the first)."""
    restore, grid = CLASSICAL[method]
    psnr = [mean_psnr(cases, lambda c, s=s: restore(c, s)) for s in grid]
    best = int(np.argmax(psnr))
    return grid[best], psnr[best]


def tune(groups: Mapping[str, Sequence], methods: Sequence[str] | Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    """Per group of tuning cases (a blur family or task), each method's setting of best mean PSNR on it.

    ``methods``: method names (keys of :data:`CLASSICAL`) for every group, or group -> names.
    """
    return {group: {m: best_setting(cases, m)[0] for m in (methods[group] if isinstance(methods, Mapping) else methods)}
            for group, cases in groups.items()}
