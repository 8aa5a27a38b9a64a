"""The trainer across ranks: ChainerMN's communicator over the job's MPI world."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from smchainer.errors import SmchainerError

if TYPE_CHECKING:
    from smchainer.training.env import TrainingEnv

logger = logging.getLogger(__name__)


def open_communicator(env: TrainingEnv, name: str | None, on_gpu: bool, device: Any) -> Any:
    """ChainerMN's communicator for a job of several ranks; None for one.

    Built over the MPI communicator the runner already opened
    (``env.mpi_comm``), so MPI is set up once per process. ``name`` is the
    ``communicator`` hyperparameter; by default ``pure_nccl`` on a GPU and
    ``naive`` on the CPU.
    """
    if env.size == 1:
        return None
    import chainermn

    name = name or ("pure_nccl" if on_gpu else "naive")
    comm = chainermn.create_communicator(name, mpi_comm=env.mpi_comm)
    if comm.size != env.size or comm.rank != env.rank:
        raise SmchainerError(
            f"MPI says rank {comm.rank} of {comm.size}, the job says {env.rank} of {env.size}"
        )
    logger.info("rank %d of %d, communicator %s, device %s", env.rank, env.size, name, device)
    return comm
