"""The GPU training round's pieces, run on the CPU: on-device data in the trainer, throughput, shards."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from demoe import load_model
from demoe.checkpoint import CheckpointError, default_weights_path, join_weights, split_weights
from demoe.train import main as train_main

TINY = ["--width", "4", "--enc-blk-nums", "1", "1", "--dec-blk-nums", "1", "1", "--middle-blk-num", "1"]


def test_device_data_training_runs_resumes_and_records_its_speed(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--device-data", "--patch", "32", "--batch", "5", "--log-every", "4", "--out", str(out),
            "--no-progress", "--channels-last", "--photo-fraction", "0"]
    assert train_main([*args, "--steps", "8"]) == 0
    err = capsys.readouterr().err
    assert "throughput:" in err and "patches/s of 32 px" in err
    record = json.loads(safe_open(str(out / "model.safetensors"), "pt").metadata()["training"])
    session = record["sessions"][-1]
    assert session["end_step"] == 8 and session["patches_per_s"] > 0
    assert session["patches_per_s"] == pytest.approx(session["steps_per_s"] * 5, abs=0.06)  # both rounded
    assert record["config"]["device_data"] is True
    before = load_model(out / "model.safetensors", device="cpu").state_dict()
    assert train_main([*args, "--steps", "12"]) == 0  # a rerun resumes at step 8
    assert "resumed from" in capsys.readouterr().err
    after = load_model(out / "model.safetensors", device="cpu").state_dict()
    assert json.loads(safe_open(str(out / "model.safetensors"), "pt").metadata()["training"])["steps"] == 12
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("extra, message", [
    (["--psf", "x.tif:defocus"], "--device-data makes synthetic pairs"),
    (["--patch", "40"], "multiple of 16"),
    (["--data-manifest", "x.tif"], "expected a TSV with columns package, version and licence"),
    (["--data-manifest", "missing.tsv"], "cannot read missing.tsv"),
])
def test_device_data_refuses_what_it_cannot_do(tmp_path, capsys, extra, message):
    (tmp_path / "x.tif").write_bytes(b"")
    args = [*TINY, "--device-data", "--out", str(tmp_path / "run"), "--steps", "2", *extra]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert train_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_weights_split_into_shards_and_join_bit_for_bit(tmp_path):
    source = default_weights_path()
    shards = split_weights(source, tmp_path / "shards", max_bytes=8 * 2**20)
    assert len(shards) == 3 and all(p.stat().st_size < 9 * 2**20 for p in shards)
    joined = join_weights(list(reversed(shards)), tmp_path / "joined.safetensors")
    with safe_open(str(source), "pt") as a, safe_open(str(joined), "pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 - safe_open is no dict
    with pytest.raises(CheckpointError, match="do not make one whole"):
        join_weights(shards[:2], tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="not a shard"):
        join_weights([source], tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="over the"):
        split_weights(source, tmp_path / "tiny", max_bytes=1000)


def test_device_batches_feed_the_model_like_the_loader():
    """A batch from the device stream has the DataLoader's layout: the model trains on it as is."""
    from demoe import DeMoE
    from demoe.batch_degrade import DeviceBatches
    from demoe.train import TrainConfig, batch_losses

    blurry, sharp, label = DeviceBatches([], patch=32, batch=5, seed=0, bank=8, leaves=1).sample()
    model = DeMoE(3, 4, 1, [1, 1], [1, 1])
    loss, ce, logits, pred = batch_losses(model, TrainConfig(), blurry, sharp, label)
    loss.backward()
    assert np.isfinite(float(loss)) and logits.shape == (5, 5) and pred.shape == sharp.shape


def test_expert_slices_train_like_one_hot_weights():
    """A batch grouped by task through expert_slices: the same outputs and gradients as one-hot weights."""
    from torch.nn.functional import one_hot

    from demoe import DeMoE

    torch.manual_seed(0)
    model = DeMoE(3, 4, 1, [1, 1], [1, 1])
    for p in model.parameters():  # fresh NAF blocks are the identity: give every expert a part to play
        torch.nn.init.normal_(p, std=0.1)
    x = torch.rand(6, 3, 16, 16)
    label = torch.tensor([0, 0, 2, 2, 2, 4])
    slices = [(0, 0, 2), (2, 2, 5), (4, 5, 6)]
    outs, grads = [], []
    for kw in ({"weights": one_hot(label, 5).float()}, {"weights": one_hot(label, 5).float(), "expert_slices": slices}):
        model.zero_grad()
        y = model(x, **kw)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="cover rows"):
        model(x, weights=one_hot(label, 5).float(), expert_slices=[(0, 0, 2), (2, 3, 6)])


def _photos(folder, n=3):
    """A few sharp photographs, big enough for 32 px patches and their margins."""
    import cv2
    from skimage import data

    folder.mkdir()
    for i, img in enumerate([data.astronaut(), data.coffee(), data.chelsea()][:n]):
        cv2.imwrite(str(folder / f"p{i}.jpg"), np.ascontiguousarray(img[:200, :200, ::-1]))
    return folder


def test_the_gpu_round_runs_on_a_cpu(tmp_path):
    """examples/training/gpu_round.sh end to end, cut down: speed check, training, shards, comparison."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out, run = tmp_path / "out", tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "ROUND_PHOTOS": str(_photos(tmp_path / "photos")),
           "ROUND_RUN": str(run), "ROUND_PATCH": "32", "ROUND_BATCH": "5", "ROUND_SPEED_STEPS": "1",
           "ROUND_QUICK": "1", "ROUND_SEED": "3"}
    proc = subprocess.run(["bash", str(root / "examples/training/gpu_round.sh"), str(out), "--steps", "8",
                           "--no-fit-to-time", "--patch", "32", "--batch", "5", "--log-every", "1"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "round on no CUDA device" in log and "throughput:" in log and "| step alone" in log
    shards = sorted(out.glob("model-part*.safetensors"))
    assert len(shards) == 2 and all(p.stat().st_size <= 16 * 2**20 for p in shards)
    joined = join_weights(shards, tmp_path / "joined.safetensors")
    new, old = load_model(joined, device="cpu").state_dict(), load_model(device="cpu").state_dict()
    assert any(not torch.equal(new[k], old[k]) for k in new)  # trained, from the packaged weights
    header = {k: json.loads(v) for k, v in safe_open(str(joined), "pt").metadata().items()}
    data = header["training_data"]  # from the round's manifest, with the packaged weights' sources nested
    assert header["license"] == "MIT" and sum(p["images"] for p in data["photographs"]) == 445
    assert data["fine_tuned_from"]["photographs"] and "445 photographs" in header["license_note"]
    assert "not legal advice" in header["license_note"] and "fine-tuned from say" in header["license_note"]
    result = json.loads((out / "compare.json").read_text())
    assert result["verdict"].startswith(("ACCEPT", "REJECT")) and result["limit"] == 1
    assert "OOD mean PSNR gain" in (out / "compare.md").read_text()
    assert len(list(out.iterdir())) <= 8  # what a lease gives back


def test_the_gpu_round_stops_at_once_without_photographs(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ROUND_PHOTOS": str(tmp_path / "none")}
    proc = subprocess.run(["bash", str(root / "examples/training/gpu_round.sh"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "prepare_photos.sh" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unreadable_training_images_are_left_out_with_a_warning(tmp_path):
    from demoe.data import load_photos

    folder = _photos(tmp_path / "photos", n=2)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    with pytest.warns(RuntimeWarning, match=r"left out 1 of 3 training images that cannot be read: .*broken\.jpg"):
        assert len(load_photos([folder])) == 2
    (folder / "p0.jpg").unlink()
    (folder / "p1.jpg").unlink()
    with pytest.raises(ValueError, match="none of the 1 training images"), pytest.warns(RuntimeWarning):
        load_photos([folder])


@pytest.mark.parametrize("device_data", [True, False])
def test_photographs_too_small_for_the_patch_are_one_line(tmp_path, capsys, device_data):
    folder = _photos(tmp_path / "photos", n=1)  # 200 px: too small for 256 px patches and their margins
    args = [*TINY, "--photos", str(folder), "--patch", "256", "--steps", "1", "--workers", "0",
            "--out", str(tmp_path / "run"), *(["--device-data"] if device_data else [])]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("demoe train: error: none of the 1 photographs is at least") and "Traceback" not in err
