"""scatter_arrays under a real mpirun: ChainerMN's shares, each sent only to its rank."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import VENV_BIN

pytestmark = [pytest.mark.mpi]

DRIVER = textwrap.dedent("""
    import sys
    import numpy as np
    import smchainer  # noqa: F401  (before chainer)
    import chainer, chainermn
    from smchainer.training.mpi import scatter_arrays

    out = sys.argv[1]
    comm = chainermn.create_communicator("naive")
    arrays = None
    if comm.rank == 0:
        rng = np.random.default_rng(0)
        arrays = (rng.integers(0, 256, (101, 3, 4, 4)).astype(np.uint8),
                  np.arange(101, dtype=np.int32))
    # 200-byte messages: each 48-byte image row set goes in several chunks
    mine = scatter_arrays(arrays, comm, shuffle=True, seed=5, max_message_bytes=200)
    plain = scatter_arrays(arrays, comm)
    dataset = None if arrays is None else chainer.datasets.TupleDataset(*arrays)
    theirs = chainermn.scatter_dataset(dataset, comm, shuffle=True, seed=5)
    theirs = [np.stack([theirs[i][k] for i in range(len(theirs))]) for k in (0, 1)]
    np.savez(f"{out}/rank{comm.rank}.npz", images=mine[0], labels=mine[1],
             their_images=theirs[0], their_labels=theirs[1], plain_labels=plain[1])
""")


def test_scatter_arrays_gives_chainermns_shares(tmp_path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM", "PMIX"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(VENV_BIN / "mpirun"), "-n", "3", "--oversubscribe", sys.executable, str(driver),
         str(tmp_path)], capture_output=True, text=True, env=env, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shares = [dict(np.load(tmp_path / f"rank{rank}.npz")) for rank in range(3)]
    seen = []
    for rank, share in enumerate(shares):
        assert len(share["labels"]) == 34  # ceil(101 / 3) on every rank
        np.testing.assert_array_equal(share["labels"], share["their_labels"], err_msg=rank)
        np.testing.assert_array_equal(share["images"], share["their_images"], err_msg=rank)
        assert share["images"].dtype == np.uint8 and share["images"].shape[1:] == (3, 4, 4)
        begin = 101 * rank // 3
        np.testing.assert_array_equal(share["plain_labels"], np.arange(begin, begin + 34))
        seen.extend(share["labels"].tolist())
    assert set(seen) == set(range(101))  # every row reaches some rank
