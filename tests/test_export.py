"""DeMoE outside PyTorch: the ONNX graph in onnxruntime and OpenCV's dnn, deblur() on an onnxruntime session,
and the bioimage.io package as bioimageio.core tests it.

Two exports run here (torch.onnx takes 10-20 s of CPU time for each): the conformance
checkpoint's (a published-format ``.pt`` with top-2 mixing) and, in conftest's ``packaged_onnx``, the packaged
model's through ``demoe export onnx``.
"""

import json
import sys
import zipfile

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from demoe import TASKS, CheckpointError, classify_blur, cli, deblur, load_model
from demoe.export import check_package, export_bioimageio, onnx_graph, package_onnx, with_task_default


def _session(graph):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's note that an input with a default is not folded as a constant
    source = graph.SerializeToString() if isinstance(graph, onnx.ModelProto) else str(graph)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _padded(x: np.ndarray, multiple: int) -> np.ndarray:
    """Zeros below and to the right up to multiples of ``multiple``, as DeMoE pads."""
    h, w = x.shape[-2:]
    return np.pad(x, ((0, 0), (0, 0), (0, -h % multiple), (0, -w % multiple)))


@pytest.fixture(scope="module")
def published(conformance_dir):
    """The conformance checkpoint with its configuration's top-2 mixing, its reference outputs, and its ONNX graph
    with a required task input (the optional variant is derived from it: one export)."""
    cfg = json.loads((conformance_dir / "demoe_tiny.json").read_text())
    model = load_model(conformance_dir / "demoe_tiny.pt", top_k=cfg["k_used"], device="cpu")
    return model, np.load(conformance_dir / "demoe_tiny_expected.npz"), onnx_graph(model, task_input="required")


# -- the graph ---------------------------------------------------------------------------------------
def test_onnxruntime_reproduces_the_published_outputs(published):
    """Auto routing and every forced task of a published-format checkpoint, to 1e-4 (the graph takes sides that
    are multiples of its size multiple: the reference input's 37 x 45 is padded as the model pads it)."""
    model, expected, graph = published
    session = _session(with_task_default(graph))
    assert [i.name for i in session.get_inputs()] == ["image"]  # the task is optional
    assert [i.name for i in session.get_overridable_initializers()] == ["task"]
    x = expected["input"]
    h, w = x.shape[-2:]
    image = _padded(x, model.padder_size)
    assert image.shape != x.shape and model.top_k == 2
    restored, probs = session.run(None, {"image": image})
    np.testing.assert_allclose(restored[..., :h, :w], expected["output_auto"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs, expected["pred_labels_auto"], atol=1e-5, rtol=0)
    for k, task in enumerate(TASKS):
        forced, forced_probs = session.run(None, {"image": image, "task": np.eye(5, dtype=np.float32)[k : k + 1]})
        np.testing.assert_allclose(forced[..., :h, :w], expected[f"output_{task}"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(forced_probs, probs, atol=1e-6, rtol=0)  # the router's, also when forced


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (3, 3, 12, 28), (2, 3, 36, 8)])
def test_onnx_takes_any_batch_and_multiples_of_the_size(published, shape):
    model, _, graph = published
    session = _session(graph)
    x = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    mixed = np.array([[0.1, 0.6, 0, 0.3, 0]], np.float32)  # top-2 of these weights, renormalised
    with torch.no_grad():
        for task, weights in ((np.zeros((1, 5), np.float32), None), (mixed, torch.from_numpy(mixed).expand(len(x), 5))):
            restored, probs = session.run(None, {"image": x, "task": task})
            np.testing.assert_allclose(restored, model(torch.from_numpy(x), weights=weights).numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(probs, model.route(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0)
    h, w = shape[-2:]
    for bad in ((shape[0], 3, h + 2, w), (shape[0], 1, h, w), (shape[0], 4, h, w)):  # sizes and channels it refuses
        with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.Fail if bad[1] == 3 else
                           onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument):
            session.run(None, {"image": np.zeros(bad, np.float32), "task": np.zeros((1, 5), np.float32)})


def test_opencv_dnn_runs_the_graph(published, tmp_path):
    """OpenCV 5's dnn reads the graph. It takes an input with a default for a constant: with the optional task it
    always lets the router choose, and only the required task input can force an expert."""
    model, _, graph = published
    onnx.save(graph, str(tmp_path / "required.onnx"))
    onnx.save(with_task_default(graph), str(tmp_path / "optional.onnx"))
    x = np.random.default_rng(0).random((2, 3, 16, 24), dtype=np.float32)
    net = cv2.dnn.readNetFromONNX(str(tmp_path / "required.onnx"))
    with torch.no_grad():
        for task in ("auto", "defocus", "low_light"):
            net.setInput(x, "image")
            net.setInput(model.task_weights(task).numpy(), "task")
            restored, probs = net.forward(["restored", "probabilities"])
            np.testing.assert_allclose(restored, model(torch.from_numpy(x), task=task).numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(probs, model.route(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0)
        net = cv2.dnn.readNetFromONNX(str(tmp_path / "optional.onnx"))
        net.setInput(x, "image")
        np.testing.assert_allclose(net.forward("restored"), model(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=0)
    with pytest.raises(cv2.error, match="task"):
        net.setInput(model.task_weights("defocus").numpy(), "task")


# -- deblur() on an onnxruntime session ------------------------------------------------------------------
def test_deblur_runs_an_onnxruntime_session_as_it_runs_the_model(published):
    """Tiling, dtypes and routing unchanged: the same images and the same routing report as with PyTorch."""
    model, _, graph = published
    session = _session(with_task_default(graph))
    rng = np.random.default_rng(3)
    photo = (rng.random((45, 70, 3)) * 255).astype(np.uint8)  # odd sizes: tiles padded to multiples of 4
    stack = (rng.random((2, 30, 41)) * 4095).astype(np.uint16)
    tiles = {"tile_size": 16, "overlap": 4}
    cases = [(photo, {}), (photo, {"task": "low_light"}), (photo, {"routing": "tile", **tiles, "batch_size": 3}),
             (photo, {"ensemble": 2, **tiles}), (stack, {"routing": "tile", "ensemble": 2, "batch_size": 2, **tiles})]
    for image, options in cases:
        want, want_info = deblur(image, model=model, return_info=True, **options)
        got, info = deblur(image, model=session, return_info=True, **options)
        assert got.dtype == image.dtype and got.shape == image.shape, options
        assert np.abs(got.astype(int) - want).max() <= 1, options
        assert info["task"] == want_info["task"] and info.get("tile_tasks") == want_info.get("tile_tasks"), options
        for task, p in want_info["probabilities"].items():
            assert abs(info["probabilities"][task] - p) < 1e-5, options
    odd = [(rng.random((33, 27)) * 255).astype(np.uint8), (rng.random((30, 22, 4)) * 255).astype(np.uint8),
           rng.random((3, 17, 23)).astype(np.float32), rng.random((2, 21, 19, 3)).astype(np.float32)]
    for image in odd:  # grey, RGBA, a float stack, a batch of RGB: sides that are no multiple of 4
        got = deblur(image, model=session)
        assert got.dtype == image.dtype and got.shape == image.shape
        np.testing.assert_allclose(got.astype(np.float32), deblur(image, model=model), atol=1e-4 if
                                   image.dtype == np.float32 else 1, rtol=0)
    want = classify_blur(photo, model=model)
    assert all(abs(p - want[t]) < 1e-5 for t, p in classify_blur(photo, model=session).items())


def test_deblur_with_a_session_refuses_what_onnx_cannot_do(published, tmp_path):
    model, _, graph = published
    session = _session(with_task_default(graph))
    photo = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="device='cuda' does not apply to an onnxruntime session"):
        deblur(photo, model=session, device="cuda")
    with pytest.raises(ValueError, match="precision='bf16' does not apply .* computes in float32"):
        deblur(photo, model=session, precision="bf16")
    with pytest.raises(ValueError, match="pools globally.*pass tlc=False, or tile_size=8 or less"):
        deblur(photo, model=session, tile_size=32, tlc=8)
    assert deblur(photo, model=session, tile_size=32, tlc=False).shape == photo.shape
    identity = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["restored"])], "identity",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("restored", onnx.TensorProto.FLOAT, [1, 3, 8, 8])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(ValueError, match="does not run a DeMoE exported by `demoe export onnx`"):
        deblur(photo, model=_session(identity))
    with pytest.raises(ValueError, match="not a bioimage.io package's"):
        deblur(photo, model=_session(package_onnx(graph)))
    renamed = onnx.ModelProto()  # the graph and metadata of an export, its inputs renamed
    renamed.CopyFrom(graph)
    for node in renamed.graph.node:
        node.input[:] = [{"image": "input", "task": "routing"}.get(n, n) for n in node.input]
    for value in renamed.graph.input:
        value.name = {"image": "input", "task": "routing"}[value.name]
    with pytest.raises(ValueError, match=r"inputs \['input', 'routing'\] .* deblur\(\) needs the graph of `demoe "
                                         r"export onnx` \(inputs image and task"):
        deblur(photo, model=_session(renamed))
    from demoe.onnx_model import OnnxDeMoE

    net = OnnxDeMoE(session)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\), got \(1, 4, 8, 8\)"):
        net(torch.zeros(1, 4, 8, 8))
    onnx.save(graph, str(tmp_path / "demoe.onnx"))
    with pytest.raises(CheckpointError, match=r"an ONNX graph, not PyTorch weights; .*InferenceSession\(path\)"):
        deblur(photo, model=tmp_path / "demoe.onnx")


# -- the packaged model, from the command line -------------------------------------------------------------
def test_packaged_model_exported_by_the_command(packaged_onnx, default_model):
    session = _session(packaged_onnx)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["demoe_config"]) == default_model.config and meta["size_multiple"] == "16"
    recorded = json.loads(meta["demoe_metadata"])
    assert recorded["license"] == "MIT" and recorded["patch_size"] == 256
    assert recorded["source"] == "demoe-compact.safetensors"  # the file's name, no local path
    x = np.random.default_rng(1).random((2, 3, 48, 80), dtype=np.float32)
    restored, probs = session.run(None, {"image": x})
    with torch.no_grad():
        np.testing.assert_allclose(restored, default_model(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(probs, default_model.route(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0)
        forced = session.run(["restored"], {"image": x, "task": default_model.task_weights("local_motion").numpy()})
        want = default_model(torch.from_numpy(x), task="local_motion").numpy()
        np.testing.assert_allclose(forced[0], want, atol=1e-4, rtol=0)
        net = cv2.dnn.readNetFromONNX(str(packaged_onnx))
        net.setInput(x, "image")
        np.testing.assert_allclose(net.forward("restored"), default_model(torch.from_numpy(x)).numpy(), atol=1e-4)


# -- bioimage.io ----------------------------------------------------------------------------------------
def test_bioimageio_package_of_the_packaged_model(packaged_onnx, tmp_path):
    """bioimageio.core's test passes (both weight formats reproduce the test output); the package says what the
    weights' header says."""
    from bioimageio.core import test_model
    from bioimageio.spec import load_model_description

    path = export_bioimageio(None, tmp_path / "demoe.zip", onnx_proto=onnx.load(str(packaged_onnx)))
    summary = test_model(path)
    assert summary.status == "passed", summary.format()
    descr = load_model_description(path)
    assert str(descr.license) == "MIT" and [a.name for a in descr.authors] == ["napari-demoe developers"]
    assert [str(c.doi) for c in descr.cite] == ["10.48550/arXiv.2508.06228"]
    torch_weights, onnx_weights = descr.weights.pytorch_state_dict, descr.weights.onnx
    assert torch_weights.architecture.import_from == "demoe.model" and torch_weights.architecture.callable == "DeMoE"
    assert onnx_weights.opset_version >= 17
    (scaling,) = [p for p in descr.inputs[0].preprocessing if p.id != "ensure_dtype"]  # spec adds ensure_dtype
    assert scaling.id == "scale_range" and (scaling.kwargs.min_percentile, scaling.kwargs.max_percentile) == (0.1, 99.9)
    assert "plasma-workspace-wallpapers" in descr.training_data.description
    with zipfile.ZipFile(path) as z:
        readme = z.read("README.md").decode()
        cover = cv2.imdecode(np.frombuffer(z.read("cover.png"), np.uint8), cv2.IMREAD_COLOR)
    assert "licence note: The weights are offered under the MIT licence" in readme
    assert "training: steps 0-2580 on NVIDIA H200" in readme and "# Validation" in readme
    assert cover.shape == (256, 512, 3)


def test_bioimageio_package_of_a_published_checkpoint(published, conformance_dir, tmp_path, monkeypatch, capsys):
    """From the command line; a published .pt has no header, so the licence and the authors are asked for."""
    from bioimageio.spec import load_model_description

    import demoe.export

    model, _, graph = published
    monkeypatch.setattr(demoe.export, "onnx_graph", lambda *args, **kwargs: graph)  # exported above, with top-2
    out = tmp_path / "new folder" / "tiny.zip"
    argv = ["export", "bioimageio", str(conformance_dir / "demoe_tiny.pt"), "--top-k", "2", "-o", str(out)]
    no_licence = "needs a licence, and this checkpoint's header records none: pass license= (--license)"
    for extra, message in (([], no_licence), (["--license", "MIT"], "(--author NAME, repeatable)")):
        assert cli.main([*argv, *extra]) == 2
        assert message in capsys.readouterr().err
    argv += ["--license", "MIT", "--author", "Ada Lovelace", "--author", "Grace Hopper"]
    assert cli.main(argv) == 0
    assert f"from demoe.export import check_package; print(check_package('{out}').status)" in capsys.readouterr().out
    summary = check_package(out)  # bioimageio.core's test_model
    assert summary.status == "passed", summary.format()
    descr = load_model_description(out)
    assert [a.name for a in descr.authors] == ["Ada Lovelace", "Grace Hopper"] and descr.training_data is None
    assert descr.weights.pytorch_state_dict.architecture.kwargs["top_k"] == 2
    assert cli.main(argv) == 2 and "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the ONNX graph does not compute this model"):  # a graph of top-1 mixing
        export_bioimageio(conformance_dir / "demoe_tiny.pt", tmp_path / "k1.zip", onnx_proto=graph, license="MIT",
                          authors=["A"])
    with pytest.raises(ValueError, match="the bioimage.io description is not valid: name"):
        export_bioimageio(model, tmp_path / "bad.zip", onnx_proto=graph, license="MIT", authors=["A"], name="a/b!")
    assert not (tmp_path / "bad.zip").exists() and not (tmp_path / "k1.zip").exists()


# -- what a careless user does -------------------------------------------------------------------------
def test_export_command_refuses_bad_paths_in_one_line(tmp_path, capsys):
    (tmp_path / "old.onnx").write_bytes(b"not a model")
    (tmp_path / "a file").write_text("")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    cases = [
        (["onnx", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "m.onnx")], "checkpoint not found"),
        (["onnx", "-o", str(tmp_path)], "is a folder; give a file name, e.g."),
        (["onnx", "-o", str(tmp_path / "m.txt")], "the output must be a .onnx file"),
        (["bioimageio", "-o", str(tmp_path / "m.onnx")], "the output must be a .zip file"),
        (["onnx", "-o", str(tmp_path / "a file" / "m.onnx")], "is a file"),
        (["onnx", "-o", str(tmp_path / "old.onnx")], "exists; pass overwrite=True (--overwrite) to replace it"),
        (["onnx", str(tmp_path / "old.onnx"), "-o", str(tmp_path / "new.onnx")], "an ONNX graph, not PyTorch weights"),
        (["onnx", str(tmp_path / "bad.pt"), "-o", str(tmp_path / "new.onnx")], "bad.pt: not a readable PyTorch"),
        (["bioimageio", str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "new.zip")],
         "bad.safetensors: not a readable safetensors file"),
    ]
    for argv, message in cases:
        assert cli.main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("demoe: "), (argv, err)
        assert len(err) == 1 or "exporting" in err[0], (argv, err)
    assert (tmp_path / "old.onnx").read_bytes() == b"not a model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file", "bad.pt", "bad.safetensors", "old.onnx"]


@pytest.mark.parametrize("fmt,missing", [("onnx", "onnx"), ("bioimageio", "bioimageio.spec"),
                                         ("bioimageio", "onnxruntime")])
def test_export_without_its_extra_names_the_extra(tmp_path, capsys, monkeypatch, fmt, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now fails
    out = tmp_path / f"demoe.{'onnx' if fmt == 'onnx' else 'zip'}"
    assert cli.main(["export", fmt, "-o", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"needs the Python package {missing.split('.')[0]!r}" in line
    assert line.endswith('pip install "napari-demoe[export]"')
    assert not out.exists()


def test_export_api_refuses_what_is_not_a_model(tmp_path):
    from demoe.export import export_onnx

    with pytest.raises(TypeError, match="model must be a DeMoE, a checkpoint path or None"):
        export_onnx(42, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="task_input must be one of optional, required"):
        export_onnx(None, tmp_path / "m.onnx", task_input="maybe")
