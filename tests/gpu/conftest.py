"""Fixtures for the GPU tests: skip cleanly where no usable CUDA GPU is found.

The skip is :func:`smchainer.testing.require_gpu`'s: on the GPU machine
``SMCHAINER_REQUIRE_GPU=1`` turns it into a failure, so a broken CuPy cannot
pass as "no GPU here".
"""
from __future__ import annotations

import pytest

import smchainer  # noqa: F401  (the compat layer goes in before chainer)
from smchainer.testing import require_gpu


@pytest.fixture(scope="session")
def gpu_device():
    """A checked Chainer device on GPU 0; the test is skipped without a usable GPU."""
    require_gpu()
    from smchainer.device import get_device

    return get_device("gpu:0")
