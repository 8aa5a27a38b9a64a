"""Stopping the built-in trainer at a snapshot when the job is told to stop (SIGTERM)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from smchainer.training.preemption import Terminated

if TYPE_CHECKING:
    from smchainer.default_plugins.vgg.extensions import Checkpointer


class StopOnNotice:
    """Stops training at the end of an iteration once a stop notice arrived (SIGTERM).

    Every iteration the ranks agree whether any of them has the notice (one
    small allreduce, beside the gradients' own), so that all stop at the same
    iteration; each writes its snapshot of it, they wait for one another, and
    :class:`~smchainer.training.preemption.Terminated` ends the job with exit
    143. A rerun resumes from that snapshot.
    """

    priority = -200  # after the Checkpointer of the same iteration
    name = "StopOnNotice"

    @staticmethod
    def trigger(trainer) -> bool:
        """Every iteration, as a trigger with no state: a snapshot's members stay as
        they were without this extension, so older snapshots still load."""
        return True

    def __init__(self, preemption, checkpointer: Checkpointer, comm=None) -> None:
        self.preemption = preemption
        self.checkpointer = checkpointer
        self.comm = comm
        preemption.accept()

    def __call__(self, trainer) -> None:
        stop = self.preemption.requested
        if self.comm is not None:
            stop = self.comm.mpi_comm.allreduce(stop, op=_logical_or())
        if not stop:
            return
        iteration = trainer.updater.iteration
        if not self.checkpointer.path(iteration).exists():
            self.checkpointer(trainer)
        if self.comm is not None:
            self.comm.mpi_comm.barrier()  # every rank's snapshot is on disk
        raise Terminated(f"stopped at iteration {iteration}, after writing its snapshot "
                         f"in {self.checkpointer.folder} (a rerun resumes from it)",
                         coordinated=True)


def _logical_or():
    from mpi4py import MPI

    return MPI.LOR
