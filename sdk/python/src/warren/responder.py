"""The responder: answer warren calls with Python functions, as warren-worker does (docs/protocol.md).

.. code-block:: python

    import warren

    @warren.expose
    def add(a, b):
        return a + b

    @warren.expose("divide")          # or @warren.expose(name="divide")
    async def div(a, b):              # async methods run on the event loop
        if b == 0:
            raise warren.HandlerError("division by zero", details={"a": a})
        return a / b

    warren.serve("default.calculator")   # blocks; SIGTERM or SIGINT drains and returns

Per request, in the order docs/protocol.md gives: a request past its ``x-deadline`` is acked without running
(``deadline_exceeded``); then the method is resolved (``type``, else the default method; ``unknown_method``);
then the content type, the JSON body and the params are checked against the function's signature
(``bad_request``); then the method runs (an exception is ``handler_error``). The reply is published with a
publisher confirm and only then is the request acked, so a responder that dies mid-call leaves its request to be
redelivered. A late confirm is waited for, not timed out (see :meth:`_Session.check_confirms`): giving up on it would
requeue a request whose reply may still be delivered. Requests without ``reply_to`` are one-way: run and acked, no
reply.

Plain (``def``) methods run in a thread pool as large as the prefetch (``threads=0`` runs them on the event loop,
for quick CPU-only functions); ``async def`` methods run on the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import logging
import os
import queue as queue_module
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed, DeliveryError
from pamqp.commands import Basic

from . import _amqp
from .context import CallInfo, _current_call, _current_trace
from .errors import HandlerError, QueueConflict, WarrenError
from .protocol import (
    BAD_REQUEST,
    CONTENT_TYPE_JSON,
    DEAD_LETTER_SUFFIX,
    DEADLINE_EXCEEDED,
    HANDLER_ERROR,
    HEADER_DEADLINE,
    HEADER_STATUS,
    INTERNAL,
    STATUS_ERROR,
    STATUS_OK,
    UNKNOWN_METHOD,
    TraceContext,
    dead_letter_queue_arguments,
    dumps,
    error_object,
    header_int,
    is_json,
    loads,
    now_ms,
    request_queue_arguments,
    trace_from_headers,
    trace_headers,
)

__all__ = ["Registry", "expose", "registry_for", "Server", "ServerThread", "serve", "start_server", "Stats"]

log = logging.getLogger("warren.responder")

#: Requests held unacked at once (and so run concurrently) unless told otherwise (warren-worker's default).
DEFAULT_PREFETCH = 32
#: RabbitMQ's default ``max_message_size`` (128 MiB): a larger reply would be refused, so it becomes an error reply.
DEFAULT_MAX_REPLY_BYTES = 128 * 1024 * 1024
#: How long sending a nack may take (the session is presumably dying; the broker then redelivers).
SETTLE_TIMEOUT = 10.0
#: A reply's confirm that takes longer than this is late: counted (``reply_confirms_late``), logged, still waited for.
REPLY_CONFIRM_LATE = 10.0
#: Between two warnings about the same late confirm.
REPLY_CONFIRM_WARN_INTERVAL = 30.0
#: The longest a confirm is waited for (time the broker blocks the connection not counted): far beyond a quorum
#: queue's leader election or a broker's stall, far below RabbitMQ's ``consumer_timeout`` (30 min). Past it the reply
#: channel is presumed wedged (alive to heartbeats, serving nothing) and the session is replaced.
REPLY_CONFIRM_LIMIT = 300.0
#: While draining, a confirm is waited for at most this long (blocked time not counted) after the later of its
#: publish and the stop; the request is then left unacked, to return to the queue when the connection closes.
DRAIN_CONFIRM_WAIT = 10.0
#: A session that lasted this long resets the reconnect backoff.
STABLE_SESSION = 10.0
#: How long connecting and starting to consume may take.
OPEN_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0
#: The ``method`` label of requests for methods the service does not have (metric labels stay bounded).
UNKNOWN_METHOD_LABEL = "unknown"

Handler = Callable[..., Any]

_consumer_seq = itertools.count(1)


# --- methods ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    func: Handler
    signature: Optional[inspect.Signature]
    is_async: bool


def _method(name: str, func: Handler) -> Method:
    if not callable(func):
        raise TypeError(f"{func!r} is not callable")
    if not isinstance(name, str) or not name:
        raise ValueError("a method name is a non-empty string")
    try:
        signature: Optional[inspect.Signature] = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have none: their own TypeError is then a handler error
        signature = None
    target = func.func if isinstance(func, functools.partial) else func
    is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(target, "__call__", None))
    return Method(name, func, signature, is_async)


class Registry:
    """Methods by name, registered with :meth:`expose`."""

    def __init__(self, methods: Optional[Mapping[str, Handler]] = None) -> None:
        self.methods: Dict[str, Method] = {}
        for name, func in (methods or {}).items():
            self.add(func, name)

    def add(self, func: Handler, name: Optional[str] = None) -> Handler:
        """Registers ``func`` under ``name`` (default: its ``__name__``); a later registration of a name wins."""
        name = name or getattr(func, "__name__", None)
        if not name:
            raise ValueError(f"{func!r} has no __name__: give the method a name")
        self.methods[name] = _method(name, func)
        return func

    def expose(self, func: Union[Handler, str, None] = None, *, name: Optional[str] = None) -> Any:
        """Decorator: ``@expose``, ``@expose("name")`` or ``@expose(name="name")`` makes a function callable
        remotely. Returns the function unchanged."""
        if isinstance(func, str):
            name, func = func, None
        if func is None:
            return lambda f: self.add(f, name)
        return self.add(func, name)

    def __contains__(self, name: object) -> bool:
        return name in self.methods

    def __len__(self) -> int:
        return len(self.methods)

    def names(self) -> List[str]:
        return sorted(self.methods)


#: The methods of ``warren.expose``: served on whatever queue ``serve`` is given.
_default_registry = Registry()
#: The methods of ``warren.service(queue).expose``, by queue.
_registries: Dict[str, Registry] = {}
_registries_lock = threading.Lock()


def registry_for(queue: str) -> Registry:
    """The methods ``warren.service(queue).expose`` registered for ``queue``."""
    with _registries_lock:
        return _registries.setdefault(queue, Registry())


def expose(func: Union[Handler, str, None] = None, *, name: Optional[str] = None) -> Any:
    """Decorator that makes a function a method of the services this process serves:
    ``@warren.expose``, ``@warren.expose("name")`` or ``@warren.expose(name="name")``."""
    return _default_registry.expose(func, name=name)


def _resolve_methods(queue: str, methods: Any) -> Dict[str, Method]:
    if methods is None:  # warren.expose methods, overridden by warren.service(queue).expose ones
        resolved = dict(_default_registry.methods)
        resolved.update(registry_for(queue).methods)
        return resolved
    if isinstance(methods, Registry):
        return dict(methods.methods)
    if isinstance(methods, Mapping):
        return dict(Registry(methods).methods)
    registry = Registry()  # a list of functions
    for func in methods:
        registry.add(func)
    return dict(registry.methods)


# --- configuration ----------------------------------------------------------------------------------------------


def _env_bool(name: str) -> Union[bool, str, None]:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value == "auto":
        return "auto"
    raise ValueError(f"{name}={value!r}: expected true, false or auto")


def _parse_addr(addr: str) -> Tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class Stats:
    """What a responder counted (the same things warren-worker exports as metrics)."""

    def __init__(self) -> None:
        self.requests: Counter = Counter()  # (method label, outcome) -> count; outcome: ok or an error code
        self.expired = 0
        self.reply_failed = 0
        self.reply_confirms_late = 0
        self.reconnects = 0
        self.in_flight = 0
        self.consuming = False
        self.handler_seconds: Dict[str, List[float]] = {}  # method -> [count, sum]

    @property
    def handled(self) -> int:
        return sum(self.requests.values())

    def prometheus(self) -> str:
        """The counters in Prometheus text format, named like warren-worker's."""
        lines = ["# TYPE warren_worker_requests_total counter"]
        for (method, outcome), count in sorted(self.requests.items()):
            lines.append(f'warren_worker_requests_total{{method="{method}",outcome="{outcome}"}} {count}')
        lines.append("# TYPE warren_worker_handler_duration_seconds summary")
        for method, (count, total) in sorted(self.handler_seconds.items()):
            lines.append(f'warren_worker_handler_duration_seconds_count{{method="{method}"}} {int(count)}')
            lines.append(f'warren_worker_handler_duration_seconds_sum{{method="{method}"}} {total}')
        for name, kind, value in (
                ("requests_in_flight", "gauge", self.in_flight),
                ("requests_expired_total", "counter", self.expired),
                ("replies_failed_total", "counter", self.reply_failed),
                ("reply_confirms_late_total", "counter", self.reply_confirms_late),
                ("reconnects_total", "counter", self.reconnects),
                ("consuming", "gauge", int(self.consuming))):
            lines.append(f"# TYPE warren_worker_{name.replace('_total', '')} {kind}")
            lines.append(f"warren_worker_{name} {value}")
        return "\n".join(lines) + "\n"


class _ThreadPool:
    """Threads for plain ``def`` methods, started as needed up to ``size``. (Not concurrent.futures': it refuses
    work once the main thread has ended, and a program that ``start_server()``\ ed keeps serving after that.)"""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._jobs: "queue_module.SimpleQueue[Any]" = queue_module.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, func: Callable[[], Any]) -> "asyncio.Future[Any]":
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._idle == 0 and len(self._threads) < self.size:
                thread = threading.Thread(target=self._work, name=f"{self.name} {len(self._threads) + 1}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1
        self._jobs.put((loop, future, func))
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, future, func = job
            try:
                outcome, value = _set_result, func()
            except Exception as error:  # noqa: BLE001 - handed to the request's task
                outcome, value = _set_exception, error
            except BaseException as error:  # noqa: BLE001 - SystemExit & co. in a method: its error, not ours
                outcome, value = _set_exception, HandlerError(f"{type(error).__name__}: {error}")
            with self._lock:
                self._idle += 1
            try:
                loop.call_soon_threadsafe(outcome, future, value)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


def _set_result(future: "asyncio.Future[Any]", value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: "asyncio.Future[Any]", error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


# --- one request ------------------------------------------------------------------------------------------------


@dataclass
class _Request:
    method: Optional[str]
    reply_to: Optional[str]
    correlation_id: Optional[str]
    content_type: Optional[str]
    message_id: Optional[str]
    deadline_ms: Optional[int]
    trace: Optional[TraceContext]
    redelivered: bool

    @classmethod
    def read(cls, message: Any) -> "_Request":
        properties = message.header.properties
        headers = properties.headers
        return cls(
            method=properties.message_type or None,
            reply_to=properties.reply_to or None,
            correlation_id=properties.correlation_id,
            content_type=properties.content_type or None,
            message_id=properties.message_id,
            deadline_ms=header_int(headers, HEADER_DEADLINE),
            trace=trace_from_headers(headers),
            redelivered=bool(getattr(message.delivery, "redelivered", False)),
        )


Outcome = Tuple[str, Any]  # (STATUS_OK, result) or (STATUS_ERROR, error object)


def _error(code: str, message: str, details: Any = None) -> Outcome:
    return STATUS_ERROR, error_object(code, message, details)


def _split_params(params: Any) -> Tuple[list, dict]:
    """An array is positional params, an object named ones, null (or an empty body) none, anything else one."""
    if isinstance(params, list):
        return params, {}
    if isinstance(params, dict):
        return [], params
    if params is None:
        return [], {}
    return [params], {}


# --- the server -------------------------------------------------------------------------------------------------


class Server:
    """Serves one request queue: consume → run the method → reply (confirmed) → ack, across broker sessions.

    Every argument has a default from the environment a warren pod gets:

    - ``queue``: ``$WARREN_QUEUE``.
    - ``methods``: a :class:`Registry`, a mapping name → function, a list of functions, or None for the methods
      registered with ``warren.expose`` and ``warren.service(queue).expose``.
    - ``broker_uri``: ``$WARREN_BROKER_URI`` (comma-separated URIs: cluster nodes, tried in order).
    - ``prefetch``: ``$WARREN_PREFETCH``, else 32: requests held unacked, and so run, at once.
    - ``default_method``: ``$WARREN_DEFAULT_METHOD``: the method of requests that name none.
    - ``declare``: ``$WARREN_DECLARE``, else ``"auto"``. True: declare ``<queue>.dead`` and the queue (durable,
      ``queue_type``, dead-lettering into ``<queue>.dead``, ``delivery_limit``, ``max_length``, ``message_ttl``
      seconds) exactly as the operator and ``warren-worker --declare`` do, on every (re)connection. False: never
      declare (a queue the operator manages; a missing queue is waited for). ``"auto"``: declare only when the
      queue does not exist yet (checked with a passive declare), so a queue the operator declared is left as is.
    - ``threads``: the thread pool for plain ``def`` methods (default: ``prefetch``; 0 runs them on the loop).
    - ``health_addr``: ``$WARREN_METRICS_ADDR``: ``host:port`` for ``/healthz``, ``/readyz`` and ``/metrics``
      (off when unset; port 0 picks one, see :attr:`health_port`).
    - ``max_reply_bytes``: a larger reply is replaced by an ``internal`` error reply (the broker would refuse it).
    """

    def __init__(self, queue: Optional[str] = None, methods: Any = None, *, broker_uri: Any = None,
                 prefetch: Optional[int] = None, default_method: Optional[str] = None,
                 declare: Union[bool, str, None] = None, queue_type: str = "quorum",
                 delivery_limit: Optional[int] = 5, max_length: Optional[int] = None,
                 message_ttl: Optional[float] = None, threads: Optional[int] = None,
                 health_addr: Optional[str] = None, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
                 backoff: Optional[_amqp.Backoff] = None) -> None:
        queue = queue or os.environ.get("WARREN_QUEUE")
        if not queue:
            raise ValueError("no queue to serve: pass one or set WARREN_QUEUE")
        self.queue = queue
        self.methods = _resolve_methods(queue, methods)
        self._uris = _amqp.broker_uris(broker_uri)
        if prefetch is None:
            prefetch = int(os.environ.get("WARREN_PREFETCH") or DEFAULT_PREFETCH)
        if not 1 <= prefetch <= 65535:
            raise ValueError(f"prefetch must be 1..65535, not {prefetch}")
        self.prefetch = prefetch
        self.default_method = default_method or os.environ.get("WARREN_DEFAULT_METHOD") or None
        if declare is None:
            declare = _env_bool("WARREN_DECLARE")
        self.declare: Union[bool, str] = "auto" if declare is None else declare
        if self.declare not in (True, False, "auto"):
            raise ValueError(f"declare must be True, False or 'auto', not {declare!r}")
        self.queue_arguments = request_queue_arguments(
            queue, queue_type, delivery_limit, max_length,
            None if message_ttl is None else int(message_ttl * 1000))
        self.dead_letter_arguments = dead_letter_queue_arguments(queue_type)
        self.threads = prefetch if threads is None else threads
        self.health_addr = health_addr or os.environ.get("WARREN_METRICS_ADDR") or None
        #: The port the health endpoints listen on, once started.
        self.health_port: Optional[int] = None
        self.max_reply_bytes = max_reply_bytes
        self.backoff = backoff or _amqp.Backoff()
        self.stats = Stats()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._stop_requested = False
        self._executor: Optional[_ThreadPool] = None
        self._sessions = 0
        self._ready = threading.Event()
        self._last_error: Optional[str] = None

    # --- control ----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Asks the server to stop (from any thread or a signal handler): cancel the consumer, finish the requests
        in flight, reply, ack, close. :meth:`run` returns when done."""
        self._stop_requested = True
        loop, event = self._loop, self._stop
        if loop is None or event is None:
            return
        try:
            if _running_loop() is loop:
                event.set()
            else:
                loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop is closed: nothing left to stop
            pass

    @property
    def consuming(self) -> bool:
        return self.stats.consuming

    def wait_consuming(self, timeout: Optional[float] = None) -> bool:
        """Blocks (another thread) until the server has consumed at least once; False on timeout."""
        return self._ready.wait(timeout)

    @property
    def last_error(self) -> Optional[str]:
        """Why the last attempt to start consuming failed, if it did."""
        return self._last_error

    # --- the loop ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serves until :meth:`stop`; broker loss is retried with backoff forever. Raises QueueConflict if the
        queue exists with other arguments (no retry fixes that)."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        if self.threads > 0:
            self._executor = _ThreadPool(self.threads, f"warren {self.queue}")
        health = await self._start_health() if self.health_addr else None
        try:
            await self._sessions_loop()
        finally:
            self.stats.consuming = False
            if health is not None:
                health.close()
            if self._executor is not None:
                self._executor.shutdown()

    async def _sessions_loop(self) -> None:
        assert self._stop is not None
        attempt = 0
        while not self._stop.is_set():
            try:
                session = await _until_stopped(self._stop, asyncio.wait_for(self._open(), OPEN_TIMEOUT))
            except QueueConflict:
                raise
            except Exception as error:  # noqa: BLE001 - anything else is worth retrying
                self._last_error = f"{type(error).__name__}: {error}"
                delay = self.backoff.delay(attempt)
                attempt += 1
                log.warning("%s: could not start consuming (%s); retrying in %.2fs", self.queue, self._last_error,
                            delay)
                await _sleep_unless_stopped(self._stop, delay)
                continue
            if session is None:  # stopped while connecting
                return
            self._last_error = None
            self._sessions += 1
            if self._sessions > 1:
                self.stats.reconnects += 1
            started = time.monotonic()
            stopped = await session.serve()
            if stopped:
                if not await session.drain_and_close():
                    log.warning("%s: stopped; the session died while draining: the broker redelivers", self.queue)
                elif session.given_up:
                    log.warning("%s: stopped without the confirms of %d replies: the broker redelivers those "
                                "requests", self.queue, len(session.given_up))
                else:
                    log.info("%s: stopped; every received request was answered (this session: %d received, "
                             "%d acked)", self.queue, session.received, session.acked)
                return
            log.warning("%s: broker session lost (%s); unacked requests return to the queue", self.queue,
                        session.lost_reason)
            await session.abandon()
            if time.monotonic() - started >= STABLE_SESSION:
                attempt = 0
            delay = self.backoff.delay(attempt)
            attempt += 1
            await _sleep_unless_stopped(self._stop, delay)

    async def _open(self) -> "_Session":
        connection = await _amqp.connect(self._uris, f"warren-py responder {self.queue}")
        try:
            await self._declare(connection)
            consume_channel = await connection.channel(publisher_confirms=False)
            reply_channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            session = _Session(self, connection, consume_channel, await consume_channel.get_underlay_channel(),
                               reply_channel, await reply_channel.get_underlay_channel())
            await session.consume.basic_qos(prefetch_count=self.prefetch)
            try:
                await session.consume.basic_consume(self.queue, session.on_delivery,
                                                            consumer_tag=session.consumer_tag)
            except ChannelNotFoundEntity:
                raise WarrenError(f"the queue {self.queue!r} does not exist (declare=False: waiting for whoever "
                                  "declares it, e.g. the operator)") from None
            return session
        except BaseException:
            await _close(connection)
            raise

    async def _declare(self, connection: Any) -> None:
        if self.declare is False:
            return
        if self.declare == "auto":
            probe = await connection.channel(publisher_confirms=False)
            try:
                await probe.declare_queue(self.queue, passive=True)
                await probe.close()
                return  # exists: leave it as whoever declared it wants it
            except ChannelNotFoundEntity:
                pass  # the broker closed the probe channel
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(self.queue + DEAD_LETTER_SUFFIX, durable=True,
                                        arguments=self.dead_letter_arguments)
            await channel.declare_queue(self.queue, durable=True, arguments=self.queue_arguments)
        except ChannelPreconditionFailed as error:
            raise QueueConflict(f"the queue {self.queue!r} exists with other arguments than {self.queue_arguments}"
                                f" (declare=False leaves it as it is): {error}") from None
        await channel.close()

    async def _start_health(self) -> Any:
        host, port = _parse_addr(self.health_addr or "")
        server = await asyncio.start_server(self._health_request, host, port)
        self.health_port = server.sockets[0].getsockname()[1]
        log.info("%s: health endpoints on %s:%d", self.queue, host, self.health_port)
        return server

    async def _health_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) > 1 else "/"
            if path == "/healthz":
                status, body, kind = "200 OK", "ok\n", "text/plain"
            elif path == "/readyz":
                status = "200 OK" if self.stats.consuming else "503 Service Unavailable"
                body, kind = ("consuming\n" if self.stats.consuming else "not consuming\n"), "text/plain"
            elif path == "/metrics":
                status, body, kind = "200 OK", self.stats.prometheus(), "text/plain; version=0.0.4"
            else:
                status, body, kind = "404 Not Found", "not found\n", "text/plain"
            data = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\n"
                         "Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except Exception:  # noqa: BLE001 - a broken probe must not disturb serving
            pass
        finally:
            writer.close()

    # --- one request ------------------------------------------------------------------------------------------

    async def outcome(self, request: _Request, body: bytes) -> Tuple[str, Outcome]:
        """The method label and outcome of a request, in the order docs/protocol.md gives. Never raises."""
        if request.deadline_ms is not None and request.deadline_ms < now_ms():
            self.stats.expired += 1
            label = request.method if request.method in self.methods else UNKNOWN_METHOD_LABEL
            return label, _error(DEADLINE_EXCEEDED, "the caller's deadline passed before the request ran")
        name = request.method or self.default_method
        if name is None:
            return UNKNOWN_METHOD_LABEL, _error(
                UNKNOWN_METHOD,
                "the request names no method (AMQP `type` property) and this service has no default method")
        method = self.methods.get(name)
        if method is None:
            return UNKNOWN_METHOD_LABEL, _error(
                UNKNOWN_METHOD, f"unknown method {name!r}; this service serves {', '.join(sorted(self.methods))}")
        if not is_json(request.content_type):
            return name, _error(BAD_REQUEST, f"unsupported content_type {request.content_type!r}: this responder "
                                             f"speaks {CONTENT_TYPE_JSON}")
        try:
            params = loads(body)
        except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return name, _error(BAD_REQUEST, f"the body is not valid JSON: {error}")
        args, kwargs = _split_params(params)
        if method.signature is not None:
            try:
                method.signature.bind(*args, **kwargs)
            except TypeError as error:
                return name, _error(BAD_REQUEST, f"the params do not fit {name}{method.signature}: {error}")
        started = time.perf_counter()
        try:
            result = await self._run(method, request, args, kwargs)
            outcome: Outcome = (STATUS_OK, result)
        except HandlerError as error:
            outcome = _error(error.code, error.message, error.details)
        except Exception as error:  # noqa: BLE001 - any failure of the method is the method's error
            log.debug("%s: %s raised", self.queue, name, exc_info=True)
            outcome = _error(HANDLER_ERROR, f"{type(error).__name__}: {error}")
        timing = self.stats.handler_seconds.setdefault(name, [0, 0.0])
        timing[0] += 1
        timing[1] += time.perf_counter() - started
        return name, outcome

    async def _run(self, method: Method, request: _Request, args: list, kwargs: dict) -> Any:
        _current_call.set(CallInfo(
            method=method.name, queue=self.queue, message_id=request.message_id,
            correlation_id=request.correlation_id, redelivered=request.redelivered,
            deadline=None if request.deadline_ms is None else request.deadline_ms / 1000,
            reply_expected=request.reply_to is not None, trace=request.trace))
        _current_trace.set(request.trace)  # calls made by the method carry the trace on
        if method.is_async:
            result = await method.func(*args, **kwargs)
        elif self._executor is not None:
            context = contextvars.copy_context()
            result = await self._executor.run(functools.partial(context.run, method.func, *args, **kwargs))
        else:
            result = method.func(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    def encode_reply(self, request: _Request, outcome: Outcome) -> Tuple[bytes, Any]:
        """The reply's body and properties; a reply that cannot be encoded (not JSON-serialisable, NaN, too
        large) becomes an ``internal`` error reply."""
        status, value = outcome
        try:
            body = dumps(value)
            if len(body) > self.max_reply_bytes:
                raise ValueError(f"the reply has {len(body)} bytes, more than the {self.max_reply_bytes} the "
                                 "broker takes")
        except (TypeError, ValueError, OverflowError) as error:
            status = STATUS_ERROR
            body = dumps(error_object(INTERNAL, f"could not encode the reply: {error}"))
        headers: Dict[str, Any] = {HEADER_STATUS: status}
        headers.update(trace_headers(request.trace))
        # Echo the request's content type when it is a JSON one (it may carry a charset).
        content_type = request.content_type if request.content_type and is_json(request.content_type) \
            else CONTENT_TYPE_JSON
        properties = Basic.Properties(content_type=content_type, correlation_id=request.correlation_id,
                                      headers=headers)
        return body, properties


@dataclass
class _AwaitedConfirm:
    """A reply whose publisher confirm is awaited."""
    request: _Request
    published: float  # the session's unblocked clock at the publish
    started: float  # time.monotonic() at the publish
    next_warning: float  # time.monotonic() of the next warning (the first: REPLY_CONFIRM_LATE after the publish)
    late: bool = False


def _blocked(connection: Any) -> bool:
    """Whether the broker blocks the (aiormq) connection for a memory or disk alarm. aiormq tracks it in a private
    event only; without it (another aiormq version), never."""
    unblocked = getattr(connection, "_Connection__connection_unblocked", None)
    return unblocked is not None and not unblocked.is_set()


class _Session:
    """One connection: the consuming channel, the reply channel (confirm mode), and the requests in flight."""

    def __init__(self, server: Server, connection: Any, consume_channel: Any, consume: Any, reply_channel: Any,
                 reply: Any) -> None:
        self.server = server
        self.connection = connection
        self.consume_channel = consume_channel
        self.consume = consume  # the aiormq channels under aio-pika's
        self.reply = reply
        self.consumer_tag = f"warren-py-{os.getpid()}-{next(_consumer_seq)}"
        self.in_flight: set = set()
        self.received = 0
        self.acked = 0
        self.broken = asyncio.Event()
        self.lost_reason = ""
        self.cancelling = False
        #: The replies whose confirms are awaited, by the task of their request.
        self.awaiting: Dict[Any, _AwaitedConfirm] = {}
        #: The tasks of the requests the drain stopped waiting for (their confirms did not come in time).
        self.given_up: set = set()
        #: The unblocked clock when the drain began.
        self.drain_began: Optional[float] = None
        self._unblocked = 0.0
        self._clock_read = time.monotonic()
        for closable in (connection, consume_channel, reply_channel):
            closable.close_callbacks.add(self._closed)

    def _closed(self, sender: Any, exc: Any = None) -> None:
        self.lose(f"{type(sender).__name__} closed: {exc!r}")

    def lose(self, reason: str) -> None:
        """Ends the session: it is closed and replaced, and its unacked requests return to the queue."""
        if not self.broken.is_set():
            self.lost_reason = reason
            self.broken.set()

    def unblocked_clock(self) -> float:
        """Seconds of this session the broker did not block its connection (a memory or disk alarm holds replies
        back, it does not lose them: that time counts towards no bound). The time since the last reading counts as
        unblocked when the connection is not blocked now."""
        now = time.monotonic()
        if not _blocked(self.reply.connection):
            self._unblocked += now - self._clock_read
        self._clock_read = now
        return self._unblocked

    def check_confirms(self) -> None:
        """Looks at the awaited confirms (every second). A reply's confirm is waited for as long as the reply channel
        and the connection live: a channel or connection that closes fails it at once, and aiormq closes a
        connection whose heartbeats stop. Timing out instead would requeue a request whose reply the broker may
        still confirm and deliver (a quorum reply queue electing a leader, a stalled broker): it would run twice.
        A confirm later than REPLY_CONFIRM_LATE is counted and logged, then every REPLY_CONFIRM_WARN_INTERVAL. The
        bounds: past REPLY_CONFIRM_LIMIT the session is replaced (never the request nacked); while draining, past
        DRAIN_CONFIRM_WAIT the drain stops waiting for the request, left unacked to return to the queue."""
        if not self.awaiting:
            return
        clock, now, queue = self.unblocked_clock(), time.monotonic(), self.server.queue
        for task, awaited in self.awaiting.items():
            if task in self.given_up:
                continue
            request = awaited.request
            if self.drain_began is not None:
                if clock - max(awaited.published, self.drain_began) >= DRAIN_CONFIRM_WAIT:
                    self.given_up.add(task)
                    log.warning("%s: stopping without the confirm of the reply to %s (correlation_id %s, after "
                                "%.0fs): the request returns to the queue when the connection closes, and runs again "
                                "if the reply was lost", queue, request.reply_to, request.correlation_id,
                                now - awaited.started)
                    continue
            elif clock - awaited.published >= REPLY_CONFIRM_LIMIT:
                log.warning("%s: no confirm for the reply to %s (correlation_id %s) in %.0fs while the connection "
                            "lived: the reply channel is presumed wedged; replacing the session (its unacked "
                            "requests return to the queue)", queue, request.reply_to, request.correlation_id,
                            now - awaited.started)
                self.lose("a reply's confirm never came")
                return
            if now >= awaited.next_warning:
                if not awaited.late:
                    awaited.late = True
                    self.server.stats.reply_confirms_late += 1
                awaited.next_warning = now + REPLY_CONFIRM_WARN_INTERVAL
                log.log(logging.DEBUG if _blocked(self.reply.connection) else logging.WARNING,
                        "%s: the broker has not confirmed the reply to %s (correlation_id %s) yet, after %.0fs; still "
                        "waiting (timing out could run the request twice)", queue, request.reply_to,
                        request.correlation_id, now - awaited.started)

    async def on_delivery(self, message: Any) -> None:
        # aiormq runs each delivery in a task of its own: that task is the request's, tracked for the drain. (The
        # channel cancels it only when it closes, and then the request returns to the queue anyway.)
        self.received += 1
        task = asyncio.current_task()
        self.in_flight.add(task)
        try:
            await self.handle(message)
        finally:
            self.in_flight.discard(task)

    async def serve(self) -> bool:
        """Waits until stop is asked (True: the consumer is cancelled) or the session died (False)."""
        server = self.server
        assert server._stop is not None
        server.stats.consuming = True
        server._ready.set()
        log.info("%s: consuming (prefetch %d, methods: %s)", server.queue, server.prefetch,
                 ", ".join(sorted(server.methods)) or "none")
        stop = asyncio.ensure_future(server._stop.wait())
        broken = asyncio.ensure_future(self.broken.wait())
        try:
            while True:
                done, _ = await asyncio.wait({stop, broken}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if broken in done:
                    return False
                if stop in done:
                    self.drain_began = self.unblocked_clock()
                    break
                self.check_confirms()
                if self.consumer_tag not in self.consume.consumers:  # the broker cancelled it (queue deleted)
                    self.lost_reason = "the broker cancelled the consumer (queue deleted?)"
                    return False
        finally:
            server.stats.consuming = False
            stop.cancel()
            broken.cancel()
        log.info("%s: shutting down: cancelling the consumer, finishing %d requests in flight", server.queue,
                 len(self.in_flight))
        self.cancelling = True
        try:
            # Deliveries already sent still arrive before the cancel-ok, and are handled.
            await asyncio.wait_for(self.consume.basic_cancel(self.consumer_tag), CLOSE_TIMEOUT)
        except Exception as error:  # noqa: BLE001
            log.warning("%s: could not cancel the consumer: %r", server.queue, error)
        return True

    async def drain_and_close(self) -> bool:
        """Waits for every request received to be answered and acked, or given up on (check_confirms), then closes
        the connection; False if the session died meanwhile."""
        while True:
            self.check_confirms()
            waiting = self.in_flight - self.given_up
            if not waiting:
                break
            await asyncio.wait(waiting, timeout=1.0)
        alive = not self.broken.is_set()
        if alive:
            # Acks are queued without waiting for the socket: closing their channel (channel.close, then the
            # broker's close-ok, in order after them) makes sure the broker has every one before the connection
            # goes.
            try:
                await asyncio.wait_for(self.consume_channel.close(), CLOSE_TIMEOUT)
            except Exception as error:  # noqa: BLE001
                log.warning("%s: closing the consuming channel failed: %r", self.server.queue, error)
                alive = False
        await _close(self.connection)
        return alive

    async def abandon(self) -> None:
        await _close(self.connection)

    async def handle(self, message: Any) -> None:
        """Method → reply (confirmed) → ack, for one delivery. Never raises."""
        server = self.server
        stats = server.stats
        stats.in_flight += 1
        try:
            delivery_tag = message.delivery.delivery_tag
            try:
                request = _Request.read(message)
            except Exception as error:  # noqa: BLE001 - unreadable properties: answer nothing, ack
                log.warning("%s: unreadable request properties (%r): acked without a reply", server.queue, error)
                stats.requests[(UNKNOWN_METHOD_LABEL, BAD_REQUEST)] += 1
                await self._ack(delivery_tag)
                return
            label, outcome = await server.outcome(request, message.body)
            stats.requests[(label, outcome[0] == STATUS_OK and "ok" or outcome[1]["code"])] += 1
            if request.reply_to is None:
                if outcome[0] == STATUS_ERROR:
                    log.info("%s: one-way %s failed: %s", server.queue, label, outcome[1])
            else:
                body, properties = server.encode_reply(request, outcome)
                if not await self._publish_reply(request, body, properties, delivery_tag):
                    return
            await self._ack(delivery_tag)
        except Exception:  # noqa: BLE001 - one bad message never ends the loop
            log.exception("%s: unexpected failure handling a request; the broker redelivers it", server.queue)
        finally:
            stats.in_flight -= 1

    async def _publish_reply(self, request: _Request, body: bytes, properties: Any, delivery_tag: int) -> bool:
        """Publishes the reply and waits for its confirm, however late (see check_confirms). False without one: the
        request was then nacked (the broker refused the reply), or is left to its session."""
        server = self.server
        task, now = asyncio.current_task(), time.monotonic()
        awaited = self.awaiting[task] = _AwaitedConfirm(request, self.unblocked_clock(), now, now + REPLY_CONFIRM_LATE)
        try:
            await self.reply.basic_publish(body, routing_key=request.reply_to, properties=properties, wait=False)
            if awaited.late:
                log.info("%s: the late confirm of the reply to %s (correlation_id %s) came after %.1fs", server.queue,
                         request.reply_to, request.correlation_id, time.monotonic() - awaited.started)
            return True
        except DeliveryError:
            error: Any = "the broker nacked the reply"
        except Exception as failure:  # noqa: BLE001
            error = failure
        finally:
            del self.awaiting[task]
        server.stats.reply_failed += 1
        if self.broken.is_set():
            log.debug("%s: reply lost with its session (%r); the broker redelivers the request", server.queue,
                      error)
        else:
            log.warning("%s: the reply was not published (%r); requeueing the request", server.queue, error)
            try:
                await asyncio.wait_for(self.consume.basic_nack(delivery_tag, requeue=True), SETTLE_TIMEOUT)
            except Exception:  # noqa: BLE001
                pass
        return False

    async def _ack(self, delivery_tag: int) -> None:
        try:
            # Queued for the connection's writer, in order after the reply whose confirm we had.
            await self.consume.basic_ack(delivery_tag, wait=False)
            self.acked += 1
        except Exception as error:  # noqa: BLE001 - the session died: the broker redelivers
            log.debug("%s: ack failed (%r); the broker redelivers the request", self.server.queue, error)


async def _close(connection: Any) -> None:
    try:
        await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)
    except Exception:  # noqa: BLE001 - closing a dead connection
        pass


async def _until_stopped(stop: asyncio.Event, awaitable: Any) -> Any:
    """The awaitable's result, or None if ``stop`` is set first (the awaitable is then cancelled)."""
    task = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        result = await task  # a session that opened anyway must be closed
        if result is not None:
            await result.abandon()
    except BaseException:  # noqa: BLE001
        pass
    return None


async def _sleep_unless_stopped(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except asyncio.TimeoutError:
        pass


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# --- entry points -----------------------------------------------------------------------------------------------


def serve(queue: Optional[str] = None, methods: Any = None, **options: Any) -> None:
    """Serves ``queue`` (default ``$WARREN_QUEUE``) in this thread until SIGTERM or SIGINT (when called from the
    main thread), then drains: cancel the consumer, finish, reply to and ack every request received, close.
    Options: see :class:`Server`."""
    server = Server(queue, methods, **options)
    asyncio.run(_serve_with_signals(server))


async def _serve_with_signals(server: Server) -> None:
    loop = asyncio.get_running_loop()
    installed = []
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int) -> None:
            log.info("%s: %s: draining", server.queue, signal.Signals(signum).name)
            server.stop()
            for sig in installed:  # a second signal acts as usual (terminates)
                loop.remove_signal_handler(sig)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not on this platform
                pass
    try:
        await server.run()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


class ServerThread:
    """A :class:`Server` running in a thread of its own (see :func:`start_server`)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=f"warren-server {server.queue}", daemon=False)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.run())
        except BaseException as error:  # noqa: BLE001 - reported by start_server / join
            self.error = error
            log.error("%s: the server stopped: %r", self.server.queue, error)
        finally:
            with _threads_lock:
                if self in _running_threads:
                    _running_threads.remove(self)

    def start(self) -> "ServerThread":
        with _threads_lock:
            _running_threads.append(self)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def stats(self) -> Stats:
        return self.server.stats

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Drains and stops the server; waits up to ``timeout`` (None: until done). True when it has stopped."""
        self.server.stop()
        return self.join(timeout)

    def join(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        with _threads_lock:
            idle = not _running_threads
        if idle and threading.current_thread() is threading.main_thread():
            _restore_signal_handlers()  # no server left to drain: signals act as before
        return True

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerThread({self.server.queue!r}, running={self.running})"


_running_threads: List[ServerThread] = []
_threads_lock = threading.Lock()
_signals_installed = False


def start_server(queue: Optional[str] = None, methods: Any = None, *, wait: Optional[float] = 30.0,
                 handle_signals: Optional[bool] = None, **options: Any) -> ServerThread:
    """Starts serving ``queue`` (default ``$WARREN_QUEUE``) in a background thread and returns once it consumes
    (``wait`` seconds at most; None: do not wait). The thread is not a daemon: a program whose main code ends keeps
    serving until it is stopped (``.stop()``, ``with start_server(...):``, SIGTERM or SIGINT).

    ``handle_signals`` (default: when called from the main thread and SIGTERM has its default action): on SIGTERM
    or SIGINT, drain every server started this way, then exit (``SystemExit(0)`` in the main thread if it is still
    running). Options: see :class:`Server`.
    """
    server = Server(queue, methods, **options)
    thread = ServerThread(server).start()
    if handle_signals is None:
        handle_signals = (threading.current_thread() is threading.main_thread()
                          and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _on_stop_signal))
    if handle_signals:
        _install_signal_handlers()
    if wait is not None:
        deadline = time.monotonic() + wait
        while not server.wait_consuming(0.05):
            if not thread.running:
                raise thread.error if thread.error is not None else WarrenError("the server stopped")
            if time.monotonic() > deadline:
                thread.stop(CLOSE_TIMEOUT)
                raise WarrenError(f"the server of {server.queue!r} did not start consuming within {wait:g}s"
                                  + (f": {server.last_error}" if server.last_error else ""))
    return thread


_previous_handlers: Dict[int, Any] = {}


def _install_signal_handlers() -> None:
    global _signals_installed
    if _signals_installed:
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        _previous_handlers[sig] = signal.getsignal(sig)
        signal.signal(sig, _on_stop_signal)
    _signals_installed = True


def _restore_signal_handlers() -> None:
    global _signals_installed
    if not _signals_installed:
        return
    for sig, handler in _previous_handlers.items():
        if signal.getsignal(sig) is _on_stop_signal:
            signal.signal(sig, handler)
    _signals_installed = False


def _on_stop_signal(signum: int, frame: Any) -> None:
    _restore_signal_handlers()  # a second signal acts as before
    log.info("%s: draining every server", signal.Signals(signum).name)
    with _threads_lock:
        threads = list(_running_threads)
    for thread in threads:
        thread.server.stop()
    for thread in threads:
        thread.join()
    if threading.main_thread().is_alive():  # the main code still runs: end it as the signal would have
        raise SystemExit(0)
