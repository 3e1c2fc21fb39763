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
from typing import Any

import conftest
import redis
from test_mqtt import MQTT_CONFIG, WAIT, Device, api, codes, mint_token, start, unique

REDIS_URL = "redis://127.0.0.1:6379"


def cluster_node(herald_factory: Any, name: str, prefix: str, like: Any = None) -> Any:
    """A node on the shared Redis; `like`: a node whose API key and HMAC secret it shares."""
    instance = herald_factory()
    if like is not None:
        instance.api_key, instance.hmac_secret = like.api_key, like.hmac_secret
    extra = f"""{MQTT_CONFIG}
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


def test_a_device_whose_node_is_killed_resumes_on_another_node(herald_factory: Any) -> None:
    prefix = f"herald-mqtt-cluster-{uuid.uuid4().hex[:8]}"
    node_a = cluster_node(herald_factory, "node-a", prefix)
    node_b = cluster_node(herald_factory, "node-b", prefix, like=node_a)
    deadline = time.monotonic() + WAIT
    while sorted(n["name"] for n in api(node_b, "info", {})["nodes"]) != ["node-a", "node-b"]:
        assert time.monotonic() < deadline, "the nodes did not find each other through Redis"
        time.sleep(0.1)
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
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
