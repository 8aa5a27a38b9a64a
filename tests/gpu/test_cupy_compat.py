"""smchainer.compat.cupy on the CPU: the CuPy 13/14 fixes, without a GPU.

A real CuPy 13 with cuDNN cannot load here (it needs a driver and cuBLAS), so
the import-time behaviour is checked against a stand-in package that does at
import exactly what CuPy 13 / 14 do to Chainer (warn on ``import cupy.cudnn``,
or have no cuDNN at all). The ``half`` fix is checked on the real ChainerMN
kernel sources and, where CuPy and NVRTC are installed, compiled by NVRTC
(which needs no GPU).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import smchainer  # noqa: F401
from smchainer.compat import cupy as cupy_compat

HALF_KERNEL = textwrap.dedent("""\
    extern "C" __global__ void to_half(const float* x, half* y, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) y[i] = (half) x[i];
    }
""")


def test_header_is_prepended_only_where_half_is_used():
    fixed = cupy_compat.with_fp16_header(HALF_KERNEL)
    assert fixed.splitlines()[0] == "#include <cuda_fp16.h>"
    assert fixed.endswith(HALF_KERNEL)
    float_kernel = HALF_KERNEL.replace("half", "float")
    assert cupy_compat.with_fp16_header(float_kernel) == float_kernel
    # idempotent, and an existing include is respected
    assert cupy_compat.with_fp16_header(fixed) == fixed
    assert not cupy_compat.uses_half('#include "cupy/float16.cuh"\n' + HALF_KERNEL)
    # a word in a comment or inside another name is no use of the type
    assert not cupy_compat.uses_half("// the first half\n/* half */ float halfway;")
    assert cupy_compat.uses_half("__half a; half b;")


def _chainermn_kernel_sources() -> dict[str, str]:
    """The CUDA sources ChainerMN hands to ``chainer.backends.cuda.raw``."""
    import chainer.backends.cuda as cuda
    from chainermn.communicators import _memory_utility

    seen: dict[str, str] = {}
    original = cuda.raw.__wrapped__  # AttributeError unless the wrapper is in place
    try:
        cuda.raw = cupy_compat._fp16_raw(lambda code, name, *a, **k: seen.setdefault(name, code))
        _memory_utility._cupy_batched_pack_params()
        _memory_utility._cupy_batched_unpack_params()
    finally:
        cuda.raw = cupy_compat._fp16_raw(original)
    return seen


def test_chainer_raw_kernels_get_the_fp16_header():
    import chainer.backends.cuda as cuda

    assert getattr(cuda.raw, "_smchainer_fp16", False), "chainer.backends.cuda.raw is not wrapped"
    sources = _chainermn_kernel_sources()
    assert set(sources) == {"cupy_batched_pack_params", "cupy_batched_unpack_params"}
    for source in sources.values():
        assert source.startswith("#include <cuda_fp16.h>\n")
        assert "(half*)" in source


def _nvrtc():
    """CuPy's NVRTC binding with its library loadable, else skip."""
    pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:
        pytest.skip(f"NVRTC is not loadable: {exc}")
    return nvrtc


def _cuda_include_dirs() -> list[str]:
    """Where ``cuda_fp16.h`` is: the CUDA toolkit, or the nvidia wheels on sys.path."""
    from cupy import _environment
    from cupy._core import core

    candidates = [os.path.join(_environment.get_cuda_path() or "/usr/local/cuda", "include")]
    for entry in sys.path:
        candidates += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
    found = [d for d in candidates if os.path.exists(os.path.join(d, "cuda_fp16.h"))]
    if not found:
        pytest.skip("no cuda_fp16.h found (install nvidia-cuda-runtime or the CUDA toolkit)")
    return [core._get_header_dir_path(), *core._get_cccl_include_options(), *found]


def _compile(nvrtc, source: str, include_dirs: list[str]) -> str | None:
    """NVRTC's log when ``source`` fails to compile for sm_90, else None."""
    options = ["-arch=sm_90", "-std=c++17"]
    options += [d if d.startswith("-I") else f"-I{d}" for d in include_dirs]
    program = nvrtc.createProgram(source, "kernel.cu", (), ())
    try:
        nvrtc.compileProgram(program, options)
        return None
    except nvrtc.NVRTCError:
        return nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)


def test_chainermn_half_kernels_compile_with_nvrtc():
    nvrtc = _nvrtc()
    include_dirs = _cuda_include_dirs()
    for name, fixed in _chainermn_kernel_sources().items():
        assert _compile(nvrtc, fixed, include_dirs) is None, name
        if cupy_compat.cupy_major() >= 14:
            # The reason for the fix: CuPy 14's headers no longer declare half.
            log = _compile(nvrtc, fixed.split("\n", 1)[1], include_dirs)
            assert log is not None and 'identifier "half" is undefined' in log, name


STAND_IN_CUPY = {
    "cupy/__init__.py": """\
        __version__ = VERSION
        class ndarray: pass
        def memoize(for_each_device=False):
            return lambda f: f
        def get_default_memory_pool(): return None
        def get_default_pinned_memory_pool(): return None
        class _Anything:
            def __init__(self, *args, **kwargs): pass
            def __call__(self, *args, **kwargs): return _Anything()
            def __getattr__(self, name): return _Anything()
        def __getattr__(name):
            if name.startswith("__") or name in ("cuda", "cudnn"):
                raise AttributeError(name)
            return _Anything
        from cupy import cuda
        """,
    "cupy/cuda/__init__.py": "class Device: pass\nclass Event: pass\nclass Stream: pass\n",
    "cupy/cuda/cublas.py": "",
    "cupy/_util.py": "class PerformanceWarning(Warning): pass\n",
    "cupyx/__init__.py": "",
    "cupyx/scipy/__init__.py": "",
    "cupyx/scipy/linalg.py": "",
    "cupyx/scipy/special.py": "",
}
STAND_IN_CUDNN = {
    # CuPy 13: importing cupy.cudnn warns, exactly as the real one does.
    "cupy/cudnn.py": """\
        import warnings
        def get_max_workspace_size(): return 0
        warnings.warn("cupy.cudnn is deprecated. Use cupyx.cudnn instead", DeprecationWarning)
        """,
    "cupy/cuda/cudnn.py": """\
        def getVersion(): return 8907
        def __getattr__(name):
            if name.startswith("CUDNN_"):
                return 0
            raise AttributeError(name)
        """,
}


def _stand_in_cupy(root: Path, version: str, with_cudnn: bool) -> Path:
    files = dict(STAND_IN_CUPY, **(STAND_IN_CUDNN if with_cudnn else {}))
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).replace("VERSION", repr(version)))
    return root


def _import_chainer(site: Path, first: str, then: str = "") -> subprocess.CompletedProcess:
    report = "import chainer.backends.cuda as c\nprint(c.available, c.cudnn_enabled)"
    code = f"{first}\n{report}\n{then}"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("CHAINER_CUDNN", None)
    # Warnings from CuPy's cudnn module become errors, as under pytest's or -W error.
    command = [sys.executable, "-W", "error::DeprecationWarning:cupy.cudnn", "-c", code]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_cupy13_cudnn_stays_enabled_under_warnings_as_errors(tmp_path):
    site = _stand_in_cupy(tmp_path, "13.6.0", with_cudnn=True)
    # The fault: under -W error the import Chainer guards with `except Exception` raises.
    fault = _import_chainer(site, "import cupy.cudnn")
    assert fault.returncode != 0 and "cupy.cudnn is deprecated" in fault.stderr
    fixed = _import_chainer(site, "import smchainer, chainer")
    assert fixed.stdout.split() == ["True", "True"], fixed.stderr


def test_cupy14_missing_cudnn_is_no_warning(tmp_path):
    site = _stand_in_cupy(tmp_path, "14.2.0", with_cudnn=False)
    check = "c.check_cuda_available(); print('checked')"
    fixed = _import_chainer(site, "import smchainer, chainer", check)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.split() == ["True", "False", "checked"]
    # The fault it prevents: Chainer's own advice, an error under -W error.
    unfixed = _import_chainer(
        site, "import smchainer, chainer, warnings",
        "del c.check_cuda_available._already_warned\n"
        "warnings.simplefilter('error')\n" + check)
    assert unfixed.returncode != 0 and "cuDNN is not enabled" in unfixed.stderr


def test_quiet_cudnn_deprecation_silences_only_that_warning():
    def warn(message: str) -> None:
        warnings.warn(message, DeprecationWarning, stacklevel=2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with cupy_compat.quiet_cudnn_deprecation():
            warn("cupy.cudnn is deprecated. Use cupyx.cudnn instead")
            with pytest.raises(DeprecationWarning):
                warn("something else is deprecated")
        with pytest.raises(DeprecationWarning):
            warn("cupy.cudnn is deprecated. Use cupyx.cudnn instead")


def test_describe_gpu_stack_on_this_machine():
    info = cupy_compat.describe_gpu_stack()
    import chainer
    import numpy

    assert info["chainer"] == chainer.__version__ and info["numpy"] == numpy.__version__
    if info["cuda_available"]:
        assert info["cupy"] and info["gpu_count"] >= 1 and info["nvrtc"], info
    else:
        assert info["cupy"] is None and info["error"]


def fake_cuda_wheels(root) -> list[str]:
    """The lib folders of a few nvidia-*-cu12 wheels, with empty files for libraries."""
    names = {"cudnn": "libcudnn.so.8", "cublas": "libcublas.so.12",
             "cuda_runtime": "libcudart.so.12", "nccl": "libnccl.so.2",
             "nvjitlink": "libnvJitLink.so.12"}
    for package, library in names.items():
        folder = root / "nvidia" / package / "lib"
        folder.mkdir(parents=True)
        (folder / library).write_bytes(b"")
    (root / "nvidia" / "cublas" / "lib" / "libcublasLt.so.12").write_bytes(b"")
    return [str(root)]


def test_cuda_wheel_libraries_are_found_in_load_order(tmp_path) -> None:
    from smchainer.compat.cupy import cuda_wheel_libraries

    found = [p.rsplit("/", 1)[1] for p in cuda_wheel_libraries(fake_cuda_wheels(tmp_path))]
    assert found == ["libcudart.so.12", "libnvJitLink.so.12", "libcublasLt.so.12",
                     "libcublas.so.12", "libcudnn.so.8", "libnccl.so.2"]
    assert cuda_wheel_libraries([str(tmp_path / "nowhere")]) == []


def test_preloading_is_only_for_the_cupy_cuda12x_stack(tmp_path) -> None:
    from importlib import metadata

    from smchainer.compat.cupy import preload_cuda_wheels

    try:
        metadata.version("cupy-cuda12x")
    except metadata.PackageNotFoundError:
        # Not that stack: nothing is loaded, even with (broken) libraries present.
        assert preload_cuda_wheels(fake_cuda_wheels(tmp_path)) == []
    else:  # pragma: no cover - only where the gpu-cudnn extra is installed
        pytest.skip("the gpu-cudnn stack is installed: preloading is live here")
