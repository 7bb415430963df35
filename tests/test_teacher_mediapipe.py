"""The ``mediapipe`` teacher: the mesh -> five-class mapping (pure numpy, no mediapipe), the worker
protocol's failure paths (fake workers: death, silence, wrong version) and the real worker in
``.venv-mediapipe`` (skipped only where that environment is missing: ``make teacher-mediapipe``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from facestream.engines.video import open_source
from facestream.training import teacher_mediapipe as tm
from facestream.training.labels import BACKGROUND, EYES, INNER_MOUTH, OUTER_MOUTH, SKIN
from facestream.training.teacher_mediapipe import MediaPipeTeacher, shape_from_mesh, worker_python
from facestream.training.teachers import FaceShape, TeacherError

CLIP = "lp_d3.mp4"
FRAMES = 10

# The contour points (index x y, pixels) MediaPipe 0.10.21 found on frame 0 of lp_d3.mp4 (512 x 512);
# the other mesh points are not used by the mapping and stay NaN.
REAL_POINTS = """
0 273.6 385.3   7 184.6 258.2   13 272.1 397.8   14 271.8 407.7   17 270.8 426.3   33 180.0 253.4
37 257.8 382.5   39 240.6 387.5   40 229.1 393.3   46 166.8 230.2   52 197.6 218.0   53 179.6 221.3
55 251.6 232.1   58 142.6 393.4   61 216.0 404.0   63 174.2 213.6   65 221.1 220.6   66 219.8 210.5
70 160.2 224.3   78 221.5 403.7   80 237.5 399.5   81 247.4 397.8   82 259.2 397.3   84 254.7 424.6
87 258.9 406.7   88 237.4 405.0   91 229.1 414.2   93 130.3 325.0   95 230.0 404.5   105 194.5 208.4
107 248.7 214.9   127 131.0 263.2   132 133.9 358.7   133 238.1 261.4   136 170.9 440.7
144 197.3 263.8   145 208.1 264.6   146 221.3 409.0   148 241.1 485.3   149 205.5 468.9
150 189.8 457.7   152 266.4 488.2   153 218.5 263.7   154 228.4 262.4   155 234.9 262.0
157 227.2 249.4   158 216.6 243.6   159 205.5 242.1   160 194.3 244.0   161 187.2 247.7
163 189.9 261.3   172 155.7 420.9   173 234.8 256.9   176 222.0 478.5   178 247.3 405.6
181 240.6 420.3   185 220.8 398.6   191 229.5 401.5   234 130.0 293.8   246 183.2 250.7
249 363.4 261.9   263 367.8 258.0   267 289.0 383.9   269 303.8 390.1   270 312.7 397.0
276 388.1 236.5   282 358.8 222.1   283 376.4 226.8   285 301.4 234.0   288 395.2 400.4
291 321.5 408.9   293 383.2 218.3   295 334.2 223.4   296 337.0 212.5   300 395.3 230.4
308 316.4 408.0   310 302.9 402.3   311 294.6 399.8   312 284.3 398.3   314 286.2 425.9
317 284.1 407.8   318 302.7 407.8   321 310.0 417.6   323 413.5 333.2   324 308.9 408.0
334 363.4 211.3   336 306.5 216.3   356 420.4 271.9   361 406.5 366.4   362 307.5 262.3
365 365.5 446.6   373 351.4 266.6   374 340.4 267.4   375 316.8 413.2   377 292.0 487.2
378 329.6 473.1   379 346.2 462.8   380 329.2 266.3   381 318.3 264.3   382 311.1 263.4
384 320.1 251.2   385 332.0 246.9   386 344.0 246.4   387 355.1 249.1   388 361.6 252.8
390 358.6 264.5   397 381.1 427.2   398 311.5 257.9   400 312.1 481.7   402 294.4 407.7
405 299.6 422.6   409 318.7 403.0   415 309.5 405.0   454 417.7 302.3   466 365.1 255.6
"""


def real_mesh() -> np.ndarray:
    """(478, 2) Face Mesh points of lp_d3 frame 0: the contour points, NaN elsewhere."""
    rows = np.array(REAL_POINTS.split(), dtype=np.float64).reshape(-1, 3)
    points = np.full((478, 2), np.nan)
    points[rows[:, 0].astype(int)] = rows[:, 1:]
    return points


def area(outline: np.ndarray) -> float:
    """Shoelace area of a closed outline (M, 2), pixels squared."""
    x, y = outline[:, 0], outline[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def inside(outline: np.ndarray, points: np.ndarray) -> bool:
    contour = outline.astype(np.float32).reshape(-1, 1, 2)
    return all(cv2.pointPolygonTest(contour, (float(x), float(y)), False) > 0 for x, y in points)


@pytest.fixture(scope="module")
def real_shape() -> FaceShape:
    return shape_from_mesh(real_mesh())


# --------------------------------------------------------------------------- the mapping


def test_contours_use_only_mesh_points_and_no_repeats() -> None:
    loops = (tm.JAW, tm.RIGHT_EYE, tm.LEFT_EYE, tm.OUTER_LIPS, tm.INNER_LIPS)
    brows = (tm.RIGHT_BROW_UPPER, tm.RIGHT_BROW_LOWER, tm.LEFT_BROW_UPPER, tm.LEFT_BROW_LOWER)
    for loop in loops + brows:
        assert len(set(loop)) == len(loop)
        assert max(loop) < tm.MESH_POINTS
    assert len(tm.JAW) == 23 and all(len(b) == 5 for b in brows)


def test_paint_order_and_finite_outlines(real_shape: FaceShape) -> None:
    classes = [class_id for class_id, _ in real_shape.polygons]
    assert classes == [SKIN, EYES, EYES, OUTER_MOUTH, INNER_MOUTH]
    for _, outline in real_shape.polygons:
        assert outline.ndim == 2 and outline.shape[1] == 2 and np.isfinite(outline).all()
    assert len(real_shape.polygons[0][1]) == 23 + 5 + 5


def test_areas_are_ordered(real_shape: FaceShape) -> None:
    skin, right_eye, left_eye, lips, mouth = (area(o) for _, o in real_shape.polygons)
    assert skin > 10 * lips > 0
    assert lips > mouth > 0
    assert skin > 30 * right_eye > 0 and skin > 30 * left_eye > 0
    assert 0.5 < right_eye / left_eye < 2.0


def test_parts_lie_inside_the_skin(real_shape: FaceShape) -> None:
    skin = real_shape.polygons[0][1]
    for class_id, outline in real_shape.polygons[1:]:
        assert inside(skin, outline), f"class {class_id} pokes out of the skin"
    lips = real_shape.polygons[3][1]
    assert inside(lips, real_shape.polygons[4][1].mean(axis=0, keepdims=True))


def test_skin_is_a_simple_polygon_up_to_the_brows(real_shape: FaceShape) -> None:
    """Painted pixels match the shoelace area only when the outline does not cross itself; the
    top of the skin is the brow centre line (no forehead)."""
    skin = real_shape.polygons[0][1]
    painted = int((real_shape.paint(512, 512) > BACKGROUND).sum())
    assert abs(painted - area(skin)) < 0.03 * area(skin)
    mesh = real_mesh()
    brows = np.concatenate(
        [
            tm.brow_line(mesh, tm.RIGHT_BROW_UPPER, tm.RIGHT_BROW_LOWER),
            tm.brow_line(mesh, tm.LEFT_BROW_UPPER, tm.LEFT_BROW_LOWER),
        ]
    )
    assert skin[:, 1].min() == pytest.approx(brows[:, 1].min())
    assert skin[:, 1].min() > mesh[list(tm.RIGHT_BROW_UPPER + tm.LEFT_BROW_UPPER), 1].min()
    assert skin[:, 1].min() < mesh[list(tm.RIGHT_EYE + tm.LEFT_EYE), 1].min()


def test_painted_label(real_shape: FaceShape) -> None:
    label = real_shape.paint(512, 512)
    assert set(np.unique(label)) == {BACKGROUND, SKIN, EYES, OUTER_MOUTH, INNER_MOUTH}
    rows = {c: np.nonzero(label == c)[0] for c in (SKIN, EYES, OUTER_MOUTH, INNER_MOUTH)}
    assert rows[EYES].max() < rows[OUTER_MOUTH].min()
    assert rows[SKIN].min() < rows[EYES].min() and rows[SKIN].max() > rows[OUTER_MOUTH].max()
    eye_columns = np.nonzero(label == EYES)[1]
    assert eye_columns.min() < 256 < eye_columns.max()  # two eyes, one each side of the centre


def test_box_points_and_crop(real_shape: FaceShape) -> None:
    outlines = np.concatenate([o for _, o in real_shape.polygons])
    np.testing.assert_array_equal(real_shape.box_points, outlines)
    box = real_shape.crop_box()
    assert box.width == pytest.approx(box.height)
    x0, y0 = outlines.min(axis=0)
    x1, y1 = outlines.max(axis=0)
    assert box.x0 < x0 and box.y0 < y0 and box.x1 > x1 and box.y1 > y1
    assert box.width == pytest.approx(1.3 * ((x1 - x0) + (y1 - y0)) / 2)


def test_bad_points_are_refused() -> None:
    with pytest.raises(ValueError, match="Face Mesh points"):
        shape_from_mesh(np.zeros((68, 2)))
    with pytest.raises(ValueError, match="Face Mesh points"):
        shape_from_mesh(np.zeros((478, 3)))


# --------------------------------------------------------------------------- environment, failures


def test_missing_environment_names_make_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tm.PYTHON_ENV_VAR, raising=False)
    monkeypatch.setattr(tm, "DEFAULT_PYTHON", tmp_path / ".venv-mediapipe" / "bin" / "python")
    with pytest.raises(TeacherError, match="make teacher-mediapipe"):
        MediaPipeTeacher()
    monkeypatch.setenv(tm.PYTHON_ENV_VAR, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(TeacherError, match=r"make teacher-mediapipe") as info:
        worker_python()
    assert tm.PYTHON_ENV_VAR in str(info.value)


def fake_python(tmp_path: Path, body: str) -> Path:
    """An executable standing in for the environment's python (it ignores its arguments)."""
    path = tmp_path / "python"
    path.write_text(f"#!{sys.executable}\nimport sys, time\nout = sys.stdout.buffer\n{body}\n")
    path.chmod(0o755)
    return path


HANDSHAKE = "out.write(b'FMW1' + len(b'{v}').to_bytes(4, 'little') + b'{v}'); out.flush()"
FRAME = np.zeros((32, 48, 3), dtype=np.uint8)


def test_worker_that_dies_at_start(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "sys.stderr.write('boom: no model\\n'); sys.exit(3)")
    with MediaPipeTeacher(python=python) as teacher, pytest.raises(TeacherError) as info:
        list(teacher.shapes([FRAME]))
    assert "exit status 3" in str(info.value) and "boom: no model" in str(info.value)


def test_worker_that_dies_mid_video(tmp_path: Path) -> None:
    body = HANDSHAKE.format(v=tm.MEDIAPIPE_VERSION) + "\nsys.stdin.buffer.read(8)\n"
    body += "sys.stderr.write('segfault-ish\\n'); sys.exit(7)"
    with MediaPipeTeacher(python=fake_python(tmp_path, body)) as teacher:
        with pytest.raises(TeacherError, match="segfault-ish"):
            list(teacher.shapes([FRAME, FRAME]))


def test_silent_worker_times_out(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "time.sleep(60)")
    start = time.monotonic()
    with MediaPipeTeacher(python=python, timeout_s=0.5) as teacher, pytest.raises(TeacherError) as info:
        list(teacher.shapes([FRAME]))
    assert time.monotonic() - start < 10
    assert "no answer within 0.5 s" in str(info.value)


def test_wrong_mediapipe_version(tmp_path: Path) -> None:
    python = fake_python(tmp_path, HANDSHAKE.format(v="0.10.14") + "\nsys.stdin.buffer.read()")
    with MediaPipeTeacher(python=python) as teacher, pytest.raises(TeacherError) as info:
        list(teacher.shapes([FRAME]))
    assert "0.10.14" in str(info.value) and "make teacher-mediapipe" in str(info.value)


def test_describe(tmp_path: Path) -> None:
    info = MediaPipeTeacher(python=fake_python(tmp_path, "")).describe()  # no worker started
    assert info["teacher"] == "mediapipe" and info["package"] == "mediapipe==0.10.21"
    assert info["licence"] == "Apache-2.0"


# --------------------------------------------------------------------------- the real worker


@pytest.fixture(scope="module")
def mediapipe_python() -> Path:
    try:
        return worker_python()
    except TeacherError as exc:
        pytest.skip(f"no mediapipe environment (CI builds it with make teacher-mediapipe): {exc}")


@pytest.fixture(scope="module")
def teacher(mediapipe_python: Path) -> Iterator[MediaPipeTeacher]:
    with MediaPipeTeacher(python=mediapipe_python) as teacher:
        yield teacher


@pytest.fixture(scope="module")
def frames(videos_dir: Path) -> list[np.ndarray]:
    return [frame.rgb for frame in open_source(str(videos_dir / CLIP), max_frames=FRAMES)]


def test_contours_match_the_mediapipe_package(mediapipe_python: Path) -> None:
    """Every consecutive pair of each hard-coded chain is an edge of mediapipe's FACEMESH_* sets."""
    loops = {
        "FACE_OVAL": [(tm.JAW, False)],
        "RIGHT_EYEBROW": [(tm.RIGHT_BROW_UPPER, False), (tm.RIGHT_BROW_LOWER, False)],
        "LEFT_EYEBROW": [(tm.LEFT_BROW_UPPER, False), (tm.LEFT_BROW_LOWER, False)],
        "RIGHT_EYE": [(tm.RIGHT_EYE, True)],
        "LEFT_EYE": [(tm.LEFT_EYE, True)],
        "LIPS": [(tm.OUTER_LIPS, True), (tm.INNER_LIPS, True)],
    }
    script = (
        "import sys, json\n"
        "from mediapipe.python.solutions import face_mesh_connections as c\n"
        "loops = json.loads(sys.argv[1])\n"
        "for name, chains in loops.items():\n"
        "    edges = {frozenset(e) for e in getattr(c, 'FACEMESH_' + name)}\n"
        "    for chain, closed in chains:\n"
        "        pairs = list(zip(chain, chain[1:])) + ([(chain[-1], chain[0])] if closed else [])\n"
        "        bad = [p for p in pairs if frozenset(p) not in edges]\n"
        "        assert not bad, (name, bad)\n"
        "print('ok')\n"
    )
    import json

    done = subprocess.run(
        [str(mediapipe_python), "-I", "-c", script, json.dumps(loops)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_real_worker_labels_every_frame(teacher: MediaPipeTeacher, frames: list[np.ndarray]) -> None:
    height, width = frames[0].shape[:2]
    shapes = list(teacher.shapes(frames))
    assert len(shapes) == FRAMES
    for index, shape in enumerate(shapes):
        assert shape is not None, f"no face on frame {index}"
        assert shape.landmarks.shape == (478, 2)
        assert (shape.box_points >= 0).all() and (shape.box_points < [width, height]).all()
        label = shape.paint(height, width)
        assert set(np.unique(label)) == {BACKGROUND, SKIN, EYES, OUTER_MOUTH, INNER_MOUTH}
        rows = {c: np.nonzero(label == c)[0] for c in (EYES, OUTER_MOUTH, INNER_MOUTH)}
        assert rows[EYES].max() < rows[OUTER_MOUTH].min()
        assert rows[OUTER_MOUTH].min() <= rows[INNER_MOUTH].min()
        assert 0.02 < (label > BACKGROUND).mean() < 0.6


def test_real_worker_matches_the_stored_points(teacher: MediaPipeTeacher, frames: list[np.ndarray]) -> None:
    (shape,) = teacher.shapes(frames[:1])
    assert shape is not None
    expected = real_mesh()
    used = ~np.isnan(expected[:, 0])
    np.testing.assert_allclose(shape.landmarks[used], expected[used], atol=3.0)


def test_real_worker_no_face_and_restart(teacher: MediaPipeTeacher, frames: list[np.ndarray]) -> None:
    blank = np.zeros_like(frames[0])
    assert list(teacher.shapes([blank, blank])) == [None, None]
    worker = teacher._worker
    assert worker is not None
    worker._proc.kill()  # a worker that died between videos is replaced
    worker._proc.wait()
    (shape,) = teacher.shapes(frames[:1])
    assert shape is not None and teacher._worker is not worker
