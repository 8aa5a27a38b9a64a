"""How a training job ends: interrupts, a script's own exit, one exit-code policy.

Real processes and real signals: a job is started as a user starts it
(``smchainer-train``, with ``--num-processes 2`` too) and signalled the way a
terminal's Ctrl-C or a scheduler's preemption does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap

import pytest

from tests.conftest import command
from tests.training.helpers import start_until, tiny_dataset, train

SLEEPER = textwrap.dedent("""
    import os, time
    open(os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], "started-" + os.environ.get(
        "OMPI_COMM_WORLD_RANK", "0")), "w").close()
    time.sleep(60)
""")


def start(tmp_path, *extra: str) -> tuple[subprocess.Popen, object]:
    script = tmp_path / "sleep.py"
    script.write_text(SLEEPER)
    tiny_dataset(tmp_path / "data")
    job = tmp_path / "job"
    process = start_until(
        [command("smchainer-train"), "--entry-point", str(script), "--channel",
         f"train={tmp_path / 'data'}", "--job-dir", str(job), *extra],
        lambda: bool(list((job / "output" / "data").glob("started-*"))), "the script's start",
        new_session=True)
    return process, job


@pytest.mark.parametrize("processes", [[], ["--num-processes", "2"]], ids=["one", "two-ranks"])
@pytest.mark.parametrize("name, number, code", [("SIGINT", signal.SIGINT, 130),
                                                ("SIGTERM", signal.SIGTERM, 143)])
def test_an_interrupted_job_names_the_signal_and_exits_128_plus_it(tmp_path, processes, name,
                                                                   number, code) -> None:
    process, job = start(tmp_path, *processes)
    if processes and number == signal.SIGINT:
        os.killpg(process.pid, number)  # Ctrl-C reaches the whole foreground group
    else:
        process.send_signal(number)  # a scheduler signals the command it started
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    failure = (job / "output" / "failure").read_text()
    assert failure.startswith(f"Interrupted: {name}"), failure
    assert not (job / "output" / "success").exists()
    assert stderr.strip().splitlines()[-1].startswith("Error: "), stderr


ARGPARSE_SCRIPT = textwrap.dedent("""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.parse_args()
""")


def test_a_script_that_exits_through_argparse_says_why(tmp_path) -> None:
    script = tmp_path / "train.py"
    script.write_text(ARGPARSE_SCRIPT)
    tiny_dataset(tmp_path / "data")
    result = train("--entry-point", str(script), "--channel", f"train={tmp_path / 'data'}",
                   "--job-dir", str(tmp_path / "job"), "--hp", "epochs=1.5")
    assert result.returncode == 1, result.stderr
    first = (tmp_path / "job" / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("SystemExit: the script exited with status 2: ")
    assert "argument --epochs: invalid int value: '1.5'" in first, first
    assert "invalid int value: '1.5'" in result.stderr.strip().splitlines()[-1]


def test_a_failure_exits_1_never_an_errno(tmp_path) -> None:
    """A checkpoint folder under a file fails with ENOTDIR (20) inside: the exit is 1."""
    (tmp_path / "a-file").write_text("not a folder\\n")
    tiny_dataset(tmp_path / "data")
    result = train("--channel", f"train={tmp_path / 'data'}", "--job-dir", str(tmp_path / "job"),
                   "--checkpoint-dir", str(tmp_path / "a-file" / "checkpoints"),
                   "--hp", "epochs=1")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")
