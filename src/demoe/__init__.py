"""DeMoE all-in-one image deblurring: the network, its weights and a numpy API.

Importing ``demoe`` is cheap: torch is imported when a model, the loader or
``deblur`` is first used, so ``demoe.degrade`` and ``demoe.tasks`` work without it.
"""

from importlib import import_module

from .tasks import TASK_LABELS, TASKS

__version__ = "0.1.0"

_LAZY = {
    "DeMoE": "model",
    "CheckpointError": "checkpoint",
    "available_devices": "devices",
    "load_model": "checkpoint",
    "cached_model": "checkpoint",
    "save_model": "checkpoint",
    "deblur": "api",
    "classify_blur": "routing",
}

__all__ = ["TASKS", "TASK_LABELS", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'demoe' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
