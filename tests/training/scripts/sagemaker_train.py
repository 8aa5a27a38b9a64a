"""A SageMaker-style Chainer training script, unchanged from what SageMaker runs.

It reads its channels and directories from SM_* variables, parses its
hyperparameters with argparse, trains a tiny classifier (with ChainerMN when
--communicator is given) and saves model.npz into SM_MODEL_DIR. For the
tests it also dumps what it received to SM_OUTPUT_DATA_DIR/received-<rank>.json.
"""
import argparse
import json
import os
import sys

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np


class Net(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(4, 8)
            self.l2 = L.Linear(8, 3)

    def forward(self, x):
        return self.l2(F.relu(self.l1(x)))


def model_fn(model_dir):
    model = L.Classifier(Net())
    chainer.serializers.load_npz(os.path.join(model_dir, "model.npz"), model)
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--communicator", default="")
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("-s", "--seed", type=int, default=0)
    parser.add_argument("--options", default="")
    parser.add_argument("--model-dir", default=os.environ["SM_MODEL_DIR"])
    parser.add_argument("--train", default=os.environ["SM_CHANNEL_TRAIN"])
    parser.add_argument("--output-data-dir", default=os.environ["SM_OUTPUT_DATA_DIR"])
    args = parser.parse_args()

    comm = None
    rank = 0
    if args.communicator:
        import chainermn

        comm = chainermn.create_communicator(args.communicator)
        rank = comm.rank

    received = {
        "argv": sys.argv[1:],
        "file": os.path.abspath(__file__),
        "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("SM_", "CHAINERMN_", "SMCHAINER_")) or k == "CURRENT_HOST"},
    }
    with open(os.path.join(args.output_data_dir, f"received-{rank}.json"), "w") as f:
        json.dump(received, f)

    data = np.load(os.path.join(args.train, "train.npz"))
    dataset = chainer.datasets.TupleDataset(data["x"], data["y"])
    if comm is not None:
        dataset = chainermn.scatter_dataset(dataset if rank == 0 else None, comm, shuffle=True)

    np.random.seed(args.seed + rank)  # different starts: ChainerMN must make them equal
    model = L.Classifier(Net())
    optimizer = chainer.optimizers.SGD(lr=args.learning_rate)
    if comm is not None:
        optimizer = chainermn.create_multi_node_optimizer(optimizer, comm)
    optimizer.setup(model)

    iterator = chainer.iterators.SerialIterator(dataset, args.batch_size, shuffle=False)
    step = 0
    while iterator.epoch < args.epochs:
        batch = iterator.next()
        x, t = chainer.dataset.concat_examples(batch)
        optimizer.update(model, x, t)
        step += 1
        if step == 2 and rank == args.fail_rank:
            raise RuntimeError(f"rank {rank} failed on purpose at step {step}")
        if rank == 0:
            print(f"step {step} loss {float(model.loss.array):.4f}", flush=True)

    weights = {name: param.array for name, param in model.namedparams()}
    np.savez(os.path.join(args.output_data_dir, f"weights-{rank}.npz"), **weights)
    if rank == 0:
        chainer.serializers.save_npz(os.path.join(args.model_dir, "model.npz"), model)
