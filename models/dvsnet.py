"""The DVSNet baseline's decision network (Xu et al., 2018)."""

from __future__ import annotations

import torch
from torch import nn

from facestream.models.config import DVSNetConfig


class DVSNetHead(nn.Module):
    """Regresses the expected score (mIoU in [0, 1]) of the warped result from Conv6 features.

    A frame becomes a key when the predicted score falls below a threshold.
    """

    def __init__(self, config: DVSNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DVSNetConfig()
        fc0, fc1 = config.fc_sizes
        self.conv = nn.Conv2d(config.in_channels, config.conv_channels, 3, padding=1)
        self.fc0 = nn.Linear(config.conv_channels * config.conv6_size**2, fc0)
        self.fc1 = nn.Linear(fc0, fc1)
        self.out = nn.Linear(fc1, 1)

    def forward(self, conv6: torch.Tensor) -> torch.Tensor:
        """Expected score (B,) in [0, 1] from Conv6 features (B, C, s, s)."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.conv6_size, cfg.conv6_size)
        if tuple(conv6.shape[1:]) != expected:
            raise ValueError(f"DVSNetHead expects Conv6 features (B,{expected}), got {tuple(conv6.shape)}")
        x = torch.relu(self.conv(conv6)).flatten(1)
        x = torch.relu(self.fc0(x))
        x = torch.relu(self.fc1(x))
        return torch.sigmoid(self.out(x)).squeeze(1)
