"""The command in a log (no progress bars there) and the files it saves (ordinary permissions)."""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

BAR_MARKS = ("\r", "\x1b[", "it/s", "tile/s", "image/s")


def _demoe(*argv, cwd, umask=None):
    """``python -m demoe ...`` with stdout and stderr captured (so neither is a terminal)."""
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "demoe", *argv], capture_output=True, text=True, cwd=cwd,
                          preexec_fn=preexec, timeout=300)


@pytest.fixture
def small_images(tmp_path):
    import cv2
    import tifffile
    from skimage import data

    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), data.astronaut()[:48, :64, ::-1])
    tifffile.imwrite(src / "b.tif", (data.camera()[:40, :56].astype(np.uint16) * 16))
    np.save(src / "c.npy", data.camera()[:40, :40].astype(np.float32) / 255)
    return src


def test_a_log_gets_one_line_per_file_and_no_bars(small_images, tmp_path):
    run = _demoe("deblur", str(small_images), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(small_images / n) for n in ("a.png", "b.tif", "c.npy")]
    assert all(" -> " in line for line in lines)
    assert run.stderr.strip() == "3 deblurred, 0 skipped, 0 failed"
    assert not [m for m in BAR_MARKS if m in run.stdout + run.stderr]


def test_progress_bars_when_asked(small_images, tmp_path):
    run = _demoe("deblur", str(small_images / "a.png"), "-o", str(tmp_path / "out"), "--progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "image/s" in run.stderr or "s/image" in run.stderr  # tqdm's bar over the images
    assert len(run.stdout.splitlines()) == 1


def test_training_log_has_plain_lines(tmp_path):
    run = _demoe("train", "--width", "4", "--enc-blk-nums", "1", "--dec-blk-nums", "1", "--middle-blk-num", "1",
                 "--patch", "32", "--batch", "2", "--workers", "0", "--steps", "2", "--warmup", "1",
                 "--log-every", "1", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert [line.split(" loss ")[0] for line in run.stderr.splitlines() if line.startswith("step ")] == \
        ["step 1", "step 2"]
    assert not [m for m in BAR_MARKS if m in run.stderr]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask(small_images, tmp_path, umask):
    """Outputs and saved models are ordinary files: 0666 less the umask (safetensors alone writes 0600)."""
    out = tmp_path / "out"
    run = _demoe("deblur", str(small_images), "-o", str(out), cwd=tmp_path, umask=umask)
    assert run.returncode == 0, run.stderr
    code = ("from demoe import DeMoE, save_model; "
            "save_model(DeMoE(width=4, middle_blk_num=1, enc_blk_nums=[1], dec_blk_nums=[1]), 'model.safetensors')")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, preexec_fn=lambda: os.umask(umask))
    saved = [*sorted(out.iterdir()), tmp_path / "model.safetensors"]
    assert len(saved) == 4
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in saved} == \
        {p.name: oct(0o666 & ~umask) for p in saved}

