"""The facestream runtime: inference backends, ONNX export, key schedulers and the dynamic
segmentation pipeline (key frames through N, non-key frames warped by F's flow)."""
