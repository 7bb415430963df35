"""DeepLab-V3+ (the segmentation network N) split into N_feat and N_task."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from facestream.models.config import SegmentationConfig

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DeepLabV3Plus(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    """N = N_task o N_feat, built from segmentation-models-pytorch with no pretrained weights.

    * :meth:`features` (N_feat): RGB image in [0, 1], (B, 3, S, S) -> features at stride 4,
      (B, C, S/4, S/4); with the paper's ``split="scores"`` these are the per-pixel class scores.
    * :meth:`task` (N_task): features at stride 4 -> class scores at stride 4 (identity for the
      ``scores`` split, the classifier convolution for the ``decoder`` split).
    * :meth:`forward`: image -> class scores at full input resolution (training and export).

    The mask is ``argmax`` over classes of the scores bilinearly resized to the output size.
    """

    def __init__(self, config: SegmentationConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SegmentationConfig()
        net = smp.DeepLabV3Plus(
            encoder_name=config.backbone,
            encoder_weights=None,
            encoder_output_stride=config.output_stride,
            decoder_channels=config.decoder_channels,
            classes=config.num_classes,
            upsampling=1,
        )
        self.encoder = net.encoder
        self.decoder = net.decoder
        self.classifier = net.segmentation_head[0]
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _check_image(self, image: torch.Tensor) -> None:
        size = self.config.input_size
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"DeepLabV3Plus expects (B,3,H,W) RGB images, got {tuple(image.shape)}")
        if tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"DeepLabV3Plus configured for {size}x{size}, got {tuple(image.shape[-2:])}")

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """N_feat: (B, 3, S, S) in [0, 1] -> (B, feature_channels, S/4, S/4)."""
        self._check_image(image)
        x = (image - self.mean) / self.std
        decoded = self.decoder(self.encoder(x))
        return self.classifier(decoded) if self.config.split == "scores" else decoded

    def task(self, features: torch.Tensor) -> torch.Tensor:
        """N_task up to the class scores at stride 4: (B, C, S/4, S/4) -> (B, classes, S/4, S/4)."""
        return features if self.config.split == "scores" else self.classifier(features)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> class scores (B, classes, S, S)."""
        scores = self.task(self.features(image))
        return upsample_scores(scores, image.shape[-2:])


def upsample_scores(scores: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of class scores (the resampling half of N_task)."""
    return F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)
