"""Real processes for the push tests (test_push.py): the APNs/FCM emulators (`herald-pushmock`),
a Web Push service (`web-push-testing`, npm), an SMTP server (`aiosmtpd`, in-process, see
smtp_sink.py), and the `[push]` config that points a `herald serve` at them.

Every tool that is missing fails the test with the command that installs it; nothing is
skipped:

- herald-pushmock: `scripts/test build` (or `cargo build -p herald-pushmock --bin
  herald-pushmock`), or `$HERALD_PUSHMOCK_BIN`;
- web-push-testing: `scripts/install-test-tools` (the same pinned copy herald-outbound's Rust
  tests use, in crates/herald-outbound/tests/tools/node_modules), run by `scripts/test python`;
  Node.js from `PATH` (or `$HERALD_TEST_NODE`);
- aiosmtpd: tests/interop/requirements.txt (the interop venv).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import requests

from conftest import REPO, HeraldInstance, pushmock_bin, server_env

APNS_KEY_ID = "KEYID12345"
APNS_TEAM_ID = "TEAMID1234"
APNS_TOPIC = "com.example.app"
FCM_PROJECT = "proj-1"

TOOLS = REPO / "crates" / "herald-outbound" / "tests" / "tools"
WEB_PUSH_TESTING = TOOLS / "node_modules" / "web-push-testing" / "src" / "bin" / "server.js"
INSTALL_TOOLS = "scripts/install-test-tools"


# ---------------------------------------------------------------------------------------------
# Small helpers


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05,
             details: Optional[Callable[[], str]] = None) -> Any:
    """Polls `predicate` until it returns something truthy (returned) or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def mint_token(secret: str, sub: str, ttl: int = 3600) -> str:
    """An HS256 connection JWT (sub, exp), signed with the server's test HMAC secret."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": sub, "exp": int(time.time()) + ttl}
    unsigned = f"{header}.{_b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret.encode(), unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{_b64url(signature)}"


class _LineReader:
    """Drains a process's stdout in a thread (so it never blocks) and hands lines out."""

    def __init__(self, stream) -> None:
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.seen: List[str] = []

        def pump() -> None:
            for line in stream:
                self.seen.append(line.rstrip("\n"))
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> Optional[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                return None
            if line is None:
                return None
            if predicate(line):
                return line


def _stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# herald-pushmock


class PushMock:
    """One `herald-pushmock` process: APNs and FCM (with its OAuth endpoint) emulators and the
    control API, with an APNs key and an FCM service account generated at start."""

    def __init__(self, root: Path) -> None:
        binary = pushmock_bin()
        if not binary.is_file():
            raise RuntimeError(
                f"herald-pushmock not found at {binary}: build it with `scripts/test build` (or "
                "`cargo build -p herald-pushmock --bin herald-pushmock`), or set HERALD_PUSHMOCK_BIN"
            )
        root.mkdir(parents=True, exist_ok=True)
        self.keys_dir = root / "keys"
        self.keys_dir.mkdir(exist_ok=True)
        self.log_path = root / "pushmock.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                str(binary),
                "--generate-apns", f"{APNS_KEY_ID}:{APNS_TEAM_ID}:{APNS_TOPIC}",
                "--generate-fcm", FCM_PROJECT,
                "--out-dir", str(self.keys_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=server_env(),
            text=True,
            bufsize=1,
        )
        reader = _LineReader(self.proc.stdout)
        line = reader.wait_for(lambda l: l.startswith("{"), timeout=20)
        if line is None:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"herald-pushmock printed no JSON line within 20s{self.diagnostics()}")
        info = json.loads(line)
        self.apns_url: str = info["apns"]
        self.fcm_url: str = info["fcm"]
        self.control_url: str = info["control"].rstrip("/")
        self.apns_key: Dict[str, Any] = info["apns_keys"][0]
        self.fcm_account: Dict[str, Any] = info["fcm_accounts"][0]
        assert self.apns_key["key_file"], info
        assert self.fcm_account["credentials_file"], info
        self.http = requests.Session()

    def diagnostics(self) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        return f"\n--- herald-pushmock stderr ---\n{text[-4000:]}"

    def control(self, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        if body is None and path.split("/")[-1] in ("records", "stats", "health"):
            response = self.http.get(f"{self.control_url}{path}", timeout=10)
        else:
            response = self.http.post(f"{self.control_url}{path}", json=body or {}, timeout=10)
        assert response.status_code == 200, f"pushmock {path}: {response.status_code} {response.text}"
        return response.json()

    # Observation
    def apns_records(self, token: Optional[str] = None) -> List[Dict[str, Any]]:
        records = self.control("/apns/records")["records"]
        return [r for r in records if token is None or r["token"] == token]

    def fcm_records(self) -> List[Dict[str, Any]]:
        return self.control("/fcm/records")["records"]

    def fcm_records_to(self, token: str) -> List[Dict[str, Any]]:
        return [r for r in self.fcm_records() if r["message"].get("token") == token]

    def apns_stats(self) -> Dict[str, Any]:
        return self.control("/apns/stats")

    def fcm_stats(self) -> Dict[str, Any]:
        return self.control("/fcm/stats")

    def stop(self) -> None:
        _stop_process(self.proc)
        self._log.close()


def apns_token(seed: str) -> str:
    """A well-formed APNs device token (64 hex digits) derived from `seed`."""
    return hashlib.sha256(seed.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# web-push-testing


def node_binary() -> str:
    node = os.environ.get("HERALD_TEST_NODE") or shutil.which("node")
    if not node:
        raise RuntimeError("Node.js (>= 20) is not on PATH; web-push-testing and the VAPID key need it")
    return node


def generate_vapid_keys() -> Dict[str, str]:
    """A P-256 key pair, made by Node's crypto: `private` is the base64url raw scalar herald's
    `vapid_private_key` takes, `public` the base64url uncompressed point (a subscription's
    `applicationServerKey`)."""
    script = (
        "const c=require('crypto');"
        "const k=c.generateKeyPairSync('ec',{namedCurve:'prime256v1'});"
        "const j=k.privateKey.export({format:'jwk'});"
        "const p=Buffer.concat([Buffer.from([4]),Buffer.from(j.x,'base64url'),Buffer.from(j.y,'base64url')]);"
        "console.log(JSON.stringify({private:j.d,public:p.toString('base64url')}));"
    )
    out = subprocess.run([node_binary(), "-e", script], check=True, capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout)


class WebPushTesting:
    """`node web-push-testing/src/bin/server.js PORT`: a Web Push service that decrypts what it
    gets and keeps it per subscription."""

    def __init__(self, root: Path) -> None:
        if not WEB_PUSH_TESTING.is_file():
            raise RuntimeError(
                f"web-push-testing is not installed ({WEB_PUSH_TESTING} is missing). Install it "
                f"with: {INSTALL_TOOLS} (or: cd crates/herald-outbound/tests/tools && npm ci)"
            )
        node = node_binary()
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "web-push-testing.log"
        last = ""
        for _ in range(5):
            port = free_port()
            log = open(self.log_path, "ab")
            proc = subprocess.Popen(
                [node, str(WEB_PUSH_TESTING), str(port)],
                cwd=str(TOOLS),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
            )
            reader = _LineReader(proc.stdout)
            if reader.wait_for(lambda l: "Server running on port" in l, timeout=20):
                self.proc, self._log, self.port = proc, log, port
                self.url = f"http://127.0.0.1:{port}"
                self.http = requests.Session()
                return
            last = "\n".join(reader.seen)
            proc.kill()
            proc.wait()
            log.close()
        raise RuntimeError(f"web-push-testing did not start (5 tries); last stdout:\n{last}")

    def _post(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        response = self.http.post(f"{self.url}{path}", json=body, timeout=10)
        assert response.status_code == 200, f"web-push-testing {path}: {response.status_code} {response.text}"
        return response.json() if response.text and response.text != "OK" else {}

    def subscribe(self, application_server_key: str) -> Dict[str, str]:
        """A new subscription; `token` is the PushSubscription JSON a browser would hand over."""
        data = self._post(
            "/subscribe", {"applicationServerKey": application_server_key, "userVisibleOnly": "true"}
        )["data"]
        token = json.dumps({"endpoint": data["endpoint"], "expirationTime": None, "keys": data["keys"]})
        return {"token": token, "endpoint": data["endpoint"], "client_hash": data["clientHash"]}

    def messages(self, subscription: Dict[str, str]) -> List[str]:
        return self._post("/get-notifications", {"clientHash": subscription["client_hash"]})["data"]["messages"]

    def expire(self, subscription: Dict[str, str]) -> None:
        self._post(f"/expire-subscription/{subscription['client_hash']}", {})

    def stop(self) -> None:
        _stop_process(self.proc)
        self._log.close()


# ---------------------------------------------------------------------------------------------
# herald with [push]


def toml_str(value: str) -> str:
    return json.dumps(value)


def push_config(
    mock: PushMock,
    *,
    webpush_key: Optional[str] = None,
    smtp_port: Optional[int] = None,
    apns_concurrency: int = 64,
    lease: str = "5s",
    max_attempts: int = 10,
) -> str:
    """The `[push]` tables for a herald that sends to these emulators, retrying fast."""
    config = f"""
[push]
enabled = true
poll_interval = "100ms"
max_attempts = {max_attempts}
retry_base = "100ms"
retry_max = "1s"
lease = {toml_str(lease)}
device_inactive_after = "0s"

[push.concurrency]
apns = {apns_concurrency}
fcm = 64
webpush = 8
email = 4
fanout = 4

[[push.apns.apps]]
app = ""
key_file = {toml_str(mock.apns_key["key_file"])}
key_id = {toml_str(APNS_KEY_ID)}
team_id = {toml_str(APNS_TEAM_ID)}
topic = {toml_str(APNS_TOPIC)}
base_url = {toml_str(mock.apns_url)}
request_timeout = "10s"

[[push.fcm.apps]]
app = ""
credentials_file = {toml_str(mock.fcm_account["credentials_file"])}
base_url = {toml_str(mock.fcm_url)}
"""
    if webpush_key is not None:
        config += f"""
[push.webpush]
allow_private_endpoints = true
[[push.webpush.apps]]
app = ""
vapid_private_key = {toml_str(webpush_key)}
subject = "mailto:ops@example.com"
"""
    if smtp_port is not None:
        config += f"""
[push.email]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "Herald <noreply@example.com>"
"""
    return config


class Api:
    """Raw `POST /api/<method>` for what `cent` cannot express (Herald's own methods and
    fields)."""

    def __init__(self, instance: HeraldInstance) -> None:
        self.instance = instance
        self.http = requests.Session()

    def post(self, method: str, body: Any) -> requests.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return self.http.post(
            f"{self.instance.api_url}/{method}",
            data=data,
            headers={"X-API-Key": self.instance.api_key, "Content-Type": "application/json"},
            timeout=15,
        )

    def call(self, method: str, body: Any) -> Dict[str, Any]:
        response = self.post(method, body)
        assert response.status_code == 200, f"{method}: HTTP {response.status_code} {response.text}"
        reply = response.json()
        assert "error" not in reply, f"{method}: {reply}"
        return reply["result"]

    def error(self, method: str, body: Any) -> Dict[str, Any]:
        """The error of a call that must fail (any HTTP status); returns {"status", "code", ...}."""
        response = self.post(method, body)
        reply = response.json()
        assert "error" in reply, f"{method} should fail: HTTP {response.status_code} {reply}"
        return {"status": response.status_code, **reply["error"]}

    def statuses(self, uid: str = "", device_id: str = "", states: Iterable[str] = ()) -> List[Dict[str, Any]]:
        """Every `push_status` row for the filter (all pages)."""
        items: List[Dict[str, Any]] = []
        cursor = ""
        body: Dict[str, Any] = {"limit": 1000}
        if uid:
            body["uid"] = uid
        if device_id:
            body["device_id"] = device_id
        if states:
            body["states"] = list(states)
        while True:
            page = self.call("push_status", {**body, "cursor": cursor})
            items.extend(page["items"])
            cursor = page.get("next_cursor") or ""
            if not cursor:
                return items

    def deliveries(self, uid: str) -> List[Dict[str, Any]]:
        """The per-recipient rows of push `uid` (not its fan-out job nor its batches, which
        stand for deliveries that have rows of their own)."""
        return [s for s in self.statuses(uid=uid)
                if s["kind"] != "push.fanout" and not s["kind"].endswith(".batch")]

    def removals(self) -> List[Dict[str, Any]]:
        items: List[Dict[str, Any]] = []
        cursor = ""
        while True:
            page = self.call("device_removals", {"cursor": cursor, "limit": 1000})
            items.extend(page["items"])
            cursor = page.get("next_cursor") or ""
            if not cursor:
                return items

    def wait_final(self, uid: str, count: int = 1, timeout: float = 15.0,
                   final: Iterable[str] = ("sent", "failed", "expired", "cancelled", "delivered", "interacted"),
                   details: Optional[Callable[[], str]] = None) -> List[Dict[str, Any]]:
        """Waits until push `uid` has `count` deliveries, all in a final state; returns them."""
        final = set(final)

        def done() -> Optional[List[Dict[str, Any]]]:
            rows = self.deliveries(uid)
            if len(rows) >= count and all(r["state"] in final for r in rows):
                return rows
            return None

        return wait_for(
            f"push {uid}: {count} deliveries in a final state",
            done,
            timeout=timeout,
            details=lambda: f"statuses: {self.statuses(uid=uid)}" + (f"\n{details()}" if details else ""),
        )
