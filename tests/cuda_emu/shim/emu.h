// A CPU stand-in for the parts of the CUDA runtime and device language that csrc/cuda/*.cu use,
// so that their kernels run, unmodified, on CPU tensors (tests/cuda_emu/build.py rewrites only the
// <<<...>>> launches and the extern __shared__ declarations). Each block runs alone; its threads
// are real threads, __syncthreads a barrier of the block, __shfl_down_sync and __shfl_xor_sync
// exchanges through a barrier of the warp. Slow, for correctness only: indexing, splits, merges,
// alignment paths.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "../csrc/cpu/common.h"  // (build tree copy: tests/cuda_emu/build.py)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

using std::isfinite;
using std::isnan;
using std::sqrt;

// The device language's integer min / max (one type: the kernels call them on int64_t pairs).
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 {
  unsigned x, y, z;
};

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
using cudaStream_t = void*;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {
inline int sm_count = 4;
inline cudaError_t last_error = cudaSuccess;
inline unsigned char* dyn_smem = nullptr;
struct Warp {
  std::barrier<> bar{32};
  alignas(16) unsigned char slot[32][16];
};
inline thread_local std::barrier<>* block_bar = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local int lane = 0;
}  // namespace emu

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
// the SM count is the test's choice (set_sm_count); shared memory per block: an H100's 227 KiB
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu::sm_count : 232448;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { cudaError_t e = emu::last_error; emu::last_error = cudaSuccess; return e; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated launch error"; }

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp->bar.arrive_and_wait(); }

// Shuffles within segments of `width` lanes (a power of two up to 32): a source lane outside the
// caller's segment leaves the caller's own value, as on the GPU.
template <typename V>
V __shfl_down_sync(unsigned, V v, int o, int width = 32) {
  static_assert(sizeof(V) <= 16, "shuffle of a value over 16 bytes");
  std::memcpy(emu::warp->slot[emu::lane], &v, sizeof(V));
  emu::warp->bar.arrive_and_wait();
  V r = v;
  if (emu::lane % width + o < width) std::memcpy(&r, emu::warp->slot[emu::lane + o], sizeof(V));
  emu::warp->bar.arrive_and_wait();
  return r;
}

// Butterfly exchange: lane i reads lane i ^ m.
template <typename V>
V __shfl_xor_sync(unsigned, V v, int m, int width = 32) {
  static_assert(sizeof(V) <= 16, "shuffle of a value over 16 bytes");
  std::memcpy(emu::warp->slot[emu::lane], &v, sizeof(V));
  emu::warp->bar.arrive_and_wait();
  V r = v;
  const int src_lane = emu::lane ^ m;
  if (src_lane < (emu::lane / width + 1) * width) std::memcpy(&r, emu::warp->slot[src_lane], sizeof(V));
  emu::warp->bar.arrive_and_wait();
  return r;
}

// 8- and 16-byte vector types (the kernels' raw vector loads) and the read-only-cache load.
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
template <typename V>
V __ldg(const V* p) { return *p; }

// The fast-math exponential (glibc declares __expf but does not export it).
#define __expf(t) std::exp(static_cast<float>(t))

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }

// 16-bit floats: the bit patterns, converted by the CPU kernels' own routines.
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { return fastattn::to_float(fastattn::fp16_t{h.bits}); }
inline __half __float2half_rn(float f) { return __half{fastattn::from_float<fastattn::fp16_t>(f).bits}; }
inline float __bfloat162float(__nv_bfloat16 h) { return fastattn::to_float(fastattn::bf16_t{h.bits}); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{fastattn::from_float<fastattn::bf16_t>(f).bits}; }

namespace emu {
// Launch: every block in turn, its threads concurrently. A thread that returns leaves the block's
// and its warp's barriers (arrive_and_drop), as finished threads do on a GPU.
inline void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, const std::function<void()>& kernel) {
  const unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > 1024 || n % 32 != 0 || grid.y > 65535 || grid.z > 65535 || smem > 48 * 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  std::vector<unsigned char> dyn(smem + 16);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(dyn.data(), 0xA5, dyn.size());   // garbage, as uninitialised shared memory
        dyn_smem = dyn.data() + (16 - reinterpret_cast<uintptr_t>(dyn.data()) % 16) % 16;
        std::barrier<> bar(n);
        std::vector<Warp> warps(n / 32);
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([&, t] {
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockIdx = {bx, by, bz};
            blockDim = block;
            gridDim = grid;
            block_bar = &bar;
            warp = &warps[t / 32];
            lane = static_cast<int>(t % 32);
            kernel();
            warp->bar.arrive_and_drop();
            bar.arrive_and_drop();
          });
        for (auto& th : threads) th.join();
      }
}
}  // namespace emu
