"""DeMoE all-in-one image deblurring: the network, its weights and a numpy API."""

from .checkpoint import CheckpointError, available_devices, load_model, save_model
from .model import TASKS, DeMoE

__version__ = "0.1.0"

__all__ = ["TASKS", "DeMoE", "CheckpointError", "available_devices", "load_model", "save_model", "__version__"]

from .api import deblur  # noqa: E402

__all__ += ["deblur"]
