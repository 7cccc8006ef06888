"""napari plugin for DeMoE deblurring.

Importing this package never imports torch: the widget imports :mod:`demoe`
(and with it torch) only when it first runs.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # the version is written once, as demoe.__version__, and read by the build
    __version__ = version("napari-demoe")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "unknown"
