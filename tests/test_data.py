"""Preparing training photographs (demoe.data.prepare_photos) and the round's photo recipe."""

import csv
import importlib.util
import re
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from demoe.data import main as data_main
from demoe.data import prepare_photos, thumbnail

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples" / "training" / "photos-manifest.tsv"


def photo(seed: int, size=(600, 900)) -> np.ndarray:
    """A detailed 8-bit BGR test picture of its own (smooth layout plus fine texture)."""
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.random((6, 9, 3), np.float32), size[::-1], interpolation=cv2.INTER_CUBIC)
    fine = rng.random((*size, 3), np.float32)
    return np.clip(255 * (0.8 * coarse + 0.2 * fine), 0, 255).astype(np.uint8)


@pytest.fixture()
def photos(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a = photo(1)
    cv2.imwrite(str(src / "a_big.png"), a)
    cv2.imwrite(str(src / "a_small.jpg"), cv2.resize(a, (630, 420), interpolation=cv2.INTER_AREA))  # same picture
    cv2.imwrite(str(src / "b.png"), photo(2))
    cv2.imwrite(str(src / "tiny.png"), photo(3, (200, 300)))
    return src


def names(paths) -> list[str]:
    """File names less the temporary folders (a name is made of the last four parts of its source path)."""
    return sorted(Path(p).name.split("src_", 1)[1] for p in paths)


def test_png_by_default_downscaled_at_least_1_5x(photos, tmp_path):
    written = prepare_photos([photos], tmp_path / "out", short_side=640, min_size=256)
    assert names(r.path for r in written) == ["a_big.png", "a_small.png", "b.png"]  # tiny.png: 133 px after 1.5x
    for r in written:
        src, out = cv2.imread(str(r.source)), cv2.imread(str(r.path))
        assert out.shape[:2] == (round(src.shape[0] / 1.5), round(src.shape[1] / 1.5))


def test_jpeg_444_at_the_quality_asked(photos, tmp_path):
    written = prepare_photos([photos], tmp_path / "out", quality=94, short_side=300)
    assert written and all(r.path.suffix == ".jpg" for r in written)
    with Image.open(written[0].path) as im:
        assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4, no chroma subsampling
        assert min(im.size) == 300
    lower = prepare_photos([photos / "b.png"], tmp_path / "low", quality=60, short_side=300)[0].path
    assert lower.stat().st_size < next(r.path for r in written if r.source.name == "b.png").stat().st_size


def test_max_aspect_centre_crops_before_shrinking(photos, tmp_path):
    (r,) = prepare_photos([photos / "b.png"], tmp_path / "out", short_side=300, max_aspect=1.0)
    out = cv2.imread(str(r.path))
    assert out.shape[:2] == (300, 300)
    src = cv2.imread(str(photos / "b.png"))  # 600 x 900: its middle 600 x 600, shrunk 2x
    middle = cv2.resize(src[:, 150:750], (300, 300), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - middle).mean() < 1


def test_dedupe_keeps_one_copy_the_largest(photos, tmp_path):
    written = prepare_photos([photos], tmp_path / "out", short_side=300, max_aspect=1.0, quality=94, dedupe=0.99)
    by_source = {r.source.name: r for r in written}
    assert sorted(by_source) == ["a_big.png", "b.png"]  # a_small.jpg is a_big.png, smaller
    assert by_source["a_big.png"].duplicates == (photos / "a_small.jpg",)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(r.path.name for r in written)
    # the larger copy wins even when it comes second: the smaller one's file is removed
    (photos / "a_big.png").rename(photos / "z_big.png")
    again = prepare_photos([photos], tmp_path / "out2", short_side=300, max_aspect=1.0, dedupe=0.99)
    assert sorted(r.source.name for r in again) == ["b.png", "z_big.png"]
    assert names((tmp_path / "out2").iterdir()) == ["b.png", "z_big.png"]


def test_thumbnail_tells_apart_pictures_of_one_layout():
    sky_over_land = [photo(s) for s in range(4)]
    for img in sky_over_land:
        img[:300] = np.clip(img[:300].astype(int) + 120, 0, 255)  # all bright above, dark below
    t = [thumbnail(im) for im in sky_over_land]
    assert max(float(t[i] @ t[j]) for i in range(4) for j in range(i + 1, 4)) < 0.97
    resized = cv2.resize(sky_over_land[0], (450, 300), interpolation=cv2.INTER_AREA)
    assert float(thumbnail(resized) @ t[0]) > 0.99
    flat = np.full((50, 50, 3), 128, np.uint8)
    assert float(thumbnail(flat) @ thumbnail(flat)) == 0  # a flat image is nobody's duplicate


def test_running_twice_gives_the_same_files(photos, tmp_path):
    kw = dict(short_side=300, max_aspect=1.0, quality=94, dedupe=0.99)
    first = {r.path.name: r.path.read_bytes() for r in prepare_photos([photos], tmp_path / "out", **kw)}
    second = {r.path.name: r.path.read_bytes() for r in prepare_photos([photos], tmp_path / "out", **kw)}
    assert first == second
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(first)


def test_output_inside_the_sources_is_not_read_back(photos):
    kw = dict(short_side=300, quality=94, min_size=64)  # small enough to take its own outputs again
    first = prepare_photos([photos], photos / "small", **kw)
    second = prepare_photos([photos], photos / "small", **kw)
    assert [r.source for r in second] == [r.source for r in first] and all(r.source.parent == photos for r in second)
    assert sorted(p.name for p in (photos / "small").iterdir()) == sorted(r.path.name for r in first)


def test_inputs_untouched(photos, tmp_path):
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    prepare_photos([photos], tmp_path / "out", quality=90, dedupe=0.99, max_aspect=1.0)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


@pytest.mark.parametrize("kw, message", [(dict(quality=0), "quality"), (dict(quality=101), "quality"),
                                         (dict(max_aspect=0.5), "max_aspect"), (dict(dedupe=0), "dedupe"),
                                         (dict(dedupe=1.5), "dedupe")])
def test_bad_options_get_one_clear_error(photos, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        prepare_photos([photos], tmp_path / "out", **kw)


def test_command_line_reads_a_list_and_writes_a_manifest(photos, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(photos.iterdir())))
    tsv = tmp_path / "prepared.tsv"
    assert data_main([f"@{listing}", "-o", str(tmp_path / "out"), "--short-side", "300", "--max-aspect", "1",
                      "--jpeg", "94", "--dedupe", "--manifest", str(tsv)]) == 0
    assert re.search(r"wrote 2 images \(\d+\.\d MiB\) .*; 1 near-duplicates left out", capsys.readouterr().out)
    rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
    assert names(r["file"] for r in rows) == ["a_big.jpg", "b.jpg"]
    assert [r["duplicates"] for r in rows if r["file"].endswith("a_big.jpg")] == [str(photos / "a_small.jpg")]
    with pytest.raises(SystemExit):
        data_main([str(photos), "-o", str(tmp_path / "bad"), "--jpeg", "120"])
    assert "quality must be a JPEG quality from 1 to 100, got 120" in capsys.readouterr().err


# -- the round's recipe: examples/training/photo_sources.py and its manifest --------------------
@pytest.fixture(scope="module")
def sources():
    spec = importlib.util.spec_from_file_location("photo_sources", ROOT / "examples" / "training" / "photo_sources.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["photo_sources"] = module  # its dataclass looks itself up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["photo_sources"]


DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: example

Files: *
Copyright: 2020 Someone
License: GPL-3+

Files: images/land/*
 images/sea?.jpg
Copyright: Various
License: public-domain
 Placed in the public domain.

Files: images/land/bw*
Copyright: B. W.
License: CC-BY-SA-3.0
Comment: Cropped.

License: GPL-3+
 The text of the licence.
"""


def test_dep5_licence_last_match_wins(sources):
    assert sources.dep5_licence(DEP5, "src/main.c") == "GPL-3+"
    assert sources.dep5_licence(DEP5, "images/land/beach0@2x.jpg") == "public-domain"
    assert sources.dep5_licence(DEP5, "images/land/bwerner3@2x.jpg") == "CC-BY-SA-3.0"
    assert sources.dep5_licence(DEP5, "images/sea1.jpg") == "public-domain"
    assert sources.dep5_licence(DEP5, "images/sea12.jpg") == "GPL-3+"  # ? is one character
    # a file converted at build time (GCompris: JPEG to WebP) is known by its source name
    assert sources.dep5_licence(DEP5, "images/land/bw1.webp", "images/land/bw1.jpg") == "CC-BY-SA-3.0"
    assert sources.dep5_licence("Format: x\n\nLicense: MIT\n text\n", "a.jpg") is None


def test_zip_members_are_unpacked_and_selected(sources, tmp_path, monkeypatch):
    pkg = tmp_path / "ufoai-textures"
    pk3 = pkg / "usr/share/games/ufoai/base/0textures.pk3"
    pk3.parent.mkdir(parents=True)
    jpg = cv2.imencode(".jpg", photo(4))[1]
    with zipfile.ZipFile(pk3, "w") as z:
        z.writestr("textures/tex_ctp1/hedge02.jpg", jpg.tobytes())
        z.writestr("textures/tex_ctp1/hedge02_nm.png", b"not taken")
        z.writestr("textures/tex_ctp1/pipes.jpg", b"not taken")
    monkeypatch.setattr(sources, "SOURCES", {"ufoai-textures": sources.SOURCES["ufoai-textures"]})
    sources.unpack(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in sources.select(tmp_path)] == [
        "ufoai-textures/unpacked/0textures/textures/tex_ctp1/hedge02.jpg"]
    doc = pkg / "usr/share/doc/ufoai-textures"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Format: x\n\nFiles: *\nLicense: GPL-2+\n\n"
                                   "Files: base/textures/tex_ctp1/hedge02.jpg\nLicense: GPL-2\n")
    assert sources.licence_of(tmp_path, "ufoai-textures", "unpacked/0textures/textures/tex_ctp1/hedge02.jpg") == "GPL-2"
    assert sources.select(tmp_path, licences="^GPL-2\\+$") == []


def test_check_finds_an_evaluation_image(sources, tmp_path):
    from skimage import data

    out = tmp_path / "photos"
    out.mkdir()
    cv2.imwrite(str(out / "mine.jpg"), photo(5))
    astronaut = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(out / "renamed.jpg"), cv2.resize(astronaut, (300, 300), interpolation=cv2.INTER_AREA))
    found = sources.check(out)
    assert len(found) == 1 and found[0].startswith("renamed.jpg looks like scikit-image's astronaut")


def test_committed_manifest_is_the_round_set():
    rows = list(csv.DictReader(MANIFEST.open(encoding="utf-8"), delimiter="\t"))
    assert len(rows) >= 300
    assert len({r["file"] for r in rows}) == len(rows) and len({r["sha256"] for r in rows}) == len(rows)
    assert len({(r["package"], r["source"]) for r in rows}) == len(rows)
    assert all(r["licence"] and r["version"] and re.fullmatch(r"[0-9a-f]{64}", r["sha256"]) for r in rows)
    forbidden = re.compile(r"(?i)astronaut|camera|coffee|chelsea|rocket|coins|moon|retina|hubble|skimage|scikit")
    assert not [r["source"] for r in rows if forbidden.search(r["source"])]
    assert len({r["package"] for r in rows}) >= 8


def test_read_rgb_reads_through_the_one_image_reader(tmp_path):
    """Training pictures come through demoe.files.read_image: float RGB in [0, 1], whatever the format."""
    import tifffile

    from demoe.data import read_rgb

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), rgb[..., ::-1])  # OpenCV writes BGR
    cv2.imwrite(str(tmp_path / "a.png"), np.dstack([rgb[..., ::-1], np.full((20, 30), 7, np.uint8)]))
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    for name in ("c.png", "a.png", "c.tif"):  # colour order, alpha dropped, TIFF (tifffile) alike
        np.testing.assert_array_equal(read_rgb(tmp_path / name), rgb.astype(np.float32) / 255)
    gray16 = rng.integers(0, 65536, (20, 30), np.uint16)
    cv2.imwrite(str(tmp_path / "g.png"), gray16)
    tifffile.imwrite(tmp_path / "pages.tif", np.stack([gray16, gray16 // 2]))  # a stack: its first plane
    for name in ("g.png", "pages.tif"):
        np.testing.assert_array_equal(read_rgb(tmp_path / name), np.repeat(gray16[..., None], 3, 2) / np.float32(65535))
    tifffile.imwrite(tmp_path / "f.tif", rgb.astype(np.float32))
    with pytest.raises(ValueError,
                       match="f.tif: a training picture must be 8- or 16-bit gray, RGB or RGBA; got float32"):
        read_rgb(tmp_path / "f.tif")


def test_unreadable_sources_are_named_in_a_warning(photos, tmp_path):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but no picture")
    with pytest.warns(RuntimeWarning, match=r"left out 1 images that cannot be read: .*broken\.png"):
        written = prepare_photos([photos], tmp_path / "out", short_side=640, min_size=256)
    assert names(r.path for r in written) == ["a_big.png", "a_small.png", "b.png"]  # the others still prepared
