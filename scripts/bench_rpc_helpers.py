"""Helpers of scripts/bench-rpc that need pika: the RabbitMQ tutorial's RPC pair, worker start-up probing, and the
report. Run with the venv's python (scripts/bench-rpc sets it up).

  tutorial-server QUEUE                      the tutorial's RPC server (prefetch 1, JSON echo), until killed
  tutorial-client QUEUE DURATION_S WARMUP_S  the tutorial's RPC client in a loop; prints one JSON object
  startup QUEUE LOG -- CMD...                starts CMD, prints {"pid", "startup_ms", "idle_rss_kib"} once QUEUE has
                                             a consumer (the process keeps running)
  wait-consumer QUEUE TIMEOUT_S              waits until QUEUE has a consumer
  delete-queues QUEUE...                     deletes the queues (missing ones are fine)
  report RESULTS_JSON BENCHMARKS_MD          prints the comparison and writes the RPC section of BENCHMARKS_MD
"""

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pika

BROKER_URI = os.environ.get("WARREN_BROKER_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")


def connect():
    return pika.BlockingConnection(pika.URLParameters(BROKER_URI))


# --- the RabbitMQ tutorial's RPC pair (tutorial six), echoing JSON instead of computing Fibonacci numbers ---------


def tutorial_server(queue):
    connection = connect()
    channel = connection.channel()
    channel.queue_declare(queue=queue)

    def on_request(ch, method, props, body):
        response = json.loads(body)
        ch.basic_publish(exchange="", routing_key=props.reply_to,
                         properties=pika.BasicProperties(correlation_id=props.correlation_id),
                         body=json.dumps(response))
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue=queue, on_message_callback=on_request)
    print(f"consuming {queue}", file=sys.stderr, flush=True)
    channel.start_consuming()


class TutorialRpcClient:
    def __init__(self, queue):
        self.queue = queue
        self.connection = connect()
        self.channel = self.connection.channel()
        result = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue = result.method.queue
        self.channel.basic_consume(queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True)
        self.response = None
        self.corr_id = None

    def on_response(self, ch, method, props, body):
        if self.corr_id == props.correlation_id:
            self.response = body

    def call(self, params):
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(exchange="", routing_key=self.queue,
                                   properties=pika.BasicProperties(reply_to=self.callback_queue,
                                                                   correlation_id=self.corr_id),
                                   body=json.dumps(params))
        while self.response is None:
            self.connection.process_data_events(time_limit=None)
        return json.loads(self.response)


def percentile(sorted_values, q):
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def tutorial_client(queue, duration_s, warmup_s):
    client = TutorialRpcClient(queue)
    start = time.perf_counter()
    measure_from, until = start + warmup_s, start + warmup_s + duration_s
    latencies, last = [], measure_from
    while True:
        sent = time.perf_counter()
        if sent >= until:
            break
        assert client.call([1, 2]) == [1, 2]
        done = time.perf_counter()
        if sent >= measure_from:
            latencies.append((done - sent) * 1e6)
            last = done
    latencies.sort()
    elapsed = max(last - measure_from, 1e-6)
    print(json.dumps({
        "concurrency": 1,
        "calls": len(latencies),
        "elapsed_s": round(elapsed, 3),
        "calls_per_sec": round(len(latencies) / elapsed, 1),
        "latency_us": {name: round(percentile(latencies, q), 1)
                       for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
    }))
    client.connection.close()


# --- worker start-up -----------------------------------------------------------------------------------------------


def consumers(connection, queue):
    """The queue's consumer count from a passive declare (answered by the queue itself, no stats delay)."""
    channel = connection.channel()
    try:
        count = channel.queue_declare(queue, passive=True).method.consumer_count
        channel.close()
        return count
    except pika.exceptions.ChannelClosedByBroker:
        return 0


def wait_consumer(queue, timeout_s, connection=None, process=None):
    connection = connection or connect()
    deadline = time.monotonic() + timeout_s
    while consumers(connection, queue) < 1:
        if process is not None and process.poll() is not None:
            sys.exit(f"the process exited with {process.returncode} before consuming {queue}")
        if time.monotonic() > deadline:
            sys.exit(f"no consumer on {queue} after {timeout_s}s")
        time.sleep(0.001)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def startup(queue, log, command):
    connection = connect()  # connected before the clock starts
    deadline = time.monotonic() + 15
    while consumers(connection, queue) > 0:  # a previous run's worker may still be leaving
        if time.monotonic() > deadline:
            sys.exit(f"{queue} still has consumers")
        time.sleep(0.05)
    with open(log, "ab") as out:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_consumer(queue, 30, connection, process)
    startup_ms = (time.monotonic() - started) * 1000
    time.sleep(1.0)  # idle: consuming, no requests
    print(json.dumps({"pid": process.pid, "startup_ms": round(startup_ms, 1), "idle_rss_kib": rss_kib(process.pid)}))
    connection.close()


def delete_queues(queues):
    connection = connect()
    for queue in queues:
        channel = connection.channel()
        try:
            channel.queue_delete(queue)
            channel.close()
        except pika.exceptions.ChannelClosedByBroker:
            pass
    connection.close()


# --- the report ----------------------------------------------------------------------------------------------------


def report(results_path, benchmarks_path):
    r = json.load(open(results_path))
    bare1, bare64 = r["bare_c1"], r["bare_c64"]
    w1, w64 = r["warren_c1"], r["warren_c64"]
    wb1, wb64 = r["warren_client_bare_responder_c1"], r["warren_client_bare_responder_c64"]
    py = r["tutorial_c1"]
    su = r["startup"]

    def lat(x):
        return x["latency_us"]

    def row(name, x, note=""):
        return (f"| {name} | {x['concurrency']} | {x['calls_per_sec']:,.0f} | {lat(x)['p50']:.0f} | "
                f"{lat(x)['p90']:.0f} | {lat(x)['p99']:.0f} | {lat(x)['max']:.0f} | {note} |")

    throughput_ratio = w64["calls_per_sec"] / bare64["calls_per_sec"]
    client_ratio = wb64["calls_per_sec"] / bare64["calls_per_sec"]
    p50_delta = lat(w1)["p50"] - lat(bare1)["p50"]
    client_p50_delta = lat(wb1)["p50"] - lat(bare1)["p50"]
    python_ratio = w64["calls_per_sec"] / py["calls_per_sec"]
    verdict = lambda ok: "met" if ok else "NOT met"
    m = r["machine"]

    lines = [
        "## RPC",
        "",
        f"Measured by `scripts/bench-rpc` on {m['date']}: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, "
        f"RabbitMQ {m['rabbitmq']} on the same machine (127.0.0.1), {m['kernel']}, {m['rustc']}. "
        f"Every row ran in the same run against the same broker, {r['duration']} each after a {r['warmup']} "
        "warm-up; the callers, the responders and RabbitMQ share the CPUs. Latencies in µs, end to end "
        "(publish to reply), closed loop: each of the N callers sends its next call when its reply arrives. "
        "Echo of `[1,2]`.",
        "",
        "| caller → responder | in flight | calls/s | p50 | p90 | p99 | max | |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        row("bare lapin → bare lapin", bare1),
        row("warren-client → bare lapin", wb1),
        row("warren-client → warren-worker", w1),
        row("bare lapin → bare lapin", bare64),
        row("warren-client → bare lapin", wb64),
        row("warren-client → warren-worker", w64),
        row("tutorial pika → tutorial pika", py, "cannot pipeline: one call at a time"),
        "",
        "Against the design's targets (docs: design.md, Targets):",
        "",
        f"- Throughput at 64 in flight: warren (client + worker) = **{throughput_ratio:.0%}** of the bare lapin "
        f"loop (target ≥ 90 %: {verdict(throughput_ratio >= 0.9)}); the client alone (against the bare "
        f"responder) = {client_ratio:.0%}.",
        f"- Sequential round trip: warren p50 is **{p50_delta:+.0f} µs** from the bare loop's (target within 50 µs: "
        f"{verdict(p50_delta <= 50)}); the client alone {client_p50_delta:+.0f} µs.",
        f"- Against the RabbitMQ tutorial's Python pair: warren at 64 in flight does **{python_ratio:.0f}×** its "
        f"calls/s (target ≥ 10×: {verdict(python_ratio >= 10)}). The tutorial client waits for each reply before "
        "sending the next request (it cannot pipeline), so it is measured at 1 in flight only; at 1 in flight "
        f"warren is {w1['calls_per_sec'] / py['calls_per_sec']:.1f}× faster.",
        f"- warren-worker: idle RSS **{su['idle_rss_kib'] / 1024:.1f} MiB** (VmRSS, 1 s after it started consuming; "
        f"target ≤ 15 MiB: {verdict(su['idle_rss_kib'] <= 15 * 1024)}); start to consuming **{su['startup_ms']:.0f} "
        f"ms** (median of {su['runs']}: process spawn until a passive `queue.declare` reports a consumer, queue already "
        f"declared, as when the operator scales up; target ≤ 200 ms: {verdict(su['startup_ms'] <= 200)}); "
        f"{su['with_declare_ms']:.0f} ms when it also declares the quorum queue (`--declare`, first run).",
        "",
        "What each row is: *bare lapin* is `client/examples/bare_rpc.rs`, plain lapin with no warren code — the "
        "responder consumes a quorum queue with manual acks and prefetch 64, publishes the reply, then acks; the "
        "caller runs one channel per concurrent caller, each a publish → wait-for-reply loop on its own direct "
        "reply-to. *warren-client* is `warren bench`: one connection, one channel, every call multiplexed by "
        "correlation id, mandatory publishes with publisher confirms collected in the background, per-call "
        "timeout, `x-deadline` and `expiration`. *warren-worker* is `warren-worker --handler builtin --prefetch 64 "
        "--declare` (quorum queue), which also waits for the publisher confirm of each reply before acking the "
        "request. The tutorial pair is RabbitMQ's Python RPC tutorial (classic queue it declares itself, prefetch 1, "
        "a private exclusive reply queue) echoing JSON; see `scripts/bench_rpc_helpers.py`.",
        "",
        f"Also measured, not a target: the bare loop multiplexed over one shared channel like warren "
        f"(`bare_rpc caller --shared-channel`) did {r['bare_shared_c64']['calls_per_sec']:,.0f} calls/s at 64 in flight.",
        "",
        "Reproduce: `scripts/bench-rpc` (about 2–3 minutes after the release build; `BENCH_DURATION=5s` for a "
        "quicker run). Numbers on a 2-CPU machine shared with other work are noisy: compare rows of one run, not runs.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    try:
        text = open(benchmarks_path).read()
    except FileNotFoundError:
        text = "# Benchmarks\n\n"
    pattern = re.compile(r"^## RPC\n.*?(?=^## |\Z)", flags=re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    open(benchmarks_path, "w").write(text)


def main(argv):
    command, args = argv[1], argv[2:]
    if command == "tutorial-server":
        tutorial_server(args[0])
    elif command == "tutorial-client":
        tutorial_client(args[0], float(args[1]), float(args[2]))
    elif command == "startup":
        assert args[2] == "--"
        startup(args[0], args[1], args[3:])
    elif command == "wait-consumer":
        wait_consumer(args[0], float(args[1]))
    elif command == "delete-queues":
        delete_queues(args)
    elif command == "report":
        report(args[0], args[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
