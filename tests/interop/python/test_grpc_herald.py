"""Herald's own server API methods over gRPC, `herald.api.HeraldApi` (docs/grpc.md), judged by
`grpcio` with stubs generated at test time from the published `proto/herald/api.proto`: the
webhook methods end to end (an endpoint created over gRPC, a delivery to a local receiver
listed with its attempts, a failed one replayed), a push's statuses and the device removals
(compared with the HTTP API's: one layer under both), keys and scopes, a bad argument in the
`error` field, health and reflection. Also the listener's HTTP/2 keep-alive: a raw h2 client
that stops answering PINGs has its connection closed.

One herald is shared by the module: gRPC, push (no provider credentials: a send ends `failed`)
and webhooks on, a `read` scoped key, and HTTP/2 keep-alive every second.
"""

from __future__ import annotations

import socket
import struct
import time
import uuid
from typing import Any, Callable, Iterator, Optional, Tuple

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import HeraldInstance, random_token
from push_fixtures import Api
from test_grpc import compile_stubs
from test_webhooks import Receiver

BAD_REQUEST = 107
SERVICE = "herald.api.HeraldApi"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Stack:
    def __init__(self, herald: HeraldInstance, read_key: str, pb: Any, pb_grpc: Any) -> None:
        self.herald, self.read_key, self.pb = herald, read_key, pb
        self.channel = grpc.insecure_channel(herald.url.removeprefix("http://"))
        self.api = pb_grpc.HeraldApiStub(self.channel)
        self.http = Api(herald)

    def call(self, method: str, request: Any, key: Optional[str] = None) -> Any:
        key = self.herald.api_key if key is None else key
        metadata = (("authorization", f"apikey {key}"),) if key else ()
        return getattr(self.api, method)(request, metadata=metadata, timeout=10)

    def ok(self, method: str, request: Any) -> Any:
        reply = self.call(method, request)
        assert not reply.HasField("error"), f"{method}: {reply.error}"
        return reply.result


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pb, pb_grpc = compile_stubs(tmp_path_factory.mktemp("stubs"), "herald/api.proto")
    read_key = random_token(32)
    extra = f"""
[grpc_api]
enabled = true

[server]
http2_keepalive_interval = "1s"
http2_keepalive_timeout = "1s"

[push]
enabled = true
poll_interval = "100ms"

[webhooks]
enabled = true
allow_private_addresses = true
retry_schedule = ["100ms"]
timeout = "2s"
lease = "7s"
poll_interval = "100ms"
refresh_interval = "1s"

[[api.named_keys]]
name = "reader"
key = "{read_key}"
scope = "read"
"""
    herald = HeraldInstance(tmp_path_factory.mktemp("herald"), extra_config=extra)
    herald.start()
    stack = Stack(herald, read_key, pb, pb_grpc)
    try:
        yield stack
    except BaseException:
        herald.kill()
        raise
    stack.channel.close()
    herald.stop()


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Webhooks


def test_webhook_endpoint_deliveries_attempts_and_replay(stack: Stack) -> None:
    pb = stack.pb
    receiver = Receiver([SECRET])
    endpoint = uniq("hook")
    prefix = uniq("gh")
    try:
        created = stack.ok("WebhookEndpointCreate", pb.WebhookEndpointCreateRequest(
            id=endpoint, url=receiver.url, events=["publication"], channels=[f"{prefix}-*"], secrets=[SECRET],
            timeout="1500ms", description="over gRPC"))
        assert created.endpoint.id == endpoint
        assert created.endpoint.secrets == [SECRET], "the create result shows the secret whole"
        assert created.endpoint.enabled and created.endpoint.timeout == "1500ms"
        listed = {e.id: e for e in stack.ok("WebhookEndpointList", pb.WebhookEndpointListRequest()).items}
        assert listed[endpoint].url == receiver.url and listed[endpoint].secrets != [SECRET], "redacted"
        # The same endpoint over HTTP: one layer under both.
        http_listed = {e["id"]: e for e in stack.http.call("webhook_endpoint_list", {})["items"]}
        assert http_listed[endpoint]["description"] == listed[endpoint].description == "over gRPC"

        # A delivery that succeeds, listed with its one attempt.
        stack.http.call("publish", {"channel": f"{prefix}-1", "data": {"n": 1}})
        receiver.wait_for("the first delivery", lambda d: len(d) >= 1)
        delivered = wait_for("a sent delivery", lambda: [
            d for d in stack.ok("WebhookDeliveries", pb.WebhookDeliveriesRequest(endpoint=endpoint)).items
            if d.state == "sent"])
        message = delivered[0].message
        assert message == receiver.snapshot()[0][0], "the delivery's message is the webhook-id"
        assert delivered[0].event.startswith("evt_") and delivered[0].endpoint == endpoint
        by_event = stack.ok("WebhookDeliveries", pb.WebhookDeliveriesRequest(event=delivered[0].event)).items
        assert [d.message for d in by_event] == [message]
        attempts = stack.ok("WebhookAttempts", pb.WebhookAttemptsRequest(message=message)).items
        assert [(a.attempt, a.status, a.endpoint) for a in attempts] == [(1, 200, endpoint)]

        # A delivery that fails for good (two attempts), then replayed once the receiver is back.
        receiver.status = 500
        stack.http.call("publish", {"channel": f"{prefix}-2", "data": {"n": 2}})
        failed = wait_for("a failed delivery", lambda: stack.ok("WebhookDeliveries", pb.WebhookDeliveriesRequest(
            endpoint=endpoint, states=["failed"])).items)
        lost = failed[0].message
        attempts = stack.ok("WebhookAttempts", pb.WebhookAttemptsRequest(message=lost)).items
        assert [(a.attempt, a.status) for a in attempts] == [(1, 500), (2, 500)]
        receiver.status = 200
        replayed = stack.ok("WebhookReplay", pb.WebhookReplayRequest(endpoint=endpoint, message=lost))
        assert replayed.replayed == 1
        receiver.wait_for("the replayed delivery", lambda d: lost in [webhook_id for webhook_id, _, _ in d])
        wait_for("the replay's third attempt", lambda: len(
            stack.ok("WebhookAttempts", pb.WebhookAttemptsRequest(message=lost)).items) == 3)

        # Update: fields set replace, an empty list is a value (not "unchanged").
        updated = stack.ok("WebhookEndpointUpdate", pb.WebhookEndpointUpdateRequest(
            id=endpoint, channels=pb.StringList(values=[]), enabled=False, description=""))
        assert list(updated.endpoint.channels) == [] and not updated.endpoint.enabled
        assert updated.endpoint.url == receiver.url and updated.endpoint.description == ""
        assert list(updated.endpoint.events) == ["publication"], "an unset list is unchanged"
        assert stack.ok("WebhookEndpointDelete", pb.WebhookEndpointDeleteRequest(id=endpoint)) == \
            pb.WebhookEndpointDeleteResult()
        assert endpoint not in [e.id for e in stack.ok("WebhookEndpointList", pb.WebhookEndpointListRequest()).items]
    finally:
        receiver.close()


def test_method_errors_are_the_error_field(stack: Stack) -> None:
    pb = stack.pb
    cases = [
        ("WebhookAttempts", pb.WebhookAttemptsRequest(message=""), "message is required"),
        ("WebhookDeliveries", pb.WebhookDeliveriesRequest(), "endpoint or event is required"),
        ("WebhookEndpointCreate", pb.WebhookEndpointCreateRequest(id=uniq("x"), url="ftp://nope", events=["*"]),
         "http"),
        ("WebhookReplay", pb.WebhookReplayRequest(endpoint=uniq("missing")), "not found"),
        ("PushStatus", pb.PushStatusRequest(), "uid, device_id or states is required"),
    ]
    for method, request, detail in cases:
        reply = stack.call(method, request)
        assert reply.HasField("error") and not reply.HasField("result"), method
        assert reply.error.code == BAD_REQUEST, (method, reply.error)
        assert reply.error.message.startswith("bad request: ") and detail in reply.error.message, reply.error
    # What cannot be the method's answer is a status, as in CentrifugoApi.
    for method, request in [("PushStatus", pb.PushStatusRequest(uid="u", limit=-1)),
                            ("WebhookEndpointCreate", pb.WebhookEndpointCreateRequest(id="a", timeout="soon"))]:
        with pytest.raises(grpc.RpcError) as raised:
            stack.call(method, request)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()


def test_keys_and_scopes(stack: Stack) -> None:
    pb = stack.pb
    for key in ("", "not-a-key-" + random_token(16)):
        with pytest.raises(grpc.RpcError) as raised:
            stack.call("WebhookEndpointList", pb.WebhookEndpointListRequest(), key=key)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # `x-api-key` works too.
    reply = stack.api.DeviceRemovals(pb.DeviceRemovalsRequest(), metadata=(("x-api-key", stack.herald.api_key),),
                                     timeout=10)
    assert not reply.HasField("error")
    # A read key may not call these methods, over gRPC as over HTTP (403).
    for method, request in [("WebhookEndpointList", pb.WebhookEndpointListRequest()),
                            ("PushStatus", pb.PushStatusRequest(uid="x")),
                            ("WebhookReplay", pb.WebhookReplayRequest(endpoint="x"))]:
        with pytest.raises(grpc.RpcError) as raised:
            stack.call(method, request, key=stack.read_key)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
        assert "read scope" in raised.value.details()
    http = stack.http.http.post(f"{stack.herald.api_url}/webhook_endpoint_list", json={},
                                headers={"X-API-Key": stack.read_key}, timeout=10)
    assert http.status_code == 403


# ---------------------------------------------------------------------------------------------
# Push


def test_push_status_and_device_removals(stack: Stack) -> None:
    pb = stack.pb
    user = uniq("user")
    device = stack.http.call("device_register", {"provider": "fcm", "token": uniq("token"), "platform": "android",
                                                 "user": user, "meta": {"k": "v"}})["id"]
    uid = stack.http.call("send_push_notification", {
        "recipient": {"filter": {"users": [user]}},
        "notification": {"fcm": {"message": {"notification": {"title": "Hi"}}}},
    })["uid"]

    def settled() -> Any:
        items = stack.ok("PushStatus", pb.PushStatusRequest(uid=uid)).items
        done = items and all(i.state not in ("queued", "sending") for i in items)
        return [i for i in items if i.kind == "push.fcm"] if done else None

    deliveries = wait_for("the push to settle", settled)
    assert [(d.recipient, d.state, d.uid) for d in deliveries] == [(device, "failed", uid)], deliveries
    by_device = stack.ok("PushStatus", pb.PushStatusRequest(device_id=device)).items
    assert [d.id for d in by_device] == [d.id for d in deliveries]
    http = [i for i in stack.http.call("push_status", {"uid": uid})["items"] if i["kind"] == "push.fcm"]
    assert [(i["id"], i["state"], i["attempts"], i["updated_at"]) for i in http] == \
        [(d.id, d.state, d.attempts, d.updated_at) for d in deliveries]

    stack.http.call("device_remove", {"ids": [device]})
    removals = stack.ok("DeviceRemovals", pb.DeviceRemovalsRequest(limit=1000)).items
    mine = [r for r in removals if r.device.id == device]
    assert len(mine) == 1 and mine[0].reason == "api", removals
    assert mine[0].device.user == user and dict(mine[0].device.meta) == {"k": "v"}
    assert mine[0].device.provider == "fcm" and mine[0].removed_at >= int(time.time()) - 60


# ---------------------------------------------------------------------------------------------
# Health and reflection


def test_health_and_reflection_name_the_service(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(stack.channel)
    assert SERVICE in set(database.get_services())
    described = database.FindFileContainingSymbol(SERVICE)
    assert described.package == "herald.api"
    assert "WebhookEndpointCreateRequest" in [m.name for m in described.message_type]


# ---------------------------------------------------------------------------------------------
# HTTP/2 keep-alive on the listener (server.http2_keepalive_interval / _timeout: 1 s here)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 4, 6, 7
ACK = 1


def frame(kind: int, flags: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", 0) + payload


def read_frame(sock: socket.socket) -> Optional[Tuple[int, int, bytes]]:
    """(type, flags, payload), or None at EOF."""
    def exactly(n: int) -> Optional[bytes]:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    header = exactly(9)
    if header is None:
        return None
    length = int.from_bytes(header[:3], "big")
    payload = exactly(length) if length else b""
    if payload is None:
        return None
    return header[3], header[4], payload


def h2_connection(stack: Stack, answer_pings: bool, seconds: float) -> Tuple[int, Optional[float], bool]:
    """A raw h2c connection that acknowledges SETTINGS and (or not) PINGs for up to `seconds`:
    (PINGs received, seconds until the server closed it or None, whether a GOAWAY came)."""
    host, port = stack.herald.url.removeprefix("http://").rsplit(":", 1)
    started = time.monotonic()
    pings, goaway = 0, False
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0))
        while time.monotonic() - started < seconds:
            sock.settimeout(max(0.05, seconds - (time.monotonic() - started)))
            try:
                received = read_frame(sock)
            except socket.timeout:
                break
            except ConnectionResetError:
                received = None
            if received is None:
                return pings, time.monotonic() - started, goaway
            kind, flags, payload = received
            if kind == SETTINGS and not flags & ACK:
                sock.sendall(frame(SETTINGS, ACK))
            elif kind == PING and not flags & ACK:
                pings += 1
                if answer_pings:
                    sock.sendall(frame(PING, ACK, payload))
            elif kind == GOAWAY:
                goaway = True
    return pings, None, goaway


def test_http2_keepalive_closes_a_peer_that_stops_answering_pings(stack: Stack) -> None:
    pings, closed_after, _ = h2_connection(stack, answer_pings=False, seconds=6)
    assert pings == 1, "one PING after a second of silence"
    assert closed_after is not None and closed_after < 4, f"closed after {closed_after}"
    # A peer that answers stays connected, pinged every second of silence.
    pings, closed_after, goaway = h2_connection(stack, answer_pings=True, seconds=3.5)
    assert closed_after is None and not goaway
    assert pings >= 2
