// Emulation stand-in: the "current stream" of the CPU emulator.
#pragma once
#include "../../emu.h"
namespace c10::cuda {
struct EmuStream {
  operator cudaStream_t() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
