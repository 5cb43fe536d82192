"""The wire protocol's names and pure encoding/decoding helpers (docs/protocol.md is the normative text).

Nothing here talks to a broker: the caller and the responder build their AMQP properties and bodies with these
functions, so both sides agree on every header, property and error object.
"""

from __future__ import annotations

import re

import datetime
import json
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
HEADER_STATUS = "x-status"
HEADER_DEADLINE = "x-deadline"
HEADER_TRACEPARENT = "traceparent"
HEADER_TRACESTATE = "tracestate"
CONTENT_TYPE_JSON = "application/json"
STATUS_OK = "ok"
STATUS_ERROR = "error"

# Error codes (the `code` of an error reply).
BAD_REQUEST = "bad_request"
UNKNOWN_METHOD = "unknown_method"
HANDLER_ERROR = "handler_error"
DEADLINE_EXCEEDED = "deadline_exceeded"
INTERNAL = "internal"
ERROR_CODES = (BAD_REQUEST, UNKNOWN_METHOD, HANDLER_ERROR, DEADLINE_EXCEEDED, INTERNAL)

DEAD_LETTER_SUFFIX = ".dead"
# RabbitMQ closes the channel on a per-message TTL above this (milliseconds).
MAX_EXPIRATION_MS = 4294967295


@dataclass(frozen=True)
class TraceContext:
    """W3C trace context (``traceparent``, ``tracestate``) carried by a request and copied onto its reply."""

    traceparent: str
    tracestate: Optional[str] = None


def encode_params(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """The params value of a call: positional args as a JSON array, named ones as an object (not both)."""
    if args and kwargs:
        raise TypeError("a warren call takes positional or named params, not both (the body is one JSON value)")
    return dict(kwargs) if kwargs else list(args)


def dumps(value: Any) -> bytes:
    """Strict JSON (no NaN or Infinity, which are not JSON) as UTF-8 bytes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def loads(body: bytes) -> Any:
    """A JSON body; an empty (or whitespace-only) body is ``None``."""
    if not body.strip():
        return None
    return json.loads(body)


def is_json(content_type: Optional[str]) -> bool:
    """``application/json``, with or without parameters such as ``; charset=utf-8``; absent means JSON."""
    if not content_type:
        return True
    return content_type.split(";", 1)[0].strip().lower() == CONTENT_TYPE_JSON


def now_ms() -> int:
    return int(time.time() * 1000)


def expiration_ms(timeout: float) -> int:
    """A timeout in seconds as the ``expiration`` the broker accepts (whole milliseconds, at least 1)."""
    return max(1, min(MAX_EXPIRATION_MS, int(timeout * 1000)))


def header_str(headers: Optional[Mapping[str, Any]], name: str) -> Optional[str]:
    """A header as a string (AMQP long strings may arrive as bytes)."""
    if not headers:
        return None
    value = headers.get(name)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return value
    return None


def header_int(headers: Optional[Mapping[str, Any]], name: str) -> Optional[int]:
    """A header as an integer: any AMQP integer width, a timestamp, a float or a decimal string."""
    if not headers:
        return None
    value = headers.get(name)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return int(value.timestamp() * 1000)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def trace_headers(trace: Optional[TraceContext]) -> Dict[str, str]:
    if trace is None:
        return {}
    headers = {HEADER_TRACEPARENT: trace.traceparent}
    if trace.tracestate is not None:
        headers[HEADER_TRACESTATE] = trace.tracestate
    return headers


def trace_from_headers(headers: Optional[Mapping[str, Any]]) -> Optional[TraceContext]:
    traceparent = header_str(headers, HEADER_TRACEPARENT)
    if traceparent is None:
        return None
    return TraceContext(traceparent, header_str(headers, HEADER_TRACESTATE))


def error_object(code: str, message: str, details: Any = None) -> Dict[str, Any]:
    error: Dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return error


def decode_reply(headers: Optional[Mapping[str, Any]], content_type: Optional[str], body: bytes) -> Tuple[bool, Any]:
    """A reply as ``(True, result)`` or ``(False, (code, message, details))``.

    Raises ``ValueError`` for a reply that is not JSON or an error reply without a valid error object. A reply
    without ``x-status`` is ``ok`` (tutorial-style responders set no headers).
    """
    if not is_json(content_type):
        raise ValueError(f"the reply's content type {content_type!r} is not JSON")
    status = header_str(headers, HEADER_STATUS) or STATUS_OK
    value = loads(body)
    if status != STATUS_ERROR:
        return True, value
    if not isinstance(value, dict) or not isinstance(value.get("code"), str) or not isinstance(
            value.get("message"), str):
        raise ValueError(f"an error reply without a valid error object: {body[:200]!r}")
    return False, (value["code"], value["message"], value.get("details"))


def request_queue_arguments(queue: str, queue_type: str = "quorum", delivery_limit: Optional[int] = 5,
                            max_length: Optional[int] = None, message_ttl_ms: Optional[int] = None
                            ) -> Dict[str, Any]:
    """The request queue's arguments, exactly as ``client/src/topology.rs`` (the operator and ``warren-worker
    --declare``) builds them, so a re-declaration by either side never conflicts."""
    if queue_type not in ("quorum", "classic"):
        raise ValueError(f"queue_type must be 'quorum' or 'classic', not {queue_type!r}")
    args: Dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue + DEAD_LETTER_SUFFIX,
    }
    if queue_type == "quorum" and delivery_limit is not None:
        args["x-delivery-limit"] = int(delivery_limit)
    if max_length is not None:
        args["x-max-length"] = int(max_length)
        args["x-overflow"] = "reject-publish"
    if message_ttl_ms is not None:
        args["x-message-ttl"] = int(message_ttl_ms)
    return args


def dead_letter_queue_arguments(queue_type: str = "quorum") -> Dict[str, Any]:
    return {"x-queue-type": queue_type}


def split_uris(uris: Any) -> List[str]:
    """Broker addresses, one URI each: from one URI, a multi-host URI (``amqp://user:pass@h1:5672,h2:5672/%2f``:
    one credential set, the nodes of one cluster — the form a broker Secret's ``uri`` takes for a cluster), a
    comma-separated list of URIs, or a list of any of these."""
    if isinstance(uris, str):
        items = _URI_START.split(uris)
    else:
        items = list(uris)
    result = [uri for item in items if item and item.strip() for uri in _expand_hosts(item.strip())]
    if not result:
        raise ValueError("no broker URI given")
    return result


# A comma that starts another URI (``,amqp://``), as opposed to one between the hosts of a multi-host URI.
_URI_START = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def _expand_hosts(uri: str) -> List[str]:
    """``scheme://userinfo@h1,h2/rest`` → one URI per host; the host list starts after the last ``@`` of the
    authority, so a comma in a password stays part of it."""
    if "://" not in uri:
        return [part.strip() for part in uri.split(",") if part.strip()]
    scheme, rest = uri.split("://", 1)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hosts = authority.rpartition("@")
    return [f"{scheme}://{userinfo}{at}{host.strip()}{tail}" for host in hosts.split(",") if host.strip()]
