"""MQTT 5 properties of Herald's MQTT listener (docs/mqtt.md "MQTT 5"), judged by `paho-mqtt`'s
MQTT 5 client (raw bytes only where a test needs a packet paho would not send): topic aliases,
subscription identifiers and message expiry. The server and helpers are test_mqtt.py's.
"""

from __future__ import annotations

import json
import queue
import struct
import time
from typing import Any, List

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import HeraldInstance
from test_mqtt import (  # noqa: F401  (server: the module's fixture)
    WAIT, Device, Mqtt, api, codes, mint_token, raw_session, read_packet, server, unique, varint,
)


def publish_properties(**values: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def test_topic_aliases_set_and_used_and_a_bad_one_closes_with_0x94(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    topic = unique("alias/") + "/long/topic/name"
    sub = Mqtt(server, 4, token).connected()
    connacks: "queue.Queue[Any]" = queue.Queue()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=unique("alias-"), protocol=paho.MQTTv5)
    pub.username_pw_set("x", token)
    pub.on_connect = lambda c, u, flags, rc, props: connacks.put(props)
    host, port = server.mqtt  # type: ignore[attr-defined]
    pub.connect(host, port, keepalive=30)
    pub.loop_start()
    try:
        props = connacks.get(timeout=WAIT)
        assert props.TopicAliasMaximum == 16, props
        assert codes(sub.subscribe((topic, 1))) == [1]
        first = pub.publish(topic, b'{"n":1}', qos=1, properties=publish_properties(TopicAlias=3))
        first.wait_for_publish(timeout=WAIT)
        # The alias alone: an empty topic.
        second = pub.publish("", b'{"n":2}', qos=1, properties=publish_properties(TopicAlias=3))
        second.wait_for_publish(timeout=WAIT)
        got = [sub.take(f"publication {n}") for n in (1, 2)]
        assert [(m.topic, json.loads(m.payload)["n"]) for m in got] == [(topic, 1), (topic, 2)]
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.close()
    # Above the Topic Alias Maximum (16), and an alias never set: raw packets paho would refuse.
    for alias, topic_bytes, reason in ((17, b"t", 0x94), (0, b"t", 0x94), (5, b"", 0x82)):
        sock = raw_session(server)
        properties = bytes([0x23]) + struct.pack("!H", alias)
        body = struct.pack("!H", len(topic_bytes)) + topic_bytes + varint(len(properties)) + properties + b"x"
        sock.sendall(bytes([0x30]) + varint(len(body)) + body)
        kind, reply = read_packet(sock)
        assert (kind, reply[:1]) == (0xE0, bytes([reason])), f"alias {alias}: {kind:#x} {reply!r}"
        sock.close()


def test_subscription_identifiers_come_back_on_matching_publishes(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    base = unique("ids/")
    client = Mqtt(server, 5, token).connected()
    try:
        for filter_, ident in ((f"{base}/+", 5), (f"{base}/a", 9)):
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = ident
            client.client.subscribe(filter_, qos=1, properties=props)
            assert codes(client.subacks.get(timeout=WAIT)) == [1]
        client.client.subscribe(f"{base}/none/#", qos=1)  # no identifier
        assert codes(client.subacks.get(timeout=WAIT)) == [1]
        api(server, "publish", {"channel": f"mqtt:{base}/a", "data": {"n": 1}})
        message = client.take("the publication on both filters")
        assert sorted(message.properties.SubscriptionIdentifier) == [5, 9]
        api(server, "publish", {"channel": f"mqtt:{base}/b", "data": {"n": 2}})
        message = client.take("the publication on the wildcard")
        assert message.properties.SubscriptionIdentifier == [5]
        api(server, "publish", {"channel": f"mqtt:{base}/none/x", "data": {"n": 3}})
        message = client.take("the publication without an identifier")
        assert not hasattr(message.properties, "SubscriptionIdentifier"), message.properties
        client.client.unsubscribe(f"{base}/a")
        time.sleep(0.3)
        api(server, "publish", {"channel": f"mqtt:{base}/a", "data": {"n": 4}})
        message = client.take("the publication after unsubscribing the exact filter")
        assert message.properties.SubscriptionIdentifier == [5]
    finally:
        client.close()


def test_subscription_identifiers_are_kept_by_a_persistent_session(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    client_id = unique("device-")
    topic = unique("kept-ids/")
    device = Device(server, 5, token, client_id)
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 42
    device.client.subscribe(topic, qos=1, properties=props)
    assert codes(device.subacks.get(timeout=WAIT)) == [1]
    device.close()
    api(server, "publish", {"channel": f"mqtt:{topic}", "data": {"n": 1}})
    device = Device(server, 5, token, client_id)
    try:
        assert device.session_present
        message = device.take("the missed publication")
        assert message.properties.SubscriptionIdentifier == [42]
    finally:
        device.close()


def test_an_expired_message_is_not_delivered_and_the_rest_of_its_interval_is_sent(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    client_id = unique("device-")
    topic = unique("expiry/")
    device = Device(server, 5, token, client_id)
    device.client.subscribe(topic, qos=1)
    assert codes(device.subacks.get(timeout=WAIT)) == [1]
    publisher = Mqtt(server, 5, token).connected()
    try:
        info = publisher.client.publish(
            topic, b'{"n":"live"}', qos=1, properties=publish_properties(MessageExpiryInterval=60)
        )
        info.wait_for_publish(timeout=WAIT)
        live = device.take("the live publication")
        assert 58 <= live.properties.MessageExpiryInterval <= 60, live.properties
        time.sleep(0.3)
        device.close()
        # While the device is away: one message that expires before it is back, one that does not.
        for n, expiry in (("short", 1), ("long", 60)):
            info = publisher.client.publish(
                topic, json.dumps({"n": n}).encode(), qos=1,
                properties=publish_properties(MessageExpiryInterval=expiry),
            )
            info.wait_for_publish(timeout=WAIT)
        time.sleep(2.2)
        device = Device(server, 5, token, client_id)
        assert device.session_present
        message = device.take("the unexpired missed publication")
        assert json.loads(message.payload)["n"] == "long"
        assert 55 <= message.properties.MessageExpiryInterval <= 58, message.properties
        time.sleep(0.5)
        assert device.messages.empty(), "the expired one is not delivered"
        # The interval is not a user property of the publication seen by the other transports.
        stored = api(server, "history", {"channel": f"mqtt:{topic}", "limit": 10})["publications"]
        assert [p["tags"]["mqtt_expiry"] for p in stored] == ["60", "1", "60"]
    finally:
        device.close()
        publisher.close()


def test_retain_as_published_keeps_the_publishers_retain_flag_on_live_deliveries(server: HeraldInstance) -> None:
    from paho.mqtt.subscribeoptions import SubscribeOptions

    token = mint_token(server.hmac_secret, unique("u"))
    topic = unique("rap/")
    as_published = Mqtt(server, 5, token).connected()
    plain = Mqtt(server, 5, token).connected()
    old = Mqtt(server, 4, token).connected()
    publisher = Mqtt(server, 5, token).connected()
    try:
        as_published.client.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
        assert codes(as_published.subacks.get(timeout=WAIT)) == [1]
        assert codes(plain.subscribe((topic, 1))) == [1]
        assert codes(old.subscribe((topic, 1))) == [1]
        for retain in (True, False):
            info = publisher.client.publish(topic, json.dumps({"retain": retain}).encode(), qos=1, retain=retain)
            info.wait_for_publish(timeout=WAIT)
        assert [m.retain for m in (as_published.take("1"), as_published.take("2"))] == [True, False]
        assert [m.retain for m in (plain.take("1"), plain.take("2"))] == [False, False]
        assert [m.retain for m in (old.take("1"), old.take("2"))] == [False, False]
        # The retained publication sent for a SUBSCRIBE has RETAIN set, with or without it.
        late = Mqtt(server, 5, token).connected()
        try:
            assert codes(late.subscribe((topic, 1))) == [1]
            retained = late.take("the retained publication")
            assert retained.retain and json.loads(retained.payload) == {"retain": False}
        finally:
            late.close()
    finally:
        for client in (as_published, plain, old, publisher):
            client.close()


def test_a_shared_subscription_delivers_each_publication_to_one_member(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    base = unique("jobs/")
    shared = f"$share/workers/{base}/+"
    members = [Mqtt(server, 5, token).connected(), Mqtt(server, 5, token).connected(), Mqtt(server, 4, token).connected()]
    watcher = Mqtt(server, 5, token).connected()
    other_group = Mqtt(server, 5, token).connected()
    try:
        for member in members:
            assert codes(member.subscribe((shared, 1))) == [1]
        assert codes(watcher.subscribe((f"{base}/+", 1))) == [1]
        assert codes(other_group.subscribe((f"$share/auditors/{base}/+", 1))) == [1]

        def drain(client: Mqtt) -> List[int]:
            got = []
            while True:
                try:
                    got.append(json.loads(client.messages.get(timeout=1.0).payload)["n"])
                except queue.Empty:
                    return got

        for n in range(30):
            api(server, "publish", {"channel": f"mqtt:{base}/{n % 3}", "data": {"n": n}})
        got = [drain(member) for member in members]
        assert sorted(sum(got, [])) == list(range(30)), got
        assert all(len(g) == 10 for g in got), f"members take turns: {[len(g) for g in got]}"
        assert drain(watcher) == list(range(30)), "a plain subscription gets everything"
        assert sorted(drain(other_group)) == list(range(30)), "another group gets its own copy"
        # A member that unsubscribes gets no more; the others share what follows.
        members[0].client.unsubscribe(shared)
        time.sleep(0.3)
        for n in range(30, 40):
            api(server, "publish", {"channel": f"mqtt:{base}/x", "data": {"n": n}})
        got = [drain(member) for member in members]
        assert got[0] == [] and sorted(got[1] + got[2]) == list(range(30, 40)), got
        # One that disconnects too.
        members[1].close()
        time.sleep(0.3)
        for n in range(40, 45):
            api(server, "publish", {"channel": f"mqtt:{base}/x", "data": {"n": n}})
        assert drain(members[2]) == list(range(40, 45))
    finally:
        for client in members + [watcher, other_group]:
            client.close()


def test_a_malformed_share_name_is_refused(server: HeraldInstance) -> None:
    # paho checks filters itself: raw bytes.
    sock = raw_session(server)
    try:
        for filter_ in (b"$share/a+b/t", b"$share/g"):
            body = struct.pack("!H", 7) + varint(0) + struct.pack("!H", len(filter_)) + filter_ + b"\x01"
            sock.sendall(bytes([0x82]) + varint(len(body)) + body)
            kind, reply = read_packet(sock)
            assert kind == 0x90 and reply[-1] == 0x8F, f"{filter_!r}: {kind:#x} {reply!r}"
    finally:
        sock.close()


def test_the_server_gives_topic_aliases_up_to_the_clients_maximum(server: HeraldInstance) -> None:
    # paho passes aliases through (message.topic is empty when only the alias came).
    token = mint_token(server.hmac_secret, unique("u"))
    base = unique("out-alias/")
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=unique("alias-"), protocol=paho.MQTTv5)
    client.username_pw_set("x", token)
    messages: "queue.Queue[paho.MQTTMessage]" = queue.Queue()
    subacks: "queue.Queue[Any]" = queue.Queue()
    client.on_message = lambda c, u, msg: messages.put(msg)
    client.on_subscribe = lambda c, u, mid, rcs, props: subacks.put(rcs)
    props = Properties(PacketTypes.CONNECT)
    props.TopicAliasMaximum = 2
    host, port = server.mqtt  # type: ignore[attr-defined]
    client.connect(host, port, keepalive=30, properties=props)
    client.loop_start()
    try:
        client.subscribe(f"{base}/+", qos=0)
        assert codes(subacks.get(timeout=WAIT)) == [0]
        seen = []
        for name in ("a", "b", "c", "a", "b", "c"):
            api(server, "publish", {"channel": f"mqtt:{base}/{name}", "data": {"t": name}})
            message = messages.get(timeout=WAIT)
            alias = getattr(message.properties, "TopicAlias", None)
            seen.append((message.topic, alias, json.loads(message.payload)["t"]))
        assert seen == [
            (f"{base}/a", 1, "a"), (f"{base}/b", 2, "b"), (f"{base}/c", None, "c"),  # the maximum is 2
            ("", 1, "a"), ("", 2, "b"), (f"{base}/c", None, "c"),
        ], seen
    finally:
        client.disconnect()
        client.loop_stop()


def test_no_local_is_kept_by_a_persistent_session(server: HeraldInstance) -> None:
    token = mint_token(server.hmac_secret, unique("u"))
    client_id = unique("device-")
    topic = unique("kept-nolocal/")
    device = Device(server, 5, token, client_id)
    device.client.subscribe(topic, options=paho.SubscribeOptions(qos=1, noLocal=True))
    assert codes(device.subacks.get(timeout=WAIT)) == [1]
    device.close()
    device = Device(server, 5, token, client_id)
    other = Mqtt(server, 5, token).connected()
    try:
        assert device.session_present
        device.client.publish(topic, b'{"from":"me"}', qos=1).wait_for_publish(timeout=WAIT)
        other.publish(topic, b'{"from":"other"}', 1)
        got = device.take("the other client's publication")
        assert json.loads(got.payload) == {"from": "other"}
        time.sleep(0.5)
        assert device.messages.empty(), "its own publication is not delivered back after the resume"
    finally:
        device.close()
        other.close()


def test_a_message_that_expires_while_queued_is_not_written(server: HeraldInstance) -> None:
    """Receive Maximum 1 and an unacknowledged first delivery keep the next ones queued in
    Herald; one whose expiry passes meanwhile is dropped, and another gets what is left of its
    interval when it is finally written."""
    token = mint_token(server.hmac_secret, unique("u"))
    topic = unique("queued-expiry/")
    messages: "queue.Queue[paho.MQTTMessage]" = queue.Queue()
    connacks: "queue.Queue[Any]" = queue.Queue()
    sub = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=unique("slow-"), protocol=paho.MQTTv5, manual_ack=True
    )
    sub.username_pw_set("x", token)
    sub.on_connect = lambda c, u, flags, rc, props: connacks.put(rc)
    sub.on_message = lambda c, u, msg: messages.put(msg)
    connect_props = Properties(PacketTypes.CONNECT)
    connect_props.ReceiveMaximum = 1
    host, port = server.mqtt  # type: ignore[attr-defined]
    sub.connect(host, port, keepalive=30, properties=connect_props)
    sub.loop_start()
    publisher = Mqtt(server, 5, token).connected()
    try:
        assert not connacks.get(timeout=WAIT).is_failure
        sub.subscribe(topic, qos=1)
        time.sleep(0.3)
        for n, expiry in (("first", None), ("short", 1), ("long", 30)):
            props = publish_properties(MessageExpiryInterval=expiry) if expiry else None
            publisher.client.publish(
                topic, json.dumps({"n": n}).encode(), qos=1, properties=props
            ).wait_for_publish(timeout=WAIT)
        first = messages.get(timeout=WAIT)
        assert json.loads(first.payload)["n"] == "first"
        time.sleep(2.5)  # "short" expires while it waits behind the unacknowledged one
        assert messages.empty()
        sub.ack(first.mid, 1)
        late = messages.get(timeout=WAIT)
        assert json.loads(late.payload)["n"] == "long"
        assert 26 <= late.properties.MessageExpiryInterval <= 28, late.properties
        sub.ack(late.mid, 1)
        time.sleep(0.3)
        assert messages.empty(), "the expired one is not written"
    finally:
        sub.disconnect()
        sub.loop_stop()
        publisher.close()
