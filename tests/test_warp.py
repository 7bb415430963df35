"""Deep Feature Flow propagation ``f_i(p) = S(p) * f_k(p + M(p))`` (facestream.models.warp).

Convention under test. ``flow[:, :, y, x]`` is ``M(p)`` for the current frame's pixel
``p = (x, y)``, in pixels of the feature grid, x first; pixel centres are the integer
coordinates 0..W-1 (``align_corners=True``). The output at ``p`` samples the key features at
``p + M(p)``. Hence a key pattern at position ``q`` appears in the output where ``p + M(p) = q``:
for a constant translation ``M``, at ``p = q - M``; for the affine flow
``p + M(p) = c + A (p - c)``, at ``p = c + A^-1 (q - c)``. Samples outside the key frame take
the value of the nearest border pixel. The scale field multiplies the sampled value.

Precision. grid_sample works in normalised coordinates; in float32 the round trip
pixel -> [-1, 1] -> pixel costs ~1e-5 px on a 64-px grid, so exact-value checks run in float64
(error ~1e-13) and float32 checks allow a few 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from facestream.models.warp import pixel_grid, warp

SIZE = 64
CENTRE = (SIZE - 1) / 2  # rotation/scaling centre of the pixel grid, in pixels
CENTROID_TOLERANCE_PX = 0.1  # measured error < 0.01 px; a half-pixel convention slip is 0.5 px


def constant_flow(dx: float, dy: float, *, batch: int = 1, size: int = SIZE, dtype=torch.float64):
    """(B, 2, H, W) flow equal to (dx, dy) everywhere."""
    flow = torch.empty(batch, 2, size, size, dtype=dtype)
    flow[:, 0] = dx
    flow[:, 1] = dy
    return flow


def gaussian_blob(x: float, y: float, *, sigma: float = 3.0, size: int = SIZE) -> torch.Tensor:
    """(1, 1, H, W) float64 Gaussian of peak 1 centred on pixel position (x, y)."""
    grid = pixel_grid(size, size, dtype=torch.float64)[0]
    d2 = (grid[0] - x) ** 2 + (grid[1] - y) ** 2
    return torch.exp(-d2 / (2 * sigma**2))[None, None]


def centroid(image: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted centroid (x, y) of a (1, 1, H, W) non-negative image, in pixels."""
    h, w = image.shape[-2:]
    grid = pixel_grid(h, w, dtype=image.dtype)[0]
    weights = image[0, 0]
    total = weights.sum()
    return (grid[0] * weights).sum().item() / total.item(), (grid[1] * weights).sum().item() / total.item()


def affine_about_centre(degrees: float, zoom: float) -> torch.Tensor:
    """2x2 matrix A = zoom * R(degrees) acting on (x, y) offsets from CENTRE."""
    t = math.radians(degrees)
    rotation = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return (zoom * rotation).to(torch.float64)


def affine_flow(matrix: torch.Tensor, *, size: int = SIZE) -> torch.Tensor:
    """(1, 2, H, W) flow with p + M(p) = c + A (p - c), i.e. M(p) = (A - I)(p - c)."""
    offsets = pixel_grid(size, size, dtype=torch.float64)[0] - CENTRE
    flow = torch.einsum("ij,jhw->ihw", matrix - torch.eye(2, dtype=torch.float64), offsets)
    return flow[None]


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize("scale", ["none", "ones", "ones-one-channel"])
def test_zero_flow_is_identity_float64(scale: str) -> None:
    features = torch.randn(2, 5, SIZE, SIZE, dtype=torch.float64)
    scales = {
        "none": None,
        "ones": torch.ones_like(features),
        "ones-one-channel": torch.ones(2, 1, SIZE, SIZE, dtype=torch.float64),
    }
    out = warp(features, constant_flow(0, 0, batch=2), scales[scale])
    assert out.shape == features.shape
    assert (out - features).abs().max().item() < 1e-6


def test_zero_flow_is_identity_float32() -> None:
    features = torch.rand(2, 5, SIZE, SIZE)
    out = warp(features, constant_flow(0, 0, batch=2, dtype=torch.float32))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, features, rtol=0, atol=5e-5)


# --------------------------------------------------------------------------- translation


def test_direction_convention_single_pixel() -> None:
    """A key pixel at q = (5, 7) with flow M = (+2, +1) lands at p = q - M = (3, 6)."""
    key = torch.zeros(1, 1, 12, 12, dtype=torch.float64)
    key[0, 0, 7, 5] = 1.0
    out = warp(key, constant_flow(2, 1, size=12))
    expected = torch.zeros_like(key)
    expected[0, 0, 6, 3] = 1.0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("dx", "dy"), [(3, -2), (-5, 4), (0, 7)])
def test_integer_translation_moves_pattern_exactly(dx: int, dy: int) -> None:
    features = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    out = warp(features, constant_flow(dx, dy, batch=2))
    # out[y, x] = features[y + dy, x + dx] wherever that lies inside the key frame ...
    ys, xs = torch.arange(SIZE), torch.arange(SIZE)
    src_y, src_x = ys + dy, xs + dx
    inside_y = (src_y >= 0) & (src_y < SIZE)
    inside_x = (src_x >= 0) & (src_x < SIZE)
    inner = out[:, :, inside_y][:, :, :, inside_x]
    expected = features[:, :, src_y[inside_y]][:, :, :, src_x[inside_x]]
    torch.testing.assert_close(inner, expected, rtol=0, atol=1e-10)
    # ... and the nearest border pixel elsewhere (border padding).
    clamped = features[:, :, src_y.clamp(0, SIZE - 1)][:, :, :, src_x.clamp(0, SIZE - 1)]
    torch.testing.assert_close(out, clamped, rtol=0, atol=1e-10)


def test_integer_translation_float32() -> None:
    features = torch.rand(1, 4, SIZE, SIZE)
    out = warp(features, constant_flow(3, -2, dtype=torch.float32))
    torch.testing.assert_close(out[:, :, 2:, : SIZE - 3], features[:, :, :-2, 3:], rtol=0, atol=5e-5)


def test_flow_beyond_frame_takes_border_value() -> None:
    features = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    out = warp(features, constant_flow(100, -100, size=8))
    top_right = features[:, :, 0, 7]
    torch.testing.assert_close(out, top_right[:, :, None, None].expand_as(out))


@pytest.mark.parametrize("key_position", [(30.0, 25.0), (12.3, 44.8), (50.0, 15.5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_subpixel_translation_moves_blob_centroid(key_position, dtype) -> None:
    dx, dy = 2.3, -1.7
    key = gaussian_blob(*key_position).to(dtype)
    out = warp(key, constant_flow(dx, dy, dtype=dtype))
    x, y = centroid(out.double())
    qx, qy = key_position
    assert x == pytest.approx(qx - dx, abs=CENTROID_TOLERANCE_PX)
    assert y == pytest.approx(qy - dy, abs=CENTROID_TOLERANCE_PX)


@pytest.mark.parametrize("key_position", [(10.0, 12.0), (18.0, 44.0), (45.0, 20.0), (CENTRE, CENTRE)])
def test_affine_flow_moves_blob_centroid(key_position) -> None:
    """Rotation by 5 degrees and zoom 1.05 about the grid centre."""
    matrix = affine_about_centre(5.0, 1.05)
    key = gaussian_blob(*key_position)
    out = warp(key, affine_flow(matrix))
    q = torch.tensor(key_position, dtype=torch.float64)
    expected = CENTRE + torch.linalg.solve(matrix, q - CENTRE)
    x, y = centroid(out)
    assert x == pytest.approx(expected[0].item(), abs=CENTROID_TOLERANCE_PX)
    assert y == pytest.approx(expected[1].item(), abs=CENTROID_TOLERANCE_PX)
    # The affine flow really moves off-centre blobs (guards against a vacuous test).
    if key_position != (CENTRE, CENTRE):
        assert math.dist((x, y), key_position) > 1.0


# --------------------------------------------------------------------------- scale field


def test_scale_multiplies_warped_features() -> None:
    features = torch.randn(2, 5, SIZE, SIZE, dtype=torch.float64)
    flow = constant_flow(3, -2, batch=2)
    scale = torch.rand(2, 5, SIZE, SIZE, dtype=torch.float64) + 0.5
    torch.testing.assert_close(warp(features, flow, scale), warp(features, flow) * scale)


def test_single_channel_scale_broadcasts_over_channels() -> None:
    features = torch.randn(2, 5, SIZE, SIZE, dtype=torch.float64)
    flow = torch.randn(2, 2, SIZE, SIZE, dtype=torch.float64)
    scale = torch.rand(2, 1, SIZE, SIZE, dtype=torch.float64)
    full = scale.expand(2, 5, SIZE, SIZE).contiguous()
    torch.testing.assert_close(warp(features, flow, scale), warp(features, flow, full))


# --------------------------------------------------------------------------- shape errors


@pytest.mark.parametrize(
    ("features_shape", "flow_shape"),
    [
        ((2, 5, 16, 16), (2, 3, 16, 16)),  # flow with 3 channels
        ((2, 5, 16, 16), (2, 16, 16)),  # flow without batch
        ((5, 16, 16), (2, 16, 16)),  # features without batch
        ((2, 5, 16, 16), (2, 2, 16, 8)),  # different width
        ((2, 5, 16, 16), (2, 2, 8, 16)),  # different height
        ((2, 5, 16, 16), (1, 2, 16, 16)),  # different batch
    ],
)
def test_shape_errors_raise_value_error(features_shape, flow_shape) -> None:
    with pytest.raises(ValueError, match=r"features .*flow"):
        warp(torch.randn(*features_shape), torch.randn(*flow_shape))


@pytest.mark.parametrize(
    "scale_shape",
    [(2, 3, 16, 16), (2, 5, 1, 1), (1, 5, 16, 16), (2, 5, 16, 8)],
    ids=["channels", "spatial-broadcast", "batch-broadcast", "width"],
)
def test_scale_shape_errors_raise_value_error(scale_shape) -> None:
    with pytest.raises(ValueError, match="scale"):
        warp(torch.randn(2, 5, 16, 16), torch.zeros(2, 2, 16, 16), torch.ones(*scale_shape))


# --------------------------------------------------------------------------- gradients


def test_gradients_reach_features_flow_and_scale() -> None:
    features = torch.randn(2, 4, 16, 16, requires_grad=True)
    flow = (torch.rand(2, 2, 16, 16) * 4 - 2).requires_grad_()
    scale = (torch.rand(2, 4, 16, 16) + 0.5).requires_grad_()
    out = warp(features, flow, scale)
    (out * torch.randn_like(out)).sum().backward()
    for name, tensor in (("features", features), ("flow", flow), ("scale", scale)):
        assert tensor.grad is not None, name
        assert torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name


def test_gradcheck() -> None:
    """Analytic gradients match finite differences (float64; non-integer flow, away from kinks)."""
    features = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    flow = (torch.rand(1, 2, 6, 6, dtype=torch.float64) * 0.6 + 0.2).requires_grad_()
    scale = (torch.rand(1, 2, 6, 6, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(warp, (features, flow, scale), eps=1e-6, atol=1e-5)
