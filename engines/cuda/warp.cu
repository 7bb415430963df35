// Deep Feature Flow propagation W(f_k, M, S) in one pass: bilinear warp of the key frame's
// features by the flow, times the scale field.
//
//   out[b, c, y, x] = scale[b, c or 0, y, x] * bilinear(features[b, c], x + flow[b, 0, y, x],
//                                                                       y + flow[b, 1, y, x])
//
// Same contract as the torch reference facestream.models.warp (grid_sample with
// align_corners=True, padding_mode="border"):
// - flow in pixels of the feature grid, x first; pixel centres are the integer coordinates
//   0..W-1 and 0..H-1;
// - border handling: the sample position is clamped to [0, W-1] x [0, H-1] BEFORE the bilinear
//   weights are taken, so a sample outside the key frame takes the value of the nearest border
//   point (not zero);
// - scale has 1 channel (broadcast over C) or C channels.
// All tensors are contiguous NCHW of one dtype (float or half). Arithmetic is in float for both;
// half values are converted on load and rounded to nearest on store. Flow must be finite.
//
// Thread mapping: one thread per output pixel (b, y, x) and channel group. The flow load, the
// clamping and the four bilinear weights and offsets are computed once per thread and reused for
// every channel of its group; per channel the thread does 4 gathers, 1 scale load, 1 store.
// Consecutive threads are consecutive x, so every load of flow/scale and every store is coalesced
// and the gathers of neighbouring threads hit neighbouring addresses. One thread per (b, c, y, x)
// would redo the flow loads and weights C times; one thread per (b, y, x) looping over all C
// leaves too few threads on a small map (64x64 = 4096 threads, about one warp per SM on an H100,
// with C = 256 serial iterations each). Channel groups keep both: the launcher picks the number of
// groups (gridDim.y), the kernel splits C evenly over them, so the arguments stay
// pointers + B, C, H, W, scale_channels.
//   grid  = (ceil(H*W / blockDim.x), groups, B), block = (blockDim.x, 1, 1)
//
// No dependency beyond the CUDA headers: compiles with `nvcc -c`, `nvcc -cubin`, NVRTC (the
// entry points are extern "C", no host code). The per-pixel arithmetic is a __host__ __device__
// function so that tests can compile and run exactly this code on a CPU.

#include <cuda_fp16.h>

namespace facestream_warp {

template <typename T>
struct Io;

template <>
struct Io<float> {
  static __host__ __device__ __forceinline__ float load(const float* p) { return *p; }
  static __host__ __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};

template <>
struct Io<__half> {
  static __host__ __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __host__ __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};

// Channels [*begin, *end) of channel group `group` out of `groups`: C split evenly, the last
// group(s) shorter or empty.
__host__ __device__ __forceinline__ void channel_range(int C, int groups, int group, int* begin,
                                                       int* end) {
  const int per_group = (C + groups - 1) / groups;
  const int first = group * per_group;
  const int last = first + per_group;
  *begin = first < C ? first : C;
  *end = last < C ? last : C;
}

// Output pixel `pixel` = y * W + x of batch item b, channels [c_begin, c_end).
template <typename T>
__host__ __device__ __forceinline__ void warp_scale_pixel(
    const T* __restrict__ features, const T* __restrict__ flow, const T* __restrict__ scale,
    T* __restrict__ out, int b, int c_begin, int c_end, int C, int H, int W, int scale_channels,
    int pixel) {
  const long long plane = (long long)H * W;
  const int y = pixel / W;
  const int x = pixel - y * W;

  // Sample position in key-frame pixels, clamped to the frame (border padding).
  const T* flow_b = flow + (long long)b * 2 * plane;
  float sx = (float)x + Io<T>::load(flow_b + pixel);
  float sy = (float)y + Io<T>::load(flow_b + plane + pixel);
  sx = fminf(fmaxf(sx, 0.0f), (float)(W - 1));
  sy = fminf(fmaxf(sy, 0.0f), (float)(H - 1));

  // Corners (x0, y0) .. (x1, y1); at the last row/column the far corner has weight 0 and is
  // clamped onto the near one so that it is never read out of bounds.
  const float fx0 = floorf(sx);
  const float fy0 = floorf(sy);
  const int x0 = (int)fx0;
  const int y0 = (int)fy0;
  const int x1 = x0 + 1 < W ? x0 + 1 : W - 1;
  const int y1 = y0 + 1 < H ? y0 + 1 : H - 1;
  const float ax = sx - fx0;  // weight of column x1
  const float ay = sy - fy0;  // weight of row y1
  const float w00 = (1.0f - ax) * (1.0f - ay);
  const float w01 = ax * (1.0f - ay);
  const float w10 = (1.0f - ax) * ay;
  const float w11 = ax * ay;
  const int i00 = y0 * W + x0;
  const int i01 = y0 * W + x1;
  const int i10 = y1 * W + x0;
  const int i11 = y1 * W + x1;

  for (int c = c_begin; c < c_end; ++c) {
    const T* f = features + ((long long)b * C + c) * plane;
    const float sampled = w00 * Io<T>::load(f + i00) + w01 * Io<T>::load(f + i01) +
                          w10 * Io<T>::load(f + i10) + w11 * Io<T>::load(f + i11);
    const int sc = scale_channels == 1 ? 0 : c;
    const float s = Io<T>::load(scale + ((long long)b * scale_channels + sc) * plane + pixel);
    Io<T>::store(out + ((long long)b * C + c) * plane + pixel, s * sampled);
  }
}

template <typename T>
__device__ __forceinline__ void warp_scale(const T* __restrict__ features, const T* __restrict__ flow,
                                           const T* __restrict__ scale, T* __restrict__ out, int B,
                                           int C, int H, int W, int scale_channels) {
  const int pixel = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.z;
  if (pixel >= H * W || b >= B) {
    return;
  }
  int c_begin;
  int c_end;
  channel_range(C, gridDim.y, blockIdx.y, &c_begin, &c_end);
  warp_scale_pixel<T>(features, flow, scale, out, b, c_begin, c_end, C, H, W, scale_channels,
                      pixel);
}

}  // namespace facestream_warp

extern "C" __global__ void __launch_bounds__(256)
    warp_scale_f32(const float* __restrict__ features, const float* __restrict__ flow,
                   const float* __restrict__ scale, float* __restrict__ out, int B, int C, int H,
                   int W, int scale_channels) {
  facestream_warp::warp_scale<float>(features, flow, scale, out, B, C, H, W, scale_channels);
}

extern "C" __global__ void __launch_bounds__(256)
    warp_scale_f16(const __half* __restrict__ features, const __half* __restrict__ flow,
                   const __half* __restrict__ scale, __half* __restrict__ out, int B, int C, int H,
                   int W, int scale_channels) {
  facestream_warp::warp_scale<__half>(features, flow, scale, out, B, C, H, W, scale_channels);
}
