"""RabbitMQ PerfTest as scripts/bench-rpc's floor: one producer and one consumer in one JVM, through one queue.

  perftest.py QUEUE quorum|classic IN_FLIGHT SECONDS WARMUP -- JAVA_CMD...

Runs `JAVA_CMD com.rabbitmq.perf.PerfTest` with at most IN_FLIGHT unconfirmed publishes and prefetch 64 like every
responder (a smaller one makes the consumer, acking each message through the queue, the bottleneck),
reads its once-a-second lines after the warm-up and prints one JSON object shaped like `warren bench --json`:
calls/s is the consumer's receive rate (the mean of those seconds), the latencies are PerfTest's one-way consumer
latency (publish to delivery; median over those seconds of each second's median and percentiles), and the CPU is
the PerfTest process's (producer and consumer together) per message over those seconds.
"""

import base64
import json
import os
import re
import statistics
import subprocess
import sys
import urllib.parse
import urllib.request

LINE = re.compile(r"time (?P<t>[\d.]+) s, .*?received: (?P<received>[\d.]+) msg/s, min/median/75th/95th/99th "
                  r"consumer latency: (?P<lat>[\d/]+) µs(?:, confirm latency: (?P<confirm>[\d/]+) µs)?")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of every thread


def delete_queue(queue):
    """Through the management API: a backlog left by one run would be the next run's latency."""
    uri = urllib.parse.urlsplit(os.environ.get("WARREN_MANAGEMENT_URI", "http://guest:guest@127.0.0.1:15672"))
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(os.environ.get("WARREN_BROKER_URI", "amqp:///%2f")).path[1:])
    url = f"{uri.scheme}://{uri.hostname}:{uri.port}/api/queues/{urllib.parse.quote(vhost or '/', safe='')}/" \
          f"{urllib.parse.quote(queue, safe='')}"
    request = urllib.request.Request(url, method="DELETE")
    auth = urllib.parse.unquote(f"{uri.username}:{uri.password}").encode()
    request.add_header("Authorization", "Basic " + base64.b64encode(auth).decode())
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise


def main(queue, queue_type, in_flight, seconds, warmup, java):
    in_flight, seconds, warmup = int(in_flight), float(seconds), float(warmup)
    args = ["com.rabbitmq.perf.PerfTest", "--uri", os.environ.get("WARREN_BROKER_URI", "amqp://localhost"),
            "-x", "1", "-y", "1", "-u", queue, "-ad", "false", "-c", str(in_flight), "-q", str(max(64, in_flight)),
            "-z", str(int(warmup + seconds)), "-i", "1"]
    if queue_type == "quorum":
        args.append("-qq")
    delete_queue(queue)
    process = subprocess.Popen(java + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds_seen, cpu = [], []
    for line in process.stdout:
        match = LINE.search(line)
        if not match:
            continue
        try:
            ticks = cpu_ticks(process.pid)
        except OSError:
            break
        if float(match["t"]) < warmup + 0.99:  # the line at T s covers the second before T
            cpu = [ticks]  # the last sample before the measured window
            continue
        lat = [int(v) for v in match["lat"].split("/")]
        seconds_seen.append({"received": float(match["received"]), "p50": lat[1], "p99": lat[4],
                             "confirm_p50": int(match["confirm"].split("/")[1]) if match["confirm"] else None})
        cpu.append(ticks)
    process.wait()
    delete_queue(queue)
    if not seconds_seen:
        sys.exit("PerfTest printed no measurement")
    received = sum(s["received"] for s in seconds_seen)
    clk_tck = os.sysconf("SC_CLK_TCK")
    cpu_us = (cpu[-1] - cpu[0]) * 1e6 / clk_tck if len(cpu) > 1 else None
    median = lambda key: statistics.median(s[key] for s in seconds_seen)
    print(json.dumps({
        "concurrency": in_flight,
        "calls": int(received),
        "elapsed_s": len(seconds_seen),
        "calls_per_sec": round(received / len(seconds_seen), 1),
        "latency_us": {"p50": median("p50"), "p90": None, "p99": median("p99"),
                       "max": max(s["p99"] for s in seconds_seen)},
        "confirm_p50_us": median("confirm_p50") if seconds_seen[0]["confirm_p50"] is not None else None,
        "client_cpu_us_per_call": round(cpu_us / received, 1) if cpu_us and received else None,
        "errors": {},
    }))


if __name__ == "__main__":
    sep = sys.argv.index("--")
    main(*sys.argv[1:sep], sys.argv[sep + 1:])
