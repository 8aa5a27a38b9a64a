"""Nothing outlives the notebook: stopped jobs, and endpoints left running at exit."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from smchainer.api import Chainer
from tests.api.conftest import alive

INFERENCE = """\
def model_fn(model_dir):
    return lambda x: x + 1
"""


def test_stop_interrupts_a_running_job(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    estimator = Chainer(entry_point=str(script), jobs_dir=tmp_path / "jobs")
    estimator.fit(wait=False)
    job = estimator.latest_training_job
    deadline = time.monotonic() + 60
    while "started" not in "\n".join(job.log_tail()) and time.monotonic() < deadline:
        time.sleep(0.1)
    began = time.monotonic()
    job.stop()
    assert time.monotonic() - began < 10
    assert job.status == "Stopped" and not alive(job.process.pid)
    assert job.failure_reason.startswith("Interrupted: SIGINT")  # the signal, named
    assert job.describe()["TrainingJobStatus"] == "Stopped"


def test_endpoints_left_running_are_stopped_when_python_exits(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "inference.py").write_text(textwrap.dedent(INFERENCE))
    program = textwrap.dedent(f"""\
        import json
        import numpy as np
        from smchainer.api import Model

        model = Model({str(tmp_path / "model")!r}, entry_point={str(tmp_path / "inference.py")!r})
        predictor = model.deploy()
        answer = predictor.predict(np.zeros((1, 2), dtype=np.float32))
        print(json.dumps({{"pids": predictor.endpoint.process_ids(),
                           "answer": answer.tolist()}}))
        # no delete_endpoint(): the interpreter's exit must stop the server
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["answer"] == [[1.0, 1.0]]
    assert len(report["pids"]) == 2
    assert not any(alive(pid) for pid in report["pids"])
