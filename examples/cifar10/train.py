"""CIFAR-10 VGG training, as the SageMaker Chainer example's script writes it.

It runs unchanged under SageMaker and under smchainer: channels and folders
come from SM_* variables, hyperparameters are arguments. Under MPI (more than
one host, ``sagemaker_use_mpi``, or ``--communicator``) it trains data-parallel
with ChainerMN and only rank 0 reports and saves. It writes ``loss.png`` and
``accuracy.png`` (PlotReport) to SM_OUTPUT_DATA_DIR and ``model.npz`` (with
``net.json``, the network's shape) to SM_MODEL_DIR. ``model_fn`` serves it.
"""
import argparse
import json
import os

import chainer
import chainer.links as L
import net
import numpy as np
from chainer import serializers, training
from chainer.training import extensions

try:  # with smchainer, model files are loaded without running pickles hidden in them
    from smchainer.serializers import load_npz
except ImportError:  # elsewhere (under SageMaker itself), Chainer's own loader
    load_npz = serializers.load_npz


def model_fn(model_dir):
    """The trained network, for the model server."""
    with open(os.path.join(model_dir, "net.json")) as f:
        shape = json.load(f)
    model = L.Classifier(net.VGG(**shape))
    load_npz(os.path.join(model_dir, "model.npz"), model)
    return model.predictor


def load(channel, name):
    data = np.load(os.path.join(channel, name))
    return chainer.datasets.TupleDataset(data["data"].astype(np.float32),
                                         data["labels"].astype(np.int32))


def uses_mpi(communicator):
    framework = json.loads(os.environ.get("SM_FRAMEWORK_PARAMS") or "{}")
    hosts = json.loads(os.environ.get("SM_HOSTS") or "[]")
    return bool(communicator or framework.get("sagemaker_use_mpi") or len(hosts) > 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--communicator", type=str, default="")
    parser.add_argument("--output-data-dir", type=str, default=os.environ["SM_OUTPUT_DATA_DIR"])
    parser.add_argument("--model-dir", type=str, default=os.environ["SM_MODEL_DIR"])
    parser.add_argument("--train", type=str, default=os.environ["SM_CHANNEL_TRAIN"])
    parser.add_argument("--test", type=str, default=os.environ["SM_CHANNEL_TEST"])
    parser.add_argument("--num-gpus", type=int, default=int(os.environ.get("SM_NUM_GPUS", 0)))
    args = parser.parse_args()

    comm = None
    if uses_mpi(args.communicator):
        import chainermn

        comm = chainermn.create_communicator(
            args.communicator or ("pure_nccl" if args.num_gpus > 0 else "naive"))
        gpu = comm.intra_rank
        if comm.rank == 0:
            print(f"ChainerMN: {comm.size} processes, {type(comm).__name__}", flush=True)
    else:
        gpu = 0
    rank = comm.rank if comm is not None else 0
    device = chainer.get_device(f"@cupy:{gpu}" if args.num_gpus > 0 else "@numpy")
    device.use()
    if rank == 0:
        print(f"training on {device}", flush=True)
    np.random.seed(args.seed)

    train = load(args.train, "train.npz")
    test = load(args.test, "test.npz")
    if comm is not None:
        train = chainermn.scatter_dataset(train, comm, shuffle=True, seed=args.seed)
        test = chainermn.scatter_dataset(test, comm)

    shape = {"class_labels": 10, "width": args.width, "depth": args.depth}
    model = L.Classifier(net.VGG(**shape))
    model.to_device(device)
    optimizer = chainer.optimizers.MomentumSGD(args.learning_rate)
    if comm is not None:
        optimizer = chainermn.create_multi_node_optimizer(optimizer, comm)
    optimizer.setup(model)
    optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(5e-4))

    train_iter = chainer.iterators.SerialIterator(train, args.batch_size)
    test_iter = chainer.iterators.SerialIterator(test, args.batch_size, repeat=False,
                                                 shuffle=False)
    updater = training.updaters.StandardUpdater(train_iter, optimizer, device=device)
    trainer = training.Trainer(updater, (args.epochs, "epoch"), out=args.output_data_dir)
    evaluator = extensions.Evaluator(test_iter, model, device=device)
    if comm is not None:
        evaluator = chainermn.create_multi_node_evaluator(evaluator, comm)
    trainer.extend(evaluator)
    trainer.extend(extensions.ExponentialShift("lr", 0.5), trigger=(25, "epoch"))
    if rank == 0:
        trainer.extend(extensions.LogReport())
        trainer.extend(extensions.PlotReport(["main/loss", "validation/main/loss"],
                                             "epoch", file_name="loss.png"))
        trainer.extend(extensions.PlotReport(["main/accuracy", "validation/main/accuracy"],
                                             "epoch", file_name="accuracy.png"))
        trainer.extend(extensions.PrintReport(
            ["epoch", "main/loss", "validation/main/loss", "main/accuracy",
             "validation/main/accuracy", "elapsed_time"]))
    trainer.run()

    if rank == 0:
        model.to_device("@numpy")
        serializers.save_npz(os.path.join(args.model_dir, "model.npz"), model)
        with open(os.path.join(args.model_dir, "net.json"), "w") as f:
            json.dump(shape, f)
