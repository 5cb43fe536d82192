"""Helpers of scripts/bench-rpc that need pika: the RabbitMQ tutorial's RPC pair, worker start-up probing, and the
report. Run with the venv's python (scripts/bench-rpc sets it up).

  tutorial-server QUEUE [quorum]             the tutorial's RPC server (prefetch 1, JSON echo), until killed; on a
                                             quorum queue instead of the tutorial's classic one when asked
  tutorial-client QUEUE DURATION_S WARMUP_S  the tutorial's RPC client in a loop; prints one JSON object
  startup QUEUE LOG -- CMD...                starts CMD, prints {"pid", "startup_ms", "idle_rss_kib"} once QUEUE has
                                             a consumer (the process keeps running)
  wait-consumer QUEUE TIMEOUT_S              waits until QUEUE has a consumer
  delete-queues QUEUE...                     deletes the queues (missing ones are fine)
  report RESULTS_JSON BENCHMARKS_MD [ROWS_JSON]
                                             prints the comparison and writes the RPC section of BENCHMARKS_MD
                                             (and one object per row to ROWS_JSON)
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid

import pika

BROKER_URI = os.environ.get("WARREN_BROKER_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")


def connect():
    return pika.BlockingConnection(pika.URLParameters(BROKER_URI))


# --- the RabbitMQ tutorial's RPC pair (tutorial six), echoing JSON instead of computing Fibonacci numbers ---------


def tutorial_server(queue, queue_type="classic"):
    connection = connect()
    channel = connection.channel()
    if queue_type == "quorum":  # the one change from the tutorial: the queue type warren services use
        channel.queue_declare(queue=queue, durable=True, arguments={"x-queue-type": "quorum"})
    else:
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
    latencies, last, cpu_from, cpu_until = [], measure_from, None, None
    while True:
        sent = time.perf_counter()
        if sent >= until:
            break
        if sent >= measure_from and cpu_from is None:
            cpu_from = time.process_time()
        assert client.call([1, 2]) == [1, 2]
        done = time.perf_counter()
        if sent >= measure_from:
            latencies.append((done - sent) * 1e6)
            last = done
            cpu_until = time.process_time()
    latencies.sort()
    elapsed = max(last - measure_from, 1e-6)
    print(json.dumps({
        "concurrency": 1,
        "calls": len(latencies),
        "elapsed_s": round(elapsed, 3),
        "calls_per_sec": round(len(latencies) / elapsed, 1),
        "latency_us": {name: round(percentile(latencies, q), 1)
                       for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        "client_cpu_us_per_call": round((cpu_until - cpu_from) * 1e6 / len(latencies), 1) if latencies else None,
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

JAVA_RPC = ("Java RpcClient", "Java RpcServer")
SPRING_RESPONDER = "Spring DirectMessageListenerContainer + MessageListenerAdapter"
# variant: caller, responder, queue type, note. The order of the table within each queue type and in-flight level.
ROWS = {
    "bare_c1": ("bare lapin", "bare lapin", "quorum", ""),
    "bare_confirm_c1": ("bare lapin", "bare lapin, reply confirmed before the ack", "quorum",
                        "warren-worker's guarantee"),
    "warren_client_bare_responder_c1": ("warren-client", "bare lapin", "quorum", ""),
    "warren_c1": ("warren-client", "warren-worker", "quorum", ""),
    "java_rpc_quorum_c1": (*JAVA_RPC, "quorum", ""),
    "spring_quorum_c1": ("Spring RabbitTemplate", SPRING_RESPONDER, "quorum", "`convertSendAndReceive`"),
    "spring_async_quorum_c1": ("Spring AsyncRabbitTemplate", SPRING_RESPONDER, "quorum", ""),
    "aiopika_rpc_quorum_c1": ("aio-pika RPC", "aio-pika RPC", "quorum", "pickle"),
    "aiopika_json_quorum_c1": ("aio-pika JsonRPC", "aio-pika JsonRPC", "quorum", ""),
    "tutorial_quorum_c1": ("tutorial pika", "tutorial pika", "quorum", "cannot pipeline: one call at a time"),
    "sdk_c1": ("Python SDK AsyncClient", "Python SDK responder", "quorum", ""),
    "sdk_blocking_c1": ("Python SDK blocking Client", "Python SDK responder", "quorum", "`warren.call` from one thread"),
    "perftest_quorum_c1": ("PerfTest producer", "PerfTest consumer", "quorum",
                           "one way, no reply: the broker's floor; at most 1 unconfirmed publish"),
    "bare_c64": ("bare lapin", "bare lapin", "quorum", "a channel per caller"),
    "bare_shared_c64": ("bare lapin, one shared channel", "bare lapin", "quorum", "multiplexed like warren-client"),
    "bare_confirm_shared_c64": ("bare lapin, one shared channel", "bare lapin, reply confirmed before the ack",
                                "quorum", "warren-worker's guarantee"),
    "warren_client_bare_responder_c64": ("warren-client", "bare lapin", "quorum", ""),
    "warren_c64": ("warren-client", "warren-worker", "quorum", ""),
    "java_rpc_quorum_c64": (*JAVA_RPC, "quorum", "64 threads sharing one RpcClient"),
    "spring_quorum_c64": ("Spring RabbitTemplate", SPRING_RESPONDER, "quorum", "64 threads sharing one template"),
    "spring_async_quorum_c64": ("Spring AsyncRabbitTemplate", SPRING_RESPONDER, "quorum", ""),
    "aiopika_rpc_quorum_c64": ("aio-pika RPC", "aio-pika RPC", "quorum", "pickle"),
    "aiopika_json_quorum_c64": ("aio-pika JsonRPC", "aio-pika JsonRPC", "quorum", ""),
    "sdk_c64": ("Python SDK AsyncClient", "Python SDK responder", "quorum", "one connection, calls multiplexed"),
    "perftest_quorum_c64": ("PerfTest producer", "PerfTest consumer", "quorum",
                            "one way, no reply: the broker's floor; at most 64 unconfirmed publishes"),
    "bare_classic_c1": ("bare lapin", "bare lapin", "classic", ""),
    "warren_classic_c1": ("warren-client", "warren-worker", "classic", ""),
    "java_rpc_classic_c1": (*JAVA_RPC, "classic", ""),
    "spring_classic_c1": ("Spring RabbitTemplate", SPRING_RESPONDER, "classic", "`convertSendAndReceive`"),
    "spring_async_classic_c1": ("Spring AsyncRabbitTemplate", SPRING_RESPONDER, "classic", ""),
    "aiopika_rpc_classic_c1": ("aio-pika RPC", "aio-pika RPC", "classic", "pickle"),
    "aiopika_json_classic_c1": ("aio-pika JsonRPC", "aio-pika JsonRPC", "classic", ""),
    "nameko_classic_c1": ("Nameko ClusterRpcProxy", "Nameko service", "classic", "Nameko declares classic queues only"),
    "tutorial_classic_c1": ("tutorial pika", "tutorial pika", "classic", "as in the tutorial; one call at a time"),
    "perftest_classic_c1": ("PerfTest producer", "PerfTest consumer", "classic", "one way, no reply: the broker's floor"),
    "bare_classic_shared_c64": ("bare lapin, one shared channel", "bare lapin", "classic", ""),
    "warren_classic_c64": ("warren-client", "warren-worker", "classic", ""),
    "java_rpc_classic_c64": (*JAVA_RPC, "classic", "64 threads sharing one RpcClient"),
    "spring_classic_c64": ("Spring RabbitTemplate", SPRING_RESPONDER, "classic", "64 threads sharing one template"),
    "spring_async_classic_c64": ("Spring AsyncRabbitTemplate", SPRING_RESPONDER, "classic", ""),
    "aiopika_rpc_classic_c64": ("aio-pika RPC", "aio-pika RPC", "classic", "pickle"),
    "aiopika_json_classic_c64": ("aio-pika JsonRPC", "aio-pika JsonRPC", "classic", ""),
    "nameko_classic_c64": ("Nameko ClusterRpcProxy", "Nameko service", "classic",
                           "`call_async`: 64 pipelined on one proxy, collected oldest first"),
    "perftest_classic_c64": ("PerfTest producer", "PerfTest consumer", "classic",
                             "one way, no reply: the broker's floor; at most 64 unconfirmed publishes"),
}
# The peers warren is compared with, by caller → responder (the bare loops and the SDK have their own targets).
PEERS = ["java_rpc", "spring", "spring_async", "aiopika_rpc", "aiopika_json", "nameko", "tutorial"]


def json_rows(r):
    """One object per row, as `--json FILE` writes them."""
    rows = []
    for name, (caller, responder, queue_type, note) in ROWS.items():
        x = r.get(name)
        if not x:
            continue
        rows.append({
            "variant": name, "caller": caller, "responder": responder, "queue_type": queue_type,
            "in_flight": x["concurrency"], "calls_per_s": x["calls_per_sec"], "p50_us": x["latency_us"]["p50"],
            "p99_us": x["latency_us"]["p99"], "caller_cpu_us_per_call": x.get("client_cpu_us_per_call"),
            "responder_cpu_us_per_call": x.get("responder_cpu_us_per_call"), "p90_us": x["latency_us"]["p90"],
            "max_us": x["latency_us"]["max"], "errors": x.get("errors", 0), "note": note,
            "rounds": x["rounds"],
        })
    return rows


def report(results_path, benchmarks_path, json_path=None):
    r = json.load(open(results_path))
    bare1, bare64, shared64 = r["bare_c1"], r["bare_c64"], r["bare_shared_c64"]
    confirm1, confirm64 = r["bare_confirm_c1"], r["bare_confirm_shared_c64"]
    w1, w64 = r["warren_c1"], r["warren_c64"]
    wb1, wb64 = r["warren_client_bare_responder_c1"], r["warren_client_bare_responder_c64"]
    py, py_classic = r["tutorial_quorum_c1"], r["tutorial_classic_c1"]
    wc1, wc64 = r["warren_classic_c1"], r["warren_classic_c64"]
    sdk1, sdk_blocking1, sdk64 = r["sdk_c1"], r["sdk_blocking_c1"], r["sdk_c64"]
    su = r["startup"]
    m = r["machine"]

    def lat(x):
        return x["latency_us"]

    def num(value):
        return f"{value:,.0f}" if value else "–"

    def row(name):
        x, (caller, responder, queue_type, note) = r[name], ROWS[name]
        if name.startswith("perftest_") and x.get("confirm_p50_us"):
            note += f"; confirm p50 {x['confirm_p50_us']:,.0f} µs"
        return (f"| {caller} → {responder} | {queue_type} | {x['concurrency']} | {x['calls_per_sec']:,.0f} | "
                f"{num(lat(x)['p50'])} | {num(lat(x)['p90'])} | {num(lat(x)['p99'])} | {num(lat(x)['max'])} | "
                f"{num(x.get('client_cpu_us_per_call'))} | {num(x.get('responder_cpu_us_per_call'))} | {note} |")

    def warren_for(queue_type, in_flight):
        return r["warren_c1" if queue_type == "quorum" else "warren_classic_c1"] if in_flight == 1 else \
            r["warren_c64" if queue_type == "quorum" else "warren_classic_c64"]

    def rounds_median(f):
        """The median over rounds of f(round), leaving out rounds where a side measured no call."""
        values = []
        for i in range(len(bare1["rounds"])):
            try:
                values.append(f(i))
            except ZeroDivisionError:
                pass
        return statistics.median(values) if values else None

    # warren against each peer, paired by round (both measured in the same round), like the targets below.
    peer_lines, behind = [], []
    for name, (caller, responder, queue_type, note) in ROWS.items():
        base = name.rsplit("_c", 1)[0].replace("_quorum", "").replace("_classic", "")
        if base not in PEERS or name not in r:
            continue
        x = r[name]
        w = warren_for(queue_type, x["concurrency"])
        ratio = rounds_median(lambda i: w["rounds"][i]["calls_per_sec"] / x["rounds"][i]["calls_per_sec"])
        p50 = rounds_median(lambda i: w["rounds"][i]["p50"] - x["rounds"][i]["p50"] if x["rounds"][i]["p50"]
                            else 1 / 0)
        if ratio is None or p50 is None:
            peer_lines.append(f"| {caller} → {responder} | {queue_type} | {x['concurrency']} | – | – | "
                              "no call measured |")
            continue
        # The targets: calls/s at 64 in flight, p50 at 1 (the tutorial pair runs at 1 only: both count there).
        checks = []
        if x["concurrency"] > 1 or name.startswith("tutorial_"):
            checks.append(ratio >= 1)
        if x["concurrency"] == 1:
            checks.append(p50 <= 0)
        verdict = "ahead" if all(checks) else "**behind**"
        if not all(checks):
            behind.append(f"{caller} → {responder} ({queue_type}, {x['concurrency']} in flight)")
        peer_lines.append(f"| {caller} → {responder} | {queue_type} | {x['concurrency']} | {ratio:.2f}× | "
                          f"{p50:+,.0f} | {verdict} |")
    floor_lines = []
    for queue_type in ("quorum", "classic"):
        f1, f64 = r.get(f"perftest_{queue_type}_c1"), r.get(f"perftest_{queue_type}_c64")
        if not (f1 and f64):
            continue
        w1_, w64_ = warren_for(queue_type, 1), warren_for(queue_type, 64)
        if not (f1["calls_per_sec"] and f64["calls_per_sec"]):
            continue
        floor_lines.append(
            f"- {queue_type.capitalize()}: warren's round trips at {w64_['concurrency']} in flight are "
            f"**{rounds_median(lambda i: w64_['rounds'][i]['calls_per_sec'] / f64['rounds'][i]['calls_per_sec']):.0%}"
            f"** of PerfTest's one-way messages/s ({f64['calls_per_sec']:,.0f}/s; each call is two messages, a "
            f"request and a reply); warren's p50 round trip at 1 in flight is "
            f"{rounds_median(lambda i: w1_['rounds'][i]['p50'] / f1['rounds'][i]['p50']):.1f}× PerfTest's one-way "
            f"p50 ({num(lat(f1)['p50'])} µs; confirm p50 {num(f1.get('confirm_p50_us'))} µs).")

    # Paired by round: both sides of a ratio ran back to back, so drift on a shared machine cancels out; the
    # median over rounds then drops the rounds another process disturbed.
    def per_round(f):
        return statistics.median(f(i) for i in range(len(bare1["rounds"])))

    def cps(x, i):
        return x["rounds"][i]["calls_per_sec"]

    # The reference is the faster of the two bare callers in that round, so the ratio never flatters warren.
    throughput_ratio = per_round(lambda i: cps(w64, i) / max(cps(bare64, i), cps(shared64, i)))
    client_ratio = per_round(lambda i: cps(wb64, i) / max(cps(bare64, i), cps(shared64, i)))
    p50_delta = per_round(lambda i: w1["rounds"][i]["p50"] - bare1["rounds"][i]["p50"])
    client_p50_delta = per_round(lambda i: wb1["rounds"][i]["p50"] - bare1["rounds"][i]["p50"])
    python_ratio = per_round(lambda i: cps(w64, i) / cps(py, i))
    python_classic_ratio = per_round(lambda i: cps(wc64, i) / cps(py_classic, i))
    # The Python SDK against the tutorial pair, both Python, same queue type, paired by round.
    sdk64_ratio = per_round(lambda i: cps(sdk64, i) / cps(py, i))
    sdk1_ratio = per_round(lambda i: cps(sdk1, i) / cps(py, i))
    sdk_blocking1_ratio = per_round(lambda i: cps(sdk_blocking1, i) / cps(py, i))
    sdk1_p50_ratio = per_round(lambda i: sdk1["rounds"][i]["p50"] / py["rounds"][i]["p50"])
    sdk_blocking1_p50_ratio = per_round(lambda i: sdk_blocking1["rounds"][i]["p50"] / py["rounds"][i]["p50"])
    worker_cpu, bare_cpu = w64.get("responder_cpu_us_per_call"), bare64.get("responder_cpu_us_per_call")
    confirm_cpu = confirm64.get("responder_cpu_us_per_call")
    # Against the bare loop that gives the same guarantee (reply confirmed before the ack): warren's own cost.
    same_guarantee_ratio = per_round(lambda i: cps(w64, i) / cps(confirm64, i))
    same_guarantee_p50 = per_round(lambda i: w1["rounds"][i]["p50"] - confirm1["rounds"][i]["p50"])
    confirm_p50_cost = per_round(lambda i: confirm1["rounds"][i]["p50"] - bare1["rounds"][i]["p50"])
    ab = r.get("latency_ab")
    if ab:  # the dedicated back-to-back runs are the better estimate of the small p50 differences
        p50_delta = ab["warren_minus_bare_us"]
        same_guarantee_p50 = ab["warren_minus_bare_confirm_us"]
        confirm_p50_cost = ab["bare_confirm_minus_bare_us"]

    def cpu(x):
        value = x.get("client_cpu_us_per_call")
        return f"{value:,.0f}" if value else "?"

    def verdict(ok):
        return "met" if ok else "**not met**"

    rounds = r["rounds"]
    lines = [
        "## RPC",
        "",
        "<!-- generated by scripts/bench-rpc: change the script, not this section -->",
        "",
        f"Measured by `scripts/bench-rpc` on {m['date']}: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, "
        f"{m['kernel']}, RabbitMQ {m['rabbitmq']} on the same machine (127.0.0.1), {m['rustc']}, Java "
        f"{java_version()}, Python {python_version()}. Load (`/proc/loadavg`) before the measurements: "
        f"`{m.get('loadavg_before', '?')}`, after: `{m.get('loadavg_after', '?')}`. Every row comes from the same run against the same broker: {rounds} rounds, "
        f"each variant once per round in rotated order, {r['duration']} measured after a {r['warmup']} warm-up "
        f"({r.get('jvm_warmup', r['warmup'])} for the JVM callers and PerfTest, which start cold); the "
        "table shows the median over the rounds (max: the largest), and each ratio below is the median of its "
        "per-round ratios (both sides measured back to back). The callers, the responders and RabbitMQ share "
        "the CPUs. Latency in µs, end to end (publish to reply received), closed loop: each of the N callers sends "
        "its next call when its reply arrives. Every call echoes `[1,2]` (aio-pika's patterns wrap it as the keyword "
        "argument `args`, PerfTest sends its own 12-byte timestamped body); each peer on a quorum queue (what warren "
        "services use) and on a classic one, except Nameko, which declares its queues itself and only as classic.",
        "",
        "| caller → responder | queue | in flight | calls/s | p50 | p90 | p99 | max | caller CPU µs/call | "
        "responder CPU µs/call | |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *[row(name) for name in ROWS if name in r],
        "",
        "*Caller CPU µs/call* is the CPU time (user + system, every thread, lapin's I/O thread included) the caller "
        "process spent per call in the measured window: what the client itself costs, which moves far less with "
        "the machine's load than throughput and latency do. *Responder CPU µs/call* is the same for the process that "
        "answered (the bare responder, warren-worker or the tutorial server), over the caller's whole run, warm-up "
        "included, divided by the calls of that run at the measured rate.",
        "",
        *[f"**Warning:** {name} had {x['errors']} failed calls in this run; its numbers are suspect."
          for name, x in r.items() if isinstance(x, dict) and x.get("errors")],
        *[f"**Warning:** {name} measured no call in at least one round (its caller did not get going within the "
          "warm-up, or every call failed); its numbers are suspect."
          for name, x in r.items() if isinstance(x, dict) and any(not y["calls_per_sec"] for y in x.get("rounds", []))],
        "Warren against each peer, on the same queue type and at the same number of calls in flight (warren-client "
        "→ warren-worker; each figure the median of its per-round comparisons, both sides measured in the same "
        "round). The issue's targets: warren's calls/s ≥ every peer's at 64 in flight, and its p50 ≤ every peer's "
        "at 1 in flight.",
        "",
        "| peer | queue | in flight | warren calls/s ÷ peer's | warren p50 − peer's (µs) | warren |",
        "|---|---|---:|---:|---:|---|",
        *peer_lines,
        "",
        ("Warren is behind: " + "; ".join(behind) + "." if behind else "Warren is ahead of every peer here."),
        "",
        "RabbitMQ PerfTest, the broker's own floor (one producer and one consumer in one JVM, publisher confirms "
        "bounding the messages in flight, consumer prefetch 64 like every responder; its latency is one way, publish to delivery, "
        "and its rate the consumer's; the median over the rounds of each round's per-second figures after the "
        "warm-up):",
        "",
        *floor_lines,
        "",
        "Against the design's targets:",
        "",
        f"- Throughput at {w64['concurrency']} in flight: warren (client + worker) = **{throughput_ratio:.0%}** of the "
        f"faster bare lapin loop (target ≥ 90 %: {verdict(throughput_ratio >= 0.9)}); warren-client alone, against "
        f"the bare responder, = {client_ratio:.0%}. Caller CPU per call at 64 in flight: warren-client "
        f"{cpu(wb64)} µs, bare lapin {cpu(bare64)} µs (a channel per caller) and {cpu(shared64)} µs (one channel).",
        f"- CPU per request at {w64['concurrency']} in flight, the figure that moves least with the machine's "
        f"load: warren-worker {worker_cpu or 0:,.0f} µs, the bare responder {bare_cpu or 0:,.0f} µs "
        f"({(worker_cpu or 0) / (bare_cpu or 1):.2f}×; the worker also parses the request, checks its deadline, "
        "builds an envelope and waits for a publisher confirm before it acks).",
        f"- Sequential round trip: warren's p50 is **{p50_delta:+,.0f} µs** from the bare loop's (target within "
        f"50 µs: {verdict(p50_delta <= 50)}); warren-client alone {client_p50_delta:+,.0f} µs (from the rounds). "
        + (f"The difference is the median over {ab['pairs']} back-to-back triples of {ab['seconds']} s runs (bare / "
           "warren / bare with warren-worker's guarantee, p50 µs): "
           + ", ".join(f"{b:,.0f} / {w:,.0f} / {c:,.0f}" for b, w, c in
                       zip(ab["p50"]["bare"], ab["p50"]["warren"], ab["p50"]["bare_confirm"])) + "."
           if ab else "Per round (bare / warren p50): "
           + ", ".join(f"{b['p50']:,.0f} / {w['p50']:,.0f}" for b, w in zip(bare1["rounds"], w1["rounds"])) + "."),
        f"- Against the bare loop with warren-worker's guarantee (the responder acks a request only once the "
        f"broker confirmed its reply, so a reply lost with a connection is never a request lost): warren does "
        f"**{same_guarantee_ratio:.0%}** of its calls/s at {w64['concurrency']} in flight, and its p50 at 1 in "
        f"flight is **{same_guarantee_p50:+,.0f} µs** from it. The guarantee alone costs the bare loop "
        f"{confirm_p50_cost:+,.0f} µs of p50 at 1 in flight and {confirm_cpu or 0:,.0f} µs of responder CPU per "
        f"request (against {bare_cpu or 0:,.0f} µs) at {w64['concurrency']}.",
        f"- Against the RabbitMQ tutorial's Python pair on the same (quorum) queue type: warren at "
        f"{w64['concurrency']} in flight does **{python_ratio:.0f}×** its calls/s (target ≥ 10×: "
        f"{verdict(python_ratio >= 10)}); on classic queues, as the tutorial declares them, "
        f"{python_classic_ratio:.0f}×. The tutorial client waits for each reply before it sends the next request "
        "(it cannot pipeline), so it runs at 1 in flight only; at 1 in flight warren does "
        f"{w1['calls_per_sec'] / py['calls_per_sec']:.1f}× its calls/s (classic: "
        f"{wc1['calls_per_sec'] / py_classic['calls_per_sec']:.1f}×).",
        f"- The Python SDK (`sdk/python`: caller and `@expose` responder) against the tutorial's Python pair, on the "
        f"same (quorum) queue type: at {sdk64['concurrency']} in flight it does **{sdk64_ratio:.1f}×** the "
        f"tutorial's calls/s (which runs one call at a time); at 1 in flight {sdk1_ratio:.2f}× with the "
        f"AsyncClient and {sdk_blocking1_ratio:.2f}× with the blocking `warren.Client`, at "
        f"{sdk1_p50_ratio:.2f}× / {sdk_blocking1_p50_ratio:.2f}× the tutorial's p50. Unlike the tutorial, it sends "
        "a timeout (`expiration`, `x-deadline`), publishes `mandatory` in confirm mode, and its responder acks a "
        "request only once the broker confirmed the reply. Responder CPU per request: "
        f"{sdk64.get('responder_cpu_us_per_call') or 0:,.0f} µs at {sdk64['concurrency']} in flight, "
        f"{sdk1.get('responder_cpu_us_per_call') or 0:,.0f} µs at 1 (the tutorial server: "
        f"{py.get('responder_cpu_us_per_call') or 0:,.0f} µs at 1).",
        f"- warren-worker idle RSS: **{su['idle_rss_kib'] / 1024:.1f} MiB** (VmRSS 1 s after it started consuming; "
        f"target ≤ 15 MiB: {verdict(su['idle_rss_kib'] <= 15 * 1024)}). Start to consuming: **{su['startup_ms']:.0f} "
        f"ms** (median of {su['runs']} starts, from spawning the process until a passive `queue.declare` reports a "
        "consumer, the queue already declared as when the operator scales up; target ≤ 200 ms: "
        f"{verdict(su['startup_ms'] <= 200)}); {su['with_declare_ms']:.0f} ms when it also declares the quorum queue "
        "(`--declare`, first start).",
        "",
        "The rows: *bare lapin* is `client/examples/bare_rpc.rs`, plain lapin with no warren code. Its responder "
        "consumes the quorum queue with manual acks and prefetch 64, publishes the reply, then acks. Its caller "
        "either gives each concurrent caller its own channel (a publish → wait-for-reply loop on that channel's "
        "direct reply-to) or shares one channel and matches replies by correlation id. *warren-client* is "
        "`warren bench`: one connection, one channel, every call multiplexed by correlation id, `mandatory` "
        "publishes in confirm mode (each call awaits its confirm alongside its reply: a return or a nack fails it at "
        "once), per-call timeout, "
        "`x-deadline`, `expiration`, `message_id`. *warren-worker* is `warren-worker --handler builtin "
        "--prefetch 64` on a queue it declared (`--declare`: quorum, dead-lettering, delivery limit); it waits for "
        "the publisher confirm of each reply before it acks the request. The tutorial pair is the RabbitMQ Python "
        "RPC tutorial (prefetch 1, a private exclusive reply queue, no headers) echoing JSON "
        "(`scripts/bench_rpc_helpers.py`), once on a quorum queue and once on the classic queue the tutorial "
        "declares. *Python SDK* rows: `sdk/python/bench/bench_sdk.py`, its responder serving a plain `def echo(*args)` "
        "(run in its thread pool) with prefetch 64 on a quorum queue it declared, its caller either the AsyncClient "
        "(N concurrent calls on one connection) or the blocking `warren.Client` from one thread.",
        "",
        "The peers (their code under `bench/`, written for this benchmark, each as its documentation shows it; "
        "built and installed by the script, Maven's repository and the venvs cached under `~/.cache/warren`): "
        "*Java RpcClient / RpcServer* are the RabbitMQ Java client's (`com.rabbitmq:amqp-client`) own RPC classes "
        "(`bench/java/.../JavaRpcPeer.java`): an `RpcServer` subclass echoing in `handleCall`, prefetch 64, acking "
        "after the reply; one `RpcClient` on direct reply-to (its default) shared by the calling threads. *Spring* "
        "is Spring AMQP without Spring Boot (`spring-rabbit`, `SpringPeer.java`): a "
        "`DirectMessageListenerContainer` (prefetch 64) with a `MessageListenerAdapter` around a POJO's "
        "`handleMessage(byte[])`, the callers `RabbitTemplate.convertSendAndReceive` from N threads (the "
        "connection factory's channel cache raised to N) or `AsyncRabbitTemplate` with N calls in flight, both on "
        "direct reply-to (their default). *aio-pika RPC / JsonRPC* are `aio_pika.patterns` (`bench/python/"
        "aiopika_rpc.py`): `RPC.create(channel)`, `register` (prefetch 64) and `rpc.proxy.METHOD(args=[1,2])`, on "
        "channels with publisher confirms (aio-pika's default) and a reply queue of the pattern's own. *Nameko* "
        "(`bench/python/nameko_rpc.py`, Nameko on eventlet, Python 3.11) is a service with an `@rpc echo` run by a "
        "`ServiceRunner` with `max_workers` 64 and a standalone `ClusterRpcProxy` as caller; Nameko declares its "
        "queue itself as a durable classic queue and cannot use a quorum one (a quorum queue declared in advance "
        "makes its declare fail), and its standalone proxy reads replies in the calling green thread, so its 64 "
        "in flight are pipelined `call_async` calls collected oldest first. *PerfTest* is `com.rabbitmq:perf-test` "
        "(`bench/perftest.py` runs it and reads its per-second lines): `-x 1 -y 1 -c N -q 64` (`-qq` for quorum) on a "
        "fresh queue each run.",
        "",
        "Reproduce with `scripts/bench-rpc [--json FILE]` (about 16 to 20 minutes after the builds with 3 rounds). On a small machine shared with "
        "other work the numbers move from run to run: compare rows of one run, not runs.",
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
    if json_path:
        with open(json_path, "w") as out:
            json.dump(json_rows(r), out, indent=1)
            out.write("\n")


def java_version():
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr
        return re.search(r'version "([^"]+)"', out).group(1)
    except (OSError, AttributeError, subprocess.TimeoutExpired):
        return "unknown"


def python_version():
    return ".".join(map(str, sys.version_info[:3]))


def main(argv):
    command, args = argv[1], argv[2:]
    if command == "tutorial-server":
        tutorial_server(*args[:2])
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
        report(*args[:3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
