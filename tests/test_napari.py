"""The napari plugin, headless: the plain function, then the widget in a real viewer."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_demoe._widget import (  # noqa: E402
    DeblurSettings,
    DeblurWidget,
    deblur_layer_data,
    result_layer_kwargs,
    routing_text,
)


def _packaged_default_is(model, monkeypatch):
    """The packaged default weights load as ``model`` (checkpoint files as they are), in a fresh model cache."""
    from demoe import checkpoint

    load = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model",
                        lambda source=None, **kw: model if source is None else load(source, **kw))
    checkpoint.clear_model_cache()


@pytest.fixture
def use_model(tiny_model, monkeypatch):
    """The widget's "packaged default" becomes a small random model (fast)."""
    from demoe.checkpoint import clear_model_cache

    _packaged_default_is(tiny_model, monkeypatch)
    yield
    clear_model_cache()


@pytest.fixture
def identity_ckpt(tmp_path, identity_model):
    """A checkpoint file of the exact identity network, loaded through the widget's file picker path."""
    from demoe import save_model

    return str(save_model(identity_model, tmp_path / "identity.safetensors"))


# -- the plain function -------------------------------------------------------------------
def test_plain_function_rgb_and_plane(use_model, identity_ckpt):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out, info = deblur_layer_data(rgb, rgb=True, settings=DeblurSettings())
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert set(info["probabilities"]) == {"defocus", "global_motion", "local_motion", "synth_global_motion",
                                          "low_light"}
    stack = np.random.default_rng(1).integers(0, 4096, (3, 30, 40), dtype=np.uint16)
    plane, _ = deblur_layer_data(stack, rgb=False, settings=DeblurSettings(plane=(1,), checkpoint=identity_ckpt))
    np.testing.assert_array_equal(plane, stack[1])


def test_plain_function_keeps_nan(use_model, identity_ckpt):
    img = np.random.default_rng(0).random((30, 40)).astype(np.float32)
    img[:4] = np.nan
    out, _ = deblur_layer_data(img, rgb=False, settings=DeblurSettings(checkpoint=identity_ckpt))
    assert np.array_equal(np.isnan(out), np.isnan(img))
    np.testing.assert_allclose(out[4:], img[4:], atol=1e-6)


def test_plain_function_dask_lazy_or_computed(use_model, identity_ckpt):
    da = pytest.importorskip("dask.array")
    lazy = da.from_array(np.random.default_rng(0).random((2, 40, 40)).astype(np.float32), chunks=(1, 40, 40))
    out, _ = deblur_layer_data(lazy, rgb=False, settings=DeblurSettings(checkpoint=identity_ckpt, task="defocus"))
    assert isinstance(out, da.Array)
    seen = []
    out, _ = deblur_layer_data(lazy, rgb=False, settings=DeblurSettings(checkpoint=identity_ckpt, task="defocus",
                                                                        compute=True),
                               progress=lambda done, total: seen.append((done, total)))
    assert isinstance(out, np.ndarray)
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 2  # computing lazy data reports its progress
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    class Stop(Exception):
        pass

    def cancel(done, total):
        if done:
            raise Stop

    with pytest.raises(Stop):  # ...and can be cancelled through it, like tiles
        deblur_layer_data(lazy, rgb=False, settings=DeblurSettings(checkpoint=identity_ckpt, task="defocus",
                                                                   compute=True), progress=cancel)


def test_routing_text():
    info = {"probabilities": {"defocus": 0.7, "global_motion": 0.2, "local_motion": 0.1,
                              "synth_global_motion": 0.0, "low_light": 0.0}, "forced": False, "task": "defocus"}
    assert routing_text(info).startswith("Detected:\nDefocus: 70%\nCamera shake: 20%")
    assert routing_text({"forced": True, "task": "low_light", "probabilities": {}}) == "Expert used: Low light (chosen)"
    tiles = {**info, "tile_tasks": {"local_motion": 5, "low_light": 1}}
    assert routing_text(tiles) == "Per tile:\nMoving objects: 5 tiles\nLow light: 1 tile"


def test_plain_function_keep_mean(tmp_path, tiny_model):
    """Keep mean intensity: also under the low-light expert; lazy data only when computed now."""
    import torch

    from demoe import save_model

    da = pytest.importorskip("dask.array")
    with torch.no_grad():  # every expert darkens by 0.1
        tiny_model.ending.weight.zero_()
        tiny_model.ending.bias.fill_(-0.1)
    dark = str(save_model(tiny_model, tmp_path / "dark.safetensors"))
    img = np.random.default_rng(0).random((2, 40, 40)).astype(np.float32) * 0.5 + 0.25
    plain, _ = deblur_layer_data(img, rgb=False, settings=DeblurSettings(checkpoint=dark, task="low_light"))
    assert img.mean() - plain.mean() == pytest.approx(0.1, abs=0.01)
    kept, _ = deblur_layer_data(img, rgb=False, settings=DeblurSettings(checkpoint=dark, task="low_light",
                                                                        keep_mean=True))
    assert kept.mean() == pytest.approx(img.mean(), abs=1e-4)
    lazy = da.from_array(img, chunks=(1, 20, 20))
    with pytest.raises(ValueError, match="tick 'Compute lazy"):
        deblur_layer_data(lazy, rgb=False, settings=DeblurSettings(checkpoint=dark, task="low_light", keep_mean=True))
    now, _ = deblur_layer_data(lazy, rgb=False, settings=DeblurSettings(checkpoint=dark, task="low_light",
                                                                        keep_mean=True, compute=True))
    np.testing.assert_allclose(now, kept, atol=1e-6)


# -- the widget in napari -------------------------------------------------------------------
def _wait(qtbot, widget, timeout=60000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def test_widget_adds_result_layer(make_napari_viewer, qtbot, use_model):
    viewer = make_napari_viewer()
    widget = DeblurWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert not widget.run_button.enabled and "image layer" in widget.status.value  # nothing to deblur yet
    img = np.random.default_rng(0).integers(0, 4096, (60, 70), dtype=np.uint16)
    src = viewer.add_image(img, name="cells", scale=(0.5, 0.25), translate=(3, 4), colormap="magma",
                           contrast_limits=(10, 3000))
    assert widget.run_button.enabled
    widget.run()
    assert widget.status.value == "Loading the model…"  # the first run loads it
    _wait(qtbot, widget)
    out = viewer.layers["cells deblurred"]
    assert out.data.shape == img.shape and out.data.dtype == np.uint16
    assert tuple(out.scale) == (0.5, 0.25) and tuple(out.translate) == (3, 4)
    assert out.colormap.name == "magma" and tuple(out.contrast_limits) == (10, 3000)
    meta = out.metadata["demoe"]
    assert set(meta["probabilities"]) >= {"defocus", "low_light"} and meta["settings"]["task"] == "auto"
    assert widget.routing.value.startswith("Detected:")
    assert widget.progress.value == widget.progress.max
    widget.run()
    assert widget.status.value == "Deblurring…"  # loaded once, for the process
    _wait(qtbot, widget)
    np.testing.assert_array_equal(src.data, img)  # the input layer is untouched
    # Re-running updates the same layer instead of adding another.
    widget.task.value = "defocus"
    widget.run()
    _wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["cells", "cells deblurred"]
    assert viewer.layers["cells deblurred"].metadata["demoe"]["settings"]["task"] == "defocus"


def _docked_with_plane(make_napari_viewer, shape, seed):
    """A viewer with the widget docked and a random float layer "plane"."""
    viewer = make_napari_viewer()
    widget = DeblurWidget(viewer)
    viewer.window.add_dock_widget(widget)
    img = np.random.default_rng(seed).random(shape).astype(np.float32)
    viewer.add_image(img, name="plane")
    return viewer, widget, img


def test_widget_self_ensemble_setting(make_napari_viewer, qtbot, use_model):
    viewer, widget, img = _docked_with_plane(make_napari_viewer, (48, 40), seed=2)
    assert widget.ensemble.native.isHidden()  # an advanced setting
    widget.advanced.value = True
    assert not widget.ensemble.native.isHidden()
    widget.ensemble.value = 4
    widget.run()
    _wait(qtbot, widget)
    out = viewer.layers["plane deblurred"]
    assert out.metadata["demoe"]["ensemble"] == 4 and out.metadata["demoe"]["settings"]["ensemble"] == 4
    four, _ = deblur_layer_data(img, rgb=False, settings=DeblurSettings(ensemble=4))
    one, _ = deblur_layer_data(img, rgb=False, settings=DeblurSettings())
    np.testing.assert_allclose(out.data, four, atol=1e-6)
    assert np.abs(four - one).max() > 1e-4
    widget.auto_tiles.value = False
    widget.device.value = "cpu"
    shown = widget.settings()
    assert (shown.ensemble, shown.device, shown.tile_size) == (4, "cpu", 256)
    widget.routing_mode.value = "tile"
    assert widget.settings().routing == "tile"
    widget.advanced.value = False  # hidden advanced settings are not applied, none of them
    hidden = widget.settings()
    assert (hidden.ensemble, hidden.device, hidden.tile_size, hidden.overlap, hidden.routing) == (1, None, None, None,
                                                                                                  "image")
    assert not widget.keep_mean.native.isHidden()  # not an advanced setting
    widget.keep_mean.value = True
    assert widget.settings().keep_mean


def test_widget_per_tile_routing(make_napari_viewer, qtbot, use_model):
    viewer, widget, _ = _docked_with_plane(make_napari_viewer, (64, 64), seed=3)
    widget.advanced.value = True
    widget.auto_tiles.value = False
    widget.tile_size.value, widget.overlap.value = 32, 8
    widget.routing_mode.value = "tile"
    widget.run()
    _wait(qtbot, widget)
    meta = viewer.layers["plane deblurred"].metadata["demoe"]
    assert meta["settings"]["routing"] == "tile" and sum(meta["tile_tasks"].values()) == meta["tiles"]
    assert widget.routing.value.startswith("Per tile:\n")


def test_widget_processes_every_plane_and_rgb(make_napari_viewer, qtbot, use_model, identity_ckpt):
    viewer = make_napari_viewer()
    widget = DeblurWidget(viewer)
    stack = np.random.default_rng(2).random((4, 32, 40)).astype(np.float32)
    viewer.add_image(stack, name="stack")
    widget.model.value = "Checkpoint file…"
    widget.checkpoint.value = identity_ckpt
    widget.run()
    _wait(qtbot, widget)
    np.testing.assert_allclose(viewer.layers["stack deblurred"].data, stack, atol=1e-5)  # all planes done
    # Preview of the plane on screen only.
    viewer.dims.set_current_step(0, 2)
    widget.scope.value = "Current plane (preview)"
    widget.run()
    _wait(qtbot, widget)
    preview = viewer.layers["stack deblurred (preview)"]
    np.testing.assert_allclose(preview.data, stack[2], atol=1e-5)
    rgb = np.random.default_rng(3).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    viewer.add_image(rgb, name="photo", rgb=True)
    widget.layer.value = viewer.layers["photo"]
    widget.scope.value = "Whole stack"
    widget.run()
    _wait(qtbot, widget)
    out = viewer.layers["photo deblurred"]
    assert out.rgb and out.data.shape == rgb.shape


def test_widget_cancel_leaves_no_layer(make_napari_viewer, qtbot, use_model):
    viewer = make_napari_viewer()
    widget = DeblurWidget(viewer)
    viewer.add_image(np.random.default_rng(0).random((200, 200)).astype(np.float32), name="big")
    widget.advanced.value = True
    widget.auto_tiles.value = False
    widget.tile_size.value, widget.overlap.value = 16, 4  # many tiles, so there is time to cancel
    widget.cancel()  # nothing running: harmless
    progressed = []
    widget._progress_relay.signal.connect(lambda d, t: progressed.append((d, t)))
    widget.run()
    assert widget.worker is not None and widget.cancel_button.enabled
    widget.cancel_button.clicked.emit()  # press Cancel while it runs
    _wait(qtbot, widget)
    assert "big deblurred" not in viewer.layers
    assert widget.status.value == "Cancelled"
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    from demoe.tiling import num_tiles

    total = num_tiles(200, 200, 16, 4, multiple=4)
    assert all(done < total for done, _ in progressed)  # stopped between batches, before the end


def test_widget_bad_checkpoint_is_reported(make_napari_viewer, qtbot, tmp_path, use_model):
    viewer = make_napari_viewer()
    widget = DeblurWidget(viewer)
    viewer.add_image(np.zeros((20, 20), np.float32), name="x")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    widget.model.value = "Checkpoint file…"
    widget.checkpoint.value = str(bad)
    widget.run()
    _wait(qtbot, widget)
    assert widget.status.value.startswith("Failed:") and "bad.pt" in widget.status.value
    assert "x deblurred" not in viewer.layers


def test_dask_layer_gives_lazy_result(make_napari_viewer, qtbot, use_model):
    da = pytest.importorskip("dask.array")
    viewer = make_napari_viewer()
    widget = DeblurWidget(viewer)
    data = da.from_array(np.random.default_rng(0).random((3, 48, 48)).astype(np.float32), chunks=(1, 48, 48))
    viewer.add_image(data, name="lazy")
    assert not widget.compute.native.isHidden()  # the "compute now" choice is offered
    widget.run()
    _wait(qtbot, widget)
    assert isinstance(viewer.layers["lazy deblurred"].data, da.Array)
    widget.compute.value = True
    widget.run()
    _wait(qtbot, widget)
    assert isinstance(viewer.layers["lazy deblurred"].data, np.ndarray)
    assert widget.progress.value == widget.progress.max > 2  # dask's tasks, counted as they ran
    assert widget._unit == "tasks"
    widget.keep_mean.value = True  # reads the stack into memory first: tiles again
    widget.run()
    _wait(qtbot, widget)
    assert widget._unit == "tiles" and widget.progress.value == widget.progress.max == 3  # 3 planes, 1 tile each


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    for key in ("camera_shake", "defocus", "clock", "microscopy"):
        viewer.open_sample("napari-demoe", key)
    names = [layer.name for layer in viewer.layers]
    assert "tissue Z-stack (defocus, 12-bit)" in names and len(names) == 4
    stack = viewer.layers["tissue Z-stack (defocus, 12-bit)"]
    assert stack.data.dtype == np.uint16 and stack.data.ndim == 3


def test_samples_and_manifest_never_import_torch():
    code = ("import sys, npe2; import napari_demoe._sample_data as s; "
            "[f() for f in (s.camera_shake_photo, s.defocused_photo, s.motion_blurred_clock, s.microscopy_stack)]; "
            "pm = npe2.PluginManager.instance(); pm.discover(); assert 'napari-demoe' in pm._manifests; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_manifest_valid_and_in_filter_menu():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-demoe")
    assert [w.display_name for w in manifest.contributions.widgets] == ["Deblur (DeMoE)"]
    assert "napari/layers/filter" in manifest.contributions.menus
    assert len(manifest.contributions.sample_data) == 4
    result = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-demoe"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_result_layer_kwargs_preview_drops_leading_axes(make_napari_viewer):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((3, 10, 12)), scale=(2, 0.5, 0.25))
    kw = result_layer_kwargs(layer, DeblurSettings(plane=(1,)), {"seconds": 1.0})
    assert kw["name"] == "Image deblurred (preview)" and kw["scale"] == (0.5, 0.25)


def test_device_choices_listed(make_napari_viewer, use_model):
    viewer = make_napari_viewer()
    widget = DeblurWidget(viewer)
    assert widget.device.choices[0] == "auto" and "cpu" in widget.device.choices
    # napari resets a docked widget's choices when it is docked and on every new layer.
    viewer.window.add_dock_widget(widget)
    viewer.add_image(np.zeros((8, 8)))
    assert "cpu" in widget.device.choices


# -- closing napari while workers run ------------------------------------------------------
@pytest.fixture
def slow_model(tiny_model, monkeypatch):
    """The widget's model, each of its tile batches taking a while, so that napari can be closed in the middle."""
    import time

    from demoe.checkpoint import clear_model_cache

    forward = type(tiny_model).forward

    def slow_forward(self, *args, **kwargs):
        time.sleep(0.05)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model), "forward", slow_forward)
    _packaged_default_is(tiny_model, monkeypatch)
    yield
    clear_model_cache()


@pytest.mark.parametrize("lazy", [False, True])
def test_closing_napari_during_a_deblur_stops_it(make_napari_viewer, qtbot, slow_model, lazy):
    from napari.qt.threading import WorkerBase

    viewer = make_napari_viewer()
    widget = DeblurWidget(viewer)
    viewer.window.add_dock_widget(widget)
    img = np.random.default_rng(0).random((160, 160)).astype(np.float32)
    if lazy:
        da = pytest.importorskip("dask.array")
        img = da.from_array(img, chunks=40)
        widget.compute.value = True  # computed now, counted in dask's tasks
    viewer.add_image(img, name="big")
    widget.advanced.value, widget.auto_tiles.value = True, False
    widget.tile_size.value, widget.overlap.value = 16, 4  # many tiles: the run takes seconds
    seen = []
    widget._progress_relay.signal.connect(lambda done, total: seen.append(done))
    widget.run()
    qtbot.waitUntil(lambda: len(seen) > 0, timeout=20000)
    worker = widget.worker
    viewer.close()
    # The run is cancelled at its next tile batch (or dask task): it ends soon, adds nothing, reports nothing.
    qtbot.waitUntil(lambda: worker not in WorkerBase._worker_set, timeout=5000)
    qtbot.wait(200)
    assert "big deblurred" not in viewer.layers


def test_quitting_napari_during_the_device_check_exits_cleanly():
    """The whole process, quit while the device check still imports torch: it aborted (exit 134)."""
    script = """
import sys, threading, time
import napari, demoe
from napari_demoe._widget import DeblurWidget

started = threading.Event()
def slow():
    started.set(); time.sleep(1.5); return ["cpu"]
demoe.available_devices = slow
sys.modules.pop("torch", None)  # as at napari's start: the widget checks the devices in the background
viewer = napari.Viewer(show=False)
viewer.window.add_dock_widget(DeblurWidget(viewer))
assert started.wait(5)
viewer.close()
print("closed", flush=True)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "closed" in run.stdout, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "RuntimeError" not in run.stderr, run.stderr[-2000:]
