"""Nameko RPC as a peer of scripts/bench-rpc (Nameko 2.14 on eventlet).

  server SERVICE MAX_WORKERS              a Nameko service SERVICE with an `echo` @rpc method, run by a
                                          ServiceRunner (queue `rpc-SERVICE`, declared by Nameko); until SIGTERM
  client SERVICE DURATION_S WARMUP_S N    a standalone ClusterRpcProxy keeping N calls in flight with call_async;
                                          prints one JSON object

Nameko declares its own queues (a durable classic `rpc-SERVICE` bound to the `nameko-rpc` topic exchange) and
offers no setting for the queue type. The standalone proxy reads replies from one connection in the calling
green thread, so its calls are pipelined rather than concurrent: it keeps N `call_async` replies outstanding and
collects the oldest one first (its latency runs until it is collected).
"""

import eventlet

eventlet.monkey_patch()

import collections  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from nameko.rpc import rpc  # noqa: E402
from nameko.runners import ServiceRunner  # noqa: E402
from nameko.standalone.rpc import ClusterRpcProxy  # noqa: E402

from closed_loop import Measure  # noqa: E402

BROKER_URI = os.environ.get("WARREN_BROKER_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")


class Echo:
    name = "echo"  # replaced by the SERVICE argument

    @rpc
    def echo(self, *args):
        return list(args)


def server(service, max_workers):
    Echo.name = service
    runner = ServiceRunner({"AMQP_URI": BROKER_URI, "max_workers": int(max_workers)})
    runner.add_service(Echo)
    runner.start()
    print(f"consuming rpc-{service}", file=sys.stderr, flush=True)
    stopped = eventlet.event.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.send(True) if not stopped.ready() else None)
    stopped.wait()
    runner.stop()


def client(service, duration_s, warmup_s, concurrency):
    concurrency = int(concurrency)
    with ClusterRpcProxy({"AMQP_URI": BROKER_URI}, timeout=5) as cluster:
        echo = getattr(cluster, service).echo
        measure = Measure(float(duration_s), float(warmup_s), concurrency)  # the clock starts once connected
        outstanding = collections.deque()
        while outstanding or not measure.done():
            while len(outstanding) < concurrency and not measure.done():
                outstanding.append((time.perf_counter(), echo.call_async(1, 2)))
            sent, reply = outstanding.popleft()
            try:
                measure.record(sent, reply.result())
            except Exception as error:
                measure.record(sent, error=error)
    print(measure.json(), flush=True)


if __name__ == "__main__":
    {"server": server, "client": client}[sys.argv[1]](*sys.argv[2:])
