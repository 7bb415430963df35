"""Cheap per-frame signals of how well the warp will do, for the key policy's state.

The paper's policy sees F's Conv6 features and the expert information [KAR, LKD]. With DIS as
the warp flow, Conv6 describes F's flow, not the one that warps, and neither says when the face
changes in a way no flow can follow (a blink, the mouth opening). A policy may therefore also see
*cues* (``PolicyConfig.cues``), each one number per frame computed from what the pipeline already
has when it decides (the flow to the key and the key's cached crop and class map):

=================  ==========================================================================
``magnitude``      mean flow magnitude to the key, in pixels of N's input (the ``flow`` rule)
``residual_face``  mean |current crop - key crop warped by the flow| (grey, [0, 1]) over the
                   warped face (classes >= 1)
``residual_parts`` the same over the warped eyes and mouths (classes >= 2), dilated by 2 cells
``relative_face``  ``residual_face`` divided by its mean over the stream's previous decided
                   frames (up to the expert window, 90; 1 when there are none yet)
``relative_parts`` the same for ``residual_parts``
=================  ==========================================================================

The relative cues make the policy's key rate follow each stream's own level of change: how much
a crop differs from its warped key depends on the person, the light and the camera as much as on
whether the warp has failed, so a policy that learned a threshold on the absolute residuals of
calm clips keys far more often on lively ones (one keyed at AKI 65 on set B, AKI 20 on set C).
The mean runs over the residuals the stream actually saw, each to its own key
(``DecisionHistory.residual_reference``), which the pipeline, the evaluation's replay and the RL
trainer all keep the same way.

The residuals are measured on N's feature grid (S/4, 64² by default), where the flow lives.
Offline evaluation stores them per frame pair (``PairTable.residual``); the pipeline computes
them with the same functions (:func:`key_maps`, :func:`warp_residuals`).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from facestream.models import warp
from facestream.models.config import POLICY_CUES as CUES

RESIDUAL_CUES = CUES[1:3]  # the ones PairTable.residual holds, in this order
RELATIVE_CUES = CUES[3:5]  # RESIDUAL_CUES over their running mean, in the same order
PARTS_DILATION = 2  # cells of the feature grid
RELATIVE_FLOOR = 1e-3  # smallest mean residual a relative cue divides by (grey levels in [0, 1])


def grey(image: np.ndarray, size: int) -> np.ndarray:
    """(3, S, S) RGB in [0, 1] -> (size, size) float32 luma (area-resized)."""
    rgb = np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.float32)
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if g.shape[0] != size:
        g = cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA)
    return g


def key_maps(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(3, h, w) float32 of a key: its grey crop, face mask and dilated eye/mouth mask on the
    grid of its class scores (K, h, w). ``image``: the key's (3, S, S) flow input in [0, 1]."""
    size = scores.shape[-1]
    labels = scores.argmax(axis=0)
    parts = (labels >= 2).astype(np.uint8)
    if PARTS_DILATION:
        kernel = np.ones((2 * PARTS_DILATION + 1,) * 2, np.uint8)
        parts = cv2.dilate(parts, kernel)
    return np.stack((grey(image, size), (labels >= 1).astype(np.float32), parts.astype(np.float32)))


def warp_residuals(maps: np.ndarray, current: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """(B, 2) [residual_face, residual_parts] of frames warped from their keys.

    ``maps``: (B, 3, h, w) from :func:`key_maps`; ``current``: (B, 3, S, S) current crops as flow
    input; ``flow``: (B, 2, h, w) current -> key in grid pixels. A region the warp leaves empty
    gives 0."""
    size = maps.shape[-1]
    warped = warp(
        torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)), torch.from_numpy(flow).float()
    )
    cur = torch.from_numpy(np.stack([grey(c, size) for c in current]))
    diff = (cur - warped[:, 0]).abs()
    weights = warped[:, 1:]  # (B, 2, h, w) soft face and parts masks
    total = weights.sum(dim=(2, 3))
    resid = (diff[:, None] * weights).sum(dim=(2, 3)) / total.clamp_min(1e-6)
    return torch.where(total >= 1.0, resid, torch.zeros_like(resid)).numpy().astype(np.float32)


def needs_residuals(cues: tuple[str, ...]) -> bool:
    """Whether any of ``cues`` is computed from the warp residuals."""
    return any(n in RESIDUAL_CUES or n in RELATIVE_CUES for n in cues)


def relative_residuals(residual: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(B, 2) ``residual`` over ``reference`` (B, 2), the mean residual of each stream's previous
    decided frames; 1 where the reference is NaN (no history yet)."""
    residual = np.asarray(residual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    ratio = residual / np.maximum(np.nan_to_num(reference, nan=1.0), RELATIVE_FLOOR)
    return np.where(np.isnan(reference), 1.0, ratio).astype(np.float32)


def cue_vector(
    cues: tuple[str, ...],
    magnitude: np.ndarray,
    residual: np.ndarray | None,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """(B, len(cues)) float32 in the policy's order from (B,) magnitudes, (B, 2) residuals and,
    for the relative cues, (B, 2) reference residuals (NaN: no history; :func:`relative_residuals`)."""
    columns = []
    for name in cues:
        if name == "magnitude":
            columns.append(np.asarray(magnitude, dtype=np.float32))
            continue
        if residual is None:
            raise ValueError(f"cue {name!r} needs the warp residuals")
        if name in RESIDUAL_CUES:
            columns.append(np.asarray(residual, dtype=np.float32)[:, RESIDUAL_CUES.index(name)])
        else:
            if reference is None:
                raise ValueError(f"cue {name!r} needs the stream's reference residuals")
            columns.append(relative_residuals(residual, reference)[:, RELATIVE_CUES.index(name)])
    return np.stack(columns, axis=1) if columns else np.zeros((len(magnitude), 0), np.float32)
