"""classify_blur(): the routing deblur() uses, without restoring the image."""

import dask.array as da
import numpy as np
import pytest

from demoe import TASKS, classify_blur, deblur


@pytest.mark.parametrize("shape, dtype, kw", [
    ((48, 72, 3), np.uint8, {}),
    ((2, 40, 56), np.uint16, {"tile_size": 32, "overlap": 4}),  # planes routed one by one, averaged
    ((40, 40, 5), np.float32, {"bgr": False}),  # five channels, each routed as gray
    ((40, 60, 3), np.uint8, {"bgr": True, "tlc": 16, "streams": 2, "batch_size": 2}),
])
def test_probabilities_are_the_ones_deblur_routes_with(tiny_model, shape, dtype, kw):
    rng = np.random.default_rng(0)
    img = (rng.random(shape) * (255 if dtype == np.uint8 else 4000)).astype(dtype)
    before = img.copy()
    probs = classify_blur(img, model=tiny_model, device="cpu", **kw)
    np.testing.assert_array_equal(img, before)  # the input is left alone
    _, info = deblur(img, model=tiny_model, device="cpu", return_info=True, **kw)
    assert list(probs) == list(TASKS) and probs == info["probabilities"]
    assert sum(probs.values()) == pytest.approx(1, abs=1e-6)


def test_dask_is_routed_from_its_central_crop_as_deblur_does(tiny_model):
    img = np.random.default_rng(1).random((2, 100, 90)).astype(np.float32)
    lazy = da.from_array(img, chunks=(1, 50, 45))
    probs = classify_blur(lazy, model=tiny_model, device="cpu", tile_size=32)
    assert probs == deblur(lazy, model=tiny_model, device="cpu", tile_size=32, return_info=True)[1]["probabilities"]
    assert probs == classify_blur(img[0], model=tiny_model, device="cpu", tile_size=32)  # 100 x 90 < 4 tiles: all


def test_bad_input_gets_one_clear_error(tiny_model):
    img = np.zeros((32, 32, 3), np.float32)
    with pytest.raises(TypeError, match=r"classify_blur\(\) takes an image array, not a file name"):
        classify_blur("photo.png")
    with pytest.raises(TypeError, match="boolean images are not supported"):
        classify_blur(img > 0)
    with pytest.raises(ValueError, match="tile_size must be an integer >= 4"):
        classify_blur(img, model=tiny_model, tile_size=3)
    img[3, 4, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN or infinite value\(s\); pass nan_policy='keep'"):
        classify_blur(img, model=tiny_model, device="cpu")
    assert set(classify_blur(img, model=tiny_model, device="cpu", nan_policy="keep")) == set(TASKS)
    with pytest.raises(TypeError, match="task"):
        classify_blur(img, task="defocus")  # there is nothing to force: it is the classifier


def test_packaged_model_recognises_defocus(default_model, blurred_photo):
    blurry, _ = blurred_photo
    probs = classify_blur(blurry, model=default_model)
    assert max(probs, key=probs.get) == "defocus"


def test_an_image_is_routed_from_its_most_textured_tiles(tiny_model, default_model, blurred_photo, monkeypatch):
    """Flat tiles say nothing about blur: a flat margin (sky, an empty part of a slide) leaves the routing to the
    textured part, where routing from the least textured tiles would report the flat part's."""
    blurry, _ = blurred_photo
    photo = blurry[:256, 128:384]
    flat = np.full_like(photo, int(photo.mean()))
    both = np.concatenate([photo, flat], axis=1)  # 32 tiles of 64 px, half of them flat: 8 are routed
    p_photo, p_both, p_flat = (np.array(list(classify_blur(img, model=default_model, tile_size=64).values()))
                               for img in (photo, both, flat))
    assert np.abs(p_both - p_photo).max() < 0.1 < np.abs(p_flat - p_photo).max()
    # Which tiles the router sees (any weights): the textured ones only.
    seen = []
    route = tiny_model.route
    monkeypatch.setattr(tiny_model, "route", lambda x, **kw: seen.append(x.numpy().copy()) or route(x, **kw))
    texture = np.random.default_rng(3).random((64, 64)).astype(np.float32)
    classify_blur(np.concatenate([texture, np.full_like(texture, 0.5)], axis=1), model=tiny_model, tile_size=16)
    tiles = np.concatenate(seen)
    assert len(tiles) == 8 and all(t.std() > 0.1 for t in tiles)
