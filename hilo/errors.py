"""Every exception Hilo raises on purpose, as one tree: ``except HiloError`` catches them all.

::

    HiloError
     ├── InvalidInput (also a ValueError)    what a person wrote is wrong; names the field
     │    ├── JourneyInvalid                 a journey definition (hilo.journeys)
     │    ├── PolicyInvalid                  the contact-policy document (hilo.policy)
     │    ├── PlaybookInvalid                the brand playbook (hilo.playbook)
     │    ├── ConsentError                   a consent change (hilo.customers)
     │    ├── PreferenceFormError            the preference page's form (hilo.feedback)
     │    └── NotStorableJSON                JSON no database reads back (hilo.intake)
     ├── Rejected                            a request refused as a whole; nothing was stored
     │    ├── SegmentRejected                a Segment-API call (hilo.intake)
     │    ├── LinkRejected                   a forged or expired signed link (hilo.feedback)
     │    └── SignatureRejected              a provider webhook we cannot verify (hilo.feedback)
     ├── DeliveryFailure                     a channel provider did not take a message
     │    ├── PermanentFailure               do not retry (4xx, a bad address)
     │    └── RetryableFailure               retry, after ``retry_after`` when given
     └── ApiRefused                          the API answered the Python client with an error

Each class lives beside the code that raises it (its fields are that context's); this
module holds the roots, and ``tests/unit/test_errors.py`` checks every public exception in
``hilo`` hangs from them.
"""

from __future__ import annotations

__all__ = ["DeliveryFailure", "HiloError", "InvalidInput", "Rejected"]


class HiloError(Exception):
    """The root of every exception Hilo raises on purpose."""


class InvalidInput(HiloError, ValueError):
    """What a person wrote (a definition, a document, a form, a field) is wrong."""


class Rejected(HiloError):
    """A request refused as a whole: nothing from it was stored or acted on."""


class DeliveryFailure(HiloError):
    """A channel provider did not take a message; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
