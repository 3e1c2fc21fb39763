"""Fixtures that run a real `herald serve` process for the interop tests.

The binary is `$HERALD_BIN`, or `<repo>/target/debug/herald` (`$CARGO_TARGET_DIR/debug/herald`
when that is set); the push tests' APNs/FCM emulator is `$HERALD_PUSHMOCK_BIN`, or
`<target>/debug/herald-pushmock`. Each server gets its own temp config with a random API key,
SQLite storage in a temp data dir, and `--listen 127.0.0.1:0`; the URL is read from the first
stdout line (`Herald <version> listening on http://127.0.0.1:PORT`). Stopping sends SIGTERM and
requires a graceful exit (code 0) within 10 seconds.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import signal
import string
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 10.0
LISTENING = re.compile(r"listening on (http://\S+)")


def target_dir() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    if not target.is_absolute():
        target = REPO / target
    return target


def herald_bin() -> Path:
    explicit = os.environ.get("HERALD_BIN")
    if explicit:
        return Path(explicit)
    return target_dir() / "debug" / "herald"


def pushmock_bin() -> Path:
    """The APNs/FCM emulator the push tests send to: `$HERALD_PUSHMOCK_BIN`, or
    `<target>/debug/herald-pushmock` (built by `scripts/test build`)."""
    explicit = os.environ.get("HERALD_PUSHMOCK_BIN")
    if explicit:
        return Path(explicit)
    return target_dir() / "debug" / "herald-pushmock"


def server_env() -> dict:
    """The test environment minus HERALD_* variables: herald reads every HERALD_* variable as a
    config key and refuses unknown ones (HERALD_BIN would stop it from starting), and the
    config file alone should decide how the server under test runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env["NO_COLOR"] = "1"  # plain-text logs in the captured stderr
    return env


def random_token(length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def write_config(path: Path, api_key: str, data_dir: Path, hmac_secret: str = "", extra: str = "") -> None:
    """The base test config; `extra` (TOML, e.g. a `[client]` table or more namespaces) is
    appended."""
    path.write_text(
        f"""\
[api]
keys = ["{api_key}"]

[token]
hmac_secret = "{hmac_secret or random_token(48)}"

[storage]
engine = "sqlite"
data_dir = {json.dumps(str(data_dir))}

[log]
level = "info"

# Default namespace: history on.
[namespace]
history_size = 1000
history_ttl = "1h"

# A namespace with presence.
[[namespaces]]
name = "room"
presence = true
history_size = 100
history_ttl = "1h"
{extra}""",
        encoding="utf-8",
    )


class HeraldProcess:
    """One running `herald serve`."""

    def __init__(self, config: Path, log_path: Path) -> None:
        binary = herald_bin()
        if not binary.is_file():
            raise RuntimeError(
                f"herald binary not found at {binary}: run `cargo build -p herald-server --bin herald` "
                "or set HERALD_BIN"
            )
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=str(config.parent),
            env=server_env(),
            text=True,
            bufsize=1,
        )
        self.stdout_lines: List[str] = []
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_for_url()
        self.api_url = f"{self.url}/api"

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"herald did not print its URL within {STARTUP_TIMEOUT}s{self.diagnostics()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                raise RuntimeError(f"herald exited with {code} before listening{self.diagnostics()}")
            match = LISTENING.search(line)
            if match:
                return match.group(1).rstrip("/")

    def diagnostics(self) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            stderr = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            stderr = ""
        stdout = "\n".join(self.stdout_lines)
        return f"\n--- herald stdout ---\n{stdout}\n--- herald stderr ({self.log_path}) ---\n{stderr[-8000:]}"

    def stop(self) -> int:
        """SIGTERM, then require exit code 0 within SHUTDOWN_TIMEOUT seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                raise AssertionError(
                    f"herald did not exit within {SHUTDOWN_TIMEOUT}s of SIGTERM{self.diagnostics()}"
                )
        code = self.proc.returncode
        self._log.close()
        assert code == 0, f"herald exited with {code} after SIGTERM, expected 0{self.diagnostics()}"
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()


class HeraldInstance:
    """A config + data dir that can be started, stopped and started again."""

    def __init__(self, root: Path, extra_config: str = "") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.api_key = random_token(32)
        self.hmac_secret = random_token(48)
        self.data_dir = root / "data"
        self.config = root / "herald.toml"
        write_config(self.config, self.api_key, self.data_dir, self.hmac_secret, extra_config)
        self.process: Optional[HeraldProcess] = None
        self.starts = 0

    def start(self) -> HeraldProcess:
        assert self.process is None or self.process.proc.poll() is not None, "already running"
        self.starts += 1
        self.process = HeraldProcess(self.config, self.root / f"herald-{self.starts}.log")
        return self.process

    @property
    def api_url(self) -> str:
        assert self.process is not None, "not started"
        return self.process.api_url

    @property
    def url(self) -> str:
        assert self.process is not None, "not started"
        return self.process.url

    def stop(self) -> int:
        assert self.process is not None, "not started"
        return self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


@pytest.fixture
def herald_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], HeraldInstance]]:
    """Makes fresh instances (own config and data dir); kills leftovers at teardown."""
    made: List[HeraldInstance] = []

    def make() -> HeraldInstance:
        instance = HeraldInstance(tmp_path_factory.mktemp("herald"))
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.kill()


@pytest.fixture(scope="module")
def herald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldInstance]:
    """One running server shared by a module; its graceful shutdown is asserted at teardown."""
    instance = HeraldInstance(tmp_path_factory.mktemp("herald"))
    instance.start()
    try:
        yield instance
    except BaseException:
        instance.kill()
        raise
    instance.stop()
