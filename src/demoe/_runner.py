"""The network on batches of tiles: precision, CUDA out-of-memory halving, tile streams, self-ensemble."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .devices import PRECISIONS
from .model import DeMoE

_FLIPS = [(), (-1,), (-2,), (-1, -2)]  # view k flips these axes (after transposing, for k >= 4)


def _view(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th of the eight flips/transposes of an (N, C, H, W) batch (0 is ``x``)."""
    if k >= 4:
        x = x.transpose(-1, -2)
    flips = _FLIPS[k % 4]
    return x.flip(flips) if flips else x


def _unview(y: torch.Tensor, k: int) -> torch.Tensor:
    """Undo :func:`_view`: flips are their own inverses, applied before the transpose."""
    flips = _FLIPS[k % 4]
    y = y.flip(flips) if flips else y
    return y.transpose(-1, -2) if k >= 4 else y


class Runner:
    """Runs the model on float32 tile batches; halves the batch on CUDA out-of-memory.

    With neither a task nor fixed weights every tile is routed on its own, and
    its routing probabilities are appended to ``record``. With ``ensemble`` > 1
    the network also restores flipped/transposed copies of every tile, routed as
    the tile itself, and the results are averaged. ``window`` is the network's
    pooling window (``DeMoE.forward(pool_window=...)``).
    """

    def __init__(self, model: DeMoE, device: torch.device, task: str | None, weights: torch.Tensor | None,
                 record: list | None = None, precision: str = "fp32", pool: ThreadPoolExecutor | None = None,
                 streams: int = 1, ensemble: int = 1, window: int | None = None):
        self.model, self.device, self.task, self.weights = model, device, task, weights
        self.ensemble, self.window = ensemble, window
        self.autocast = PRECISIONS[precision]  # None: plain float32
        self.record = record if task is None and weights is None else None
        self.pool, self.streams = pool, streams  # tile streams: each batch is split among the pool's threads

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.pool is not None and len(batch) > 1:
            groups = self.pool.map(self._run_halving, np.array_split(batch, min(len(batch), self.streams)))
            return self._collect([part for group in groups for part in group])
        return self._collect(self._run_halving(batch))

    def _run_halving(self, batch: np.ndarray) -> list:
        """Run ``batch`` in chunks, halving the chunk on CUDA out-of-memory; one part per chunk."""
        start = 0
        outs = []
        step = len(batch)
        while start < len(batch):
            chunk = batch[start : start + step]
            try:
                outs.append(self._run(chunk))
                start += len(chunk)
            except torch.cuda.OutOfMemoryError:
                if step == 1:
                    raise MemoryError("out of GPU memory even for one tile; "
                                      "pass a smaller tile_size or device='cpu'") from None
                step = max(1, step // 2)
                torch.cuda.empty_cache()
                warnings.warn(f"CUDA out of memory; retrying with {step} tile(s) per batch", RuntimeWarning,
                              stacklevel=2)
        return outs

    def _collect(self, parts: list) -> np.ndarray:
        """Concatenate ``(output, routing probabilities)`` parts, recording the latter in tile order."""
        if self.record is not None:
            for _, probs in parts:
                self.record.extend(probs)
        return np.concatenate([out for out, _ in parts])

    @torch.inference_mode()
    def _run(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.from_numpy(chunk).to(self.device)
        w = None if self.weights is None else self.weights.expand(len(chunk), -1)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            if self.record is None:
                y, probs = self.model(x, task=self.task, weights=w, pool_window=self.window), None
            else:
                y, logits = self.model(x, return_logits=True, pool_window=self.window)
                w = logits.float().softmax(dim=1)  # the other views take this tile's routing
                probs = w.cpu().numpy()
            if self.ensemble > 1:
                y = y.float()
                for k in range(1, self.ensemble):
                    y += _unview(self.model(_view(x, k), task=self.task, weights=w, pool_window=self.window), k).float()
                y /= self.ensemble
        return y.float().cpu().numpy(), probs
