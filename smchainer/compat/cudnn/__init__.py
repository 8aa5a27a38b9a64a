"""cuDNN for Chainer on CuPy 14: ``cupy.cudnn`` and ``cupy.cuda.cudnn`` over cuDNN 9's legacy API.

CuPy 14 removed its cuDNN modules, so Chainer 7.8.1 found no cuDNN and ran its
convolutions as im2col + GEMM and its batch norm as separate reductions. This
package puts two modules in their place, written against cuDNN 9 through
ctypes (no compiler, no CuPy rebuild):

:mod:`~smchainer.compat.cudnn.libcudnn` (``cupy.cuda.cudnn``)
    cuDNN's constants, ``getVersion``, ``CuDNNError`` and the handle and
    descriptor calls.
:mod:`~smchainer.compat.cudnn.highlevel` (``cupy.cudnn``)
    The functions Chainer calls, with CuPy 7-13's signatures.

:func:`install_into_cupy` runs just before ``chainer.backends.cuda`` is imported
(the hook in :mod:`smchainer.compat`). It does nothing unless CuPy imports,
has no ``cupy.cudnn`` of its own and a cuDNN 9 library is found
(:mod:`~smchainer.compat.cudnn.discovery`); ``SMCHAINER_CUDNN=0`` turns it off.
Then Chainer computes ``cudnn_enabled = True`` itself, and its switches keep
their meaning: ``CHAINER_CUDNN=0``, ``chainer.config.use_cudnn``,
``autotune``, ``cudnn_deterministic``, ``cudnn_fast_batch_normalization``.

Not bound: RNNs (``n_step_lstm``...), dropout states and the spatial
transformer. Those Chainer modules see ``chainer.should_use_cudnn`` as False
(:func:`without_cudnn`), so they take their own GPU path; everything else in
Chainer sees cuDNN as usual. TF32: see :mod:`~smchainer.compat.cudnn.convolution`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from typing import Any

from smchainer.compat.cudnn import discovery

logger = logging.getLogger(__name__)

SWITCH_ENV = "SMCHAINER_CUDNN"
BINDING = "smchainer ctypes binding"
__all__ = ["install_into_cupy", "active", "status", "describe", "without_cudnn", "BINDING"]

_state: dict[str, Any] = {"active": False, "library": None, "reason": "not tried yet"}


def active() -> bool:
    """Whether the two modules are in ``sys.modules`` as CuPy's."""
    return bool(_state["active"])


def status() -> dict[str, Any]:
    """The binding's state, for :func:`smchainer.compat.cupy.describe_gpu_stack`."""
    library = _state["library"]
    info: dict[str, Any] = {"active": active(), "binding": BINDING, "reason": _state["reason"]}
    if library is not None:
        info.update(library=library.path, source=library.source, version=library.version,
                    version_string=library.version_string)
    return info


def describe() -> str:
    """One line: ``cuDNN 9.19.0 (smchainer ctypes binding, /path/libcudnn.so.9)`` or why not."""
    library = _state["library"]
    if active() and library is not None:
        return f"cuDNN {library.version_string} ({BINDING}, {library.path})"
    return f"no cuDNN ({_state['reason']})"


def install_into_cupy() -> bool:
    """Put the modules in place of CuPy's if CuPy lacks them and cuDNN 9 is found; idempotent."""
    if active():
        return True
    if os.environ.get(SWITCH_ENV, "1") == "0":
        _state["reason"] = f"{SWITCH_ENV}=0"
        return False
    try:
        import cupy
        import cupy.cuda
    except Exception as exc:  # Chainer's own import reports it
        _state["reason"] = f"CuPy is not importable: {type(exc).__name__}"
        return False
    try:
        has_own = importlib.util.find_spec("cupy.cudnn") is not None
    except (ImportError, ValueError):
        has_own = False
    if has_own:
        _state["reason"] = f"CuPy {cupy.__version__} has its own cupy.cudnn"
        return False
    found = discovery.discover()
    if found.library is None:
        _state["reason"] = found.reason
        logger.info("cuDNN binding not installed: %s", found.reason)
        return False
    from smchainer.compat.cudnn import highlevel, libcudnn

    libcudnn.use_library(found.library.handle)
    sys.modules["cupy.cuda.cudnn"] = libcudnn
    sys.modules["cupy.cudnn"] = highlevel
    cupy.cuda.cudnn = libcudnn
    cupy.cudnn = highlevel
    _state.update(active=True, library=found.library, reason=None)
    logger.info("Chainer uses %s", describe())
    return True


def uninstall() -> None:
    """Take the modules out again (tests)."""
    for name in ("cupy.cuda.cudnn", "cupy.cudnn"):
        sys.modules.pop(name, None)
    _state.update(active=False, library=None, reason="uninstalled")


class _ChainerWithoutCudnn(types.ModuleType):
    """``chainer`` as one module sees it: ``should_use_cudnn`` is always False."""

    def __init__(self, chainer: types.ModuleType) -> None:
        super().__init__("chainer")
        self.__dict__["_chainer"] = chainer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_chainer"], name)

    @staticmethod
    def should_use_cudnn(level: str, lowest_version: int = 0) -> bool:
        """cuDNN is never used by this module (the binding does not cover it)."""
        return False


def without_cudnn(module: types.ModuleType) -> None:
    """Make ``module`` (dropout, RNN, spatial transformer) take its non-cuDNN path.

    Only while the binding is active: with CuPy 13's own cuDNN nothing changes.
    """
    chainer = module.__dict__.get("chainer")
    if not active() or chainer is None or isinstance(chainer, _ChainerWithoutCudnn):
        return
    module.__dict__["chainer"] = _ChainerWithoutCudnn(chainer)


#: Chainer modules whose cuDNN path needs what the binding leaves out.
UNBOUND_MODULES = (
    "chainer.functions.noise.dropout",
    "chainer.functions.rnn.n_step_rnn",
    "chainer.functions.rnn.n_step_lstm",
    "chainer.functions.rnn.n_step_gru",
    "chainer.functions.array.spatial_transformer_grid",
    "chainer.functions.array.spatial_transformer_sampler",
)
