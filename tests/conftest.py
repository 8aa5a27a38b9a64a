"""What the suite shares beyond the fixtures of :mod:`smchainer.testing` and ``../conftest.py``."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import smchainer  # noqa: F401  (puts the Chainer compat layer in place first)
from smchainer.testing import registered  # noqa: F401  (re-exported for the tests)

# A suite started in the background by a shell without job control inherits
# SIGINT ignored, and so would every command it starts: the tests that press
# Ctrl-C on a job would then see it ignored, as such a shell asks. They test
# what a terminal gives, so the suite gives its commands SIGINT's default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def command(name: str) -> str:
    """The path of one of the project's console commands in this environment."""
    path = VENV_BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run make install")
    return str(path)
