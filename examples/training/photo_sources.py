"""Which files of the Debian packages are training photographs, and under which licence.

Used by ``prepare_photos.sh`` (read it first); ``EXTRACTED/PKG/`` holds each package
unpacked by ``dpkg -x``::

    python examples/training/photo_sources.py unpack EXTRACTED   # photos inside Qt resources and .pk3 archives
    python examples/training/photo_sources.py list EXTRACTED     # the files to prepare, one a line
    python examples/training/photo_sources.py manifest EXTRACTED PREPARED.tsv PHOTOS > photos-manifest.tsv
    python examples/training/photo_sources.py check PHOTOS       # none is one of scikit-image's images

``SOURCES`` says, package by package, which files are taken (regular expressions on the
path under ``root``) and why the others are not. The licence of each file is looked up in
the package's ``/usr/share/doc/PKG/copyright`` (machine-readable, DEP-5: the last
``Files:`` paragraph whose pattern matches the file's path in the source package wins),
or given here where that file is not machine-readable.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

UNPACKED = "unpacked"  # EXTRACTED/PKG/unpacked/<archive stem>/<member>: files taken out of archives


@dataclass(frozen=True)
class Source:
    """The photographs of one package.

    root : folder (under the unpacked package) searched for images
    include, exclude : regular expressions on the path under ``root``
    licence_path : (pattern, replacement) turning the path under the package into the path
        that the DEP-5 copyright file names (the file's place in the source package)
    renamed : the other suffixes the file may have had in the source package
    licence : the licence, when the copyright file is not machine-readable
    archives, members : archives (Qt .rcc or zip .pk3, regex on the path under the package)
        whose members matching ``members`` are unpacked into ``unpacked/`` first
    """

    root: str
    include: str
    exclude: str | None = None
    licence_path: tuple[str, str] = (r"^", "")
    licence: str | None = None
    archives: str | None = None
    members: str | None = None
    renamed: tuple[str, ...] = ()


SOURCES = {
    # The photographs only: the other wallpapers are vector art and renders. Each comes in
    # several sizes (many byte-identical); demoe.data's dedupe keeps the largest.
    "plasma-workspace-wallpapers": Source(
        "usr/share/wallpapers",
        r"^(BytheWater|ColdRipple|ColorfulCups|DarkestHour|EveningGlow|FallenLeaf|Grey|Kite|OneStandsOut|Path"
        r"|summer_1am)/contents/images/"),
    # nature/ are photographs; desktop/ and abstract/ are logos, stripes, renders and a painting.
    "mate-backgrounds": Source("usr/share/backgrounds/mate", r"^nature/",
                               licence_path=(r"^usr/share/backgrounds/mate/", "")),
    "lomiri-wallpapers-16.04": Source("usr/share/backgrounds", r"\.jpg$", exclude=r"umang",  # a colour gradient
                                      licence_path=(r"^usr/share/backgrounds/", "16.04/")),
    "lomiri-wallpapers-20.04": Source("usr/share/backgrounds", r"^Kleiber",  # the others are vector art and a render
                                      licence_path=(r"^usr/share/backgrounds/", "20.04/")),
    # OpenCV's sample photographs with a short side >= 576 px (>= 384 after the 1.5x downscale);
    # aloeR, ela_modified and graf3 are near-copies of these, the rest are charts, logos,
    # calibration boards, synthetic or smaller images.
    "opencv-doc": Source("usr/share/doc/opencv-doc/examples/data",
                         r"^(aloeL\.jpg|building\.jpg|ela_original\.jpg|graf1\.png)$",
                         licence_path=(r"^usr/share/doc/opencv-doc/examples/data/", "samples/data/")),
    # One landscape photograph (the rest are icons, themes and LUTs). Its copyright file is
    # free text: GPL-2+ for all but a few source files.
    "digikam-data": Source("usr/share/digikam/about/images", r"^body-background\.jpg$", licence="GPL-2+"),
    # Endless Sky's 273 landing photographs (landscapes, cities, sea, stations), in their
    # 1440x720 high-DPI version (endless-sky-data's 720x360 are the same pictures, smaller).
    "endless-sky-high-dpi": Source("usr/share/games/endless-sky/plugins/endless-sky-high-dpi", r"^images/land/",
                                   exclude=r"earthrise",  # the Earth on black: little to learn
                                   licence_path=(r"^usr/share/games/endless-sky/plugins/endless-sky-high-dpi/", "")),
    # GCompris' photographs of monuments, animals, musicians and the sea floor, in Qt
    # resource files (the other activities hold drawings and clip-art).
    "gcompris-qt-data": Source(
        UNPACKED, r"\.(jpe?g|png|webp)$",
        licence_path=(rf"^{UNPACKED}/[^/]+/gcompris/", ""),
        archives=r"^usr/share/gcompris-qt/rcc/(explore_monuments|erase|explore_world_animals|explore_farm_animals"
                 r"|explore_world_music|clickgame)\.rcc$",
        members=r"^gcompris/src/activities/[^/]+/resource/", renamed=(".jpg", ".jpeg", ".png")),
    # UFO:AI's photographic 1024 px textures (concrete, grass, ground, hedge, bricks, wood,
    # rock); the palette PNGs, normal/specular maps, recoloured copies and drawn textures are left.
    "ufoai-textures": Source(
        UNPACKED, r"\.(jpe?g|png)$", licence_path=(rf"^{UNPACKED}/[^/]+/", "base/"),
        archives=r"^usr/share/games/ufoai/base/0textures\.pk3$",
        members=r"^textures/(tex_ctp1/(concrete_g_\d+|grass_g_7|ground_[bg]_\d+|hedge02)\.jpg"
                r"|tex_mattn/(wall_bricks006\.png|wood008\.jpg)|tex_nature/(rock01[78]|stone001)\.png)$"),
    # KDE's jigsaw puzzles: five photographs.
    "palapeli-data": Source("usr/share/palapeli/collection", r"\.jpg$"),
}

# Never taken, whatever a package holds: scikit-image's bundled images are the evaluation set,
# and these names are classic test images it may share.
FORBIDDEN = re.compile(
    r"(?i)astronaut|camera|coffee|chelsea|\bcat\b|rocket|coins|moon|retina|hubble|lena|skimage|scikit")
IMAGE = re.compile(r"(?i)\.(png|jpe?g|webp|tiff?|bmp)$")


def _archives(extracted: Path, pkg: str) -> list[Path]:
    """The archives of ``pkg`` whose photographs are taken."""
    root = extracted / pkg
    return sorted(p for p in root.rglob("*") if UNPACKED not in p.relative_to(root).parts
                  and re.search(SOURCES[pkg].archives, p.relative_to(root).as_posix()))


def unpack(extracted: Path) -> None:
    """Take the selected members out of each package's archives (Qt resources and zip .pk3)."""
    for pkg, src in SOURCES.items():
        if not src.archives:
            continue
        root = extracted / pkg
        shutil.rmtree(root / UNPACKED, ignore_errors=True)  # what an earlier selection took
        for archive in _archives(extracted, pkg):
            dest = root / UNPACKED / archive.stem
            def wanted(member: str, pattern: str = src.members) -> bool:
                return bool(re.search(pattern, member) and IMAGE.search(member))

            for member, data in _members(archive, wanted):
                out = dest / member
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)


def _members(archive: Path, wanted):
    """``(path, bytes)`` of the files of a zip archive or a Qt binary resource file whose path is ``wanted``."""
    if archive.suffix == ".rcc":  # read by Qt itself (the napari extra brings a binding)
        try:
            from qtpy.QtCore import QDirIterator, QFile, QIODevice, QResource
        except Exception as err:  # noqa: BLE001 - qtpy raises its own error type when no binding is installed
            raise SystemExit(f"{archive.name} is a Qt resource file: reading it needs qtpy and a Qt binding "
                             f"(pip install qtpy pyqt6, or the napari extra): {err}") from None

        root = "/demoe-rcc"
        if not QResource.registerResource(str(archive), root):
            raise ValueError(f"{archive}: not a Qt resource file")
        try:
            it = QDirIterator(":" + root, QDirIterator.IteratorFlag.Subdirectories)
            while it.hasNext():
                name = it.next()
                f = QFile(name)
                if wanted(name[len(root) + 2:]) and f.open(QIODevice.OpenModeFlag.ReadOnly):
                    yield name[len(root) + 2:], bytes(f.readAll())
                    f.close()
        finally:
            QResource.unregisterResource(str(archive), root)
    else:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir() and wanted(info.filename):
                    yield info.filename, z.read(info)


def select(extracted: Path, licences: str | None = None) -> list[Path]:
    """The files to prepare, package by package (only those whose licence matches ``licences``, if given)."""
    files = []
    for pkg, src in SOURCES.items():
        root = extracted / pkg / src.root
        if not root.is_dir():
            raise FileNotFoundError(f"{root} not found: is {pkg} extracted (and unpacked)?")
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if (p.is_file() and IMAGE.search(rel) and re.search(src.include, rel)
                    and not (src.exclude and re.search(src.exclude, rel)) and not FORBIDDEN.search(rel)
                    and (licences is None or re.search(licences, licence_of(extracted, pkg, p.relative_to(
                        extracted / pkg).as_posix())))):
                files.append(p)
    return files


def dep5_licence(copyright_text: str, *paths: str) -> str | None:
    """The licence that a machine-readable (DEP-5) copyright file gives a file: the last match wins.

    Several ``paths`` are the names the file may have had in the source package (GCompris
    ships its JPEG and PNG photographs converted to WebP): the last paragraph that matches
    any of them wins.
    """
    licence = None
    for para in re.split(r"\n[ \t]*\n", copyright_text):
        fields, key = {}, None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line and not line.startswith("#"):
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "files" in fields and "license" in fields:
            patterns = fields["files"].split()
            rx = [re.escape(p).replace(r"\*", ".*").replace(r"\?", ".") for p in patterns]
            if any(re.fullmatch(r, path, re.S) for r in rx for path in paths):
                licence = fields["license"].splitlines()[0].strip()
    return licence


def licence_of(extracted: Path, pkg: str, rel: str) -> str:
    """The licence of the file ``rel`` (path under the unpacked package ``pkg``)."""
    src = SOURCES[pkg]
    if src.licence:
        return src.licence
    text = (extracted / pkg / "usr/share/doc" / pkg / "copyright").read_text(encoding="utf-8", errors="replace")
    path = re.sub(src.licence_path[0], src.licence_path[1], rel, count=1)
    licence = dep5_licence(text, path, *(str(Path(path).with_suffix(s)) for s in src.renamed))
    if licence is None:
        raise ValueError(f"{pkg}: the copyright file gives no licence for {rel}")
    return licence


def manifest(extracted: Path, prepared: Path, photos: Path, out) -> None:
    """A TSV of each prepared photograph: file, package, version, source path, licence, sha256."""
    extracted = extracted.resolve()
    w = csv.writer(out, delimiter="\t", lineterminator="\n")
    w.writerow(["file", "package", "version", "source", "licence", "sha256"])
    rows = []
    with open(prepared, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            source = Path(row["source"]).resolve().relative_to(extracted)
            pkg, rel = source.parts[0], Path(*source.parts[1:]).as_posix()
            version = (extracted / pkg / ".deb").read_text().strip().split("_")[1].replace("%3a", ":")
            shown = rel
            m = re.match(rf"{UNPACKED}/([^/]+)/(.*)", rel)
            if m:  # a member of an archive: name the archive as the package installs it
                archive = next(p for p in _archives(extracted, pkg) if p.stem == m.group(1))
                shown = f"{archive.relative_to(extracted / pkg).as_posix()}:{m.group(2)}"
            digest = hashlib.sha256((photos / row["file"]).read_bytes()).hexdigest()
            rows.append([row["file"], pkg, version, shown, licence_of(extracted, pkg, rel), digest])
    w.writerows(sorted(rows))


def check(photos: Path, limit: float = 0.95) -> list[str]:
    """Prepared photographs that look like one of scikit-image's bundled images (the evaluation set).

    Each is compared with each scikit-image image, whole and centre-cropped to a square,
    by the correlation of their 16x16 thumbnails (``demoe.data.thumbnail``): the same
    picture scores about 1, the training photographs score at most 0.80 today.
    """
    import cv2
    import numpy as np
    import skimage

    from demoe.data import list_images, shrink, thumbnail

    refs, names = [], []
    for f in list_images([Path(skimage.__file__).parent / "data"], recursive=False):
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if img is not None and min(img.shape[:2]) >= 16:
            refs += [thumbnail(img), thumbnail(shrink(img, 448, 1.0, 1.0))]
            names += [f.name] * 2
    refs = np.array(refs)
    found = []
    for f in list_images([photos]):
        c = refs @ thumbnail(cv2.imread(str(f), cv2.IMREAD_COLOR))
        if c.max() >= limit:
            found.append(f"{f.name} looks like scikit-image's {names[int(c.argmax())]} (correlation {c.max():.2f})")
    return found


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"not a regular expression ({err}): {text}") from None
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("unpack", "list", "manifest", "check"):
        p = sub.add_parser(name)
        p.add_argument("photos" if name == "check" else "extracted", type=Path)
        if name == "list":
            p.add_argument("--licences", type=_regex, default=None,
                           help="regular expression: only files under a matching licence")
        if name == "manifest":
            p.add_argument("prepared", type=Path, help="the TSV written by python -m demoe.data --manifest")
            p.add_argument("photos", type=Path, help="the folder of prepared photographs")
    args = parser.parse_args(argv)
    if args.command == "unpack":
        unpack(args.extracted)
    elif args.command == "list":
        sys.stdout.write("".join(f"{p}\n" for p in select(args.extracted, args.licences)))
    elif args.command == "manifest":
        manifest(args.extracted, args.prepared, args.photos, sys.stdout)
    else:
        found = check(args.photos)
        for line in found:
            print(f"error: {line}", file=sys.stderr)
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
