"""Pure PyTorch networks of facestream (no I/O, no runtime concerns).

* :class:`DeepLabV3Plus` -- the segmentation network N, split into ``N_feat`` and ``N_task``.
* :class:`FlowNet2S` -- the flow network F (FlowNetS layout, channels x 3/8) with the DFF scale field.
* :func:`warp` -- the Deep Feature Flow propagation ``W(f_k, M, S)``.
* :class:`KeyPolicy` -- the reinforcement-learned key scheduler's policy network.
* :class:`DVSNetHead` -- the DVSNet baseline's expected-score regressor.
* :class:`WarpCorrector` -- residual scores for warped non-key frames (not in the paper).
"""

from facestream.models.config import (
    CorrectionConfig,
    DVSNetConfig,
    FlowConfig,
    PolicyConfig,
    SegmentationConfig,
    config_from_dict,
    config_to_dict,
)
from facestream.models.correction import WarpCorrector
from facestream.models.deeplab import DeepLabV3Plus
from facestream.models.dvsnet import DVSNetHead
from facestream.models.flownet import FlowNet2S
from facestream.models.policy import KeyPolicy
from facestream.models.warp import warp

CLASS_NAMES = ("background", "skin", "eyes", "outer_mouth", "inner_mouth")

__all__ = [
    "CLASS_NAMES",
    "CorrectionConfig",
    "DVSNetConfig",
    "DVSNetHead",
    "DeepLabV3Plus",
    "FlowConfig",
    "FlowNet2S",
    "KeyPolicy",
    "PolicyConfig",
    "SegmentationConfig",
    "WarpCorrector",
    "config_from_dict",
    "config_to_dict",
    "warp",
]
