"""The example journeys shipped in ``examples/``, as tests load them."""

from __future__ import annotations

from hilo.journeys.definitions import JourneyDefinition
from hilo.journeys.validate import load_journey_yaml
from hilo.settings import PROJECT_ROOT

EXAMPLES = PROJECT_ROOT / "examples"


def example(key: str) -> JourneyDefinition:
    path = EXAMPLES / "journeys" / f"{key}.yaml"
    return load_journey_yaml(path.read_text(), source=path.name)
