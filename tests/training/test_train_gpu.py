"""smchainer-train on a GPU host: SM_NUM_GPUS, each rank's device (skipped without a GPU)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from smchainer.device import gpu_count
from smchainer.training.launch import mpirun_path
from tests.test_plugins import fake_distribution
from tests.training.helpers import environment

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.usefixtures("gpus"),  # smchainer.testing.require_gpu: skip, or fail if required
]

TRAIN = [sys.executable, "-m", "smchainer.training.cli"]


def test_script_sees_the_gpus_and_trains_on_gpu_zero(tmp_path) -> None:
    script = tmp_path / "gpu_train.py"
    script.write_text(textwrap.dedent("""
        import json, os
        import chainer, chainer.links as L, numpy as np

        if __name__ == "__main__":
            device = chainer.get_device("@cupy:0")
            device.use()
            model = L.Classifier(L.Linear(4, 3))
            model.to_device(device)
            opt = chainer.optimizers.SGD(lr=0.5)
            opt.setup(model)
            x = device.send(np.random.RandomState(0).randn(64, 4).astype(np.float32))
            t = device.send((np.arange(64) % 3).astype(np.int32))
            first = None
            for _ in range(20):
                opt.update(model, x, t)
                first = first if first is not None else float(model.loss.array)
            seen = {"num_gpus": os.environ["SM_NUM_GPUS"], "first": first,
                    "last": float(model.loss.array),
                    "array": type(model.predictor.W.array).__module__}
            with open(os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], "gpu.json"), "w") as f:
                json.dump(seen, f)
    """))
    job = tmp_path / "job"
    result = subprocess.run([*TRAIN, "--entry-point", str(script), "--job-dir", str(job)],
                            capture_output=True, text=True, env=environment(), timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads((job / "output" / "data" / "gpu.json").read_text())
    assert seen["num_gpus"] == str(gpu_count())
    assert seen["array"].startswith("cupy")
    assert seen["last"] < seen["first"]


def test_each_rank_gets_the_gpu_of_its_local_rank_in_hook_mode(tmp_path) -> None:
    fake_distribution(tmp_path / "site", "smchainer-gputrain", "0.1", "gputrain", """
        import json
        from smchainer import hookimpl
        from smchainer.device import get_device

        @hookimpl
        def train(env):
            device = get_device(env.device)
            (env.output_data_dir / f"rank-{env.rank}.json").write_text(json.dumps(
                {"device": env.device, "chainer": str(device), "num_gpus": env.num_gpus,
                 "local_rank": env.local_rank}))
            return True
    """)
    ranks = min(gpu_count(), 2)
    job = tmp_path / "job"
    env = environment(PYTHONPATH=f"{tmp_path / 'site'}:{environment().get('PYTHONPATH', '')}",
                      SMCHAINER_LOAD_PLUGINS="gputrain")
    result = subprocess.run([str(mpirun_path()), "-n", str(ranks), *TRAIN,
                             "--job-dir", str(job)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(ranks):
        seen = json.loads((job / "output" / "data" / f"rank-{rank}.json").read_text())
        assert seen == {"device": f"gpu:{rank}", "chainer": f"@cupy:{rank}",
                        "num_gpus": gpu_count(), "local_rank": rank}
    assert (job / "output" / "success").exists()

    on_cpu = subprocess.run([*TRAIN, "--job-dir", str(job)], capture_output=True, text=True,
                            env={**env, "SMCHAINER_DEVICE": "cpu"}, timeout=300)
    assert on_cpu.returncode == 0, on_cpu.stderr
    seen = json.loads((job / "output" / "data" / "rank-0.json").read_text())
    assert seen["device"] == "cpu" and seen["chainer"] == "@numpy"
