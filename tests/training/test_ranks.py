"""Every rank its own folders; --env reaches every rank (real mpirun, two ranks)."""
from __future__ import annotations

import textwrap

from tests.training.helpers import tar_names, tiny_dataset, train

SCRIPT = textwrap.dedent("""
    import os
    rank = os.environ["SMCHAINER_RANK"]
    for folder in ("SM_OUTPUT_DATA_DIR", "SM_MODEL_DIR"):
        with open(os.path.join(os.environ[folder], "who.txt"), "w") as file:
            file.write(rank)
    with open(os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], "env.txt"), "w") as file:
        file.write(os.environ.get("MY_SETTING", "-") + "|" + os.environ.get("FROM_PARENT", "-"))
""")


def run(tmp_path, *extra: str, **env: str):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    tiny_dataset(tmp_path / "data")
    return train("--entry-point", str(script), "--channel", f"train={tmp_path / 'data'}",
                 "--job-dir", str(tmp_path / "job"), *extra, **env)


def test_two_ranks_on_one_host_keep_their_own_output_and_see_env(tmp_path) -> None:
    import tarfile

    result = run(tmp_path, "--num-processes", "2", "--env", "MY_SETTING=hello world",
                 "--env", "FROM_PARENT", FROM_PARENT="parent")
    assert result.returncode == 0, result.stderr[-3000:]
    job = tmp_path / "job"
    assert (job / "output" / "data" / "who.txt").read_text() == "0"
    assert (job / "model" / "who.txt").read_text() == "0"
    assert (job / "ranks" / "1" / "output" / "data" / "who.txt").read_text() == "1"
    assert (job / "ranks" / "1" / "model" / "who.txt").read_text() == "1"
    for data in (job / "output" / "data", job / "ranks" / "1" / "output" / "data"):
        assert (data / "env.txt").read_text() == "hello world|parent"
    assert tar_names(job / "output.tar.gz") == ["env.txt", "who.txt"]
    with tarfile.open(job / "output.tar.gz") as archive:
        assert archive.extractfile("who.txt").read() == b"0"  # rank 0's, as packed
    assert "hello world" not in result.stderr  # values go by name (-x), not on a command line


def test_env_alone_sets_the_variable_for_one_process(tmp_path) -> None:
    result = run(tmp_path, "--env", "MY_SETTING=one")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "job" / "output" / "data" / "env.txt").read_text() == "one|-"


def test_bad_env_options_are_usage_errors(tmp_path) -> None:
    bad_name = run(tmp_path, "--env", "BAD-NAME=1")
    assert bad_name.returncode == 2 and "--env 'BAD-NAME=1'" in bad_name.stderr
    unset = run(tmp_path, "--env", "SURELY_NOT_SET_HERE")
    assert unset.returncode == 2
    assert "SURELY_NOT_SET_HERE is not set in this environment" in unset.stderr
