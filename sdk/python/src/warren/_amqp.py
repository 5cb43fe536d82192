"""Connection helpers shared by the caller and the responder (aio-pika for connections and channels; the hot path
uses the aiormq channel underneath, which aio-pika hands out with ``Channel.get_underlay_channel()``)."""

from __future__ import annotations

import logging
import os
import random
from typing import Any, List, Optional, Sequence, Union

import aio_pika
from yarl import URL

from .protocol import split_uris

log = logging.getLogger("warren")

DEFAULT_BROKER_URI = "amqp://guest:guest@127.0.0.1:5672/%2f"
CONNECT_TIMEOUT = 30.0

BrokerUri = Union[str, Sequence[str]]


def broker_uris(broker_uri: Optional[BrokerUri] = None) -> List[str]:
    """The broker addresses to try: ``broker_uri``, else ``$WARREN_BROKER_URI``, else the local default (as the
    ``warren`` CLI). Several comma-separated URIs name the nodes of one cluster, tried in order."""
    if broker_uri is None:
        broker_uri = os.environ.get("WARREN_BROKER_URI") or DEFAULT_BROKER_URI
    return split_uris(broker_uri)


def redact(uri: str) -> str:
    """A URI without its password, for logs and errors."""
    try:
        scheme, rest = uri.split("://", 1)
        if "@" in rest:
            userinfo, host = rest.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}"
    except ValueError:
        pass
    return uri


async def connect(uris: List[str], name: str, timeout: float = CONNECT_TIMEOUT) -> Any:
    """The first broker of ``uris`` that accepts a connection (each tried once, in order)."""
    errors = []
    for uri in uris:
        try:
            url = URL(uri)
            if "name" not in url.query:  # the connection's name in the management UI (aiormq reads `name`)
                url = url.update_query(name=name)
            return await aio_pika.connect(url, timeout=timeout)
        except Exception as error:  # noqa: BLE001 - every failure means: try the next node
            errors.append(f"{redact(uri)}: {type(error).__name__}: {error}")
    raise ConnectionError("could not connect to the broker: " + "; ".join(errors))


class Backoff:
    """Capped exponential reconnect delays with "equal jitter" (between half and all of min(max, initial·2^n)),
    as warren-worker's, so a fleet of responders does not reconnect in lockstep after a broker restart."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum

    def delay(self, attempt: int, jitter: Optional[float] = None) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** min(attempt, 31)))
        jitter = random.random() if jitter is None else min(1.0, max(0.0, jitter))
        return ceiling / 2 + ceiling / 2 * jitter
