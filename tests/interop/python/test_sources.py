"""Bridges in (`[[sources]]`): messages written into NATS JetStream, RabbitMQ, a Redis stream,
Kafka topics and a PostgreSQL outbox table by each ecosystem's own client (`nats-py`, `pika`,
`redis-py`, `kafka-python`, `psql`) become publications, checked through the history API and a
`centrifuge-python` subscriber.

For every source the same four scenarios run against the real services on this machine:
- order, mapping and rejection: messages reach history in order per channel; unmappable ones are
  counted as rejected (RabbitMQ: dead-lettered) and never block the stream;
- kill -9 of Herald mid-stream, then a restart: every message exactly once in history (and the
  lag metric shows the backlog, then 0); the same after a graceful stop (SIGTERM) mid-stream;
- the source's connection dropped mid-stream (without restarting shared services: a TCP proxy cut
  for NATS, `rabbitmqctl close_connection`, `CLIENT KILL`, `pg_terminate_backend`; for Kafka the
  test's own broker is killed with SIGKILL and restarted): the consumer reconnects and nothing
  is lost or duplicated;
- two Herald nodes (each with its own history) on the same source: every message published by
  exactly one of them.

Every test uses its own stream/queue/table/topic/channel names and removes them afterwards. Kafka
is tansu (a Kafka-protocol broker built by scripts/install-test-tools), one per test, started
and restarted the way test_sinks does.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import nats
import pika
import pytest
import redis
import requests
from centrifuge import Client, PublicationContext, SubscriptionEventHandler

from conftest import HeraldInstance, herald_bin
from cutproxy import CutProxy
from push_fixtures import wait_for
from test_centrifuge_python import api, mint_token
from test_sinks import Tansu

NAMESPACE = """
[[namespaces]]
name = "src"
history_size = 10000
history_ttl = "1h"
"""
# Enough messages that a kill or a cut lands in the middle of the stream.
STREAM_SIZE = 1200
# The kill test's stream: 2,000 per channel, within the namespace's history_size.
KILL_STREAM_SIZE = 6000
CHANNELS = ("a", "b", "c")
WAIT = 90.0


def short_id() -> str:
    return uuid.uuid4().hex[:10]


def history_numbers(instance: HeraldInstance, channel: str) -> List[int]:
    pubs = api(instance, "history", {"channel": channel, "limit": -1})["publications"]
    return [pub["data"]["n"] for pub in pubs]


def metric_value(instance: HeraldInstance, name: str, source: str, result: Optional[str] = None) -> Optional[float]:
    """The sample of `name` for `source` (and `result`), or None when it is not exported."""
    text = requests.get(f"{instance.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if not line.startswith(name + "{") or f'source="{source}"' not in line:
            continue
        if result is None or f'result="{result}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def metric(instance: HeraldInstance, name: str, source: str, result: Optional[str] = None) -> float:
    value = metric_value(instance, name, source, result)
    return 0.0 if value is None else value


class ThreadedProxy:
    """The interop suite's CutProxy (TCP level) on its own event loop thread, for sync tests."""

    def __init__(self, host: str, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.proxy: CutProxy = self._call(CutProxy(f"tcp://{host}:{port}").start())
        self.port = int(self.proxy.ws_url.split(":")[2].split("/")[0])

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def cut(self, hold: bool) -> None:
        self.loop.call_soon_threadsafe(self.proxy.cut, hold)

    def resume(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.resume)

    def close(self) -> None:
        self._call(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


# ---------------------------------------------------------------------------------------------
# One class per broker: create/remove its resources, write messages with its own client, drop
# Herald's connection to it, and the `[[sources]]` table that reads it.


class Broker:
    kind = ""

    def __init__(self) -> None:
        self.id = short_id()
        self.name = f"{self.kind}-{self.id}"
        self.connection_name = f"herald-source-{self.name}"

    def channel(self, key: str) -> str:
        return f"src:{self.kind}-{self.id}-{key}"

    def setup(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def source_toml(self, **extra: Any) -> str:
        raise NotImplementedError

    def write(self, messages: List[Tuple[str, int]]) -> None:
        """Writes {"n": n} for channel key `key`, in this order."""
        raise NotImplementedError

    def write_bad(self) -> int:
        """Writes messages that cannot be mapped; returns how many."""
        raise NotImplementedError

    def drop_connections(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        """Undoes `drop_connections` where it holds the broker away."""

    def wait_shared(self, instances: List[HeraldInstance]) -> None:
        """Waits until every node takes part, where the broker hands out work in a rebalance."""


def toml_table(fields: Dict[str, Any]) -> str:
    lines = ["[[sources]]"]
    mapping = fields.pop("mapping", None)
    for key, value in fields.items():
        lines.append(f"{key} = {json.dumps(value)}")
    if mapping:
        lines.append("[sources.mapping]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in mapping.items())
    return "\n".join(lines) + "\n"


class NatsBroker(Broker):
    """JetStream stream `S<id>` on subjects `n<id>.>`; Herald connects through a TCP proxy that
    the test cuts (nats-server has no command to close one client's connection)."""

    kind = "nats"

    def setup(self) -> None:
        self.stream = f"S{self.id}"
        self.proxy = ThreadedProxy("127.0.0.1", 4222)

        async def create() -> None:
            nc = await nats.connect("nats://127.0.0.1:4222")
            await nc.jetstream().add_stream(name=self.stream, subjects=[f"n{self.id}.>"])
            await nc.close()

        asyncio.run(create())

    def cleanup(self) -> None:
        async def delete() -> None:
            nc = await nats.connect("nats://127.0.0.1:4222")
            try:
                await nc.jetstream().delete_stream(self.stream)
            finally:
                await nc.close()

        asyncio.run(delete())
        self.proxy.close()

    def source_toml(self, **extra: Any) -> str:
        return toml_table(
            {
                "name": self.name,
                "kind": "nats",
                "url": f"nats://127.0.0.1:{self.proxy.port}",
                "stream": self.stream,
                "consumer": "herald",
                "ack_wait": "3s",
                "mapping": {"channel": f"src:nats-{self.id}-{{subject.2}}"},
                **extra,
            }
        )

    def write(self, messages: List[Tuple[str, int]]) -> None:
        async def publish() -> None:
            nc = await nats.connect("nats://127.0.0.1:4222")
            js = nc.jetstream()
            for key, n in messages:
                await js.publish(f"n{self.id}.dev.{key}", json.dumps({"n": n}).encode())
            await nc.close()

        asyncio.run(publish())

    def write_bad(self) -> int:
        async def publish() -> None:
            nc = await nats.connect("nats://127.0.0.1:4222")
            js = nc.jetstream()
            # Too few subject tokens for `{subject.2}`, and a channel name with a bad character.
            await js.publish(f"n{self.id}.short", b'{"n": -1}')
            await js.publish(f"n{self.id}.dev.bad%name", b'{"n": -2}')
            await nc.close()

        asyncio.run(publish())
        return 2

    def drop_connections(self) -> None:
        self.proxy.cut(hold=True)

    def restore(self) -> None:
        self.proxy.resume()


class RabbitBroker(Broker):
    """A durable queue with a dead-letter queue; JSON envelopes with a `message_id`."""

    kind = "rabbitmq"

    def setup(self) -> None:
        self.queue = f"q-{self.id}"
        self.dead = f"q-{self.id}-dead"
        with self._channel() as channel:
            channel.exchange_declare(exchange=self.dead, exchange_type="fanout")
            channel.queue_declare(queue=self.dead, durable=True)
            channel.queue_bind(queue=self.dead, exchange=self.dead)
            channel.queue_declare(
                queue=self.queue, durable=True, arguments={"x-dead-letter-exchange": self.dead}
            )

    class _Open:
        def __enter__(self) -> Any:
            self.connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
            return self.connection.channel()

        def __exit__(self, *exc: Any) -> None:
            self.connection.close()

    def _channel(self) -> "RabbitBroker._Open":
        return RabbitBroker._Open()

    def cleanup(self) -> None:
        with self._channel() as channel:
            channel.queue_delete(queue=self.queue)
            channel.queue_delete(queue=self.dead)
            channel.exchange_delete(exchange=self.dead)

    def source_toml(self, **extra: Any) -> str:
        return toml_table(
            {
                "name": self.name,
                "kind": "rabbitmq",
                "url": "amqp://guest:guest@127.0.0.1:5672/%2f",
                "queue": self.queue,
                **extra,
            }
        )

    def write(self, messages: List[Tuple[str, int]]) -> None:
        with self._channel() as channel:
            channel.confirm_delivery()
            for key, n in messages:
                body = json.dumps({"channel": self.channel(key), "data": {"n": n}})
                channel.basic_publish(
                    exchange="",
                    routing_key=self.queue,
                    body=body.encode(),
                    properties=pika.BasicProperties(message_id=f"m{key}{n}", delivery_mode=2),
                )

    def write_bad(self) -> int:
        with self._channel() as channel:
            channel.confirm_delivery()
            for body in (b"not json", json.dumps({"channel": "nope:x", "data": 1}).encode()):
                channel.basic_publish(exchange="", routing_key=self.queue, body=body)
        return 2

    def dead_lettered(self) -> int:
        with self._channel() as channel:
            return channel.queue_declare(queue=self.dead, durable=True, passive=True).method.message_count

    def drop_connections(self) -> None:
        listed = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "client_properties"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout
        pids = [line.split("\t")[0] for line in listed.splitlines() if self.connection_name in line]
        assert pids, f"no RabbitMQ connection named {self.connection_name}:\n{listed}"
        for pid in pids:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", pid, "test closes the source"],
                check=True, capture_output=True, timeout=60,
            )


class RedisBroker(Broker):
    """A stream with `channel` and `data` fields; the consumer group is created by Herald."""

    kind = "redis"

    def setup(self) -> None:
        self.stream = f"herald-test-src-{self.id}"
        self.client = redis.Redis(host="127.0.0.1", port=6379)

    def cleanup(self) -> None:
        self.client.delete(self.stream)
        self.client.close()

    def source_toml(self, **extra: Any) -> str:
        return toml_table(
            {
                "name": self.name,
                "kind": "redis",
                "url": "redis://127.0.0.1:6379",
                "stream": self.stream,
                "start": "0",
                "claim_idle": "3s",
                "mapping": {"channel": "{field.channel}"},
                **extra,
            }
        )

    def write(self, messages: List[Tuple[str, int]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, n in messages:
            pipe.xadd(self.stream, {"channel": self.channel(key), "data": json.dumps({"n": n})})
        pipe.execute()

    def write_bad(self) -> int:
        self.client.xadd(self.stream, {"data": '{"n": -1}'})  # no channel field
        self.client.xadd(self.stream, {"channel": "unknown:x", "data": "{}"})  # unknown namespace
        return 2

    def drop_connections(self) -> None:
        clients = [c for c in self.client.client_list() if c.get("name") == self.connection_name]
        assert clients, f"no Redis client named {self.connection_name}"
        for c in clients:
            self.client.client_kill_filter(_id=c["id"])


def psql(sql: str) -> str:
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout


class OutboxBroker(Broker):
    """An outbox table created with `herald outbox-sql`; rows inserted with psql in one
    transaction, as an application would."""

    kind = "postgres"

    def setup(self) -> None:
        self.table = f"outbox_{self.id}"
        ddl = subprocess.run(
            [str(herald_bin()), "outbox-sql", "--table", self.table],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout
        psql(ddl)

    def cleanup(self) -> None:
        psql(f"DROP TABLE IF EXISTS {self.table}; DROP FUNCTION IF EXISTS {self.table}_notify();")

    def source_toml(self, **extra: Any) -> str:
        return toml_table(
            {
                "name": self.name,
                "kind": "postgres",
                "url": "postgres://postgres@127.0.0.1:5432/test",
                "table": self.table,
                "poll_interval": "500ms",
                **extra,
            }
        )

    def write(self, messages: List[Tuple[str, int]]) -> None:
        # One transaction per 400 rows, as an application's transactions would insert them.
        for start in range(0, len(messages), 400):
            values = ",".join(
                f"('{self.channel(key)}', '{json.dumps({'n': n})}')" for key, n in messages[start:start + 400]
            )
            psql(f"BEGIN; INSERT INTO {self.table} (channel, data) VALUES {values}; COMMIT;")

    def write_bad(self) -> int:
        psql(f"INSERT INTO {self.table} (channel, data) VALUES ('bad channel', '1'), ('nope:x', '2')")
        return 2

    def drop_connections(self) -> None:
        killed = psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE application_name = '{self.connection_name}'"
        )
        assert int(killed.strip()) >= 1, f"no PostgreSQL backend named {self.connection_name}"


class KafkaBroker(Broker):
    """A 3-partition topic on a tansu broker of the test's own; JSON envelopes keyed by channel
    (so a channel lives in one partition and keeps its order), written with kafka-python."""

    kind = "kafka"

    def setup(self) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic

        self.root = Path(tempfile.mkdtemp(prefix="herald-src-tansu-"))
        self.tansu = Tansu(self.root)
        self.tansu.start()
        self.topic = f"t-{self.id}"
        admin = KafkaAdminClient(bootstrap_servers=self.tansu.bootstrap, request_timeout_ms=10000)
        try:
            admin.create_topics([NewTopic(self.topic, num_partitions=3, replication_factor=1)])
        finally:
            admin.close()

    def cleanup(self) -> None:
        self.tansu.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def source_toml(self, **extra: Any) -> str:
        return toml_table(
            {
                "name": self.name,
                "kind": "kafka",
                "url": f"kafka://{self.tansu.bootstrap}",
                "topics": [self.topic],
                "consumer": "herald",
                "start": "0",
                **extra,
            }
        )

    def _produce(self, records: List[Tuple[bytes, bytes]]) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.tansu.bootstrap, acks="all", linger_ms=5,
                                 request_timeout_ms=30000)
        try:
            sent = [producer.send(self.topic, key=key, value=value) for key, value in records]
            producer.flush(timeout=60)
            for future in sent:
                future.get(timeout=60)  # raises when the broker did not take the record
        finally:
            producer.close(timeout=10)

    def write(self, messages: List[Tuple[str, int]]) -> None:
        self._produce([
            (key.encode(), json.dumps({"channel": self.channel(key), "data": {"n": n}}).encode())
            for key, n in messages
        ])

    def write_bad(self) -> int:
        # Malformed JSON, and an envelope naming a namespace Herald does not have; keyed like
        # channel "a", so they sit in the same partition between its good messages.
        self._produce([(b"a", b"{not json"), (b"a", json.dumps({"channel": "nope:x", "data": 1}).encode())])
        return 2

    def wait_shared(self, instances: List[HeraldInstance]) -> None:
        # The group forms in a rebalance after the second node joins: until then the first
        # holds every partition (and would take the whole stream).
        def shared() -> bool:
            held = [metric_value(i, "herald_source_assigned_partitions", self.name) for i in instances]
            return all(h is not None and h > 0 for h in held) and sum(held) == 3

        wait_for("the group to share the partitions", timeout=WAIT, predicate=shared)

    def drop_connections(self) -> None:
        # The broker itself goes: SIGKILL, down a moment, back on the same port and data.
        self.tansu.kill()
        time.sleep(2.0)
        self.tansu.start()


BROKERS = [NatsBroker, RabbitBroker, RedisBroker, KafkaBroker, OutboxBroker]


@pytest.fixture(params=BROKERS, ids=lambda b: b.kind)
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    made = request.param()
    made.setup()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], HeraldInstance]]:
    made: List[HeraldInstance] = []

    def make(sources: str) -> HeraldInstance:
        instance = HeraldInstance(tmp_path_factory.mktemp("herald-src"), extra_config=NAMESPACE + sources)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.kill()


def stream(count: int) -> List[Tuple[str, int]]:
    """`count` messages numbered from 1, round-robin over the channels."""
    return [(CHANNELS[n % len(CHANNELS)], n) for n in range(1, count + 1)]


def expected(messages: List[Tuple[str, int]], key: str) -> List[int]:
    return [n for k, n in messages if k == key]


def published(broker: Broker, instances: List[HeraldInstance]) -> Dict[str, List[int]]:
    """Each channel's numbers, over every node's history (one list per channel)."""
    return {key: sum((history_numbers(i, broker.channel(key)) for i in instances), []) for key in CHANNELS}


def total(broker: Broker, instances: List[HeraldInstance]) -> int:
    return sum(len(v) for v in published(broker, instances).values())


def assert_each_once(broker: Broker, instances: List[HeraldInstance], messages: List[Tuple[str, int]]) -> None:
    got = published(broker, instances)
    for key in CHANNELS:
        want = expected(messages, key)
        assert sorted(got[key]) == want, (
            f"channel {key}: {len(got[key])} publications for {len(want)} messages; "
            f"duplicates {sorted({n for n in got[key] if got[key].count(n) > 1})[:10]}, "
            f"missing {sorted(set(want) - set(got[key]))[:10]}"
        )


# ---------------------------------------------------------------------------------------------


def test_messages_reach_history_and_a_subscriber_in_order_and_bad_ones_are_rejected(broker: Broker, nodes) -> None:
    herald = nodes(broker.source_toml())
    herald.start()
    wait_for("the source to connect", timeout=WAIT, predicate=lambda: metric(herald, "herald_source_connected", broker.name) == 1.0,
               details=herald.process.diagnostics)
    live: List[int] = []

    class Events(SubscriptionEventHandler):
        async def on_publication(self, ctx: PublicationContext) -> None:
            live.append(ctx.pub.data["n"])

    messages = stream(300)
    bad = 0

    async def scenario() -> None:
        nonlocal bad
        client = Client(f"{herald.url.replace('http', 'ws')}/connection/websocket",
                        token=mint_token(herald.hmac_secret, "reader"), proxy=None)
        sub = client.new_subscription(broker.channel("a"), events=Events())
        await client.connect()
        await sub.subscribe()
        await sub.ready(10)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, broker.write, messages[:150])
        bad = await loop.run_in_executor(None, broker.write_bad)
        await loop.run_in_executor(None, broker.write, messages[150:])
        deadline = time.monotonic() + WAIT
        while len(live) < len(expected(messages, "a")) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await client.disconnect()

    asyncio.run(scenario())
    assert live == expected(messages, "a"), "the subscriber got the channel's messages in order, once"
    wait_for("every message in history", timeout=WAIT, predicate=lambda: total(broker, [herald]) >= len(messages))
    for key in CHANNELS:
        assert history_numbers(herald, broker.channel(key)) == expected(messages, key)
    wait_for("the rejections counted", timeout=WAIT, predicate=lambda: metric(herald, "herald_source_messages_total", broker.name, "rejected") == bad,
               details=herald.process.diagnostics)
    assert metric(herald, "herald_source_messages_total", broker.name, "published") == len(messages)
    if isinstance(broker, RabbitBroker):
        wait_for("both bad messages dead-lettered", timeout=WAIT, predicate=lambda: broker.dead_lettered() == bad)
    # Written again with the same ids (a redelivery, as after a lost acknowledgement): nothing new.
    if isinstance(broker, RabbitBroker):
        broker.write(messages[:30])
        wait_for("the redelivered copies seen as duplicates", timeout=WAIT,
                 predicate=lambda: metric(herald, "herald_source_messages_total", broker.name, "duplicate") == 30)
        assert_each_once(broker, [herald], messages)
    herald.stop()


def test_kill9_mid_stream_then_restart_publishes_every_message_once(broker: Broker, nodes) -> None:
    # Long enough, in small batches, that the kill lands mid-stream: a channel's batch is one
    # group commit, so 1,200 messages in batches of 50 were all through before the first look.
    # Progress is read from the metric (one request), not from history.
    messages = stream(KILL_STREAM_SIZE)
    broker.write(messages)
    herald = nodes(broker.source_toml(batch=10))
    herald.start()
    at_kill = wait_for("part of the stream published", timeout=WAIT,
                       predicate=lambda: metric(herald, "herald_source_messages_total", broker.name, "published"),
                       interval=0.01, details=herald.process.diagnostics)
    herald.kill()  # SIGKILL: batches in flight are neither finished nor acknowledged
    assert at_kill < len(messages), "the kill must land mid-stream"
    herald.start()
    # The first lag is read right after connecting, before anything is received: the backlog.
    backlog = wait_for("the lag reported", timeout=WAIT, predicate=lambda: metric_value(herald, "herald_source_lag", broker.name) is not None
                         and [metric_value(herald, "herald_source_lag", broker.name)], details=herald.process.diagnostics)[0]
    assert backlog > 0, "the broker still held part of the stream after the kill"
    wait_for("every message after the restart", timeout=WAIT, predicate=lambda: total(broker, [herald]) >= len(messages),
               details=herald.process.diagnostics)
    wait_for("the lag back to 0", timeout=WAIT, predicate=lambda: metric_value(herald, "herald_source_lag", broker.name) == 0.0,
               details=herald.process.diagnostics)
    time.sleep(5)  # past ack_wait / claim_idle: a late redelivery would show up as a duplicate
    assert_each_once(broker, [herald], messages)
    if isinstance(broker, RedisBroker):
        # The killed node's consumer name is claimed from, then removed from the group.
        wait_for("one consumer left in the group", timeout=WAIT,
                 predicate=lambda: len(broker.client.xinfo_consumers(broker.stream, "herald")) == 1)
    herald.stop()


def test_graceful_stop_mid_stream_then_restart_publishes_every_message_once(broker: Broker, nodes) -> None:
    messages = stream(STREAM_SIZE)
    broker.write(messages)
    herald = nodes(broker.source_toml(batch=50))
    herald.start()
    wait_for("part of the stream published", timeout=WAIT, predicate=lambda: total(broker, [herald]) > 0,
             details=herald.process.diagnostics)
    herald.stop()  # SIGTERM: exit 0 within 10 s, the batch in flight published and acknowledged
    herald.start()
    wait_for("every message after the restart", timeout=WAIT, predicate=lambda: total(broker, [herald]) >= len(messages),
             details=herald.process.diagnostics)
    time.sleep(4)
    assert_each_once(broker, [herald], messages)
    herald.stop()


def test_connection_dropped_mid_stream_reconnects_and_loses_nothing(broker: Broker, nodes) -> None:
    messages = stream(STREAM_SIZE)
    herald = nodes(broker.source_toml(batch=20, reconnect_base="100ms", reconnect_max="1s"))
    herald.start()
    wait_for("the source to connect", timeout=WAIT, predicate=lambda: metric(herald, "herald_source_connected", broker.name) == 1.0,
               details=herald.process.diagnostics)
    broker.write(messages[: len(messages) // 2])
    wait_for("part of the stream published", timeout=WAIT, predicate=lambda: total(broker, [herald]) > 0)
    broker.drop_connections()
    broker.write(messages[len(messages) // 2:])
    time.sleep(1.0)
    broker.restore()
    wait_for("every message after the reconnect", timeout=WAIT, predicate=lambda: total(broker, [herald]) >= len(messages),
               details=herald.process.diagnostics)
    time.sleep(4)
    assert_each_once(broker, [herald], messages)
    for key in CHANNELS:
        assert len(history_numbers(herald, broker.channel(key))) == len(expected(messages, key))
    assert metric(herald, "herald_source_reconnects_total", broker.name) >= 1, "the drop was noticed"
    assert metric(herald, "herald_source_connected", broker.name) == 1.0
    herald.stop()


def test_two_nodes_on_one_source_publish_each_message_once(broker: Broker, nodes) -> None:
    first = nodes(broker.source_toml(batch=20))
    second = nodes(broker.source_toml(batch=20))
    first.start()
    second.start()
    for node in (first, second):
        wait_for("both nodes connected", timeout=WAIT, predicate=lambda: metric(node, "herald_source_connected", broker.name) == 1.0,
                   details=node.process.diagnostics)
    broker.wait_shared([first, second])
    messages = stream(STREAM_SIZE)
    broker.write(messages)
    wait_for("every message on one node or the other", timeout=WAIT, predicate=lambda: total(broker, [first, second]) >= len(messages))
    time.sleep(2)
    assert_each_once(broker, [first, second], messages)
    shares = [total(broker, [node]) for node in (first, second)]
    assert all(share > 0 for share in shares), f"both nodes took part: {shares}"
    first.stop()
    second.stop()
