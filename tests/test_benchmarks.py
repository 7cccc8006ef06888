"""The scripts that judge weights and rounds: benchmarks/ood.py, compare_weights.py, train_speed.py (tiny models)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # the scripts import each other as top-level modules
    sys.path.insert(0, str(BENCHMARKS))

import compare_weights  # noqa: E402
import ood  # noqa: E402
import train_speed  # noqa: E402

from conftest import randomize  # noqa: E402
from demoe import TASKS, save_model  # noqa: E402
from demoe.degrade import psf_disk, random_shake_trajectory  # noqa: E402

import quality  # noqa: E402


def radius_of_gyration(psf):
    w = psf / psf.sum()
    yy, xx = np.indices(psf.shape)
    cy, cx = (w * yy).sum(), (w * xx).sum()
    return float(np.sqrt((w * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum()))


def test_ood_cases_are_reproducible_and_held_out():
    a, b = ood.cases(), ood.cases()
    assert len(a) == len(ood.IMAGES) * len(ood.FAMILIES)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.blurry, y.blurry)
        assert x.blurry.shape == x.sharp.shape == (ood.CROP, ood.CROP, 3)
        assert abs(x.psf.sum() - 1) < 1e-5
        assert np.abs(x.blurry - x.sharp).mean() > 1e-3
    assert len({c.psf.tobytes() for c in a}) == len(a)  # every case has its own blur
    # Held out: no reported crop is one of quality.py's central crops; tuning uses other photos.
    for name, y, x in ood.IMAGES:
        if name in quality.IMAGES:
            h, w = ood.photo(name).shape[:2]
            assert (y, x) != ((h - ood.CROP) // 2, (w - ood.CROP) // 2)
    assert not {n for n, *_ in ood.IMAGES} & {n for n, *_ in ood.TUNING_IMAGES}


def test_ood_families_are_outside_the_generators():
    rng = np.random.default_rng(7)
    biggest_disk = radius_of_gyration(psf_disk(6.0, softness=1.5))  # the defocus generator's largest
    for _ in range(10):
        assert radius_of_gyration(ood.FAMILIES["large_defocus"](rng)) > biggest_disk
        line = ood.FAMILIES["linear"](rng)
        yy, xx = np.indices(line.shape)
        w = line / line.sum()
        c = np.cov(np.stack([yy.ravel(), xx.ravel()]), aweights=w.ravel(), bias=True)
        minor, major = np.linalg.eigvalsh(c)
        # A straight 7-25 px line: bilinear splatting spreads it by at most 0.25 px^2 across.
        assert minor <= 0.25 + 1e-6 and 7 <= np.sqrt(12 * major) <= 26
        # The other shake model changes speed along its path; the generators' random walk does not.
        speed = np.linalg.norm(np.diff(ood.smooth_shake_trajectory(rng, 20.0), axis=0), axis=1)
        walk = np.linalg.norm(np.diff(random_shake_trajectory(rng, 20.0), axis=0), axis=1)
        assert speed.std() / speed.mean() > 0.02 and walk.std() / walk.mean() < 1e-6


def test_ood_report_on_a_tiny_model(tmp_path, tiny_model):
    weights = save_model(tiny_model, tmp_path / "tiny.safetensors")
    md, js = tmp_path / "ood.md", tmp_path / "ood.json"
    assert ood.main(["--model", str(weights), "--limit", "1", "--out", str(md), "--json", str(js)]) == 0
    text, result = md.read_text(), json.loads(js.read_text())
    for family in ood.FAMILIES:
        assert f"| {family} |" in text
    assert "**mean (PSNR dB / SSIM)**" in text and "Command: `python benchmarks/ood.py --model" in text
    assert list(result["families"]) == list(ood.FAMILIES) and set(result["auto_gain"]) == {*ood.FAMILIES, "mean"}
    for family, r in result["families"].items():
        assert r["cases"] == 1 and sum(r["routing"].values()) == 1 and set(r["routing"]) <= set(TASKS)
        assert list(r["methods"]) == ood.METHODS and r["methods"]["blurry"]["gain"] == 0
        assert result["tuning"][family]["rl_iterations"] in ood.RL_ITERATIONS
        assert result["tuning"][family]["wiener_balance"] in ood.WIENER_BALANCES
        # Given the true PSF, Richardson-Lucy must really deblur: a wrong PSF or padding would not.
        assert r["methods"]["richardson_lucy"]["gain"] > 0.5, family
    assert result["families"]["gaussian"]["methods"]["richardson_lucy"]["gain"] > 1.0


def test_quality_report_compares_like_with_like_with_tuned_baselines(tmp_path, tiny_model, monkeypatch):
    import _restore

    weights = save_model(tiny_model, tmp_path / "tiny.safetensors")
    settings = {}  # what the run tuned
    tune = quality.tune_classical
    monkeypatch.setattr(quality, "tune_classical", lambda limit=None: settings.update(tune(limit)) or settings)
    assert quality.main(["--model", str(weights), "--limit", "1", "--no-figures", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "quality.md").read_text()
    # One table per kind of degradation, each with the methods made for it.
    pure, no_psf, low = (text.split("## ")[k].split("\n\n")[1] for k in (1, 2, 3))
    assert "Richardson-Lucy | Wiener | unsharp mask |" in pure and "| defocus |" in pure and "| low_light" not in pure
    assert pure.splitlines()[0].count("|") == 8 and no_psf.splitlines()[0].endswith("| unsharp mask |")
    assert "| low_light |" in low and low.splitlines()[0].endswith("| exposure + denoising |")
    assert "Wiener" not in low and "Mean intensity" not in text
    # The settings were chosen on the tuning set, from the grids, and are stated.
    assert {t: set(s) for t, s in settings.items()} == {t: set(m) for t, m in quality.CLASSICAL_FOR.items()}
    for task, chosen in settings.items():
        line = next(line for line in text.split("Classical settings")[1].splitlines() if line.startswith(f"- {task}: "))
        for method, setting in chosen.items():
            assert setting in _restore.CLASSICAL[method][1]
            assert f"{quality.LABELS[method]} {quality.setting_text(method, setting)}" in line
    # Given the true PSF and a tuned setting, Richardson-Lucy really deblurs; the low-light baseline brightens.
    gain = {name: [float(cell.split()[0]) for cell in table.splitlines()[-1].split(" | ")[1:]]
            for name, table in (("pure", pure), ("low", low))}
    assert gain["pure"][3] > 0.5 and gain["low"][3] > 3  # the Richardson-Lucy and exposure + denoising columns
    assert not {name for name, *_ in quality.TUNING_IMAGES} & set(quality.IMAGES)  # tuned on other photographs


def test_compare_weights_on_two_tiny_models(tmp_path, tiny_model, capsys):
    old = str(save_model(tiny_model, tmp_path / "old.safetensors"))
    new = str(save_model(randomize(tiny_model, seed=3), tmp_path / "new.safetensors"))
    js = tmp_path / "cmp.json"
    assert compare_weights.main(["--old", old, "--new", new, "--limit", "1", "--json", str(js)]) == 0  # either verdict
    out = capsys.readouterr().out
    result = json.loads(js.read_text())
    assert result["old"]["ood_gain"] != result["new"]["ood_gain"]  # both weights were measured
    assert set(result["old"]["ood_gain"]) == set(ood.FAMILIES) and set(result["old"]["id_psnr"]) == set(TASKS)
    assert (result["accept"], result["verdict"]) == compare_weights.verdict(result["old"], result["new"])
    assert result["verdict"] in out
    for label in [*(f"OOD {f}: PSNR gain" for f in ood.FAMILIES), "**OOD mean PSNR gain**",
                  *(f"in-distribution {t}: PSNR" for t in TASKS), "**in-distribution mean PSNR**"]:
        assert f"| {label} |" in out


def _figures(ood_gain, **id_psnr):
    return {"ood_mean_gain": ood_gain, "id_psnr": {t: id_psnr.get(t, 25.0) for t in TASKS}}


@pytest.mark.parametrize("new, accepted, says", [
    (_figures(0.6), True, "ACCEPT"),  # +0.1 exactly (0.6 - 0.5 is 0.0999... in floats)
    (_figures(0.599), False, "OOD mean gain changes by +0.099 dB"),
    (_figures(0.45), False, "OOD mean gain changes by -0.050 dB"),
    (_figures(1.5, defocus=24.9), True, "largest in-distribution change is defocus -0.100 dB"),  # drop of 0.1: allowed
    (_figures(1.5, low_light=24.89), False, "more than 0.1 dB: low_light -0.110 dB"),
    (_figures(0.5, local_motion=20.0), False, "changes by +0.000 dB (needs >= +0.1); in-distribution"),
    (_figures(0.7, defocus=30.0, global_motion=24.95), True, "ACCEPT"),  # gains elsewhere do not matter
    (_figures(float("nan")), False, "new weights give figures that are not finite"),  # diverged training
    (_figures(0.7, defocus=float("nan")), False, "not finite numbers"),
    (_figures(float("inf")), False, "not finite numbers"),
])
def test_verdict_boundaries(new, accepted, says):
    ok, why = compare_weights.verdict(_figures(0.5), new)
    assert ok is accepted and says in why
    assert why.startswith("ACCEPT" if accepted else "REJECT")


@pytest.mark.parametrize("script, argv, message", [
    (ood, ["--model", "/no/such/weights.safetensors"], "checkpoint not found"),
    (ood, ["--limit", "0"], "--limit must be at least 1"),
    (ood, ["--device", "tpu9"], "unknown device"),
    (compare_weights, [], "the following arguments are required: --new"),
    (compare_weights, ["--new", "/no/such/weights.safetensors"], "checkpoint not found"),
    (train_speed, ["--photos", "/no/such/folder"], "image folder not found: /no/such/folder"),
    (train_speed, ["--patch", "40"], "--patch must be a multiple of 16"),
    (train_speed, ["--batch", "0"], "--batch must be at least 1, got 0"),
    (train_speed, ["--device", "tpu9"], "unknown device"),
])
def test_bad_arguments_get_one_clear_error(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script, option", [(ood, "--out"), (ood, "--json"), (compare_weights, "--json")])
def test_an_output_folder_is_refused_before_the_work(script, option, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ood, "load", lambda *a: pytest.fail("the model was loaded before the check"))
    with pytest.raises(SystemExit) as exit_:
        script.main(["--new", "x.safetensors", option, str(tmp_path)] if script is compare_weights
                    else [option, str(tmp_path)])
    assert exit_.value.code == 2 and f"{option} {tmp_path} is a folder" in capsys.readouterr().err


def test_a_missing_gpu_is_one_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        ood.main(["--device", "cuda", "--limit", "1"])
    err = capsys.readouterr().err
    assert "device 'cuda' is not available on this machine" in err and "cpu" in err


def test_comparison_json_has_no_nan():
    """A diverged model's figures are written as null: JSON readers refuse NaN."""
    figures = {"old": _figures(0.5), "new": _figures(float("nan"), defocus=float("-inf"))}
    text = json.dumps(compare_weights.json_safe(figures), allow_nan=False)
    assert json.loads(text)["new"]["ood_mean_gain"] is None and json.loads(text)["new"]["id_psnr"]["defocus"] is None
