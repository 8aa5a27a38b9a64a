"""Stand-ins for the cuDNN binding's tests: the stub library, host arrays, a fake CuPy 14.

``cudnn_stub.c`` (beside this file) is compiled by the system C compiler into
a ``libcudnn.so.9`` that checks and logs every call; :class:`HostArray` and
:class:`HostRuntime` give the binding NumPy host buffers where it expects CuPy
arrays; :func:`write_fake_cupy` writes a ``cupy`` package that imports like
CuPy 14 (no ``cupy.cudnn``) for the hook tests, run in a subprocess.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from smchainer.compat.cudnn._context import Runtime

STUB_SOURCE = Path(__file__).with_name("cudnn_stub.c")
STREAM = 0x5E7


def compiler() -> str | None:
    """The C compiler to build the stub with, or None."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build_stub(directory: Path) -> Path:
    """Compile the stub into ``directory/libcudnn.so.9``."""
    cc = compiler()
    if cc is None:
        raise FileNotFoundError("no C compiler")
    out = directory / "libcudnn.so.9"
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(out), str(STUB_SOURCE), "-lm"],
                   check=True, capture_output=True, text=True)
    return out


class Stub:
    """The stub's own controls: its call log, forced failures, live descriptors, version."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.stub_log.restype = ctypes.c_char_p
        self.lib.stub_fail.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.lib.stub_set_version.argtypes = [ctypes.c_size_t]

    def reset(self) -> None:
        self.lib.stub_reset()

    def lines(self) -> list[str]:
        return self.lib.stub_log().decode().splitlines()

    def calls(self, name: str) -> list[dict[str, str]]:
        """Each logged call of ``name`` as ``{key: value}`` (``_desc`` the descriptor, if any)."""
        found = []
        for line in self.lines():
            words = line.split()
            if not words or words[0] != name:
                continue
            fields = {"_desc": words[1]} if len(words) > 1 and "=" not in words[1] else {}
            fields.update(w.split("=", 1) for w in words[1:] if "=" in w)
            found.append(fields)
        return found

    def violations(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("VIOLATION")]

    def fail(self, name: str, status: int) -> None:
        self.lib.stub_fail(name.encode(), status)

    def live(self) -> int:
        return int(self.lib.stub_live())

    def set_version(self, version: int) -> None:
        self.lib.stub_set_version(version)


class HostArray:
    """A NumPy array seen the way the binding sees a CuPy array (``.data.ptr`` and shape)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.data = SimpleNamespace(ptr=array.ctypes.data)

    shape = property(lambda self: self.array.shape)
    strides = property(lambda self: self.array.strides)
    dtype = property(lambda self: self.array.dtype)
    size = property(lambda self: self.array.size)

    def astype(self, dtype: Any) -> HostArray:
        return HostArray(self.array.astype(dtype))


def host(array: np.ndarray) -> HostArray:
    return HostArray(np.ascontiguousarray(array))


class HostRuntime(Runtime):
    """The binding's runtime over host memory: NaN-filled outputs, recorded workspace sizes."""

    def __init__(self) -> None:
        self.allocations: list[int] = []

    def empty(self, shape: tuple[int, ...], dtype: Any) -> HostArray:
        return HostArray(np.full(shape, np.nan, dtype=dtype))

    def ascontiguous(self, array: Any) -> Any:
        if array.array.flags.c_contiguous:
            return array
        return HostArray(np.ascontiguousarray(array.array))

    def astype(self, array: Any, dtype: Any) -> HostArray:
        return HostArray(np.ascontiguousarray(array.array.astype(dtype)))

    def copyto(self, dst: Any, src: Any) -> None:
        np.copyto(dst.array, src.array, casting="unsafe")

    def alloc(self, nbytes: int) -> HostArray:
        self.allocations.append(int(nbytes))
        return HostArray(np.zeros(max(int(nbytes), 1), dtype=np.uint8)[: int(nbytes)])

    def stream(self) -> int:
        return STREAM

    def device_id(self) -> int:
        return 0

    def compute_capability(self) -> str:
        return "90"


FAKE_CUPY = {
    "cupy/__init__.py": '''
        """A stand-in for CuPy 14 (no cupy.cudnn) that Chainer 7.8.1 imports."""
        __version__ = "14.0.0"
        from cupy import cuda, _util, random  # noqa: F401
        class ndarray:
            pass
        class _Pool:
            def malloc(self, size):
                raise RuntimeError("fake cupy has no memory")
        def get_default_memory_pool():
            return _Pool()
        def get_default_pinned_memory_pool():
            return _Pool()
        def memoize(for_each_device=False):
            return lambda function: function
        def clear_memo():
            return None
        def fuse(*args, **kwargs):
            return lambda function: function
        class _Kernel:
            """ElementwiseKernel, ReductionKernel, RawKernel...: made at import, never run."""
            def __init__(self, *args, **kwargs):
                pass
            def __call__(self, *args, **kwargs):
                raise RuntimeError("fake cupy cannot run kernels")
        def __getattr__(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Kernel
        ''',
    "cupy/_util.py": '''
        class PerformanceWarning(RuntimeWarning):
            pass
        ''',
    "cupy/random.py": '''
        def rand(*shape, dtype=None):
            raise RuntimeError("fake cupy: Chainer took its non-cuDNN path (cupy.random.rand)")
        ''',
    "cupy/cuda/__init__.py": '''
        from cupy.cuda import cublas, nvrtc, runtime  # noqa: F401
        class Device:
            def __init__(self, device=None):
                self.id = 0 if device is None else int(device)
                self.compute_capability = "90"
            def __enter__(self):
                return self
            def __exit__(self, *args):
                return None
            def use(self):
                return None
        class Event:
            pass
        class Stream:
            ptr = 0
        def get_current_stream():
            return Stream()
        ''',
    "cupy/cuda/cublas.py": "",
    "cupy/cuda/runtime.py": '''
        def getDevice():
            return 0
        def getDeviceCount():
            return 0
        def runtimeGetVersion():
            return 13000
        def driverGetVersion():
            return 13000
        def getDeviceProperties(device):
            return {"name": b"fake GPU"}
        ''',
    "cupy/cuda/nvrtc.py": '''
        def getVersion():
            return (13, 0)
        ''',
    "cupyx/__init__.py": '''
        from cupyx import scipy  # noqa: F401
        def get_runtime_info(full=True):
            return "CuPy Version : 14.0.0 (fake)"
        ''',
    "cupyx/scipy/__init__.py": "from cupyx.scipy import linalg, special  # noqa: F401\n",
    "cupyx/scipy/linalg.py": "",
    "cupyx/scipy/special.py": "",
}


def write_fake_cupy(directory: Path) -> Path:
    """Write the fake ``cupy`` and ``cupyx`` packages under ``directory``; returns it."""
    for name, text in FAKE_CUPY.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return directory
