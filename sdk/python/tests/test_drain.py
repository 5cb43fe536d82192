"""SIGTERM with calls in flight: the Python responder finishes, answers and acks what it received; nothing is lost.

The responders run as processes of their own, started the way a pod starts one: `python -m warren serve app` with
nothing but WARREN_BROKER_URI, WARREN_QUEUE and WARREN_PREFETCH in the environment.
"""

import asyncio
import collections
import re
import signal
import sys
import textwrap
import time

import pytest

import warren
from conftest import BROKER_URI, python_responder, wait_consumers

APP = textwrap.dedent("""
    import os
    import time

    import warren

    @warren.expose
    def work(n, ms):
        time.sleep(ms / 1000)
        call = warren.current_call()
        return {"n": n, "pid": os.getpid(), "redelivered": call.redelivered, "done": time.time()}
""")


def test_sigterm_drains_calls_in_flight_and_nothing_is_lost(tmp_path, queues):
    queue = queues.new("drain")
    env = {"WARREN_PREFETCH": "16"}
    first, first_log = python_responder(tmp_path, APP, queue, env=env)
    wait_consumers(queue, 1, process=first, log_path=first_log)
    total, in_flight, stop_after = 600, 64, 150
    results, errors = {}, []
    signalled = {}

    async def main():
        second = None
        async with warren.AsyncClient(BROKER_URI, timeout=60) as client:
            slots = asyncio.Semaphore(in_flight)

            async def one(n):
                try:
                    results[n] = await client.call(queue, "work", n, 20 + (n * 37) % 80)
                except Exception as error:  # noqa: BLE001 - counted and reported below
                    errors.append((n, repr(error)))
                finally:
                    slots.release()

            tasks = []
            for n in range(total):
                await slots.acquire()
                tasks.append(asyncio.ensure_future(one(n)))
                if n == stop_after:
                    # Calls in flight now: SIGTERM the first responder, start a second for what still waits.
                    signalled["at"] = time.time()
                    first.send_signal(signal.SIGTERM)
                    second = python_responder(tmp_path, APP, queue, env=env)
            await asyncio.gather(*tasks)
        return second

    second, second_log = asyncio.run(main())
    try:
        first_exit = first.wait(30)
    finally:
        second.send_signal(signal.SIGTERM)
        second_exit = second.wait(30)
    by_pid = collections.Counter(result["pid"] for result in results.values())
    drained = sum(1 for result in results.values()
                  if result["pid"] == first.pid and result["done"] > signalled["at"])
    redelivered = sum(1 for result in results.values() if result["redelivered"])
    print(f"\nSIGTERM drain: sent {total}, answered {len(results)}, errors {len(errors)}; answered by the first "
          f"responder {by_pid[first.pid]} ({drained} of them finished after its SIGTERM), by the second "
          f"{by_pid[second.pid]}; redelivered {redelivered}")
    log, second_log = first_log.read_text(errors="replace"), second_log.read_text(errors="replace")
    received = [int(re.search(r"this session: (\d+) received, (\d+) acked", text).group(1))
                for text in (log, second_log)]
    print(f"requests the responders received (and ran): {received[0]} + {received[1]}")
    assert not errors, errors[:5]
    assert sorted(results) == list(range(total)), "every call answered once"
    assert first_exit == 0, log
    assert second_exit == 0, second_log
    assert drained >= 1, "the first responder had calls in flight when it was signalled"
    assert "every received request was answered" in log, log
    # No request ran twice: the first responder answered and acked all it ran before it closed. (A few requests
    # the broker had sent it just as the consumer was cancelled, which it never ran, return to the queue when it
    # closes: the second responder gets them with `redelivered` set.)
    assert by_pid[first.pid] == received[0] and by_pid[second.pid] == received[1]
    assert sum(received) == total


@pytest.mark.parametrize("main_code", ["ends", "sleeps"])
def test_start_server_drains_on_sigterm_and_exits_0(tmp_path, queues, main_code):
    """`start_server()` in a program: whether its main code has ended or still runs, SIGTERM drains, then exits 0."""
    queue = queues.new("start-server")
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(f"""
        import time
        import warren

        rpc = warren.service({queue!r})

        @rpc.expose
        def slow(n):
            time.sleep(0.5)
            return n

        rpc.start_server(prefetch=32)
        print("serving", flush=True)
        if {main_code == "sleeps"!r}:
            while True:
                time.sleep(1)
    """))
    import subprocess
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT,
                                   env={"WARREN_BROKER_URI": BROKER_URI, "PATH": "/usr/bin:/bin"})
    wait_consumers(queue, 1, process=process, log_path=log_path)

    async def main():
        async with warren.AsyncClient(BROKER_URI, timeout=30) as client:
            calls = [asyncio.ensure_future(client.call(queue, "slow", n)) for n in range(20)]
            await asyncio.sleep(0.25)  # all 20 delivered (prefetch 32) and running
            process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    exit_code = process.wait(30)
    print(f"\nstart_server drain ({main_code}): sent 20, answered {sum(r == n for n, r in enumerate(results))}")
    assert results == list(range(20)), results
    assert exit_code == 0, log_path.read_text(errors="replace")
