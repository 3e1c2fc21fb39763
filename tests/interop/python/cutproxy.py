"""An asyncio TCP proxy in front of Herald that a test can cut.

The SDK under test connects through it; `cut()` aborts every proxied connection at the TCP
level (no WebSocket close frame: the client sees an abnormal closure, 1006, as on a dropped
network), out of the SDK's control. With `cut(hold=True)` new connections are accepted but not
forwarded until `resume()`, so the test decides when the SDK's reconnect goes through.

It also decodes the RFC 6455 frames in both directions (text payloads and close frames) so a
failing assertion can print the wire (`wire()`).
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Set, Tuple


@dataclass
class Frame:
    conn: int
    direction: str  # "C>S", "S>C" or "--"
    ms: int
    kind: str  # "http", "text", "binary" (text is hex), "close", "cut"
    text: str
    code: Optional[int] = None
    headers: str = ""  # the whole HTTP head, for "http" frames


class _FrameDecoder:
    def __init__(self, on_frame: Callable[[str, bytes], None]) -> None:
        self.on_frame = on_frame
        self.buffer = b""
        self.upgraded = False

    def push(self, chunk: bytes) -> None:
        self.buffer += chunk
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.on_frame("http", self.buffer[:end])
            self.buffer = self.buffer[end + 4 :]
            self.upgraded = True
        while True:
            b = self.buffer
            if len(b) < 2:
                return
            opcode = b[0] & 0x0F
            masked = bool(b[1] & 0x80)
            length = b[1] & 0x7F
            at = 2
            if length == 126:
                if len(b) < 4:
                    return
                (length,) = struct.unpack(">H", b[2:4])
                at = 4
            elif length == 127:
                if len(b) < 10:
                    return
                (length,) = struct.unpack(">Q", b[2:10])
                at = 10
            mask = b[at : at + 4] if masked else b""
            if masked:
                at += 4
            if len(b) < at + length:
                return
            payload = b[at : at + length]
            if masked:
                payload = bytes(x ^ mask[i % 4] for i, x in enumerate(payload))
            self.buffer = b[at + length :]
            self.on_frame(str(opcode), payload)


class CutProxy:
    def __init__(self, target_url: str) -> None:
        host_port = target_url.split("://", 1)[1].rstrip("/")
        host, port = host_port.rsplit(":", 1)
        self._target = (host, int(port))
        self._server: Optional[asyncio.base_events.Server] = None
        self._pairs: Set[Tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: Set[asyncio.Task] = set()
        self._resume = asyncio.Event()
        self._resume.set()
        self.frames: List[Frame] = []
        self.connections = 0
        self.held = 0
        self._closing = False
        self._started = time.monotonic()
        self.ws_url = ""

    async def start(self) -> "CutProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.ws_url = f"ws://127.0.0.1:{port}/connection/websocket"
        return self

    def _ms(self) -> int:
        return int((time.monotonic() - self._started) * 1000)

    def _recorder(self, conn: int, direction: str) -> Callable[[bytes], None]:
        def on_frame(opcode: str, payload: bytes) -> None:
            if opcode == "http":
                head = payload.decode("latin-1")
                first = head.split("\r\n", 1)[0]
                self.frames.append(Frame(conn, direction, self._ms(), "http", first, headers=head))
            elif opcode in ("0", "1"):
                self.frames.append(Frame(conn, direction, self._ms(), "text", payload.decode("utf-8", "replace")))
            elif opcode == "2":
                self.frames.append(Frame(conn, direction, self._ms(), "binary", payload.hex()))
            elif opcode == "8":
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                self.frames.append(
                    Frame(conn, direction, self._ms(), "close", payload[2:].decode("utf-8", "replace"), code)
                )

        decoder = _FrameDecoder(on_frame)

        def push(chunk: bytes) -> None:
            try:
                decoder.push(chunk)
            except Exception as err:  # a decoding problem must not break the proxying
                self.frames.append(Frame(conn, direction, self._ms(), "decode-error", repr(err)))

        return push

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._resume.is_set():
            self.held += 1
            await self._resume.wait()
            self.held -= 1
        if self._closing:
            writer.transport.abort()
            return
        self.connections += 1
        conn = self.connections
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: Callable[[bytes], None]) -> None:
            try:
                while True:
                    chunk = await src.read(65536)
                    if not chunk:
                        break
                    record(chunk)
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                self._pairs.discard(pair)
                writer.transport.abort()
                up_writer.transport.abort()

        for coro in (
            pump(reader, up_writer, self._recorder(conn, "C>S")),
            pump(up_reader, writer, self._recorder(conn, "S>C")),
        ):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cut(self, hold: bool = False) -> None:
        """Aborts every forwarded connection (both TCP sides, no close frame). With hold=True,
        connections made afterwards wait until resume()."""
        if hold:
            self._resume.clear()
        for writer, up_writer in list(self._pairs):
            self._pairs.discard((writer, up_writer))
            self.frames.append(Frame(0, "--", self._ms(), "cut", "proxy cut the TCP connection"))
            writer.transport.abort()
            up_writer.transport.abort()

    def resume(self) -> None:
        self._resume.set()

    def wire(self, last: int = 80) -> str:
        lines = []
        for f in self.frames[-last:]:
            code = f" {f.code}" if f.code is not None else ""
            lines.append(f"#{f.conn} {f.ms:6d}ms {f.direction} {f.kind}{code} {f.text}")
        return "\n".join(lines)

    async def close(self) -> None:
        self._closing = True
        self._resume.set()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
