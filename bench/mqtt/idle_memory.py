#!/usr/bin/env python3
"""Memory per idle, subscribed MQTT connection: Herald beside Mosquitto, in the same run.

Opens N raw MQTT 3.1.1 connections to each broker (CONNECT, then SUBSCRIBE to a topic of
its own at QoS 1), waits for every SUBACK, lets them settle, and reports the broker's
resident memory growth (VmRSS from /proc) divided by N. Herald is started here (`herald
serve` with a temp config, MQTT on port 0); Mosquitto is the one already running on the
machine (127.0.0.1:1883 by default; its pid is found with pgrep).

    bench/mqtt/idle_memory.py --herald target/release/herald --connections 5000

Prints one Markdown table row per broker.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, password: Optional[str]) -> bytes:
    flags = 0x02
    payload = struct.pack("!H", len(client_id)) + client_id.encode()
    if password is not None:
        flags |= 0xC0
        payload += struct.pack("!H", 1) + b"x" + struct.pack("!H", len(password)) + password.encode()
    body = struct.pack("!H", 4) + b"MQTT" + bytes([4, flags]) + struct.pack("!H", 0) + payload
    return bytes([0x10]) + varint(len(body)) + body


def subscribe_packet(topic: str) -> bytes:
    body = struct.pack("!H", 1) + struct.pack("!H", len(topic)) + topic.encode() + b"\x01"
    return bytes([0x82]) + varint(len(body)) + body


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_idle(host: str, port: int, count: int, password: Optional[str], prefix: str) -> List[socket.socket]:
    socks = []
    for i in range(count):
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(connect_packet(f"{prefix}{i}", password) + subscribe_packet(f"bench/{prefix}/{i}"))
        socks.append(sock)
    for sock in socks:
        connack = read_exact(sock, 4)
        assert connack[0] == 0x20 and connack[3] == 0, connack
        suback = read_exact(sock, 5)
        assert suback[0] == 0x90 and suback[4] == 1, suback
    return socks


def measure(name: str, pid: int, host: str, port: int, count: int, password: Optional[str]) -> str:
    before = rss_kib(pid)
    socks = open_idle(host, port, count, password, f"{name}-{os.getpid()}-")
    time.sleep(3)
    after = rss_kib(pid)
    for sock in socks:
        sock.close()
    per = (after - before) * 1024 / count
    return f"| {name} | {count} | {before / 1024:.1f} MiB | {after / 1024:.1f} MiB | **{per:,.0f} B** |"


def herald_token(secret: str) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": "bench", "exp": int(time.time()) + 3600}).encode())
    unsigned = f"{header}.{claims}"
    return f"{unsigned}.{b64(hmac.new(secret.encode(), unsigned.encode(), hashlib.sha256).digest())}"


def start_herald(binary: str, folder: Path) -> Tuple[subprocess.Popen, str, int]:
    secret = secrets.token_hex(24)
    config = folder / "herald.toml"
    config.write_text(f"""
[api]
keys = ["{secrets.token_hex(16)}"]
[token]
hmac_secret = "{secret}"
[storage]
engine = "sqlite"
data_dir = {json.dumps(str(folder / "data"))}
[client]
max_subscriptions = 4
[mqtt]
enabled = true
listen = "127.0.0.1:0"
[[namespaces]]
name = "mqtt"
""")
    proc = subprocess.Popen([binary, "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"mqtt://([\d.]+):(\d+)", line)
        if match:
            return proc, secret, int(match.group(2))
    proc.kill()
    raise RuntimeError("herald printed no mqtt:// address")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--herald", required=True)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--mosquitto", default="127.0.0.1:1883")
    args = parser.parse_args()
    print("| broker | idle subscribed connections | RSS before | RSS after | per connection |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        proc, secret, port = start_herald(args.herald, Path(folder))
        try:
            time.sleep(1)
            print(measure("herald", proc.pid, "127.0.0.1", port, args.connections, herald_token(secret)))
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    pids = subprocess.run(["pgrep", "-x", "mosquitto"], capture_output=True, text=True).stdout.split()
    if pids:
        host, port_text = args.mosquitto.rsplit(":", 1)
        print(measure("mosquitto", int(pids[0]), host, int(port_text), args.connections, None))
    else:
        print("| mosquitto | — | not running | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
