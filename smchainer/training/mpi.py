"""Where this process stands in the job: rank, size, local rank, hosts.

Under ``mpirun`` every rank runs ``smchainer-train``; :func:`detect_world`
then initialises MPI (mpi4py) and learns from it the rank and size, the
ranks sharing this host (``MPI_COMM_TYPE_SHARED``: the local rank is the
position among them, in world-rank order, as ChainerMN's ``intra_rank``) and
the hosts. Outside mpirun it returns a one-process world without touching
MPI, so a plain run needs no MPI at all.

Hosts keep their real host names, listed in the order of the first rank on
each (the host of rank 0 first, as ``algo-1`` is first under SageMaker). Two
nodes that report the same host name (containers) get ``-2``, ``-3``...
suffixes so that every host is named once.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Variables that the common MPI launchers set in every rank's environment.
_MPI_RANK_VARIABLES = (
    "OMPI_COMM_WORLD_SIZE",
    "PMIX_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "MV2_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
)


def under_mpirun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by an MPI launcher as one of its ranks."""
    variables = os.environ if environ is None else environ
    return any(name in variables for name in _MPI_RANK_VARIABLES)


@dataclass
class World:
    """The processes of one job, as seen by one of them."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    hosts: list[str] = field(default_factory=lambda: [socket.gethostname()])
    current_host: str = field(default_factory=socket.gethostname)
    leader_ranks: list[int] = field(default_factory=lambda: [0])
    comm: Any = None

    @property
    def distributed(self) -> bool:
        """True under mpirun (even with one rank): MPI is initialised."""
        return self.comm is not None

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for without MPI)."""
        if self.comm is not None:
            self.comm.Barrier()

    def bcast(self, value: Any, root: int = 0) -> Any:
        """``root``'s ``value`` on every rank."""
        return value if self.comm is None else self.comm.bcast(value, root=root)

    def abort(self, code: int) -> None:
        """End every rank of the job now (MPI_Abort); returns only without MPI."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None:
            self.comm.Abort(code)


def detect_world() -> World:
    """This process's :class:`World`: from MPI under mpirun, else a single process."""
    if not under_mpirun():
        return World()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    leader = node.bcast(rank, root=0)
    node.Free()
    hostname = socket.gethostname()
    everyone = comm.allgather((leader, hostname))
    names: dict[int, str] = {}
    taken: dict[str, int] = {}
    for node_leader, name in sorted(set(everyone)):
        if node_leader in names:
            continue
        count = taken.get(name, 0) + 1
        taken[name] = count
        names[node_leader] = name if count == 1 else f"{name}-{count}"
    leaders = sorted(names)
    world = World(
        rank=rank, size=size, local_rank=local_rank, local_size=local_size,
        hosts=[names[r] for r in leaders], current_host=names[leader],
        leader_ranks=leaders, comm=comm,
    )
    logger.debug("rank %d of %d, local rank %d of %d on %s", rank, size, local_rank,
                 local_size, world.current_host)
    return world
