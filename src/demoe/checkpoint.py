"""Loading and saving DeMoE weights.

Published checkpoints are ``torch.save`` pickles of a dict whose ``params``
entry is the state dict; they are read with ``weights_only=True`` so that no
pickled code can ever run. Our own weights are safetensors files whose header
holds the architecture, ``top_k`` and any metadata (training record, input
convention). The architecture is always read back from the parameter names
and shapes, never hard-coded.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .model import DeMoE

#: Packaged weights, described as data (file inside ``demoe/weights``).
DEFAULT_WEIGHTS = "demoe-compact.safetensors"

_CONFIG_KEY = "demoe_config"
_TOP_K_KEY = "top_k"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be turned into a DeMoE model."""


# -- devices --------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> cuda if available, else mps, else cpu."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from err


def available_devices() -> list[str]:
    """Devices this machine can run on, best first."""
    found = []
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


# -- architecture from a state dict ----------------------------------------------
def _count(keys, pattern: str) -> int:
    """1 + the largest integer captured by ``pattern`` among ``keys`` (0 if none)."""
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(found) + 1 if found else 0


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read DeMoE's constructor arguments from parameter names and shapes."""
    if "intro.weight" not in state_dict:
        raise CheckpointError("not a DeMoE state dict: it has no 'intro.weight' parameter")
    width, img_channel = state_dict["intro.weight"].shape[:2]
    keys = list(state_dict)
    levels = _count(keys, r"encoders\.(\d+)\.")
    return dict(
        img_channel=int(img_channel),
        width=int(width),
        middle_blk_num=_count(keys, r"middle_blks\.modules_list\.(\d+)\."),
        enc_blk_nums=[_count(keys, rf"encoders\.{i}\.modules_list\.(\d+)\.") for i in range(levels)],
        dec_blk_nums=[_count(keys, rf"decoders\.{i}\.modules_list\.(\d+)\.") for i in range(levels)],
        num_exp=_count(keys, r"experts\.0\.experts\.(\d+)\."),
    )


# -- reading files ----------------------------------------------------------------
def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


RUN_WEIGHTS = "model.safetensors"  # what a training run exports into its folder


def checkpoint_file(path: str | Path) -> Path:
    """The file a checkpoint path names: a training run folder stands for its exported weights."""
    path = Path(path)
    return path / RUN_WEIGHTS if path.is_dir() else path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``(state_dict, metadata)`` from a ``.pt``/``.pth``/``.safetensors`` file or a run folder.

    Never unpickles anything but tensors and plain containers.
    """
    given, path = Path(path), checkpoint_file(path)
    if given.is_dir() and not path.is_file():
        raise FileNotFoundError(f"{given} is a folder without {RUN_WEIGHTS}: give a checkpoint file "
                                f"(a training run writes {RUN_WEIGHTS} when it ends; last.pt holds the "
                                "weights while it runs)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
        metadata = {k: _decode(v) for k, v in header.items() if k != "format"}
        return _strip_prefix(state_dict), metadata

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # the pickle names a class or function to call
            raise CheckpointError(
                f"{path}: not a plain-tensor checkpoint; it holds objects that loading would have "
                "to execute, so it was refused (only tensors and plain containers are accepted)"
            ) from err
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or another format)") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
    if isinstance(obj, dict) and isinstance(obj.get("params"), dict):
        obj = obj["params"]  # published format; epoch/optimizer/... ignored
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: expected a state dict or a dict with a 'params' state dict, got {type(obj).__name__}"
        )
    return _strip_prefix(obj), {}


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def _check_keys(model: DeMoE, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{k}: file {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        lines = [f"{origin}: the parameters do not fit the DeMoE architecture {model.config}"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"{title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))


def model_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    top_k: int | None = None,
    metadata: dict[str, Any] | None = None,
    origin: str = "state dict",
) -> DeMoE:
    """Build a DeMoE whose architecture matches ``state_dict`` and load it."""
    metadata = dict(metadata or {})
    config = infer_config(state_dict)
    k = int(top_k if top_k is not None else metadata.get(_TOP_K_KEY, 1))
    if not 1 <= k <= max(config["num_exp"], 1):
        raise ValueError(f"top_k must be between 1 and {config['num_exp']} (the number of experts), got {k}")
    try:
        model = DeMoE(**config, k_used=k)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{origin}: cannot build DeMoE from {config}: {err}") from err
    _check_keys(model, state_dict, origin)
    model.load_state_dict(state_dict)
    model.metadata = metadata
    return model


def training_stages(record: dict | None) -> list[dict]:
    """The stages of a ``training`` metadata record, oldest first.

    A fine-tune's record nests the record of the weights it started from under
    ``init["training"]``; this unnests them.
    """
    stages = []
    while record:
        stages.append(record)
        record = (record.get("init") or {}).get("training")
    return stages[::-1]


def default_weights_path() -> Path:
    """Path of the packaged default weights (may not exist in a source checkout)."""
    return Path(str(resources.files("demoe") / "weights" / DEFAULT_WEIGHTS))


def load_model(
    source: str | Path | None = None,
    *,
    top_k: int | None = None,
    device: str | torch.device | None = None,
) -> DeMoE:
    """Load a DeMoE model, in eval mode, on ``device``.

    Parameters
    ----------
    source : path or None
        A published-format ``.pt``/``.pth`` checkpoint (a dict with ``params``,
        ``module.`` prefixes allowed, other entries ignored), a bare state-dict
        file, a ``.safetensors`` file written by :func:`save_model`, or a
        training run folder (its ``model.safetensors``). None loads the
        packaged default weights.
    top_k : int, optional
        Experts used per image. Default: the file's metadata, else 1 (the
        published configuration).
    device : str or torch.device, optional
        None -> cuda if available, else mps, else cpu.

    Raises
    ------
    CheckpointError
        The file is not a plain-tensor checkpoint, or its parameters do not form
        a DeMoE (the message lists the missing, unexpected or mis-shaped keys).
    FileNotFoundError
        ``source`` does not exist, or no default weights are packaged.
    """
    if source is None:
        source = default_weights_path()
        if not source.is_file():
            raise FileNotFoundError(
                "this installation has no packaged default weights "
                f"({source}); pass a checkpoint instead: demoe.load_model('path/to/DeMoE.pt')"
            )
    state_dict, metadata = read_checkpoint(source)
    model = model_from_state_dict(state_dict, top_k=top_k, metadata=metadata, origin=str(source))
    model.source = str(source)
    return model.to(resolve_device(device)).eval()


def save_model(model: DeMoE, path: str | Path, **metadata: Any) -> Path:
    """Write ``model`` as safetensors with its architecture and metadata.

    Every metadata value must be JSON-serialisable; it is stored in the file's
    header and returned by :func:`load_model` as ``model.metadata``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    header = {k: json.dumps(v) for k, v in getattr(model, "metadata", {}).items()}
    header.update({k: json.dumps(v) for k, v in metadata.items()})
    header[_CONFIG_KEY] = json.dumps(model.config)
    header[_TOP_K_KEY] = json.dumps(model.k_used)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; a saved model is an ordinary file
    tmp.replace(path)
    return path


def _umask() -> int:
    """The process's file-creation mask."""
    try:  # Linux: read without changing it, so other threads never see another mask
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.M).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0o022)  # elsewhere: set it and put it back
        os.umask(mask)
        return mask
