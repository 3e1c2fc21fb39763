"""The client protocol over a gRPC bidirectional stream, `herald.stream.ClientStream.Connect`
(docs/grpc.md), judged by `grpcio` with messages generated at test time from
`proto/herald/client_stream.proto` and `proto/centrifugal/client.proto`: the full command set,
server pings and pongs, recovery after a forced disconnect, a consumer that stops reading
closed as slow (3008), malformed and oversized messages answered with statuses, protocol
errors as error replies, and cancellation and deadlines ending the session on the server.
Also the uni stream's keep-alive pings and server-side deadline.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import grpc
import pytest
import requests

from conftest import REPO, HeraldInstance

SLOW, NO_PONG, BAD_REQUEST, SIZE_LIMIT = 3008, 3012, 3501, 3511
METHOD = "/herald.stream.ClientStream/Connect"


def compile_protos(out: Path) -> Tuple[Any, Any, Any]:
    """The client protocol's message classes (from a descriptor set protoc writes, loaded in
    a pool of their own: centrifuge-python, which other test modules import into this
    process, registers the same package in protobuf's default pool), and the uni stream's
    generated modules."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    descriptors = out / "client_stream.pb"
    args = ["protoc", f"-I{REPO / 'proto'}", f"-I{include}", f"--descriptor_set_out={descriptors}",
            "--include_imports", "herald/client_stream.proto"]
    assert protoc.main(args) == 0, "protoc failed on proto/herald/client_stream.proto"
    args = ["protoc", f"-I{REPO / 'proto'}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
            "centrifugo/unistream.proto"]
    assert protoc.main(args) == 0, "protoc failed on proto/centrifugo/unistream.proto"
    pool = descriptor_pool.DescriptorPool()
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file
    for file in files:
        pool.Add(file)
    method = pool.FindServiceByName("herald.stream.ClientStream").methods_by_name["Connect"]
    assert method.client_streaming and method.server_streaming
    assert method.input_type.full_name == "centrifugal.centrifuge.protocol.Command"
    assert method.output_type.full_name == "centrifugal.centrifuge.protocol.Reply"
    protocol = next(f for f in files if f.package == "centrifugal.centrifuge.protocol")
    pb = SimpleNamespace(**{
        m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{protocol.package}.{m.name}"))
        for m in protocol.message_type})
    sys.path.insert(0, str(out))
    return (pb, importlib.import_module("centrifugo.unistream_pb2"),
            importlib.import_module("centrifugo.unistream_pb2_grpc"))


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt(secret: str, claims: Dict[str, Any]) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    unsigned = f"{header}.{_b64url(json.dumps(claims).encode())}"
    return f"{unsigned}.{_b64url(hmac.new(secret.encode(), unsigned.encode(), hashlib.sha256).digest())}"


class Backend:
    """The application's backend for `rpc` (`[proxy] rpc_endpoint`): echoes method and data."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = {"result": {"data": {"method": body["method"], "echo": body.get("data"),
                                              "transport": body.get("transport")}}}
                raw = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/rpc"


class Conn:
    """One bidirectional call: commands go in through a queue; a reader thread answers server
    pings (unless told not to) and sorts replies by id and pushes into queues."""

    def __init__(self, stack: "Stack", pong: bool = True, timeout: float = 60) -> None:
        self.pb, self.pong = stack.pb, pong
        self.outgoing: "queue.Queue[Any]" = queue.Queue()
        self.replies: "queue.Queue[Any]" = queue.Queue()
        self.pushes: "queue.Queue[Any]" = queue.Queue()
        self.pings = 0
        self.error: Optional[grpc.RpcError] = None
        self.ended = threading.Event()
        self.next_id = 0
        self.call = stack.connect_call(self._requests(), timeout=timeout)
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[Any]:
        while True:
            command = self.outgoing.get()
            if command is None:
                return
            yield command

    def _read(self) -> None:
        try:
            for reply in self.call:
                if reply.id:
                    self.replies.put(reply)
                elif reply.HasField("push"):
                    self.pushes.put(reply.push)
                elif not reply.ListFields():
                    self.pings += 1
                    if self.pong:
                        self.outgoing.put(self.pb.Command())
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended.set()

    def request(self, **fields: Any) -> Any:
        self.next_id += 1
        self.outgoing.put(self.pb.Command(id=self.next_id, **fields))
        reply = self.replies.get(timeout=10)
        assert reply.id == self.next_id, reply
        return reply

    def ok(self, **fields: Any) -> Any:
        reply = self.request(**fields)
        assert not reply.HasField("error"), reply.error
        return reply

    def push(self, timeout: float = 10) -> Any:
        return self.pushes.get(timeout=timeout)

    def close(self) -> None:
        self.call.cancel()


class Stack:
    def __init__(self, herald: HeraldInstance, protos: Tuple[Any, Any, Any]) -> None:
        self.herald = herald
        self.pb, self.uni_pb, uni_grpc = protos
        self.channel = grpc.insecure_channel(herald.url.removeprefix("http://"))
        # What a generated ClientStreamStub's Connect is.
        self.connect_call = self.channel.stream_stream(
            METHOD, request_serializer=lambda command: command.SerializeToString(),
            response_deserializer=self.pb.Reply.FromString)
        self.uni = uni_grpc.CentrifugoUniStreamStub(self.channel)

    def token(self, user: str, **claims: Any) -> str:
        return jwt(self.herald.hmac_secret, {"sub": user, "exp": int(time.time()) + 3600, **claims})

    def api(self, method: str, params: dict) -> dict:
        reply = requests.post(f"{self.herald.api_url}/{method}", json=params,
                              headers={"X-API-Key": self.herald.api_key}, timeout=10).json()
        assert "error" not in reply, reply
        return reply["result"]

    def connect(self, user: str, **kwargs: Any) -> Tuple[Conn, Any]:
        conn = Conn(self, **kwargs)
        reply = conn.ok(connect=self.pb.ConnectRequest(token=self.token(user)))
        return conn, reply.connect

    def clients_in(self, channel: str) -> int:
        return self.api("presence_stats", {"channel": channel})["num_clients"]


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Any, Any, Any]:
    return compile_protos(tmp_path_factory.mktemp("stubs"))


def start_stack(root: Path, protos: Tuple[Any, Any, Any], extra: str) -> Stack:
    herald = HeraldInstance(root, extra_config=extra)
    herald.start()
    return Stack(herald, protos)


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory, protos: Tuple[Any, Any, Any]) -> Iterator[Stack]:
    """A server with the default ping interval (25 s), so that only the queue bound can
    close a consumer that stops reading."""
    stack = start_stack(tmp_path_factory.mktemp("quiet"), protos, "[grpc_api]\nenabled = true\n\n"
                        "[client]\nmax_queue_bytes = 65536\n")
    yield stack
    stack.channel.close()
    stack.herald.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, protos: Tuple[Any, Any, Any]) -> Iterator[Stack]:
    backend = Backend()
    extra = f"""
[[namespaces]]
name = "chat"
presence = true
join_leave = true
history_size = 100
history_ttl = "1h"
allow_publish_for_client = true
allow_history_for_subscriber = true
allow_presence_for_subscriber = true

[grpc_api]
enabled = true

[client]
max_queue_bytes = 65536
max_message_size = 4096
ping_interval = "2s"
pong_timeout = "2s"

[proxy]
rpc_endpoint = "{backend.url}"
"""
    stack = start_stack(tmp_path_factory.mktemp("herald"), protos, extra)
    try:
        yield stack
    except BaseException:
        stack.herald.kill()
        raise
    stack.channel.close()
    backend.server.shutdown()
    stack.herald.stop()


def chan(namespace: str = "chat") -> str:
    return f"{namespace}:{uuid.uuid4().hex[:10]}"


def wait_until(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_the_full_command_set(stack: Stack) -> None:
    pb, ch, user = stack.pb, chan(), f"u-{uuid.uuid4().hex[:8]}"
    conn, connected = stack.connect(user)
    assert connected.client and connected.ping == 2 and connected.pong

    sub = conn.ok(subscribe=pb.SubscribeRequest(channel=ch)).subscribe
    assert sub.recoverable and sub.epoch
    conn.ok(publish=pb.PublishRequest(channel=ch, data=b'{"text":"hi"}'))
    pub = conn.push()
    while not pub.HasField("pub"):  # our own join comes first
        pub = conn.push()
    assert (pub.channel, pub.pub.offset, json.loads(pub.pub.data)) == (ch, 1, {"text": "hi"})
    assert pub.pub.info.user == user  # a client publication names its publisher

    presence = conn.ok(presence=pb.PresenceRequest(channel=ch)).presence.presence
    assert [info.user for info in presence.values()] == [user]
    assert connected.client in presence
    stats = conn.ok(presence_stats=pb.PresenceStatsRequest(channel=ch)).presence_stats
    assert (stats.num_clients, stats.num_users) == (1, 1)
    history = conn.ok(history=pb.HistoryRequest(channel=ch, limit=10)).history
    assert [p.offset for p in history.publications] == [1] and history.epoch == sub.epoch

    rpc = conn.ok(rpc=pb.RPCRequest(method="sum", data=b'{"a":1}')).rpc
    assert json.loads(rpc.data) == {"method": "sum", "echo": {"a": 1}, "transport": "grpc"}

    # `send` has no reply; the connection goes on with the next command.
    conn.outgoing.put(pb.Command(send=pb.SendRequest(data=b'{"x":1}')))
    refreshed = conn.ok(refresh=pb.RefreshRequest(token=stack.token(user))).refresh
    assert refreshed.expires and 3500 <= refreshed.ttl <= 3600

    # A channel granted by a subscription token, then that token refreshed.
    private = chan("room")
    sub_token = stack.token(user, channel=private, exp=int(time.time()) + 600)
    granted = conn.ok(subscribe=pb.SubscribeRequest(channel=private, token=sub_token)).subscribe
    assert granted.expires and 500 <= granted.ttl <= 600
    longer = stack.token(user, channel=private, exp=int(time.time()) + 1200)
    again = conn.ok(sub_refresh=pb.SubRefreshRequest(channel=private, token=longer)).sub_refresh
    assert again.expires and 1100 <= again.ttl <= 1200

    conn.ok(unsubscribe=pb.UnsubscribeRequest(channel=ch))
    stack.api("publish", {"channel": ch, "data": {"after": "unsubscribe"}})
    conn.ok(rpc=pb.RPCRequest(method="ping"))  # a round trip after the publication
    leftovers = []
    while not conn.pushes.empty():
        leftovers.append(conn.pushes.get())
    assert not [p for p in leftovers if p.HasField("pub") and p.channel == ch], leftovers
    conn.close()


def test_protocol_errors_are_error_replies(stack: Stack) -> None:
    pb = stack.pb
    conn, _ = stack.connect("errors")
    assert conn.request(subscribe=pb.SubscribeRequest(channel="nope:x")).error.code == 102
    assert conn.request(publish=pb.PublishRequest(channel="news", data=b"{}")).error.code == 103
    assert conn.request(presence=pb.PresenceRequest(channel=chan())).error.code == 103  # not subscribed
    conn.ok(subscribe=pb.SubscribeRequest(channel="news"))
    assert conn.request(subscribe=pb.SubscribeRequest(channel="news")).error.code == 105  # already
    conn.close()


def test_server_pings_keep_an_answering_client_and_close_a_silent_one(stack: Stack) -> None:
    answering, _ = stack.connect("pinged")
    silent, _ = stack.connect("silent", pong=False)
    wait_until(lambda: silent.ended.is_set(), timeout=15)
    last = silent.push(timeout=1)
    assert last.HasField("disconnect") and last.disconnect.code == NO_PONG and last.disconnect.reconnect
    assert silent.error is None, "a closed session ends the call with status OK"
    wait_until(lambda: answering.pings >= 2, timeout=5)
    assert not answering.ended.is_set()
    answering.ok(rpc=stack.pb.RPCRequest(method="still-there"))
    answering.close()


def test_recovers_after_a_forced_disconnect_without_loss_or_repeat(stack: Stack) -> None:
    pb, ch, user = stack.pb, chan(), f"user-{uuid.uuid4().hex[:8]}"
    conn, _ = stack.connect(user)
    epoch = conn.ok(subscribe=pb.SubscribeRequest(channel=ch, recover=True)).subscribe.epoch
    for i in range(1, 3):
        stack.api("publish", {"channel": ch, "data": i})
    seen: List[int] = []
    while len(seen) < 2:
        push = conn.push()
        if push.HasField("pub"):
            seen.append(push.pub.offset)
    assert seen == [1, 2]
    stack.api("disconnect", {"user": user, "disconnect": {"code": 4000, "reason": "moved"}})
    wait_until(conn.ended.is_set)
    last = conn.pushes.get(timeout=1)
    while not last.HasField("disconnect"):
        last = conn.pushes.get(timeout=1)
    assert (last.disconnect.code, last.disconnect.reason) == (4000, "moved")
    for i in range(3, 6):
        stack.api("publish", {"channel": ch, "data": i})
    again, _ = stack.connect(user)
    resumed = again.ok(subscribe=pb.SubscribeRequest(channel=ch, recover=True, offset=seen[-1], epoch=epoch)).subscribe
    assert resumed.was_recovering and resumed.recovered
    assert [(p.offset, p.data) for p in resumed.publications] == [(3, b"3"), (4, b"4"), (5, b"5")]
    stack.api("publish", {"channel": ch, "data": 6})
    push = again.push()
    while not push.HasField("pub"):
        push = again.push()
    assert push.pub.offset == 6
    again.close()


def test_a_consumer_that_stops_reading_is_closed_as_slow(quiet: Stack) -> None:
    stack = quiet
    pb, ch = stack.pb, f"slow-{uuid.uuid4().hex[:10]}"
    commands: "queue.Queue[Any]" = queue.Queue()
    commands.put(pb.Command(id=1, connect=pb.ConnectRequest(token=stack.token("slow"))))
    commands.put(pb.Command(id=2, subscribe=pb.SubscribeRequest(channel=ch)))
    call = stack.connect_call(iter(commands.get, None), timeout=120)
    assert next(call).id == 1 and next(call).id == 2
    blob = "x" * 60_000
    for i in range(300):  # ~18 MB, far past HTTP/2 windows and the 64 KiB queue
        stack.api("publish", {"channel": ch, "data": {"i": i, "blob": blob}})
    replies = list(call)  # reads everything that was kept, to the end of the stream
    offsets = [r.push.pub.offset for r in replies if r.push.HasField("pub")]
    last = replies[-1].push
    assert last.HasField("disconnect") and last.disconnect.code == SLOW and last.disconnect.reconnect, last
    assert offsets == list(range(1, len(offsets) + 1)), "what was delivered is contiguous, from the start"
    assert len(offsets) < 300
    commands.put(None)


def raw_call(stack: Stack, messages: List[bytes]) -> Tuple[List[Any], grpc.RpcError]:
    """Sends `messages` as they are (not necessarily valid Commands) and reads to the end."""
    call = stack.channel.stream_stream(METHOD, request_serializer=lambda b: b,
                                       response_deserializer=stack.pb.Reply.FromString)
    held = threading.Event()

    def requests_() -> Iterator[bytes]:
        yield from messages
        held.wait(30)  # keep the request side open: the server decides the end

    replies: List[Any] = []
    with pytest.raises(grpc.RpcError) as raised:
        for reply in call(requests_(), timeout=30):
            replies.append(reply)
    held.set()
    return replies, raised.value


def test_malformed_and_oversized_messages_are_statuses(stack: Stack) -> None:
    pb = stack.pb
    connect = pb.Command(id=1, connect=pb.ConnectRequest(token=stack.token("bad"))).SerializeToString()
    replies, error = raw_call(stack, [connect, b"\xff\xff\xff\xff"])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and str(BAD_REQUEST) in error.details()
    assert replies[0].connect.client and replies[-1].push.disconnect.code == BAD_REQUEST
    big = pb.Command(id=2, publish=pb.PublishRequest(channel=chan(), data=b'"' + b"x" * 8000 + b'"'))
    replies, error = raw_call(stack, [connect, big.SerializeToString()])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(SIZE_LIMIT) in error.details()
    assert replies[-1].push.disconnect.code == SIZE_LIMIT and not replies[-1].push.disconnect.reconnect


def test_an_invalid_token_is_unauthenticated_and_an_expired_one_error_109(stack: Stack) -> None:
    pb = stack.pb
    forged = pb.Command(id=1, connect=pb.ConnectRequest(token=stack.token("x") + "x")).SerializeToString()
    replies, error = raw_call(stack, [forged])
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "3500" in error.details()
    assert replies[-1].push.disconnect.code == 3500 and not replies[-1].push.disconnect.reconnect
    conn = Conn(stack)
    expired = stack.token("late", exp=int(time.time()) - 60)
    reply = conn.request(connect=pb.ConnectRequest(token=expired))
    assert reply.error.code == 109, reply
    conn.ok(connect=pb.ConnectRequest(token=stack.token("late")))
    conn.close()


def test_cancellation_and_deadlines_end_the_session_on_the_server(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    cancelled, _ = stack.connect("cancelled")
    cancelled.ok(subscribe=pb.SubscribeRequest(channel=ch))
    timed = Conn(stack, timeout=3)
    timed.ok(connect=pb.ConnectRequest(token=stack.token("timed")))
    timed.ok(subscribe=pb.SubscribeRequest(channel=ch))
    assert stack.clients_in(ch) == 2
    cancelled.close()
    wait_until(lambda: stack.clients_in(ch) == 1, timeout=5)
    wait_until(timed.ended.is_set, timeout=10)
    assert timed.error is not None and timed.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: stack.clients_in(ch) == 0, timeout=5)


def test_the_uni_stream_pings_and_says_how_often(stack: Stack) -> None:
    uni, ch = stack.uni_pb, f"uni-{uuid.uuid4().hex[:10]}"
    stream = stack.uni.Consume(uni.ConnectRequest(token=stack.token("uni"), subs={ch: uni.SubscribeRequest()}),
                               timeout=30)
    connect = next(stream)
    assert connect.HasField("connect") and connect.connect.ping == 2
    started = time.monotonic()
    ping = next(stream)
    assert not ping.ListFields(), "a ping is an empty Push"
    assert time.monotonic() - started < 4
    stack.api("publish", {"channel": ch, "data": 1})
    push = next(stream)
    while not push.ListFields():
        push = next(stream)
    assert push.pub.offset == 1
    stream.cancel()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is part of the test image")
def test_the_uni_stream_honours_the_callers_deadline_on_the_server(stack: Stack, tmp_path: Path) -> None:
    """grpcio enforces deadlines itself; curl sends `grpc-timeout` and waits, so only the
    server can end the call in time, with DEADLINE_EXCEEDED (4) in the trailers."""
    uni, ch = stack.uni_pb, chan()
    message = uni.ConnectRequest(token=stack.token("curl"), subs={ch: uni.SubscribeRequest()}).SerializeToString()
    body = tmp_path / "body"
    body.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    headers = tmp_path / "headers"
    started = time.monotonic()
    subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "15", "-o", "/dev/null",
                    "-D", str(headers), "-H", "content-type: application/grpc", "-H", "te: trailers",
                    "-H", "grpc-timeout: 1S", "--data-binary", f"@{body}",
                    f"{stack.herald.url}/centrifugal.centrifugo.unistream.CentrifugoUniStream/Consume"],
                   check=True)
    assert time.monotonic() - started < 5
    assert "grpc-status: 4" in headers.read_text().lower()
