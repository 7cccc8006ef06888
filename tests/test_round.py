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


def _manifest(folder, licences=("CC0-1.0", "GPL-2+", "CC-BY-SA-4.0, or GFDL-1.3+")):
    """A manifest of the photographs in ``folder`` (as prepare_photos.sh writes), one licence each."""
    import hashlib

    rows = ["file\tpackage\tversion\tsource\tlicence\tsha256"]
    for path, licence in zip(sorted(folder.iterdir()), licences):
        rows.append(f"{path.name}\tpkg\t1.0\tsomewhere/{path.name}\t{licence}\t"
                    + hashlib.sha256(path.read_bytes()).hexdigest())
    (folder.parent / "manifest.tsv").write_text("\n".join(rows) + "\n")
    return folder.parent / "manifest.tsv"


def test_the_gpu_round_runs_on_a_cpu(tmp_path):
    """examples/training/gpu_round.sh end to end, cut down: speed check, training, shards, comparison."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out, run = tmp_path / "out", tmp_path / "run"
    photos = _photos(tmp_path / "photos")
    env = {**os.environ, "PYTHON": sys.executable, "ROUND_PHOTOS": str(photos),
           "ROUND_RUN": str(run), "ROUND_PATCH": "32", "ROUND_BATCH": "5", "ROUND_SPEED_STEPS": "1",
           "ROUND_QUICK": "1", "ROUND_SEED": "3", "ROUND_SPEED_S": "900"}
    proc = subprocess.run(["bash", str(root / "examples/training/gpu_round.sh"), str(out), "--steps", "8",
                           "--no-fit-to-time", "--log-every", "1", "--data-manifest", str(_manifest(photos))],
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
    assert header["license"] == "MIT" and sum(p["images"] for p in data["photographs"]) == 3
    assert data["photographs"][0]["licenses"] == {"CC0-1.0": 1, "GPL-2+": 1, "CC-BY-SA-4.0, or GFDL-1.3+": 1}
    assert data["fine_tuned_from"]["photographs"] and "3 photographs" in header["license_note"]
    assert "1 of the photographs are public domain or under permissive licences; 2 are under share-alike" \
        in header["license_note"]
    assert "training for" in log and "of the round's 420 s used" in log
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


@pytest.mark.parametrize("extra, message", [
    (["--fit-to-time"], "fit_to_time ends the schedule at --time-limit: give a time limit above 0"),
    (["--fit-to-time", "--time-limit", "0"], "give a time limit above 0"),
    (["--time-limit", "-1"], "time_limit must be a number of minutes >= 0"),
    (["--seed", "-1"], "seed must be a whole number >= 0, got -1"),
    (["--batch", "1"], "batch must be at least 2"),
    (["--device-data", "--batch", "4"], "every batch hold each of the 5 tasks: batch must be at least 5, got 4"),
])
def test_options_that_would_waste_a_round_are_refused(tmp_path, capsys, extra, message):
    assert train_main([*TINY, "--out", str(tmp_path / "run"), "--steps", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_diverged_training_stops_with_one_line_and_writes_no_weights(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--device-data", "--patch", "32", "--batch", "5", "--steps", "8", "--log-every", "2",
            "--lr", "1e12", "--out", str(out), "--no-progress", "--photo-fraction", "0"]
    assert train_main(args) == 1
    err = capsys.readouterr().err
    assert "training diverged at step 2 (loss nan" in err and "no weights written" in err
    assert not (out / "model.safetensors").exists()


def test_the_manifest_must_describe_the_photographs_used(tmp_path, capsys):
    from demoe.train import licence_note, photo_licences

    photos = _photos(tmp_path / "photos")
    manifest = _manifest(photos)
    data = photo_licences(manifest, [photos])
    assert sum(p["images"] for p in data["photographs"]) == 3
    (photos / "p2.jpg").unlink()  # a manifest row whose file is not used is not counted
    assert sum(p["images"] for p in photo_licences(manifest, [photos])["photographs"]) == 2
    (photos / "extra.png").write_bytes((photos / "p0.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"does not list 1 of the images in --photos \(extra.png\)"):
        photo_licences(manifest, [photos])
    (photos / "extra.png").unlink()
    (photos / "p1.jpg").write_bytes((photos / "p0.jpg").read_bytes())  # same name, other picture
    with pytest.raises(ValueError, match=r"lists other contents for 1 of the images in --photos \(p1.jpg\)"):
        photo_licences(manifest, [photos])
    args = [*TINY, "--photos", str(photos), "--data-manifest", str(manifest), "--out", str(tmp_path / "run")]
    assert train_main(args) == 2 and "their licences are unknown" in capsys.readouterr().err
    manifest.write_bytes(b"file\tpackage\tversion\tlicence\n\xff\xfe.jpg\tp\t1\tMIT\n")
    with pytest.raises(ValueError, match=r"--data-manifest .*manifest.tsv: not a UTF-8 tab-separated file"):
        photo_licences(manifest, [photos])
    with pytest.raises(ValueError, match="no --photos are given"):
        photo_licences(_manifest(photos), [])
    # The note names the weights' own licence and counts each licence, commas and all.
    note = licence_note(data, "CC-BY-4.0")
    assert note.startswith("The weights are offered under the CC-BY-4.0 licence.") and "MIT" not in note
    assert "1 of the photographs are public domain or under permissive licences; 2 are under share-alike" in note
    assert licence_note(data, "unknown").startswith("The licence of these weights is not stated.")


def test_an_empty_photograph_folder_is_one_line_not_dead_leaves(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "README.txt").write_text("not a picture")
    for extra in ([], ["--device-data", "--patch", "32", "--batch", "5"]):
        args = [*TINY, "--photos", str(tmp_path / "photos"), "--steps", "1", "--workers", "0",
                "--out", str(tmp_path / "run"), *extra]
        assert train_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("demoe train: error: no images in") and "accepted: .bmp" in err


def test_a_resumed_run_keeps_the_schedule_fitted_to_its_time(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--device-data", "--patch", "32", "--batch", "5", "--out", str(out), "--no-progress",
            "--photo-fraction", "0", "--log-every", "100"]
    assert train_main([*args, "--steps", "3"]) == 0
    state = torch.load(out / "last.pt", weights_only=True)
    record = json.loads(state["record"])
    record["fitted_steps"] = 5  # as if the first session had fitted its cosine schedule to 5 steps
    state["record"] = json.dumps(record)
    torch.save(state, out / "last.pt")
    assert train_main([*args, "--steps", "1000", "--fit-to-time", "--time-limit", "5"]) == 0
    assert "keeping the schedule fitted to 5 steps" in capsys.readouterr().err
    header = json.loads(safe_open(str(out / "model.safetensors"), "pt").metadata()["training"])
    assert header["steps"] == 5


def test_sigterm_saves_the_run_like_ctrl_c(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "demoe", "train", *TINY, "--device-data", "--patch", "32",
                             "--batch", "5", "--steps", "100000", "--log-every", "1", "--no-progress",
                             "--photo-fraction", "0", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stderr:  # wait until it trains
        lines.append(line)
        if line.startswith("step 3 "):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, "".join(lines) + rest
    assert "interrupted at step" in rest and (out / "last.pt").is_file()
    assert int(torch.load(out / "last.pt", weights_only=True)["step"]) >= 3


def _round_env(tmp_path, **extra):
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUND_")}
    return {**env, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **extra}


@pytest.mark.parametrize("script", ["gpu_round.sh", "size_round.sh"])
def test_rounds_refuse_the_gpu_sizes_without_cuda_and_runs_that_would_delete_their_input(tmp_path, script):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    photos = _photos(tmp_path / "photos", n=1)
    env = _round_env(tmp_path, ROUND_PHOTOS=str(photos))
    proc = subprocess.run(["bash", str(root / "examples/training" / script), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "ROUND_PATCH and ROUND_BATCH" in proc.stderr
    assert not (tmp_path / "out").exists()
    if script == "gpu_round.sh":
        run = tmp_path / "run"
        (run / "keep").mkdir(parents=True)
        env.update(ROUND_RUN=str(run), ROUND_INIT=str(run / "keep" / "model.safetensors"))
        proc = subprocess.run(["bash", str(root / "examples/training" / script), str(tmp_path / "out")],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "is inside ROUND_RUN" in proc.stderr and (run / "keep").is_dir()


def test_the_size_round_runs_on_a_cpu(tmp_path):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = _round_env(tmp_path, ROUND_PHOTOS=str(_photos(tmp_path / "photos")), ROUND_PATCH="32", ROUND_BATCH="5",
                     ROUND_QUICK="1", SIZE_WIDTHS="4", SIZE_RUNS=str(tmp_path / "runs"))
    proc = subprocess.run(["bash", str(root / "examples/training/size_round.sh"), str(tmp_path / "out"),
                           "--enc-blk-nums", "1", "1", "--dec-blk-nums", "1", "1", "--middle-blk-num", "1",
                           "--steps", "3", "--no-fit-to-time", "--data-manifest", ""],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "ood-4.json").read_text())
    assert "auto_gain" in json.dumps(result)
    joined = join_weights(sorted((tmp_path / "out" / "width-4").glob("*.safetensors")), tmp_path / "w4.safetensors")
    assert load_model(joined, device="cpu").config["width"] == 4


def test_shard_tools_refuse_with_one_line(tmp_path, capsys):
    from demoe import DeMoE, save_model
    from demoe.checkpoint import main as shard_main

    torch.manual_seed(0)
    a, b = DeMoE(3, 4, 1, [1, 1], [1, 1]), DeMoE(3, 4, 1, [1, 1], [1, 1])
    save_model(a, tmp_path / "a.safetensors", note="same header")
    save_model(b, tmp_path / "b.safetensors", note="same header")
    kb = 2**10 / 2**20  # shards of 160 KiB: the largest tensor is 128 KiB
    for name in "ab":
        assert shard_main(["split", str(tmp_path / f"{name}.safetensors"), str(tmp_path / name),
                           "--max-mib", str(160 * kb)]) == 0
    parts_a, parts_b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert len(parts_a) == len(parts_b) >= 2
    capsys.readouterr()
    cases = [
        (["split", str(tmp_path / "a.safetensors"), str(tmp_path / "x"), "--max-mib", "0"], "above 0 bytes"),
        (["split", str(tmp_path / "missing.safetensors"), str(tmp_path / "x")], "no such file"),
        (["split", str(tmp_path / "a.safetensors"), str(tmp_path / "a"), "--max-mib", str(160 * kb)], "exists"),
        (["split", str(parts_a[0]), str(tmp_path / "x")], "is already shard 1/"),
        (["join", *map(str, parts_a), "-o", str(parts_a[0])], "is one of the inputs"),
        (["join", *map(str, parts_a), "-o", str(tmp_path / "b.safetensors")], "exists: remove it"),
        (["join", str(parts_a[0]), *map(str, parts_b[1:]), "-o", str(tmp_path / "mix.safetensors")],
         "different files"),
        (["join", str(parts_a[0]), str(parts_a[0]), "-o", str(tmp_path / "twice.safetensors")], "one whole"),
    ]
    for argv, message in cases:
        assert shard_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "mix.safetensors").exists() and not (tmp_path / "x").exists()
    assert shard_main(["join", *map(str, parts_a), "-o", str(tmp_path / "b.safetensors"), "--overwrite"]) == 0
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("intro.weight"), a.state_dict()["intro.weight"])


def test_demoe_info_on_a_shard_and_on_a_strange_header(tmp_path, capsys):
    from demoe import DeMoE, save_model
    from demoe.checkpoint import split_weights
    from demoe.cli import main as cli_main

    model = DeMoE(3, 4, 1, [1, 1], [1, 1])
    part = split_weights(save_model(model, tmp_path / "m.safetensors"), tmp_path / "parts", max_bytes=160 * 2**10)[0]
    assert cli_main(["info", str(part)]) == 2
    err = capsys.readouterr().err
    assert "is part 1/" in err and "python -m demoe.checkpoint join" in err and "Traceback" not in err
    odd = save_model(model, tmp_path / "odd.safetensors", license=7, training_data={"photographs": [3, {"x": 1}]},
                     license_note=["a", "list"])
    assert cli_main(["info", str(odd)]) == 0
    assert "trained on photographs: ? from ?" in capsys.readouterr().out
