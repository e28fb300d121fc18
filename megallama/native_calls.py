"""Threads inside a native call that must not return while the interpreter finalizes.

A Python thread that comes back from C++ code that released the GIL (a TCPStore request, a torch
op) after the main thread began finalizing is ended with ``pthread_exit`` as it reacquires the
GIL, inside pybind11's ``noexcept`` guard: the C++ runtime calls ``std::terminate`` and the
process aborts ("terminate called without an active exception", SIGABRT) after its command had
finished. A thread that may be left in such a call (the watchdog's store requests, which are
abandoned when they time out) runs it under :func:`native_call`; the process entry
(``cli.run``) waits briefly for those, and ends the process without finalizing if one is still
out.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator, Set

_lock = threading.Lock()
_inside: Set[threading.Thread] = set()


@contextmanager
def native_call() -> Iterator[None]:
    """Mark this thread as inside a native call that may still be out when the process ends."""
    me = threading.current_thread()
    with _lock:
        _inside.add(me)
    try:
        yield
    finally:
        with _lock:
            _inside.discard(me)


def settled(timeout_s: float) -> bool:
    """Whether no marked call is still out, after waiting up to ``timeout_s`` for them."""
    deadline = time.monotonic() + timeout_s
    while True:
        with _lock:
            out = [t for t in _inside if t.is_alive()]
        if not out or time.monotonic() >= deadline:
            return not out
        out[0].join(min(0.05, max(0.0, deadline - time.monotonic())))
