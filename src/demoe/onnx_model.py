"""A DeMoE exported to ONNX (``demoe export onnx``), run by onnxruntime as ``deblur()`` runs a DeMoE.

``deblur(image, model=session)`` with an ``onnxruntime.InferenceSession`` of
such a file wraps it in :class:`OnnxDeMoE`: the same tiling, dtypes and
routing as with the PyTorch model; the network's arithmetic is onnxruntime's,
on the session's execution providers.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from .tasks import task_index


def is_session(model: Any) -> bool:
    """Whether ``model`` is an onnxruntime ``InferenceSession`` (checked without importing onnxruntime)."""
    return any(c.__module__.startswith("onnxruntime") and c.__name__ == "InferenceSession"
               for c in type(model).__mro__)


class OnnxDeMoE:
    """An onnxruntime session of an exported DeMoE, with the interface ``deblur()`` uses of a :class:`DeMoE`.

    Calls take and return torch tensors, like the model's. Sizes that are not
    multiples of :attr:`padder_size` are padded and cropped here, as
    ``DeMoE.forward`` does. The graph pools globally (no ``pool_window``).
    """

    def __init__(self, session):
        meta = session.get_modelmeta().custom_metadata_map
        inputs = {i.name for i in session.get_inputs()} | {i.name for i in session.get_overridable_initializers()}
        outputs = {o.name for o in session.get_outputs()}
        if "demoe_config" not in meta:
            raise ValueError("this onnxruntime session does not run a DeMoE exported by `demoe export onnx` (its "
                             "model has no demoe_config metadata); export one with demoe.export.export_onnx")
        if not {"image", "task"} <= inputs or not {"restored", "probabilities"} <= outputs:
            raise ValueError(f"this session's model has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
                             "deblur() needs the graph of `demoe export onnx` (inputs image and task, outputs "
                             "restored and probabilities), not a bioimage.io package's")
        self.session = session
        self.config: dict[str, Any] = json.loads(meta["demoe_config"])
        self.img_channel = int(self.config["img_channel"])
        self.num_exp = int(self.config["num_exp"])
        self.top_k = int(meta.get("top_k", 1))
        self.padder_size = int(meta["size_multiple"])
        self.tasks: tuple[str, ...] = tuple(json.loads(meta.get("tasks", "[]")))
        self.metadata: dict[str, Any] = json.loads(meta.get("demoe_metadata", "{}"))
        self.source = self.metadata.get("source")

    def __repr__(self) -> str:
        return f"OnnxDeMoE({self.config}, providers={self.session.get_providers()})"

    def _run(self, x: torch.Tensor, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(restored, probabilities)`` of a batch, under one routing row ``weights`` (None: the router's)."""
        h, w = x.shape[-2:]
        image = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        ph, pw = (-h) % self.padder_size, (-w) % self.padder_size
        if ph or pw:  # zeros below and to the right, as DeMoE pads
            image = np.pad(image, ((0, 0), (0, 0), (0, ph), (0, pw)))
        # The task is always fed: an exported graph may take it as a required input (zeros: the router's choice).
        task = np.zeros((1, self.num_exp), np.float32) if weights is None else weights
        feeds = {"image": image, "task": np.asarray(task, np.float32).reshape(1, self.num_exp)}
        restored, probs = self.session.run(["restored", "probabilities"], feeds)
        return restored[..., :h, :w], probs

    def _check(self, x: torch.Tensor, pool_window: int | None) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.img_channel or min(x.shape) < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected input of shape (N, {self.img_channel}, H, W), got {shape}")
        if pool_window is not None:
            raise ValueError("an exported DeMoE pools globally: pool_window (deblur's tlc) is not available; "
                             "pass tlc=False, or tiles no larger than the window")

    def __call__(self, x: torch.Tensor, task: str | None = None, weights: torch.Tensor | None = None,
                 return_logits: bool = False, pool_window: int | None = None):
        """``DeMoE.forward``: the restored batch (and the router's log-probabilities for ``return_logits``)."""
        self._check(x, pool_window)
        if weights is not None:
            rows = weights.detach().to("cpu", torch.float32).numpy().reshape(-1, self.num_exp)
            if len(rows) not in (1, len(x)):
                raise ValueError(f"weights must have shape ({len(x)}, {self.num_exp}), got {tuple(weights.shape)}")
            rows = np.broadcast_to(rows, (len(x), self.num_exp))
        elif task is not None and task != "auto":
            rows = np.eye(self.num_exp, dtype=np.float32)[[task_index(task, self.tasks, auto=True)] * len(x)]
        else:
            rows = None
        if rows is None or (rows == rows[:1]).all():  # one routing for the batch: one call
            restored, probs = self._run(x, None if rows is None else rows[0])
        else:  # the graph takes one routing row per call
            parts = [self._run(x[i : i + 1], rows[i]) for i in range(len(x))]
            restored, probs = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        out = torch.from_numpy(restored).to(x.device)
        if return_logits:  # log-probabilities: their softmax is the router's probabilities
            with np.errstate(divide="ignore"):
                return out, torch.from_numpy(np.log(probs)).to(x.device)
        return out

    def route(self, x: torch.Tensor, pool_window: int | None = None) -> torch.Tensor:
        """The router's probabilities (N, num_exp). The graph restores the batch too: the whole network runs."""
        self._check(x, pool_window)
        return torch.from_numpy(self._run(x, None)[1]).to(x.device)
