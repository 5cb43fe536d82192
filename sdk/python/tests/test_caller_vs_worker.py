"""The SDK's caller against the Rust warren-worker (builtin handlers: echo, add, sleep, fail)."""

import asyncio
import threading
import time

import pytest

import warren
from conftest import BROKER_URI, close_connections, declare_queue


def test_call_with_positional_and_named_params(worker, client):
    queue = worker()
    assert client.call(queue, "add", 1, 2) == 3
    assert client.call(queue, "add", a=40, b=2) == 42
    assert client.call(queue, "add", 0.5, 0.25) == 0.75
    assert client.call(queue, "echo", {"nested": [1, "two", None]}) == [{"nested": [1, "two", None]}]
    assert client.request(queue, "echo", {"raw": True}) == {"raw": True}


def test_the_service_proxy_makes_the_worker_look_local(worker, client):
    queue = worker()
    calc = client.service(queue)
    assert calc.add(1, 2) == 3
    assert calc.add(a=1, b=2) == 3
    assert calc.echo("x", timeout=2) == ["x"]
    assert calc.call("add", 20, 22) == 42


def test_module_level_call_and_service_use_warren_broker_uri(worker, monkeypatch):
    queue = worker()
    monkeypatch.setenv("WARREN_BROKER_URI", BROKER_URI)
    warren.set_default_client(None)
    try:
        assert warren.call(queue, "add", 1, 2) == 3
        assert warren.service(queue).add(2, 3) == 5
    finally:
        warren.default_client().close()
        warren.set_default_client(None)


def test_the_default_method_is_called_when_method_is_none(worker, client):
    queue = worker("--default-method", "add")
    assert client.call(queue, None, 20, 22) == 42


def test_error_replies_raise_remote_error_with_code_message_and_details(worker, client):
    queue = worker()
    with pytest.raises(warren.RemoteError) as error:
        client.call(queue, "no_such_method", 1, 2)
    assert error.value.code == "unknown_method"
    assert "no_such_method" in error.value.message
    with pytest.raises(warren.RemoteError) as error:
        client.call(queue, "add", "one", 2)
    assert error.value.code == "bad_request"
    with pytest.raises(warren.RemoteError) as error:
        client.call(queue, "fail", why="testing")
    assert (error.value.code, error.value.message, error.value.details) == (
        "handler_error", "fail always fails", {"why": "testing"})


def test_a_call_that_outlives_its_timeout_raises_timeout_and_the_late_reply_is_dropped(worker, client):
    queue = worker()
    started = time.monotonic()
    with pytest.raises(warren.Timeout):
        client.call(queue, "sleep", ms=1500, timeout=0.3)
    assert time.monotonic() - started < 1.2
    assert isinstance(warren.Timeout("x"), TimeoutError)
    # The worker still answers after 1.5 s: the client drops the reply and keeps working.
    deadline = time.monotonic() + 10
    while client.unmatched_replies < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.unmatched_replies == 1
    assert client.call(queue, "add", 1, 1) == 2


def test_a_missing_service_fails_at_once_with_no_such_service(client, queues):
    missing = queues.new("missing")
    started = time.monotonic()
    with pytest.raises(warren.NoSuchService) as error:
        client.call(missing, "add", 1, 2, timeout=60)
    assert time.monotonic() - started < 5
    assert error.value.service == missing
    with pytest.raises(warren.NoSuchService):
        client.notify(missing, "add", 1, 2)


def test_a_full_queue_rejects_at_once(client, queues):
    full = queues.new("full")
    declare_queue(full, {"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"})
    # Nobody consumes. A quorum queue's limit is soft: it may take one request more before it refuses.
    for _ in range(5):
        try:
            client.notify(full, "add", 1, 2)
        except warren.Rejected:
            break
    else:
        pytest.fail("the full queue took every one-way request")
    started = time.monotonic()
    with pytest.raises(warren.Rejected):
        client.call(full, "add", 1, 2, timeout=60)
    assert time.monotonic() - started < 5


def test_many_concurrent_calls_on_one_asyncio_connection(worker):
    queue = worker("--prefetch", "64")

    async def main():
        async with warren.AsyncClient(BROKER_URI) as client:
            calc = client.service(queue)
            results = await asyncio.gather(*(calc.add(i, i) for i in range(1000)))
            assert results == [2 * i for i in range(1000)]
            # A mix of outcomes in flight together, each matched to its own call.
            outcomes = await asyncio.gather(calc.add(1, 2), calc.fail(1), calc.echo(7), calc.nope(),
                                            return_exceptions=True)
            assert outcomes[0] == 3 and outcomes[2] == [7]
            assert outcomes[1].code == "handler_error" and outcomes[3].code == "unknown_method"
            assert client._sessions == 1  # one connection for all of them

    asyncio.run(main())


def test_a_blocking_client_is_shared_by_threads(worker, client):
    queue = worker("--prefetch", "64")
    results, failures = {}, []

    def caller(n):
        try:
            for i in range(50):
                results[(n, i)] = client.call(queue, "add", n, i)
        except Exception as error:  # noqa: BLE001
            failures.append(error)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert results == {(n, i): n + i for n in range(8) for i in range(50)}


def test_one_way_calls_are_taken_by_the_broker(worker, client):
    queue = worker()
    client.notify(queue, "add", 1, 2)
    client.service(queue).notify("echo", "fire and forget", ttl=10)
    assert client.call(queue, "add", 1, 1) == 2  # the worker acked the one-way calls and goes on


def test_a_lost_connection_fails_waiting_calls_and_the_next_call_reconnects(worker):
    queue = worker()
    name = f"warren-sdk-test-caller-{time.monotonic_ns()}"
    with warren.Client(BROKER_URI, name=name) as client:
        assert client.call(queue, "add", 1, 2) == 3
        failed = []
        waiting = threading.Thread(target=lambda: failed.append(_expect(client, queue, warren.ConnectionLost)))
        waiting.start()
        time.sleep(0.3)
        assert close_connections(name) == 1
        waiting.join(20)
        assert failed == [True]
        deadline = time.monotonic() + 10
        while True:  # within a second (one attempt per second after a failed one), calls work again
            try:
                assert client.call(queue, "add", 2, 2) == 4
                break
            except warren.ConnectionLost:
                assert time.monotonic() < deadline
                time.sleep(0.2)


def _expect(client, queue, exception):
    try:
        client.call(queue, "sleep", ms=5000, timeout=15)
    except exception:
        return True
    return False
