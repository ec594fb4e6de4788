// Emulation stand-in: a device guard that does nothing (everything runs on the CPU).
#pragma once
#include <c10/core/Device.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
