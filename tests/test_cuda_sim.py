"""The CUDA kernels of coord_pool, coord_scale and simam run on the CPU under a thread-level
simulator (tests/cudasim: each CUDA thread a std::thread, barriers for __syncthreads, shuffles
through shared slots), against the tested CPU kernels. For machines without a GPU: it checks the
kernels' logic, indexing, launch plans and bounds, not their speed. Inputs sit inside NaN-filled
buffers (an out-of-bounds read poisons the result), outputs inside sentinel-filled ones checked
untouched afterwards; every layout path (vector and scalar access, tiles, walkers, split
reductions) is reached. Opt in: FASTATTN_CUDASIM=1 (needs g++ with C++20; builds in ~1 minute,
runs in ~2)."""
import ctypes
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

if os.environ.get("FASTATTN_CUDASIM", "0") in ("", "0"):
    pytest.skip("opt in with FASTATTN_CUDASIM=1 (slow: simulates CUDA threads on the CPU)", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM = os.path.join(ROOT, "tests", "cudasim")
DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    import fastattn

    if not fastattn._ext.available():
        pytest.skip(f"the CPU reference kernels are missing: {fastattn._ext.why_unavailable()}")
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    out = tmp_path_factory.mktemp("cudasim")
    flags = ["-std=c++20", "-O1", "-g", "-fPIC", "-fsanitize=undefined", "-fno-sanitize-recover=all",
             "-I" + os.path.join(SIM, "include"), "-I" + os.path.join(ROOT, "csrc", "cuda"),
             "-I" + os.path.join(ROOT, "csrc", "cpu")]
    objs = []
    for stem in ("coord", "simam"):
        cpp = out / f"{stem}_sim.cpp"
        subprocess.run([sys.executable, os.path.join(SIM, "transform.py"),
                        os.path.join(ROOT, "csrc", "cuda", f"{stem}.cu"), str(cpp)], check=True)
        objs.append(str(out / f"{stem}.o"))
        subprocess.run(["g++", *flags, "-c", str(cpp), "-o", objs[-1]], check=True)
    objs.append(str(out / "wrap.o"))
    subprocess.run(["g++", *flags, "-c", os.path.join(SIM, "wrap.cpp"), "-o", objs[-1]], check=True)
    so = str(out / "libcudasim.so")
    subprocess.run(["g++", *flags, "-shared", *objs, "-o", so, "-lpthread"], check=True)
    dll = ctypes.CDLL(so)
    dll.sim_coord_ws.restype = ctypes.c_int64
    return dll


def arr(v):
    return (ctypes.c_int64 * len(v))(*v)


def ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def acc(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


class Guarded:
    """A strided view inside a larger buffer holding `fill` elsewhere; check() asserts that
    nothing outside the view changed."""
    G = 64

    def __init__(self, shape, strides, dtype, fill, offset=0, values=None):
        span = 1 + sum((s - 1) * st for s, st in zip(shape, strides)) if all(shape) else 0
        n = span + 2 * self.G + offset
        self.buf = torch.full((n,), fill, dtype=dtype)
        self.t = self.buf.as_strided(shape, strides, self.G + offset)
        if values is not None:
            if 0 in strides:
                self.buf[self.G + offset] = values.flatten()[0]
            else:
                self.t.copy_(values)
        self.before = self.buf.clone()
        self.outside = torch.ones(n, dtype=torch.bool)
        self.outside.as_strided(shape, strides, self.G + offset).fill_(False)

    def check(self, name):
        a, b = self.buf[self.outside], self.before[self.outside]
        assert bool(((a == b) | (a.isnan() & b.isnan())).all()), f"{name}: written outside the tensor"


def make_x(shape, dtype, layout, g, offset=0):
    """(the strided tensor inside its NaN-filled buffer, the same values as a plain tensor)"""
    B, C, H, W = shape
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    st = {"nchw": x.stride(),
          "cl": x.contiguous(memory_format=torch.channels_last).stride(),
          "slice": ((2 * C + 1) * H * W, 2 * H * W, W, 1),                  # every other channel
          "slice_cl": (H * W * (2 * C + 1), 2, W * (2 * C + 1), 2 * C + 1),
          "permuted": (C * H * W, H * W, 1, H),
          "crop": (C * (H + 2) * (W + 3), (H + 2) * (W + 3), W + 3, 1),
          "expanded": (0, 0, 0, 0)}[layout]                                  # y.sum().backward()'s dy
    if layout == "expanded":
        x = x.flatten()[:1].expand(shape)
    return Guarded(shape, st, dtype, float("nan"), offset, x).t, x


def out_like(x, offset=0):
    return Guarded(tuple(x.shape), torch.empty_like(x).stride(), x.dtype, 7.0, offset)


def close(a, b, name, dtype, n_sum=1):
    scale = max(1.0, b.double().abs().max().item()) if b.numel() else 1.0
    err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
    tol = TOL[dtype] * scale * max(1.0, math.sqrt(n_sum))
    assert err <= tol and not bool(a.isnan().any()), f"{name}: max error {err:.3g} (tolerance {tol:.3g})"


def rows_for(g, channels):   # as csrc/bind/coord_cuda.cpp lays out the (B, C, L) rows
    return g.transpose(1, 2).contiguous().transpose(1, 2) if channels else g.contiguous()


def walks_channels(t):
    unit_w = t.stride(3) == 1 and t.size(3) > 1
    return (not unit_w) and (t.stride(1) == 1 or t.size(1) == 1)


def cases(shapes):
    """(shape, dtype, layout, dy layout, offset): every layout in float32, NCHW and channels_last
    in every dtype, dy in another layout (bfloat16) or expanded (float16), misaligned (offset 1)."""
    out = []
    for shape in shapes:
        for layout in ("nchw", "cl", "slice", "slice_cl", "permuted", "crop"):
            for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
                if dtype != torch.float32 and layout not in ("nchw", "cl"):
                    continue
                dy_layout = layout
                if dtype == torch.bfloat16:
                    dy_layout = {"nchw": "cl", "cl": "nchw"}[layout]
                elif dtype == torch.float16:
                    dy_layout = "expanded"
                for offset in ((0, 1) if dtype == torch.float32 and layout in ("nchw", "cl") else (0,)):
                    out.append(pytest.param(shape, dtype, layout, dy_layout, offset,
                                            id=f"{'x'.join(map(str, shape))}-{layout}-{str(dtype)[6:]}-dy_{dy_layout}"
                                               f"-off{offset}"))
    return out


# row splits (combine kernel), several small planes per block, 1 x 1 maps, single rows/columns,
# more rows than a block keeps, wide rows
COORD_SHAPES = [(2, 5, 7, 9), (2, 3, 4, 8), (1, 2, 40, 16), (2, 40, 6, 5), (1, 33, 48, 3), (3, 5, 1, 1),
                (2, 3, 1, 7), (2, 3, 7, 1), (1, 1, 2100, 2), (1, 2, 5, 70), (3, 5, 7, 9), (1, 3, 3, 3)]
# plane tiles of every group size, channel tiles (scalar: C % 8 != 0; vector; > 48 KB), walkers
SIMAM_SHAPES = [(2, 5, 7, 9), (2, 3, 16, 16), (1, 3, 20, 20), (1, 2, 28, 28), (1, 2, 40, 40), (1, 1, 90, 90),
                (2, 20, 5, 7), (2, 16, 6, 6), (1, 8, 50, 50), (1, 8, 60, 60), (2, 3, 1, 2), (1, 40, 3, 3)]


@pytest.mark.parametrize("shape,dtype,layout,dy_layout,offset", cases(COORD_SHAPES))
def test_coord_kernels(lib, shape, dtype, layout, dy_layout, offset):
    B, C, H, W = shape
    ops = torch.ops.fastattn_C
    g = torch.Generator().manual_seed(0)
    z, dt, a = arr(shape), DT[dtype], acc(dtype)
    x, x0 = make_x(shape, dtype, layout, g, offset)
    nws = lib.sim_coord_ws(dt, z)
    ws = torch.full((nws,), float("nan"), dtype=a) if nws else None
    # pool forward
    xh = Guarded((B, C, H), (C * H, H, 1), dtype, 7.0)
    xw = Guarded((B, C, W), (C * W, W, 1), dtype, 7.0)
    assert lib.sim_coord_pool_forward(ptr(x), ptr(xh.t), ptr(xw.t), ptr(ws), dt, z, arr(x.stride())) == 0
    rh, rw = ops.coord_pool(x0)
    close(xh.t, rh, "x_h", dtype, W)
    close(xw.t, rw, "x_w", dtype, H)
    xh.check("x_h")
    xw.check("x_w")
    # pool backward, into both memory formats
    gh = torch.randn(B, C, H, generator=g, dtype=torch.float64).to(dtype)
    gw = torch.randn(B, C, W, generator=g, dtype=torch.float64).to(dtype)
    for cl in (False, True):
        ref = ops.coord_pool_backward(gh, gw, cl)
        dx = Guarded(tuple(ref.shape), ref.stride(), dtype, 7.0, offset)
        ghr, gwr = rows_for(gh, walks_channels(dx.t)), rows_for(gw, walks_channels(dx.t))
        assert lib.sim_coord_pool_backward(ptr(ghr), arr(ghr.stride()), ptr(gwr), arr(gwr.stride()), ptr(dx.t), dt,
                                           z, arr(dx.t.stride())) == 0
        close(dx.t, ref, f"dx of the pool (channels_last={cl})", dtype)
        dx.check("dx of the pool")
    # scale forward
    ah = torch.rand(B, C, H, generator=g, dtype=torch.float64).to(a)
    aw = torch.rand(B, C, W, generator=g, dtype=torch.float64).to(a)
    ahr, awr = rows_for(ah, walks_channels(x)), rows_for(aw, walks_channels(x))
    y = out_like(x, offset)
    assert lib.sim_coord_scale_forward(ptr(x), ptr(ahr), arr(ahr.stride()), ptr(awr), arr(awr.stride()), ptr(y.t),
                                       dt, z, arr(x.stride()), arr(y.t.stride())) == 0
    close(y.t, ops.coord_scale(x0, ah, aw), "y", dtype)
    y.check("y")
    # scale backward
    dy, dy0 = make_x(shape, dtype, dy_layout, g, offset)
    dx = out_like(x, offset)
    dah = Guarded((B, C, H), (C * H, H, 1), a, 7.0)
    daw = Guarded((B, C, W), (C * W, W, 1), a, 7.0)
    if ws is not None:
        ws.fill_(float("nan"))
    assert lib.sim_coord_scale_backward(ptr(dy), ptr(x), ptr(ahr), arr(ahr.stride()), ptr(awr), arr(awr.stride()),
                                        ptr(dx.t), ptr(dah.t), ptr(daw.t), ptr(ws), dt, z, arr(dy.stride()),
                                        arr(x.stride()), arr(dx.t.stride())) == 0
    rdx, rdah, rdaw = ops.coord_scale_backward(dy0, x0, ah, aw)
    close(dx.t, rdx, "dx of the scale", dtype)
    close(dah.t, rdah, "da_h", dtype, W)
    close(daw.t, rdaw, "da_w", dtype, H)
    dx.check("dx of the scale")
    dah.check("da_h")
    daw.check("da_w")


@pytest.mark.parametrize("shape,dtype,layout,dy_layout,offset", cases(SIMAM_SHAPES))
def test_simam_kernels(lib, shape, dtype, layout, dy_layout, offset):
    ops = torch.ops.fastattn_C
    g = torch.Generator().manual_seed(0)
    z, dt, lam = arr(shape), DT[dtype], ctypes.c_double(0.1)
    x, x0 = make_x(shape, dtype, layout, g, offset)
    y = out_like(x, offset)
    assert lib.sim_simam_forward(ptr(x), ptr(y.t), dt, z, lam, arr(x.stride()), arr(y.t.stride())) == 0
    close(y.t, ops.simam(x0, 0.1), "y", dtype)
    y.check("y")
    dy, dy0 = make_x(shape, dtype, dy_layout, g, offset)
    dx = out_like(x, offset)
    assert lib.sim_simam_backward(ptr(dy), ptr(x), ptr(dx.t), dt, z, lam, arr(dy.stride()), arr(x.stride()),
                                  arr(dx.t.stride())) == 0
    close(dx.t, ops.simam_backward(dy0, x0, 0.1), "dx", dtype)
    dx.check("dx")


def test_channel_tile_falls_back_without_shared_memory(lib):
    """A device that cannot give the channels tile its shared memory gets the walker instead."""
    lib.sim_set_optin(ctypes.c_long(64 * 1024))
    try:
        test_simam_kernels(lib, (1, 8, 50, 50), torch.float32, "cl", "cl", 0)
    finally:
        lib.sim_set_optin(ctypes.c_long(227 * 1024))
