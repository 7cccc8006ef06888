"""What a release ships: licence, one version, the napari manifest, the sdist's contents."""

import re
import sys
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path

import demoe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_licence_is_mit_and_declared_the_current_way():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]  # SPDX, not the old table
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # superseded by the expression
    setuptools = next(r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    assert re.fullmatch(r"setuptools>=(\d+)", setuptools) and int(setuptools.split(">=")[1]) >= 77


def test_version_is_written_once():
    """pyproject reads demoe.__version__; nothing else in the package or its metadata writes a version."""
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "demoe.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", demoe.__version__)
    written = [p.relative_to(ROOT).as_posix() for p in (ROOT / "src").rglob("*.py")
               if re.search(r"^__version__\s*=\s*['\"]", p.read_text(encoding="utf-8"), re.M)]
    assert written == ["src/demoe/__init__.py"]


def test_napari_manifest_is_one_real_file_inside_the_package():
    """Not a symlink (Git for Windows checks those out as text files that npe2 rejects), and no second copy."""
    manifest = Path(str(resources.files("napari_demoe") / "napari.yaml"))
    assert manifest.is_file() and not manifest.is_symlink()
    assert not (ROOT / "napari.yaml").exists()
    assert list(ROOT.glob("src/**/napari.yaml")) == [ROOT / "src" / "napari_demoe" / "napari.yaml"]
    (entry,) = [e for e in entry_points(group="napari.manifest") if e.name == "napari-demoe"]
    assert entry.value == PYPROJECT["project"]["entry-points"]["napari.manifest"]["napari-demoe"] == \
        "napari_demoe:napari.yaml"


def test_installed_napari_manifest_validates():
    import npe2  # a dependency of the package

    manifest = npe2.PluginManifest.from_distribution("napari-demoe")  # through the installed entry point
    assert manifest.name == "napari-demoe"
    manifest.validate_imports()  # every python_name it points at exists
    widgets = [w.command for w in manifest.contributions.widgets]
    samples = [s.key for s in manifest.contributions.sample_data]
    assert widgets == ["napari-demoe.deblur_widget"] and len(samples) == 4


def _weights_header() -> dict:
    import json

    from safetensors import safe_open

    from demoe.checkpoint import default_weights_path

    with safe_open(str(default_weights_path()), "np") as f:
        return {k: json.loads(v) for k, v in f.metadata().items() if k != "format"}


def test_packaged_weights_state_their_licence_and_training_data():
    header = _weights_header()
    assert header["license"] == PYPROJECT["project"]["license"] == "MIT"
    photos = header["training_data"]["photographs"]
    assert [p["package"] for p in photos] == ["plasma-workspace-wallpapers", "mate-backgrounds", "ukui-wallpapers",
                                              "opencv-doc"]
    assert sum(p["images"] for p in photos) == header["training"]["photos"] == 71  # the training record agrees
    assert {p["license"] for p in photos} == {"GPL-2.0-or-later", "CC-BY-SA-3.0", "Apache-2.0 AND BSD-3-Clause"}
    note = header["license_note"]
    assert "not settled in law" in note and "not legal advice" in note and "share-alike" in note
    # the same packages and licences in the repository's record
    record = (ROOT / "docs" / "training-data.md").read_text(encoding="utf-8")
    for p in photos:
        assert f"| {p['package']} {p['version']} | {p['images']}" in record and p["license"] in record


def test_demoe_info_prints_the_licence(capsys):
    from demoe import cli

    assert cli.main(["info"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "licence: MIT" in out
    assert "30 from plasma-workspace-wallpapers 4:5.27.5-2 (GPL-2.0-or-later)" in out
    assert "9 from ukui-wallpapers 20.04.3-1.1 (CC-BY-SA-3.0)" in out
    assert "This is not legal advice." in out


def _schema_check(schema: str, path: Path) -> None:
    """Validate ``path`` against one of check-jsonschema's bundled schemas (no network)."""
    import subprocess

    run = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_citation_file_is_valid_and_cites_software_and_paper():
    import yaml

    _schema_check("vendor.citation-file-format", ROOT / "CITATION.cff")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["type"] == "software" and cff["version"] == demoe.__version__
    assert cff["license"] == PYPROJECT["project"]["license"]
    assert cff["repository-code"] == PYPROJECT["project"]["urls"]["Source Code"]
    (paper,) = [r for r in cff["references"] if r["type"] == "article"]
    assert paper["title"] == "Towards Unified Image Deblurring using a Mixture-of-Experts Decoder"
    assert paper["doi"] == "10.48550/arXiv.2508.06228"
    assert [a["family-names"] for a in paper["authors"]] == ["Feijoo", "Garrido-Mellado", "Rim", "Garcia", "Conde"]


def test_lint_is_pinned_once_for_ci_and_pre_commit():
    import yaml

    lint = (ROOT / ".ci" / "lint").read_text(encoding="utf-8")
    version = re.search(r"^RUFF_VERSION=(\S+)$", lint, re.M).group(1)
    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8"))["repos"]
    (ruff,) = [h for h in hooks if h["repo"].endswith("/ruff-pre-commit")]
    assert ruff["rev"] == f"v{version}" and [h["id"] for h in ruff["hooks"]] == ["ruff"]
    assert "ruff check" in lint and "--fix" not in lint  # CI checks, it does not rewrite
    selected = PYPROJECT["tool"]["ruff"]["lint"]["select"]
    assert selected == ["E", "F", "W", "UP", "I", "BLE", "B", "A", "C4", "ISC", "G", "PIE", "SIM"]  # the template's
    run = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for script in ("bash .ci/lint", "bash .ci/check-wheel", "bash .ci/check-sdist"):
        assert script in run, script


def _conformance_run(tests: Path, cwd: Path, **env):
    """Run one conformance test of the ``tests`` folder in a fresh pytest with the given environment."""
    import os
    import subprocess

    environ = {k: v for k, v in os.environ.items() if k != "DEMOE_CONFORMANCE"} | env
    test = str(tests / "test_model.py") + "::test_conformance_architecture_read_from_checkpoint"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", test],
                          capture_output=True, text=True, cwd=cwd, env=environ)


def test_conformance_tests_skip_without_their_data_and_fail_when_it_is_named_but_missing(tmp_path):
    import shutil

    missing = _conformance_run(ROOT / "tests", tmp_path, DEMOE_CONFORMANCE=str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "DEMOE_CONFORMANCE names no conformance data" in missing.stdout
    # A copy of the tests with no shared/ beside it, as in an unpacked sdist or on GitHub's runners
    # (which set CI=true: that alone does not demand the data).
    bare = tmp_path / "sdist" / "tests"
    shutil.copytree(ROOT / "tests", bare, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "sdist" / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    skipped = _conformance_run(bare, tmp_path / "sdist", CI="true")
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout and "conformance data not found" in \
        skipped.stdout, skipped.stdout


def test_github_workflow_is_valid_and_runs_the_platforms_tox_declares():
    import configparser

    import yaml

    path = ROOT / ".github" / "workflows" / "test_and_deploy.yml"
    _schema_check("vendor.github-workflows", path)
    jobs = yaml.safe_load(path.read_text(encoding="utf-8"))["jobs"]
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    platforms = dict(line.split(": ") for line in tox["gh-actions:env"]["PLATFORM"].strip().splitlines())
    pythons = dict(line.split(": ") for line in tox["gh-actions"]["python"].strip().splitlines())
    matrix = jobs["test"]["strategy"]["matrix"]
    assert set(matrix["platform"]) == set(platforms) == {"ubuntu-latest", "windows-latest", "macos-latest"}
    classified = {c.rsplit(" ", 1)[1] for c in PYPROJECT["project"]["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert set(matrix["python-version"]) == set(pythons) == classified == {"3.10", "3.11", "3.12"}
    steps = jobs["test"]["steps"]
    (tox_step,) = [s for s in steps if "tox" in str(s.get("with", {}).get("run", ""))]
    assert tox_step["uses"].startswith("aganders3/headless-gui@")  # a virtual display for Qt, as the template
    assert tox_step["env"]["PLATFORM"] == "${{ matrix.platform }}"
    assert [s["run"] for s in jobs["wheel"]["steps"] if "run" in s] == ["bash .ci/check-wheel"]
    assert [s["run"] for s in jobs["lint"]["steps"] if "run" in s] == ["bash .ci/lint"]
    deploy = jobs["deploy"]
    assert set(deploy["needs"]) == {"lint", "test", "wheel"} and deploy["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert deploy["permissions"]["id-token"] == "write"  # trusted publishing: no stored token
    assert deploy["steps"][-1]["uses"] == "pypa/gh-action-pypi-publish@release/v1"
    assert "secrets." not in path.read_text(encoding="utf-8")
