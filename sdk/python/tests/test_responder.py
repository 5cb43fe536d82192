"""The SDK's responder: against the Rust `warren` CLI (call, notify, bench), the SDK's caller, and raw AMQP."""

import asyncio
import json
import threading
import time
import urllib.request

import pytest

import warren
from conftest import (
    BROKER_URI,
    close_connections,
    declare_queue,
    queue_state,
    raw_call,
    warren_cli,
)


def divide(a, b):
    if b == 0:
        raise warren.HandlerError("division by zero", details={"a": a})
    return a / b


def greet(name, greeting="hello", *, punctuation="!"):
    return f"{greeting}, {name}{punctuation}"


CALCULATOR = {
    "add": lambda a, b: a + b,
    "divide": divide,
    "echo": lambda *args: list(args),
    "greet": greet,
}


# --- the Rust side calls the Python responder ---------------------------------------------------------------------


def test_warren_call_is_answered_by_the_python_responder(responder):
    queue = responder(CALCULATOR).server.queue
    done = warren_cli("call", queue, "add", "[1, 2]")
    assert (done.returncode, done.stdout.strip()) == (0, "3"), done.stderr
    done = warren_cli("call", queue, "add", '{"a": 1, "b": 2}')
    assert (done.returncode, done.stdout.strip()) == (0, "3"), done.stderr
    done = warren_cli("call", queue, "echo", '["x", {"y": null}]')
    assert json.loads(done.stdout) == ["x", {"y": None}], done.stderr
    done = warren_cli("call", queue, "greet", '{"name": "warren", "punctuation": "?"}')
    assert json.loads(done.stdout) == "hello, warren?", done.stderr


def test_warren_call_gets_each_error_code_from_the_python_responder(responder):
    queue = responder(CALCULATOR).server.queue
    done = warren_cli("call", queue, "divide", "[1, 0]")
    assert done.returncode == 1 and done.stdout == ""
    assert "handler_error" in done.stderr and "division by zero" in done.stderr
    done = warren_cli("call", queue, "multiply", "[2, 3]")
    assert done.returncode == 1 and "unknown_method" in done.stderr
    done = warren_cli("call", queue, "add", "[1]")  # does not fit add(a, b)
    assert done.returncode == 1 and "bad_request" in done.stderr
    done = warren_cli("call", queue, "add", '{"a": 1, "c": 2}')
    assert done.returncode == 1 and "bad_request" in done.stderr


def test_warren_call_with_dash_calls_the_default_method(responder):
    queue = responder(CALCULATOR, default_method="add").server.queue
    done = warren_cli("call", queue, "-", "[20, 22]")
    assert (done.returncode, done.stdout.strip()) == (0, "42"), done.stderr


def test_warren_notify_and_bench_against_the_python_responder(responder):
    seen = []
    server = responder({"note": seen.append, "echo": lambda *args: list(args)}, prefetch=16)
    queue = server.server.queue
    done = warren_cli("notify", queue, "note", '["one-way"]')
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == ["one-way"]
    done = warren_cli("bench", queue, "echo", "[1,2]", "--concurrency", "8", "--duration", "1s", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["calls"] > 0 and not sum((report.get("errors") or {}).values()), report


# --- the Python caller calls the Python responder -----------------------------------------------------------------


def test_python_caller_against_python_responder(responder, client):
    queue = responder(CALCULATOR).server.queue
    calc = client.service(queue)
    assert calc.add(1, 2) == 3
    assert calc.add(a="x", b="y") == "xy"
    assert calc.divide(1, 4) == 0.25
    assert calc.greet("you") == "hello, you!"
    assert calc.greet(name="you", greeting="hi", punctuation=".") == "hi, you."
    assert calc.echo() == []
    assert client.request(queue, "echo", 5) == [5]  # a scalar is one positional param
    assert client.request(queue, "echo", None) == []  # null is none


@pytest.mark.parametrize("method, args, kwargs, code", [
    ("divide", [1, 0], {}, "handler_error"),
    ("nope", [], {}, "unknown_method"),
    ("add", [1], {}, "bad_request"),
    ("add", [1, 2, 3], {}, "bad_request"),
    ("add", [], {"a": 1, "x": 2}, "bad_request"),
    ("greet", ["a"], {}, None),
    ("greet", [], {"punctuation": "!"}, "bad_request"),
    ("raises", [], {}, "handler_error"),
    ("rejects", [], {}, "bad_request"),
    ("unencodable", [], {}, "internal"),
    ("not_a_number", [], {}, "internal"),
])
def test_error_codes(responder, client, method, args, kwargs, code):
    def raises():
        raise KeyError("missing")

    def rejects():
        raise warren.BadRequest("no thanks", details=[1])

    methods = dict(CALCULATOR, raises=raises, rejects=rejects, unencodable=lambda: object(),
                   not_a_number=lambda: float("nan"))
    queue = responder(methods).server.queue
    if code is None:
        client.call(queue, method, *args, **kwargs)
        return
    with pytest.raises(warren.RemoteError) as error:
        client.call(queue, method, *args, **kwargs)
    assert error.value.code == code, error.value
    if method == "divide":
        assert (error.value.message, error.value.details) == ("division by zero", {"a": 1})
    if method == "raises":
        assert error.value.message == "KeyError: 'missing'"
    if method == "rejects":
        assert (error.value.message, error.value.details) == ("no thanks", [1])


def test_no_method_and_no_default_is_unknown_method(responder, client):
    queue = responder(CALCULATOR).server.queue
    with pytest.raises(warren.RemoteError) as error:
        client.call(queue, None, 1, 2)
    assert error.value.code == "unknown_method"


def test_bad_messages_are_answered_and_never_end_the_loop(responder, client):
    server = responder(CALCULATOR)
    queue = server.server.queue
    for body, properties, code in [
        (b"{not json", {"type": "add"}, "bad_request"),
        (b"\xff\xfe\x00", {"type": "add"}, "bad_request"),
        (b"[1, 2]", {"type": "add", "content_type": "application/msgpack"}, "bad_request"),
        (b"[1, 2]", {"type": "add", "headers": {"x-deadline": "soon"}}, None),  # an unreadable deadline: none
        (b"[1, 2]", {"type": "add", "headers": {"x-deadline": 1}}, "deadline_exceeded"),
        (b"", {"type": "echo"}, None),
    ]:
        message, reply = raw_call(queue, body, **properties)
        status = message.headers["x-status"]
        if code is None:
            assert status == "ok", reply
        else:
            assert (status, json.loads(reply)["code"]) == ("error", code), reply
        assert message.content_type == "application/json"
    assert client.call(queue, "add", 1, 2) == 3
    assert server.stats.requests[("add", "bad_request")] == 3
    assert server.stats.expired == 1


def test_a_request_past_its_deadline_is_acked_without_running(responder):
    ran = []
    server = responder({"work": lambda: ran.append(1)})
    queue = server.server.queue
    past = int(time.time() * 1000) - 60_000
    message, body = raw_call(queue, b"[]", type="work", headers={"x-deadline": past})
    assert (message.headers["x-status"], json.loads(body)["code"]) == ("error", "deadline_exceeded")
    raw_call(queue, b"[]", reply=False, type="work", headers={"x-deadline": past})  # one-way, expired
    deadline = time.monotonic() + 10
    while server.stats.expired < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stats.expired == 2
    assert ran == []
    assert queue_state(queue)[0] == 0  # acked: nothing waits in the queue
    assert server.stats.in_flight == 0  # nor unacked


def test_a_call_that_times_out_waiting_in_the_queue_is_skipped_by_the_responder(responder, client):
    """The SDK's caller sends its timeout as `x-deadline`: a request still queued when its caller gave up is acked
    without running."""
    ran = []

    def slow(tag):
        time.sleep(1.0)
        ran.append(tag)
        return tag

    server = responder({"slow": slow}, prefetch=1, threads=1)
    queue = server.server.queue

    async def main():
        async with warren.AsyncClient(BROKER_URI) as caller:
            first = asyncio.ensure_future(caller.call(queue, "slow", "first", timeout=10))
            await asyncio.sleep(0.1)  # the first runs; the second waits behind it (prefetch 1)
            started = time.monotonic()
            with pytest.raises(warren.Timeout):
                await caller.call(queue, "slow", "second", timeout=0.3)
            assert time.monotonic() - started < 0.9
            assert await first == "first"

    asyncio.run(main())
    # The second is either skipped by the responder (counted as expired) or dropped by the broker (its expiration,
    # the same timeout, passed at the head of the queue): it never runs, and nothing is left waiting.
    deadline = time.monotonic() + 2
    while server.stats.expired < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ran == ["first"]
    assert queue_state(queue)[0] == 0 and server.stats.in_flight == 0


def test_replies_keep_the_correlation_id_content_type_and_trace_context(responder, client):
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    seen = []

    def traced():
        seen.append((warren.current_trace(), warren.current_call()))
        return "ok"

    queue = responder({"traced": traced}).server.queue
    message, body = raw_call(queue, b"[]", type="traced", content_type="application/json; charset=utf-8",
                             headers={"traceparent": traceparent, "tracestate": "k=v"})
    assert json.loads(body) == "ok"
    assert message.headers["x-status"] == "ok"
    assert message.headers["traceparent"] == traceparent and message.headers["tracestate"] == "k=v"
    assert message.content_type == "application/json; charset=utf-8"
    # The SDK's caller sends the trace context of `with warren.trace(...)`, and the responder sees it.
    with warren.trace(traceparent):
        client.call(queue, "traced")
    trace, call = seen[-1]
    assert trace == warren.TraceContext(traceparent)
    assert call.method == "traced" and call.queue == queue and call.reply_expected and not call.redelivered
    assert call.deadline is not None and call.deadline > time.time()
    assert call.message_id


def test_a_method_propagates_the_trace_context_to_the_calls_it_makes(responder, client):
    inner = responder({"whoami": lambda: warren.current_trace().traceparent}).server.queue

    def outer():
        return client.call(inner, "whoami")  # no trace given: the request's is carried on

    async def outer_async():
        async with warren.AsyncClient(BROKER_URI) as nested:
            return await nested.call(inner, "whoami")

    queue = responder({"outer": outer, "outer_async": outer_async}).server.queue
    traceparent = "00-11111111111111111111111111111111-2222222222222222-01"
    with warren.trace(traceparent):
        assert client.call(queue, "outer") == traceparent
        assert client.call(queue, "outer_async") == traceparent


def test_one_way_calls_run_and_are_never_answered(responder, client):
    seen = []

    def note(value):
        seen.append(value)

    server = responder({"note": note, "fail": divide})
    queue = server.server.queue
    client.notify(queue, "note", "first")
    client.notify(queue, "fail", 1, 0)  # fails: logged and counted, no reply
    client.service(queue).notify("note", value="second")
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(seen) == ["first", "second"]
    assert client.unmatched_replies == 0
    assert server.stats.requests[("fail", "handler_error")] == 1


def test_prefetch_bounds_how_many_requests_run_at_once(responder):
    running, peak = [0], [0]
    lock = threading.Lock()

    def slow():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1

    async def slow_async():
        await asyncio.sleep(0.3)

    queue = responder({"slow": slow, "slow_async": slow_async}, prefetch=8).server.queue

    async def main():
        async with warren.AsyncClient(BROKER_URI) as client:
            for method in ("slow", "slow_async"):
                started = time.monotonic()
                await asyncio.gather(*(client.call(queue, method, timeout=20) for _ in range(16)))
                elapsed = time.monotonic() - started
                assert 0.55 < elapsed < 2.5, (method, elapsed)  # two rounds of 8 at once

    asyncio.run(main())
    assert peak[0] == 8


# --- queues -------------------------------------------------------------------------------------------------------


def test_declares_exactly_the_queue_warren_worker_declares(worker, responder, client):
    """A Python responder with declare=True re-declares a queue warren-worker --declare made: no conflict."""
    queue = worker(what="shared-queue")
    server = responder(CALCULATOR, queue=queue, declare=True)
    assert server.running
    assert client.call(queue, "add", 1, 2) == 3  # answered by either of them


def test_auto_declare_leaves_an_existing_queue_alone_and_true_reports_a_conflict(responder, queues, client):
    queue = queues.new("operator-managed")
    # As the operator would declare it with maxLength 10: the default arguments would conflict.
    declare_queue(queue + ".dead", {"x-queue-type": "quorum"})
    declare_queue(queue, {"x-queue-type": "quorum", "x-dead-letter-exchange": "",
                          "x-dead-letter-routing-key": queue + ".dead", "x-delivery-limit": 5,
                          "x-max-length": 10, "x-overflow": "reject-publish"})
    responder(CALCULATOR, queue=queue, declare="auto")
    assert client.call(queue, "add", 1, 2) == 3
    with pytest.raises(warren.QueueConflict):
        warren.start_server(queue, CALCULATOR, broker_uri=BROKER_URI, declare=True, handle_signals=False)


def test_auto_declare_makes_the_queue_and_its_dead_letter_queue(responder, queues):
    queue = queues.new("standalone")
    responder(CALCULATOR, queue=queue, declare="auto", max_length=100)
    assert queue_state(queue) is not None and queue_state(queue + ".dead") is not None
    # Declared as warren-worker --declare --max-length 100 would: re-declaring with those arguments is accepted.
    declare_queue(queue, {"x-queue-type": "quorum", "x-dead-letter-exchange": "",
                          "x-dead-letter-routing-key": queue + ".dead", "x-delivery-limit": 5,
                          "x-max-length": 100, "x-overflow": "reject-publish"})


def test_declare_false_waits_for_the_queue(queues, client):
    queue = queues.new("not-yet")
    server = warren.start_server(queue, CALCULATOR, broker_uri=BROKER_URI, declare=False, wait=None,
                                 handle_signals=False, backoff=warren.responder._amqp.Backoff(0.05, 0.2))
    try:
        time.sleep(0.5)
        assert not server.server.consuming and queue_state(queue) is None
        declare_queue(queue, {"x-queue-type": "quorum"})
        assert server.server.wait_consuming(10)
        assert client.call(queue, "add", 1, 2) == 3
    finally:
        server.stop(30)


# --- broker loss --------------------------------------------------------------------------------------------------


def test_the_responder_reconnects_after_losing_the_broker_connection(responder, client):
    server = responder(CALCULATOR, backoff=warren.responder._amqp.Backoff(0.05, 0.5))
    queue = server.server.queue
    assert client.call(queue, "add", 1, 2) == 3
    assert close_connections(f"warren-py responder {queue}") == 1
    deadline = time.monotonic() + 20
    while server.stats.reconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stats.reconnects == 1
    assert server.server.wait_consuming(10)
    assert client.call(queue, "add", 2, 2, timeout=10) == 4


# --- health endpoints ---------------------------------------------------------------------------------------------


def test_health_endpoints(responder, client):
    server = responder(CALCULATOR, health_addr="127.0.0.1:0")
    queue = server.server.queue
    client.call(queue, "add", 1, 2)
    port = server.server.health_port

    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    assert get("/healthz") == (200, "ok\n")
    assert get("/readyz") == (200, "consuming\n")
    status, metrics = get("/metrics")
    assert status == 200
    assert 'warren_worker_requests_total{method="add",outcome="ok"} 1' in metrics
    assert "warren_worker_consuming 1" in metrics
