"""The asyncio caller: one connection, one channel, many concurrent calls multiplexed by correlation id.

.. code-block:: python

    import asyncio, warren

    async def main():
        async with warren.AsyncClient() as client:
            calc = client.service("default.calculator")
            print(await calc.add(1, 2))                                   # 3
            print(await asyncio.gather(*(calc.add(i, i) for i in range(100))))

    asyncio.run(main())

How a call travels (docs/protocol.md): the request is published to the default exchange with the service's queue
as routing key, ``type`` = the method, a ``correlation_id``, ``reply_to`` = direct reply-to, ``message_id``,
``expiration`` and ``x-deadline`` from the timeout, and the trace context; ``mandatory``, so a request no queue
takes comes back at once (:class:`~warren.NoSuchService`). The channel is in confirm mode because aiormq reports a
returned message only for confirmed publishes; a call does not wait for the confirm (the reply proves delivery),
but a nack (the queue is full) fails it at once with :class:`~warren.Rejected`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from typing import Any, Dict, Optional

from aiormq.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic

from . import _amqp
from .context import current_trace
from .errors import ConnectionLost, MalformedReply, NoSuchService, Rejected, RemoteError, Timeout
from .protocol import (
    CONTENT_TYPE_JSON,
    DIRECT_REPLY_TO,
    HEADER_DEADLINE,
    TraceContext,
    decode_reply,
    dumps,
    encode_params,
    expiration_ms,
    now_ms,
    trace_headers,
)

__all__ = ["AsyncClient", "AsyncService", "DEFAULT_TIMEOUT"]

log = logging.getLogger("warren.client")

#: The timeout of a call that names none, in seconds (the ``warren`` CLI's default).
DEFAULT_TIMEOUT = 5.0
#: How long ``notify`` waits for the broker to take the request.
NOTIFY_TIMEOUT = 30.0
#: After a failed (re)connect, calls fail at once with ConnectionLost for this long before the next attempt.
RECONNECT_INTERVAL = 1.0


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: Marks "the client's default timeout".
DEFAULT: Any = _Default()


def _check_queue(service: str) -> None:
    if not isinstance(service, str) or not service:
        raise ValueError("the service (its request queue) must be a non-empty string")
    if len(service.encode("utf-8")) > 255:
        raise ValueError(f"queue names are at most 255 bytes: {service[:40]!r}...")


class _Session:
    """One connection and its channel; replaced as a whole when either closes."""

    def __init__(self, number: int, connection: Any, channel: Any, raw: Any) -> None:
        self.number = number
        self.connection = connection
        self.channel = channel
        self.raw = raw  # the aiormq channel under aio-pika's
        self.pending: Dict[str, asyncio.Future] = {}
        self.seq = 0
        self.closed = False


class AsyncClient:
    """Calls warren services from asyncio code; all calls share one connection (opened on first use).

    ``broker_uri``: an AMQP URI, several comma-separated ones (cluster nodes, tried in order), or None for
    ``$WARREN_BROKER_URI`` (else ``amqp://guest:guest@127.0.0.1:5672/%2f``). ``timeout``: the default per-call
    timeout in seconds (None waits forever and sends no expiration).

    When the connection is lost every waiting call fails with :class:`~warren.ConnectionLost`; the next call
    reconnects (at most one attempt a second; in between calls fail at once). A call is never re-sent.
    """

    def __init__(self, broker_uri: Any = None, *, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 name: str = "warren-py caller") -> None:
        self._uris = _amqp.broker_uris(broker_uri)
        self.timeout = timeout
        self._name = name
        self._session: Optional[_Session] = None
        self._sessions = 0
        self._lock: Optional[asyncio.Lock] = None
        self._last_failure: Optional[tuple] = None
        self._instance = uuid.uuid4().hex
        self._closed = False
        #: Replies whose correlation id no call waits for (late, duplicate, or unknown): dropped and counted.
        self.unmatched_replies = 0

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self) -> "AsyncClient":
        """Opens the connection now (calls also open it when needed); raises ConnectionLost on failure."""
        await self._live_session()
        return self

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.closed

    # --- calls --------------------------------------------------------------------------------------------------

    async def call(self, service: str, method: Optional[str], /, *args: Any, timeout: Any = DEFAULT,
                   **kwargs: Any) -> Any:
        """Calls ``method`` of ``service`` (its request queue) with positional or named params and returns the
        result. ``method=None`` calls the service's default method. ``timeout`` in seconds (None: wait forever).

        Raises RemoteError, NoSuchService, Rejected, Timeout, ConnectionLost or MalformedReply.
        """
        return await self.request(service, method, encode_params(args, kwargs), timeout=timeout)

    async def request(self, service: str, method: Optional[str], params: Any = None, *, timeout: Any = DEFAULT,
                      trace: Optional[TraceContext] = None) -> Any:
        """:meth:`call` with the params given as one JSON value (array, object, or anything else) and an explicit
        trace context (default: :func:`warren.current_trace`)."""
        _check_queue(service)
        timeout = self.timeout if timeout is DEFAULT else timeout
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None to wait forever)")
        body = dumps(params)
        started = time.monotonic()
        session = await self._live_session()
        if timeout is not None:
            timeout = max(timeout - (time.monotonic() - started), 0.001)
        loop = asyncio.get_running_loop()
        session.seq += 1
        correlation_id = str(session.seq)
        headers: Dict[str, Any] = trace_headers(trace if trace is not None else current_trace())
        expiration = None
        if timeout is not None:
            ms = expiration_ms(timeout)
            expiration = str(ms)
            headers[HEADER_DEADLINE] = now_ms() + ms
        properties = Basic.Properties(
            content_type=CONTENT_TYPE_JSON,
            correlation_id=correlation_id,
            reply_to=DIRECT_REPLY_TO,
            message_id=f"{self._instance}-{session.number}-{correlation_id}",
            message_type=method or None,
            expiration=expiration,
            headers=headers or None,
        )
        reply: asyncio.Future = loop.create_future()
        session.pending[correlation_id] = reply
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, _expire, reply, service, method, timeout)
        try:
            # The publish is awaited here, confirm included (a return or a nack fails it at once): the broker
            # confirms a request before its reply can come back, so this waits for nothing the reply would not.
            confirmed = session.raw.basic_publish(body, routing_key=service, properties=properties, mandatory=True,
                                                  wait=False)
            try:
                await _bounded(confirmed, reply)
            except PublishError:
                raise NoSuchService(service) from None
            except DeliveryError:
                raise Rejected(service) from None
            except (asyncio.CancelledError, ConnectionLost, Timeout):
                raise
            except Exception as error:
                raise ConnectionLost(f"the request was not sent: {error!r}") from error
            return await reply
        finally:
            session.pending.pop(correlation_id, None)
            if timer is not None:
                timer.cancel()
            if reply.done() and not reply.cancelled():
                reply.exception()  # retrieved: a failure we raised another way is not "never retrieved"

    async def notify(self, service: str, method: Optional[str], /, *args: Any, ttl: Optional[float] = None,
                     **kwargs: Any) -> None:
        """A one-way call: no reply, not even for errors. Returns once the broker has taken the request (publisher
        confirm); raises NoSuchService, Rejected, Timeout or ConnectionLost. ``ttl`` (seconds) sets
        ``expiration`` and ``x-deadline``, so a request nobody ran in time is dropped."""
        await self.notify_request(service, method, encode_params(args, kwargs), ttl=ttl)

    async def notify_request(self, service: str, method: Optional[str], params: Any = None, *,
                             ttl: Optional[float] = None, trace: Optional[TraceContext] = None) -> None:
        """:meth:`notify` with the params given as one JSON value."""
        _check_queue(service)
        body = dumps(params)
        session = await self._live_session()
        headers: Dict[str, Any] = trace_headers(trace if trace is not None else current_trace())
        expiration = None
        if ttl is not None:
            ms = expiration_ms(ttl)
            expiration = str(ms)
            headers[HEADER_DEADLINE] = now_ms() + ms
        session.seq += 1
        properties = Basic.Properties(
            content_type=CONTENT_TYPE_JSON,
            message_id=f"{self._instance}-{session.number}-{session.seq}",
            message_type=method or None,
            expiration=expiration,
            headers=headers or None,
        )
        try:
            await asyncio.wait_for(
                session.raw.basic_publish(body, routing_key=service, properties=properties, mandatory=True),
                NOTIFY_TIMEOUT)
        except PublishError:
            raise NoSuchService(service) from None
        except DeliveryError:
            raise Rejected(service) from None
        except asyncio.TimeoutError:
            raise Timeout(f"the broker did not take the one-way request to {service!r} "
                          f"within {NOTIFY_TIMEOUT:g}s") from None
        except Exception as error:
            raise ConnectionLost(f"the one-way request to {service!r} was not sent: {error!r}") from error

    def service(self, name: str, *, timeout: Any = DEFAULT) -> "AsyncService":
        """A proxy that makes ``name``'s methods look local: ``await client.service("calc").add(1, 2)``."""
        return AsyncService(self, name, timeout=timeout)

    async def close(self) -> None:
        """Closes the connection; calls still waiting fail with ConnectionLost."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            self._lost(session, "the client was closed")
            try:
                await session.connection.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass

    # --- the session --------------------------------------------------------------------------------------------

    async def _live_session(self) -> _Session:
        session = self._session
        if session is not None and not session.closed:
            return session
        if self._closed:
            raise ConnectionLost("the client was closed")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            session = self._session
            if session is not None and not session.closed:
                return session
            if self._last_failure is not None and time.monotonic() - self._last_failure[0] < RECONNECT_INTERVAL:
                raise ConnectionLost(f"not connected (the last attempt failed: {self._last_failure[1]})")
            try:
                session = await self._open()
            except Exception as error:
                self._last_failure = (time.monotonic(), error)
                raise ConnectionLost(str(error)) from error
            self._last_failure = None
            self._session = session
            return session

    async def _open(self) -> _Session:
        connection = await _amqp.connect(self._uris, self._name)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._sessions += 1
            session = _Session(self._sessions, connection, channel, await channel.get_underlay_channel())
            # Direct reply-to: consume (no-ack) on the channel that publishes, before publishing.
            await session.raw.basic_consume(DIRECT_REPLY_TO, functools.partial(self._on_reply, session),
                                            no_ack=True)
            connection.close_callbacks.add(lambda _sender, exc=None: self._lost(session, exc))
            channel.close_callbacks.add(lambda _sender, exc=None: self._lost(session, exc))
        except BaseException:
            await connection.close()
            raise
        log.debug("connected to %s", [ _amqp.redact(uri) for uri in self._uris ])
        return session

    def _lost(self, session: _Session, reason: Any) -> None:
        if session.closed:
            return
        session.closed = True
        if self._session is session:
            self._session = None
        if session.pending:
            log.warning("broker connection lost with %d calls waiting: %s", len(session.pending), reason)
        for reply in session.pending.values():
            if not reply.done():
                reply.set_exception(ConnectionLost(f"the broker connection was lost: {reason}"))
        session.pending.clear()

    async def _on_reply(self, session: _Session, message: Any) -> None:
        properties = message.header.properties
        correlation_id = properties.correlation_id
        reply = session.pending.get(correlation_id) if correlation_id is not None else None
        if reply is None or reply.done():
            # Late (after a timeout), duplicate (a redelivered request answered twice) or not ours: dropped.
            self.unmatched_replies += 1
            log.debug("dropped a reply for unknown correlation id %r", correlation_id)
            return
        try:
            ok, value = decode_reply(properties.headers, properties.content_type, message.body)
        except ValueError as error:
            reply.set_exception(MalformedReply(str(error)))
            return
        if ok:
            reply.set_result(value)
        else:
            reply.set_exception(RemoteError(*value))

async def _bounded(publish: Any, reply: asyncio.Future) -> None:
    """Awaits ``publish`` (the request's publisher confirm) unless ``reply`` completes first (the reply, a timeout,
    a lost connection), without a task of its own (``asyncio.wait_for`` makes one per call before Python 3.12)."""
    task = asyncio.current_task()
    assert task is not None
    active = [True]

    def interrupt(_reply: asyncio.Future) -> None:
        if active[0] and not _reply.cancelled():
            task.cancel()

    reply.add_done_callback(interrupt)
    try:
        await publish
    except asyncio.CancelledError:
        if not (reply.done() and not reply.cancelled()):
            raise  # cancelled from outside
        uncancel = getattr(task, "uncancel", None)
        if uncancel is not None:
            uncancel()
    finally:
        active[0] = False
        reply.remove_done_callback(interrupt)


def _expire(reply: asyncio.Future, service: str, method: Optional[str], timeout: float) -> None:
    if not reply.done():
        reply.set_exception(Timeout(f"no reply from {service!r} ({method or 'default method'}) within {timeout:g}s"))


class AsyncService:
    """A service seen from asyncio code: ``await service.add(1, 2)`` calls its ``add`` method.

    Names that start with ``_`` and this class's own methods (``call``, ``notify``) are not proxied; call such
    methods with ``await service.call("call", ...)``.
    """

    def __init__(self, client: AsyncClient, name: str, *, timeout: Any = DEFAULT) -> None:
        _check_queue(name)
        self.client = client
        self.name = name
        self.timeout = timeout

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        return functools.partial(self.call, method)

    async def call(self, method: Optional[str], /, *args: Any, timeout: Any = DEFAULT, **kwargs: Any) -> Any:
        """Calls ``method`` (None: the default method) with positional or named params."""
        return await self.client.call(self.name, method, *args,
                                      timeout=self.timeout if timeout is DEFAULT else timeout, **kwargs)

    async def notify(self, method: Optional[str], /, *args: Any, ttl: Optional[float] = None, **kwargs: Any) -> None:
        """A one-way call of ``method``."""
        await self.client.notify(self.name, method, *args, ttl=ttl, **kwargs)

    def __repr__(self) -> str:
        return f"AsyncService({self.name!r})"
