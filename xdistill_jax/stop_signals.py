"""SIGTERM/SIGINT as an exception raised in the main thread, for the stretches of a command where
there is nothing to save first (a run's start, the demo's stages between its trainings)."""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def raise_on_stop(exception_type: type[BaseException]):
    """While the block runs, SIGTERM/SIGINT raise `exception_type(signal name)` wherever the main
    thread is; the previous handlers are given back on the way out. Off the main thread (where
    Python allows no handlers) the block runs unchanged."""
    def handler(signum, frame):
        raise exception_type(signal.Signals(signum).name)

    old = {}
    for sig in STOP_SIGNALS:
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
