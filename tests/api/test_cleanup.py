"""Nothing outlives the notebook: stopped jobs, and endpoints left running at exit."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
    # SIGTERM, as SageMaker's StopTrainingJob sends it; the signal is named
    assert job.failure_reason.startswith("Interrupted: SIGTERM")
    assert job.process.returncode == 143
    assert job.describe()["TrainingJobStatus"] == "Stopped"


def test_stop_ends_every_rank_of_a_two_process_job(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import os, time\n"
                      "open(os.path.join(os.environ['SM_OUTPUT_DATA_DIR'], 'started-'\n"
                      "     + os.environ['SMCHAINER_RANK']), 'w').close()\n"
                      "time.sleep(120)\n")
    estimator = Chainer(entry_point=str(script), jobs_dir=tmp_path / "jobs", instance_count=2)
    estimator.fit(wait=False)
    job = estimator.latest_training_job
    started = [job.job_dir / "output" / "data" / "started-0",
               job.job_dir / "ranks" / "1" / "output" / "data" / "started-1"]
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in started):
        assert job.process.poll() is None, job.log_tail()
        assert time.monotonic() < deadline, job.log_tail()
        time.sleep(0.1)
    ranks = rank_pids(job.job_dir)
    assert len(ranks) == 2
    job.stop()
    assert job.status == "Stopped" and job.process.returncode == 143
    assert job.failure_reason.startswith("Interrupted: SIGTERM")
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in ranks)


def rank_pids(job_dir) -> list[int]:
    """The rank processes of the job in ``job_dir`` (found by their command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes() if proc.name.isdigit() else b""
            cmdline = (proc / "cmdline").read_bytes() if environ else b""
        except OSError:
            continue
        if b"OMPI_COMM_WORLD_RANK=" in environ and str(job_dir).encode() in cmdline:
            found.append(int(proc.name))
    return found


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
