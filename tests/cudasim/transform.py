"""Turn a .cu file into host C++ for the simulator (include/cuda_runtime.h): kernel launches
`k<<<grid, block, smem, stream>>>(args);` become `sim::launch(grid, block, smem, stream, [=] { k(args); });`,
`extern __shared__` buffers point at the block's dynamic shared memory, `__shared__` arrays become
function statics. Usage: python transform.py in.cu out.cpp"""
import re
import sys

src = open(sys.argv[1]).read()
src = re.sub(r"extern __shared__ __align__\(16\) unsigned char (\w+)\[\];", r"unsigned char* \1 = sim::g_dyn_smem;", src)
assert "extern __shared__" not in src, "unsupported extern __shared__ declaration"
src = src.replace("__shared__ ", "static ")
launch = re.compile(r"([\w:]+(?:<[^;{}]*?>)?)<<<(.*?)>>>\((.*?)\);", re.S)
src, n = launch.subn(lambda m: f"sim::launch({m.group(2)}, [=] {{ {m.group(1)}({m.group(3)}); }});", src)
assert "<<<" not in src and n > 0, "untransformed kernel launch"
open(sys.argv[2], "w").write(src)
