"""warren: call warren RPC services over RabbitMQ, and answer calls as one (docs/protocol.md).

Caller::

    import warren
    warren.call("default.calculator", "add", 1, 2)             # 3
    calc = warren.service("default.calculator")
    calc.add(1, 2)                                              # 3
    calc.add(a=1, b=2, timeout=2.0)                             # named params, a 2 s timeout

Responder::

    rpc = warren.service("default.calculator")

    @rpc.expose
    def add(a, b):
        return a + b

    rpc.serve()             # blocks until SIGTERM / SIGINT, then drains; or rpc.start_server() in a thread

asyncio: :class:`AsyncClient`. The broker is ``$WARREN_BROKER_URI`` unless given.
"""

from .aio import DEFAULT_TIMEOUT, AsyncClient, AsyncService
from .client import Client, Service, call, default_client, notify, service, set_default_client
from .context import CallInfo, current_call, current_trace, trace
from .errors import (
    BadRequest,
    ConnectionLost,
    HandlerError,
    MalformedReply,
    NoSuchService,
    QueueConflict,
    Rejected,
    RemoteError,
    Timeout,
    WarrenError,
)
from .protocol import TraceContext
from .responder import Registry, Server, ServerThread, Stats, expose, serve, start_server

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncService",
    "BadRequest",
    "CallInfo",
    "Client",
    "ConnectionLost",
    "DEFAULT_TIMEOUT",
    "HandlerError",
    "MalformedReply",
    "NoSuchService",
    "QueueConflict",
    "Registry",
    "Rejected",
    "RemoteError",
    "Server",
    "ServerThread",
    "Service",
    "Stats",
    "Timeout",
    "TraceContext",
    "WarrenError",
    "call",
    "current_call",
    "current_trace",
    "default_client",
    "expose",
    "notify",
    "serve",
    "service",
    "set_default_client",
    "start_server",
    "trace",
]
