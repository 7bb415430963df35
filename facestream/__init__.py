"""facestream: real-time face video segmentation (Dynamic Face Video Segmentation via RL)."""

__version__ = "0.1.0"
