"""Shared by the restoration benchmarks (quality.py, ood.py): test crops, classical deconvolution, scores."""

from __future__ import annotations

import numpy as np
from skimage import data, metrics, restoration


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
