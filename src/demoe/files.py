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
numpy (no pickles), zarr arrays and OME-Zarr images (their full-resolution
level; the other levels are remade from the result) lazily, through dask.
Every write goes to a temporary file (or folder) in the destination folder and
is renamed into place, so an interrupted run never leaves a half-written image.

Sizes are read from a file's header before anything is decoded: an image over
:data:`MAX_PIXELS` pixels per plane is refused, so a small file whose header
claims a huge image cannot take all memory. OpenCV gets bytes, never a path
(it cannot take every file name a file system can).
"""

from __future__ import annotations

import dataclasses
import os
import re
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
#: Largest plane read into memory, in pixels (height x width; 16384 x 16384). Files claiming more are
#: refused before decoding; the environment variable DEMOE_MAX_PIXELS (or ``demoe deblur
#: --max-pixels``) raises it. Zarr stores are read lazily, chunk by chunk, and have no such limit.
MAX_PIXELS = 16384 * 16384


def natural_key(path: Path) -> list:
    """Sort key that orders ``img2`` before ``img10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


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


def max_pixels() -> int:
    """The limit in force: ``DEMOE_MAX_PIXELS`` if set, else :data:`MAX_PIXELS`."""
    value = os.environ.get("DEMOE_MAX_PIXELS", "").strip().replace("_", "")
    if not value:
        return MAX_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"DEMOE_MAX_PIXELS must be a positive whole number of pixels, got {value!r}")
    return int(value)


class ImageTooLarge(ValueError):
    """A file whose header claims more pixels than the limit (:func:`max_pixels`)."""


def check_size(name: str, height: int, width: int, limit: int | None = None) -> None:
    """Refuse a plane of ``height`` x ``width`` over ``limit`` pixels (default: :func:`max_pixels`)."""
    limit = max_pixels() if limit is None else limit
    if height * width > limit:
        raise ImageTooLarge(f"{name} is {width} x {height} pixels ({height * width:,}), over the limit of {limit:,} "
                         "pixels per image; raise it with --max-pixels or DEMOE_MAX_PIXELS if you have the memory")


def read_image(path: str | Path, max_pixels: int | None = None) -> Image:
    """Read ``path``; raises ``ValueError`` for unreadable or unsupported files.

    A plane over ``max_pixels`` pixels (default: :func:`max_pixels`) is refused
    from the file's header, before anything is decoded. A truncated file is
    refused (OpenCV would fill a JPEG's missing part with gray).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in OPENCV_SUFFIXES:
        return _read_opencv(path, max_pixels)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(path, max_pixels)
    if suffix in FITS_SUFFIXES:
        return _read_fits(path, max_pixels)
    if suffix == ".npy":
        return _read_npy(path, max_pixels)
    raise ValueError(f"unsupported file type {suffix or '(none)'}; accepted: {', '.join(sorted(SUFFIXES))}, .zarr")


def decode_opencv(path: str | Path, flags: int | None = None, limit: int | None = None) -> tuple[np.ndarray, Any]:
    """``(pixels, Pillow's header parse or None)`` of a PNG/JPEG/BMP/WebP file, as ``cv2.imread`` would give.

    The file is read as bytes and decoded from memory (OpenCV crashed on file names
    that are not UTF-8), after its header's size is checked (:func:`check_size`).
    ValueError if it cannot be read or decoded.
    """
    import cv2

    path = Path(path)
    try:
        raw = path.read_bytes()  # decoded from memory: OpenCV never sees the file name
    except OSError as err:
        raise ValueError(f"cannot read {path.name}: {err.strerror or err}") from err
    header = _pil_header(raw)
    if header is not None:
        check_size(path.name, header.size[1], header.size[0], limit)
    try:
        flags = cv2.IMREAD_UNCHANGED if flags is None else flags
        data = cv2.imdecode(np.frombuffer(raw, np.uint8), flags) if raw else None
    except cv2.error as err:  # e.g. over OpenCV's own limit (CV_IO_MAX_IMAGE_PIXELS, 2**30 pixels)
        raise ValueError(f"cannot decode {path.name}: OpenCV: {str(err).strip().splitlines()[-1]}") from None
    if data is None:
        if raw[:2] == b"\xff\xd8" and raw.rfind(b"\xff\xd9") < raw.rfind(b"\xff\xda"):  # no end after the last scan
            raise ValueError(f"cannot decode {path.name}: the file is truncated (its JPEG data ends early)")
        raise ValueError(f"cannot decode {path.name} (corrupt or not a {path.suffix[1:].upper()} image)")
    return data, header


def _read_opencv(path: Path, limit: int | None) -> Image:
    data, header = decode_opencv(path, limit=limit)
    color = data.ndim == 3 and data.shape[2] in (3, 4)
    return Image(data, 2 if color else None, bgr=color, photo=_photo_metadata(path, header))


def _pil_header(raw: bytes):
    """Pillow's parse of an image's header (size, EXIF, ICC profile), or None; nothing is decoded.

    Pillow's own ``Image.open`` refuses images over its decompression-bomb limit
    (179 M pixels) before giving the size; this module sets its own limit, so the
    format's parser is called directly.
    """
    import io

    from PIL import Image as PILImage

    PILImage.init()
    for fmt in ("PNG", "JPEG", "BMP", "WEBP"):
        factory, accept = PILImage.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and accept(raw[:16]) is not True):
            continue
        try:
            return factory(io.BytesIO(raw), "")
        except (OSError, SyntaxError, ValueError, IndexError, TypeError, EOFError):
            return None
    return None


def _read_npy(path: Path, limit: int | None) -> Image:
    try:
        with open(path, "rb") as f:  # the header first: the shape, before any data is read
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape = read_header(f)[0]
        if len(shape) >= 2:  # (..., H, W) or, with colour last, (..., H, W, 3|4)
            h, w = shape[-3:-1] if len(shape) >= 3 and shape[-1] in (3, 4) else shape[-2:]
            check_size(path.name, h, w, limit)
        data = np.load(path, allow_pickle=False)
    except ImageTooLarge:
        raise
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot read {path.name}: {err}") from err
    return Image(data, "auto")


def _read_tiff(path: Path, limit: int | None = None) -> Image:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ValueError(f"{path.name} holds no image (a TIFF with 0 pages)")
            series = tif.series[0]
            axes = series.axes
            if len(series.shape) >= 2:  # the plane: Y and X, else the last two axes that are not samples
                spatial = [n for n, ax in zip(series.shape, axes) if ax != "S"]
                h, w = ((series.shape[axes.index("Y")], series.shape[axes.index("X")])
                        if "Y" in axes and "X" in axes else spatial[-2:])
                check_size(path.name, h, w, limit)
            data = series.asarray()
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
    except ImageTooLarge:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as err:
        raise ValueError(f"cannot read {path.name}: {err}") from err
    # Samples (S: RGB in one pixel) are colour; ImageJ channels (C) are separate gray planes.
    channel_axis = axes.index("S") if "S" in axes and data.shape[axes.index("S")] in (3, 4) else None
    return Image(data, channel_axis, tiff=info)


#: Formats whose EXIF and ICC profile are written back (through Pillow), and Pillow's name for them.
PHOTO_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def _photo_metadata(path: Path, header) -> dict[str, bytes]:
    """The EXIF block (camera, orientation, date...) and ICC colour profile of a photo, if any.

    ``header`` is Pillow's parse of the file (:func:`_pil_header`), or None.
    """
    if path.suffix.lower() not in PHOTO_FORMATS or header is None:
        return {}
    info = {key: header.info.get(key) for key in ("exif", "icc_profile")}
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


def _read_fits(path: Path, limit: int | None = None) -> Image:
    fits = _astropy_fits()
    try:
        with fits.open(path, memmap=False) as hdus:
            # Every image HDU with two or more axes: a mosaic camera writes one per detector.
            found = [(i, hdu) for i, hdu in enumerate(hdus) if hdu.is_image and hdu.header.get("NAXIS", 0) >= 2]
            for _, hdu in found:  # sizes from the headers, before any data is read
                check_size(path.name, int(hdu.header.get("NAXIS2", 0)), int(hdu.header.get("NAXIS1", 0)), limit)
            images = [Image(np.array(hdu.data), None, fits={"source": path, "index": i})  # BSCALE/BZERO applied
                      for i, hdu in found if hdu.data is not None and hdu.data.ndim >= 2]
    except ImageTooLarge:
        raise
    except (OSError, ValueError, TypeError) as err:
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


def partial_path(dest: Path, pid: int | None = None) -> Path:
    """The temporary name a process writes ``dest`` under: hidden, beside it, with the process id."""
    dest = Path(dest)
    return dest.with_name(f".{dest.stem}.partial-{os.getpid() if pid is None else pid}{dest.suffix}")


def remove_leftovers(dest: Path) -> list[Path]:
    """Remove the temporary files (or zarr folders) of ``dest`` left by processes that died while
    writing it (killed, power cut); those of running processes are left alone. Returns what was removed."""
    import glob
    import re
    import shutil

    dest = Path(dest)
    pattern = re.compile(rf"\.{re.escape(dest.stem)}\.partial-(\d+){re.escape(dest.suffix)}")
    removed = []
    for path in dest.parent.glob(f".{glob.escape(dest.stem)}.partial-*"):
        match = pattern.fullmatch(path.name)
        if match is None or _running(int(match.group(1))):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
        except FileNotFoundError:  # another run removed it first
            pass
    return removed


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (on Windows, where this cannot be asked safely: assumed so)."""
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or an id no process can have)
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextmanager
def atomic_path(dest: Path):
    """Yield a temporary path beside ``dest`` (:func:`partial_path`); rename it to ``dest`` only on success."""
    tmp = partial_path(dest)
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
            if not _write_photo(tmp, image, PHOTO_FORMATS.get(suffix, "")):
                ok, encoded = cv2.imencode(suffix, image.data, params)  # bytes: OpenCV never sees the file name
                if not ok:
                    raise ValueError(f"OpenCV could not write {path.name}")
                tmp.write_bytes(encoded.tobytes())
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


# -- zarr and OME-Zarr: read and written lazily, chunk by chunk -------------------------------------
@dataclass
class LazyImage:
    """A zarr array, or an OME-Zarr image's full-resolution level, as a dask array, plus what is needed to
    write a result back the same way (:func:`write_zarr`)."""

    data: Any  # dask array
    store: Any = None  # the zarr node it was read from
    attrs: dict[str, Any] | None = None  # an OME-Zarr group's attributes; None for a plain array
    levels: list[dict] = field(default_factory=list)  # the OME-Zarr multiscales' levels ("datasets")


def read_zarr(path: str | Path, max_pixels: int | None = None) -> LazyImage:
    """Open a zarr array, or an OME-Zarr image (its full-resolution level), lazily.

    ValueError, naming what is accepted, for anything else; a chunk over
    ``max_pixels`` pixels per plane (default: :func:`max_pixels`) is refused,
    as a chunk is what must fit in memory.
    """
    import dask.array as da

    try:
        import zarr
    except ImportError:
        raise ValueError("reading zarr needs the zarr package: pip install zarr") from None
    path = Path(path)
    accepted = "accepted: a zarr array, or an OME-Zarr image"
    try:
        node = zarr.open(str(path), mode="r")
    except (OSError, ValueError, KeyError, TypeError) as err:  # no zarr.json/.zarray, or unreadable metadata
        raise ValueError(f"cannot open {path.name} as zarr ({type(err).__name__}: {err}); {accepted}") from None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        ome = attrs.get("ome", attrs)  # OME-Zarr 0.5 nests its metadata under "ome"
        multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
        if not multiscales:
            raise ValueError(f"{path.name} is a zarr group without OME-Zarr 'multiscales' metadata; {accepted}")
        first = multiscales[0] if isinstance(multiscales, list) else None
        levels = first.get("datasets") if isinstance(first, dict) else None
        if not isinstance(levels, list) or not levels or not all(isinstance(v, dict) and "path" in v for v in levels):
            raise ValueError(f"{path.name}: its OME-Zarr 'multiscales' metadata lists no levels ('datasets' with a "
                             f"'path' each); {accepted}")
        missing = [lv["path"] for lv in levels if not isinstance(node.get(str(lv["path"])), zarr.Array)]
        if missing:
            raise ValueError(f"{path.name}: OME-Zarr level(s) {', '.join(map(repr, missing))} named in its metadata "
                             "are not arrays in the store")
        image = LazyImage(da.from_zarr(node[levels[0]["path"]]), node, attrs, levels)
    else:
        image = LazyImage(da.from_zarr(node), node)
    arr = image.data
    if arr.ndim >= 2:  # read chunk by chunk: a chunk is what must fit in memory
        chunk = arr.chunksize
        h, w = chunk[-3:-1] if arr.ndim >= 3 and arr.shape[-1] in (3, 4) else chunk[-2:]
        check_size(f"a chunk of {path.name}", h, w, max_pixels)
    return image


def write_zarr(dest: str | Path, image: LazyImage) -> None:
    """Write ``image.data`` (computed chunk by chunk as it is written) to ``dest`` the way it was read.

    A plain array is written as a zarr array; an OME-Zarr image as an OME-Zarr
    group with the source's attributes, its first level the data and its
    lower levels remade from it. Written to a temporary folder beside ``dest``
    and renamed into place.
    """
    import copy
    import shutil

    import zarr

    dest = Path(dest)
    tmp = partial_path(dest)  # this process's own: a concurrent run writes its own
    try:
        if image.attrs is None:
            image.data.to_zarr(str(tmp))
        else:
            attrs = copy.deepcopy(image.attrs)
            ome = attrs.get("ome", attrs)
            multiscales = ome["multiscales"]
            fmt = getattr(getattr(image.store, "metadata", None), "zarr_format", None)
            group = zarr.open_group(str(tmp), mode="w", **({"zarr_format": fmt} if fmt else {}))
            written = _write_pyramid(group, image.data, image.levels,
                                     [image.store[level["path"]] for level in image.levels])
            ome["multiscales"] = [{**multiscales[0], "datasets": written}, *multiscales[1:]]
            group.attrs.update(attrs)
        _move_into_place(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the folder ``tmp`` to ``dest``; an existing ``dest`` is moved aside first and removed after,
    so that ``dest`` is missing for a moment only, and is never a mix of two runs."""
    import shutil

    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    try:
        dest.rename(old)
    except FileNotFoundError:
        old = None
    try:
        tmp.rename(dest)
    except OSError as err:  # another run put its result there meanwhile: that one stays
        if old is not None and not dest.exists():
            old.rename(dest)
        raise ValueError(f"{dest} was written by another run at the same time; this run's result was not "
                         f"kept ({err.strerror or err})") from None
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old)


def _write_pyramid(group, full, levels: list[dict], sources: list) -> list[dict]:
    """Write ``full`` as the first level and remake the input's lower levels from it.

    Each lower level is the block mean of the level above it, by the factors
    between the input's own levels (read back from the store, so the network
    runs once). Returns the levels written (a level that would be empty ends it).
    """
    import dask.array as da

    create = getattr(group, "create_array", None) or group.create_dataset  # zarr 3, zarr 2
    target = create(levels[0]["path"], shape=full.shape, chunks=full.chunksize, dtype=full.dtype)
    da.store(full, target, lock=False)
    written, above = [levels[0]], da.from_zarr(target)
    for level, upper, lower in zip(levels[1:], sources, sources[1:]):
        factors = {ax: max(1, round(a / max(b, 1))) for ax, (a, b) in enumerate(zip(upper.shape, lower.shape))}
        if any(above.shape[ax] < f for ax, f in factors.items()):
            break
        mean = da.coarsen(np.mean, above.astype(np.float64), factors, trim_excess=True)
        if np.issubdtype(full.dtype, np.integer):
            mean = mean.round()
        chunks = tuple(min(c, n) for c, n in zip(lower.chunks, mean.shape))
        target = create(level["path"], shape=mean.shape, chunks=chunks, dtype=full.dtype)
        da.store(mean.astype(full.dtype).rechunk(chunks), target, lock=False)
        written.append(level)
        above = da.from_zarr(target)
    return written
