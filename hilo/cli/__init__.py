"""The ``hilo`` command line: journeys, the worker, the API, the dev stack, the contact policy."""

from hilo.cli.app import app

__all__ = ["app"]
