"""Per-call context: the request an exposed method is answering, and the trace context calls propagate.

Inside an exposed method, :func:`current_call` describes the request being answered, and every call the method
makes (with any warren client) carries the request's ``traceparent`` / ``tracestate`` on. Elsewhere,
``with warren.trace(traceparent):`` sets the trace context the calls inside the block send.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional

from .protocol import TraceContext

__all__ = ["CallInfo", "current_call", "current_trace", "trace"]


@dataclass(frozen=True)
class CallInfo:
    """The request an exposed method is answering."""

    method: str
    queue: str
    message_id: Optional[str]
    correlation_id: Optional[str]
    #: True when the broker delivers this request again (a responder died before acking it): the method may have
    #: run already. De-duplicate on ``message_id``, which is the same for every delivery of one call.
    redelivered: bool
    #: The caller's ``x-deadline`` as unix time in seconds, or None.
    deadline: Optional[float]
    #: False for a one-way call (no reply is sent).
    reply_expected: bool
    trace: Optional[TraceContext]


_current_call: contextvars.ContextVar[Optional[CallInfo]] = contextvars.ContextVar("warren_call", default=None)
_current_trace: contextvars.ContextVar[Optional[TraceContext]] = contextvars.ContextVar("warren_trace", default=None)


def current_call() -> Optional[CallInfo]:
    """The request the running exposed method answers, or None outside one."""
    return _current_call.get()


def current_trace() -> Optional[TraceContext]:
    """The trace context calls made here send: the one of ``with trace(...)``, or of the request being answered."""
    return _current_trace.get()


@contextlib.contextmanager
def trace(traceparent: str, tracestate: Optional[str] = None) -> Iterator[TraceContext]:
    """Sends ``traceparent`` (and ``tracestate``) with every call made inside the block (W3C trace context)."""
    context = TraceContext(traceparent, tracestate)
    token = _current_trace.set(context)
    try:
        yield context
    finally:
        _current_trace.reset(token)
