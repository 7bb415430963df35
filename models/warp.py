"""Deep Feature Flow propagation ``W(f_k, M, S)`` (torch reference implementation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_grid(height: int, width: int, *, device=None, dtype=None) -> torch.Tensor:
    """(1, 2, H, W) pixel coordinates, x first: ``grid[0, 0, y, x] == x``, ``grid[0, 1, y, x] == y``."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy)).unsqueeze(0)


def warp(features: torch.Tensor, flow: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Warp the key frame's features to the current frame.

    Args:
        features: (B, C, H, W) cached key-frame features ``f_k``.
        flow: (B, 2, H, W) flow ``M_{i->k}`` in pixels of this grid, x first: the current frame's
            pixel ``p`` is found at ``p + flow[p]`` in the key frame.
        scale: (B, C, H, W) or (B, 1, H, W) DFF scale field ``S_{i->k}``, or ``None`` for 1.

    Returns:
        (B, C, H, W) ``f_i(p) = S(p) * f_k(p + M(p))``: bilinear sampling, coordinates outside the
        key frame clamp to its border.
    """
    if features.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(
            f"expected features (B,C,H,W) and flow (B,2,H,W), got {tuple(features.shape)} "
            f"and {tuple(flow.shape)}"
        )
    if features.shape[-2:] != flow.shape[-2:] or features.shape[0] != flow.shape[0]:
        raise ValueError(
            f"features {tuple(features.shape)} and flow {tuple(flow.shape)} differ in batch or size"
        )
    if scale is not None and (
        scale.dim() != 4
        or scale.shape[0] != features.shape[0]
        or scale.shape[1] not in (1, features.shape[1])
        or scale.shape[-2:] != features.shape[-2:]
    ):
        raise ValueError(
            f"scale must be (B,C,H,W) or (B,1,H,W) matching features {tuple(features.shape)}, "
            f"got {tuple(scale.shape)}"
        )
    _, _, height, width = features.shape
    coords = pixel_grid(height, width, device=flow.device, dtype=flow.dtype) + flow
    # align_corners=True maps pixel centres 0..W-1 onto -1..1 exactly.
    norm_x = coords[:, 0] * (2.0 / max(width - 1, 1)) - 1.0
    norm_y = coords[:, 1] * (2.0 / max(height - 1, 1)) - 1.0
    grid = torch.stack((norm_x, norm_y), dim=-1)
    warped = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped if scale is None else warped * scale
