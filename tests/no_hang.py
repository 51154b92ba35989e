"""A no-hang guard for tests that feed hostile text to code that must run in linear time.

It is not a speed claim (speed is proven in bench/): a call takes microseconds and the budget is
seconds, so the guard only fires on a hang, such as a regex backtracking catastrophically.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

BUDGET_S = 10.0


class TookTooLong(Exception):
    pass


@contextmanager
def budget(seconds: float = BUDGET_S):
    """Fail with TookTooLong when the body runs past ``seconds`` of wall-clock time.

    SIGALRM interrupts Python code and the regex engine (which checks for signals as it backtracks),
    so a catastrophic pattern fails the test instead of hanging it.
    """

    def expire(signum, frame):
        raise TookTooLong(f"over the {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
