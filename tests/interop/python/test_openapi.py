"""The OpenAPI document is the contract: `schemathesis` (PyPI, pinned) generates requests from
`GET /api/openapi.json` of a real `herald serve` process and checks every answer against the
document — status codes, content types, headers, response bodies, 405s and their `Allow`
header, and no 5xx. When the document and the server disagree, a test fails and prints
schemathesis's report (with a `curl` line reproducing each failure).

Two servers are checked:
- the shared one, with push notifications off: every operation, the push methods included
  (each answers error 108 there, as documented);
- one with `[webhooks] enabled = true` and a seeded endpoint whose delivery failed: the webhook
  methods;
- one with `[push] enabled = true` and no provider credentials (a send to a provider without
  credentials ends `failed`, which is all these checks need): the push methods, `publish` and
  `broadcast` (their `push` section) and `batch`. It is seeded first with devices, topics, a
  push and a removal that match the document's examples, so that listings have items whose
  shape gets checked, and its log must hold no panic afterwards (the workers run out of
  sight of the HTTP answers).

Each run is bounded (`--max-examples` per operation, no stateful phase) so it takes well under a
minute, and seeded so that a failure reproduces (`SCHEMATHESIS_SEED` explores other inputs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytest
import requests

from conftest import HeraldInstance

# Checks that matter for "the document is true": each answer is documented and matches.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    # An HTTP method the document does not list gets 405 with an `Allow` header, and an
    # `OPTIONS` answer's `Allow` lists exactly the documented methods.
    "unsupported_method",
    "allow_header_conformance",
    # A request the document allows is never refused as malformed (HTTP 400): the request
    # schemas promise no more than the decoders take. (API-level errors are HTTP 200, so the
    # reverse, `negative_data_rejection`, cannot be checked.)
    "positive_data_acceptance",
]
# Per operation and phase; the coverage phase adds its boundary cases on top.
MAX_EXAMPLES = os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25")
# Fixed so that a failure reproduces; set SCHEMATHESIS_SEED to explore other inputs.
SEED = os.environ.get("SCHEMATHESIS_SEED", "20261101")
TIMEOUT = 300

PUSH_METHODS = [
    "device_register",
    "device_update",
    "device_remove",
    "device_list",
    "device_topic_list",
    "device_topic_update",
    "user_topic_list",
    "user_topic_update",
    "send_push_notification",
    "cancel_push",
    "update_push_status",
    "push_status",
    "device_removals",
]
PUSH_CONFIG = """
[push]
enabled = true
poll_interval = "100ms"
"""
WAIT = 15.0


def run_schemathesis(
    url: str,
    api_key: str,
    workdir: Path,
    selection: Sequence[str] = (),
    known_bugs: Optional[Dict[str, Sequence[str]]] = None,
) -> str:
    """Runs schemathesis against the server at `url` (operations narrowed by `selection`,
    schemathesis's `--include-*` options) and returns its report; fails the test when it finds
    a disagreement. `known_bugs` maps an operation (`POST /api/<method>`) to checks left out
    for it until a known server bug is fixed."""
    schema_url = f"{url}/api/openapi.json"
    document = requests.get(schema_url, timeout=10)
    assert document.status_code == 200
    assert document.headers["content-type"] == "application/json"
    # The checks go in a config file (not `--checks`, which would override per-operation ones).
    config = ["[checks]", "enabled = false", *(f"{check}.enabled = true" for check in CHECKS)]
    for operation, checks in (known_bugs or {}).items():
        config += ["", "[[operations]]", f'include-name = "{operation}"']
        config += [f"checks.{check}.enabled = false" for check in checks]
    config_file = workdir / "schemathesis.toml"
    config_file.write_text("\n".join(config) + "\n", encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config_file),
        "run",
        schema_url,
        "--url",
        url,
        "--header",
        f"X-API-Key: {api_key}",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        SEED,
        # One worker: with several, Python 3.11's `ast` (which Hypothesis uses to describe
        # strategies) sometimes fails with "AST constructor recursion depth mismatch".
        "--workers",
        "1",
        # No example database: every run starts from the seed alone.
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(workdir / "schemathesis-report"),
        *selection,
    ]
    result = subprocess.run(
        command,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    report = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, (
        f"schemathesis found the server and docs/openapi.json disagreeing (exit {result.returncode}):\n"
        f"{report[-20000:]}"
    )
    # Guard against a run that tested nothing (e.g. a document it could not load).
    assert "passed" in report, report[-5000:]
    return report


def test_server_answers_as_its_openapi_document_says(herald, tmp_path) -> None:
    document = requests.get(f"{herald.url}/api/openapi.json", timeout=10).json()
    tagged = sorted(
        path for path, item in document["paths"].items() if any("Push" in op.get("tags", []) for op in item.values())
    )
    assert tagged == sorted(f"/api/{method}" for method in PUSH_METHODS)
    webhooks = sorted(
        path for path, item in document["paths"].items() if any("Webhooks" in op.get("tags", []) for op in item.values())
    )
    assert webhooks == sorted(f"/api/{method}" for method in WEBHOOK_METHODS)
    # Push is off on the shared server: every push method, and a `push` section, is documented
    # to answer 108.
    publish = requests.post(
        f"{herald.api_url}/publish",
        json={"channel": "news", "data": 1, "push": {"users": ["42"]}},
        headers={"X-API-Key": herald.api_key},
        timeout=10,
    )
    assert publish.status_code == 200 and publish.json()["error"]["code"] == 108, publish.text
    for method in PUSH_METHODS:
        answer = requests.post(
            f"{herald.api_url}/{method}",
            json={},
            headers={"X-API-Key": herald.api_key},
            timeout=10,
        )
        assert answer.status_code == 200, (method, answer.text)
        assert answer.json()["error"]["code"] == 108, (method, answer.text)
    for method in WEBHOOK_METHODS:
        answer = requests.post(f"{herald.api_url}/{method}", json={}, headers={"X-API-Key": herald.api_key}, timeout=10)
        assert answer.status_code == 200 and answer.json()["error"]["code"] == 108, (method, answer.text)
    # Their answer here is that one error (checked just above); the push and webhook servers
    # below run schemathesis on them with the feature on, where their real code answers.
    off = "|".join(PUSH_METHODS + WEBHOOK_METHODS)
    try:
        run_schemathesis(herald.url, herald.api_key, tmp_path, selection=["--exclude-path-regex", f"^/api/({off})$"])
    except AssertionError as failure:
        raise AssertionError(f"{failure}{herald.process.diagnostics() if herald.process else ''}") from None


class Api:
    def __init__(self, instance: HeraldInstance) -> None:
        self.url = instance.api_url
        self.headers = {"X-API-Key": instance.api_key}

    def __call__(self, method: str, params: Dict[str, Any]) -> Any:
        answer = requests.post(f"{self.url}/{method}", json=params, headers=self.headers, timeout=10)
        assert answer.status_code == 200, (method, params, answer.status_code, answer.text)
        body = answer.json()
        assert "result" in body, (method, params, body)
        return body["result"]


def seed(api: Api) -> None:
    """Devices, topics, a push and a removal, named as in the document's examples (user `42`,
    push `mail-1001`), so that the examples phase reads real items."""
    fcm = api(
        "device_register",
        {
            "provider": "fcm",
            "token": "fcm-registration-token",
            "platform": "android",
            "user": "42",
            "timezone": "Europe/Berlin",
            "locale": "de-DE",
            "meta": {"model": "Pixel 8"},
            "topics": ["news"],
        },
    )["id"]
    apns = api("device_register", {"provider": "apns", "token": "ab" * 32, "platform": "ios", "user": "42"})["id"]
    api("device_register", {"provider": "email", "token": "alice@example.com", "platform": "other", "user": "42"})
    api(
        "device_register",
        {
            "provider": "webpush",
            "token": '{"endpoint":"https://push.example.com/1","keys":{"p256dh":"x","auth":"y"}}',
            "platform": "web",
            "user": "alice",
            "app": "site",
        },
    )
    # Re-registering a token keeps the device's id.
    again = api("device_register", {"provider": "fcm", "token": "fcm-registration-token", "platform": "android", "user": "42"})
    assert again["id"] == fcm
    api("user_topic_update", {"user": "42", "op": "set", "topics": ["news", "sport"]})
    api("device_topic_update", {"device_id": apns, "op": "add", "topics": ["alerts"]})
    gone = api("device_register", {"provider": "fcm", "token": "to-be-removed", "platform": "android", "user": "bob"})["id"]
    api("device_remove", {"ids": [gone]})

    sent = api(
        "send_push_notification",
        {
            "recipient": {"filter": {"users": ["42"]}},
            "notification": {
                "fcm": {"message": {"notification": {"title": "Hi", "body": "You have mail"}}},
                "apns": {"headers": {"apns-push-type": "alert"}, "payload": {"aps": {"alert": "Hi"}}},
                "email": {"subject": "Hi", "text": "You have mail"},
            },
            "uid": "mail-1001",
        },
    )
    assert sent == {"uid": "mail-1001"}
    later = api(
        "send_push_notification",
        {
            "recipient": {"fcm_tokens": ["raw-1", "raw-2"]},
            "notification": {"fcm": {"message": {"data": {"k": "v"}}}},
            "send_at": int(time.time()) + 3600,
        },
    )
    api("cancel_push", {"uid": later["uid"]})
    # No provider has credentials: every delivery of mail-1001 ends `failed`.
    deadline = time.monotonic() + WAIT
    while True:
        items: List[Dict[str, Any]] = api("push_status", {"uid": "mail-1001"})["items"]
        deliveries = [i for i in items if i["kind"] != "push.fanout" and not i["kind"].endswith(".batch")]
        if deliveries and all(i["state"] not in ("queued", "sending") for i in items):
            break
        assert time.monotonic() < deadline, f"mail-1001 did not settle: {items}"
        time.sleep(0.2)
    assert {i["kind"] for i in deliveries} == {"push.fcm", "push.apns"}, deliveries
    assert {i["state"] for i in deliveries} == {"failed"}, deliveries

    listed = api("device_list", {"filter": {"users": ["42"]}, "include_meta": True, "include_topics": True, "include_total_count": True})
    assert listed["total_count"] == 3, listed
    removals = api("device_removals", {})["items"]
    assert [(r["device"]["id"], r["reason"]) for r in removals] == [(gone, "api")], removals


def running(tmp_path_factory: pytest.TempPathFactory, name: str, extra_config: str) -> Iterator[HeraldInstance]:
    """A server with `extra_config`, stopped gracefully after the test (killed if it failed)."""
    instance = HeraldInstance(tmp_path_factory.mktemp(name), extra_config=extra_config)
    instance.start()
    try:
        yield instance
    except BaseException:
        instance.kill()
        raise
    instance.stop()


@pytest.fixture
def push_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldInstance]:
    yield from running(tmp_path_factory, "herald-push", PUSH_CONFIG)


def test_push_methods_answer_as_documented(push_server, tmp_path) -> None:
    seed(Api(push_server))
    try:
        report = run_schemathesis(
            push_server.url,
            push_server.api_key,
            tmp_path,
            selection=["--include-path-regex", f"^/api/({'|'.join(PUSH_METHODS + ['publish', 'broadcast', 'batch'])})$"],
        )
    except AssertionError as failure:
        raise AssertionError(f"{failure}{push_server.process.diagnostics() if push_server.process else ''}") from None
    # Every selected operation ran (a stale selection would quietly test less).
    assert re.search(rf"Tested: +{len(PUSH_METHODS) + 3}\b", report), report[-5000:]
    log = push_server.process.log_path.read_text(encoding="utf-8", errors="replace") if push_server.process else ""
    assert "panicked" not in log, push_server.process.diagnostics() if push_server.process else log


WEBHOOK_METHODS = [
    "webhook_endpoint_create",
    "webhook_endpoint_update",
    "webhook_endpoint_delete",
    "webhook_endpoint_list",
    "webhook_deliveries",
    "webhook_attempts",
    "webhook_replay",
]
WEBHOOK_CONFIG = """
[webhooks]
enabled = true
allow_private_addresses = true
retry_schedule = ["50ms"]
poll_interval = "100ms"
"""


@pytest.fixture
def webhook_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldInstance]:
    yield from running(tmp_path_factory, "herald-webhooks", WEBHOOK_CONFIG)


def test_webhook_methods_answer_as_documented(webhook_server, tmp_path) -> None:
    api = Api(webhook_server)
    # An endpoint nothing listens on: its delivery fails for good, so every listing has items.
    created = api(
        "webhook_endpoint_create",
        {"id": "orders", "url": "http://127.0.0.1:9/hook", "events": ["publication"], "channels": ["orders-*"]},
    )
    assert created["endpoint"]["secrets"][0].startswith("whsec_")
    api("publish", {"channel": "orders-1", "data": {"status": "paid"}})
    deadline = time.monotonic() + WAIT
    while not api("webhook_deliveries", {"endpoint": "orders", "states": ["failed"]})["items"]:
        assert time.monotonic() < deadline, "the delivery did not fail"
        time.sleep(0.2)
    try:
        report = run_schemathesis(
            webhook_server.url,
            webhook_server.api_key,
            tmp_path,
            selection=["--include-path-regex", f"^/api/({'|'.join(WEBHOOK_METHODS)})$"],
        )
    except AssertionError as failure:
        diagnostics = webhook_server.process.diagnostics() if webhook_server.process else ""
        raise AssertionError(f"{failure}{diagnostics}") from None
    assert re.search(rf"Tested: +{len(WEBHOOK_METHODS)}\b", report), report[-5000:]
    log = webhook_server.process.log_path.read_text(encoding="utf-8", errors="replace") if webhook_server.process else ""
    assert "panicked" not in log, webhook_server.process.diagnostics() if webhook_server.process else log
