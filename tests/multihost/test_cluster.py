"""Open MPI across two namespace hosts: identity, traffic, and a cut link."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.multihost, pytest.mark.mpi]

ALLREDUCE = """
import socket
from mpi4py import MPI
comm = MPI.COMM_WORLD
print(comm.rank, socket.gethostname(), comm.allreduce(comm.rank + 1), flush=True)
"""

LOOP = """
import time
from mpi4py import MPI
comm = MPI.COMM_WORLD
for step in range(100000):
    comm.allreduce(step)
    time.sleep(0.01)
"""


def mpirun(cluster, hostfile, processes, code):
    return cluster.command(
        1, "mpirun", "--hostfile", str(hostfile), "-n", str(processes), *cluster.mpi_options(),
        sys.executable, "-c", code,
    )


def test_ranks_on_two_hosts_see_their_own_hostnames(cluster) -> None:
    result = subprocess.run(mpirun(cluster, cluster.hostfile(2), 4, ALLREDUCE), env=cluster.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = sorted(line.split() for line in result.stdout.splitlines())
    assert [line[0] for line in lines] == ["0", "1", "2", "3"]
    assert [line[1] for line in lines] == [cluster.hostnames[0]] * 2 + [cluster.hostnames[1]] * 2
    assert {line[2] for line in lines} == {"10"}


def test_a_cut_link_ends_the_job_within_seconds(cluster) -> None:
    process = subprocess.Popen(mpirun(cluster, cluster.hostfile(1), 2, LOOP), env=cluster.env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(4)
        assert process.poll() is None, process.stdout.read()
        cut = time.monotonic()
        cluster.link(2, "down")
        output, _ = process.communicate(timeout=60)
        elapsed = time.monotonic() - cut
    finally:
        if process.poll() is None:
            process.kill()
        cluster.link(2, "up")
    assert "lost communication with a remote daemon" in output
    assert elapsed < 30
