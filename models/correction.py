"""The warp corrector (not in the paper): fixes what flow cannot carry from the key frame.

A warped key frame cannot open a mouth that was closed at the key, and it drifts on eyes and lips
as the gap grows. This small network looks at the current crop itself, at the key crop warped by
the same flow (where the two disagree, the warp failed) and at the warped key scores, and adds a
residual to those scores. It sees the crops at half N's input (128²; or N's full 256² through
two stride-2 convolutions, ``image_size = 4 * grid_size``) and works on N's stride-4 score grid
(64²): a stride-2 stem, a 1x1 fusion with the warped class probabilities, then
residual dilated 3x3 blocks. Its last layer starts at zero, so an untrained corrector returns the
warped scores unchanged. Classes in ``config.protect`` are left to the warp: no residual on their
scores, and on pixels the warp assigns to them or within ``protect_margin`` grid cells of them the
other classes' residuals may only be negative (``protect_grow``; or are zero without it), so the
upsampled mask of a protected class contains the warp's: it may grow, never shrink.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facestream.models.config import CorrectionConfig
from facestream.models.warp import warp


def _conv(inputs: int, outputs: int, kernel: int, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel, stride, padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


def warp_image(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """(B, 3, I, I) key crop warped by (B, 2, h, w) grid-pixel flow, upsampled to I x I."""
    size = image.shape[-1]
    field = F.interpolate(flow, size=(size, size), mode="bilinear", align_corners=False)
    return warp(image, field * (size / flow.shape[-1]))


class WarpCorrector(nn.Module):
    """(current crop, key crop, flow, warped key scores) -> corrected scores (see module doc)."""

    def __init__(self, config: CorrectionConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CorrectionConfig()
        width, classes = config.width, config.num_classes
        if config.image_size == 2 * config.grid_size:
            self.stem = _conv(6, width, 3, stride=2)
        else:  # full-resolution crops: two stride-2 convolutions down to the score grid
            self.stem = nn.Sequential(
                _conv(6, width // 2, 3, stride=2), _conv(width // 2, width, 3, stride=2)
            )
        self.fuse = _conv(width + classes, width, 1)
        self.blocks = nn.ModuleList(_conv(width, width, 3, dilation=d) for d in config.dilations)
        self.head = nn.Conv2d(width, classes, 1)
        nn.init.zeros_(self.head.weight)
        assert self.head.bias is not None
        nn.init.zeros_(self.head.bias)
        keep = torch.ones(1, classes, 1, 1)
        keep[:, list(config.protect)] = 0.0
        self.register_buffer("keep", keep, persistent=False)  # 0 on the protected classes' scores

    def forward(
        self, current: torch.Tensor, key: torch.Tensor, flow: torch.Tensor, scores: torch.Tensor
    ) -> torch.Tensor:
        """``current``, ``key``: (B, 3, I, I) crops in [0, 1] (I = image_size); ``flow``:
        (B, 2, G, G) current -> key in grid pixels; ``scores``: (B, K, G, G) the warped key
        scores. Returns (B, K, G, G)."""
        cfg = self.config
        image, grid = (cfg.image_size,) * 2, (cfg.grid_size,) * 2
        if current.shape[1:] != (3, *image) or key.shape != current.shape:
            raise ValueError(
                f"WarpCorrector expects current and key crops (B, 3, {cfg.image_size}, {cfg.image_size}), "
                f"got {tuple(current.shape)} and {tuple(key.shape)}"
            )
        if flow.shape[1:] != (2, *grid) or scores.shape[1:] != (cfg.num_classes, *grid):
            raise ValueError(
                f"WarpCorrector expects flow (B, 2, {cfg.grid_size}, {cfg.grid_size}) and scores "
                f"(B, {cfg.num_classes}, {cfg.grid_size}, {cfg.grid_size}), got {tuple(flow.shape)} "
                f"and {tuple(scores.shape)}"
            )
        x = self.stem(torch.cat((current, warp_image(key, flow)), dim=1))
        x = self.fuse(torch.cat((x, scores.softmax(dim=1)), dim=1))
        for block in self.blocks:
            x = x + block(x)
        residual = self.head(x)
        if cfg.protect:
            residual = residual * self.keep
            warped = scores.argmax(dim=1, keepdim=True)
            guarded = torch.zeros_like(warped, dtype=residual.dtype)
            for c in cfg.protect:
                guarded = torch.maximum(guarded, (warped == c).to(residual.dtype))
            if cfg.protect_margin:
                m = cfg.protect_margin
                guarded = F.max_pool2d(guarded, 2 * m + 1, stride=1, padding=m)
            kept = residual * (1 - guarded)
            if cfg.protect_grow:  # in the zone, other classes may only lose: eyes grow, never shrink
                kept = kept + residual.clamp(max=0.0) * guarded
            residual = kept
        return scores + residual
