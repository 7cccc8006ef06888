"""Synthetic blur for whole batches, made on the training device in torch.

The five generators of :mod:`demoe.degrade`, with the same parameter ranges and
the same noise, JPEG and saturation options, written for a batch of crops at
once so that a GPU makes its own training data. :class:`DeviceBatches` keeps
the sharp photographs resident in device memory (uint8) and, every step, cuts,
turns and degrades a batch there: no worker processes, no host-to-device
copies, no DataLoader for the network to wait on.

Where it differs from the numpy generators, by design:

- a blur is applied by FFT over the whole crop, whose margin of real pixels
  (at least half the kernel wide) keeps the wrap-around out of the patch, so
  the patch is an exact linear convolution (the numpy path reflects at the
  crop's border, equally outside the patch);
- camera-shake kernels come from a bank of random walks made when the stream
  starts and remade every ``refresh`` batches, each drawn in one of its eight
  orientations (the walk is sequential: a bank makes it a few hundred small
  steps for thousands of kernels instead of per image);
- JPEG is simulated the way the codec works (YCbCr, 4:2:0 chroma, 8x8 DCT,
  libjpeg's quality-scaled tables, rounding) rather than run through it.

Every random number comes from one seeded ``torch.Generator`` on the device,
so a stream is reproducible on one device and kind of hardware.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .degrade import GAMMA
from .tasks import TASKS, task_index

#: Side of every blur kernel (pixels, odd); a crop's margin must be at least half of it.
KERNEL = 65

# libjpeg's base quantisation tables (ITU-T T.81, Annex K), row by row.
_LUMA_Q = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
           14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
           49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA_Q = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
             47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32


# -- random numbers -----------------------------------------------------------------------
class RandomDraws:
    """Uniform, normal and integer draws of any shape from one device generator."""

    def __init__(self, gen: torch.Generator, device: torch.device):
        self.gen, self.device = gen, device

    def uniform(self, low, high, *shape) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=self.gen, device=self.device)

    def normal(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device)

    def integers(self, low, high, *shape) -> torch.Tensor:
        """Integers in [low, high) (``high`` may be a tensor of per-row bounds)."""
        u = torch.rand(*shape, generator=self.gen, device=self.device)
        return (low + u * (high - low)).floor().long()

    def chance(self, p: float, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.gen, device=self.device) < p


# -- kernels ----------------------------------------------------------------------------
def disk_psfs(radius: torch.Tensor, softness: torch.Tensor, size: int = KERNEL, supersample: int = 8) -> torch.Tensor:
    """Defocus PSFs ``(n, size, size)``: uniform disks with a soft rim (as ``degrade.psf_disk``)."""
    s = supersample
    ax = (torch.arange(size * s, device=radius.device, dtype=torch.float32) + 0.5) / s - size / 2
    r = torch.hypot(ax[:, None], ax[None, :])
    radius, softness = radius.clamp_min(0.5).view(-1, 1, 1), softness.view(-1, 1, 1)
    fine = ((radius + softness / 2 - r) / softness.clamp_min(1e-3)).clamp(0, 1)
    psf = fine.view(-1, size, s, size, s).mean(dim=(2, 4))
    return psf / psf.sum(dim=(1, 2), keepdim=True)


def splat(points: torch.Tensor, size: int = KERNEL) -> torch.Tensor:
    """Rasterise trajectories ``(n, T, 2)`` (y/x pixels) into PSFs ``(n, size, size)``.

    Bilinear splatting, centred on each trajectory's centre of mass so the blur
    does not shift the image (as ``degrade.psf_trajectory``).
    """
    n = points.shape[0]
    p = (points - points.mean(dim=1, keepdim=True) + size // 2).clamp(0, size - 1.001)
    i0 = p.floor()
    f = p - i0
    i0 = i0.long()
    psf = torch.zeros(n, size * size, device=points.device)
    for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1)):
        w = (f[..., 0] if dy else 1 - f[..., 0]) * (f[..., 1] if dx else 1 - f[..., 1])
        psf.scatter_add_(1, (i0[..., 0] + dy) * size + i0[..., 1] + dx, w)
    psf = psf.view(n, size, size)
    return psf / psf.sum(dim=(1, 2), keepdim=True)


def shake_trajectories(draw: RandomDraws, length: torch.Tensor, samples: int = 256) -> torch.Tensor:
    """Camera-shake random walks with inertia, ``(n, samples, 2)`` (as ``degrade.random_shake_trajectory``)."""
    n = length.shape[0]
    anxiety = draw.uniform(0.05, 0.6, n, 1)
    kicks, jerks, jerk_at = draw.normal(samples, n, 2), draw.normal(samples, n, 2), draw.uniform(0, 1, samples, n, 1)
    v = draw.normal(n, 2)
    v = v / (v.norm(dim=1, keepdim=True) + 1e-12)
    pos = torch.zeros(n, samples, 2, device=length.device)
    p = torch.zeros(n, 2, device=length.device)
    scale = 0.05 / (length.view(n, 1) + 1e-6)
    for t in range(1, samples):
        v = v + anxiety * kicks[t] - scale * p
        v = torch.where(jerk_at[t] < 0.01 * anxiety, -v + jerks[t], v)  # an occasional jerk
        v = v / (v.norm(dim=1, keepdim=True) + 1e-12)
        p = p + v
        pos[:, t] = p
    return pos * (length / max(samples - 1, 1)).view(n, 1, 1)


def linear_trajectories(draw: RandomDraws, length: torch.Tensor, curvature: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
    """Straight or gently curved paths ``(n, T, 2)`` sampled at ``t`` in [-0.5, 0.5] ``(n, T)``."""
    n = length.shape[0]
    angle = draw.uniform(0, math.pi, n, 1)
    along = t * length.view(n, 1)
    bend = curvature.view(n, 1) * draw.normal(n, 1) * along**2 / length.clamp_min(1).view(n, 1)
    c, s = angle.cos(), angle.sin()
    return torch.stack([along * s + bend * c, along * c - bend * s], dim=-1)


def _orient(psf: torch.Tensor, draw: RandomDraws) -> torch.Tensor:
    """Each kernel in one of its eight orientations (flips and transpose), at random."""
    n = psf.shape[0]
    psf = torch.where(draw.chance(0.5, n).view(n, 1, 1), psf.transpose(1, 2), psf)
    psf = torch.where(draw.chance(0.5, n).view(n, 1, 1), psf.flip(1), psf)
    return torch.where(draw.chance(0.5, n).view(n, 1, 1), psf.flip(2), psf)


# -- image operations ---------------------------------------------------------------------
def fft_convolve(images: torch.Tensor, psf: torch.Tensor) -> torch.Tensor:
    """Convolve ``(n, C, H, W)`` with one kernel per image ``(n, k, k)`` (circular at the border)."""
    h, w = images.shape[-2:]
    k = psf.shape[-1]
    padded = images.new_zeros(psf.shape[0], h, w)
    padded[:, :k, :k] = psf
    padded = padded.roll((-(k // 2), -(k // 2)), dims=(1, 2))  # the kernel's centre at (0, 0)
    spectrum = torch.fft.rfft2(images.float()) * torch.fft.rfft2(padded)[:, None]
    return torch.fft.irfft2(spectrum, s=(h, w))


def to_linear(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(0) ** GAMMA


def to_display(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(0) ** (1 / GAMMA)


def saturate(images: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Push each image's brightest ``fraction`` of values above 1 (0: unchanged); see ``degrade._saturate``."""
    rows = (fraction > 0).nonzero().flatten()
    if rows.numel() == 0:
        return images
    chosen, fraction = images[rows], fraction[rows]
    n = chosen.shape[0]
    flat = chosen.reshape(n, -1)
    rank = ((1 - fraction) * (flat.shape[1] - 1)).round().long().clamp(0, flat.shape[1] - 1)
    thr = flat.sort(dim=1).values.gather(1, rank.view(n, 1)).view(n, 1, 1, 1)
    boost = torch.where(chosen > thr, 1.0 + 3.0 * (chosen - thr) / (1 - thr).clamp_min(1e-3), 1.0)
    out = images.clone()
    out[rows] = chosen * boost
    return out


def _dct_matrix(device) -> torch.Tensor:
    k = torch.arange(8, device=device, dtype=torch.float32)
    m = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m


def _quant_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg's quality scaling of the base tables, ``(n, 8, 8)`` each."""
    q = quality.float().clamp(1, 100).view(-1, 1, 1)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    base = torch.tensor([_LUMA_Q, _CHROMA_Q], device=quality.device, dtype=torch.float32).view(2, 1, 8, 8)
    tables = ((base * scale + 50) / 100).floor().clamp(1, 255)
    return tables[0], tables[1]


def _blockwise(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """Quantise ``(n, H, W)`` (level-shifted) in 8x8 DCT blocks with ``(n, 8, 8)`` tables."""
    n, h, w = plane.shape
    blocks = plane.view(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = dct @ blocks @ dct.T
    t = table.view(n, 1, 1, 8, 8)
    blocks = dct.T @ ((coef / t).round() * t) @ dct
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, h, w)


def jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG round trip of ``(n, 3, H, W)`` in [0, 1] at per-image ``quality`` (H, W multiples of 16)."""
    n, _, h, w = images.shape
    if h % 16 or w % 16:
        raise ValueError(f"jpeg() needs sides that are multiples of 16, got {h} x {w}")
    dct = _dct_matrix(images.device)
    luma_t, chroma_t = _quant_tables(quality)
    r, g, b = (images.clamp(0, 1) * 255).round().unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    y = _blockwise(y - 128, luma_t, dct) + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # 4:2:0, as OpenCV writes by default
    chroma = torch.stack([_blockwise(chroma[:, i], chroma_t, dct) for i in range(2)], 1)
    cb, cr = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False).unbind(1)
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return rgb.round().clamp(0, 255) / 255


def soft_masks(draw: RandomDraws, n: int, size: int) -> torch.Tensor:
    """Random soft blobs (ellipses or polygons) covering 5-40 % of the crop, ``(n, 1, size, size)``.

    As ``degrade.random_mask``; drawn at twice the resolution and averaged down,
    which anti-aliases the edge.
    """
    s2 = 2 * size
    area = draw.uniform(0.05, 0.4, n, 1, 1) * s2 * s2
    cy, cx = draw.uniform(0.2, 0.8, n, 1, 1) * s2, draw.uniform(0.2, 0.8, n, 1, 1) * s2
    ax = torch.arange(s2, device=draw.device, dtype=torch.float32) + 0.5
    yy, xx = ax.view(1, s2, 1) - cy, ax.view(1, 1, s2) - cx
    # Ellipse: axes a, b of the drawn area and ratio, turned by a random angle.
    ratio = draw.uniform(0.4, 2.5, n, 1, 1)
    a = (area / math.pi * ratio).sqrt().clamp_min(4)
    b = (area / (math.pi * a)).clamp_min(4)
    th = draw.uniform(0, math.pi, n, 1, 1)
    u, v = xx * th.cos() + yy * th.sin(), -xx * th.sin() + yy * th.cos()
    ellipse = (u / a) ** 2 + (v / b) ** 2 <= 1
    # Polygon: 3-8 vertices at sorted random angles around the centre (crossing-number test).
    k = draw.integers(3, 9, n)
    used = torch.arange(8, device=draw.device).view(1, 8) < k.view(n, 1)
    ang = torch.where(used, draw.uniform(0, 2 * math.pi, n, 8), 10.0).sort(dim=1).values  # k angles, sorted
    rad = (area.view(n, 1) / math.pi).sqrt() * draw.uniform(0.6, 1.4, n, 8)
    last = (k - 1).view(n, 1)
    ang = torch.where(used, ang, ang.gather(1, last))  # unused vertices repeat the last: empty edges
    rad = torch.where(used, rad, rad.gather(1, last))
    px, py = (rad * ang.cos()).view(n, 8, 1, 1), (rad * ang.sin()).view(n, 8, 1, 1)
    qx, qy = px.roll(-1, dims=1), py.roll(-1, dims=1)  # the last edge (from a repeat of the last vertex) closes it
    yy, xx = yy.unsqueeze(1), xx.unsqueeze(1)
    crosses = ((py > yy) != (qy > yy)) & (xx < (qx - px) * (yy - py) / (qy - py + 1e-12) + px)
    polygon = crosses.sum(dim=1) % 2 == 1
    mask = torch.where(draw.chance(0.5, n).view(n, 1, 1), ellipse, polygon).float()
    return F.avg_pool2d(mask.unsqueeze(1), 2)


# -- the five generators, batched ---------------------------------------------------------
class BatchGenerators:
    """The task generators on ``(n, 3, S, S)`` sharp crops (already saturated where asked)."""

    def __init__(self, draw: RandomDraws, bank: int, refresh: int):
        self.draw, self.bank_size, self.refresh = draw, bank, refresh
        self.calls = 0
        self._remake_banks()

    def _remake_banks(self) -> None:
        d, n = self.draw, self.bank_size
        self.shake = splat(shake_trajectories(d, d.uniform(4.0, 25.0, n)))
        dim = d.uniform(0.0, 10.0, n)  # low light's short shake; under 1 px: no blur
        short = splat(shake_trajectories(d, dim))
        delta = torch.zeros_like(short)
        delta[:, KERNEL // 2, KERNEL // 2] = 1
        self.short = torch.where((dim >= 1).view(n, 1, 1), short, delta)

    def tick(self) -> None:
        self.calls += 1
        if self.refresh and self.calls % self.refresh == 0:
            self._remake_banks()

    def _from_bank(self, bank: torch.Tensor, n: int) -> torch.Tensor:
        return _orient(bank[self.draw.integers(0, bank.shape[0], n)], self.draw)

    def defocus(self, x):
        d, n = self.draw, x.shape[0]
        psf = disk_psfs(d.uniform(1.0, 6.0, n), d.uniform(0.3, 1.5, n))
        return fft_convolve(x, psf)

    def global_motion(self, x):
        return fft_convolve(x, self._from_bank(self.shake, x.shape[0]))

    def local_motion(self, x):
        d, n, size = self.draw, x.shape[0], x.shape[-1]
        objects = d.integers(1, 4, n)
        out = x
        for j in range(3):  # at most three moving objects; an image with fewer gets empty masks
            mask = soft_masks(d, n, size) * (j < objects).float().view(n, 1, 1, 1)
            t = torch.linspace(-0.5, 0.5, 128, device=x.device).expand(n, 128)
            psf = splat(linear_trajectories(d, d.uniform(5.0, 30.0, n), d.uniform(0, 0.5, n), t))
            smeared = fft_convolve(torch.cat([out * mask, mask], dim=1), psf)
            out = smeared[:, :3] + out * (1 - smeared[:, 3:])
        return out

    def synth_global_motion(self, x):
        """Warped copies along a smooth path, averaged in linear light (the target: the middle frame)."""
        d, n, size = self.draw, x.shape[0], x.shape[-1]
        most = 13
        frames = d.integers(5, most + 1, n)
        slot = torch.arange(most, device=x.device).view(1, most)
        t = (slot / (frames.view(n, 1) - 1).clamp_min(1) - 0.5).clamp(max=0.5)  # per image: linspace(-.5, .5)
        path = linear_trajectories(d, d.uniform(3.0, 20.0, n), d.uniform(0, 1, n), t)
        rot = torch.deg2rad(d.uniform(-1.5, 1.5, n, 1) * t)
        scl = 1 + d.uniform(-0.02, 0.02, n, 1) * t
        linear = to_linear(x)
        acc = torch.zeros_like(linear)
        ax = torch.arange(size, device=x.device, dtype=torch.float32) - (size - 1) / 2
        gy, gx = ax.view(1, size, 1), ax.view(1, 1, size)
        for j in range(most):
            # cv2.warpAffine's forward map about the centre: rotate by r, scale by s, shift by (dx, dy);
            # grid_sample needs the inverse, the source of every output pixel.
            r, s = rot[:, j].view(n, 1, 1), scl[:, j].view(n, 1, 1)
            dy, dx = path[:, j, 0].view(n, 1, 1), path[:, j, 1].view(n, 1, 1)
            ux, uy = gx - dx, gy - dy
            sx = (r.cos() * ux - r.sin() * uy) / s
            sy = (r.sin() * ux + r.cos() * uy) / s
            grid = torch.stack([2 * sx / size, 2 * sy / size], dim=-1)  # align_corners=False coordinates
            warped = F.grid_sample(linear, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            acc = acc + warped * (j < frames).float().view(n, 1, 1, 1)
        return to_display(acc / frames.view(n, 1, 1, 1))

    def low_light(self, x):
        """Under-exposed in linear light, a short shake, Poisson and read noise, stored with the gamma."""
        d, n = self.draw, x.shape[0]
        linear = fft_convolve(to_linear(x), self._from_bank(self.short, n)) * d.uniform(0.03, 0.25, n, 1, 1, 1)
        peak = d.uniform(30.0, 300.0, n, 1, 1, 1)
        linear = torch.poisson(linear.clamp_min(0) * peak, generator=d.gen) / peak
        linear = linear + d.normal(*linear.shape) * d.uniform(0.002, 0.02, n, 1, 1, 1)
        return to_display(linear)


# -- the stream ------------------------------------------------------------------------------
class DeviceBatches:
    """Endless seeded batches of ``(blurry, sharp, label)`` degraded on ``device``.

    Parameters
    ----------
    images : list of ndarray
        Sharp RGB photographs, float in [0, 1] or uint8 ``(H, W, 3)``; kept on
        the device as uint8. Those smaller than a crop are left out.
    patch, batch : int
        Patch side and patches per batch (the patch a multiple of 16).
    device : str or torch.device
    photo_fraction : float
        Share of crops cut from ``images``; the rest from procedural dead-leaves
        images (``leaves`` of them, made when the stream starts).
    tasks : sequence of str
        Tasks to draw; every batch holds them in equal shares, grouped by task.
    seed : int
    margin : int
        Real pixels around the patch, at least half a kernel (32).
    bank, refresh : int
        Camera-shake kernels kept, and batches between remaking them.

    Each item is ``(blurry, sharp, label)``: two ``(batch, 3, patch, patch)``
    float tensors in [0, 1] and a ``(batch,)`` tensor of task indices, all on
    ``device``, as a DataLoader over :class:`demoe.data.SyntheticPairs` gives.
    """

    def __init__(self, images: Sequence[np.ndarray], patch: int = 128, batch: int = 64, *,
                 device: str | torch.device = "cpu", photo_fraction: float = 0.8, tasks: Sequence[str] = TASKS,
                 seed: int = 0, margin: int = KERNEL // 2, leaves: int = 16, bank: int = 2048, refresh: int = 250):
        if patch % 16:
            raise ValueError(f"patch must be a multiple of 16 for on-device data, got {patch}")
        if margin < KERNEL // 2 or margin % 8:
            raise ValueError(f"margin must be a multiple of 8 and at least {KERNEL // 2}, got {margin}")
        self.patch, self.batch, self.margin = int(patch), int(batch), int(margin)
        self.crop = self.patch + 2 * self.margin
        self.device = torch.device(device)
        self.labels = [task_index(t) for t in tasks]
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed) % (2**63))
        self.draw = RandomDraws(gen, self.device)
        from .data import large_enough

        photos = [_as_uint8(im) for im in large_enough(images, self.patch, self.margin)]
        self.n_photos = len(photos)
        self.photo_fraction = float(photo_fraction) if photos else 0.0
        if self.photo_fraction < 1:
            from .data import dead_leaves

            rng = np.random.default_rng([int(seed), 4000])
            side = max(2 * self.crop, 256)
            photos += [_as_uint8(dead_leaves(side, rng)) for _ in range(max(int(leaves), 1))]
        self.n_leaves = len(photos) - self.n_photos
        self.bank, self.sizes = _pack(photos, self.device)
        self.generators = BatchGenerators(self.draw, int(bank), int(refresh))
        # Equal shares of the tasks, grouped so that each expert sees one slice of the batch.
        order = sorted(self.labels[i % len(self.labels)] for i in range(self.batch))
        self.label = torch.tensor(order, device=self.device)
        self.slices = [(t, order.index(t), len(order) - order[::-1].index(t)) for t in sorted(set(order))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            yield self.sample()

    @torch.no_grad()
    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, n = self.draw, self.batch
        sharp = self._crops(n)
        noise = torch.where(d.chance(0.3, n), d.uniform(0, 0.02, n), 0.0)
        quality = torch.where(d.chance(0.2, n), d.integers(60, 96, n).float(), 0.0)
        fraction = torch.where(d.chance(0.1, n), d.uniform(0.001, 0.02, n), 0.0)
        source = saturate(sharp, fraction)
        blurry = torch.empty_like(sharp)
        for task, start, stop in self.slices:
            blurry[start:stop] = getattr(self.generators, TASKS[task])(source[start:stop])
        self.generators.tick()
        blurry = (blurry + d.normal(*blurry.shape) * noise.view(n, 1, 1, 1)).clamp(0, 1)
        compressed = (quality > 0).nonzero().flatten()
        if compressed.numel():
            blurry[compressed] = jpeg(blurry[compressed], quality[compressed])
        m, p = self.margin, self.patch
        cut = (slice(None), slice(None), slice(m, m + p), slice(m, m + p))
        return blurry[cut].contiguous(), sharp[cut].clamp(0, 1).contiguous(), self.label.clone()

    def _crops(self, n: int) -> torch.Tensor:
        """``n`` sharp crops with margin, each turned to one of its eight orientations."""
        d, size = self.draw, self.crop
        photo = d.integers(0, max(self.n_photos, 1), n)
        leaf = self.n_photos + d.integers(0, max(self.n_leaves, 1), n)
        idx = torch.where(d.chance(self.photo_fraction, n), photo, leaf) if self.n_leaves else photo
        h, w = self.sizes[idx, 0], self.sizes[idx, 1]
        y0, x0 = d.integers(0, h - size + 1, n), d.integers(0, w - size + 1, n)
        ar = torch.arange(size, device=self.device)
        rows, cols = (y0.view(n, 1) + ar).view(n, size, 1), (x0.view(n, 1) + ar).view(n, 1, size)
        crops = self.bank[idx.view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2).float() / 255
        crops = torch.where(d.chance(0.5, n).view(n, 1, 1, 1), crops.transpose(2, 3), crops)
        crops = torch.where(d.chance(0.5, n).view(n, 1, 1, 1), crops.flip(2), crops)
        return torch.where(d.chance(0.5, n).view(n, 1, 1, 1), crops.flip(3), crops)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(np.asarray(image, np.float32) * 255), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def _pack(images: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of any sizes in one zero-padded uint8 tensor ``(N, 3, H, W)``, and their sizes ``(N, 2)``."""
    hmax = max(im.shape[0] for im in images)
    wmax = max(im.shape[1] for im in images)
    bank = torch.zeros(len(images), 3, hmax, wmax, dtype=torch.uint8, device=device)
    for i, im in enumerate(images):
        bank[i, :, : im.shape[0], : im.shape[1]] = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)))
    sizes = torch.tensor([im.shape[:2] for im in images], device=device)
    return bank, sizes
