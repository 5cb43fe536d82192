"""warren speaks the protocol of docs/protocol.md with programs that know nothing else: Python and pika.

Run with tests/python/run (it installs pika and pytest into a venv under ~/.cache/warren).
"""

import json
import time
import uuid

import pika
import pytest

from conftest import unique_queue, warren

# --- (a) a pika caller written from docs/protocol.md calls a warren worker -------------------------------------


def test_the_protocol_pages_caller_calls_a_warren_worker(protocol, worker, connection):
    queue = worker()
    caller = protocol.WarrenCaller(connection)
    assert caller.call(queue, "add", [1, 2]) == 3
    assert caller.call(queue, "add", {"a": 40, "b": 2}) == 42
    assert caller.call(queue, "echo", {"nested": [1, "two", None]}) == {"nested": [1, "two", None]}


def test_an_unknown_method_gets_an_unknown_method_error(protocol, worker, connection):
    queue = worker()
    caller = protocol.WarrenCaller(connection)
    with pytest.raises(protocol.RemoteError) as error:
        caller.call(queue, "no_such_method", [1, 2])
    assert error.value.code == "unknown_method"
    assert error.value.message


def test_error_replies_carry_x_status_error_and_the_error_object(worker, connection):
    queue = worker()
    props, body = raw_call(connection, queue, "no_such_method", [1, 2])
    assert props.headers["x-status"] == "error"
    assert props.content_type == "application/json"
    error = json.loads(body)
    assert error["code"] == "unknown_method"
    assert isinstance(error["message"], str)

    props, body = raw_call(connection, queue, "add", [1, 2], traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert props.headers["x-status"] == "ok"
    assert json.loads(body) == 3
    assert props.headers["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_bad_params_and_handler_failures_have_their_codes(protocol, worker, connection):
    queue = worker()
    caller = protocol.WarrenCaller(connection)
    with pytest.raises(protocol.RemoteError) as error:
        caller.call(queue, "add", ["one", 2])
    assert error.value.code == "bad_request"
    with pytest.raises(protocol.RemoteError) as error:
        caller.call(queue, "fail", {"why": "testing"})
    assert error.value.code == "handler_error"


def test_a_request_past_its_deadline_is_not_run(worker, connection):
    queue = worker()
    past = int(time.time() * 1000) - 60_000
    props, body = raw_call(connection, queue, "add", [1, 2], headers={"x-deadline": past})
    assert props.headers["x-status"] == "error"
    assert json.loads(body)["code"] == "deadline_exceeded"


def test_a_call_to_a_missing_queue_fails_at_once(protocol, connection):
    caller = protocol.WarrenCaller(connection)
    with pytest.raises(protocol.NoSuchService):
        caller.call(unique_queue("missing"), "add", [1, 2], timeout=60)


def raw_call(connection, queue, method, params, headers=None, traceparent=None, timeout=10):
    """One call with nothing but pika, to look at the reply's properties."""
    channel = connection.channel()
    replies = []
    channel.basic_consume("amq.rabbitmq.reply-to", lambda ch, d, p, b: replies.append((p, b)), auto_ack=True)
    headers = dict(headers or {})
    if traceparent:
        headers["traceparent"] = traceparent
    correlation_id = str(uuid.uuid4())
    channel.basic_publish("", queue, json.dumps(params), pika.BasicProperties(
        content_type="application/json", type=method, correlation_id=correlation_id,
        reply_to="amq.rabbitmq.reply-to", headers=headers or None,
    ))
    deadline = time.monotonic() + timeout
    while not replies and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)
    channel.close()
    assert replies, f"no reply from {queue}"
    props, body = replies[0]
    assert props.correlation_id == correlation_id
    return props, body


# --- (b) the pika responder of docs/protocol.md answers `warren call` --------------------------------------------


def divide(a, b):
    if b == 0:
        raise ZeroDivisionError("division by zero")
    return a / b


CALCULATOR = {"add": lambda a, b: a + b, "divide": divide, "echo": lambda *args: list(args)}


def test_warren_call_is_answered_by_the_protocol_pages_responder(pika_responder):
    queue = pika_responder(CALCULATOR)
    done = warren("call", queue, "add", "[1, 2]")
    assert (done.returncode, done.stdout.strip()) == (0, "3"), done.stderr
    done = warren("call", queue, "add", '{"a": 1, "b": 2}')
    assert (done.returncode, done.stdout.strip()) == (0, "3"), done.stderr
    done = warren("call", queue, "echo", '["x", {"y": null}]')
    assert json.loads(done.stdout) == ["x", {"y": None}], done.stderr


def test_warren_call_reports_remote_errors_with_code_and_message(pika_responder):
    queue = pika_responder(CALCULATOR)
    done = warren("call", queue, "divide", "[1, 0]")
    assert done.returncode == 1
    assert "handler_error" in done.stderr and "division by zero" in done.stderr
    assert done.stdout == ""
    done = warren("call", queue, "multiply", "[2, 3]")
    assert done.returncode == 1
    assert "unknown_method" in done.stderr
    done = warren("call", queue, "add", "[1]")
    assert done.returncode == 1
    assert "bad_request" in done.stderr


def test_warren_call_with_dash_calls_the_default_method(pika_responder):
    queue = pika_responder(CALCULATOR, default_method="add")
    done = warren("call", queue, "-", "[20, 22]")
    assert (done.returncode, done.stdout.strip()) == (0, "42"), done.stderr


def test_warren_call_exit_codes_for_missing_and_silent_services(connection):
    done = warren("call", unique_queue("missing"), "add", "[1, 2]", "--timeout", "60s")
    assert done.returncode == 4, done.stderr
    silent = unique_queue("silent")
    connection.channel().queue_declare(silent, exclusive=True)
    done = warren("call", silent, "add", "[1, 2]", "--timeout", "200ms")
    assert done.returncode == 3, done.stderr
    done = warren("call", silent, "add", "not json")
    assert done.returncode == 2


# --- (c) a RabbitMQ-tutorial-style caller is served by a worker's default method ---------------------------------


class TutorialRpcClient:
    """The RabbitMQ tutorial's RPC client (tutorial six, Python), with JSON bodies: its own exclusive reply queue, a
    correlation id, no `type`, no headers."""

    def __init__(self, connection, queue):
        self.connection = connection
        self.queue = queue
        self.channel = connection.channel()
        result = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue = result.method.queue
        self.channel.basic_consume(queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True)
        self.response = None
        self.corr_id = None

    def on_response(self, ch, method, props, body):
        if self.corr_id == props.correlation_id:
            self.response = body

    def call(self, params, timeout=30):
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange="",
            routing_key=self.queue,
            properties=pika.BasicProperties(reply_to=self.callback_queue, correlation_id=self.corr_id),
            body=json.dumps(params),
        )
        deadline = time.monotonic() + timeout  # the tutorial waits forever; a test must not
        while self.response is None and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.2)
        assert self.response is not None, "no reply"
        return json.loads(self.response)


def test_a_tutorial_style_client_is_served_by_the_default_method(worker, connection):
    queue = worker("--default-method", "add")
    client = TutorialRpcClient(connection, queue)
    assert client.call([1, 2]) == 3
    assert client.call([20, 22]) == 42
    assert client.call({"a": 0.5, "b": 0.25}) == 0.75
