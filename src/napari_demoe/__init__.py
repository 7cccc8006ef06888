"""napari plugin for DeMoE deblurring.

Importing this package never imports torch: the widget imports :mod:`demoe`
(and with it torch) only when it first runs.
"""

__version__ = "0.1.0"
