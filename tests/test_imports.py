"""Import isolation: the library never pulls in the GUI, the plugin never pulls in torch."""

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_demoe_imports_no_gui():
    mods = _modules_after("import demoe; demoe.deblur; import demoe.cli, demoe.train, demoe.files")
    assert "torch" in mods and "demoe.api" in mods  # the check itself works
    gui = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui"}
    assert not {m for m in mods if m.split(".")[0] in gui}


def test_napari_demoe_imports_no_torch():
    mods = _modules_after("import napari_demoe")
    assert "napari_demoe" in mods
    assert "torch" not in mods and "demoe" not in mods


def test_degradations_need_no_torch():
    mods = _modules_after("import demoe.degrade")
    assert "demoe.degrade" in mods and "torch" not in mods


def test_command_help_does_not_import_torch():
    """`demoe --help` and `demoe deblur --help` answer at once: torch (a second or more) is left alone."""
    for argv in (["--help"], ["deblur", "--help"], ["info", "--help"], ["export", "--help"],
                 ["export", "onnx", "--help"]):
        code = (f"import sys\nfrom demoe.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
                f"    assert e.code == 0\nprint('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert "usage: demoe" in out and out.split()[-1] == "False", (argv, out)
    # `demoe train --help` does need the trainer, and describes its options
    code = "import sys\nfrom demoe.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--time-limit" in out


def test_array_work_needs_no_torch():
    mods = _modules_after("import demoe._arrays")
    assert "demoe._arrays" in mods and "torch" not in mods
