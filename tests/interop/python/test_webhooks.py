"""Webhooks judged by the Standard Webhooks reference library (`standardwebhooks` from PyPI):
every delivery a local receiver gets must verify with the endpoint's secret — also while the
secret is rotated (both the old and the new secret verify), and across a kill -9 of Herald in
the middle of a stream of publications (every acknowledged publication's webhook arrives at
least once, with one webhook-id per publication, none lost).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import requests
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from conftest import HeraldInstance

# The Standard Webhooks documentation's example secret.
OLD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"


class Receiver:
    """A local HTTP endpoint that checks every delivery with the given verifiers and records
    (webhook-id, parsed body, which verifiers accepted it). Answers `status` (changeable),
    or 500 for every `fail_every`-th request."""

    def __init__(self, secrets: List[str]) -> None:
        self.verifiers = {secret: Webhook(secret) for secret in secrets}
        self.lock = threading.Lock()
        self.deliveries: List[Tuple[str, dict, Dict[str, bool]]] = []
        self.status = 200
        self.fail_every = 0
        self.delay = 0.0
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                headers = {k: v for k, v in self.headers.items()}
                verdicts = {}
                for secret, verifier in receiver.verifiers.items():
                    try:
                        verifier.verify(body, headers)
                        verdicts[secret] = True
                    except WebhookVerificationError:
                        verdicts[secret] = False
                with receiver.lock:
                    receiver.requests += 1
                    failing = receiver.fail_every and receiver.requests % receiver.fail_every == 0
                    status = 500 if failing else receiver.status
                    if status < 300:
                        receiver.deliveries.append((headers.get("webhook-id", ""), json.loads(body), verdicts))
                if receiver.delay:
                    time.sleep(receiver.delay)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()

    def snapshot(self) -> List[Tuple[str, dict, Dict[str, bool]]]:
        with self.lock:
            return list(self.deliveries)

    def wait_for(self, what: str, predicate, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.snapshot()):
            assert time.monotonic() < deadline, f"timed out waiting for {what} ({self.requests} requests, {len(self.snapshot())} accepted)"
            time.sleep(0.05)


WEBHOOKS_CONFIG = """
[webhooks]
enabled = true
allow_private_addresses = true
retry_schedule = ["100ms", "300ms", "500ms", "1s", "1s", "1s", "1s", "1s"]
timeout = "2s"
lease = "7s"
poll_interval = "100ms"
refresh_interval = "1s"
"""


def start_herald(root: Path, extra: str = "") -> HeraldInstance:
    instance = HeraldInstance(root, WEBHOOKS_CONFIG + extra)
    instance.start()
    return instance


def api(instance: HeraldInstance, method: str, params: dict) -> dict:
    response = requests.post(
        f"{instance.api_url}/{method}", json=params, headers={"X-API-Key": instance.api_key}, timeout=10
    )
    response.raise_for_status()
    body = response.json()
    assert "error" not in body, f"{method}: {body}"
    return body["result"]


@pytest.fixture
def receiver():
    made = Receiver([OLD_SECRET, NEW_SECRET])
    yield made
    made.close()


def test_every_delivery_verifies_with_the_endpoints_secret(tmp_path: Path, receiver: Receiver) -> None:
    herald = start_herald(tmp_path)
    try:
        api(
            herald,
            "webhook_endpoint_create",
            {"id": "orders", "url": receiver.url, "events": ["publication"], "channels": ["orders-*"], "secrets": [OLD_SECRET]},
        )
        for n in range(20):
            api(herald, "publish", {"channel": f"orders-{n % 3}", "data": {"n": n}})
        api(herald, "publish", {"channel": "elsewhere", "data": {}})
        receiver.wait_for("20 deliveries", lambda d: len(d) >= 20)
        deliveries = receiver.snapshot()
        assert len(deliveries) == 20
        for webhook_id, body, verdicts in deliveries:
            assert verdicts[OLD_SECRET], f"{webhook_id} did not verify with the endpoint's secret"
            assert not verdicts[NEW_SECRET], "a secret the endpoint does not have must not verify"
            assert body["type"] == "publication"
            assert body["data"]["channel"].startswith("orders-")
        assert sorted(body["data"]["data"]["n"] for _, body, _ in deliveries) == list(range(20))
    finally:
        herald.stop()


def test_deliveries_verify_with_old_and_new_secret_during_a_rotation(tmp_path: Path, receiver: Receiver) -> None:
    herald = start_herald(tmp_path)
    try:
        api(
            herald,
            "webhook_endpoint_create",
            {"id": "rot", "url": receiver.url, "events": ["publication"], "secrets": [OLD_SECRET]},
        )
        api(herald, "publish", {"channel": "a", "data": {"phase": "old"}})
        receiver.wait_for("the first delivery", lambda d: len(d) == 1)
        # Rotation: the new secret is added; both sign until the old one is removed.
        api(herald, "webhook_endpoint_update", {"id": "rot", "secrets": [NEW_SECRET, OLD_SECRET]})
        for n in range(5):
            api(herald, "publish", {"channel": "a", "data": {"phase": "both", "n": n}})
        receiver.wait_for("the rotation deliveries", lambda d: len(d) == 6)
        api(herald, "webhook_endpoint_update", {"id": "rot", "secrets": [NEW_SECRET]})
        api(herald, "publish", {"channel": "a", "data": {"phase": "new"}})
        receiver.wait_for("the last delivery", lambda d: len(d) == 7)
        for webhook_id, body, verdicts in receiver.snapshot():
            phase = body["data"]["data"]["phase"]
            expected = {
                "old": {OLD_SECRET: True, NEW_SECRET: False},
                "both": {OLD_SECRET: True, NEW_SECRET: True},
                "new": {OLD_SECRET: False, NEW_SECRET: True},
            }[phase]
            assert verdicts == expected, f"{webhook_id} in phase {phase}: {verdicts}"
    finally:
        herald.stop()


def test_kill_9_mid_stream_loses_no_acknowledged_publications_webhook(tmp_path: Path, receiver: Receiver) -> None:
    receiver.fail_every = 7  # some deliveries are retried across the crash
    receiver.delay = 0.005  # a backlog builds, so some are queued when Herald dies
    endpoint = f"""
[[webhooks.endpoints]]
id = "stream"
url = "{receiver.url}"
events = ["publication"]
channels = ["stream-*"]
secrets = ["{OLD_SECRET}"]
"""
    herald = start_herald(tmp_path, endpoint)
    acknowledged: Dict[Tuple[str, int], int] = {}
    stop = threading.Event()
    errors: List[str] = []

    def publish_stream() -> None:
        n = 0
        session = requests.Session()
        while not stop.is_set():
            channel = f"stream-{n % 4}"
            try:
                response = session.post(
                    f"{herald.api_url}/publish",
                    json={"channel": channel, "data": {"n": n}, "idempotency_key": f"k{n}"},
                    headers={"X-API-Key": herald.api_key},
                    timeout=5,
                )
                result = response.json().get("result")
                if response.status_code == 200 and result:
                    acknowledged[(channel, result["offset"])] = n
            except (requests.RequestException, ValueError) as error:
                errors.append(str(error))
                if stop.wait(0.05):
                    return
            n += 1

    publisher = threading.Thread(target=publish_stream, daemon=True)
    publisher.start()
    time.sleep(0.75)
    # From here the receiver refuses: what is acknowledged now is only in Herald's queue.
    receiver.status = 503
    time.sleep(0.75)
    herald.kill()  # SIGKILL mid-stream
    stop.set()
    publisher.join(timeout=10)
    assert acknowledged, f"nothing was acknowledged before the kill: {errors[:3]}"
    before_crash = {(b["data"]["channel"], b["data"]["offset"]) for _, b, _ in receiver.snapshot()}
    pending = set(acknowledged) - before_crash
    assert before_crash and pending, "the stream was cut mid-way: some delivered, some pending"
    receiver.status = 200
    herald.start()
    try:
        def all_arrived(deliveries) -> bool:
            seen = {(b["data"]["channel"], b["data"]["offset"]) for _, b, _ in deliveries}
            return all(key in seen for key in acknowledged)

        receiver.wait_for(f"the webhooks of {len(acknowledged)} acknowledged publications", all_arrived, timeout=60)
        by_id: Dict[str, Tuple[str, int]] = {}
        ids_of: Dict[Tuple[str, int], set] = {}
        for webhook_id, body, verdicts in receiver.snapshot():
            assert verdicts[OLD_SECRET], f"{webhook_id} did not verify"
            key = (body["data"]["channel"], body["data"]["offset"])
            assert by_id.setdefault(webhook_id, key) == key, f"{webhook_id} named two publications"
            ids_of.setdefault(key, set()).add(webhook_id)
            if key in acknowledged:
                assert body["data"]["data"]["n"] == acknowledged[key]
        for key in acknowledged:
            assert len(ids_of[key]) == 1, f"{key} arrived under several webhook-ids: {ids_of[key]}"
    finally:
        herald.stop()
