"""Hydra callbacks used by the experiment configs (``hydra.callbacks`` in ``conf/experiment/*.yaml``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set size to its current size (Linux ``clear_refs`` 5).

    ``getrusage``'s ``ru_maxrss``, which each record's ``memory.peak_rss_mb`` reads, is a peak over
    the life of the process; the jobs of a Hydra sweep share one process, so without a reset a job
    would report the largest peak of every job before it. Returns whether the reset was possible.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class ResetPeakMemory(Callback):
    """Before each job of a sweep: reset the peak RSS (and the CUDA peak), so records measure their own job."""

    def __init__(self) -> None:
        self._warned = False

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if not reset_peak_rss() and not self._warned:
            log.warning("cannot reset the peak RSS here (no /proc/self/clear_refs): in a sweep, a job's "
                        "memory.peak_rss_mb includes the jobs before it")
            self._warned = True
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except ImportError:
            pass
