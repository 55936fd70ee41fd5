"""Driver work that needs no result of the runs (the step-cost measurement, matplotlib's import), done
in a background thread once the runs leave a core free (the last run of an odd batch, say) instead
of after them. It waits for `Background.go` — a backend says when a core is free — so that it never
competes with a run for a core (which would also distort the CPU times it measures)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any


class Background:
    """``fn(stop)`` in a daemon thread, started by `go` (or by `result`, which then waits for it and
    re-raises its error); at nice 19 on Linux, so that a run that starts meanwhile keeps its core.
    `cancel` asks it to stop at its next check of ``stop`` and waits briefly."""

    def __init__(self, fn: Callable[[threading.Event], Any]) -> None:
        self._fn, self._stop, self._go = fn, threading.Event(), threading.Event()
        self._out: Any = None
        self._err: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flatmin-background", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._go.wait()
        if self._stop.is_set():
            return
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (AttributeError, OSError):
            pass
        try:
            self._out = self._fn(self._stop)
        except BaseException as err:  # noqa: BLE001 - handed to the caller by `result`
            self._err = err

    def go(self) -> None:
        """A core is free: start the work (once; later calls do nothing)."""
        self._go.set()

    def result(self) -> Any:
        """Start the work if no core was free before, wait for it; its value, or its error raised here."""
        self._go.set()
        self._thread.join()
        if self._err is not None:
            raise self._err
        return self._out

    def cancel(self, wait_s: float = 10.0) -> None:
        """Ask the work to stop and wait up to ``wait_s`` for it (a daemon thread: never blocks exit)."""
        self._stop.set()
        self._go.set()
        self._thread.join(wait_s)
