"""The blocking caller: :class:`Client`, and the module-level :func:`call` / :func:`notify` on a default client.

A :class:`Client` runs an :class:`~warren.AsyncClient` on an event loop in a background thread, so one protocol
implementation serves both APIs, and a ``Client`` may be shared by any number of threads: their calls are
multiplexed over its one connection.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import threading
from typing import Any, Optional

from .aio import DEFAULT, DEFAULT_TIMEOUT, AsyncClient
from .context import current_trace
from .protocol import TraceContext, encode_params

__all__ = ["Client", "default_client", "set_default_client", "call", "notify", "Service", "service"]


class Client:
    """Calls warren services from blocking code; thread-safe, one connection (opened on first use).

    ``broker_uri``: an AMQP URI, several comma-separated ones (cluster nodes), or None for ``$WARREN_BROKER_URI``
    (else ``amqp://guest:guest@127.0.0.1:5672/%2f``). ``timeout``: the default per-call timeout in seconds.
    """

    def __init__(self, broker_uri: Any = None, *, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 name: str = "warren-py caller") -> None:
        self._client = AsyncClient(broker_uri, timeout=timeout, name=name)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="warren-client", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def aio(self) -> AsyncClient:
        """The asyncio client underneath (use it only from this client's loop)."""
        return self._client

    @property
    def timeout(self) -> Optional[float]:
        return self._client.timeout

    @property
    def unmatched_replies(self) -> int:
        return self._client.unmatched_replies

    def _run(self, coroutine: Any) -> Any:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a blocking warren call from inside the client's own event loop would deadlock")
        if self._closed:
            coroutine.close()
            from .errors import ConnectionLost
            raise ConnectionLost("the client was closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except (KeyboardInterrupt, concurrent.futures.CancelledError):
            future.cancel()
            raise

    def connect(self) -> "Client":
        """Opens the connection now (calls open it when needed); raises ConnectionLost on failure."""
        self._run(self._client.connect())
        return self

    def call(self, service: str, method: Optional[str], /, *args: Any, timeout: Any = DEFAULT,
             **kwargs: Any) -> Any:
        """Calls ``method`` of ``service`` (its request queue) with positional or named params and returns the
        result. ``method=None`` calls the default method. ``timeout`` in seconds (None: wait forever).

        Raises RemoteError, NoSuchService, Rejected, Timeout, ConnectionLost or MalformedReply.
        """
        return self.request(service, method, encode_params(args, kwargs), timeout=timeout)

    def request(self, service: str, method: Optional[str], params: Any = None, *, timeout: Any = DEFAULT,
                trace: Optional[TraceContext] = None) -> Any:
        """:meth:`call` with the params as one JSON value and an explicit trace context."""
        trace = trace if trace is not None else current_trace()  # read in the caller's thread
        return self._run(self._client.request(service, method, params, timeout=timeout, trace=trace))

    def notify(self, service: str, method: Optional[str], /, *args: Any, ttl: Optional[float] = None,
               **kwargs: Any) -> None:
        """A one-way call: returns once the broker has taken the request (no reply, not even for errors)."""
        params = encode_params(args, kwargs)
        self._run(self._client.notify_request(service, method, params, ttl=ttl, trace=current_trace()))

    def service(self, name: str, *, timeout: Any = DEFAULT) -> "Service":
        """A proxy that makes ``name``'s methods look local: ``client.service("calc").add(1, 2)``."""
        return Service(name, client=self, timeout=timeout)

    def close(self) -> None:
        """Closes the connection and stops the client's thread."""
        if self._closed or not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(10)
        except Exception:  # noqa: BLE001
            pass
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_default: Optional[Client] = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client behind :func:`call`, :func:`notify` and :func:`service`, created on first use from
    ``$WARREN_BROKER_URI``."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Client()
        return _default


def set_default_client(client: Optional[Client]) -> None:
    """Replaces the default client (e.g. one with another broker or timeout); None: make a new one on next use."""
    global _default
    with _default_lock:
        _default = client


@atexit.register
def _close_default() -> None:
    client = _default
    if client is not None:
        client.close()


def call(service: str, method: Optional[str], /, *args: Any, timeout: Any = DEFAULT, **kwargs: Any) -> Any:
    """Calls ``method`` of ``service`` with the default client: ``warren.call("calculator", "add", 1, 2)``."""
    return default_client().call(service, method, *args, timeout=timeout, **kwargs)


def notify(service: str, method: Optional[str], /, *args: Any, ttl: Optional[float] = None, **kwargs: Any) -> None:
    """A one-way call of ``method`` of ``service`` with the default client."""
    default_client().notify(service, method, *args, ttl=ttl, **kwargs)


class Service:
    """A warren service, seen from either side.

    As a caller: ``calc = warren.service("calculator"); calc.add(1, 2)`` calls ``add``; so does
    ``calc.call("add", 1, 2)``. As a responder: ``@calc.expose`` registers a method, ``calc.serve()`` or
    ``calc.start_server()`` answers the service's queue with them (and with ``warren.expose``'d ones).

    ``name`` is the service's request queue (for an RpcService ``calculator`` in namespace ``default``:
    ``default.calculator``). The attributes of this class (``call``, ``notify``, ``expose``, ``serve``,
    ``start_server``, ``name``, ``timeout``, ``client``) and names starting with ``_`` are not proxied: call such
    methods with ``service.call("name", ...)``.
    """

    def __init__(self, name: str, *, client: Optional[Client] = None, timeout: Any = DEFAULT) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a service name (its request queue) is a non-empty string")
        self.name = name
        self.timeout = timeout
        self._client = client

    @property
    def client(self) -> Client:
        return self._client if self._client is not None else default_client()

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        return functools.partial(self.call, method)

    def call(self, method: Optional[str], /, *args: Any, timeout: Any = DEFAULT, **kwargs: Any) -> Any:
        """Calls ``method`` (None: the default method) with positional or named params."""
        return self.client.call(self.name, method, *args,
                                timeout=self.timeout if timeout is DEFAULT else timeout, **kwargs)

    def notify(self, method: Optional[str], /, *args: Any, ttl: Optional[float] = None, **kwargs: Any) -> None:
        """A one-way call of ``method``."""
        self.client.notify(self.name, method, *args, ttl=ttl, **kwargs)

    def expose(self, func: Any = None, *, name: Optional[str] = None) -> Any:
        """Decorator: ``@service.expose`` / ``@service.expose("name")`` makes a function a method of this
        service."""
        from .responder import registry_for
        return registry_for(self.name).expose(func, name=name)

    def serve(self, **options: Any) -> None:
        """Answers this service's queue until SIGTERM / SIGINT (see :func:`warren.serve`)."""
        from .responder import serve
        serve(self.name, **options)

    def start_server(self, **options: Any) -> Any:
        """Answers this service's queue in a background thread (see :func:`warren.start_server`)."""
        from .responder import start_server
        return start_server(self.name, **options)

    def __repr__(self) -> str:
        return f"Service({self.name!r})"


def service(name: str, *, client: Optional[Client] = None, timeout: Any = DEFAULT) -> Service:
    """The service whose request queue is ``name``: a proxy for calling it, and a place to ``expose`` its
    methods and ``start_server``."""
    return Service(name, client=client, timeout=timeout)
