"""Peak resident memory of one piece of work inside a longer-lived process (Linux).

The benchmark compiles every variant in its own process, so ``ru_maxrss`` (the process's lifetime peak) would only
ever grow. Linux keeps the peak as ``VmHWM`` in ``/proc/self/status`` and resets it to the current resident size when
``5`` is written to ``/proc/self/clear_refs``: resetting before the work and reading after gives the work's own peak
(plus whatever the process already held resident, which the caller reports with it).
"""

from __future__ import annotations

from pathlib import Path


class PeakMemory:
    """``with PeakMemory() as peak: work()`` then ``peak.bytes`` (None where the kernel offers no reset)."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        self._supported = False

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._supported = True
        except OSError:
            self._supported = False
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = _high_water_mark() if self._supported else None


def _high_water_mark() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
