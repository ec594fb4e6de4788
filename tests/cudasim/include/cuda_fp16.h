// Host stand-in of cuda_fp16.h for the CUDA simulator: the storage type and its conversions.
#pragma once
#include "common.h"
struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) { return fastattn::to_float(fastattn::fp16_t{h.bits}); }
inline __half __float2half_rn(float f) { return __half{fastattn::from_float<fastattn::fp16_t>(f).bits}; }
