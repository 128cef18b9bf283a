"""Tools for a laptop and CI: the Temporal dev server as a child process (``devserver``) and
journeys simulated on the time-skipping test server (``simulation``).
"""

from hilo.devtools.simulation import JourneyLab, Scenario, simulate_sync

__all__ = [
    "JourneyLab",
    "Scenario",
    "simulate_sync",
]
