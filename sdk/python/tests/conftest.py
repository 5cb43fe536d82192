"""Fixtures of the SDK's interop tests: the broker, warren's Rust binaries, responders, and raw AMQP helpers.

Run with sdk/python/run-tests. Needs RabbitMQ at $WARREN_BROKER_URI (management API at $WARREN_MANAGEMENT_URI) and
the debug binaries `warren` and `warren-worker` in $WARREN_BIN_DIR (default: $CARGO_TARGET_DIR/debug, else
~/.cache/warren/cargo-target/debug, else target/debug).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid

import aio_pika
import pytest

import warren

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
BROKER_URI = os.environ.get("WARREN_BROKER_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")
MANAGEMENT_URI = os.environ.get("WARREN_MANAGEMENT_URI", "http://guest:guest@127.0.0.1:15672")


def _bin_dir() -> pathlib.Path:
    if os.environ.get("WARREN_BIN_DIR"):
        return pathlib.Path(os.environ["WARREN_BIN_DIR"])
    candidates = []
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(pathlib.Path(os.environ["CARGO_TARGET_DIR"]) / "debug")
    candidates += [pathlib.Path.home() / ".cache" / "warren" / "cargo-target" / "debug", ROOT / "target" / "debug"]
    for candidate in candidates:
        if (candidate / "warren-worker").is_file():
            return candidate
    return candidates[0]


BIN_DIR = _bin_dir()


def binary(name: str) -> str:
    path = BIN_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} does not exist: build it (cargo build --workspace --bins) or set WARREN_BIN_DIR")
    return str(path)


def unique_queue(what: str) -> str:
    return f"warren-sdk-test.{what}.{uuid.uuid4().hex[:12]}"


# --- raw AMQP, with aio-pika (the SDK's own dependency) ---------------------------------------------------------


def run(coroutine):
    return asyncio.run(coroutine)


async def _with_channel(action):
    connection = await aio_pika.connect(BROKER_URI)
    try:
        channel = await connection.channel()
        return await action(channel)
    finally:
        await connection.close()


def queue_state(queue: str):
    """(messages ready, consumers) from a passive declare, or None when the queue does not exist."""
    async def probe(channel):
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except Exception:  # noqa: BLE001 - NOT_FOUND closes the channel
            return None
        return declared.declaration_result.message_count, declared.declaration_result.consumer_count
    return run(_with_channel(probe))


def delete_queues(*queues: str) -> None:
    async def main():
        connection = await aio_pika.connect(BROKER_URI)
        try:
            for queue in queues:
                channel = await connection.channel()
                try:
                    await channel.queue_delete(queue)
                    await channel.close()
                except Exception:  # noqa: BLE001 - missing is fine
                    pass
        finally:
            await connection.close()
    run(main())


def declare_queue(queue: str, arguments=None, durable=True, exclusive=False) -> None:
    async def declare(channel):
        await channel.declare_queue(queue, durable=durable, exclusive=exclusive, arguments=arguments)
    run(_with_channel(declare))


def raw_call(queue: str, body: bytes, *, timeout: float = 10.0, reply: bool = True, **properties):
    """Publishes one request with exactly these properties (aio_pika.Message keywords) and returns the reply as
    (message, body), or None when ``reply`` is False (waits briefly, asserting none came)."""
    async def main():
        connection = await aio_pika.connect(BROKER_URI)
        try:
            channel = await connection.channel()
            replies = asyncio.Queue()
            reply_queue = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
            await reply_queue.consume(replies.put, no_ack=True)
            correlation_id = str(uuid.uuid4())
            properties.setdefault("correlation_id", correlation_id)
            if reply:
                properties.setdefault("reply_to", "amq.rabbitmq.reply-to")
            await channel.default_exchange.publish(aio_pika.Message(body, **properties), routing_key=queue)
            if not reply:
                return None
            message = await asyncio.wait_for(replies.get(), timeout)
            assert message.correlation_id == properties["correlation_id"]
            return message, message.body
        finally:
            await connection.close()
    return run(main())


# --- the management API -----------------------------------------------------------------------------------------


def management(path: str, method: str = "GET"):
    parsed = urllib.parse.urlsplit(MANAGEMENT_URI)
    url = f"{parsed.scheme}://{parsed.hostname}:{parsed.port or 15672}{path}"
    request = urllib.request.Request(url, method=method)
    credentials = f"{urllib.parse.unquote(parsed.username or 'guest')}:{urllib.parse.unquote(parsed.password or 'guest')}"
    request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        data = response.read()
    return json.loads(data) if data else None


def close_connections(connection_name: str, wait: float = 20.0) -> int:
    """Closes (from the broker's side) every connection whose client named it ``connection_name``."""
    deadline = time.monotonic() + wait
    while True:  # the management API lists a connection a few seconds after it opened
        named = [c for c in management("/api/connections")
                 if (c.get("client_properties") or {}).get("connection_name") == connection_name]
        if named or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for connection in named:
        management("/api/connections/" + urllib.parse.quote(connection["name"], safe=""), method="DELETE")
    return len(named)


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture
def queues():
    """Queue names made for this test (`queues.new("what")`), deleted with their `.dead` queues afterwards."""
    made = []

    class Queues:
        def new(self, what: str) -> str:
            queue = unique_queue(what)
            made.append(queue)
            return queue

        def track(self, queue: str) -> str:
            made.append(queue)
            return queue

    yield Queues()
    delete_queues(*[name for queue in made for name in (queue, queue + ".dead")])


@pytest.fixture
def client():
    with warren.Client(BROKER_URI) as client:
        yield client


@pytest.fixture
def worker(tmp_path, queues):
    """Starts `warren-worker --handler builtin --declare` on a fresh queue; returns the queue once consuming."""
    started = []

    def start(*extra_args, what="worker"):
        queue = queues.new(what)
        log_path = tmp_path / f"{queue}.log"
        log = open(log_path, "wb")
        process = subprocess.Popen(
            [binary("warren-worker"), "--queue", queue, "--handler", "builtin", "--declare",
             "--broker-uri", BROKER_URI, "--metrics-addr", "127.0.0.1:0", *extra_args],
            stdout=log, stderr=subprocess.STDOUT)
        started.append((process, log))
        wait_consumers(queue, 1, process=process, log_path=log_path)
        return queue

    yield start
    for process, log in started:
        stop_process(process)
        log.close()


@pytest.fixture
def responder(queues):
    """Starts the SDK's responder in a thread of this process (`start_server`) on a fresh queue; returns the
    ServerThread (its queue: `.server.queue`)."""
    started = []

    def start(methods, what="py-responder", **options):
        queue = options.pop("queue", None) or queues.new(what)
        options.setdefault("broker_uri", BROKER_URI)
        options.setdefault("declare", True)
        thread = warren.start_server(queue, methods, handle_signals=False, **options)
        started.append(thread)
        return thread

    yield start
    for thread in started:
        assert thread.stop(30), "the responder did not stop"


def wait_consumers(queue: str, count: int, timeout: float = 30.0, process=None, log_path=None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = queue_state(queue)
        if state is not None and state[1] >= count:
            return
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            log = log_path.read_text(errors="replace") if log_path is not None else ""
            pytest.fail(f"{queue} has no {count} consumers (state {state}):\n{log}")
        time.sleep(0.05)


def stop_process(process, timeout: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def warren_cli(*args, timeout=60):
    """Runs the Rust `warren` CLI."""
    return subprocess.run([binary("warren"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WARREN_BROKER_URI": BROKER_URI})


def python_responder(tmp_path, module_source: str, queue: str, *extra_args, env=None):
    """Starts `python -m warren serve app` in a subprocess with `module_source` as app.py and only the env vars a
    pod gets (WARREN_BROKER_URI, WARREN_QUEUE, ...); returns (process, log path)."""
    app_dir = tmp_path / f"app-{uuid.uuid4().hex[:6]}"
    app_dir.mkdir()
    (app_dir / "app.py").write_text(module_source)
    log_path = app_dir / "responder.log"
    process_env = {key: value for key, value in os.environ.items() if not key.startswith("WARREN_")}
    process_env.update({"WARREN_BROKER_URI": BROKER_URI, "WARREN_QUEUE": queue, "PYTHONUNBUFFERED": "1"})
    process_env.update(env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "warren", "serve", "app", *extra_args], cwd=app_dir,
                                   env=process_env, stdout=log, stderr=subprocess.STDOUT)
    return process, log_path
