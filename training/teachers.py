"""Landmark teachers: find the face in a frame and outline its five classes.

A teacher turns RGB frames into :class:`FaceShape` (or ``None`` when it finds no face). Two exist,
both offline from PyPI:

* ``dlib68`` -- dlib's 68-point shape predictor (the iBUG-68 scheme of 300VW); the outlines are the
  300VW-Mask spline recipe of :mod:`facestream.training.labels`. Module: ``teacher_dlib``.
* ``mediapipe`` -- MediaPipe Face Mesh (478 points, refined eyes and lips) run in its own
  virtualenv as a subprocess; its contours are mapped onto the same classes. Module:
  ``teacher_mediapipe``.

Every teacher yields the same thing, so labelling, comparison and training never see which one ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from facestream.engines.face import Box
from facestream.training.labels import CROP_SCALE, paint_polygons, part_outlines


@dataclass(frozen=True)
class FaceShape:
    """One face in one frame, in frame pixels (x, y).

    ``landmarks``: (P, 2) the teacher's points (68 for dlib68, 478 for mediapipe).
    ``polygons``: (class id, closed outline (M, 2)) in paint order -- later ones overwrite.
    ``box_points``: (Q, 2) the points whose bounding box defines the recipe's crop (for dlib68 the
    68 landmarks; for mediapipe the points on the mapped contours, which cover the same face area).
    """

    landmarks: np.ndarray
    polygons: tuple[tuple[int, np.ndarray], ...]
    box_points: np.ndarray

    def crop_box(self, scale: float = CROP_SCALE) -> Box:
        """The recipe's square crop: ``scale`` x mean(box width, height), centred on the point box."""
        x0, y0 = self.box_points.min(axis=0)
        x1, y1 = self.box_points.max(axis=0)
        return Box(float(x0), float(y0), float(x1), float(y1)).square(scale)

    def paint(self, height: int, width: int) -> np.ndarray:
        """(H, W) uint8 label of class ids: the polygons filled in order on background 0."""
        return paint_polygons(self.polygons, height, width)


def shape_from_68(landmarks: np.ndarray) -> FaceShape:
    """iBUG-68 landmarks (x, y) -> the 300VW-Mask recipe's outlines; the crop box is the points' box."""
    points = np.asarray(landmarks, dtype=np.float64)
    return FaceShape(points, tuple(part_outlines(points)), points)


class TeacherError(RuntimeError):
    """A teacher that cannot run here (missing package, missing environment), with the fix named."""


class Teacher(ABC):
    """Frames in, one :class:`FaceShape` or ``None`` per frame out, in order.

    ``shapes`` may keep state across frames of one video (tracking); call it once per video.
    """

    name: str = "?"

    @abstractmethod
    def shapes(self, frames: Iterable[np.ndarray]) -> Iterator[FaceShape | None]:
        """(H, W, 3) uint8 RGB frames of one video -> one face (the largest) or None per frame."""

    def describe(self) -> dict[str, Any]:
        """What went into the labels, for the label metadata and model cards."""
        return {"teacher": self.name}

    def close(self) -> None:
        """Release processes or files the teacher holds."""

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


TEACHERS = ("dlib68", "mediapipe")
