"""Keep a command's stdout for its result: libraries (DeepSpeed's accelerator notice, its op
builder) print to stdout, which would corrupt ``--json`` output read by a pipe."""
from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def logs_to_stderr():
    """Send everything written to stdout meanwhile, by Python or native code, to stderr.

    Done on file descriptor 1, not ``sys.stdout``: loggers keep the stream object they were
    created with, and native code writes to the descriptor."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
