"""Peak resident memory of this process, for the ``peak_rss_mb`` that commands and runs report.

One helper for every caller (the CLI summaries, the fine-tuning loop, the sparse-update
measurements), so that they all report the same quantity. Standard library only: it is cheap to
import anywhere.
"""

from __future__ import annotations

import resource
import sys

#: where Linux reports this process's memory counters (a module constant so tests can point it away)
_STATUS = "/proc/self/status"


def peak_rss_mb() -> float:
    """The peak resident set size of this process so far, in MiB.

    ``VmHWM`` from ``/proc/self/status`` where it can be read (Linux: the high-water mark of this
    process's own memory). Otherwise ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on
    macOS). ``ru_maxrss`` is not used first because on Linux it survives ``fork`` + ``exec``: a
    small child started by a large parent (a benchmark's per-arm worker, a CLI run from a big
    driver) would report the parent's peak, not its own.
    """
    try:
        with open(_STATUS, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0
