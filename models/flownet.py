"""FlowNet2-s: the FlowNetS architecture (no correlation layer) with channels x 3/8.

Besides the flow it predicts Deep Feature Flow's scale field, and it exposes its Conv6 feature
map, which the RL and DVSNet schedulers read as the deviation between the two frames.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from facestream.models.config import FlowConfig


class FlowOutput(NamedTuple):
    flow: torch.Tensor  # (B, 2, Hw, Ww) M_{i->k} in pixels of the warp grid, x first
    scale: torch.Tensor  # (B, scale_channels, Hw, Ww) S_{i->k}
    conv6: torch.Tensor  # (B, C6, H/64, W/64) Conv6 features D_{i->k}


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2),
        nn.LeakyReLU(0.1, inplace=True),
    )


def _deconv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.1, inplace=True)
    )


class FlowNet2S(nn.Module):
    """F(I_i, I_k) -> flow M_{i->k}, scale S_{i->k} and Conv6 features.

    Input: (B, 6, H, W) = current frame I_i and key frame I_k stacked on channels, RGB in [0, 1],
    H = W = ``config.input_size``. ``flow[:, :, p]`` says where the current frame's pixel ``p`` lies
    in the key frame, so that :func:`facestream.models.warp` maps key features onto the current frame.
    """

    def __init__(self, config: FlowConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FlowConfig()
        c = config.channels
        c1, c2, c3, c4, c5, c6 = c(64), c(128), c(256), c(512), c(512), c(1024)
        d5, d4, d3, d2 = c(512), c(256), c(128), c(64)
        self.conv1 = _conv(6, c1, 7, 2)
        self.conv2 = _conv(c1, c2, 5, 2)
        self.conv3 = _conv(c2, c3, 5, 2)
        self.conv3_1 = _conv(c3, c3, 3)
        self.conv4 = _conv(c3, c4, 3, 2)
        self.conv4_1 = _conv(c4, c4, 3)
        self.conv5 = _conv(c4, c5, 3, 2)
        self.conv5_1 = _conv(c5, c5, 3)
        self.conv6 = _conv(c5, c6, 3, 2)
        self.conv6_1 = _conv(c6, c6, 3)
        self.deconv5 = _deconv(c6, d5)
        self.deconv4 = _deconv(c5 + d5 + 2, d4)
        self.deconv3 = _deconv(c4 + d4 + 2, d3)
        self.deconv2 = _deconv(c3 + d3 + 2, d2)
        self.predict_flow6 = nn.Conv2d(c6, 2, 3, padding=1)
        self.predict_flow5 = nn.Conv2d(c5 + d5 + 2, 2, 3, padding=1)
        self.predict_flow4 = nn.Conv2d(c4 + d4 + 2, 2, 3, padding=1)
        self.predict_flow3 = nn.Conv2d(c3 + d3 + 2, 2, 3, padding=1)
        self.predict_flow2 = nn.Conv2d(c2 + d2 + 2, 2, 3, padding=1)
        self.predict_scale2 = nn.Conv2d(c2 + d2 + 2, config.scale_channels, 3, padding=1)
        self.upsample_flow = nn.ModuleList(
            nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1, bias=False) for _ in range(4)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_uniform_(m.weight, a=0.1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The scale field starts as exactly 1 (S = 1 + output), i.e. pure flow warping.
        nn.init.zeros_(self.predict_scale2.weight)
        assert self.predict_scale2.bias is not None
        nn.init.zeros_(self.predict_scale2.bias)

    def forward(self, pair: torch.Tensor) -> FlowOutput:
        out2, out3, out4, out5, out6 = self._encode(pair)
        concat = out6
        flow = self.predict_flow6(out6)
        for skip, deconv, up, predict in (
            (out5, self.deconv5, self.upsample_flow[0], self.predict_flow5),
            (out4, self.deconv4, self.upsample_flow[1], self.predict_flow4),
            (out3, self.deconv3, self.upsample_flow[2], self.predict_flow3),
            (out2, self.deconv2, self.upsample_flow[3], self.predict_flow2),
        ):
            concat = torch.cat((skip, deconv(concat), up(flow)), dim=1)
            flow = predict(concat)
        scale = 1.0 + self.predict_scale2(concat)
        return FlowOutput(*self._to_warp_grid(flow, scale), out6)

    def conv6_features(self, pair: torch.Tensor) -> torch.Tensor:
        """Conv6 alone (the encoder; no flow decoder): what the ``rl`` and ``dvsnet`` schedulers
        read when another method (DIS) supplies the flow, at about half of F's cost."""
        return self._encode(pair)[-1]

    def _encode(self, pair: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The encoder's outputs at strides 4, 8, 16, 32 and 64 (Conv2 ... Conv6)."""
        cfg = self.config
        if pair.dim() != 4 or pair.shape[1] != 6:
            raise ValueError(f"FlowNet2S expects (B,6,H,W) frame pairs, got {tuple(pair.shape)}")
        if tuple(pair.shape[-2:]) != (cfg.input_size, cfg.input_size):
            raise ValueError(
                f"FlowNet2S configured for {cfg.input_size}x{cfg.input_size} input, "
                f"got {tuple(pair.shape[-2:])}"
            )
        x = pair - 0.5
        out2 = self.conv2(self.conv1(x))
        out3 = self.conv3_1(self.conv3(out2))
        out4 = self.conv4_1(self.conv4(out3))
        out5 = self.conv5_1(self.conv5(out4))
        return out2, out3, out4, out5, self.conv6_1(self.conv6(out5))

    def _to_warp_grid(self, flow: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow at stride 4 (units of div_flow input pixels) -> pixels of the warp grid."""
        cfg = self.config
        flow = flow * (cfg.div_flow * cfg.warp_size / cfg.input_size)
        if flow.shape[-1] != cfg.warp_size:
            size = (cfg.warp_size, cfg.warp_size)
            flow = F.interpolate(flow, size=size, mode="bilinear", align_corners=False)
            scale = F.interpolate(scale, size=size, mode="bilinear", align_corners=False)
        return flow, scale
