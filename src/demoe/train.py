"""Train or fine-tune DeMoE.

Loss: reconstruction (L1 or PSNR loss) on the restored image plus
cross-entropy of the router's logits against the task label, so the
classifier learns to recognise the blur. During training each image is sent
to the expert of its true task (the router is trained by its own loss); at
inference the router chooses. AdamW with a cosine schedule, gradient
clipping, seeded data, checkpoints every ``ckpt_every`` steps that a rerun of
the same command resumes from, and a final safetensors export whose header
holds the training record.

Run ``demoe train --help`` (or ``python -m demoe.train --help``). Options come
from a TOML file (``--config``) and the command line, the latter winning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import RUN_WEIGHTS, checkpoint_file, default_weights_path, model_from_state_dict, read_checkpoint, save_model
from .devices import resolve_device
from .model import ARCHITECTURES, TASKS, DeMoE
from .tasks import task_index


def _opt(default, help: str, group: str, metavar: str | None = None):
    """A TrainConfig field with its ``--help`` text, help group and metavar."""
    meta = {"help": help, "group": group, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


ARCH, DATA, OPTIM, BOOK = ("architecture (ignored when fine-tuning from --init)", "data", "optimisation",
                           "checkpoints, logging and time")


_COMPACT = ARCHITECTURES["compact"]  # the architecture trained by default


@dataclass
class TrainConfig:
    width: int = _opt(_COMPACT["width"], "channels at full resolution", ARCH)
    enc_blk_nums: list[int] = _opt(list(_COMPACT["enc_blk_nums"]), "NAF blocks per encoder level (one level per "
                                   "number)", ARCH, "N")
    middle_blk_num: int = _opt(_COMPACT["middle_blk_num"], "NAF blocks at the bottleneck", ARCH)
    dec_blk_nums: list[int] = _opt(list(_COMPACT["dec_blk_nums"]), "NAF blocks per decoder level", ARCH, "N")
    num_exp: int = _opt(_COMPACT["num_exp"], "experts per MoE block (one per blur type)", ARCH)
    top_k: int = _opt(1, "experts run per image at inference", ARCH)
    init: str | None = _opt(None, "checkpoint to fine-tune from: a published .pt/.pth, a .safetensors, a run "
                            "folder, or 'packaged' for the weights that ship with demoe", ARCH, "FILE")
    freeze_encoder: bool = _opt(False, "train only the decoder, the experts and the router", ARCH)
    router_only: bool = _opt(False, "train only the router (blur classifier), on cross-entropy alone; "
                             "needs --init", ARCH)
    photos: list[str] = _opt([], "folders of sharp photographs, blurred on the fly by demoe.degrade", DATA,
                             "FOLDER")
    pairs: list[str] = _opt([], "real pairs: FOLDER:TASK, where FOLDER holds blurry/ and sharp/ "
                            "with matching file names", DATA, "FOLDER:TASK")
    photo_fraction: float = _opt(0.8, "share of synthetic patches cut from --photos; the rest from "
                                 "procedural dead-leaves images", DATA, "F")
    pair_fraction: float = _opt(0.5, "share of patches from --pairs, when given", DATA, "F")
    psf: list[str] = _opt([], "your own PSF: FILE:TASK, an image of the PSF (e.g. measured on your microscope; "
                          "TIFF, PNG, .npy, FITS) that blurs sharp patches from --photos into pairs of that task",
                          DATA, "FILE:TASK")
    psf_fraction: float = _opt(0.5, "share of patches blurred by --psf, when given", DATA, "F")
    max_side: int | None = _opt(None, "downscale photographs whose longer side exceeds this (pixels)", DATA, "PX")
    data_manifest: str | None = _opt(None, "TSV listing the photographs' sources and licences (columns package, "
                                     "version, licence; examples/training/prepare_photos.sh writes one): summarised "
                                     "in the weights' header with what the licences imply", DATA, "TSV")
    device_data: bool = _opt(False, "make the blurred patches on the training device (demoe.batch_degrade): "
                             "photographs kept in its memory, whole batches degraded there in torch, no "
                             "DataLoader workers; what keeps a GPU busy (--photos and dead leaves only)", DATA)
    patch: int = _opt(128, "training patch size (pixels)", DATA, "PX")
    batch: int = _opt(16, "patches per step", DATA, "N")
    workers: int = _opt(2, "data-loading processes (0: in the training process)", DATA, "N")
    steps: int = _opt(20000, "optimiser steps (the cosine schedule's length)", OPTIM, "N")
    lr: float = _opt(1e-3, "peak learning rate (AdamW)", OPTIM)
    min_lr: float = _opt(1e-6, "learning rate at the end of the cosine schedule", OPTIM)
    weight_decay: float = _opt(1e-3, "AdamW weight decay", OPTIM)
    warmup: int = _opt(200, "steps of linear warm-up", OPTIM, "N")
    grad_clip: float = _opt(0.5, "clip the gradient's norm to this", OPTIM)
    loss: str = _opt("psnr", "reconstruction loss: psnr or l1", OPTIM)
    router_weight: float = _opt(0.1, "weight of the router's cross-entropy against the task label", OPTIM, "W")
    ema: float = _opt(0.0, "decay of an exponential moving average of the weights, exported instead "
                      "(e.g. 0.999; 0: off)", OPTIM)
    amp: str = _opt("none", "mixed precision: none or bf16 (autocast on CUDA)", OPTIM)
    channels_last: bool = _opt(False, "keep activations channels-last (faster convolutions on recent GPUs)", OPTIM)
    seed: int = _opt(0, "seeds the weights, the data and the blur", OPTIM, "N")
    device: str | None = _opt(None, "cpu, cuda, cuda:N or mps (default: the best available)", OPTIM)
    out: str = _opt("runs/demoe", "run folder: last.pt to resume from, model.safetensors at the end; "
                    "rerunning the command resumes", BOOK, "FOLDER")
    ckpt_every: int = _opt(500, "write last.pt every N steps", BOOK, "N")
    time_limit: float | None = _opt(None, "minutes; stop cleanly (and checkpoint) after this (0: none)", BOOK,
                                    "MIN")
    fit_to_time: bool = _opt(False, "shorten --steps so the cosine schedule ends at --time-limit", BOOK)
    log_every: int = _opt(50, "log loss, PSNR gain and routing accuracy every N steps", BOOK, "N")

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        with open(path, "rb") as f:
            data = tomllib.load(f)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown options {sorted(unknown)}")
        return cls(**data)

    def check(self) -> None:
        """Raise ValueError (or FileNotFoundError) naming what is wrong with this configuration.

        Run before anything is created or loaded, so a bad option costs nothing.
        """
        if self.loss not in ("psnr", "l1"):
            raise ValueError(f"loss must be 'psnr' or 'l1', got {self.loss!r}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        resolve_device(self.device)  # a device this machine lacks: one error naming those it has
        for name in ("width", "num_exp", "patch", "batch", "steps", "ckpt_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.batch < 2:
            raise ValueError(f"batch must be at least 2 (batch normalisation in the router needs two patches), "
                             f"got {self.batch}")
        if self.device_data and self.batch < len(TASKS):
            raise ValueError(f"--device-data makes every batch hold each of the {len(TASKS)} tasks: batch must be at "
                             f"least {len(TASKS)}, got {self.batch}")
        if self.seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed}")
        if self.time_limit is not None and not self.time_limit >= 0:
            raise ValueError(f"time_limit must be a number of minutes >= 0 (0: none), got {self.time_limit}")
        if self.fit_to_time and not self.time_limit:
            raise ValueError("fit_to_time ends the schedule at --time-limit: give a time limit above 0 minutes "
                             "(or leave out fit_to_time)")
        if self.workers < 0 or self.warmup < 0:
            raise ValueError(f"workers and warmup must be >= 0, got {self.workers} and {self.warmup}")
        if not 1 <= self.top_k <= self.num_exp:
            raise ValueError(f"top_k must be between 1 and num_exp ({self.num_exp}), got {self.top_k}")
        if not all(0 <= f <= 1 for f in (self.photo_fraction, self.pair_fraction, self.psf_fraction)):
            raise ValueError("photo_fraction, pair_fraction and psf_fraction must be between 0 and 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1) (a decay such as 0.999; 0 turns it off), got {self.ema}")
        if self.device_data and (self.psf or self.pairs):
            raise ValueError("--device-data makes synthetic pairs from --photos only; "
                             "--psf and --pairs need the DataLoader path (leave out --device-data)")
        if self.device_data and self.patch % 16:
            raise ValueError(f"--device-data needs a patch that is a multiple of 16, got {self.patch}")
        if self.router_only and not self.init:
            raise ValueError("router_only needs --init: a router alone cannot be trained on an untrained encoder")
        if self.init and not init_path(self.init).is_file():
            raise FileNotFoundError(f"--init: checkpoint not found: {self.init}"
                                    + (f" (the folder has no {RUN_WEIGHTS})" if Path(self.init).is_dir() else ""))
        for folder in self.photos:
            if not Path(folder).exists():
                raise FileNotFoundError(f"--photos: image folder not found: {folder}")
        if self.data_manifest:  # readable, naming every photograph used, or one clear error now
            licence_note(photo_licences(self.data_manifest, self.photos))
        for spec in self.psf:
            file, _ = _with_task(spec, "--psf", "FILE:TASK (e.g. psf.tif:defocus)")
            if not Path(file).is_file():
                raise FileNotFoundError(f"--psf {spec!r}: file {file} not found")
            from .data import read_psf

            read_psf(file)  # a readable 2-D image with a positive sum, or one clear error now
        for spec in self.pairs:
            folder, _ = _with_task(spec, "--pairs", "FOLDER:TASK")
            for sub in ("blurry", "sharp"):
                if not (Path(folder) / sub).is_dir():
                    raise FileNotFoundError(f"--pairs {spec!r}: folder {Path(folder) / sub} not found")


class TrainingDataError(ValueError):
    """The training images cannot make batches (none readable, none large enough...)."""


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite numbers: nothing worth keeping is written."""


def _with_task(spec: str, option: str, form: str) -> tuple[str, str]:
    """``(path, task)`` of a ``PATH:TASK`` option value, or one clear error."""
    path, _, task = spec.rpartition(":")
    if not path:
        raise ValueError(f"{option} takes {form}, got {spec!r}")
    try:
        task_index(task)
    except ValueError as err:
        raise ValueError(f"{option} {spec!r}: {err}") from None
    return path, task


def psnr_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative PSNR (dB), averaged over the batch (as in NAFNet's PSNRLoss)."""
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(mse + 1e-8).mean()


def batch_psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) of a batch, as a 0-d tensor (read it with ``float()`` when needed: that waits for the GPU)."""
    mse = (pred.clamp(0, 1) - target).pow(2).flatten(1).mean(1)
    return (-10 * torch.log10(mse + 1e-10)).mean()


def batch_losses(model: DeMoE, cfg: TrainConfig, blurry, sharp, label, expert_slices=None):
    """``(loss, cross-entropy, router logits, restored batch or None)`` for one batch.

    Each image is restored by its true task's expert; the router learns from
    its own cross-entropy. With ``router_only`` there is no decoder pass (the
    router reads the encoder's bottleneck) and the loss is the cross-entropy.
    ``expert_slices`` (expert, start, stop) says where each task's rows are when
    the batch is grouped by task, as the device stream's are.
    """
    if cfg.router_only:
        logits = model.route_logits(blurry)
        ce = F.cross_entropy(logits.float(), label)
        return ce, ce, logits, None
    pred, logits = model(blurry, weights=F.one_hot(label, model.num_exp).float(), return_logits=True,
                         expert_slices=expert_slices)
    ce = F.cross_entropy(logits.float(), label)
    pred = pred.float()
    rec = psnr_loss(pred, sharp) if cfg.loss == "psnr" else F.l1_loss(pred, sharp)
    return rec + cfg.router_weight * ce, ce, logits, pred


def init_path(init: str) -> Path:
    """The file ``--init`` names: 'packaged' is the packaged weights, a run folder its model.safetensors."""
    if init == "packaged" and not Path(init).exists():
        return default_weights_path()
    return checkpoint_file(init)


def build_model(cfg: TrainConfig) -> tuple[DeMoE, dict]:
    """The model to train and the metadata of the checkpoint it starts from (if any)."""
    if cfg.init:
        state_dict, metadata = read_checkpoint(init_path(cfg.init))
        return model_from_state_dict(state_dict, top_k=cfg.top_k, metadata={}, origin=cfg.init), metadata
    return DeMoE(_COMPACT["img_channel"], cfg.width, cfg.middle_blk_num, cfg.enc_blk_nums, cfg.dec_blk_nums,
                 cfg.num_exp, cfg.top_k), {}


def build_data(cfg: TrainConfig):
    from .data import PairFolder, PsfPairs, SyntheticPairs, load_photos, read_psf

    photos = load_photos(cfg.photos, cfg.max_side) if cfg.photos else []
    stream = SyntheticPairs(photos, cfg.patch, photo_fraction=cfg.photo_fraction, seed=cfg.seed)
    if cfg.psf:
        by_task: dict[str, list] = {}
        for spec in cfg.psf:
            file, task = _with_task(spec, "--psf", "FILE:TASK")
            by_task.setdefault(task, []).append(read_psf(file))
        psf_streams = [PsfPairs(photos, psfs, task, cfg.patch, photo_fraction=cfg.photo_fraction, seed=cfg.seed,
                                stream=k) for k, (task, psfs) in enumerate(by_task.items())]
        stream = _mixed(stream, psf_streams, cfg.psf_fraction, cfg.seed)
    if cfg.pairs:
        pair_streams = [PairFolder(*_with_task(spec, "--pairs", "FOLDER:TASK"), cfg.patch, cfg.seed)
                        for spec in cfg.pairs]
        stream = _mixed(stream, pair_streams, cfg.pair_fraction, cfg.seed)
    return stream, len(photos)


def training_batches(cfg: TrainConfig, device: torch.device) -> tuple[Iterator, int, list | None]:
    """Endless ``(blurry, sharp, label)`` batches on ``device``, the number of photos, and the expert slices.

    With ``device_data`` the batches are made on the device itself
    (:class:`demoe.batch_degrade.DeviceBatches`), grouped by task in the same
    ``(expert, start, stop)`` slices every time; otherwise DataLoader workers run
    the numpy generators, the batches are copied over, and the slices are None.
    """
    if cfg.device_data:
        from .batch_degrade import DeviceBatches
        from .data import load_photos

        photos = load_photos(cfg.photos, cfg.max_side) if cfg.photos else []
        stream = DeviceBatches(photos, cfg.patch, cfg.batch, device=device, photo_fraction=cfg.photo_fraction,
                               seed=cfg.seed)
        return iter(stream), stream.n_photos, stream.slices
    dataset, n_photos = build_data(cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)
    moved = ((t.to(device, non_blocking=True) for t in batch) for batch in loader)
    return (tuple(batch) for batch in moved), n_photos, None


def gpu_utilisation(device: torch.device) -> int | None:
    """The GPU's busy percentage over the last sample period (NVML), or None where it cannot be read."""
    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - no NVML (nvidia-ml-py), no permission...: not worth stopping a run
        return None


class Throughput:
    """Patches and steps per second over the run, from the first timed step on (the warm-up excluded)."""

    def __init__(self, batch: int, patch: int, device: torch.device, warmup: int = 5):
        self.batch, self.patch, self.device, self.warmup = batch, patch, device, warmup
        self.seen = 0
        self.t0 = self.steps = None
        self.gpu: list[int] = []

    def step(self) -> None:
        self.seen += 1
        if self.seen == self.warmup:
            self._sync()
            self.t0, self.steps = time.perf_counter(), 0
        elif self.t0 is not None:
            self.steps += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sample_gpu(self) -> None:
        util = gpu_utilisation(self.device)
        if util is not None:
            self.gpu.append(util)

    def summary(self) -> dict:
        """steps/s, patches/s, the same in 128 px patches, and the mean GPU utilisation sampled."""
        if not self.steps:
            return {}
        self._sync()
        seconds = time.perf_counter() - self.t0
        steps = self.steps / seconds
        out = {"steps_per_s": round(steps, 3), "patches_per_s": round(steps * self.batch, 1),
               "patches128_per_s": round(steps * self.batch * (self.patch / 128) ** 2, 1),
               "timed_steps": self.steps, "timed_s": round(seconds, 1)}
        if self.gpu:
            out["gpu_util_mean"] = round(float(np.mean(self.gpu)), 1)
        return out

    def line(self) -> str:
        s = self.summary()
        if not s:
            return ""
        gpu = f", GPU busy {s['gpu_util_mean']:.0f} %" if "gpu_util_mean" in s else ""
        return (f"{s['steps_per_s']:.2f} steps/s, {s['patches_per_s']:.0f} patches/s of {self.patch} px "
                f"({s['patches128_per_s']:.0f}/s of 128 px){gpu}")


def _mixed(stream, extra: list, fraction: float, seed: int):
    """``stream`` with ``extra`` streams mixed in: ``fraction`` of the samples, shared equally among them."""
    from .data import Mixed

    return Mixed([stream, *extra], [1 - fraction] + [fraction / len(extra)] * len(extra), seed)


def _sigterm_as_interrupt():
    """Take SIGTERM (a scheduler's or ``timeout``'s stop) like Ctrl-C, so the run saves last.pt first."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads, torch {torch.__version__}"


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) training; returns the path of the exported safetensors."""
    cfg.check()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "last.pt"

    model, init_meta = build_model(cfg)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.freeze_encoder or cfg.router_only:
        prefixes = ("mlp_branch.",) if cfg.router_only else ("experts.", "mlp_branch.", "ups.", "decoders.", "ending.")
        for name, p in model.named_parameters():
            if not name.startswith(prefixes):
                p.requires_grad_(False)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(trained.values())
    # On CUDA one fused kernel updates every parameter (instead of several launches per tensor).
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.9),
                            fused=device.type == "cuda" or None)

    # The moving average of the trained parameters, from their initial values; frozen
    # parameters and buffers (batch-norm statistics) are taken from the model on export.
    ema = {name: p.detach().clone() for name, p in trained.items()} if cfg.ema else None

    step, record = 0, {"wall_time_s": 0.0, "sessions": []}
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["params"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            saved = state.get("ema", state["params"])
            ema = {name: saved[name].to(device) for name in ema}
        step, record = int(state["step"]), json.loads(state["record"])
        fitted = record.get("fitted_steps")
        if cfg.fit_to_time and isinstance(fitted, int) and step <= fitted < cfg.steps:
            # The schedule was fitted to the time of the run's first session: keep it, so that
            # resuming does not start the learning rate again at its peak.
            cfg = dataclasses.replace(cfg, steps=fitted)
            print(f"keeping the schedule fitted to {fitted} steps", file=sys.stderr)
        print(f"resumed from {ckpt_path} at step {step}", file=sys.stderr)

    if ema is not None:  # the averages and the live parameters, in the same order
        ema_pairs = ([ema[n] for n in trained], [p.detach() for p in trained.values()])
    # A resumed run draws fresh (but still seeded) data: the seed includes the step.
    data_cfg = dataclasses.replace(cfg, seed=cfg.seed * 1_000_003 + step)
    try:
        it, n_photos, slices = training_batches(data_cfg, device)
    except (ValueError, OSError) as err:  # the photographs themselves: as much the user's input as an option
        hint = f" (--max-side {cfg.max_side} shrinks them first)" if cfg.max_side and "px" in str(err) else ""
        raise TrainingDataError(f"{err}{hint}") from err
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN pick its fastest kernels

    def save_checkpoint():
        """Write last.pt, with this session's record brought up to the current step."""
        session["end_step"] = step
        session["wall_time_s"] = time.time() - t0
        record["wall_time_s"] = sum(s.get("wall_time_s", 0.0) for s in record["sessions"])
        record["steps"] = step
        session.update(speed.summary())
        state = {"params": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "record": json.dumps(record), "config": json.dumps(dataclasses.asdict(cfg))}
        if ema is not None:
            state["ema"] = ema
        torch.save(state, out / "last.tmp")
        (out / "last.tmp").replace(ckpt_path)

    if cfg.init and "init" not in record:
        # Keep the history of the weights we start from (a fine-tune's full record).
        record["init"] = {"source": init_path(cfg.init).name, "training": init_meta.get("training")}
    session = {"start_step": step, "hardware": hardware(), "device": str(device),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    record["sessions"].append(session)
    record["photos"] = n_photos
    speed = Throughput(cfg.batch, cfg.patch, device)
    t0 = time.time()
    model.train()
    try:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, disable=not progress, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None
    running = []
    # Steps timed for fit_to_time, in the run's first session only (a resumed run keeps its schedule).
    probe = (20, 120) if session["start_step"] == 0 else (-1, -1)
    previous_sigterm = _sigterm_as_interrupt()
    try:
        while step < cfg.steps:
            elapsed = time.time() - t0
            if cfg.time_limit and elapsed > cfg.time_limit * 60:
                print(f"time limit reached at step {step}", file=sys.stderr)
                break
            if step == probe[0]:
                t_probe = time.time()
            if cfg.fit_to_time and cfg.time_limit and step == probe[1]:
                rate = (probe[1] - probe[0]) / (time.time() - t_probe)
                fitted = step + int(rate * (cfg.time_limit * 60 - elapsed) * 0.97)
                if fitted < cfg.steps:
                    cfg = dataclasses.replace(cfg, steps=fitted)
                    record["fitted_steps"] = fitted
                    if bar is not None:
                        bar.total = fitted
                    print(f"{rate:.2f} steps/s: schedule fitted to {fitted} steps", file=sys.stderr, flush=True)
            blurry, sharp, label = next(it)
            if cfg.channels_last:
                blurry = blurry.contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            with autocast:
                loss, ce, logits, pred = batch_losses(model, cfg, blurry, sharp, label, slices)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():  # one foreach call, not one kernel per tensor
                    torch._foreach_lerp_(*ema_pairs, 1 - cfg.ema)
            step += 1
            speed.step()
            # Kept as tensors until a log line needs them: reading a number waits for the GPU.
            with torch.no_grad():
                acc = (logits.argmax(1) == label).float().mean()
                gain = torch.zeros((), device=device) if pred is None else \
                    batch_psnr(pred.detach(), sharp) - batch_psnr(blurry.float(), sharp)
                running.append(torch.stack([gain, ce.detach().float(), acc]))
            if step % cfg.log_every == 0 or step == cfg.steps:
                gain, ce_m, acc_m = torch.stack(running).mean(0).tolist()
                running.clear()
                last_loss = float(loss.detach())
                if not (math.isfinite(gain) and math.isfinite(last_loss)):
                    raise TrainingDiverged(f"training diverged at step {step} (loss {last_loss}, gain "
                                           f"{gain}): no weights written; try a lower --lr or --grad-clip")
                speed.sample_gpu()
                shown = "" if cfg.router_only else f" gain {gain:+.2f} dB"  # no restoration to score
                msg = f"step {step} loss {last_loss:.3f}{shown} ce {ce_m:.3f} route-acc {acc_m:.2f}"
                if speed.summary() and not progress:
                    msg += f" | {speed.line()}"
                if bar is not None:
                    bar.set_postfix_str(msg.split(" ", 2)[2])
                if not progress:
                    print(msg, file=sys.stderr, flush=True)
            if bar is not None:
                bar.update(1)
            if step % cfg.ckpt_every == 0:
                save_checkpoint()
    except KeyboardInterrupt:  # Ctrl-C: keep every finished step, then let the caller stop
        if bar is not None:
            bar.close()
        save_checkpoint()
        print(f"interrupted at step {step}: saved {ckpt_path}; run the same command again to resume",
              file=sys.stderr)
        raise
    finally:
        _restore_sigterm(previous_sigterm)
    if bar is not None:
        bar.close()
    final = list(ema.values()) if ema is not None else params
    if not bool(torch.stack([torch.isfinite(p).all() for p in final]).all()):
        raise TrainingDiverged(f"the weights hold NaN or infinite values at step {step}: no weights written; "
                               "try a lower --lr or --grad-clip")
    save_checkpoint()
    if speed.summary():
        print(f"throughput: {speed.line()}", file=sys.stderr, flush=True)
    # deblur() sizes its tiles from the patch the restoration was trained on; training the
    # router alone (on any patch size) does not change it.
    patch = int(init_meta.get("patch_size") or cfg.patch) if cfg.router_only else cfg.patch
    if ema is not None:
        model.load_state_dict({**model.state_dict(), **ema})  # last.pt keeps the raw weights for resuming
    return export(model, out / RUN_WEIGHTS, cfg, record, patch, init_meta)


def export(model: DeMoE, path: Path, cfg: TrainConfig, record: dict, patch: int, init_meta: dict | None = None) -> Path:
    """Write the trained weights with config, input convention, training patch and record.

    The licence of the weights started from goes with them; with a ``data_manifest``
    the header also says what the weights were learned from and what its licences imply.
    """
    model = model.eval()
    init_meta = init_meta or {}
    licence = {k: init_meta[k] for k in ("license", "license_note", "training_data") if k in init_meta}
    if cfg.data_manifest:
        data = photo_licences(cfg.data_manifest, cfg.photos)
        if "training_data" in init_meta:
            data["fine_tuned_from"] = init_meta["training_data"]
        # Weights trained from scratch take the code's licence; fine-tuned ones keep what they started from.
        name = init_meta.get("license", "unknown") if cfg.init else "MIT"
        licence.update(license=name, training_data=data,
                       license_note=licence_note(data, name, init_meta.get("license_note")))
    return save_model(
        model, path,
        input_convention={"color": "RGB", "range": [0.0, 1.0], "dtype": "float32", "layout": "NCHW"},
        patch_size=patch,
        training={**record, "config": dataclasses.asdict(cfg), "tasks": list(TASKS)},
        **licence,
    )


_SHARE_ALIKE = ("GPL", "-SA", "GFDL")  # licence names whose terms pass on to derived works


def photo_licences(manifest: str | Path, photos: Sequence[str | Path] | None = None) -> dict:
    """The ``training_data`` record of a photographs manifest: images and licences per package.

    With ``photos`` (the folders training reads), the record counts the manifest's
    rows whose file is there (same name and, where the manifest has one, same
    SHA-256), and an image in those folders that the manifest does not list is an
    error: its licence would be unknown, and the header would claim images that
    were not used.
    """
    import csv
    import hashlib
    from collections import Counter

    option = f"--data-manifest {manifest}"
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as err:
        raise FileNotFoundError(f"--data-manifest: cannot read {manifest} ({err.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{option}: not a UTF-8 tab-separated file ({err})") from None
    if not rows or not {"package", "version", "licence"} <= set(rows[0]):
        raise ValueError(f"{option}: expected a TSV with columns package, version and licence "
                         "(as examples/training/prepare_photos.sh writes)")
    if photos is not None:
        if not photos:
            raise ValueError(f"{option} describes training photographs, but no --photos are given")
        if "file" not in rows[0]:
            raise ValueError(f"{option}: a column 'file' is needed to match the manifest with --photos")
        from .data import list_images

        listed = {row["file"]: row for row in rows}
        used, unknown, changed = [], [], []
        for folder in photos:
            for path in list_images([folder]):
                name = path.name if Path(folder).is_file() else path.relative_to(folder).as_posix()
                row = listed.get(name)
                if row is None:
                    unknown.append(name)
                elif row.get("sha256") and hashlib.sha256(path.read_bytes()).hexdigest() != row["sha256"]:
                    changed.append(name)
                else:
                    used.append(row)
        for what, names in (("does not list", unknown), ("lists other contents for", changed)):
            if names:
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                raise ValueError(f"{option} {what} {len(names)} of the images in --photos ({shown}): their "
                                 "licences are unknown. Give the manifest written with those images, or leave out "
                                 "--data-manifest")
        rows = used
    packages: dict[tuple[str, str], Counter] = {}
    for row in rows:
        packages.setdefault((row["package"], row["version"]), Counter())[row["licence"].strip() or "unknown"] += 1
    return {"photographs": [{"package": p, "version": v, "images": sum(c.values()),
                             "license": "; ".join(f"{name} ({n})" for name, n in c.most_common()),
                             "licenses": dict(c.most_common())}
                            for (p, v), c in packages.items()],
            "manifest": Path(manifest).name, "generated": "procedural dead-leaves images"}


def licence_note(data: dict, licence: str = "MIT", earlier: str | None = None) -> str:
    """What the licences of the training photographs imply for weights offered under ``licence``, in plain words."""
    from collections import Counter

    counts: Counter = Counter()
    for package in data["photographs"]:
        counts.update(package["licenses"])
    shared = {k: n for k, n in counts.items() if any(s in k.upper() for s in _SHARE_ALIKE)}
    unknown = counts.get("unknown", 0)
    total, n_shared = sum(counts.values()), sum(shared.values())
    offered = ("The licence of these weights is not stated" if licence in (None, "", "unknown")
               else f"The weights are offered under the {licence} licence")
    note = (f"{offered}. They were learned from {total} photographs (listed with their sources and licences in "
            f"{data['manifest']}) and from generated images; no image, or part of one, is in this file. "
            f"{total - n_shared - unknown} of the photographs are public domain or under permissive licences; "
            f"{n_shared} are under share-alike licences"
            + (" (" + ", ".join(f"{k} {n}" for k, n in counts.most_common() if k in shared) + ")" if shared else "")
            + (f"; {unknown} have no licence stated" if unknown else "") + ". ")
    if shared:
        note += ("Whether weights learned from images are a derivative work of those images is not settled in law. "
                 f"If they are not, the {licence or 'stated'} licence is all that applies; if they are, the "
                 "share-alike terms (attribution, and passing the weights on only under those licences) would also "
                 "bind these weights and models fine-tuned from them. ")
    note += "This is not legal advice."
    if earlier:
        note += " The weights these were fine-tuned from say: " + earlier
    return note


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="demoe train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", metavar="TOML", help="TOML file with any of the options below "
                        "(names with underscores); the command line wins")
    groups = {}  # help sections, in the order of TrainConfig's fields
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["group"] not in groups:
            groups[f.metadata["group"]] = parser.add_argument_group(f.metadata["group"])
        group = groups[f.metadata["group"]]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default in (None, []) or isinstance(default, bool) else f" (default: {default})"
        kw = dict(default=None, help=f.metadata["help"] + shown)
        if f.metadata["metavar"]:
            kw["metavar"] = f.metadata["metavar"]
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            group.add_argument(flag, nargs="*", type=int if f.name.endswith("nums") else str, **kw)
        else:
            kind = {"time_limit": float, "max_side": int}.get(f.name) or {int: int, float: float}.get(type(default), str)
            group.add_argument(flag, type=kind, **kw)
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(cfg, **overrides)


def run_from_args(args: argparse.Namespace) -> int:
    # Configuration errors get one line; errors once training runs keep their traceback.
    try:
        cfg = config_from_args(args)
        cfg.check()
    except (ValueError, TypeError, OSError) as err:
        print(f"demoe train: error: {err}", file=sys.stderr)
        return 2
    try:
        path = train(cfg, progress=not args.no_progress and sys.stderr.isatty())  # a log gets plain lines
    except TrainingDataError as err:
        print(f"demoe train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"demoe train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # train() saved last.pt and said how to resume
        return 130
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
