"""An aiosmtpd handler for herald-outbound's email tests.

Run as: python3 -m aiosmtpd -n -l 127.0.0.1:PORT -c smtp_sink.Sink FOLDER

Every accepted message is written to FOLDER as NNNNNN.json: the envelope, the parsed headers
and the decoded text and HTML parts, plus which connection carried it (to check reuse) and
whether it came over TLS. Recipients and senders whose local part starts with a keyword get a
scripted refusal, so the tests can produce each SMTP outcome on demand:

  RCPT  gone*    -> 550 5.1.1 (mailbox does not exist)
        moved*   -> 551 5.1.6 (user not local)
        badname* -> 553 5.1.3 (mailbox name not allowed)
        busy*    -> 451 4.3.0 (try again later)
        spam*    -> 550 5.7.1 (refused by policy)
        deny*    -> 554 5.7.1 (relay denied)
  MAIL  blocked* -> 550 5.7.1 (sender refused)
  DATA  a subject containing [reject] -> 554 5.6.0 after the content
"""

import itertools
import json
import os
from email import policy
from email.parser import BytesParser

RCPT_REPLIES = {
    "gone": "550 5.1.1 No such user here",
    "moved": "551 5.1.6 User not local",
    "badname": "553 5.1.3 Mailbox name not allowed",
    "busy": "451 4.3.0 Mailbox busy, try again later",
    "spam": "550 5.7.1 Message refused by policy",
    "deny": "554 5.7.1 Relay access denied",
}


def _local(address):
    return address.split("@", 1)[0].lower()


class Sink:
    def __init__(self, folder):
        self.folder = folder
        self.counter = itertools.count()

    @classmethod
    def from_cli(cls, parser, *args):
        if len(args) != 1:
            parser.error("smtp_sink.Sink takes one argument: the folder to write messages to")
        return cls(args[0])

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if _local(address).startswith("blocked"):
            return "550 5.7.1 Sender address rejected"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = _local(address)
        for prefix, reply in RCPT_REPLIES.items():
            if local.startswith(prefix):
                return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        message = BytesParser(policy=policy.default).parsebytes(raw)
        if "[reject]" in str(message.get("subject", "")):
            return "554 5.6.0 Content rejected"
        parts = []
        for part in message.walk():
            if part.is_multipart():
                continue
            parts.append({"content_type": part.get_content_type(),
                          "content": part.get_content()})
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "subject": str(message.get("subject", "")),
            "from": str(message.get("from", "")),
            "to": str(message.get("to", "")),
            "message_id": str(message.get("message-id", "")),
            "content_type": message.get_content_type(),
            "parts": parts,
            "peer": list(session.peer) if session.peer else None,
            # session.ssl is set by STARTTLS only; implicit TLS shows on the transport.
            "tls": session.ssl is not None
            or (server.transport is not None
                and server.transport.get_extra_info("ssl_object") is not None),
        }
        n = next(self.counter)
        path = os.path.join(self.folder, "%06d.json" % n)
        # Write then rename, so a reader never sees half a file.
        with open(path + ".tmp", "w", encoding="utf-8") as out:
            json.dump(record, out)
        os.replace(path + ".tmp", path)
        return "250 2.0.0 OK queued as %06d" % n
