// Device helpers shared by the pooling kernels (pool.cu, bins.cu): accumulation types,
// conversions that avoid the implicit __half / __nv_bfloat16 operators (torch builds disable them),
// 16-byte packs, launch-size helpers. Torch-free.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../cpu/common.h"

namespace fastattn {
namespace pooldev {

// The storage type of a DType on the device.
template <DType> struct Storage;
template <> struct Storage<DType::Float32> { using type = float; };
template <> struct Storage<DType::Float64> { using type = double; };
template <> struct Storage<DType::Float16> { using type = __half; };
template <> struct Storage<DType::BFloat16> { using type = __nv_bfloat16; };

// Math type: double for double, float for float / __half / __nv_bfloat16.
template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };
template <typename T> using acc = typename AccT<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// One rounding from the math type to T.
template <typename T> __device__ __forceinline__ T from_acc(acc<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// From a double (the per-plane results computed in double): through float for the 32/16-bit
// types, as the CPU kernels do.
template <typename T> __device__ __forceinline__ T dev_from_double(double v) {
  return from_acc<T>(static_cast<acc<T>>(v));
}

template <typename A> __device__ __forceinline__ A quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

template <typename A> __device__ __forceinline__ A minus_inf();
template <> __device__ __forceinline__ float minus_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double minus_inf<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
}

// V elements moved as one 16-byte (or 8-byte) access; the address must be aligned to its size.
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

// Elements of T in 16 bytes.
template <typename T> constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t lmax(int64_t a, int64_t b) { return a < b ? b : a; }

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Streaming multiprocessors of the current device (132 when the query fails: an H100's count).
inline int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      n <= 0) {
    cudaGetLastError();  // clear a sticky-free error of the query
    return 132;
  }
  return n;
}

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

}  // namespace pooldev
}  // namespace fastattn
