"""Pure parts: the names and encodings of docs/protocol.md, the queue arguments, backoff, packaging."""

import datetime
import pathlib

import pytest

import warren
from warren import protocol
from warren._amqp import Backoff, broker_uris


def test_params_are_an_array_or_an_object_never_both():
    assert protocol.encode_params((1, 2), {}) == [1, 2]
    assert protocol.encode_params((), {"a": 1}) == {"a": 1}
    assert protocol.encode_params((), {}) == []
    with pytest.raises(TypeError):
        protocol.encode_params((1,), {"b": 2})


def test_json_is_strict_and_an_empty_body_is_null():
    assert protocol.dumps({"é": [1, None]}) == '{"é":[1,null]}'.encode()
    with pytest.raises(ValueError):
        protocol.dumps(float("nan"))
    assert protocol.loads(b"  \n") is None
    assert protocol.is_json(None) and protocol.is_json("application/json; charset=utf-8")
    assert protocol.is_json("Application/JSON") and not protocol.is_json("application/msgpack")


def test_deadline_header_accepts_every_integer_width_and_strings():
    for value in (42, 42.0, "42", b"42", " 42 "):
        assert protocol.header_int({"x-deadline": value}, "x-deadline") == 42, value
    stamp = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    assert protocol.header_int({"x-deadline": stamp}, "x-deadline") == int(stamp.timestamp() * 1000)
    for value in ("soon", True, None, float("nan"), [1]):
        assert protocol.header_int({"x-deadline": value}, "x-deadline") is None, value
    assert protocol.header_int(None, "x-deadline") is None


def test_replies_without_x_status_are_ok_and_error_replies_need_an_error_object():
    assert protocol.decode_reply(None, None, b"3") == (True, 3)
    assert protocol.decode_reply({"x-status": b"ok"}, "application/json", b"") == (True, None)
    assert protocol.decode_reply({"x-status": "error"}, None, b'{"code": "x", "message": "m", "details": null}') \
        == (False, ("x", "m", None))
    for headers, content_type, body in [({"x-status": "error"}, None, b'"oops"'),
                                        ({"x-status": "error"}, None, b'{"code": 1, "message": "m"}'),
                                        (None, "application/msgpack", b"\x01"),
                                        (None, None, b"{not json")]:
        with pytest.raises(ValueError):
            protocol.decode_reply(headers, content_type, body)


def test_queue_arguments_are_those_of_client_src_topology_rs():
    assert protocol.request_queue_arguments("default.calc") == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "default.calc.dead",
        "x-delivery-limit": 5,
    }
    classic = protocol.request_queue_arguments("q", "classic", 3, max_length=10, message_ttl_ms=30_000)
    assert "x-delivery-limit" not in classic
    assert classic["x-max-length"] == 10 and classic["x-overflow"] == "reject-publish"
    assert classic["x-message-ttl"] == 30_000
    assert protocol.dead_letter_queue_arguments() == {"x-queue-type": "quorum"}
    with pytest.raises(ValueError):
        protocol.request_queue_arguments("q", "stream")


def test_expiration_is_whole_milliseconds_within_what_rabbitmq_takes():
    assert protocol.expiration_ms(2.5) == 2500
    assert protocol.expiration_ms(0.0001) == 1
    assert protocol.expiration_ms(10**10) == 4294967295


def test_backoff_grows_exponentially_with_jitter_and_caps():
    backoff = Backoff(0.1, 5.0)
    assert backoff.delay(0, 1.0) == pytest.approx(0.1)
    assert backoff.delay(3, 1.0) == pytest.approx(0.8)
    assert backoff.delay(10, 1.0) == pytest.approx(5.0)
    assert backoff.delay(2, 0.0) == pytest.approx(0.2)
    for attempt in range(40):
        assert backoff.delay(attempt, 1.0) / 2 <= backoff.delay(attempt) <= backoff.delay(attempt, 1.0)


def test_broker_uris_come_from_the_argument_or_warren_broker_uri(monkeypatch):
    monkeypatch.setenv("WARREN_BROKER_URI", "amqp://a:5672/%2f, amqp://b:5672/%2f")
    assert broker_uris() == ["amqp://a:5672/%2f", "amqp://b:5672/%2f"]
    assert broker_uris(["amqp://c/"]) == ["amqp://c/"]
    monkeypatch.delenv("WARREN_BROKER_URI")
    assert broker_uris() == ["amqp://guest:guest@127.0.0.1:5672/%2f"]


def test_a_multi_host_uri_names_one_node_a_host_and_a_comma_in_a_password_stays_in_it():
    # The broker Secret's `uri` for a cluster, as warren-worker and the operator read it (docs/operations.md).
    assert protocol.split_uris("amqp://u:p@n1:5672,n2:5673,n3/%2f?heartbeat=5") == [
        "amqp://u:p@n1:5672/%2f?heartbeat=5", "amqp://u:p@n2:5673/%2f?heartbeat=5", "amqp://u:p@n3/%2f?heartbeat=5"]
    assert protocol.split_uris("amqp://u:p,w@n1/v,amqps://x:y@n2/v") == ["amqp://u:p,w@n1/v", "amqps://x:y@n2/v"]
    assert protocol.split_uris(["amqp://u@a,b"]) == ["amqp://u@a", "amqp://u@b"]
    with pytest.raises(ValueError):
        protocol.split_uris(" , ")


def test_expose_registers_by_name_and_keeps_the_function():
    registry = warren.Registry()

    @registry.expose
    def add(a, b):
        return a + b

    @registry.expose("renamed")
    def original():
        pass

    @registry.expose(name="also")
    async def coroutine():
        pass

    assert add(1, 2) == 3  # still the plain function
    assert registry.names() == ["add", "also", "renamed"]
    assert registry.methods["also"].is_async and not registry.methods["add"].is_async


def test_the_installed_package_is_typed():
    assert (pathlib.Path(warren.__file__).parent / "py.typed").is_file()
    assert "site-packages" in warren.__file__, "run-tests installs the SDK as a user would (not editable)"
