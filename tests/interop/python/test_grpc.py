"""The server API over gRPC (docs/grpc.md), judged by Google's `grpcio` with stubs generated at
test time from the published `proto/centrifugo/api.proto` (Centrifugo's `CentrifugoApi`
service), plus the official health-checking and reflection clients.

One herald with `[grpc_api] enabled = true` is shared by the module; it also has a `read` and a
`publish` scoped key, a small body limit (for the oversized-message tests) and a WebSocket client
(the `websockets` package, Centrifugo's JSON protocol) where a method acts on connections.
Results are compared with the HTTP API's for the same data: both are adapters over one layer.
"""

from __future__ import annotations

import base64
import importlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect as ws_connect

import conftest
from conftest import REPO, HeraldInstance, random_token
from push_fixtures import mint_token

BAD_REQUEST = 107
UNKNOWN_CHANNEL = 102
METHOD_NOT_FOUND = 104
MAX_BODY = 256 * 1024  # server.max_body_size below
SERVICE = "centrifugal.centrifugo.api.CentrifugoApi"


def compile_stubs(out: Path, proto: str = "centrifugo/api.proto") -> Tuple[Any, Any]:
    """The messages and stubs of `proto` (`centrifugo.api_pb2`, `centrifugo.api_pb2_grpc` by
    default) from proto/ with grpcio-tools' bundled protoc."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{REPO / 'proto'}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ]
    )
    assert code == 0, f"protoc failed on proto/{proto}"
    sys.path.insert(0, str(out))
    module = proto.removesuffix(".proto").replace("/", ".")
    return importlib.import_module(f"{module}_pb2"), importlib.import_module(f"{module}_pb2_grpc")


class Stack:
    def __init__(self, herald: HeraldInstance, read_key: str, publish_key: str, pb: Any, pb_grpc: Any) -> None:
        self.herald = herald
        self.read_key = read_key
        self.publish_key = publish_key
        self.pb = pb
        self.target = herald.url.removeprefix("http://")
        self.channel = grpc.insecure_channel(self.target)
        self.api = pb_grpc.CentrifugoApiStub(self.channel)
        self.metadata = (("authorization", f"apikey {herald.api_key}"),)

    def call(self, method: str, request: Any, key: str = "") -> Any:
        metadata = (("authorization", f"apikey {key}"),) if key else self.metadata
        return getattr(self.api, method)(request, metadata=metadata, timeout=10)

    def http(self, method: str, params: Dict[str, Any]) -> Dict[str, Any]:
        response = requests.post(
            f"{self.herald.api_url}/{method}", json=params, headers={"X-API-Key": self.herald.api_key}, timeout=10
        )
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pb, pb_grpc = compile_stubs(tmp_path_factory.mktemp("stubs"))
    read_key, publish_key = random_token(32), random_token(32)
    extra = f"""
[grpc_api]
enabled = true

[server]
max_body_size = {MAX_BODY}
max_publication_size = 65536

[[api.named_keys]]
name = "reader"
key = "{read_key}"
scope = "read"

[[api.named_keys]]
name = "publisher"
key = "{publish_key}"
scope = "publish"
"""
    herald = HeraldInstance(tmp_path_factory.mktemp("herald"), extra_config=extra)
    herald.start()
    stack = Stack(herald, read_key, publish_key, pb, pb_grpc)
    try:
        yield stack
    except BaseException:
        herald.kill()
        raise
    stack.channel.close()
    herald.stop()


def chan(prefix: str = "") -> str:
    return f"{prefix}grpc-{uuid.uuid4().hex[:10]}"


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


class WsClient:
    """A real-time client over the WebSocket (Centrifugo JSON protocol)."""

    def __init__(self, stack: Stack, user: str) -> None:
        url = stack.herald.url.replace("http://", "ws://") + "/connection/websocket"
        self.ws = ws_connect(url, open_timeout=10).__enter__()
        self.next_id = 0
        reply = self.command({"connect": {"token": mint_token(stack.herald.hmac_secret, user)}})
        self.client_id = reply["connect"]["client"]

    def command(self, body: Dict[str, Any]) -> Dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, **body}))
        while True:
            for line in self.ws.recv(timeout=10).splitlines():
                frame = json.loads(line)
                if frame.get("id") == self.next_id:
                    assert "error" not in frame, frame
                    return frame

    def pushes(self) -> Iterator[Dict[str, Any]]:
        while True:
            for line in self.ws.recv(timeout=10).splitlines():
                frame = json.loads(line)
                if "push" in frame:
                    yield frame["push"]

    def close(self) -> None:
        self.ws.close()


# ---------------------------------------------------------------------------------------------
# Every method


def test_publish_then_history_matches_the_http_api(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    first = stack.call("Publish", pb.PublishRequest(channel=ch, data=b'{"n":1}', tags={"k": "v"}))
    assert not first.HasField("error") and first.result.offset == 1 and first.result.epoch
    second = stack.call("Publish", pb.PublishRequest(channel=ch, data=b'{"n":2}'))
    assert second.result.offset == 2 and second.result.epoch == first.result.epoch
    history = stack.call("History", pb.HistoryRequest(channel=ch, limit=-1))
    assert [p.data for p in history.result.publications] == [b'{"n":1}', b'{"n":2}']
    assert [p.offset for p in history.result.publications] == [1, 2]
    assert dict(history.result.publications[0].tags) == {"k": "v"}
    assert (history.result.offset, history.result.epoch) == (2, first.result.epoch)
    over_http = stack.http("history", {"channel": ch, "limit": -1})["result"]
    assert [p["data"] for p in over_http["publications"]] == [{"n": 1}, {"n": 2}]
    assert over_http["epoch"] == history.result.epoch
    since = stack.call(
        "History",
        pb.HistoryRequest(channel=ch, limit=10, since=pb.StreamPosition(offset=1, epoch=first.result.epoch)),
    )
    assert [p.offset for p in since.result.publications] == [2]
    reverse = stack.call("History", pb.HistoryRequest(channel=ch, limit=1, reverse=True))
    assert [p.offset for p in reverse.result.publications] == [2]


def test_binary_b64data_comes_back_as_bytes(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    raw = bytes(range(256))
    stack.call("Publish", pb.PublishRequest(channel=ch, b64data=base64.b64encode(raw).decode()))
    history = stack.call("History", pb.HistoryRequest(channel=ch, limit=-1))
    assert history.result.publications[0].data == raw
    assert stack.http("history", {"channel": ch, "limit": -1})["result"]["publications"][0]["b64data"] == (
        base64.b64encode(raw).decode()
    )


def test_idempotency_key_publishes_once(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    for _ in range(3):
        stack.call("Publish", pb.PublishRequest(channel=ch, data=b"1", idempotency_key="once"))
    assert len(stack.call("History", pb.HistoryRequest(channel=ch, limit=-1)).result.publications) == 1


def test_broadcast_answers_per_channel(stack: Stack) -> None:
    pb = stack.pb
    a, b = chan(), chan()
    reply = stack.call("Broadcast", pb.BroadcastRequest(channels=[a, b, "nope:x"], data=b'"hi"'))
    assert not reply.HasField("error")
    first, second, third = reply.result.responses
    assert first.result.offset == 1 and second.result.offset == 1
    assert third.error.code == UNKNOWN_CHANNEL and not third.HasField("result")


def test_method_errors_are_in_the_error_field(stack: Stack) -> None:
    pb = stack.pb
    no_channel = stack.call("Publish", pb.PublishRequest(data=b"1"))
    assert no_channel.error.code == BAD_REQUEST and "channel is required" in no_channel.error.message
    assert not no_channel.HasField("result")
    no_data = stack.call("Publish", pb.PublishRequest(channel=chan()))
    assert no_data.error.code == BAD_REQUEST
    unknown = stack.call("Publish", pb.PublishRequest(channel="nope:x", data=b"1"))
    assert unknown.error.code == UNKNOWN_CHANNEL
    versioned = stack.call("Publish", pb.PublishRequest(channel=chan(), data=b"1", version=3))
    assert versioned.error.code == BAD_REQUEST and "not supported" in versioned.error.message
    presence_off = stack.call("Presence", pb.PresenceRequest(channel=chan()))
    assert presence_off.error.code == 108  # presence is off in the default namespace
    no_user = stack.call("Disconnect", pb.DisconnectRequest())
    assert no_user.error.code == BAD_REQUEST


def test_history_remove_keeps_the_position(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    stack.call("Publish", pb.PublishRequest(channel=ch, data=b"1"))
    removed = stack.call("HistoryRemove", pb.HistoryRemoveRequest(channel=ch))
    assert removed.HasField("result") and not removed.HasField("error")
    history = stack.call("History", pb.HistoryRequest(channel=ch, limit=-1))
    assert list(history.result.publications) == [] and history.result.offset == 1


def test_presence_channels_info_unsubscribe_and_disconnect_act_on_a_real_client(stack: Stack) -> None:
    pb, ch, user = stack.pb, chan("room:"), f"user-{uuid.uuid4().hex[:8]}"
    ws = WsClient(stack, user)
    try:
        ws.command({"subscribe": {"channel": ch}})
        presence = stack.call("Presence", pb.PresenceRequest(channel=ch))
        assert set(presence.result.presence) == {ws.client_id}
        assert presence.result.presence[ws.client_id].user == user
        stats = stack.call("PresenceStats", pb.PresenceStatsRequest(channel=ch))
        assert (stats.result.num_clients, stats.result.num_users) == (1, 1)
        channels = stack.call("Channels", pb.ChannelsRequest(pattern=ch))
        assert dict((k, v.num_clients) for k, v in channels.result.channels.items()) == {ch: 1}
        assert stack.http("channels", {"pattern": ch})["result"]["channels"] == {ch: {"num_clients": 1}}
        info = stack.call("Info", pb.InfoRequest())
        node = info.result.nodes[0]
        assert node.num_clients >= 1 and node.uid == stack.http("info", {})["result"]["nodes"][0]["uid"]

        unsubscribed = stack.call("Unsubscribe", pb.UnsubscribeRequest(channel=ch, user=user))
        assert unsubscribed.HasField("result")
        push = next(ws.pushes())
        assert push["channel"] == ch and "unsubscribe" in push, push

        disconnected = stack.call(
            "Disconnect", pb.DisconnectRequest(user=user, disconnect=pb.Disconnect(code=4000, reason="bye"))
        )
        assert disconnected.HasField("result")
        with pytest.raises(Exception) as closed:
            list(ws.pushes())
        assert getattr(closed.value, "rcvd", None) is not None and closed.value.rcvd.code == 4000
    finally:
        ws.close()


def test_revoke_token_and_invalidate_user_tokens(stack: Stack) -> None:
    pb = stack.pb
    revoked = stack.call("RevokeToken", pb.RevokeTokenRequest(uid="some-jti", expire_at=4_000_000_000))
    assert revoked.HasField("result") and not revoked.HasField("error")
    assert stack.call("RevokeToken", pb.RevokeTokenRequest()).error.code == BAD_REQUEST
    user = f"user-{uuid.uuid4().hex[:8]}"
    ws = WsClient(stack, user)  # a token issued now...
    try:
        invalidated = stack.call("InvalidateUserTokens", pb.InvalidateUserTokensRequest(user=user))
        assert invalidated.HasField("result")
    finally:
        ws.close()
    # ...is refused from now on: the connection is closed with 3500 (invalid token).
    with pytest.raises(ConnectionClosedError) as refused:
        WsClient(stack, user)
    assert refused.value.rcvd is not None and refused.value.rcvd.code == 3500
    unsupported = stack.call("InvalidateUserTokens", pb.InvalidateUserTokensRequest(user=user, channel="x"))
    assert unsupported.error.code == BAD_REQUEST


def test_methods_herald_does_not_have_are_unimplemented(stack: Stack) -> None:
    pb = stack.pb
    code, _ = status_of(lambda: stack.call("Subscribe", pb.SubscribeRequest(channel="x", user="u")))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    code, _ = status_of(lambda: stack.call("RPC", pb.RPCRequest(method="m")))
    assert code == grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------------------------------------
# Batch


def test_batch_runs_each_command_and_answers_in_order(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    commands = [pb.Command(publish=pb.PublishRequest(channel=ch, data=f'{{"i":{i}}}'.encode())) for i in range(3)]
    commands += [
        pb.Command(history=pb.HistoryRequest(channel=ch, limit=-1)),
        pb.Command(publish=pb.PublishRequest(channel="", data=b"1")),
        pb.Command(subscribe=pb.SubscribeRequest(channel=ch, user="u")),
        pb.Command(),
        pb.Command(info=pb.InfoRequest(), presence=pb.PresenceRequest(channel=ch)),
    ]
    replies = stack.call("Batch", pb.BatchRequest(commands=commands)).replies
    assert [r.publish.offset for r in replies[:3]] == [1, 2, 3]
    assert [p.offset for p in replies[3].history.publications] == [1, 2, 3]
    assert replies[4].error.code == BAD_REQUEST
    assert replies[5].error.code == METHOD_NOT_FOUND
    assert replies[6].error.code == BAD_REQUEST and replies[7].error.code == BAD_REQUEST
    parallel = stack.call(
        "Batch",
        pb.BatchRequest(
            commands=[pb.Command(publish=pb.PublishRequest(channel=chan(), data=b"1")) for _ in range(10)],
            parallel=True,
        ),
    )
    assert [r.publish.offset for r in parallel.replies] == [1] * 10


def test_batch_checks_each_commands_scope(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    replies = stack.call(
        "Batch",
        pb.BatchRequest(
            commands=[
                pb.Command(publish=pb.PublishRequest(channel=ch, data=b"1")),
                pb.Command(history=pb.HistoryRequest(channel=ch)),
            ]
        ),
        key=stack.read_key,
    ).replies
    assert replies[0].error.code == 103 and replies[1].HasField("history")


def test_batch_over_the_command_limit_is_resource_exhausted(stack: Stack) -> None:
    pb = stack.pb
    commands = [pb.Command(info=pb.InfoRequest()) for _ in range(1001)]
    code, details = status_of(lambda: stack.call("Batch", pb.BatchRequest(commands=commands)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1000" in details


# ---------------------------------------------------------------------------------------------
# Keys and scopes


def test_missing_or_wrong_key_is_unauthenticated(stack: Stack) -> None:
    pb = stack.pb
    request = pb.InfoRequest()
    code, details = status_of(lambda: stack.api.Info(request, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in details
    code, details = status_of(lambda: stack.call("Info", request, key="wrong-key-0123456789"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid API key" in details
    code, _ = status_of(
        lambda: stack.api.Info(request, metadata=(("authorization", f"bearer {stack.herald.api_key}"),), timeout=10)
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = status_of(lambda: stack.api.Batch(pb.BatchRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    ok = stack.api.Info(request, metadata=(("x-api-key", stack.herald.api_key),), timeout=10)
    assert ok.result.nodes


def test_scopes_are_the_http_apis(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    code, details = status_of(
        lambda: stack.call("Publish", pb.PublishRequest(channel=ch, data=b"1"), key=stack.read_key)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "read scope" in details
    assert stack.call("History", pb.HistoryRequest(channel=ch), key=stack.read_key).HasField("result")
    assert stack.call("Publish", pb.PublishRequest(channel=ch, data=b"1"), key=stack.publish_key).result.offset == 1
    code, _ = status_of(lambda: stack.call("History", pb.HistoryRequest(channel=ch), key=stack.publish_key))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = status_of(lambda: stack.call("Disconnect", pb.DisconnectRequest(user="u"), key=stack.publish_key))
    assert code == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------------------------------------
# Malformed and oversized messages


def raw_call(stack: Stack, method: str, body: bytes) -> Any:
    call = stack.channel.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    return call(body, metadata=stack.metadata, timeout=10)


def test_malformed_protobuf_is_invalid_argument(stack: Stack) -> None:
    # Field 1 (channel) as a length-delimited string 100 bytes long, with 3 bytes present.
    code, details = status_of(lambda: raw_call(stack, "Publish", b"\x0a\x64abc"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    # A wire type that is not one.
    code, _ = status_of(lambda: raw_call(stack, "Publish", b"\x0f\x00"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_data_that_is_not_json_is_invalid_argument(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    code, details = status_of(lambda: stack.call("Publish", pb.PublishRequest(channel=ch, data=b"{not json")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "data is not valid JSON" in details
    assert list(stack.call("History", pb.HistoryRequest(channel=ch, limit=-1)).result.publications) == []


def test_oversized_messages_are_out_of_range(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    big = b'"' + b"x" * (MAX_BODY + 10) + b'"'
    code, details = status_of(lambda: stack.call("Publish", pb.PublishRequest(channel=ch, data=big)))
    assert code == grpc.StatusCode.OUT_OF_RANGE and str(MAX_BODY) in details, details
    over_publication = b'"' + b"x" * 70_000 + b'"'
    code, details = status_of(lambda: stack.call("Publish", pb.PublishRequest(channel=ch, data=over_publication)))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "limit is 65536" in details
    assert list(stack.call("History", pb.HistoryRequest(channel=ch, limit=-1)).result.publications) == []
    # The connection is still good.
    assert stack.call("Publish", pb.PublishRequest(channel=ch, data=b"1")).result.offset == 1


def grpc_metric(stack: Stack, method: str, outcome: str) -> float:
    text = requests.get(f"{stack.herald.url}/metrics", timeout=10).text
    pattern = re.compile(
        r'^herald_grpc_requests_total\{(?=[^}]*method="%s")(?=[^}]*outcome="%s")[^}]*\} (\S+)$' % (method, outcome),
        re.M,
    )
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


def test_calls_are_counted_by_method_and_outcome(stack: Stack) -> None:
    pb = stack.pb
    before = {key: grpc_metric(stack, *key) for key in
              [("publish", "ok"), ("publish", "error"), ("info", "unauthenticated"), ("batch", "ok")]}
    stack.call("Publish", pb.PublishRequest(channel=chan(), data=b"1"))
    stack.call("Publish", pb.PublishRequest(channel="", data=b"1"))
    stack.call("Publish", pb.PublishRequest(channel="", data=b"1"))
    status_of(lambda: stack.api.Info(pb.InfoRequest(), timeout=10))
    stack.call("Batch", pb.BatchRequest())
    after = {key: grpc_metric(stack, *key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        ("publish", "ok"): 1, ("publish", "error"): 2, ("info", "unauthenticated"): 1, ("batch", "ok"): 1}
    text = requests.get(f"{stack.herald.url}/metrics", timeout=10).text
    assert 'herald_grpc_request_duration_seconds_count{method="publish"}' in text


# ---------------------------------------------------------------------------------------------
# Health and reflection


def test_health_checking(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel)
    for service in ("", SERVICE, "centrifugal.centrifugo.unistream.CentrifugoUniStream"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    code, _ = status_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(stack: Stack) -> None:
    database = ProtoReflectionDescriptorDatabase(stack.channel)
    services = set(database.get_services())
    assert {SERVICE, "centrifugal.centrifugo.unistream.CentrifugoUniStream", "grpc.health.v1.Health"} <= services
    described = database.FindFileContainingSymbol(SERVICE)
    assert described.package == "centrifugal.centrifugo.api"
    assert "PublishRequest" in [m.name for m in described.message_type]


# ---------------------------------------------------------------------------------------------
# TLS: where the HTTP listener has it, gRPC has it (the same listener, ALPN h2)


def openssl(args: list, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> None:
    """A test CA and a certificate for 127.0.0.1 signed by it, made at run time."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl(["req", "-x509", *ec, "-days", "1", "-subj", "/CN=herald-test-ca", "-keyout", "ca.key", "-out", "ca.pem"], directory)
    (directory / "leaf.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    openssl(["req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "key.pem", "-out", "leaf.csr"], directory)
    openssl(
        ["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
         "-extfile", "leaf.ext", "-out", "cert.pem"],
        directory,
    )


def test_grpc_over_tls_on_the_https_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stubs").mkdir()
    pb, pb_grpc = compile_stubs(tmp_path / "stubs")
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    extra = f"""
[grpc_api]
enabled = true

[server]
tls_cert_file = {json.dumps(str(certs / "cert.pem"))}
tls_key_file = {json.dumps(str(certs / "key.pem"))}
"""
    monkeypatch.setattr(conftest, "LISTENING", re.compile(r"listening on (https://\S+)"))
    herald = HeraldInstance(tmp_path / "herald", extra_config=extra)
    herald.start()
    try:
        target = herald.url.removeprefix("https://")
        credentials = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
        metadata = (("authorization", f"apikey {herald.api_key}"),)
        with grpc.secure_channel(target, credentials) as channel:
            api = pb_grpc.CentrifugoApiStub(channel)
            reply = api.Publish(pb.PublishRequest(channel="tls", data=b"1"), metadata=metadata, timeout=10)
            assert reply.result.offset == 1
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        # Cleartext to the TLS listener does not work, and a client that does not trust the CA
        # is refused.
        with grpc.insecure_channel(target) as channel:
            code, _ = status_of(lambda: pb_grpc.CentrifugoApiStub(channel).Info(pb.InfoRequest(), metadata=metadata, timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(target, grpc.ssl_channel_credentials()) as channel:
            code, _ = status_of(lambda: pb_grpc.CentrifugoApiStub(channel).Info(pb.InfoRequest(), metadata=metadata, timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        herald.stop()


def test_health_turns_not_serving_when_shutdown_begins(tmp_path: Path) -> None:
    herald = HeraldInstance(
        tmp_path / "herald", extra_config='\n[grpc_api]\nenabled = true\n\n[server]\nshutdown_delay = "3s"\n'
    )
    process = herald.start()
    try:
        with grpc.insecure_channel(herald.url.removeprefix("http://")) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            assert health.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            process.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 2
            status = None
            while time.monotonic() < deadline:
                status = health.Check(request, timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Still answering during the shutdown delay, as /ready's 503 is.
            assert requests.get(f"{herald.url}/ready", timeout=5).status_code == 503
        assert process.proc.wait(timeout=15) == 0
    finally:
        herald.stop()
