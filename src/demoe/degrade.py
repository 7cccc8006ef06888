"""Synthetic blur: one seeded generator per DeMoE task.

Every generator takes a sharp float image in [0, 1] (``(H, W)`` or
``(H, W, C)``) and a :class:`numpy.random.Generator`, and returns a
:class:`Degraded` record: the degraded image, the sharp target, the task label
and, where the blur is one kernel for the whole image, the PSF.

=====================  ==========================================================
task                   what it simulates
=====================  ==========================================================
defocus                a lens out of focus: disk PSF with soft edge (or your PSF)
global_motion          camera shake: a random-walk trajectory as the kernel
local_motion           moving objects blurred by their own kernels, sharp background
synth_global_motion    GoPro-style: several warped frames averaged in linear light
low_light              under-exposure + Poisson-Gaussian noise + mild blur;
                       the target is the normally exposed sharp image
=====================  ==========================================================

Options shared by all generators: ``noise`` (Gaussian sigma added at the
end), ``jpeg`` (quality 1-100 for JPEG-like compression), ``saturate``
(fraction of brightest pixels pushed over 1 before blurring, clipped after,
which gives the bright streaks of real night shots).

References
----------
.. [1] Boracchi & Foi, "Modeling the performance of image restoration from
   motion blur", IEEE TIP 2012 (random-walk camera-shake trajectories).
.. [2] Nah et al., "Deep multi-scale CNN for dynamic scene deblurring",
   CVPR 2017 (GoPro: averaging of high-frame-rate frames).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .tasks import TASKS, task_index

#: Display gamma used to move between stored (sRGB-like) and linear intensity.
GAMMA = 2.2


@dataclass
class Degraded:
    """A training pair: ``blurry`` -> ``sharp``, of task ``task`` (PSF if uniform)."""

    blurry: np.ndarray
    sharp: np.ndarray
    task: str
    psf: np.ndarray | None = None

    @property
    def label(self) -> int:
        return TASKS.index(self.task)


# -- PSFs ----------------------------------------------------------------------------
def psf_disk(radius: float, *, softness: float = 0.5, supersample: int = 8) -> np.ndarray:
    """Defocus PSF: a uniform disk of ``radius`` pixels with an anti-aliased rim.

    ``softness`` (pixels) widens the rim like a real lens's apodisation.
    """
    radius = max(float(radius), 0.5)
    half = int(np.ceil(radius + softness + 1))
    n = 2 * half + 1
    s = supersample
    ax = (np.arange(n * s) + 0.5) / s - n / 2
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    r = np.hypot(yy, xx)
    fine = np.clip((radius + softness / 2 - r) / max(softness, 1e-3), 0, 1)
    psf = fine.reshape(n, s, n, s).mean(axis=(1, 3))
    return (psf / psf.sum()).astype(np.float32)


def psf_gaussian(sigma: float) -> np.ndarray:
    """Isotropic Gaussian PSF (out-of-focus microscope-like)."""
    half = max(int(np.ceil(3 * sigma)), 1)
    ax = np.arange(-half, half + 1)
    g = np.exp(-(ax**2) / (2 * max(sigma, 1e-3) ** 2))
    psf = np.outer(g, g)
    return (psf / psf.sum()).astype(np.float32)


def psf_trajectory(points: np.ndarray, size: int | None = None) -> np.ndarray:
    """Rasterise a 2-D trajectory (``(T, 2)``, y/x pixels) into a motion PSF.

    Each point is splatted bilinearly; the kernel is centred on the
    trajectory's centre of mass so the blur does not shift the image.
    """
    pts = np.asarray(points, dtype=np.float64)
    pts = pts - pts.mean(axis=0)
    extent = int(np.ceil(np.abs(pts).max())) + 2
    half = extent if size is None else size // 2
    n = 2 * half + 1
    psf = np.zeros((n, n), np.float64)
    p = np.clip(pts + half, 0, n - 1.001)
    i0 = np.floor(p).astype(int)
    f = p - i0
    for (dy, dx), wy, wx in (((0, 0), 1 - f[:, 0], 1 - f[:, 1]), ((1, 0), f[:, 0], 1 - f[:, 1]),
                             ((0, 1), 1 - f[:, 0], f[:, 1]), ((1, 1), f[:, 0], f[:, 1])):
        np.add.at(psf, (i0[:, 0] + dy, i0[:, 1] + dx), wy * wx)
    return (psf / psf.sum()).astype(np.float32)


def random_shake_trajectory(rng: np.random.Generator, length: float, samples: int = 256,
                            anxiety: float | None = None) -> np.ndarray:
    """Camera-shake trajectory: a random walk with inertia (Boracchi & Foi [1]_).

    ``length`` is the path length in pixels; ``anxiety`` (0..1) how erratic
    the shake is (default: drawn at random).
    """
    anxiety = rng.uniform(0.05, 0.6) if anxiety is None else anxiety
    v = rng.normal(size=2)
    v /= np.linalg.norm(v) + 1e-12
    pos = np.zeros((samples, 2))
    for t in range(1, samples):
        v = v + anxiety * rng.normal(size=2) - 0.05 * pos[t - 1] / (length + 1e-6)
        if rng.random() < 0.01 * anxiety:  # an occasional jerk
            v = -v + rng.normal(size=2)
        v /= np.linalg.norm(v) + 1e-12
        pos[t] = pos[t - 1] + v
    step = length / max(samples - 1, 1)
    return pos * step


def random_linear_trajectory(rng: np.random.Generator, length: float, curvature: float = 0.0,
                             samples: int = 128) -> np.ndarray:
    """A straight (or gently curved) motion path of ``length`` pixels."""
    angle = rng.uniform(0, np.pi)
    t = np.linspace(-0.5, 0.5, samples) * length
    bend = curvature * rng.normal() * (t**2) / max(length, 1)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([t * s + bend * c, t * c - bend * s], axis=1)


# -- image operations -------------------------------------------------------------------
def convolve(image: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Convolve every channel with ``psf`` (true convolution, reflective borders)."""
    kernel = np.ascontiguousarray(psf[::-1, ::-1], dtype=np.float32)
    out = cv2.filter2D(np.ascontiguousarray(image, dtype=np.float32), -1, kernel,
                       borderType=cv2.BORDER_REFLECT_101)
    return out.reshape(image.shape)


def to_linear(image: np.ndarray) -> np.ndarray:
    return np.power(np.clip(image, 0, None), GAMMA)


def to_display(image: np.ndarray) -> np.ndarray:
    return np.power(np.clip(image, 0, None), 1 / GAMMA)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return image + rng.normal(0.0, sigma, image.shape).astype(np.float32)


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through OpenCV's JPEG codec at ``quality`` (8-bit, per image)."""
    u8 = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV failure
        raise RuntimeError("JPEG encoding failed")
    dec = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return (dec.astype(np.float32) / 255.0).reshape(image.shape)


def _saturate(image: np.ndarray, fraction: float) -> np.ndarray:
    """Push the brightest ``fraction`` of pixels above 1 (clipped after blurring)."""
    if fraction <= 0:
        return image
    thr = np.quantile(image, 1 - fraction)
    boost = np.where(image > thr, 1.0 + 3.0 * (image - thr) / max(1 - thr, 1e-3), 1.0)
    return image * boost.astype(np.float32)


def _finish(blurry, sharp, task, psf, rng, noise=0.0, jpeg=None) -> Degraded:
    if noise:
        blurry = add_noise(blurry, noise, rng)
    blurry = np.clip(blurry, 0, 1).astype(np.float32)
    if jpeg:
        blurry = jpeg_compress(blurry, jpeg)
    return Degraded(blurry, np.clip(sharp, 0, 1).astype(np.float32), task, psf)


def _as_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype.kind not in "f":
        raise TypeError(f"degradations take float images in [0, 1], got dtype {image.dtype}")
    return image.astype(np.float32, copy=False)


# -- the five generators ---------------------------------------------------------------
def defocus(sharp, rng, *, psf=None, radius=(1.0, 6.0), noise=0.0, jpeg=None, saturate=0.0) -> Degraded:
    """Out-of-focus blur with a disk PSF of random radius, or the PSF you pass."""
    sharp = _as_float(sharp)
    if psf is None:
        psf = psf_disk(rng.uniform(*radius), softness=rng.uniform(0.3, 1.5))
    blurry = convolve(_saturate(sharp, saturate), psf)
    return _finish(blurry, sharp, "defocus", psf, rng, noise, jpeg)


def global_motion(sharp, rng, *, psf=None, length=(4.0, 25.0), noise=0.0, jpeg=None, saturate=0.0) -> Degraded:
    """Camera shake: one random-walk kernel over the whole image."""
    sharp = _as_float(sharp)
    if psf is None:
        psf = psf_trajectory(random_shake_trajectory(rng, rng.uniform(*length)))
    blurry = convolve(_saturate(sharp, saturate), psf)
    return _finish(blurry, sharp, "global_motion", psf, rng, noise, jpeg)


def random_mask(shape, rng) -> np.ndarray:
    """A soft random blob (ellipse or polygon) covering 5-40 % of the image."""
    h, w = shape
    mask = np.zeros((h, w), np.float32)
    area = rng.uniform(0.05, 0.4) * h * w
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    if rng.random() < 0.5:
        ratio = rng.uniform(0.4, 2.5)
        a = np.sqrt(area / np.pi * ratio)
        b = area / (np.pi * a)
        cv2.ellipse(mask, (int(cx), int(cy)), (max(int(a), 2), max(int(b), 2)),
                    rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
    else:
        k = rng.integers(3, 9)
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = np.sqrt(area / np.pi) * rng.uniform(0.6, 1.4, k)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1.0, cv2.LINE_AA)
    return mask


def local_motion(sharp, rng, *, objects=(1, 3), length=(5.0, 30.0), noise=0.0, jpeg=None,
                 saturate=0.0) -> Degraded:
    """Moving objects: regions blurred with their own kernels over a sharp background.

    Each object is a soft-masked region of the image itself; it and its mask
    are smeared by the same motion kernel, then laid over the background
    (the correct model for an object moving in front of a still scene).
    """
    sharp = _as_float(sharp)
    out = _saturate(sharp, saturate).copy()
    chan = (lambda m: m[..., None]) if sharp.ndim == 3 else (lambda m: m)
    for _ in range(rng.integers(objects[0], objects[1] + 1)):
        mask = random_mask(sharp.shape[:2], rng)
        traj = random_linear_trajectory(rng, rng.uniform(*length), curvature=rng.uniform(0, 0.5))
        psf = psf_trajectory(traj)
        layer = convolve(out * chan(mask), psf)
        alpha = convolve(mask, psf)
        out = layer + out * chan(1.0 - alpha)
    return _finish(out, sharp, "local_motion", None, rng, noise, jpeg)


def synth_global_motion(sharp, rng, *, frames=(5, 13), shift=(3.0, 20.0), rotation=1.5, zoom=0.02,
                        noise=0.0, jpeg=None, saturate=0.0) -> Degraded:
    """GoPro-style blur: warped copies along a smooth path, averaged in linear light.

    The frames follow a smooth path of ``shift`` pixels with small rotations
    (degrees) and zooms; the sharp target is the middle frame.
    """
    sharp = _as_float(sharp)
    h, w = sharp.shape[:2]
    n = int(rng.integers(frames[0], frames[1] + 1))
    t = np.linspace(-0.5, 0.5, n)
    path = random_linear_trajectory(rng, rng.uniform(*shift), curvature=rng.uniform(0, 1), samples=n)
    rot = rng.uniform(-rotation, rotation) * t
    scl = 1 + rng.uniform(-zoom, zoom) * t
    linear = to_linear(_saturate(sharp, saturate))
    acc = np.zeros_like(linear)
    for (dy, dx), r, s in zip(path, rot, scl):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), float(r), float(s))
        m[:, 2] += (dx, dy)
        acc += cv2.warpAffine(linear, m, (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101).reshape(linear.shape)
    blurry = to_display(acc / n)
    return _finish(blurry, sharp, "synth_global_motion", None, rng, noise, jpeg)


def low_light(sharp, rng, *, psf=None, exposure=(0.03, 0.25), photons=(30.0, 300.0), read_noise=(0.002, 0.02),
              blur=(0.0, 10.0), noise=0.0, jpeg=None, saturate=0.0) -> Degraded:
    """Under-exposed, noisy, slightly blurred shot; the target is well exposed.

    In linear light the image is scaled by ``exposure``, blurred by a short
    shake (or your PSF), then given Poisson noise (``photons`` at full scale)
    and Gaussian read noise, and stored with the display gamma.
    """
    sharp = _as_float(sharp)
    if psf is None:
        length = rng.uniform(*blur)
        psf = psf_trajectory(random_shake_trajectory(rng, length)) if length >= 1 else np.ones((1, 1), np.float32)
    linear = convolve(to_linear(_saturate(sharp, saturate)), psf) * rng.uniform(*exposure)
    peak = rng.uniform(*photons)
    linear = rng.poisson(np.clip(linear, 0, None) * peak).astype(np.float32) / peak
    linear = add_noise(linear, rng.uniform(*read_noise), rng)
    return _finish(to_display(linear), sharp, "low_light", psf, rng, noise, jpeg)


#: Generators in expert order, keyed by task name.
GENERATORS = {
    "defocus": defocus,
    "global_motion": global_motion,
    "local_motion": local_motion,
    "synth_global_motion": synth_global_motion,
    "low_light": low_light,
}
assert tuple(GENERATORS) == TASKS


def degrade(sharp: np.ndarray, task: str, rng: np.random.Generator | int | None = None, **options) -> Degraded:
    """Degrade ``sharp`` with the generator of ``task`` (see the module table).

    Parameters
    ----------
    sharp : ndarray, float in [0, 1], ``(H, W)`` or ``(H, W, C)``
    task : str
        One of :data:`demoe.TASKS`.
    rng : Generator or int, optional
        Seed or generator; the same seed gives the same degradation.
    **options
        Passed to the generator (``psf=``, ``noise=``, ``jpeg=``, ``saturate=``...).

    Examples
    --------
    >>> import numpy as np
    >>> from demoe.degrade import degrade
    >>> pair = degrade(np.random.default_rng(0).random((64, 64, 3), np.float32), "defocus", 0)
    >>> pair.blurry.shape, pair.task
    ((64, 64, 3), 'defocus')
    """
    task_index(task)
    return GENERATORS[task](sharp, np.random.default_rng(rng), **options)


def make_pair(sharp: np.ndarray, psf: np.ndarray, rng=None, *, task: str = "defocus", noise: float = 0.0,
              jpeg: int | None = None, saturate: float = 0.0) -> Degraded:
    """A training pair from your own PSF (e.g. a measured microscope PSF)."""
    psf = np.asarray(psf, dtype=np.float32)
    if psf.ndim != 2 or psf.sum() <= 0:
        raise ValueError(f"psf must be a 2-D array with a positive sum, got shape {psf.shape}")
    rng = np.random.default_rng(rng)
    sharp = _as_float(sharp)
    blurry = convolve(_saturate(sharp, saturate), psf / psf.sum())
    return _finish(blurry, sharp, task, psf / psf.sum(), rng, noise, jpeg)
