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


#: MPI tag of :func:`scatter_arrays`' messages.
_SCATTER_TAG = 7301


def scatter_arrays(arrays: tuple[Any, ...] | None, comm: Any, *, shuffle: bool = False,
                   seed: int | None = None, root: int = 0,
                   max_message_bytes: int = 256 * 2**20) -> tuple[Any, ...]:
    """Each rank's share of the rows of ``arrays`` (NumPy, same length), sent to it alone.

    The shares are ``chainermn.scatter_dataset``'s with ``force_equal_length``
    (the same permutation for a given ``seed``, the same rows per rank), but
    ChainerMN broadcasts the whole pickled dataset to every rank and lets
    each keep a view of its part; here rank ``root`` sends each rank only its
    rows, as raw buffers (no pickling), in messages of at most
    ``max_message_bytes``. Only ``root``'s ``arrays`` are read; the other
    ranks may pass None.

    :param comm: a ChainerMN communicator (its ``mpi_comm`` carries the data).
    :returns: this rank's rows of every array, contiguous.
    """
    import numpy as np

    mpi = comm.mpi_comm
    if comm.rank != root:
        header = mpi.recv(source=root, tag=_SCATTER_TAG)
        received = []
        for dtype, shape in header:
            part = np.empty(shape, dtype=np.dtype(dtype))
            for chunk in _row_chunks(part, max_message_bytes):
                mpi.Recv(chunk, source=root, tag=_SCATTER_TAG)
            received.append(part)
        return tuple(received)
    if arrays is None or not arrays:
        raise ValueError("the root rank of scatter_arrays needs the arrays")
    total = len(arrays[0])
    if any(len(array) != total for array in arrays):
        raise ValueError("scatter_arrays needs arrays of the same length")
    order = np.random.RandomState(seed).permutation(total) if shuffle else np.arange(total)
    share = -(-total // comm.size)
    mine: tuple[Any, ...] = ()
    for rank in range(comm.size):
        begin = total * rank // comm.size
        rows = order[begin:begin + share]
        parts = tuple(np.ascontiguousarray(array[rows]) for array in arrays)
        if rank == root:
            mine = parts
            continue
        mpi.send([(part.dtype.str, part.shape) for part in parts], dest=rank, tag=_SCATTER_TAG)
        for part in parts:
            for chunk in _row_chunks(part, max_message_bytes):
                mpi.Send(chunk, dest=rank, tag=_SCATTER_TAG)
    return mine


def _row_chunks(array: Any, max_bytes: int) -> list[Any]:
    """Contiguous row blocks of a C-contiguous array, each at most ``max_bytes`` (>= 1 row)."""
    row_bytes = max(1, array.nbytes // max(1, len(array)))
    rows = max(1, max_bytes // row_bytes)
    return [array[start:start + rows] for start in range(0, len(array), rows)]
