"""Reading and writing image files without losing what they carry.

PNG/JPEG/BMP/WebP go through OpenCV (8- and 16-bit, gray/BGR/BGRA kept as
stored, so ``bgr=True`` is used for them; a photo's EXIF, orientation included,
and ICC colour profile are carried over through Pillow for 8-bit JPEG, PNG and
WebP), TIFF through tifffile (multi-page,
any dtype, axes and resolution carried over; ImageJ spacing, unit and frame
interval; OME-TIFF's image metadata: physical pixel sizes, time increment,
channels, planes; only the first series), FITS through astropy when it is
installed (every image HDU is restored; every other HDU and every header card is
written back),
``.npy`` through
numpy (no pickles). Every write goes to a temporary file in the destination
folder and is renamed into place, so an interrupted run never leaves a
half-written image.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OPENCV_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
TIFF_SUFFIXES = {".tif", ".tiff"}
FITS_SUFFIXES = {".fits", ".fit", ".fts"}
SUFFIXES = OPENCV_SUFFIXES | TIFF_SUFFIXES | FITS_SUFFIXES | {".npy"}
#: Extensions of two parts, kept together when a name is changed (``x_deblurred.ome.tif``).
COMPOUND_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.zarr")


def split_name(name: str) -> tuple[str, str]:
    """``(base, extension)``, with OME's two-part extensions kept whole."""
    for ext in COMPOUND_SUFFIXES:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    path = Path(name)
    return path.stem, path.suffix


@dataclass
class Image:
    """Pixels plus what is needed to write them back the same way."""

    data: np.ndarray
    channel_axis: int | None
    bgr: bool = False
    tiff: dict[str, Any] = field(default_factory=dict)
    fits: dict[str, Any] = field(default_factory=dict)  # FITS: the source file and the image HDU's index
    photo: dict[str, bytes] = field(default_factory=dict)  # JPEG/PNG/WebP: "exif" and "icc_profile" bytes
    #: Further images in the same file (a FITS file's other image HDUs), each restored on its own and
    #: written back with this one.
    parts: list[Image] = field(default_factory=list)


def read_image(path: str | Path) -> Image:
    """Read ``path``; raises ``ValueError`` for unreadable or unsupported files."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in OPENCV_SUFFIXES:
        import cv2

        data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if data is None:
            raise ValueError(f"cannot decode {path.name} (corrupt or not a {suffix[1:].upper()} image)")
        color = data.ndim == 3 and data.shape[2] in (3, 4)
        return Image(data, 2 if color else None, bgr=color, photo=_photo_metadata(path))
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(path)
    if suffix in FITS_SUFFIXES:
        return _read_fits(path)
    if suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"cannot read {path.name}: {err}") from err
        return Image(data, "auto")
    raise ValueError(f"unsupported file type {suffix or '(none)'}; accepted: {', '.join(sorted(SUFFIXES))}, .zarr")


def _read_tiff(path: Path) -> Image:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data = series.asarray()
            axes = series.axes
            page = tif.pages[0]
            info: dict[str, Any] = {"axes": axes, "photometric": page.photometric.name.lower(),
                                    "other_series": len(tif.series) - 1}  # not read: only series 0 is restored
            if tif.is_imagej:
                info["imagej"] = {k: v for k, v in (tif.imagej_metadata or {}).items()
                                  if k in ("spacing", "unit", "finterval", "fps", "loop", "min", "max", "mode")}
            x, y, unit = page.tags.get("XResolution"), page.tags.get("YResolution"), page.tags.get("ResolutionUnit")
            if x is not None and y is not None:
                info["resolution"] = (x.value, y.value)
                info["resolutionunit"] = unit.value if unit is not None else None
            if page.description and not tif.is_imagej and not tif.is_ome:
                info["description"] = page.description
            if tif.is_ome and tif.ome_metadata:
                image = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image")
                image = image[0] if isinstance(image, list) else image  # series 0 is what was read
                if isinstance(image, dict):
                    info["ome"] = image
    except (tifffile.TiffFileError, ValueError, OSError, IndexError) as err:
        raise ValueError(f"cannot read {path.name}: {err}") from err
    # Samples (S: RGB in one pixel) are colour; ImageJ channels (C) are separate gray planes.
    channel_axis = axes.index("S") if "S" in axes and data.shape[axes.index("S")] in (3, 4) else None
    return Image(data, channel_axis, tiff=info)


#: Formats whose EXIF and ICC profile are written back (through Pillow), and Pillow's name for them.
PHOTO_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def _photo_metadata(path: Path) -> dict[str, bytes]:
    """The EXIF block (camera, orientation, date...) and ICC colour profile of a photo, if any."""
    if path.suffix.lower() not in PHOTO_FORMATS:
        return {}
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            info = {key: im.info.get(key) for key in ("exif", "icc_profile")}
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in info.items() if isinstance(value, bytes) and value}


def _write_photo(tmp: Path, image: Image, fmt: str) -> bool:
    """Write 8-bit pixels with the photo's EXIF and ICC profile through Pillow; False if it cannot."""
    data = image.data
    if not fmt or not image.photo or data.dtype != np.uint8 or not (data.ndim == 2 or data.shape[-1] in (3, 4)):
        return False
    from PIL import Image as PILImage

    if data.ndim == 3:
        data = data[..., [2, 1, 0, 3][: data.shape[-1]]] if image.bgr else data  # OpenCV's BGR(A) -> RGB(A)
        if fmt == "JPEG" and data.shape[-1] == 4:
            return False  # JPEG has no alpha
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    PILImage.fromarray(np.ascontiguousarray(data)).save(tmp, fmt, **image.photo, **options)
    return True


def _astropy_fits():
    try:
        from astropy.io import fits
    except ImportError:
        raise ValueError("FITS files need astropy (pip install astropy)") from None
    return fits


def _read_fits(path: Path) -> Image:
    fits = _astropy_fits()
    try:
        with fits.open(path, memmap=False) as hdus:
            # Every image HDU with two or more axes: a mosaic camera writes one per detector.
            images = [Image(np.array(hdu.data), None, fits={"source": path, "index": i})  # BSCALE/BZERO applied
                      for i, hdu in enumerate(hdus) if hdu.is_image and hdu.data is not None and hdu.data.ndim >= 2]
    except OSError as err:
        raise ValueError(f"cannot read {path.name}: {err}") from err
    if not images:
        raise ValueError(f"{path.name} has no image HDU with two or more axes")
    # FITS stores axes last-first: (…, NAXIS2, NAXIS1) = (…, Y, X); every leading plane is an image.
    return dataclasses.replace(images[0], parts=images[1:])


def _write_fits(tmp: Path, image: Image) -> None:
    fits = _astropy_fits()
    if not image.fits:  # no source to follow: a plain primary HDU
        fits.PrimaryHDU(image.data).writeto(tmp)
        return
    with fits.open(image.fits["source"], memmap=False) as hdus:
        for part in (image, *image.parts):
            hdu = hdus[part.fits["index"]]
            hdu.data = part.data  # astropy sets BITPIX/NAXIS and the unsigned-integer BZERO from it
            for key in ("BSCALE", "BZERO"):  # a scaled integer input: the result is stored as it is
                if key in hdu.header and not (key == "BZERO" and part.data.dtype.kind == "u"):
                    del hdu.header[key]
        hdus.writeto(tmp, output_verify="silentfix")


@contextmanager
def atomic_path(dest: Path):
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only on success."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.stem}.partial-{os.getpid()}{dest.suffix}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_image(path: str | Path, image: Image) -> None:
    """Write ``image`` in the format of ``path``'s suffix, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix in OPENCV_SUFFIXES:
            import cv2

            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix in (".jpg", ".jpeg") else []
            written = _write_photo(tmp, image, PHOTO_FORMATS.get(suffix, ""))
            if not written and not cv2.imwrite(str(tmp), image.data, params):
                raise ValueError(f"OpenCV could not write {path.name}")
        elif suffix in TIFF_SUFFIXES:
            _write_tiff(tmp, image)
        elif suffix in FITS_SUFFIXES:
            _write_fits(tmp, image)
        elif suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, image.data, allow_pickle=False)
        else:
            raise ValueError(f"unsupported output type {suffix}")


def _write_tiff(tmp: Path, image: Image) -> None:
    import tifffile

    info = image.tiff
    kwargs: dict[str, Any] = {}
    if "resolution" in info:
        kwargs["resolution"] = info["resolution"]
        if info.get("resolutionunit") is not None:
            kwargs["resolutionunit"] = info["resolutionunit"]
    photometric = info.get("photometric")
    if photometric in ("rgb", "minisblack"):
        kwargs["photometric"] = photometric
    if "ome" in info:
        try:
            tifffile.imwrite(tmp, image.data, ome=True, metadata={**info["ome"], "axes": info["axes"]}, **kwargs)
            return
        except Exception as err:  # noqa: BLE001 - tifffile raises several kinds for metadata it cannot write
            warnings.warn(f"the OME metadata could not be written back ({type(err).__name__}: {err}); "
                          "the result is a plain TIFF with the same axes and resolution", RuntimeWarning, stacklevel=3)
    if "imagej" in info:
        meta = dict(info["imagej"])
        meta["axes"] = info["axes"].replace("S", "") if photometric == "rgb" else info["axes"]
        meta.pop("min", None), meta.pop("max", None)
        tifffile.imwrite(tmp, image.data, imagej=True, metadata=meta, **kwargs)
    else:
        meta = {"axes": info["axes"]} if "axes" in info else {}
        tifffile.imwrite(tmp, image.data, metadata=meta, description=info.get("description"), **kwargs)
