"""Chainer on the installed NumPy, against the same workload on NumPy 1.26."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import smchainer.compat
from tests.compat.workload import run_workload

REFERENCE = Path(__file__).with_name("numpy1_reference.npz")


def test_chainer_imports_in_a_fresh_process() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import smchainer, chainer, chainermn, numpy; "
         "print(chainer.__version__, numpy.__version__)"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "7.8.1"


def test_numpy_itself_is_left_alone() -> None:
    import chainer.functions  # noqa: F401  (imports the fixed modules)

    assert smchainer.compat.installed()
    if smchainer.compat.NUMPY_2:
        assert not hasattr(np, "sctypes")
    assert "float" not in vars(np)


def test_environment_check_never_imports_distutils_or_pkg_resources() -> None:
    code = (
        "import sys, smchainer, chainer; "
        "bad = [m for m in ('numpy.distutils', 'pkg_resources') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_workload_matches_numpy1_reference() -> None:
    reference = np.load(REFERENCE)
    results = run_workload()
    assert set(results) == set(reference.files) - {"numpy_version"}
    assert str(reference["numpy_version"]).startswith("1.26")
    for name, value in results.items():
        expected = reference[name]
        assert value.dtype == expected.dtype, name
        assert value.shape == expected.shape, name
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-6, err_msg=name)


def test_training_actually_changed_the_weights() -> None:
    # Guards the comparison above against a workload that does nothing.
    results = run_workload()
    grads = [value for name, value in results.items() if name.startswith("grad")]
    assert len(grads) == 11 and all(np.abs(grad).sum() > 0 for grad in grads)
    assert results["conv1_W_change"] > 1e-3
    np.testing.assert_array_equal(results["restored_logits"], results["eval_logits"])
    assert results["trainer_final_lr"] == pytest.approx(0.05 * 0.5**3)


class _HostBuffer:
    """Stands in for ChainerMN's device buffer (a GPU we do not have here)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data.view(np.uint8)

    def to_device(self, array, size, offset, stream=None):
        array.view(np.uint8).reshape(-1)[:size] = self.data[offset:offset + size]


def test_chainermn_unpack_params_converts_dtypes() -> None:
    import chainer
    from chainermn.communicators import _memory_utility

    params = [chainer.Parameter(np.zeros(3, dtype=np.float16)),
              chainer.Parameter(np.zeros(2, dtype=np.float16))]
    for param in params:
        param.grad = np.zeros_like(param.array)
    transfer = np.array([1.5, 2.5, -3.0, 4.0, 0.25], dtype=np.float32)
    _memory_utility.unpack_params(params, "grad", _HostBuffer(transfer), np.float32, False)
    assert params[0].grad.dtype == np.float16
    np.testing.assert_array_equal(params[0].grad, [1.5, 2.5, -3.0])
    np.testing.assert_array_equal(params[1].grad, [4.0, 0.25])
