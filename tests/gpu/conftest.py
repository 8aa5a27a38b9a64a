"""Fixtures for the GPU tests: skip cleanly where no usable CUDA GPU is found.

On the GPU machine ``SMCHAINER_REQUIRE_GPU=1`` turns that skip into a failure,
so a broken CuPy cannot pass as "no GPU here".
"""
from __future__ import annotations

import os

import pytest

import smchainer  # noqa: F401  (the compat layer goes in before chainer)


@pytest.fixture(scope="session")
def gpu_device():
    """A checked Chainer device on GPU 0; the test is skipped without a usable GPU."""
    from smchainer.device import DeviceError, cuda_unavailable_reason, get_device

    try:
        reason = cuda_unavailable_reason()
        device = None if reason else get_device("gpu:0")
    except DeviceError as exc:
        reason = str(exc)
    if reason is not None:
        if os.environ.get("SMCHAINER_REQUIRE_GPU") == "1":
            pytest.fail(f"SMCHAINER_REQUIRE_GPU=1 but no usable GPU: {reason}")
        pytest.skip(f"no usable GPU: {reason}")
    return device
