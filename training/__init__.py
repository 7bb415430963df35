"""Offline training and evaluation (labels, datasets, N/F/DVSNet/RL training, the paper's figures).

Not built yet: issues #3 and #4. It may import engines and models; nothing imports it.
"""
