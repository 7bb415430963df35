"""The CUDA warp kernel (engines/cuda/warp.cu, facestream.engines.cuda_warp) against the reference
warp (facestream.models.warp).

Three levels, so that most of it runs without a GPU:

- CPU, always: the source, the wrapper's argument checks and launch shape, the import without
  pycuda, :class:`CudaUnavailable`, the launch plumbing against a fake pycuda (which function,
  grid, block, stream, argument order); a numpy transcription of the kernel (``kernel_mirror``, line
  by line) against the reference on random inputs with out-of-range flow.
- CPU with nvcc (skipped only where nvcc is absent): nvcc compiles the source (object file and
  sm_90 cubin, warnings as errors); the kernel's own per-pixel code (``warp_scale_pixel`` and
  ``channel_range``, ``__host__ __device__``) compiled from warp.cu for the host and run over the
  same grid the GPU launch uses, float32 and float16, against the reference.
- GPU (``@pytest.mark.gpu``, auto-skipped without CUDA): the launched kernel against the reference,
  float32 within 1e-4, float16 within 2e-3, both scale shapes, on a non-default pycuda stream and
  on a torch side stream, torch tensors and raw pycuda allocations.

Reference values come from the float64 reference warp of the very inputs the kernel gets (float32
or float16 values widened), so the tolerances measure the kernel, not grid_sample's float32
normalised-coordinate round trip.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from facestream.engines import cuda_warp
from facestream.engines.cuda_warp import (
    BLOCK_SIZE,
    ENTRY_POINTS,
    INSTALL_HINT,
    KERNEL_SOURCE,
    CudaUnavailable,
    CudaWarp,
    KernelCompileError,
    WarpLayout,
    compile_check,
    compile_cubin,
    device_pointer,
    find_nvcc,
    launch_shape,
    warp_layout,
)
from facestream.models.warp import warp as reference_warp

NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")

# (B, C, H, W, scale channels, channels per thread): square and not, a single row and column,
# one channel group and several (with a short last group).
CASES = [
    (2, 5, 9, 13, 5, 8),
    (2, 5, 9, 13, 1, 2),
    (1, 7, 16, 16, 7, 3),
    (3, 4, 1, 11, 1, 8),
    (1, 3, 6, 1, 3, 1),
    (1, 9, 17, 23, 1, 4),
]
CASE_IDS = [f"{b}x{c}x{h}x{w}-s{s}-cpt{k}" for b, c, h, w, s, k in CASES]


def random_inputs(
    batch: int, channels: int, height: int, width: int, scale_channels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 features in [-1, 1], scale in [0.5, 1.5] and a flow that mixes four kinds of pixel:
    small sub-pixel flow, flow far outside the frame on every side, and flow landing exactly on
    the last and on the first column/row (the clamped far corner and the lower clamp)."""
    features = torch.rand(batch, channels, height, width, dtype=torch.float64) * 2 - 1
    scale = torch.rand(batch, scale_channels, height, width, dtype=torch.float64) + 0.5
    gy, gx = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    small = torch.randn(batch, 2, height, width, dtype=torch.float64) * 2
    far = (torch.rand(batch, 2, height, width, dtype=torch.float64) * 2 - 1) * 3 * max(height, width)
    to_last = torch.stack((width - 1 - gx, height - 1 - gy)).expand(batch, 2, height, width)
    to_first = torch.stack((-gx, -gy)).expand(batch, 2, height, width)
    kind = torch.randint(0, 4, (batch, 1, height, width))
    flow = torch.where(
        kind == 0, small, torch.where(kind == 1, far, torch.where(kind == 2, to_last, to_first))
    )
    return features, flow, scale


def reference(features: torch.Tensor, flow: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """The reference warp in float64 of exactly these (possibly float32/float16) values."""
    widened = (t.detach().cpu().double() for t in (features, flow, scale))
    return reference_warp(*widened).numpy()


def layout_of(features: torch.Tensor, scale: torch.Tensor, dtype: str = "float32") -> WarpLayout:
    b, c, h, w = features.shape
    return WarpLayout(b, c, h, w, scale.shape[1], dtype)


# --------------------------------------------------------------------------- numpy mirror of warp.cu


def channel_range(channels: int, groups: int, group: int) -> tuple[int, int]:
    """warp.cu ``channel_range``, line by line."""
    per_group = (channels + groups - 1) // groups
    first = group * per_group
    last = first + per_group
    return min(first, channels), min(last, channels)


def kernel_mirror(
    features: np.ndarray,
    flow: np.ndarray,
    scale: np.ndarray,
    *,
    groups: int,
    block: int = BLOCK_SIZE,
    real: type[np.floating] = np.float32,
) -> np.ndarray:
    """numpy transcription of warp.cu, line by line: ``warp_scale`` (the thread's indices) ->
    ``channel_range`` -> ``warp_scale_pixel``, computed in ``real`` (float32 like the kernel;
    float64 to check the index math exactly). The threads of one (b, group) run as one vector over
    ``pixel``; every other line is the kernel's, in its order. Flat NCHW buffers as in the kernel;
    out starts as NaN so that an output no thread writes shows up."""
    batch, channels, height, width = features.shape
    scale_channels = scale.shape[1]
    f, fl, s = (np.ascontiguousarray(a, dtype=real).ravel() for a in (features, flow, scale))
    out = np.full(features.size, np.nan, dtype=real)
    blocks = -(-height * width // block)
    for b in range(batch):  # blockIdx.z
        for group in range(groups):  # blockIdx.y
            pixel = np.arange(blocks * block)  # blockIdx.x * blockDim.x + threadIdx.x
            pixel = pixel[pixel < height * width]  # if (pixel >= H * W || b >= B) return;
            c_begin, c_end = channel_range(channels, groups, group)
            # warp_scale_pixel
            plane = height * width
            y = pixel // width
            x = pixel - y * width
            flow_b = b * 2 * plane
            sx = x.astype(real) + fl[flow_b + pixel]
            sy = y.astype(real) + fl[flow_b + plane + pixel]
            sx = np.minimum(np.maximum(sx, real(0)), real(width - 1))
            sy = np.minimum(np.maximum(sy, real(0)), real(height - 1))
            fx0 = np.floor(sx)
            fy0 = np.floor(sy)
            x0 = fx0.astype(np.int64)
            y0 = fy0.astype(np.int64)
            x1 = np.where(x0 + 1 < width, x0 + 1, width - 1)
            y1 = np.where(y0 + 1 < height, y0 + 1, height - 1)
            ax = sx - fx0
            ay = sy - fy0
            w00 = (real(1) - ax) * (real(1) - ay)
            w01 = ax * (real(1) - ay)
            w10 = (real(1) - ax) * ay
            w11 = ax * ay
            i00 = y0 * width + x0
            i01 = y0 * width + x1
            i10 = y1 * width + x0
            i11 = y1 * width + x1
            for c in range(c_begin, c_end):
                fc = (b * channels + c) * plane
                sampled = w00 * f[fc + i00] + w01 * f[fc + i01] + w10 * f[fc + i10] + w11 * f[fc + i11]
                sc = 0 if scale_channels == 1 else c
                s_value = s[(b * scale_channels + sc) * plane + pixel]
                out[(b * channels + c) * plane + pixel] = s_value * sampled
    return out.reshape(features.shape)


@pytest.mark.parametrize(
    ("batch", "channels", "height", "width", "scale_channels", "per_thread"), CASES, ids=CASE_IDS
)
def test_kernel_mirror_float64_equals_reference(
    batch, channels, height, width, scale_channels, per_thread
) -> None:
    """In float64 the kernel's index math, clamping and weights reproduce the reference exactly."""
    features, flow, scale = random_inputs(batch, channels, height, width, scale_channels)
    groups = launch_shape(layout_of(features, scale), per_thread)[0][1]
    out = kernel_mirror(features.numpy(), flow.numpy(), scale.numpy(), groups=groups, real=np.float64)
    np.testing.assert_allclose(out, reference(features, flow, scale), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("batch", "channels", "height", "width", "scale_channels", "per_thread"), CASES, ids=CASE_IDS
)
def test_kernel_mirror_float32_matches_reference(
    batch, channels, height, width, scale_channels, per_thread
) -> None:
    features, flow, scale = (t.float() for t in random_inputs(batch, channels, height, width, scale_channels))
    groups = launch_shape(layout_of(features, scale), per_thread)[0][1]
    out = kernel_mirror(features.numpy(), flow.numpy(), scale.numpy(), groups=groups)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference(features, flow, scale), rtol=0, atol=1e-5)


def test_kernel_mirror_small_block_and_empty_group_cover_every_output() -> None:
    """Blocks smaller than the map (a partial last one) and more channel groups than needed
    (C = 5 over 4 groups: 2, 2, 1, 0 channels) still write every output exactly."""
    features, flow, scale = random_inputs(2, 5, 5, 7, 1)
    out = kernel_mirror(features.numpy(), flow.numpy(), scale.numpy(), groups=4, block=8, real=np.float64)
    np.testing.assert_allclose(out, reference(features, flow, scale), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the source and nvcc


def test_kernel_source_has_both_entry_points_and_no_other_dependency() -> None:
    source = KERNEL_SOURCE.read_text(encoding="utf-8")
    for name in ENTRY_POINTS.values():
        assert re.search(rf'extern "C" __global__ void[^;{{]*?\b{name}\(', source), name
    assert re.findall(r"#include\s*[<\"]([^>\"]+)", source) == ["cuda_fp16.h"]
    assert "int main" not in source


def test_kernel_source_ships_with_the_engines_package() -> None:
    assert KERNEL_SOURCE == Path(cuda_warp.__file__).parent / "cuda" / "warp.cu"
    assert KERNEL_SOURCE.is_file()


@needs_nvcc
@pytest.mark.parametrize("arch", [None, "sm_90"], ids=["nvcc-default-arch", "sm_90"])
def test_nvcc_compiles_the_kernel(arch: str | None) -> None:
    result = compile_check(arch=arch)
    assert result.returncode == 0


@needs_nvcc
def test_compile_cubin_for_h100() -> None:
    cubin = compile_cubin("sm_90")
    assert cubin[:4] == b"\x7fELF"
    for name in ENTRY_POINTS.values():
        assert name.encode() in cubin


@needs_nvcc
def test_compile_error_carries_nvcc_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "warp.cu"
    broken.write_text('extern "C" __global__ void warp_scale_f32(float* out) { out[0] = undeclared; }\n')
    monkeypatch.setattr(cuda_warp, "KERNEL_SOURCE", broken)
    with pytest.raises(KernelCompileError, match=r"(?s)nvcc failed.*undeclared"):
        compile_check()


def test_missing_nvcc_raises_cuda_unavailable() -> None:
    assert find_nvcc("/nonexistent/bin/nvcc") is None
    with pytest.raises(CudaUnavailable, match="nvcc"):
        compile_check(nvcc="/nonexistent/bin/nvcc")


# --------------------------------------------------------------------------- warp.cu's own code on the CPU

HOST_HARNESS = r"""
#include "warp.cu"

// The kernel's launch run serially on the host: blockIdx.z = b, blockIdx.y = group,
// pixel = blockIdx.x * blockDim.x + threadIdx.x; then warp_scale's guard and calls, unchanged.
template <typename T>
static void run(const T* features, const T* flow, const T* scale, T* out, int B, int C, int H,
                int W, int scale_channels, int groups, int block) {
  const int blocks = (H * W + block - 1) / block;
  for (int b = 0; b < B; ++b)
    for (int group = 0; group < groups; ++group)
      for (int bx = 0; bx < blocks; ++bx)
        for (int tx = 0; tx < block; ++tx) {
          const int pixel = bx * block + tx;
          if (pixel >= H * W) continue;
          int c_begin;
          int c_end;
          facestream_warp::channel_range(C, groups, group, &c_begin, &c_end);
          facestream_warp::warp_scale_pixel<T>(features, flow, scale, out, b, c_begin, c_end, C, H,
                                               W, scale_channels, pixel);
        }
}

extern "C" void host_warp_scale_f32(const float* f, const float* fl, const float* s, float* o,
                                    int B, int C, int H, int W, int sc, int groups, int block) {
  run<float>(f, fl, s, o, B, C, H, W, sc, groups, block);
}

extern "C" void host_warp_scale_f16(const __half* f, const __half* fl, const __half* s, __half* o,
                                    int B, int C, int H, int W, int sc, int groups, int block) {
  run<__half>(f, fl, s, o, B, C, H, W, sc, groups, block);
}
"""


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """warp.cu's per-pixel code compiled for the host by nvcc into a shared library."""
    if NVCC is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed")
    folder = tmp_path_factory.mktemp("warp-host")
    (folder / "harness.cu").write_text(HOST_HARNESS, encoding="utf-8")
    library = folder / "libwarp_host.so"
    command = [NVCC, "-shared", "-Xcompiler=-fPIC", f"-I{KERNEL_SOURCE.parent}", "-Werror", "all-warnings"]
    result = subprocess.run(
        [*command, "-o", str(library), str(folder / "harness.cu")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


def run_host_kernel(
    library: ctypes.CDLL,
    features: np.ndarray,
    flow: np.ndarray,
    scale: np.ndarray,
    *,
    groups: int,
    block: int,
) -> np.ndarray:
    dtype = features.dtype
    arrays = [np.ascontiguousarray(a, dtype=dtype) for a in (features, flow, scale)]
    out = np.full_like(arrays[0], np.nan)
    function = getattr(library, f"host_warp_scale_{'f32' if dtype == np.float32 else 'f16'}")
    pointers = [ctypes.c_void_p(a.ctypes.data) for a in (*arrays, out)]
    batch, channels, height, width = features.shape
    function(*pointers, batch, channels, height, width, scale.shape[1], groups, block)
    return out


@needs_nvcc
@pytest.mark.parametrize(
    ("batch", "channels", "height", "width", "scale_channels", "per_thread"), CASES, ids=CASE_IDS
)
def test_kernel_code_on_host_float32_matches_reference_and_mirror(
    host_kernel, batch, channels, height, width, scale_channels, per_thread
) -> None:
    features, flow, scale = (t.float() for t in random_inputs(batch, channels, height, width, scale_channels))
    (_, groups, _), (block, _, _) = launch_shape(layout_of(features, scale), per_thread)
    arrays = [t.numpy() for t in (features, flow, scale)]
    out = run_host_kernel(host_kernel, *arrays, groups=groups, block=block)
    np.testing.assert_allclose(out, reference(features, flow, scale), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out, kernel_mirror(*arrays, groups=groups), rtol=0, atol=1e-6)


@needs_nvcc
def test_kernel_code_on_host_small_block_and_empty_group(host_kernel) -> None:
    features, flow, scale = (t.float() for t in random_inputs(2, 5, 5, 7, 5))
    out = run_host_kernel(host_kernel, *(t.numpy() for t in (features, flow, scale)), groups=4, block=8)
    np.testing.assert_allclose(out, reference(features, flow, scale), rtol=0, atol=1e-5)


@needs_nvcc
@pytest.mark.parametrize("scale_channels", [1, 6])
def test_kernel_code_on_host_float16_matches_reference(host_kernel, scale_channels: int) -> None:
    features, flow, scale = (t.half() for t in random_inputs(2, 6, 12, 10, scale_channels))
    (_, groups, _), (block, _, _) = launch_shape(layout_of(features, scale, "float16"), 4)
    out = run_host_kernel(
        host_kernel, *(t.numpy() for t in (features, flow, scale)), groups=groups, block=block
    )
    assert out.dtype == np.float16
    # float32 arithmetic, one rounding to half on store: |out| <= 1.5, half ulp there is 2**-10.
    np.testing.assert_allclose(out.astype(np.float64), reference(features, flow, scale), rtol=0, atol=1e-3)


# --------------------------------------------------------------------------- wrapper (CPU)


def test_module_imports_without_pycuda() -> None:
    code = (
        "import sys; sys.modules['pycuda'] = None\n"
        "import facestream.engines.cuda_warp as m\n"
        "assert m.KERNEL_SOURCE.is_file()\n"
        "assert not any(k.startswith('pycuda.') for k in sys.modules), sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_cuda_warp_without_pycuda_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(CudaUnavailable) as info:
        CudaWarp()
    assert "pycuda" in str(info.value)
    assert INSTALL_HINT in str(info.value)
    assert isinstance(info.value, RuntimeError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_warp_without_gpu_raises_cuda_unavailable() -> None:
    with pytest.raises(CudaUnavailable, match=r"pycuda|CUDA|GPU"):
        CudaWarp()


def test_warp_layout_from_tensors() -> None:
    features = torch.zeros(2, 5, 9, 13)
    flow, out = torch.zeros(2, 2, 9, 13), torch.zeros(2, 5, 9, 13)
    for scale_channels in (1, 5):
        scale = torch.zeros(2, scale_channels, 9, 13)
        assert warp_layout(features, flow, scale, out) == WarpLayout(2, 5, 9, 13, scale_channels, "float32")
    half = [t.half() for t in (features, flow, torch.zeros(2, 1, 9, 13), out)]
    assert warp_layout(*half).dtype == "float16"


def test_warp_layout_of_raw_buffers_needs_shape_and_dtype() -> None:
    layout = warp_layout(1, 2, 3, 4, shape=(1, 4, 8, 8), scale_channels=1, dtype=np.float16)
    assert layout == WarpLayout(1, 4, 8, 8, 1, "float16")
    with pytest.raises(ValueError, match="shape="):
        warp_layout(1, 2, 3, 4, scale_channels=1, dtype="float32")
    with pytest.raises(ValueError, match="scale_channels="):
        warp_layout(1, 2, 3, 4, shape=(1, 4, 8, 8), dtype="float32")
    with pytest.raises(ValueError, match="dtype"):
        warp_layout(1, 2, 3, 4, shape=(1, 4, 8, 8), scale_channels=1)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 5, 9, 13), (2, 3, 9, 13), (2, 1, 9, 13), (2, 5, 9, 13)), "flow must be"),
        (((2, 5, 9, 13), (2, 2, 9, 12), (2, 1, 9, 13), (2, 5, 9, 13)), "flow must be"),
        (((2, 5, 9, 13), (2, 2, 9, 13), (2, 3, 9, 13), (2, 5, 9, 13)), "scale must have 1 or C=5"),
        (((2, 5, 9, 13), (2, 2, 9, 13), (1, 1, 9, 13), (2, 5, 9, 13)), "scale must be"),
        (((2, 5, 9, 13), (2, 2, 9, 13), (2, 1, 9, 13), (2, 4, 9, 13)), "out must be"),
        (((5, 9, 13), (2, 2, 9, 13), (2, 1, 9, 13), (5, 9, 13)), r"features must be \(B, C, H, W\)"),
    ],
    ids=["flow-channels", "flow-width", "scale-channels", "scale-batch", "out", "features-3d"],
)
def test_warp_layout_shape_errors(shapes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        warp_layout(*(torch.zeros(*s) for s in shapes))


@pytest.mark.parametrize(
    ("dtypes", "message"),
    [
        ((torch.float32, torch.float16, torch.float32, torch.float32), "one dtype"),
        ((torch.float64,) * 4, "dtype must be one of float32, float16"),
    ],
)
def test_warp_layout_dtype_errors(dtypes, message: str) -> None:
    shapes = ((1, 2, 4, 4), (1, 2, 4, 4), (1, 1, 4, 4), (1, 2, 4, 4))
    with pytest.raises(ValueError, match=message):
        warp_layout(*(torch.zeros(*s, dtype=d) for s, d in zip(shapes, dtypes, strict=True)))


@pytest.mark.parametrize(
    ("channels", "per_thread", "groups"), [(5, 8, 1), (256, 8, 32), (7, 3, 3), (1, 1, 1)]
)
def test_launch_shape_covers_every_pixel_and_channel(channels: int, per_thread: int, groups: int) -> None:
    layout = WarpLayout(3, channels, 17, 23, 1, "float32")
    grid, block = launch_shape(layout, per_thread)
    assert block == (BLOCK_SIZE, 1, 1)
    assert grid[1:] == (groups, 3)
    assert grid[0] * BLOCK_SIZE >= 17 * 23 > (grid[0] - 1) * BLOCK_SIZE
    covered = [c for g in range(groups) for c in range(*channel_range(channels, groups, g))]
    assert covered == list(range(channels))


def test_device_pointer_accepts_addresses_and_rejects_host_memory() -> None:
    class Allocation:  # like pycuda's DeviceAllocation
        def __int__(self) -> int:
            return 0x7000

    assert device_pointer("features", 0x1234) == 0x1234
    assert device_pointer("features", Allocation()) == 0x7000
    with pytest.raises(TypeError, match="features is a tensor on cpu, not on a CUDA device"):
        device_pointer("features", torch.zeros(2))
    with pytest.raises(TypeError, match="flow is a host array"):
        device_pointer("flow", np.zeros(1))
    with pytest.raises(TypeError, match="scale must be a device buffer"):
        device_pointer("scale", "0x1234")


def test_argument_format_matches_the_kernel_signature() -> None:
    """pycuda packs the arguments by ARGUMENT_FORMAT: 4 pointers then 5 ints, as warp.cu declares."""
    source = KERNEL_SOURCE.read_text(encoding="utf-8")
    for name in ENTRY_POINTS.values():
        signature = re.search(rf"\b{name}\(([^)]*)\)", source)
        assert signature is not None, name
        parameters = signature.group(1).split(",")
        kinds = "".join("P" if "*" in p else "i" if p.split()[0] == "int" else "?" for p in parameters)
        assert kinds == cuda_warp.ARGUMENT_FORMAT, name


class FakeFunction:
    """Records pycuda Function calls (the API as CudaWarp uses it: prepare, prepared_async_call)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.format: str | None = None
        self.calls: list[tuple] = []

    def prepare(self, format: str) -> None:
        self.format = format

    def prepared_async_call(self, grid, block, stream, *args) -> None:
        self.calls.append((grid, block, stream, args))


class FakePycuda:
    """Just enough of ``pycuda.driver`` to construct CudaWarp and launch without a GPU: one device
    whose primary context counts pushes and pops, a module of :class:`FakeFunction`."""

    class Error(Exception):
        pass

    class Stream:
        pass

    def __init__(self) -> None:
        self.functions: dict[str, FakeFunction] = {}
        self.depth = 0  # context pushes not yet popped
        primary = SimpleNamespace(push=self._push)

        class Device:
            count = staticmethod(lambda: 1)

            def __init__(self, index: int) -> None:
                self.retain_primary_context = lambda: primary

        self.Device = Device
        self.Context = SimpleNamespace(
            get_current=lambda: None,
            get_device=lambda: SimpleNamespace(compute_capability=lambda: (9, 0)),
            pop=self._pop,
        )
        self.module_from_buffer = lambda cubin: SimpleNamespace(get_function=self._function)

    def init(self) -> None:
        pass

    def _push(self) -> None:
        self.depth += 1

    def _pop(self) -> None:
        self.depth -= 1

    def _function(self, name: str) -> FakeFunction:
        return self.functions.setdefault(name, FakeFunction(name))


@pytest.fixture
def fake_warp(monkeypatch: pytest.MonkeyPatch) -> tuple[CudaWarp, FakePycuda, list[str]]:
    fake, archs = FakePycuda(), []

    def compile_cubin(arch: str, nvcc: str = "nvcc") -> bytes:
        archs.append(arch)
        return b"cubin"

    monkeypatch.setattr(cuda_warp, "_import_pycuda", lambda: fake)
    monkeypatch.setattr(cuda_warp, "compile_cubin", compile_cubin)
    return CudaWarp(channels_per_thread=2), fake, archs


def test_launch_plumbing_with_a_fake_pycuda(fake_warp) -> None:
    """Which function, grid, block, stream and argument order reach pycuda (fake pycuda: the
    real API is exercised only by the GPU tests)."""
    warp, fake, archs = fake_warp
    assert archs == ["sm_90"] and warp.arch == "sm_90"
    assert {f.format for f in fake.functions.values()} == {"PPPPiiiii"}
    stream = fake.Stream()
    out = warp.warp(
        0x1000, 0x2000, 0x3000, 0x4000, stream, shape=(2, 5, 9, 13), scale_channels=1, dtype="float16"
    )
    assert out == 0x4000
    (call,) = fake.functions["warp_scale_f16"].calls
    assert call == ((1, 3, 2), (BLOCK_SIZE, 1, 1), stream, (0x1000, 0x2000, 0x3000, 0x4000, 2, 5, 9, 13, 1))
    assert not fake.functions["warp_scale_f32"].calls
    assert fake.depth == 0  # every context push popped


def test_launch_plumbing_rejects_bad_calls(fake_warp) -> None:
    warp, fake, _ = fake_warp
    raw = {"shape": (1, 2, 4, 4), "scale_channels": 1, "dtype": "float32"}
    with pytest.raises(ValueError, match="pass out="):
        warp.warp(0x1000, 0x2000, 0x3000, **raw)
    with pytest.raises(ValueError, match="in place"):
        warp.warp(0x1000, 0x2000, 0x3000, 0x1000, **raw)
    with pytest.raises(TypeError, match="stream must be a pycuda.driver.Stream, a torch.cuda.Stream or None"):
        warp.warp(0x1000, 0x2000, 0x3000, 0x4000, "stream", **raw)
    with pytest.raises(TypeError, match="not on a CUDA device"):
        warp.warp(*(torch.zeros(1, c, 4, 4) for c in (2, 2, 1, 2)))
    assert not any(f.calls for f in fake.functions.values())
    assert fake.depth == 0


# --------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def gpu_warp() -> CudaWarp:
    try:
        return CudaWarp()
    except CudaUnavailable as exc:
        pytest.skip(str(exc))


def cuda_inputs(
    batch: int, channels: int, height: int, width: int, scale_channels: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(  # type: ignore[return-value]
        t.to("cuda", dtype).contiguous()
        for t in random_inputs(batch, channels, height, width, scale_channels)
    )


GPU_SIZES = [(2, 5, 33, 47), (1, 256, 64, 64), (3, 4, 1, 11)]


@pytest.mark.gpu
@pytest.mark.parametrize("size", GPU_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale_shape", ["one-channel", "per-channel"])
def test_gpu_float32_matches_reference(gpu_warp: CudaWarp, size, scale_shape: str) -> None:
    batch, channels, height, width = size
    scale_channels = 1 if scale_shape == "one-channel" else channels
    features, flow, scale = cuda_inputs(batch, channels, height, width, scale_channels, torch.float32)
    out = torch.full_like(features, float("nan"))
    gpu_warp.warp(features, flow, scale, out)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert np.abs(out.cpu().numpy() - reference(features, flow, scale)).max() <= 1e-4
    on_device = reference_warp(features, flow, scale)  # the float32 torch path on the GPU
    assert (out - on_device).abs().max().item() <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("scale_shape", ["one-channel", "per-channel"])
def test_gpu_float16_matches_reference(gpu_warp: CudaWarp, scale_shape: str) -> None:
    features, flow, scale = cuda_inputs(2, 6, 40, 36, 1 if scale_shape == "one-channel" else 6, torch.float16)
    out = torch.empty_like(features)
    gpu_warp.warp(features, flow, scale, out)
    torch.cuda.synchronize()
    assert out.dtype == torch.float16
    assert np.abs(out.double().cpu().numpy() - reference(features, flow, scale)).max() <= 2e-3


@pytest.mark.gpu
def test_gpu_runs_on_a_non_default_stream(gpu_warp: CudaWarp) -> None:
    import pycuda.driver as cuda

    features, flow, scale = cuda_inputs(2, 8, 32, 32, 8, torch.float32)
    torch.cuda.synchronize()
    with gpu_warp.activated():
        stream = cuda.Stream()
    out = torch.full_like(features, float("nan"))
    torch.cuda.synchronize()
    gpu_warp.warp(features, flow, scale, out, stream)
    with gpu_warp.activated():
        stream.synchronize()
    assert np.abs(out.cpu().numpy() - reference(features, flow, scale)).max() <= 1e-4


@pytest.mark.gpu
def test_gpu_raw_pycuda_allocations(gpu_warp: CudaWarp) -> None:
    import pycuda.driver as cuda

    features, flow, scale = (t.float().numpy() for t in random_inputs(1, 5, 20, 24, 1))
    out = np.full_like(features, np.nan)
    with gpu_warp.activated():
        buffers = [cuda.mem_alloc(a.nbytes) for a in (features, flow, scale, out)]
        for buffer, array in zip(buffers, (features, flow, scale), strict=False):
            cuda.memcpy_htod(buffer, array)
        gpu_warp.warp(*buffers, shape=features.shape, scale_channels=1, dtype=np.float32)
        cuda.memcpy_dtoh(out, buffers[3])
    expected = reference(*(torch.from_numpy(a) for a in (features, flow, scale)))
    assert np.abs(out - expected).max() <= 1e-4


@pytest.mark.gpu
def test_gpu_torch_side_stream_and_allocated_out(gpu_warp: CudaWarp) -> None:
    """How the TensorRT backend calls it: torch tensors made on a torch side stream, no out, no
    stream (torch's current one); the result is ordered before the side stream's later work."""
    base = cuda_inputs(2, 6, 24, 20, 1, torch.float32)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        features, flow, scale = (t * 1 for t in base)  # written on the side stream just before the call
        out = gpu_warp.warp(features, flow, scale)
        result = out.clone()  # read on the side stream right after it
    side.synchronize()
    assert isinstance(out, torch.Tensor) and out.shape == features.shape
    assert np.abs(result.cpu().numpy() - reference(*base)).max() <= 1e-4
    explicit = gpu_warp.warp(*base, stream=side)
    side.synchronize()
    assert torch.equal(explicit, result)


@pytest.mark.gpu
def test_gpu_rejects_in_place_and_foreign_streams(gpu_warp: CudaWarp) -> None:
    features, flow, scale = cuda_inputs(1, 2, 8, 8, 1, torch.float32)
    with pytest.raises(ValueError, match="in place"):
        gpu_warp.warp(features, flow, scale, features)
    with pytest.raises(TypeError, match="stream must be"):
        gpu_warp.warp(features, flow, scale, torch.empty_like(features), 12345)
