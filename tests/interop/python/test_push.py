"""Push notifications end to end, judged by the third-party `cent` client (PyPI, pinned) and by
what real endpoints received.

Processes: `herald serve` with a `[push]` config; `herald-pushmock` (APNs and FCM emulators
with their control API, keys generated at run time); `web-push-testing` (npm, a Web Push
service that decrypts what it gets); `aiosmtpd` (PyPI, an SMTP server in this process). See
push_fixtures.py and smtp_sink.py.

`cent`'s request classes are used unchanged for everything they can express (the device
registry, topics, `send_push_notification` with APNs/FCM and limit strategies,
`update_push_status`, `cancel_push`, and batches of those); Herald's extras (`push_status`,
`device_removals`, Web Push and email notifications) go through raw HTTP.

Every test asserts on what a user depends on: what the provider emulators / Web Push service /
SMTP server actually received (counted, with payloads and headers), the states `push_status`
reports, and the registry afterwards. Waits are polls with deadlines.
"""

from __future__ import annotations

import collections
import datetime
import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests
from cent import (
    ApnsPushNotification,
    BatchRequest,
    CancelPushRequest,
    CentApiResponseError,
    Client,
    DeviceFilter,
    DeviceListRequest,
    DeviceMetaUpdate,
    DeviceRegisterRequest,
    DeviceRemoveRequest,
    DeviceTopicFilter,
    DeviceTopicListRequest,
    DeviceTopicsUpdate,
    DeviceTopicUpdateRequest,
    DeviceUpdateRequest,
    DeviceUserUpdate,
    FcmPushNotification,
    HmsPushNotification,
    PushNotification,
    SendPushNotificationRequest,
    UpdatePushStatusRequest,
    UserTopicListRequest,
)

# cent 5.2.0 defines these in cent.dto without re-exporting them from the package (PushRecipient
# and the limit strategies included); they are its own classes all the same.
from cent.dto import (
    DeviceLocaleUpdate,
    DeviceTimezoneUpdate,
    PushLimitStrategy,
    PushRateLimitStrategy,
    PushRecipient,
    PushTimeLimitStrategy,
    RateLimitPolicy,
    UserTopicFilter,
    UserTopicUpdateRequest,
)

from conftest import HeraldInstance
from push_fixtures import (
    APNS_KEY_ID,
    APNS_TEAM_ID,
    APNS_TOPIC,
    FCM_PROJECT,
    Api,
    PushMock,
    WebPushTesting,
    apns_token,
    generate_vapid_keys,
    mint_token,
    push_config,
    wait_for,
)
from smtp_sink import SmtpSink

BAD_REQUEST = 107
NOT_AVAILABLE = 108


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def fcm_token(seed: str) -> str:
    return f"fcm-{seed}"


@dataclass
class Stack:
    mock: PushMock
    webpush: WebPushTesting
    smtp: SmtpSink
    vapid: Dict[str, str]
    herald: HeraldInstance
    api: Api
    cent: Client


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One herald with every provider configured, shared by the module (tests use their own
    users, tokens and topics). Its graceful shutdown is asserted at teardown."""
    root = tmp_path_factory.mktemp("push")
    cleanup = []
    try:
        mock = PushMock(root / "pushmock")
        cleanup.append(mock.stop)
        webpush = WebPushTesting(root / "web-push-testing")
        cleanup.append(webpush.stop)
        smtp = SmtpSink.start()
        cleanup.append(smtp.stop)
        vapid = generate_vapid_keys()
        herald = HeraldInstance(
            root / "herald",
            extra_config=push_config(mock, webpush_key=vapid["private"], smtp_port=smtp.port),
        )
        cleanup.append(herald.kill)
        herald.start()
        client = Client(herald.api_url, herald.api_key, timeout=15.0)
        yield Stack(mock, webpush, smtp, vapid, herald, Api(herald), client)
        cleanup.remove(herald.kill)
        herald.stop()
    finally:
        for stop in reversed(cleanup):
            stop()


def register(client: Client, **fields: Any) -> str:
    return client.device_register(DeviceRegisterRequest(**fields)).id


def devices(client: Client, **filter_fields: Any) -> List[Any]:
    """Every device matching the filter, with meta and topics (all pages)."""
    found: List[Any] = []
    cursor = None
    while True:
        page = client.device_list(
            DeviceListRequest(
                filter=DeviceFilter(**filter_fields), include_meta=True, include_topics=True,
                cursor=cursor, limit=1000,
            )
        )
        found.extend(page.items)
        cursor = page.next_cursor
        if not cursor:
            return found


def apns_notification(marker: str, **headers: str) -> ApnsPushNotification:
    return ApnsPushNotification(
        headers=headers or None,
        payload={"aps": {"alert": {"title": "Herald", "body": marker}}, "marker": marker},
    )


def fcm_notification(marker: str) -> FcmPushNotification:
    return FcmPushNotification(
        message={"notification": {"title": "Herald", "body": marker}, "data": {"marker": marker, "n": 7}}
    )


def send(client: Client, recipient: PushRecipient, marker: str, **extra: Any) -> str:
    return client.send_push_notification(
        SendPushNotificationRequest(
            recipient=recipient,
            notification=extra.pop(
                "notification",
                PushNotification(apns=apns_notification(marker), fcm=fcm_notification(marker)),
            ),
            **extra,
        )
    ).uid


def received(mock: PushMock, marker: str) -> collections.Counter:
    """Tokens that got the notification carrying `marker`, with how many times."""
    got: collections.Counter = collections.Counter()
    for record in mock.apns_records():
        if record["payload"].get("marker") == marker:
            got[record["token"]] += 1
    for record in mock.fcm_records():
        message = record["message"]
        if (message.get("data") or {}).get("marker") == marker:
            got[message.get("token") or message.get("topic") or message.get("condition")] += 1
    return got


def by_recipient(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {r["recipient"]: r for r in rows}


# =============================================================================================
# 1. The device registry, through cent


def test_register_all_fields_then_same_token_updates_the_same_device(stack: Stack) -> None:
    c = stack.cent
    user, token = uniq("reg"), apns_token(uniq("reg"))
    before = int(time.time())
    device_id = register(
        c, provider="apns", token=token, platform="ios", user=user, timezone="Europe/Berlin",
        locale="de-DE", meta={"model": "iPhone15,2", "os": "17.4"}, topics=["reg-b", "reg-a", "reg-a"],
    )
    assert device_id
    [device] = devices(c, ids=[device_id])
    assert (device.id, device.provider, device.token, device.platform, device.user) == (
        device_id, "apns", token, "ios", user)
    assert getattr(device, "timezone") == "Europe/Berlin"
    assert getattr(device, "locale") == "de-DE"
    assert device.meta == {"model": "iPhone15,2", "os": "17.4"}
    assert device.topics == ["reg-a", "reg-b"], "topics are stored sorted and deduplicated"
    assert before - 1 <= device.created_at <= time.time() + 1
    assert device.updated_at >= device.created_at

    # Without meta/topics asked for, they are not sent.
    [bare] = c.device_list(DeviceListRequest(filter=DeviceFilter(ids=[device_id]))).items
    assert bare.meta is None and bare.topics is None

    time.sleep(1.1)  # updated_at is in seconds on the wire
    other_user = uniq("reg2")
    again = register(c, provider="apns", token=token, platform="ios", user=other_user, locale="fr-FR",
                     meta={"os": "18.0"})
    assert again == device_id, "the same (provider, token) is the same device"
    [device] = devices(c, ids=[device_id])
    assert (device.user, getattr(device, "locale"), device.meta) == (other_user, "fr-FR", {"os": "18.0"})
    assert device.topics == [], "a registration replaces the device's fields, topics included"
    assert getattr(device, "timezone", "") in ("", None)
    assert device.updated_at > device.created_at
    assert devices(c, users=[user]) == [], "the old user has no device left"

    # The same token with another provider is another device.
    fcm_id = register(c, provider="fcm", token=token, platform="android", user=other_user)
    assert fcm_id != device_id

    # Registering with an explicit id rotates that device's token.
    new_token = apns_token(uniq("rotated"))
    assert register(c, id=device_id, provider="apns", token=new_token, platform="ios", user=other_user) == device_id
    [device] = devices(c, ids=[device_id])
    assert device.token == new_token
    # ... but not onto a token another device holds.
    with pytest.raises(CentApiResponseError) as err:
        register(c, id=fcm_id, provider="apns", token=new_token, platform="ios", user=other_user)
    assert err.value.code == BAD_REQUEST


def test_device_update_user_timezone_locale_meta_and_topics(stack: Stack) -> None:
    c = stack.cent
    user, moved_to = uniq("upd"), uniq("upd-new")
    ids = [
        register(c, provider="apns", token=apns_token(uniq("upd")), platform="ios", user=user,
                 topics=["t1"], meta={"k": "v"}),
        register(c, provider="fcm", token=fcm_token(uniq("upd")), platform="android", user=user),
        register(c, provider="fcm", token=fcm_token(uniq("upd")), platform="android", user=user),
    ]

    c.device_update(DeviceUpdateRequest(users=[user], timezone_update=DeviceTimezoneUpdate(timezone="Asia/Tokyo")))
    assert {getattr(d, "timezone") for d in devices(c, users=[user])} == {"Asia/Tokyo"}

    c.device_update(DeviceUpdateRequest(ids=ids[:2], locale_update=DeviceLocaleUpdate(locale="ja-JP"),
                                        meta_update=DeviceMetaUpdate(meta={"app": "2.1"})))
    found = {d.id: d for d in devices(c, users=[user])}
    assert [getattr(found[i], "locale", None) or "" for i in ids] == ["ja-JP", "ja-JP", ""]
    assert found[ids[0]].meta == {"app": "2.1"}, "meta_update replaces the meta"
    assert found[ids[2]].meta == {}

    c.device_update(DeviceUpdateRequest(ids=[ids[0]], topics_update=DeviceTopicsUpdate(op="add", topics=["t2", "t3"])))
    assert devices(c, ids=[ids[0]])[0].topics == ["t1", "t2", "t3"]
    c.device_update(DeviceUpdateRequest(ids=[ids[0]], topics_update=DeviceTopicsUpdate(op="remove", topics=["t1", "t3"])))
    assert devices(c, ids=[ids[0]])[0].topics == ["t2"]
    c.device_update(DeviceUpdateRequest(users=[user], topics_update=DeviceTopicsUpdate(op="set", topics=["s1", "s2"])))
    assert [d.topics for d in devices(c, users=[user])] == [["s1", "s2"]] * 3

    c.device_update(DeviceUpdateRequest(ids=[ids[1]], user_update=DeviceUserUpdate(user=moved_to)))
    assert [d.id for d in devices(c, users=[moved_to])] == [ids[1]]
    assert sorted(d.id for d in devices(c, users=[user])) == sorted([ids[0], ids[2]])

    with pytest.raises(CentApiResponseError) as err:
        c.device_update(DeviceUpdateRequest(locale_update=DeviceLocaleUpdate(locale="x")))
    assert err.value.code == BAD_REQUEST, "an update needs ids or users"
    with pytest.raises(CentApiResponseError) as err:
        c.device_update(DeviceUpdateRequest(ids=[ids[0]], topics_update=DeviceTopicsUpdate(op="toggle", topics=["x"])))
    assert err.value.code == BAD_REQUEST


def test_device_list_filters_cursor_paging_and_total_count(stack: Stack) -> None:
    c = stack.cent
    tag = uniq("list")
    u1, u2 = f"{tag}-u1", f"{tag}-u2"
    topic = f"{tag}-topic"
    ios = [register(c, provider="apns", token=apns_token(f"{tag}-{i}"), platform="ios", user=u1,
                    meta={"i": str(i)}) for i in range(5)]
    android = [register(c, provider="fcm", token=fcm_token(f"{tag}-a{i}"), platform="android", user=u2,
                        topics=[topic] if i == 0 else None) for i in range(3)]
    web = [register(c, provider="fcm", token=fcm_token(f"{tag}-w{i}"), platform="web", user=u2,
                    topics=[topic]) for i in range(2)]
    everyone = set(ios + android + web)

    # Cursor paging over more than one page, with the total on each page.
    seen: List[str] = []
    sizes: List[int] = []
    cursor: Optional[str] = None
    for _ in range(10):
        page = c.device_list(DeviceListRequest(filter=DeviceFilter(users=[u1, u2]), include_total_count=True,
                                               cursor=cursor, limit=3))
        assert page.total_count == 10
        sizes.append(len(page.items))
        seen.extend(d.id for d in page.items)
        cursor = page.next_cursor
        if not cursor:
            break
    assert sizes == [3, 3, 3, 1]
    assert len(seen) == len(set(seen)) == 10 and set(seen) == everyone

    def ids(**filter_fields: Any) -> set:
        result = c.device_list(DeviceListRequest(filter=DeviceFilter(**filter_fields), include_total_count=True))
        assert result.total_count == len(result.items)
        return {d.id for d in result.items}

    assert ids(users=[u1]) == set(ios)
    assert ids(users=[u1, u2], providers=["fcm"]) == set(android + web)
    assert ids(users=[u1, u2], providers=["apns", "fcm"]) == everyone
    assert ids(users=[u1, u2], platforms=["web"]) == set(web)
    assert ids(users=[u1, u2], platforms=["ios", "web"]) == set(ios + web)
    assert ids(users=[u2], providers=["fcm"], platforms=["android"]) == set(android)
    assert ids(topics=[topic]) == {android[0], *web}
    assert ids(topics=[topic], platforms=["android"]) == {android[0]}
    assert ids(ids=[ios[1], web[0]]) == {ios[1], web[0]}
    assert ids(ids=[ios[1], web[0]], providers=["apns"]) == {ios[1]}
    assert ids(users=[uniq("nobody")]) == set()

    with_meta = c.device_list(DeviceListRequest(filter=DeviceFilter(ids=[ios[3]]), include_meta=True)).items[0]
    assert with_meta.meta == {"i": "3"}

    with pytest.raises(CentApiResponseError) as err:
        c.device_list(DeviceListRequest(filter=DeviceFilter(providers=["hms"])))
    assert err.value.code == BAD_REQUEST


def test_device_topics_and_user_topics(stack: Stack) -> None:
    c = stack.cent
    tag = uniq("topics")
    u, v = f"{tag}-u", f"{tag}-v"
    a, b, cc = f"{tag}-dev-a", f"{tag}-dev-b", f"{tag}-dev-c"
    apns = apns_token(f"{tag}-1")
    fcm = fcm_token(f"{tag}-2")
    d1 = register(c, provider="apns", token=apns, platform="ios", user=u, topics=[a])
    d2 = register(c, provider="fcm", token=fcm, platform="android", user=u)
    d3 = register(c, provider="fcm", token=fcm_token(f"{tag}-3"), platform="android", user=v)

    c.device_topic_update(DeviceTopicUpdateRequest(device_id=d2, op="add", topics=[b, cc]))
    c.device_topic_update(DeviceTopicUpdateRequest(device_id=d2, op="remove", topics=[cc]))

    def pairs(**filter_fields: Any) -> set:
        result = c.device_topic_list(DeviceTopicListRequest(filter=DeviceTopicFilter(**filter_fields),
                                                            include_device=True, include_total_count=True))
        assert result.total_count == len(result.items)
        for item in result.items:
            assert item.id and item.device.user in (u, v), item
        return {(item.device.id, item.topic) for item in result.items}

    assert pairs(device_users=[u]) == {(d1, a), (d2, b)}
    assert pairs(topic_prefix=f"{tag}-dev-") == {(d1, a), (d2, b)}
    assert pairs(topics=[a]) == {(d1, a)}
    assert pairs(device_users=[u], device_providers=["fcm"]) == {(d2, b)}
    assert pairs(device_users=[u], device_platforms=["ios"]) == {(d1, a)}
    assert pairs(device_ids=[d2, d3]) == {(d2, b)}
    first = c.device_topic_list(DeviceTopicListRequest(filter=DeviceTopicFilter(device_users=[u]), limit=1))
    assert len(first.items) == 1 and first.next_cursor
    second = c.device_topic_list(DeviceTopicListRequest(filter=DeviceTopicFilter(device_users=[u]), limit=1,
                                                        cursor=first.next_cursor))
    assert {(i.device.id, i.topic) for i in first.items + second.items} == {(d1, a), (d2, b)}
    assert not second.next_cursor
    # include_device off: the device is named by id only.
    [bare] = c.device_topic_list(DeviceTopicListRequest(filter=DeviceTopicFilter(device_ids=[d1]))).items
    assert bare.device.id == d1 and not bare.device.token

    x, y, z = f"{tag}-user-x", f"{tag}-user-y", f"{tag}-user-z"
    c.user_topic_update(UserTopicUpdateRequest(user=u, op="set", topics=[x, y]))
    c.user_topic_update(UserTopicUpdateRequest(user=u, op="add", topics=[z]))
    c.user_topic_update(UserTopicUpdateRequest(user=u, op="remove", topics=[y]))
    listed = c.user_topic_list(UserTopicListRequest(filter=UserTopicFilter(users=[u]), include_total_count=True))
    assert {(t.user, t.topic) for t in listed.items} == {(u, x), (u, z)} and listed.total_count == 2
    assert {t.topic for t in c.user_topic_list(
        UserTopicListRequest(filter=UserTopicFilter(topic_prefix=f"{tag}-user-"))).items} == {x, z}
    assert {t.topic for t in c.user_topic_list(UserTopicListRequest(filter=UserTopicFilter(topics=[z]))).items} == {z}
    paged = c.user_topic_list(UserTopicListRequest(filter=UserTopicFilter(users=[u]), limit=1))
    assert len(paged.items) == 1 and paged.next_cursor

    # A user's topics show on each of the user's devices and select them.
    found = {d.id: d.topics for d in devices(c, users=[u])}
    assert found == {d1: sorted([a, x, z]), d2: sorted([b, x, z])}
    assert {d.id for d in devices(c, topics=[x])} == {d1, d2}

    # ... and a push to such a topic reaches them.
    marker = uniq("usertopic")
    uid = send(c, PushRecipient(filter=DeviceFilter(topics=[x])), marker)
    stack.api.wait_final(uid, count=2)
    assert received(stack.mock, marker) == {apns: 1, fcm: 1}

    # Moving a device to another user moves it out of the old user's topics.
    c.device_update(DeviceUpdateRequest(ids=[d2], user_update=DeviceUserUpdate(user=v)))
    assert {d.id for d in devices(c, topics=[x])} == {d1}
    assert devices(c, ids=[d2])[0].topics == [b]
    c.user_topic_update(UserTopicUpdateRequest(user=v, op="add", topics=[y]))
    assert {d.id for d in devices(c, topics=[y])} == {d2, d3}

    with pytest.raises(CentApiResponseError) as err:
        c.device_topic_update(DeviceTopicUpdateRequest(device_id="no-such-device", op="add", topics=[a]))
    assert err.value.code == BAD_REQUEST


def test_device_remove_by_ids_and_users_is_recorded_as_api(stack: Stack) -> None:
    c = stack.cent
    u1, u2 = uniq("rm1"), uniq("rm2")
    keep = [register(c, provider="apns", token=apns_token(uniq("rm")), platform="ios", user=u1) for _ in range(2)]
    gone_by_id = register(c, provider="apns", token=apns_token(uniq("rm")), platform="ios", user=u1)
    gone_by_user = [register(c, provider="fcm", token=fcm_token(uniq("rm")), platform="android", user=u2)
                    for _ in range(2)]

    c.device_remove(DeviceRemoveRequest(ids=[gone_by_id]))
    c.device_remove(DeviceRemoveRequest(users=[u2]))
    assert sorted(d.id for d in devices(c, users=[u1, u2])) == sorted(keep)

    removals = {r["device"]["id"]: r for r in stack.api.removals()}
    for device_id in [gone_by_id, *gone_by_user]:
        assert removals[device_id]["reason"] == "api", removals.get(device_id)
        assert abs(removals[device_id]["removed_at"] - time.time()) < 60
    assert removals[gone_by_id]["device"]["user"] == u1
    assert not set(keep) & set(removals)

    with pytest.raises(CentApiResponseError) as err:
        c.device_remove(DeviceRemoveRequest())
    assert err.value.code == BAD_REQUEST, "removing needs ids or users"


# =============================================================================================
# 2. send_push_notification


def test_send_to_filters_reaches_each_matching_device_exactly_once(stack: Stack) -> None:
    c, mock = stack.cent, stack.mock
    tag = uniq("filter")
    alice, bob, carol = f"{tag}-alice", f"{tag}-bob", f"{tag}-carol"
    news = f"{tag}-news"
    a_apns, a_fcm = apns_token(f"{tag}-a"), fcm_token(f"{tag}-a")
    b_fcm, c_apns = fcm_token(f"{tag}-b"), apns_token(f"{tag}-c")
    ids = {
        a_apns: register(c, provider="apns", token=a_apns, platform="ios", user=alice),
        a_fcm: register(c, provider="fcm", token=a_fcm, platform="android", user=alice),
        b_fcm: register(c, provider="fcm", token=b_fcm, platform="android", user=bob, topics=[news]),
        c_apns: register(c, provider="apns", token=c_apns, platform="ios", user=carol, topics=[news]),
    }
    cases = [
        ("users", DeviceFilter(users=[alice]), {a_apns, a_fcm}),
        ("topics", DeviceFilter(topics=[news]), {b_fcm, c_apns}),
        ("providers", DeviceFilter(users=[alice, bob], providers=["fcm"]), {a_fcm, b_fcm}),
        ("platforms", DeviceFilter(users=[alice, bob, carol], platforms=["ios"]), {a_apns, c_apns}),
        ("ids", DeviceFilter(ids=[ids[b_fcm], ids[c_apns]]), {b_fcm, c_apns}),
    ]
    for name, device_filter, expected in cases:
        marker = f"{tag}-{name}"
        uid = send(c, PushRecipient(filter=device_filter), marker)
        rows = stack.api.wait_final(uid, count=len(expected))
        assert received(mock, marker) == {token: 1 for token in expected}, name
        assert {r["recipient"] for r in rows} == {ids[t] for t in expected}, name
        assert all(r["state"] == "sent" and r["attempts"] == 1 for r in rows), rows
        kinds = {r["recipient"]: r["kind"] for r in rows}
        assert all(kinds[ids[t]] == ("push.apns" if t in (a_apns, c_apns) else "push.fcm") for t in expected)

    # What APNs got: Apple's headers (the app's topic, push type and priority by default, the
    # notification's own apns-* headers), our key, HTTP/2, the payload as given.
    marker = f"{tag}-headers"
    uid = send(c, PushRecipient(filter=DeviceFilter(ids=[ids[a_apns], ids[a_fcm]])), marker,
               notification=PushNotification(apns=apns_notification(marker, **{"apns-collapse-id": "c-1",
                                                                                "apns-expiration": "0"}),
                                             fcm=fcm_notification(marker)))
    stack.api.wait_final(uid, count=2)
    [record] = [r for r in mock.apns_records(a_apns) if r["payload"].get("marker") == marker]
    assert record["payload"] == {"aps": {"alert": {"title": "Herald", "body": marker}}, "marker": marker}
    headers = record["headers"]
    assert headers["apns-topic"] == APNS_TOPIC
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10"
    assert headers["apns-collapse-id"] == "c-1" and headers["apns-expiration"] == "0"
    assert (record["key_id"], record["team_id"], record["http_version"]) == (APNS_KEY_ID, APNS_TEAM_ID, "HTTP/2.0")
    # What FCM got: the message with the device's token, data values as strings.
    [fcm_record] = [r for r in mock.fcm_records_to(a_fcm) if r["message"]["data"]["marker"] == marker]
    assert fcm_record["project_id"] == FCM_PROJECT
    assert fcm_record["client_email"] == stack.mock.fcm_account["client_email"]
    assert fcm_record["message"] == {
        "token": a_fcm,
        "notification": {"title": "Herald", "body": marker},
        "data": {"marker": marker, "n": "7"},
    }
    # The provider's message id is what the delivery records.
    [row] = [r for r in stack.api.deliveries(uid) if r["recipient"] == ids[a_apns]]
    assert row["reason"] == record["apns_id"]


def test_send_to_raw_apns_tokens_fcm_tokens_and_fcm_topic(stack: Stack) -> None:
    c, mock = stack.cent, stack.mock
    tag = uniq("raw")
    apns = [apns_token(f"{tag}-1"), apns_token(f"{tag}-2")]
    fcm = [fcm_token(f"{tag}-1"), fcm_token(f"{tag}-2"), fcm_token(f"{tag}-3")]
    topic = f"{tag}-weather"

    uid = send(c, PushRecipient(apns_tokens=apns), f"{tag}-apns")
    rows = stack.api.wait_final(uid, count=2)
    assert received(mock, f"{tag}-apns") == {t: 1 for t in apns}
    assert {r["recipient"] for r in rows} == set(apns) and {r["state"] for r in rows} == {"sent"}

    uid = send(c, PushRecipient(fcm_tokens=fcm), f"{tag}-fcm")
    rows = stack.api.wait_final(uid, count=3)
    assert received(mock, f"{tag}-fcm") == {t: 1 for t in fcm}
    assert {r["recipient"] for r in rows} == set(fcm) and {r["state"] for r in rows} == {"sent"}

    uid = send(c, PushRecipient(fcm_topic=topic), f"{tag}-topic")
    [row] = stack.api.wait_final(uid, count=1)
    assert row["state"] == "sent" and row["kind"] == "push.fcm"
    [record] = [r for r in mock.fcm_records() if r["message"].get("topic") == topic]
    assert "token" not in record["message"]
    assert record["message"]["data"]["marker"] == f"{tag}-topic"

    condition = f"'{tag}-a' in topics && '{tag}-b' in topics"
    uid = send(c, PushRecipient(fcm_condition=condition), f"{tag}-cond")
    stack.api.wait_final(uid, count=1)
    assert [r["message"]["data"]["marker"] for r in mock.fcm_records()
            if r["message"].get("condition") == condition] == [f"{tag}-cond"]


def test_repeated_uid_sends_nothing_twice(stack: Stack) -> None:
    c, api = stack.cent, stack.api
    token = apns_token(uniq("dup"))
    device = register(c, provider="apns", token=token, platform="ios", user=uniq("dup"))
    uid = uniq("dup-uid")
    marker = uniq("dup")
    recipient = PushRecipient(filter=DeviceFilter(ids=[device]))
    assert send(c, recipient, marker, uid=uid) == uid
    assert send(c, recipient, marker, uid=uid) == uid, "the same uid is accepted again"
    api.wait_final(uid, count=1)
    assert send(c, recipient, marker, uid=uid) == uid, "... also after it was sent"
    # A later push to the same device arrives: the repeats had their chance to go out.
    after = uniq("dup-after")
    api.wait_final(send(c, recipient, after), count=1)
    time.sleep(0.5)
    assert received(stack.mock, marker) == {token: 1}
    assert received(stack.mock, after) == {token: 1}
    statuses = api.statuses(uid=uid)
    # One device id, due now: expanded when accepted, so no push.fanout entry.
    assert sorted(s["kind"] for s in statuses) == ["push.apns"], statuses


def test_send_at_in_the_future_then_cancel_push_is_never_sent(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = apns_token(uniq("later"))
    device = register(c, provider="apns", token=token, platform="ios", user=uniq("later"))
    recipient = PushRecipient(filter=DeviceFilter(ids=[device]))
    send_at = int(time.time()) + 2
    cancelled, control = uniq("cancelled"), uniq("control")
    cancelled_uid = send(c, recipient, cancelled, send_at=send_at)
    control_uid = send(c, recipient, control, send_at=send_at)
    [fanout] = api.statuses(uid=cancelled_uid)
    assert (fanout["kind"], fanout["state"]) == ("push.fanout", "queued")

    c.cancel_push(CancelPushRequest(uid=cancelled_uid))
    [fanout] = api.statuses(uid=cancelled_uid)
    assert fanout["state"] == "cancelled"

    # The control push with the same send_at arrives, not before send_at ...
    api.wait_final(control_uid, count=1, timeout=15)
    [record] = [r for r in mock.apns_records(token) if r["payload"]["marker"] == control]
    assert record["time_ms"] >= send_at * 1000, "sent before send_at"
    time.sleep(0.5)  # a few poll intervals past the shared due time
    # ... the cancelled one never does.
    assert received(mock, cancelled) == {}
    assert [(s["kind"], s["state"]) for s in api.statuses(uid=cancelled_uid)] == [("push.fanout", "cancelled")]
    # Cancelling what was already sent changes nothing.
    c.cancel_push(CancelPushRequest(uid=control_uid))
    assert {s["state"] for s in api.statuses(uid=control_uid)} == {"sent"}


def test_expire_at_passing_while_the_endpoint_fails_is_expired(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = apns_token(uniq("expire"))
    device = register(c, provider="apns", token=token, platform="ios", user=uniq("expire"))
    mock.control("/apns/failures", {"token": token, "count": 1000, "status": 503,
                                    "reason": "ServiceUnavailable", "retry_after": 1})
    marker = uniq("expire")
    uid = send(c, PushRecipient(filter=DeviceFilter(ids=[device])), marker,
               notification=PushNotification(apns=apns_notification(marker), expire_at=int(time.time()) + 3))
    [row] = api.wait_final(uid, count=1, timeout=15)
    assert row["state"] == "expired", row
    assert row["attempts"] >= 2, row
    assert "ServiceUnavailable" in row["reason"]
    assert mock.apns_records(token) == []
    assert devices(c, ids=[device]), "a device is not removed for its push expiring"


def test_update_push_status_delivered_then_interacted(stack: Stack) -> None:
    c, api = stack.cent, stack.api
    device = register(c, provider="fcm", token=fcm_token(uniq("report")), platform="android", user=uniq("report"))
    uid = send(c, PushRecipient(filter=DeviceFilter(ids=[device])), uniq("report"))
    [row] = api.wait_final(uid, count=1)
    assert row["state"] == "sent"

    c.update_push_status(UpdatePushStatusRequest(analytics_uid=uid, status="delivered", device_id=device))
    assert [r["state"] for r in api.deliveries(uid)] == ["delivered"]
    assert [r["state"] for r in api.statuses(device_id=device, states=["delivered"])] == ["delivered"]
    c.update_push_status(UpdatePushStatusRequest(analytics_uid=uid, status="interacted", device_id=device))
    assert [r["state"] for r in api.deliveries(uid)] == ["interacted"]
    c.update_push_status(UpdatePushStatusRequest(analytics_uid=uid, status="delivered", device_id=device))
    assert [r["state"] for r in api.deliveries(uid)] == ["interacted"], "interacted is not undone by delivered"

    with pytest.raises(CentApiResponseError) as err:
        c.update_push_status(UpdatePushStatusRequest(analytics_uid=uid, status="opened", device_id=device))
    assert err.value.code == BAD_REQUEST

    # Centrifugo's way: the push is named by its analytics_uid, which reports then use (msg_id,
    # the provider's message id, is accepted along).
    analytics_uid = uniq("analytics")
    reply = c.send_push_notification(SendPushNotificationRequest(
        recipient=PushRecipient(filter=DeviceFilter(ids=[device])),
        notification=PushNotification(fcm=fcm_notification(analytics_uid)),
        analytics_uid=analytics_uid, optimize_for_reliability=True))
    assert reply.uid == analytics_uid
    api.wait_final(analytics_uid, count=1)
    c.update_push_status(UpdatePushStatusRequest(analytics_uid=analytics_uid, status="delivered",
                                                 device_id=device, msg_id="projects/x/messages/1"))
    assert [r["state"] for r in api.deliveries(analytics_uid)] == ["delivered"]
    with pytest.raises(CentApiResponseError) as err:
        c.send_push_notification(SendPushNotificationRequest(
            recipient=PushRecipient(filter=DeviceFilter(ids=[device])),
            notification=PushNotification(fcm=fcm_notification("x")), uid=uniq("a"), analytics_uid=uniq("b")))
    assert err.value.code == BAD_REQUEST, "uid and analytics_uid that differ"


def test_rate_limit_drops_the_second_push_within_the_window(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = apns_token(uniq("rate"))
    device = register(c, provider="apns", token=token, platform="ios", user=uniq("rate"))
    recipient = PushRecipient(filter=DeviceFilter(ids=[device]))

    def limit(drop: bool) -> PushLimitStrategy:
        return PushLimitStrategy(rate_limit=PushRateLimitStrategy(
            key="{device}", policies=[RateLimitPolicy(rate=1, interval_ms=24 * 3600 * 1000)],
            drop_if_rate_limited=drop))

    first, second, delayed, unlimited = (uniq(n) for n in ("first", "second", "delayed", "unlimited"))
    api.wait_final(send(c, recipient, first, limit_strategy=limit(True)), count=1)
    dropped_uid = send(c, recipient, second, limit_strategy=limit(True))
    [fanout] = wait_for("the second push's expansion", lambda: [
        s for s in api.statuses(uid=dropped_uid) if s["state"] == "sent"])
    assert "1 rate limited" in fanout["reason"], fanout
    assert api.deliveries(dropped_uid) == []

    # Without drop_if_rate_limited it waits for the next window instead.
    delayed_uid = send(c, recipient, delayed, limit_strategy=limit(False))
    [row] = wait_for("the delayed push's delivery", lambda: api.deliveries(delayed_uid))
    assert row["state"] == "queued"

    # Another push without a limit still goes, and the limited ones did not.
    api.wait_final(send(c, recipient, unlimited), count=1)
    time.sleep(0.3)
    got = {m: received(mock, m).get(token, 0) for m in (first, second, delayed, unlimited)}
    assert got == {first: 1, second: 0, delayed: 0, unlimited: 1}
    c.cancel_push(CancelPushRequest(uid=delayed_uid))


def _clock(hours_from_now: float, offset_hours: int) -> str:
    """The wall-clock time (HH:MM:SS) `hours_from_now` from now in a UTC+offset zone."""
    utc = datetime.datetime.now(datetime.timezone.utc)
    local = utc + datetime.timedelta(hours=offset_hours + hours_from_now)
    return local.strftime("%H:%M:%S")


def _not_before_ms(herald: HeraldInstance, uid: str) -> List[int]:
    """The delivery jobs' not-before times, read from herald's outbound database (read-only)."""
    db = sqlite3.connect(f"file:{herald.data_dir / 'outbound.db'}?mode=ro", uri=True, timeout=5)
    try:
        return [row[0] for row in db.execute(
            "SELECT not_before FROM jobs WHERE grp = ? AND kind != 'push.fanout'", (uid,))]
    finally:
        db.close()


def test_time_limit_holds_pushes_outside_the_device_window(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    tokyo_token, utc_token = apns_token(uniq("tokyo")), apns_token(uniq("notz"))
    tokyo = register(c, provider="apns", token=tokyo_token, platform="ios", user=uniq("tz"), timezone="Asia/Tokyo")
    no_tz = register(c, provider="apns", token=utc_token, platform="ios", user=uniq("tz"))

    def window(start_h: float, end_h: float, offset: int, no_tz_send_now: bool = False) -> PushLimitStrategy:
        return PushLimitStrategy(time_limit=PushTimeLimitStrategy(
            send_after_time=_clock(start_h, offset), send_before_time=_clock(end_h, offset),
            no_tz_send_now=no_tz_send_now))

    # Tokyo is UTC+9 all year. Inside its window (opened an hour ago, Tokyo time): sent now. The
    # same window is not open in UTC, so the device without a time zone waits: the device's own
    # zone is what counts.
    inside = uniq("inside")
    inside_uid = send(c, PushRecipient(filter=DeviceFilter(ids=[tokyo, no_tz])), inside,
                      limit_strategy=window(-1, 1, 9))

    def split() -> Optional[Dict[str, str]]:
        rows = {r["recipient"]: r["state"] for r in api.deliveries(inside_uid)}
        return rows if rows.get(tokyo) == "sent" and no_tz in rows else None

    states = wait_for("the in-window delivery", split)
    assert states == {tokyo: "sent", no_tz: "queued"}
    assert received(mock, inside) == {tokyo_token: 1}

    # Outside its window (it opens in 2 hours, Tokyo time): held until then.
    outside = uniq("outside")
    outside_uid = send(c, PushRecipient(filter=DeviceFilter(ids=[tokyo])), outside, limit_strategy=window(2, 3, 9))
    [held] = wait_for("the held delivery", lambda: api.deliveries(outside_uid))
    assert held["state"] == "queued"
    [not_before] = _not_before_ms(stack.herald, outside_uid)
    expected = (time.time() + 2 * 3600) * 1000
    assert abs(not_before - expected) < 5000, f"held until {not_before}, expected about {expected}"

    # A device without a time zone gets it now with no_tz_send_now, whatever the window.
    now_anyway = uniq("now-anyway")
    api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[no_tz])), now_anyway,
                        limit_strategy=window(2, 3, 0, no_tz_send_now=True)), count=1)
    assert received(mock, now_anyway) == {utc_token: 1}

    time.sleep(0.3)
    assert received(mock, outside) == {} and received(mock, inside) == {tokyo_token: 1}
    for uid in (outside_uid, inside_uid):
        c.cancel_push(CancelPushRequest(uid=uid))
    assert [r["state"] for r in api.deliveries(outside_uid)] == ["cancelled"]
    assert by_recipient(api.deliveries(inside_uid))[no_tz]["state"] == "cancelled"
    assert by_recipient(api.deliveries(inside_uid))[tokyo]["state"] == "sent", "cancel leaves what was sent"


# =============================================================================================
# 3. Token hygiene, driven through the emulators' control API


def _removal(api: Api, device_id: str) -> Optional[Dict[str, Any]]:
    return next((r for r in api.removals() if r["device"]["id"] == device_id), None)


def test_apns_unregistered_removes_the_device_with_the_reason(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = apns_token(uniq("gone"))
    device = register(c, provider="apns", token=token, platform="ios", user=uniq("gone"))
    mock.control("/apns/unregistered", {"token": token})
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), uniq("gone")), count=1)
    assert row["state"] == "failed" and row["attempts"] == 1
    assert "Unregistered" in row["reason"] and "device removed" in row["reason"], row
    assert devices(c, ids=[device]) == []
    removal = _removal(api, device)
    assert removal is not None and removal["reason"] == "Unregistered"
    assert removal["device"]["token"] == token
    assert mock.apns_records(token) == []


def test_apns_unregistered_before_a_reregistration_keeps_the_device(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = apns_token(uniq("back"))
    user = uniq("back")
    device = register(c, provider="apns", token=token, platform="ios", user=user)
    mock.control("/apns/unregistered", {"token": token})  # timestamp: now
    time.sleep(0.05)
    assert register(c, provider="apns", token=token, platform="ios", user=user) == device  # the app came back
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), uniq("back")), count=1)
    assert row["state"] == "failed"
    assert "re-registered" in row["reason"] and "kept" in row["reason"], row
    assert [d.id for d in devices(c, ids=[device])] == [device]
    assert _removal(api, device) is None


def test_apns_bad_device_token_removes_the_device(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = apns_token(uniq("bad"))
    device = register(c, provider="apns", token=token, platform="ios", user=uniq("bad"))
    mock.control("/apns/unknown-tokens", {"token": token})
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), uniq("bad")), count=1)
    assert row["state"] == "failed" and "BadDeviceToken" in row["reason"], row
    assert devices(c, ids=[device]) == []
    assert (_removal(api, device) or {}).get("reason") == "BadDeviceToken"

    # A token of another app (bundle id) is as dead for this one.
    token = apns_token(uniq("other-app"))
    device = register(c, provider="apns", token=token, platform="ios", user=uniq("bad"))
    mock.control("/apns/token-topics", {"token": token, "topic": "com.example.other"})
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), uniq("bad")), count=1)
    assert row["state"] == "failed" and "DeviceTokenNotForTopic" in row["reason"], row
    assert devices(c, ids=[device]) == []
    assert (_removal(api, device) or {}).get("reason") == "DeviceTokenNotForTopic"


def test_apns_429_and_503_with_retry_after_are_retried_then_sent(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = apns_token(uniq("busy"))
    device = register(c, provider="apns", token=token, platform="ios", user=uniq("busy"))
    mock.control("/apns/failures", {"token": token, "count": 1, "status": 429, "reason": "TooManyRequests",
                                    "retry_after": 1})
    mock.control("/apns/failures", {"token": token, "count": 1, "status": 503, "reason": "ServiceUnavailable",
                                    "retry_after": 1})
    marker = uniq("busy")
    started = time.time()
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), marker), count=1, timeout=20)
    assert row["state"] == "sent" and row["attempts"] == 3, row
    [record] = mock.apns_records(token)
    assert record["payload"]["marker"] == marker
    assert record["time_ms"] / 1000 - started >= 1.9, "Retry-After (1 s, twice) was not honoured"
    assert [d.id for d in devices(c, ids=[device])] == [device]


def test_apns_non_retryable_400_fails_with_the_reason_and_keeps_the_device(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = apns_token(uniq("reject"))
    device = register(c, provider="apns", token=token, platform="ios", user=uniq("reject"))
    mock.control("/apns/failures", {"token": token, "count": 1, "status": 400, "reason": "BadExpirationDate"})
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), uniq("reject")), count=1)
    assert (row["state"], row["attempts"]) == ("failed", 1), row
    assert "BadExpirationDate" in row["reason"] and "400" in row["reason"]
    assert [d.id for d in devices(c, ids=[device])] == [device]
    assert _removal(api, device) is None
    assert mock.apns_records(token) == []


def test_apns_expired_provider_token_is_resigned_and_sent(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = apns_token(uniq("jwt"))
    device = register(c, provider="apns", token=token, platform="ios", user=uniq("jwt"))
    signed_before = mock.apns_stats()["provider_tokens"]
    mock.control("/apns/expire-next", {"count": 1})
    marker = uniq("jwt")
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), marker), count=1)
    assert (row["state"], row["attempts"]) == ("sent", 2), row
    assert [r["payload"]["marker"] for r in mock.apns_records(token)] == [marker]
    assert mock.apns_stats()["provider_tokens"] >= signed_before + 1, "no new provider token was presented"
    assert mock.apns_stats()["rejected"].get("ExpiredProviderToken", 0) >= 1


def test_fcm_unregistered_removes_the_device(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = fcm_token(uniq("gone"))
    device = register(c, provider="fcm", token=token, platform="android", user=uniq("gone"))
    mock.control("/fcm/unregistered", {"token": token})
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), uniq("gone")), count=1)
    assert row["state"] == "failed" and "UNREGISTERED" in row["reason"] and "device removed" in row["reason"], row
    assert devices(c, ids=[device]) == []
    removal = _removal(api, device)
    assert removal is not None and "UNREGISTERED" in removal["reason"], removal

    # A token of another Firebase project: SENDER_ID_MISMATCH, as dead for this sender.
    token = fcm_token(uniq("mismatch"))
    device = register(c, provider="fcm", token=token, platform="android", user=uniq("gone"))
    mock.control("/fcm/token-projects", {"token": token, "project": "another-project"})
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), uniq("gone")), count=1)
    assert row["state"] == "failed" and "SENDER_ID_MISMATCH" in row["reason"], row
    assert devices(c, ids=[device]) == []
    assert "SENDER_ID_MISMATCH" in (_removal(api, device) or {}).get("reason", "")
    assert mock.fcm_records_to(token) == []


def test_fcm_quota_exceeded_is_retried_then_sent(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = fcm_token(uniq("quota"))
    device = register(c, provider="fcm", token=token, platform="android", user=uniq("quota"))
    mock.control("/fcm/failures", {"target": token, "count": 1, "error": "QUOTA_EXCEEDED", "retry_after": 1})
    marker = uniq("quota")
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), marker), count=1)
    assert (row["state"], row["attempts"]) == ("sent", 2), row
    assert received(mock, marker) == {token: 1}


def test_fcm_invalid_argument_fails_and_keeps_the_device(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = fcm_token(uniq("invalid"))
    device = register(c, provider="fcm", token=token, platform="android", user=uniq("invalid"))
    mock.control("/fcm/failures", {"target": token, "count": 1, "error": "INVALID_ARGUMENT"})
    [row] = api.wait_final(send(c, PushRecipient(filter=DeviceFilter(ids=[device])), uniq("invalid")), count=1)
    assert (row["state"], row["attempts"]) == ("failed", 1), row
    assert "INVALID_ARGUMENT" in row["reason"]
    assert [d.id for d in devices(c, ids=[device])] == [device]
    assert _removal(api, device) is None


def test_fcm_revoked_access_token_is_refreshed_and_sent(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token = fcm_token(uniq("oauth"))
    device = register(c, provider="fcm", token=token, platform="android", user=uniq("oauth"))
    recipient = PushRecipient(filter=DeviceFilter(ids=[device]))
    api.wait_final(send(c, recipient, uniq("warm")), count=1)  # herald holds an access token now
    issued = mock.fcm_stats()["tokens_issued"]
    mock.control("/fcm/revoke-tokens", {})
    marker = uniq("oauth")
    [row] = api.wait_final(send(c, recipient, marker), count=1)
    assert (row["state"], row["attempts"]) == ("sent", 2), row
    assert received(mock, marker) == {token: 1}
    assert mock.fcm_stats()["tokens_issued"] >= issued + 1, "no new access token was fetched"


# =============================================================================================
# 4. Web Push, through web-push-testing


def test_webpush_subscription_gets_the_decrypted_payload(stack: Stack) -> None:
    c, api, wpt = stack.cent, stack.api, stack.webpush
    subscription = wpt.subscribe(stack.vapid["public"])
    device = register(c, provider="webpush", token=subscription["token"], platform="web", user=uniq("web"))
    payload = {"title": "Herald", "body": "über ✓", "n": 1}
    uid = api.call("send_push_notification", {
        "recipient": {"filter": {"ids": [device]}},
        "notification": {"webpush": {"payload": payload, "headers": {"ttl": "60", "urgency": "high"}}},
    })["uid"]
    [row] = api.wait_final(uid, count=1)
    assert (row["state"], row["kind"], row["recipient"]) == ("sent", "push.webpush", device), row
    messages = wait_for("the Web Push message", lambda: wpt.messages(subscription))
    assert [json.loads(m) for m in messages] == [payload]

    # A text payload is sent as its text; a raw subscription as the recipient works too.
    uid = api.call("send_push_notification", {
        "recipient": {"webpush_tokens": [subscription["token"]]},
        "notification": {"webpush": {"payload": "plain text ✓"}},
    })["uid"]
    [row] = api.wait_final(uid, count=1)
    assert row["state"] == "sent", row
    both = wait_for("the second message", lambda: len(wpt.messages(subscription)) == 2 and wpt.messages(subscription))
    assert both == [messages[0], "plain text ✓"]


def test_webpush_expired_subscription_removes_the_device(stack: Stack) -> None:
    c, api, wpt = stack.cent, stack.api, stack.webpush
    subscription = wpt.subscribe(stack.vapid["public"])
    device = register(c, provider="webpush", token=subscription["token"], platform="web", user=uniq("web"))
    wpt.expire(subscription)
    uid = api.call("send_push_notification", {
        "recipient": {"filter": {"ids": [device]}},
        "notification": {"webpush": {"payload": {"title": "gone"}}},
    })["uid"]
    [row] = api.wait_final(uid, count=1)
    assert row["state"] == "failed" and "device removed" in row["reason"], row
    assert devices(c, ids=[device]) == []
    removal = _removal(api, device)
    assert removal is not None and "410" in removal["reason"], removal


# =============================================================================================
# 5. Email, through aiosmtpd


def test_email_reaches_users_without_another_device_only(stack: Stack) -> None:
    c, api, mock, smtp = stack.cent, stack.api, stack.mock, stack.smtp
    tag = uniq("mail")
    only_mail, both, apns_but_no_apns_part = f"{tag}-only", f"{tag}-both", f"{tag}-third"
    only_address, both_address, third_address = (f"{u}@example.com" for u in (only_mail, both, apns_but_no_apns_part))
    both_token = apns_token(f"{tag}-both")
    register(c, provider="email", token=only_address, platform="other", user=only_mail)
    both_apns = register(c, provider="apns", token=both_token, platform="ios", user=both)
    register(c, provider="email", token=both_address, platform="other", user=both)
    marker = uniq("mail")
    uid = api.call("send_push_notification", {
        "recipient": {"filter": {"users": [only_mail, both]}},
        "notification": {
            "apns": {"payload": {"aps": {"alert": "hi"}, "marker": marker}},
            "email": {"subject": f"Hello {marker}", "text": "You have a message.", "html": "<p>You have a message.</p>"},
        },
    })["uid"]
    rows = api.wait_final(uid, count=2)
    assert sorted(r["kind"] for r in rows) == ["push.apns", "push.email"], rows
    assert {r["state"] for r in rows} == {"sent"}
    assert by_recipient(rows)[both_apns]["kind"] == "push.apns"

    [mail] = wait_for("the email", lambda: smtp.to(only_address))
    assert mail["subject"] == f"Hello {marker}"
    assert "noreply@example.com" in mail["from"] and mail["mail_from"] == "noreply@example.com"
    parts = {p["content_type"]: p["content"].strip() for p in mail["parts"]}
    assert parts["text/plain"] == "You have a message."
    assert parts["text/html"] == "<p>You have a message.</p>"
    assert received(mock, marker) == {both_token: 1}
    assert smtp.to(both_address) == [], "a user reached by APNs gets no email"

    # A user whose other device has nothing to receive (no apns part) gets the email.
    register(c, provider="apns", token=apns_token(f"{tag}-third"), platform="ios", user=apns_but_no_apns_part)
    register(c, provider="email", token=third_address, platform="other", user=apns_but_no_apns_part)
    uid = api.call("send_push_notification", {
        "recipient": {"filter": {"users": [apns_but_no_apns_part]}},
        "notification": {"email": {"subject": f"Only mail {marker}", "text": "t"}},
    })["uid"]
    [row] = api.wait_final(uid, count=1)
    assert (row["kind"], row["state"]) == ("push.email", "sent")
    assert [m["subject"] for m in wait_for("the fallback email", lambda: smtp.to(third_address))] == [
        f"Only mail {marker}"]


def test_email_to_a_mailbox_that_does_not_exist_removes_the_device(stack: Stack) -> None:
    c, api, smtp = stack.cent, stack.api, stack.smtp
    address = f"{uniq('gone')}@example.com"
    device = register(c, provider="email", token=address, platform="other", user=uniq("mail"))
    uid = api.call("send_push_notification", {
        "recipient": {"filter": {"ids": [device]}},
        "notification": {"email": {"subject": "anyone there?", "text": "t"}},
    })["uid"]
    [row] = api.wait_final(uid, count=1)
    assert row["state"] == "failed" and "550" in row["reason"] and "device removed" in row["reason"], row
    assert devices(c, ids=[device]) == []
    assert "550" in (_removal(api, device) or {}).get("reason", "")
    assert smtp.to(address) == []


# =============================================================================================
# 6. Bad input


def test_bad_registrations_are_refused_with_107(stack: Stack) -> None:
    c, api = stack.cent, stack.api
    user = uniq("badreg")
    for fields in (
        dict(provider="hms", token="t", platform="android"),
        dict(provider="apns", token="", platform="ios"),
        dict(provider="apns", token=apns_token(user), platform="watch"),
    ):
        with pytest.raises(CentApiResponseError) as err:
            register(c, user=user, **fields)
        assert err.value.code == BAD_REQUEST, fields
    # Fields cent's class requires, left out, and unknown fields: the params do not parse.
    for body in ({"provider": "apns", "platform": "ios", "user": user},
                 {"provider": "apns", "token": "x", "platform": "ios", "user": user, "colour": "red"}):
        error = api.error("device_register", body)
        assert (error["status"], error["code"]) == (400, BAD_REQUEST), error
    assert devices(c, users=[user]) == []


def test_bad_push_requests_are_refused_with_107_and_nothing_is_queued(stack: Stack) -> None:
    c, api, mock = stack.cent, stack.api, stack.mock
    token, fcm = apns_token(uniq("badpush")), fcm_token(uniq("badpush"))
    apns_only = PushNotification(apns=apns_notification("bad"))
    cases = {
        "two recipient fields": (PushRecipient(apns_tokens=[token], fcm_tokens=[fcm]),
                                 PushNotification(apns=apns_notification("bad"), fcm=fcm_notification("bad"))),
        "no recipient": (PushRecipient(), apns_only),
        "hms tokens": (PushRecipient(hms_tokens=["h1"]), apns_only),
        "hms topic": (PushRecipient(hms_topic="news"), apns_only),
        "hms notification": (PushRecipient(apns_tokens=[token]),
                             PushNotification(apns=apns_notification("bad"), hms=HmsPushNotification(message={}))),
        "no part for the recipient": (PushRecipient(fcm_tokens=[fcm]), apns_only),
        "empty token list": (PushRecipient(apns_tokens=[]), apns_only),
        "empty token": (PushRecipient(apns_tokens=[""]), apns_only),
        "filter but nothing to send": (PushRecipient(filter=DeviceFilter(users=["x"])), PushNotification()),
        "expire_at in the past": (PushRecipient(apns_tokens=[token]),
                                  PushNotification(apns=apns_notification("bad"), expire_at=int(time.time()) - 10)),
    }
    uids = []
    for name, (recipient, notification) in cases.items():
        uid = uniq("bad")
        uids.append(uid)
        with pytest.raises(CentApiResponseError) as err:
            c.send_push_notification(SendPushNotificationRequest(recipient=recipient, notification=notification, uid=uid))
        assert err.value.code == BAD_REQUEST, name
        assert err.value.message, name
    for name, strategy in {
        "rate 0": PushLimitStrategy(rate_limit=PushRateLimitStrategy(policies=[RateLimitPolicy(rate=0, interval_ms=1000)])),
        "no policies": PushLimitStrategy(rate_limit=PushRateLimitStrategy(policies=[])),
        "bad time": PushLimitStrategy(time_limit=PushTimeLimitStrategy(send_after_time="9am", send_before_time="18:00:00")),
    }.items():
        uid = uniq("bad")
        uids.append(uid)
        with pytest.raises(CentApiResponseError) as err:
            send(c, PushRecipient(apns_tokens=[token]), "bad", uid=uid, limit_strategy=strategy)
        assert err.value.code == BAD_REQUEST, name

    # What cent cannot even send: malformed JSON, unknown fields, unknown providers in a filter.
    raw = [
        b'{"recipient": {"apns_tokens": ["' + token.encode() + b'"]}, "notification": ',
        {"recipient": {"apns_tokens": [token], "bogus": 1}, "notification": {"apns": {"payload": {}}}},
        {"recipient": {"filter": {"providers": ["hms"]}}, "notification": {"apns": {"payload": {}}}},
        {"recipient": {"webpush_tokens": ["{}"]}, "notification": {"apns": {"payload": {}}}, "uid": "x"},
        {"recipient": {"apns_tokens": [token]}, "notification": {"apns": {"payload": {}}}, "localizations": {}},
    ]
    for body in raw:
        error = api.error("send_push_notification", body)
        assert error["code"] == BAD_REQUEST, (body, error)
    assert api.error("send_push_notification", raw[0])["status"] == 400
    error = api.error("cancel_push", {})
    assert error["code"] == BAD_REQUEST

    for uid in uids:
        assert api.statuses(uid=uid) == [], uid
    assert api.statuses(uid="x") == []
    time.sleep(0.3)
    assert mock.apns_records(token) == [] and mock.fcm_records_to(fcm) == []
    error = api.error("push_status", {})
    assert error["code"] == BAD_REQUEST, "push_status needs a filter"


def test_push_disabled_server_answers_108(herald) -> None:
    client = Client(herald.api_url, herald.api_key, timeout=10.0)
    with pytest.raises(CentApiResponseError) as err:
        send(client, PushRecipient(apns_tokens=[apns_token("off")]), "off")
    assert err.value.code == NOT_AVAILABLE
    with pytest.raises(CentApiResponseError) as err:
        register(client, provider="apns", token=apns_token("off"), platform="ios", user="off")
    assert err.value.code == NOT_AVAILABLE
    with pytest.raises(CentApiResponseError) as err:
        client.device_list(DeviceListRequest())
    assert err.value.code == NOT_AVAILABLE
    reply = requests.post(f"{herald.api_url}/push_status", json={"uid": "x"},
                          headers={"X-API-Key": herald.api_key}, timeout=10).json()
    assert reply["error"]["code"] == NOT_AVAILABLE
    response = requests.post(f"{herald.url}/client/device_register",
                             json={"provider": "apns", "token": apns_token("off"), "platform": "ios"},
                             headers={"Authorization": f"Bearer {mint_token(herald.hmac_secret, 'off')}"}, timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == NOT_AVAILABLE


# =============================================================================================
# 7. kill -9 durability


def _durability_stack(root, apns_concurrency: int):
    mock = PushMock(root / "pushmock")
    instance = HeraldInstance(root / "herald", extra_config=push_config(
        mock, apns_concurrency=apns_concurrency, lease="5s", max_attempts=1000))
    return mock, instance


def _queue_pushes(client: Client, tokens: List[str], tag: str, send_at: Optional[int] = None) -> List[str]:
    """Registers a device per token and sends each its own push (payload n = index); two cent
    batches. Returns the uids."""
    registered = client.batch(BatchRequest(requests=[
        DeviceRegisterRequest(provider="apns", token=t, platform="ios", user=f"{tag}-{i}") for i, t in enumerate(tokens)
    ]))
    ids = [r.id for r in registered.replies]
    assert len(set(ids)) == len(tokens)
    uids = [f"{tag}-{i}" for i in range(len(tokens))]
    sent = client.batch(BatchRequest(requests=[
        SendPushNotificationRequest(
            recipient=PushRecipient(filter=DeviceFilter(ids=[device])),
            notification=PushNotification(apns=ApnsPushNotification(payload={"aps": {"alert": f"#{i}"}, "n": i})),
            uid=uid, send_at=send_at)
        for i, (device, uid) in enumerate(zip(ids, uids))
    ]))
    assert [r.uid for r in sent.replies] == uids
    return uids


def _all_delivered(mock: PushMock, api: Api, tokens: List[str], timeout: float) -> collections.Counter:
    """Waits until every token got its push and no delivery is left unfinished; returns the
    count per token."""
    wanted = set(tokens)

    def counts() -> collections.Counter:
        return collections.Counter(r["token"] for r in mock.apns_records())

    wait_for(f"all {len(tokens)} pushes to arrive", lambda: wanted <= set(counts()), timeout=timeout,
             interval=0.2, details=lambda: f"missing {len(wanted - set(counts()))}; stats {mock.apns_stats()}")
    wait_for("no delivery left queued or sending", lambda: not api.statuses(states=["queued", "sending"]),
             timeout=timeout, interval=0.2)
    return counts()


def _check_records_and_statuses(mock: PushMock, api: Api, tokens: List[str], uids: List[str],
                                scheduled: bool) -> None:
    index = {t: i for i, t in enumerate(tokens)}
    for record in mock.apns_records():
        assert record["payload"]["n"] == index[record["token"]], record
    rows = [s for s in api.statuses(states=["queued", "sending", "sent", "failed", "expired", "cancelled"])]
    deliveries = [r for r in rows if r["kind"] == "push.apns"]
    assert len(deliveries) == len(tokens)
    # A push to one device id that is due now is expanded when accepted (no push.fanout job);
    # a scheduled one waits in its push.fanout job.
    expected = {("push.apns", "sent"): len(tokens)}
    if scheduled:
        expected[("push.fanout", "sent")] = len(tokens)
    assert collections.Counter((r["kind"], r["state"]) for r in rows) == expected
    assert {r["uid"] for r in deliveries} == set(uids)


def test_kill9_while_apns_refuses_everything_then_restart_sends_each_exactly_once(tmp_path_factory) -> None:
    n = 200
    root = tmp_path_factory.mktemp("kill9-refusing")
    mock, instance = _durability_stack(root, apns_concurrency=16)
    try:
        instance.start()
        client = Client(instance.api_url, instance.api_key, timeout=30.0)
        # Every request is refused, after 100 ms: at any moment some sends are in flight.
        mock.control("/apns/failures", {"count": 1_000_000, "status": 503, "reason": "ServiceUnavailable"})
        mock.control("/apns/latency", {"ms": 100})
        tokens = [apns_token(f"{root}-{i}") for i in range(n)]
        uids = _queue_pushes(client, tokens, "k9a")
        api = Api(instance)
        # Every delivery tried (and refused) about once, and sends in flight: then the kill.
        wait_for("refused attempts", lambda: mock.apns_stats()["requests"] >= n, timeout=30, interval=0.05)
        in_flight = wait_for("sends in flight", lambda: api.statuses(states=["sending"]), timeout=10, interval=0.01)
        instance.kill()  # SIGKILL
        assert mock.apns_stats()["accepted"] == 0
        print(f"\nkill -9 with a refusing APNs: {len(in_flight)} sends in flight at the kill")
        mock.control("/reset", {})  # the provider is healthy again
        started = time.monotonic()
        instance.start()  # same config and data dir
        counts = _all_delivered(mock, api, tokens, timeout=45)
        print(f"\nkill -9 with a refusing APNs: {n} pushes delivered {time.monotonic() - started:.1f}s after restart")
        duplicates = {t: c for t, c in counts.items() if c > 1}
        assert not duplicates, f"nothing was accepted before the kill, yet {len(duplicates)} tokens got duplicates"
        assert sorted(counts) == sorted(tokens)
        _check_records_and_statuses(mock, api, tokens, uids, scheduled=False)
        instance.stop()
    finally:
        instance.kill()
        mock.stop()


def test_kill9_in_a_flowing_stream_loses_nothing_and_duplicates_at_most_the_in_flight(tmp_path_factory) -> None:
    n, concurrency = 200, 8
    root = tmp_path_factory.mktemp("kill9-flowing")
    mock, instance = _durability_stack(root, apns_concurrency=concurrency)
    try:
        instance.start()
        client = Client(instance.api_url, instance.api_key, timeout=30.0)
        mock.control("/apns/latency", {"ms": 40})
        tokens = [apns_token(f"{root}-{i}") for i in range(n)]
        # All due at the same moment, so the stream is flowing at full speed when it is cut.
        uids = _queue_pushes(client, tokens, "k9b", send_at=int(time.time()) + 2)
        wait_for("the stream to be flowing", lambda: mock.apns_stats()["accepted"] >= n // 4, timeout=30,
                 interval=0.01)
        instance.kill()  # SIGKILL mid-stream
        accepted_at_kill = mock.apns_stats()["accepted"]
        assert accepted_at_kill < n, "the stream finished before the kill; nothing was tested"
        time.sleep(0.2)  # requests the emulator was still answering finish (or not)
        mock.control("/apns/latency", {"ms": 0})
        instance.start()
        api = Api(instance)
        counts = _all_delivered(mock, api, tokens, timeout=45)
        duplicates = sum(c - 1 for c in counts.values())
        print(f"\nkill -9 mid-stream: {accepted_at_kill} of {n} accepted before the kill, "
              f"{duplicates} duplicate(s) after restart (apns concurrency {concurrency})")
        assert sorted(counts) == sorted(tokens), "a push was lost"
        assert duplicates <= concurrency, f"{duplicates} duplicates, more than the {concurrency} sends in flight"
        _check_records_and_statuses(mock, api, tokens, uids, scheduled=True)
        instance.stop()
    finally:
        instance.kill()
        mock.stop()


# =============================================================================================
# 8. The client's own devices over HTTP (connection JWT)


def _client_call(herald: HeraldInstance, method: str, body: Any, token: Optional[str]) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return requests.post(f"{herald.url}/client/{method}", json=body, headers=headers, timeout=10)


def test_client_registers_updates_and_removes_its_own_device_over_http(stack: Stack) -> None:
    c, api, herald = stack.cent, stack.api, stack.herald
    alice = uniq("alice")
    jwt = mint_token(herald.hmac_secret, alice)
    token = apns_token(alice)
    response = _client_call(herald, "device_register",
                            {"provider": "apns", "token": token, "platform": "ios", "timezone": "Europe/Paris",
                             "locale": "fr-FR", "meta": {"app": "1.0"}}, jwt)
    assert response.status_code == 200, response.text
    device = response.json()["id"]
    [d] = devices(c, ids=[device])
    assert (d.user, d.token, d.provider, getattr(d, "timezone"), d.meta) == (
        alice, token, "apns", "Europe/Paris", {"app": "1.0"})

    response = _client_call(herald, "device_update", {"id": device, "locale": "en-GB", "meta": {"app": "1.1"}}, jwt)
    assert response.status_code == 200 and response.json() == {}, response.text
    [d] = devices(c, ids=[device])
    assert (getattr(d, "locale"), d.meta, d.user) == ("en-GB", {"app": "1.1"}, alice)

    # The app reports on a push it got.
    uid = send(c, PushRecipient(filter=DeviceFilter(ids=[device])), uniq("client"))
    api.wait_final(uid, count=1)
    response = _client_call(herald, "update_push_status",
                            {"analytics_uid": uid, "status": "interacted", "device_id": device}, jwt)
    assert response.status_code == 200, response.text
    assert [r["state"] for r in api.deliveries(uid)] == ["interacted"]

    response = _client_call(herald, "device_remove", {"id": device}, jwt)
    assert response.status_code == 200, response.text
    assert devices(c, ids=[device]) == []
    assert (_removal(api, device) or {}).get("reason") == "client"


def test_client_http_refuses_other_users_devices_anonymous_callers_bad_tokens_and_topics(stack: Stack) -> None:
    c, herald = stack.cent, stack.herald
    alice, bob = uniq("alice"), uniq("bob")
    alice_jwt, bob_jwt = mint_token(herald.hmac_secret, alice), mint_token(herald.hmac_secret, bob)
    token = apns_token(alice)
    device = _client_call(herald, "device_register", {"provider": "apns", "token": token, "platform": "ios"},
                          alice_jwt).json()["id"]

    def refused(method: str, body: Any, jwt: Optional[str], status: int) -> Dict[str, Any]:
        response = _client_call(herald, method, body, jwt)
        assert response.status_code == status, (method, body, response.status_code, response.text)
        return response.json()["error"]

    # Another user's device: 403, and it is untouched.
    refused("device_update", {"id": device, "locale": "xx"}, bob_jwt, 403)
    refused("device_remove", {"id": device}, bob_jwt, 403)
    refused("update_push_status", {"analytics_uid": "x", "status": "delivered", "device_id": device}, bob_jwt, 403)
    refused("device_register", {"id": device, "provider": "apns", "token": token, "platform": "ios"}, bob_jwt, 403)
    refused("device_register", {"provider": "apns", "token": apns_token(bob), "platform": "ios", "user": alice},
            bob_jwt, 403)
    [d] = devices(c, ids=[device])
    assert (d.user, getattr(d, "locale", "") or "") == (alice, "")
    # Topics are the server's to give.
    refused("device_register", {"provider": "fcm", "token": fcm_token(alice), "platform": "android",
                                "topics": ["all-secrets"]}, alice_jwt, 403)
    assert [x.id for x in devices(c, users=[alice])] == [device]
    # No token, a forged one, an expired one: 401. Anonymous: 403.
    body = {"provider": "apns", "token": apns_token(uniq("anon")), "platform": "ios"}
    refused("device_register", body, None, 401)
    refused("device_register", body, mint_token("not-the-secret-" + "x" * 32, alice), 401)
    refused("device_register", body, mint_token(herald.hmac_secret, alice, ttl=-60), 401)
    refused("device_register", body, mint_token(herald.hmac_secret, ""), 403)
    # Bad input and unknown methods.
    assert refused("device_register", {"provider": "pigeon", "token": "x", "platform": "ios"}, alice_jwt, 400)["code"] \
        == BAD_REQUEST
    refused("no_such_method", {}, alice_jwt, 404)
    assert [x.id for x in devices(c, users=[alice])] == [device]
    assert devices(c, users=[bob]) == [], "nothing was registered by the refused calls"
