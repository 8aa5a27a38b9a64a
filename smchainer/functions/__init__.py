"""Chainer functions and kernels of smchainer's fast training path."""
from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def cuda_source(name: str) -> str:
    """The CUDA C source ``name`` of :mod:`smchainer.functions.cuda`, as text."""
    return resources.files("smchainer.functions.cuda").joinpath(name).read_text("utf-8")
