"""Herald's one-way transports driven by stock clients, no Herald or Centrifugo SDK:

- Server-Sent Events (`/connection/sse`) read with `sseclient-py` over a `requests` stream,
  resumed with `Last-Event-ID` (the last `id:` seen);
- the uni-directional WebSocket (`/connection/uni_websocket`) with `websockets`, resumed with
  `?since=<cursor>` or with the cursor in the first message;
- long-poll (`/connection/poll`) and HTTP streaming (`/connection/stream`, NDJSON) with plain
  `requests`.

Every test receives publications on two channels, drops its connection, publishes through the
server API while the client is away, resumes, and asserts that exactly the missed publications
arrive (in offset order per channel, no duplicate, nothing skipped), then a live one. Every read
is bounded: a reader thread feeds a queue that the test takes from with a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import queue
import socket
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import requests
import sseclient
import websockets
from websockets.asyncio.client import connect as ws_connect

from conftest import HeraldInstance

ONEWAY_CONFIG = """
[client]
ping_interval = "3s"
pong_timeout = "3s"
recovery_max_publications = 20
"""
WAIT = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldInstance]:
    instance = HeraldInstance(tmp_path_factory.mktemp("herald-oneway"), extra_config=ONEWAY_CONFIG)
    instance.start()
    try:
        yield instance
    except BaseException:
        instance.kill()
        raise
    instance.stop()


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def mint_token(secret: str, sub: str, ttl: int = 3600) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": sub, "exp": int(time.time()) + ttl}
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


def publish(server: HeraldInstance, items: List[Tuple[str, int]]) -> List[Dict[str, Any]]:
    """Publishes {"n": n} to each (channel, n), in order."""
    return [api(server, "publish", {"channel": ch, "data": {"n": n}}) for ch, n in items]


def two_channels(kind: str) -> Tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    return f"{kind}-a-{tag}", f"{kind}-b-{tag}"


def query(channels: Tuple[str, ...], token: str, **extra: str) -> Dict[str, Any]:
    return {"channel": list(channels), "token": token, **extra}


def seen(pubs: List[Dict[str, Any]]) -> List[Tuple[str, int, Any]]:
    return [(p["channel"], p["offset"], p["data"]["n"]) for p in pubs]


# Publications in an interleaved order over two channels: a gets 1.., b gets 101..
def interleaved(a: str, b: str, a_numbers: List[int], b_numbers: List[int]) -> List[Tuple[str, int]]:
    out: List[Tuple[str, int]] = []
    for i in range(max(len(a_numbers), len(b_numbers))):
        if i < len(a_numbers):
            out.append((a, a_numbers[i]))
        if i < len(b_numbers):
            out.append((b, b_numbers[i]))
    return out


def per_channel(pubs: List[Dict[str, Any]], ch: str) -> List[Tuple[int, int]]:
    return [(p["offset"], p["data"]["n"]) for p in pubs if p["channel"] == ch]


class Reader:
    """Runs `source` (an iterator) in a thread; `take()` gets the next item within WAIT s."""

    def __init__(self, source: Iterator[Any], closer: Any) -> None:
        self.items: "queue.Queue[Any]" = queue.Queue()
        self.log: List[str] = []
        self._closer = closer
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                self.items.put(item)
        except Exception as err:  # closed under the reader
            self.items.put(err)
        self.items.put(StopIteration())

    def take(self, what: str) -> Any:
        try:
            item = self.items.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"timed out after {WAIT}s waiting for {what}; seen so far:\n" + "\n".join(self.log))
        if isinstance(item, BaseException):
            raise AssertionError(f"stream ended ({item!r}) while waiting for {what}; seen:\n" + "\n".join(self.log))
        self.log.append(repr(item))
        return item

    def close(self) -> None:
        self._closer()
        self._thread.join(timeout=5)


def hang_up(response: requests.Response) -> Any:
    """A closer that drops the TCP connection under a blocked reader (response.close() alone
    waits for the reader's next chunk)."""

    def close() -> None:
        connection = getattr(response.raw, "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        response.close()

    return close


# ---------------------------------------------------------------------------------------------
# Server-Sent Events with sseclient-py


def open_sse(server: HeraldInstance, channels: Tuple[str, ...], token: str, last_event_id: Optional[str] = None):
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    response = requests.get(
        f"{server.url}/connection/sse", params=query(channels, token), headers=headers, stream=True, timeout=(5, 30)
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream"), response.headers
    assert response.headers.get("Cache-Control") == "no-cache", response.headers
    client = sseclient.SSEClient(response)
    return response, Reader(client.events(), hang_up(response))


def take_sse_publications(reader: Reader, count: int) -> Tuple[List[Dict[str, Any]], str]:
    pubs: List[Dict[str, Any]] = []
    last_id = ""
    while len(pubs) < count:
        event = reader.take(f"SSE publication {len(pubs) + 1} of {count}")
        if event.event == "publication":
            pubs.append(json.loads(event.data))
            assert event.id, f"a publication without id: {event!r}"
            last_id = event.id
    return pubs, last_id


def test_sse_resumes_with_last_event_id_exactly_the_missed_publications(server: HeraldInstance) -> None:
    a, b = two_channels("sse")
    token = mint_token(server.hmac_secret, "sse-user")
    response, reader = open_sse(server, (a, b), token)
    try:
        connected = reader.take("the connected event")
        assert connected.event == "connected", connected
        start = json.loads(connected.data)
        assert set(start["channels"]) == {a, b}, start
        assert connected.id, "the connected event carries the cursor as its id"

        publish(server, interleaved(a, b, [1, 2, 3], [101, 102]))
        first, last_id = take_sse_publications(reader, 5)
        assert per_channel(first, a) == [(1, 1), (2, 2), (3, 3)], first
        assert per_channel(first, b) == [(1, 101), (2, 102)], first
        # The cursor: offset:epoch per channel, in URL order.
        parts = last_id.split(",")
        assert [p.split(":")[0] for p in parts] == ["3", "2"], last_id
    finally:
        reader.close()

    # Away: publications the client must get back.
    publish(server, interleaved(a, b, [4, 5, 6, 7], [103, 104, 105]))

    response, reader = open_sse(server, (a, b), token, last_event_id=last_id)
    try:
        connected = reader.take("the connected event after resuming")
        assert connected.event == "connected", connected
        resumed = json.loads(connected.data)
        for ch in (a, b):
            assert resumed["channels"][ch].get("recovered") is True, resumed
        missed, _ = take_sse_publications(reader, 7)
        assert per_channel(missed, a) == [(4, 4), (5, 5), (6, 6), (7, 7)], missed
        assert per_channel(missed, b) == [(3, 103), (4, 104), (5, 105)], missed
        publish(server, [(b, 106)])
        live, last_id = take_sse_publications(reader, 1)
        assert seen(live) == [(b, 6, 106)], live
        assert [p.split(":")[0] for p in last_id.split(",")] == ["7", "6"], last_id
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# HTTP streaming (NDJSON) with requests


def open_stream(server: HeraldInstance, channels: Tuple[str, ...], token: str, since: Optional[str] = None):
    extra = {"since": since} if since is not None else {}
    response = requests.get(
        f"{server.url}/connection/stream", params=query(channels, token, **extra), stream=True, timeout=(5, 30)
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/x-ndjson"), response.headers
    lines = (json.loads(line) for line in response.iter_lines() if line)
    return Reader(lines, hang_up(response))


def take_messages(reader: Reader, kind: str, count: int, what: str) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    while len(out) < count:
        message = reader.take(f"{what} {len(out) + 1} of {count}")
        if message.get("type") == kind:
            out.append(message)
        else:
            assert message.get("type") == "ping", f"unexpected message while waiting for {what}: {message}"
    return out


def cursor_after(channels: Tuple[str, ...], start: Dict[str, Any], pubs: List[Dict[str, Any]]) -> str:
    """Builds the cursor from the connected positions and the publications seen since."""
    position = {ch: (start[ch]["offset"], start[ch]["epoch"]) for ch in channels}
    for p in pubs:
        position[p["channel"]] = (p["offset"], p["epoch"])
    return ",".join(f"{position[ch][0]}:{position[ch][1]}" for ch in channels)


def test_http_stream_resumes_with_since_exactly_the_missed_publications(server: HeraldInstance) -> None:
    a, b = two_channels("stream")
    token = mint_token(server.hmac_secret, "stream-user")
    reader = open_stream(server, (a, b), token)
    try:
        (connected,) = take_messages(reader, "connected", 1, "the connected line")
        assert set(connected["channels"]) == {a, b}, connected
        publish(server, interleaved(a, b, [1, 2], [101, 102, 103]))
        first = take_messages(reader, "publication", 5, "publication line")
        assert per_channel(first, a) == [(1, 1), (2, 2)], first
        assert per_channel(first, b) == [(1, 101), (2, 102), (3, 103)], first
        cursor = cursor_after((a, b), connected["channels"], first)
    finally:
        reader.close()

    publish(server, interleaved(a, b, [3, 4, 5], [104]))

    reader = open_stream(server, (a, b), token, since=cursor)
    try:
        (connected,) = take_messages(reader, "connected", 1, "the connected line after resuming")
        for ch in (a, b):
            assert connected["channels"][ch].get("recovered") is True, connected
        missed = take_messages(reader, "publication", 4, "missed publication line")
        assert per_channel(missed, a) == [(3, 3), (4, 4), (5, 5)], missed
        assert per_channel(missed, b) == [(4, 104)], missed
        publish(server, [(a, 6)])
        live = take_messages(reader, "publication", 1, "the live publication line")
        assert seen(live) == [(a, 6, 6)], live
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# Long-poll with requests


def poll(server: HeraldInstance, channels: Tuple[str, ...], token: str, **params: str) -> Dict[str, Any]:
    response = requests.get(f"{server.url}/connection/poll", params=query(channels, token, **params), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_long_poll_waits_for_publications_and_catches_up_with_the_cursor(server: HeraldInstance) -> None:
    a, b = two_channels("poll")
    token = mint_token(server.hmac_secret, "poll-user")

    # Without since: the present, nothing old.
    publish(server, [(a, 1)])
    now = poll(server, (a, b), token, timeout="0")
    assert now["publications"] == [], now
    cursor = now["cursor"]
    assert [p.split(":")[0] for p in cursor.split(",")] == ["1", "0"], now

    # A waiting poll is answered by the next publication.
    answer: "queue.Queue[Any]" = queue.Queue()

    def waiting() -> None:
        try:
            answer.put((time.monotonic(), poll(server, (a, b), token, since=cursor, timeout="20s")))
        except BaseException as err:
            answer.put((time.monotonic(), err))

    thread = threading.Thread(target=waiting, daemon=True)
    thread.start()
    time.sleep(0.5)
    assert answer.empty(), f"the poll answered before any publication: {answer.queue}"
    published_at = time.monotonic()
    publish(server, [(b, 101)])
    answered_at, waited = answer.get(timeout=WAIT)
    assert not isinstance(waited, BaseException), waited
    assert answered_at - published_at < 5, "the waiting poll was not woken by the publication"
    assert seen(waited["publications"]) == [(b, 1, 101)], waited
    cursor = waited["cursor"]
    assert [p.split(":")[0] for p in cursor.split(",")] == ["1", "1"], waited

    # Away (no request open): the next poll returns exactly the missed ones at once.
    publish(server, interleaved(a, b, [2, 3, 4], [102, 103]))
    started = time.monotonic()
    caught_up = poll(server, (a, b), token, since=cursor, timeout="20s")
    assert time.monotonic() - started < 5, "missed publications must come back at once"
    assert per_channel(caught_up["publications"], a) == [(2, 2), (3, 3), (4, 4)], caught_up
    assert per_channel(caught_up["publications"], b) == [(2, 102), (3, 103)], caught_up
    for ch in (a, b):
        assert caught_up["channels"][ch].get("recovered") is True, caught_up
    cursor = caught_up["cursor"]
    assert [p.split(":")[0] for p in cursor.split(",")] == ["4", "3"], caught_up

    # Nothing missed and timeout=0: an empty answer with the same position.
    empty = poll(server, (a, b), token, since=cursor, timeout="0")
    assert empty["publications"] == [], empty
    assert empty["cursor"] == cursor, empty


# ---------------------------------------------------------------------------------------------
# Uni-directional WebSocket with websockets


@pytest.mark.parametrize("resume_via", ["url", "first_message"])
def test_uni_websocket_resumes_with_since_exactly_the_missed_publications(server: HeraldInstance, resume_via: str) -> None:
    """Resumes with `?since=` in the URL, or with nothing in the URL and the channels, token and
    cursor in the first message the client sends."""
    # websockets.asyncio.client is the implementation of websockets >= 13 (pinned: 17.4).
    assert int(websockets.__version__.split(".")[0]) >= 13, websockets.__version__
    a, b = two_channels("uniws")
    token = mint_token(server.hmac_secret, "uniws-user")
    base = server.url.replace("http://", "ws://") + "/connection/uni_websocket"

    def url(**extra: str) -> str:
        return base + "?" + requests.compat.urlencode(query((a, b), token, **extra), doseq=True)

    async def take(ws: Any, kind: str, count: int, what: str, log: List[Any]) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        while len(out) < count:
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout=WAIT)
            except asyncio.TimeoutError:
                raise AssertionError(f"timed out waiting for {what}; seen: {log}")
            assert isinstance(raw, str), f"a binary message: {raw!r}"
            message = json.loads(raw)
            log.append(message)
            if message.get("type") == kind:
                out.append(message)
            else:
                assert message.get("type") == "ping", f"unexpected message while waiting for {what}: {message}"
        return out

    async def run() -> None:
        loop = asyncio.get_running_loop()
        log: List[Any] = []
        async with ws_connect(url()) as ws:
            (connected,) = await take(ws, "connected", 1, "connected", log)
            assert set(connected["channels"]) == {a, b}, connected
            await loop.run_in_executor(None, publish, server, interleaved(a, b, [1, 2, 3], [101]))
            first = await take(ws, "publication", 4, "publications", log)
            assert per_channel(first, a) == [(1, 1), (2, 2), (3, 3)], first
            assert per_channel(first, b) == [(1, 101)], first
            cursor = cursor_after((a, b), connected["channels"], first)
        # Closed by the client; publish while away.
        await loop.run_in_executor(None, publish, server, interleaved(a, b, [4], [102, 103, 104]))
        log.clear()
        if resume_via == "url":
            resumed = ws_connect(url(since=cursor))
        else:
            resumed = ws_connect(base)
        async with resumed as ws:
            if resume_via == "first_message":
                await ws.send(json.dumps({"channels": [a, b], "token": token, "since": cursor}))
            (connected,) = await take(ws, "connected", 1, "connected after resuming", log)
            for ch in (a, b):
                assert connected["channels"][ch].get("recovered") is True, connected
            missed = await take(ws, "publication", 4, "missed publications", log)
            assert per_channel(missed, a) == [(4, 4)], missed
            assert per_channel(missed, b) == [(2, 102), (3, 103), (4, 104)], missed
            await loop.run_in_executor(None, publish, server, [(a, 5)])
            live = await take(ws, "publication", 1, "the live publication", log)
            assert seen(live) == [(a, 5, 5)], live
            assert connected.get("cursor"), connected

    asyncio.run(asyncio.wait_for(run(), timeout=60))
