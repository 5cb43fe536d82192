"""A calculator answered by the Python SDK: the responder of the example image (sdk/python/Dockerfile).

    cd sdk/python/examples && WARREN_QUEUE=default.calculator python -m warren serve calculator

In an RpcService, ``spec.worker.handler.container`` names the image and the operator sets ``WARREN_QUEUE``,
``WARREN_BROKER_URI`` and the rest (docs/protocol.md, "A responder run by the operator").
"""

import asyncio
import socket

import warren


@warren.expose
def add(a, b):
    """The seed's example: ``add(1, 2)`` → 3."""
    return a + b


@warren.expose
def divide(a, b):
    if b == 0:
        raise warren.HandlerError("division by zero", details={"a": a})
    return a / b


@warren.expose
async def sleep(ms=100):
    """Answers after ``ms`` milliseconds, as warren-worker's built-in ``sleep`` does (load tests)."""
    await asyncio.sleep(ms / 1000)
    return {"slept_ms": ms}


@warren.expose
def hostname():
    """Which responder answered: in a pod, the pod's name."""
    return socket.gethostname()
