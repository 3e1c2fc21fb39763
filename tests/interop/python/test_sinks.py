"""Sinks: publications made over Herald's HTTP API reach Kafka, RabbitMQ and NATS, read back
with each ecosystem's own client (kafka-python, pika, nats-py) as the judge.

For every sink: a channel's publications arrive in offset order; after a kill -9 of Herald in
the middle of a stream every acknowledged publication arrives, in order, with at most one
duplicate per channel (the delivery in flight at the kill, sent again once its lease ran
out); a broker outage in the middle of a stream loses nothing.

Kafka is a real Kafka-protocol broker (tansu, built by scripts/install-test-tools) that each
test starts on its own port and may kill and restart. RabbitMQ and NATS are the machine's
shared services; each test uses its own exchange/queue or stream/subjects, and plays an outage
with a TCP proxy between Herald and the broker (OutageProxy), so other tests never notice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import requests

from conftest import REPO, HeraldInstance, random_token
from outage_proxy import OutageProxy

RABBITMQ = ("127.0.0.1", 5672)
NATS = ("127.0.0.1", 4222)
DEADLINE = 60.0
# Short enough that a test waits little for the delivery a kill left leased; the sink's
# timeout must stay below it.
SINK_TIMINGS = 'timeout = "2s"\nlease = "3s"\nretry_base = "100ms"\nretry_max = "1s"\npoll_interval = "100ms"\n'


# --- helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def publish(herald: HeraldInstance, channel: str, data: dict) -> dict:
    reply = requests.post(
        f"{herald.api_url}/publish",
        json={"channel": channel, "data": data},
        headers={"X-API-Key": herald.api_key},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["result"]


class Publisher:
    """Publishes round-robin over `channels` from a thread and records what Herald
    acknowledged: (channel, offset, epoch, data). Stops at `stop()` or at the first failed
    request (Herald killed)."""

    def __init__(self, herald: HeraldInstance, channels: List[str], tag: str, pause: float = 0.002) -> None:
        self.herald, self.channels, self.tag, self.pause = herald, channels, tag, pause
        self.acked: List[Tuple[str, int, str, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            channel = self.channels[i % len(self.channels)]
            data = {"tag": self.tag, "i": i}
            try:
                result = publish(self.herald, channel, data)
            except (requests.RequestException, AssertionError):
                return
            self.acked.append((channel, result["offset"], result["epoch"], data))
            i += 1
            time.sleep(self.pause)

    def stop(self) -> List[Tuple[str, int, str, dict]]:
        self._stop.set()
        self._thread.join(timeout=20)
        return self.acked


def publish_all(herald: HeraldInstance, channels: List[str], per_channel: int) -> List[Tuple[str, int, str, dict]]:
    acked = []
    for i in range(per_channel):
        for channel in channels:
            data = {"i": i, "channel": channel}
            result = publish(herald, channel, data)
            acked.append((channel, result["offset"], result["epoch"], data))
    return acked


Received = Tuple[str, int, str, dict]  # channel, offset, epoch, data


def check_delivery(received: List[Received], acked: List[Tuple[str, int, str, dict]], max_duplicates: int) -> int:
    """Every acknowledged publication arrived with its data; per channel the offsets arrive
    in order from 1 with no gap, a duplicate only right after itself; returns how many
    duplicates there were (at most `max_duplicates`)."""
    per_channel: Dict[str, List[int]] = defaultdict(list)
    data_at: Dict[Tuple[str, int], dict] = {}
    epochs: Dict[str, set] = defaultdict(set)
    for channel, offset, epoch, data in received:
        per_channel[channel].append(offset)
        epochs[channel].add(epoch)
        if (channel, offset) in data_at:
            assert data_at[(channel, offset)] == data, f"{channel}@{offset} arrived twice with different data"
        data_at[(channel, offset)] = data
    duplicates = 0
    for channel, offsets in per_channel.items():
        assert len(epochs[channel]) == 1, f"{channel}: several epochs {epochs[channel]}"
        assert offsets[0] == 1, f"{channel}: starts at offset {offsets[0]}: {offsets[:20]}"
        for before, after in zip(offsets, offsets[1:]):
            assert after in (before, before + 1), f"{channel}: offset {after} after {before}: {offsets}"
            duplicates += after == before
    for channel, offset, epoch, data in acked:
        assert (channel, offset) in data_at, f"acknowledged {channel}@{offset} never arrived"
        assert data_at[(channel, offset)] == data, f"{channel}@{offset}: {data_at[(channel, offset)]} != {data}"
        assert epoch in epochs[channel]
    assert duplicates <= max_duplicates, f"{duplicates} duplicates, at most {max_duplicates} allowed"
    return duplicates


def kill9_mid_stream(herald: HeraldInstance, channels: List[str], read: Callable[[Callable[[List[Received]], bool]], List[Received]],
                     snapshot: Callable[[], List[Received]], max_duplicates: int,
                     broker_down: Optional[Callable[[], None]] = None,
                     broker_up: Optional[Callable[[], None]] = None) -> str:
    """Publishes a stream; once deliveries flow (and, with `broker_down`, once the broker is
    unreachable and deliveries pile up) SIGKILLs Herald; restarts it (and the broker) and
    publishes more. Every acknowledged publication must arrive, in order, with at most
    `max_duplicates` duplicates. Returns a summary line."""
    publisher = Publisher(herald, channels, "before")
    read(count_at_least(40))  # deliveries are flowing
    if broker_down is not None:
        broker_down()
        time.sleep(0.5)  # publications are still acknowledged; their deliveries wait
    herald.kill()  # SIGKILL mid-stream
    acked = publisher.stop()
    if broker_up is not None:
        broker_up()
    delivered = {(c, o) for c, o, _, _ in snapshot()}
    undelivered = len({(c, o) for c, o, _, _ in acked} - delivered)
    if broker_down is not None:
        assert undelivered > 0, "the kill came after every delivery: nothing was left to resume"
    herald.start()
    acked += publish_all(herald, channels, 5)
    received = read(covers(acked))
    duplicates = check_delivery(received, acked, max_duplicates=max_duplicates)
    return f"{len(acked)} acknowledged, {undelivered} undelivered at the kill, {duplicates} duplicates"


def outage_mid_stream(herald: HeraldInstance, sink: str, channels: List[str],
                      read: Callable[[Callable[[List[Received]], bool]], List[Received]],
                      down: Callable[[], None], up: Callable[[], None], max_duplicates: int) -> str:
    """Publishes a stream; once deliveries flow, the broker goes away for a while (Herald keeps
    acknowledging publications) and comes back. The backlog shows in /metrics and drains;
    every acknowledged publication arrives, in order. Returns a summary line."""
    publisher = Publisher(herald, channels, "outage")
    read(count_at_least(40))
    down()
    wait_until("the sink's backlog to show in /metrics",
               lambda: sink_metric(herald, "herald_sink_backlog", sink) > 0, timeout=10)
    time.sleep(3)  # longer than the sink's timeout: attempts fail and are retried
    up()
    time.sleep(1)
    acked = publisher.stop()
    received = read(covers(acked))
    wait_until("the sink's backlog to fall back to 0",
               lambda: sink_metric(herald, "herald_sink_backlog", sink) == 0, timeout=20)
    assert sink_metric(herald, "herald_outbound_jobs_due", sink) == 0
    assert sink_metric(herald, "herald_sink_delivered_total", sink) >= len(acked)
    assert sink_metric(herald, "herald_sink_retried_total", sink) > 0
    duplicates = check_delivery(received, acked, max_duplicates=max_duplicates)
    return f"{len(acked)} acknowledged, {duplicates} duplicates"


def sink_metric(herald: HeraldInstance, name: str, sink: str) -> float:
    """A sink's sample of `name` in /metrics (0 when absent)."""
    text = requests.get(f"{herald.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{") and (f'sink="{sink}"' in line or f'kind="sink.{sink}"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def sink_toml(kind: str, url: str, pattern: str, name: str = "", **fields: str) -> str:
    """A `[[sinks]]` entry with the tests' short timings (`name` random when empty)."""
    lines = [
        "[[sinks]]",
        f'name = "{name or kind + "-" + random_token(6)}"',
        f'kind = "{kind}"',
        f'url = "{url}"',
        f'channels = ["{pattern}"]',
    ] + [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n" + SINK_TIMINGS


def herald_with_sink(root: Path, toml: str) -> HeraldInstance:
    herald = HeraldInstance(root, extra_config=f"\n{toml}")
    herald.start()
    return herald


def channel_names(prefix: str, count: int) -> List[str]:
    return [f"{prefix}_{n}" for n in range(count)]


# --- Kafka (tansu) --------------------------------------------------------------------------


def tansu_bin() -> Path:
    explicit = os.environ.get("TANSU_BIN")
    path = Path(explicit) if explicit else REPO / "crates/herald-outbound/tests/tools/bin/tansu"
    if not path.exists():
        raise RuntimeError(f"tansu (the Kafka-protocol broker) not found at {path}: run scripts/install-test-tools")
    return path


class Tansu:
    """A tansu broker of this test's own, with SQLite storage in `root` (kept across
    restarts), on a fixed port."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = open(self.root / f"tansu-{self.starts}.log", "ab")
        listener = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(tansu_bin()), "broker",
                "--kafka-cluster-id", "herald-test",
                "--kafka-listener-url", listener,
                "--kafka-advertised-listener-url", listener,
                "--storage-engine", "sqlite://tansu.db",
            ],
            cwd=str(self.root), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        log.close()

        def accepting() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"tansu exited: {self.log()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_until("tansu to listen", accepting, timeout=30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.root.glob("tansu-*.log")))


@pytest.fixture
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    broker = Tansu(tmp_path_factory.mktemp("tansu"))
    broker.start()
    yield broker
    broker.kill()


def kafka_topic(broker: Tansu, partitions: int = 3) -> str:
    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"herald-{random_token(8)}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    return topic


def kafka_read(broker: Tansu, topic: str, expect: Callable[[List[Received]], bool]) -> Tuple[List[Received], Dict[str, set]]:
    """Reads the whole topic from the start (no consumer group) until `expect(received)`;
    returns the records and each channel's partitions."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", request_timeout_ms=30000)
    received: List[Received] = []
    partitions: Dict[str, set] = defaultdict(set)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        assert parts, f"topic {topic} has no partitions"
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + DEADLINE
        while not expect(received):
            assert time.monotonic() < deadline, f"timed out reading {topic}: {len(received)} records"
            for tp, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    headers = {k: v.decode() for k, v in record.headers}
                    channel = record.key.decode()
                    assert headers["herald-channel"] == channel
                    partitions[channel].add(tp.partition)
                    received.append((channel, int(headers["herald-offset"]), headers["herald-epoch"],
                                     json.loads(record.value)))
        # Records of one partition come in partition order, and a channel lives in one
        # partition (checked by the caller), so per channel this is Kafka's order.
        return received, partitions
    finally:
        consumer.close()


def kafka_snapshot(broker: Tansu, topic: str) -> List[Received]:
    """Everything in the topic now."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, enable_auto_commit=False,
                             request_timeout_ms=30000)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        total = sum(consumer.end_offsets(parts).values())
    finally:
        consumer.close()
    received, _ = kafka_read(broker, topic, count_at_least(total))
    return received


def kafka_sink(broker_address: str, topic: str, channels_pattern: str, name: str = "") -> str:
    return sink_toml("kafka", broker_address, channels_pattern, name, topic=topic)


def count_at_least(n: int) -> Callable[[List[Received]], bool]:
    return lambda received: len(received) >= n


def covers(acked: List[Tuple[str, int, str, dict]]) -> Callable[[List[Received]], bool]:
    want = {(c, o) for c, o, _, _ in acked}
    return lambda received: want <= {(c, o) for c, o, _, _ in received}


def test_kafka_sink_delivers_each_channel_in_order_keyed_by_channel(tansu: Tansu, tmp_path: Path) -> None:
    topic = kafka_topic(tansu)
    prefix = f"k{random_token(6)}"
    channels = channel_names(prefix, 4)
    herald = herald_with_sink(tmp_path / "herald", kafka_sink(tansu.bootstrap, topic, f"{prefix}_*"))
    try:
        acked = publish_all(herald, channels, 50)
        publish(herald, f"other{prefix}", {"not": "for the sink"})
        received, partitions = kafka_read(tansu, topic, count_at_least(len(acked)))
        time.sleep(1)  # anything extra (a duplicate, the other channel) would show up by now
        received, partitions = kafka_read(tansu, topic, count_at_least(len(acked)))
        assert len(received) == len(acked), f"{len(received)} records for {len(acked)} publications"
        check_delivery(received, acked, max_duplicates=0)
        for channel in channels:
            assert len(partitions[channel]) == 1, f"{channel} spread over partitions {partitions[channel]}"
        metrics = requests.get(f"{herald.url}/metrics", timeout=10).text
        assert "herald_sink_delivered_total" in metrics and 'broker="kafka"' in metrics
        herald.stop()
    finally:
        herald.kill()


@pytest.mark.parametrize("broker_down_at_kill", [False, True], ids=["broker-up", "broker-down"])
def test_kafka_sink_kill9_mid_stream_then_restart_loses_nothing(tansu: Tansu, tmp_path: Path,
                                                               broker_down_at_kill: bool) -> None:
    topic = kafka_topic(tansu)
    prefix = f"k{random_token(6)}"
    channels = channel_names(prefix, 4)
    herald = herald_with_sink(tmp_path / "herald", kafka_sink(tansu.bootstrap, topic, f"{prefix}_*"))
    try:
        summary = kill9_mid_stream(
            herald, channels,
            read=lambda expect: kafka_read(tansu, topic, expect)[0],
            snapshot=lambda: kafka_snapshot(tansu, topic),
            max_duplicates=len(channels),
            broker_down=tansu.kill if broker_down_at_kill else None,
            broker_up=tansu.start if broker_down_at_kill else None,
        )
        print(f"\nkafka kill -9 (broker down: {broker_down_at_kill}): {summary}")
        herald.stop()
    finally:
        herald.kill()


def test_kafka_broker_killed_and_restarted_mid_stream_loses_nothing(tansu: Tansu, tmp_path: Path) -> None:
    topic = kafka_topic(tansu)
    prefix = f"k{random_token(6)}"
    channels = channel_names(prefix, 4)
    name = f"kafka-{random_token(6)}"
    herald = herald_with_sink(tmp_path / "herald", kafka_sink(tansu.bootstrap, topic, f"{prefix}_*", name))
    try:
        summary = outage_mid_stream(
            herald, name, channels, read=lambda expect: kafka_read(tansu, topic, expect)[0],
            down=tansu.kill,  # SIGKILL the broker
            up=tansu.start,  # the same port and data
            max_duplicates=len(channels),
        )
        print(f"\nkafka broker restart: {summary}")
        herald.stop()
    finally:
        herald.kill()


# --- RabbitMQ -------------------------------------------------------------------------------


class RabbitQueue:
    """A topic exchange and a durable queue bound to it with `#`, this test's own."""

    def __init__(self) -> None:
        import pika

        self.exchange = f"herald-test-{random_token(8)}"
        self.queue = f"{self.exchange}-q"
        params = pika.ConnectionParameters(host=RABBITMQ[0], port=RABBITMQ[1],
                                           credentials=pika.PlainCredentials("guest", "guest"))
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        self.channel.queue_declare(self.queue, durable=True)
        self.channel.queue_bind(self.queue, self.exchange, routing_key="#")
        self.received: List[Received] = []
        self.routing_keys: List[str] = []
        self.message_ids: List[str] = []

    def read(self, expect: Callable[[List[Received]], bool]) -> List[Received]:
        deadline = time.monotonic() + DEADLINE
        while not expect(self.received):
            assert time.monotonic() < deadline, f"timed out: {len(self.received)} messages"
            before = len(self.received)
            self.snapshot()
            if len(self.received) == before:
                self.connection.sleep(0.05)
        return self.received

    def snapshot(self) -> List[Received]:
        """Everything delivered so far (drains the queue)."""
        while True:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.received
            headers = properties.headers
            assert properties.delivery_mode == 2 and properties.content_type == "application/json"
            self.routing_keys.append(method.routing_key)
            self.message_ids.append(properties.message_id)
            self.received.append((headers["herald-channel"], int(headers["herald-offset"]),
                                  headers["herald-epoch"], json.loads(body)))

    def close(self) -> None:
        try:
            self.channel.queue_delete(self.queue)
            self.channel.exchange_delete(self.exchange)
        finally:
            self.connection.close()


@pytest.fixture
def rabbit() -> Iterator[RabbitQueue]:
    queue = RabbitQueue()
    yield queue
    queue.close()


def rabbit_sink(address: str, exchange: str, pattern: str, name: str = "") -> str:
    return sink_toml("rabbitmq", f"amqp://guest:guest@{address}/%2f", pattern, name, exchange=exchange,
                     routing_key="herald.{channel}")


def test_rabbitmq_sink_delivers_each_channel_in_order_with_confirms(rabbit: RabbitQueue, tmp_path: Path) -> None:
    prefix = f"r{random_token(6)}"
    channels = channel_names(prefix, 4)
    herald = herald_with_sink(tmp_path / "herald", rabbit_sink("127.0.0.1:5672", rabbit.exchange, f"{prefix}_*"))
    try:
        acked = publish_all(herald, channels, 50)
        rabbit.read(count_at_least(len(acked)))
        time.sleep(1)  # anything extra (a duplicate, the other channel) would be queued by now
        _, _, body = rabbit.channel.basic_get(rabbit.queue, auto_ack=True)
        assert body is None, f"an extra message arrived: {body!r}"
        check_delivery(rabbit.received, acked, max_duplicates=0)
        assert set(rabbit.routing_keys) == {f"herald.{c}" for c in channels}
        assert len(set(rabbit.message_ids)) == len(acked)
        herald.stop()
    finally:
        herald.kill()


@pytest.mark.parametrize("broker_down_at_kill", [False, True], ids=["broker-up", "broker-down"])
def test_rabbitmq_sink_kill9_mid_stream_then_restart_loses_nothing(rabbit: RabbitQueue, tmp_path: Path,
                                                                  broker_down_at_kill: bool) -> None:
    proxy = OutageProxy(RABBITMQ)
    prefix = f"r{random_token(6)}"
    channels = channel_names(prefix, 4)
    herald = herald_with_sink(tmp_path / "herald", rabbit_sink(proxy.address, rabbit.exchange, f"{prefix}_*"))
    try:
        summary = kill9_mid_stream(
            herald, channels, read=rabbit.read, snapshot=rabbit.snapshot,
            max_duplicates=len(channels),
            broker_down=proxy.down if broker_down_at_kill else None,
            broker_up=proxy.up if broker_down_at_kill else None,
        )
        print(f"\nrabbitmq kill -9 (broker down: {broker_down_at_kill}): {summary}")
        herald.stop()
    finally:
        herald.kill()
        proxy.close()


def test_rabbitmq_outage_mid_stream_loses_nothing(rabbit: RabbitQueue, tmp_path: Path) -> None:
    proxy = OutageProxy(RABBITMQ)
    prefix = f"r{random_token(6)}"
    channels = channel_names(prefix, 4)
    name = f"rabbit-{random_token(6)}"
    herald = herald_with_sink(tmp_path / "herald", rabbit_sink(proxy.address, rabbit.exchange, f"{prefix}_*", name))
    try:
        summary = outage_mid_stream(herald, name, channels, read=rabbit.read, down=proxy.down, up=proxy.up,
                                    max_duplicates=len(channels))
        assert proxy.connections >= 2, "Herald never reconnected"
        print(f"\nrabbitmq outage: {summary}")
        herald.stop()
    finally:
        herald.kill()
        proxy.close()


# --- NATS -----------------------------------------------------------------------------------


class NatsStream:
    """A JetStream stream of this test's own on `<prefix>.>` (or, with `stream=False`, a core
    NATS subscription on it), read with nats-py on a background event loop."""

    def __init__(self, stream: bool = True) -> None:
        self.prefix = f"herald-test-{random_token(8)}"
        self.name = self.prefix.replace("-", "_")
        self.stream = stream
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.core: List[Received] = []
        self.core_subjects: List[str] = []
        self.run(self._open())

    def run(self, coroutine):  # noqa: ANN001, ANN201
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    async def _open(self) -> None:
        import nats

        self.nc = await nats.connect(f"nats://{NATS[0]}:{NATS[1]}")
        self.js = self.nc.jetstream()
        if self.stream:
            await self.js.add_stream(name=self.name, subjects=[f"{self.prefix}.>"])
        else:
            async def on_message(msg) -> None:  # noqa: ANN001
                self.core_subjects.append(msg.subject)
                self.core.append(_received(msg.headers, msg.data))

            await self.nc.subscribe(f"{self.prefix}.>", cb=on_message)
            await self.nc.flush()

    async def _read_stream(self) -> List[Received]:
        info = await self.js.stream_info(self.name)
        out = []
        for seq in range(1, info.state.last_seq + 1):
            msg = await self.js.get_msg(self.name, seq)
            out.append(_received(msg.headers, msg.data))
        return out

    def read(self, expect: Callable[[List[Received]], bool]) -> List[Received]:
        deadline = time.monotonic() + DEADLINE
        while True:
            received = self.run(self._read_stream()) if self.stream else list(self.core)
            if expect(received):
                return received
            assert time.monotonic() < deadline, f"timed out: {len(received)} messages"
            time.sleep(0.1)

    def close(self) -> None:
        async def close() -> None:
            if self.stream:
                await self.js.delete_stream(self.name)
            await self.nc.close()

        try:
            self.run(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


def _received(headers: Optional[dict], data: bytes) -> Received:
    assert headers is not None, "a message without headers"
    return (headers["herald-channel"], int(headers["herald-offset"]), headers["herald-epoch"], json.loads(data))


@pytest.fixture
def jetstream() -> Iterator[NatsStream]:
    stream = NatsStream(stream=True)
    yield stream
    stream.close()


def nats_sink(address: str, prefix: str, pattern: str, name: str = "") -> str:
    return sink_toml("nats", f"nats://{address}", pattern, name, subject=f"{prefix}.{{channel}}")


def test_nats_jetstream_sink_delivers_each_channel_in_order_acked_by_the_stream(jetstream: NatsStream, tmp_path: Path) -> None:
    prefix = f"n{random_token(6)}"
    channels = channel_names(prefix, 4)
    herald = herald_with_sink(tmp_path / "herald", nats_sink("127.0.0.1:4222", jetstream.prefix, f"{prefix}_*"))
    try:
        acked = publish_all(herald, channels, 50)
        jetstream.read(count_at_least(len(acked)))
        time.sleep(1)
        received = jetstream.read(count_at_least(len(acked)))
        assert len(received) == len(acked)
        check_delivery(received, acked, max_duplicates=0)
        herald.stop()
    finally:
        herald.kill()


def test_nats_core_sink_without_a_stream_reaches_a_live_subscriber_in_order(tmp_path: Path) -> None:
    core = NatsStream(stream=False)
    prefix = f"n{random_token(6)}"
    channels = channel_names(prefix, 3)
    herald = herald_with_sink(tmp_path / "herald", nats_sink("127.0.0.1:4222", core.prefix, f"{prefix}_*"))
    try:
        acked = publish_all(herald, channels, 30)
        received = core.read(count_at_least(len(acked)))
        check_delivery(received, acked, max_duplicates=0)
        assert set(core.core_subjects) == {f"{core.prefix}.{c}" for c in channels}
        herald.stop()
    finally:
        herald.kill()
        core.close()


@pytest.mark.parametrize("broker_down_at_kill", [False, True], ids=["broker-up", "broker-down"])
def test_nats_jetstream_sink_kill9_mid_stream_then_restart_loses_nothing(jetstream: NatsStream, tmp_path: Path,
                                                                        broker_down_at_kill: bool) -> None:
    proxy = OutageProxy(NATS)
    prefix = f"n{random_token(6)}"
    channels = channel_names(prefix, 4)
    herald = herald_with_sink(tmp_path / "herald", nats_sink(proxy.address, jetstream.prefix, f"{prefix}_*"))
    try:
        summary = kill9_mid_stream(
            herald, channels, read=jetstream.read, snapshot=lambda: jetstream.read(lambda _: True),
            # JetStream drops the redelivery of the job in flight at the kill (Nats-Msg-Id).
            max_duplicates=0,
            broker_down=proxy.down if broker_down_at_kill else None,
            broker_up=proxy.up if broker_down_at_kill else None,
        )
        print(f"\nnats kill -9 (broker down: {broker_down_at_kill}): {summary}")
        herald.stop()
    finally:
        herald.kill()
        proxy.close()


def test_nats_outage_mid_stream_loses_nothing(jetstream: NatsStream, tmp_path: Path) -> None:
    proxy = OutageProxy(NATS)
    prefix = f"n{random_token(6)}"
    channels = channel_names(prefix, 4)
    name = f"nats-{random_token(6)}"
    herald = herald_with_sink(tmp_path / "herald", nats_sink(proxy.address, jetstream.prefix, f"{prefix}_*", name))
    try:
        # JetStream drops a redelivery within its duplicate window (Nats-Msg-Id).
        summary = outage_mid_stream(herald, name, channels, read=jetstream.read, down=proxy.down, up=proxy.up,
                                    max_duplicates=0)
        assert proxy.connections >= 2, "Herald never reconnected"
        print(f"\nnats outage: {summary}")
        herald.stop()
    finally:
        herald.kill()
        proxy.close()


def test_concurrent_publishes_on_one_channel_arrive_in_offset_order(jetstream: NatsStream, tmp_path: Path) -> None:
    """Eight publishers on one channel at once: publishes finish in any order, yet the sink
    gets the channel's offsets in order (the observer queues them in offset order)."""
    prefix = f"n{random_token(6)}"
    channel = f"{prefix}_hot"
    herald = herald_with_sink(tmp_path / "herald", nats_sink("127.0.0.1:4222", jetstream.prefix, f"{prefix}_*"))
    try:
        acked: List[Tuple[str, int, str, dict]] = []
        lock = threading.Lock()

        def publisher(worker: int) -> None:
            session = requests.Session()
            for i in range(40):
                data = {"worker": worker, "i": i}
                reply = session.post(f"{herald.api_url}/publish", json={"channel": channel, "data": data},
                                     headers={"X-API-Key": herald.api_key}, timeout=10)
                assert reply.status_code == 200, reply.text
                result = reply.json()["result"]
                with lock:
                    acked.append((channel, result["offset"], result["epoch"], data))

        threads = [threading.Thread(target=publisher, args=(w,)) for w in range(8)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(acked) == 320
        received = jetstream.read(count_at_least(len(acked)))
        check_delivery(received, acked, max_duplicates=0)
        # One delivery at a time on a channel, each started as soon as the one before is
        # recorded (not at the next poll, which would take over 30 s here).
        took = time.monotonic() - started
        assert took < 10, f"320 publications on one channel took {took:.1f}s to reach the broker"
        herald.stop()
    finally:
        herald.kill()
