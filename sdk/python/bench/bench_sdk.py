"""The Python SDK's side of scripts/bench-rpc: a responder and a caller loop, run with a python that has the SDK.

  server QUEUE [PREFETCH]                                the SDK's responder (`echo`, a plain def, as a user
                                                         writes it) on a quorum queue it declares; until SIGTERM
  client QUEUE DURATION_S WARMUP_S CONCURRENCY [blocking] N callers, each calling `echo(1, 2)` again as soon as it
                                                         has its reply (closed loop), on one AsyncClient (or, with
                                                         `blocking`, N threads sharing one blocking warren.Client);
                                                         prints one JSON object like `warren bench --json`
"""

import asyncio
import json
import os
import sys
import threading
import time

import warren


def server(queue, prefetch="64"):
    def echo(*args):
        return list(args)

    print(f"serving {queue}", file=sys.stderr, flush=True)
    warren.serve(queue, {"echo": echo}, prefetch=int(prefetch), declare=True)


def percentile(sorted_values, q):
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def client(queue, duration_s, warmup_s, concurrency, mode="async"):
    duration_s, warmup_s, concurrency = float(duration_s), float(warmup_s), int(concurrency)
    latencies, errors = [], {}
    window = {}

    def record(sent, done, measure_from):
        if sent >= measure_from:
            latencies.append((done - sent) * 1e6)
            window["from"] = measure_from
            window["last"] = max(window.get("last", done), done)

    if mode == "blocking":
        with warren.Client(timeout=5) as caller:
            caller.connect()
            start = time.perf_counter()
            measure_from, until = start + warmup_s, start + warmup_s + duration_s
            cpu = {}

            def loop():
                while True:
                    sent = time.perf_counter()
                    if sent >= until:
                        return
                    try:
                        assert caller.call(queue, "echo", 1, 2) == [1, 2]
                    except warren.WarrenError as error:
                        errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
                        continue
                    record(sent, time.perf_counter(), measure_from)

            def mark_cpu():
                time.sleep(max(0.0, measure_from - time.perf_counter()))
                cpu["start"] = time.process_time()

            threads = [threading.Thread(target=loop) for _ in range(concurrency)] + [threading.Thread(target=mark_cpu)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            cpu_used = time.process_time() - cpu["start"]
    else:
        async def main():
            async with warren.AsyncClient(timeout=5) as caller:
                start = time.perf_counter()
                measure_from, until = start + warmup_s, start + warmup_s + duration_s
                cpu = {}

                async def loop():
                    while True:
                        sent = time.perf_counter()
                        if sent >= until:
                            return
                        try:
                            assert await caller.call(queue, "echo", 1, 2) == [1, 2]
                        except warren.WarrenError as error:
                            errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
                            continue
                        record(sent, time.perf_counter(), measure_from)

                async def mark_cpu():
                    await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
                    cpu["start"] = time.process_time()

                await asyncio.gather(mark_cpu(), *(loop() for _ in range(concurrency)))
                return time.process_time() - cpu["start"]

        cpu_used = asyncio.run(main())
    latencies.sort()
    # The measured window: from the warm-up's end to the last reply recorded (as the tutorial client's).
    elapsed = max(window.get("last", 0.0) - window.get("from", 0.0), 1e-6)
    calls = len(latencies)
    print(json.dumps({
        "concurrency": concurrency,
        "calls": calls,
        "elapsed_s": round(elapsed, 3),
        "calls_per_sec": round(calls / elapsed, 1),
        "latency_us": {name: round(percentile(latencies, q), 1)
                       for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        "client_cpu_us_per_call": round(cpu_used * 1e6 / calls, 1) if calls else None,
        "errors": errors,
        "mode": mode,
        "pid": os.getpid(),
    }))


def main(argv):
    command, args = argv[1], argv[2:]
    if command == "server":
        server(*args)
    elif command == "client":
        client(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
