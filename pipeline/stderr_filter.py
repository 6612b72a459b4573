"""Drop known internal notices that libraries write straight to this process's stderr (file descriptor 2).

Ray's C++ core prints, once per teacher actor, an error-level notice that Ray Data's actor pools always trigger
("has constructor arguments in the object store and max_restarts > 0", ray-project/ray#53727): nothing a user can
act on, and Python's logging cannot reach it. Its backend log level (``RAY_BACKEND_LOG_LEVEL``) would hide it but
prints a notice of its own. So while the cache's plan runs (unless ``-v``), fd 2 goes through a pipe: complete lines
that contain a known notice are dropped, everything else (rich's progress bar included) is passed on at once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

log = logging.getLogger(__name__)
#: What identifies each notice a normal run hides.
RAY_NOTICES = ("has constructor arguments in the object store and max_restarts > 0",)


@contextmanager
def hide_lines(patterns: Sequence[str] = RAY_NOTICES) -> Iterator[None]:
    """While open, lines written to fd 2 that contain one of ``patterns`` are dropped (see the module docstring)."""
    if log.isEnabledFor(logging.INFO):  # -v: show everything
        yield
        return
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    needles = [p.encode() for p in patterns]

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as reader:
            while chunk := reader.read(1 << 20):  # a C++ log line is one write, whole in one read
                kept = b"".join(
                    line for line in chunk.splitlines(keepends=True) if not (line.endswith(b"\n") and any(n in line for n in needles))
                )
                if kept:
                    os.write(saved, kept)

    thread = threading.Thread(target=pump, name="esam3-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads what is left, then stops
        thread.join(timeout=5)
        os.close(saved)
