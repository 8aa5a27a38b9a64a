"""``import chainer`` in any interpreter of the environment, and plain text in files.

Real interpreters of this environment: ``smchainer-compat.pth`` (installed
with the project) must make ``import chainer`` work with no smchainer import
first, cost nothing to an interpreter that never imports Chainer, and be
switched off by ``SMCHAINER_NO_COMPAT_HOOK=1``.
"""
from __future__ import annotations

import os
import pty
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from smchainer.compat import NUMPY_2


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SMCHAINER_NO_COMPAT_HOOK"}
    environ.update(env)
    return subprocess.run([sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120, env=environ)


def test_the_pth_file_is_installed_beside_the_packages() -> None:
    pth = Path(sysconfig.get_paths()["purelib"]) / "smchainer-compat.pth"
    assert pth.read_text().startswith("import _smchainer_startup")


def test_import_chainer_works_first_thing() -> None:
    result = python("""
        import chainer
        from chainer.datasets import get_cifar10, TupleDataset
        import chainer.functions as F
        import numpy as np
        import sys
        y = F.relu(np.array([-1.0, 2.0], dtype=np.float32))
        print(chainer.__version__, y.array.tolist(), "smchainer.compat" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7.8.1", "[0.0,", "2.0]", "True"]


def test_an_interpreter_without_chainer_loads_nothing_of_smchainer() -> None:
    result = python("""
        import sys
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("smchainer", "numpy")))
        print(any(type(f).__name__ == "type" and f.__name__ == "ChainerImportWatcher"
                  for f in sys.meta_path))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


@pytest.mark.skipif(not NUMPY_2, reason="Chainer imports without help on NumPy 1.x")
def test_the_hook_can_be_switched_off() -> None:
    off = python("import chainer", SMCHAINER_NO_COMPAT_HOOK="1")
    assert off.returncode != 0
    assert "np.sctypes` was removed" in off.stderr
    # import smchainer still installs it.
    assert python("import smchainer, chainer", SMCHAINER_NO_COMPAT_HOOK="1").returncode == 0


REPORTING = """
    import chainer, numpy as np
    import chainer.links as L
    from chainer import training
    from chainer.training import extensions
    model = L.Classifier(L.Linear(4, 3))
    optimizer = chainer.optimizers.SGD()
    optimizer.setup(model)
    data = chainer.datasets.TupleDataset(np.ones((16, 4), np.float32),
                                         np.arange(16, dtype=np.int32) % 3)
    iterator = chainer.iterators.SerialIterator(data, 4)
    trainer = training.Trainer(training.updaters.StandardUpdater(iterator, optimizer),
                               (2, "epoch"), out={out!r})
    trainer.extend(extensions.LogReport())
    trainer.extend(extensions.PrintReport(["epoch", "main/loss"]))
    trainer.extend(extensions.ProgressBar(update_interval=1))
    trainer.run()
"""


def test_print_report_and_the_progress_bar_write_plain_text_to_a_file(tmp_path) -> None:
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(
            REPORTING.format(out=str(tmp_path / "result")))], stdout=out,
            stderr=subprocess.STDOUT, timeout=120)
    text = log.read_text()
    assert result.returncode == 0, text
    assert "\x1b" not in text
    assert text.splitlines()[0].split() == ["epoch", "main/loss"]
    assert [line.split()[0] for line in text.splitlines()[1:3]] == ["1", "2"]
    assert "this epoch" not in text  # no progress bar outside a terminal


def test_on_a_terminal_they_still_draw(tmp_path) -> None:
    code = textwrap.dedent(REPORTING.format(out=str(tmp_path / "result")))
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=follower,
                               stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the child is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=120) == 0, b"".join(chunks)[-2000:]
    drawn = b"".join(chunks)
    assert b"\x1b[J" in drawn and b"this epoch" in drawn
