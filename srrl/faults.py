"""Named points where a test can kill the process (``SRRL_FAILPOINT=<name>``), to prove that resume survives a
kill -9 there. Without the variable a failpoint is one dictionary lookup."""

from __future__ import annotations

import os
import signal

POINTS = ("after_sampling", "checkpoint_half_written", "checkpoint_published", "after_metrics")


def failpoint(name: str, stage: int) -> None:
    """SIGKILL this process at ``name`` during stage ``stage`` when ``SRRL_FAILPOINT`` is ``name:stage``."""
    if os.environ.get("SRRL_FAILPOINT") == f"{name}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)
