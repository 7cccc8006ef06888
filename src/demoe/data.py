"""Training data: sharp images from folders or the dead-leaves model, degraded on the fly.

``SyntheticPairs`` is an endless, seeded stream of ``(blurry, sharp, label)``
patches: each draws a sharp patch (a photograph from the given folders with
probability ``photo_fraction``, else a procedural dead-leaves image), a task
uniformly, and that task's generator from :mod:`demoe.degrade`.
``PairFolder`` reads real (blurry, sharp) pairs for fine-tuning.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch

from .degrade import GENERATORS, make_pair
from .files import natural_key, read_image
from .tasks import TASKS, task_index

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def list_images(folders: Sequence[str | Path], recursive: bool = True) -> list[Path]:
    """Image files under ``folders``, in natural order."""
    files = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_file():
            files.append(folder)
            continue
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        pattern = "**/*" if recursive else "*"
        files += [p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=natural_key)


def read_rgb(path: str | Path) -> np.ndarray:
    """Read a picture (:func:`demoe.files.read_image`) as float32 RGB in [0, 1].

    8- or 16-bit; gray is replicated, alpha dropped, and of a stack (a
    multi-page TIFF) the first plane is taken. ValueError for other data.
    """
    img = read_image(path)  # ValueError if it cannot be read
    data, axis = img.data, img.channel_axis
    if axis == "auto":  # .npy: a last axis of 3 or 4 is colour
        axis = data.ndim - 1 if data.ndim >= 3 and data.shape[-1] in (3, 4) else None
    data = data[..., None] if axis is None else np.moveaxis(data, axis, -1)
    data = data.reshape(-1, *data.shape[-3:])[0]
    if data.dtype not in (np.uint8, np.uint16) or data.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{Path(path).name}: a training picture must be 8- or 16-bit gray, RGB or RGBA; got "
                         f"{data.dtype} with {data.shape[-1]} channel(s)")
    scale = 65535.0 if data.dtype == np.uint16 else 255.0
    rgb = np.repeat(data, 3, axis=2) if data.shape[-1] == 1 else data[..., [2, 1, 0] if img.bgr else [0, 1, 2]]
    return rgb.astype(np.float32) / scale


# -- procedural images --------------------------------------------------------------
def dead_leaves(size: int, rng: np.random.Generator, *, r_min: float = 2.0, r_max: float | None = None,
                alpha: float = 3.0, discs: int = 3000, textured: bool = True) -> np.ndarray:
    """Dead-leaves image: occluding discs with power-law radii (natural edge statistics).

    ``discs`` discs with radii drawn from p(r) ~ r^-alpha are painted back to
    front (the last painted is the front-most) into a label map; each disc then
    gets a random colour and, if ``textured``, a shading gradient and fine noise.
    """
    r_max = r_max or size / 3
    # Inverse-CDF sampling of p(r) ~ r^-alpha on [r_min, r_max].
    a = 1 - alpha
    r = (r_min**a + rng.random(discs) * (r_max**a - r_min**a)) ** (1 / a)
    cy, cx = rng.uniform(0, size, (2, discs))
    labels = np.zeros((size, size), np.int32)
    for i in range(discs):
        cv2.circle(labels, (int(cx[i]), int(cy[i])), int(round(r[i])), i + 1, -1, cv2.LINE_8)
    idx = labels - 1  # -1: uncovered (rare), shares the colour of the last disc
    colour = rng.random((discs, 3)).astype(np.float32)
    img = colour[idx]
    if textured:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        g = rng.normal(0, 0.3, (discs, 2)).astype(np.float32)
        shade = 1 + (g[idx, 0] * (yy - cy[idx]) + g[idx, 1] * (xx - cx[idx])) / (2 * r[idx])
        img *= np.clip(shade, 0.3, 1.7)[..., None].astype(np.float32)
        img += rng.normal(0, rng.uniform(0, 0.04), img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


# -- datasets ------------------------------------------------------------------------
def large_enough(images: Sequence[np.ndarray], patch: int, margin: int) -> list[np.ndarray]:
    """The images that hold a ``patch`` and its ``margin`` on every side; a warning names how many do not.

    ValueError when images were given and none is large enough: training would
    otherwise go on silently on procedural images alone.
    """
    crop = patch + 2 * margin
    kept = [im for im in images if min(np.shape(im)[:2]) >= crop]
    if len(images) and not kept:
        raise ValueError(f"none of the {len(images)} photographs is at least {crop} x {crop} px (a {patch} px patch "
                         f"and its {margin} px margins): use larger images or a smaller --patch")
    if len(kept) < len(images):
        import warnings

        warnings.warn(f"{len(images) - len(kept)} of {len(images)} photographs are smaller than {crop} x {crop} px "
                      "and are left out", RuntimeWarning, stacklevel=3)
    return kept



class SyntheticPairs(torch.utils.data.IterableDataset):
    """Endless seeded stream of synthetically degraded patches.

    Parameters
    ----------
    images : list of ndarray
        Sharp float RGB images (may be empty: then only dead leaves).
    patch : int
        Output patch size.
    photo_fraction : float
        Probability of a photograph rather than a dead-leaves image.
    tasks : sequence of str
        Tasks to draw from (uniformly).
    seed : int
        Base seed; every worker gets its own stream.

    Notes
    -----
    Creating the dataset makes OpenCV single-threaded in this process
    (``cv2.setNumThreads(1)``). OpenCV's thread pool does not survive the fork
    that starts a ``DataLoader`` worker: resizing it inside the worker can hang
    for ever, so it has to be done here, before any worker exists.
    """

    def __init__(self, images: Sequence[np.ndarray], patch: int = 128, *, photo_fraction: float = 0.8,
                 tasks: Sequence[str] = TASKS, seed: int = 0, margin: int = 32):
        cv2.setNumThreads(1)
        self.images = large_enough(images, patch, margin)
        self.patch = patch
        self.photo_fraction = photo_fraction if self.images else 0.0
        self.tasks = list(tasks)
        self.seed = seed
        self.margin = margin  # context around the patch so blur has real pixels to pull in

    def sample(self, rng: np.random.Generator):
        crop = self._crop(rng)
        task = self.tasks[rng.integers(len(self.tasks))]
        pair = GENERATORS[task](crop, rng, **self._options(rng))
        return self._cut(pair)

    def _crop(self, rng: np.random.Generator) -> np.ndarray:
        """A sharp crop with ``margin`` context around the patch, randomly rotated and flipped."""
        size = self.patch + 2 * self.margin
        if rng.random() < self.photo_fraction:
            img = self.images[rng.integers(len(self.images))]
            h, w = img.shape[:2]
            y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
            crop = img[y : y + size, x : x + size]
        else:
            crop = dead_leaves(size, rng)
        crop = np.rot90(crop, rng.integers(4))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return np.ascontiguousarray(crop)

    @staticmethod
    def _options(rng: np.random.Generator) -> dict:
        """Sensor noise, JPEG and saturation, each now and then."""
        options = {}
        if rng.random() < 0.3:
            options["noise"] = float(rng.uniform(0, 0.02))
        if rng.random() < 0.2:
            options["jpeg"] = int(rng.integers(60, 96))
        if rng.random() < 0.1:
            options["saturate"] = float(rng.uniform(0.001, 0.02))
        return options

    def _cut(self, pair):
        """The patch of a degraded crop, as ``(blurry, sharp, label)`` tensors."""
        m, p = self.margin, self.patch
        blurry = pair.blurry[m : m + p, m : m + p]
        sharp = pair.sharp[m : m + p, m : m + p]
        return (torch.from_numpy(np.ascontiguousarray(blurry.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(sharp.transpose(2, 0, 1))),
                TASKS.index(pair.task))

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng(self._entropy(worker))
        while True:
            yield self.sample(rng)

    def _entropy(self, worker: int) -> list[int]:
        return [self.seed, worker]


class PsfPairs(SyntheticPairs):
    """Sharp patches blurred by your own PSFs (e.g. measured on your microscope), labelled ``task``.

    The patches come from ``images`` (and dead leaves) exactly as in
    :class:`SyntheticPairs`, with its noise, JPEG and saturation options;
    each is blurred by one of ``psfs``, drawn at random.
    """

    def __init__(self, images: Sequence[np.ndarray], psfs: Sequence[np.ndarray], task: str, patch: int = 128, *,
                 photo_fraction: float = 0.8, seed: int = 0, stream: int = 0):
        psfs = [np.asarray(psf, np.float32) for psf in psfs]
        if not psfs:
            raise ValueError("PsfPairs needs at least one PSF")
        margin = max(32, max(max(psf.shape) for psf in psfs) // 2 + 1)  # the blur's reach, in real pixels
        super().__init__(images, patch, photo_fraction=photo_fraction, tasks=[task], seed=seed, margin=margin)
        self.psfs, self.task, self.stream = psfs, task, stream
        task_index(task)

    def _entropy(self, worker: int) -> list[int]:
        return [self.seed, worker, 3000 + self.stream]  # crops of their own, not the synthetic stream's

    def sample(self, rng: np.random.Generator):
        crop = self._crop(rng)
        psf = self.psfs[rng.integers(len(self.psfs))]
        return self._cut(make_pair(crop, psf, rng, task=self.task, **self._options(rng)))


def read_psf(path: str | Path) -> np.ndarray:
    """A 2-D PSF from an image file (TIFF, PNG, .npy, FITS...), clipped at 0 and normalised to sum 1."""
    data = np.squeeze(np.asarray(read_image(path).data, np.float64))
    if data.ndim == 3 and data.shape[-1] in (3, 4):  # an RGB(A) picture of a PSF
        data = data[..., :3].mean(axis=-1)
    if data.ndim != 2:
        raise ValueError(f"{Path(path).name}: a PSF must be one 2-D image, got shape {data.shape} "
                         "(for a 3-D PSF, save its in-focus plane)")
    data = np.clip(data, 0, None)  # background-subtracted PSFs dip below zero
    if not np.isfinite(data).all() or data.sum() <= 0:
        raise ValueError(f"{Path(path).name}: a PSF needs finite values with a positive sum")
    return (data / data.sum()).astype(np.float32)


class PairFolder(torch.utils.data.IterableDataset):
    """Real (blurry, sharp) pairs: ``DIR/blurry/NAME`` and ``DIR/sharp/NAME``.

    ``task`` labels every pair (for the router loss); random aligned crops.
    """

    def __init__(self, folder: str | Path, task: str, patch: int = 128, seed: int = 0):
        folder, label = Path(folder), task_index(task)
        blurry = {p.name: p for p in list_images([folder / "blurry"])}
        sharp = {p.name: p for p in list_images([folder / "sharp"])}
        names = sorted(set(blurry) & set(sharp), key=natural_key)
        if not names:
            raise ValueError(f"{folder}: no matching file names in blurry/ and sharp/")
        self.pairs = [(read_rgb(blurry[n]), read_rgb(sharp[n])) for n in names]
        self.label, self.patch, self.seed = label, patch, seed

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, 1000 + (info.id if info else 0)])
        p = self.patch
        while True:
            b, s = self.pairs[rng.integers(len(self.pairs))]
            h, w = b.shape[:2]
            y, x = rng.integers(0, max(h - p, 0) + 1), rng.integers(0, max(w - p, 0) + 1)
            b, s = b[y : y + p, x : x + p], s[y : y + p, x : x + p]
            yield (torch.from_numpy(np.ascontiguousarray(b.transpose(2, 0, 1))),
                   torch.from_numpy(np.ascontiguousarray(s.transpose(2, 0, 1))), self.label)


class Mixed(torch.utils.data.IterableDataset):
    """Interleave several endless streams with given probabilities."""

    def __init__(self, streams: Sequence[torch.utils.data.IterableDataset], weights: Sequence[float], seed: int = 0):
        self.streams, self.weights, self.seed = list(streams), np.asarray(weights, float), seed

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, 2000 + (info.id if info else 0)])
        its = [iter(s) for s in self.streams]
        p = self.weights / self.weights.sum()
        while True:
            yield next(its[rng.choice(len(its), p=p)])


def load_photos(folders: Sequence[str | Path], max_side: int | None = None) -> list[np.ndarray]:
    """Read every image under ``folders`` as float RGB (optionally downscaled).

    An unreadable file (corrupt, truncated, not a picture) is left out with a
    warning naming it: one bad file should not end a training run. If none can
    be read, that is a ValueError.
    """
    photos, bad = [], []
    paths = list_images(folders)
    for path in paths:
        try:
            img = read_rgb(path)
        except (ValueError, OSError) as err:
            bad.append(f"{path} ({err})")
            continue
        if max_side and max(img.shape[:2]) > max_side:
            f = max_side / max(img.shape[:2])
            img = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        photos.append(img)
    if bad:
        import warnings

        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"left out {len(bad)} of {len(paths)} training images that cannot be read: {shown}",
                      RuntimeWarning, stacklevel=2)
        if not photos:
            raise ValueError(f"none of the {len(paths)} training images in {', '.join(map(str, folders))} "
                             "can be read")
    return photos


def thumbnail(img: np.ndarray, size: int = 16) -> np.ndarray:
    """A picture's fingerprint: its ``size`` x ``size`` area-averaged gray image, zero mean, unit norm.

    The dot product of two fingerprints is the correlation of the two thumbnails: about
    1 for the same picture at another size or re-encoded (at least 0.995 between Endless
    Sky's photographs and their double-size versions, cropped square), lower for another
    picture even of the same layout (at most 0.964 between the 445 distinct photographs of
    ``examples/training/prepare_photos.sh``, where an 8x8 mean hash within 4 bits called
    117 of them duplicates).
    """
    gray = img if img.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_BGR2GRAY)
    full = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(gray.dtype, 1.0)  # white
    tiny = cv2.resize(gray.astype(np.float32) / full, (size, size), interpolation=cv2.INTER_AREA).ravel()
    tiny -= tiny.mean()
    if tiny.std() < 1e-3:  # flat (rounding noise only): it matches nothing
        return np.zeros_like(tiny)
    return tiny / np.linalg.norm(tiny)


class Prepared(NamedTuple):
    """A photograph written by :func:`prepare_photos`, its source, and the near-duplicates it stands for."""

    path: Path
    source: Path
    duplicates: tuple[Path, ...] = ()


def shrink(img: np.ndarray, short_side: int, min_downscale: float, max_aspect: float | None) -> np.ndarray:
    """Centre-crop to ``max_aspect``, then shrink (area) by at least ``min_downscale`` to at most ``short_side``."""
    h, w = img.shape[:2]
    if max_aspect:
        long_max = int(min(h, w) * max_aspect)
        if h > long_max:
            img = img[(h - long_max) // 2 : (h - long_max) // 2 + long_max]
        elif w > long_max:
            img = img[:, (w - long_max) // 2 : (w - long_max) // 2 + long_max]
    f = min(1 / min_downscale, short_side / min(img.shape[:2]))
    return cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)


def prepare_photos(sources: Sequence[str | Path], out: str | Path, *, short_side: int = 640,
                   min_downscale: float = 1.5, min_size: int = 256, exclude: str | None = None,
                   max_aspect: float | None = None, quality: int | None = None,
                   dedupe: float | None = None) -> list[Prepared]:
    """Downscale photographs for training (area interpolation) and save them as PNG or JPEG.

    Every image is shrunk by at least ``min_downscale`` and to at most
    ``short_side`` on its short side, so JPEG artefacts and the camera's own
    blur fall below a pixel. Images smaller than ``min_size`` afterwards,
    paths matching the regular expression ``exclude`` and files already in
    ``out`` (when it lies inside a source folder) are skipped.

    Parameters
    ----------
    max_aspect : float, optional
        Centre-crop the long side to at most ``max_aspect`` times the short one
        first (a pixel budget: with 1, a panorama costs no more than a square).
    quality : int, optional
        Write JPEG at this quality (1-100) without chroma subsampling (4:4:4)
        instead of PNG.
    dedupe : float, optional
        Keep one copy of each picture: an image whose :func:`thumbnail` (of the
        prepared image) correlates at least ``dedupe`` (e.g. 0.99) with one already
        written is a near-duplicate, and of the two the one from the larger source
        is kept.

    Returns
    -------
    list of Prepared
        The files written (named after the last four parts of their source
        path) with their sources, in the order of ``sources``.
    """
    if quality is not None and not 1 <= quality <= 100:
        raise ValueError(f"quality must be a JPEG quality from 1 to 100, got {quality}")
    if max_aspect is not None and max_aspect < 1:
        raise ValueError(f"max_aspect must be at least 1 (long side / short side), got {max_aspect}")
    if dedupe is not None and not 0 < dedupe <= 1:
        raise ValueError(f"dedupe must be a correlation in (0, 1], e.g. 0.99, got {dedupe}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from .files import decode_opencv

    rx = re.compile(exclude) if exclude else None
    ext, params = (".png", []) if quality is None else (".jpg", [
        cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    kept: dict[Path, tuple[Prepared, np.ndarray, int]] = {}  # written file -> (record, thumbnail, source pixels)
    for path in list_images(sources):
        if (rx and rx.search(str(path))) or out.resolve() in path.resolve().parents:  # not our own outputs
            continue
        try:
            img = decode_opencv(path, cv2.IMREAD_COLOR)[0]
        except ValueError:
            continue
        small = shrink(img, short_side, min_downscale, max_aspect)
        if min(small.shape[:2]) < min_size:
            continue
        pixels, thumb, duplicates = img.shape[0] * img.shape[1], thumbnail(small), ()
        if dedupe is not None:
            twin = next((d for d, (_, t, _) in kept.items() if float(t @ thumb) >= dedupe), None)
            if twin is not None:
                record, _, twin_pixels = kept[twin]
                if pixels <= twin_pixels:  # the larger source stays
                    kept[twin] = (record._replace(duplicates=record.duplicates + (path,)), *kept[twin][1:])
                    continue
                twin.unlink()
                del kept[twin]
                duplicates = (record.source, *record.duplicates)
        stem = Path(re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(path.parts[-4:]))).stem
        dest, n = out / (stem + ext), 1
        while dest in kept:  # another source with the same last four path parts
            n += 1
            dest = out / f"{stem}-{n}{ext}"
        ok, buf = cv2.imencode(ext, small, params)  # bytes, never a path, to OpenCV (any file name)
        if not ok:
            raise OSError(f"could not encode {dest}")
        dest.write_bytes(buf.tobytes())
        kept[dest] = (Prepared(dest, path, duplicates), thumb, pixels)
    return [record for record, _, _ in kept.values()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demoe.data", description="Prepare training photographs.",
                                     fromfile_prefix_chars="@")
    parser.add_argument("sources", nargs="+", help="folders or files of photographs (@LIST: one per line in LIST)")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--short-side", type=int, default=640)
    parser.add_argument("--min-downscale", type=float, default=1.5)
    parser.add_argument("--min-size", type=int, default=256)
    parser.add_argument("--exclude", default=None, help="regular expression of paths to skip")
    parser.add_argument("--max-aspect", type=float, default=None,
                        help="centre-crop the long side to at most this times the short side")
    parser.add_argument("--jpeg", type=int, default=None, metavar="QUALITY",
                        help="write JPEG (4:4:4) at this quality instead of PNG")
    parser.add_argument("--dedupe", type=float, nargs="?", const=0.99, default=None, metavar="CORRELATION",
                        help="keep one copy of each picture, the largest: pictures whose 16x16 gray thumbnails "
                             "correlate at least this much (default 0.99) are one")
    parser.add_argument("--manifest", default=None,
                        help="write a TSV of each output file name, its source and the near-duplicates left out")
    args = parser.parse_args(argv)
    try:
        written = prepare_photos(args.sources, args.out, short_side=args.short_side,
                                 min_downscale=args.min_downscale, min_size=args.min_size, exclude=args.exclude,
                                 max_aspect=args.max_aspect, quality=args.jpeg, dedupe=args.dedupe)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.manifest:
        with open(args.manifest, "w", encoding="utf-8") as f:
            f.write("file\tsource\tduplicates\n")
            for r in written:
                f.write(f"{r.path.name}\t{r.source}\t{';'.join(map(str, r.duplicates))}\n")
    mib = sum(r.path.stat().st_size for r in written) / 2**20
    dropped = sum(len(r.duplicates) for r in written)
    print(f"wrote {len(written)} images ({mib:.1f} MiB) to {args.out}"
          + (f"; {dropped} near-duplicates left out" if args.dedupe is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
