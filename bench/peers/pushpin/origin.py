#!/usr/bin/env python3
"""bench/peers/pushpin/origin.py: the GRIP origin behind Pushpin for bench/run.

SSE: GET /stream/<channel> is answered with an SSE stream that Pushpin holds open on channel
<channel> (`Grip-Hold: stream`); its first event is `subscribed`, so a client knows it is on
the channel.

WebSocket, through Pushpin's WebSocket-over-HTTP protocol (the route needs `over_http`):
Pushpin turns a client's WebSocket on /ws/<channel> into POST requests whose body is a list of
events (`application/websocket-events`: `NAME\\r\\n`, or `NAME <hex size>\\r\\n<content>\\r\\n`).
OPEN is accepted with OPEN, the GRIP control message `c:{"type":"subscribe",...}` for
<channel> (allowed by `Sec-WebSocket-Extensions: grip` in the reply) and then the message
`subscribed` (sent as `m:subscribed`, the GRIP message prefix), so a client knows it is on the
channel; PING is answered with PONG, CLOSE with CLOSE (same code), DISCONNECT with DISCONNECT;
TEXT and BINARY from the client are ignored.

Publications then come from Pushpin's publish endpoint, not from here. Prints
"listening on http://HOST:PORT" once it accepts connections (PORT=0: any free port).
"""
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIRST_EVENT = b"event: subscribed\ndata: {}\n\n"
WS_EVENTS = "application/websocket-events"


def parse_events(body):
    """[(name, content or None)] from a WebSocket-over-HTTP body; ValueError if malformed."""
    events = []
    at = 0
    while at < len(body):
        end = body.find(b"\r\n", at)
        if end < 0:
            raise ValueError("an event line without CRLF")
        name, _, size = body[at:end].decode("ascii").partition(" ")
        at = end + 2
        content = None
        if size:
            length = int(size, 16)
            content = body[at:at + length]
            if len(content) != length or body[at + length:at + length + 2] != b"\r\n":
                raise ValueError(f"{name}: content shorter than {length} bytes")
            at += length + 2
        events.append((name, content))
    return events


def encode_event(name, content=None):
    if content is None:
        return name.encode("ascii") + b"\r\n"
    return b"%s %x\r\n%s\r\n" % (name.encode("ascii"), len(content), content)


def answer_events(channel, events):
    """The events answering `events` on a connection to `channel`."""
    out = []
    for name, content in events:
        if name == "OPEN":
            control = json.dumps({"type": "subscribe", "channel": channel}, separators=(",", ":"))
            out += [encode_event("OPEN"), encode_event("TEXT", b"c:" + control.encode()),
                    encode_event("TEXT", b"m:subscribed")]
        elif name == "PING":
            out.append(encode_event("PONG"))
        elif name == "CLOSE":
            out.append(encode_event("CLOSE", content or b""))
        elif name == "DISCONNECT":
            out.append(encode_event("DISCONNECT"))
    return b"".join(out)


class Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are written separately: without this, Nagle's algorithm and delayed
    # ACKs hold every reply back 40 ms on a keep-alive connection.
    disable_nagle_algorithm = True

    def reply(self, status, headers, body):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def channel_after(self, prefix):
        """The channel named by the path after `prefix`, or None."""
        channel = self.path.split("?", 1)[0][len(prefix):] if self.path.startswith(prefix) else ""
        return channel or None

    def do_GET(self):
        channel = self.channel_after("/stream/")
        if channel is None:
            self.reply(404, [], b"")
            return
        self.reply(200, [("Content-Type", "text/event-stream"), ("Grip-Hold", "stream"),
                         ("Grip-Channel", channel)], FIRST_EVENT)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        channel = self.channel_after("/ws/")
        if channel is None or self.headers.get("Content-Type", "").split(";")[0] != WS_EVENTS:
            self.reply(404, [], b"")
            return
        try:
            events = parse_events(body)
        except ValueError as error:
            self.reply(400, [("Content-Type", "text/plain")], str(error).encode())
            return
        self.reply(200, [("Content-Type", WS_EVENTS), ("Sec-WebSocket-Extensions", "grip")],
                   answer_events(channel, events))

    def log_message(self, *args):
        pass


def main():
    server = ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "0"))), Origin)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"pushpin origin listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
