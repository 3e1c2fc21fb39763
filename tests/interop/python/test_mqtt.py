"""Herald's MQTT listener (`[mqtt]`, docs/mqtt.md) judged by the ecosystem's own clients:
Python `paho-mqtt` (MQTT 3.1.1 and MQTT 5 clients) and Debian's `mosquitto_pub` /
`mosquitto_sub`, plus raw sockets where a test needs bytes no client sends (garbage, a
silent keep-alive).

Topics map to channels of the `mqtt` namespace (`sensors/1` is `mqtt:sensors/1`), so the
cross-transport cases publish and read through the server API, the `centrifuge` SDK over the
WebSocket and SSE. The listener binds port 0 (a Mosquitto broker already owns 1883 on the
test machines); its address is read from `herald serve`'s banner (`  mqtt:    mqtt://ADDR`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import queue
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

import paho.mqtt.client as paho
import pytest
import requests
import sseclient
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import HeraldInstance

MQTT_CONFIG = """
[client]
allow_anonymous = true
max_queue_bytes = 65536

[mqtt]
enabled = true
listen = "127.0.0.1:0"
namespace = "mqtt"
max_packet_size = 4096
max_subscriptions = 8

# MQTT topics live here: history on, clients may publish; anonymous clients may do neither.
[[namespaces]]
name = "mqtt"
history_size = 1000
history_ttl = "1h"
allow_publish_for_client = true
"""
WAIT = 10.0
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"


def mqtt_address(instance: HeraldInstance) -> Tuple[str, int]:
    """The MQTT listener's address from the banner `herald serve` prints."""
    assert instance.process is not None
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for line in list(instance.process.stdout_lines):
            if "mqtt://" in line:
                host, port = line.split("mqtt://", 1)[1].strip().rsplit(":", 1)
                return host, int(port)
        time.sleep(0.05)
    raise AssertionError(f"no mqtt:// line in herald's banner{instance.process.diagnostics()}")


def start(instance: HeraldInstance) -> HeraldInstance:
    instance.start()
    instance.mqtt = mqtt_address(instance)  # type: ignore[attr-defined]
    return instance


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldInstance]:
    instance = HeraldInstance(tmp_path_factory.mktemp("herald-mqtt"), extra_config=MQTT_CONFIG)
    start(instance)
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


def history(server: HeraldInstance, channel: str) -> List[Dict[str, Any]]:
    return api(server, "history", {"channel": channel, "limit": 10000})["publications"]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


class Mqtt:
    """A paho client (3.1.1 or 5) whose callbacks feed queues the test takes from with a
    time limit."""

    def __init__(self, server: HeraldInstance, version: int, token: Optional[str], **connect: Any) -> None:
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        self.version = version
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=unique("paho-"), protocol=protocol
        )
        if token is not None:
            self.client.username_pw_set("ignored", token)
        self.messages: "queue.Queue[paho.MQTTMessage]" = queue.Queue()
        self.subacks: "queue.Queue[List[Any]]" = queue.Queue()
        self.connacks: "queue.Queue[Any]" = queue.Queue()
        self.disconnects: "queue.Queue[Any]" = queue.Queue()
        self.acks: Dict[int, Any] = {}
        self.client.on_connect = lambda c, u, flags, rc, props: self.connacks.put(rc)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put(list(codes))
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)
        self.client.on_publish = self._published
        host, port = server.mqtt  # type: ignore[attr-defined]
        self.client.connect(host, port, keepalive=30, **connect)
        self.client.loop_start()

    def _published(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self.acks[mid] = rc

    def connack(self) -> Any:
        return self.connacks.get(timeout=WAIT)

    def connected(self) -> "Mqtt":
        rc = self.connack()
        assert not rc.is_failure, f"CONNACK {rc}"
        return self

    def subscribe(self, *filters: Tuple[str, int]) -> List[Any]:
        self.client.subscribe(list(filters))
        return self.subacks.get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes, qos: int) -> Any:
        """Publishes and waits for the acknowledgement (QoS 1/2); the reason code (MQTT 5)."""
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"no acknowledgement for {topic!r} QoS {qos}"
        return self.acks.get(info.mid)

    def take(self, what: str) -> paho.MQTTMessage:
        try:
            return self.messages.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"timed out after {WAIT}s waiting for {what}")

    def nothing_more(self, wait: float = 0.5) -> None:
        time.sleep(wait)
        assert self.messages.empty(), f"unexpected message: {self.messages.get().topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def codes(suback: List[Any]) -> List[int]:
    return [code.value for code in suback]


# ---------------------------------------------------------------------------------------------
# Both protocol levels with paho-mqtt


@pytest.mark.parametrize("sub_version,pub_version", [(4, 5), (5, 4)])
def test_paho_publishes_and_subscribes_at_every_qos(server: HeraldInstance, sub_version: int, pub_version: int) -> None:
    user = unique("u")
    token = mint_token(server.hmac_secret, user)
    base = unique("plant/")
    sub = Mqtt(server, sub_version, token).connected()
    pub = Mqtt(server, pub_version, token).connected()
    try:
        assert codes(sub.subscribe((f"{base}/+/temp", 2), (f"{base}/exact", 1))) == [2, 1]
        sent = []
        for qos in (0, 1, 2):
            payload = json.dumps({"qos": qos, "t": 20 + qos}).encode()
            rc = pub.publish(f"{base}/{qos}/temp", payload, qos)
            if pub_version == 5 and qos > 0:
                assert rc.value == 0, f"QoS {qos} acknowledged with {rc}"
            sent.append((f"{base}/{qos}/temp", payload, qos))
        pub.publish(f"{base}/exact", b"binary \x00\xff", 1)
        got = [sub.take(f"message {i}") for i in range(4)]
        # Order holds per channel (topic), not across them; the publisher's QoS caps the
        # delivery's.
        expected = sent + [(f"{base}/exact", b"binary \x00\xff", 1)]
        assert sorted((m.topic, m.payload, m.qos) for m in got) == sorted(expected)
        sub.nothing_more()
        # What was acknowledged is in history, as the channel of the topic.
        stored = history(server, f"mqtt:{base}/2/temp")
        assert [p["data"] for p in stored] == [{"qos": 2, "t": 22}]
    finally:
        sub.close()
        pub.close()


def test_wildcards_do_not_match_dollar_topics_and_unsubscribe_stops_delivery(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    client = Mqtt(server, 5, token).connected()
    dollar = Mqtt(server, 4, token).connected()
    try:
        assert codes(client.subscribe(("#", 1))) == [1]
        assert codes(dollar.subscribe(("$SYS/#", 1))) == [1]
        # `$` topics cannot be published over MQTT (reserved), but a channel of the namespace
        # can be published by the server API.
        api(server, "publish", {"channel": "mqtt:$SYS/load", "data": {"load": 1}})
        topic = unique("w/")
        api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"n": 1}})
        got = client.take("the plain topic")
        assert (got.topic, json.loads(got.payload)) == (topic, {"n": 1})
        client.nothing_more()
        got = dollar.take("the $SYS topic")
        assert got.topic == "$SYS/load"
        # Channels of other namespaces and user-limited channels have no topic.
        api(server, "publish", {"channel": "room:x", "data": {}})
        api(server, "publish", {"channel": "mqtt:inbox#alice", "data": {}})
        client.nothing_more()
        client.client.unsubscribe("#")
        time.sleep(0.3)
        api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"n": 2}})
        client.nothing_more()
    finally:
        client.close()
        dollar.close()


def test_no_local_keeps_a_clients_own_publications_from_it(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    topic = unique("nolocal/")
    me = Mqtt(server, 5, token).connected()
    other = Mqtt(server, 5, token).connected()
    try:
        me.client.subscribe(topic, options=paho.SubscribeOptions(qos=1, noLocal=True))
        assert codes(me.subacks.get(timeout=WAIT)) == [1]
        me.publish(topic, b'{"from":"me"}', 1)
        other.publish(topic, b'{"from":"other"}', 1)
        got = me.take("the other client's publication")
        assert json.loads(got.payload) == {"from": "other"}
        me.nothing_more()
    finally:
        me.close()
        other.close()


def test_user_properties_are_the_publications_tags(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    topic = unique("props/")
    sub = Mqtt(server, 5, token).connected()
    pub = Mqtt(server, 5, token).connected()
    try:
        assert codes(sub.subscribe((topic, 1))) == [1]
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("unit", "celsius"), ("sensor", "t-1")]
        info = pub.client.publish(topic, b'{"c":21}', qos=1, properties=props)
        info.wait_for_publish(timeout=WAIT)
        got = sub.take("the publication")
        assert sorted(got.properties.UserProperty) == [("sensor", "t-1"), ("unit", "celsius")]
        stored = history(server, f"mqtt:{topic}")
        assert stored[0]["tags"] == {"sensor": "t-1", "unit": "celsius", "mqtt_qos": "1"}, stored
        # Tags published over HTTP come to MQTT 5 subscribers as user properties.
        api(server, "publish", {"channel": f"mqtt:{topic}", "data": {}, "tags": {"origin": "api"}})
        got = sub.take("the API publication")
        assert got.properties.UserProperty == [("origin", "api")]
    finally:
        sub.close()
        pub.close()


def test_admission_refuses_with_suback_and_puback_reason_codes(server: HeraldInstance) -> None:
    # Anonymous connections are allowed ([client] allow_anonymous), but the `mqtt` namespace
    # does not let anonymous clients subscribe or publish: the one admission path says no.
    anon5 = Mqtt(server, 5, None).connected()
    anon4 = Mqtt(server, 4, None).connected()
    user = Mqtt(server, 5, mint_token(server.hmac_secret, unique("u"))).connected()
    try:
        assert codes(anon5.subscribe(("a/b", 1), ("a/#", 0), ("$share/g/a/b", 1))) == [0x87] * 3
        assert codes(anon4.subscribe(("a/b", 1))) == [0x80]
        rc = anon5.publish("a/b", b"{}", 1)
        assert rc.value == 0x87, rc
        assert history(server, "mqtt:a/b") == []
        # Topics outside the channel alphabet are refused per filter.
        assert codes(user.subscribe(("$share/g/a", 1), ("bad topic", 1), ("ok/1", 1))) == [1, 0x8F, 1]
        rc = user.publish("bad topic", b"{}", 1)
        assert rc.value == 0x90, rc
        rc = user.publish("$SYS/x", b"{}", 1)
        assert rc.value == 0x90, rc
        # At most 8 subscriptions per connection (config, shared ones count): the rest fail
        # with quota exceeded.
        asks = [(f"q/{i}", 0) for i in range(10)]
        assert codes(user.subscribe(*asks)) == [0] * 6 + [0x97] * 4
    finally:
        anon5.close()
        anon4.close()
        user.close()


@pytest.mark.parametrize("version", [5, 4])
def test_a_bad_token_is_refused_in_the_connack(server: HeraldInstance, version: int) -> None:
    client = Mqtt(server, version, "not-a-jwt")
    try:
        rc = client.connack()
        # MQTT 5's 0x86; paho reports 3.1.1's return code 4 as the same reason.
        assert rc.value == 0x86 and rc.getName() == "Bad user name or password", rc
    finally:
        client.client.loop_stop()


def test_retained_is_the_channels_latest_publication_and_an_empty_retained_publish_clears_it(server: HeraldInstance) -> None:
    host, port = server.mqtt  # type: ignore[attr-defined]
    token = mint_token(server.hmac_secret, unique("u"))
    topic = unique("retained/")
    for v in (1, 2):
        api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"v": v}})
    client = Mqtt(server, 5, token).connected()
    never = Mqtt(server, 5, token).connected()
    try:
        assert codes(client.subscribe((topic, 1))) == [1]
        got = client.take("the retained publication")
        assert (json.loads(got.payload), got.retain) == ({"v": 2}, True)
        # Retain handling 2: no retained publication on subscribe.
        never.client.subscribe(topic, options=paho.SubscribeOptions(qos=1, retainHandling=2))
        assert codes(never.subacks.get(timeout=WAIT)) == [1]
        api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"v": 3}})
        got = client.take("the live publication")
        assert (json.loads(got.payload), got.retain) == ({"v": 3}, False)
        got = never.take("the live publication")
        assert json.loads(got.payload) == {"v": 3}
        never.nothing_more()
        # An empty retained publish (mosquitto_pub -r -n) clears it: it is delivered live as
        # an empty message, and a new subscriber gets no retained publication.
        result = subprocess.run(
            [MOSQUITTO_PUB, "-h", host, "-p", str(port), "-u", "x", "-P", token, "-t", topic, "-r", "-n", "-q", "1"],
            capture_output=True, text=True, timeout=WAIT,
        )
        assert result.returncode == 0, result.stderr
        assert client.take("the empty publication").payload == b""
    finally:
        client.close()
        never.close()
    late = Mqtt(server, 4, token).connected()
    try:
        assert codes(late.subscribe((topic, 1))) == [1]
        late.nothing_more()
    finally:
        late.close()


def test_will_is_published_when_the_device_drops_not_when_it_disconnects(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    topic = unique("status/")
    watcher = Mqtt(server, 5, token).connected()
    try:
        assert codes(watcher.subscribe((topic, 1))) == [1]
        for version, clean in ((4, True), (5, False), (4, False)):
            device = paho.Client(
                paho.CallbackAPIVersion.VERSION2, client_id=unique("dev-"),
                protocol=paho.MQTTv5 if version == 5 else paho.MQTTv311,
            )
            device.username_pw_set("x", token)
            device.will_set(topic, json.dumps({"online": False, "v": version, "clean": clean}).encode(), qos=1)
            connected = threading.Event()
            device.on_connect = lambda c, u, f, rc, p: connected.set()
            device.connect(*server.mqtt, keepalive=30)  # type: ignore[attr-defined]
            device.loop_start()
            assert connected.wait(WAIT)
            if clean:
                device.disconnect()
                device.loop_stop()
                watcher.nothing_more()
            else:
                device.loop_stop()
                sock = device.socket()
                sock.shutdown(socket.SHUT_RDWR)  # gone without a DISCONNECT
                sock.close()
                got = watcher.take(f"the will of the {version} device")
                assert json.loads(got.payload) == {"online": False, "v": version, "clean": False}
        history_data = [p["data"] for p in history(server, f"mqtt:{topic}")]
        assert history_data == [{"online": False, "v": 5, "clean": False}, {"online": False, "v": 4, "clean": False}]
    finally:
        watcher.close()


def test_will_delay_waits_and_a_returning_client_cancels_it(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    topic = unique("delayed/")
    client_id = unique("dev-")
    watcher = Mqtt(server, 5, token).connected()

    def device_that_drops(payload: bytes) -> None:
        device = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        device.username_pw_set("x", token)
        will = Properties(PacketTypes.WILLMESSAGE)
        will.WillDelayInterval = 2
        device.will_set(topic, payload, qos=1, properties=will)
        connected = threading.Event()
        device.on_connect = lambda c, u, f, rc, p: connected.set()
        device.connect(*server.mqtt, keepalive=30)  # type: ignore[attr-defined]
        device.loop_start()
        assert connected.wait(WAIT)
        device.loop_stop()
        sock = device.socket()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    try:
        assert codes(watcher.subscribe((topic, 1))) == [1]
        device_that_drops(b'{"will":1}')
        time.sleep(0.5)
        device_that_drops(b'{"will":2}')  # back within the delay: will 1 is not published
        got = watcher.take("the second will, after its delay")
        assert json.loads(got.payload) == {"will": 2}
        watcher.nothing_more(1.0)
    finally:
        watcher.close()


# ---------------------------------------------------------------------------------------------
# Persistent sessions


class Device:
    """A paho client with a fixed client id and a persistent session."""

    def __init__(self, server: HeraldInstance, version: int, token: str, client_id: str, expiry: int = 300) -> None:
        self.version = version
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=paho.MQTTv5 if version == 5 else paho.MQTTv311,
            clean_session=None if version == 5 else False,
        )
        self.client.username_pw_set("x", token)
        self.messages: "queue.Queue[paho.MQTTMessage]" = queue.Queue()
        self.connacks: "queue.Queue[Tuple[Any, Any, Any]]" = queue.Queue()
        self.subacks: "queue.Queue[List[Any]]" = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connacks.put((flags, rc, props))
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put(list(codes))
        host, port = server.mqtt  # type: ignore[attr-defined]
        if version == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
            self.client.connect(host, port, keepalive=30, clean_start=False, properties=props)
        else:
            self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        flags, rc, props = self.connacks.get(timeout=WAIT)
        assert not rc.is_failure, rc
        self.session_present = flags.session_present
        self.reason_string = getattr(props, "ReasonString", None) if props is not None else None

    def take(self, what: str) -> paho.MQTTMessage:
        try:
            return self.messages.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"timed out after {WAIT}s waiting for {what}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("version", [4, 5])
def test_a_persistent_session_resumes_from_history_after_the_device_was_away(server: HeraldInstance, version: int) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    client_id = unique("device-")
    topic = unique("fleet/") + "/cmd"
    channel = f"mqtt:{topic}"
    device = Device(server, version, token, client_id)
    assert not device.session_present, "a new session"
    device.client.subscribe(topic, qos=1)
    assert codes(device.subacks.get(timeout=WAIT)) == [1]
    for n in range(2):
        api(server, "publish", {"channel": channel, "data": {"n": n}})
    assert [json.loads(device.take(f"live {n}").payload)["n"] for n in range(2)] == [0, 1]
    time.sleep(0.2)  # the acknowledgements reach the server
    device.close()
    # Publications go on while the device is away.
    for n in range(2, 7):
        api(server, "publish", {"channel": channel, "data": {"n": n}})
    device = Device(server, version, token, client_id)
    try:
        assert device.session_present, "the session was kept"
        # Without subscribing again: what it missed, from history, in order, then live.
        missed = [json.loads(device.take(f"missed {n}").payload)["n"] for n in range(2, 7)]
        assert missed == [2, 3, 4, 5, 6]
        api(server, "publish", {"channel": channel, "data": {"n": 7}})
        assert json.loads(device.take("live 7").payload)["n"] == 7
        time.sleep(0.3)
        assert device.messages.empty(), "no repeat"
    finally:
        device.close()


def test_a_session_whose_missed_publications_are_gone_starts_over_and_says_so(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    client_id = unique("device-")
    topic = unique("gone/")
    device = Device(server, 5, token, client_id)
    device.client.subscribe(topic, qos=1)
    assert codes(device.subacks.get(timeout=WAIT)) == [1]
    api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"n": 0}})
    device.take("live 0")
    time.sleep(0.2)
    device.close()
    api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"n": 1}})
    api(server, "history_remove", {"channel": f"mqtt:{topic}"})
    device = Device(server, 5, token, client_id)
    try:
        assert not device.session_present, "history lost what it missed: the session starts over"
        assert device.reason_string and "history no longer holds" in device.reason_string, device.reason_string
        api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"n": 2}})
        time.sleep(0.5)
        assert device.messages.empty(), "no subscription left: nothing arrives until it subscribes again"
    finally:
        device.close()
    stderr = server.process.log_path.read_text()  # type: ignore[union-attr]
    assert "history no longer holds what the session missed" in stderr


def raw_connect_v311(client_id: str, token: str, clean: bool) -> bytes:
    flags = 0xC0 | (0x02 if clean else 0)
    payload = struct.pack("!H", len(client_id)) + client_id.encode()
    payload += struct.pack("!H", 1) + b"x" + struct.pack("!H", len(token)) + token.encode()
    body = struct.pack("!H", 4) + b"MQTT" + bytes([4, flags]) + struct.pack("!H", 30) + payload
    return bytes([0x10]) + varint(len(body)) + body


def test_unacknowledged_qos1_deliveries_come_again_with_dup(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    client_id = unique("raw-")
    topic = unique("dup/")
    sock = socket.create_connection(server.mqtt, timeout=WAIT)  # type: ignore[attr-defined]
    sock.sendall(raw_connect_v311(client_id, token, clean=False))
    assert read_packet(sock) == (0x20, b"\x00\x00")
    subscribe = struct.pack("!H", 1) + struct.pack("!H", len(topic)) + topic.encode() + b"\x01"
    sock.sendall(bytes([0x82]) + varint(len(subscribe)) + subscribe)
    assert read_packet(sock) == (0x90, b"\x00\x01\x01")
    for n in range(3):
        api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"n": n}})
    first = [read_packet(sock) for _ in range(3)]
    assert all(kind == 0x32 for kind, _ in first), first  # QoS 1, no DUP
    # Acknowledge the first only, then vanish.
    pkid = first[0][1][2 + len(topic): 4 + len(topic)]
    sock.sendall(b"\x40\x02" + pkid)
    time.sleep(1.5)  # past the session's save interval
    sock.close()
    sock = socket.create_connection(server.mqtt, timeout=WAIT)  # type: ignore[attr-defined]
    try:
        sock.sendall(raw_connect_v311(client_id, token, clean=False))
        assert read_packet(sock) == (0x20, b"\x01\x00"), "session present"
        again = [read_packet(sock) for _ in range(2)]
        assert [kind for kind, _ in again] == [0x3A, 0x3A], again  # QoS 1 with DUP
        assert [json.loads(body[4 + len(topic):]) for _, body in again] == [{"n": 1}, {"n": 2}]
    finally:
        sock.close()


def test_a_session_survives_kill_9_and_resumes_on_the_restarted_node(herald_factory: Any) -> None:
    instance = herald_factory()
    instance.config.write_text(instance.config.read_text() + MQTT_CONFIG)
    start(instance)
    token = mint_token(instance.hmac_secret, "device")
    client_id = unique("device-")
    topic = unique("site/")
    channel = f"mqtt:{topic}"
    device = Device(instance, 4, token, client_id)
    device.client.subscribe(topic, qos=1)
    assert codes(device.subacks.get(timeout=WAIT)) == [1]
    for n in range(5):
        api(instance, "publish", {"channel": channel, "data": {"n": n}})
    got = [json.loads(device.take(f"live {n}").payload)["n"] for n in range(5)]
    assert got == list(range(5))
    time.sleep(1.5)  # the positions are saved
    instance.process.proc.kill()  # SIGKILL
    instance.process.proc.wait()
    device.client.loop_stop()
    start(instance)  # the "other node": a new process on the same storage, a new port
    for n in range(5, 10):
        api(instance, "publish", {"channel": channel, "data": {"n": n}})
    device = Device(instance, 4, token, client_id)
    try:
        assert device.session_present
        resumed = [json.loads(device.take(f"resumed {n}").payload)["n"] for n in range(5, 10)]
        assert resumed == list(range(5, 10)), resumed
        time.sleep(0.3)
        assert device.messages.empty()
    finally:
        device.close()
        instance.stop()


def stored_sessions(instance: HeraldInstance) -> List[str]:
    """The session documents in the node's `outbound.db` (read-only, beside the server)."""
    import sqlite3

    db = sqlite3.connect(f"file:{instance.data_dir / 'outbound.db'}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT id FROM webhook_documents WHERE collection = 'mqtt_sessions'").fetchall()
    finally:
        db.close()
    return [row[0] for row in rows]


def test_sessions_that_expired_while_away_are_purged(herald_factory: Any) -> None:
    instance = herald_factory()
    config = MQTT_CONFIG.replace("max_subscriptions = 8", 'max_subscriptions = 8\nsession_purge_interval = "1s"')
    instance.config.write_text(instance.config.read_text() + config)
    start(instance)
    try:
        token = mint_token(instance.hmac_secret, "device")
        short, long_, online = unique("short-"), unique("long-"), unique("online-")
        devices = {
            short: Device(instance, 5, token, short, expiry=2),
            long_: Device(instance, 5, token, long_, expiry=3600),
            online: Device(instance, 5, token, online, expiry=1),
        }
        for device in devices.values():
            device.client.subscribe(unique("t/"), qos=1)
            assert codes(device.subacks.get(timeout=WAIT)) == [1]
        devices[short].close()
        devices[long_].close()
        time.sleep(0.5)
        kept = " ".join(stored_sessions(instance))
        assert short in kept and long_ in kept and online in kept, kept
        deadline = time.monotonic() + 8
        while short in " ".join(stored_sessions(instance)) and time.monotonic() < deadline:
            time.sleep(0.2)
        kept = " ".join(stored_sessions(instance))
        assert short not in kept, "the 2 s session was purged after it expired"
        assert long_ in kept, "an unexpired session stays"
        assert online in kept, "a connected session stays, however short its expiry"
        devices[online].close()
    finally:
        instance.stop()
    assert "expired sessions deleted" in instance.process.log_path.read_text()  # type: ignore[union-attr]


def test_username_and_password_checked_by_the_backend_proxy(herald_factory: Any) -> None:
    """With `[proxy] connect_endpoint`, a password that is not a JWT goes to the backend with
    the username and client id; its answer names the user (or refuses)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: List[Dict[str, Any]] = []

    class Backend(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append(body)
            data = body.get("data") or {}
            if data.get("username") == "meter-7" and data.get("password") == "s3cret":
                reply = {"result": {"user": "meter-7"}}
            else:
                reply = {"error": {"code": 4001, "message": "unknown device"}}
            payload = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    backend = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    instance = herald_factory()
    instance.config.write_text(
        instance.config.read_text()
        + MQTT_CONFIG
        + f"""
[proxy]
connect_endpoint = "http://127.0.0.1:{backend.server_address[1]}/connect"
"""
    )
    start(instance)
    try:
        def connect(username: str, password: str) -> Tuple[Any, Optional[Mqtt]]:
            client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=unique("m-"), protocol=paho.MQTTv5)
            client.username_pw_set(username, password)
            connacks: "queue.Queue[Any]" = queue.Queue()
            client.on_connect = lambda c, u, f, rc, props: connacks.put(rc)
            client.connect(*instance.mqtt, keepalive=30)  # type: ignore[attr-defined]
            client.loop_start()
            rc = connacks.get(timeout=WAIT)
            client.disconnect()
            client.loop_stop()
            return rc, None

        rc, _ = connect("meter-7", "s3cret")
        assert not rc.is_failure, rc
        assert asked[-1]["transport"] == "mqtt" and asked[-1]["data"]["username"] == "meter-7", asked[-1]
        rc, _ = connect("meter-7", "wrong")
        assert rc.value == 0x87, rc
        # A JWT password is still verified by Herald, without asking the backend.
        before = len(asked)
        rc, _ = connect("x", mint_token(instance.hmac_secret, "jwt-user"))
        assert not rc.is_failure, rc
        assert len(asked) == before
    finally:
        instance.stop()
        backend.shutdown()


# ---------------------------------------------------------------------------------------------
# mosquitto_pub / mosquitto_sub and the other transports


def test_http_publish_reaches_mosquitto_sub(server: HeraldInstance) -> None:
    host, port = server.mqtt  # type: ignore[attr-defined]
    token = mint_token(server.hmac_secret, unique("u"))
    topic = unique("devices/") + "/cmd"
    # stdbuf: mosquitto_sub's stdout is a pipe here, line-buffer it to see the SUBACK line.
    proc = subprocess.Popen(
        ["stdbuf", "-oL", MOSQUITTO_SUB, "-h", host, "-p", str(port), "-V", "mqttv5", "-u", "x", "-P", token,
         "-t", topic, "-q", "1", "-C", "3", "-v", "-d"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines: "queue.Queue[str]" = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(l.rstrip("\n")) for l in proc.stdout], daemon=True)  # type: ignore[union-attr]
        reader.start()
        seen: List[str] = []
        while not any("received SUBACK" in l for l in seen):
            try:
                seen.append(lines.get(timeout=WAIT))
            except queue.Empty:
                raise AssertionError(f"no SUBACK line from mosquitto_sub within {WAIT}s: {seen}")
        for n in range(3):
            api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"cmd": "open", "n": n}})
        assert proc.wait(timeout=WAIT) == 0, "\n".join(seen)
        # The process has exited; its last lines may still be in the reader thread, which ends at EOF.
        reader.join(timeout=WAIT)
        while not lines.empty():
            seen.append(lines.get())
        payloads = [l.split(" ", 1)[1] for l in seen if l.startswith(topic + " ")]
        assert [json.loads(p) for p in payloads] == [{"cmd": "open", "n": n} for n in range(3)], seen
    finally:
        if proc.poll() is None:
            proc.kill()


def test_mosquitto_pub_reaches_the_centrifuge_sdk_and_sse(server: HeraldInstance) -> None:
    from centrifuge import Client, PublicationContext, SubscriptionEventHandler

    host, port = server.mqtt  # type: ignore[attr-defined]
    user = unique("u")
    token = mint_token(server.hmac_secret, user)
    topic = unique("sensors/") + "/temp"
    channel = f"mqtt:{topic}"
    response = requests.get(
        f"{server.url}/connection/sse", params={"channel": channel, "token": token},
        headers={"Accept": "text/event-stream"}, stream=True, timeout=(5, 30),
    )
    assert response.status_code == 200, response.text

    class Pubs(SubscriptionEventHandler):
        def __init__(self) -> None:
            self.pubs: List[PublicationContext] = []

        async def on_publication(self, ctx: PublicationContext) -> None:
            self.pubs.append(ctx)

    async def scenario() -> None:
        pubs = Pubs()
        client = Client(f"ws://{server.url.split('://', 1)[1]}/connection/websocket", token=token, proxy=None)
        sub = client.new_subscription(channel, events=pubs)
        await client.connect()
        await sub.subscribe()
        await sub.ready(5)
        try:
            for n in range(3):
                result = subprocess.run(
                    [MOSQUITTO_PUB, "-h", host, "-p", str(port), "-u", "x", "-P", token, "-t", topic,
                     "-q", "1", "-m", json.dumps({"n": n})],
                    capture_output=True, text=True, timeout=WAIT,
                )
                assert result.returncode == 0, result.stderr
            deadline = time.monotonic() + WAIT
            while len(pubs.pubs) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert [p.pub.data for p in pubs.pubs] == [{"n": n} for n in range(3)]
            assert [p.pub.offset for p in pubs.pubs] == [1, 2, 3]
        finally:
            await client.disconnect()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    # The SSE stream was subscribed before the publishes (its headers came back): its events
    # wait in the socket. Read here, not in a thread: closing a response another thread is
    # blocked reading waits for that read's timeout.
    sse = []
    for event in sseclient.SSEClient(response).events():
        if event.event == "publication":
            sse.append(json.loads(event.data))
            if len(sse) == 3:
                break
    response.close()
    assert [p["data"] for p in sse] == [{"n": n} for n in range(3)], sse


# ---------------------------------------------------------------------------------------------
# MQTT over TLS


def make_certificates(folder: Any) -> Tuple[str, str, str]:
    """A test CA and a certificate for 127.0.0.1 it signed, made at run time with openssl."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
            "-subj", "/CN=herald-mqtt-test-ca", "-keyout", "ca.key", "-out", "ca.pem")
    (folder / "leaf.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "key.pem", "-out", "leaf.csr")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "leaf.ext", "-out", "cert.pem")
    return str(folder / "ca.pem"), str(folder / "cert.pem"), str(folder / "key.pem")


def test_mqtt_over_tls_with_mosquitto_and_paho(herald_factory: Any, tmp_path: Any) -> None:
    ca, cert, key = make_certificates(tmp_path)
    instance = herald_factory()
    tls_config = MQTT_CONFIG.replace(
        'namespace = "mqtt"\n',
        f'namespace = "mqtt"\ntls_listen = "127.0.0.1:0"\ntls_cert_file = {json.dumps(cert)}\ntls_key_file = {json.dumps(key)}\n',
        1,
    )
    instance.config.write_text(instance.config.read_text() + tls_config)
    start(instance)
    deadline = time.monotonic() + WAIT
    tls_port = None
    while tls_port is None and time.monotonic() < deadline:
        for line in list(instance.process.stdout_lines):
            if "mqtts://" in line:
                tls_port = int(line.rsplit(":", 1)[1])
        time.sleep(0.05)
    assert tls_port, f"no mqtts:// line{instance.process.diagnostics()}"
    token = mint_token(instance.hmac_secret, "tls-user")
    topic = unique("secure/")
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=unique("tls-"), protocol=paho.MQTTv5)
    client.tls_set(ca_certs=ca)
    client.username_pw_set("x", token)
    messages: "queue.Queue[paho.MQTTMessage]" = queue.Queue()
    subacks: "queue.Queue[Any]" = queue.Queue()
    client.on_message = lambda c, u, msg: messages.put(msg)
    client.on_subscribe = lambda c, u, mid, rcs, props: subacks.put(rcs)
    client.connect("127.0.0.1", tls_port, keepalive=30)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        assert codes(subacks.get(timeout=WAIT)) == [1]
        result = subprocess.run(
            [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(tls_port), "--cafile", ca, "-u", "x", "-P", token,
             "-t", topic, "-q", "1", "-m", '{"sealed":true}'],
            capture_output=True, text=True, timeout=WAIT,
        )
        assert result.returncode == 0, result.stderr
        got = messages.get(timeout=WAIT)
        assert json.loads(got.payload) == {"sealed": True}
        # A client that does not trust the certificate cannot connect.
        refused = subprocess.run(
            [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(tls_port), "--capath", "/nonexistent", "-u", "x",
             "-P", token, "-t", topic, "-m", "x"],
            capture_output=True, text=True, timeout=WAIT,
        )
        assert refused.returncode != 0
    finally:
        client.disconnect()
        client.loop_stop()
        instance.stop()


@pytest.mark.parametrize("version", [4, 5])
def test_mqtt_over_websocket_with_paho(server: HeraldInstance, version: int) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    topic = unique("ws/")
    port = int(server.url.rsplit(":", 1)[1])
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=unique("ws-"), transport="websockets",
        protocol=paho.MQTTv5 if version == 5 else paho.MQTTv311,
    )
    client.ws_set_options(path="/mqtt")
    client.username_pw_set("x", token)
    messages: "queue.Queue[paho.MQTTMessage]" = queue.Queue()
    subacks: "queue.Queue[Any]" = queue.Queue()
    client.on_message = lambda c, u, msg: messages.put(msg)
    client.on_subscribe = lambda c, u, mid, rcs, props: subacks.put(rcs)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    tcp = Mqtt(server, 4, token).connected()
    try:
        client.subscribe(topic, qos=1)
        assert codes(subacks.get(timeout=WAIT)) == [1]
        # A payload bigger than one read, both ways: packets are framed from the bytes.
        big = json.dumps({"blob": "x" * 3000}).encode()
        tcp.publish(topic, big, 1)
        got = messages.get(timeout=WAIT)
        assert got.payload == big and got.qos == 1
        assert codes(tcp.subscribe((topic + "/back", 1))) == [1]
        info = client.publish(topic + "/back", b'{"from":"ws"}', qos=1)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published()
        got = tcp.take("the WebSocket client's publication")
        assert json.loads(got.payload) == {"from": "ws"}
    finally:
        client.disconnect()
        client.loop_stop()
        tcp.close()


# ---------------------------------------------------------------------------------------------
# Raw bytes: keep-alive, bad packets, limits


def raw_connect_v5(keep_alive: int, token: Optional[str] = None, properties: bytes = b"") -> bytes:
    flags = 0x02
    payload = struct.pack("!H", 6) + b"raw-v5"
    if token is not None:
        flags |= 0x80 | 0x40
        payload += struct.pack("!H", 1) + b"x" + struct.pack("!H", len(token)) + token.encode()
    variable = struct.pack("!H", 4) + b"MQTT" + bytes([5, flags]) + struct.pack("!H", keep_alive)
    variable += varint(len(properties)) + properties
    body = variable + payload
    return bytes([0x10]) + varint(len(body)) + body


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_packet(sock: socket.socket) -> Tuple[int, bytes]:
    first = sock.recv(1)
    if not first:
        return 0, b""
    length, shift = 0, 0
    while True:
        byte = sock.recv(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "closed mid-packet"
        body += chunk
    return first[0], body


def raw_session(server: HeraldInstance, keep_alive: int = 30, properties: bytes = b"") -> socket.socket:
    sock = socket.create_connection(server.mqtt, timeout=WAIT)  # type: ignore[attr-defined]
    sock.sendall(raw_connect_v5(keep_alive, mint_token(server.hmac_secret, unique("u")), properties))
    kind, body = read_packet(sock)
    assert kind == 0x20 and body[1] == 0, f"CONNACK {kind:#x} {body!r}"
    return sock


def test_keep_alive_is_enforced_with_reason_0x8d(server: HeraldInstance) -> None:
    sock = raw_session(server, keep_alive=1)
    started = time.monotonic()
    kind, body = read_packet(sock)
    elapsed = time.monotonic() - started
    assert kind == 0xE0 and body[0] == 0x8D, f"{kind:#x} {body!r}"
    assert 1.2 < elapsed < 4, elapsed
    assert sock.recv(1) == b"", "closed after the DISCONNECT"


@pytest.mark.parametrize(
    "garbage,reason",
    [
        (b"\x30\x04\x00\x09ab", 0x81),  # a topic length beyond the packet
        (b"\xf0\x00", 0x81),  # packet type 15 (AUTH) has no place here: malformed for rumqttc
        (bytes([0x30]) + varint(5000) + b"x" * 10, 0x95),  # larger than max_packet_size 4096
        (raw_connect_v5(30), 0x82),  # a second CONNECT
    ],
)
def test_bad_packets_close_with_the_right_reason(server: HeraldInstance, garbage: bytes, reason: int) -> None:
    sock = raw_session(server)
    sock.sendall(garbage)
    kind, body = read_packet(sock)
    assert kind == 0xE0, f"{kind:#x} {body!r}"
    assert body[0] == reason, f"reason {body[0]:#x}, expected {reason:#x}: {body!r}"
    assert sock.recv(1) == b""
    # The server is fine: a new client works.
    Mqtt(server, 4, mint_token(server.hmac_secret, "after")).connected().close()


def test_the_inflight_window_holds_deliveries_and_a_stalled_client_is_closed_as_slow(server: HeraldInstance) -> None:
    # Receive Maximum 2 (MQTT 5 CONNECT property 0x21).
    sock = raw_session(server, properties=b"\x21\x00\x02")
    topic = unique("window/")
    subscribe = struct.pack("!H", 1) + b"\x00" + struct.pack("!H", len(topic)) + topic.encode() + b"\x01"
    sock.sendall(bytes([0x82]) + varint(len(subscribe)) + subscribe)
    assert read_packet(sock)[0] == 0x90
    for n in range(3):
        api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"n": n}})
    first = [read_packet(sock) for _ in range(2)]
    assert [kind for kind, _ in first] == [0x32, 0x32]
    sock.settimeout(1.0)
    with pytest.raises(socket.timeout):
        sock.recv(1)  # the third waits for an acknowledgement
    sock.settimeout(WAIT)
    pkid = first[0][1][2 + len(topic): 4 + len(topic)]
    sock.sendall(b"\x40\x02" + pkid)
    kind, body = read_packet(sock)
    assert kind == 0x32 and json.loads(body[5 + len(topic):]) == {"n": 2}, body
    # Never acknowledging again: publications pile up in the connection's queue (64 KiB in
    # this config) until it is closed as slow, with reason 0x97, instead of growing.
    blob = "x" * 4000
    for n in range(40):
        response = requests.post(
            f"{server.api_url}/publish", json={"channel": f"mqtt:{topic}", "data": {"blob": blob}},
            headers={"X-API-Key": server.api_key}, timeout=10,
        )
        assert response.status_code == 200
    kind, body = read_packet(sock)
    assert kind == 0xE0 and body[0] == 0x97, f"{kind:#x} {body[:40]!r}"


def test_the_server_api_disconnects_an_mqtt_client_with_0x98(server: HeraldInstance) -> None:
    user = unique("u")
    sock = socket.create_connection(server.mqtt, timeout=WAIT)  # type: ignore[attr-defined]
    sock.sendall(raw_connect_v5(30, mint_token(server.hmac_secret, user)))
    assert read_packet(sock)[0] == 0x20
    api(server, "disconnect", {"user": user})
    kind, body = read_packet(sock)
    assert kind == 0xE0 and body[0] == 0x98, f"{kind:#x} {body!r}"
    assert sock.recv(1) == b""


def test_the_server_api_unsubscribes_an_mqtt_session(server: HeraldInstance) -> None:
    user = unique("u")
    token = mint_token(server.hmac_secret, user)
    client_id = unique("device-")
    kept, ended = unique("keep/"), unique("ended/")
    device = Device(server, 5, token, client_id)
    try:
        device.client.subscribe([(kept, 1), (ended, 1)])
        assert codes(device.subacks.get(timeout=WAIT)) == [1, 1]
        api(server, "unsubscribe", {"user": user, "channel": f"mqtt:{ended}"})
        time.sleep(0.3)
        api(server, "publish", {"channel": f"mqtt:{ended}", "data": {"n": "ended"}})
        api(server, "publish", {"channel": f"mqtt:{kept}", "data": {"n": "kept"}})
        message = device.take("the kept topic's publication")
        assert message.topic == kept, message.topic
        time.sleep(0.3)
        assert device.messages.empty(), "the ended subscription delivers nothing"
    finally:
        device.close()
    # The persistent session forgot the topic too: back, it gets only the kept topic.
    api(server, "publish", {"channel": f"mqtt:{ended}", "data": {"n": "away"}})
    api(server, "publish", {"channel": f"mqtt:{kept}", "data": {"n": "away"}})
    device = Device(server, 5, token, client_id)
    try:
        assert device.session_present
        message = device.take("the kept topic's missed publication")
        assert (message.topic, json.loads(message.payload)["n"]) == (kept, "away")
        time.sleep(0.3)
        assert device.messages.empty(), "nothing from the ended topic"
    finally:
        device.close()


def test_unsupported_protocol_level_gets_connack_0x01(server: HeraldInstance) -> None:
    sock = socket.create_connection(server.mqtt, timeout=WAIT)  # type: ignore[attr-defined]
    sock.sendall(b"\x10\x0c\x00\x06MQIsdp\x03\x02\x00\x3c")  # MQTT 3.1
    assert read_packet(sock) == (0x20, b"\x00\x01")
    assert sock.recv(1) == b""


# ---------------------------------------------------------------------------------------------
# Durability: acknowledged QoS 1 publishes survive kill -9


def test_acknowledged_qos1_publishes_survive_kill_9(herald_factory: Any) -> None:
    instance = herald_factory()
    # The factory's instance has the base config: add MQTT's.
    instance.config.write_text(instance.config.read_text() + MQTT_CONFIG)
    start(instance)
    token = mint_token(instance.hmac_secret, "device")
    topic = unique("meter/")
    client = Mqtt(instance, 4, token).connected()
    acked: List[int] = []
    stop = threading.Event()

    def publish_until_killed() -> None:
        n = 0
        while not stop.is_set():
            info = client.client.publish(topic, json.dumps({"n": n}).encode(), qos=1)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                return
            if not info.is_published():
                return
            acked.append(n)
            n += 1

    publisher = threading.Thread(target=publish_until_killed, daemon=True)
    publisher.start()
    deadline = time.monotonic() + WAIT
    while len(acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(acked) >= 200, f"only {len(acked)} acknowledged"
    instance.process.proc.kill()  # SIGKILL, mid-stream
    instance.process.proc.wait()
    stop.set()
    publisher.join(timeout=WAIT)
    client.client.loop_stop()
    confirmed = list(acked)
    start(instance)
    try:
        stored = [p["data"]["n"] for p in history(instance, f"mqtt:{topic}")]
        # Every acknowledged publish is there, once, in order; at most the one in flight
        # when the process died is there without its acknowledgement.
        assert stored[: len(confirmed)] == confirmed, (len(stored), len(confirmed))
        assert len(stored) - len(confirmed) <= 1, (len(stored), len(confirmed))
        assert stored == list(range(len(stored)))
    finally:
        instance.stop()
