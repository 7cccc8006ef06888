"""The "Deblur (DeMoE)" dock widget.

Thin by design: :func:`deblur_layer_data` is the plain function behind it (all
processing is ``demoe.deblur``), :class:`DeblurWidget` only gathers settings,
runs that function on napari's thread worker, shows progress and routing, and
adds or updates the result layer. torch is imported by the worker, not when
napari starts.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
import weakref
from dataclasses import asdict, dataclass

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    RadioButtons,
    SpinBox,
)

from demoe.tasks import ENSEMBLES, TASK_LABELS, TASKS

DEFAULT_MODEL = "Packaged default"
NO_LAYER_HINT = "Add or open an image layer to deblur."
CHECKPOINT = "Checkpoint file…"


class Cancelled(Exception):
    """Raised from the progress callback to stop between tile batches."""


@dataclass
class DeblurSettings:
    task: str = "auto"
    checkpoint: str | None = None  # None: the packaged default
    tile_size: int | None = None  # None: automatic
    overlap: int | None = None
    device: str | None = None  # None: automatic
    plane: tuple[int, ...] | None = None  # leading-axis index: process this plane only
    compute: bool = False  # compute a dask layer now instead of lazily
    ensemble: int = 1  # orientations of every tile averaged (deblur's self-ensemble)
    routing: str = "image"  # "tile": every tile routed on its own
    keep_mean: bool = False  # keep every plane's mean even where low light is detected


def get_model(checkpoint: str | None, device: str | None):
    """The packaged default or a checkpoint on ``device``: the model ``demoe`` keeps loaded for the process
    (:func:`demoe.checkpoint.cached_model`, which ``deblur()``'s default and scripts share)."""
    from demoe.checkpoint import cached_model

    return cached_model(checkpoint or None, device)


def _model_loaded(settings: DeblurSettings) -> bool:
    """Whether the model ``settings`` ask for is loaded; asked without importing torch (not imported: not loaded)."""
    checkpoint = sys.modules.get("demoe.checkpoint")
    try:
        return checkpoint is not None and checkpoint.cached_model(settings.checkpoint or None, settings.device,
                                                                  load=False) is not None
    except (ValueError, OSError):  # a device or file it cannot have: the worker says what is wrong
        return False


def deblur_layer_data(data, *, rgb: bool, settings: DeblurSettings, progress=None):
    """Deblur an image layer's data; returns ``(result, info)``.

    ``data`` is the layer's array (numpy or dask; ``rgb`` layers have colour
    last). With ``settings.plane`` only that plane of the leading axes is
    processed. Dask input gives a lazy result unless ``settings.compute``;
    then ``progress`` gets dask's tasks done instead of tiles.
    """
    import demoe

    if settings.plane is not None:
        data = data[tuple(settings.plane)]
    if settings.keep_mean and _is_lazy(data):
        if not settings.compute:  # matching the mean needs the whole plane at once
            raise ValueError("Keep mean intensity needs the whole image at once: tick 'Compute lazy (dask) data "
                             "now' or untick Keep mean intensity")
        data = np.asarray(data)
    model = get_model(settings.checkpoint, settings.device)
    out, info = demoe.deblur(data, task=settings.task, model=model,
                             channel_axis=-1 if rgb else None, tile_size=settings.tile_size,
                             overlap=settings.overlap, device=settings.device,
                             progress=None if _is_lazy(data) else progress,  # lazy: counted when computed
                             ensemble=settings.ensemble, routing=settings.routing,
                             preserve_mean=True if settings.keep_mean else None,
                             nan_policy="keep", return_info=True)  # NaN (masked) pixels come back as they were
    if settings.compute and hasattr(out, "compute"):
        out = _compute_with_progress(out, progress)
    info["model"] = model.source or "packaged default"
    return out, info


def _compute_with_progress(lazy, progress=None):
    """``lazy.compute()``, reporting ``(tasks done, tasks)`` to ``progress`` (which may raise to cancel)."""
    if progress is None:
        return lazy.compute()
    from dask.callbacks import Callback

    class Tasks(Callback):
        def _start_state(self, dsk, state):
            self.total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
            progress(0, self.total)

        def _posttask(self, key, result, dsk, state, worker_id):
            progress(len(state["finished"]), self.total)

    with Tasks():
        return lazy.compute()


def result_name(layer_name: str, settings: DeblurSettings) -> str:
    return f"{layer_name} deblurred" + (" (preview)" if settings.plane is not None else "")


def result_layer_kwargs(layer, settings: DeblurSettings, info: dict) -> dict:
    """Properties of the result layer: the source's geometry and display, plus what was done."""
    drop = len(settings.plane) if settings.plane is not None else 0
    kwargs = {
        "name": result_name(layer.name, settings),
        "scale": tuple(layer.scale)[drop:],
        "translate": tuple(layer.translate)[drop:],
        "rgb": layer.rgb,
        "metadata": {**dict(layer.metadata), "demoe": {**{k: v for k, v in info.items() if k != "seconds"},
                                                       "seconds": round(info.get("seconds", 0.0), 2),
                                                       "settings": asdict(settings), "source_layer": layer.name}},
    }
    if not layer.rgb:
        kwargs["colormap"] = layer.colormap.name
        kwargs["contrast_limits"] = tuple(layer.contrast_limits)
    return kwargs


def routing_text(info: dict) -> str:
    probs = info.get("probabilities", {})
    if info.get("forced"):
        return f"Expert used: {TASK_LABELS.get(info['task'], info['task'])} (chosen)"
    if info.get("tile_tasks"):
        return "Per tile:\n" + "\n".join(f"{TASK_LABELS[t]}: {n} tile{'s' if n > 1 else ''}"
                                          for t, n in info["tile_tasks"].items())
    if not probs or any(np.isnan(p) for p in probs.values()):
        return "Blur type: per tile"
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    return "Detected:\n" + "\n".join(f"{TASK_LABELS[t]}: {p:.0%}" for t, p in ranked)


#: Widgets alive, so that their workers are stopped and awaited when the process exits.
_widgets: weakref.WeakSet[DeblurWidget] = weakref.WeakSet()


def _await_workers(timeout_ms: int = 60000) -> None:
    """Stop every widget's workers and wait for them before Qt's objects are torn down.

    A worker still running at exit (importing torch, restoring tiles) would emit
    on a deleted signal object, and PyQt aborts the process. Registered with
    atexit when the first widget is made, so that it runs before the exit
    handlers of Qt and napari, registered earlier.
    """
    running = [w for widget in list(_widgets) for w in widget._shutdown()]
    if running:
        from qtpy.QtCore import QThreadPool

        pool = QThreadPool.globalInstance()
        if pool is not None:
            pool.waitForDone(timeout_ms)


class DeblurWidget(Container):
    """Dock widget: pick an image layer, press Deblur, get "<name> deblurred"."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.worker = None
        self._device_worker = None
        self._closed = False
        self._cancel = threading.Event()
        self._unit = "tiles"

        self.layer = ComboBox(label="Image", choices=self._image_layers)
        self.task = ComboBox(label="Blur type", value="auto",
                             choices=[("Auto (detect)", "auto")] + [(TASK_LABELS[t], t) for t in TASKS])
        self.model = ComboBox(label="Model", choices=[DEFAULT_MODEL, CHECKPOINT], value=DEFAULT_MODEL)
        self.checkpoint = FileEdit(label="Checkpoint", mode="r", filter="*.pt *.pth *.safetensors", visible=False)
        self.keep_mean = CheckBox(label="Keep mean intensity", value=False,
                                  tooltip="Keep every plane's mean intensity, also where low light is detected "
                                          "(that expert otherwise brightens the image)")
        self.scope = RadioButtons(label="Process", choices=["Whole stack", "Current plane (preview)"],
                                  value="Whole stack", orientation="horizontal")
        self.compute = CheckBox(label="Compute lazy (dask) data now", value=False)
        self.advanced = CheckBox(label="Advanced settings", value=False)
        self.auto_tiles = CheckBox(label="Automatic tiles", value=True, visible=False)
        self.tile_size = SpinBox(label="Tile size", min=16, max=4096, step=16, value=256, visible=False, enabled=False)
        self.overlap = SpinBox(label="Overlap", min=0, max=1024, step=4, value=32, visible=False, enabled=False)
        # A callable, so that napari's reset_choices() (on docking, on every new layer) keeps the list.
        self._devices: list[str] = []
        self.device = ComboBox(label="Device", choices=lambda _: ["auto", *self._devices], visible=False)
        self.ensemble = ComboBox(label="Self-ensemble", value=1, visible=False,
                                 choices=[("Off", 1)] + [(f"{n} orientations ({n}x time)", n) for n in ENSEMBLES[1:]])
        self.routing_mode = ComboBox(label="Routing", value="image", visible=False,
                                     choices=[("One blur type for the image", "image"),
                                              ("Per tile (blur varies across the image)", "tile")])
        self.run_button = PushButton(text="Deblur")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self.routing = Label(label="Blur type", value="–")
        self.status = Label(label="", value="")

        self.extend([self.layer, self.task, self.keep_mean, self.model, self.checkpoint, self.scope, self.compute,
                     self.advanced, self.auto_tiles, self.tile_size, self.overlap, self.device, self.ensemble,
                     self.routing_mode, self.run_button,
                     self.cancel_button, self.progress, self.routing, self.status])

        self.model.changed.connect(lambda v: setattr(self.checkpoint, "visible", v == CHECKPOINT))
        self.advanced.changed.connect(self._toggle_advanced)
        self.auto_tiles.changed.connect(
            lambda v: [setattr(w, "enabled", not v) for w in (self.tile_size, self.overlap)])
        self.layer.changed.connect(self._refresh)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        for event in ("inserted", "removed", "reordered"):
            getattr(self.viewer.layers.events, event).connect(self._refresh)
        self._progress_relay = _ProgressRelay()
        self._progress_relay.signal.connect(self._on_progress)
        self.native.setMaximumWidth(460)  # leave the canvas its room
        # Closing napari deletes the widget's Qt side: stop the workers, and let nothing reach it after.
        self.native.destroyed.connect(lambda *_: self._shutdown())
        if not _widgets:
            atexit.unregister(_await_workers)
            atexit.register(_await_workers)
        _widgets.add(self)
        self._refresh()
        self._find_devices()

    def _shutdown(self) -> list:
        """Cancel the running deblur and disconnect every signal that reaches this widget; returns its workers."""
        if not self._closed:
            self._closed = True
            self._cancel.set()  # the progress callback raises Cancelled at the next tile batch or dask task
            for event in ("inserted", "removed", "reordered"):
                getattr(self.viewer.layers.events, event).disconnect(self._refresh)
            for worker in (self.worker, self._device_worker):
                if worker is not None:
                    worker.quit()
                    for signal in (worker.returned, worker.errored, worker.finished):
                        with contextlib.suppress(TypeError, RuntimeError):  # nothing connected, or already deleted
                            signal.disconnect()
        return [w for w in (self.worker, self._device_worker) if w is not None]

    # -- state ---------------------------------------------------------------------
    def _image_layers(self, _widget=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _refresh(self, *_):
        if self._closed:
            return
        self.layer.reset_choices()
        layer = self.layer.value
        busy = self.worker is not None
        self.run_button.enabled = layer is not None and not busy
        if layer is None:
            self.status.value = NO_LAYER_HINT
        elif self.status.value == NO_LAYER_HINT:
            self.status.value = ""
        self.scope.enabled = layer is not None and self._leading_axes(layer) > 0
        self.compute.visible = layer is not None and _is_lazy(_layer_array(layer))

    @staticmethod
    def _leading_axes(layer) -> int:
        return layer.ndim - 2  # napari's layer.ndim excludes the rgb channel axis

    def _toggle_advanced(self, on: bool):
        for w in (self.auto_tiles, self.tile_size, self.overlap, self.device, self.ensemble, self.routing_mode):
            w.visible = on

    def _find_devices(self):
        """List the devices; in the background when that means importing torch."""
        if "torch" in sys.modules:  # already loaded: instant, no thread needed
            from demoe import available_devices

            self._set_devices(available_devices())
            return
        from napari.qt.threading import create_worker

        def find():
            from demoe import available_devices

            return available_devices()

        worker = create_worker(find, _start_thread=False, _ignore_errors=True)  # keep "auto" on failure
        worker.returned.connect(self._set_devices)
        worker.start()
        self._device_worker = worker

    def _set_devices(self, devices: list[str]):
        if self._closed:
            return
        self._devices = list(devices)
        self.device.reset_choices()

    def settings(self) -> DeblurSettings:
        layer = self.layer.value
        plane = None
        if self.scope.value.startswith("Current") and layer is not None and self._leading_axes(layer) > 0:
            point = layer.world_to_data(self.viewer.dims.point[-layer.ndim:])
            lead = self._leading_axes(layer)
            shape = _layer_array(layer).shape
            plane = tuple(int(np.clip(round(float(p)), 0, shape[i] - 1)) for i, p in enumerate(point[:lead]))
        checkpoint = None
        if self.model.value == CHECKPOINT:
            checkpoint = str(self.checkpoint.value)
            if not checkpoint or checkpoint == ".":
                raise ValueError("choose a checkpoint file (.pt, .pth or .safetensors)")
        # Hidden advanced settings are not applied: all of them, not some.
        advanced = bool(self.advanced.value)
        manual = advanced and not self.auto_tiles.value
        return DeblurSettings(
            task=self.task.value, checkpoint=checkpoint,
            tile_size=int(self.tile_size.value) if manual else None,
            overlap=int(self.overlap.value) if manual else None,
            device=self.device.value if advanced and self.device.value != "auto" else None,
            plane=plane, compute=bool(self.compute.value),
            ensemble=int(self.ensemble.value) if advanced else 1,
            routing=self.routing_mode.value if advanced else "image",
            keep_mean=bool(self.keep_mean.value),
        )

    # -- running -------------------------------------------------------------------
    def run(self, *_):
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        layer = self.layer.value
        if layer is None or self.worker is not None or self._closed:
            return
        try:
            settings = self.settings()
        except ValueError as err:
            show_error(f"Deblur: {err}")
            return
        self._cancel.clear()
        data = _layer_array(layer)
        relay = self._progress_relay
        # Computing lazy data now counts dask's tasks (unless Keep mean reads it into memory first).
        self._unit = "tasks" if settings.compute and not settings.keep_mean and _is_lazy(data) else "tiles"

        def report(done, total):
            if self._cancel.is_set():
                raise Cancelled
            relay.signal.emit(done, total)

        self.worker = create_worker(deblur_layer_data, data, rgb=layer.rgb, settings=settings, progress=report,
                                    _start_thread=False, _ignore_errors=True)  # handled by _on_error
        self.worker.returned.connect(lambda result: self._on_done(layer, settings, result))
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.max, self.progress.value = 1, 0
        self.status.value = "Deblurring…" if _model_loaded(settings) else "Loading the model…"
        self.worker.start()

    def cancel(self, *_):
        if self.worker is not None:
            self._cancel.set()
            self.status.value = "Cancelling…"

    def _on_progress(self, done, total):
        if self._closed:
            return
        self.progress.max = max(total, 1)
        self.progress.value = done
        self.status.value = f"Deblurring: {done}/{total} {self._unit}"

    def _on_done(self, layer, settings, result):
        if self._closed:
            return
        out, info = result
        kwargs = result_layer_kwargs(layer, settings, info)
        name = kwargs.pop("name")
        if name in self.viewer.layers:  # re-run: update the previous result in place
            target = self.viewer.layers[name]
            if target.rgb == kwargs["rgb"] and target.data.ndim == out.ndim:
                target.data = out
                target.metadata = kwargs["metadata"]
                if "contrast_limits" in kwargs:
                    target.contrast_limits = kwargs["contrast_limits"]
            else:
                self.viewer.layers.remove(name)
                self.viewer.add_image(out, name=name, **kwargs)
        else:
            self.viewer.add_image(out, name=name, **kwargs)
        self.routing.value = routing_text(info)
        self.progress.value = self.progress.max
        self.status.value = f"Done on {info['device']} in {info['seconds']:.1f} s"

    def _on_error(self, err):
        if self._closed:
            return
        from napari.utils.notifications import show_error, show_info

        if isinstance(err, Cancelled):
            show_info("Deblur cancelled; no layer was added.")
            self.status.value = "Cancelled"
        elif isinstance(err, MemoryError):
            show_error(f"Deblur ran out of memory: {err}. Try a smaller tile size or the CPU.")
            self.status.value = "Out of memory"
        else:
            show_error(f"Deblur failed: {err}")
            self.status.value = f"Failed: {err}"
        self.progress.value = 0

    def _on_finished(self):
        if self._closed:
            return
        self.worker = None
        self.cancel_button.enabled = False
        self._refresh()


class _ProgressRelay:
    """Carries (done, total) from the worker thread to the GUI thread (a queued Qt signal)."""

    def __init__(self):
        from qtpy.QtCore import QObject, Signal

        class _Emitter(QObject):
            progressed = Signal(int, int)

        self._emitter = _Emitter()
        self.signal = self._emitter.progressed


def _layer_array(layer):
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def _is_lazy(data) -> bool:
    return hasattr(data, "compute")
