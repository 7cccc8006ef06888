import dataclasses
import hashlib
import re
import sys

import cv2
import numpy as np
import pytest
import tifffile

from demoe import cli, files


@pytest.fixture
def folder(tmp_path, identity_model, monkeypatch):
    """A mixed folder: 8-bit PNG, 16-bit multi-page ImageJ TIFF, RGBA PNG, .npy and a corrupt JPEG."""
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    cv2.imwrite(str(src / "img10.png"), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    cv2.imwrite(str(src / "img2.png"), rng.integers(0, 256, (30, 20), dtype=np.uint8))
    cv2.imwrite(str(src / "rgba.png"), rng.integers(0, 256, (24, 28, 4), dtype=np.uint8))
    tifffile.imwrite(src / "stack.tif", rng.integers(0, 4096, (3, 32, 36), dtype=np.uint16), imagej=True,
                     resolution=(4.0, 4.0), metadata={"axes": "ZYX", "spacing": 0.5, "unit": "um"})
    np.save(src / "sub" / "field.npy", rng.random((20, 22)).astype(np.float32))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    # Use the exact identity network so outputs can be checked pixel for pixel.
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    return src


def digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_deblur_folder(folder, tmp_path, capsys):
    before = digest(folder)
    out = tmp_path / "out"
    rc = cli.main(["deblur", str(folder), "-o", str(out), "-r", "-q", "--tile-size", "16", "--overlap", "4"])
    captured = capsys.readouterr()
    assert rc == 1  # the corrupt file failed
    assert "broken.jpg: FAILED: cannot decode broken.jpg" in captured.out + captured.err
    assert "5 deblurred, 0 skipped, 1 failed" in captured.err
    assert digest(folder) == before  # inputs byte-identical
    # Natural order: img2 before img10.
    text = captured.out + captured.err
    assert text.index("img2.png") < text.index("img10.png")
    assert "detected, p=" in text

    png = cv2.imread(str(out / "img10_deblurred.png"), cv2.IMREAD_UNCHANGED)
    assert png.shape == (40, 50, 3) and png.dtype == np.uint8
    np.testing.assert_array_equal(png, cv2.imread(str(folder / "img10.png"), cv2.IMREAD_UNCHANGED))
    rgba = cv2.imread(str(out / "rgba_deblurred.png"), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (24, 28, 4)
    np.testing.assert_array_equal(rgba, cv2.imread(str(folder / "rgba.png"), cv2.IMREAD_UNCHANGED))
    with tifffile.TiffFile(out / "stack_deblurred.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "ZYX"
        assert tif.series[0].dtype == np.uint16 and tif.series[0].shape == (3, 32, 36)
        assert tif.imagej_metadata["spacing"] == 0.5 and tif.imagej_metadata["unit"] == "um"
        assert tif.pages[0].tags["XResolution"].value == (4, 1)
        np.testing.assert_array_equal(tif.asarray(), tifffile.imread(folder / "stack.tif"))
    npy = np.load(out / "sub" / "field_deblurred.npy")
    assert npy.dtype == np.float32 and npy.shape == (20, 22)
    assert not list(out.rglob(".*partial*"))


def test_deblur_ensemble_option(tmp_path, tiny_model, monkeypatch, capsys):
    from demoe import deblur

    img = np.random.default_rng(5).random((32, 40)).astype(np.float32)
    np.save(tmp_path / "plane.npy", img)
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: tiny_model)
    assert cli.main(["deblur", str(tmp_path / "plane.npy"), "-o", str(tmp_path / "out"), "-q", "--ensemble", "4"]) == 0
    expected = deblur(img, model=tiny_model, device="cpu", ensemble=4)
    assert np.abs(expected - deblur(img, model=tiny_model, device="cpu")).max() > 1e-4  # the option matters
    np.testing.assert_allclose(np.load(tmp_path / "out" / "plane_deblurred.npy"), expected, atol=1e-6)
    with pytest.raises(SystemExit) as exc:
        cli.main(["deblur", str(tmp_path / "plane.npy"), "--ensemble", "3"])
    assert exc.value.code == 2 and "--ensemble: invalid choice: 3" in capsys.readouterr().err


def test_a_real_network_sees_each_files_channels_routing_and_intensities(tmp_path, tiny_model, monkeypatch, capsys):
    """End to end with a seeded tiny network, not the identity (which cannot see channel order, routing or the
    intensity mapping): each file's result is deblur() of its pixels in RGB order, and its line has that routing."""
    from PIL import Image as PILImage
    from skimage import data

    from demoe import deblur

    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: tiny_model)
    rgb = np.ascontiguousarray(data.astronaut()[40:88, 200:264])  # 48 x 64: red, blue and skin tones
    deep = (rgb.astype(np.uint16) * 16 + 7)[::-1]  # 12-bit colour in uint16: normalised by percentiles
    tissue = np.random.default_rng(13).integers(200, 3800, (40, 56)).astype(np.uint16)
    PILImage.fromarray(rgb).save(tmp_path / "photo.png")  # read back by OpenCV as BGR
    cv2.imwrite(str(tmp_path / "deep.png"), deep[..., ::-1])
    tifffile.imwrite(tmp_path / "tissue.tif", tissue)
    rc, text = _run(["deblur", str(tmp_path), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert rc == 0, text

    def expect(image, name):
        out, info = deblur(image, model=tiny_model, nan_policy="keep", return_info=True)
        p = info["probabilities"][info["task"]]
        assert f"{name}: {info['task']} (detected, p={p:.2f}) -> " in text  # the routing of the RGB pixels
        return out

    with PILImage.open(tmp_path / "out" / "photo_deblurred.png") as im:
        np.testing.assert_array_equal(np.asarray(im), expect(rgb, "photo.png"))
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / "deep_deblurred.png"), cv2.IMREAD_UNCHANGED),
                                  expect(deep, "deep.png")[..., ::-1])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "tissue_deblurred.tif"),
                                  expect(tissue, "tissue.tif"))
    # The network makes these differences visible: channels in the other order, or another intensity
    # mapping, give other results.
    swapped = deblur(rgb[..., ::-1], model=tiny_model)[..., ::-1]
    assert np.abs(swapped.astype(int) - deblur(rgb, model=tiny_model)).max() > 10
    ranged = deblur(tissue, model=tiny_model, normalize="range")
    assert np.abs(ranged.astype(int) - deblur(tissue, model=tiny_model)).max() > 10


def test_deblur_routing_and_preserve_mean_options(tmp_path, tiny_model, default_model, monkeypatch, capsys):
    import torch

    from demoe import deblur

    from skimage import data

    from demoe.degrade import degrade

    tiles = ["--tile-size", "32", "--overlap", "8"]
    # --routing tile, with the packaged model: a photo defocused on the left, under-exposed on the right.
    sharp = data.astronaut()[100:196, 100:260].astype(np.float32) / 255
    two = np.concatenate([degrade(sharp[:, :80], "defocus", rng=1).blurry,
                          degrade(sharp[:, 80:], "low_light", rng=2).blurry], axis=1)
    np.save(tmp_path / "two.npy", two)
    capsys.readouterr()
    assert cli.main(["deblur", str(tmp_path / "two.npy"), "-o", str(tmp_path / "tile"), "-q", "--routing", "tile",
                     *tiles]) == 0
    line = capsys.readouterr().out
    assert "two.npy: per tile: " in line and "low_light " in line  # tiles per expert
    expected = deblur(two, model=default_model, routing="tile", tile_size=32, overlap=8)
    assert np.abs(expected - deblur(two, model=default_model, tile_size=32, overlap=8)).max() > 0.1  # it matters
    np.testing.assert_allclose(np.load(tmp_path / "tile" / "two_deblurred.npy"), expected, atol=1e-6)

    img = np.random.default_rng(6).random((96, 80)).astype(np.float32)
    np.save(tmp_path / "plane.npy", img)
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: tiny_model)

    # --preserve-mean: the low-light expert (here one that darkens by 0.1) keeps the mean as well.
    with torch.no_grad():
        tiny_model.ending.weight.zero_()
        tiny_model.ending.bias.fill_(-0.1)
    for flag, out in (([], "plain"), (["--preserve-mean"], "kept")):
        assert cli.main(["deblur", str(tmp_path / "plane.npy"), "-o", str(tmp_path / out), "-q", "-t", "low_light",
                         *tiles, *flag]) == 0
    plain, kept = (np.load(tmp_path / out / "plane_deblurred.npy") for out in ("plain", "kept"))
    assert img.mean() - plain.mean() == pytest.approx(0.1, abs=0.01)
    assert kept.mean() == pytest.approx(img.mean(), abs=1e-4)

    # Not for a lazy zarr store: that file fails with the reason, the others go on.
    da = pytest.importorskip("dask.array")
    pytest.importorskip("zarr")
    da.from_array(img, chunks=(48, 40)).to_zarr(str(tmp_path / "big.zarr"))
    capsys.readouterr()
    rc = cli.main(["deblur", str(tmp_path / "big.zarr"), str(tmp_path / "plane.npy"), "-o", str(tmp_path / "z"), "-q",
                   "--preserve-mean", *tiles])
    err = capsys.readouterr()
    assert rc == 1 and "big.zarr: FAILED: --preserve-mean is not available for zarr stores" in err.out + err.err
    assert "1 deblurred, 0 skipped, 1 failed" in err.err
    for bad in (["--routing", "pixel"],):
        with pytest.raises(SystemExit) as exc:
            cli.main(["deblur", str(tmp_path / "plane.npy"), *bad])
        assert exc.value.code == 2 and "--routing: invalid choice" in capsys.readouterr().err


def test_float_tiff_with_nan_keeps_them(tmp_path, identity_model, monkeypatch, capsys):
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    img = np.random.default_rng(7).random((40, 48)).astype(np.float32) * 500
    img[:, :6] = np.nan  # e.g. blank sky outside an astronomical exposure
    tifffile.imwrite(tmp_path / "sky.tif", img)
    assert cli.main(["deblur", str(tmp_path / "sky.tif"), "-q"]) == 0
    out = tifffile.imread(tmp_path / "sky_deblurred.tif")
    assert np.array_equal(np.isnan(out), np.isnan(img))
    np.testing.assert_allclose(out[:, 6:], img[:, 6:], rtol=1e-5)
    capsys.readouterr()
    assert cli.main(["deblur", str(tmp_path / "sky.tif"), "-o", str(tmp_path / "out"), "-q",
                     "--nan-policy", "raise"]) == 1
    assert "sky.tif: FAILED: image contains 240 NaN or infinite value(s)" in capsys.readouterr().out


def test_fits_keeps_every_hdu_and_header(tmp_path, identity_model, monkeypatch, capsys):
    fits = pytest.importorskip("astropy.io.fits")
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    counts = np.random.default_rng(8).integers(0, 60000, (2, 32, 40)).astype(np.uint16)
    header = fits.Header({"OBJECT": "M51", "CTYPE1": "RA---TAN", "CRVAL1": 202.47})
    table = fits.BinTableHDU.from_columns([fits.Column(name="flux", format="E", array=np.arange(3.0))])
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(counts, header=header, name="SCI"), table]).writeto(tmp_path / "m51.fits")
    sky = np.random.default_rng(9).random((24, 30)).astype(">f4")
    sky[:3] = np.nan
    fits.PrimaryHDU(sky).writeto(tmp_path / "sky.fit")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert cli.main(["deblur", str(tmp_path), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    with fits.open(tmp_path / "out" / "m51_deblurred.fits") as hdus:
        assert [h.name for h in hdus] == ["PRIMARY", "SCI", ""]
        assert hdus["SCI"].data.dtype == np.uint16 and hdus["SCI"].header["OBJECT"] == "M51"
        assert hdus["SCI"].header["CRVAL1"] == 202.47
        np.testing.assert_array_equal(hdus["SCI"].data, counts)
        np.testing.assert_array_equal(hdus[2].data["flux"], [0.0, 1.0, 2.0])
    with fits.open(tmp_path / "out" / "sky_deblurred.fit") as hdus:
        out = hdus[0].data
    assert np.array_equal(np.isnan(out), np.isnan(sky))  # blank sky kept (the command's default)
    np.testing.assert_allclose(out[3:], sky[3:], rtol=1e-5)
    # Without astropy: one clear line per FITS file.
    monkeypatch.setitem(sys.modules, "astropy", None)
    monkeypatch.setitem(sys.modules, "astropy.io", None)
    capsys.readouterr()
    assert cli.main(["deblur", str(tmp_path / "sky.fit"), "-o", str(tmp_path / "out2"), "-q"]) == 1
    assert "sky.fit: FAILED: FITS files need astropy (pip install astropy)" in capsys.readouterr().out


def test_photos_keep_exif_and_colour_profile(tmp_path, identity_model, monkeypatch):
    """A phone photo shown upright (EXIF orientation) and in its colours (ICC) stays so after deblurring."""
    from PIL import Image as PILImage
    from PIL import ImageCms

    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rng = np.random.default_rng(10)
    exif = PILImage.Exif()
    exif[0x0112], exif[0x010F] = 6, "Canon"  # orientation: rotate 90 degrees to show; camera make
    from skimage import data

    PILImage.fromarray(data.astronaut()[100:292:4, 100:356:4]).save(  # a photo: JPEG keeps it closely
        tmp_path / "shaken.jpg", quality=95, exif=exif.tobytes(), icc_profile=icc)
    rgba = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    PILImage.fromarray(rgba).save(tmp_path / "logo.png", icc_profile=icc)
    deep = rng.integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)  # 16-bit colour: Pillow cannot write it, OpenCV does
    assert cli.main(["deblur", str(tmp_path), "-o", str(tmp_path / "out"), "-q"]) == 0
    with PILImage.open(tmp_path / "out" / "shaken_deblurred.jpg") as im:
        assert im.getexif()[0x0112] == 6 and im.getexif()[0x010F] == "Canon" and im.info["icc_profile"] == icc
        assert im.size == (64, 48)  # pixels stored as they were: the viewer still turns them upright
        with PILImage.open(tmp_path / "shaken.jpg") as src:
            assert np.abs(np.asarray(im, float) - np.asarray(src, float)).mean() < 2  # re-encoded at quality 95
    with PILImage.open(tmp_path / "out" / "logo_deblurred.png") as im:
        assert im.mode == "RGBA" and im.info["icc_profile"] == icc
        np.testing.assert_array_equal(np.asarray(im), rgba)  # lossless, channel order right
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / "deep_deblurred.png"), cv2.IMREAD_UNCHANGED), deep)


def test_every_image_hdu_of_a_mosaic_is_restored(tmp_path, tiny_model, monkeypatch, capsys):
    """A mosaic camera's FITS file: one image HDU per detector, each restored (and routed) on its own."""
    fits = pytest.importorskip("astropy.io.fits")
    from demoe import deblur

    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: tiny_model)
    rng = np.random.default_rng(12)
    chips = [rng.integers(0, 60000, (32, 40)).astype(np.uint16) for _ in range(3)]
    fits.HDUList([fits.PrimaryHDU(), *(fits.ImageHDU(c, name=f"CCD{i}") for i, c in enumerate(chips))]).writeto(
        tmp_path / "mosaic.fits")
    assert cli.main(["deblur", str(tmp_path / "mosaic.fits"), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert "(and 2 more image HDUs)" in capsys.readouterr().out
    with fits.open(tmp_path / "out" / "mosaic_deblurred.fits") as hdus:
        assert [h.name for h in hdus] == ["PRIMARY", "CCD0", "CCD1", "CCD2"]
        for chip, hdu in zip(chips, hdus[1:]):
            expected = deblur(chip, model=tiny_model, device="cpu", nan_policy="keep")
            assert not np.array_equal(expected, chip)
            np.testing.assert_array_equal(hdu.data, expected)
    # A TIFF with several series: only the first is restored, and the line says so.
    with tifffile.TiffWriter(tmp_path / "two.ome.tif", ome=True) as tif:
        for chip in chips[:2]:
            tif.write(chip, metadata={"axes": "YX"})
    assert cli.main(["deblur", str(tmp_path / "two.ome.tif"), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert "(its first series only: 1 more not in the result)" in capsys.readouterr().out


def test_existing_outputs_need_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["deblur", str(folder / "img2.png"), "-o", str(out), "-q"]
    assert cli.main(args) == 0
    target = out / "img2_deblurred.png"
    target.write_bytes(b"keep me")
    assert cli.main(args) == 0
    assert target.read_bytes() == b"keep me"
    assert "skipped" in capsys.readouterr().out
    assert cli.main([*args, "--overwrite"]) == 0
    assert cv2.imread(str(target)) is not None


def test_refuses_to_overwrite_inputs(folder, capsys):
    before = digest(folder)
    rc = cli.main(["deblur", str(folder / "img2.png"), "-o", str(folder), "--suffix", "", "-q", "--overwrite"])
    assert rc == 2
    assert "would overwrite an input" in capsys.readouterr().err
    assert digest(folder) == before


def test_an_input_is_never_the_output_of_another_input(tmp_path, identity_model, monkeypatch, capsys):
    """`demoe deblur a.png a_deblurred.png --overwrite` would write a.png's result over the second input."""
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    rng = np.random.default_rng(11)
    for name in ("a.png", "a_deblurred.png"):
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 256, (16, 20, 3), dtype=np.uint8))
    (tmp_path / "out").mkdir()
    cv2.imwrite(str(tmp_path / "out" / "b_deblurred.png"), rng.integers(0, 256, (16, 20), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), rng.integers(0, 256, (16, 20), dtype=np.uint8))
    before = digest(tmp_path)
    for argv in ([str(tmp_path / "a.png"), str(tmp_path / "a_deblurred.png")],  # beside their source
                 [str(tmp_path / "a_deblurred.png"), str(tmp_path / "a.png")],  # in either order
                 [str(tmp_path / "b.png"), str(tmp_path / "out" / "b_deblurred.png"), "-o", str(tmp_path / "out")]):
        rc, text = _run(["deblur", *argv, "-q", "--overwrite"], capsys)
        assert rc == 2 and "would overwrite an input" in text, argv
        assert digest(tmp_path) == before, argv  # nothing written, not even the other file's result


def test_rerun_on_a_folder_skips_what_is_done(folder, capsys):
    (folder / "broken.jpg").unlink()
    assert cli.main(["deblur", str(folder), "-r", "-q"]) == 0  # outputs beside their sources
    done = digest(folder)
    capsys.readouterr()
    # The second run leaves the earlier outputs out of the inputs and skips their sources.
    assert cli.main(["deblur", str(folder), "-r", "-q"]) == 0
    captured = capsys.readouterr()
    assert "left out 5 earlier output(s)" in captured.err and "0 deblurred, 5 skipped, 0 failed" in captured.err
    assert digest(folder) == done and not list(folder.rglob("*_deblurred_deblurred*"))
    # --overwrite redoes them; an output named on the command line is an input like any other.
    assert cli.main(["deblur", str(folder), "-r", "-q", "--overwrite"]) == 0
    assert "5 deblurred" in capsys.readouterr().err
    assert cli.main(["deblur", str(folder / "img2_deblurred.png"), "-q"]) == 0
    assert (folder / "img2_deblurred_deblurred.png").is_file()


OME_XML = (  # as a microscope's software writes it: calibration, channel, planes, an instrument, file UUIDs
    '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
    'UUID="urn:uuid:11111111-2222-3333-4444-555555555555"><Instrument ID="Instrument:0"><Objective '
    'ID="Objective:0:0" NominalMagnification="63.0" LensNA="1.4"/></Instrument><Image ID="Image:0" Name="scan_001">'
    '<AcquisitionDate>2024-05-01T10:00:00</AcquisitionDate><InstrumentRef ID="Instrument:0"/><Pixels ID="Pixels:0" '
    'DimensionOrder="XYZTC" Type="uint16" SizeX="40" SizeY="32" SizeZ="2" SizeT="2" SizeC="1" PhysicalSizeX="0.1" '
    'PhysicalSizeXUnit="&#181;m" PhysicalSizeY="0.1" PhysicalSizeYUnit="&#181;m" PhysicalSizeZ="0.5" '
    'PhysicalSizeZUnit="&#181;m" TimeIncrement="2.5" TimeIncrementUnit="s"><Channel ID="Channel:0:0" Name="mCherry" '
    'SamplesPerPixel="1" EmissionWavelength="610" EmissionWavelengthUnit="nm"/><TiffData FirstC="0" FirstT="0" '
    'FirstZ="0" IFD="0" PlaneCount="4"><UUID FileName="scan.ome.tif">urn:uuid:11111111-2222-3333-4444-555555555555'
    '</UUID></TiffData>' + "".join(f'<Plane TheC="0" TheT="{t}" TheZ="{z}" DeltaT="{2.5 * t + 0.1 * z}" '
                                  'ExposureTime="50"/>' for t in range(2) for z in range(2)) + '</Pixels></Image></OME>')


def test_ome_tiff_keeps_its_metadata_and_name(tmp_path, identity_model, monkeypatch, capsys):
    from demoe.files import split_name

    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    data = np.random.default_rng(4).integers(0, 4000, (2, 2, 32, 40), dtype=np.uint16)
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "scan.ome.tif", data, description=OME_XML, metadata=None, photometric="minisblack")
    assert cli.main(["deblur", str(src), "-q"]) == 0
    out = src / "scan_deblurred.ome.tif"  # still an .ome.tif, as OME readers (Bio-Formats, Fiji) expect
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.series[0].axes == "TZYX" and tif.series[0].dtype == np.uint16
        np.testing.assert_array_equal(tif.series[0].asarray(), data)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        ome_uuid = tifffile.xml2dict(tif.ome_metadata)["OME"]["UUID"]
    assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeZ"], pixels["PhysicalSizeZUnit"]) == (0.1, 0.5, "µm")
    assert (pixels["TimeIncrement"], pixels["TimeIncrementUnit"]) == (2.5, "s")
    assert pixels["Channel"]["Name"] == "mCherry" and pixels["Channel"]["EmissionWavelength"] == 610
    assert [p["DeltaT"] for p in pixels["Plane"]] == [0.0, 0.1, 2.5, 2.6]
    assert "scan.ome.tif" not in str(pixels["TiffData"]) and "11111111" not in ome_uuid  # not the input's identity
    # A second run on the folder knows the result for an earlier output.
    capsys.readouterr()
    assert cli.main(["deblur", str(src), "-q"]) == 0
    assert "0 deblurred, 1 skipped" in capsys.readouterr().err
    assert split_name("a.b.OME.TIFF") == ("a.b", ".OME.TIFF") and split_name("x.tif") == ("x", ".tif")
    assert split_name(".ome.tif") == (".ome", ".tif")


def test_ome_metadata_that_cannot_be_written_warns(tmp_path):
    from demoe.files import Image, write_image

    data = np.zeros((3, 8, 8), np.uint16)
    bad = {"axes": "ZYX", "photometric": "minisblack", "ome": {"Pixels": {"DimensionOrder": "bogus"}}}
    with pytest.warns(RuntimeWarning, match="OME metadata could not be written back"):
        write_image(tmp_path / "x.ome.tif", Image(data, None, tiff=bad))
    with tifffile.TiffFile(tmp_path / "x.ome.tif") as tif:
        assert tif.series[0].axes == "ZYX" and tif.series[0].shape == (3, 8, 8)


def test_default_output_beside_input(folder):
    assert cli.main(["deblur", str(folder / "img2.png"), "-q"]) == 0
    assert (folder / "img2_deblurred.png").is_file()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    image = files.Image(np.zeros((10, 10), np.uint16), None, tiff={"axes": "YX"})

    def boom(tmp, img):
        tmp.write_bytes(b"half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "_write_tiff", boom)
    with pytest.raises(KeyboardInterrupt):
        files.write_image(tmp_path / "out.tif", image)
    assert list(tmp_path.iterdir()) == []


def test_zarr_in_zarr_out(tmp_path, identity_model, monkeypatch, capsys):
    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    img = np.random.default_rng(0).integers(0, 4000, (64, 48), dtype=np.uint16)
    da.from_array(img, chunks=(32, 24)).to_zarr(str(tmp_path / "big.zarr"))
    rc = cli.main(["deblur", str(tmp_path / "big.zarr"), "-o", str(tmp_path / "out"),
                   "--tile-size", "16", "--overlap", "4", "--progress"])  # bars: captured stderr is no terminal
    assert rc == 0
    assert re.search(r"big\.zarr: +\d+%.*\d+/\d+ \[.*task/s", capsys.readouterr().err)  # progress as dask computes
    out = zarr.open(str(tmp_path / "out" / "big_deblurred.zarr"), mode="r")
    np.testing.assert_array_equal(out[:], img)
    assert out.chunks == (32, 24)  # written as it was read (deblur() computes in chunks of whole tiles)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr_in_ome_zarr_out(tmp_path, identity_model, monkeypatch, capsys, zarr_format):
    """An OME-Zarr image (0.4 in zarr v2, 0.5 in zarr v3): its full resolution, lazily, with its metadata."""
    zarr = pytest.importorskip("zarr", minversion="3")
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    img = np.random.default_rng(1).integers(0, 4000, (2, 64, 48), dtype=np.uint16)
    multiscales = [{"version": "0.4", "axes": [{"name": n, "type": "space"} for n in "zyx"], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.2, 0.2]}]},
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.4, 0.4]}]}]}]
    root = zarr.open_group(str(tmp_path / "cells.ome.zarr"), mode="w", zarr_format=zarr_format)
    root.attrs.update({"multiscales": multiscales} if zarr_format == 2 else
                      {"ome": {"version": "0.5", "multiscales": multiscales}})
    root.create_array("0", shape=img.shape, chunks=(1, 32, 24), dtype=img.dtype)[:] = img
    root.create_array("1", shape=(2, 32, 24), chunks=(1, 32, 24), dtype=img.dtype)[:] = img[:, ::2, ::2]
    rc = cli.main(["deblur", str(tmp_path / "cells.ome.zarr"), "-o", str(tmp_path / "out"), "-q",
                   "--tile-size", "16", "--overlap", "4"])
    assert rc == 0
    out = zarr.open_group(str(tmp_path / "out" / "cells_deblurred.ome.zarr"), mode="r")
    assert out.metadata.zarr_format == zarr_format and sorted(out.keys()) == ["0", "1"]
    meta = dict(out.attrs) if zarr_format == 2 else out.attrs["ome"]
    assert meta["multiscales"] == multiscales
    np.testing.assert_array_equal(out["0"][:], img)
    # The lower level is remade from the result (block means), not copied from the blurry input.
    means = img.reshape(2, 32, 2, 24, 2).mean(axis=(2, 4))
    assert out["1"].shape == (2, 32, 24) and out["1"].dtype == np.uint16
    np.testing.assert_allclose(out["1"][:], means, atol=0.5)
    # A zarr group that is not an OME-Zarr image: one clear line.
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("a", shape=(4, 4), dtype="f4")
    capsys.readouterr()
    assert cli.main(["deblur", str(tmp_path / "plain.zarr"), "-o", str(tmp_path / "out"), "-q"]) == 1
    assert "plain.zarr: FAILED: plain.zarr is a zarr group without OME-Zarr 'multiscales' metadata" in \
        capsys.readouterr().out


def test_missing_input_and_empty_folder(tmp_path, capsys):
    assert cli.main(["deblur", str(tmp_path / "nope.png")]) == 2
    (tmp_path / "empty").mkdir()
    assert cli.main(["deblur", str(tmp_path / "empty")]) == 2
    assert "no images found" in capsys.readouterr().err


def test_info(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "devices available: cpu" in text or "cuda" in text
    assert "default model:" in text and "NVIDIA H200" in text


def test_info_on_a_run_folder_or_checkpoint(tmp_path, tiny_model, capsys):
    from demoe import save_model

    (tmp_path / "run").mkdir()
    save_model(tiny_model, tmp_path / "run" / "model.safetensors", training={
        "sessions": [{"start_step": 0, "end_step": 7, "hardware": "test rig", "wall_time_s": 60}], "photos": 3,
        "config": {"pairs": ["scope/:defocus"]}})
    assert cli.main(["info", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert f"model: {tmp_path / 'run'}" in text and "training: steps 0-7 on test rig, 1.0 min" in text
    assert "data: 3 photographs + dead leaves + real pairs scope/:defocus" in text
    assert "input convention: not recorded in the file" in text  # saved without one
    assert '"width": 4' in text and "default model" not in text
    assert cli.main(["info", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_python_dash_m_demoe_is_the_command():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "demoe", "deblur", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "usage: demoe deblur" in run.stdout


def test_output_piped_into_head_is_not_a_traceback():
    import subprocess
    import sys

    # `true` exits without reading, so every write of `demoe info` meets a closed pipe.
    run = subprocess.run(f"('{sys.executable}' -m demoe info; echo status=$? >&2) | true", shell=True,
                         capture_output=True, text=True)
    assert "status=141" in run.stderr and "Traceback" not in run.stderr and "Exception" not in run.stderr, run.stderr


def test_help_everywhere(capsys):
    for argv in (["--help"], ["deblur", "--help"], ["info", "--help"], ["train", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    assert "--time-limit" in capsys.readouterr().out


def test_ctrl_c_during_training_keeps_the_steps_done(tmp_path, monkeypatch, capsys):
    import torch

    from demoe import train as train_module

    real, calls = train_module.batch_losses, []

    def interrupted_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "batch_losses", interrupted_on_third_step)
    out = tmp_path / "run"
    argv = ["train", "--width", "4", "--enc-blk-nums", "1", "1", "--dec-blk-nums", "1", "1", "--middle-blk-num", "1",
            "--patch", "32", "--batch", "2", "--workers", "0", "--steps", "4", "--warmup", "1",
            "--ckpt-every", "100", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 130
    assert "interrupted at step 2" in capsys.readouterr().err
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2  # not the last checkpoint (none yet)
    assert not (out / "model.safetensors").exists()
    monkeypatch.setattr(train_module, "batch_losses", real)
    assert cli.main(argv) == 0
    assert "resumed from" in capsys.readouterr().err and (out / "model.safetensors").is_file()


def test_ctrl_c_during_deblur_is_one_line(folder, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("demoe.api.deblur", interrupt)
    assert cli.main(["deblur", str(folder / "img2.png"), "-o", str(tmp_path / "out"), "-q"]) == 130
    assert capsys.readouterr().err.strip().endswith("demoe: interrupted")
    assert not list((tmp_path / "out").glob("*"))


def test_train_command_runs_and_resumes(tmp_path):
    args = ["train", "--width", "4", "--enc-blk-nums", "1", "1", "--dec-blk-nums", "1", "1", "--middle-blk-num", "1",
            "--patch", "32", "--batch", "2", "--workers", "0", "--steps", "3", "--warmup", "1", "--ckpt-every", "2",
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(args) == 0
    from demoe import load_model

    model = load_model(tmp_path / "run" / "model.safetensors", device="cpu")
    assert model.metadata["training"]["steps"] == 3
    assert cli.main([*args[:-5], "--steps", "5", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    resumed = load_model(tmp_path / "run" / "model.safetensors", device="cpu")
    sessions = resumed.metadata["training"]["sessions"]
    assert [s["start_step"] for s in sessions] == [0, 3] and resumed.metadata["training"]["steps"] == 5


def test_train_with_your_own_psf(tmp_path, capsys):
    from demoe import load_model

    psf = np.zeros((15, 15), np.float32)
    psf[7, :] = 1.0  # a measured 15 px smear, say
    tifffile.imwrite(tmp_path / "psf.tif", psf)
    tifffile.imwrite(tmp_path / "stack.tif", np.ones((3, 5, 5), np.float32))
    args = ["train", "--width", "4", "--enc-blk-nums", "1", "--dec-blk-nums", "1", "--middle-blk-num", "1",
            "--patch", "32", "--batch", "2", "--workers", "0", "--steps", "2", "--warmup", "1", "--no-progress",
            "--psf", f"{tmp_path / 'psf.tif'}:global_motion", "--psf-fraction", "1", "--out", str(tmp_path / "run")]
    assert cli.main(args) == 0
    record = load_model(tmp_path / "run", device="cpu").metadata["training"]
    assert record["config"]["psf"] == [f"{tmp_path / 'psf.tif'}:global_motion"]
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "run")]) == 0
    assert f"+ your PSFs {tmp_path / 'psf.tif'}:global_motion" in capsys.readouterr().out
    bad = [*args[:-4], "--psf", f"{tmp_path / 'stack.tif'}:defocus", "--out", str(tmp_path / "run2")]
    assert cli.main(bad) == 2
    assert "stack.tif: a PSF must be one 2-D image" in capsys.readouterr().err and not (tmp_path / "run2").exists()


def test_freeze_encoder_trains_only_decoder_experts_router(tmp_path):
    import torch

    from demoe import load_model, save_model
    from demoe.train import TrainConfig, train

    from conftest import randomize
    from demoe import DeMoE

    start = randomize(DeMoE(width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]), seed=2)
    init = save_model(start, tmp_path / "init.safetensors")
    cfg = TrainConfig(init=str(init), freeze_encoder=True, patch=32, batch=2, workers=0, steps=2, warmup=1,
                      out=str(tmp_path / "ft"), lr=1e-2)
    tuned = load_model(train(cfg, progress=False), device="cpu")
    before, after = start.state_dict(), tuned.state_dict()
    frozen = [k for k in before if k.startswith(("intro.", "encoders.", "downs.", "middle_blks."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["ending.weight"], after["ending.weight"])
    assert not torch.equal(before["mlp_branch.classifier.6.weight"], after["mlp_branch.classifier.6.weight"])
    assert tuned.metadata["training"]["init"]["source"] == "init.safetensors"


def test_router_only_trains_the_router_alone(tmp_path):
    import pytest
    import torch

    from conftest import randomize
    from demoe import DeMoE, load_model, save_model
    from demoe.train import TrainConfig, train

    start = randomize(DeMoE(width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]), seed=3)
    init = save_model(start, tmp_path / "init.safetensors", patch_size=48)
    cfg = TrainConfig(init=str(init), router_only=True, patch=32, batch=2, workers=0, steps=2, warmup=1,
                      out=str(tmp_path / "router"), lr=1e-2)
    tuned = load_model(train(cfg, progress=False), device="cpu")
    before, after = start.state_dict(), tuned.state_dict()
    router = [k for k in before if k.startswith("mlp_branch.")]
    rest = [k for k in before if not k.startswith("mlp_branch.")]
    assert rest and all(torch.equal(before[k], after[k]) for k in rest)
    assert not torch.equal(before["mlp_branch.classifier.6.weight"], after["mlp_branch.classifier.6.weight"])
    assert router
    # deblur() sizes tiles from the restoration's training patch: the router's patch must not replace it
    assert tuned.metadata["patch_size"] == 48
    with pytest.raises(ValueError, match="router_only needs --init"):
        train(TrainConfig(router_only=True, patch=32, batch=2, workers=0, steps=1, out=str(tmp_path / "x")),
              progress=False)


def test_init_from_the_packaged_weights_or_a_run_folder(tmp_path):
    import torch

    from demoe import load_model
    from demoe.train import TrainConfig, init_path, train

    packaged = load_model(device="cpu")
    cfg = TrainConfig(init="packaged", router_only=True, patch=32, batch=2, workers=0, steps=1, warmup=1,
                      out=str(tmp_path / "first"), lr=1e-3)
    first = load_model(train(cfg, progress=False), device="cpu")
    assert first.metadata["training"]["init"]["source"] == "demoe-compact.safetensors"
    assert torch.equal(first.state_dict()["intro.weight"], packaged.state_dict()["intro.weight"])
    # A finished run's folder stands for its model.safetensors.
    assert init_path(str(tmp_path / "first")) == tmp_path / "first" / "model.safetensors"
    cfg2 = TrainConfig(init=str(tmp_path / "first"), router_only=True, patch=32, batch=2, workers=0, steps=1,
                       warmup=1, out=str(tmp_path / "second"), lr=1e-3)
    second = load_model(train(cfg2, progress=False), device="cpu")
    assert second.metadata["training"]["init"]["source"] == "model.safetensors"
    assert second.metadata["training"]["init"]["training"]["init"]["source"] == "demoe-compact.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="the folder has no model.safetensors"):
        TrainConfig(init=str(tmp_path / "empty")).check()


def test_ema_weights_are_exported_and_survive_resume(tmp_path):
    import torch

    from conftest import randomize
    from demoe import DeMoE, load_model, save_model
    from demoe.train import TrainConfig, train

    start = randomize(DeMoE(width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]), seed=4)
    init = save_model(start, tmp_path / "init.safetensors")
    cfg = TrainConfig(init=str(init), freeze_encoder=True, ema=0.5, patch=32, batch=2, workers=0, steps=1,
                      warmup=1, out=str(tmp_path / "ema"), lr=1e-2)
    w0 = start.state_dict()

    def raw_weights():
        return torch.load(tmp_path / "ema" / "last.pt", weights_only=True)["params"]

    exported = load_model(train(cfg, progress=False), device="cpu").state_dict()
    w1 = raw_weights()
    key = "ending.weight"
    assert not torch.equal(w1[key], w0[key])
    buffers = {k for k, _ in start.named_buffers()}
    assert buffers
    for k in w0:  # one step at decay 0.5: halfway between the start and the trained weights
        torch.testing.assert_close(exported[k], w1[k] if k in buffers else 0.5 * w0[k] + 0.5 * w1[k])
    assert torch.equal(exported["intro.weight"], w0["intro.weight"])  # frozen stays put

    resumed = load_model(train(dataclasses.replace(cfg, steps=2), progress=False), device="cpu").state_dict()
    w2 = raw_weights()
    assert not torch.equal(w2[key], w1[key])
    torch.testing.assert_close(resumed[key], 0.5 * exported[key] + 0.5 * w2[key])


@pytest.mark.parametrize("extra, message", [
    (["--router-only"], "router_only needs --init"),
    (["--loss", "l2"], "loss must be 'psnr' or 'l1'"),
    (["--pairs", "nocolon"], "--pairs takes FOLDER:TASK"),
    (["--pairs", "some/where:blurred"], "unknown task 'blurred'"),
    (["--psf", "nocolon"], "--psf takes FILE:TASK"),
    (["--psf", "psf.tif:rain"], "unknown task 'rain'"),
    (["--psf", "no/psf.tif:defocus"], "file no/psf.tif not found"),
    (["--psf-fraction", "1.5"], "psf_fraction must be between 0 and 1"),
    (["--photos", "no/such/folder"], "image folder not found: no/such/folder"),
    (["--init", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
    (["--top-k", "6"], "top_k must be between 1 and num_exp"),
    (["--ema", "1"], "ema must be in [0, 1)"),
    (["--config", "no_such.toml"], "no_such.toml"),
])
def test_train_bad_options_get_one_line_and_create_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert cli.main(["train", "--steps", "1", "--workers", "0", "--out", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("demoe train: error:") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_train_help_explains_every_option(capsys, monkeypatch):
    from demoe.train import TrainConfig

    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping inside the descriptions
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text and f.metadata["help"] in text, flag  # a description, not only a default
    assert "FOLDER:TASK, where FOLDER holds blurry/ and sharp/" in text


def test_train_config_file_with_unknown_option(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("width = 8\nlearning_rate = 0.1\n")
    assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "unknown options ['learning_rate']" in capsys.readouterr().err


# -- hostile and careless input: one clear line, the batch goes on -----------------------------
def _png_header(width, height, bit_depth=8):
    """A PNG whose header claims ``width`` x ``height``; its data holds a few bytes only."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def _jpeg_claiming(width, height):
    """A small real JPEG whose frame header is rewritten to claim ``width`` x ``height``."""
    import struct

    raw = bytearray(cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))[1].tobytes())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def _bmp_claiming(width, height):
    import struct

    raw = bytearray(cv2.imencode(".bmp", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    raw[18:26] = struct.pack("<ii", width, height)
    return bytes(raw)


def _valid_1bit_png(side):
    """A valid 1-bit black PNG of ``side`` x ``side`` (20000: 48 KB on disk, 400 M pixels decoded)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), b"\0" * (1 + -(-side // 8))
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _tiff_claiming(path, width, height):
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(width)
        tif.pages[0].tags["ImageLength"].overwrite(height)


@pytest.fixture
def good_png(tmp_path):
    path = tmp_path / "in" / "zz_good.png"
    path.parent.mkdir(exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8))
    return path


def _run(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return rc, text


def test_huge_headers_are_refused_before_decoding_and_the_batch_goes_on(tmp_path, good_png, identity_model,
                                                                        monkeypatch, capsys):
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    src = good_png.parent
    (src / "claims.png").write_bytes(_png_header(60000, 60000))
    (src / "claims.jpg").write_bytes(_jpeg_claiming(60000, 60000))
    (src / "claims.bmp").write_bytes(_bmp_claiming(60000, 60000))
    (src / "bomb.png").write_bytes(_valid_1bit_png(20000))
    _tiff_claiming(src / "claims.tif", 60000, 60000)
    with open(src / "claims.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (60000, 60000)})
        f.write(b"\0" * 64)
    rc, text = _run(["deblur", str(src), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert rc == 1 and "1 deblurred, 0 skipped, 6 failed" in text
    for name in ("claims.png", "claims.jpg", "claims.bmp", "claims.tif", "claims.npy"):
        assert re.search(rf"{re.escape(name)}: FAILED: {re.escape(name)} is 60000 x 60000 pixels \(3,600,000,000\), "
                         r"over the limit of 268,435,456 pixels per image; raise it with --max-pixels", text), name
    assert "bomb.png: FAILED: bomb.png is 20000 x 20000 pixels (400,000,000), over the limit" in text
    assert (tmp_path / "out" / "zz_good_deblurred.png").is_file()


def test_fits_header_claiming_a_huge_image_is_refused(tmp_path, good_png, identity_model, monkeypatch, capsys):
    fits = pytest.importorskip("astropy.io.fits")
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    header = fits.Header([("SIMPLE", True), ("BITPIX", -32), ("NAXIS", 2), ("NAXIS1", 60000), ("NAXIS2", 60000)])
    (tmp_path / "claims.fits").write_bytes(header.tostring().encode() + b"\0" * 2880)
    rc, text = _run(["deblur", str(tmp_path / "claims.fits"), str(good_png), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert rc == 1 and "claims.fits: FAILED: claims.fits is 60000 x 60000 pixels" in text
    assert "1 deblurred, 0 skipped, 1 failed" in text


def test_the_pixel_limit_is_an_option_and_an_environment_variable(tmp_path, good_png, identity_model, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    out = ["-o", str(tmp_path / "out"), "-q", "--overwrite"]
    rc, text = _run(["deblur", str(good_png), "--max-pixels", "400", *out], capsys)
    assert rc == 1 and "is 24 x 20 pixels (480), over the limit of 400 pixels per image" in text
    assert _run(["deblur", str(good_png), "--max-pixels", "480", *out], capsys)[0] == 0
    monkeypatch.setenv("DEMOE_MAX_PIXELS", "479")
    rc, text = _run(["deblur", str(good_png), *out], capsys)
    assert rc == 1 and "over the limit of 479 pixels" in text
    assert _run(["deblur", str(good_png), "--max-pixels", "480", *out], capsys)[0] == 0  # the option wins
    monkeypatch.setenv("DEMOE_MAX_PIXELS", "lots")
    rc, text = _run(["deblur", str(good_png), *out], capsys)
    assert rc == 2 and "DEMOE_MAX_PIXELS must be a positive whole number of pixels, got 'lots'" in text


def test_file_names_that_are_not_utf8(tmp_path, tiny_model):
    """OpenCV is never handed such a path (it crashed with a segmentation fault): the files are read, restored, named."""
    import os
    import subprocess

    from demoe import save_model

    if sys.platform == "darwin":
        pytest.skip("macOS file systems refuse names that are not UTF-8")
    model = save_model(tiny_model, tmp_path / "tiny.safetensors")
    src = tmp_path / "in"
    src.mkdir()
    odd = os.fsdecode(b"caf\xe9")
    for ext in (".png", ".jpg"):
        ok, data = cv2.imencode(ext, np.random.default_rng(1).integers(0, 256, (24, 20, 3), dtype=np.uint8))
        (src / (odd + ext)).write_bytes(data.tobytes())
    run = subprocess.run([sys.executable, "-m", "demoe", "deblur", str(src), "-o", str(tmp_path / "out"), "-q",
                          "--model", str(model), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "2 deblurred, 0 skipped, 0 failed" in run.stderr
    assert "caf\\udce9.png" in run.stdout  # the name shown escaped
    for ext in (".png", ".jpg"):
        assert cv2.imdecode(np.frombuffer((tmp_path / "out" / (odd + "_deblurred" + ext)).read_bytes(), np.uint8),
                            cv2.IMREAD_UNCHANGED).shape == (24, 20, 3)


def test_output_name_too_long_fails_that_file_only(tmp_path, good_png, identity_model, monkeypatch, capsys):
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    long = good_png.with_name("a" * 250 + ".png")  # 250 + "_deblurred.png": over the usual 255 bytes
    long.write_bytes(good_png.read_bytes())
    (tmp_path / "out").mkdir()  # an existing folder: the name itself is refused (not a missing folder first)
    rc, text = _run(["deblur", str(long), str(good_png), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert rc == 1 and re.search(r"a{250}\.png: FAILED: \[Errno 36\] File name too long", text)
    assert "1 deblurred, 0 skipped, 1 failed" in text and (tmp_path / "out" / "zz_good_deblurred.png").is_file()


def test_output_folder_that_is_a_file_or_cannot_be_made(tmp_path, good_png, identity_model, monkeypatch, capsys):
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("not a folder")
    rc, text = _run(["deblur", str(good_png), "-o", str(a_file), "-q"], capsys)
    assert rc == 2 and text.strip() == f"demoe: --output {a_file} is a file; give a folder (it is created if missing)"
    rc, text = _run(["deblur", str(good_png), "-o", str(a_file / "sub"), "-q"], capsys)
    assert rc == 2 and text.startswith(f"demoe: cannot create the output folder {a_file / 'sub'}: ")
    assert len(text.strip().splitlines()) == 1 and a_file.read_text() == "not a folder"


@pytest.mark.parametrize("options, message", [
    (["--model", "no/such.pt"], "demoe: checkpoint not found: no/such.pt"),
    (["--device", "tpu"], "demoe: unknown device 'tpu'; available here: auto, "),
    (["--device", "cuda:7"], "is not available on this machine; available here: auto, "),
    (["--device", "mps"], "is not available on this machine; available here: auto, "),
])
def test_model_and_device_errors_are_one_line(tmp_path, good_png, capsys, options, message):
    import torch

    if options[-1] == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    rc, text = _run(["deblur", str(good_png), "-o", str(tmp_path / "out"), "-q", *options], capsys)
    assert rc == 2 and message in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "out").exists()


def test_refused_checkpoint_is_one_line(tmp_path, good_png, capsys):
    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"params": Evil()}, tmp_path / "evil.pt")
    rc, text = _run(["deblur", str(good_png), "-o", str(tmp_path / "out"), "-q", "--model",
                     str(tmp_path / "evil.pt")], capsys)
    assert rc == 2 and "it holds objects that loading would have to execute, so it was refused" in text
    assert "pickled code ran" not in text and len(text.strip().splitlines()) == 1


def test_cuda_without_cuda_is_one_line(tmp_path, good_png, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, text = _run(["deblur", str(good_png), "-o", str(tmp_path / "out"), "-q", "--device", "cuda"], capsys)
    assert rc == 2 and text.strip().startswith("demoe: device 'cuda' is not available on this machine; available "
                                               "here: auto, ") and text.strip().endswith("cpu")
    assert cli.main(["train", "--steps", "1", "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "demoe train: error: device 'cuda' is not available" in capsys.readouterr().err


def test_two_inputs_with_one_output_name_are_refused(tmp_path, identity_model, monkeypatch, capsys):
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "a.png"), np.full((16, 16), 50 if folder == "d1" else 200, np.uint8))
    for extra in ([], ["--overwrite"]):
        rc, text = _run(["deblur", str(tmp_path / "d1" / "a.png"), str(tmp_path / "d2" / "a.png"), "-o",
                         str(tmp_path / "out"), "-q", *extra], capsys)
        assert rc == 2, text
        assert (f"demoe: 1 output name(s) would be written twice: {tmp_path / 'd1' / 'a.png'} and "
                f"{tmp_path / 'd2' / 'a.png'} -> {tmp_path / 'out' / 'a_deblurred.png'}") in text
        assert not (tmp_path / "out" / "a_deblurred.png").exists()
    # Their common parent with --recursive keeps them apart.
    rc, text = _run(["deblur", str(tmp_path), "-r", "-o", str(tmp_path / "out"), "-q"], capsys)
    assert rc == 0 and "2 deblurred" in text
    assert cv2.imread(str(tmp_path / "out" / "d2" / "a_deblurred.png"), cv2.IMREAD_UNCHANGED)[0, 0] == 200
    # The same file named twice is deblurred once.
    rc, text = _run(["deblur", str(tmp_path / "d1" / "a.png"), str(tmp_path / "d1" / "a.png"), "-o",
                     str(tmp_path / "once"), "-q"], capsys)
    assert rc == 0 and "1 deblurred, 0 skipped, 0 failed" in text


def test_suffix_with_a_path_separator_is_refused(tmp_path, good_png, identity_model, monkeypatch, capsys):
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    rc, text = _run(["deblur", str(good_png), "-o", str(tmp_path / "out" / "deep" / "er"), "-q",
                     "--suffix", "/../../../escaped"], capsys)
    assert rc == 2 and "--suffix '/../../../escaped' may not contain a path separator (/)" in text
    assert not list(tmp_path.rglob("*escaped*"))


def _dead_pid():
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_a_killed_run_are_removed(tmp_path, good_png, identity_model, monkeypatch, capsys):
    """A run killed during a write leaves its hidden temporary; the next run removes it (not a live run's)."""
    import os
    import subprocess

    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    out = tmp_path / "out"
    out.mkdir()
    dead = out / f".zz_good_deblurred.partial-{_dead_pid()}.png"
    dead.write_bytes(b"half an image")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = out / f".zz_good_deblurred.partial-{alive.pid}.png"
        running.write_bytes(b"being written")
        rc, text = _run(["deblur", str(good_png), "-o", str(out), "-q"], capsys)
        assert rc == 0 and not dead.exists() and running.exists()
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in out.iterdir()) == sorted([running.name, "zz_good_deblurred.png"])
    os.remove(running)


def test_concurrent_runs_on_one_zarr_leave_a_valid_store(tmp_path, tiny_model, monkeypatch, capsys):
    """A second run that writes the same store while the first is writing it: both exit 0, the store opens."""
    import subprocess

    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    from demoe import deblur, save_model

    model = save_model(tiny_model, tmp_path / "tiny.safetensors")
    img = np.random.default_rng(3).random((40, 36)).astype(np.float32)
    da.from_array(img, chunks=(20, 36)).to_zarr(str(tmp_path / "in.zarr"))
    argv = ["deblur", str(tmp_path / "in.zarr"), "-o", str(tmp_path / "out"), "-q", "--model", str(model),
            "--device", "cpu", "-t", "defocus"]
    other = []
    real_to_zarr = da.Array.to_zarr

    def to_zarr_then_another_run(self, *a, **k):
        result = real_to_zarr(self, *a, **k)
        other.append(subprocess.run([sys.executable, "-m", "demoe", *argv], capture_output=True, text=True,
                                    timeout=300))
        return result

    monkeypatch.setattr(da.Array, "to_zarr", to_zarr_then_another_run)
    rc, text = _run(argv, capsys)
    assert other[0].returncode == 0, other[0].stderr
    assert rc == 0, text
    out = tmp_path / "out" / "in_deblurred.zarr"
    expected = deblur(da.from_array(img, chunks=(20, 36)), "defocus", model=tiny_model, device="cpu").compute()
    np.testing.assert_allclose(zarr.open(str(out), mode="r")[:], expected, atol=1e-5)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["in_deblurred.zarr"]


def test_broken_zarr_tiff_and_jpeg(tmp_path, good_png, identity_model, monkeypatch, capsys):
    zarr = pytest.importorskip("zarr")
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    src = good_png.parent
    for name, multiscales in (("empty_entry", [{}]), ("no_levels", [{"datasets": []}]),
                              ("missing_level", [{"datasets": [{"path": "0"}]}])):
        group = zarr.open_group(str(src / f"{name}.zarr"), mode="w")
        group.attrs["multiscales"] = multiscales
    (src / "nothing.zarr").mkdir()
    (src / "no_pages.tif").write_bytes(b"II*\x00\x00\x00\x00\x00")  # a TIFF header whose first page is at 0: none
    photo = cv2.imencode(".jpg", np.random.default_rng(2).integers(0, 256, (96, 96, 3), dtype=np.uint8))[1].tobytes()
    (src / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    rc, text = _run(["deblur", str(src), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert rc == 1 and "1 deblurred, 0 skipped, 6 failed" in text, text
    assert ("empty_entry.zarr: FAILED: empty_entry.zarr: its OME-Zarr 'multiscales' metadata lists no levels "
            "('datasets' with a 'path' each); accepted: a zarr array, or an OME-Zarr image") in text
    assert "no_levels.zarr: FAILED: no_levels.zarr: its OME-Zarr 'multiscales' metadata lists no levels" in text
    assert "missing_level.zarr: FAILED: missing_level.zarr: OME-Zarr level(s) '0' named in its metadata are not" in text
    assert "nothing.zarr: FAILED: cannot open nothing.zarr as zarr" in text
    assert "no_pages.tif: FAILED: cannot read no_pages.tif: no_pages.tif holds no image (a TIFF with 0 pages)" in text
    # OpenCV reading the file filled the missing part with gray and the result was reported done.
    assert "truncated.jpg: FAILED: cannot decode truncated.jpg: the file is truncated (its JPEG data ends early)" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["zz_good_deblurred.png"]


def test_zarr_is_installed_with_the_package_or_named_in_one_line(tmp_path, good_png, identity_model, monkeypatch,
                                                                 capsys):
    import tomllib

    from conftest import ROOT

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"zarr\b", d) for d in deps)  # the README's plain install gets it
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    monkeypatch.setitem(sys.modules, "zarr", None)  # as if it were missing
    (tmp_path / "a.zarr").mkdir()
    rc, text = _run(["deblur", str(tmp_path / "a.zarr"), str(good_png), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert rc == 1 and "a.zarr: FAILED: reading zarr needs the zarr package: pip install zarr" in text
    assert "1 deblurred, 0 skipped, 1 failed" in text


def test_info_on_a_malformed_training_record(tmp_path, tiny_model, capsys):
    """A file's header may hold anything: `demoe info` shows what it can read, without a traceback."""
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    for record in ("abc", {"init": "x"}, {"sessions": ["x", {"wall_time_s": "a", "start_step": 3}]},
                   {"init": {"training": 5, "source": "a.pt"}, "photos": 3, "config": "x"}):
        save_file(state, str(tmp_path / "m.safetensors"), metadata={"training": json.dumps(record)})
        rc, text = _run(["info", str(tmp_path / "m.safetensors")], capsys)
        assert rc == 0 and "config: {" in text, record
    assert "training: steps 3-None on None, ? min" not in text  # the last record has no sessions
    assert "then fine-tuned from a.pt:" in text and "data: 3 photographs + dead leaves" in text


@pytest.mark.parametrize("options, message", [
    (["--tile-size", "0"], "argument --tile-size: must be positive, got 0"),
    (["--tile-size", "inf"], "argument --tile-size: not a whole number: 'inf'"),
    (["--overlap", "-1"], "argument --overlap: must be >= 0, got -1"),
    (["--max-pixels", "0"], "argument --max-pixels: must be positive, got 0"),
])
def test_bad_numbers_are_usage_errors(tmp_path, good_png, capsys, options, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["deblur", str(good_png), "-o", str(tmp_path / "out"), *options])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--tile-size", "2"], "demoe: --tile-size must be at least 4 (the model's size divisor), got 2"),
    (["--tile-size", "32", "--overlap", "16"], "demoe: --overlap (16) must be less than half of --tile-size (32)"),
])
def test_tile_options_every_file_would_fail_on_are_one_line(tmp_path, good_png, identity_model, monkeypatch, capsys,
                                                            options, message):
    monkeypatch.setattr("demoe.checkpoint.load_model", lambda *a, **k: identity_model)
    rc, text = _run(["deblur", str(good_png), "-o", str(tmp_path / "out"), "-q", *options], capsys)
    assert rc == 2 and text.strip() == message


def test_training_photos_with_names_that_are_not_utf8(tmp_path):
    """The trainer's readers hand OpenCV bytes too (its imread crashed on such names)."""
    import os
    import subprocess

    if sys.platform == "darwin":
        pytest.skip("macOS file systems refuse names that are not UTF-8")
    odd = tmp_path / os.fsdecode(b"ph\xf6to.png")
    odd.write_bytes(cv2.imencode(".png", np.random.default_rng(4).integers(0, 256, (300, 400, 3), np.uint8))[1])
    script = ("import sys; from demoe.data import read_rgb, prepare_photos; "
              "print(read_rgb(sys.argv[1]).shape, len(prepare_photos([sys.argv[2]], sys.argv[3], min_size=100)))")
    run = subprocess.run([sys.executable, "-c", script, str(odd), str(tmp_path), str(tmp_path / "small")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["(300,", "400,", "3)", "1"]
    assert len(list((tmp_path / "small").glob("*.png"))) == 1
