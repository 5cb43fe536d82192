"""What every Python peer's caller measures, printed as one JSON object shaped like `warren bench --json`."""

import json
import time


class Measure:
    """Latencies of the calls sent inside [warm-up end, end) and the process's CPU over that window."""

    def __init__(self, duration_s, warmup_s, concurrency):
        self.concurrency = concurrency
        start = time.perf_counter()
        self.measure_from, self.until = start + warmup_s, start + warmup_s + duration_s
        self.latencies, self.errors, self.last = [], {}, self.measure_from
        self.cpu_from = self.cpu_until = None

    def done(self):
        return time.perf_counter() >= self.until

    def record(self, sent, reply=None, error=None):
        now = time.perf_counter()
        if error is None and reply != [1, 2]:
            error = ValueError(f"wrong reply {reply!r}")
        if error is not None:
            name = type(error).__name__
            self.errors[name] = self.errors.get(name, 0) + 1
        elif sent >= self.measure_from:
            if self.cpu_from is None:
                self.cpu_from = time.process_time()  # every thread of the process, user + system
            self.latencies.append((now - sent) * 1e6)
            self.last = now
            if now < self.until:
                self.cpu_until = time.process_time()

    def json(self):
        latencies = sorted(self.latencies)
        elapsed = max(self.last - self.measure_from, 1e-6)

        def pct(q):
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else 0.0

        cpu = None
        if latencies and self.cpu_from is not None and self.cpu_until is not None:
            cpu = round((self.cpu_until - self.cpu_from) * 1e6 / len(latencies), 1)
        return json.dumps({
            "concurrency": self.concurrency,
            "calls": len(latencies),
            "elapsed_s": round(elapsed, 3),
            "calls_per_sec": round(len(latencies) / elapsed, 1),
            "latency_us": {name: pct(q) for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
            "client_cpu_us_per_call": cpu,
            "errors": self.errors,
        })
