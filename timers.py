"""The reactor's timers: deadlines on one heap, read from one clock.

A `Timer` is what `call_at` hands back, to cancel. The loop (reactor.py)
reads the clock once per turn (`Timers.tick`, then `turn_time`) and runs
what is due (`run_due`); the read and write paths (connection.py) and the
door (door.py) set their deadlines here, so none of them imports the loop.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

Clock = Callable[[], float]


def _nothing() -> None:
    """What a cancelled timer would call."""


class Timer:
    """One callback on the reactor's heap; `cancel` keeps it from running."""

    __slots__ = ("callback", "cancelled", "_timers")

    def __init__(self, callback: Callable[[], None], timers: Timers) -> None:
        self.callback = callback
        self.cancelled = False
        self._timers: Timers | None = timers  # None once out of the heap

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            # What the callback holds (a connection, its transport) goes now,
            # not when the heap drops the timer: that may be a while.
            self.callback = _nothing
            if self._timers is not None:
                self._timers.cancelled_one()


class Timers:
    """Deadlines on one heap, read from one clock. Cancelled timers stay in
    the heap until they come up, unless they are over a quarter of it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()  # equal deadlines run in call order
        self._cancelled = 0
        # The clock as the turn began (`tick`): what the turn's deadlines
        # and output timestamps count from, read once per turn. The room's
        # `Host.now()` reads the clock itself.
        self.turn_time = clock()

    def tick(self) -> None:
        """A turn begins: read the clock once for everything it does."""
        self.turn_time = self.clock()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(callback, self)
        heapq.heappush(self._heap, (when, next(self._order), timer))
        return timer

    def cancelled_one(self) -> None:
        """A timer in the heap was cancelled: past a quarter of the heap, they
        go (each idle WebSocket member holds a live timer, and every
        connection leaves a cancelled one or two behind)."""
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled > len(self._heap) // 4:
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def next_due(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0][0] if heap else None

    def run_due(self) -> None:
        """Run every timer due by now (but none that these add for now)."""
        heap = self._heap
        now = self.clock()
        due: list[Timer] = []
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            if timer.cancelled:
                self._cancelled -= 1
            else:
                timer._timers = None
                due.append(timer)
        for timer in due:
            if not timer.cancelled:
                timer.cancelled = True  # it ran: cancelling it now is a no-op
                timer.callback()
