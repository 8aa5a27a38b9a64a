"""The trainer's extensions: learning-rate schedule, evaluation and snapshots.

Each keeps no state that a snapshot would have to save beyond what Chainer's
trainer saves, so resuming needs nothing else.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import chainer
import numpy as np
from chainer import serializers
from chainer.training import extensions

from smchainer.errors import SmchainerError
from smchainer.serializers import read_npz

if TYPE_CHECKING:
    from smchainer.default_plugins.vgg.hyperparameters import Hyperparameters

logger = logging.getLogger(__name__)

#: Share of training spent warming up under the one-cycle schedule.
ONECYCLE_WARMUP = 0.3
#: Hyperparameters a resumed run may change (how long, how often, where): not a misfit's cause.
RESUMABLE = frozenset({"epochs", "iterations", "progress-bar", "checkpoint-every",
                       "keep-checkpoints", "cache-dir", "eval-batch-size"})
SNAPSHOT_PATTERN = re.compile(r"^snapshot_iter_(\d+)\.rank(\d+)of(\d+)\.npz$")


def learning_rate(hp: Hyperparameters, epoch_detail: float, total_epochs: float) -> float:
    """The learning rate at ``epoch_detail`` (fractional epochs done)."""
    base = hp["learning-rate"]
    schedule = hp["lr-schedule"]
    if schedule == "step":
        return base * hp["lr-step-factor"] ** math.floor(epoch_detail / hp["lr-step-epochs"])
    progress = min(max(epoch_detail / total_epochs, 0.0), 1.0) if total_epochs > 0 else 1.0
    if schedule == "cosine":
        return 0.5 * base * (1 + math.cos(math.pi * progress))
    # onecycle: linear warm-up from base/25 to base, then cosine down to base/1e4.
    start, end = base / 25, base / 1e4
    if progress < ONECYCLE_WARMUP:
        return start + (base - start) * progress / ONECYCLE_WARMUP
    down = (progress - ONECYCLE_WARMUP) / (1 - ONECYCLE_WARMUP)
    return end + 0.5 * (base - end) * (1 + math.cos(math.pi * down))


class LearningRateSchedule:
    """Sets the optimizer's lr from the epoch position alone (so resuming needs no state)."""

    trigger = (1, "iteration")
    priority = 300  # before the reporting extensions of the same iteration
    name = "LearningRateSchedule"

    def __init__(self, hp: Hyperparameters, total_epochs: float) -> None:
        self.hp = hp
        self.total_epochs = total_epochs

    def initialize(self, trainer) -> None:
        self(trainer)

    def __call__(self, trainer) -> None:
        optimizer = trainer.updater.get_optimizer("main")
        optimizer.lr = learning_rate(self.hp, trainer.updater.epoch_detail, self.total_epochs)


class RecordingEvaluator(extensions.Evaluator):
    """An Evaluator that weights batches by size and remembers its last result.

    Chainer's Evaluator averages per-batch means, so a short last batch
    counts as much as a full one; here the result is the mean over images.
    """

    last: tuple[int, dict] | None = None

    def evaluate(self) -> dict:
        iterator = self._iterators["main"]
        target = self.eval_func or self._targets["main"]
        iterator.reset()
        summary = chainer.reporter.DictSummary()
        for batch in iterator:
            observation: dict = {}
            with chainer.reporter.report_scope(observation):
                x, t = self.converter(batch, self.device)
                with chainer.no_backprop_mode():
                    target(x, t)
            summary.add({key: (value, len(batch)) for key, value in observation.items()})
        return summary.compute_mean()

    def __call__(self, trainer=None):
        result = super().__call__(trainer)
        if trainer is not None:
            self.last = (trainer.updater.iteration, result)
        return result

    def result_at(self, iteration: int) -> dict:
        """The evaluation of ``iteration``: the last one when it was there, else a new one.

        (Nothing was trained when the job had already finished, or training
        did not end on an epoch.)
        """
        if self.last is not None and self.last[0] == iteration:
            return self.last[1]
        with chainer.Reporter().scope({}):
            return self()


class Checkpointer:
    """Writes and restores per-rank trainer snapshots in the checkpoint folder.

    Files are ``snapshot_iter_<N>.rank<r>of<size>.npz``, written to a
    temporary name and renamed, so a crash leaves no half snapshot; the
    newest ``keep`` of each rank are kept.
    """

    priority = -100  # after LogReport has written the log of this iteration
    name = "Checkpointer"

    #: A member of each snapshot: the hyperparameters of the job that wrote it (JSON bytes).
    HYPERPARAMETERS_KEY = "smchainer/hyperparameters"

    def __init__(self, folder: Path, rank: int, size: int, keep: int,
                 hyperparameters: dict | None = None,
                 on_written: Callable[[Path], None] | None = None) -> None:
        self.folder = folder
        self.rank = rank
        self.size = size
        self.keep = keep
        self.hyperparameters = dict(hyperparameters or {})
        #: Called with each snapshot once it is complete (the checkpoint upload).
        self.on_written = on_written

    def _iterations(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = SNAPSHOT_PATTERN.match(path.name)
            if match and (int(match[2]), int(match[3])) == (self.rank, self.size):
                found.append(int(match[1]))
        return sorted(found)

    def path(self, iteration: int) -> Path:
        return self.folder / f"snapshot_iter_{iteration}.rank{self.rank}of{self.size}.npz"

    def __call__(self, trainer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        iteration = trainer.updater.iteration
        target = self.path(iteration)
        temporary = target.with_name(target.name + ".tmp")
        # Chainer's save_npz, plus the job's hyperparameters as one more (non-pickled)
        # member, which loading ignores and a misfit's message reads.
        state = serializers.DictionarySerializer()
        state.save(trainer)
        arrays = dict(state.target)
        arrays[self.HYPERPARAMETERS_KEY] = np.frombuffer(
            json.dumps(self.hyperparameters).encode(), dtype=np.uint8)
        with open(temporary, "wb") as file:
            np.savez_compressed(file, **arrays)
        os.replace(temporary, target)
        for old in self._iterations()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        if self.on_written is not None:
            self.on_written(target)

    def read(self, iteration: int) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """This rank's snapshot of ``iteration``: its arrays, or why it cannot be loaded.

        Every member is read (pickles refused, :func:`~smchainer.serializers.read_npz`)
        before the trainer is touched, so a damaged snapshot never leaves a
        half-loaded trainer behind, and the file is read once.
        """
        try:
            return read_npz(self.path(iteration)), None
        except (SmchainerError, OSError, ValueError) as error:
            return None, str(error)

    def resume(self, trainer, comm=None) -> int:
        """Load the newest snapshot that every rank can load; return its iteration (0: none).

        A snapshot that some rank lacks is not a candidate; one that is
        damaged on any rank (truncated, not an npz, holding a pickle) is
        skipped with a warning naming the file and why, and this rank's
        damaged file is set aside as ``<name>.damaged``, so that the next
        older snapshot is tried and later runs do not stumble on it again.
        """
        mine = set(self._iterations())
        if comm is not None:
            common = set.intersection(*comm.mpi_comm.allgather(mine))
        else:
            common = mine
        for iteration in sorted(common, reverse=True):
            arrays, problem = self.read(iteration)
            problems = comm.mpi_comm.allgather(problem) if comm is not None else [problem]
            if problem is not None:
                damaged = self.path(iteration)
                logger.warning("rank %d: snapshot %s cannot be loaded, skipped: %s",
                               self.rank, damaged, problem)
                os.replace(damaged, damaged.with_name(damaged.name + ".damaged"))
            if any(p is not None for p in problems):
                continue
            assert arrays is not None
            try:
                serializers.NpzDeserializer(arrays).load(trainer)
            except (ValueError, KeyError, TypeError) as error:
                raise SmchainerError(self.misfit(iteration, arrays, trainer, error)) from None
            if self.rank == 0:
                logger.info("resumed from the snapshot at iteration %d in %s", iteration,
                            self.folder)
            return iteration
        if common and self.rank == 0:
            logger.warning("no snapshot in %s could be loaded: training starts from the beginning",
                           self.folder)
        return 0


    def misfit(self, iteration: int, arrays: dict[str, np.ndarray], trainer,
               error: Exception) -> str:
        """Why a sound snapshot does not fit this job's model: arrays and hyperparameters."""
        path = self.path(iteration)
        expected = serializers.DictionarySerializer()
        # The updater holds the model and the optimizer (the trainer's own state
        # cannot be serialised before training starts).
        trainer.updater.serialize(expected["updater"])
        differing = []
        for key, array in expected.target.items():
            if key not in arrays:
                differing.append(f"{key} missing")
            elif getattr(array, "shape", None) != arrays[key].shape:
                differing.append(f"{key}: {arrays[key].shape} in the snapshot, "
                                 f"{array.shape} in the model")
        message = f"snapshot {path} does not fit this job's model"
        if differing:
            message += (f": {len(differing)} arrays differ (" + "; ".join(differing[:3])
                        + (", ..." if len(differing) > 3 else "") + ")")
        else:
            message += f": {error}"
        saved = arrays.get(self.HYPERPARAMETERS_KEY)
        before = json.loads(saved.tobytes()) if saved is not None else None
        if before:
            changed = [f"{name} {before.get(name)!r} then, {value!r} now"
                       for name, value in self.hyperparameters.items()
                       if name in before and before[name] != value and name not in RESUMABLE]
            if changed:
                message += "; hyperparameters that differ from the snapshot's job: " + \
                    ", ".join(changed)
        return message + ("; train with the same hyperparameters, or start a fresh job "
                          "(another --job-dir or --checkpoint-dir)")


def report_progress(trainer, progress_bar: bool) -> None:
    """Rank 0's reports: the learning rate, the log, the plots, the table, the bar."""
    trainer.extend(extensions.observe_lr(), trigger=(1, "epoch"))
    trainer.extend(extensions.LogReport(trigger=(1, "epoch")))
    trainer.extend(extensions.PlotReport(
        ["main/loss", "validation/main/loss"], "epoch", filename="loss.png"
    ))
    trainer.extend(extensions.PlotReport(
        ["main/accuracy", "validation/main/accuracy"], "epoch", filename="accuracy.png"
    ))
    trainer.extend(extensions.PrintReport([
        "epoch", "iteration", "main/loss", "validation/main/loss", "main/accuracy",
        "validation/main/accuracy", "lr", "elapsed_time",
    ]))
    if progress_bar:
        trainer.extend(extensions.ProgressBar(update_interval=10))
