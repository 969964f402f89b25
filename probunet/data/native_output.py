"""Diagnostics that C libraries print straight to the terminal, routed to the log instead.

ITK's readers (through SimpleITK) probe a file with each image format they know;
the HDF5 library prints its error stack ("HDF5-DIAG: Error detected in HDF5 ...")
when it is handed a file that is not HDF5, MetaIO prints "MetaImage: Read: Cannot
parse file", libpng "libpng error: ...". These go to file descriptors 1 and 2,
below Python, so :func:`native_output_to_log` points both descriptors at a
temporary file while a reader runs and passes what was written to the logger
(DEBUG). The error the reader raises still names the file and the reason.

One redirect at a time (a process-wide lock): reader threads take turns for the
duration of an ITK call. Python output written by other threads in that window is
captured with it (and logged at DEBUG).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_LOCK = threading.RLock()
_MAX_LOGGED = 4000  # characters of captured output passed to the log


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


@contextmanager
def native_output_to_log(what: str):
    """While the block runs, whatever native code writes to fds 1 and 2 goes to the log (DEBUG,
    prefixed with ``what``) instead of the terminal. Re-entrant; a no-op where fds 1/2 are closed."""
    with _LOCK:
        try:
            saved = (os.dup(1), os.dup(2))
        except OSError:
            yield
            return
        with tempfile.TemporaryFile() as tmp:
            _flush()
            try:
                os.dup2(tmp.fileno(), 1)
                os.dup2(tmp.fileno(), 2)
                yield
            finally:
                _flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
                try:
                    tmp.seek(0)
                    text = tmp.read(_MAX_LOGGED + 1).decode("utf-8", "replace")
                except OSError:
                    text = ""
                if text.strip():
                    logger.debug("%s: native library output: %s", what, " | ".join(
                        line.strip() for line in text[:_MAX_LOGGED].splitlines() if line.strip()))


__all__ = ["native_output_to_log"]
