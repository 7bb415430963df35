"""The custom CUDA warp kernel: ``W(f_k, M, S)`` in one pass, launched through pycuda.

The kernel (``cuda/warp.cu``, entry points ``warp_scale_f32`` and ``warp_scale_f16``) computes
exactly what the torch reference :func:`facestream.models.warp` computes::

    out[b, c, y, x] = scale[b, c or 0, y, x] * bilinear(features[b, c], x + flow[b, 0, y, x],
                                                                        y + flow[b, 1, y, x])

flow in pixels of the feature grid, x first, pixel centres at the integers (``align_corners=True``),
sample positions clamped to the frame (``padding_mode="border"``), scale with 1 or C channels.
All buffers are contiguous NCHW of one dtype, float32 or float16 (float16 is computed in float32).

Why pycuda and not a torch extension (``torch.utils.cpp_extension.load_inline``): pycuda needs only
``nvcc -cubin`` on this one .cu file (under a second on 2 CPU cores) and launches on raw device
buffers and pycuda streams, as a TensorRT worker that manages its memory with pycuda does.
``load_inline`` JIT-builds a C++ extension against torch's headers and ABI on first use (ninja, a
host compiler and a toolkit matching torch's CUDA; a C++ build of many seconds per fresh environment
and torch upgrade) for the one thing it would do better: launching on torch's current stream. That
is bridged here instead: torch CUDA tensors are accepted as buffers (``data_ptr()``), and since
pycuda cannot launch on a stream it did not create, on a torch side stream the kernel goes to the
context's legacy default stream (torch's own default stream) fenced by two device-side
``wait_stream`` calls, with no host synchronisation. So no torch path is built; the torch backend
keeps the reference warp (``grid_sample``).

pycuda is imported lazily, only here: importing this module needs neither pycuda nor a GPU;
constructing :class:`CudaWarp` without them raises :class:`CudaUnavailable`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

KERNEL_SOURCE = Path(__file__).parent / "cuda" / "warp.cu"
ENTRY_POINTS = {"float32": "warp_scale_f32", "float16": "warp_scale_f16"}
# Kernel arguments for pycuda's prepared calls: features, flow, scale, out, B, C, H, W, scale_channels.
ARGUMENT_FORMAT = "PPPPiiiii"
BLOCK_SIZE = 256  # threads per block; warp.cu declares __launch_bounds__(256)
CHANNELS_PER_THREAD = 8  # channels each thread warps (see warp.cu, "Thread mapping")
MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z
INT32_MAX = 2**31 - 1
INSTALL_HINT = "pip install 'facestream[gpu]'"
# nvcc strictness: every nvcc/cudafe/ptxas warning is an error.
STRICT_FLAGS = ("-Werror", "all-warnings")
NVCC_TIMEOUT_S = 300


class CudaUnavailable(RuntimeError):
    """pycuda, the CUDA driver, a GPU or nvcc is missing; the message says which and what to do."""


class KernelCompileError(RuntimeError):
    """nvcc rejected the kernel source; the message carries nvcc's command and output."""


# --------------------------------------------------------------------------- compiling


def find_nvcc(nvcc: str = "nvcc") -> str | None:
    """Path of the nvcc to use: ``nvcc`` on PATH (or as given), else ``$CUDA_HOME``/``$CUDA_PATH``
    or /usr/local/cuda's ``bin/nvcc``; None when there is none."""
    found = shutil.which(nvcc)
    if found or os.sep in nvcc:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        candidate = Path(root) / "bin" / "nvcc"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _require_nvcc(nvcc: str) -> str:
    path = find_nvcc(nvcc)
    if path is None:
        raise CudaUnavailable(
            f"nvcc ({nvcc!r}) was not found on PATH, in $CUDA_HOME or in /usr/local/cuda: install the "
            "CUDA toolkit or pass the path of nvcc"
        )
    return path


def _run_nvcc(command: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S, check=False)
    if result.returncode != 0:
        output = (result.stderr + result.stdout).strip()
        raise KernelCompileError(
            f"nvcc failed (exit {result.returncode}) on {KERNEL_SOURCE.name}:\n"
            f"  {' '.join(command)}\n{output}"
        )
    return result


def compile_check(nvcc: str = "nvcc", arch: str | None = None) -> subprocess.CompletedProcess[str]:
    """Compile the kernel source with ``nvcc -c`` into a temporary folder, warnings as errors
    (host compiler too: ``-Wall -Wextra -Werror``); ``arch`` like ``"sm_90"``, nvcc's default if
    None. Needs no GPU. Raises :class:`KernelCompileError` with nvcc's output when it fails and
    :class:`CudaUnavailable` when there is no nvcc."""
    path = _require_nvcc(nvcc)
    with tempfile.TemporaryDirectory(prefix="facestream-warp-") as folder:
        command = [path, "-c", str(KERNEL_SOURCE), "-o", str(Path(folder) / "warp.o"), *STRICT_FLAGS]
        command.append("-Xcompiler=-Wall,-Wextra,-Werror")
        if arch:
            command.append(f"-arch={arch}")
        return _run_nvcc(command)


def compile_cubin(arch: str, nvcc: str = "nvcc") -> bytes:
    """The kernel as a cubin for ``arch`` (``"sm_90"`` for an H100), warnings as errors."""
    path = _require_nvcc(nvcc)
    with tempfile.TemporaryDirectory(prefix="facestream-warp-") as folder:
        output = Path(folder) / "warp.cubin"
        _run_nvcc([path, "-cubin", f"-arch={arch}", str(KERNEL_SOURCE), "-o", str(output), *STRICT_FLAGS])
        return output.read_bytes()


# --------------------------------------------------------------------------- buffers and launch shape


@dataclass(frozen=True)
class WarpLayout:
    """Sizes of one warp call: features and out (B, C, H, W), flow (B, 2, H, W),
    scale (B, scale_channels, H, W), all of ``dtype`` ("float32" or "float16")."""

    batch: int
    channels: int
    height: int
    width: int
    scale_channels: int
    dtype: str


def dtype_name(dtype: Any) -> str:
    """``torch.float32``, ``numpy.float32``, ``np.dtype("float32")`` or ``"float32"`` -> ``"float32"``."""
    name = getattr(dtype, "__name__", None) or str(dtype)
    return name.removeprefix("torch.")


def _shape_of(buffer: Any) -> tuple[int, ...] | None:
    shape = getattr(buffer, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


def warp_layout(
    features: Any,
    flow: Any,
    scale: Any,
    out: Any,
    *,
    shape: tuple[int, int, int, int] | None = None,
    scale_channels: int | None = None,
    dtype: Any = None,
) -> WarpLayout:
    """Check the four buffers against each other and return the call's sizes.

    Buffers that carry ``shape``/``dtype`` (torch tensors, pycuda GPUArrays) are checked; for raw
    allocations pass ``shape`` (B, C, H, W), ``scale_channels`` and ``dtype``. Raises ValueError
    on a mismatch, naming what was received.
    """
    batch, channels, height, width = _features_shape(features, shape)
    scale_shape = _shape_of(scale)
    if scale_channels is None:
        if scale_shape is None or len(scale_shape) != 4:
            raise ValueError("pass scale_channels= (1 or C) for a scale buffer without a 4-d shape")
        scale_channels = scale_shape[1]
    if scale_channels not in (1, channels):
        raise ValueError(f"scale must have 1 or C={channels} channels, got {scale_channels}")
    expected = {
        "features": (batch, channels, height, width),
        "flow": (batch, 2, height, width),
        "scale": (batch, scale_channels, height, width),
        "out": (batch, channels, height, width),
    }
    for name, buffer in zip(expected, (features, flow, scale, out), strict=True):
        got = _shape_of(buffer)
        if got is not None and got != expected[name]:
            raise ValueError(
                f"{name} must be {expected[name]} (from features {expected['features']}), got {got}"
            )
    layout = WarpLayout(
        batch, channels, height, width, scale_channels, _common_dtype((features, flow, scale, out), dtype)
    )
    _check_limits(layout)
    return layout


def _features_shape(features: Any, shape: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    got = _shape_of(features)
    if shape is not None and got is not None and got != tuple(shape):
        raise ValueError(f"shape={tuple(shape)} but features has shape {got}")
    sizes = tuple(int(d) for d in shape) if shape is not None else got
    if sizes is None:
        raise ValueError("pass shape=(B, C, H, W) for a features buffer without a shape")
    if len(sizes) != 4 or min(sizes) <= 0:
        raise ValueError(f"features must be (B, C, H, W) with positive sizes, got {sizes}")
    return sizes[0], sizes[1], sizes[2], sizes[3]


def _common_dtype(buffers: tuple[Any, ...], dtype: Any) -> str:
    names = {dtype_name(b.dtype) for b in buffers if getattr(b, "dtype", None) is not None}
    if dtype is not None:
        names.add(dtype_name(dtype))
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise ValueError(
            f"features, flow, scale and out must share one dtype (pass dtype= for raw buffers), got {found}"
        )
    (name,) = names
    if name not in ENTRY_POINTS:
        raise ValueError(f"dtype must be one of {', '.join(ENTRY_POINTS)}, got {name}")
    return name


def _check_limits(layout: WarpLayout) -> None:
    if layout.batch > MAX_GRID_YZ:
        raise ValueError(f"batch {layout.batch} exceeds the kernel's grid limit {MAX_GRID_YZ}")
    if layout.batch * layout.channels * layout.height * layout.width > INT32_MAX:
        raise ValueError(f"{layout} has more than 2**31 - 1 elements per buffer")


def launch_shape(
    layout: WarpLayout, channels_per_thread: int = CHANNELS_PER_THREAD
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) for ``layout``: blocks of :data:`BLOCK_SIZE` pixels along x, channel groups of
    about ``channels_per_thread`` along y, batch along z (warp.cu splits C over gridDim.y)."""
    if channels_per_thread <= 0:
        raise ValueError(f"channels_per_thread must be positive, got {channels_per_thread}")
    pixels = layout.height * layout.width
    groups = min(-(-layout.channels // channels_per_thread), MAX_GRID_YZ)
    return (-(-pixels // BLOCK_SIZE), groups, layout.batch), (BLOCK_SIZE, 1, 1)


def device_pointer(name: str, buffer: Any) -> int:
    """The device address of a buffer: an int, a pycuda DeviceAllocation (``int()``), a pycuda
    GPUArray (``.gpudata``) or a contiguous torch CUDA tensor (``.data_ptr()``)."""
    if isinstance(buffer, int):
        return buffer
    if hasattr(buffer, "__array_interface__"):
        raise TypeError(f"{name} is a host array ({type(buffer).__name__}); copy it to the GPU first")
    if callable(getattr(buffer, "data_ptr", None)):  # torch.Tensor
        if not getattr(buffer, "is_cuda", False):
            raise TypeError(f"{name} is a tensor on {getattr(buffer, 'device', '?')}, not on a CUDA device")
        if not buffer.is_contiguous():
            raise ValueError(f"{name} must be contiguous (NCHW); call .contiguous() first")
        return int(buffer.data_ptr())
    gpudata = getattr(buffer, "gpudata", None)  # pycuda GPUArray
    if gpudata is not None:
        if not buffer.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous GPUArray")
        return int(gpudata)
    if hasattr(type(buffer), "__int__") and not isinstance(buffer, float):
        return int(buffer)  # pycuda DeviceAllocation
    raise TypeError(
        f"{name} must be a device buffer (int address, pycuda DeviceAllocation or GPUArray, torch "
        f"CUDA tensor), got {type(buffer).__name__}"
    )


# --------------------------------------------------------------------------- pycuda


def _import_pycuda() -> Any:
    """``pycuda.driver``, or CudaUnavailable saying what is missing."""
    try:
        import pycuda.driver as cuda
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "pycuda":
            raise CudaUnavailable(
                f"the CUDA warp kernel needs pycuda, which is not installed; install the GPU extra: "
                f"{INSTALL_HINT} (needs an NVIDIA driver and the CUDA toolkit)"
            ) from exc
        raise
    except (ImportError, OSError) as exc:  # e.g. libcuda.so missing: no NVIDIA driver
        raise CudaUnavailable(
            f"pycuda is installed but cannot be loaded ({exc}); install the NVIDIA driver, or reinstall "
            f"pycuda against this CUDA: {INSTALL_HINT}"
        ) from exc
    return cuda


def _default_context(cuda: Any, device: int) -> Any:
    """pycuda's current context if it has one (e.g. after ``import pycuda.autoinit``), else the
    device's primary context: the one the CUDA runtime, torch and TensorRT use."""
    try:
        cuda.init()
        count = cuda.Device.count()
    except cuda.Error as exc:
        raise CudaUnavailable(f"the CUDA driver cannot be initialised: {exc}") from exc
    if count == 0:
        raise CudaUnavailable("no CUDA GPU found (the driver lists 0 devices)")
    if not 0 <= device < count:
        raise ValueError(f"device must be in 0..{count - 1}, got {device}")
    current = cuda.Context.get_current()
    return current if current is not None else cuda.Device(device).retain_primary_context()


class CudaWarp:
    """The warp kernel loaded into one CUDA context, launched asynchronously on a given stream.

    Args:
        device: GPU index, used when ``context`` is None and pycuda has no current context.
        context: pycuda Context to load the kernel into; by default pycuda's current context, else
            ``device``'s primary context (shared with torch and TensorRT). Buffers and streams passed
            to :meth:`warp` must belong to this context; create streams inside :meth:`activated`.
        nvcc: nvcc to build the cubin with (for this GPU's ``sm_XY``, about a second).
        channels_per_thread: channels one thread warps (see warp.cu, "Thread mapping").

    Raises:
        CudaUnavailable: pycuda, the driver, a GPU or nvcc is missing (the message says which).
        KernelCompileError: nvcc rejected the source.
    """

    def __init__(
        self,
        *,
        device: int = 0,
        context: Any = None,
        nvcc: str = "nvcc",
        channels_per_thread: int = CHANNELS_PER_THREAD,
    ) -> None:
        if channels_per_thread <= 0:
            raise ValueError(f"channels_per_thread must be positive, got {channels_per_thread}")
        self._cuda = _import_pycuda()
        self.context = context if context is not None else _default_context(self._cuda, device)
        self.channels_per_thread = channels_per_thread
        with self.activated():
            major, minor = self._cuda.Context.get_device().compute_capability()
            self.arch = f"sm_{major}{minor}"
            self._module = self._cuda.module_from_buffer(compile_cubin(self.arch, nvcc=nvcc))
            self._functions = {dtype: self._prepared(name) for dtype, name in ENTRY_POINTS.items()}

    def _prepared(self, name: str) -> Any:
        function = self._module.get_function(name)
        function.prepare(ARGUMENT_FORMAT)
        return function

    @contextmanager
    def activated(self) -> Iterator[Any]:
        """Make this warp's context current in the block (e.g. to create a ``pycuda.driver.Stream``)."""
        self.context.push()
        try:
            yield self.context
        finally:
            self._cuda.Context.pop()

    def warp(
        self,
        features: Any,
        flow: Any,
        scale: Any,
        out: Any = None,
        stream: Any = None,
        *,
        shape: tuple[int, int, int, int] | None = None,
        scale_channels: int | None = None,
        dtype: Any = None,
    ) -> Any:
        """Enqueue ``out = W(features, flow, scale)``; returns ``out`` without waiting for it.

        Args:
            features: (B, C, H, W) key-frame features; device buffer (see :func:`device_pointer`).
            flow: (B, 2, H, W) flow in pixels, x first (the reference warp's convention).
            scale: (B, 1, H, W) or (B, C, H, W) scale field (pass ones for a plain warp).
            out: (B, C, H, W) output, distinct from the inputs; None allocates it with
                ``torch.empty_like(features)`` (torch tensors only).
            stream: a ``pycuda.driver.Stream`` of this context; a ``torch.cuda.Stream``; or None:
                torch's current stream for torch tensors, else the context's legacy default stream.
                The kernel is ordered after the stream's earlier work and before its later work.
            shape, scale_channels, dtype: required for buffers that carry no shape/dtype.
        """
        layout = warp_layout(
            features, flow, scale, out, shape=shape, scale_channels=scale_channels, dtype=dtype
        )
        if out is None:
            if not isinstance(features, torch.Tensor):
                raise ValueError("pass out= (the output buffer) unless the inputs are torch tensors")
            out = torch.empty_like(features, memory_format=torch.contiguous_format)
        names = ("features", "flow", "scale", "out")
        pointers = [device_pointer(n, b) for n, b in zip(names, (features, flow, scale, out), strict=True)]
        if pointers[3] in pointers[:3]:
            raise ValueError("out must not be one of the input buffers (the warp cannot run in place)")
        sizes = (layout.batch, layout.channels, layout.height, layout.width, layout.scale_channels)
        torch_stream = self._torch_stream(stream, features)
        self._enqueue(layout, (*pointers, *sizes), stream, torch_stream)
        return out

    def _enqueue(
        self, layout: WarpLayout, arguments: tuple, stream: Any, torch_stream: torch.cuda.Stream | None
    ) -> None:
        function = self._functions[layout.dtype]
        shape = launch_shape(layout, self.channels_per_thread)
        if torch_stream is None or torch_stream.cuda_stream == 0:
            # On the pycuda stream, or on the legacy default stream (handle 0) = torch's default stream.
            with self.activated():
                function.prepared_async_call(*shape, stream if torch_stream is None else None, *arguments)
            return
        # A torch side stream: run on the legacy default stream of the (primary) context, which is
        # torch's default stream, after the side stream's pending work and before its later work.
        legacy = torch.cuda.default_stream(torch_stream.device)
        legacy.wait_stream(torch_stream)
        with self.activated():
            function.prepared_async_call(*shape, None, *arguments)
        torch_stream.wait_stream(legacy)

    def _torch_stream(self, stream: Any, features: Any) -> torch.cuda.Stream | None:
        """The torch stream to order the launch on, or None for ``stream`` as given (pycuda/None)."""
        if isinstance(stream, torch.cuda.Stream):
            return stream
        if stream is not None and not isinstance(stream, self._cuda.Stream):
            raise TypeError(
                "stream must be a pycuda.driver.Stream, a torch.cuda.Stream or None, "
                f"got {type(stream).__name__}"
            )
        if stream is None and isinstance(features, torch.Tensor):
            return torch.cuda.current_stream(features.device)
        return None
