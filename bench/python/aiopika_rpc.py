"""aio-pika's RPC pattern (aio_pika.patterns.RPC, pickle, or JsonRPC) as a peer of scripts/bench-rpc.

  server METHOD quorum|classic PREFETCH rpc|json       registers `echo` under METHOD (the pattern's queue name);
                                                       until SIGTERM
  client METHOD DURATION_S WARMUP_S CONCURRENCY rpc|json  N concurrent callers on one connection, each calling
                                                       again as soon as its reply arrived; prints one JSON object

As aio-pika's documentation shows it: a robust connection, a channel with publisher confirms (aio-pika's default),
`RPC.create(channel)`, `rpc.register(...)` and `rpc.proxy.METHOD(...)`.
"""

import asyncio
import os
import signal
import sys
import time

import aio_pika
from aio_pika.patterns import RPC, JsonRPC

from closed_loop import Measure

BROKER_URI = os.environ.get("WARREN_BROKER_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")
PATTERNS = {"rpc": RPC, "json": JsonRPC}


async def echo(*, args):
    return args


async def server(method, queue_type, prefetch, pattern):
    connection = await aio_pika.connect_robust(BROKER_URI)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=int(prefetch))
    rpc = await PATTERNS[pattern].create(channel)
    if queue_type == "quorum":
        await rpc.register(method, echo, durable=True, arguments={"x-queue-type": "quorum"})
    else:
        await rpc.register(method, echo, auto_delete=True)
    print(f"consuming {method}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await connection.close()


async def client(method, duration_s, warmup_s, concurrency, pattern):
    connection = await aio_pika.connect_robust(BROKER_URI)
    channel = await connection.channel()
    rpc = await PATTERNS[pattern].create(channel)
    measure = Measure(float(duration_s), float(warmup_s), int(concurrency))
    call = getattr(rpc.proxy, method)

    async def caller():
        while not measure.done():
            sent = time.perf_counter()
            try:
                measure.record(sent, await asyncio.wait_for(call(args=[1, 2]), 5))
            except Exception as error:
                measure.record(sent, error=error)

    await asyncio.gather(*(caller() for _ in range(int(concurrency))))
    print(measure.json(), flush=True)
    await connection.close()


if __name__ == "__main__":
    asyncio.run({"server": server, "client": client}[sys.argv[1]](*sys.argv[2:]))
