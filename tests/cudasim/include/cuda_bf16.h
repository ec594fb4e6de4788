// Host stand-in of cuda_bf16.h for the CUDA simulator: the storage type and its conversions.
#pragma once
#include "common.h"
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) { return fastattn::to_float(fastattn::bf16_t{h.bits}); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{fastattn::from_float<fastattn::bf16_t>(f).bits}; }
