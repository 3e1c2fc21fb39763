"""The server-streaming subscription over gRPC, `CentrifugoUniStream.Consume` (docs/grpc.md),
judged by `grpcio` with stubs generated at test time from `proto/centrifugo/unistream.proto`:
the stream's order (connect, publications, disconnect), recovery after a forced disconnect with
nothing lost or repeated, refusals as statuses, and a consumer that stops reading closed as slow
(3008) with what it did get contiguous.
"""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import grpc
import pytest
import requests

from conftest import REPO, HeraldInstance
from push_fixtures import mint_token

SLOW = 3008


def compile_unistream(out: Path) -> Tuple[Any, Any]:
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{REPO / 'proto'}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
            "centrifugo/unistream.proto"]
    assert protoc.main(args) == 0, "protoc failed on proto/centrifugo/unistream.proto"
    sys.path.insert(0, str(out))
    return (importlib.import_module("centrifugo.unistream_pb2"),
            importlib.import_module("centrifugo.unistream_pb2_grpc"))


class Stack:
    def __init__(self, herald: HeraldInstance, pb: Any, pb_grpc: Any) -> None:
        self.herald, self.pb = herald, pb
        self.channel = grpc.insecure_channel(herald.url.removeprefix("http://"))
        self.stub = pb_grpc.CentrifugoUniStreamStub(self.channel)

    def api(self, method: str, params: dict) -> dict:
        reply = requests.post(f"{self.herald.api_url}/{method}", json=params,
                              headers={"X-API-Key": self.herald.api_key}, timeout=10).json()
        assert "error" not in reply, reply
        return reply["result"]

    def publish(self, channel: str, data: Any) -> dict:
        return self.api("publish", {"channel": channel, "data": data})

    def consume(self, user: str, subs: dict, token: str = "") -> Any:
        token = token or mint_token(self.herald.hmac_secret, user)
        return self.stub.Consume(self.pb.ConnectRequest(token=token, subs=subs), timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pb, pb_grpc = compile_unistream(tmp_path_factory.mktemp("stubs"))
    extra = """
[grpc_api]
enabled = true

[client]
max_queue_bytes = 65536
"""
    herald = HeraldInstance(tmp_path_factory.mktemp("herald"), extra_config=extra)
    herald.start()
    stack = Stack(herald, pb, pb_grpc)
    try:
        yield stack
    except BaseException:
        herald.kill()
        raise
    stack.channel.close()
    herald.stop()


def chan() -> str:
    return f"uni-{uuid.uuid4().hex[:10]}"


def next_push(stream) -> Any:
    return next(stream)


def test_connect_then_publications_in_order(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    stream = stack.consume("alice", {ch: pb.SubscribeRequest()})
    connect = next_push(stream)
    assert connect.HasField("connect") and connect.connect.client
    assert ch in connect.connect.subs
    for i in range(1, 4):
        stack.publish(ch, {"n": i})
    pubs = [next_push(stream) for _ in range(3)]
    assert [(p.channel, p.pub.offset, json.loads(p.pub.data)) for p in pubs] == [
        (ch, 1, {"n": 1}), (ch, 2, {"n": 2}), (ch, 3, {"n": 3})]
    assert connect.connect.subs[ch].epoch
    stream.cancel()


def test_recovers_after_a_forced_disconnect_without_loss_or_repeat(stack: Stack) -> None:
    pb, ch, user = stack.pb, chan(), f"user-{uuid.uuid4().hex[:8]}"
    stream = stack.consume(user, {ch: pb.SubscribeRequest()})
    connect = next_push(stream)
    epoch = connect.connect.subs[ch].epoch
    for i in range(1, 3):
        stack.publish(ch, i)
    seen: List[int] = [next_push(stream).pub.offset for _ in range(2)]
    assert seen == [1, 2]
    # The server API disconnects the user: the stream's last push says so, then it ends.
    stack.api("disconnect", {"user": user, "disconnect": {"code": 4000, "reason": "moved"}})
    last = next_push(stream)
    assert last.HasField("disconnect") and last.disconnect.code == 4000, last
    assert last.disconnect.reason == "moved", "the reason given to the server API"
    assert list(stream) == []
    # Missed while away.
    for i in range(3, 6):
        stack.publish(ch, i)
    resumed = stack.consume(user, {ch: pb.SubscribeRequest(recover=True, offset=seen[-1], epoch=epoch)})
    hello = next_push(resumed)
    assert hello.connect.subs[ch].recovered and hello.connect.subs[ch].was_recovering
    got = [next_push(resumed).pub for _ in range(3)]
    assert [(p.offset, p.data) for p in got] == [(3, b"3"), (4, b"4"), (5, b"5")]
    stack.publish(ch, 6)
    assert next_push(resumed).pub.offset == 6
    resumed.cancel()


def test_refusals_are_statuses(stack: Stack) -> None:
    pb, ch = stack.pb, chan()

    def code_of(call) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as raised:
            next(call)
        return raised.value.code()

    assert code_of(stack.consume("u", {ch: pb.SubscribeRequest()}, token="not-a-jwt")) == grpc.StatusCode.UNAUTHENTICATED
    mixed = {ch: pb.SubscribeRequest(recover=True, offset=1, epoch="x"), chan(): pb.SubscribeRequest()}
    assert code_of(stack.consume("u", mixed)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stack.consume("u", {"nope:x": pb.SubscribeRequest()})) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stack.consume("u", {})) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_consumer_that_stops_reading_is_closed_as_slow(stack: Stack) -> None:
    pb, ch = stack.pb, chan()
    stream = stack.consume("slow", {ch: pb.SubscribeRequest()})
    assert next_push(stream).HasField("connect")
    blob = "x" * 60_000
    for i in range(300):  # ~18 MB, far past HTTP/2 windows and the 64 KiB queue
        stack.publish(ch, {"i": i, "blob": blob})
    pushes = list(stream)  # reads everything that was kept, to the end of the stream
    offsets = [p.pub.offset for p in pushes if p.HasField("pub")]
    assert pushes[-1].HasField("disconnect") and pushes[-1].disconnect.code == SLOW, pushes[-1]
    assert pushes[-1].disconnect.reconnect
    assert offsets == list(range(1, len(offsets) + 1)), "what was delivered is contiguous, from the start"
    assert len(offsets) < 300
