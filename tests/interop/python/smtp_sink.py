"""An in-process SMTP server for the push tests: `aiosmtpd` (PyPI, pinned) with a handler that
keeps every accepted message in memory, parsed.

`SmtpSink.start()` serves on a free loopback port (plain SMTP, no TLS: herald's
`security = "none"`) from aiosmtpd's own thread; `messages()` returns what arrived so far.
Recipients whose local part starts with `gone` are refused with `550 5.1.1` (a mailbox that does
not exist).
"""

from __future__ import annotations

import socket
import threading
from email import policy
from email.parser import BytesParser
from typing import Any, Dict, List

try:
    from aiosmtpd.controller import Controller
except ImportError as error:  # pragma: no cover - the message is the point
    raise RuntimeError(
        "aiosmtpd is missing from the interop venv: run `scripts/test python` (it installs "
        "tests/interop/requirements.txt), or `tests/interop/.venv/bin/pip install -r "
        "tests/interop/requirements.txt`"
    ) from error


class _Handler:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: List[Dict[str, Any]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        # A mailbox that does not exist, on demand: local parts starting with "gone".
        if address.split("@", 1)[0].lower().startswith("gone"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        raw = envelope.original_content or envelope.content
        message = BytesParser(policy=policy.default).parsebytes(raw)
        parts = []
        for part in message.walk():
            if part.is_multipart():
                continue
            parts.append({"content_type": part.get_content_type(), "content": part.get_content()})
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "subject": str(message.get("subject", "")),
            "from": str(message.get("from", "")),
            "to": str(message.get("to", "")),
            "parts": parts,
        }
        with self.lock:
            self.messages.append(record)
        return "250 2.0.0 OK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmtpSink:
    def __init__(self, controller: Controller, handler: _Handler, port: int) -> None:
        self._controller = controller
        self._handler = handler
        self.host = "127.0.0.1"
        self.port = port

    @classmethod
    def start(cls) -> "SmtpSink":
        last: Exception = RuntimeError("no attempt")
        # The port is picked before aiosmtpd binds it; another process may take it between.
        for _ in range(5):
            handler = _Handler()
            port = _free_port()
            controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10)
            try:
                controller.start()
            except Exception as error:  # noqa: BLE001 - retried on another port
                last = error
                continue
            return cls(controller, handler, port)
        raise RuntimeError(f"aiosmtpd did not start (5 tries): {last}")

    def messages(self) -> List[Dict[str, Any]]:
        with self._handler.lock:
            return list(self._handler.messages)

    def to(self, address: str) -> List[Dict[str, Any]]:
        return [m for m in self.messages() if address in m["rcpt_tos"]]

    def stop(self) -> None:
        self._controller.stop()
