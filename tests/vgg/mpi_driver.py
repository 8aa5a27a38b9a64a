"""Run the built-in VGG ``train`` hook as one rank of an mpirun job.

``python -m mpi4py mpi_driver.py BASE CHANNELS_JSON HYPERPARAMETERS_JSON``:
each rank gets its own job folder ``BASE/host<rank>`` (as if each were on its
own host) and writes the metrics it returned to ``BASE/metrics<rank>.json``.
"""
import json
import sys
from pathlib import Path

from mpi4py import MPI

import smchainer  # noqa: F401  (before chainer)
from smchainer.manager import Hooks
from smchainer.plugins import get_plugin_manager
from smchainer.training.env import TrainingEnv


def main() -> None:
    base = Path(sys.argv[1])
    channels = {name: Path(path) for name, path in json.loads(sys.argv[2]).items()}
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    env = TrainingEnv(
        job_dir=base / f"host{rank}", channels=channels,
        hyperparameters=json.loads(sys.argv[3]),
        hosts=[f"algo-{i + 1}" for i in range(size)], current_host=f"algo-{rank + 1}",
        rank=rank, size=size,
    )
    metrics = Hooks(get_plugin_manager(load_entrypoints=False)).train(env)
    (base / f"metrics{rank}.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
