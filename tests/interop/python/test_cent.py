"""Herald's server HTTP API driven by the official Centrifugo Python client `cent` (PyPI, pinned).

Only cent's public API is used: if a test here fails, a real user of `cent` would see the same
failure. The server is a real `herald serve` process with SQLite storage (see conftest.py).
"""

from __future__ import annotations

import base64
import uuid

import pytest
from cent import (
    BatchRequest,
    BroadcastRequest,
    CentApiResponseError,
    CentUnauthorizedError,
    ChannelsRequest,
    Client,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    StreamPosition,
)

UNKNOWN_CHANNEL = 102
BAD_REQUEST = 107
NOT_AVAILABLE = 108
UNRECOVERABLE_POSITION = 112


def channel(prefix: str = "") -> str:
    """A channel no other test touches (the module shares one server)."""
    return f"{prefix}it-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def client(herald) -> Client:
    return Client(herald.api_url, herald.api_key, timeout=10.0)


def offsets(result) -> list:
    return [p.offset for p in result.publications]


def publish_numbers(client: Client, ch: str, count: int) -> str:
    """Publishes {"n": 1..count} with tags {"n": "<n>"}; returns the epoch."""
    epoch = None
    for n in range(1, count + 1):
        result = client.publish(PublishRequest(channel=ch, data={"n": n}, tags={"n": str(n)}))
        assert result.offset == n
        epoch = epoch or result.epoch
        assert result.epoch == epoch
    assert epoch
    return epoch


def test_publish_returns_offset_and_epoch_growing_by_one(client: Client) -> None:
    ch = channel()
    first = client.publish(PublishRequest(channel=ch, data={"text": "hello"}))
    assert first.offset == 1
    assert isinstance(first.epoch, str) and first.epoch
    for expected in range(2, 6):
        result = client.publish(PublishRequest(channel=ch, data={"text": f"m{expected}"}))
        assert result.offset == expected
        assert result.epoch == first.epoch


def test_history_all_limit_since_and_reverse(client: Client) -> None:
    ch = channel()
    epoch = publish_numbers(client, ch, 5)

    everything = client.history(HistoryRequest(channel=ch, limit=-1))
    assert offsets(everything) == [1, 2, 3, 4, 5]
    assert [p.data for p in everything.publications] == [{"n": n} for n in range(1, 6)]
    assert [p.tags for p in everything.publications] == [{"n": str(n)} for n in range(1, 6)]
    assert all(p.info is None for p in everything.publications), "server-API publishes carry no client info"
    assert everything.offset == 5
    assert everything.epoch == epoch

    # No limit: position only (cent omits `limit`, so the server must treat it as 0).
    position = client.history(HistoryRequest(channel=ch))
    assert position.publications == []
    assert (position.offset, position.epoch) == (5, epoch)

    assert offsets(client.history(HistoryRequest(channel=ch, limit=2))) == [1, 2]
    assert offsets(client.history(HistoryRequest(channel=ch, limit=2, reverse=True))) == [5, 4]

    page = client.history(HistoryRequest(channel=ch, limit=2, since=StreamPosition(offset=2, epoch=epoch)))
    assert offsets(page) == [3, 4]
    assert [p.data["n"] for p in page.publications] == [3, 4]
    assert [p.tags for p in page.publications] == [{"n": "3"}, {"n": "4"}]
    assert (page.offset, page.epoch) == (5, epoch), "top-level position is the stream top"

    rest = client.history(HistoryRequest(channel=ch, limit=-1, since=StreamPosition(offset=2, epoch=epoch)))
    assert offsets(rest) == [3, 4, 5]

    back = client.history(
        HistoryRequest(channel=ch, limit=2, reverse=True, since=StreamPosition(offset=4, epoch=epoch))
    )
    assert offsets(back) == [3, 2]
    assert [p.data["n"] for p in back.publications] == [3, 2]

    caught_up = client.history(HistoryRequest(channel=ch, limit=-1, since=StreamPosition(offset=5, epoch=epoch)))
    assert caught_up.publications == []
    assert (caught_up.offset, caught_up.epoch) == (5, epoch)

    # An empty epoch is not checked.
    no_epoch = client.history(HistoryRequest(channel=ch, limit=-1, since=StreamPosition(offset=3, epoch="")))
    assert offsets(no_epoch) == [4, 5]


def test_history_of_untouched_channel_is_empty(client: Client) -> None:
    result = client.history(HistoryRequest(channel=channel(), limit=-1))
    assert result.publications == []
    assert result.offset == 0


def test_idempotency_key_publishes_once(client: Client) -> None:
    ch = channel()
    key = f"order-{uuid.uuid4().hex}"
    first = client.publish(PublishRequest(channel=ch, data={"order": 42}, idempotency_key=key))
    again = client.publish(PublishRequest(channel=ch, data={"order": 42}, idempotency_key=key))
    assert (again.offset, again.epoch) == (first.offset, first.epoch) == (1, first.epoch)
    history = client.history(HistoryRequest(channel=ch, limit=-1))
    assert offsets(history) == [1]
    assert history.publications[0].data == {"order": 42}

    other = client.publish(PublishRequest(channel=ch, data={"order": 43}, idempotency_key=f"{key}-2"))
    assert other.offset == 2


def test_b64data_publish(client: Client) -> None:
    ch = channel()
    payload = bytes([0, 1, 2, 255, 254, 10])
    result = client.publish(PublishRequest(channel=ch, data=None, b64data=base64.b64encode(payload).decode()))
    assert result.offset == 1
    assert result.epoch
    assert client.publish(PublishRequest(channel=ch, data={"json": True})).offset == 2
    # cent's Publication requires a `data` key: a binary publication must still parse. Herald
    # sends `"data": null` plus its own `b64data` field, which cent keeps as an extra attribute.
    history = client.history(HistoryRequest(channel=ch, limit=-1))
    assert offsets(history) == [1, 2]
    binary, json_pub = history.publications
    assert binary.data is None
    assert base64.b64decode(getattr(binary, "b64data")) == payload
    assert json_pub.data == {"json": True}
    assert (history.offset, history.epoch) == (2, result.epoch)


def test_broadcast_to_several_channels(client: Client) -> None:
    channels = [channel(), channel(), channel("room:")]
    client.publish(PublishRequest(channel=channels[1], data={"before": True}))
    result = client.broadcast(BroadcastRequest(channels=channels, data={"text": "to all"}, tags={"kind": "b"}))
    assert len(result.responses) == len(channels)
    assert all(r.error is None for r in result.responses), result.responses
    assert [r.result.offset for r in result.responses] == [1, 2, 1]
    for ch, response in zip(channels, result.responses):
        assert response.result.epoch
        history = client.history(HistoryRequest(channel=ch, limit=1, reverse=True))
        assert history.publications[0].data == {"text": "to all"}
        assert history.publications[0].tags == {"kind": "b"}
        assert (history.offset, history.epoch) == (response.result.offset, response.result.epoch)


def test_broadcast_reports_errors_per_channel(client: Client) -> None:
    good = channel()
    result = client.broadcast(BroadcastRequest(channels=[good, "nosuchns:x"], data={"x": 1}))
    assert result.responses[0].error is None
    assert result.responses[0].result.offset == 1
    assert result.responses[1].error is not None
    assert result.responses[1].error.code == UNKNOWN_CHANNEL


def test_presence_and_presence_stats_on_presence_namespace(client: Client) -> None:
    ch = channel("room:")
    presence = client.presence(PresenceRequest(channel=ch))
    assert presence.presence == {}
    stats = client.presence_stats(PresenceStatsRequest(channel=ch))
    assert (stats.num_clients, stats.num_users) == (0, 0)


def test_presence_where_disabled_is_not_available(client: Client) -> None:
    with pytest.raises(CentApiResponseError) as err:
        client.presence(PresenceRequest(channel=channel()))
    assert err.value.code == NOT_AVAILABLE


def test_channels(client: Client) -> None:
    # Channels are listed only while someone is subscribed; nobody is, over this API.
    result = client.channels(ChannelsRequest())
    assert isinstance(result.channels, dict)
    assert all(info.num_clients >= 0 for info in result.channels.values())
    filtered = client.channels(ChannelsRequest(pattern="room:*"))
    assert isinstance(filtered.channels, dict)
    assert all(name.startswith("room:") for name in filtered.channels)


def test_info(client: Client) -> None:
    result = client.info(InfoRequest())
    assert len(result.nodes) >= 1
    node = result.nodes[0]
    assert node.uid
    assert node.name
    assert node.version
    assert node.num_clients >= 0 and node.num_channels >= 0


def test_history_remove_keeps_position(client: Client) -> None:
    ch = channel()
    epoch = publish_numbers(client, ch, 3)
    client.history_remove(HistoryRemoveRequest(channel=ch))
    after = client.history(HistoryRequest(channel=ch, limit=-1))
    assert after.publications == []
    assert (after.offset, after.epoch) == (3, epoch)
    assert client.publish(PublishRequest(channel=ch, data={"n": 4})).offset == 4


def test_batch_of_publishes(client: Client) -> None:
    ch = channel()
    other = channel()
    result = client.batch(
        BatchRequest(
            requests=[
                PublishRequest(channel=ch, data={"n": 1}),
                PublishRequest(channel=ch, data={"n": 2}),
                PublishRequest(channel=other, data={"n": 1}),
                PublishRequest(channel=ch, data={"n": 3}),
                HistoryRequest(channel=ch, limit=-1),
            ]
        )
    )
    assert len(result.replies) == 5
    assert [r.offset for r in result.replies[:4]] == [1, 2, 1, 3]
    assert result.replies[0].epoch == result.replies[1].epoch == result.replies[3].epoch
    history = result.replies[4]
    assert offsets(history) == [1, 2, 3]
    assert [p.data for p in history.publications] == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_parallel_batch(client: Client) -> None:
    channels = [channel() for _ in range(4)]
    result = client.batch(
        BatchRequest(requests=[PublishRequest(channel=ch, data={"ch": ch}) for ch in channels], parallel=True)
    )
    assert [r.offset for r in result.replies] == [1, 1, 1, 1]
    for ch in channels:
        assert client.history(HistoryRequest(channel=ch, limit=-1)).publications[0].data == {"ch": ch}


def test_unknown_namespace_is_error_102(client: Client) -> None:
    with pytest.raises(CentApiResponseError) as err:
        client.publish(PublishRequest(channel="nosuchns:x", data={"x": 1}))
    assert err.value.code == UNKNOWN_CHANNEL
    assert err.value.message
    with pytest.raises(CentApiResponseError) as err:
        client.history(HistoryRequest(channel="nosuchns:x", limit=-1))
    assert err.value.code == UNKNOWN_CHANNEL


def test_stale_epoch_is_error_112(client: Client) -> None:
    ch = channel()
    epoch = publish_numbers(client, ch, 2)
    stale = "stale" if epoch != "stale" else "other"
    with pytest.raises(CentApiResponseError) as err:
        client.history(HistoryRequest(channel=ch, limit=-1, since=StreamPosition(offset=1, epoch=stale)))
    assert err.value.code == UNRECOVERABLE_POSITION


def test_publish_without_data_is_bad_request(client: Client) -> None:
    with pytest.raises(CentApiResponseError) as err:
        client.publish(PublishRequest(channel=channel(), data=None))
    assert err.value.code == BAD_REQUEST


def test_wrong_api_key_is_unauthorized(herald) -> None:
    wrong = Client(herald.api_url, "x" * 32, timeout=10.0)
    with pytest.raises(CentUnauthorizedError):
        wrong.publish(PublishRequest(channel=channel(), data={"x": 1}))
    with pytest.raises(CentUnauthorizedError):
        wrong.info(InfoRequest())


def test_history_survives_restart(herald_factory) -> None:
    instance = herald_factory()
    instance.start()
    client = Client(instance.api_url, instance.api_key, timeout=10.0)
    ch = channel()
    count = 25
    epoch = publish_numbers(client, ch, count)
    instance.stop()  # SIGTERM, asserts a graceful exit 0

    instance.start()  # same config, same data dir, new port
    client = Client(instance.api_url, instance.api_key, timeout=10.0)
    history = client.history(HistoryRequest(channel=ch, limit=-1))
    assert offsets(history) == list(range(1, count + 1))
    assert [p.data for p in history.publications] == [{"n": n} for n in range(1, count + 1)]
    assert [p.tags for p in history.publications] == [{"n": str(n)} for n in range(1, count + 1)]
    assert (history.offset, history.epoch) == (count, epoch), "epoch must survive a clean restart"

    page = client.history(HistoryRequest(channel=ch, limit=3, since=StreamPosition(offset=count - 3, epoch=epoch)))
    assert offsets(page) == [count - 2, count - 1, count]

    next_publish = client.publish(PublishRequest(channel=ch, data={"n": count + 1}))
    assert (next_publish.offset, next_publish.epoch) == (count + 1, epoch)
    instance.stop()
