#!/usr/bin/env python3
"""bench/peers/pushpin/origin.py: the GRIP origin behind Pushpin for bench/run.

GET /stream/<channel> is answered with an SSE stream that Pushpin holds open on channel
<channel> (`Grip-Hold: stream`); its first event is `subscribed`, so a client knows it is on
the channel. Publications then come from Pushpin's publish endpoint, not from here. Prints
"listening on http://HOST:PORT" once it accepts connections (PORT=0: any free port).
"""
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIRST_EVENT = b"event: subscribed\ndata: {}\n\n"


class Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are written separately: without this, Nagle's algorithm and delayed
    # ACKs hold every reply back 40 ms on a keep-alive connection.
    disable_nagle_algorithm = True

    def do_GET(self):
        if not self.path.startswith("/stream/") or len(self.path) <= len("/stream/"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        channel = self.path[len("/stream/"):]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Grip-Hold", "stream")
        self.send_header("Grip-Channel", channel)
        self.send_header("Content-Length", str(len(FIRST_EVENT)))
        self.end_headers()
        self.wfile.write(FIRST_EVENT)

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
