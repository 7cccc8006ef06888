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


# -- every block of the README runs as written ---------------------------------------------
README = (ROOT / "README.md").read_text(encoding="utf-8")
SMALL = {  # inputs the README's Python blocks name, made small here (each must still be in the README)
    "data.astronaut()": "data.astronaut()[:48, :64]",
    '("astronaut", "coffee", "chelsea")': '("astronaut",)',
    'Client("tcp://scheduler:8786")': 'Client(n_workers=1, processes=False, dashboard_address=None)',
    '"/shared/in.zarr"': '"in.zarr"',  # written by _small_examples
    '"/shared/out.zarr"': '"out.zarr"',
}


def _small_examples(root: Path) -> None:
    """``root/examples/blurry``: the repository's example images, cropped to 64 px (dtype, channels kept)."""
    import cv2
    import tifffile

    out = root / "examples" / "blurry"
    out.mkdir(parents=True)
    for src in (ROOT / "examples" / "blurry").iterdir():
        if src.suffix == ".tif":
            tifffile.imwrite(out / src.name, tifffile.imread(src)[..., :64, :64])
        else:
            assert cv2.imwrite(str(out / src.name), cv2.imread(str(src), cv2.IMREAD_UNCHANGED)[:64, :64])
    import dask.array as da

    da.from_array(cv2.imread(str(out / "chelsea_camera_shake.jpg")), chunks=(32, 32, 3)).to_zarr(str(root / "in.zarr"))


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys, packaged_onnx):
    """Each ```python block runs, from the repository root as the README's commands do, on small inputs (and
    demoe.onnx there as the README's `demoe export onnx -o demoe.onnx` writes it: conftest's packaged_onnx)."""
    import shutil

    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 3
    for big in SMALL:
        assert big in README, f"{big} is no longer in the README: update SMALL"
    assert "demoe export onnx -o demoe.onnx" in README
    _small_examples(tmp_path)
    shutil.copy(packaged_onnx, tmp_path / "demoe.onnx")
    monkeypatch.chdir(tmp_path)
    for number, block in enumerate(blocks, 1):
        for big, small in SMALL.items():
            block = block.replace(big, small)
        exec(compile(block, f"README.md, python block {number}", "exec"), {"__name__": f"readme_{number}"})
    printed = capsys.readouterr().out.split("\n")
    import demoe

    assert printed[0] in demoe.TASKS  # info["task"]
    assert set(eval(printed[1])) == set(demoe.TASKS)  # info["probabilities"]: all five
    assert (tmp_path / "chelsea_deblurred.jpg").is_file() and (tmp_path / "my_sharp" / "astronaut.png").is_file()
    assert printed[3] in demoe.TASKS  # the exported model's routing, in onnxruntime (after the dask block's dtype)
    assert (tmp_path / "out.zarr").is_dir()  # the dask.distributed block's result


def _shell_commands():
    """Every command line of the README's ```bash blocks (comments and continuation lines joined)."""
    import shlex

    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                if words:
                    yield words


def test_readme_shell_commands_are_real():
    """Each `demoe` command parses with the real command line, and the files it reads are in the repository."""
    from demoe.cli import build_parser

    commands = list(_shell_commands())
    demoe_commands = [words[1:] for words in commands if words[0] == "demoe"]
    assert len(demoe_commands) >= 6
    for argv in demoe_commands:
        args = build_parser(train=argv[0] == "train").parse_args(argv)  # exits (fails here) on a wrong option
        for path in getattr(args, "inputs", []):
            assert (ROOT / path).exists(), path
    other = {words[0] for words in commands if words[0] != "demoe"}
    assert other <= {"pip", "apt-get", "QT_QPA_PLATFORM=offscreen", "napari"}, other


def test_readme_is_short_and_its_links_lead_somewhere():
    assert len(README.encode("utf-8")) <= 15 * 1024  # details go to docs/
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\((?!https?://|#|mailto:)([^)\s]+)\)", text):
            path, _, anchor = target.partition("#")
            assert (page.parent / path).exists(), f"{page.name}: {target}"
            if anchor and path.endswith(".md"):
                headings = re.findall(r"^#+ (.+)$", (page.parent / path).read_text(encoding="utf-8"), re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{page.name}: {target}"
    assert "[CITATION.cff](CITATION.cff)" in README and "[LICENSE](LICENSE)" in README
