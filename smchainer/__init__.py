"""smchainer: train and serve Chainer models with the SageMaker contract.

Plugins write ``from smchainer import hookimpl``. Importing this package puts
:mod:`smchainer.compat` in place so that Chainer imports on NumPy 2; it does
not import Chainer itself.
"""
from smchainer import compat as _compat
from smchainer.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
__all__ = ["hookimpl", "hookspec", "__version__"]

_compat.install()
