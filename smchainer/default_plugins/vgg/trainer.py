"""The built-in VGG trainer's job, start to end (imported when ``train`` runs).

:func:`run_training` reads as the recipe it is: the device and the
communicator, each rank's data and iterators, the model, the optimizer, the
updater, the extensions, resume, train, evaluate, save. Each step lives
in a module of its own beside this one.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from chainer import training

from smchainer import optimizers
from smchainer.default_plugins.vgg.data import evaluation_converter, rank_data
from smchainer.default_plugins.vgg.distributed import open_communicator
from smchainer.default_plugins.vgg.extensions import (
    Checkpointer,
    LearningRateSchedule,
    RecordingEvaluator,
    report_progress,
)
from smchainer.default_plugins.vgg.hyperparameters import Hyperparameters, resolve_kernels
from smchainer.default_plugins.vgg.model import build_classifier
from smchainer.default_plugins.vgg.modelfile import save_model
from smchainer.default_plugins.vgg.stopping import StopOnNotice
from smchainer.default_plugins.vgg.updater import AugmentingUpdater
from smchainer.device import get_device

if TYPE_CHECKING:
    from smchainer.training.env import TrainingEnv

logger = logging.getLogger(__name__)


def run_training(env: TrainingEnv, hp: Hyperparameters) -> dict[str, Any]:
    """Train VGG as ``env`` describes; return the final metrics."""
    started = time.monotonic()
    device = get_device(env.device)
    on_gpu = device.xp is not np
    kernels = resolve_kernels(hp["kernels"], on_gpu)
    comm = open_communicator(env, hp["communicator"], on_gpu, device)
    master = env.is_rank_zero
    data = rank_data(env, hp, comm)
    if on_gpu:
        device.xp.random.seed(hp["seed"] + env.rank)  # GPU dropout masks
    classifier = build_classifier(hp, data.prepared, kernels)
    if master:
        logger.info(
            "kernels: %s (%s)", kernels,
            f"auto on the {'GPU' if on_gpu else 'CPU'}" if hp["kernels"] == "auto" else "chosen",
        )
    classifier.to_device(device)

    # Weight decay inside the momentum update: one kernel per parameter, not two.
    optimizer = optimizers.MomentumSGD(
        lr=hp["learning-rate"], momentum=hp["momentum"], weight_decay=hp["weight-decay"]
    )
    if comm is not None:
        import chainermn

        comm.bcast_data(classifier)
        optimizer = chainermn.create_multi_node_optimizer(optimizer, comm)
    optimizer.setup(classifier)

    batch_size = hp["batch-size"]
    updater = AugmentingUpdater(
        data.train_iter, optimizer, device=device, seed=hp["seed"], rank=env.rank,
        augment=hp["augment"], images=data.train_images, labels=data.train_labels,
        # the crop kernel goes with the fused kernels on a GPU (the CPU has no kernel)
        gather_on_device=kernels == "fused" or not on_gpu,
    )
    if hp["iterations"]:
        stop = (hp["iterations"], "iteration")
        total_epochs = hp["iterations"] * batch_size / len(data.train_labels)
    else:
        stop = (hp["epochs"], "epoch")
        total_epochs = float(hp["epochs"])
    output_data_dir = Path(env.output_data_dir)
    checkpoints = Path(env.checkpoints)
    trainer = training.Trainer(
        updater, stop, out=str(output_data_dir if master else checkpoints)
    )

    trainer.extend(LearningRateSchedule(hp, total_epochs), trigger=(1, "iteration"))
    evaluator: Any = RecordingEvaluator(
        data.test_iter, classifier, converter=evaluation_converter, device=device
    )
    if comm is not None:
        import chainermn

        # (create_multi_node_evaluator patches and returns the same object.)
        evaluator = chainermn.create_multi_node_evaluator(evaluator, comm)
    trainer.extend(evaluator, trigger=(1, "epoch"), name="validation")
    if master:
        report_progress(trainer, hp["progress-bar"])
    every = (hp["checkpoint-every"], "iteration") if hp["checkpoint-every"] else (1, "epoch")
    sync = env.checkpoint_sync
    checkpointer = Checkpointer(checkpoints, env.rank, env.size, hp["keep-checkpoints"], hp,
                                on_written=sync.notify if sync is not None else None)
    trainer.extend(checkpointer, trigger=every)

    checkpointer.resume(trainer, comm)
    if env.preemption is not None:  # it keeps no state: nothing of it in a snapshot
        trainer.extend(StopOnNotice(env.preemption, checkpointer, comm))
    first_iteration = updater.iteration
    trainer.run()

    result = evaluator.result_at(updater.iteration)
    prepared = data.prepared
    metrics = {
        "test_accuracy": float(result["validation/main/accuracy"]),
        "test_loss": float(result["validation/main/loss"]),
        "test_source": prepared.test_source,
        "epoch": updater.epoch_detail,
        "iteration": updater.iteration,
        "resumed_from_iteration": first_iteration or None,
        "train_images": prepared.train_size,
        "test_images": prepared.test_size,
        "ranks": env.size,
        "kernels": kernels,
        "elapsed_seconds": round(time.monotonic() - started, 3),
    }
    if master:
        save_model(classifier.predictor, Path(env.model_dir), prepared.class_names, hp)
        output_data_dir.mkdir(parents=True, exist_ok=True)
        (output_data_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info(
            "test accuracy %.4f, loss %.4f; model saved in %s",
            metrics["test_accuracy"], metrics["test_loss"], env.model_dir,
        )
    return metrics
