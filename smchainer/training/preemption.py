"""How a training process is asked to stop: SIGTERM, a grace period, a safe point.

Schedulers stop jobs with SIGTERM and kill them a while later: Kubernetes
after 30 s (``terminationGracePeriodSeconds``), a spot instance after two
minutes, Slurm after its ``GraceTime``, SageMaker after 120 s. A rank gets
the notice as SIGTERM, or as SIGUSR1, which is what ``smchainer-train
--num-processes`` sends through mpirun, because Open MPI's mpirun kills its
ranks within a second of passing SIGTERM on but passes SIGUSR1 on and waits.
SIGUSR1 is turned into SIGTERM in the rank, so a script sees SIGTERM either way.

What SIGTERM does in a rank depends on who runs there:

- the built-in trainer :meth:`~Preemption.accept` s the notice: the
  handler only records it, and the trainer stops at the end of the iteration
  that is running, after every rank has written a snapshot of it
  (:attr:`Preemption.requested`);
- a script that set its own SIGTERM handler gets the signal itself, as in a
  SageMaker container;
- anything else stops at once with :class:`Terminated`, which the runner turns
  into ``output/failure`` and exit 143.

A rank that has accepted the notice and is not done within the grace period
writes its failure file and exits 143 (a second SIGTERM stops it at once);
the hard stop must not wait for a rank that hangs.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: Exit codes of interrupted jobs, as a shell reports them (128 + the signal).
SIGINT_EXIT = 130
SIGTERM_EXIT = 143
#: The notice the launcher sends its ranks through mpirun (see the module docstring).
NOTICE_SIGNAL = signal.SIGUSR1


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's preemption, ``kill``): the job stops where it is.

    :param detail: what was done on the way out (``a snapshot of iteration 120
        was written``), for the failure file.
    :param coordinated: every rank stopped at the same point of its own accord,
        so no rank has to be aborted.
    """

    def __init__(self, detail: str = "", coordinated: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.coordinated = coordinated


class Preemption:
    """This process's stop notice: the SIGTERM and SIGUSR1 handlers, and the grace timer.

    :param grace_period: seconds from the notice to the hard stop.
    :param on_expiry: called with the grace period when it runs out, before
        the process exits 143 (the runner writes the failure file there).
    """

    def __init__(self, grace_period: float,
                 on_expiry: Callable[[float], None] | None = None) -> None:
        self.grace_period = grace_period
        self.on_expiry = on_expiry
        self._accepted = False
        self._requested = threading.Event()
        self._timer: threading.Timer | None = None
        self._previous: dict[int, Any] = {}

    # -- for the runner ------------------------------------------------------
    def install(self) -> None:
        """Take over SIGTERM and SIGUSR1 (main thread only; elsewhere nothing happens)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._previous[NOTICE_SIGNAL] = signal.signal(NOTICE_SIGNAL, self._on_notice)

    def uninstall(self) -> None:
        """Give the signals back to their previous handlers and stop the timer."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    # -- for a trainer that stops at safe points -----------------------------
    def accept(self) -> None:
        """From now on SIGTERM is recorded, not raised: the caller checks :attr:`requested`."""
        self._accepted = True

    @property
    def requested(self) -> bool:
        """Whether a stop notice arrived (after :meth:`accept`)."""
        return self._requested.is_set()

    # -- the handlers --------------------------------------------------------
    def _on_notice(self, signum: int, frame: Any) -> None:
        # SIGTERM as the process has it handled now: a script's own handler, or ours.
        signal.raise_signal(signal.SIGTERM)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._accepted or self._requested.is_set():
            raise Terminated()
        self._requested.set()
        logger.warning("SIGTERM: stopping after this iteration's snapshot (grace period %g s)",
                       self.grace_period)
        self._timer = threading.Timer(self.grace_period, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        try:
            if self.on_expiry is not None:
                self.on_expiry(self.grace_period)
        finally:
            logging.shutdown()
            os._exit(SIGTERM_EXIT)
