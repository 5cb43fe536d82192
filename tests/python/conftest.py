"""Fixtures for the interop tests: the broker, warren's binaries, workers, and the pika code of docs/protocol.md."""

import os
import pathlib
import re
import signal
import subprocess
import threading
import time
import types
import uuid

import pika
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BROKER_URI = os.environ.get("WARREN_BROKER_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")
BIN_DIR = pathlib.Path(os.environ.get("WARREN_BIN_DIR", ROOT / "target" / "debug"))


def binary(name):
    path = BIN_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} does not exist: build it (cargo build -p warren-client -p warren-worker) "
                    f"or point WARREN_BIN_DIR at the binaries")
    return str(path)


def connect():
    return pika.BlockingConnection(pika.URLParameters(BROKER_URI))


def unique_queue(what):
    return f"warren-py-test.{what}.{uuid.uuid4().hex[:12]}"


def consumer_count(queue):
    """The queue's consumers, or None while it does not exist (a passive declare answers at once)."""
    connection = connect()
    try:
        return connection.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return None
    finally:
        if connection.is_open:
            connection.close()


@pytest.fixture
def connection():
    connection = connect()
    yield connection
    if connection.is_open:
        connection.close()


@pytest.fixture(scope="session")
def protocol():
    """The ```python blocks of docs/protocol.md, executed: the caller and responder a reader of that page writes."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) == 2, "docs/protocol.md has a caller and a responder example"
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/protocol.md", "exec"), namespace)
    return types.SimpleNamespace(**namespace)


@pytest.fixture
def worker(tmp_path):
    """Starts `warren-worker --handler builtin --declare` on a fresh queue and returns the queue once consuming."""
    started = []

    def start(*extra_args, what="worker"):
        queue = unique_queue(what)
        log = open(tmp_path / f"{queue}.log", "wb")
        process = subprocess.Popen(
            [binary("warren-worker"), "--queue", queue, "--handler", "builtin", "--declare",
             "--broker-uri", BROKER_URI, "--metrics-addr", "127.0.0.1:0", *extra_args],
            stdout=log, stderr=subprocess.STDOUT,
        )
        started.append((process, queue, log))
        deadline = time.monotonic() + 30
        while (consumer_count(queue) or 0) < 1:
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"warren-worker did not start consuming {queue}:\n"
                            + (tmp_path / f"{queue}.log").read_text(errors="replace"))
            time.sleep(0.05)
        return queue

    yield start
    for process, queue, log in started:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        cleanup = connect()
        channel = cleanup.channel()
        for name in (queue, queue + ".dead"):
            channel.queue_delete(name)
        cleanup.close()


@pytest.fixture
def pika_responder(protocol):
    """Runs the responder of docs/protocol.md in a thread on a fresh queue and returns the queue."""
    running = []

    def start(methods, default_method=None):
        queue = unique_queue("pika-responder")
        connection = connect()
        channel = connection.channel()
        channel.queue_declare(queue, exclusive=True, auto_delete=True)
        def serve():
            protocol.serve(channel, queue, methods, default_method=default_method)
            connection.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        running.append((connection, channel, thread))
        return queue

    yield start
    for connection, channel, thread in running:
        connection.add_callback_threadsafe(channel.stop_consuming)
        thread.join(timeout=10)


def warren(*args, timeout=60):
    """Runs the `warren` CLI and returns the completed process."""
    return subprocess.run([binary("warren"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WARREN_BROKER_URI": BROKER_URI})
