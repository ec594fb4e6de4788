// Large CPU outputs (8 MiB and more) from a cache of freed blocks.
//
// glibc serves blocks over 32 MiB from fresh mmaps and unmaps them on free, so every large output
// is page-faulted in again on its first write. On the 2-vCPU Xeon VM a fresh 103 MB fp32 map cost
// 21 ms of faults against 7.5 ms for the copy into it. Smaller blocks come from glibc's heap, but
// not reliably from pages already faulted in: the heap's top is trimmed and its mmap threshold
// moves, and a CoordinateAttention training step at 32x1024x14x14 (25.7 MB outputs) faulted 16000
// pages (63 MB) per step in the benchmark's loop, 29 ms a step against 18.5 ms with its outputs
// from this cache. A training loop allocates the same sizes every step, so a freed output is kept
// and handed to the next request of the same rounded size: no faults. No huge-page advice: a
// first touch of a 105 MB advised block took 15 to 245 ms on that VM (43 ms with 4 KiB pages),
// and SqueezeExcite training steps at 32x256x56x56 stalled for 100-360 ms now and then; reused
// blocks are faulted in once either way.
//
// Bounded: at most FASTATTN_CPU_CACHE_BYTES of freed blocks are kept (default 1 GiB; 0 turns the
// cache off, and outputs come from torch's allocator as before). Blocks in use are the caller's
// tensors and do not count. fastattn._C.empty_output_cache() frees the kept blocks.
#pragma once

#include <ATen/EmptyTensor.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastattn {

class OutputCache final : public c10::Allocator {
 public:
  // From 8 MiB: the 2 MiB rounding wastes at most a fifth of a block (25.7 MB: 6%).
  static constexpr size_t kMinBytes = size_t(8) << 20;
  static constexpr size_t kAlign = size_t(2) << 20;       // sizes rounded to 2 MiB: near sizes share blocks

  struct Stats {
    size_t kept_bytes, limit_bytes, hits, misses;
  };

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();   // never destroyed: tensors may outlive static teardown
    return *cache;
  }

  size_t limit() const { return limit_; }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kAlign - 1) / kAlign * kAlign;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        kept_ -= bytes;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (!p) {
      p = std::aligned_alloc(kAlign, bytes);
      TORCH_CHECK(p != nullptr, "fastattn: out of memory allocating a CPU output of ", bytes, " bytes");
    }
    return {p, new Block{p, bytes}, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {kept_, limit_, hits_, misses_};
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& kv : free_)
      for (void* p : kv.second) std::free(p);
    free_.clear();
    kept_ = 0;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  OutputCache() {
    limit_ = size_t(1) << 30;
    if (const char* env = std::getenv("FASTATTN_CPU_CACHE_BYTES")) {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      TORCH_CHECK(end != env && *end == '\0' && v >= 0,
                  "fastattn: FASTATTN_CPU_CACHE_BYTES must be a non-negative integer (bytes), got '", env, "'");
      limit_ = static_cast<size_t>(v);
    }
  }

  static void give_back(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    get().put(b->ptr, b->bytes);
    delete b;
  }

  void put(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (kept_ + bytes <= limit_) {
        free_[bytes].push_back(p);
        kept_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;   // rounded size -> freed blocks
  size_t kept_ = 0, limit_ = 0, hits_ = 0, misses_ = 0;
};

// A new CPU output of `sizes` with `strides` and x's dtype: from the cache when it is 8 MiB or
// more and the cache is on, else from torch's allocator (at::empty_strided).
inline at::Tensor new_output(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  int64_t span = 1;   // elements from the first to one past the last (strides of a dense layout)
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) { span = 0; break; }
    span += (sizes[d] - 1) * strides[d];
  }
  const size_t bytes = static_cast<size_t>(span) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  OutputCache& cache = OutputCache::get();
  if (!options.device().is_cpu() || bytes < OutputCache::kMinBytes || cache.limit() == 0)
    return at::empty_strided(sizes, strides, options);
  return at::detail::empty_strided_generic(sizes, strides, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           c10::typeMetaToScalarType(options.dtype()));
}

}  // namespace fastattn
