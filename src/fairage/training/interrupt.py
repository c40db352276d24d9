"""SIGTERM as an exception, so a stopped command ends unsuccessfully instead of with exit 0.

A scheduler (Slurm, Kubernetes, systemd) stops a job with SIGTERM. Lightning only notes
the signal and ends ``fit`` as if training had finished, so the command would report
success. Inside ``sigterm_raises()`` the signal raises ``Terminated`` in the main thread
instead (Lightning's own handler still runs first: it chains to the one installed here).
``Terminated`` derives from BaseException, like KeyboardInterrupt, so the ``except
Exception`` blocks of library code do not swallow it; atomic writes in progress are
abandoned and leave the previous file intact.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """The process received SIGTERM inside ``sigterm_raises()``."""

    #: the exit status a shell reports for a process killed by SIGTERM (128 + 15)
    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated``; the previous handler is restored after.

    Signal handlers can only be installed from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
