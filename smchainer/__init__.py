"""smchainer: train and serve Chainer models with the SageMaker contract.

Plugins write ``from smchainer import hookimpl``. Importing this package puts
:mod:`smchainer.compat` in place so that Chainer imports on NumPy 2; it does
not import Chainer itself.
"""
from smchainer import compat as _compat
from smchainer.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
#: Names of the notebook API (:mod:`smchainer.api`), imported on first use.
_API_NAMES = ("Chainer", "Estimator", "HyperparameterTuner", "Model", "Predictor", "Session",
              "Transformer")
__all__ = ["hookimpl", "hookspec", "__version__", *_API_NAMES]

_compat.install()


def __getattr__(name: str) -> object:
    # PEP 562: ``smchainer.Estimator`` loads the API only when asked for, so
    # that ``import smchainer`` (done by every rank and worker) stays light.
    if name in _API_NAMES:
        from smchainer import api

        return getattr(api, name)
    raise AttributeError(f"module 'smchainer' has no attribute {name!r}")
