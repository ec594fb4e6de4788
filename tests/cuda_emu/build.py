"""Build the CUDA kernels of csrc/cuda/ and their torch glue (csrc/bind/*_cuda.cpp) for the CPU
emulator of tests/cuda_emu/shim/emu.h, as the extension `fastattn_emu` whose ops
(torch.ops.fastattn_emu.*) take CPU tensors and run the CUDA code paths.

The sources are copied into a build tree with three mechanical rewrites: `kernel<<<cfg>>>(args);`
becomes `emu::launch(cfg, [=] { kernel(args); });`, `extern __shared__ ... smem[];` points at the
emulator's dynamic shared memory, and the glue registers for the CPU key of `fastattn_emu` instead
of the CUDA key of `fastattn_C`. Everything else runs as written.
"""
from __future__ import annotations

import os
import re
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
# The kernel families the emulator runs: every .cu of csrc/cuda/ with its *_cuda.cpp glue.
STEMS = ("bins", "branch", "coord", "gate", "group", "pool", "simam", "spatial")

_KERNEL_NAME = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*$")
_SMEM = re.compile(r"extern\s+__shared__\s+__align__\(\d+\)\s+unsigned\s+char\s+(\w+)\[\];")
_DEF = re.compile(r'm\.def\(((?:"[^"]*"\s*)+)\);')


def _closing_paren(text: str, i: int) -> int:
    """The index of the parenthesis closing the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return j
    raise ValueError(f"unbalanced parentheses after offset {i}")


def _kernel_source(text: str) -> str:
    """Rewrite every `kernel<...><<<cfg>>>(args)` as `emu::launch(cfg, [=]() { kernel(args); })`,
    scanning the argument list's parentheses (launches inside macros have no `;` of their own)."""
    text = _SMEM.sub(r"unsigned char* \1 = emu::dyn_smem;", text)
    while (start := text.find("<<<")) >= 0:
        name = _KERNEL_NAME.search(text, 0, start)
        end_cfg = text.index(">>>", start)
        open_args = text.index("(", end_cfg)
        close_args = _closing_paren(text, open_args)
        call = (f"emu::launch({text[start + 3:end_cfg]}, [=]() {{ {name.group(1)}"
                f"{text[open_args:close_args + 1]}; }})")
        text = text[:name.start(1)] + call + text[close_args + 1:]
    return text


def _glue_source(text: str) -> str:
    text = text.replace("TORCH_LIBRARY_IMPL(fastattn_C, CUDA, m)", "TORCH_LIBRARY_IMPL(fastattn_emu, CPU, m)")
    text = text.replace("c10::DeviceType::CUDA", "c10::DeviceType::CPU")
    return text.replace(".is_cuda()", ".is_cpu()")


def _schemas(stems) -> str:
    defs = []
    for stem in stems:
        with open(os.path.join(CSRC, "bind", f"{stem}.cpp")) as f:
            for m in _DEF.finditer(f.read()):
                defs.append("".join(re.findall(r'"([^"]*)"', m.group(1))))
    body = "\n".join(f'  m.def("{d}");' for d in defs)
    return ('#include <torch/library.h>\n#include "../shim/emu.h"\n\n'
            "TORCH_LIBRARY(fastattn_emu, m) {\n" + body +
            '\n  m.def("set_sm_count(int n) -> ()", [](int64_t n) { emu::sm_count = static_cast<int>(n); });\n}\n')


def build(build_dir: str | None = None, verbose: bool = False):
    """Build (or reuse) the emulated extension; returns torch.ops.fastattn_emu.

    FASTATTN_CUDA_EMU_ASAN=1 builds it with AddressSanitizer (out-of-bounds reads and writes of the
    kernels then abort with a report); run python with LD_PRELOAD=$(gcc -print-file-name=libasan.so)
    and ASAN_OPTIONS=detect_leaks=0."""
    import torch
    from torch.utils.cpp_extension import load

    asan = os.environ.get("FASTATTN_CUDA_EMU_ASAN", "0") == "1"
    build_dir = build_dir or os.path.join(HERE, "_build_asan" if asan else "_build")
    tree = os.path.join(build_dir, "csrc")
    os.makedirs(build_dir, exist_ok=True)
    shutil.copytree(os.path.join(HERE, "shim"), os.path.join(build_dir, "shim"), dirs_exist_ok=True)
    stems = STEMS
    sources = []
    for sub in ("cpu", "cuda", "bind"):
        os.makedirs(os.path.join(tree, sub), exist_ok=True)
        for name in os.listdir(os.path.join(CSRC, sub)):
            src = os.path.join(CSRC, sub, name)
            with open(src) as f:
                text = f.read()
            out = name
            if sub == "cuda" and name.endswith(".cu") and name[:-3] in stems:
                text, out = _kernel_source(text), name[:-3] + "_cu.cpp"
                sources.append(os.path.join(tree, sub, out))
            elif sub == "bind" and name.endswith("_cuda.cpp") and name[:-9] in stems:
                text = _glue_source(text)
                sources.append(os.path.join(tree, sub, out))
            elif sub == "cpu" and name == "bins.cpp":      # the geometry table builder
                sources.append(os.path.join(tree, sub, out))
            dst = os.path.join(tree, sub, out)
            if not os.path.exists(dst) or open(dst).read() != text:   # keep mtimes: ninja rebuilds less
                with open(dst, "w") as f:
                    f.write(text)
    schemas = os.path.join(build_dir, "schemas.cpp")
    text = _schemas(stems)
    if not os.path.exists(schemas) or open(schemas).read() != text:
        with open(schemas, "w") as f:
            f.write(text)
    sources.append(schemas)
    load(name="fastattn_emu", sources=sources, build_directory=build_dir, is_python_module=False,
         extra_include_paths=[os.path.join(build_dir, "shim")],
         extra_cflags=["-std=c++20", "-O2", "-pthread", "-w"] + (["-fsanitize=address", "-fno-omit-frame-pointer"]
                                                                  if asan else []),
         extra_ldflags=["-pthread"] + (["-fsanitize=address"] if asan else []), verbose=verbose)
    return torch.ops.fastattn_emu


if __name__ == "__main__":
    ops = build(verbose=True)
    print("built:", ops)
