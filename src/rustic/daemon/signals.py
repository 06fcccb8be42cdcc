"""Signal handling that stays prompt while the main thread holds locks or blocks in a handler."""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPT_SIGNAL = signal.SIGUSR2
"""Sent by the relay to the main thread alone, to break it out of a blocking call."""


class SignalRelay:
    """Catch `signals` (SIGINT and SIGTERM by default) and react to them on a relay thread.

    Two facts of CPython shape this. A signal handler runs on the main thread between two
    bytecodes, maybe while that thread holds a lock the reaction needs (an `Event`'s, say).
    And the kernel may deliver a signal to any thread, in which case a main thread blocked
    in a call is not woken and the handler waits for that call to return. So the signals
    are read from the interpreter's wakeup fd, which is written whatever thread received
    them, and a relay thread calls `react(sig)` for each. To break the main thread out of
    a blocking call, `interrupt_main` sends it `INTERRUPT_SIGNAL`; the handler then asks
    `interrupt()` and raises the exception it returns, if any. While installed, an outside
    `INTERRUPT_SIGNAL` does nothing unless `interrupt()` says so.
    """

    def __init__(
        self,
        react: Callable[[signal.Signals], None],
        interrupt: Callable[[], BaseException | None],
        signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
    ) -> None:
        self._react = react
        self._interrupt = interrupt
        self._signals = signals
        self._lock = threading.Lock()
        self._previous: dict[signal.Signals, Any] = {}  # guarded by `_lock`
        self._previous_fd = -1  # guarded by `_lock`
        self._write_end: int | None = None  # guarded by `_lock`
        self._thread: threading.Thread | None = None

    def install(self) -> None:
        """Start the relay thread and take over the signals; main thread only."""
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)  # the interpreter requires it of a wakeup fd
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._relay, read_end),
            name="rustic-signals",
            daemon=True,
        )
        self._thread.start()
        with self._lock:
            self._write_end = write_end
            self._previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            for sig in (*self._signals, INTERRUPT_SIGNAL):
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers and wakeup fd back and end the relay thread."""
        with self._lock:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous.clear()
            signal.set_wakeup_fd(self._previous_fd)
            write_end, self._write_end = self._write_end, None
        if write_end is not None:
            os.close(write_end)  # the relay reads end-of-file and exits
        if self._thread is not None:
            self._thread.join(1.0)

    def interrupt_main(self) -> bool:
        """Send `INTERRUPT_SIGNAL` to the main thread; False when not installed.

        Holding the lock keeps the signal from arriving after `restore` put the default
        handler back, which would end the process.
        """
        with self._lock:
            main = threading.main_thread().ident
            if self._write_end is None or main is None:
                return False
            signal.pthread_kill(main, INTERRUPT_SIGNAL)
            return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler, on the main thread: raise what `interrupt()` returns."""
        exc = self._interrupt()
        if exc is not None:
            raise exc

    def _relay(self, read_end: int) -> None:
        """Call `react` for each relayed signal read from the wakeup fd, until end-of-file."""
        try:
            while data := os.read(read_end, 64):
                for signum in data:
                    if signum in self._signals:
                        self._react_safely(signal.Signals(signum))
        finally:
            os.close(read_end)

    def _react_safely(self, sig: signal.Signals) -> None:
        try:
            self._react(sig)
        except Exception:
            logger.exception("signal reaction failed signal=%s", sig.name)
