// glibc malloc settings for a process that allocates the same large CPU tensors every step.
//
// glibc serves blocks under its mmap threshold from the heap and returns the heap's top to the
// system once more than the trim threshold is free there. Both thresholds move with the sizes
// freed so far (the trim threshold is twice the mmap threshold), so whether a forward's 1.8 MB
// and 25.7 MB temporaries come back from pages already faulted in depends on the process's
// history: on the 2-vCPU Xeon VM a CoordinateAttention forward at 32x1024x14x14 took 7.6 ms
// after the output cache had taken its 25.7 MB outputs off the heap (torch's conv, cat and
// sigmoid outputs faulted in again every call, 3x their time), 4.9 ms with these settings.
//
// Set once when fastattn._C loads (FASTATTN_MALLOPT=0 leaves them): blocks under 32 MiB from the
// heap, whose top is kept up to 256 MiB free. The process keeps up to that much freed memory,
// as a caching allocator does.
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace fastattn {

// Whether the settings were applied (false off glibc, or with FASTATTN_MALLOPT=0).
inline bool tune_malloc() {
  const char* env = std::getenv("FASTATTN_MALLOPT");
  if (!(env == nullptr || *env == '\0' || std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0))
    throw std::invalid_argument(std::string("fastattn: FASTATTN_MALLOPT must be 0 (leave glibc's malloc settings) "
                                            "or 1, got '") + env + "'");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
#if defined(__GLIBC__)
  return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 256 << 20) == 1;
#else
  return false;
#endif
}

// The result of the one call at load.
inline bool& malloc_tuned() {
  static bool tuned = false;
  return tuned;
}

}  // namespace fastattn
