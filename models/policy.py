"""The reinforcement-learned key scheduler's policy network (paper section 3.2)."""

from __future__ import annotations

import torch
from torch import nn

from facestream.models.config import PolicyConfig


class KeyPolicy(nn.Module):
    """pi_theta(a | s) with s = {D (FlowNet2-s Conv6 features), E = (KAR, LKD)}.

    Conv0 (96 channels) on D -> FC0 1024 -> FC1 1024 -> FC2 128 -> concat [KAR, LKD] (130) ->
    FC3 -> 2 logits (index 0: non-key a0, index 1: key a1).

    With ``config.cues`` the expert input is [KAR, LKD, *cues] (FC3 sees 130 + len(cues)); each
    cue is standardised by ``cue_mean`` / ``cue_scale`` (set from the training data) first.
    """

    conv6_mean: torch.Tensor  # buffers, present when config.normalize_input
    conv6_scale: torch.Tensor
    cue_mean: torch.Tensor  # buffers, present when config.cues
    cue_scale: torch.Tensor

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or PolicyConfig()
        fc0, fc1, fc2 = config.fc_sizes
        self.conv0 = nn.Conv2d(config.in_channels, config.conv0_channels, 3, padding=1)
        flat = config.conv0_channels * config.conv6_size**2
        self.fc0 = nn.Linear(flat, fc0)
        self.fc1 = nn.Linear(fc0, fc1)
        self.fc2 = nn.Linear(fc1, fc2)
        self.fc3 = nn.Linear(config.trunk_size + config.expert_size, 2)
        if config.quality_size:  # DVSNet's FC1 and output layer, fed by FC0
            self.quality_fc = nn.Linear(fc0, config.quality_size)
            self.quality_out = nn.Linear(config.quality_size, 1)
        if config.normalize_input:
            self.register_buffer("conv6_mean", torch.zeros(config.in_channels))
            self.register_buffer("conv6_scale", torch.ones(config.in_channels))
        if config.cues:
            self.register_buffer("cue_mean", torch.zeros(len(config.cues)))
            self.register_buffer("cue_scale", torch.ones(len(config.cues)))

    def set_input_statistics(self, conv6: torch.Tensor) -> None:
        """Per-channel mean and 1/std of Conv6 features (N, C, s, s) for the input standardisation."""
        if not self.config.normalize_input:
            raise ValueError("this policy was built without normalize_input")
        values = conv6.float().transpose(0, 1).reshape(conv6.shape[1], -1)
        self.conv6_mean.copy_(values.mean(dim=1))
        self.conv6_scale.copy_(1.0 / values.std(dim=1).clamp_min(1e-6))

    def set_cue_statistics(self, cues: torch.Tensor) -> None:
        """Mean and 1/std of the cues (N, len(cues)) over the training pairs."""
        if not self.config.cues:
            raise ValueError("this policy takes no cues")
        values = cues.double()
        self.cue_mean.copy_(values.mean(dim=0).float())
        self.cue_scale.copy_((1.0 / values.std(dim=0).clamp_min(1e-6)).float())

    def forward(self, conv6: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) from Conv6 features (B, C, s, s) and expert info (B, E) = [KAR,
        LKD/window, *cues] (E = ``config.expert_size``)."""
        return self.head(self.trunk(conv6), expert)

    def trunk(self, conv6: torch.Tensor) -> torch.Tensor:
        """The part that sees only D: Conv6 features (B, C, s, s) -> FC2 activations (B, 128),
        followed by the quality branch's output (B, 129) when ``config.quality_size``.

        Split out so that evaluation and RL training can run it once per frame pair and replay
        ``head`` under different decision histories."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.conv6_size, cfg.conv6_size)
        if tuple(conv6.shape[1:]) != expected:
            raise ValueError(f"KeyPolicy expects Conv6 features (B,{expected}), got {tuple(conv6.shape)}")
        if cfg.normalize_input:
            conv6 = (conv6 - self.conv6_mean[:, None, None]) * self.conv6_scale[:, None, None]
        x = torch.relu(self.conv0(conv6)).flatten(1)
        x = torch.relu(self.fc0(x))
        out = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        if not cfg.quality_size:
            return out
        quality = torch.sigmoid(self.quality_out(torch.relu(self.quality_fc(x))))
        return torch.cat((out, quality), dim=1)

    def head(self, trunk: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """FC3 on [trunk (B, ``config.trunk_size``), expert (B, E)] -> logits (B, 2)."""
        size = self.config.expert_size
        if expert.dim() != 2 or expert.shape[1] != size:
            raise ValueError(f"KeyPolicy expects expert info (B,{size}), got {tuple(expert.shape)}")
        expert = expert.to(trunk.dtype)
        if self.config.cues:
            cues = (expert[:, 2:] - self.cue_mean.to(trunk.dtype)) * self.cue_scale.to(trunk.dtype)
            expert = torch.cat((expert[:, :2], cues), dim=1)
        return self.fc3(torch.cat((trunk, expert), dim=1))

    def key_probability(self, conv6: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """pi(a1 | s), shape (B,)."""
        return torch.softmax(self.forward(conv6, expert), dim=1)[:, 1]

    def expert_weights(self) -> torch.Tensor:
        """FC3's weights on the KAR and LKD inputs towards the key logit minus the non-key logit
        (the quantity of the paper's Fig. 3, bottom row): tensor([w_KAR, w_LKD])."""
        w = self.fc3.weight.detach()
        at = self.config.fc_sizes[2]
        return (w[1, at : at + 2] - w[0, at : at + 2]).clone()

    def cue_weights(self) -> torch.Tensor:
        """FC3's weights on the standardised cues towards key minus non-key, in ``config.cues`` order."""
        w = self.fc3.weight.detach()
        at = self.config.fc_sizes[2] + 2
        return (w[1, at:] - w[0, at:]).clone()
