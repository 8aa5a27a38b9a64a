"""Record the workload's results under NumPy 1.26 into numpy1_reference.npz.

Run in an environment with ``numpy==1.26.4`` and ``chainer==7.8.1`` (no
smchainer needed: Chainer imports by itself on NumPy 1)::

    python tests/compat/make_reference.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from workload import run_workload  # noqa: E402

if __name__ == "__main__":
    assert np.__version__.startswith("1."), f"run this under NumPy 1.x, not {np.__version__}"
    # F.resize_images needs the numpy.float alias, gone since NumPy 1.24: give
    # it back here exactly as NumPy 1.23 had it (the builtin float).
    np.float = float  # type: ignore[attr-defined]
    results = run_workload()
    target = Path(__file__).with_name("numpy1_reference.npz")
    np.savez_compressed(target, numpy_version=np.array(np.__version__), **results)
    print(f"wrote {len(results)} arrays to {target}")
