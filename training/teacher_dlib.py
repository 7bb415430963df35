"""The ``dlib68`` teacher: dlib's HOG face detector and 68-point shape predictor.

The predictor file ships inside the ``face_recognition_models`` wheel (trained on iBUG 300-W:
research use only -- model cards of anything trained on these labels say so). The 68 points are
the iBUG scheme of 300VW, so the outlines are exactly the 300VW-Mask recipe (``labels.PARTS``).

The detector runs on the frame scaled to ``detect_width`` and upsampled once (finds faces of
about 40 px there); when it finds nothing it tries once more at full resolution. The largest face
wins.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import dlib
import numpy as np

from facestream.training.teachers import FaceShape, Teacher, TeacherError, shape_from_68

PREDICTOR = "shape_predictor_68_face_landmarks.dat"


def predictor_path() -> Path:
    """The 68-point model inside ``face_recognition_models``, found without importing the package
    (its ``__init__`` needs ``pkg_resources``, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            "dlib68 needs the face_recognition_models package: pip install 'facestream[train]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / PREDICTOR
    if not path.is_file():
        raise TeacherError(f"{path} is missing: reinstall face_recognition_models")
    return path


class Dlib68Teacher(Teacher):
    name = "dlib68"

    def __init__(self, detect_width: int = 320) -> None:
        self.detect_width = detect_width
        self.model = predictor_path()
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(self.model))

    def describe(self) -> dict[str, Any]:
        return {
            "teacher": self.name,
            "model": f"face_recognition_models/models/{PREDICTOR}",
            "licence": "dlib 68-point model trained on iBUG 300-W: research use only",
            "detect_width": self.detect_width,
        }

    def shapes(self, frames: Iterable[np.ndarray]) -> Iterator[FaceShape | None]:
        for frame in frames:
            yield self.shape(frame)

    def shape(self, frame: np.ndarray) -> FaceShape | None:
        rect = self._detect(frame)
        if rect is None:
            return None
        parts = self._predictor(frame, rect).parts()
        return shape_from_68(np.array([[p.x, p.y] for p in parts], dtype=np.float64))

    def _detect(self, frame: np.ndarray) -> Any:
        """The largest face as a dlib rectangle in frame pixels, or None."""
        scale = min(1.0, self.detect_width / frame.shape[1])
        small = (
            frame
            if scale == 1.0
            else cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        )
        found = list(self._detector(small, 1))
        if not found and scale < 1.0:
            scale, found = 1.0, list(self._detector(frame, 0))
        if not found:
            return None
        best = max(found, key=lambda r: r.width() * r.height())
        return dlib.rectangle(
            int(best.left() / scale),
            int(best.top() / scale),
            int(best.right() / scale),
            int(best.bottom() / scale),
        )
