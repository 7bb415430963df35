"""The reinforcement-learned key scheduler's policy network (paper section 3.2)."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from facestream.models.config import PolicyConfig


class MemberHead(nn.Module):
    """FC1-FC3 of one further member of a seed ensemble (``PolicyConfig.members`` > 1)."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        fc0, fc1, fc2 = config.fc_sizes
        self.fc1 = nn.Linear(fc0, fc1)
        self.fc2 = nn.Linear(fc1, fc2)
        self.fc3 = nn.Linear(config.trunk_size + config.expert_size, 2)


class KeyPolicy(nn.Module):
    """pi_theta(a | s) with s = {D (FlowNet2-s Conv6 features), E = (KAR, LKD)}.

    Conv0 (96 channels) on D -> FC0 1024 -> FC1 1024 -> FC2 128 -> concat [KAR, LKD] (130) ->
    FC3 -> 2 logits (index 0: non-key a0, index 1: key a1).

    With ``config.cues`` the expert input is [KAR, LKD, *cues] (FC3 sees 130 + len(cues)); each
    cue is standardised by ``cue_mean`` / ``cue_scale`` (set from the training data) first.

    With ``config.members`` = K > 1 the network is a seed ensemble: member 0 is ``fc1``-``fc3``,
    members 1..K-1 are ``others``, all on the shared Conv0/FC0; ``trunk`` returns the K members'
    FC2 activations side by side and ``head`` the log of the members' mean probabilities (so
    softmax of the logits is the mean of their pi). Ensembles are built from trained policies
    (``facestream train policy-ensemble``), not trained as one.
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
        self.others = nn.ModuleList(MemberHead(config) for _ in range(config.members - 1))
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
        followed by the quality branch's output (B, 129) when ``config.quality_size``; for an
        ensemble, that for each member side by side (B, members * ``config.trunk_size``).

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
        quality = None
        if cfg.quality_size:
            quality = torch.sigmoid(self.quality_out(torch.relu(self.quality_fc(x))))
        parts = []
        for member in self._members():
            parts.append(torch.relu(member.fc2(torch.relu(member.fc1(x)))))
            if quality is not None:
                parts.append(quality)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _members(self) -> list[KeyPolicy | MemberHead]:
        return [self, *(cast(MemberHead, m) for m in self.others)]

    def member_logits(self, trunk: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Each member's FC3 on [its part of ``trunk``, expert (B, E)] -> logits (members, B, 2)."""
        size = self.config.expert_size
        if expert.dim() != 2 or expert.shape[1] != size:
            raise ValueError(f"KeyPolicy expects expert info (B,{size}), got {tuple(expert.shape)}")
        expert = expert.to(trunk.dtype)
        if self.config.cues:
            cues = (expert[:, 2:] - self.cue_mean.to(trunk.dtype)) * self.cue_scale.to(trunk.dtype)
            expert = torch.cat((expert[:, :2], cues), dim=1)
        parts = trunk.split(self.config.trunk_size, dim=1)
        return torch.stack(
            [m.fc3(torch.cat((t, expert), dim=1)) for m, t in zip(self._members(), parts, strict=True)]
        )

    def head(self, trunk: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """FC3 on [trunk (B, ``config.trunk_size``), expert (B, E)] -> logits (B, 2); for an
        ensemble, log of the members' mean probabilities."""
        logits = self.member_logits(trunk, expert)
        if len(logits) == 1:
            return logits[0]
        return torch.logsumexp(torch.log_softmax(logits, dim=2), dim=0) - math.log(len(logits))

    def key_probability(self, conv6: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """pi(a1 | s), shape (B,)."""
        return torch.softmax(self.forward(conv6, expert), dim=1)[:, 1]

    def _fc3(self, member: int) -> nn.Linear:
        return self._members()[member].fc3

    def expert_weights(self, member: int = 0) -> torch.Tensor:
        """FC3's weights on the KAR and LKD inputs towards the key logit minus the non-key logit
        (the quantity of the paper's Fig. 3, bottom row): tensor([w_KAR, w_LKD]) (of one member)."""
        w = self._fc3(member).weight.detach()
        at = self.config.trunk_size
        return (w[1, at : at + 2] - w[0, at : at + 2]).clone()

    def cue_weights(self, member: int = 0) -> torch.Tensor:
        """FC3's weights on the standardised cues towards key minus non-key, in ``config.cues``
        order (of one member)."""
        w = self._fc3(member).weight.detach()
        at = self.config.trunk_size + 2
        return (w[1, at:] - w[0, at:]).clone()
