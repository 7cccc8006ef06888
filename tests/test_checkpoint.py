import os

import pytest
import torch

from conftest import randomize
from demoe import TASKS, CheckpointError, DeMoE, load_model, save_model
from demoe.checkpoint import default_weights_path, infer_config


def _outputs(model, x):
    with torch.no_grad():
        return [model(x)] + [model(x, task=t) for t in TASKS[: model.num_exp]]


@pytest.mark.parametrize(
    "config",
    [
        dict(width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1], num_exp=5),
        dict(width=8, middle_blk_num=2, enc_blk_nums=[2, 1, 3], dec_blk_nums=[1, 2, 1], num_exp=5),
        dict(width=6, middle_blk_num=0, enc_blk_nums=[1], dec_blk_nums=[2], num_exp=3),
        dict(img_channel=1, width=4, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1], num_exp=5),
    ],
)
@pytest.mark.parametrize("prefix", ["", "module."])
def test_published_format_roundtrip(tmp_path, config, prefix):
    model = randomize(DeMoE(**config, top_k=2), seed=1)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "net.pth"
    torch.save({"params": state, "epoch": 7, "optimizer": {"lr": 1e-3}, "best_psnr": 30.5}, path)
    loaded = load_model(path, top_k=2, device="cpu")
    assert loaded.config == model.config
    assert not loaded.training
    x = torch.rand(2, config.get("img_channel", 3), 13, 21)
    for a, b in zip(_outputs(model, x), _outputs(loaded, x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bare_state_dict_and_default_top_k(tmp_path, tiny_model):
    path = tmp_path / "bare.pt"
    torch.save(tiny_model.state_dict(), path)
    loaded = load_model(path, device="cpu")
    assert loaded.top_k == 1  # published configuration when the file says nothing
    assert load_model(path, top_k=3, device="cpu").top_k == 3


def test_infer_config_reads_names_and_shapes(tiny_model):
    assert infer_config(tiny_model.state_dict()) == tiny_model.config


def test_safetensors_roundtrip_keeps_metadata(tmp_path, tiny_model):
    tiny_model.top_k = 2
    path = save_model(tiny_model, tmp_path / "m.safetensors", training={"steps": 12, "hardware": "cpu"}, note="x")
    loaded = load_model(path, device="cpu")
    assert loaded.top_k == 2
    assert loaded.metadata["training"] == {"steps": 12, "hardware": "cpu"}
    assert loaded.metadata["note"] == "x"
    assert loaded.metadata["demoe_config"] == tiny_model.config
    x = torch.rand(2, 3, 9, 30)
    for a, b in zip(_outputs(tiny_model, x), _outputs(loaded, x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert load_model(path, top_k=1, device="cpu").top_k == 1


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path, tiny_model):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"params": tiny_model.state_dict(), "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="not a plain-tensor checkpoint"):
        load_model(path, device="cpu")
    assert not marker.exists()


def test_key_errors_listed_in_one_message(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    del state["ending.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["ending.weight"] = torch.zeros(3, 4, 5, 5)
    torch.save({"params": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pt", device="cpu")
    msg = str(err.value)
    assert "missing (1): ending.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "mis-shaped (1): ending.weight: file (3, 4, 5, 5), model (3, 4, 3, 3)" in msg


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04K\x01."])
def test_garbage_files_give_clear_errors(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.pt") as err:
        load_model(path, device="cpu")
    assert "execute" not in str(err.value)  # junk is not mistaken for a code-carrying pickle
    (tmp_path / "junk.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_model(tmp_path / "junk.safetensors", device="cpu")


def test_not_a_demoe(tmp_path):
    torch.save({"params": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a DeMoE state dict"):
        load_model(tmp_path / "other.pt", device="cpu")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pt")


def test_run_folder_loads_its_exported_weights(tmp_path, tiny_model):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="folder without model.safetensors"):
        load_model(run, device="cpu")
    save_model(tiny_model, run / "model.safetensors")
    loaded = load_model(run, device="cpu")
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_invalid_top_k(tmp_path, tiny_model):
    torch.save(tiny_model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="top_k must be between 1 and 5"):
        load_model(tmp_path / "m.pt", top_k=6)


def test_default_weights_missing_gives_instructions(monkeypatch, tmp_path):
    monkeypatch.setattr("demoe.checkpoint.default_weights_path", lambda: tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="pass a checkpoint instead"):
        load_model()


def test_packaged_default_loads_with_record():
    assert default_weights_path().is_file()
    model = load_model(device="cpu")
    assert model.top_k == 1 and model.config["num_exp"] == 5
    record = model.metadata["training"]
    assert record["steps"] > 0 and record["sessions"][0]["hardware"]
    assert model.metadata["input_convention"]["range"] == [0.0, 1.0]


def test_default_device_is_cpu_here(tiny_model, tmp_path):
    torch.save(tiny_model.state_dict(), tmp_path / "m.pt")
    model = load_model(tmp_path / "m.pt")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type in (expected, "mps")


# -- hostile checkpoints: refused before anything is allocated -------------------------------
@pytest.fixture
def real_builds(monkeypatch):
    """Records every DeMoE built off the ``meta`` device; one beyond the bounds stops the test at once."""
    import demoe.checkpoint as ckpt

    built = []

    class Spy(DeMoE):
        def __init__(self, **config):
            meta = torch.empty(0).device.type == "meta"
            if not meta:
                built.append(config)
                blocks = [config["middle_blk_num"], *config["enc_blk_nums"], *config["dec_blk_nums"]]
                if config["width"] > 1024 or max(blocks) > 256:
                    raise AssertionError(f"allocating a model of {config}")
            super().__init__(**config)

    monkeypatch.setattr(ckpt, "DeMoE", Spy)
    return built


def _hostile(tiny_model, change):
    state = dict(tiny_model.state_dict())
    change(state)
    return state


@pytest.mark.parametrize("change, message", [
    # A stride-0 view: a few bytes in the file, a width of 8192 once built (over 7 GB).
    (lambda s: s.__setitem__("intro.weight", torch.zeros(1, 1, 1, 1).expand(8192, 3, 3, 3)),
     r"width 8192 \(at most 1024\)"),
    (lambda s: s.__setitem__("encoders.0.modules_list.999999.beta", torch.zeros(1, 4, 1, 1)),
     r"the indices N of encoders\.0\.modules_list\.N\. do not run 0, 1, 2, \.\.\. \(found 2 up to 999999"),
    (lambda s: s.__setitem__("ending.weight", torch.zeros(3, 4, 5, 5)),
     r"mis-shaped \(1\): ending\.weight: file \(3, 4, 5, 5\), model \(3, 4, 3, 3\)"),
    (lambda s: s.__setitem__("ending.weight", torch.zeros(1).expand(3, 4, 3, 3)),
     r"parameter ending\.weight of shape \(3, 4, 3, 3\) does not hold its values \(4 bytes stored for 108"),
])
def test_architecture_is_checked_before_the_model_is_built(tmp_path, tiny_model, real_builds, change, message):
    path = tmp_path / "hostile.pt"
    torch.save(_hostile(tiny_model, change), path)
    assert path.stat().st_size < 400_000
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path, device="cpu")
    assert str(err.value).startswith(str(path))
    assert real_builds == []  # nothing was allocated


def test_parameter_count_is_bounded(tmp_path, tiny_model, real_builds, monkeypatch):
    torch.save(tiny_model.state_dict(), tmp_path / "m.pt")
    monkeypatch.setattr("demoe.checkpoint.MAX_PARAMETERS", 1000)
    with pytest.raises(CheckpointError, match=r"61,057 parameters \(at most 1,000\)"):
        load_model(tmp_path / "m.pt", device="cpu")
    assert real_builds == []


@pytest.mark.parametrize("field, value", [("top_k", "abc"), ("patch_size", "abc"), ("patch_size", -256),
                                          ("top_k", True), ("patch_size", 1.5)])
def test_metadata_fields_are_checked_by_name(tmp_path, tiny_model, field, value):
    import json

    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    header = {field: value if isinstance(value, str) else json.dumps(value)}
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path), metadata=header)
    with pytest.raises(CheckpointError, match=f"metadata field '{field}' must be a positive whole number, "
                                              f"got {value!r}"):
        load_model(path, device="cpu")


def test_header_architecture_must_match_the_parameters(tmp_path, tiny_model):
    import json

    from safetensors.torch import save_file

    path = save_model(tiny_model, tmp_path / "m.safetensors")
    assert load_model(path, device="cpu").config == tiny_model.config  # the header agrees
    wrong = {**tiny_model.config, "width": 8}
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path),
              metadata={"demoe_config": json.dumps(wrong)})
    with pytest.raises(CheckpointError, match=r"the header records the architecture .*'width': 8.*, but the "
                                              r"parameters are those of .*'width': 4"):
        load_model(path, device="cpu")


# -- models that travel (dask.distributed workers) and the process's cache ---------------------
def test_model_bytes_roundtrip_and_digest(tiny_model):
    from demoe.checkpoint import model_bytes, model_digest, model_from_bytes

    tiny_model.top_k = 2
    tiny_model.metadata = {"patch_size": 64, "training": {"steps": 3}, "note": "x"}
    loaded = model_from_bytes(model_bytes(tiny_model))
    assert (loaded.top_k, loaded.metadata["patch_size"], loaded.metadata["note"]) == (2, 64, "x")
    x = torch.rand(2, 3, 9, 30)
    for a, b in zip(_outputs(tiny_model, x), _outputs(loaded, x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    digest = model_digest(tiny_model)
    assert model_digest(loaded) == digest  # equal models, one name (the bytes' header order may differ)
    loaded.metadata = dict(reversed(list(loaded.metadata.items())))
    assert model_digest(loaded) == digest
    with torch.no_grad():
        loaded.ending.bias[0] += 1e-6
    assert model_digest(loaded) != digest
    with pytest.raises(CheckpointError, match="not the bytes of a safetensors file"):
        model_from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def test_model_bytes_refuse_what_files_refuse(tiny_model):
    from safetensors.torch import save

    from demoe.checkpoint import model_from_bytes

    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items() if not k.startswith("ending")}
    with pytest.raises(CheckpointError, match=r"(?s)registered model: .*missing \(2\): ending.bias, ending.weight"):
        model_from_bytes(save(state), origin="registered model")


def test_cache_reloads_a_rewritten_file_and_counts_loads(tmp_path, tiny_model):
    from demoe.checkpoint import cached_model, clear_model_cache, model_loads

    clear_model_cache()
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    first = cached_model(path, "cpu")
    assert cached_model(path, "cpu") is first and model_loads() == {(str(path.resolve()), "cpu"): 1}
    tiny_model.metadata = {"note": "retrained"}
    save_model(tiny_model, path)  # rewritten: loaded again, not the old one
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # also within one clock tick
    assert cached_model(path, "cpu").metadata["note"] == "retrained"
    assert model_loads() == {(str(path.resolve()), "cpu"): 2}
    clear_model_cache()
    assert model_loads() == {}


def test_registered_models_are_built_once_and_forgotten_with_the_last(tiny_model):
    from demoe.checkpoint import model_loads, register_model, registered_model, unregister_model

    built = []

    def build():
        built.append(1)
        return tiny_model

    register_model("demoe-model-test", build)
    register_model("demoe-model-test", build)  # two workers in one process
    assert len(built) == 1 and registered_model("demoe-model-test", "cpu") is tiny_model
    assert model_loads()[("demoe-model-test", "cpu")] == 1
    unregister_model("demoe-model-test")
    assert registered_model("demoe-model-test", "cpu") is tiny_model
    unregister_model("demoe-model-test")
    with pytest.raises(LookupError, match="demoe-model-test is not on this worker"):
        registered_model("demoe-model-test", "cpu")
