"""Connections spread over the workers: who accepts the next one.

All workers listen on the same socket and the kernel hands a new
connection to whichever is first to ``accept`` it. Under a burst of
connections (a load balancer's pool, 16 clients starting at once) the
worker whose loop happens to be awake takes most of them: 15 of 16 were
seen on one of two workers here, which then queues 15 clients behind one
model while the other idles, for as long as the connections are kept
alive. Work is not moved between workers afterwards (a connection's
requests stay with its worker), so the spread has to be right at accept.

Each worker publishes its open connections on a :class:`ConnectionBoard`,
memory the master maps before it forks the workers. A worker about to
accept while a sibling has fewer connections lets it go first
(:data:`ACCEPT_RECHECK_SECONDS`), and takes the connection anyway once it
has waited :data:`MAX_ACCEPT_DEFER_SECONDS` for it: a sibling that cannot
accept (its loop blocked, a stale slot) delays a client by that much at
most, and loses none. A worker publishes :data:`NOT_TAKING` while it loads
its model, drains or is full, so nobody waits for it; the master clears a
worker's slot when it exits.

``SO_REUSEPORT`` (a socket per worker, the kernel spreading connections by
a hash of their addresses) was the alternative: it spreads at random, not
evenly, and a worker that dies takes the connections queued on its own
socket with it.
"""
from __future__ import annotations

import mmap
import struct

#: A slot: the worker's open connections (or :data:`NOT_TAKING`) and its process id.
SLOT = struct.Struct("=qq")
#: Published by a worker that takes no connections now (loading, draining, full).
NOT_TAKING = -1
#: How long a worker that let a connection go looks again.
ACCEPT_RECHECK_SECONDS = 0.001
#: The longest a worker leaves a waiting connection to its siblings.
MAX_ACCEPT_DEFER_SECONDS = 0.02


class ConnectionBoard:
    """Each worker's open connections, by worker index, in memory shared across a fork.

    Made in the master before the workers fork (an anonymous shared
    mapping, so every worker sees the others' writes); each worker writes
    its own slot only. A slot is two aligned 8-byte words, written and read
    whole; a reader may see a count a moment old, which only makes one
    accept a little less even.
    """

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self._memory = mmap.mmap(-1, SLOT.size * self.slots)  # MAP_SHARED | MAP_ANONYMOUS
        for index in range(self.slots):
            self.clear(index)

    def publish(self, index: int, connections: int, pid: int) -> None:
        """Worker ``index`` (process ``pid``) has ``connections`` open (or :data:`NOT_TAKING`)."""
        if 0 <= index < self.slots:
            SLOT.pack_into(self._memory, index * SLOT.size, connections, pid)

    def clear(self, index: int) -> None:
        """Worker ``index`` is gone: nobody waits for it."""
        self.publish(index, NOT_TAKING, 0)

    def read(self, index: int) -> tuple[int, int]:
        """Worker ``index``'s slot: (connections or :data:`NOT_TAKING`, pid)."""
        connections, pid = SLOT.unpack_from(self._memory, index * SLOT.size)
        return connections, pid

    def fewest_elsewhere(self, index: int) -> int | None:
        """The fewest connections of a worker other than ``index`` taking them; None: none is."""
        fewest = None
        for other in range(self.slots):
            if other == index:
                continue
            connections, _ = SLOT.unpack_from(self._memory, other * SLOT.size)
            if connections != NOT_TAKING and (fewest is None or connections < fewest):
                fewest = connections
        return fewest


class AcceptPacer:
    """One worker's side of the board: publish its connections, decide when to accept.

    :param board: the shared board, or None (one worker: always accept).
    :param index: this worker's slot.
    :param pid: this worker's process id (kept in its slot for diagnosis).
    """

    def __init__(self, board: ConnectionBoard | None, index: int, pid: int) -> None:
        self.board = board if board is not None and board.slots > 1 else None
        self.index = index
        self.pid = pid
        self._published: int | None = None
        #: when this worker first and last let a waiting connection go, in this episode
        self._first_deferral = 0.0
        self._last_deferral = -float("inf")
        #: before this (time.monotonic()), the worker does not listen again
        self.resume_at = 0.0

    def publish(self, connections: int) -> None:
        """This worker's open connections now (:data:`NOT_TAKING`: none wanted)."""
        if self.board is not None and connections != self._published:
            self._published = connections
            self.board.publish(self.index, connections, self.pid)

    def withdraw(self) -> None:
        """This worker takes no more connections (it is stopping)."""
        self.publish(NOT_TAKING)

    def should_defer(self, connections: int, now: float) -> bool:
        """Whether to leave a connection waiting at the socket to a sibling with fewer.

        True sets :attr:`resume_at`; a connection waits for others at most
        :data:`MAX_ACCEPT_DEFER_SECONDS` (counted from the first deferral of
        an episode: deferrals less than a few rechecks apart).
        """
        if self.board is None:
            return False
        fewest = self.board.fewest_elsewhere(self.index)
        if fewest is None or fewest >= connections:
            return False
        if now - self._last_deferral > 5 * ACCEPT_RECHECK_SECONDS:
            self._first_deferral = now  # a new episode
        elif now - self._first_deferral >= MAX_ACCEPT_DEFER_SECONDS:
            self._last_deferral = -float("inf")  # waited long enough: take it
            return False
        self._last_deferral = now
        self.resume_at = now + ACCEPT_RECHECK_SECONDS
        return True
