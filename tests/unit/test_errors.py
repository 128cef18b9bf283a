"""One exception tree: every exception Hilo defines hangs from :class:`hilo.errors.HiloError`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import hilo
from hilo.errors import DeliveryFailure, HiloError, InvalidInput, Rejected


def _hilo_modules() -> list[str]:
    modules = pkgutil.walk_packages(hilo.__path__, "hilo.")
    return [info.name for info in modules if not info.name.endswith("__main__")]


def test_every_public_exception_in_hilo_is_a_hilo_error() -> None:
    strays = []
    for name in _hilo_modules():
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attribute.startswith("_")
                and not issubclass(value, HiloError)
            ):
                strays.append(f"{name}.{attribute}")
    assert strays == []


def test_invalid_input_is_still_a_value_error_for_callers_that_catch_that() -> None:
    from hilo.journeys.definitions import JourneyInvalid
    from hilo.policy import PolicyInvalid

    assert issubclass(JourneyInvalid, InvalidInput) and issubclass(JourneyInvalid, ValueError)
    assert issubclass(PolicyInvalid, InvalidInput)


def test_refusals_and_delivery_failures_have_their_roots() -> None:
    from hilo.channels.base import PermanentFailure, RetryableFailure
    from hilo.client import ApiRefused
    from hilo.feedback.links import LinkRejected
    from hilo.intake.segment_spec import SegmentRejected

    assert issubclass(SegmentRejected, Rejected) and issubclass(LinkRejected, Rejected)
    assert issubclass(PermanentFailure, DeliveryFailure)
    assert issubclass(RetryableFailure, DeliveryFailure)
    assert issubclass(ApiRefused, HiloError)
