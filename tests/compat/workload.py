"""The Chainer computations VGG training and serving rely on, as one workload.

Run under NumPy 1.26 (where Chainer imports by itself) by
``make_reference.py`` to record ``numpy1_reference.npz``, and under the
current NumPy (with smchainer's compat layer) by the tests, which compare the
two. Everything is seeded through NumPy's legacy global generator, whose
stream is the same on every NumPy version.
"""
from __future__ import annotations

import io
import json
import tempfile

import numpy as np


def run_workload() -> dict[str, np.ndarray]:
    import chainer
    import chainer.functions as F
    import chainer.links as L
    from chainer import training
    from chainer.training import extensions

    np.random.seed(0)
    out: dict[str, np.ndarray] = {}

    class SmallVGG(chainer.Chain):
        def __init__(self) -> None:
            super().__init__()
            with self.init_scope():
                self.conv1 = L.Convolution2D(3, 8, 3, pad=1, nobias=True)
                self.bn1 = L.BatchNormalization(8)
                self.conv2 = L.Convolution2D(8, 8, 3, pad=1, nobias=True)
                self.bn2 = L.BatchNormalization(8)
                self.fc1 = L.Linear(8 * 4 * 4, 16, nobias=True)
                self.bn3 = L.BatchNormalization(16)
                self.fc2 = L.Linear(16, 10)

        def forward(self, x):
            h = F.relu(self.bn1(self.conv1(x)))
            h = F.dropout(h, 0.3)
            h = F.relu(self.bn2(self.conv2(h)))
            h = F.max_pooling_2d(h, 2, 2)
            h = F.dropout(h, 0.5)
            h = F.relu(self.bn3(self.fc1(h)))
            return self.fc2(F.dropout(h, 0.5))

    x = np.random.rand(16, 3, 8, 8).astype(np.float32)
    t = np.random.randint(0, 10, 16).astype(np.int32)
    model = L.Classifier(SmallVGG())
    optimizer = chainer.optimizers.MomentumSGD(lr=0.05)
    optimizer.setup(model)
    optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(5e-4))

    initial_w = model.predictor.conv1.W.array.copy()
    for step in range(3):
        model.cleargrads()
        loss = model(x, t)
        loss.backward()
        out[f"loss_{step}"] = np.asarray(loss.array)
        out[f"accuracy_{step}"] = np.asarray(model.accuracy.array)
        if step == 0:
            for name, param in sorted(model.namedparams()):
                out["grad" + name.replace("/", "_")] = param.grad.copy()
        optimizer.update()
    for name, param in sorted(model.namedparams()):
        out["param" + name.replace("/", "_")] = param.array.copy()
    out["conv1_W_change"] = np.asarray(
        np.linalg.norm(model.predictor.conv1.W.array - initial_w), dtype=np.float32
    )
    out["bn1_avg_mean"] = model.predictor.bn1.avg_mean.copy()
    out["bn1_avg_var"] = model.predictor.bn1.avg_var.copy()

    with chainer.using_config("train", False), chainer.no_backprop_mode():
        out["eval_logits"] = model.predictor(x).array.copy()
        out["eval_softmax"] = F.softmax(model.predictor(x)).array.copy()

    buffer = io.BytesIO()
    chainer.serializers.save_npz(buffer, model)
    buffer.seek(0)
    restored = L.Classifier(SmallVGG())
    chainer.serializers.load_npz(buffer, restored)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        out["restored_logits"] = restored.predictor(x).array.copy()

    # The two functions the compat layer touches.
    out["resize_bilinear"] = F.resize_images(x[:2], (5, 7)).array
    out["resize_nearest"] = F.resize_images(x[:2], (5, 7), mode="nearest").array
    strided = chainer.Variable(x[0, 0].copy())
    y = F.as_strided(strided, (3, 3), (8, 1))
    F.sum(y * y).backward()
    out["as_strided_grad"] = strided.grad.copy()

    # A short trainer run with the extensions the VGG trainer uses.
    dataset = chainer.datasets.TupleDataset(x, t)
    model = L.Classifier(SmallVGG())
    optimizer = chainer.optimizers.MomentumSGD(lr=0.05)
    optimizer.setup(model)
    optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(5e-4))
    train_iter = chainer.iterators.SerialIterator(dataset, 8, shuffle=True)
    test_iter = chainer.iterators.SerialIterator(dataset, 8, repeat=False, shuffle=False)
    with tempfile.TemporaryDirectory() as folder:
        updater = training.updaters.StandardUpdater(train_iter, optimizer)
        trainer = training.Trainer(updater, (3, "epoch"), out=folder)
        trainer.extend(extensions.Evaluator(test_iter, model))
        trainer.extend(extensions.ExponentialShift("lr", 0.5), trigger=(1, "epoch"))
        trainer.extend(extensions.observe_lr())
        trainer.extend(extensions.LogReport())
        trainer.run()
        with open(f"{folder}/log") as log_file:
            log = json.load(log_file)
    for key in ("main/loss", "validation/main/loss", "validation/main/accuracy", "lr"):
        out["trainer_" + key.replace("/", "_")] = np.array([entry[key] for entry in log])
    out["trainer_final_lr"] = np.asarray(optimizer.lr)
    return out
