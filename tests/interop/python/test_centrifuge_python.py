"""Herald's bidirectional WebSocket endpoint (`/connection/websocket`, Centrifugo client protocol
v2, JSON) driven by the official Python SDK `centrifuge-python` (PyPI, pinned).

Only the SDK's public API is used: connect with a JWT, subscriptions, publish, history,
presence, automatic reconnect with recovery. Forced disconnects go through a TCP proxy
(cutproxy.py) that drops the connection without a close frame, out of the SDK's control; it
also records the frames, which failing assertions print. Each test runs its own event loop
(`asyncio.run`) under a time limit.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional

import pytest
import requests
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    ConnectingContext,
    DisconnectedContext,
    JoinContext,
    LeaveContext,
    PublicationContext,
    ReplyError,
    StreamPosition,
    SubscribedContext,
    SubscriptionEventHandler,
)

from conftest import HeraldInstance
from cutproxy import CutProxy

RECOVERY_MAX = 20
REALTIME_CONFIG = f"""
[client]
ping_interval = "3s"
pong_timeout = "3s"
recovery_max_publications = {RECOVERY_MAX}

[[namespaces]]
name = "chat"
presence = true
join_leave = true
allow_publish_for_client = true
allow_history_for_subscriber = true
allow_presence_for_subscriber = true
history_size = 100
history_ttl = "1h"
"""
TEST_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldInstance]:
    """One server for the module, with the realtime settings; graceful shutdown is asserted."""
    instance = HeraldInstance(tmp_path_factory.mktemp("herald-ws"), extra_config=REALTIME_CONFIG)
    instance.start()
    try:
        yield instance
    except BaseException:
        instance.kill()
        raise
    instance.stop()


def channel(prefix: str = "") -> str:
    return f"{prefix}py-{uuid.uuid4().hex[:12]}"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def mint_token(secret: str, sub: str, ttl: int = 3600) -> str:
    """An HS256 connection JWT with Centrifugo claims (sub, exp, info)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": sub, "exp": int(time.time()) + ttl, "info": {"name": sub.upper()}}
    unsigned = f"{header}.{_b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret.encode(), unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{_b64url(signature)}"


def api(server: HeraldInstance, method: str, body: Dict[str, Any]) -> Dict[str, Any]:
    response = requests.post(
        f"{server.api_url}/{method}", json=body, headers={"X-API-Key": server.api_key}, timeout=10
    )
    assert response.status_code == 200, response.text
    reply = response.json()
    assert "error" not in reply, reply
    return reply["result"]


async def publish_numbers(server: HeraldInstance, ch: str, numbers: List[int]) -> List[Dict[str, Any]]:
    """Publishes {"n": n} for each number through the server API (off the event loop)."""

    def run() -> List[Dict[str, Any]]:
        return [api(server, "publish", {"channel": ch, "data": {"n": n}}) for n in numbers]

    return await asyncio.get_running_loop().run_in_executor(None, run)


async def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 10.0, details: Optional[Callable[[], str]] = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{details()}" if details else ""))
        await asyncio.sleep(0.02)


class ClientLog(ClientEventHandler):
    def __init__(self) -> None:
        self.events: List[Any] = []

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        self.events.append(("connecting", ctx))

    async def on_connected(self, ctx: ConnectedContext) -> None:
        self.events.append(("connected", ctx))

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.events.append(("disconnected", ctx))

    def names(self) -> List[str]:
        return [name for name, _ in self.events]


class SubLog(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.unsubscribed: List[Any] = []
        self.pubs: List[PublicationContext] = []
        self.subscribed: List[SubscribedContext] = []
        self.joins: List[JoinContext] = []
        self.leaves: List[LeaveContext] = []

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)

    async def on_unsubscribed(self, ctx: Any) -> None:
        self.unsubscribed.append(ctx)

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.pubs.append(ctx)

    async def on_join(self, ctx: JoinContext) -> None:
        self.joins.append(ctx)

    async def on_leave(self, ctx: LeaveContext) -> None:
        self.leaves.append(ctx)

    def offsets(self) -> List[int]:
        return [p.pub.offset for p in self.pubs]

    def numbers(self) -> List[int]:
        return [p.pub.data["n"] for p in self.pubs]


class Session:
    """Clients and proxies of one test, all closed at its end."""

    def __init__(self, server: HeraldInstance) -> None:
        self.server = server
        self.clients: List[Client] = []
        self.proxies: List[CutProxy] = []

    async def client(self, user: str, **options: Any):
        proxy = await CutProxy(self.server.url).start()
        self.proxies.append(proxy)
        log = ClientLog()
        options.setdefault("token", mint_token(self.server.hmac_secret, user))
        client = Client(
            proxy.ws_url,
            events=log,
            proxy=None,  # never an HTTP proxy from the environment
            **options,
        )
        self.clients.append(client)
        return client, log, proxy

    async def close(self) -> None:
        for client in self.clients:
            await client.disconnect()
        for proxy in self.proxies:
            await proxy.close()


def run(server: HeraldInstance, scenario: Callable[[Session], Awaitable[None]]) -> None:
    async def main() -> None:
        session = Session(server)
        try:
            await asyncio.wait_for(scenario(session), TEST_TIMEOUT)
        finally:
            await session.close()

    asyncio.run(main())


def test_connect_subscribe_and_receive_in_order(server: HeraldInstance) -> None:
    async def scenario(s: Session) -> None:
        client, log, proxy = await s.client("alice")
        ch = channel()
        sub_log = SubLog()
        sub = client.new_subscription(ch, events=sub_log)
        await client.connect()
        await client.ready(5)
        connected = [ctx for name, ctx in log.events if name == "connected"]
        assert connected and connected[0].client, log.events
        await sub.subscribe()
        await sub.ready(5)
        first = sub_log.subscribed[0]
        assert first.recoverable is True
        assert first.was_recovering is False
        assert first.stream_position is not None and first.stream_position.epoch

        await publish_numbers(s.server, ch, list(range(1, 31)))
        await wait_for("30 publications", lambda: len(sub_log.pubs) >= 30, details=proxy.wire)
        assert sub_log.offsets() == list(range(1, 31))
        assert sub_log.numbers() == list(range(1, 31))
        assert sub_log.pubs[0].pub.info is None
        assert log.names() == ["connecting", "connected"], proxy.wire()

    run(server, scenario)


def test_publish_history_and_presence(server: HeraldInstance) -> None:
    async def scenario(s: Session) -> None:
        ch = channel("chat:")
        alice, alice_log, alice_proxy = await s.client("alice")
        bob, bob_log, _ = await s.client("bob")
        a_log, b_log = SubLog(), SubLog()
        a_sub = alice.new_subscription(ch, events=a_log)
        b_sub = bob.new_subscription(ch, events=b_log)
        for client, sub in ((alice, a_sub), (bob, b_sub)):
            await client.connect()
            await sub.subscribe()
            await sub.ready(5)
        bob_id = next(ctx.client for name, ctx in bob_log.events if name == "connected")

        await b_sub.publish({"text": "hi from bob"})
        await wait_for("alice gets bob's publication", lambda: a_log.pubs, details=alice_proxy.wire)
        pub = a_log.pubs[0].pub
        assert pub.data == {"text": "hi from bob"}
        assert pub.offset == 1
        assert pub.info is not None
        assert pub.info.user == "bob"
        assert pub.info.client == bob_id
        assert pub.info.conn_info == {"name": "BOB"}

        results = await publish_numbers(s.server, ch, [2, 3, 4, 5])
        epoch = results[0]["epoch"]
        first_three = await a_sub.history(limit=3)
        assert [p.offset for p in first_three.publications] == [1, 2, 3]
        assert first_three.publications[0].data == {"text": "hi from bob"}
        assert first_three.publications[0].info is not None and first_three.publications[0].info.user == "bob"
        assert first_three.offset == 5 and first_three.epoch == epoch
        rest = await a_sub.history(limit=10, since=StreamPosition(offset=3, epoch=epoch))
        assert [p.offset for p in rest.publications] == [4, 5]
        assert [p.data for p in rest.publications] == [{"n": 4}, {"n": 5}]
        top = await a_sub.history()  # the SDK sends limit 0: the stream top only
        assert top.publications == [] and top.offset == 5 and top.epoch == epoch

        presence = await a_sub.presence()
        assert sorted(info.user for info in presence.clients.values()) == ["alice", "bob"]
        assert presence.clients[bob_id].conn_info == {"name": "BOB"}
        stats = await a_sub.presence_stats()
        assert (stats.num_clients, stats.num_users) == (2, 2)

        # Bob leaves: alice sees it (join_leave is on in `chat`), presence shrinks.
        await b_sub.unsubscribe()
        await wait_for("alice sees bob leave", lambda: any(l.info.user == "bob" for l in a_log.leaves), details=alice_proxy.wire)
        stats = await a_sub.presence_stats()
        assert (stats.num_clients, stats.num_users) == (1, 1)

        # The default namespace allows neither client publishing nor history: 103.
        news = alice.new_subscription(channel())
        await news.subscribe()
        await news.ready(5)
        with pytest.raises(ReplyError) as denied:
            await news.publish({"x": 1})
        assert denied.value.code == 103
        with pytest.raises(ReplyError) as denied:
            await news.history(limit=1)
        assert denied.value.code == 103

    run(server, scenario)


def test_recovers_exactly_the_missed_publications_after_a_forced_disconnect(server: HeraldInstance) -> None:
    async def scenario(s: Session) -> None:
        client, log, proxy = await s.client("alice")
        ch = channel()
        sub_log = SubLog()
        sub = client.new_subscription(ch, events=sub_log)
        await client.connect()
        await sub.subscribe()
        await sub.ready(5)
        await publish_numbers(s.server, ch, [1, 2, 3])
        await wait_for("live publications 1..3", lambda: len(sub_log.pubs) >= 3, details=proxy.wire)
        epoch = sub_log.subscribed[0].stream_position.epoch

        proxy.cut(hold=True)
        await wait_for("the SDK to notice the drop", lambda: log.names().count("connecting") >= 2, details=proxy.wire)
        await publish_numbers(s.server, ch, list(range(4, 12)))
        await wait_for("the SDK to reconnect (held at the proxy)", lambda: proxy.held > 0, details=proxy.wire)
        proxy.resume()

        await wait_for("the resubscribe", lambda: len(sub_log.subscribed) >= 2, details=proxy.wire)
        again = sub_log.subscribed[1]
        assert again.was_recovering is True, proxy.wire()
        assert again.recovered is True, proxy.wire()
        await wait_for("the missed publications", lambda: len(sub_log.pubs) >= 11, details=proxy.wire)
        await publish_numbers(s.server, ch, [12])
        await wait_for("the next live publication", lambda: len(sub_log.pubs) >= 12, details=proxy.wire)
        await asyncio.sleep(0.2)  # a duplicate would arrive now
        assert sub_log.offsets() == list(range(1, 13)), f"no gap, no duplicate\n{proxy.wire()}"
        assert sub_log.numbers() == list(range(1, 13))

        # On the wire: the SDK asked to recover from offset 3 with the epoch it was given.
        commands = [
            json.loads(line)
            for f in proxy.frames
            if f.conn == 2 and f.direction == "C>S" and f.kind == "text"
            for line in f.text.split("\n")
            if line.strip()
        ]
        resubscribe = next(c["subscribe"] for c in commands if "subscribe" in c)
        assert resubscribe["recover"] is True
        assert resubscribe["offset"] == 3
        assert resubscribe["epoch"] == epoch
        assert log.names() == ["connecting", "connected", "connecting", "connected"], proxy.wire()

    run(server, scenario)


def test_recovery_impossible_reports_not_recovered(server: HeraldInstance) -> None:
    async def scenario(s: Session) -> None:
        client, log, proxy = await s.client("alice")
        ch = channel()
        sub_log = SubLog()
        sub = client.new_subscription(ch, events=sub_log)
        await client.connect()
        await sub.subscribe()
        await sub.ready(5)
        await publish_numbers(s.server, ch, [1, 2, 3])
        await wait_for("live publications 1..3", lambda: len(sub_log.pubs) >= 3, details=proxy.wire)

        proxy.cut(hold=True)
        await wait_for("the SDK to notice the drop", lambda: log.names().count("connecting") >= 2, details=proxy.wire)
        missed = RECOVERY_MAX + 5
        await publish_numbers(s.server, ch, list(range(4, 4 + missed)))
        proxy.resume()

        await wait_for("the resubscribe", lambda: len(sub_log.subscribed) >= 2, details=proxy.wire)
        again = sub_log.subscribed[1]
        assert again.was_recovering is True, proxy.wire()
        assert again.recovered is False, proxy.wire()
        assert again.stream_position is not None and again.stream_position.offset == 3 + missed
        await publish_numbers(s.server, ch, [4 + missed])
        await wait_for("the next live publication", lambda: len(sub_log.pubs) >= 4, details=proxy.wire)
        await asyncio.sleep(0.2)
        assert sub_log.offsets() == [1, 2, 3, 4 + missed], f"nothing of the gap is delivered\n{proxy.wire()}"

    run(server, scenario)


def test_token_refresh_keeps_the_connection_past_expiry(server: HeraldInstance) -> None:
    """5-second tokens from get_token; the connection must survive two refreshes under traffic."""

    async def scenario(s: Session) -> None:
        tokens = 0

        async def get_token() -> str:
            nonlocal tokens
            tokens += 1
            return mint_token(s.server.hmac_secret, "alice", ttl=5)

        # No initial token: every token (the first and the refreshes) comes from get_token.
        client, log, proxy = await s.client("alice", token="", get_token=get_token)
        ch = channel("chat:")
        sub_log = SubLog()
        sub = client.new_subscription(ch, events=sub_log)
        # Connect half-way through a wall-clock second: ConnectResult's ttl is whole seconds
        # (exp - now), and the SDK refreshes ttl seconds after the reply, i.e. ~0.5 s after
        # `exp`. The reference server closes an unrefreshed connection only 25 s after `exp`.
        await asyncio.sleep((1.5 - time.time() % 1.0) % 1.0)
        await client.connect()
        await sub.subscribe()
        await sub.ready(5)

        def token_wire() -> str:
            lines = [
                f"#{f.conn} {f.ms}ms {f.direction} {f.kind}{'' if f.code is None else f' {f.code}'} "
                + re.sub(r'"token": ?"[^"]+"', '"token":"…"', f.text)
                for f in proxy.frames
                if '"connect"' in f.text or '"refresh"' in f.text or f.kind == "close"
            ]
            return "--- connect/refresh and close frames ---\n" + "\n".join(lines) + "\n--- last frames ---\n" + proxy.wire(30)

        # Traffic throughout, as a real app has: server-API publications and client calls.
        started = time.monotonic()
        n = calls = 0
        while time.monotonic() - started < 12 and len(log.events) == 2:
            n += 1
            await publish_numbers(s.server, ch, [n])
            try:
                await sub.presence_stats()
                calls += 1
            except Exception:  # reported below through the client events
                pass
            await asyncio.sleep(0.1)
        await wait_for(f"all {n} publications", lambda: len(sub_log.pubs) >= n or len(log.events) > 2, details=token_wire)
        described = [name if name != "connecting" or ctx.code == 0 else f"connecting {ctx.code} {ctx.reason}" for name, ctx in log.events]
        assert described == ["connecting", "connected"], f"the connection stays up across token expiry\n{token_wire()}"
        refreshes = [f for f in proxy.frames if f.direction == "C>S" and '"refresh"' in f.text]
        assert tokens >= 3, f"get_token called {tokens} times in 12 s with 5 s tokens"
        assert len(refreshes) >= 2, token_wire()
        assert proxy.connections == 1, "one connection, never re-established"
        assert calls > 20
        assert sub_log.offsets() == list(range(1, n + 1))

    run(server, scenario)


def test_protobuf_encoding_receive_publish_history_and_recover(server: HeraldInstance) -> None:
    """The same SDK with use_protobuf=True: subprotocol centrifuge-protobuf, binary frames."""

    async def scenario(s: Session) -> None:
        ch = channel("chat:")
        client, log, proxy = await s.client("alice", use_protobuf=True)
        sub_log = SubLog()
        sub = client.new_subscription(ch, events=sub_log)
        await client.connect()
        await sub.subscribe()
        await sub.ready(5)
        upgrade = next(f for f in proxy.frames if f.direction == "S>C" and f.kind == "http")
        assert re.search(r"(?im)^sec-websocket-protocol: centrifuge-protobuf\r?$", upgrade.headers), upgrade.headers

        await publish_numbers(s.server, ch, [1, 2, 3])
        await wait_for("publications 1..3", lambda: len(sub_log.pubs) >= 3, details=proxy.wire)
        assert [json.loads(p.pub.data) for p in sub_log.pubs] == [{"n": 1}, {"n": 2}, {"n": 3}]
        kinds = {f.kind for f in proxy.frames if f.direction == "S>C" and f.kind in ("text", "binary")}
        assert kinds == {"binary"}, proxy.wire()

        await sub.publish(json.dumps({"text": "from protobuf"}).encode())
        await wait_for("own publication", lambda: len(sub_log.pubs) >= 4, details=proxy.wire)
        own = sub_log.pubs[3].pub
        assert json.loads(own.data) == {"text": "from protobuf"}
        assert own.info is not None and own.info.user == "alice"
        history = await sub.history(limit=10)
        assert [p.offset for p in history.publications] == [1, 2, 3, 4]
        stats = await sub.presence_stats()
        assert (stats.num_clients, stats.num_users) == (1, 1)

        proxy.cut(hold=True)
        await wait_for("the SDK to notice the drop", lambda: log.names().count("connecting") >= 2, details=proxy.wire)
        await publish_numbers(s.server, ch, [5, 6, 7])
        await wait_for("the SDK to reconnect (held at the proxy)", lambda: proxy.held > 0, details=proxy.wire)
        proxy.resume()
        await wait_for("the resubscribe", lambda: len(sub_log.subscribed) >= 2, details=proxy.wire)
        assert sub_log.subscribed[1].recovered is True, proxy.wire()
        await wait_for("the missed publications", lambda: len(sub_log.pubs) >= 7, details=proxy.wire)
        await asyncio.sleep(0.2)
        assert sub_log.offsets() == list(range(1, 8)), proxy.wire()

    run(server, scenario)


def test_server_api_unsubscribe_and_disconnect_reach_the_sdk(server: HeraldInstance) -> None:
    """`cent` (the server API judge) ends a subscription and then the connection of a user
    connected with centrifuge-python (the client judge)."""
    import cent

    async def scenario(s: Session) -> None:
        client, log, proxy = await s.client("carol")
        ch = channel()
        sub_log = SubLog()
        sub = client.new_subscription(ch, events=sub_log)
        await client.connect()
        await sub.subscribe()
        await sub.ready(5)
        api_client = cent.AsyncClient(s.server.api_url, s.server.api_key, timeout=10.0)
        await api_client.unsubscribe(cent.UnsubscribeRequest(user="carol", channel=ch))
        await wait_for("the server-side unsubscribe", lambda: sub_log.unsubscribed, details=proxy.wire)
        assert sub_log.unsubscribed[0].code == 2000, sub_log.unsubscribed
        await api_client.disconnect(cent.DisconnectRequest(user="carol"))
        await wait_for("the disconnect", lambda: "disconnected" in log.names(), details=proxy.wire)
        disconnected = next(ctx for name, ctx in log.events if name == "disconnected")
        assert disconnected.code == 3503, disconnected
        await asyncio.sleep(0.5)
        assert log.names().count("connecting") == 1, f"3503 means do not reconnect: {log.names()}"
        await api_client.close()

    run(server, scenario)
