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
