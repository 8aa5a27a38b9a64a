"""TrainingEnv: everything a training job knows about itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainingEnv:
    """A training job as seen by one process (one MPI rank).

    Directories follow SageMaker's ``/opt/ml`` layout under ``job_dir``.
    ``device`` is ``"cpu"`` or ``"gpu:N"`` (this rank's GPU).

    Two different "firsts" matter in a job, and each has its own name:
    :attr:`is_rank_zero` is the one process that reports progress and writes
    the artifacts; :attr:`is_master` is SageMaker's ``is_master``, true on
    every process of the first host (``hosts[0]``), as user scripts read it
    from ``SM_TRAINING_ENV``.
    """

    job_dir: Path
    channels: dict[str, Path] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=lambda: ["algo-1"])
    current_host: str = "algo-1"
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    num_gpus: int = 0
    num_cpus: int = 1
    device: str = "cpu"
    checkpoint_dir: Path | None = None
    network_interface_name: str = "eth0"
    user_entry_point: str | None = None
    log_level: int = 20
    job_name: str = ""
    #: The job's mpi4py communicator (``MPI.COMM_WORLD``) under mpirun, else None:
    #: the one the rank, size and hosts above were learned from, so that code
    #: running in the rank builds its ChainerMN communicator on it
    #: (``chainermn.create_communicator(name, mpi_comm=env.mpi_comm)``).
    mpi_comm: Any = field(default=None, repr=False, compare=False)
    #: The process's stop notice (:class:`~smchainer.training.preemption.Preemption`)
    #: while the runner runs the job, else None: a trainer that can stop at a safe
    #: point ``accept()`` s it and reads ``requested`` there.
    preemption: Any = field(default=None, repr=False, compare=False)
    #: The :class:`~smchainer.training.checkpoint_sync.CheckpointSync` of this
    #: host's checkpoint folder on the rank that runs it (with
    #: ``--checkpoint-s3-uri``), else None: ``notify(path)`` uploads a file now.
    checkpoint_sync: Any = field(default=None, repr=False, compare=False)

    @property
    def is_rank_zero(self) -> bool:
        """Rank 0: the one process that prints progress and writes the artifacts."""
        return self.rank == 0

    @property
    def is_master(self) -> bool:
        """SageMaker's ``is_master``: this process runs on the first host, ``hosts[0]``.

        Every rank of that host is the master; use :attr:`is_rank_zero` for
        the single process that writes the artifacts.
        """
        return self.current_host == self.hosts[0]

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def rank_dir(self) -> Path:
        """The root of this rank's own folders: the job dir for rank 0, else ``ranks/<rank>``.

        Ranks on one host (or on hosts sharing the job dir) would otherwise
        write over one another's ``model/`` and ``output/data/``, as ranks on
        separate SageMaker instances never do; rank 0's folders are the ones
        packed into ``model.tar.gz`` and ``output.tar.gz``.
        """
        return self.job_dir if self.rank == 0 else self.job_dir / "ranks" / str(self.rank)

    @property
    def model_dir(self) -> Path:
        return self.rank_dir / "model"

    @property
    def output_dir(self) -> Path:
        """``output/`` of the job (``success``, ``failure``): one for all ranks."""
        return self.job_dir / "output"

    @property
    def output_data_dir(self) -> Path:
        return self.rank_dir / "output" / "data"

    @property
    def output_intermediate_dir(self) -> Path:
        return self.rank_dir / "output" / "intermediate"

    @property
    def input_dir(self) -> Path:
        return self.job_dir / "input"

    @property
    def input_config_dir(self) -> Path:
        return self.job_dir / "input" / "config"

    @property
    def code_dir(self) -> Path:
        return self.job_dir / "code"

    @property
    def checkpoints(self) -> Path:
        """Where snapshots go: ``checkpoint_dir`` or ``job_dir/checkpoints``."""
        return self.checkpoint_dir or self.job_dir / "checkpoints"
