import copy
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import PINNED, pinned_model, pinned_outputs, randomize
from demoe import TASKS, DeMoE, load_model, save_model


def test_tasks_in_expert_order():
    assert TASKS == ("defocus", "global_motion", "local_motion", "synth_global_motion", "low_light")


# -- conformance with the published network -------------------------------------------
@pytest.fixture(scope="module")
def published(conformance_dir):
    cfg = json.loads((conformance_dir / "demoe_tiny.json").read_text())
    model = load_model(conformance_dir / "demoe_tiny.pt", top_k=cfg["k_used"], device="cpu")
    expected = np.load(conformance_dir / "demoe_tiny_expected.npz")
    return model, cfg, expected


def test_conformance_architecture_read_from_checkpoint(published):
    model, cfg, _ = published
    for key in ("img_channel", "width", "middle_blk_num", "enc_blk_nums", "dec_blk_nums", "num_exp"):
        assert model.config[key] == cfg[key]


def test_conformance_auto_and_routing(published):
    model, _, expected = published
    x = torch.from_numpy(expected["input"])
    assert x.shape[-1] % 4 and x.shape[-2] % 4  # odd size: padding is exercised
    with torch.no_grad():
        np.testing.assert_allclose(model.route(x).numpy(), expected["pred_labels_auto"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(model(x).numpy(), expected["output_auto"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(model(x, task="auto").numpy(), expected["output_auto"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_conformance_forced_tasks(published, task):
    model, _, expected = published
    x = torch.from_numpy(expected["input"])
    with torch.no_grad():
        np.testing.assert_allclose(model(x, task=task).numpy(), expected[f"output_{task}"], atol=1e-5, rtol=0)


def test_forced_tasks_differ(published):
    model, _, expected = published
    x = torch.from_numpy(expected["input"])
    with torch.no_grad():
        outs = [model(x, task=t) for t in TASKS]
    assert all((outs[0] - o).abs().max() > 1e-4 for o in outs[1:])


# -- conformance with our own pinned data (in the repository) ---------------------------
@pytest.mark.parametrize("form", ["safetensors", "published .pt"])
def test_pinned_outputs_of_a_seeded_model(tmp_path, form):
    """The routing and every expert's output of a seeded tiny model, pinned once (tests/data/pinned_tiny.npz),
    through the loader: an expert swapped in loading, routing or mixing changes them. Needs no published data."""
    expected = dict(np.load(PINNED))
    model = pinned_model()
    if form == "safetensors":
        path = save_model(model, tmp_path / "seeded.safetensors")
    else:
        path = tmp_path / "seeded.pt"
        torch.save({"params": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    got = pinned_outputs(load_model(path, device="cpu"))
    assert sorted(got) == sorted(expected)
    np.testing.assert_array_equal(got.pop("input"), expected.pop("input"))
    for key, value in got.items():
        np.testing.assert_allclose(value, expected[key], atol=1e-5, rtol=0, err_msg=key)
    # The experts' outputs lie far apart against that tolerance: no two can be swapped unseen.
    outs = [expected[f"output_{t}"] for t in TASKS]
    assert min(np.abs(a - b).max() for i, a in enumerate(outs) for b in outs[i + 1 :]) > 0.05


# -- behaviour ----------------------------------------------------------------------------
@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (5, 1), (17, 33), (16, 16)])
def test_any_size(tiny_model, h, w):
    x = torch.rand(2, 3, h, w)
    with torch.no_grad():
        y = tiny_model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_unknown_task_lists_valid(tiny_model):
    with pytest.raises(ValueError, match="valid tasks are: auto, defocus, global_motion"):
        tiny_model(torch.rand(1, 3, 8, 8), task="rain")


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 1, 8, 8), (1, 4, 8, 8), (1, 1, 3, 8, 8)])
def test_wrong_shape_names_expected(tiny_model, shape):
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        tiny_model(torch.rand(*shape))


def _count_expert_calls(model):
    calls = {}
    handles = []
    for level, moe in enumerate(model.experts):
        for e, expert in enumerate(moe.experts):
            def hook(mod, args, out, key=(level, e)):
                calls[key] = calls.get(key, 0) + args[0].shape[0]
            handles.append(expert.register_forward_hook(hook))
    return calls, handles


def test_sparse_forced_task_runs_only_its_expert(tiny_model):
    calls, handles = _count_expert_calls(tiny_model)
    with torch.no_grad():
        tiny_model(torch.rand(3, 3, 16, 16), task="local_motion")
    for h in handles:
        h.remove()
    levels = len(tiny_model.experts)
    assert calls == {(level, 2): 3 for level in range(levels)}


def test_sparse_mixed_batch_runs_each_expert_on_its_images(tiny_model):
    weights = torch.tensor([[0.9, 0.1, 0, 0, 0], [0, 0, 0, 0.2, 0.8], [0.7, 0.3, 0, 0, 0]])
    calls, handles = _count_expert_calls(tiny_model)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        y = tiny_model(x, weights=weights)
    for h in handles:
        h.remove()
    # k=1: image 0 and 2 -> expert 0, image 1 -> expert 4; experts 1-3 never run.
    assert {e for (_, e) in calls} == {0, 4}
    assert calls[(0, 0)] == 2 and calls[(0, 4)] == 1
    # Per-image routing: the batch result equals each image restored alone.
    with torch.no_grad():
        for i in range(3):
            alone = tiny_model(x[i : i + 1], weights=weights[i : i + 1])
            torch.testing.assert_close(y[i : i + 1], alone, atol=1e-5, rtol=0)


def test_top_k_mixes_and_renormalises(tiny_model):
    tiny_model.top_k = 2
    w = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]])
    mix = tiny_model.mixing_weights(w)
    torch.testing.assert_close(mix, torch.tensor([[0.625, 0.375, 0, 0, 0]]))
    # Experts 0 and 1 made equal at every level but the last: there the two are mixed 0.625 : 0.375, and the
    # affine ending keeps that mix, so the output is the same blend of the two experts' outputs.
    with torch.no_grad():
        for moe in tiny_model.experts[:-1]:
            moe.experts[1].load_state_dict(moe.experts[0].state_dict())
        x = torch.rand(1, 3, 16, 16)
        y = tiny_model(x, weights=w)
        a = tiny_model(x, weights=torch.tensor([[1.0, 0, 0, 0, 0]]))
        b = tiny_model(x, weights=torch.tensor([[0, 1.0, 0, 0, 0]]))
    torch.testing.assert_close(y, 0.625 * a + 0.375 * b, atol=1e-5, rtol=0)
    # So the mixture lies strictly between the two, wherever they differ (most pixels).
    apart = (a - b).abs() > 1e-3
    assert apart.float().mean() > 0.5
    assert ((torch.minimum(a, b) < y) & (y < torch.maximum(a, b)))[apart].all()


def test_auto_routing_is_per_image():
    torch.manual_seed(0)
    model = randomize(DeMoE(width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]), seed=3)
    x = torch.cat([torch.zeros(1, 3, 16, 16), torch.rand(1, 3, 16, 16) * 3])
    with torch.no_grad():
        p = model.route(x)
        assert p.shape == (2, 5)
        torch.testing.assert_close(p.sum(1), torch.ones(2))
        assert (p[0] - p[1]).abs().max() > 1e-3
        y = model(x)
        torch.testing.assert_close(y[1:], model(x[1:]), atol=1e-5, rtol=0)


def test_fresh_blocks_are_identities_and_the_model_trains():
    """Zero residual scales: every fresh NAF block, experts included, returns its input, so a fresh model
    restores alike whichever expert is chosen; gradients reach the router and the chosen experts."""
    torch.manual_seed(0)
    model = DeMoE(width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1])
    u = torch.rand(2, 8, 10, 6)
    blocks = [model.encoders[0].modules_list[0], *model.experts[-1].experts]
    for block in blocks:
        torch.testing.assert_close(block(u), u, rtol=0, atol=0)
    x = torch.rand(2, 3, 20, 12)
    out, logits = model(x, weights=torch.eye(5)[:2], return_logits=True)
    assert out.shape == x.shape and logits.shape == (2, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x, weights=torch.eye(5)[3:]), out.detach(), rtol=0, atol=1e-6)
    (out.mean() + logits.mean()).backward()
    assert model.mlp_branch.classifier[6].weight.grad.abs().sum() > 0
    for e in (0, 1):  # image 0 went to expert 0, image 1 to expert 1, at every level
        assert all(moe.experts[e].beta.grad.abs().sum() > 0 for moe in model.experts)
    assert all(moe.experts[4].beta.grad is None for moe in model.experts)  # not chosen: not run


@pytest.mark.parametrize("size", [1, 4, 7, 64, 192])
def test_local_mean_is_a_replicate_padded_box_filter(size):
    import torch.nn.functional as F

    from demoe.model import local_mean

    x = torch.rand(2, 5, 200, 230)
    lo, hi = (size - 1) // 2, size // 2
    ref = F.avg_pool2d(F.pad(x.double(), (lo, hi, lo, hi), mode="replicate"), size, stride=1)
    torch.testing.assert_close(local_mean(x, size).double(), ref, atol=5e-5, rtol=0)
    torch.testing.assert_close(local_mean(x, 500), x.mean(dim=(-2, -1), keepdim=True))  # bigger than the map: global


def test_conformance_channels_last(published):
    # Channels-last memory (with the fused layer norm) computes the same network.
    model, _, expected = published
    x = torch.from_numpy(expected["input"]).contiguous(memory_format=torch.channels_last)
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    seen = []  # the fused path runs: layer norms receive channels-last tensors
    norm = model.encoders[0].modules_list[0].norm1
    norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        out = model(x)
        assert seen and all(seen)
        np.testing.assert_allclose(out.numpy(), expected["output_auto"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(model(x, task="defocus").numpy(), expected["output_defocus"], atol=1e-5, rtol=0)


def test_coarse_local_mean_approximates_the_exact_one():
    from demoe.model import local_mean, local_mean_coarse

    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(320.0), indexing="ij")
    # Structure at the window's scale, plus pixel noise the window averages away.
    x = (torch.sin(yy / 40) * torch.cos(xx / 55) + xx / 320)[None, None].repeat(2, 3, 1, 1)
    x = x + 0.2 * torch.rand_like(x)
    exact, coarse = local_mean(x, 192), local_mean_coarse(x, 192)
    spread = float(exact.max() - exact.min())
    assert spread > 0.5  # the local means really vary over the map
    error = (coarse - exact).abs()
    assert float(error.mean()) < 0.015 * spread and float(error.max()) < 0.06 * spread
    # Small windows are computed exactly; a window covering the map is the global mean.
    torch.testing.assert_close(local_mean_coarse(x, 24), local_mean(x, 24))
    torch.testing.assert_close(local_mean_coarse(x, 400), x.mean(dim=(-2, -1), keepdim=True))


def test_pool_window_is_an_argument_of_the_call(tiny_model):
    """The local converter is per call: a window changes the result, a window as large as the
    input is the global pooling, and nothing is left on the model afterwards."""
    x = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        plain = tiny_model(x, task="defocus")
        local = tiny_model(x, task="defocus", pool_window=16)
        assert (local - plain).abs().max() > 1e-5
        torch.testing.assert_close(tiny_model(x, task="defocus", pool_window=128), plain, rtol=0, atol=0)
        torch.testing.assert_close(tiny_model(x, task="defocus"), plain, rtol=0, atol=0)
        assert (tiny_model.route(x, pool_window=16) - tiny_model.route(x)).abs().max() > 0
        _, logits = tiny_model(x, return_logits=True, pool_window=16)
        torch.testing.assert_close(logits, tiny_model.route_logits(x, pool_window=16))
        for bad in (0, -8, 16.5, True, "16"):
            with pytest.raises(ValueError, match="pool_window must be a window size in input pixels"):
                tiny_model(x, pool_window=bad)


def test_named_architectures_and_the_old_name_of_top_k():
    from demoe.model import ARCHITECTURES, architecture_name

    with torch.device("meta"):  # shapes only
        assert DeMoE().architecture == "published" and DeMoE().config["enc_blk_nums"] == [1, 1, 1, 28]
        assert DeMoE(**ARCHITECTURES["compact"]).architecture == "compact"
        assert DeMoE(width=4, enc_blk_nums=[1], dec_blk_nums=[1]).architecture is None
        with pytest.warns(DeprecationWarning, match="top_k"):
            model = DeMoE(k_used=2)
    assert architecture_name(load_model(device="cpu").config) == "compact"  # the packaged weights
    assert model.top_k == 2
    with pytest.warns(DeprecationWarning, match="top_k"):
        assert model.k_used == 2
    with pytest.warns(DeprecationWarning, match="top_k"):
        model.k_used = 3
    assert model.top_k == 3


# -- the dense path: tensor operations only (tracing, ONNX export) -------------------------------------
def test_dense_forward_matches_conformance(published):
    """Auto routing and every forced task, the task given as a tensor: the published outputs to 1e-5."""
    model, _, expected = published
    x = torch.from_numpy(expected["input"])
    assert model.top_k == 2 and x.shape[-1] % model.padder_size  # top-2 mixing and padding are exercised
    with torch.no_grad():
        out, probs = model.forward_dense(x)
        np.testing.assert_allclose(out.numpy(), expected["output_auto"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(probs.numpy(), expected["pred_labels_auto"], atol=1e-5, rtol=0)
        zeros, _ = model.forward_dense(x, torch.zeros(1, 5))  # a row of zeros: the router chooses
        np.testing.assert_allclose(zeros.numpy(), expected["output_auto"], atol=1e-5, rtol=0)
        for task in TASKS:
            forced, forced_probs = model.forward_dense(x, model.task_weights(task))
            np.testing.assert_allclose(forced.numpy(), expected[f"output_{task}"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(forced_probs.numpy(), expected["pred_labels_auto"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_dense_forward_equals_forward_per_image(tiny_model, top_k):
    """Per-image weights (one row per image, or one row for all), any size: forward's result."""
    tiny_model.top_k = top_k
    x = torch.rand(3, 3, 13, 22)
    weights = torch.tensor([[0.6, 0.3, 0.1, 0, 0], [0, 0, 0, 0.2, 0.8], [0.1, 0.1, 0.5, 0.3, 0]])
    with torch.no_grad():
        out, _ = tiny_model.forward_dense(x, weights)
        torch.testing.assert_close(out, tiny_model(x, weights=weights), atol=1e-5, rtol=0)
        out, probs = tiny_model.forward_dense(x, weights[1:2])
        torch.testing.assert_close(out, tiny_model(x, weights=weights[1:2].expand(3, -1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(probs, tiny_model.route(x), atol=1e-6, rtol=0)
        auto, _ = tiny_model.forward_dense(x, torch.tensor([[0.0] * 5, *weights[1:].tolist()]))
        torch.testing.assert_close(auto[:1], tiny_model(x[:1]), atol=1e-5, rtol=0)  # its row of zeros: routed
        torch.testing.assert_close(auto[1:], tiny_model(x[1:], weights=weights[1:]), atol=1e-5, rtol=0)


def _two_routings(model):
    """Two images the router sends to different experts (found among a few seeded ones)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 16, 16, generator=g) * torch.linspace(0.05, 3, 16).view(-1, 1, 1, 1)
    with torch.no_grad():
        top = model.route(images).argmax(1)
    other = int(torch.nonzero(top != top[0])[0])
    return images[:1], images[other : other + 1]


def test_dense_forward_traces_routing_and_task():
    """A trace of the dense path routes every input anew and follows the task tensor: no expert is frozen
    into it (a trace of forward() keeps the expert it saw while tracing)."""
    model = randomize(DeMoE(width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]), seed=3)
    a, b = _two_routings(model)

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, task):
            return self.model.forward_dense(x, task)

    with warnings.catch_warnings():  # the tracer's notes on the input checks (shapes only) and on k_used
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Graph().eval(), (a, torch.zeros(1, 5)))
    with torch.no_grad():
        torch.testing.assert_close(traced(b, torch.zeros(1, 5))[0], model(b), atol=1e-5, rtol=0)
        for task in ("defocus", "low_light"):
            torch.testing.assert_close(traced(b, model.task_weights(task))[0], model(b, task=task), atol=1e-5, rtol=0)
        # forward() itself, traced, keeps a's expert for b: what the dense path is for
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.trace(model, (a,))
        wrong = frozen(b)
        assert wrong.shape != b.shape or (wrong - model(b)).abs().max() > 1e-3


def test_dense_forward_refuses_a_task_of_the_wrong_shape(tiny_model):
    x = torch.rand(2, 3, 8, 8)
    for bad in (torch.zeros(5), torch.zeros(3, 5), torch.zeros(1, 4), "defocus"):
        with pytest.raises(ValueError, match=r"task must be a tensor of routing weights of shape \(2, 5\) or \(1, 5\)"):
            tiny_model.forward_dense(x, bad)
    with pytest.raises(ValueError, match="valid tasks are: auto, defocus"):
        tiny_model.task_weights("rain")
    torch.testing.assert_close(tiny_model.task_weights("auto", 2), torch.zeros(2, 5))
    torch.testing.assert_close(tiny_model.task_weights("local_motion"), torch.eye(5)[2:3])
