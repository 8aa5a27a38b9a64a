"""Run CUDA kernels on the CPU: compiled as C++ by g++, every thread in turn.

A test harness for kernel *logic* (indexing, masks, formulas) where no GPU is
available. Each ``extern "C" __global__`` function gets a C launcher that loops
over the grid's blocks and each block's threads. Threads run one after the
other, so a kernel may use ``__shared__`` memory and ``__syncthreads()`` only
in the pattern the smchainer kernels use: every thread writes its slot, then
only threads with ``threadIdx.y == 0`` read the others' (threads run with
``threadIdx.y`` descending, so those come last). ``atomicAdd`` is a plain
addition (one thread at a time).
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

SHIM = r"""
#include <cmath>
#include <cstring>
struct smchainer_dim3 { unsigned x, y, z; };
static smchainer_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads()
static inline double atomicAdd(double* p, double v) { double o = *p; *p += v; return o; }
static inline float atomicAdd(float* p, float v) { float o = *p; *p += v; return o; }
using std::sqrt;
static inline float __int_as_float(int bits) { float f; std::memcpy(&f, &bits, 4); return f; }
"""

KERNEL = re.compile(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', re.S)
CTYPES = {
    "long long": ctypes.c_longlong, "int": ctypes.c_int, "double": ctypes.c_double,
    "float": ctypes.c_float, "unsigned": ctypes.c_uint, "unsigned long long": ctypes.c_ulonglong,
}


def _launcher(name: str, params: str) -> tuple[str, list[str]]:
    params = re.sub(r"//[^\n]*", "", params)  # comments between the parameters
    declarations = [" ".join(p.split()) for p in params.split(",")]
    names = [re.split(r"[\s*]+", d)[-1] for d in declarations]
    types = [d[: d.rindex(n)].replace("__restrict__", "").strip()
             for d, n in zip(declarations, names, strict=True)]
    source = f"""
extern "C" void launch_{name}(unsigned grid_x_, unsigned grid_y_, unsigned block_x_,
                              unsigned block_y_, {", ".join(declarations)}) {{
    gridDim = {{grid_x_, grid_y_, 1}};
    blockDim = {{block_x_, block_y_, 1}};
    for (unsigned by_ = 0; by_ < grid_y_; ++by_) for (unsigned bx_ = 0; bx_ < grid_x_; ++bx_) {{
        blockIdx = {{bx_, by_, 0}};
        for (int ty_ = (int)block_y_ - 1; ty_ >= 0; --ty_) {{
            for (unsigned tx_ = 0; tx_ < block_x_; ++tx_) {{
                threadIdx = {{tx_, (unsigned)ty_, 0}};
                {name}({", ".join(names)});
            }}
        }}
    }}
}}
"""
    return source, types


class EmulatedKernels:
    """``kernels(name)((grid), (block), args)``, as a CuPy ``RawModule`` function is called."""

    def __init__(self, cuda_source: str, build_dir: Path) -> None:
        if shutil.which("g++") is None:
            raise RuntimeError("g++ is needed to emulate the kernels")
        launchers, self.types = [], {}
        for name, params in KERNEL.findall(cuda_source):
            source, types = _launcher(name, params)
            launchers.append(source)
            self.types[name] = types
        source = SHIM + cuda_source + "".join(launchers)
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        library = build_dir / f"kernels-{digest}.so"
        if not library.exists():
            cpp = build_dir / f"kernels-{digest}.cpp"
            cpp.write_text(source)
            subprocess.run(
                ["g++", "-O1", "-shared", "-fPIC", "-o", str(library), str(cpp)],
                check=True, capture_output=True, text=True,
            )
        self.library = ctypes.CDLL(str(library))
        self.launches: list[str] = []

    def __call__(self, name: str):
        types = self.types[name]
        function = getattr(self.library, f"launch_{name}")

        def launch(grid, block, args):
            if len(args) != len(types):
                raise TypeError(f"{name} takes {len(types)} arguments, got {len(args)}")
            grid, block = (*grid, 1)[:2], (*block, 1)[:2]
            converted = [_argument(name, kind, value)
                         for kind, value in zip(types, args, strict=True)]
            self.launches.append(name)
            function(*[ctypes.c_uint(v) for v in (*grid, *block)], *converted)

        return launch


def _argument(kernel: str, kind: str, value):
    if kind.endswith("*"):
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{kernel}: a {kind} argument needs an array, not {type(value)}")
        if not value.flags.c_contiguous:
            raise ValueError(f"{kernel}: arrays passed to kernels must be C-contiguous")
        expected = {"float": np.float32, "double": np.float64, "signed char": np.int8,
                    "unsigned char": np.uint8, "long long": np.int64}
        base = kind.replace("const", "").replace("*", "").strip()
        if value.dtype != expected[base]:
            raise TypeError(f"{kernel}: a {kind} argument got a {value.dtype} array")
        return ctypes.c_void_p(value.ctypes.data)
    kind = kind.removeprefix("const ").strip()
    expected = {"long long": np.int64, "int": np.int32, "double": np.float64,
                "float": np.float32, "unsigned long long": np.uint64}[kind]
    if type(value) is not expected:  # CuPy needs the exact scalar type
        raise TypeError(f"{kernel}: a {kind} argument needs {expected.__name__}, not {type(value)}")
    return CTYPES[kind](value)
