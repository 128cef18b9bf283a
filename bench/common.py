"""What every benchmark here measures with: CPU time, percentiles, a run that Ctrl-C and
SIGTERM end cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of this process, or of ``pid`` (Linux /proc; 0 elsewhere)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (0 < share <= 1) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(share * len(ordered) + 0.5)))
    return ordered[rank - 1]


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main``; SIGTERM ends it like Ctrl-C, so children and servers stop."""

    async def guarded() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, task.cancel)
        return await main()

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        print("interrupted", file=sys.stderr)
        return 130
