"""The DeMoE network (Feijoo et al., 2025): a NAFNet U-Net whose decoder is a
mixture of experts, routed by a blur-type classifier.

Read top to bottom like the paper's figure: the NAF block, the mixture-of-experts
block, the router, then the network. Parameter names and shapes follow the
published checkpoints exactly (see ``docs/architecture.md``).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .tasks import TASKS, task_index

#: Named architectures: DeMoE's constructor arguments (experts per image aside), the one place
#: they are written. "published": the paper's network (about 60 M parameters), the constructor's
#: defaults. "compact": the packaged weights' network, and what ``demoe train`` builds by default.
ARCHITECTURES: Mapping[str, Mapping[str, Any]] = {
    "published": {"img_channel": 3, "width": 32, "middle_blk_num": 1, "enc_blk_nums": (1, 1, 1, 28),
                  "dec_blk_nums": (1, 1, 1, 1), "num_exp": 5},
    "compact": {"img_channel": 3, "width": 16, "middle_blk_num": 2, "enc_blk_nums": (1, 1, 2, 4),
                "dec_blk_nums": (1, 1, 1, 1), "num_exp": 5},
}
_PUBLISHED = ARCHITECTURES["published"]


def architecture_name(config: Mapping[str, Any]) -> str | None:
    """The name in :data:`ARCHITECTURES` of a ``DeMoE.config``, or None for any other architecture."""
    given = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()}
    for name, arch in ARCHITECTURES.items():
        if given == {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}:
            return name
    return None


class LayerNorm2d(nn.Module):
    """Layer norm over the channel axis at every pixel (biased variance)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # Channels last: the channels of a pixel are adjacent, so one fused kernel does it.
            y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + self.eps)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them (2c -> c)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two slices, not x.chunk(2): the same views, but exported to ONNX as Slice, where chunk becomes
        # SplitToSequence, which OpenCV's dnn cannot read.
        c = x.shape[1] // 2
        return x[:, :c] * x[:, c:]


def local_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over a ``size`` x ``size`` window around every pixel (edges replicated).

    Integral images make it O(1) per pixel whatever the window. When the map
    is no bigger than the window, this is the global mean, as in training.
    """
    h, w = x.shape[-2:]
    if size >= h and size >= w:
        return x.mean(dim=(-2, -1), keepdim=True)
    kh, kw = min(size, h), min(size, w)
    dtype = x.dtype
    x = F.pad(x.float(), ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2), mode="replicate")
    # Centre each channel first: the running sums stay small, so float32 is exact enough.
    centre = x.mean(dim=(-2, -1), keepdim=True)
    s = F.pad((x - centre).cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    box = s[..., kh:, kw:] - s[..., :-kh, kw:] - s[..., kh:, :-kw] + s[..., :-kh, :-kw]
    return (box / (kh * kw) + centre).to(dtype)


def local_mean_coarse(x: torch.Tensor, size: int, cells: int = 16) -> torch.Tensor:
    """:func:`local_mean` computed on a grid about ``cells`` times coarser than the window.

    The map is averaged over ``s x s`` cells (``s`` the largest power of two
    dividing both sides, at most ``size / cells``), box-filtered there exactly,
    and brought back by bilinear interpolation. A 192 px window's mean changes
    slowly, so this differs little from the exact filter but costs a few
    elementwise passes instead of two cumulative sums over the full map.
    """
    h, w = x.shape[-2:]
    if size >= h and size >= w:
        return x.mean(dim=(-2, -1), keepdim=True)
    s = 1
    while 2 * s * cells <= size and h % (2 * s) == 0 and w % (2 * s) == 0:
        s *= 2
    if s == 1:
        return local_mean(x, size)
    small = local_mean(F.avg_pool2d(x, s), max(1, round(size / s)))
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


class NAFBlock(nn.Module):
    """The NAFNet block (Chen et al., 2022) on ``c`` channels.

    ``forward(u, pool)``: a ``pool`` window (pixels at this block's level; None,
    the default, pools globally) switches the channel attention's global average
    to a local window mean of that size: the test-time local converter of Chu et
    al., 2022 ("Improving Image Restoration by Revisiting Global Information
    Aggregation"), see ``DeMoE.forward(pool_window=...)``.
    """

    def __init__(self, c: int):
        super().__init__()
        self.norm1 = LayerNorm2d(c)
        self.conv1 = nn.Conv2d(c, 2 * c, 1)
        self.conv2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.gate = SimpleGate()
        # Simplified channel attention: global average pool, then a 1x1 conv.
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.conv3 = nn.Conv2d(c, c, 1)
        self.norm2 = LayerNorm2d(c)
        self.conv4 = nn.Conv2d(c, 2 * c, 1)
        self.conv5 = nn.Conv2d(c, c, 1)
        # Zero residual scales: a fresh block is the identity.
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, u: torch.Tensor, pool: int | None = None) -> torch.Tensor:
        t = self.gate(self.conv2(self.conv1(self.norm1(u))))
        if pool is None:
            t = t * self.sca(t)
        else:
            t = t * self.sca[1](local_mean_coarse(t, pool))
        y = u + self.conv3(t) * self.beta
        z = self.gate(self.conv4(self.norm2(y)))
        return y + self.conv5(z) * self.gamma


class NAFStage(nn.Module):
    """A chain of NAF blocks (``modules_list`` in the checkpoint)."""

    def __init__(self, c: int, num_blocks: int):
        super().__init__()
        self.modules_list = nn.ModuleList(NAFBlock(c) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, pool: int | None = None) -> torch.Tensor:
        for block in self.modules_list:
            x = block(x, pool)
        return x


class MoEBlock(nn.Module):
    """``num_exp`` NAF blocks mixed by per-image routing weights.

    Only the top ``k`` experts of every image are used, their weights
    renormalised to sum to one. An expert that carries no weight for any image
    of the batch is not run at all; an expert is run only on the images that
    chose it. ``dense=True`` runs every expert on every image and sums them,
    weighted: the same result with tensor operations only, no choice made in
    Python from the data (what tracing and ONNX export need), at the cost of
    running all the experts.
    """

    def __init__(self, c: int, num_exp: int):
        super().__init__()
        self.experts = nn.ModuleList(NAFBlock(c) for _ in range(num_exp))

    def forward(self, x: torch.Tensor, mix: torch.Tensor,
                expert_slices: Sequence[tuple[int, int, int]] | None = None, pool: int | None = None,
                dense: bool = False) -> torch.Tensor:
        # ``mix`` is the (N, num_exp) matrix of renormalised top-k weights,
        # zero where an expert was not chosen (see ``DeMoE.mixing_weights``).
        if expert_slices is not None:  # rows [start, stop) go to one expert, whole: no weights to look up
            return torch.cat([self.experts[e](x[start:stop], pool) for e, start, stop in expert_slices])
        if dense:
            weights = mix.to(x.dtype)[:, :, None, None, None]  # (N, num_exp, 1, 1, 1)
            out = weights[:, 0] * self.experts[0](x, pool)
            for e in range(1, len(self.experts)):
                out = out + weights[:, e] * self.experts[e](x, pool)
            return out
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(mix[:, e] > 0).flatten()
            if rows.numel() == 0:
                continue
            w = mix[rows, e].to(x.dtype).view(-1, 1, 1, 1)
            if rows.numel() == x.shape[0]:
                out = out + w * expert(x, pool)
            else:
                out = out.index_add(0, rows, w * expert(x[rows], pool))
        return out


class Router(nn.Module):
    """The blur-type classifier (``mlp_branch``): bottleneck features -> logits."""

    def __init__(self, in_channels: int, num_exp: int, hidden: int = 256, fc: int = 128):
        super().__init__()
        self.conv_bottleneck = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.2),
        )
        self.attention = nn.Sequential(nn.Conv2d(hidden, 1, 1), nn.Sigmoid())
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(hidden, fc),
            nn.BatchNorm1d(fc),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(fc, num_exp),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv_bottleneck(x)
        # The one-channel attention map expanded to f's channels first: the same product, but OpenCV's
        # dnn (5.0) computes a product broadcast across channels wrongly (found exporting to ONNX).
        f = f * self.attention(f).expand_as(f)
        return self.classifier(f)


class DeMoE(nn.Module):
    """DeMoE: all-in-one deblurring with a mixture of decoder experts.

    Parameters
    ----------
    img_channel : int
        Image channels in and out (3 for the published model).
    width : int
        Channels after the intro convolution; level ``i`` has ``width * 2**i``.
    middle_blk_num : int
        NAF blocks at the bottleneck.
    enc_blk_nums, dec_blk_nums : sequence of int
        NAF blocks per encoder / decoder level (same length ``L``).
    num_exp : int
        Number of experts in every MoE block (the published model: 5, one per
        entry of :data:`TASKS`).
    top_k : int
        Experts used per image (top-k of the routing weights). ``k_used``, the
        published code's name for it, is accepted with a DeprecationWarning.

    The defaults are the ``"published"`` architecture;
    ``DeMoE(**ARCHITECTURES["compact"])`` builds the packaged weights' one.

    Attributes
    ----------
    config : dict
        The architecture (the constructor's arguments but ``top_k``).
    metadata : dict
        What the weights' file records (training patch, training record...);
        empty for a model built here.
    source : str or None
        The file the weights were loaded from.

    Notes
    -----
    ``model(x, task=None)`` restores a batch ``(N, C, H, W)`` of any size.
    ``task`` None or ``"auto"`` routes each image by the classifier; a task name
    forces that expert for every image.
    """

    def __init__(
        self,
        img_channel: int = _PUBLISHED["img_channel"],
        width: int = _PUBLISHED["width"],
        middle_blk_num: int = _PUBLISHED["middle_blk_num"],
        enc_blk_nums: Sequence[int] = _PUBLISHED["enc_blk_nums"],
        dec_blk_nums: Sequence[int] = _PUBLISHED["dec_blk_nums"],
        num_exp: int = _PUBLISHED["num_exp"],
        top_k: int = 1,
        *,
        k_used: int | None = None,
    ):
        super().__init__()
        if k_used is not None:
            warnings.warn("DeMoE(k_used=...) is now DeMoE(top_k=...)", DeprecationWarning, stacklevel=2)
            top_k = k_used
        if len(enc_blk_nums) != len(dec_blk_nums):
            raise ValueError(
                f"enc_blk_nums and dec_blk_nums must have the same length, "
                f"got {list(enc_blk_nums)} and {list(dec_blk_nums)}"
            )
        if not 1 <= top_k <= num_exp:
            raise ValueError(f"top_k must be in 1..{num_exp} (num_exp), got {top_k}")
        self.config = dict(
            img_channel=int(img_channel),
            width=int(width),
            middle_blk_num=int(middle_blk_num),
            enc_blk_nums=[int(n) for n in enc_blk_nums],
            dec_blk_nums=[int(n) for n in dec_blk_nums],
            num_exp=int(num_exp),
        )
        self.top_k = int(top_k)
        self.metadata: dict[str, Any] = {}
        self.source: str | None = None
        self.img_channel = int(img_channel)
        self.num_exp = int(num_exp)
        levels = len(enc_blk_nums)
        self.padder_size = 2**levels

        self.intro = nn.Conv2d(img_channel, width, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch = width
        for n in enc_blk_nums:
            self.encoders.append(NAFStage(ch, n))
            self.downs.append(nn.Conv2d(ch, 2 * ch, 2, stride=2))
            ch *= 2
        self.middle_blks = NAFStage(ch, middle_blk_num)
        self.mlp_branch = Router(ch, num_exp)

        self.experts = nn.ModuleList([MoEBlock(ch, num_exp)])
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for n in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(ch, 2 * ch, 1, bias=False), nn.PixelShuffle(2)))
            ch //= 2
            self.decoders.append(NAFStage(ch, n))
            self.experts.append(MoEBlock(ch, num_exp))
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)

    @property
    def k_used(self) -> int:
        """Deprecated name of :attr:`top_k`."""
        warnings.warn("DeMoE.k_used is now DeMoE.top_k", DeprecationWarning, stacklevel=2)
        return self.top_k

    @k_used.setter
    def k_used(self, value: int) -> None:
        warnings.warn("DeMoE.k_used is now DeMoE.top_k", DeprecationWarning, stacklevel=2)
        self.top_k = value

    @property
    def architecture(self) -> str | None:
        """The name of this model's architecture in :data:`ARCHITECTURES`, or None."""
        return architecture_name(self.config)

    # -- routing ----------------------------------------------------------
    def task_index(self, task: str | None) -> int | None:
        """Expert index of ``task``; None for automatic routing."""
        if task is None or task == "auto":
            return None
        return task_index(task, TASKS[: self.num_exp], auto=True)

    def mixing_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """Keep the top ``top_k`` routing weights of every row, renormalised."""
        top, idx = probs.topk(self.top_k, dim=1)
        top = top / top.sum(dim=1, keepdim=True)
        return torch.zeros_like(probs).scatter(1, idx, top)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of shape (N, {self.img_channel}, H, W), got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != self.img_channel:
            raise ValueError(
                f"expected input of shape (N, {self.img_channel}, H, W), got {tuple(x.shape)}"
            )
        if min(x.shape) < 1:
            raise ValueError(f"input has an empty axis: shape {tuple(x.shape)}")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph = (-h) % self.padder_size
        pw = (-w) % self.padder_size
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def _pools(self, window: int | None) -> list[int | None]:
        """The pooling window of each level, 0 (full resolution) to L (the bottleneck): ``window``
        input pixels divided by the level's downsampling factor; None everywhere for global pooling."""
        if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
            raise ValueError(f"pool_window must be a window size in input pixels (> 0) or None, got {window!r}")
        levels = len(self.encoders) + 1
        return [None if window is None else max(1, round(window / 2**i)) for i in range(levels)]

    def _encode(self, x: torch.Tensor, pools: list[int | None]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.intro(x)
        skips = []
        for encoder, down, pool in zip(self.encoders, self.downs, pools):
            x = encoder(x, pool)
            skips.append(x)
            x = down(x)
        return x, skips

    def route_logits(self, x: torch.Tensor, pool_window: int | None = None) -> torch.Tensor:
        """Router logits (N, num_exp) for an image batch (``pool_window``: as in :meth:`forward`)."""
        self._check_input(x)
        bottleneck, _ = self._encode(self._pad(x), self._pools(pool_window))
        return self.mlp_branch(bottleneck)

    def route(self, x: torch.Tensor, pool_window: int | None = None) -> torch.Tensor:
        """Routing weights (N, num_exp): the softmax of the router's logits."""
        return self.route_logits(x, pool_window).softmax(dim=1)

    # -- forward -------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        task: str | None = None,
        weights: torch.Tensor | None = None,
        return_logits: bool = False,
        expert_slices: Sequence[tuple[int, int, int]] | None = None,
        pool_window: int | None = None,
    ):
        """Restore a batch.

        Parameters
        ----------
        x : Tensor (N, C, H, W)
            Images scaled to [0, 1].
        task : str or None
            None/"auto" routes by the classifier; a name in :data:`TASKS` forces
            that expert.
        weights : Tensor (N, num_exp), optional
            Routing weights to use instead of the router's (for example, one set
            estimated for a whole image and shared by all its tiles).
        return_logits : bool
            Also return the router's logits (for training).
        expert_slices : sequence of (expert, start, stop), optional
            For training on a batch grouped by task: rows ``start:stop`` go to
            ``expert``, and the slices cover the batch in order. The same as
            one-hot ``weights`` for those rows, without reading the weights back
            from the device (which stops a GPU's queue at every MoE block).
        pool_window : int, optional
            The test-time local converter (Chu et al., 2022): the channel
            attention averages over a window of this many input pixels (each
            level gets it divided by its downsampling factor) instead of the
            whole input, so an input larger than the training patches sees the
            statistics the network was trained on. None (default): the
            published global pooling. An option of the call, not of the model:
            concurrent calls on one model may use different windows.
        """
        self._check_input(x)
        forced = self.task_index(task)
        h, w = x.shape[-2:]
        inp = self._pad(x)
        pools = self._pools(pool_window)
        y, skips = self._encode(inp, pools)

        logits = None
        if weights is not None:
            probs = weights.to(device=y.device, dtype=torch.float32)
            if probs.shape != (x.shape[0], self.num_exp):
                raise ValueError(f"weights must have shape ({x.shape[0]}, {self.num_exp}), got {tuple(probs.shape)}")
        elif forced is not None:
            probs = torch.zeros(x.shape[0], self.num_exp, device=y.device)
            probs[:, forced] = 1.0
        if return_logits or (weights is None and forced is None):
            logits = self.mlp_branch(y)
        if weights is None and forced is None:
            probs = logits.float().softmax(dim=1)
        mix = self.mixing_weights(probs)

        if expert_slices is not None:
            expert_slices = [(int(e), int(a), int(b)) for e, a, b in expert_slices]
            covered = [i for _, a, b in expert_slices for i in range(a, b)]
            if covered != list(range(x.shape[0])) or not all(0 <= e < self.num_exp for e, _, _ in expert_slices):
                raise ValueError(f"expert_slices must cover rows 0..{x.shape[0] - 1} in order with experts "
                                 f"0..{self.num_exp - 1}, got {expert_slices}")
        out = (self.ending(self._decode(y, skips, mix, pools, expert_slices)) + inp)[..., :h, :w]
        if return_logits:
            return out, logits
        return out

    def _decode(self, y: torch.Tensor, skips: list[torch.Tensor], mix: torch.Tensor, pools: list[int | None],
                expert_slices: Sequence[tuple[int, int, int]] | None = None, dense: bool = False) -> torch.Tensor:
        """The bottleneck and the decoder, each level's experts mixed by ``mix``."""
        levels = len(self.decoders)
        y = self.middle_blks(y, pools[levels])
        y = self.experts[0](y, mix, expert_slices, pools[levels], dense)
        for i, (up, decoder) in enumerate(zip(self.ups, self.decoders)):
            y = up(y) + skips[-1 - i]
            pool = pools[levels - 1 - i]
            y = decoder(y, pool)
            y = self.experts[i + 1](y, mix, expert_slices, pool, dense)
        return y

    # -- forward with tensor operations only (tracing, ONNX export) ---------------------
    def task_weights(self, task: str, n: int = 1) -> torch.Tensor:
        """The routing weights (``n``, num_exp) that force ``task``'s expert: one-hot rows."""
        index = self.task_index(task)
        weights = torch.zeros(n, self.num_exp)
        if index is not None:
            weights[:, index] = 1.0
        return weights

    def forward_dense(
        self, x: torch.Tensor, task: torch.Tensor | None = None, pool_window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Restore a batch with tensor operations only: ``(restored, probabilities)``.

        The result of :meth:`forward` (to float rounding), computed without a
        choice made in Python from the data: the router always runs, the task
        is a tensor, and the top-k mixing runs every expert on every image,
        weighted (zero weight for the experts not chosen). What tracing and
        ONNX export need (:mod:`demoe.export`); about twice the work of
        :meth:`forward` for the packaged model, which stays the fast path.

        Parameters
        ----------
        x : Tensor (N, C, H, W)
            Images scaled to [0, 1].
        task : Tensor (N, num_exp) or (1, num_exp), optional
            Routing weights for each image (one row: for all of them). A row of
            zeros lets the router choose; a one-hot row forces that expert
            (:meth:`task_weights`); any other row is mixed like the router's
            probabilities (its top ``top_k``, renormalised). None: all zeros.
        pool_window : int, optional
            As for :meth:`forward`.

        Returns
        -------
        restored : Tensor (N, C, H, W)
        probabilities : Tensor (N, num_exp)
            The router's probabilities (the softmax of its logits), float32,
            also where ``task`` forced an expert.
        """
        self._check_input(x)
        h, w = x.shape[-2:]
        inp = self._pad(x)
        pools = self._pools(pool_window)
        y, skips = self._encode(inp, pools)
        probs = self.mlp_branch(y).float().softmax(dim=1)
        weights = probs
        if task is not None:
            if not isinstance(task, torch.Tensor) or task.ndim != 2 or task.shape[1] != self.num_exp \
                    or task.shape[0] not in (1, x.shape[0]):
                shape = tuple(task.shape) if isinstance(task, torch.Tensor) else type(task).__name__
                raise ValueError(f"task must be a tensor of routing weights of shape ({x.shape[0]}, {self.num_exp}) "
                                 f"or (1, {self.num_exp}), got {shape}")
            given = task.to(probs).expand_as(probs)
            weights = torch.where(given.sum(dim=1, keepdim=True) > 0, given, probs)  # a row of zeros: the router's
        mix = self.mixing_weights(weights)
        out = (self.ending(self._decode(y, skips, mix, pools, dense=True)) + inp)[..., :h, :w]
        return out, probs
