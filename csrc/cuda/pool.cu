// Channel mean pool on CUDA. One read of x, fp32 accumulation, block reductions (no atomics).
#include "pool.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastattn {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float load(const float* p) { return __ldg(p); }
__device__ __forceinline__ double load(const double* p) { return __ldg(p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }

template <typename T> __device__ __forceinline__ T store_cast(double v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half store_cast<__half>(double v) { return __float2half(static_cast<float>(v)); }
template <> __device__ __forceinline__ __nv_bfloat16 store_cast<__nv_bfloat16>(double v) {
  return __float2bfloat16(static_cast<float>(v));
}

constexpr int kThreads = 256;

// Sum of one value per thread across the block; the result is valid in thread 0.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : A(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// H x W plane contiguous (NCHW): one block per (b, c).
template <typename T>
__global__ void mean_plane_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t C, int64_t HW,
                                  int64_t sb, int64_t sc) {
  using A = typename Acc<T>::type;
  const int64_t bc = blockIdx.x;
  const T* p = x + (bc / C) * sb + (bc % C) * sc;
  A acc = 0;
  for (int64_t i = threadIdx.x; i < HW; i += kThreads) acc += static_cast<A>(load(p + i));
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[bc] = store_cast<T>(static_cast<double>(acc) / static_cast<double>(HW));
}

// Channels contiguous (channels_last): a block covers 32 channels of one sample; its 8 warps
// stride over the H x W positions (coalesced 32-channel rows) and meet in shared memory.
constexpr int kChannelsPerBlock = 32;
constexpr int kRows = kThreads / kChannelsPerBlock;

template <typename T>
__global__ void mean_channels_last_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t C, int64_t H,
                                          int64_t W, int64_t sb, int64_t sh, int64_t sw, int64_t blocks_per_sample) {
  using A = typename Acc<T>::type;
  __shared__ A partial[kRows][kChannelsPerBlock];
  const int64_t b = blockIdx.x / blocks_per_sample;
  const int64_t c = (blockIdx.x % blocks_per_sample) * kChannelsPerBlock + threadIdx.x % kChannelsPerBlock;
  const int row = threadIdx.x / kChannelsPerBlock;
  const int64_t HW = H * W;
  A acc = 0;
  if (c < C) {
    const T* p = x + b * sb + c;
    for (int64_t i = row; i < HW; i += kRows) acc += static_cast<A>(load(p + (i / W) * sh + (i % W) * sw));
  }
  partial[row][threadIdx.x % kChannelsPerBlock] = acc;
  __syncthreads();
  if (row == 0 && c < C) {
    A total = 0;
    for (int r = 0; r < kRows; ++r) total += partial[r][threadIdx.x];
    out[b * C + c] = store_cast<T>(static_cast<double>(total) / static_cast<double>(HW));
  }
}

// Any other strides: one thread per (b, c). Correct, not fast.
template <typename T>
__global__ void mean_strided_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t B, int64_t C, int64_t H,
                                    int64_t W, int64_t sb, int64_t sc, int64_t sh, int64_t sw) {
  const int64_t bc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bc >= B * C) return;
  const T* p = x + (bc / C) * sb + (bc % C) * sc;
  double acc = 0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) acc += static_cast<double>(load(p + h * sh + w * sw));
  out[bc] = store_cast<T>(acc / static_cast<double>(H * W));
}

template <typename T>
cudaError_t launch(const T* x, T* out, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sb, int64_t sc,
                   int64_t sh, int64_t sw, cudaStream_t stream) {
  constexpr int64_t kMaxGridX = 2147483647;
  if (B * C == 0 || H * W == 0) return cudaSuccess;
  if ((sw == 1 || W == 1) && (sh == W || H == 1)) {
    if (B * C > kMaxGridX) return cudaErrorInvalidConfiguration;
    mean_plane_kernel<T><<<static_cast<unsigned>(B * C), kThreads, 0, stream>>>(x, out, C, H * W, sb, sc);
  } else if (sc == 1 || C == 1) {
    const int64_t per_sample = (C + kChannelsPerBlock - 1) / kChannelsPerBlock;
    if (B * per_sample > kMaxGridX) return cudaErrorInvalidConfiguration;
    mean_channels_last_kernel<T><<<static_cast<unsigned>(B * per_sample), kThreads, 0, stream>>>(
        x, out, C, H, W, sb, sh, sw, per_sample);
  } else {
    const int64_t blocks = (B * C + kThreads - 1) / kThreads;
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    mean_strided_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, out, B, C, H, W, sb, sc, sh, sw);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t channel_mean_cuda(const void* x, void* out, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                              int64_t sb, int64_t sc, int64_t sh, int64_t sw, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return launch(static_cast<const float*>(x), static_cast<float*>(out), B, C, H, W, sb, sc, sh, sw, stream);
    case DType::Float64:
      return launch(static_cast<const double*>(x), static_cast<double*>(out), B, C, H, W, sb, sc, sh, sw, stream);
    case DType::Float16:
      return launch(static_cast<const __half*>(x), static_cast<__half*>(out), B, C, H, W, sb, sc, sh, sw, stream);
    case DType::BFloat16:
      return launch(static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(out), B, C, H, W, sb, sc, sh,
                    sw, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastattn
