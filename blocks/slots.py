"""In-flight slots: how many prompts of ours one ComfyUI server may hold at once.

:class:`Slots` is a counting semaphore with a visible owner (one connection) whose condition
can be shared by the connections of a pool, so a generation can wait for a free slot on ANY
server of the pool with one ``wait()``. Whoever changes what a waiter waits for (a slot given
back, a WebSocket up or down, a close) calls :meth:`Slots.notify`; nobody polls.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional


class Slots:
    """``capacity`` slots guarded by ``condition`` (shared by the pool's connections, or its own).

    Args:
        capacity: the most prompts in flight at once (``max_in_flight``), at least 1.
        condition: the pool's shared condition; a new one when None.

    Raises:
        ValueError: ``capacity`` below 1.
    """

    def __init__(self, capacity: int, condition: Optional[threading.Condition] = None):
        if capacity < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.capacity = capacity
        self.condition = condition or threading.Condition()
        self._taken = 0

    @property
    def free(self) -> int:
        """Slots free now (``capacity`` minus those taken)."""
        return self.capacity - self._taken

    def try_take(self) -> bool:
        """Take a slot if one is free, without waiting."""
        with self.condition:
            if self._taken >= self.capacity:
                return False
            self._taken += 1
            return True

    def take(self, check: Callable[[], None]) -> None:
        """Wait for a free slot and take it. ``check()`` runs before each look and after each
        wake-up; it raises to stop waiting (the connection closed), and nothing is taken then."""
        with self.condition:
            while True:
                check()
                if self._taken < self.capacity:
                    self._taken += 1
                    return
                self.condition.wait()

    def give_back(self) -> None:
        """Free one slot and wake everyone waiting on the condition."""
        with self.condition:
            if self._taken <= 0:
                raise RuntimeError("a slot was given back that was never taken")
            self._taken -= 1
            self.condition.notify_all()

    def notify(self) -> None:
        """Wake every waiter to look again (a WebSocket came up or went down, a close)."""
        with self.condition:
            self.condition.notify_all()
