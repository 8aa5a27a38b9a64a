"""Make Chainer 7.8.1 import and run on today's NumPy, setuptools and CuPy.

Chainer's last release (2022) predates NumPy 2, setuptools 82 and CuPy 14.
Rather than patch NumPy globally, smchainer installs an import hook that
adjusts only the Chainer modules that need it, at the moment they are imported:

``chainer._environment_check``
    Imports ``numpy.distutils`` (gone in NumPy 2 / Python 3.12) and
    ``pkg_resources`` (gone in setuptools 82) only to warn about Python 3.5.0,
    macOS Accelerate and optional dependency versions. It is replaced by a
    module whose ``check()`` does nothing; smchainer checks the GPU stack itself
    (:mod:`smchainer.device`).
``chainer.functions.array.as_strided``
    Reads ``numpy.sctypes`` (removed in NumPy 2) at import and in backward.
    It is lent ``sctypes`` while its module body runs, and the backward
    function gets a NumPy view that still has it.
``chainer.functions.array.resize_images``
    ``compute_indices_and_weights`` uses the ``numpy.float`` alias (removed in
    NumPy 1.24). That one function gets a NumPy view where ``float`` is the
    builtin it always stood for.
``chainer.backends.cuda``
    CuPy 12-14: :mod:`smchainer.compat.cupy` keeps CuPy 13's cuDNN enabled
    under ``-W error``, makes ChainerMN's ``half`` kernels compile on CuPy 14
    and logs instead of warning that CuPy 14 lacks cuDNN.
``chainer.training.extensions.print_report`` and ``...extensions.util``
    ``PrintReport`` clears the screen (``ESC [J``) before each line and
    ``ProgressBar`` redraws itself with cursor moves, into files and pipes as
    well (``train.log``, a notebook's streamed log). Where the stream is not a
    terminal, ``PrintReport`` writes its lines without the escapes and the
    progress bar is not drawn.
cuDNN on CuPy 14 (:mod:`smchainer.compat.cudnn`)
    CuPy 14 has no ``cupy.cudnn``, so Chainer ran without cuDNN (5-10x slower
    than PyTorch on VGG). Just before ``chainer.backends.cuda`` is imported,
    ``cupy.cudnn`` and ``cupy.cuda.cudnn`` are put in ``sys.modules``: a
    binding of cuDNN 9's legacy API through ctypes, found in the
    ``nvidia-cudnn-cu13`` wheel, torch's ``lib`` or the system
    (``SMCHAINER_CUDNN_LIBRARY`` names one, ``SMCHAINER_CUDNN=0`` turns it off).
    Chainer then enables cuDNN itself; ``CHAINER_CUDNN=0`` and
    ``chainer.config.use_cudnn`` keep their meaning. Dropout, the RNNs and the
    spatial transformer, which need cuDNN calls the binding leaves out, see
    ``should_use_cudnn`` as False and take Chainer's own GPU path.
    ``chainer.print_runtime_info()`` gets a ``cuDNN:`` line. float32
    convolutions use TF32 only with ``CUPY_TF32=1``.
``chainermn.communicators._memory_utility``
    ``unpack_params`` calls ``xp.array(v, copy=False, dtype=...)``, which NumPy 2
    and CuPy 14 refuse when the dtype differs (a copy is needed). Replaced by a
    version that lets the conversion copy.

Everything else in NumPy stays as it is. :func:`install` is idempotent and is
called when :mod:`smchainer` is imported, so ``import smchainer, chainer``
works in any order after the first line. Choosing and checking a GPU is
:mod:`smchainer.device`'s job.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import re
import sys
import types
from collections.abc import Callable, Sequence

import numpy

from smchainer.compat import cudnn as _cudnn
from smchainer.compat import cupy as _cupy

__all__ = ["install", "installed", "NUMPY_2"]

NUMPY_2 = int(numpy.__version__.split(".")[0]) >= 2

_SCTYPES = {
    "int": [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
    "uint": [numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64],
    "float": [numpy.float16, numpy.float32, numpy.float64, numpy.longdouble],
    "complex": [numpy.complex64, numpy.complex128, numpy.clongdouble],
    "others": [bool, object, bytes, str, numpy.void],
}


class _NumpyView(types.ModuleType):
    """NumPy as one legacy function sees it: NumPy plus the names it lost."""

    def __init__(self, extra: dict[str, object]) -> None:
        super().__init__("numpy")
        self.__dict__.update(extra)

    def __getattr__(self, name: str) -> object:
        return getattr(numpy, name)


def _with_globals(function: types.FunctionType, **overrides: object) -> types.FunctionType:
    """A copy of ``function`` whose global names ``overrides`` are replaced.

    Only the copied function sees the change: the rest of its module keeps
    the real NumPy, so checks such as ``xp is numpy`` still hold there.
    """
    copy = types.FunctionType(
        function.__code__,
        {**function.__globals__, **overrides},
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__doc__ = function.__doc__
    copy.__qualname__ = function.__qualname__
    return copy


def _environment_check_module() -> types.ModuleType:
    module = types.ModuleType("chainer._environment_check")
    module.__doc__ = "Replaced by smchainer.compat: the original imports numpy.distutils."
    module.check = lambda: None  # type: ignore[attr-defined]
    return module


def _fix_as_strided(module: types.ModuleType) -> None:
    grad = module.AsStridedGrad
    grad.forward = _with_globals(grad.forward, np=_NumpyView({"sctypes": _SCTYPES}))


def _fix_resize_images(module: types.ModuleType) -> None:
    module.compute_indices_and_weights = _with_globals(  # type: ignore[attr-defined]
        module.compute_indices_and_weights,
        numpy=_NumpyView({"float": float}),
    )


def _fix_memory_utility(module: types.ModuleType) -> None:
    chainer = sys.modules["chainer"]

    def unpack_params(params, attr_name, buffer, transfer_dtype, zero_fill, stream=None):
        """Unpack a communication buffer into each parameter's ``attr_name``."""
        if len(params) == 0:
            return
        xp = chainer.backend.get_array_module(getattr(params[0], attr_name))
        offset = 0
        for param in params:
            v = getattr(param, attr_name)
            if attr_name == "grad" and v is None and zero_fill:
                v = param.xp.empty_like(param.data)
                setattr(param, attr_name, v)
            size = v.size * numpy.dtype(transfer_dtype).itemsize
            grad_dtype = v.dtype
            if grad_dtype != transfer_dtype:
                v = xp.asarray(v, dtype=transfer_dtype)
            buffer.to_device(v, size, offset, stream)
            offset += size
            if grad_dtype != transfer_dtype:
                getattr(param, attr_name)[...] = v.astype(grad_dtype)

    module.unpack_params = unpack_params  # type: ignore[attr-defined]


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed stream
        return False


class PlainTextStream:
    """A stream that drops terminal control sequences unless it is a terminal."""

    _CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

    def __init__(self, stream: object) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if not _is_terminal(self._stream):
            text = self._CONTROL.sub("", text)
        return self._stream.write(text)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _fix_print_report(module: types.ModuleType) -> None:
    original = module.PrintReport.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._out = PlainTextStream(self._out)

    __init__.__doc__ = original.__doc__
    module.PrintReport.__init__ = __init__


def _fix_progress_bar(module: types.ModuleType) -> None:
    bar = module.ProgressBar
    for name in ("update", "close"):
        drawn = getattr(bar, name)

        def only_on_a_terminal(self, _drawn=drawn):
            if _is_terminal(self._out):
                _drawn(self)

        only_on_a_terminal.__name__ = name
        only_on_a_terminal.__doc__ = drawn.__doc__
        setattr(bar, name, only_on_a_terminal)


def _fix_runtime_info(module: types.ModuleType) -> None:
    """``chainer.print_runtime_info()``: a ``cuDNN:`` line (CuPy 14's report has none)."""
    info = module._RuntimeInfo
    if getattr(info.__str__, "_smchainer_cudnn", False):
        return
    original = info.__str__

    def __str__(self):
        text = original(self)
        if not _cudnn.active():
            return text
        lines = text.splitlines(keepends=True)
        at = next((i for i, line in enumerate(lines) if line.startswith("iDeep")), len(lines))
        lines.insert(at, f"cuDNN: {_cudnn.describe()[len('cuDNN '):]}\n")
        return "".join(lines)

    __str__._smchainer_cudnn = True  # type: ignore[attr-defined]
    info.__str__ = __str__


# module name -> fix applied right after the module's own code ran
_Fix = Callable[[types.ModuleType], None]
_FIXES: dict[str, _Fix] = {
    "chainer.functions.array.as_strided": _fix_as_strided,
    "chainer.functions.array.resize_images": _fix_resize_images,
    "chainermn.communicators._memory_utility": _fix_memory_utility,
    "chainer.backends.cuda": _cupy.fix_cuda_backend,
    "chainer.training.extensions.print_report": _fix_print_report,
    "chainer.training.extensions.util": _fix_progress_bar,
    "chainer._runtime_info": _fix_runtime_info,
    **{name: _cudnn.without_cudnn for name in _cudnn.UNBOUND_MODULES},
}
# module name -> context manager its own code runs inside
_AROUND: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "chainer.backends.cuda": _cupy.quiet_cudnn_deprecation,
}


class _FixingLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, after: _Fix) -> None:
        self._wrapped = wrapped
        self._after = after

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == "chainer.functions.array.as_strided" and NUMPY_2:
            # The module body itself reads numpy.sctypes once, at import.
            numpy.sctypes = _SCTYPES  # type: ignore[attr-defined]
            try:
                self._wrapped.exec_module(module)
            finally:
                del numpy.sctypes  # type: ignore[attr-defined]
        else:
            with _AROUND.get(module.__name__, contextlib.nullcontext)():
                self._wrapped.exec_module(module)
        self._after(module)


class _ReplacementLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _environment_check_module()

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class ChainerCompatFinder(importlib.abc.MetaPathFinder):
    """Meta path finder that applies smchainer's fixes to Chainer modules."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target=None):
        if fullname == "chainer._environment_check":
            return importlib.machinery.ModuleSpec(fullname, _ReplacementLoader())
        if fullname not in _FIXES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _FixingLoader(spec.loader, _FIXES[fullname])
        return spec


def installed() -> bool:
    """Whether the import hook is in place."""
    return any(isinstance(finder, ChainerCompatFinder) for finder in sys.meta_path)


def install() -> None:
    """Put the import hook in place (idempotent).

    Modules already imported (possible only on NumPy 1.x, where Chainer
    imports without help) get their fixes applied on the spot.
    """
    if installed():
        return
    sys.meta_path.insert(0, ChainerCompatFinder())
    for name, fix in _FIXES.items():
        module = sys.modules.get(name)
        if module is not None:
            fix(module)
