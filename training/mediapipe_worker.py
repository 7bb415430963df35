"""MediaPipe Face Mesh worker: frames in on stdin, 478 landmarks out on stdout.

Run by ``.venv-mediapipe/bin/python`` (``make teacher-mediapipe``), never by facestream's own
environment: mediapipe 0.10.21 pins numpy<2 and protobuf<5. This script imports only the standard
library, numpy and mediapipe; ``facestream.training.teacher_mediapipe`` drives it.

Protocol (binary, all integers little-endian uint32, one request -> at most one reply):

* on start, once: the worker writes ``b"FMW1"``, a uint32 byte count and the UTF-8 mediapipe
  version (the handshake: the model loaded);
* request, a frame: ``height, width`` (2 x uint32, both > 0) then ``height*width*3`` bytes of RGB
  uint8, row-major. Reply: ``count`` (uint32; 0 = no face) then ``count*2`` float32, the points
  ``x0, y0, x1, y1, ...`` in frame pixels (x right, y down; 478 points with the refined eyes and
  lips);
* request, a reset: ``height = 0`` (and any ``width``), no pixels, no reply: the video ended, the
  next frame starts a fresh Face Mesh (tracking starts over);
* end of stdin: the worker exits with status 0.

Every reply is flushed at once. Errors (a bad header, a truncated frame, a mediapipe failure) go
to stderr with a traceback and the worker exits with status 1.
"""

from __future__ import annotations

import struct
import sys
import traceback
from typing import Any, BinaryIO

import numpy as np

MAGIC = b"FMW1"
HEADER = struct.Struct("<II")
COUNT = struct.Struct("<I")
MAX_SIDE = 16384


def read_exact(stream: BinaryIO, size: int) -> bytes | None:
    """Exactly ``size`` bytes, or None at a clean end of stream (no byte read)."""
    data = stream.read(size)
    if not data:
        return None
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            raise EOFError(f"stream ended {len(data)} bytes into a {size}-byte read")
        data += more
    return data


def new_face_mesh() -> Any:
    """A fresh tracking Face Mesh: one face, refined eyes and lips (478 points)."""
    import mediapipe as mp

    return mp.solutions.face_mesh.FaceMesh(
        static_image_mode=False,
        max_num_faces=1,
        refine_landmarks=True,
        min_detection_confidence=0.5,
        min_tracking_confidence=0.5,
    )


def landmarks_px(mesh: Any, rgb: np.ndarray) -> np.ndarray:
    """(N, 2) float32 points of the first face in pixels (x, y), or (0, 2) when there is none."""
    result = mesh.process(rgb)
    if not result.multi_face_landmarks:
        return np.zeros((0, 2), dtype=np.float32)
    height, width = rgb.shape[:2]
    marks = result.multi_face_landmarks[0].landmark
    points = np.array([(p.x, p.y) for p in marks], dtype=np.float32)
    return points * np.array([width, height], dtype=np.float32)


def write_reply(out: BinaryIO, points: np.ndarray) -> None:
    out.write(COUNT.pack(len(points)))
    out.write(np.ascontiguousarray(points, dtype="<f4").tobytes())
    out.flush()


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """Answer requests until end of input (see the module docstring)."""
    import mediapipe as mp

    version = mp.__version__.encode()
    out.write(MAGIC + COUNT.pack(len(version)) + version)
    out.flush()
    mesh = None
    while (header := read_exact(inp, HEADER.size)) is not None:
        height, width = HEADER.unpack(header)
        if height == 0:
            if mesh is not None:
                mesh.close()
            mesh = None
            continue
        if not 0 < width <= MAX_SIDE or height > MAX_SIDE:
            raise ValueError(f"bad frame header: height {height}, width {width}")
        pixels = read_exact(inp, height * width * 3)
        if pixels is None:
            raise EOFError(f"stream ended before a {height}x{width} frame's pixels")
        mesh = mesh or new_face_mesh()
        rgb = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3)
        write_reply(out, landmarks_px(mesh, rgb))
    if mesh is not None:
        mesh.close()


def main() -> int:
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:
        return 0  # the teacher went away: nothing left to answer
    except KeyboardInterrupt:
        return 130  # Ctrl-C reaches the whole process group; the teacher reports it
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
