"""The README's quickstart commands are the ones CI and the examples really use."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_two_commands():
    main_job, tests = _commands()
    assert "demoe deblur examples/blurry -o examples/restored" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci


def test_examples_folder_exists():
    images = sorted(p.name for p in (ROOT / "examples" / "blurry").iterdir())
    assert "clock_motion.png" in images and len(images) >= 5


def _training_stages():
    """The `demoe train` commands of examples/training/train_default.sh, parsed by the trainer's CLI."""
    import shlex

    from demoe.train import build_parser, config_from_args

    script = (ROOT / "examples" / "training" / "train_default.sh").read_text().replace("\\\n", " ")
    stages = []
    for line in script.splitlines():
        if line.startswith("demoe train "):
            argv = shlex.split(line.replace('"$@"', "").replace("$work", "data"))[2:]
            stages.append(config_from_args(build_parser().parse_args(argv)))
    return stages


def test_training_script_is_the_packaged_weights_recipe(monkeypatch):
    """Each stage of the script has the settings the packaged file's training record holds."""
    import json

    from safetensors import safe_open

    from demoe.checkpoint import default_weights_path, training_stages

    monkeypatch.chdir(ROOT)  # the script's --config path is relative to the repository
    stages = _training_stages()
    with safe_open(str(default_weights_path()), "np") as f:
        records = training_stages(json.loads(f.metadata()["training"]))
    assert len(stages) == len(records) >= 2
    for number, (cfg, rec) in enumerate(zip(stages, records), 1):
        recorded = rec["config"]
        for key in ("lr", "patch", "batch", "seed", "router_weight", "warmup", "loss", "photo_fraction"):
            assert getattr(cfg, key) == recorded[key], (number, key)
        assert cfg.ema == (recorded.get("ema") or 0.0), number
        assert (cfg.init is None) == (number == 1)
        if not cfg.fit_to_time:  # a fixed schedule: the recorded one, run to its end
            assert cfg.steps == recorded["steps"] == rec["steps"], number
