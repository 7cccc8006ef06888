"""Preparing training photographs (demoe.data.prepare_photos)."""

import csv
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from demoe.data import main as data_main
from demoe.data import prepare_photos, thumbnail


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
    written = prepare_photos([photos], tmp_path / "out", short_side=300, max_aspect=1.0, quality=94, dedupe=0.97)
    by_source = {r.source.name: r for r in written}
    assert sorted(by_source) == ["a_big.png", "b.png"]  # a_small.jpg is a_big.png, smaller
    assert by_source["a_big.png"].duplicates == (photos / "a_small.jpg",)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(r.path.name for r in written)
    # the larger copy wins even when it comes second: the smaller one's file is removed
    (photos / "a_big.png").rename(photos / "z_big.png")
    again = prepare_photos([photos], tmp_path / "out2", short_side=300, max_aspect=1.0, dedupe=0.97)
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
    kw = dict(short_side=300, max_aspect=1.0, quality=94, dedupe=0.97)
    first = {r.path.name: r.path.read_bytes() for r in prepare_photos([photos], tmp_path / "out", **kw)}
    second = {r.path.name: r.path.read_bytes() for r in prepare_photos([photos], tmp_path / "out", **kw)}
    assert first == second
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(first)


def test_inputs_untouched(photos, tmp_path):
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    prepare_photos([photos], tmp_path / "out", quality=90, dedupe=0.97, max_aspect=1.0)
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
