"""Build of fastattn and its compiled extension fastattn._C.

C++ CPU kernels are always built (OpenMP, -O3). CUDA kernels are built according to
FASTATTN_BUILD_CUDA: "auto" (default: when torch has CUDA and nvcc is found), "1" (required:
fail if impossible), "0" (never). FASTATTN_CPU_ARCH picks -march for the CPU kernels (default
"native"; "none" for a portable build). Build with `pip install --no-build-isolation -e .` so the
extension compiles against the torch already installed.
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _want_cuda(torch_mod, cuda_home):
    mode = os.environ.get("FASTATTN_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FASTATTN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    possible = torch_mod.version.cuda is not None and cuda_home is not None
    why = (
        "torch has no CUDA (a CPU build)" if torch_mod.version.cuda is None
        else "nvcc / CUDA_HOME not found" if cuda_home is None else ""
    )
    if mode == "1" and not possible:
        sys.exit(f"FASTATTN_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
    if mode == "auto" and not possible:
        print(f"fastattn: building without CUDA kernels ({why})")
    return mode != "0" and possible


def _cpu_arch_flags():
    """-march for the CPU kernels: FASTATTN_CPU_ARCH (default "native": the vector units of the
    machine that builds, as a source build runs where it is built; "none" adds no flag, e.g.
    for a package built on one machine and run on others)."""
    arch = os.environ.get("FASTATTN_CPU_ARCH", "native").strip()
    if arch.lower() in ("", "none"):
        return []
    return [f"-march={arch}"]


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++17", *openmp]
    cxx += _cpu_arch_flags()
    bind = _rel("csrc/bind/*.cpp")
    bind_cuda = [p for p in bind if p.endswith("_cuda.cpp")]
    sources = ["csrc/ops.cpp", *[p for p in bind if p not in bind_cuda], *_rel("csrc/cpu/*.cpp")]
    if _want_cuda(torch, CUDA_HOME):
        sources += [*bind_cuda, *_rel("csrc/cuda/*.cu")]
        return [
            CUDAExtension(
                "fastattn._C",
                sources,
                define_macros=[("FASTATTN_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
                extra_link_args=openmp,
            )
        ]
    return [CppExtension("fastattn._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=["fastattn", "fastattn.reference", "fastattn.ops", "fastattn.modules", "fastattn.kernels"],
        package_dir={"fastattn.kernels": "kernels"},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
