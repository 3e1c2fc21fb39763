"""MQTT sessions across the nodes of a cluster (`storage.engine = "redis"`, docs/scaling.md and
docs/mqtt.md): a device's persistent session lives in Redis beside the outbound queue, so when
its node dies (SIGKILL) the device reconnects to another node and gets exactly what it missed,
in order — from history, which is the cluster's too. Checked with `paho-mqtt` on the Redis the
test machines run (127.0.0.1:6379), under a prefix of the test's own.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, List, Tuple

import conftest
import redis
from test_mqtt import MQTT_CONFIG, WAIT, Device, Mqtt, api, codes, mint_token, start, unique

REDIS_URL = "redis://127.0.0.1:6379"


def cluster_node(herald_factory: Any, name: str, prefix: str, like: Any = None, mqtt: str = "") -> Any:
    """A node on the shared Redis; `like`: a node whose API key and HMAC secret it shares;
    `mqtt`: more `[mqtt]` settings."""
    instance = herald_factory()
    if like is not None:
        instance.api_key, instance.hmac_secret = like.api_key, like.hmac_secret
    config = MQTT_CONFIG.replace("[mqtt]\n", f"[mqtt]\n{mqtt}\n", 1)
    extra = f"""{config}
[server]
name = "{name}"

[redis]
addresses = ["{REDIS_URL}"]
prefix = "{prefix}"
"""
    conftest.write_config(instance.config, instance.api_key, instance.data_dir, instance.hmac_secret, extra)
    text = instance.config.read_text().replace('engine = "sqlite"', 'engine = "redis"', 1)
    instance.config.write_text(text)
    return start(instance)


def two_nodes(herald_factory: Any, mqtt: str = "") -> Tuple[Any, Any, str]:
    """Nodes A and B on the shared Redis under a new prefix, once they see each other."""
    prefix = f"herald-mqtt-cluster-{uuid.uuid4().hex[:8]}"
    node_a = cluster_node(herald_factory, "node-a", prefix, mqtt=mqtt)
    node_b = cluster_node(herald_factory, "node-b", prefix, like=node_a, mqtt=mqtt)
    deadline = time.monotonic() + WAIT
    while sorted(n["name"] for n in api(node_b, "info", {})["nodes"]) != ["node-a", "node-b"]:
        assert time.monotonic() < deadline, "the nodes did not find each other through Redis"
        time.sleep(0.1)
    return node_a, node_b, prefix


def drop_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def test_a_wildcard_subscriber_gets_what_other_nodes_publish(herald_factory: Any) -> None:
    node_a, node_b, prefix = two_nodes(herald_factory)
    token = mint_token(node_a.hmac_secret, unique("u"))
    base = unique("plant/")
    sub = Mqtt(node_b, 5, token).connected()
    # Overlapping interests on B: `#`, an exact topic it also covers; one delivery each.
    both = Mqtt(node_b, 5, token).connected()
    pub = Mqtt(node_a, 5, token).connected()
    try:
        assert codes(sub.subscribe((f"{base}/+/c", 1))) == [1]
        assert codes(both.subscribe(("#", 1), (f"{base}/x/c", 1))) == [1, 1]
        # The SUBACK came after B receives the prefix from every node: no sleep needed.
        pub.publish(f"{base}/x/c", b'{"via":"mqtt"}', 1)
        api(node_a, "publish", {"channel": f"mqtt:{base}/y/c", "data": {"via": "http"}})
        pub.publish(f"{base}/x/d", b'{"via":"other"}', 1)
        got = sorted((m.topic, json.loads(m.payload)["via"]) for m in (sub.take("1"), sub.take("2")))
        assert got == [(f"{base}/x/c", "mqtt"), (f"{base}/y/c", "http")]
        got = sorted(json.loads(both.take(f"{n}").payload)["via"] for n in range(3))
        assert got == ["http", "mqtt", "other"]
        sub.nothing_more()
        both.nothing_more(0.1)
        # After UNSUBSCRIBE, nothing more.
        sub.client.unsubscribe(f"{base}/+/c")
        time.sleep(0.3)
        api(node_a, "publish", {"channel": f"mqtt:{base}/z/c", "data": {"via": "late"}})
        assert json.loads(both.take("late").payload)["via"] == "late"
        sub.nothing_more()
    finally:
        for client in (sub, both, pub):
            client.close()
        assert node_a.stop() == 0
        assert node_b.stop() == 0
        drop_prefix(prefix)


def test_a_device_whose_node_is_killed_resumes_on_another_node(herald_factory: Any) -> None:
    node_a, node_b, prefix = two_nodes(herald_factory)
    token = mint_token(node_a.hmac_secret, unique("u"))
    client_id = unique("device-")
    topic = unique("fleet/") + "/cmd"
    channel = f"mqtt:{topic}"
    device = Device(node_a, 5, token, client_id)
    assert not device.session_present
    device.client.subscribe(topic, qos=1)
    assert codes(device.subacks.get(timeout=WAIT)) == [1]
    # Published through node B, delivered by node A.
    for n in range(5):
        api(node_b, "publish", {"channel": channel, "data": {"n": n}})
    assert [json.loads(device.take(f"live {n}").payload)["n"] for n in range(5)] == list(range(5))
    time.sleep(1.5)  # the acknowledged positions are saved (at most once a second)
    node_a.process.proc.kill()  # SIGKILL: no goodbye, no last save
    node_a.process.proc.wait()
    device.client.loop_stop()
    # Publications go on through node B while the device is away.
    for n in range(5, 12):
        api(node_b, "publish", {"channel": channel, "data": {"n": n}})
    device = Device(node_b, 5, token, client_id)
    try:
        assert device.session_present, "node B found the session node A saved"
        resumed = [json.loads(device.take(f"missed {n}").payload)["n"] for n in range(5, 12)]
        assert resumed == list(range(5, 12)), resumed
        api(node_b, "publish", {"channel": channel, "data": {"n": 12}})
        assert json.loads(device.take("live 12").payload)["n"] == 12
        time.sleep(0.5)
        assert device.messages.empty(), "exactly what it missed: nothing twice"
    finally:
        device.close()
        assert node_b.stop() == 0
        drop_prefix(prefix)


def drain(client: Mqtt) -> List[int]:
    """Every `n` the client has received so far."""
    got = []
    while not client.messages.empty():
        got.append(json.loads(client.messages.get().payload)["n"])
    return got


def test_a_shared_group_across_nodes_gets_each_publication_once(herald_factory: Any) -> None:
    node_a, node_b, prefix = two_nodes(herald_factory)
    token = mint_token(node_a.hmac_secret, unique("u"))
    base = unique("jobs/")
    group = f"$share/workers/{base}/+"
    on_a = Mqtt(node_a, 5, token).connected()
    on_b = Mqtt(node_b, 5, token).connected()
    try:
        assert codes(on_a.subscribe((group, 1))) == [1]
        assert codes(on_b.subscribe((group, 1))) == [1]
        # Every node reads the others' groups once a second: wait until both know both.
        time.sleep(1.5)
        sent = list(range(40))
        for n in sent:
            api(node_a, "publish", {"channel": f"mqtt:{base}/{n % 4}", "data": {"n": n}})
        deadline = time.monotonic() + WAIT
        got_a: List[int] = []
        got_b: List[int] = []
        while len(got_a) + len(got_b) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.1)
            got_a += drain(on_a)
            got_b += drain(on_b)
        time.sleep(0.3)
        got_a += drain(on_a)
        got_b += drain(on_b)
        assert sorted(got_a + got_b) == sent, "each publication once, to one member of the group"
        assert got_a and got_b, f"both members get some: {len(got_a)} / {len(got_b)}"
        # Node B dies without a word: after the membership TTL (3 s) and a read (1 s), node A
        # delivers everything to its member.
        node_b.process.proc.kill()
        node_b.process.proc.wait()
        on_b.client.loop_stop()
        time.sleep(4.5)
        later = list(range(100, 120))
        for n in later:
            api(node_a, "publish", {"channel": f"mqtt:{base}/{n % 4}", "data": {"n": n}})
        got = sorted(json.loads(on_a.take(f"after the kill {i}").payload)["n"] for i in range(len(later)))
        assert got == later
        on_a.nothing_more(0.3)
    finally:
        on_a.close()
        assert node_a.stop() == 0
        drop_prefix(prefix)


def test_a_session_connected_to_another_node_is_not_purged(herald_factory: Any) -> None:
    """Node B's purge sweep runs every second; a device idle on node A, connected longer than
    its session expiry (2 s), keeps its session document: node A saves it again every half
    expiry while it is connected."""
    node_a, node_b, prefix = two_nodes(herald_factory, mqtt='session_purge_interval = "1s"')
    user = unique("u")
    token = mint_token(node_a.hmac_secret, user)
    client_id = unique("device-")
    document_key = f"{len(user)}:{user}:{client_id}"
    documents = f"{prefix}:{{push}}:wh:docs:mqtt_sessions"
    client = redis.Redis.from_url(REDIS_URL)
    device = Device(node_a, 5, token, client_id, expiry=2)
    try:
        device.client.subscribe(unique("idle/"), qos=1)
        assert codes(device.subacks.get(timeout=WAIT)) == [1]
        assert client.hexists(documents, document_key), "saved at SUBSCRIBE"
        deadline = time.monotonic() + 4.5
        while time.monotonic() < deadline:
            assert client.hexists(documents, document_key), "purged while connected to node A"
            time.sleep(0.25)
    finally:
        device.close()
        assert node_a.stop() == 0
        assert node_b.stop() == 0
        drop_prefix(prefix)
