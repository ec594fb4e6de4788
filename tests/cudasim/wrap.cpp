// C entry points of the simulated CUDA launchers, for ctypes (tests/test_cuda_sim.py).
#include "coord.h"
#include "simam.h"
using namespace fastattn;
static Strides4 s4(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }
static Strides3 s3(const int64_t* s) { return {s[0], s[1], s[2]}; }
extern "C" {
long sim_launches() { return sim::launches; }
void sim_set_optin(long v) { sim::optin_limit = v; }
int64_t sim_coord_ws(int dt, const int64_t* z) { return coord_reduce_workspace_cuda(DType(dt), z[0], z[1], z[2], z[3]); }
int sim_coord_pool_forward(const void* x, void* xh, void* xw, void* ws, int dt, const int64_t* z, const int64_t* sx) {
  return coord_pool_forward_cuda(x, xh, xw, ws, DType(dt), z[0], z[1], z[2], z[3], s4(sx), nullptr);
}
int sim_coord_pool_backward(const void* gh, const int64_t* sgh, const void* gw, const int64_t* sgw, void* dx, int dt,
                            const int64_t* z, const int64_t* sdx) {
  return coord_pool_backward_cuda(gh, s3(sgh), gw, s3(sgw), dx, DType(dt), z[0], z[1], z[2], z[3], s4(sdx), nullptr);
}
int sim_coord_scale_forward(const void* x, const void* ah, const int64_t* sah, const void* aw, const int64_t* saw,
                            void* y, int dt, const int64_t* z, const int64_t* sx, const int64_t* sy) {
  return coord_scale_forward_cuda(x, ah, s3(sah), aw, s3(saw), y, DType(dt), z[0], z[1], z[2], z[3], s4(sx), s4(sy),
                                  nullptr);
}
int sim_coord_scale_backward(const void* dy, const void* x, const void* ah, const int64_t* sah, const void* aw,
                             const int64_t* saw, void* dx, void* dah, void* daw, void* ws, int dt, const int64_t* z,
                             const int64_t* sdy, const int64_t* sx, const int64_t* sdx) {
  return coord_scale_backward_cuda(dy, x, ah, s3(sah), aw, s3(saw), dx, dah, daw, ws, DType(dt), z[0], z[1], z[2], z[3],
                                   s4(sdy), s4(sx), s4(sdx), nullptr);
}
int sim_simam_forward(const void* x, void* y, int dt, const int64_t* z, double lam, const int64_t* sx, const int64_t* sy) {
  return simam_forward_cuda(x, y, DType(dt), z[0], z[1], z[2], z[3], lam, s4(sx), s4(sy), nullptr);
}
int sim_simam_backward(const void* dy, const void* x, void* dx, int dt, const int64_t* z, double lam, const int64_t* sdy,
                       const int64_t* sx, const int64_t* sdx) {
  return simam_backward_cuda(dy, x, dx, DType(dt), z[0], z[1], z[2], z[3], lam, s4(sdy), s4(sx), s4(sdx), nullptr);
}
}
