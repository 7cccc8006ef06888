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
