// Host stand-in of the CUDA runtime subset used by csrc/cuda/coord.cu and simam.cu, to run those
// kernels on a machine without a GPU (tests/test_cuda_sim.py). Each CUDA thread of a block is a
// std::thread, blocks run one after the other, __syncthreads/__syncwarp are barriers, shuffles go
// through per-warp slots, static __shared__ arrays become function statics (one block at a time).
// Dynamic shared memory is a fresh buffer per block, filled with 0xFF (NaN for floats: reads of
// unset data show) and followed by a guard checked after every block (overflows abort).
// It checks logic and indexing, not performance, coalescing or the memory model.
#pragma once
#include <array>
#include <typeinfo>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1) : x(a) {} };

namespace sim {
inline cudaError_t last_error = cudaSuccess;
inline size_t optin_limit = 227 * 1024;
inline size_t opted_in = 48 * 1024;   // largest dynamic smem the last cudaFuncSetAttribute allowed
inline thread_local dim3 tl_threadIdx, tl_blockIdx;
inline dim3 g_blockDim, g_gridDim;
inline thread_local std::barrier<>* tl_block_bar = nullptr;
inline thread_local std::barrier<>* tl_warp_bar = nullptr;
inline thread_local double* tl_warp_slots = nullptr;
inline unsigned char* g_dyn_smem = nullptr;
inline size_t g_dyn_bytes = 0;
inline long launches = 0;

template <class F>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, F body) {
  ++launches;
  if (std::getenv("SIM_TRACE")) std::fprintf(stderr, "launch %s grid %u block %u smem %zu\n", typeid(F).name(), grid.x, block.x, smem);
  if (grid.x < 1 || block.x < 1 || block.x > 1024 || smem > optin_limit || (smem > 48 * 1024 && smem > opted_in)) {
    std::fprintf(stderr, "sim: bad launch config grid %u block %u smem %zu\n", grid.x, block.x, smem);
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const unsigned n = block.x, nw = (n + 31) / 32;
  g_blockDim = block;
  g_gridDim = grid;
  std::barrier<> P(n);
  std::unique_ptr<std::barrier<>> bb;
  std::vector<std::unique_ptr<std::barrier<>>> wb(nw);
  std::vector<std::array<double, 32>> slots(nw);
  const size_t guard = 64;
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < n; ++t)
    ts.emplace_back([&, t] {
      for (unsigned blk = 0; blk < grid.x; ++blk) {
        P.arrive_and_wait();
        if (t == 0) {
          if (g_dyn_smem) {
            for (size_t i = 0; i < guard; ++i)
              if (g_dyn_smem[g_dyn_bytes + i] != 0xAB) { std::fprintf(stderr, "sim: shared memory overflow\n"); std::abort(); }
            delete[] g_dyn_smem;
          }
          g_dyn_bytes = smem;
          g_dyn_smem = new unsigned char[smem + guard];
          std::memset(g_dyn_smem, 0xFF, smem);
          std::memset(g_dyn_smem + smem, 0xAB, guard);
          bb = std::make_unique<std::barrier<>>(n);
          for (unsigned w = 0; w < nw; ++w) wb[w] = std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w));
        }
        P.arrive_and_wait();
        tl_threadIdx = dim3(t);
        tl_blockIdx = dim3(blk);
        tl_block_bar = bb.get();
        tl_warp_bar = wb[t / 32].get();
        tl_warp_slots = slots[t / 32].data();
        body();
        tl_block_bar->arrive_and_drop();
        tl_warp_bar->arrive_and_drop();
      }
    });
  for (auto& th : ts) th.join();
  for (size_t i = 0; i < guard; ++i)
    if (g_dyn_smem[g_dyn_bytes + i] != 0xAB) { std::fprintf(stderr, "sim: shared memory overflow\n"); std::abort(); }
  delete[] g_dyn_smem;
  g_dyn_smem = nullptr;
}
}  // namespace sim

#define threadIdx sim::tl_threadIdx
#define blockIdx sim::tl_blockIdx
#define blockDim sim::g_blockDim
#define gridDim sim::g_gridDim
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

inline void __syncthreads() { sim::tl_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { sim::tl_warp_bar->arrive_and_wait(); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int o) {
  static_assert(sizeof(T) <= sizeof(double));
  T* s = reinterpret_cast<T*>(sim::tl_warp_slots);
  const unsigned lane = threadIdx.x % 32;
  sim::tl_warp_bar->arrive_and_wait();
  s[lane] = v;
  sim::tl_warp_bar->arrive_and_wait();
  return s[lane ^ static_cast<unsigned>(o)];
}
inline float __expf(float v) { return std::exp(v); }

inline cudaError_t cudaGetLastError() { cudaError_t e = sim::last_error; sim::last_error = cudaSuccess; return e; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "sim error"; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = static_cast<int>(sim::optin_limit); return cudaSuccess; }
template <class K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int v) { sim::opted_in = static_cast<size_t>(v); return cudaSuccess; }
