"""DeMoE outside PyTorch: an ONNX file for onnxruntime and OpenCV's dnn, and a bioimage.io model package.

``demoe export onnx`` / :func:`export_onnx` writes the network as an ONNX graph
(opset 18, exported by ``torch.onnx``'s TorchScript exporter from
:meth:`DeMoE.forward_dense`: the routing and the top-k expert mixing are tensor
operations, so one graph routes every image):

====================  ===================================  ===============================================
name                  shape (float32)                      meaning
====================  ===================================  ===============================================
input ``image``       (batch, C, height, width)            RGB in [0, 1]; height and width multiples of
                                                           the model's size multiple (16 for the packaged
                                                           and the published model: pad, then crop)
input ``task``        (1, num_exp)                         routing weights for the whole batch: zeros
                                                           (the default) let the router choose, a one-hot
                                                           row forces that expert (order of ``TASKS``)
output ``restored``   (batch, C, height, width)            the restored images
output ``probabilities`` (batch, num_exp)                  the router's probabilities per task
====================  ===================================  ===============================================

``task`` is optional the ONNX way (a graph input with a default value, an
initializer of the same name), or, with ``task_input="required"``, a plain
input: OpenCV's dnn takes an input with a default for a constant, so only then
can an OpenCV program force a task. The file's metadata (``demoe_config``,
``size_multiple``, ``tasks``, ...) lets ``deblur(image, model=session)`` run an
``onnxruntime.InferenceSession`` of it (:mod:`demoe.onnx_model`).

``demoe export bioimageio`` / :func:`export_bioimageio` writes a bioimage.io
model package (spec 0.5): ``pytorch_state_dict`` weights (architecture
``demoe.model.DeMoE``) and ONNX weights (the graph above with the router always
choosing and one output), percentile scaling as input preprocessing, test
tensors, a cover image and documentation filled from the weights' header.

Both need the ``export`` extra: ``pip install "napari-demoe[export]"``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import default_weights_path, load_model, weights_description
from .model import DeMoE
from .tasks import TASK_LABELS, TASKS

#: The ONNX opset of the exported graph (the exporter's own; OpenCV 5 and onnxruntime read it).
OPSET = 18
#: Input preprocessing of the bioimage.io package: the percentiles mapped to 0 and 1 (as ``deblur()``'s
#: ``normalize="percentile"``, :data:`demoe._arrays.PERCENTILES`).
PACKAGE_PERCENTILES = (0.1, 99.9)
PAPER_DOI = "10.48550/arXiv.2508.06228"  # arXiv:2508.06228
PAPER = ("Feijoo, Garrido-Mellado, Rim, Garcia and Conde (2025). Towards Unified Image Deblurring using a "
         "Mixture-of-Experts Decoder. arXiv:2508.06228")
_EXTRA = 'pip install "napari-demoe[export]"'
_PACKAGED_AUTHORS = ["napari-demoe developers"]  # who trained the packaged weights (pyproject's authors)


class MissingDependencyError(ImportError):
    """An optional dependency of the exports is not installed (the message names the extra)."""


def require(module: str, purpose: str):
    """Import ``module``, or :class:`MissingDependencyError` in one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(f"{purpose} needs the Python package {module.split('.')[0]!r} ({err.name} "
                                     f"is missing): {_EXTRA}") from None


# -- the model and the output path ------------------------------------------------------------------
def _model(model: DeMoE | str | Path | None) -> DeMoE:
    """A CPU copy of ``model`` in eval mode (the caller's model is left as it is)."""
    if model is None or isinstance(model, (str, Path)):
        return load_model(model, device="cpu")
    if isinstance(model, DeMoE):
        return copy.deepcopy(model).cpu().eval()
    raise TypeError(f"model must be a DeMoE, a checkpoint path or None (the packaged model), "
                    f"got {type(model).__name__}")


def check_output(path: str | Path, suffix: str, overwrite: bool = False) -> Path:
    """``path`` checked: a file name ending in ``suffix``, not a folder, not an existing file unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name, e.g. {path / ('demoe' + suffix)}")
    if path.suffix.lower() != suffix:
        raise ValueError(f"the output must be a {suffix} file, got {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {path.parent} is a file")
    return path


def _header(model: DeMoE) -> dict[str, Any]:
    """The weights' metadata, with ``source`` the file's name (no local path)."""
    meta = dict(model.metadata)
    meta["source"] = Path(model.source).name if model.source else None
    return meta


# -- ONNX --------------------------------------------------------------------------------------------
class _Graph(nn.Module):
    """What is exported: ``(image, task) -> (restored, probabilities)`` by :meth:`DeMoE.forward_dense`."""

    def __init__(self, model: DeMoE):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_dense(image, task)


def require_extra(fmt: str) -> None:
    """Check that the packages an export format needs are installed (MissingDependencyError naming the extra)."""
    if fmt == "bioimageio":
        require("bioimageio.spec", "bioimage.io export")
        require("onnxruntime", "bioimage.io export")  # the ONNX weights are checked before they are packaged
    _require_onnx_export()


def _require_onnx_export():
    """The onnx package (torch.onnx's TorchScript exporter needs no other)."""
    return require("onnx", "ONNX export")


#: How the exported graph takes its ``task``: "optional" (an input with a default of zeros, the ONNX way:
#: onnxruntime runs without it) or "required" (a plain input, which OpenCV's dnn can set: it reads an input
#: with a default as a constant).
TASK_INPUTS = ("optional", "required")


def onnx_graph(model: DeMoE | str | Path | None = None, task_input: str = "optional"):
    """The ONNX graph of ``model`` as an ``onnx.ModelProto`` (see the module's table); :func:`export_onnx` saves it."""
    if task_input not in TASK_INPUTS:
        raise ValueError(f"task_input must be one of {', '.join(TASK_INPUTS)}, got {task_input!r}")
    onnx = _require_onnx_export()
    net = _model(model)
    multiple = net.padder_size
    # An example of multiples of the size multiple (2 and 3 of them, batch 2): the trace records every size as
    # the input's (no padding: the graph takes multiples). torch.onnx's TorchScript exporter, a few seconds to
    # half a minute: its dynamo exporter writes the same graph in about ten times as long (over two minutes on
    # two CPU cores for the packaged model).
    image = torch.rand(2, net.img_channel, 2 * multiple, 3 * multiple)
    task = torch.zeros(1, net.num_exp)
    sizes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(_Graph(net).eval(), (image, task), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["image", "task"], output_names=["restored", "probabilities"],
                          dynamic_axes={"image": sizes, "restored": sizes, "probabilities": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    docs = {"image": f"images (batch, {net.img_channel}, height, width), float32 in [0, 1], height and width "
                     f"multiples of {multiple}",
            "task": f"(1, {net.num_exp}) routing weights for the batch: zeros let the router choose, a one-hot row "
                    f"forces that expert; order: {', '.join(TASKS[:net.num_exp])}",
            "restored": "the restored images, as the input",
            "probabilities": f"(batch, {net.num_exp}) the router's probabilities per task"}
    for value in [*proto.graph.input, *proto.graph.output]:
        value.doc_string = docs[value.name]
    proto.doc_string = (f"DeMoE all-in-one deblurring ({PAPER}), exported by demoe {__version__} with torch "
                        f"{torch.__version__}")
    proto.producer_name, proto.producer_version = "demoe", __version__
    header = _header(net)
    onnx.helper.set_model_props(proto, {
        "demoe_config": json.dumps(net.config),
        "top_k": str(net.top_k),
        "size_multiple": str(multiple),
        "tasks": json.dumps(list(TASKS[: net.num_exp])),
        "demoe_metadata": json.dumps({k: header[k] for k in ("patch_size", "license", "input_convention", "source")
                                      if header.get(k) is not None}),
    })
    if task_input == "optional":
        proto = with_task_default(proto)
    onnx.checker.check_model(proto)
    return proto


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's notes on its own internals (deprecations, "torchvision is not installed") kept off the screen."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def with_task_default(proto):
    """A copy of an :func:`onnx_graph` graph whose ``task`` input is optional: zeros (the router chooses) unless fed."""
    onnx = require("onnx", "ONNX export")
    graph = copy.deepcopy(proto)
    num_exp = len(json.loads({p.key: p.value for p in graph.metadata_props}["tasks"]))
    kept = [t for t in graph.graph.initializer if t.name != "task"]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend([*kept, onnx.numpy_helper.from_array(np.zeros((1, num_exp), np.float32), "task")])
    for value in graph.graph.input:
        if value.name == "task" and not value.doc_string.startswith("optional"):
            value.doc_string = "optional " + value.doc_string + " (default zeros)"
    return graph


def export_onnx(model: DeMoE | str | Path | None = None, path: str | Path = "demoe.onnx", *,
                task_input: str = "optional", overwrite: bool = False) -> Path:
    """Write ``model`` as an ONNX file for onnxruntime or OpenCV's dnn (``demoe export onnx``).

    Parameters
    ----------
    model : DeMoE or path, optional
        A model, a checkpoint (a published-format ``.pt``, our ``.safetensors``,
        a training run folder) or None for the packaged model.
    path : path
        The ``.onnx`` file to write (its folder is created if missing).
    task_input : {'optional', 'required'}
        'optional': the ``task`` input has a default (zeros: the router
        chooses), so onnxruntime runs the graph on ``image`` alone. OpenCV's
        dnn takes such an input for a constant, so with it OpenCV always lets
        the router choose; 'required' makes ``task`` a plain input that
        OpenCV can set (pass zeros for the router's choice).
    overwrite : bool
        Replace ``path`` if it exists (else FileExistsError).

    Returns
    -------
    Path
        ``path``. Its inputs and outputs: see :mod:`demoe.export`. 10-30 s
        on two CPU cores for the packaged model: ``torch.onnx`` traces every
        layer.

    Examples
    --------
    >>> import numpy as np, onnxruntime  # doctest: +SKIP
    >>> path = export_onnx(None, "demoe.onnx")  # doctest: +SKIP
    >>> session = onnxruntime.InferenceSession(path)  # doctest: +SKIP
    >>> restored, probabilities = session.run(None, {"image": np.zeros((1, 3, 64, 64), np.float32)})  # doctest: +SKIP
    """
    out = check_output(path, ".onnx", overwrite)
    onnx = _require_onnx_export()
    proto = onnx_graph(model, task_input)
    return _save(out, lambda tmp: onnx.save(proto, str(tmp)))


def _save(out: Path, write) -> Path:
    """``write(tmp)`` into a temporary file beside ``out``, then renamed to ``out``: never a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    try:
        write(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def package_onnx(proto):
    """The bioimage.io variant of an :func:`onnx_graph` graph: ``image`` in, ``restored`` out, routed by the model.

    The ``task`` input becomes a constant (zeros: the router chooses) and the
    probabilities are no output, so the graph matches ``DeMoE.forward(x)``, the
    package's ``pytorch_state_dict`` weights.
    """
    onnx = require("onnx", "ONNX export")
    graph = with_task_default(proto)
    for field, name in ((graph.graph.input, "task"), (graph.graph.output, "probabilities")):
        kept = [v for v in field if v.name != name]
        del field[:]
        field.extend(kept)
    onnx.checker.check_model(graph)
    return graph


# -- bioimage.io -----------------------------------------------------------------------------------
def bioimageio_spec():
    """bioimageio.spec, its serializers fixed for pydantic-core 2.50 where it is older than 0.5.14
    (:mod:`demoe._bioimageio_compat`)."""
    spec = require("bioimageio.spec", "bioimage.io export")
    from ._bioimageio_compat import fix_serializers

    fix_serializers()
    return spec


def export_bioimageio(
    model: DeMoE | str | Path | None = None,
    path: str | Path = "demoe.zip",
    *,
    authors: Sequence[str] | None = None,
    license: str | None = None,  # noqa: A002 - the bioimage.io field's name
    name: str | None = None,
    overwrite: bool = False,
    onnx_proto=None,
) -> Path:
    """Write ``model`` as a bioimage.io model package (spec 0.5, a ``.zip``; ``demoe export bioimageio``).

    The package holds ``pytorch_state_dict`` weights (architecture
    ``demoe.model.DeMoE``, so ``napari-demoe`` must be installed where it runs)
    and ONNX weights (any runtime with onnxruntime: deepImageJ, ilastik,
    bioimageio.core), the input preprocessing of ``deblur()``'s
    ``normalize="percentile"`` (the 0.1 and 99.9 percentiles of each image,
    all channels together, to 0 and 1), a test input and its output, a cover
    image, the citation of the DeMoE paper and documentation filled from the
    weights' header (licence, training data, training record). The router
    chooses the expert for each image; the output is in the scaled units.

    Parameters
    ----------
    model : DeMoE or path, optional
        As for :func:`export_onnx`.
    path : path
        The ``.zip`` to write.
    authors : sequence of str, optional
        Who made the weights. Default: the header's ``authors``; for the
        packaged weights, the napari-demoe developers. Required otherwise.
    license : str, optional
        An SPDX licence identifier. Default: the header's ``license``;
        required for a checkpoint whose header records none (a published
        ``.pt`` has no header).
    name : str, optional
        The package's name (letters, digits, spaces, ``_+-()``; 5-128 characters).
    overwrite : bool
        Replace ``path`` if it exists.
    onnx_proto : onnx.ModelProto, optional
        :func:`onnx_graph` of this model, when already computed (the export is
        the slow part); it is checked against the model on the test input.

    Returns
    -------
    Path
        ``path``. ``bioimageio test PATH`` (bioimageio.core) reproduces the
        test output with both weight formats.
    """
    out = check_output(path, ".zip", overwrite)
    spec = bioimageio_spec()
    require("onnxruntime", "bioimage.io export")  # the ONNX weights are checked before they are packaged
    require("onnx", "bioimage.io export")
    if onnx_proto is None:
        _require_onnx_export()
    net = _model(model)
    header = _header(net)
    packaged = net.source is not None and Path(net.source).resolve() == default_weights_path().resolve()
    license = license or header.get("license")  # noqa: A001
    if not license:
        raise ValueError("a bioimage.io package needs a licence, and this checkpoint's header records none: pass "
                         "license= (--license) with an SPDX identifier, e.g. MIT or CC-BY-4.0")
    authors = list(authors or header.get("authors") or (_PACKAGED_AUTHORS if packaged else []))
    if not authors:
        raise ValueError("a bioimage.io package names the authors of its weights, and this checkpoint's header "
                         "names none: pass authors=[...] (--author NAME, repeatable)")
    proto = package_onnx(onnx_proto if onnx_proto is not None else onnx_graph(net))
    with tempfile.TemporaryDirectory(prefix="demoe-bioimageio-") as tmp:
        descr = _describe(net, header, Path(tmp), proto, authors=authors, license=license, name=name)
        return _save(out, lambda dest: spec.save_bioimageio_package(descr, output_path=dest))


def check_package(path: str | Path):
    """bioimageio.core's ``test_model`` on a package: a ``ValidationSummary`` (``.status``: "passed" or "failed";
    ``.format()``: the report). The same as ``bioimageio test PATH``, which fails with bioimageio.spec 0.5.12 under
    pydantic 2.14 (:mod:`demoe._bioimageio_compat`); here with that fixed."""
    bioimageio_spec()
    core = require("bioimageio.core", "testing a bioimage.io package")
    return core.test_model(Path(path))


def _test_image(channels: int, multiple: int) -> np.ndarray:
    """A defocused photo as a 12-bit microscope would record it: ``(1, channels, H, W)`` float32, 0-4095."""
    from skimage import data

    from .degrade import degrade

    side = max(96, 2 * multiple)
    side = -(-side // multiple) * multiple
    sharp = data.astronaut()[96 : 96 + side, 160 : 160 + side].astype(np.float32) / 255
    blurry = np.clip(degrade(sharp, "defocus", rng=0, radius=(3, 3)).blurry, 0, 1)
    planes = blurry.transpose(2, 0, 1)
    planes = planes[:channels] if channels <= 3 else np.concatenate([planes] * -(-channels // 3))[:channels]
    if channels == 1:
        planes = blurry.mean(axis=-1, keepdims=True).transpose(2, 0, 1)
    return (planes[None] * 3800 + 150).astype(np.float32)


def _scaled(image: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """bioimage.io's ``scale_range`` preprocessing of the package: each image's percentiles to 0 and 1."""
    lo, hi = np.percentile(image, PACKAGE_PERCENTILES, axis=(1, 2, 3), keepdims=True)
    return ((image - lo) / (hi - lo + eps)).astype(np.float32)


def _cover(before: np.ndarray, after: np.ndarray, path: Path) -> None:
    """Blurry input (left) and restored output (right), side by side: the 2:1 cover bioimage.io asks for."""
    import cv2

    def rgb8(x):
        x = x[0][:3] if x.shape[1] >= 3 else np.repeat(x[0][:1], 3, axis=0)
        return (np.clip(x.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)

    side = np.concatenate([rgb8(before), rgb8(after)], axis=1)
    side = cv2.resize(side, (512, 256), interpolation=cv2.INTER_AREA if side.shape[0] > 256 else cv2.INTER_CUBIC)
    if not cv2.imwrite(str(path), side[..., ::-1]):
        raise OSError(f"could not write the cover image {path}")


def _documentation(net: DeMoE, header: dict, license: str, multiple: int) -> str:  # noqa: A002
    tasks = ", ".join(f"{TASK_LABELS[t]} (`{t}`)" for t in TASKS[: net.num_exp])
    lines = weights_description(header)
    record = "\n".join(f"    {line}" for line in lines) if lines else "    (the weights' file records none)"
    source = header.get("source") or "a DeMoE model built in Python"
    return f"""# DeMoE: all-in-one image deblurring

DeMoE ({PAPER}) is a NAFNet U-Net whose decoder is a mixture of experts, one per blur type:
{tasks}. A classifier (the router) looks at each image and chooses the expert; this package
always lets it choose.

These weights: `{source}`, architecture `{json.dumps(net.config)}`, top_k={net.top_k},
{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters; packaged by
[napari-demoe](https://github.com/napari-demoe/napari-demoe) {__version__} (`demoe export bioimageio`).

## Input and output

- `image`: (batch, channel, y, x), y and x multiples of {multiple}. Preprocessing: the 0.1 and 99.9
  percentiles of each image (all channels together) are mapped to 0 and 1, as
  `demoe.deblur(image, normalize="percentile")` does.
- `restored`: the same shape, in those scaled units (0 and 1 are the input's percentiles). napari-demoe's
  `deblur()` maps its results back to the input's intensities and dtype, tiles large images without seams
  and lets you force a blur type; use it where you can run Python.

## Weights, licence and training data

Licence: {license}. What the weights' file says about them:

{record}

## Validation

The test input is a defocused crop of scikit-image's `astronaut` photograph, scaled to 12-bit intensities;
the test output is this model's result in PyTorch, reproduced by both weight formats (`bioimageio test`).
How well DeMoE restores real images of each blur type, measured on held-out photographs: napari-demoe's
`docs/model-quality.md` and `benchmarks/quality.py`.

## Citation

{PAPER} (doi:{PAPER_DOI}).
"""


def _describe(net: DeMoE, header: dict, folder: Path, proto, *, authors: list[str], license: str,  # noqa: A002
              name: str | None):
    """The package's description (a ``ModelDescr``), its files written into ``folder``; a ValidationSummary when
    the description is not valid."""
    import pydantic
    from bioimageio.spec.model import v0_5

    onnx = require("onnx", "bioimage.io export")
    ort = require("onnxruntime", "bioimage.io export")
    multiple = net.padder_size
    test_in = _test_image(net.img_channel, multiple)
    scaled = _scaled(test_in)
    with torch.inference_mode():
        test_out = net(torch.from_numpy(scaled)).numpy()
    onnx.save(proto, str(folder / "demoe.onnx"))
    session = ort.InferenceSession(str(folder / "demoe.onnx"), providers=["CPUExecutionProvider"])
    check = session.run(None, {"image": scaled})[0]
    if not np.abs(check - test_out).max() <= 1e-4:
        raise ValueError(f"the ONNX graph does not compute this model (max difference "
                         f"{np.abs(check - test_out).max():.2g} on the test input): export it from this model")
    np.save(folder / "test_input.npy", test_in)
    np.save(folder / "test_output.npy", test_out)
    torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, folder / "weights.pt")
    _cover(scaled, test_out, folder / "cover.png")
    (folder / "README.md").write_text(_documentation(net, header, license, multiple), encoding="utf-8")
    (folder / "environment.yaml").write_text(
        "name: demoe\nchannels:\n  - conda-forge\n  - nodefaults\ndependencies:\n  - python>=3.10\n  - pip\n"
        f"  - pip:\n      - napari-demoe>={__version__}\n      - torch>={torch.__version__.split('+')[0]}\n",
        encoding="utf-8")
    channels = ["red", "green", "blue"] if net.img_channel == 3 else [f"channel{i}" for i in range(net.img_channel)]
    size = v0_5.ParameterizedSize(min=multiple, step=multiple)
    image_id, restored_id = v0_5.TensorId("image"), v0_5.TensorId("restored")
    space_in = [v0_5.SpaceInputAxis(id=v0_5.AxisId(a), size=size) for a in ("y", "x")]
    space_out = [v0_5.SpaceOutputAxis(id=v0_5.AxisId(a), size=v0_5.SizeReference(tensor_id=image_id,
                                                                                  axis_id=v0_5.AxisId(a)))
                 for a in ("y", "x")]
    percentiles = v0_5.ScaleRangeKwargs(axes=[v0_5.AxisId("channel"), v0_5.AxisId("y"), v0_5.AxisId("x")],
                                        min_percentile=PACKAGE_PERCENTILES[0], max_percentile=PACKAGE_PERCENTILES[1])
    inputs = [v0_5.InputTensorDescr(
        id=image_id, description="a blurry image; any intensities (scaled by its percentiles)",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=[v0_5.Identifier(c) for c in channels]), *space_in],
        test_tensor=v0_5.FileDescr(source=folder / "test_input.npy"),
        preprocessing=[v0_5.ScaleRangeDescr(kwargs=percentiles)])]
    outputs = [v0_5.OutputTensorDescr(
        id=restored_id, description="the restored image, in the input's scaled units (0 and 1: its percentiles)",
        axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=[v0_5.Identifier(c) for c in channels]), *space_out],
        test_tensor=v0_5.FileDescr(source=folder / "test_output.npy"))]
    data = header.get("training_data")
    training_data = None
    if isinstance(data, dict) and data.get("photographs"):
        summary = "; ".join(f"{p.get('images')} photographs from the Debian package {p.get('package')} "
                            f"{p.get('version')} ({p.get('license')})" for p in data["photographs"])
        training_data = {
            "type": "dataset", "format_version": "0.3.0", "name": "DeMoE training photographs",
            "description": (f"{summary}; {data.get('generated', '')}. {data.get('source', '')}. Blurred on the fly "
                            f"by napari-demoe's generators (demoe.degrade). {data.get('details', '')}")[:1024],
            "authors": [{"name": a} for a in authors], "cite": [{"text": PAPER, "doi": PAPER_DOI}],
        }
    weights_arch = v0_5.ArchitectureFromLibraryDescr(callable=v0_5.Identifier("DeMoE"), import_from="demoe.model",
                                                     kwargs={**net.config, "top_k": net.top_k})
    content = dict(
        format_version=v0_5.ModelDescr.implemented_format_version,
        name=name or ("DeMoE deblurring " + (f"({net.architecture})" if net.architecture else "(custom)")),
        description=("All-in-one deblurring (defocus, camera shake, moving objects, fast motion, low light): a "
                     "mixture-of-experts NAFNet whose router recognises the blur type"),
        authors=[v0_5.Author(name=a) for a in authors],
        cite=[v0_5.CiteEntry(text=PAPER, doi=v0_5.Doi(PAPER_DOI))],
        license=license,
        tags=["deblurring", "image-restoration", "mixture-of-experts", "2d", "pytorch", "onnx", "photography",
              "microscopy"],
        documentation=v0_5.FileDescr(source=folder / "README.md"),
        covers=[v0_5.FileDescr(source=folder / "cover.png")],
        inputs=inputs,
        outputs=outputs,
        weights=v0_5.WeightsDescr(
            pytorch_state_dict=v0_5.PytorchStateDictWeightsDescr(
                source=folder / "weights.pt", architecture=weights_arch,
                pytorch_version=v0_5.Version(torch.__version__.split("+")[0]),
                dependencies=v0_5.FileDescr(source=folder / "environment.yaml")),
            onnx=v0_5.OnnxWeightsDescr(source=folder / "demoe.onnx", opset_version=OPSET,
                                       parent="pytorch_state_dict")),
    )
    if training_data is not None:
        content["training_data"] = training_data
    try:
        return v0_5.ModelDescr(**content)
    except pydantic.ValidationError as err:  # what is wrong, in one line (a name with odd characters, ...)
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        raise ValueError(f"the bioimage.io description is not valid: {problems}") from None
