"""The push methods of the gRPC API (docs/grpc.md, docs/push.md), judged by `grpcio` with stubs
generated from `proto/` at test time: the device registry round trip, topics, and
`SendPushNotification` reaching the APNs and FCM emulators (`herald-pushmock`) exactly once, with
the queue's statuses read back over the HTTP API (one layer under both). Also: with push off,
every push rpc answers error 108 in its `error` field.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from conftest import HeraldInstance
from push_fixtures import Api, PushMock, apns_token, push_config
from test_grpc import compile_stubs

BAD_REQUEST = 107
NOT_AVAILABLE = 108


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Stack:
    def __init__(self, herald: HeraldInstance, mock: PushMock, pb: Any, pb_grpc: Any) -> None:
        self.herald, self.mock, self.pb = herald, mock, pb
        self.channel = grpc.insecure_channel(herald.url.removeprefix("http://"))
        self.api = pb_grpc.CentrifugoApiStub(self.channel)
        self.http = Api(herald)

    def call(self, method: str, request: Any) -> Any:
        reply = getattr(self.api, method)(
            request, metadata=(("authorization", f"apikey {self.herald.api_key}"),), timeout=15
        )
        return reply


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory):
    return compile_stubs(tmp_path_factory.mktemp("stubs"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stubs) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("grpc-push")
    mock = PushMock(root / "pushmock")
    try:
        herald = HeraldInstance(
            root / "herald", extra_config=push_config(mock) + "\n[grpc_api]\nenabled = true\n"
        )
        herald.start()
        stack = Stack(herald, mock, *stubs)
        try:
            yield stack
        except BaseException:
            herald.kill()
            raise
        stack.channel.close()
        herald.stop()
    finally:
        mock.stop()


def test_device_registry_round_trip(stack: Stack) -> None:
    pb = stack.pb
    user, token = uniq("grpc-user"), apns_token(uniq("grpc"))
    registered = stack.call(
        "DeviceRegister",
        pb.DeviceRegisterRequest(
            provider="apns", token=token, platform="ios", user=user, timezone="Europe/Berlin",
            locale="de-DE", meta={"model": "x"}, topics=["b", "a"],
        ),
    )
    assert not registered.HasField("error"), registered.error
    device_id = registered.result.id
    listed = stack.call(
        "DeviceList",
        pb.DeviceListRequest(
            filter=pb.DeviceFilter(ids=[device_id]), include_meta=True, include_topics=True,
            include_total_count=True, limit=10,
        ),
    )
    [device] = listed.result.items
    assert (device.id, device.provider, device.platform, device.token, device.user) == (
        device_id, "apns", "ios", token, user)
    assert (device.timezone, device.locale, dict(device.meta), list(device.topics)) == (
        "Europe/Berlin", "de-DE", {"model": "x"}, ["a", "b"])
    assert device.created_at > 0 and listed.result.total_count == 1
    # The same device over HTTP.
    [over_http] = stack.http.call("device_list", {"filter": {"ids": [device_id]}})["items"]
    assert over_http["token"] == token and over_http["created_at"] == device.created_at

    updated = stack.call(
        "DeviceUpdate",
        pb.DeviceUpdateRequest(
            ids=[device_id], locale_update=pb.DeviceLocaleUpdate(locale="fr-FR"),
            topics_update=pb.DeviceTopicsUpdate(op="add", topics=["c"]),
        ),
    )
    assert updated.HasField("result") and not updated.HasField("error")
    topics = stack.call(
        "DeviceTopicList",
        pb.DeviceTopicListRequest(filter=pb.DeviceTopicFilter(device_ids=[device_id]), include_device=True, limit=10),
    )
    assert sorted(t.topic for t in topics.result.items) == ["a", "b", "c"]
    assert {t.device.locale for t in topics.result.items} == {"fr-FR"}
    assert stack.call(
        "DeviceTopicUpdate", pb.DeviceTopicUpdateRequest(device_id=device_id, op="set", topics=["z"])
    ).HasField("result")
    assert stack.call(
        "UserTopicUpdate", pb.UserTopicUpdateRequest(user=user, op="add", topics=["news"])
    ).HasField("result")
    user_topics = stack.call("UserTopicList", pb.UserTopicListRequest(filter=pb.UserTopicFilter(users=[user])))
    assert [(t.user, t.topic) for t in user_topics.result.items] == [(user, "news")]

    bad = stack.call("DeviceRegister", pb.DeviceRegisterRequest(provider="pigeon", token="t", platform="ios"))
    assert bad.error.code == BAD_REQUEST and not bad.HasField("result")
    code = None
    try:
        stack.call("DeviceList", pb.DeviceListRequest(limit=-1))
    except grpc.RpcError as error:
        code = error.code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    removed = stack.call("DeviceRemove", pb.DeviceRemoveRequest(ids=[device_id]))
    assert removed.HasField("result")
    assert list(stack.call("DeviceList", pb.DeviceListRequest(filter=pb.DeviceFilter(ids=[device_id]))).result.items) == []


def test_send_push_notification_reaches_apns_and_fcm_once(stack: Stack) -> None:
    pb = stack.pb
    marker = uniq("grpc-send")
    apns_tokens = [apns_token(f"{marker}-1"), apns_token(f"{marker}-2")]
    fcm_tokens = [f"fcm-{marker}"]
    notification = pb.PushNotification(
        apns=pb.ApnsPushNotification(
            headers={"apns-priority": "10"},
            payload=json.dumps({"aps": {"alert": {"body": marker}}, "marker": marker}).encode(),
        ),
        fcm=pb.FcmPushNotification(
            message=json.dumps({"notification": {"body": marker}, "data": {"marker": marker}}).encode()
        ),
    )
    sent = stack.call(
        "SendPushNotification",
        pb.SendPushNotificationRequest(
            recipient=pb.PushRecipient(apns_tokens=apns_tokens), notification=notification, uid=marker
        ),
    )
    assert not sent.HasField("error"), sent.error
    assert sent.result.uid == marker
    to_fcm = stack.call(
        "SendPushNotification",
        pb.SendPushNotificationRequest(recipient=pb.PushRecipient(fcm_tokens=fcm_tokens), notification=notification),
    )
    assert to_fcm.result.uid and to_fcm.result.uid != marker, "a uid is generated when none is given"
    rows = stack.http.wait_final(marker, count=2) + stack.http.wait_final(to_fcm.result.uid, count=1)
    assert {r["state"] for r in rows} == {"sent"}
    apns = [r["token"] for r in stack.mock.apns_records() if r["payload"].get("marker") == marker]
    fcm = [r["message"]["token"] for r in stack.mock.fcm_records() if (r["message"].get("data") or {}).get("marker") == marker]
    assert sorted(apns) == sorted(apns_tokens) and fcm == fcm_tokens
    # The same uid again sends nothing twice.
    again = stack.call(
        "SendPushNotification",
        pb.SendPushNotificationRequest(recipient=pb.PushRecipient(apns_tokens=apns_tokens), notification=notification, uid=marker),
    )
    assert again.result.uid == marker
    assert len([r for r in stack.mock.apns_records() if r["payload"].get("marker") == marker]) == 2

    # Scheduled, then cancelled: never sent.
    later = uniq("grpc-later")
    scheduled = stack.call(
        "SendPushNotification",
        pb.SendPushNotificationRequest(
            recipient=pb.PushRecipient(apns_tokens=[apns_token(later)]), notification=notification,
            uid=later, send_at=4_000_000_000,
        ),
    )
    assert scheduled.result.uid == later
    assert stack.call("CancelPush", pb.CancelPushRequest(uid=later)).HasField("result")
    assert [r["state"] for r in stack.http.statuses(uid=later)] == ["cancelled"]

    # Options Herald does not have are refused, not ignored.
    for unsupported in (dict(use_templating=True), dict(localizations={"de": pb.PushLocalization(translations={"a": "b"})})):
        refused = stack.call(
            "SendPushNotification",
            pb.SendPushNotificationRequest(
                recipient=pb.PushRecipient(apns_tokens=apns_tokens), notification=notification, **unsupported
            ),
        )
        assert refused.error.code == BAD_REQUEST, unsupported
    code = None
    try:
        stack.call(
            "SendPushNotification",
            pb.SendPushNotificationRequest(
                recipient=pb.PushRecipient(fcm_tokens=fcm_tokens),
                notification=pb.PushNotification(fcm=pb.FcmPushNotification(message=b"{oops")),
            ),
        )
    except grpc.RpcError as error:
        code = error.code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_send_to_a_device_filter_then_update_push_status(stack: Stack) -> None:
    pb, user = stack.pb, uniq("grpc-report")
    device = stack.call(
        "DeviceRegister", pb.DeviceRegisterRequest(provider="fcm", token=f"fcm-{user}", platform="android", user=user)
    ).result.id
    analytics_uid = uniq("grpc-analytics")
    sent = stack.call(
        "SendPushNotification",
        pb.SendPushNotificationRequest(
            recipient=pb.PushRecipient(filter=pb.DeviceFilter(users=[user])),
            notification=pb.PushNotification(
                fcm=pb.FcmPushNotification(message=json.dumps({"data": {"marker": analytics_uid}}).encode())
            ),
            analytics_uid=analytics_uid,
        ),
    )
    assert sent.result.uid == analytics_uid
    [row] = stack.http.wait_final(analytics_uid, count=1)
    assert row["state"] == "sent" and row["recipient"] == device
    reported = stack.call(
        "UpdatePushStatus",
        pb.UpdatePushStatusRequest(analytics_uid=analytics_uid, status="delivered", device_id=device, msg_id="m/1"),
    )
    assert reported.HasField("result") and not reported.HasField("error")
    assert [r["state"] for r in stack.http.deliveries(analytics_uid)] == ["delivered"]
    wrong = stack.call(
        "UpdatePushStatus", pb.UpdatePushStatusRequest(analytics_uid=analytics_uid, status="opened", device_id=device)
    )
    assert wrong.error.code == BAD_REQUEST


def test_push_rpcs_answer_108_when_push_is_off(tmp_path: Path, stubs) -> None:
    pb, pb_grpc = stubs
    herald = HeraldInstance(tmp_path / "herald", extra_config="\n[grpc_api]\nenabled = true\n")
    herald.start()
    try:
        with grpc.insecure_channel(herald.url.removeprefix("http://")) as channel:
            api = pb_grpc.CentrifugoApiStub(channel)
            metadata = (("authorization", f"apikey {herald.api_key}"),)
            for method, request in [
                ("DeviceRegister", pb.DeviceRegisterRequest()),
                ("DeviceList", pb.DeviceListRequest(limit=-1)),
                ("SendPushNotification", pb.SendPushNotificationRequest()),
                ("CancelPush", pb.CancelPushRequest()),
            ]:
                reply = getattr(api, method)(request, metadata=metadata, timeout=10)
                assert reply.error.code == NOT_AVAILABLE and not reply.HasField("result"), (method, reply)
    finally:
        herald.stop()
