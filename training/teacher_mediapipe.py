"""The ``mediapipe`` teacher: MediaPipe Face Mesh (478 points) in its own virtualenv.

mediapipe 0.10.21 (the last release that bundles the Face Mesh model; Apache-2.0) pins numpy<2 and
protobuf<5, so it never enters facestream's environment: ``make teacher-mediapipe`` builds
``.venv-mediapipe`` and this module runs ``training/mediapipe_worker.py`` there as a subprocess,
streaming RGB frames over a pipe (the protocol is in the worker's docstring). Set
``FACESTREAM_MEDIAPIPE_PYTHON`` to use another interpreter that has mediapipe 0.10.21.

The mesh's contours are mapped onto the five classes (:func:`shape_from_mesh`), mimicking the
iBUG-68 recipe of the ``dlib68`` teacher: skin is bounded by the lower face oval (ear level round
the chin) and the eyebrow centre lines, not the forehead; eyes and lips are the refined contours.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import numpy as np

from facestream.training.labels import EYES, INNER_MOUTH, OUTER_MOUTH, SKIN
from facestream.training.teachers import FaceShape, Teacher, TeacherError

MEDIAPIPE_VERSION = "0.10.21"
PYTHON_ENV_VAR = "FACESTREAM_MEDIAPIPE_PYTHON"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = REPO_ROOT / ".venv-mediapipe" / "bin" / "python"
WORKER = Path(__file__).resolve().with_name("mediapipe_worker.py")
INSTALL_HINT = "run `make teacher-mediapipe` (builds .venv-mediapipe with mediapipe==0.10.21)"

# Face Mesh contour indices (mediapipe's FACEMESH_* connection sets walked into chains). "Right" and
# "left" are the subject's: the right eye is on the image's left in an unmirrored frame.
# Jaw: the lower face oval, from the right ear level (iBUG 1) round the chin (152) to the left (17).
JAW: tuple[int, ...] = (127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152)
JAW += (377, 400, 378, 379, 365, 397, 288, 361, 323, 454, 356)
RIGHT_BROW_UPPER = (70, 63, 105, 66, 107)  # outer -> inner
RIGHT_BROW_LOWER = (46, 53, 52, 65, 55)
LEFT_BROW_UPPER = (300, 293, 334, 296, 336)
LEFT_BROW_LOWER = (276, 283, 282, 295, 285)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
OUTER_LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
INNER_LIPS = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
MESH_POINTS = 468  # without the 10 iris points; every index above is below this

_MAGIC = b"FMW1"
_HEADER = struct.Struct("<II")
_COUNT = struct.Struct("<I")
_STDERR_TAIL = 2000


def brow_line(points: np.ndarray, upper: tuple[int, ...], lower: tuple[int, ...]) -> np.ndarray:
    """(5, 2) eyebrow centre line, outer -> inner: midpoints of the upper and lower brow contours."""
    return (points[list(upper)] + points[list(lower)]) / 2.0


def skin_outline(points: np.ndarray) -> np.ndarray:
    """(33, 2) closed skin outline: jaw from the right ear level round the chin to the left, then
    the left brow outer -> inner, then the right brow inner -> outer (iBUG-68 points 1-17, 27-18)."""
    right_brow = brow_line(points, RIGHT_BROW_UPPER, RIGHT_BROW_LOWER)
    left_brow = brow_line(points, LEFT_BROW_UPPER, LEFT_BROW_LOWER)
    return np.concatenate([points[list(JAW)], left_brow, right_brow[::-1]])


def shape_from_mesh(points: np.ndarray) -> FaceShape:
    """Face Mesh points (N >= 468, 2) in pixels -> the five-class outlines in paint order.

    The crop box is the box of every outline point (jaw, brow centre lines, eyes, lips).
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < MESH_POINTS:
        raise ValueError(f"Face Mesh points must be (>={MESH_POINTS}, 2), got {points.shape}")
    polygons = (
        (SKIN, skin_outline(points)),
        (EYES, points[list(RIGHT_EYE)]),
        (EYES, points[list(LEFT_EYE)]),
        (OUTER_MOUTH, points[list(OUTER_LIPS)]),
        (INNER_MOUTH, points[list(INNER_LIPS)]),
    )
    box_points = np.concatenate([outline for _, outline in polygons])
    return FaceShape(points, polygons, box_points)


def worker_python(python: str | Path | None = None) -> Path:
    """The interpreter of the mediapipe environment: ``python``, ``$FACESTREAM_MEDIAPIPE_PYTHON``
    or ``<repo>/.venv-mediapipe/bin/python``; TeacherError naming the fix when it is missing."""
    configured = python or os.environ.get(PYTHON_ENV_VAR)
    path = Path(configured) if configured else DEFAULT_PYTHON
    if not (path.is_file() and os.access(path, os.X_OK)):
        source = "given" if python else f"from ${PYTHON_ENV_VAR}" if configured else "the default"
        raise TeacherError(f"mediapipe teacher: no Python at {path} ({source}): {INSTALL_HINT}")
    return path


class MediaPipeWorker:
    """One ``mediapipe_worker.py`` process: frames in, (N, 2) points or None out.

    Every exchange runs under a watchdog that kills the process after ``timeout_s``; any failure
    (death, timeout, protocol error) kills it and raises TeacherError with its stderr tail.
    """

    def __init__(self, python: Path, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [str(python), "-I", str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,  # a file, never a pipe: mediapipe's log lines cannot block it
        )
        self._timed_out = False
        with self._exchange("starting"):
            self.version = self._handshake()
        if self.version != MEDIAPIPE_VERSION:
            self.close()
            raise TeacherError(
                f"mediapipe teacher: {python} has mediapipe {self.version}, "
                f"need {MEDIAPIPE_VERSION}: {INSTALL_HINT}"
            )

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def reset(self) -> None:
        """Start tracking afresh: the next frame begins a new video."""
        with self._exchange("resetting"):
            self._stdin.write(_HEADER.pack(0, 0))
            self._stdin.flush()

    def landmarks(self, frame: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (N, 2) float64 points (x, y) in pixels, or None without a face."""
        frame = np.ascontiguousarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frames must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
        with self._exchange("labelling a frame"):
            self._stdin.write(_HEADER.pack(frame.shape[0], frame.shape[1]))
            self._stdin.write(frame.data)
            self._stdin.flush()
            (count,) = _COUNT.unpack(self._read(_COUNT.size))
            raw = self._read(count * 8)
        if count == 0:
            return None
        if count < MESH_POINTS:
            raise self._fail(f"worker sent {count} points, expected >= {MESH_POINTS}")
        return np.frombuffer(raw, dtype="<f4").reshape(count, 2).astype(np.float64)

    def close(self) -> None:
        """End of input -> the worker exits; killed if it has not within 5 s."""
        if self.alive:
            try:
                self._stdin.close()
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            if stream is not None:
                with suppress(OSError):  # stdin still holding bytes for a dead worker
                    stream.close()

    @property
    def _stdin(self) -> IO[bytes]:
        assert self._proc.stdin is not None
        return self._proc.stdin

    def _handshake(self) -> str:
        if self._read(len(_MAGIC)) != _MAGIC:
            raise self._fail("worker did not answer with the protocol magic")
        (size,) = _COUNT.unpack(self._read(_COUNT.size))
        return self._read(size).decode("utf-8", "replace")

    def _read(self, size: int) -> bytes:
        assert self._proc.stdout is not None
        data = self._proc.stdout.read(size) if size else b""
        if len(data) != size:
            raise EOFError(f"worker output ended after {len(data)} of {size} bytes")
        return data

    @contextmanager
    def _exchange(self, what: str) -> Iterator[None]:
        """Run one request under the watchdog; any failure (even Ctrl-C) leaves no live worker."""
        if not self.alive:
            raise self._fail(f"worker is not running ({what})")
        timer = threading.Timer(self.timeout_s, self._time_out)
        timer.start()
        try:
            yield
        except (OSError, EOFError, struct.error) as exc:
            raise self._fail(f"{what}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self._kill()
            raise
        finally:
            timer.cancel()

    def _time_out(self) -> None:
        self._timed_out = True
        self._kill()

    def _kill(self) -> None:
        if self.alive:
            self._proc.kill()
        self._proc.wait()

    def _fail(self, reason: str) -> TeacherError:
        """Kill the worker; the error to raise, with the exit status and the stderr tail."""
        self._kill()
        if self._timed_out:
            reason = f"no answer within {self.timeout_s:g} s ({reason})"
        tail = self._stderr_tail()
        self.close()
        hint = f"; {INSTALL_HINT}" if "ModuleNotFoundError" in tail or "ImportError" in tail else ""
        return TeacherError(
            f"mediapipe worker failed (exit status {self._proc.returncode}): {reason}{hint}\n"
            f"worker stderr (tail):\n{tail}"
        )

    def _stderr_tail(self) -> str:
        if self._stderr.closed:
            return "(stderr already closed)"
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - _STDERR_TAIL))
        return self._stderr.read().decode("utf-8", "replace").strip() or "(no stderr)"


class MediaPipeTeacher(Teacher):
    """Face Mesh with tracking: one worker process, reset at the start of every ``shapes`` call.

    Label one video at a time: interleaving two ``shapes`` generators mixes their tracking.
    """

    name = "mediapipe"

    def __init__(self, python: str | Path | None = None, timeout_s: float = 60.0) -> None:
        self.python = worker_python(python)
        self.timeout_s = timeout_s
        self._worker: MediaPipeWorker | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "teacher": self.name,
            "package": f"mediapipe=={MEDIAPIPE_VERSION}",
            "licence": "Apache-2.0",
            "model": "Face Mesh, refine_landmarks=True (478 points), tracking, max_num_faces=1",
            "confidence": {"detection": 0.5, "tracking": 0.5},
            "mapping": "skin: lower face oval + brow centre lines; eyes, lips: mesh contours",
        }

    def shapes(self, frames: Iterable[np.ndarray]) -> Iterator[FaceShape | None]:
        worker = self._running_worker()
        worker.reset()
        for frame in frames:
            points = worker.landmarks(frame)
            yield None if points is None else shape_from_mesh(points)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _running_worker(self) -> MediaPipeWorker:
        """The live worker, started (again, after a failure) when there is none."""
        if self._worker is None or not self._worker.alive:
            self.close()
            self._worker = MediaPipeWorker(self.python, self.timeout_s)
        return self._worker
