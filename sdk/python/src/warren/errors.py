"""The exceptions of the warren SDK.

A caller sees :class:`WarrenError` subclasses: :class:`RemoteError` (the service replied with an error object),
:class:`NoSuchService`, :class:`Rejected`, :class:`Timeout`, :class:`ConnectionLost` and :class:`MalformedReply`.

A method of a responder raises :class:`HandlerError` (or any exception) to reply ``handler_error``, and
:class:`BadRequest` to reply ``bad_request``.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "WarrenError",
    "RemoteError",
    "NoSuchService",
    "Rejected",
    "Timeout",
    "ConnectionLost",
    "MalformedReply",
    "QueueConflict",
    "HandlerError",
    "BadRequest",
]


class WarrenError(Exception):
    """Base class of every error a warren call raises."""


class RemoteError(WarrenError):
    """The service replied with an error object (``x-status: error``).

    ``code`` is one of ``bad_request``, ``unknown_method``, ``handler_error``, ``deadline_exceeded``, ``internal``
    (see :mod:`warren.codes`), or a code added by a newer responder: treat unknown codes like ``internal``.
    """

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details

    def __repr__(self) -> str:
        return f"RemoteError(code={self.code!r}, message={self.message!r}, details={self.details!r})"


class NoSuchService(WarrenError):
    """No queue of that name: the broker returned the request (``mandatory``), so the call failed at once."""

    def __init__(self, service: str) -> None:
        super().__init__(f"no such service: no queue named {service!r}")
        self.service = service


class Rejected(WarrenError):
    """The service's queue refused the request (it is full: ``x-max-length`` with ``reject-publish``)."""

    def __init__(self, service: str) -> None:
        super().__init__(f"the queue of service {service!r} refused the request (full)")
        self.service = service


class Timeout(WarrenError, TimeoutError):
    """No reply within the call's timeout. The request may still run; a late reply is dropped."""


class ConnectionLost(WarrenError, ConnectionError):
    """The broker connection failed or was lost while the call waited. The call is never re-sent (it may have run);
    the next call reconnects."""


class MalformedReply(WarrenError):
    """The reply could not be read: not JSON, or an error reply without a valid error object."""


class QueueConflict(WarrenError):
    """The request queue exists with other arguments than the responder declares (``PRECONDITION_FAILED``)."""


class HandlerError(Exception):
    """Raise from an exposed method to reply ``handler_error`` with this message and optional JSON ``details``.

    Any other exception also becomes ``handler_error`` (message ``"ExceptionType: text"``, no details).
    """

    code = "handler_error"

    def __init__(self, message: str, details: Optional[Any] = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(HandlerError):
    """Raise from an exposed method to reply ``bad_request``: the params do not fit (beyond what the function's
    signature already checks)."""

    code = "bad_request"
