"""Loading and saving DeMoE weights.

Published checkpoints are ``torch.save`` pickles of a dict whose ``params``
entry is the state dict; they are read with ``weights_only=True`` so that no
pickled code can ever run. Our own weights are safetensors files whose header
holds the architecture, ``top_k`` and any metadata (training record, input
convention). The architecture is always read back from the parameter names
and shapes, never hard-coded (and checked against the header's record of it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
import sys
import textwrap
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .devices import available_devices, resolve_device  # noqa: F401 - re-exported: demoe.checkpoint's before
from .model import DeMoE

#: Packaged weights, described as data (file inside ``demoe/weights``).
DEFAULT_WEIGHTS = "demoe-compact.safetensors"

_CONFIG_KEY = "demoe_config"
_TOP_K_KEY = "top_k"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be turned into a DeMoE model."""


# -- architecture from a state dict ----------------------------------------------
#: Bounds of an architecture worth building, far above the published DeMoE (width 32, four levels,
#: 28 blocks, five experts, about 60 M parameters): a file claiming more is refused before anything
#: is allocated (a 2 KB file once asked for 7 GB).
ARCH_LIMITS = {"img_channel": 16, "width": 1024, "levels": 8, "blocks": 256, "num_exp": 64}
MAX_PARAMETERS = 1_000_000_000


def _count(keys, pattern: str) -> int:
    """How many indices ``pattern`` captures among ``keys`` (0 if none); they must run 0, 1, ..., n - 1."""
    rx = re.compile(pattern)
    found = sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})
    if found and found[-1] != len(found) - 1:
        gaps = sorted(set(range(found[-1] + 1)) - set(found))
        name = pattern.replace("\\.", ".").replace("(\\d+)", "N")
        raise CheckpointError(f"not a DeMoE state dict: the indices N of {name} do not run 0, 1, 2, ... "
                              f"(found {len(found)} up to {found[-1]}; {len(gaps)} missing, e.g. {gaps[0]})")
    return len(found)


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read DeMoE's constructor arguments from parameter names and shapes."""
    if "intro.weight" not in state_dict:
        raise CheckpointError("not a DeMoE state dict: it has no 'intro.weight' parameter")
    if state_dict["intro.weight"].ndim != 4:
        shape = tuple(state_dict["intro.weight"].shape)
        raise CheckpointError(f"not a DeMoE state dict: 'intro.weight' has shape {shape}, not (width, channels, 3, 3)")
    width, img_channel = state_dict["intro.weight"].shape[:2]
    keys = list(state_dict)
    levels = _count(keys, r"encoders\.(\d+)\.")
    if levels > ARCH_LIMITS["levels"]:  # before each level's blocks are counted
        raise CheckpointError(f"not a DeMoE this package builds: {levels} levels (at most {ARCH_LIMITS['levels']})")
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
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path}: an ONNX graph, not PyTorch weights; onnxruntime runs it: "
                              "deblur(image, model=onnxruntime.InferenceSession(path))")
    if path.suffix == ".safetensors":
        state_dict, header = _read_safetensors(path)
        if _SHARD_KEY in header:
            raise CheckpointError(f"{path} is part {header[_SHARD_KEY]} of split weights: join all the parts first "
                                  "(python -m demoe.checkpoint join PART... -o FILE)")
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


def _check_architecture(config: dict[str, Any], state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Refuse, before anything is allocated, an architecture out of bounds or tensors that do not hold their data."""
    sizes = {"img_channel": [config["img_channel"]], "width": [config["width"]], "num_exp": [config["num_exp"]],
             "blocks": [config["middle_blk_num"], *config["enc_blk_nums"], *config["dec_blk_nums"]]}
    for name, values in sizes.items():
        if any(v > ARCH_LIMITS[name] for v in values):
            raise CheckpointError(f"{origin}: not a DeMoE this package builds: {name} {max(values)} (at most "
                                  f"{ARCH_LIMITS[name]}) in {config}")
    if config["width"] < 1 or config["img_channel"] < 1:
        raise CheckpointError(f"{origin}: not a DeMoE state dict: width {config['width']}, "
                              f"{config['img_channel']} channels")
    for key, t in state_dict.items():  # a broadcast view (stride 0) holds a few numbers for a huge tensor
        if t.numel() and t.untyped_storage().nbytes() < t.numel() * t.element_size():
            raise CheckpointError(f"{origin}: parameter {key} of shape {tuple(t.shape)} does not hold its values "
                                  f"({t.untyped_storage().nbytes()} bytes stored for {t.numel()} numbers)")


def _metadata_int(metadata: dict[str, Any], key: str, default: int, origin: str) -> int:
    """A whole-number metadata field (``top_k``, ``patch_size``), or CheckpointError naming it."""
    value = metadata.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{origin}: metadata field {key!r} must be a positive whole number, got {value!r}")
    return value


def model_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    top_k: int | None = None,
    metadata: dict[str, Any] | None = None,
    origin: str = "state dict",
) -> DeMoE:
    """Build a DeMoE whose architecture matches ``state_dict`` and load it.

    The architecture is checked (bounds, contiguous block indices, every
    parameter's shape, against a model on the ``meta`` device) before the
    model is allocated.
    """
    metadata = dict(metadata or {})
    try:
        config = infer_config(state_dict)
    except CheckpointError as err:
        raise CheckpointError(f"{origin}: {err}") from None
    recorded = metadata.get(_CONFIG_KEY)  # what save_model wrote: the parameters must agree with it
    if recorded is not None and recorded != config:
        raise CheckpointError(f"{origin}: the header records the architecture {recorded}, but the parameters "
                              f"are those of {config}")
    _check_architecture(config, state_dict, origin)
    k = int(top_k) if top_k is not None else _metadata_int(metadata, _TOP_K_KEY, 1, origin)
    if "patch_size" in metadata:
        _metadata_int(metadata, "patch_size", 0, origin)
    if not 1 <= k <= max(config["num_exp"], 1):
        raise ValueError(f"top_k must be between 1 and {config['num_exp']} (the number of experts), got {k}")
    try:
        with torch.device("meta"):  # shapes only: nothing allocated
            skeleton = DeMoE(**config, top_k=k)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{origin}: cannot build DeMoE from {config}: {err}") from err
    parameters = sum(p.numel() for p in skeleton.parameters())
    if parameters > MAX_PARAMETERS:
        raise CheckpointError(f"{origin}: not a DeMoE this package builds: {parameters:,} parameters (at most "
                              f"{MAX_PARAMETERS:,}) in {config}")
    _check_keys(skeleton, state_dict, origin)
    model = DeMoE(**config, top_k=k)
    model.load_state_dict(state_dict)
    model.metadata = metadata
    return model


def training_stages(record: dict | None) -> list[dict]:
    """The stages of a ``training`` metadata record, oldest first.

    A fine-tune's record nests the record of the weights it started from under
    ``init["training"]``; this unnests them.
    """
    stages = []
    while isinstance(record, dict) and record:  # anything else in a file's header is not a record
        stages.append(record)
        init = record.get("init")
        record = init.get("training") if isinstance(init, dict) else None
    return stages[::-1]


def weights_description(metadata: dict[str, Any], record: dict | None = None) -> list[str]:
    """What a weights file's header says about them, in lines: licence, training data, training stages.

    ``record``: the ``training`` record (default: ``metadata["training"]``). ``demoe info`` prints these
    lines; a bioimage.io package's documentation quotes them.
    """
    record = metadata.get("training") if record is None else record
    lines = _licence_lines(metadata)
    for stage in training_stages(record):
        lines += _stage_lines(stage)
    return lines


def _speed(session: dict) -> str:
    """", N patches/s (M steps/s, GPU busy G %)" from a training session's record, or "" without figures."""
    numbers = [session.get(k) for k in ("patches_per_s", "steps_per_s")]
    if not all(isinstance(v, (int, float)) for v in numbers):
        return ""
    gpu = session.get("gpu_util_mean")
    busy = f", GPU busy {gpu:.0f} %" if isinstance(gpu, (int, float)) else ""
    return f", {numbers[0]:.0f} patches/s ({numbers[1]:.2f} steps/s{busy})"


def _licence_lines(meta: dict) -> list[str]:
    """The weights' licence, what they were trained on, and what that implies (when the file says)."""
    lines = [f"licence: {meta['license']}"] if meta.get("license") else []
    data = meta.get("training_data")
    if isinstance(data, dict):
        photos = data.get("photographs")  # a header may hold anything: what is not as written here is left out
        sources = [f"{p.get('images', '?')} from {p.get('package', '?')} {p.get('version', '')} "
                   f"({p.get('license', '?')})"
                   for p in (photos if isinstance(photos, list) else []) if isinstance(p, dict)]
        lines += textwrap.wrap("trained on photographs: " + "; ".join(sources) + f"; {data.get('generated', '')}",
                               width=100, subsequent_indent="  ")
    if meta.get("license_note"):
        lines += textwrap.wrap(f"licence note: {meta['license_note']}", width=100, subsequent_indent="  ")
    return lines


def _stage_lines(record: dict) -> list[str]:
    """One stage of the weights' training record (a fine-tune names the file it started from)."""
    # A record is a file's header: anything may be in it, and what is not as written here is left out.
    init = record.get("init")
    lines = [f"then fine-tuned from {init.get('source')}:"] if isinstance(init, dict) else []
    sessions = record.get("sessions")
    for s in sessions if isinstance(sessions, list) else []:
        if not isinstance(s, dict):
            continue
        seconds = s.get("wall_time_s", 0)
        minutes = f"{seconds / 60:.1f}" if isinstance(seconds, (int, float)) else "?"
        lines.append(f"training: steps {s.get('start_step')}-{s.get('end_step')} on {s.get('hardware')}, "
                     f"{minutes} min{_speed(s)}, started {s.get('started')}")
    if "data" in record:
        lines.append(f"data: {record['data']}")
    elif "photos" in record:
        config = record.get("config") if isinstance(record.get("config"), dict) else {}
        pairs, psfs = config.get("pairs") or [], config.get("psf") or []
        lines.append(f"data: {record['photos']} photographs + dead leaves"
                     + (f" + real pairs {', '.join(map(str, pairs))}" if isinstance(pairs, list) and pairs else "")
                     + (f" + your PSFs {', '.join(map(str, psfs))}" if isinstance(psfs, list) and psfs else ""))
    return lines


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


_models: dict[tuple, DeMoE] = {}  # (what: None, a file's version or a registered key; device) -> model
_registered: dict[str, list] = {}  # key -> [model (on the CPU), registrations]
_loads: dict[tuple[str, str], int] = {}  # (what, device) -> times loaded in this process
_models_lock = threading.Lock()


def _file_version(source: str | Path) -> tuple[str, int, int]:
    """A checkpoint file as the cache knows it: its resolved path, modification time and size (a file rewritten
    since it was loaded is loaded again)."""
    path = checkpoint_file(Path(source).resolve())
    try:
        stat = path.stat()
    except OSError:  # load_model says what is wrong
        return str(path), 0, 0
    return str(path), stat.st_mtime_ns, stat.st_size


def cached_model(source: str | Path | None = None, device: str | torch.device | None = None, *,
                 load: bool = True) -> DeMoE | None:
    """:func:`load_model`, once per file and device: one model object for every caller of the process.

    ``deblur()``'s default model, the napari widget, a script in napari's
    console and ``deblur()``'s dask tasks (once per worker process) share it
    instead of loading copies; a file rewritten since it was loaded is loaded
    again. The model is shared: leave its weights and attributes as they are.
    ``load=False`` returns None for a model not loaded yet (nothing is read).
    """
    dev = resolve_device(device)
    what = None if source is None else _file_version(source)
    key = (what, str(dev))
    with _models_lock:
        if key not in _models and load:
            _models[key] = load_model(source, device=dev)
            _count_load("packaged" if what is None else what[0], dev)
        return _models.get(key)


def _count_load(what: str, device: torch.device) -> None:
    _loads[(what, str(device))] = _loads.get((what, str(device)), 0) + 1


def model_loads() -> dict[tuple[str, str], int]:
    """How many times this process loaded each model, by ``(what, device)``: ``what`` is ``'packaged'``, a
    file's path or a registered key (:func:`register_model`). Once each, where the cache works."""
    with _models_lock:
        return dict(_loads)


def register_model(key: str, build) -> None:
    """Make ``build()``'s model (built once per process, on the CPU) the one :func:`registered_model` gives
    for ``key``; each registration is undone by one :func:`unregister_model`. How a model object passed to
    ``deblur()`` reaches the workers of a dask.distributed cluster (``demoe._cluster``)."""
    with _models_lock:
        entry = _registered.get(key)
        if entry is None:
            model = build().to("cpu").eval()
            _registered[key] = entry = [model, 0]
            _count_load(key, torch.device("cpu"))
        entry[1] += 1


def unregister_model(key: str) -> None:
    """Undo one :func:`register_model`; the last one forgets the model (and its copies on devices)."""
    with _models_lock:
        entry = _registered.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _registered[key]
            for k in [k for k in _models if k[0] == ("registered", key)]:
                del _models[k]


def registered_model(key: str, device: str | torch.device | None = None) -> DeMoE:
    """The model registered as ``key`` in this process, on ``device`` (copied there once); LookupError if none."""
    dev = resolve_device(device)
    with _models_lock:
        entry = _registered.get(key)
        if entry is None:
            raise LookupError(f"model {key} is not on this worker: it is sent to the workers of the dask.distributed "
                              "Client that is active when deblur() is called; call deblur() again with this "
                              "cluster's Client active")
        model = entry[0]
        if dev.type == "cpu":
            return model
        cache_key = (("registered", key), str(dev))
        if cache_key not in _models:
            _models[cache_key] = copy.deepcopy(model).to(dev).eval()
            _count_load(key, dev)
        return _models[cache_key]


def clear_model_cache() -> None:
    """Forget the models :func:`cached_model` loaded (they are loaded again when next asked for) and the
    counts of :func:`model_loads`; registered models stay."""
    with _models_lock:
        for k in [k for k in _models if not (isinstance(k[0], tuple) and k[0][0] == "registered")]:
            del _models[k]
        _loads.clear()


def _header(model: DeMoE, metadata: dict[str, Any]) -> dict[str, str]:
    """The safetensors header of ``model``: its metadata, then ``metadata``, its architecture and ``top_k``."""
    header = {k: json.dumps(v) for k, v in model.metadata.items()}
    header.update({k: json.dumps(v) for k, v in metadata.items()})
    header[_CONFIG_KEY] = json.dumps(model.config)
    header[_TOP_K_KEY] = json.dumps(model.top_k)
    return header


def _cpu_tensors(model: DeMoE) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def model_bytes(model: DeMoE) -> bytes:
    """``model`` as the bytes of a safetensors file (what :func:`save_model` writes), for
    :func:`model_from_bytes`: a model that travels as data, never as pickled code."""
    from safetensors.torch import save

    return save(_cpu_tensors(model), metadata=_header(model, {}))


def model_digest(model: DeMoE) -> str:
    """A hash of ``model``'s weights, architecture and metadata: equal for equal models (unlike
    :func:`model_bytes`, whose header lists the metadata in any order)."""
    digest = hashlib.blake2b(json.dumps(_header(model, {}), sort_keys=True).encode(), digest_size=16)
    return _hash_tensors(digest, _cpu_tensors(model)).hexdigest()


def _hash_tensors(digest, tensors: dict[str, torch.Tensor]):
    """``digest`` (a hashlib object) updated with named tensors: names, dtypes, shapes and bytes, in name order."""
    for name, t in sorted(tensors.items()):
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def model_from_bytes(data: bytes, origin: str = "model bytes") -> DeMoE:
    """The model :func:`model_bytes` wrote, checked and built as :func:`load_model` builds a file's."""
    from safetensors.torch import load

    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        state_dict = load(data)
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise CheckpointError(f"{origin}: not the bytes of a safetensors file ({err})") from err
    metadata = {k: _decode(v) for k, v in header.items() if k != "format"}
    return model_from_state_dict(state_dict, metadata=metadata, origin=origin).eval()


def save_model(model: DeMoE, path: str | Path, **metadata: Any) -> Path:
    """Write ``model`` as safetensors with its architecture and metadata.

    Every metadata value must be JSON-serialisable; it is stored in the file's
    header and returned by :func:`load_model` as ``model.metadata``.
    """
    return _write_safetensors(_cpu_tensors(model), Path(path), _header(model, metadata))


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> Path:
    """Write atomically (a temporary file, then a rename) with ordinary permissions."""
    from safetensors.torch import save_file

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


# -- shards: weights in pieces small enough to travel -------------------------------------
_SHARD_KEY = "shard"
_WHOLE_KEY = "shard_of"  # the SHA-256 of the whole file's tensors, in every shard


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, in name order), whatever file they sit in."""
    return _hash_tensors(hashlib.sha256(), tensors).hexdigest()


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 - no dict
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def _free(dest: Path, overwrite: bool, inputs: list[Path] = ()) -> None:
    """Refuse to write over an input, or over an existing file unless ``overwrite``."""
    if dest.exists() and any(dest.resolve() == p.resolve() for p in inputs):
        raise FileExistsError(f"{dest} is one of the inputs: choose another output file")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists: remove it, choose another name, or pass --overwrite")


def split_weights(path: str | Path, folder: str | Path, max_bytes: int = 15 * 2**20,
                  overwrite: bool = False) -> list[Path]:
    """Cut a safetensors file into shards of at most ``max_bytes`` of tensor data.

    Each shard ``NAME-partKofN.safetensors`` holds whole tensors and the full
    header, plus ``shard: "K/N"`` and the digest of the whole file's tensors;
    :func:`join_weights` puts them back together bit for bit and checks the digest.
    (A GPU round's results come back in files of limited size.)
    """
    path, folder = Path(path), Path(folder)
    if not max_bytes > 0:
        raise ValueError(f"the largest shard must be above 0 bytes, got {max_bytes}")
    tensors, header = _read_safetensors(path)
    if _SHARD_KEY in header:
        raise CheckpointError(f"{path} is already shard {header[_SHARD_KEY]} of a split file")
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if nbytes > max_bytes:
            raise ValueError(f"{path.name}: tensor {name} alone is {nbytes} bytes, over the {max_bytes}-byte limit")
        if size + nbytes > max_bytes and groups[-1]:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    dests = [folder / f"{path.stem}-part{k}of{len(groups)}.safetensors" for k in range(1, len(groups) + 1)]
    for dest in dests:
        _free(dest, overwrite, [path])
    header[_WHOLE_KEY] = tensors_digest(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    return [_write_safetensors(group, dest, {**header, _SHARD_KEY: f"{k}/{len(groups)}"})
            for k, (group, dest) in enumerate(zip(groups, dests), 1)]


def join_weights(shards: list[str | Path], dest: str | Path, overwrite: bool = False) -> Path:
    """Join the shards of :func:`split_weights` into one safetensors file (all of them, any order)."""
    shards, dest = [Path(s) for s in shards], Path(dest)
    _free(dest, overwrite, shards)
    tensors: dict[str, torch.Tensor] = {}
    headers, parts = [], set()
    for shard in shards:
        part_tensors, header = _read_safetensors(shard)
        tensors.update(part_tensors)
        part, _, total = header.pop(_SHARD_KEY, "").partition("/")
        if not part.isdigit() or not total.isdigit():
            raise CheckpointError(f"{shard}: not a shard written by split_weights (no '{_SHARD_KEY}' entry)")
        parts.add((int(part), int(total)))
        headers.append(header)
    totals = {t for _, t in parts}
    if len(totals) != 1 or {p for p, _ in parts} != set(range(1, next(iter(totals)) + 1)) or len(parts) < len(shards):
        raise CheckpointError(f"shards do not make one whole: got parts {sorted(parts)} from {len(shards)} files")
    if any(h != headers[0] for h in headers):
        raise CheckpointError("shards come from different files: their headers differ")
    header = headers[0]
    whole = header.pop(_WHOLE_KEY, None)
    if whole is not None and tensors_digest(tensors) != whole:
        raise CheckpointError("the joined tensors do not match the digest the shards carry: the shards come from "
                              "different files or one is damaged")
    return _write_safetensors(tensors, dest, header)


def main(argv: list[str] | None = None) -> int:
    """``python -m demoe.checkpoint split FILE FOLDER [--max-mib M]`` / ``join SHARD... -o FILE``."""
    import argparse

    prog = "python -m demoe.checkpoint"
    parser = argparse.ArgumentParser(prog=prog, description="Split or join weights files.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="cut a .safetensors file into shards")
    s.add_argument("file")
    s.add_argument("folder")
    s.add_argument("--max-mib", type=float, default=15.0, help="largest shard, MiB of tensor data (default 15)")
    s.add_argument("--overwrite", action="store_true", help="replace shards of the same names in FOLDER")
    j = sub.add_parser("join", help="join shards into one .safetensors file")
    j.add_argument("shards", nargs="+")
    j.add_argument("-o", "--out", required=True)
    j.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            for p in split_weights(args.file, args.folder, int(args.max_mib * 2**20), args.overwrite):
                print(p)
        else:
            print(join_weights(args.shards, args.out, args.overwrite))
    except (CheckpointError, ValueError, OSError) as err:
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
